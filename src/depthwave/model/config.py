"""Model configuration: the official Huginn `config.json` field names, validated, plus derived values."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
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
)

_DTYPES = ("float32", "bfloat16", "float16")


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
        if self.n_embd % self.n_heads:
            raise ConfigError(f"config field 'n_heads' = {self.n_heads} does not divide 'n_embd' = {self.n_embd}")
        if (self.n_embd // self.n_heads) % 2:
            raise ConfigError(
                f"head dim n_embd/n_heads = {self.n_embd // self.n_heads} must be even: RoPE rotates pairs"
            )
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

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_heads

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

    @property
    def init_std(self) -> float:
        return math.sqrt(2.0 / (5.0 * self.n_embd))

    @property
    def out_proj_std(self) -> float:
        return self.init_std / math.sqrt(2.0 * self.effective_expected_depth)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.n_embd)

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def num_parameters(self) -> int:
        d, i, v = self.n_embd, self.intermediate_size, self.vocab_size
        per_block = 4 * d * d + 3 * i * d + 4 * d + (2 * d if self.qk_bias else 0)
        head = 0 if self.tie_embeddings else v * d
        return self.num_layers * per_block + v * d + head + 2 * d * d + (d if self.bias else 0) + d

    # ---- (de)serialisation ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> HuginnConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"a model config must be a JSON object, got {type(raw).__name__}")
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
        if "rope_base" in values and isinstance(values["rope_base"], int) and not isinstance(values["rope_base"], bool):
            values["rope_base"] = float(values["rope_base"])
        if "test_time_noise" in values and values["test_time_noise"] is not None:
            values["test_time_noise"] = float(values["test_time_noise"])
        if values.get("torch_dtype") is None:
            values.pop("torch_dtype", None)
        config = cls(**values, extra=extra)
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
        out = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        out.update({k: v for k, v in self.extra.items() if k in _INFORMATIONAL})
        out.update(
            model_type="huginn_raven",
            architectures=["RavenForCausalLM"],
            n_layers=self.num_layers,
            padded_vocab_size=self.vocab_size,
            num_key_value_heads=self.n_heads,
            head_dim=self.head_dim,
            tie_word_embeddings=self.tie_embeddings,
            effective_expected_depth=self.effective_expected_depth,
            init_values={
                "std": self.init_std,
                "out_proj": self.out_proj_std,
                "embedding": self.init_std,
                "embed_scale": self.embed_scale,
            },
        )
        return out


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"config field '{name}' must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"config field '{name}' must be >= {minimum}, got {value}")
