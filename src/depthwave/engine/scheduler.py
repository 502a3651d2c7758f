"""Which requests run: first come, first served, bounded by the engine's rows and its KV budget.

Running requests occupy the pool rows 0..n-1, in order, so that every pass reads the cache as views. When a request
leaves, the last running request moves into its row (one copy of that row's final entries), which keeps the rows
contiguous at the cost of a copy per departure instead of a gather per layer."""

from __future__ import annotations

from collections import deque

from depthwave.engine.request import Request
from depthwave.errors import PromptError


class Scheduler:
    def __init__(self, max_num_seqs: int, max_model_len: int, buffer_len: int, max_cached_positions: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.buffer_len = buffer_len
        self.max_cached_positions = max_cached_positions
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.reserved = 0

    def check(self, request: Request) -> None:
        """Refuse a request that could never be admitted, whatever else runs."""
        need, buffer = request.positions_needed, request.buffer_needed
        limit = min(self.max_model_len, self.max_cached_positions)
        if need > limit or buffer > self.buffer_len:
            raise PromptError(
                f"request {request.request_id} needs up to {need} cached positions ({len(request.prompt_token_ids)} "
                f"prompt tokens + its token budget and sampler's lookahead), more than this engine holds per "
                f"sequence ({limit}); lower max_new_tokens or raise max_model_len"
            )

    def add(self, request: Request) -> None:
        self.check(request)
        self.waiting.append(request)

    def admit(self, now: float, hold_s: float = 0.0, prefill_batch: int = 1) -> list[Request]:
        """Move waiting requests into free rows while the KV budget allows, in arrival order. While others run,
        waiting requests are held until the oldest has waited `hold_s` or they would fill every free row, and
        until `prefill_batch` of them (or all, if fewer wait) have rows to start in."""
        if self.holding(now, hold_s, prefill_batch):
            return []
        admitted = []
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if self.reserved + request.positions_needed > self.max_cached_positions:
                break
            self.waiting.popleft()
            request.row = len(self.running)
            self.running.append(request)
            self.reserved += request.positions_needed
            admitted.append(request)
        return admitted

    def holding(self, now: float, hold_s: float, prefill_batch: int = 1) -> bool:
        if not self.running or not self.waiting:
            return False
        free = self.max_num_seqs - len(self.running)
        young = now - self.waiting[0].arrival_time < hold_s
        return (young and len(self.waiting) < free) or free < min(prefill_batch, len(self.waiting))

    def remove_waiting(self, request: Request) -> None:
        self.waiting.remove(request)

    def leave(self, request: Request) -> tuple[int, int] | None:
        """Free a running request's row; returns (source, target) if the last row must move into it."""
        row = request.row
        last = self.running.pop()
        self.reserved -= request.positions_needed
        request.row = -1
        if last is request:
            return None
        self.running[row] = last
        last.row = row
        return len(self.running), row

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
