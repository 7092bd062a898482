"""Stage-by-stage progress on the terminal, with each stage's wall time kept for the manifest."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console


class Progress:
    """Prints one line per stage to stderr so stdout stays clean for the bundle path."""

    def __init__(self, quiet: bool = False) -> None:
        self.console = Console(stderr=True, quiet=quiet, highlight=False)
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        start = time.perf_counter()
        with self.console.status(f"[bold]{name}[/] {detail}"):
            yield
        took = time.perf_counter() - start
        self.timings[name] = self.timings.get(name, 0.0) + round(took, 2)
        self.console.print(f"[green]✓[/] {name:<10} {took:7.1f}s  {detail}")

    def note(self, text: str) -> None:
        self.console.print(f"  {text}")


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
