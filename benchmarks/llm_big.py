"""A 1B-class decoder through the whole int4 build, for its memory: random weights in Llama 3.2
1B's shape (1.24 B parameters, 4.9 GB in fp32), built by ``edgepack build`` in a child process
whose peak RSS is the figure (``ru_maxrss`` of the children, so this process's own model is not
counted). The random model is written once under the work folder.

    .venv/bin/python -m benchmarks.llm_big                 # the 1.24 B model (~25 min, 2 cores)
    .venv/bin/python -m benchmarks.llm_big --layers 1 --hidden 256 --intermediate 512  # smoke run

The vocabulary is Llama 3's 128,256 rows, most of the parameters after the layers; the tokenizer
is a small word list (tokens beyond it are never fed, only scored), so perplexity figures of this
run mean nothing: only bytes, time and memory do.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent


def write_model(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    """Random Llama weights in ``folder`` (safetensors, sharded as transformers saves them);
    returns the parameter count."""
    import torch
    import transformers

    from benchmarks.tiny import write_vocab

    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        return int(config["edgepack_parameters"])
    vocab_file = write_vocab(folder, [REPO / "samples" / "calibration.txt"])
    transformers.BertTokenizerFast(vocab_file=str(vocab_file)).save_pretrained(folder)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        num_key_value_heads=max(hidden // 256, 1),
        max_position_embeddings=131_072,  # the bundle serves 2048 of them (MAX_CONTEXT)
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rope_theta=500_000.0,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    net = transformers.AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in net.parameters())
    net.config.edgepack_parameters = count
    net.save_pretrained(folder, safe_serialization=True)
    return count


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/edgepack-big"))
@click.option("--layers", default=16, show_default=True)
@click.option("--hidden", default=2048, show_default=True)
@click.option("--intermediate", default=8192, show_default=True)
@click.option("--vocab", default=128_256, show_default=True)
def main(workdir: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> None:
    name = f"llama-{layers}x{hidden}x{intermediate}-v{vocab}"
    folder = workdir / name
    count = write_model(folder, layers, hidden, intermediate, vocab)
    out = workdir / "dist"
    start = time.monotonic()
    log = workdir / "build.log"  # the build's stage lines, to follow a run of half an hour
    with open(log, "w") as stderr:
        run = subprocess.run(
            [
                *(str(Path(sys.executable).parent / "edgepack"), "build", "--model", str(folder)),
                *("--target", "arm64", "--precision", "int4", "--max-drop", "100", "--force"),
                *("--calibration", str(REPO / "samples" / "calibration.txt"), "--out", str(out)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    seconds = time.monotonic() - start
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    stages = {}
    for manifest in out.glob("*/manifest.json"):
        stages = json.loads(manifest.read_text())["resources"]["stage_peak_rss_mb"]
    peak_mb = max([children_mb, *(mb * 1e6 / 2**20 for mb in stages.values())])
    result = {
        "model": name,
        "parameters": count,
        "fp32_gb": round(count * 4 / 1e9, 2),
        "build_returncode": run.returncode,
        "build_seconds": round(seconds, 1),
        "build_peak_rss_mb": round(peak_mb),
        "peak_rss_over_fp32": round(peak_mb * 2**20 / (count * 4), 2),
        "stage_peak_rss_mb": stages,
        "bundles": sorted(str(p) for p in out.glob("*.tar.gz")),
        "stderr_tail": log.read_text()[-600:] if run.returncode else "",
    }
    print(json.dumps(result, indent=2))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
