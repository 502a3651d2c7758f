"""What the commands share: the typer app, the user-error helper, output-path and listen-address checks, and the
sampler flags, made from the samplers' parameter dataclasses (one flag per parameter, its help from the field)."""

from __future__ import annotations

import functools
import inspect
import socket
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from depthwave.errors import DepthwaveError, file_in_the_way
from depthwave.samplers import registry

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: rich's option table cuts long option names and choices at 80 columns.
    rich_markup_mode=None,
)

THREADS_HELP = (
    "torch CPU threads (default: 1 for models under 512 wide, where a second thread does not pay and collapses "
    "when another process holds a core; else every available core; OMP_NUM_THREADS wins over the default)."
)


COMPILE_HELP = (
    "Run the decode passes as compiled graphs (torch.compile; the first start compiles for minutes on a CPU, later "
    "ones read inductor's cache)."
)


class CommandError(DepthwaveError):
    """A command-line value that no library call would see (a flag combination, a path): `main` prints it as
    every user error, one line, exit status 2."""


def check_writable_file(path: Path, what: str) -> None:
    """Refuse, before any work, an output path that cannot become a file: it is a folder, or a file stands where
    one of its folders should be."""
    if path.is_dir():
        raise CommandError(f"{what} {path} is a folder; give a file path")
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise CommandError(f"{what} {path}: {blocking} is a file, not a folder")


def check_listen_address(host: str, port: int) -> None:
    """Refuse, before the model loads, a port out of range or an address this machine cannot listen on (taken,
    or not one of its own)."""
    if not 0 <= port <= 65535:
        raise CommandError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def parse_ids(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise CommandError(f"{what} must be integers separated by commas or spaces, got {text!r}") from None


def parse_data(items: list[str] | None) -> dict[str, str]:
    """`--data TASK=PATH` (repeatable) as {task: path}."""
    files = {}
    for item in items or []:
        name, eq, path = item.partition("=")
        if not eq:
            raise CommandError(f"--data expects TASK=PATH, got {item!r}")
        files[name] = path
    return files


# ---- sampler flags, from the parameter dataclasses --------------------------------------------------------------
def _choices(annotation: Any) -> list[str]:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return [c for arg in typing.get_args(annotation) for c in _choices(arg)]


def _is_bool(name: str) -> bool:
    return all(typing.get_type_hints(registry.PARAMS[s])[name] is bool for s in registry.every_field()[name])


def sampler_flag_help(name: str) -> str:
    """The registry's help of a parameter, with its defaults and, for Literal-typed fields, its choices."""
    samplers = registry.every_field()[name]
    defaults = {s: registry.default_value(s, name) for s in samplers}
    shown = {s: d for s, d in defaults.items() if d is not None}
    text = registry.describe(name)
    if len(set(map(str, shown.values()))) == 1 and len(shown) == len(samplers):
        text += f" (default {next(iter(shown.values()))})"
    elif shown:
        text += " (defaults: " + ", ".join(f"{s} {d}" for s, d in shown.items()) + ")"
    choices = {tuple(_choices(typing.get_type_hints(registry.PARAMS[s])[name])) for s in samplers} - {()}
    if len(choices) == 1:
        text += f" [{', '.join(next(iter(choices)))}]"
    return text


def sampler_parameters() -> list[inspect.Parameter]:
    """A keyword-only typer option per sampler parameter: --name VALUE (read as a Python literal, checked by the
    sampler's dataclass) or, for booleans, --name/--no-name; None when not given."""
    out = []
    for name in registry.every_field():
        flag = "--" + name.replace("_", "-")
        if _is_bool(name):
            option = typer.Option(f"{flag}/--no-{flag[2:]}", help=sampler_flag_help(name), show_default=False)
            annotation: Any = Annotated[bool | None, option]
        else:
            option = typer.Option(flag, help=sampler_flag_help(name), metavar="<value>", show_default=False)
            annotation = Annotated[str | None, option]
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return out


def with_sampler_flags(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command a flag for every parameter of every sampler; it receives those given as `sampler_flags`
    ({name: value}), for `registry.make`, which refuses one the chosen sampler does not have."""
    names = list(registry.every_field())
    base = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "sampler_flags"]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        given = {name: kwargs.pop(name, None) for name in names}
        flags = {k: registry.parse_literal(v) if isinstance(v, str) else v for k, v in given.items() if v is not None}
        return command(**kwargs, sampler_flags=flags)

    wrapper.__signature__ = inspect.Signature([*base, *sampler_parameters()])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {}  # the signature carries the (evaluated) annotations
    del wrapper.__wrapped__  # typer must read the signature above, not the command's
    return wrapper


def sampler_flag_names() -> list[str]:
    """Every sampler parameter as its command-line flag (for tests and docs)."""
    return ["--" + f.name.replace("_", "-") for cls in registry.PARAMS.values() for f in fields(cls)]
