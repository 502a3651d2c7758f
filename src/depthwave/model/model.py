"""The recurrent-depth model (Huginn-0125 architecture, and the retrofitted-recurrence Llama / OLMo-2 models
built on it), readable top to bottom.

    e      = prelude(embed(ids) · embed_scale)                  P layers, once per position
    s_0    = zeros, or truncated normal · embed_scale           ("like-init", scaled by init_scale)
    s_t+1  = core(adapter([s_t, e]))                            R layers, repeated r times
    logits = head(ln_f(coda(ln_f(s_r))))                        C layers, once per position (Huginn)
    logits = head(ln_f(coda(s_r)))                              the retrofits: the coda reads the raw state

embed_scale is sqrt(D) for Huginn and 1.0 for the retrofits (`init_values`); the block type, attention heads and
RoPE convention come from the config (see `depthwave.model.layers`). Ouro (`config.looped_stack`, see
`depthwave.model.ouro`) is the same pipeline with P = C = 0 and no adapter:

    s_0    = embed(ids)
    s_t+1  = ln_f(core(s_t))                                     all N layers, repeated r times
    logits = head(s_r),    exit gate logits = gate(s_t)

The engine drives the three stages separately through `prelude`, `core_step`, `coda` and `head`, over per-row
`Positions`; `forward` chains them for a plain full-depth pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from depthwave.model.config import HuginnConfig
from depthwave.model.kv_cache import KVPool
from depthwave.model.layers import BLOCKS, Block, RMSNorm, rope_table
from depthwave.model.positions import Positions, make_positions


@dataclass
class ModelOutput:
    logits: Tensor
    """fp32 [B, S, V] (or [B, 1, V] when only the last position was asked for)."""
    latents: Tensor
    """The coda's view of the final recurrent state, [B, S, D]: ln_f of it for Huginn, the raw state for the
    retrofits; in both cases what the reference returns as `latent_states`."""
    state: Tensor
    """The raw final recurrent state s_r, [B, S, D]."""


class Trunk(nn.Module):
    """The embedding, the three stacks, the adapter (Ouro: the exit gate instead) and the final norm, under the
    checkpoint's names (`transformer.wte`, `transformer.prelude.0`, ...)."""

    def __init__(self, c: HuginnConfig) -> None:
        super().__init__()

        def stack(layers: int) -> nn.ModuleList:
            return nn.ModuleList(BLOCKS[c.block_type](c) for _ in range(layers))

        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.prelude = stack(c.n_layers_in_prelude)
        self.adapter = None if c.looped_stack else nn.Linear(2 * c.n_embd, c.n_embd, bias=c.bias)
        self.exit_gate = nn.Linear(c.n_embd, 1) if c.looped_stack else None
        self.core_block = stack(c.n_layers_in_recurrent_block)
        self.coda = stack(c.n_layers_in_coda)
        self.ln_f = RMSNorm(c.n_embd, c.norm_eps)

    def blocks(self) -> list[Block]:
        return [cast(Block, block) for stack in (self.prelude, self.core_block, self.coda) for block in stack]


class RecurrentDepthModel(nn.Module):
    def __init__(self, config: HuginnConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.transformer = Trunk(c)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.rope: Tensor
        self.reset_rope()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE table; loading ignores any stored table. It is a plain attribute, not a buffer, so
        that casting the model to bf16 leaves it complex64, and `_apply` rebuilds it on the model's device."""
        self.rope = rope_table(self.config, self.config.block_size, device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> RecurrentDepthModel:
        super()._apply(fn, recurse)
        weight = self.transformer.wte.weight
        if weight.device.type != "meta" and self.rope.device != weight.device:
            self.reset_rope(weight.device)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    # ---- stages ---------------------------------------------------------------------------------------------
    def positions(
        self,
        starts: list[int] | tuple[int, ...],
        sizes: list[int] | tuple[int, ...],
        rows: slice | Tensor | None = None,
        cached: bool = True,
    ) -> Positions:
        """Per-row query positions of one call (see `depthwave.model.positions`): built once, used by all stages."""
        return make_positions(self.rope, starts, sizes, rows, cached)

    def _default_positions(self, x: Tensor, at: Positions | None, cache: KVPool | None) -> Positions:
        """Without explicit positions a call covers positions 0..S-1 of rows 0..B-1."""
        if at is not None:
            return at
        batch, length = x.shape[:2]
        return self.positions([0] * batch, [length] * batch, cached=cache is not None)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.transformer.wte(input_ids) * self.config.embed_scale

    def prelude(self, input_ids: Tensor, at: Positions | None = None, cache: KVPool | None = None) -> Tensor:
        """Embedding and prelude for the tokens at `at`; returns the injected embedding e."""
        at = self._default_positions(input_ids, at, cache)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.transformer.prelude):
            x = layer(x, at, cache, cache.prelude_slot(i) if cache is not None else 0)
        return x

    def initial_state(self, like: Tensor, init_scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """The recurrence's starting state: zeros for init_scale 0, else a normal with std
        init_values.std·init_scale truncated at ±3 std, times embed_scale. Ouro starts from the embedding `like`."""
        if self.config.looped_stack:
            return like
        std = self.config.init_std * init_scale
        if std == 0:
            return torch.zeros_like(like)
        state = torch.empty_like(like)
        nn.init.trunc_normal_(state, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        return state.mul_(self.config.embed_scale)

    def start_states(self, states: Tensor, embedded: Tensor, fresh: Callable[[], Tensor]) -> Tensor:
        """The states a pass starts from: as given, except that an Ouro model's fresh positions (`fresh()`, a [B, S]
        mask, asked for only then) start from their embeddings, its loop 0 input."""
        if not self.config.looped_stack:
            return states
        return torch.where(fresh()[..., None], embedded, states)

    def core_step(
        self, state: Tensor, embedded: Tensor, at: Positions | None = None, cache: KVPool | None = None, step: int = 0
    ) -> Tensor:
        """One recurrence: the adapter on [state, e], then the R core layers (Ouro: the layers on the state, then
        ln_f). `step` picks the per-step slots."""
        at = self._default_positions(state, at, cache)
        x = self.core_input(state, embedded)
        for j, layer in enumerate(self.transformer.core_block):
            x = layer(x, at, cache, cache.core_slot(step, j) if cache is not None else 0)
        return self.core_output(x)

    def core_input(self, state: Tensor, embedded: Tensor) -> Tensor:
        adapter = self.transformer.adapter
        return state if adapter is None else adapter(torch.cat((state, embedded), dim=-1))

    def core_output(self, x: Tensor) -> Tensor:
        return self.transformer.ln_f(x) if self.config.looped_stack else x

    def exit_logits(self, state: Tensor) -> Tensor:
        """fp32 [...] the exit gate's logits on recurrent states [..., D] (Ouro only)."""
        gate = self.transformer.exit_gate
        if gate is None:
            raise ValueError(f"a {self.config.family} model has no exit gate")
        return gate(state).squeeze(-1).float()

    def recur(
        self,
        state: Tensor,
        embedded: Tensor,
        num_steps: int,
        at: Positions | None = None,
        cache: KVPool | None = None,
        first_step: int = 0,
    ) -> Tensor:
        """`num_steps` recurrences on the same positions; recurrence t writes the slots `core_slot(t, ·)`, t counted
        from `first_step`."""
        at = self._default_positions(state, at, cache)
        for step in range(first_step, first_step + num_steps):
            state = self.core_step(state, embedded, at, cache, step)
        return state

    def recur_then_coda(
        self, state: Tensor, embedded: Tensor, num_steps: int, at: Positions, cache: KVPool, first_step: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`recur`, then `coda` on its states: (states, coda output, the coda's input). The engine's last recurrences
        of a pass, where the compiled pass runs both as one graph."""
        state = self.recur(state, embedded, num_steps, at, cache, first_step)
        return (state, *self.coda(state, at, cache))

    def coda(self, state: Tensor, at: Positions | None = None, cache: KVPool | None = None) -> tuple[Tensor, Tensor]:
        """The coda on RAW recurrent states (Huginn normalises them with ln_f first); returns (coda output, the
        coda's input). The coda runs on every position, as its K/V are needed later."""
        at = self._default_positions(state, at, cache)
        latents = self.transformer.ln_f(state) if self.config.norm_before_coda else state
        x = latents
        for i, layer in enumerate(self.transformer.coda):
            x = layer(x, at, cache, cache.coda_slot(i) if cache is not None else 0)
        return x, latents

    def head(self, x: Tensor) -> Tensor:
        """fp32 next-token logits from coda outputs (Ouro: from states, normed already)."""
        return self.lm_head(x if self.config.looped_stack else self.transformer.ln_f(x)).float()

    def coda_logits(
        self, state: Tensor, at: Positions | None = None, cache: KVPool | None = None, last_only: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Coda and head on RAW recurrent states. Returns (fp32 logits, the coda's input: see `coda`); `last_only`
        limits the head to the last position."""
        x, latents = self.coda(state, at, cache)
        if last_only:
            x = x[:, -1:]
        return self.head(x), latents

    # ---- full pass ------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        num_steps: int | None = None,
        init_scale: float = 1.0,
        input_states: Tensor | None = None,
        cache: KVPool | None = None,
        start: int = 0,
        last_only: bool = False,
        generator: torch.Generator | None = None,
        at: Positions | None = None,
    ) -> ModelOutput:
        """Full-depth pass over input_ids [B, S] at positions start..start+S-1 of cache rows 0..B-1, or at `at`
        (per-row positions; padded rows' outputs are garbage). `num_steps` defaults to `mean_recurrence`;
        `input_states` replaces the initial state (warm start)."""
        steps = self.config.mean_recurrence if num_steps is None else num_steps
        batch, length = input_ids.shape
        if at is None:
            at = self.positions([start] * batch, [length] * batch, cached=cache is not None)
        embedded = self.prelude(input_ids, at, cache)
        state = self.initial_state(embedded, init_scale, generator) if input_states is None else input_states
        state = self.recur(state, embedded, steps, at, cache)
        logits, latents = self.coda_logits(state, at, cache, last_only)
        if cache is not None:
            rows = range(at.rows.start, at.rows.start + batch) if isinstance(at.rows, slice) else at.rows.tolist()
            for row, first, size in zip(rows, at.starts, at.sizes, strict=True):
                cache.set_length(row, first + size)
        return ModelOutput(logits=logits, latents=latents, state=state)

    # ---- random initialisation (tests, benchmarks, training from scratch) ---------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The reference's init: truncated normals at ±3 std, norms at one, q/k bias at zero."""
        std, out_std = self.config.init_std, self.config.out_proj_std

        def normal(t: Tensor, s: float) -> None:
            nn.init.trunc_normal_(t, mean=0.0, std=s, a=-3 * s, b=3 * s, generator=generator)

        normal(self.transformer.wte.weight, std)
        for linear in (self.transformer.adapter, self.transformer.exit_gate):
            if linear is not None:
                normal(linear.weight, std)
                if linear.bias is not None:
                    linear.bias.zero_()
        if not self.config.tie_embeddings:
            normal(self.lm_head.weight, std)
        hidden = self.config.intermediate_size
        for block in self.transformer.blocks():
            normal(block.attn.Wqkv.weight, std)
            normal(block.attn.proj.weight, out_std)
            normal(block.mlp.fc.weight[:hidden], std)
            normal(block.mlp.fc.weight[hidden:], out_std)
            normal(block.mlp.proj.weight, out_std)
            if block.attn.qk_bias is not None:
                block.attn.qk_bias.zero_()
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)


def random_model(
    config: HuginnConfig, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> RecurrentDepthModel:
    """A randomly initialised model in eval mode (for tests and benchmarks). The weights are drawn on `device` by its
    own generator: a seed gives the same weights on every CPU, and other weights on a GPU."""
    with torch.device(device):
        model = RecurrentDepthModel(config)
    model.init_weights(torch.Generator(device=device).manual_seed(seed))
    return model.to(dtype).eval().requires_grad_(False)
