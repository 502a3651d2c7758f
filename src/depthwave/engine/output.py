"""What a request's output owes its `SamplingParams`: the token budget, stop tokens and stop strings, the text cut
before a stop string, and text that streams without splitting a multi-byte character."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

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


# Pending (undecodable so far) tokens before the stream looks for a clean place to cut them: a character is at
# most 4 UTF-8 bytes, so a longer run that still ends in U+FFFD holds genuinely invalid bytes.
_RESYNC_AFTER = 8
# How far back from the end a clean cut is looked for.
_RESYNC_SPAN = 6


class TextStream:
    """Text deltas of a growing token list, decoded incrementally with O(1) work per token (O(n) in all): the
    deltas put together are `tokenizer.decode(tokens)` exactly (special tokens skipped, as `Tokenizer.decode`
    does), cut at the first stop string, and no delta splits a multi-byte character.

    Decoding goes through `tokenizers.decoders.DecodeStream`: each step decodes only the tokens of the last
    emitted chunk and the pending ones, and gives nothing while the text ends in an incomplete UTF-8 sequence
    (U+FFFD). Around it:

    - special tokens are dropped before they reach it (what decoding with `skip_special_tokens` does), so that
      they never pile up as pending tokens;
    - byte-fallback tokenizers (`<0xNN>` tokens, a `ByteFallback` decoder, e.g. Llama-2's): a run of byte tokens
      decodes all or nothing (one U+FFFD per token if the whole run is not valid UTF-8, even where a first part
      of it was), so DecodeStream alone can send text that the full decode then replaces. A run is held back
      until the next other token closes it (or `finish`) and goes in whole;
    - a run of tokens whose text keeps ending in U+FFFD because its bytes are invalid (not an incomplete
      character, which is at most 4 bytes) would make every step decode the whole run: after `_RESYNC_AFTER`
      such tokens it is cut at the last token boundary where decoding both sides apart gives the text decoded
      together (so later tokens cannot change the left side), the left side goes out and decoding restarts;
    - a tokenizer not backed by a `tokenizers.Tokenizer` (anything with `decode(ids)`), or a decoder whose text
      is not prefix-stable (DecodeStream raises InvalidPrefix): the same bounded window is kept here (vLLM's
      `detokenize_incrementally` with prefix/read offsets) and decoded with `tokenizer.decode`. For a decoder
      that is not prefix-stable no streaming matches the full decode exactly; `finish(final)` then still ends
      on the engine's text.

    Without a tokenizer the text is the token ids separated by spaces (as the server shows them).

    `stops`: stop strings. The longest one less a character is held back, so that no beginning of a stop string
    goes out before the output is known not to end there, and nothing from the first stop string on is sent
    (`stopped` then). `prefix`: text sent with the first delta (e.g. the echoed prompt). `finish(final)` sends the
    rest: of `final` (the engine's final text, already cut at the first stop string) when given, else of the
    decoded text (held-back characters and a trailing incomplete sequence included).
    """

    def __init__(
        self,
        tokenizer: Tokenizer | Any | None,
        stops: tuple[str, ...] = (),
        prefix: str = "",
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self.stops = tuple(stops)
        self.hold = max(map(len, self.stops), default=1) - 1
        self.prefix = prefix
        self.stopped = False
        self.finished = False
        self.decoded_tokens = 0
        """Token ids handed to the tokenizer so far, the measure of decoding work: a few per token."""
        self._sent = 0  # characters sent (prefix excluded)
        self._unsent = ""  # decoded, not sent: the held-back tail
        self._count = 0  # tokens so far, without a tokenizer
        self._skip = skip_special_tokens
        self._fast: Any = None
        self._decode_fn: Any = None
        self._special: frozenset[int] = frozenset()
        self._byte_ids: frozenset[int] = frozenset()
        if tokenizer is not None:
            from tokenizers import Tokenizer as FastTokenizer

            fast = getattr(tokenizer, "_tok", tokenizer)  # depthwave's Tokenizer wraps a tokenizers.Tokenizer
            if isinstance(fast, FastTokenizer):
                self._fast = fast
                self._special, self._byte_ids = _token_classes(fast)
                self._decode_fn = lambda ids: fast.decode(ids, skip_special_tokens=skip_special_tokens)
            else:
                self._decode_fn = tokenizer.decode
        # Decoder state: the tokens of the last emitted chunk (the context), those fed since (pending), and an
        # open run of byte-fallback tokens not fed yet.
        self._context: list[int] = []
        self._context_text: str | None = None  # decode(context), computed when the window needs it
        self._pending: list[int] = []
        self._run: list[int] = []
        self._next_resync = _RESYNC_AFTER
        self._stream: Any = self._new_stream() if self._fast is not None else None

    # ---- public -----------------------------------------------------------------------------------------------
    def add(self, tokens: Iterable[int]) -> str:
        """The text that can go out now that these tokens were generated (with the prefix on the first call)."""
        if self.finished:
            return ""
        text = "".join(self._step(int(token)) for token in tokens)
        return self._flush_prefix(self._release(text, final=False))

    def finish(self, final: str | None = None) -> str:
        """Everything not sent yet: the rest of `final` past what was sent, or of the decoded text."""
        if self.finished:
            return ""
        self.finished = True
        if final is not None:
            delta = final[self._sent :] if len(final) > self._sent else ""
            self._sent = max(self._sent, len(final))
            return self._flush_prefix(delta)
        return self._flush_prefix(self._release(self._flush_pending(), final=True))

    # ---- stop strings -----------------------------------------------------------------------------------------
    def _release(self, text: str, final: bool) -> str:
        """What goes out of the held-back tail and the new text. Only the unsent tail can hold a stop string not
        seen yet: what was sent had `hold` more characters after it when it was checked."""
        if self.stopped:
            return ""
        unsent = self._unsent + text
        found = [i for i in (unsent.find(stop) for stop in self.stops) if i >= 0]
        if found:
            out, self._unsent, self.stopped = unsent[: min(found)], "", True
        elif final or not self.hold:
            out, self._unsent = unsent, ""
        else:
            cut = max(len(unsent) - self.hold, 0)
            out, self._unsent = unsent[:cut], unsent[cut:]
        self._sent += len(out)
        return out

    def _flush_prefix(self, delta: str) -> str:
        out, self.prefix = self.prefix + delta, ""
        return out

    # ---- decoding ---------------------------------------------------------------------------------------------
    def _new_stream(self) -> Any:
        from tokenizers.decoders import DecodeStream

        return DecodeStream(skip_special_tokens=self._skip)

    def _decode(self, ids: list[int]) -> str:
        self.decoded_tokens += len(ids)
        return self._decode_fn(ids)

    def _step(self, token: int) -> str:
        """The text this token completes: "" while it only extends an incomplete character."""
        if self._fast is None and self._decode_fn is None:
            self._count += 1
            return str(token) if self._count == 1 else f" {token}"
        if self._skip and token in self._special:
            return ""
        if token in self._byte_ids:
            self._run.append(token)
            return ""
        if self._run:
            tokens, self._run = [*self._run, token], []
            return self._feed(tokens)
        return self._feed([token])

    def _feed(self, tokens: list[int]) -> str:
        self._pending += tokens
        if self._stream is None:
            return self._window_step()
        self.decoded_tokens += len(self._context) + len(self._pending)
        try:
            chunk = self._stream.step(self._fast, tokens[0] if len(tokens) == 1 else tokens)
        except Exception:  # InvalidPrefix: the decoder's text is not prefix-stable; keep the window here
            self._stream = None
            return self._window_step()
        if chunk is None:
            return self._resync() if len(self._pending) >= self._next_resync else ""
        self.decoded_tokens += len(self._pending)  # DecodeStream decodes its new prefix
        self._context, self._pending, self._context_text = self._pending, [], None
        self._next_resync = _RESYNC_AFTER
        return chunk

    def _window_step(self) -> str:
        """DecodeStream's step over `tokenizer.decode`: decode context + pending, and send what follows the
        context's text unless the text ends in an incomplete character."""
        if self._context_text is None:
            self._context_text = self._decode(self._context)
        text = self._decode(self._context + self._pending)
        if len(text) <= len(self._context_text) or text.endswith("\ufffd"):
            return self._resync() if len(self._pending) >= self._next_resync else ""
        chunk = text[len(self._context_text) :]
        self._context, self._pending = self._pending, []
        self._context_text = self._decode(self._context)
        self._next_resync = _RESYNC_AFTER
        return chunk

    def _resync(self) -> str:
        """Send a long pending run that still ends in U+FFFD up to its last token boundary that decoding does not
        see across, and restart decoding there with no context."""
        self._next_resync = len(self._pending) + _RESYNC_AFTER  # at most once per _RESYNC_AFTER tokens
        window = self._context + self._pending
        if self._context_text is None:
            self._context_text = self._decode(self._context)
        whole = self._decode(window)
        for cut in range(len(window) - 1, max(len(self._context), len(window) - _RESYNC_SPAN - 1), -1):
            left, right = self._decode(window[:cut]), self._decode(window[cut:])
            if left + right == whole and left.startswith(self._context_text):
                chunk = left[len(self._context_text) :]
                self._context, self._pending, self._context_text = [], [], ""
                self._next_resync = _RESYNC_AFTER
                if self._stream is not None:
                    self._stream = self._new_stream()
                return chunk + self._feed(window[cut:])
        return ""

    def _flush_pending(self) -> str:
        """The text of the pending tokens (and of an open byte run) as the full decode has it, a trailing U+FFFD
        included."""
        self._pending += self._run
        self._run = []
        if not self._pending:
            return ""
        if self._context_text is None:
            self._context_text = self._decode(self._context)
        text = self._decode(self._context + self._pending)
        chunk = text[len(self._context_text) :]
        self._context, self._pending, self._context_text = self._pending, [], None
        return chunk


def _token_classes(fast: Any) -> tuple[frozenset[int], frozenset[int]]:
    """The tokenizer's special tokens, and its byte-fallback tokens (`<0xNN>`) if its decoder has ByteFallback."""
    special = frozenset(i for i, token in fast.get_added_tokens_decoder().items() if token.special)
    decoder = json.loads(fast.decoder.__getstate__()) if fast.decoder is not None else {}
    parts = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
    if not any(isinstance(part, dict) and part.get("type") == "ByteFallback" for part in parts):
        return special, frozenset()
    ids = (fast.model.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return special, frozenset(i for i in ids if i is not None)
