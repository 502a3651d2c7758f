"""Exceptions that carry a message meant for the user, printed as one line by the CLI, the small checks that
parameter dataclasses validate their fields with, and `param`, a field with its help text."""

from __future__ import annotations

import argparse
from dataclasses import field, fields
from pathlib import Path
from typing import Any, NoReturn


class DepthwaveError(Exception):
    """Base class of every error depthwave raises on purpose (bad input, bad checkpoint, ...)."""


class ConfigError(DepthwaveError, ValueError):
    """A model configuration field is missing, of the wrong type or inconsistent."""


class CheckpointError(DepthwaveError):
    """A checkpoint cannot be found, downloaded, or does not match its configuration."""


class InvalidParameterError(DepthwaveError, ValueError):
    """A sampling or sampler hyperparameter is out of range."""


class PromptError(DepthwaveError, ValueError):
    """A prompt is empty, holds unknown token ids, or does not fit in the model's context."""


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def require(ok: bool, name: str, value: Any, what: str) -> None:
    """Raise InvalidParameterError naming the field, its value and what it must be, unless `ok`."""
    if not ok:
        raise InvalidParameterError(f"{name} must be {what}, got {value!r}")


def one_line(message: str) -> str:
    """A message as one line: the commands' error contract prints exactly one line per error."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def file_in_the_way(path: Path) -> Path | None:
    """The nearest existing parent of `path` when it is a file, not a folder (so `path` cannot be created)."""
    existing = next((parent for parent in path.parents if parent.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def make_output_folder(folder: Path, what: str = "the output folder") -> Path:
    """Create `folder` and its parents, or refuse clearly when a file stands where a folder must be."""
    if folder.exists() and not folder.is_dir():
        raise InvalidParameterError(f"{what} {folder} is a file; give a folder")
    blocking = file_in_the_way(folder)
    if blocking is not None:
        raise InvalidParameterError(f"{what} {folder}: {blocking} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidParameterError(f"cannot create {what} {folder}: {exc.strerror or exc}") from None
    return folder


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a command-line mistake as the commands report every user error: one line
    `depthwave: error: ...` on stderr, exit status 2 (argparse prints its usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"depthwave: error: {one_line(message)} (see {self.prog} --help)\n")


def param(default: Any, help: str) -> Any:
    """A parameter dataclass field with its help text, which every front end shows (command-line flags, the
    server's schema): the text lives with the field, once."""
    return field(default=default, metadata={"help": help})


def help_of(cls: type, name: str) -> str:
    """The help text of field `name` of a parameter dataclass (empty when it has none)."""
    return next((f.metadata.get("help", "") for f in fields(cls) if f.name == name), "")
