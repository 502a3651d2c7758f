"""The `depthwave` command: one module per command (`generate`, `eval`, `serve`, `tools`), the shared pieces in
`common`, and here the entry point with its error contract."""

from __future__ import annotations

import importlib
import sys
from typing import Annotated, Any, cast

import typer

from depthwave.cli import eval as _eval  # noqa: F401  (registers eval, sweep)
from depthwave.cli import generate as _generate  # noqa: F401  (registers generate, trace)
from depthwave.cli import serve as _serve  # noqa: F401  (registers serve)
from depthwave.cli import tools as _tools  # noqa: F401  (registers lm-eval-tasks, train)
from depthwave.cli.common import app
from depthwave.errors import DepthwaveError, one_line

__all__ = ["app", "main"]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        import torch

        typer.echo(f"depthwave {version('depthwave')} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fast, faithful inference for recurrent-depth language models. Add --debug to see a traceback on errors."""


Exceptions = tuple[type[BaseException], ...]


def _click_exceptions() -> tuple[Exceptions, Exceptions, Exceptions]:
    """(usage errors, "no arguments: show the help", aborts) of click and of the copy of click that typer >= 0.22
    vendors: which one parses the command line depends on typer's version."""
    modules = []
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    return (
        tuple(m.UsageError for m in modules),
        tuple(m.NoArgsIsHelpError for m in modules if hasattr(m, "NoArgsIsHelpError")),
        (typer.Abort, *(m.Abort for m in modules if hasattr(m, "Abort"))),
    )


def main() -> None:
    """The `depthwave` command. A user error, a command-line mistake included, is one line `depthwave: error: ...`
    on stderr and exit status 2; anything unexpected is one line naming the exception and exit status 1, or its
    traceback with `--debug` (anywhere on the line)."""
    usage_errors, no_args, aborts = _click_exceptions()
    interrupts: Exceptions = (KeyboardInterrupt, *aborts)
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv = [arg for i, arg in enumerate(sys.argv) if i == 0 or arg != "--debug"]
    try:
        code = app(standalone_mode=False)
    except no_args as exc:
        typer.echo(cast(Any, exc).format_message())
        code = 0
    except usage_errors as exc:
        usage = cast(Any, exc)
        command = usage.ctx.command_path if usage.ctx is not None else "depthwave"
        print(f"depthwave: error: {one_line(usage.format_message())} (see {command} --help)", file=sys.stderr)
        sys.exit(2)
    except DepthwaveError as exc:
        if debug:
            raise
        print(f"depthwave: error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except interrupts:
        print("depthwave: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        print(
            f"depthwave: internal error: {type(exc).__name__}: {one_line(str(exc))} (run again with --debug for the "
            "traceback)",
            file=sys.stderr,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
