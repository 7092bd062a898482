"""A model folder is read only inside itself, and its config is checked before anything is built.

Before: a shard index naming ``../other/model.safetensors`` built from weights outside the folder;
``tokenizer_config.json`` could point transformers at any file; a config declaring 100000 layers
allocated until the machine died, and a string or float where an integer belongs ended in a
traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.cli import cli
from edgepack.errors import UserError
from edgepack.load import load_model


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _refused(spec: Path, *needles: str) -> str:
    with pytest.raises(UserError) as caught:
        load_model(str(spec))
    line = str(caught.value)
    assert "\n" not in line
    for needle in needles:
        assert needle in line, line
    return line


def _sharded(folder: Path, shard: str) -> None:
    """An index naming ``shard`` for every tensor, as a sharded checkpoint's index does."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "np") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, shard)}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


# ---- paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "../../etc/passwd", "/etc/passwd"])
def test_a_shard_outside_the_folder_is_refused(tiny_bert: Path, tmp_path: Path, shard: str) -> None:
    _copy(tiny_bert, tmp_path / "other")  # real weights one folder up: they must not be used
    folder = _copy(tiny_bert, tmp_path / "m")
    _sharded(folder, shard)
    (folder / "model.safetensors").unlink()
    _refused(folder, "weight_map", repr(shard), "not a path inside the model folder")


def test_a_shard_outside_the_folder_is_one_line_and_exit_2_from_the_cli(
    tiny_bert: Path, texts_file: Path, tmp_path: Path
) -> None:
    _copy(tiny_bert, tmp_path / "other")
    folder = _copy(tiny_bert, tmp_path / "m")
    _sharded(folder, "../other/model.safetensors")
    (folder / "model.safetensors").unlink()
    args = ["build", "--model", str(folder), "--calibration", str(texts_file)]
    result = CliRunner().invoke(cli, [*args, "--target", "cpu", "--out", str(tmp_path / "d")])
    assert result.exit_code == 2, result.output
    assert "'../other/model.safetensors'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_shards_inside_the_folder_still_load(tiny_bert: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_bert, tmp_path / "m")
    (folder / "shards").mkdir()
    _sharded(folder, "shards/part-1.safetensors")
    (folder / "model.safetensors").rename(folder / "shards" / "part-1.safetensors")
    assert load_model(str(folder)).model_type == "bert"


def test_a_module_path_outside_the_folder_is_refused(tiny_st: Path, tmp_path: Path) -> None:
    _copy(tiny_st / "1_Pooling", tmp_path / "elsewhere")
    folder = _copy(tiny_st, tmp_path / "m")
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["path"] = "../elsewhere"
    (folder / "modules.json").write_text(json.dumps(modules))
    _refused(folder, "modules.json", "'../elsewhere'")


def test_a_tokenizer_file_named_outside_the_folder_is_refused(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """transformers opens tokenizer_config.json's vocab_file instead of the folder's vocab.txt."""
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET\n")
    folder = _copy(tiny_bert, tmp_path / "m")
    _edit_json(folder / "tokenizer_config.json", vocab_file=str(secret))
    _refused(folder, "tokenizer_config.json's vocab_file", str(secret))


@pytest.mark.parametrize("what", ["file", "module folder"])
def test_a_symlink_out_of_the_folder_is_refused(tiny_st: Path, tmp_path: Path, what: str) -> None:
    """An unpacked archive could link vocab.txt to a private file, which the bundle would ship."""
    folder = _copy(tiny_st, tmp_path / "m")
    outside = _copy(tiny_st, tmp_path / "outside")
    name = "vocab.txt" if what == "file" else "1_Pooling"
    shutil.rmtree(folder / name) if what != "file" else (folder / name).unlink()
    (folder / name).symlink_to(outside / name)
    _refused(folder, name, "leads outside the model folder")


def test_a_hub_snapshot_with_symlinks_into_blobs_loads_as_the_same_model(
    tiny_st: Path, tmp_path: Path
) -> None:
    """huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>; module folders are
    real folders whose files link two levels further up."""
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    blobs.mkdir(parents=True)
    for path in sorted(p for p in tiny_st.rglob("*") if p.is_file()):
        rel = path.relative_to(tiny_st)
        blob = blobs / f"blob{len(list(blobs.iterdir()))}"
        shutil.copy(path, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    linked, plain = load_model(str(snapshot)), load_model(str(tiny_st))
    assert linked.files_sha256 == plain.files_sha256
    assert linked.digest == plain.digest


def test_a_symlink_inside_the_folder_is_followed(tiny_bert: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_bert, tmp_path / "m")
    (folder / "weights").mkdir()
    (folder / "model.safetensors").rename(folder / "weights" / "model.safetensors")
    (folder / "model.safetensors").symlink_to("weights/model.safetensors")
    assert load_model(str(folder)).weights_sha256 == load_model(str(tiny_bert)).weights_sha256


def test_a_fifo_in_the_folder_is_refused_not_waited_on(tiny_bert: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_bert, tmp_path / "m")
    (folder / "vocab.txt").unlink()
    os.mkfifo(folder / "vocab.txt")
    _refused(folder, "vocab.txt is not a regular file")


# ---- config values ------------------------------------------------------------------------------

ENCODER_CASES = {
    "100000 layers": ({"num_hidden_layers": 100_000}, "weight files hold"),
    "hidden 10**9": ({"hidden_size": 10**9}, "weight files hold"),
    "vocab 10**12": ({"vocab_size": 10**12}, "weight files hold"),
    "string": ({"num_hidden_layers": "12"}, "num_hidden_layers must be a positive integer"),
    "float": ({"hidden_size": 32.0}, "hidden_size must be a positive integer"),
    "negative": ({"num_attention_heads": -4}, "num_attention_heads must be a positive integer"),
    "bool": ({"intermediate_size": True}, "intermediate_size must be a positive integer"),
    "zero": ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    "null": ({"vocab_size": None}, "vocab_size must be a positive integer"),
    "heads do not divide": ({"num_attention_heads": 5}, "must be a multiple"),
    "epsilon": ({"layer_norm_eps": "tiny"}, "layer_norm_eps must be a positive number"),
}


def _build(model: Path, texts: Path, out: Path) -> tuple[int, str]:
    args = ["build", "--model", str(model), "--calibration", str(texts), "--target", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out)])
    return result.exit_code, result.output


@pytest.mark.parametrize("case", list(ENCODER_CASES))
def test_a_bad_encoder_config_is_one_line_and_exit_2(
    tiny_bert: Path, texts_file: Path, tmp_path: Path, case: str
) -> None:
    changes, message = ENCODER_CASES[case]
    folder = _copy(tiny_bert, tmp_path / "m")
    _edit_json(folder / "config.json", **changes)
    code, output = _build(folder, texts_file, tmp_path / "d")
    assert code == 2, output
    assert message in output and "config.json" in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


DECODER_CASES = {
    "100000 layers": ("llama", {"num_hidden_layers": 100_000}, "weight files hold"),
    "kv heads do not divide": ("llama", {"num_key_value_heads": 3}, "must be a multiple"),
    "gpt2 string": ("gpt2", {"n_layer": "2"}, "n_layer must be a positive integer"),
    "gpt2 width": ("gpt2", {"n_embd": 10**9}, "weight files hold"),
    "rope": ("llama", {"rope_theta": -1}, "rope_theta must be a positive number"),
}


@pytest.mark.parametrize("case", list(DECODER_CASES))
def test_a_bad_decoder_config_is_one_line_and_exit_2(
    texts_file: Path, tmp_path: Path, case: str
) -> None:
    from decoder_factory import make_tiny_decoder

    kind, changes, message = DECODER_CASES[case]
    folder = make_tiny_decoder(tmp_path / "m", kind)
    _edit_json(folder / "config.json", **changes)
    code, output = _build(folder, texts_file, tmp_path / "d")
    assert code == 2, output
    assert message in output and "Traceback" not in output, output


def test_an_integer_past_pythons_digit_limit_is_not_readable_json(
    tiny_bert: Path, tmp_path: Path
) -> None:
    folder = _copy(tiny_bert, tmp_path / "m")
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(
        text.replace('"num_hidden_layers": 2', '"num_hidden_layers": ' + "9" * 5000)
    )
    _refused(folder, "config.json is not readable JSON")


def test_a_model_bigger_than_the_machine_is_refused_before_it_is_read(
    tiny_bert: Path, tmp_path: Path
) -> None:
    """A config and a weight file that agree (1 TiB, sparse on disk), larger than free memory:
    refused from the safetensors header and the config, before a byte of weights is read."""
    folder = _copy(tiny_bert, tmp_path / "m")
    size = 1 << 40
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}}
    ).encode()
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
        handle.truncate(8 + len(header) + size)
    _edit_json(
        folder / "config.json",
        hidden_size=8192,
        num_attention_heads=64,
        intermediate_size=32768,
        num_hidden_layers=300,
    )
    _refused(folder, "memory available here")


RSS = r"""
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=600)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.stderr.write(done.stdout + done.stderr)
"""


@pytest.mark.parametrize("changes", [{"num_hidden_layers": 100_000}, {"hidden_size": 10**9}])
def test_an_absurd_config_is_refused_in_a_small_process(
    tiny_bert: Path, texts_file: Path, tmp_path: Path, changes: dict
) -> None:
    """The refusing `edgepack build` (a process of its own) peaks far below what the config
    would allocate: 100000 BERT layers of width 32 are 3 GB, a width of 10**9 is exabytes."""
    folder = _copy(tiny_bert, tmp_path / "m")
    _edit_json(folder / "config.json", **changes)
    build = [sys.executable, "-m", "edgepack.cli", "build", "--model", str(folder)]
    build += ["--calibration", str(texts_file), "--target", "cpu", "--out", str(tmp_path / "d")]
    done = subprocess.run(
        [sys.executable, "-c", RSS, *build], capture_output=True, text=True, timeout=900
    )
    code, peak_kb = (int(v) for v in done.stdout.split())
    assert code == 2, done.stderr
    assert "weight files hold" in done.stderr and "Traceback" not in done.stderr
    assert peak_kb < 1 << 20, f"peak RSS {peak_kb} kB"


def test_a_gguf_declaring_absurd_sizes_is_refused_before_conversion(tmp_path: Path) -> None:
    """transformers builds the model a GGUF's metadata declares before it reads a tensor."""
    import gguf
    import numpy as np

    path = tmp_path / "huge.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(100_000)
    writer.add_embedding_length(4096)
    writer.add_feed_forward_length(11008)
    writer.add_head_count(32)
    writer.add_tensor("token_embd.weight", np.ones((64, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _refused(path, "huge.gguf describes a model of", "weight files hold")
