"""The ``edgepack`` command group: parse flags, call a stage function, map errors. No logic here.

A ``UserError`` becomes one line on stderr and exit code 2 (``--debug`` shows the traceback);
``ToleranceNotMet`` exits 3; anything else is a bug and keeps its traceback. Heavy libraries
(torch, onnx) are imported inside commands so ``edgepack --help`` and ``edgepack targets`` stay fast.
"""

from __future__ import annotations

from typing import Any

import click

from edgepack.cli.bench import bench, compare_cmd
from edgepack.cli.build import build, rebuild, targets, verify
from edgepack.cli.distill import distill
from edgepack.cli.eval import eval_cmd
from edgepack.cli.prune import prune
from edgepack.errors import ToleranceNotMet, UserError


class Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (UserError, ToleranceNotMet) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing was written to the output folder.", err=True)
            ctx.exit(130)


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
