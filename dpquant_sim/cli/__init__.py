"""The ``dpquant-sim`` command line (typer). Each sub-command lives in its own module ``<name>_cmd.py``
exposing ``register(app)``; bad input ends with one clear error line (exit 2), never a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from dpquant_sim.errors import DPQuantError

app = typer.Typer(
    name="dpquant-sim",
    help="Simulate and cost differentially private training with dynamic quantization scheduling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: at any width (80 columns included) every flag name is shown in full, wrapped help
    # beside or below it; typer's rich panels cut long flag names off ("--physical-batch-…")
    rich_markup_mode=None,
)

# Sub-command modules, registered in this order (a missing module is skipped).
COMMAND_MODULES = ("train_cmd", "hw_cmd", "cost_cmd", "sweep_cmd", "report_cmd", "demo_cmd", "quantize_cmd")
_registered = False


def version() -> None:
    """Print the dpquant-sim version."""
    from dpquant_sim import __version__

    typer.echo(__version__)


def _register() -> None:
    global _registered
    if _registered:
        return
    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"dpquant_sim.cli.{mod_name}")
        except ModuleNotFoundError as e:
            if e.name == f"dpquant_sim.cli.{mod_name}":
                continue
            raise
        mod.register(app)
    app.command("version")(version)
    _registered = True


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print one error line to stderr and return the Exit to raise."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


INTERRUPTED = "interrupted; finished epochs and points are kept: rerun the same command to resume"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    _register()
    try:
        app(args=argv, standalone_mode=True)
    except DPQuantError as e:
        raise SystemExit(fail(str(e)).exit_code) from None
    except OSError as e:  # an input that cannot be read, or an output error not raised as OutputError
        where = f"{e.filename!r}: " if e.filename else ""
        raise SystemExit(fail(f"{where}{e.strerror or e}").exit_code) from None
    except KeyboardInterrupt:
        typer.secho(INTERRUPTED, err=True)
        raise SystemExit(130) from None
    except SystemExit as e:
        if e.code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into a silent exit 130
            typer.secho(INTERRUPTED, err=True)
        raise


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
