"""One way from a sampler's name and parameters to its parameter object, for every front end: `LLM`, the
`depthwave` commands (whose sampler flags are made from these fields), `depthwave eval`'s sampler specs, the
server's request fields and lm-eval's model and generation arguments.

Parameters are the fields of the sampler's parameter dataclass, under their Python names, each with its help text
(`depthwave.errors.param`); the dataclass validates them, so every front end refuses the same values with the same
message. Text values (a flag, a spec, a form field) are read as Python literals, bare words as strings.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from depthwave.engine.policy import SamplerParams
from depthwave.errors import InvalidParameterError, help_of
from depthwave.model.config import HuginnConfig
from depthwave.samplers.adaptive import AdaptiveParams
from depthwave.samplers.diffusion import DiffusionParams
from depthwave.samplers.speculative import SpeculativeParams
from depthwave.samplers.static import StaticParams

PARAMS: dict[str, type] = {
    "static": StaticParams,
    "adaptive": AdaptiveParams,
    "speculative": SpeculativeParams,
    "diffusion": DiffusionParams,
}
DEFAULT_SAMPLER = "diffusion"


def default_for(config: HuginnConfig) -> str:
    """The default sampler for a model: diffusion, except for Ouro, where static decoding is the official output and
    the diffusion sampler's wavefront over loops is opt-in."""
    return "static" if config.looped_stack else DEFAULT_SAMPLER


def family_defaults(name: str, config: HuginnConfig) -> dict[str, Any]:
    """Defaults that depend on the model family, under the caller's values: the diffusion sampler on Ouro runs on the
    per-step cache, whose loop wavefront gives each position its own loop's keys (a trained Ouro model cannot read
    a shared cache: README, Ouro)."""
    if name == "diffusion" and config.looped_stack:
        return {"cache_mode": "per-step"}
    return {}


def params_class(name: str) -> type:
    if name not in PARAMS:
        raise InvalidParameterError(f"unknown sampler {name!r}; choose one of {sorted(PARAMS)}")
    return PARAMS[name]


def field_names(name: str) -> list[str]:
    return [f.name for f in fields(params_class(name))]


def every_field() -> dict[str, list[str]]:
    """Each parameter name and the samplers that have it, in a stable order."""
    out: dict[str, list[str]] = {}
    for sampler, cls in PARAMS.items():
        for f in fields(cls):
            out.setdefault(f.name, []).append(sampler)
    return out


def describe(name: str) -> str:
    """The help of a parameter across the samplers that have it: "diffusion: ...; adaptive: ..."."""
    samplers = every_field()[name]
    texts = {sampler: help_of(PARAMS[sampler], name) for sampler in samplers}
    if len(set(texts.values())) == 1 and len(samplers) > 1:
        return f"{', '.join(samplers)}: {next(iter(texts.values()))}"
    return "; ".join(f"{sampler}: {text}" for sampler, text in texts.items())


def default_value(sampler: str, name: str) -> Any:
    f = next(f for f in fields(params_class(sampler)) if f.name == name)
    return None if f.default is MISSING else f.default


def make(
    name: str = DEFAULT_SAMPLER,
    base: Any = None,
    engine_cache: str | None = None,
    family: HuginnConfig | None = None,
    **values: Any,
) -> SamplerParams:
    """The parameter object of sampler `name` with `values`, over `base` (a parameter object of the same sampler
    whose fields are the defaults; else the dataclass's, with `family_defaults` for the model config `family`).
    `engine_cache`: the KV cache mode of the engine that will run it, filled in when `values` do not set
    `cache_mode` and refused when they set another. Unknown names and fields, and invalid values, are
    InvalidParameterErrors naming them."""
    cls = params_class(name)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InvalidParameterError(f"sampler {name!r} has no parameter(s) {unknown}; it takes {sorted(known)}")
    if isinstance(base, cls):
        merged = {k: getattr(base, k) for k in known}
    else:
        merged = family_defaults(name, family) if family is not None else {}
    if engine_cache is not None and "cache_mode" in known and "cache_mode" not in values:
        merged["cache_mode"] = engine_cache
    merged.update(values)
    if engine_cache is not None and merged.get("cache_mode", engine_cache) != engine_cache:
        raise InvalidParameterError(
            f"cache_mode must be {engine_cache!r}, the KV cache this engine runs, got {merged['cache_mode']!r}"
        )
    return cls(**merged)


# ---- text -----------------------------------------------------------------------------------------------------
def parse_literal(value: str) -> Any:
    """A value given as text: a Python literal (8, 0.05, None, True), a true/false/none in any case, else the
    text itself (latent-diff, auto)."""
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside brackets or parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return [p for p in (part.strip() for part in parts) if p]


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler by name with its parameters and a label (a row of `depthwave eval`'s table), checked when made:
    a typo fails before any work."""

    kind: str
    params: dict[str, Any]
    label: str = ""

    def __post_init__(self) -> None:
        make(self.kind, **self.params)
        if not self.label:
            shown = ",".join(f"{k}={v}" for k, v in self.params.items())
            object.__setattr__(self, "label", f"{self.kind}({shown})" if shown else self.kind)

    def build(self, engine_cache: str | None = None, family: HuginnConfig | None = None) -> SamplerParams:
        return make(self.kind, engine_cache=engine_cache, family=family, **self.params)

    @classmethod
    def parse(cls, text: str) -> SamplerSpec:
        """`name` or `name(key=value,...)`, optionally prefixed `label=`: e.g. `diffusion(inner_recurrence=8)`,
        `fast=speculative(draft_steps=2,lookahead=8)`."""
        text = text.strip()
        label = ""
        head, paren, _ = text.partition("(")
        if "=" in head:
            label, text = (part.strip() for part in text.split("=", 1))
            head, paren, _ = text.partition("(")
        kind, params = head.strip(), {}
        if paren:
            if not text.endswith(")"):
                raise InvalidParameterError(f"sampler {text!r}: missing ')'")
            for item in split_top_level(text[len(head) + 1 : -1]):
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise InvalidParameterError(f"sampler {text!r}: expected key=value, got {item!r}")
                params[key.strip()] = parse_literal(value.strip())
        if not kind:
            raise InvalidParameterError(f"sampler {text!r}: no sampler name")
        return cls(kind, params, label)


def parse_specs(text: str | Iterable[str]) -> list[SamplerSpec]:
    """A comma-separated list of sampler specs (commas inside parentheses belong to a spec), labels unique."""
    items = split_top_level(text) if isinstance(text, str) else list(text)
    specs = [SamplerSpec.parse(item) for item in items]
    if not specs:
        raise InvalidParameterError("give at least one sampler")
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise InvalidParameterError(f"sampler labels must be unique, got {labels}; name them with label=...")
    return specs


def from_mapping(values: Mapping[str, Any], default: str = DEFAULT_SAMPLER) -> tuple[str, dict[str, Any]]:
    """(sampler name, its parameters) from flat key=value pairs with an optional `sampler` key (lm-eval's
    arguments); text values are read as literals. Keys that belong to no sampler are left to the caller."""
    name = str(values.get("sampler", default))
    known = set(field_names(name))
    params = {k: parse_literal(v) if isinstance(v, str) else v for k, v in values.items() if k in known}
    return name, params
