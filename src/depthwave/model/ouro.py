"""Ouro (ByteDance's looped language models): its `config.json`, its checkpoint keys, and its exit rules.

An Ouro model is a recurrent-depth model with no prelude, no coda and no injection: the whole stack of N layers is
the recurrence, applied `total_ut_steps` times, with the final norm after every loop (`HuginnConfig.looped_stack`).
Its state after loop t is that normed output s_t, and the head reads it directly. An exit gate on each s_t gives a
per-token exit distribution over the loops:

    lambda_t = sigmoid(gate(s_t)),    p_t = lambda_t * prod_{j<t} (1 - lambda_j),    p_{T-1} = the remaining mass

depthwave loads the checkpoint into its own module layout (q/k/v fused into `Wqkv`, gate/up into `fc`, as vLLM
fuses them) and writes it back under Ouro's names, so a saved model loads in the official code again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from depthwave.errors import ConfigError
from depthwave.model.config import HuginnConfig

# Ouro config.json field -> HuginnConfig field, and the official class defaults for fields a config may omit.
FIELDS = {
    "hidden_size": "n_embd",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "num_hidden_layers": "n_layers_in_recurrent_block",
    "total_ut_steps": "mean_recurrence",
    "max_position_embeddings": "block_size",
    "rms_norm_eps": "norm_eps",
    "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling",
    "tie_word_embeddings": "tie_embeddings",
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
}
DEFAULTS: dict[str, Any] = {
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "intermediate_size": 22016,
    "vocab_size": 151936,
    "num_hidden_layers": 32,
    "total_ut_steps": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
# Kept so that a config round-trips; the exit defaults are read by `exit_defaults`.
PASSED_THROUGH = (
    "early_exit_threshold",
    "early_exit_step",
    "initializer_range",
    "attention_dropout",
    "use_cache",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "chunk_size",
    "transformers_version",
)


def is_ouro(raw: dict[str, Any]) -> bool:
    return isinstance(raw, dict) and raw.get("model_type") == "ouro"


def config_from_ouro(raw: dict[str, Any]) -> HuginnConfig:
    """A HuginnConfig for an Ouro `config.json` (P = C = 0, R = num_hidden_layers, mean_recurrence = total_ut_steps),
    refusing what depthwave does not implement rather than running it wrongly."""
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"Ouro config field 'hidden_act' = {raw['hidden_act']!r}: only 'silu' is supported")
    if raw.get("use_sliding_window"):
        raise ConfigError("Ouro config field 'use_sliding_window' is true: sliding-window attention is not supported")
    if raw.get("attention_bias"):
        raise ConfigError("Ouro config field 'attention_bias' is true: the released models have no attention biases")
    values: dict[str, Any] = {FIELDS[k]: raw.get(k, DEFAULTS.get(k)) for k in FIELDS}
    for name in ("norm_eps", "rope_theta"):
        if isinstance(values[name], int) and not isinstance(values[name], bool):
            values[name] = float(values[name])
    dtype = raw.get("torch_dtype", raw.get("dtype")) or "float32"  # transformers loads fp32 when the config is silent
    extra = {k: raw[k] for k in PASSED_THROUGH if k in raw}
    config = HuginnConfig(
        **values,
        n_layers_in_prelude=0,
        n_layers_in_coda=0,
        mean_backprop_depth=values["mean_recurrence"],
        qk_bias=False,
        bias=False,
        torch_dtype=dtype,
        block_type="ouro",
        init_values={"embed_scale": 1.0},
        extra=extra,
    )
    if config.num_key_value_heads == config.n_heads:
        config = replace(config, num_key_value_heads=None)
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim != config.head_dim:
        raise ConfigError(
            f"Ouro config field 'head_dim' = {head_dim!r} differs from hidden_size/num_attention_heads = "
            f"{config.head_dim}: that layout is not supported"
        )
    exit_defaults(config)  # validates them
    return config


def ouro_config_dict(config: HuginnConfig) -> dict[str, Any]:
    """The Ouro `config.json` of a config built by `config_from_ouro`."""
    out: dict[str, Any] = {k: getattr(config, v) for k, v in FIELDS.items()}
    out["num_key_value_heads"] = config.kv_heads
    out = {k: v for k, v in out.items() if v is not None or k == "rope_scaling"}
    out.update({k: v for k, v in config.extra.items() if k in PASSED_THROUGH})
    out.update(
        model_type="ouro",
        architectures=["OuroForCausalLM"],
        hidden_act="silu",
        head_dim=config.head_dim,
        torch_dtype=config.torch_dtype,
    )
    return out


def exit_defaults(config: HuginnConfig) -> tuple[int | None, float | None]:
    """The checkpoint's default exit rule: (`early_exit_step`, `early_exit_threshold`), as the official model copies
    them at construction (threshold 1.0 when the config omits it; an explicit null disables it)."""
    step = config.extra.get("early_exit_step")
    threshold = config.extra.get("early_exit_threshold", 1.0)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        raise ConfigError(f"Ouro config field 'early_exit_step' must be an integer or null, got {step!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise ConfigError(f"Ouro config field 'early_exit_threshold' must be a number or null, got {threshold!r}")
    return step, None if threshold is None else float(threshold)


# ---- checkpoint keys ----------------------------------------------------------------------------------------------
_NORMS = {
    "norm_1": "input_layernorm",
    "norm_2": "input_layernorm_2",
    "norm_3": "post_attention_layernorm",
    "norm_4": "post_attention_layernorm_2",
}
_SINGLE = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "transformer.exit_gate.weight": "model.early_exit_gate.weight",
    "transformer.exit_gate.bias": "model.early_exit_gate.bias",
    "lm_head.weight": "lm_head.weight",
}


def _layer_keys(i: int) -> dict[str, list[str]]:
    """depthwave key of layer i -> the Ouro keys it is the concatenation of (rows, in order)."""
    ours, theirs = f"transformer.core_block.{i}.", f"model.layers.{i}."
    keys = {f"{ours}{a}.weight": [f"{theirs}{b}.weight"] for a, b in _NORMS.items()}
    keys[f"{ours}attn.Wqkv.weight"] = [f"{theirs}self_attn.{p}_proj.weight" for p in "qkv"]
    keys[f"{ours}attn.proj.weight"] = [f"{theirs}self_attn.o_proj.weight"]
    keys[f"{ours}mlp.fc.weight"] = [f"{theirs}mlp.gate_proj.weight", f"{theirs}mlp.up_proj.weight"]
    keys[f"{ours}mlp.proj.weight"] = [f"{theirs}mlp.down_proj.weight"]
    return keys


def key_map(config: HuginnConfig) -> dict[str, list[str]]:
    """Every depthwave parameter of an Ouro model -> its Ouro checkpoint keys."""
    keys = {ours: [theirs] for ours, theirs in _SINGLE.items()}
    if config.tie_embeddings:
        del keys["lm_head.weight"]
    for i in range(config.n_layers_in_recurrent_block):
        keys.update(_layer_keys(i))
    return keys


def _row_split(config: HuginnConfig, ours: str) -> list[int]:
    """Rows of each Ouro tensor inside a fused depthwave one."""
    if ours.endswith("attn.Wqkv.weight"):
        kv = config.kv_heads * config.head_dim
        return [config.n_heads * config.head_dim, kv, kv]
    if ours.endswith("mlp.fc.weight"):
        return [config.intermediate_size] * 2
    return []


def checkpoint_shapes(config: HuginnConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The Ouro keys and shapes a checkpoint must hold, from the depthwave model's own shapes."""
    expected: dict[str, tuple[int, ...]] = {}
    for ours, theirs in key_map(config).items():
        shape = shapes[ours]
        rows = _row_split(config, ours) or [shape[0]]
        for key, count in zip(theirs, rows, strict=True):
            expected[key] = (count, *shape[1:]) if len(shape) > 1 else (count,)
    return expected


def from_checkpoint(config: HuginnConfig, read: Callable[[str], Tensor]) -> dict[str, Tensor]:
    """The depthwave state dict, reading each Ouro tensor once with `read(key)`."""
    return {ours: torch.cat([read(k) for k in theirs]) for ours, theirs in key_map(config).items()}


def to_checkpoint(config: HuginnConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Ouro-named tensors of a depthwave state dict (the fused ones split again)."""
    out: dict[str, Tensor] = {}
    for ours, theirs in key_map(config).items():
        parts = state[ours].split(_row_split(config, ours)) if len(theirs) > 1 else (state[ours],)
        out.update({k: t.contiguous() for k, t in zip(theirs, parts, strict=True)})
    return out


# ---- the exit distribution and the official exit rules -----------------------------------------------------------
def exit_pdf(gate_logits: Tensor) -> Tensor:
    """[T, ...] fp32 exit probabilities from [T, ...] gate logits, in the reference's order of operations (a running
    product of the remaining mass; the last loop takes what is left and its gate is unused)."""
    lam = torch.sigmoid(gate_logits.float())
    remaining = torch.ones_like(lam[0])
    pdf = []
    for t in range(lam.shape[0] - 1):
        pdf.append(lam[t] * remaining)
        remaining = remaining * (1.0 - lam[t])
    pdf.append(remaining)
    return torch.stack(pdf)


def threshold_exit(pdf: Tensor, threshold: float) -> Tensor:
    """[...] the first loop whose fp32 cumulative exit probability reaches `threshold`, else the last."""
    reached = torch.cumsum(pdf, dim=0) >= threshold
    last = torch.full_like(reached[0], pdf.shape[0] - 1, dtype=torch.long)
    return torch.where(reached.any(dim=0), reached.int().argmax(dim=0), last)


def select_logits(
    loop_logits: Tensor,
    pdf: Tensor,
    exit_at_step: int | None = None,
    exit_threshold: float | None = None,
    use_weighted_exit: bool = False,
) -> Tensor:
    """The official choice among the loops' logits [T, B, S, V] (`OuroForCausalLM.forward`): a fixed loop when
    0 <= exit_at_step < T (other values are ignored, as the reference ignores them), else the threshold rule, else
    the pdf-weighted sum of the loops' logits, else the last loop."""
    steps = loop_logits.shape[0]
    if exit_at_step is not None and 0 <= exit_at_step < steps:
        return loop_logits[exit_at_step]
    if exit_threshold is not None:
        chosen = threshold_exit(pdf, exit_threshold)
        return loop_logits.gather(0, chosen[None, ..., None].expand(1, *loop_logits.shape[1:]))[0]
    if use_weighted_exit:
        mixed = torch.zeros_like(loop_logits[0])
        for t in range(steps):
            mixed = mixed + pdf[t][..., None] * loop_logits[t]
        return mixed
    return loop_logits[-1]
