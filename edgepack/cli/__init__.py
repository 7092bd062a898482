"""The ``edgepack`` command group: parse flags, call a stage function, map errors. No logic here.

A ``UserError`` becomes one line on stderr and exit code 2 (``--debug`` shows the traceback);
``ToleranceNotMet`` exits 3; anything else is a bug and keeps its traceback. Heavy libraries
(torch, onnx) are imported inside commands so ``edgepack --help`` and ``edgepack targets`` stay fast.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import click

from edgepack.cli.bench import bench, compare_cmd
from edgepack.cli.build import build, rebuild, targets, verify
from edgepack.cli.distill import distill
from edgepack.cli.eval import eval_cmd
from edgepack.cli.prune import prune
from edgepack.errors import Interrupted, ToleranceNotMet, UserError


def _terminate(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        # SIGTERM (a CI timeout, `kill`) cleans up as Ctrl-C does instead of dying mid-write.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if main else None
        try:
            return super().invoke(ctx)
        except (UserError, ToleranceNotMet) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            published = getattr(exc, "published", ())
            if published:
                click.echo(
                    "Interrupted as the build ended; it had published, complete and checked: "
                    + ", ".join(str(p) for p in published),
                    err=True,
                )
            else:
                click.echo("Interrupted; nothing was written to the output folder.", err=True)
            ctx.exit(128 + getattr(exc, "signum", signal.SIGINT))
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)


@click.group(cls=Group)
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (for bug reports).")
@click.version_option(package_name="edgepack")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Distil, prune, export, int8-quantize and package transformers for edge devices."""
    ctx.obj = {"debug": debug}


for command in (targets, build, verify, rebuild, bench, compare_cmd, prune, distill, eval_cmd):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="edgepack")
