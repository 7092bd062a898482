"""Run a harness child with its progress lines read live from stderr, its JSON stdout kept whole.

A check under qemu can take half an hour; the harness, asked with ``--progress``, writes
``progress DONE/TOTAL WHAT`` lines on stderr as it goes. They are handed to a callback as they
arrive (a thread per pipe, so a full stderr pipe never blocks the child while stdout is read);
every other stderr line is kept for the error message, as ``subprocess.run`` would.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

PROGRESS_LINE = re.compile(r"progress (\d+)/(\d+)(?: (.*))?")

OnProgress = Callable[[int, int, str], None]


def supports_flag(harness: Path, flag: str) -> bool:
    """Whether a bundle's harness takes ``flag`` (``--progress``, ``--forced-only``): bundles
    built before it was added refuse an unknown flag (exit 2), so they run as before without it."""
    try:
        return f'"{flag}"'.encode() in harness.read_bytes()
    except OSError:
        return False


def run_streaming(
    cmd: list[str], env: dict[str, str] | None, timeout: float, on_progress: OnProgress | None
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=...)``, with progress lines
    passed to ``on_progress`` while the child runs and left out of the returned stderr."""
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"
    ) as proc:
        out: list[str] = []
        err: list[str] = []

        def read_stdout(pipe: IO[str]) -> None:
            out.append(pipe.read())

        def read_stderr(pipe: IO[str]) -> None:
            for line in pipe:
                found = PROGRESS_LINE.fullmatch(line.rstrip("\r\n"))
                if found is None:
                    err.append(line)
                elif on_progress is not None:
                    on_progress(int(found[1]), int(found[2]), found[3] or "")

        readers = [
            threading.Thread(target=read_stdout, args=(proc.stdout,), daemon=True),
            threading.Thread(target=read_stderr, args=(proc.stderr,), daemon=True),
        ]
        for reader in readers:
            reader.start()
        try:
            proc.wait(timeout=timeout)
        except BaseException:  # a timeout, or Ctrl-C: the readers end only when the child does
            proc.kill()
            raise
        finally:
            for reader in readers:
                reader.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), "".join(err))
