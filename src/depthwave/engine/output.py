"""What a request's output owes its `SamplingParams`: the token budget, stop tokens and stop strings, the text cut
before a stop string, and text that streams without splitting a multi-byte character."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from depthwave.errors import InvalidParameterError

if TYPE_CHECKING:
    from depthwave.model.tokenizer import Tokenizer


class StopCondition:
    """Whether the output so far ends generation: its last token is a stop token, or its decoded tail contains a
    stop string (checked after every token, so the tail only needs to span the longest stop string)."""

    def __init__(self, ids: frozenset[int], strings: tuple[str, ...], tokenizer: Tokenizer | None) -> None:
        if strings and tokenizer is None:
            raise InvalidParameterError("stop strings need the model's tokenizer (tokenizer.json)")
        self.ids, self.strings, self.tokenizer = ids, strings, tokenizer
        # A token decodes to at least one character, but a multi-byte character may take several tokens.
        self.window = 4 * max(map(len, strings), default=0) + 4

    def __call__(self, emitted: list[int]) -> bool:
        if emitted[-1] in self.ids:
            return True
        if not self.strings:
            return False
        assert self.tokenizer is not None
        tail = self.tokenizer.decode(emitted[-self.window :])
        return any(stop in tail for stop in self.strings)


class Output:
    """A request's generated tokens so far. `emit` appends newly final tokens up to the budget and reports whether
    a stop ended generation (nothing after the token that did is kept); `fresh` holds what the last step added."""

    def __init__(self, budget: int, stop: StopCondition) -> None:
        self.budget = budget
        self.stop = stop
        self.tokens: list[int] = []
        self.fresh: list[int] = []
        self.stopped = False

    @property
    def full(self) -> bool:
        return len(self.tokens) >= self.budget

    def emit(self, tokens: Iterable[int]) -> bool:
        for token in tokens:
            if self.full or self.stopped:
                break
            self.tokens.append(token)
            self.fresh.append(token)
            if self.stop(self.tokens):
                self.stopped = True
        return self.stopped

    def extend_unchecked(self, tokens: Iterable[int]) -> None:
        """Append without budget or stop checks (reference modes that check on their own terms)."""
        tokens = list(tokens)
        self.tokens.extend(tokens)
        self.fresh.extend(tokens)

    def take_fresh(self) -> list[int]:
        fresh, self.fresh = self.fresh, []
        return fresh


def cut_at_stop_strings(text: str, stops: tuple[str, ...]) -> str:
    """The text before the first stop string it contains."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return text[: min(found)] if found else text


class IncrementalDetokenizer:
    """Text deltas of a growing token list. It decodes the whole output each time, so that multi-token characters
    and merges come out right, and holds back a trailing incomplete UTF-8 sequence (decoded as U+FFFD)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = 0

    def add(self, tokens: Iterable[int]) -> str:
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[self.sent :], len(text)
        return delta
