"""`edgepack targets`, `build`, `verify` and `rebuild`: the commands around one bundle.

Each is a plain function: parse, call the pipeline or the bundle checks, print. Errors propagate to
the group's handler (one line, exit 2).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from edgepack.cli.types import FINITE


@click.command()
def targets() -> None:
    """List the built-in target profiles."""
    from edgepack.profiles import list_targets

    for profile in list_targets():
        aliases = profile.data.get("aliases", [])
        alias = f" (alias: {', '.join(aliases)})" if aliases else ""
        click.echo(f"{profile.name:<10} {profile.description}{alias}")


def _build_options(values: dict[str, Any]) -> dict[str, Any]:
    """CLI flags that were given, as build-config keys (None means 'not given')."""
    return {k: v for k, v in values.items() if v is not None and v is not False}


@click.command()
@click.option(
    "--config",
    "config_spec",
    help="Build config TOML, or a shipped sample: sample:build (the default, an encoder) or "
    "sample:llm (the decoder, SmolLM2-135M).",
)
@click.option("--model", help="package:NAME, a local Hugging Face model folder, or a hub id.")
@click.option("--name", help="Bundle name prefix (default: from the model).")
@click.option("--task", help="feature-extraction, text-classification or token-classification.")
@click.option("--target", help="Profile name, 'all', or a path to a profile .toml (default arm64).")
@click.option("--calibration", help="Calibration texts: .txt, .jsonl or .csv.")
@click.option("--text-field", help="Field (.jsonl) or column (.csv) holding the text.")
@click.option("--samples", type=int, help="Calibration texts drawn (seeded) from the file.")
@click.option("--heldout", help="Texts for the fidelity check (default: unsampled calibration).")
@click.option(
    "--eval-data", help="Labelled data (text_a,text_b,score | text,label | tokens,tags) to score."
)
@click.option("--seed", type=int, help="Seed for every random choice.")
@click.option(
    "--precision",
    type=click.Choice(["int8", "int4", "fp32"]),
    help="Override the profile's (int4: decoders only, weight-only).",
)
@click.option(
    "--kv-cache",
    type=click.Choice(["int8", "fp32"]),
    help="Decoders: the KV cache's type, overriding the profile's (int8: a quarter of the memory, "
    "per-channel scales calibrated on --calibration).",
)
@click.option(
    "--source-blocks",
    type=click.Choice(["all", "layers", "off"]),
    help="Decoders from a GGUF: carry its Q4_0/Q4_1/Q8_0 blocks as they are (default all), all "
    "but the vocabulary, or none (quantize the dequantized weights again).",
)
@click.option("--out", help="Output folder (default dist).")
@click.option("--min-cosine", type=FINITE, help="Fail if int8 mean cosine to fp32 is below this.")
@click.option(
    "--max-drop",
    type=FINITE,
    help="Encoders: allowed drop of mean cosine to fp32 (default 0.005; negative turns the "
    "search off). Decoders: allowed relative perplexity increase over fp32 (default 0.5, +50 %).",
)
@click.option("--time-budget", type=FINITE, help="Seconds for the accuracy search (default 900).")
@click.option("--force", is_flag=True, help="Replace existing bundles.")
@click.option("--truncate", is_flag=True, help="Cut calibration texts longer than the model takes.")
@click.option("--trust-remote-code", is_flag=True, help="Allow models that ship their own code.")
@click.option(
    "--prune",
    type=FINITE,
    help="Prune before export: for encoders the fraction of encoder MACs (0-0.9), for decoders "
    "the fraction of parameters outside the embedding and lm_head (layers and FFN channels).",
)
@click.option(
    "--distill-layers", type=int, help="First distil a student with this many layers (encoders)."
)
@click.option("--distill-data", help="Texts to distil on (.txt/.jsonl/.csv).")
@click.option("--distill-seconds", type=FINITE, help="Time budget for distillation (default 600).")
@click.option(
    "--with-runtime",
    is_flag=True,
    help="Download the target's onnxruntime and numpy wheels into wheels/ (offline device install).",
)
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path),
    help="Sign each bundle (bundle.sig, OpenSSF model-signing) with this EC private key (PEM).",
)
@click.option("--quiet", is_flag=True, help="Only print the bundle paths.")
def build(config_spec: str | None, quiet: bool, sign_key: Path | None, **flags: Any) -> None:
    """Build one verified bundle per target; the last line printed is the .tar.gz path."""
    from edgepack.config import config_path, overlay, read_config
    from edgepack.pipeline import build as run_build
    from edgepack.pipeline import raise_if_tolerance_missed
    from edgepack.progress import Progress

    config = read_config(config_path(config_spec))
    if flags.get("model") and (config_spec is None or config_spec.startswith("sample:")):
        # The sample's name and task data describe the sample; its texts remain the default.
        config = overlay(config, {"name": "", "eval_data": ""}, "--model")
    if flags.get("calibration") and not flags.get("heldout"):
        config = overlay(config, {"heldout": ""}, "--calibration")
    config = overlay(config, _build_options(flags), "command line")
    results = run_build(config, Progress(quiet=quiet), sign_key)
    for result in results:
        click.echo(str(result.tarball))
    raise_if_tolerance_missed(results)


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--emulate",
    is_flag=True,
    help="Also run the bundle's output check on emulated aarch64 (qemu-user).",
)
@click.option(
    "--public-key",
    type=click.Path(path_type=Path),
    help="Also check the bundle's signature (bundle.sig) with this EC public key (PEM).",
)
@click.option(
    "--require-signature", is_flag=True, help="Refuse a bundle whose signature was not checked."
)
def verify(bundle: Path, emulate: bool, public_key: Path | None, require_signature: bool) -> None:
    """Check a bundle (folder or .tar.gz) with the device's own check: SHA256SUMS, the manifest's
    files and model hash, no links or special files, the tokenizer on the reference texts, and
    with --public-key its signature."""
    from edgepack.bundle import bundle_folder, verify_bundle

    with bundle_folder(bundle) as folder:
        notes: list[str] = []
        count = verify_bundle(folder, public_key, require_signature, notes)
        signed = ", signature verified" if public_key else ""
        tokens = "" if notes else ", tokenizer gives the build's ids"
        click.echo(
            f"OK: {count} files match SHA256SUMS and the manifest in {bundle}{signed}{tokens}"
        )
        for note in notes:
            click.echo(f"note: {note}")
        if not emulate:
            return
        from edgepack.device import verify_emulated
        from edgepack.progress import Progress

        progress = Progress()
        with progress.stage("aarch64", "accuracy check under qemu (emulated, slow)"):
            check = verify_emulated(folder, on_progress=progress.advance)
    if "agreement" in check:  # a decoder: next tokens, fed the host's, equal to the host's
        figures = f"next-token agreement {check['agreement']} (needs {check.get('min_agreement')})"
        if check.get("greedy_prefix_tokens") is not None:
            figures += f", greedy prefix tokens {check['greedy_prefix_tokens']}"
    else:
        figures = f"min cosine {check.get('min_cosine')}, max abs diff {check.get('max_abs_diff')}"
    click.echo(
        f"aarch64 (emulated): check {'passed' if check.get('passed') else 'FAILED'}, {figures}"
    )
    if not check.get("passed"):
        sys.exit(1)


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--target", "target_file", help="Profile file, for bundles built from a custom profile."
)
def rebuild(bundle: Path, target_file: str | None) -> None:
    """Rebuild BUNDLE (or its manifest.json) from its recorded inputs and compare the hashes."""
    from edgepack.progress import Progress
    from edgepack.rebuild import rebuild as run_rebuild

    diffs = run_rebuild(bundle, target_file, Progress())
    if diffs:
        click.echo("Rebuild differs:\n  " + "\n  ".join(diffs))
        sys.exit(1)
    click.echo(f"Rebuild of {bundle} reproduced every file hash.")
