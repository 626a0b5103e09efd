"""The `orlik` command: one thin verb per pipeline stage, each importing its stage lazily."""

from __future__ import annotations

import os
import sys

import click

from orlik import __version__
from orlik.cli_bench import bench, recommend
from orlik.cli_calibrate import calibrate
from orlik.cli_common import not_built as _not_built  # noqa: F401  (kept importable from orlik.cli)
from orlik.cli_data import data
from orlik.cli_eval import eval_
from orlik.cli_pipeline import pipeline
from orlik.cli_quantize import inspect, quantize
from orlik.cli_serve import chat, serve
from orlik.cli_train import train
from orlik.errors import OrlikError

_DEBUG = {"on": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="orlik")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or chatter.")
@click.option("--json", "json_mode", is_flag=True, help="Machine-readable output.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, json_mode: bool) -> None:
    """orlik: quantize, benchmark and serve Polish-English language models.

    Data flow: train -> calibrate -> quantize -> bench -> serve. Each verb reads the previous
    stage's files, so you can start at any stage with your own checkpoint or variant.
    """
    from orlik import progress

    _DEBUG["on"] = debug
    progress.configure(quiet=quiet, json_mode=json_mode)
    ctx.obj = {"json": json_mode, "quiet": quiet}


# One module per verb group (orlik/cli_*.py); `orlik --help` lists them in name order.
for _command in (train, data, calibrate, quantize, bench, recommend, inspect, serve, chat, pipeline, eval_):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    # orlik draws its own progress; transformers' per-load tqdm bars ("Loading weights") are noise here.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        cli.main(args=argv, prog_name="orlik", standalone_mode=False)
    except OrlikError as e:
        if _DEBUG["on"]:
            raise
        click.echo(f"orlik: error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:
        if _DEBUG["on"] or e.filename is None:
            raise
        # A path the user named that cannot be reached (permissions, a vanished mount): one line.
        click.echo(f"orlik: error: cannot access {e.filename}: {e.strerror or e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("orlik: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("orlik: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
