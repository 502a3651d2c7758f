"""The recurrent-depth model (Huginn-0125 architecture), readable top to bottom.

    e      = prelude(embed(ids) · sqrt(D))                      P layers, once per position
    s_0    = zeros, or truncated normal · sqrt(D)               ("like-init", scaled by init_scale)
    s_t+1  = core(adapter([s_t, e]))                            R layers, repeated r times
    logits = head(ln_f(coda(ln_f(s_r))))                        C layers, once per position

The samplers drive the three stages separately through `prelude`, `core_step` and `coda_logits`; `forward` chains
them for a plain full-depth pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from depthwave.errors import PromptError
from depthwave.model.cache import KVCache
from depthwave.model.config import HuginnConfig
from depthwave.model.layers import RMSNorm, SandwichBlock, Span, rope_table


@dataclass
class ModelOutput:
    logits: Tensor
    """fp32 [B, S, V] (or [B, 1, V] when only the last position was asked for)."""
    latents: Tensor
    """ln_f of the final recurrent state, [B, S, D]: what the reference returns as `latent_states`."""
    state: Tensor
    """The raw final recurrent state s_r, [B, S, D]."""


class RecurrentDepthModel(nn.Module):
    def __init__(self, config: HuginnConfig) -> None:
        super().__init__()
        self.config = config
        c = config

        def block() -> SandwichBlock:
            return SandwichBlock(c.n_embd, c.n_heads, c.intermediate_size, c.norm_eps, c.qk_bias)

        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(c.vocab_size, c.n_embd),
                "prelude": nn.ModuleList(block() for _ in range(c.n_layers_in_prelude)),
                "adapter": nn.Linear(2 * c.n_embd, c.n_embd, bias=c.bias),
                "core_block": nn.ModuleList(block() for _ in range(c.n_layers_in_recurrent_block)),
                "coda": nn.ModuleList(block() for _ in range(c.n_layers_in_coda)),
                "ln_f": RMSNorm(c.n_embd, c.norm_eps),
            }
        )
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.rope: Tensor
        self.reset_rope()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the RoPE table; loading ignores any stored table. It is a plain attribute, not a buffer, so
        that casting the model to bf16 leaves it complex64, and `_apply` rebuilds it on the model's device."""
        self.rope = rope_table(self.config.head_dim, self.config.block_size, self.config.rope_base, device)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
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
    def span(self, start: int, length: int) -> Span:
        """Positions start..start+length-1: their rotations ([S,1,1,h/2], broadcasting over the (q|k) and head
        axes) and a causal mask aligned to the lower-right corner (query start+i sees keys 0..start+i)."""
        if start + length > self.config.block_size:
            raise PromptError(
                f"positions up to {start + length - 1} exceed the model's context of "
                f"{self.config.block_size} positions (block_size)"
            )
        rotation = self.rope[start : start + length, None, None]
        if length == 1:
            return Span(start, rotation, None, False)
        if start == 0:
            return Span(start, rotation, None, True)
        query = torch.arange(length, device=self.device)[:, None] + start
        mask = torch.arange(start + length, device=self.device)[None, :] <= query
        return Span(start, rotation, mask, False)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.transformer.wte(input_ids) * self.config.embed_scale

    def prelude(self, input_ids: Tensor, start: int = 0, cache: KVCache | None = None) -> Tensor:
        """Embedding and prelude for the tokens at positions start..start+S-1; returns the injected embedding e.

        With a cache, the positions up to start+S are from now on part of it (`cache.length`)."""
        span = self.span(start, input_ids.shape[1])
        x = self.embed(input_ids)
        for i, layer in enumerate(self.transformer.prelude):
            x = layer(x, span, cache, cache.prelude_slot(i) if cache is not None else 0)
        if cache is not None:
            cache.length = start + input_ids.shape[1]
        return x

    def initial_state(self, like: Tensor, init_scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """The recurrence's starting state: zeros for init_scale 0, else a normal with std
        sqrt(2/(5D))·init_scale truncated at ±3 std, times sqrt(D)."""
        std = self.config.init_std * init_scale
        if std == 0:
            return torch.zeros_like(like)
        state = torch.empty_like(like)
        nn.init.trunc_normal_(state, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)
        return state.mul_(self.config.embed_scale)

    def recur(
        self,
        state: Tensor,
        embedded: Tensor,
        num_steps: int,
        start: int = 0,
        cache: KVCache | None = None,
        first_step: int = 0,
        span: Span | None = None,
    ) -> Tensor:
        """`num_steps` recurrences (adapter on [state, e], then the R core layers) on the same positions.
        Recurrence t writes the cache slots `cache.core_slot(t, ·)`, t counted from `first_step`. `span` overrides
        the positions' default span (a sampler that must hide some cached positions passes its own mask)."""
        span = span or self.span(start, state.shape[1])
        for step in range(first_step, first_step + num_steps):
            x = self.transformer.adapter(torch.cat((state, embedded), dim=-1))
            for j, layer in enumerate(self.transformer.core_block):
                x = layer(x, span, cache, cache.core_slot(step, j) if cache is not None else 0)
            state = x
        return state

    def core_step(
        self,
        state: Tensor,
        embedded: Tensor,
        start: int = 0,
        cache: KVCache | None = None,
        step: int = 0,
        span: Span | None = None,
    ) -> Tensor:
        """One recurrence; `step` picks the per-step cache slots."""
        return self.recur(state, embedded, 1, start, cache, first_step=step, span=span)

    def coda_logits(
        self, state: Tensor, start: int = 0, cache: KVCache | None = None, last_only: bool = False
    ) -> tuple[Tensor, Tensor]:
        """ln_f, coda, ln_f, head on RAW recurrent states. Returns (fp32 logits, ln_f(state)).

        The coda runs on every position (its K/V are needed later); `last_only` limits the head to the last."""
        span = self.span(start, state.shape[1])
        latents = self.transformer.ln_f(state)
        x = latents
        for i, layer in enumerate(self.transformer.coda):
            x = layer(x, span, cache, cache.coda_slot(i) if cache is not None else 0)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.transformer.ln_f(x)).float(), latents

    # ---- full pass ------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        num_steps: int | None = None,
        init_scale: float = 1.0,
        input_states: Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        last_only: bool = False,
        generator: torch.Generator | None = None,
    ) -> ModelOutput:
        """Full-depth pass over input_ids [B, S] at positions start..start+S-1 (`num_steps` defaults to
        `mean_recurrence`). `input_states` replaces the initial state (warm start)."""
        steps = self.config.mean_recurrence if num_steps is None else num_steps
        embedded = self.prelude(input_ids, start, cache)
        state = self.initial_state(embedded, init_scale, generator) if input_states is None else input_states
        state = self.recur(state, embedded, steps, start, cache)
        logits, latents = self.coda_logits(state, start, cache, last_only)
        return ModelOutput(logits=logits, latents=latents, state=state)

    # ---- random initialisation (tests, benchmarks, training from scratch) ---------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """The reference's init: truncated normals at ±3 std, norms at one, q/k bias at zero."""
        std, out_std = self.config.init_std, self.config.out_proj_std

        def normal(t: Tensor, s: float) -> None:
            nn.init.trunc_normal_(t, mean=0.0, std=s, a=-3 * s, b=3 * s, generator=generator)

        normal(self.transformer.wte.weight, std)
        normal(self.transformer.adapter.weight, std)
        if self.transformer.adapter.bias is not None:
            self.transformer.adapter.bias.zero_()
        if not self.config.tie_embeddings:
            normal(self.lm_head.weight, std)
        hidden = self.config.intermediate_size
        for name in ("prelude", "core_block", "coda"):
            for block in self.transformer[name]:
                normal(block.attn.Wqkv.weight, std)
                normal(block.attn.proj.weight, out_std)
                normal(block.mlp.fc.weight[:hidden], std)
                normal(block.mlp.fc.weight[hidden:], out_std)
                normal(block.mlp.proj.weight, out_std)
                if block.attn.qk_bias is not None:
                    block.attn.qk_bias.zero_()
                for norm in (block.norm_1, block.norm_2, block.norm_3, block.norm_4):
                    norm.weight.fill_(1.0)
        self.transformer.ln_f.weight.fill_(1.0)


def random_model(
    config: HuginnConfig, seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> RecurrentDepthModel:
    """A randomly initialised model in eval mode (for tests and benchmarks)."""
    with torch.device(device):
        model = RecurrentDepthModel(config)
    model.init_weights(torch.Generator(device=device).manual_seed(seed))
    return model.to(dtype).eval().requires_grad_(False)
