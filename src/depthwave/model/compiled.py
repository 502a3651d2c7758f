"""The compiled pass: the prelude, the recurrences and the coda as whole graphs (`torch.compile(fullgraph=True)`),
for the engine's decode passes. A pass whose rows all end their recurrences together (a diffusion step, a static
token) runs its last `UNROLL` recurrences and the coda as one graph, so a diffusion step at r' = 4 is two calls.

At small batch a pass costs mostly per-op overhead: a recurrence of the built-in model is about 40 small ops per
layer. As one graph it is a handful of fused kernels. Two things make that possible without a graph per position:

* **Shapes that repeat.** A single row's queries are padded to a bucket (1, 2, 4 or 8; a wider call, such as a
  prefill, runs eagerly). The rows and the cached keys are dynamic dimensions (marked so, never a guard on their
  values), and so, from two rows on, are the queries per row (`exact_width`: no padding beyond the widest row, one
  graph per stage for 2 to 8 of them), so a few graphs per stage serve every batch size and every position.
  Positions, masks and rotations are inputs, computed once per pass (the rotations as real (cos, sin) pairs:
  inductor generates no code for complex tensors).
* **No cache traffic inside a graph.** A graph reads each layer's cached K/V of the positions before the rows'
  chunks (views of the pool, never written during the pass) and attends over them and over the chunk's own fresh
  K/V in one softmax (`layers.prefix_attention`): what the eager pass computes after writing the chunk into the
  cache. The fresh K/V come out of the graph and are written into the pool after it, for the real queries only.
  Mutating the pool inside the graph would make the compiler copy whole cache slots.

On the CPU, inductor's wrapper around a graph's kernels is C++ (`WRAPPER`): a longer first compile, which inductor's
on-disk cache keeps for later starts, for a faster pass.

`CompiledModel` has the eager model's stage interface (`prelude`, `core_step`, `recur`, `recur_then_coda`, `coda`),
so the engine runs either; a call that cannot run compiled (too wide, or with fewer than two cached positions)
falls back to the eager stage.
Compiled and eager agree to float tolerance (another summation order), not bit for bit.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from depthwave.model.kv_cache import KVPool
from depthwave.model.layers import Block, prefix_attention
from depthwave.model.model import RecurrentDepthModel
from depthwave.model.positions import Positions

WIDTHS = (1, 2, 4, 8)
"""Query positions per row that run compiled (a single row, or any call on CUDA, is padded up to the next); wider
calls run eagerly."""
BACKEND = os.environ.get("DEPTHWAVE_COMPILE_BACKEND", "inductor")
"""torch.compile's backend: inductor; "eager" or "aot_eager" trace the same graphs without generating code (tests
of the graphs' structure, debugging)."""
UNROLL = 4
"""Recurrences per graph of `recur` (a diffusion step's r' = 4 is one call; static decoding's 32 are eight)."""
WRAPPER = os.environ.get("DEPTHWAVE_COMPILE_WRAPPER", "cpp")
"""On the CPU, inductor's wrapper code around a graph's kernels: "cpp" (compiled C++: the Python wrapper's
per-kernel calls, views and asserts cost about a sixth of a compiled diffusion pass at B = 1) or "python" (a faster
first compile). CUDA keeps the Python wrapper, under CUDA graphs."""
MIN_CACHED = 2
"""Cached keys a compiled call needs at least (a dynamic dimension is never 0 or 1)."""
CUDA_KEY_BLOCK = 64
"""On CUDA the cached keys a call reads are rounded up to a multiple of this (the bias hides the extra ones):
CUDA graphs record one graph per concrete shape, so a key length that grows by one every pass would record a graph
per pass. On the CPU the key length is a dynamic dimension of one graph and is not padded."""


@dataclass
class StaticCall:
    """A call's inputs in the compiled pass's shapes: B rows, W = a bucket of queries per row, T cached keys."""

    rows: slice | Tensor
    rotation: Tensor
    """[B, W, 1, 1, h/2, 2] the queries' rotations as (cos, sin) pairs (`layers.rotate_pairs`: inductor compiles no
    complex arithmetic); padding repeats a row's last position."""
    old_bias: Tensor
    """[B, 1, 1, T] 0 where a row's queries see a cached key (before the row's chunk, and visible), else -inf."""
    new_bias: Tensor
    """[B, 1, W, W] 0 where a query sees a key of its own chunk (causal, real), else -inf."""
    real: Tensor | None
    """[N] flat indices into [B·W] of the real queries (None when nothing is padded)."""
    width: int
    dynamic_width: bool
    """W is a dynamic dimension of the graph (`exact_width`, two rows or more, 2 to 8 queries per row)."""


def bucket(width: int) -> int | None:
    return next((w for w in WIDTHS if w >= width), None)


def dynamic_width(batch: int, width: int, exact_width: bool) -> bool:
    """Whether a call of `batch` rows of `width` queries runs a graph whose width is a dynamic dimension (a
    dimension of 1 is never dynamic)."""
    return exact_width and batch >= 2 and 2 <= width <= WIDTHS[-1]


def static_call(
    at: Positions, rope: Tensor, key_block: int = 1, max_keys: int | None = None, exact_width: bool = False
) -> StaticCall | None:
    """The call `at` for the compiled pass, or None when it must run eagerly (too wide, too few cached keys, or
    queries at different loops of a per-step cache). Built once per call (memoised). The cached keys read are
    rounded up to a multiple of `key_block`, at most `max_keys`. With `exact_width`, two rows or more are padded
    only to the widest row (the width is then a dynamic dimension), else to its bucket."""
    if "static" in at.memo:
        return at.memo["static"]
    dynamic = dynamic_width(at.batch, at.width, exact_width)
    width = at.width if dynamic else bucket(at.width)
    cached = max(at.starts)
    if key_block > 1:
        cached = min(-(-cached // key_block) * key_block, max_keys or cached)
    eager = cached < MIN_CACHED or at.is_causal or at.loops is not None
    call = None if width is None or eager else _build(at, rope, width, cached, dynamic)
    at.memo["static"] = call
    return call


def _build(at: Positions, rope: Tensor, width: int, cached: int, dynamic: bool) -> StaticCall:
    device = at.pos.device
    starts = torch.tensor(at.starts, device=device)
    sizes = torch.tensor(at.sizes, device=device)
    keys = torch.arange(cached, device=device)
    seen = keys[None, :] < starts[:, None]
    if at.mask is not None:
        # The first query of a row sees every earlier key that is visible at all (hidden keys stay hidden).
        first = at.mask[:, 0, 0, :cached]
        seen[:, : first.shape[-1]] &= first
    pos = at.pos if width == at.width else torch.cat((at.pos, at.pos[:, -1:].expand(-1, width - at.width)), dim=1)
    queries = torch.arange(width, device=device)
    own = (queries[None, :] <= queries[:, None])[None] & (queries[None, None, :] < sizes[:, None, None])
    real = None
    if any(size != width for size in at.sizes):
        real = torch.tensor([b * width + s for b, size in enumerate(at.sizes) for s in range(size)], device=device)
    return StaticCall(
        rows=at.rows,
        rotation=torch.view_as_real(rope[pos])[:, :, None, None],
        old_bias=_bias(seen)[:, None, None, :],
        new_bias=_bias(own)[:, None],
        real=real,
        width=width,
        dynamic_width=dynamic,
    )


def _bias(visible: Tensor) -> Tensor:
    return torch.zeros(visible.shape, device=visible.device).masked_fill_(~visible, float("-inf"))


class CompiledModel:
    """The model's stages as compiled graphs over one KV pool; `prelude`, `core_step` and `coda` as the eager
    model's. `mode`: torch.compile's (None on the CPU; "reduce-overhead" for CUDA graphs). `exact_width` holds
    in every mode but CUDA graphs: they record one graph per concrete shape, so there every call pads to a bucket."""

    def __init__(
        self, model: RecurrentDepthModel, pool: KVPool, mode: str | None = None, key_block: int | None = None
    ) -> None:
        self.model, self.pool = model, pool
        self.cuda_graphs = mode == "reduce-overhead"
        self.exact_width = not self.cuda_graphs
        self.key_block = key_block or (CUDA_KEY_BLOCK if model.device.type == "cuda" else 1)
        # Derived config values are computed (and cached) here, outside any graph: tracing their first
        # computation would meet functools.cached_property's lock.
        _ = model.config.embed_scale
        if WRAPPER not in ("cpp", "python"):
            raise ValueError(f"DEPTHWAVE_COMPILE_WRAPPER must be 'cpp' or 'python', got {WRAPPER!r}")
        cpu_inductor = BACKEND == "inductor" and mode is None and model.device.type == "cpu"
        options: dict[str, Any] | None = {"cpp_wrapper": True} if WRAPPER == "cpp" and cpu_inductor else None
        compiled: Callable[[Callable[..., Any]], Callable[..., Any]] = lambda fn: torch.compile(  # noqa: E731
            fn, fullgraph=True, dynamic=False, mode=mode, backend=BACKEND, options=options
        )
        # One cache entry per (stage, width bucket, one row or more) and model: more than dynamo's default of 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._prelude = compiled(self._prelude_graph)
        self._core = compiled(self._core_graph)
        self._core_loop = compiled(self._loop_graph)
        self._finish = compiled(self._finish_graph)
        self._coda = compiled(self._coda_graph)

    # ---- the stages -----------------------------------------------------------------------------------------
    def prelude(self, input_ids: Tensor, at: Positions, cache: KVPool) -> Tensor:
        call = self._call(at)
        if call is None:
            return self.model.prelude(input_ids, at, cache)
        slots = [cache.prelude_slot(i) for i in range(self.model.config.n_layers_in_prelude)]
        return self._run(self._prelude, call, at, slots, self._pad(input_ids, call))

    def core_step(self, state: Tensor, embedded: Tensor, at: Positions, cache: KVPool, step: int = 0) -> Tensor:
        call = self._call(at)
        if call is None:
            return self.model.core_step(state, embedded, at, cache, step)
        slots = [cache.core_slot(step, j) for j in range(self.model.config.n_layers_in_recurrent_block)]
        return self._run(self._core, call, at, slots, self._pad(state, call), self._pad(embedded, call))

    def recur(
        self, state: Tensor, embedded: Tensor, num_steps: int, at: Positions, cache: KVPool, first_step: int = 0
    ) -> Tensor:
        """`num_steps` recurrences: with the shared cache, `UNROLL` of them per graph (each layer's K/V of the
        last one is what the cache keeps), the rest one by one."""
        call = self._call(at)
        if call is None or cache.max_steps is not None:
            for step in range(first_step, first_step + num_steps):
                state = self.core_step(state, embedded, at, cache, step)
            return state
        padded_e = self._pad(embedded, call)
        for _ in range(num_steps // UNROLL):
            state = self._run(self._core_loop, call, at, self._core_slots(), self._pad(state, call), padded_e)
        for step in range(num_steps % UNROLL):
            state = self.core_step(state, embedded, at, cache, first_step + step)
        return state

    def recur_then_coda(
        self, state: Tensor, embedded: Tensor, num_steps: int, at: Positions, cache: KVPool, first_step: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`recur`, then `coda` on its states: (states, coda output, the coda's input). With the shared cache and a
        multiple of `UNROLL` recurrences, the last `UNROLL` and the coda are one graph (a call fewer per pass)."""
        call = self._call(at)
        if call is None or cache.max_steps is not None or num_steps % UNROLL or not num_steps:
            state = self.recur(state, embedded, num_steps, at, cache, first_step)
            return (state, *self.coda(state, at, cache))
        state = self.recur(state, embedded, num_steps - UNROLL, at, cache, first_step)
        slots = self._core_slots() + [cache.coda_slot(i) for i in range(self.model.config.n_layers_in_coda)]
        out = self._run(self._finish, call, at, slots, self._pad(state, call), self._pad(embedded, call))
        return out[0], out[1], out[2]

    def coda(self, state: Tensor, at: Positions, cache: KVPool) -> tuple[Tensor, Tensor]:
        call = self._call(at)
        if call is None:
            return self.model.coda(state, at, cache)
        latents = self.model.transformer.ln_f(state) if self.model.config.norm_before_coda else state
        slots = [cache.coda_slot(i) for i in range(self.model.config.n_layers_in_coda)]
        return self._run(self._coda, call, at, slots, self._pad(latents, call)), latents

    # ---- internals ------------------------------------------------------------------------------------------
    def _call(self, at: Positions) -> StaticCall | None:
        return static_call(at, self.model.rope, self.key_block, self.pool.max_length, self.exact_width)

    def _core_slots(self) -> list[int]:
        return [self.pool.core_slot(0, j) for j in range(self.model.config.n_layers_in_recurrent_block)]

    # One function per stage (dynamo keeps its compiled graphs per function): each returns the stage's output and
    # its layers' fresh K and V, stacked [layers, B, W, G, h] (None without layers) so that one copy writes them
    # all; `rest` holds the rotation, the two biases, then each layer's cached K and V.
    Graph = tuple[Any, Tensor | None, Tensor | None]

    def _prelude_graph(self, ids: Tensor, *rest: Tensor) -> Graph:
        return _stack(self.model.transformer.prelude, self.model.embed(ids), rest)

    def _core_graph(self, state: Tensor, embedded: Tensor, *rest: Tensor) -> Graph:
        x, fresh_k, fresh_v = _stack(self.model.transformer.core_block, self.model.core_input(state, embedded), rest)
        return self.model.core_output(x), fresh_k, fresh_v

    def _loop_graph(self, state: Tensor, embedded: Tensor, *rest: Tensor) -> Graph:
        """`UNROLL` recurrences (shared cache): each reads the same cached keys, and only the last one's fresh
        K/V are returned to be written."""
        for _ in range(UNROLL):
            state, fresh_k, fresh_v = self._core_graph(state, embedded, *rest)
        return state, fresh_k, fresh_v

    def _coda_graph(self, latents: Tensor, *rest: Tensor) -> Graph:
        return _stack(self.model.transformer.coda, latents, rest)

    def _finish_graph(self, state: Tensor, embedded: Tensor, *rest: Tensor) -> Graph:
        """`UNROLL` recurrences and the coda (shared cache: their slots follow each other); outputs the states,
        the coda's output and its input."""
        split = 3 + 2 * self.model.config.n_layers_in_recurrent_block
        state, core_k, core_v = self._loop_graph(state, embedded, *rest[:split])
        latents = self.model.transformer.ln_f(state) if self.model.config.norm_before_coda else state
        out, coda_k, coda_v = self._coda_graph(latents, *rest[:3], *rest[split:])
        if coda_k is None or coda_v is None:
            return (state, out, latents), core_k, core_v
        assert core_k is not None and core_v is not None
        return (state, out, latents), torch.cat((core_k, coda_k)), torch.cat((core_v, coda_v))

    def _pad(self, x: Tensor, call: StaticCall) -> Tensor:
        missing = call.width - x.shape[1]
        if missing == 0:
            return x
        return torch.cat((x, x[:, -1:].expand(-1, missing, *x.shape[2:])), dim=1)

    def _run(
        self, graph: Callable[..., Any], call: StaticCall, at: Positions, slots: list[int], *inputs: Tensor
    ) -> Any:
        """The graph's output (a tensor, or the finish graph's three) cut to the call's width, after its fresh K/V
        were written."""
        cached = call.old_bias.shape[-1]
        olds = []
        for slot in slots:
            keys, values = self.pool.cached(slot, call.rows, cached)
            olds += [keys, values]
        tensors = [*inputs, call.rotation, call.old_bias, call.new_bias, *olds]
        _mark_dynamic(tensors, len(inputs), at.batch, call.dynamic_width)
        if self.cuda_graphs:
            # A CUDA graph's replay reuses its outputs' memory, and a pass calls graphs many times: each call is a
            # step of its own, and its output (an embedding or state read by later calls) is copied out of it.
            torch.compiler.cudagraph_mark_step_begin()
        out, fresh_k, fresh_v = graph(*tensors)
        if fresh_k is not None and fresh_v is not None:
            assert slots == list(range(slots[0], slots[0] + len(slots))), "a graph's layers write consecutive slots"
            self.pool.write_fresh(slots[0], at, _real(fresh_k, call), _real(fresh_v, call))
        if isinstance(out, tuple):
            return tuple(self._output(x, call, at) for x in out)
        return self._output(out, call, at)

    def _output(self, x: Tensor, call: StaticCall, at: Positions) -> Tensor:
        if self.cuda_graphs:
            x = x.clone()
        return x[:, : at.width] if call.width != at.width else x

    def warmup(self, rows: Sequence[int] = (1, 2), widths: Sequence[int] = WIDTHS, progress: bool = False) -> float:
        """Compile every graph that calls of these row counts and widths reach (a row count from 2 on serves all
        larger ones, and with `exact_width`, one width from 2 on serves all): each stage on dummy inputs, whose cache
        writes land where no request reads (rows are free before the engine runs anything). Returns the seconds it
        took; `progress` shows a bar on stderr."""
        config, device, dtype = self.model.config, self.model.device, self.model.dtype
        # One shape per graph the calls reach: keyed by one row or more, and the width (None: the dynamic one).
        graphs: dict[tuple[int, int | None], tuple[int, int]] = {}
        for b, w in itertools.product(rows, widths):
            if b <= self.pool.rows:
                graphs.setdefault((min(b, 2), None if dynamic_width(b, w, self.exact_width) else w), (b, w))
        shapes = list(graphs.values())
        began = time.perf_counter()
        with _bar(len(shapes), progress) as advance:
            for batch, width in shapes:
                # Inference tensors, as the engine's: a graph's guards tell them apart from ordinary ones.
                with torch.inference_mode():
                    at = self.model.positions([MIN_CACHED] * batch, [width] * batch, slice(0, batch))
                    ids = torch.zeros(batch, width, dtype=torch.long, device=device)
                    state = torch.zeros(batch, width, config.n_embd, device=device, dtype=dtype)
                    e = self.prelude(ids, at, self.pool)
                    self.recur(state, e, UNROLL + 1, at, self.pool)
                    self.recur_then_coda(state, e, UNROLL, at, self.pool)
                    self.coda(state, at, self.pool)
                advance()
        return time.perf_counter() - began


def _stack(layers: Any, x: Tensor, rest: Sequence[Tensor]) -> tuple[Tensor, Tensor | None, Tensor | None]:
    rotation, old_bias, new_bias, olds = rest[0], rest[1], rest[2], rest[3:]
    fresh_k: list[Tensor] = []
    fresh_v: list[Tensor] = []
    for layer, k_old, v_old in zip(layers, olds[0::2], olds[1::2], strict=True):
        x = _layer(layer, x, rotation, old_bias, new_bias, k_old, v_old, fresh_k, fresh_v)
    if not fresh_k:  # a stage without layers (Ouro's prelude and coda)
        return x, None, None
    return x, torch.stack(fresh_k), torch.stack(fresh_v)


def _layer(
    layer: Block,
    x: Tensor,
    rotation: Tensor,
    old_bias: Tensor,
    new_bias: Tensor,
    k_old: Tensor,
    v_old: Tensor,
    fresh_k: list[Tensor],
    fresh_v: list[Tensor],
) -> Tensor:
    def attend(h: Tensor) -> Tensor:
        q, k, v = layer.attn.project(h, rotation)
        fresh_k.append(k)
        fresh_v.append(v)
        out = prefix_attention(q, k.transpose(1, 2), v.transpose(1, 2), k_old, v_old, old_bias, new_bias)
        return layer.attn.output(out)

    return layer.mix(x, attend)


def _real(x: Tensor, call: StaticCall) -> Tensor:
    """[L, N, G, h] the real queries' entries of a graph's fresh K or V [L, B, W, G, h] (L layers)."""
    flat = x.flatten(1, 2)
    return flat if call.real is None else flat[:, call.real]


def _mark_dynamic(tensors: list[Tensor], inputs: int, batch: int, width: bool) -> None:
    """The cached keys (and from two rows on, the rows; with `width`, the queries per row) are dynamic dimensions:
    one graph for all their values."""
    mark = torch._dynamo.maybe_mark_dynamic
    rotation, old_bias, new_bias, olds = (
        tensors[inputs],
        tensors[inputs + 1],
        tensors[inputs + 2],
        tensors[inputs + 3 :],
    )
    mark(old_bias, 3)
    for t in olds:
        mark(t, 2)
    if batch >= 2:
        for t in tensors:
            if t.shape[0] == batch:
                mark(t, 0)
    if width:
        for t in (*tensors[:inputs], rotation):
            mark(t, 1)
        mark(new_bias, 2)
        mark(new_bias, 3)


@contextlib.contextmanager
def _bar(total: int, show: bool) -> Iterator[Callable[[], None]]:
    """A progress bar over the warm-up's shapes on stderr, or nothing."""
    if not show:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("compiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("compile", total=total)
        yield lambda: bar.advance(task)
