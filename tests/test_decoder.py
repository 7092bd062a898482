"""Generative decoders: the family, loading folders and GGUF files, export checked by greedy
generation against PyTorch on tiny random Llama, Qwen2 and GPT-2 models."""

from __future__ import annotations

from pathlib import Path

import pytest
from decoder_factory import (
    GEMMA3_AS_GGUF,
    KINDS,
    VARIANTS,
    make_tiny_decoder,
    prompts_for,
    write_gguf,
    write_model_gguf,
)

from edgepack.errors import UserError
from edgepack.families import decoder, encoder, family_of, is_generative
from edgepack.load import load_model


def test_family_of_decoder_types() -> None:
    for model_type in ("llama", "qwen2", "qwen3", "gemma3_text", "gpt2", "mistral", "phi3"):
        assert family_of(model_type) is decoder
        assert is_generative(model_type)
    assert family_of("bert") is encoder and not is_generative("bert")
    assert decoder.detect_task({"architectures": ["LlamaForCausalLM"]}) == "text-generation"
    assert decoder.detect_task({"architectures": ["GPT2LMHeadModel"]}) == "text-generation"
    assert decoder.detect_task({"architectures": ["LlamaModel"]}) not in decoder.TASKS


@pytest.fixture(scope="module", params=KINDS)
def tiny_decoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


def test_load_decoder_folder(tiny_decoder: Path) -> None:
    model = load_model(str(tiny_decoder))
    assert model.task == "text-generation"
    assert model.max_length == 64  # the tokenizer's model_max_length is below the 128 positions
    assert is_generative(model.model_type)


def test_decoder_without_lm_head_is_refused(tmp_path: Path) -> None:
    folder = make_tiny_decoder(tmp_path / "cls", "llama", head="seq")
    with pytest.raises(
        UserError,
        match=r"has no causal LM head \(LlamaForSequenceClassification\); decoders serve: text-generation",
    ):
        load_model(str(folder))


def test_decoder_with_an_encoder_task_is_refused(tiny_decoder: Path) -> None:
    with pytest.raises(UserError, match=r"unknown task 'text-classification'.*text-generation"):
        load_model(str(tiny_decoder), task="text-classification")


def test_gguf_not_gguf_truncated_and_unknown_arch(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(UserError, match="not a GGUF file"):
        load_model(str(fake))
    whole = write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(UserError, match=r"cut\.gguf is truncated or corrupt"):
        load_model(str(cut))
    write_gguf(tmp_path / "other.gguf", "rwkv6")
    with pytest.raises(UserError, match="architecture 'rwkv6' is not supported; supported: llama"):
        load_model(str(tmp_path / "other.gguf"))


def test_export_matches_pytorch_greedy(tiny_decoder: Path, tmp_path: Path) -> None:
    from edgepack.export import validate_generation
    from edgepack.export.decoder import export_decoder

    model = load_model(str(tiny_decoder))
    onnx_model = export_decoder(model, tmp_path)
    names = [i["name"] for i in onnx_model.inputs]
    assert {"input_ids", "attention_mask"} <= set(names)
    assert "past_key_values.1.value" in names
    assert onnx_model.records["eos_token_ids"] == [3]
    prompts = prompts_for(tiny_decoder)
    record = validate_generation(onnx_model, model, prompts, new_tokens=32)
    assert record["greedy_tokens_matched"] > len(prompts)
    assert record["max_abs_logit_diff_vs_pytorch"] < 1e-3
    # The check is teacher-forced (one forward pass per prompt); PyTorch's own generate agrees.
    import torch
    from transformers import AutoModelForCausalLM

    from edgepack.evaluate import session
    from edgepack.families.generate import greedy

    net = AutoModelForCausalLM.from_pretrained(str(tiny_decoder), dtype=torch.float32).eval()
    sess = session(onnx_model.path, threads=1)
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                           do_sample=False, eos_token_id=3, pad_token_id=3)  # fmt: skip
        assert greedy(sess, prompt, 32, [3])[0] == out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_llama_family_graphs_are_fused(tmp_path: Path, kind: str) -> None:
    """Llama and Qwen2 are written as fused layers (one GroupQueryAttention per layer, RMSNorm with
    the residual add); GPT-2 is traced, and the record says why."""
    import onnx

    from edgepack.export.decoder import export_decoder

    model = load_model(str(make_tiny_decoder(tmp_path / "m", kind)))
    exported = export_decoder(model, tmp_path / "x")
    ops = [n.op_type for n in onnx.load(str(exported.path)).graph.node]
    if kind == "gpt2":
        assert "GroupQueryAttention" not in ops
        assert exported.records["graph"].startswith("traced by optimum (model type 'gpt2'")
    else:
        assert exported.records["graph"] == "fused"
        assert ops.count("GroupQueryAttention") == 2
        assert ops.count("SkipSimplifiedLayerNormalization") == 4  # 3 between, 1 final
        assert ops.count("MatMul") == 11 and "Softmax" not in ops


def test_generation_projects_only_the_last_position(tmp_path: Path) -> None:
    """A fused graph's ``logits_from``: fed, the vocabulary projection runs from that position on
    (generation's steps); not fed, every position's logits as before (perplexity, the check)."""
    import numpy as np

    from edgepack.evaluate import session
    from edgepack.export.decoder import export_decoder
    from edgepack.families.generate import empty_past, step

    model = load_model(str(make_tiny_decoder(tmp_path / "m", "llama")))
    sess = session(export_decoder(model, tmp_path / "x").path)
    ids = [2, 10, 11, 12, 13]
    every, past_all = step(sess, ids, empty_past(sess), 0)
    last, past_last = step(sess, ids, empty_past(sess), 0, last=True)
    assert every.shape[0] == 5 and last.shape[0] == 1
    assert np.allclose(last[0], every[-1], atol=1e-5)
    assert all(np.array_equal(past_all[k], past_last[k]) for k in past_all)


# What each variant's graph has that the plain Llama layer's lacks (2 layers each).
VARIANT_OPS = {
    "llama3": {"GroupQueryAttention": 2, "QuickGelu": 2},
    "qwen2": {"GroupQueryAttention": 2, "Add": 2},  # the qkv bias
    "qwen3": {"Split": 2, "SimplifiedLayerNormalization": 5},  # q/k per head + the first norm
    "phi3": {"MatMul": 11, "QuickGelu": 2},  # packed qkv and gate_up split back into 5 MatMuls
    "gemma3": {
        "FastGelu": 2,
        "SimplifiedLayerNormalization": 9,
        "Mul": 3,
    },  # + post-norms, x sqrt(h)
}


@pytest.mark.parametrize("kind", [*VARIANTS, "qwen2"])
def test_fused_variants_match_pytorch_token_for_token(tmp_path: Path, kind: str) -> None:
    """Every fused architecture against PyTorch: 32 of 32 greedy tokens per prompt (no end token
    to stop early), and first-step logits within 1e-3, also on a 40-token prompt that crosses the
    sliding windows (Phi-3's 24, Gemma 3's 16) and Llama 3's blended rotary wavelengths."""
    import numpy as np
    import onnx

    from edgepack.export import validate_generation
    from edgepack.export.decoder import export_decoder

    folder = make_tiny_decoder(tmp_path / "m", kind, eos=None)
    model = load_model(str(folder))
    exported = export_decoder(model, tmp_path / "x")
    assert exported.records["graph"] == "fused"
    ops: dict[str, int] = {}
    for node in onnx.load(str(exported.path)).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    assert {op: ops.get(op, 0) for op in VARIANT_OPS[kind]} == VARIANT_OPS[kind]
    long_prompt = [2, *np.random.default_rng(0).integers(5, 60, 39).tolist()]
    prompts = [*prompts_for(folder), long_prompt]
    record = validate_generation(exported, model, prompts, new_tokens=32)
    assert record["greedy_tokens_matched"] == 32 * len(prompts)
    assert record["max_abs_logit_diff_vs_pytorch"] < 1e-3


@pytest.mark.parametrize(
    ("kind", "quant"),
    [
        ("gemma3", "Q4_0"),
        ("qwen3", "Q8_0"),
        ("phi3", "Q4_0"),
        ("llama3", "Q4_0"),
        ("qwen2", "Q8_0"),
    ],
)
def test_quantized_gguf_of_each_architecture_exports_fused(
    tmp_path: Path, kind: str, quant: str
) -> None:
    """A GGUF as llama.cpp writes it (Gemma 3's architecture is "gemma3", its model type
    gemma3_text), with quantized matrices that transformers dequantizes: the fused graph of the
    dequantized model matches it in PyTorch."""
    import numpy as np
    import torch
    import transformers

    from edgepack.export import validate_generation
    from edgepack.export.decoder import export_decoder

    folder = make_tiny_decoder(tmp_path / "m", kind)
    model = load_model(str(write_model_gguf(folder, kind, tmp_path / "m.gguf", quant)))
    assert model.model_type == {"gemma3": "gemma3_text", "llama3": "llama"}.get(kind, kind)
    original = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32)
    key = "model.layers.0.mlp.down_proj.weight"
    error = (loaded.state_dict()[key] - original.state_dict()[key]).abs().max().item()
    assert 0 < error < 0.2  # dequantized: near the weights, not equal to them
    exported = export_decoder(model, tmp_path / "x")
    assert exported.records["graph"] == "fused"
    record = validate_generation(exported, model, prompts_for(folder), new_tokens=32)
    assert record["max_abs_logit_diff_vs_pytorch"] < 1e-3 and np.isfinite(error)


@pytest.mark.parametrize("kind", ["llama3", "phi3", "gemma3", "qwen3", "qwen2"])
def test_an_f32_gguf_is_the_model_it_was_written_from(tmp_path: Path, kind: str) -> None:
    """What llama.cpp's converter writes beyond the sizes (llama3 rope divisors, Phi-3's rotary
    width and longrope tables and sliding window, Gemma 3's query scale, Qwen3's head width)
    reaches the model: an unquantized GGUF gives the original's logits (Qwen2's with its q/k/v
    biases), and gguf.json says what the file was and what was restored."""
    import json

    import torch
    import transformers

    overrides = GEMMA3_AS_GGUF if kind == "gemma3" else {}
    folder = make_tiny_decoder(tmp_path / "m", kind, **overrides)
    if kind == "qwen2":  # biases the factory leaves at zero, made to matter
        net = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
        net.save_pretrained(folder)
    model = load_model(str(write_model_gguf(folder, kind, tmp_path / "m.gguf")))
    original = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(model.path), dtype=torch.float32)
    ids = torch.tensor([list(range(4, 64))])  # 60 positions: past the windows and rope blends
    with torch.no_grad():
        diff = (loaded(ids).logits - original(ids).logits).abs().max().item()
    assert diff < 1e-4
    record = json.loads((model.path / "gguf.json").read_text())
    assert record["file_type"] == "ALL_F32" and set(record["parameters_by_type"]) == {"F32"}
    # Each of these kinds but Qwen2 needs something transformers drops.
    assert bool(record["restored"]) == (kind != "qwen2")


def test_llama3_rope_divisors_that_fit_no_llama3_scaling_are_refused() -> None:
    import numpy as np

    from edgepack.load.gguf_config import llama3_rope

    freqs = np.ones(8, dtype=np.float32)
    freqs[3] = 5.0  # one scaled frequency among unscaled faster ones: no llama3 curve does that
    with pytest.raises(UserError, match="not llama3 rope scaling"):
        llama3_rope(freqs, 16, 10_000.0, None)


def test_validation_reports_every_mismatch(tmp_path: Path) -> None:
    """The export of one model judged against another: both prompts' mismatches in one message."""
    from edgepack.export import validate_generation
    from edgepack.export.decoder import export_decoder

    a = make_tiny_decoder(tmp_path / "a", "llama", seed=0)
    b = make_tiny_decoder(tmp_path / "b", "llama", seed=1)
    onnx_a = export_decoder(load_model(str(a)), tmp_path / "export")
    with pytest.raises(UserError) as caught:
        validate_generation(onnx_a, load_model(str(b)), prompts_for(a, 2), new_tokens=8)
    message = str(caught.value)
    assert "prompt 0: greedy tokens differ" in message
    assert "prompt 1:" in message and "max |logit diff|" in message


def test_a_graph_past_two_gb_streams_its_weights_to_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past protobuf's 2 GB the weights go to model.onnx_data as the graph is written (the 2 GB
    line lowered to 0 here): the graph file holds no weight, onnxruntime reads the pair to the
    same logits as the single file, the calibration probe (a graph edited in memory) reads the
    same activations and the int4 graph is the same file."""
    import numpy as np

    from edgepack.evaluate import session
    from edgepack.export import decoder_graph
    from edgepack.families.generate import token_scores

    folder = make_tiny_decoder(tmp_path / "m", "llama")
    single, split = tmp_path / "one" / "model.onnx", tmp_path / "two" / "model.onnx"
    single.parent.mkdir()
    split.parent.mkdir()
    decoder_graph.write_fused(folder, single, 64)
    monkeypatch.setattr(decoder_graph, "TWO_GB", 0)
    decoder_graph.write_fused(folder, split, 64)
    data = split.parent / "model.onnx_data"
    assert data.stat().st_size > 0.9 * single.stat().st_size > 10 * split.stat().st_size
    ids = list(range(4, 40))
    a, top_a = token_scores(session(single), ids)
    b, top_b = token_scores(session(split), ids)
    assert np.array_equal(top_a, top_b) and np.allclose(a, b, atol=1e-5)
    from edgepack.quantize import activation_power

    one, two = activation_power(single, ids), activation_power(split, ids)
    assert one.keys() == two.keys() and all(np.allclose(one[k], two[k]) for k in one)
    # Weight-only int4 reads the external weights one matrix at a time: the same graph, byte for
    # byte, as from the single file.
    from edgepack.quantize.weight_only import WeightOnlySettings, quantize_weights

    for src in (single, split):
        quantize_weights(src, src.with_name("int4.onnx"), WeightOnlySettings(), dict(one))
    assert (single.parent / "int4.onnx").read_bytes() == (split.parent / "int4.onnx").read_bytes()
