"""A build's bundles and report, held back until the build's last stage is done, then put in
place together.

Every bundle is complete and checked when packaged, but the build goes on after it (the next
target of a matrix, host latency, the summary, the report). Publishing each bundle as soon as it is
packaged meant a Ctrl-C in those later stages left bundles in ``dist/`` under a message saying
nothing was written, and a rerun refusing them as "already exists"; a ``--force`` build stopped
half way left a mix of new and old bundles. So a build's output is one unit: any failure or
interrupt before the end leaves the output folder as it was (a folder the build made is removed
again), the rerun needs no ``--force``, and the cache makes it cheap (export, validation and
quantization are kept). The final renames run with SIGINT and SIGTERM held, so they happen all or
none (SIGKILL aside); a signal that came meanwhile is raised after them, naming what was published.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from edgepack.bundle.write import TMP_PREFIX, WRITE_ERRORS, check_destination, clean_stale, publish
from edgepack.errors import Interrupted, UserError

HELD = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block; one that came meanwhile is raised as it ends.

    A thread signal mask is not enough: torch and onnxruntime keep worker threads that leave the
    signals unblocked, the kernel may deliver a process signal to any of them, and Python then
    runs the handler in the main thread in the middle of the block. Swapping the Python handlers
    holds the signal whichever thread it reached.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # Python delivers signals to the main thread alone; only it can swap handlers
        return
    pending: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        pending.append(signum)

    old = {signum: signal.signal(signum, hold) for signum in HELD}
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
        if pending:
            signal.raise_signal(pending[0])  # the handler the build had, as if it came now


@contextlib.contextmanager
def _write_errors(out_root: Path, what: str) -> Iterator[None]:
    """A full disk, quota or read-only folder as one line; anything else is a bug."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        raise UserError(
            f"could not write {what} into {out_root}: {exc.strerror or exc}; nothing was kept."
        ) from None


class Outbox:
    """Private folders beside ``out_root`` (same filesystem, so publishing is renames only)."""

    def __init__(self, out_root: Path, force: bool) -> None:
        self.out_root, self.force = out_root, force
        self.held: list[tuple[Path, str]] = []  # (private folder, bundle name), packaging order
        self.report: Path | None = None
        self.published: list[Path] = []
        self._created: list[Path] = []  # folders this build made, deepest first

    def __enter__(self) -> Outbox:
        missing = []
        for folder in (self.out_root, *self.out_root.parents):
            if folder.exists():
                break
            missing.append(folder)
        try:
            self.out_root.mkdir(parents=True, exist_ok=True)
            self._created = missing
            clean_stale(self.out_root)
        except OSError as exc:
            self._remove_created()
            raise UserError(
                f"cannot write to output folder {self.out_root}: {exc.strerror or exc}"
            ) from None
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for tmp, _ in self.held:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.report is not None:
            shutil.rmtree(self.report, ignore_errors=True)
        if not self.published:
            self._remove_created()

    def _remove_created(self) -> None:
        """The folders this build made, if still empty: never one that held anything before."""
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:
                return

    def _private(self, name: str) -> Path:
        return self.out_root / f"{TMP_PREFIX}{os.getpid()}-{name}"

    @contextlib.contextmanager
    def bundle(self, name: str) -> Iterator[Path]:
        """A folder to write ``<name>/`` and ``<name>.tar.gz`` into; kept for ``publish`` when
        the block ends normally, removed otherwise."""
        tmp = self._private(name)
        try:
            with _write_errors(self.out_root, "the bundle"):
                tmp.mkdir()
                yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for work in tmp.iterdir():  # conversions, wheels: only the bundle and archive wait
            if work.is_dir() and work.name != name:
                shutil.rmtree(work)
            elif not work.is_dir() and work.name != f"{name}.tar.gz":
                work.unlink()
        self.held.append((tmp, name))

    @contextlib.contextmanager
    def report_folder(self) -> Iterator[Path]:
        """A folder for the build report's files, published beside the bundles."""
        self.report = self._private("report")
        with _write_errors(self.out_root, "the build report"):
            self.report.mkdir()
            yield self.report

    def _drop_stale_plots(self, current: set[Path]) -> None:
        """Plots an earlier build left beside the report this one replaced: an encoder build's
        sensitivity plot must not sit beside a decoder build's report looking current."""
        for path in self.out_root.glob("report-*.png"):
            if path not in current:
                path.unlink(missing_ok=True)

    def publish(self) -> dict[Path, Path]:
        """Rename every held bundle, archive and report file into ``out_root``; returns each
        private path's published one."""
        for _, name in self.held:  # refuse before the first rename, not half way
            check_destination(self.out_root, name, self.force)
        moved: dict[Path, Path] = {}
        try:
            with signals_held():
                for tmp, name in self.held:
                    for path in publish(tmp, self.out_root, name, self.force):
                        moved[tmp / path.name] = path
                        self.published.append(path)
                for path in sorted(self.report.iterdir()) if self.report else ():
                    os.replace(path, self.out_root / path.name)
                    moved[path] = self.out_root / path.name
                    self.published.append(self.out_root / path.name)
                if self.report:
                    self._drop_stale_plots(set(self.published))
        except KeyboardInterrupt as exc:
            if not self.published:
                raise
            raise Interrupted(getattr(exc, "signum", signal.SIGINT), self.published) from None
        return moved
