"""Streaming detokenization: `depthwave.engine.output.TextStream` (DecodeStream, a bounded window per token)
against the whole-output method it replaced (decode every token so far on every token), on the built-in model's
tokenizer.

The tokens are real text (the built-in model's card and arithmetic problems with a line of multi-byte text,
encoded and repeated) streamed one token at a time, as the engine hands them out. For each length N, the
microseconds per token of streaming N tokens (medians of interleaved repeats): without stop strings (the CLI's
streamer) and with two stop strings that never occur (a server choice: the hold-back and the stop search run on
every token). The old method's cost grows with N; the new one's stays flat.

Also the deterministic work measure of the tests: token ids handed to the tokenizer per streamed token.

    python benchmarks/bench_detokenizer.py [--repeats 5]

A table and JSON (`benchmarks/results/bench_detokenizer.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import tokenizers

from depthwave.data.arithmetic import iter_train
from depthwave.engine.output import TextStream, cut_at_stop_strings
from depthwave.model.loading import BUILTIN_DIR
from depthwave.model.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
LENGTHS = (100, 500, 1000, 2000, 4000)
STOPS = ("<never>", "\n\n\n\n")
MULTI_BYTE = "Zoë, ça coûte 5 € — 中文 🙂👍🏽 naïve café ∑ x² ½"


class WholeOutputDetokenizer:
    """The method replaced (`IncrementalDetokenizer` of the CLI, and the server's `TextStream` with stop strings):
    decode the whole output on every token, hold back a trailing incomplete character (U+FFFD); with stop
    strings, cut the whole text at the first one and hold back the longest less a character."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max(map(len, stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0

    def add(self, tokens: Iterable[int]) -> str:
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        if self.stops:
            safe = cut_at_stop_strings(text, self.stops)
            text = text[: max(len(text) - self.hold, 0)] if safe == text and self.hold else safe
        delta = text[self.sent :] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta


def real_tokens(tokenizer: Tokenizer, count: int) -> list[int]:
    card = (BUILTIN_DIR / "MODEL_CARD.md").read_text()
    problems = iter_train(0)
    ids: list[int] = []
    while len(ids) < count:
        problem = next(problems)
        ids += tokenizer.encode(card[:2000]) + tokenizer.encode(f"{problem.question}\n\n{problem.solution}\n")
        ids += tokenizer.encode(MULTI_BYTE + "\n")
    return ids[:count]


def stream_seconds(make: Callable[[], TextStream | WholeOutputDetokenizer], ids: list[int]) -> float:
    stream = make()
    start = time.perf_counter()
    for token in ids:
        stream.add((token,))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    tokenizer = Tokenizer(BUILTIN_DIR)
    ids = real_tokens(tokenizer, max(LENGTHS))
    full = tokenizer.decode(ids)
    # The methods agree (and are the full decode) before anything is timed.
    for stops in ((), STOPS):
        old, new = WholeOutputDetokenizer(tokenizer, stops), TextStream(tokenizer, stops)
        old_text = "".join(old.add((t,)) for t in ids)
        new_text = "".join(new.add((t,)) for t in ids)
        assert new_text + new.finish() == full and full.startswith(old_text)
    assert not any(stop in full for stop in STOPS)
    variants: dict[str, Callable[[], TextStream | WholeOutputDetokenizer]] = {
        "old": lambda: WholeOutputDetokenizer(tokenizer),
        "new": lambda: TextStream(tokenizer),
        "old_stops": lambda: WholeOutputDetokenizer(tokenizer, STOPS),
        "new_stops": lambda: TextStream(tokenizer, STOPS),
    }
    rows: list[dict[str, float]] = []
    for n in LENGTHS:
        prefix = ids[:n]
        times: dict[str, list[float]] = {name: [] for name in variants}
        for make in variants.values():  # warm-up
            stream_seconds(make, prefix[:50])
        for _ in range(args.repeats):  # interleaved, so that drift hits every method alike
            for name, make in variants.items():
                times[name].append(stream_seconds(make, prefix) / n * 1e6)
        work = TextStream(tokenizer)
        for token in prefix:
            work.add((token,))
        row = {f"{k}_us_per_token": statistics.median(v) for k, v in times.items()}
        row["new_decoded_tokens_per_token"] = work.decoded_tokens / n
        row["old_decoded_tokens_per_token"] = (n + 1) / 2
        rows.append({"tokens": n, **row})

    print(f"streaming detokenization, built-in tokenizer, µs per token (median of {args.repeats})")
    header = f"{'tokens':>6}  {'old':>8}  {'new':>6}  {'speedup':>7}  {'old+stops':>9}  {'new+stops':>9}  "
    header += f"{'ids decoded/token old':>21}  {'new':>4}"
    print(header)
    for row in rows:
        old_us, new_us = row["old_us_per_token"], row["new_us_per_token"]
        print(
            f"{row['tokens']:>6}  {old_us:>8.1f}  {new_us:>6.2f}  {old_us / new_us:>6.0f}x  "
            f"{row['old_stops_us_per_token']:>9.1f}  {row['new_stops_us_per_token']:>9.2f}  "
            f"{row['old_decoded_tokens_per_token']:>21.1f}  {row['new_decoded_tokens_per_token']:>4.1f}"
        )
    record: dict[str, object] = {
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count()},
        "settings": {"repeats": args.repeats, "tokenizers": tokenizers.__version__, "stops": list(STOPS)},
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_detokenizer.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    main()
