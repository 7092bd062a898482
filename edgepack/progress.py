"""Stage-by-stage progress on the terminal, with each stage's wall time kept for the manifest."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

from edgepack.memory import peak_mb, reset_peak

# ``advance(done, total, what)``: how a long step says how far it has got (Progress.advance).
Advance = Callable[[int, int, str], None]

# Off a terminal (a CI log, a pipe) the spinner is invisible, so advance() prints a line instead,
# at most this often: a 26-minute step then leaves ~150 lines, not thousands.
LOG_EVERY_S = 10.0


def duration(seconds: float) -> str:
    """``37s``, ``4m12s``, ``1h03m``: short enough for a status line."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def advance_text(
    done: int, total: int, elapsed: float, what: str = "", left: float | None = None
) -> str:
    """``37/128 positions, 4m12s elapsed, ~10m20s left``; no estimate when there is none yet."""
    text = f"{done}/{total}{' ' + what if what else ''}, {duration(elapsed)} elapsed"
    if left is not None and done < total:
        text += f", ~{duration(left)} left"
    return text


class Progress:
    """Prints one line per stage to stderr so stdout stays clean for the bundle path."""

    def __init__(self, quiet: bool = False) -> None:
        self.console = Console(stderr=True, quiet=quiet, highlight=False)
        self.timings: dict[str, float] = {}
        self.peaks: dict[str, float] = {}  # each stage's peak resident memory, MB
        self._status: Any = None
        self._stage: tuple[str, str, float] | None = None
        self._first: tuple[float, int] | None = None  # (time, done) of the stage's first advance
        self._logged = -LOG_EVERY_S

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        reset_peak()
        start = time.perf_counter()
        with self.console.status(f"[bold]{name}[/] {detail}") as status:
            self._status, self._stage, self._logged = status, (name, detail, start), -LOG_EVERY_S
            try:
                yield
            finally:
                self._status, self._stage, self._first = None, None, None
        took = time.perf_counter() - start
        self.timings[name] = self.timings.get(name, 0.0) + round(took, 2)
        peak = peak_mb()
        self.peaks[name] = max(self.peaks.get(name, 0.0), peak)
        self.console.print(f"[green]✓[/] {name:<10} {took:7.1f}s {peak / 1e3:6.2f} GB  {detail}")

    def resources(self) -> dict[str, dict[str, float]]:
        """The stages so far: wall seconds and peak resident MB (the manifest's ``resources``)."""
        return {"stage_seconds": dict(self.timings), "stage_peak_rss_mb": dict(self.peaks)}

    def note(self, text: str) -> None:
        self.console.print(f"  {text}")

    def advance(self, done: int, total: int, what: str = "") -> None:
        """Show how far the current stage has got: k/N, elapsed, an estimate of what remains.

        The estimate is the pace since the stage's first advance, so the setup before it (a
        session loading, qemu starting) does not inflate it. On a terminal the stage's spinner
        line says it; elsewhere a line is printed (the first, the last, and one per
        ``LOG_EVERY_S`` between). Outside a stage it times from the first call. Safe to call
        from a thread reading a child's output."""
        now = time.perf_counter()
        if self._stage is None:
            self._stage = ("", "", now)
        if self._first is None or done < self._first[1]:
            self._first = (now, done)
        name, detail, start = self._stage
        (since, first), left = self._first, None
        if done > first:
            left = (now - since) / (done - first) * (total - done)
        text = advance_text(done, total, now - start, what, left)
        if self._status is not None and self.console.is_terminal:
            self._status.update(f"[bold]{name}[/] {detail}  {text}")
        elif done >= total or now - self._logged >= LOG_EVERY_S:
            self._logged = now
            self.console.print(f"  {name + ': ' if name else ''}{text}")


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence third-party advice a build's user cannot act on.

    transformers and optimum log deprecations and optional-dependency hints (``torch_dtype`` is
    deprecated, weight deduplication needs accelerate) from inside the export; edgepack's own lines
    say what happened. Errors still show: only warnings and below are dropped. Each library is set
    through its own logging module, which configures its root logger on first use and would
    otherwise reset a level set from outside.
    """
    import warnings

    from optimum.utils import logging as optimum_logging
    from transformers.utils import logging as transformers_logging

    libraries = (transformers_logging, optimum_logging)
    levels = [lib.get_verbosity() for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lib, level in zip(libraries, levels, strict=True):
            lib.set_verbosity(level)
