"""Side-by-side view of bench.py JSON reports, from any device, plus a latency-distribution plot.

The first file is the reference: every row shows its p50 as a ratio to the first file's, so
"1.80" reads as "80% slower than the baseline". Decoder reports (bench_llm.py, ``"kind":
"decoder"``) measure other things (time to first token, tokens/s), so a mixed set is shown as
one table per kind, each against its own first report (``compare_llm``).

Usage:
    print(compare([Path("results/pi.json"), Path("results/x86.json")], plot=Path("lat.png")))
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edgepack.device.compare_llm import (
    NOTE,
    check_decoder_report,
    decoder_rows,
    plot_decoders,
)
from edgepack.errors import UserError
from edgepack.jsontext import parse_json

KINDS = ("encoder", "decoder")

REQUIRED = (
    "latency_ms.p50",
    "latency_ms.p90",
    "latency_ms.p99",
    "peak_rss_mb",
    "cold_start_ms.import",
    "cold_start_ms.session_create",
    "cold_start_ms.first_inference",
    "throughput_per_s",
    "check.passed",
    "latencies_ms",
)
NUMBERS = REQUIRED[:8]  # the figures printed; check.passed and latencies_ms have their own types
COLUMNS = ("report", "p50 ms", "p90 ms", "p99 ms", "RSS MB", "cold ms", "per s", "check", "p50 x")


def _get(report: dict[str, Any], dotted: str) -> Any:
    node: Any = report
    for key in dotted.split("."):
        node = node[key]
    return node


def _finite(value: Any) -> bool:
    """A real number that can be printed and divided by: bools and NaN/infinity are not."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_values(path: Path, report: dict[str, Any]) -> None:
    """Every figure the table prints is null or a finite number >= 0; p50 is also the divisor.

    Python's json module reads and writes NaN and Infinity, so a broken run or a hand edit gets
    through json.loads; without this the table prints "nan" and exits 0, or the plot crashes.
    """
    for dotted in NUMBERS:
        value = _get(report, dotted)
        if value is not None and not (_finite(value) and value >= 0):
            raise UserError(
                f"{path}: {dotted} must be a finite number >= 0 or null, got {_short(value)}"
            )
    p50 = report["latency_ms"]["p50"]
    if p50 is None or p50 <= 0:
        raise UserError(f"{path}: latency_ms.p50 must be a positive number, got {p50!r}")
    passed = report["check"]["passed"]
    if passed is not None and not isinstance(passed, bool):
        raise UserError(f"{path}: check.passed must be true, false or null, got {_short(passed)}")
    raw = report["latencies_ms"]
    if raw is not None and not (isinstance(raw, list) and all(_finite(v) and v >= 0 for v in raw)):
        bad = raw if not isinstance(raw, list) else next(v for v in raw if not _finite(v) or v < 0)
        raise UserError(
            f"{path}: latencies_ms must be a list of finite numbers >= 0 (ms) or null, "
            f"found {_short(bad)}"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(path: Path, report: Any) -> str:
    """The report's kind; reports from before the field was written are told by their keys."""
    if not isinstance(report, dict):
        raise UserError(f"{path} is not a bench.py report: it holds no JSON object")
    kind = report.get("kind")
    if kind is None:
        kind = (
            "decoder"
            if "perf" in report or "agreement" in (report.get("check") or {})
            else "encoder"
        )
    if kind not in KINDS:
        raise UserError(f"{path}: report kind {kind!r} is not one of {', '.join(KINDS)}")
    return kind


def load_report(path: Path) -> dict[str, Any]:
    """Read one report and check it has every key its kind's table needs, each of the right type."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    report = parse_json(text, str(path))
    if not isinstance(report, dict):
        raise UserError(f"{path} is not a bench.py report: it holds no JSON object")
    if _kind(path, report) == "decoder":
        check_decoder_report(path, report)
        return report
    for dotted in REQUIRED:
        try:
            _get(report, dotted)
        except (KeyError, TypeError):
            raise UserError(f"{path} is not a bench.py report: it has no key '{dotted}'") from None
    _check_values(path, report)
    return report


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "pass" if value else "FAIL"
    return f"{value:.{digits}f}"


def _cold_total(report: dict[str, Any]) -> float | None:
    parts = [report["cold_start_ms"][k] for k in ("import", "session_create", "first_inference")]
    return None if any(p is None for p in parts) else sum(parts)


def _labels(paths: list[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _encoder_rows(labels: list[str], reports: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    base = reports[0]["latency_ms"]["p50"]
    rows = [COLUMNS]
    for label, rep in zip(labels, reports, strict=True):
        lat = rep["latency_ms"]
        rows.append(
            (
                label,
                _fmt(lat["p50"], 3),
                _fmt(lat["p90"], 3),
                _fmt(lat["p99"], 3),
                _fmt(rep["peak_rss_mb"], 1),
                _fmt(_cold_total(rep), 1),
                _fmt(rep["throughput_per_s"], 1),
                _fmt(rep["check"]["passed"]) if rep["check"]["passed"] is not None else "skip",
                _fmt(lat["p50"] / base, 2),
            )
        )
    return rows


def compare(paths: list[Path], plot: Path | None) -> str:
    """Return the comparison table (one per kind of report); write the plots to ``plot`` (a mixed
    set's decoder plot beside it, as NAME-decoder.png)."""
    if not paths:
        raise UserError("compare needs at least one report")
    reports = [load_report(path) for path in paths]
    labels = _labels(paths)
    groups: dict[str, tuple[list[str], list[dict[str, Any]]]] = {}
    for path, label, rep in zip(paths, labels, reports, strict=True):
        kind = _kind(path, rep)
        groups.setdefault(kind, ([], []))
        groups[kind][0].append(label)
        groups[kind][1].append(rep)
    mixed = len(groups) > 1
    lines: list[str] = []
    for kind in KINDS:
        if kind not in groups:
            continue
        group_labels, group = groups[kind]
        if mixed:
            lines += ([""] if lines else []) + [f"{kind} reports ({len(group)}):"]
        if kind == "encoder":
            lines += _aligned(_encoder_rows(group_labels, group))
            lines.append(
                "cold ms = import + session create + first inference; p50 x = p50 / first p50"
            )
        else:
            lines += _aligned(decoder_rows(group_labels, group))
            lines.append(NOTE)
    if plot is not None:
        if "encoder" in groups:
            lines.append(_plot(*groups["encoder"], plot))
        if "decoder" in groups:
            where = plot.with_name(f"{plot.stem}-decoder{plot.suffix}") if mixed else plot
            lines.append(plot_decoders(*groups["decoder"], where))
    return "\n".join(lines)


def _plot(labels: list[str], reports: list[dict[str, Any]], out: Path) -> str:
    """Box plot of every run's latency per report; reports without raw latencies are noted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [
        (lab, rep["latencies_ms"])
        for lab, rep in zip(labels, reports, strict=True)
        if rep["latencies_ms"]
    ]
    if not drawn:
        raise UserError("no report has latencies_ms (raw per-run latencies) to plot")
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(drawn)))
    data = [d for _, d in drawn]
    try:  # matplotlib >= 3.10 spells it orientation=; vert= is deprecated there
        ax.boxplot(data, orientation="horizontal", showfliers=True, whis=(1, 99))
    except TypeError:
        ax.boxplot(data, vert=False, showfliers=True, whis=(1, 99))
    ax.set_yticks(range(1, len(drawn) + 1), [lab for lab, _ in drawn])
    ax.set_xlabel("latency (ms); whiskers at p1 and p99")
    low, high = min(min(d) for _, d in drawn), max(max(d) for _, d in drawn)
    ax.set_xscale("log" if low > 0 and high > 20 * low else "linear")  # log cannot show a 0
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    skipped = [lab for lab, rep in zip(labels, reports, strict=True) if not rep["latencies_ms"]]
    note = f" (no raw latencies, not drawn: {', '.join(skipped)})" if skipped else ""
    return f"plot: {out}{note}"
