"""The app runtime of a decoder bundle beyond greedy text: seeded sampling in transformers' order,
streamed text that never splits a character, stop strings, and chat through the bundle's chat
format, from Python and from the `chat` and `generate` commands. One tiny bundle with a chat
template serves the module; it is built with no EOS, so continuations run as long as asked."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from decoder_factory import TINY_CHAT_TEMPLATE, build_chat_decoder

from edgepack.bundle import verify_bundle

HARNESS = Path(__file__).resolve().parents[1] / "edgepack" / "harness"
PROMPT = "the cat was on a mat"
USER = [{"role": "user", "content": "the dog"}]


def load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chat_decoder(tmp_path_factory.mktemp("chat-bundle"))


@pytest.fixture(scope="module")
def runtime(bundle: Path) -> Any:
    return load(bundle / "edgepack_runtime.py", "llm_runtime")


@pytest.fixture(scope="module")
def model(bundle: Path, runtime: Any) -> Any:
    return runtime.Model(bundle)


def run(bundle: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgepack_runtime", *args],
        cwd=bundle, input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_bundle_carries_a_chat_format_that_renders_as_transformers_does(
    bundle: Path, model: Any
) -> None:
    from transformers import AutoTokenizer

    chat = json.loads((bundle / "manifest.json").read_text())["generation"]["chat"]
    assert chat["table"] is not None and chat["end_of_turn"] == "[SEP]"
    assert (bundle / "tokenizer" / "chat_template.jinja").read_text() == TINY_CHAT_TEMPLATE
    tok = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    messages = [
        {"role": "system", "content": "be quick"},
        {"role": "user", "content": "a dog"},
        {"role": "assistant", "content": "a cat"},
        {"role": "user", "content": "the bird?"},
    ]
    assert model.render_chat(messages) == tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert model.chat_ids(messages) == tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True
    )
    assert model.end_of_turn == [tok.convert_tokens_to_ids("[SEP]")]
    assert verify_bundle(bundle) >= 6


def test_greedy_is_the_default_and_a_seed_repeats_its_draws(model: Any) -> None:
    ids = model.tokenizer.encode(PROMPT).ids
    greedy = list(model.generate_ids(ids, 24))
    assert len(greedy) == 24
    assert list(model.generate_ids(ids, 24, temperature=0, top_k=5, top_p=0.5)) == greedy
    # top_k=1 keeps only the argmax: sampling reduces to greedy (a wrong top-k would not).
    assert list(model.generate_ids(ids, 24, temperature=1.5, top_k=1, seed=1)) == greedy
    hot = {"temperature": 1.5, "top_p": 0.95}
    first = list(model.generate_ids(ids, 24, seed=7, **hot))
    assert list(model.generate_ids(ids, 24, seed=7, **hot)) == first
    others = [list(model.generate_ids(ids, 24, seed=s, **hot)) for s in range(4)]
    assert any(o != first for o in others) and any(o != greedy for o in others)
    assert model.generate(PROMPT, 12, temperature=1.5, seed=3) == model.generate(
        PROMPT, 12, temperature=1.5, seed=3
    )


def test_the_sampling_distribution_is_transformers_processors(bundle: Path) -> None:
    """Repetition penalty, temperature, top-k and top-p give the probabilities transformers'
    logits processors give, in the same order; draws follow them and never pick a token they
    removed."""
    import torch
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    decode = load(bundle / "edgepack_decode.py", "llm_decode")
    rng = np.random.default_rng(0)
    for case in range(20):
        logits = rng.normal(0, 3, size=120).astype(np.float32)
        history = rng.integers(0, 120, size=15)
        settings = {
            "temperature": float(rng.uniform(0.3, 2.0)),
            "top_k": int(rng.choice([0, 1, 5, 40])),
            "top_p": float(rng.choice([1.0, 0.9, 0.5, 0.1])),
            "repetition_penalty": float(rng.choice([1.0, 1.3, 0.8])),
        }
        scores = torch.tensor(logits)[None]
        ids = torch.tensor(history)[None]
        processors = [RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"])]
        processors.append(TemperatureLogitsWarper(settings["temperature"]))
        if settings["top_k"]:
            processors.append(TopKLogitsWarper(settings["top_k"]))
        if settings["top_p"] < 1:
            processors.append(TopPLogitsWarper(settings["top_p"]))
        for processor in processors:
            scores = processor(ids, scores)
        want = torch.softmax(scores, dim=-1)[0].double().numpy()
        penalized = decode.penalized(logits, history, settings["repetition_penalty"])
        got = decode.distribution(penalized, settings["temperature"], settings["top_k"],
                                  settings["top_p"])  # fmt: skip
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=str((case, settings)))
    for case in range(
        10
    ):  # the nucleus from a partial sort (doubling its window) is the full sort's
        probs = decode.distribution(rng.normal(0, 2, size=500), 1.0)
        for top_p in (0.3, 0.9, 0.999):
            whole = decode.nucleus(probs, top_p, first=10_000)
            assert decode.nucleus(probs, top_p, first=2).tolist() == whole.tolist(), (case, top_p)
    draw = np.random.default_rng(5)
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    picks = [decode.choose(logits, [], 1.0, 0, 0.75, 1.0, draw) for _ in range(4000)]
    counts = np.bincount(picks, minlength=4) / len(picks)
    # top_p 0.75 keeps 0.5 and 0.3 (0.5 alone falls short), renormalised to 0.625 / 0.375.
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] - 0.625) < 0.03 and abs(counts[1] - 0.375) < 0.03


def test_bad_sampling_values_are_refused_by_name(model: Any, runtime: Any, bundle: Path) -> None:
    ids = model.tokenizer.encode(PROMPT).ids
    for options, words in (
        ({"temperature": -1}, "temperature must be at least 0.0"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 0}, "top_p must be above 0.0"),
        ({"top_k": 2.5}, "top_k must be an integer"),
        ({"repetition_penalty": 0}, "repetition_penalty must be above 0.0"),
        ({"seed": -3}, "seed must be an integer 0 or more"),
        ({"temperature": float("nan")}, "temperature must be a number"),
        ({"beam_width": 3}, "unknown generation option 'beam_width'"),
        ({"stop": 5}, "stop must be a string or a list of strings"),
    ):
        with pytest.raises(runtime.BundleError, match=words):
            model.start(ids, 4, **options)
    cli = run(bundle, "generate", PROMPT, "--top-p", "1.5")
    assert cli.returncode == 2 and "top_p must be above 0.0 and at most 1.0" in cli.stderr
    assert cli.stderr.count("\n") == 1 and "Traceback" not in cli.stderr


def byte_level_tokenizer() -> Any:
    """A byte-level BPE that learned only ASCII words: é, 日 and 🙂 are 2-4 byte tokens each."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["the cat sat on the mat, the dog ran"] * 20, trainer)
    return tok


def test_streamed_text_never_splits_a_character(bundle: Path) -> None:
    runtime = load(bundle / "edgepack_runtime.py", "llm_runtime_bytes")
    tok = byte_level_tokenizer()
    text = "the café 日本 🙂 naïve cat — done"
    ids = tok.encode(text).ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # one token at a time splits characters
    detok = runtime._Detokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    stream = runtime.Generation(tok, iter(ids), 0, set(), [])
    assert "".join(stream) == text and stream.finish_reason == "length"
    assert stream.completion_tokens == len(ids)


@pytest.mark.parametrize(
    ("stops", "want"),
    [
        (["日本"], "the café "),
        (["zzz", "naïve"], "the café 日本 🙂 "),
        (["caf", "the"], ""),
        (["done!"], "the café 日本 🙂 naïve cat — done"),  # only its start is there: all comes out
        (["🙂 n"], "the café 日本 "),
    ],
)
def test_stop_strings_end_the_text_and_are_left_out(bundle: Path, stops: list, want: str) -> None:
    runtime = load(bundle / "edgepack_runtime.py", "llm_runtime_stops")
    tok = byte_level_tokenizer()
    ids = tok.encode("the café 日本 🙂 naïve cat — done").ids
    stream = runtime.Generation(tok, iter(ids), 0, set(), stops)
    pieces = list(stream)
    assert "".join(pieces) == stream.text == want
    assert stream.finish_reason == ("length" if stops == ["done!"] else "stop")
    assert not any(s in stream.text for s in stops)


def test_stop_strings_on_the_model_and_its_end_of_turn(model: Any) -> None:
    full = model.generate(PROMPT, 30)
    words = full.split()
    stop = words[len(words) // 2]
    cut = model.start(model.tokenizer.encode(PROMPT).ids, 30, stop=stop)
    assert "".join(cut) == full[: full.index(stop)] and cut.finish_reason == "stop"
    whole = model.start(model.tokenizer.encode(PROMPT).ids, 30, stop=["@@", words[0] + "@"])
    assert "".join(whole) == full and whole.finish_reason == "length"
    # A chat reply ends at [SEP] (the template's end of turn) though the bundle has no EOS: find a
    # seed whose unconstrained path writes it, and check the reply stops right there.
    sep = model.end_of_turn[0]
    prompt = model.chat_ids(USER)
    for seed in range(40):
        path = list(model.generate_ids(prompt, 40, temperature=1.5, seed=seed))
        if sep in path:
            break
    else:
        pytest.fail("no seed wrote [SEP] in 40 tokens")
    reply = model.chat_stream(USER, 40, temperature=1.5, seed=seed)
    text = "".join(reply)
    end = path.index(sep)
    assert text == "".join(model.start(prompt, end, temperature=1.5, seed=seed))
    assert reply.finish_reason == "stop" and reply.completion_tokens == end + 1


def test_chat_needs_a_chat_format(model: Any, runtime: Any) -> None:
    saved = model.manifest["generation"]["chat"]
    model.manifest["generation"]["chat"] = {"table": None, "why": "no template here"}
    try:
        with pytest.raises(runtime.BundleError, match=r"no chat format \(no template here\)"):
            model.chat(USER)
    finally:
        model.manifest["generation"]["chat"] = saved


def test_the_chat_command_one_shot_and_over_stdin(bundle: Path, model: Any) -> None:
    one = run(bundle, "chat", "--message", "the dog", "--max-new-tokens", "8")
    assert one.returncode == 0, one.stderr
    assert one.stdout == model.chat(USER, 8) + "\n"
    turns = run(bundle, "chat", "--system", "be quick", "--max-new-tokens", "6",
                stdin="the dog\n\na cat\n")  # fmt: skip
    assert turns.returncode == 0, turns.stderr
    first, second = turns.stdout.split("\n")[:2]
    history = [{"role": "system", "content": "be quick"}, {"role": "user", "content": "the dog"}]
    assert first == model.chat(history, 6)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "a cat"}]
    assert second == model.chat(history, 6)
    sampled = [run(bundle, "chat", "--message", "a bird", "--temperature", "1.2", "--seed", "4",
                   "--max-new-tokens", "8").stdout for _ in range(2)]  # fmt: skip
    assert sampled[0] == sampled[1] and sampled[0].strip()
    too_long = run(bundle, "chat", "--message", " ".join(["cat"] * 70))
    assert too_long.returncode == 2 and "longer than the context (64)" in too_long.stderr
    assert too_long.stderr.count("\n") == 1
    assert not (bundle / "__pycache__").exists()
    assert verify_bundle(bundle) >= 6


def test_a_long_conversation_drops_its_oldest_turns_to_fit(bundle: Path) -> None:
    """Over stdin the history grows each turn; past the context the oldest turns go, not the
    conversation."""
    lines = "".join(f"the {w} and the {w}\n" for w in ("dog", "cat", "bird", "book", "phone"))
    done = run(bundle, "chat", "--max-new-tokens", "8", stdin=lines)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split("\n")) == 6
