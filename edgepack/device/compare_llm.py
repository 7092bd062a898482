"""The decoder harness's reports (bench_llm.py, ``"kind": "decoder"``) side by side: time to first
token, decode tokens/s, peak RSS and the device check, plus a bar plot of the three figures.

The first decoder report is the baseline: ``tok/s x`` is each row's decode rate over its.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edgepack.errors import UserError

# (key under "perf", column, digits); every figure is null or a finite number >= 0.
FIGURES = (
    ("ttft_ms", "TTFT ms", 2),
    ("decode_tokens_per_s", "tok/s", 1),
    ("peak_rss_mb", "RSS MB", 1),
    ("kv_cache_mb_at_context", "KV MB", 2),
)
COLUMNS = ("report", *(c for _, c, _ in FIGURES), "agree", "check", "tok/s x")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_decoder_report(path: Path, report: dict[str, Any]) -> None:
    """The keys and types the decoder table reads; ``perf`` is absent after ``--check-only``."""
    check = report.get("check")
    if not isinstance(check, dict) or "passed" not in check or "agreement" not in check:
        raise UserError(f"{path} is not a bench_llm.py report: it has no key 'check.agreement'")
    if check["passed"] is not None and not isinstance(check["passed"], bool):
        raise UserError(f"{path}: check.passed must be true, false or null")
    perf = report.get("perf")
    if perf is None:
        return
    if not isinstance(perf, dict):
        raise UserError(f"{path}: perf must be an object or absent")
    for key, _, _ in FIGURES:
        value = perf.get(key)
        if value is not None and not (_finite(value) and value >= 0):
            raise UserError(f"{path}: perf.{key} must be a finite number >= 0 or null")


def _fmt(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def decoder_rows(labels: list[str], reports: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """The table's rows, header first."""
    rates = [(r.get("perf") or {}).get("decode_tokens_per_s") for r in reports]
    base = next((rate for rate in rates if rate), None)
    rows = [COLUMNS]
    for label, rep, rate in zip(labels, reports, rates, strict=True):
        perf, check = rep.get("perf") or {}, rep["check"]
        passed = check["passed"]
        rows.append(
            (
                label,
                *(_fmt(perf.get(key), digits) for key, _, digits in FIGURES),
                _fmt(check["agreement"], 3),
                "skip" if passed is None else ("pass" if passed else "FAIL"),
                _fmt(rate / base if rate and base else None, 2),
            )
        )
    return rows


NOTE = "TTFT = time to first token; agree = next-token agreement with the build host; tok/s x = tok/s / first"


def plot_decoders(labels: list[str], reports: list[dict[str, Any]], out: Path) -> str:
    """Three bar panels (TTFT, decode tokens/s, peak RSS), one bar per report with figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [
        (lab, rep["perf"]) for lab, rep in zip(labels, reports, strict=True) if rep.get("perf")
    ]
    if not drawn:
        raise UserError("no decoder report has perf figures to plot (all ran --check-only)")
    panels = (
        ("ttft_ms", "time to first token, ms (lower is better)"),
        ("decode_tokens_per_s", "decode tokens/s (higher is better)"),
        ("peak_rss_mb", "peak RSS, MB"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(11, 1.6 + 0.45 * len(drawn)))
    names = [lab for lab, _ in drawn][::-1]
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [perf.get(key) or 0 for _, perf in drawn][::-1]
        ax.barh(names, values, color="tab:blue")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[1:]:
        ax.tick_params(axis="y", labelleft=False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    skipped = [lab for lab, rep in zip(labels, reports, strict=True) if not rep.get("perf")]
    note = f" (no perf figures, not drawn: {', '.join(skipped)})" if skipped else ""
    return f"plot: {out}{note}"
