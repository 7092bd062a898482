"""``edgepack eval``: the task metric of a bundle or model, and its fidelity to a reference."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from edgepack.progress import Progress


def evaluate_one(
    target: Any, data: Any, progress: Progress
) -> tuple[dict[str, Any] | None, list[Any]]:
    """The metric (None for unlabelled data) and the primary outputs on every text, with the
    batches counted on a ``Progress`` stage line (a big eval file runs for minutes)."""
    from transformers import AutoTokenizer

    from edgepack.calibration import encode
    from edgepack.evaldata import score
    from edgepack.evaluate import onnx_runner, session

    tokenizer = AutoTokenizer.from_pretrained(str(target.tokenizer_dir), local_files_only=True)
    names = [i.name for i in session(target.model_file).get_inputs()]
    run = onnx_runner(target.model_file)
    texts = data.texts()
    with progress.stage("evaluate", f"{target.name}: {len(texts)} texts"):
        metric = (
            None
            if data.kind == "texts"
            else score(data, run, tokenizer, names, target.seq_len, target.labels, progress.advance)
        )
        outputs = []
        for i in range(0, len(texts), 32):
            outputs.append(run(encode(tokenizer, texts[i : i + 32], names, target.seq_len)))
            progress.advance(len(outputs), -(-len(texts) // 32), "batches of outputs")
    return metric, outputs


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data_path",
    required=True,
    help="CSV/JSONL: text_a,text_b,score | text,label | tokens,tags | texts (.txt too: all a "
    "decoder needs for perplexity).",
)
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    help="Bundle or model to compare with (e.g. the fp32 one).",
)
@click.option("--text-field", default="text", show_default=True)
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Write the results here."
)
def eval_cmd(
    model: Path, data_path: str, reference: Path | None, text_field: str, json_path: Path | None
) -> None:
    """Score MODEL (a bundle, its .tar.gz, or a Hugging Face folder) on labelled data; a decoder
    on texts: its perplexity, and against --reference the next-token top-1 agreement."""
    from edgepack.errors import UserError
    from edgepack.evaldata import read_eval_data
    from edgepack.evaluable import open_evaluable
    from edgepack.evaluate import fidelity
    from edgepack.progress import Progress

    if not Path(data_path).is_file():
        raise UserError(f"evaluation file {data_path} does not exist.")
    with tempfile.TemporaryDirectory(prefix="edgepack-eval-") as tmp:
        target = open_evaluable(model, Path(tmp) / "a")
        if target.family == "decoder":
            _eval_decoder(target, reference, data_path, text_field, json_path, Path(tmp) / "b")
            return
        data = read_eval_data(data_path, text_field)
        if data.kind == "texts" and reference is None:
            raise UserError(
                f"{data_path} has no labels; pass --reference to measure fidelity instead."
            )
        results: dict[str, Any] = {"data": data.source, "kind": data.kind}
        progress = Progress()
        metric, outputs = evaluate_one(target, data, progress)
        results["model"] = {"name": target.name, **(metric or {})}
        if reference is not None:
            ref = open_evaluable(reference, Path(tmp) / "b")
            if ref.family == "decoder":
                raise UserError(
                    f"--reference {reference} is a generative decoder; {model} is an encoder."
                )
            ref_metric, ref_outputs = evaluate_one(ref, data, progress)
            results["reference"] = {"name": ref.name, **(ref_metric or {})}
            results["fidelity"] = fidelity(ref_outputs, outputs, None, target.task)
            if metric and ref_metric:
                results["drop"] = round(ref_metric["value"] - metric["value"], 6)
    for role in ("model", "reference"):
        if role in results:
            r = results[role]
            value = f"{r['metric']} {r['value']:.4f}" if "metric" in r else "no labels"
            click.echo(
                f"{role:<10} {r['name']:<40} {value}"
                + (f"  macro-F1 {r['macro_f1']:.4f}" if "macro_f1" in r else "")
            )
    if "fidelity" in results:
        f = results["fidelity"]
        click.echo(
            f"fidelity   mean cosine {f['mean_cosine']:.4f}, min {f['min_cosine']:.4f}"
            + (f", top-1 agreement {f['top1_agreement']:.4f}" if "top1_agreement" in f else "")
        )
    if "drop" in results:
        click.echo(f"drop       {results['drop']:+.4f} (reference minus model)")
    if json_path:
        json_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def _eval_decoder(
    target: Any,
    reference: Path | None,
    data_path: str,
    text_field: str,
    json_path: Path | None,
    workdir: Path,
) -> None:
    from edgepack.decoder_eval import describe, evaluate_decoder
    from edgepack.evaluable import open_evaluable
    from edgepack.progress import Progress

    ref = open_evaluable(reference, workdir) if reference is not None else None
    results = evaluate_decoder(target, ref, data_path, text_field, Progress())
    for line in describe(results):
        click.echo(line)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
