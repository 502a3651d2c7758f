"""Model configuration: the official Huginn `config.json` field names, validated, plus derived values.

Two model families share this config and its `model_type`: Huginn-0125 (sandwich blocks) and the retrofitted-
recurrence Llama / OLMo-2 models (McLeish et al. 2025), whose conversion reuses Huginn's config class. Nothing in a
`config.json` tells them apart; the checkpoint's keys do, so the loader sets `block_type` from them (see
`depthwave.model.loading.detect_block_type`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from depthwave.errors import ConfigError

# Aliases written by transformers' attribute map (and by the shipped Huginn JSON).
_ALIASES = {"num_attention_heads": "n_heads", "hidden_size": "n_embd", "tie_word_embeddings": "tie_embeddings"}

# Fields the official config carries only for the training code or as documentation. They are kept so that
# a config round-trips, but nothing in the forward pass reads them.
_INFORMATIONAL = (
    "n_layers",
    "padding_multiple",
    "architecture_class_name",
    "block_class_name",
    "norm_class_name",
    "mlp_class_name",
    "nonlin_name",
    "init_strategy",
    "init_orthogonal",
    "state_init",
    "injection_type",
    "sampling_scheme",
    "activation_checkpoint_impl",
    "transformers_version",
    "name",
    "max_position_embeddings",
)

_DTYPES = ("float32", "bfloat16", "float16")

BLOCK_TYPES = ("sandwich", "llama", "olmo2", "ouro")
"""sandwich: Huginn's block (four norms); llama: pre-norm (two norms); olmo2: a norm on each branch's output and
RMSNorms on the full q and k projections; ouro: a norm before and after each branch (four norms), in a model whose
whole stack is the loop (see `depthwave.model.ouro`)."""
ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class HuginnConfig:
    """Architecture of a recurrent-depth model: prelude (P layers), core block (R layers, iterated r times
    with input injection) and coda (C layers). Field names follow the official `config.json`."""

    n_embd: int = 5280
    n_heads: int = 55
    intermediate_size: int = 17920
    vocab_size: int = 65536
    block_size: int = 4096
    n_layers_in_prelude: int = 2
    n_layers_in_recurrent_block: int = 4
    n_layers_in_coda: int = 2
    mean_recurrence: int = 32
    mean_backprop_depth: int = 8
    norm_eps: float = 1e-6
    rope_base: float = 50000.0
    qk_bias: bool = True
    bias: bool = False
    tie_embeddings: bool = True
    test_time_noise: float = 0.0
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    block_type: str = "sandwich"
    """Set by the loader from the checkpoint keys (see the module docstring), never read from config.json."""
    num_key_value_heads: int | None = None
    """Key/value heads of grouped-query attention (None: as many as query heads)."""
    rope_theta: float | None = None
    """The retrofit families' RoPE base (they ignore `rope_base`; None: fall back to `rope_base`)."""
    rope_scaling: dict[str, Any] | None = None
    """transformers' RoPE scaling (retrofit families): rope_type "default", "linear" or "llama3"."""
    init_values: dict[str, float] | None = None
    """Stored `init_values` entries that differ from the derived ones (the retrofits set embed_scale 1.0)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in (
            "n_embd",
            "n_heads",
            "intermediate_size",
            "vocab_size",
            "block_size",
            "n_layers_in_recurrent_block",
            "mean_recurrence",
            "mean_backprop_depth",
        ):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("n_layers_in_prelude", "n_layers_in_coda"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in ("qk_bias", "bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field '{name}' must be true or false, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_base"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"config field '{name}' must be a positive number, got {value!r}")
        if self.block_type not in BLOCK_TYPES:
            raise ConfigError(f"block_type must be one of {BLOCK_TYPES}, got {self.block_type!r}")
        if self.n_embd % self.n_heads:
            raise ConfigError(f"config field 'n_heads' = {self.n_heads} does not divide 'n_embd' = {self.n_embd}")
        if (self.n_embd // self.n_heads) % 2:
            raise ConfigError(
                f"head dim n_embd/n_heads = {self.n_embd // self.n_heads} must be even: RoPE rotates pairs"
            )
        self._check_attention_and_rope()
        if self.torch_dtype not in _DTYPES:
            raise ConfigError(f"config field 'torch_dtype' must be one of {_DTYPES}, got {self.torch_dtype!r}")
        if self.test_time_noise != 0:
            raise ConfigError(
                f"config field 'test_time_noise' = {self.test_time_noise!r}: test-time state noise inside "
                "the forward pass is not supported by depthwave; set it to 0"
            )
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=0)
        for token in self.eos_ids:
            _check_int("eos_token_id", token, minimum=0)

    def _check_attention_and_rope(self) -> None:
        if self.num_key_value_heads is not None:
            _check_int("num_key_value_heads", self.num_key_value_heads, minimum=1)
            if self.n_heads % self.num_key_value_heads:
                raise ConfigError(
                    f"config field 'num_key_value_heads' = {self.num_key_value_heads} does not divide "
                    f"'n_heads' = {self.n_heads}"
                )
            if self.qk_bias and self.num_key_value_heads != self.n_heads:
                raise ConfigError("qk_bias needs as many key/value heads as query heads (num_key_value_heads)")
        if self.rope_theta is not None and (
            isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0
        ):
            raise ConfigError(f"config field 'rope_theta' must be a positive number, got {self.rope_theta!r}")
        if self.init_values is not None and not (
            isinstance(self.init_values, dict)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.init_values.values())
        ):
            raise ConfigError(f"config field 'init_values' must map names to numbers, got {self.init_values!r}")
        if self.init_values and self.init_values.get("embed_scale", 1.0) <= 0:
            raise ConfigError(f"config field 'init_values.embed_scale' must be positive, got {self.init_values}")
        self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if scaling is None:
            return
        if not isinstance(scaling, dict):
            raise ConfigError(f"config field 'rope_scaling' must be an object or null, got {scaling!r}")
        kind = rope_scaling_type(scaling)
        if kind not in ROPE_TYPES:
            raise ConfigError(
                f"config field 'rope_scaling': rope_type {kind!r} is not supported; use one of {ROPE_TYPES}"
            )
        needed = _LLAMA3_FIELDS if kind == "llama3" else ("factor",) if kind == "linear" else ()
        for name in needed:
            value = scaling.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"config field 'rope_scaling.{name}' must be a positive number, got {value!r}")
        if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
            raise ConfigError("config field 'rope_scaling': high_freq_factor must exceed low_freq_factor")

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def family(self) -> str:
        """ "huginn" (sandwich blocks), "retrofit" (Llama / OLMo-2 blocks) or "ouro" (ByteDance's LoopLMs)."""
        return {"sandwich": "huginn", "ouro": "ouro"}.get(self.block_type, "retrofit")

    @property
    def looped_stack(self) -> bool:
        """Ouro: no prelude, coda or injection. The recurrence is the whole stack followed by ln_f, its state is that
        normed output, it starts from the raw embedding, and the head reads the state without another norm. An exit
        gate on each recurrence's state gives the per-token exit distribution."""
        return self.block_type == "ouro"

    @property
    def rope_style(self) -> str:
        """ "pairs": Huginn rotates adjacent pairs (x_2i, x_2i+1) in fp32; "half": transformers' Llama rotates
        (x_i, x_i+h/2) in the activation dtype."""
        return "pairs" if self.block_type == "sandwich" else "half"  # Ouro: transformers' layout, like Llama

    @property
    def rope_frequency_base(self) -> float:
        if self.block_type == "sandwich" or self.rope_theta is None:
            return float(self.rope_base)
        return float(self.rope_theta)

    @property
    def norm_before_coda(self) -> bool:
        """Huginn applies ln_f to the recurrent state before the coda (and after it); the retrofits' coda reads
        the raw state and ln_f is applied once, after the coda."""
        return self.block_type == "sandwich"

    @property
    def num_layers(self) -> int:
        """Distinct layers, P + R + C."""
        return self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda

    @property
    def effective_expected_depth(self) -> int:
        """Layer applications per token at `mean_recurrence`: P + r·R + C."""
        return (
            self.n_layers_in_prelude + self.n_layers_in_coda + self.n_layers_in_recurrent_block * self.mean_recurrence
        )

    def _derived_init_values(self) -> dict[str, float]:
        std = math.sqrt(2.0 / (5.0 * self.n_embd))
        out_proj = std / math.sqrt(2.0 * self.effective_expected_depth)
        return {"std": std, "out_proj": out_proj, "embedding": std, "embed_scale": math.sqrt(self.n_embd)}

    @cached_property
    def all_init_values(self) -> dict[str, float]:
        """The reference's `init_values`: derived from the sizes, with the stored overrides on top (computed once:
        `embed_scale` is read on every prelude call)."""
        return {**self._derived_init_values(), **(self.init_values or {})}

    @property
    def init_std(self) -> float:
        return self.all_init_values["std"]

    @property
    def out_proj_std(self) -> float:
        return self.all_init_values["out_proj"]

    @property
    def embed_scale(self) -> float:
        return self.all_init_values["embed_scale"]

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def num_parameters(self) -> int:
        d, i, v = self.n_embd, self.intermediate_size, self.vocab_size
        kv = 2 * self.kv_heads * self.head_dim
        norms = {"sandwich": 4 * d, "ouro": 4 * d, "llama": 2 * d, "olmo2": 2 * d + d + kv // 2}[self.block_type]
        per_block = 2 * d * d + kv * d + 3 * i * d + norms + (2 * d if self.qk_bias else 0)
        head = 0 if self.tie_embeddings else v * d
        joint = d + 1 if self.looped_stack else 2 * d * d + (d if self.bias else 0)  # exit gate, or adapter
        return self.num_layers * per_block + v * d + head + joint + d

    # ---- (de)serialisation ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HuginnConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(raw).__name__}")
        if raw.get("model_type") == "ouro":
            from depthwave.model.ouro import config_from_ouro

            return config_from_ouro(raw)
        known = {f.name for f in fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in raw.items():
            name = _ALIASES.get(key, key)
            if name in known:
                if name in values and values[name] != value:
                    raise ConfigError(f"config fields '{key}' and its alias disagree: {value!r} vs {values[name]!r}")
                values[name] = value
            else:
                extra[key] = value
        for name in ("rope_base", "rope_theta"):
            if isinstance(values.get(name), int) and not isinstance(values[name], bool):
                values[name] = float(values[name])
        if "test_time_noise" in values and values["test_time_noise"] is not None:
            values["test_time_noise"] = float(values["test_time_noise"])
        if values.get("torch_dtype") is None:
            values.pop("torch_dtype", None)
        if "block_type" in values:
            raise ConfigError("config.json must not set 'block_type': the checkpoint's keys decide the block type")
        config = cls(**values, extra=extra)
        config = _drop_derived(config)
        # The derived fields the reference writes (head_dim, init_values, ...) are recomputed, but a stored
        # head_dim that disagrees would mean a layout we do not implement.
        stored_head_dim = extra.get("head_dim")
        if stored_head_dim is not None and stored_head_dim != config.head_dim:
            raise ConfigError(
                f"config field 'head_dim' = {stored_head_dim!r} differs from n_embd/n_heads = {config.head_dim}"
            )
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> HuginnConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The official field names (plus the derived ones the reference writes), loadable by the reference."""
        if self.looped_stack:
            from depthwave.model.ouro import ouro_config_dict

            return ouro_config_dict(self)
        skip = ("extra", "block_type")
        out = {k: v for k, v in asdict(self).items() if k not in skip and v is not None}
        out.update({k: v for k, v in self.extra.items() if k in _INFORMATIONAL})
        out.update(
            model_type="huginn_raven",
            architectures=["RavenForCausalLM"],
            n_layers=self.num_layers,
            padded_vocab_size=self.vocab_size,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            effective_expected_depth=self.effective_expected_depth,
            init_values=dict(self.all_init_values),
        )
        # The retrofits' config class passes tie_word_embeddings itself and raises when the JSON carries it too.
        if self.family == "huginn":
            out["tie_word_embeddings"] = self.tie_embeddings
        return out


def rope_scaling_type(scaling: dict[str, Any] | None) -> str:
    """transformers spells it `rope_type` (older configs: `type`); no scaling is "default"."""
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _drop_derived(config: HuginnConfig) -> HuginnConfig:
    """Stored values equal to what the sizes imply are not kept as overrides, so that a config that went through
    JSON equals the one it was written from, and changing a size later re-derives them."""
    changes: dict[str, Any] = {}
    if config.num_key_value_heads == config.n_heads:
        changes["num_key_value_heads"] = None
    if config.init_values is not None:
        derived = config._derived_init_values()
        kept = {
            k: float(v)
            for k, v in config.init_values.items()
            if not math.isclose(v, derived.get(k, math.nan), rel_tol=1e-9)
        }
        changes["init_values"] = kept or None
    return replace(config, **changes) if changes else config


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config field '{name}' must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"config field '{name}' must be >= {minimum}, got {value}")
