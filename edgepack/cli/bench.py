"""`edgepack bench` and `edgepack compare`: thin click commands over bench_host and compare.

A ``UserError`` propagates to the CLI's handler, which prints
one line and exits 2.

Usage:
    edgepack bench dist/cpu.tar.gz -- --runs 200 --threads 2
    edgepack bench dist/arm64 --host pi@raspberrypi.local --identity ~/.ssh/id_ed25519
    edgepack compare results/a.json results/b.json --plot latency.png
"""

from __future__ import annotations

from pathlib import Path

import click

from edgepack.jsontext import parse_json


@click.command(
    "bench",
    context_settings={"ignore_unknown_options": True},
    epilog="Arguments after -- go to the bundle's bench.py (e.g. -- --runs 200 --cpus 4-7).",
)
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@click.option("--host", default=None, help="Run on this device over ssh (user@host).")
@click.option("--port", default=22, show_default=True, type=click.IntRange(1, 65535))
@click.option("--identity", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--results", default=Path("results"), show_default=True, type=click.Path(path_type=Path)
)
@click.argument("harness_args", nargs=-1, type=click.UNPROCESSED)
def bench(
    bundle: Path,
    host: str | None,
    port: int,
    identity: Path | None,
    results: Path,
    harness_args: tuple[str, ...],
) -> None:
    """Run BUNDLE's latency harness here or on --host; save the JSON report under --results."""
    from edgepack.device import run_local, run_remote

    if host is None:
        report_path = run_local(bundle, list(harness_args), results)
    else:
        report_path = run_remote(bundle, host, port, identity, list(harness_args), results)
    report = parse_json(report_path.read_text(encoding="utf-8"), str(report_path))
    click.echo(f"report: {report_path}")
    failed = report["check"]["passed"] is False
    regressed = bool((report.get("compare") or {}).get("regressed"))
    if failed or regressed:
        raise SystemExit(1)


@click.command("compare")
@click.argument("reports", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG here.")
def compare_cmd(reports: tuple[Path, ...], plot: Path | None) -> None:
    """Compare bench.py JSON REPORTS side by side; ratios are against the first."""
    from edgepack.device import compare

    click.echo(compare(list(reports), plot))
