"""`depthwave.engine.output.TextStream`: streamed text is the full decode (multi-byte characters never split),
stop strings split across tokens never leak, `finish` flushes exactly the rest, and the decoding work per token
does not grow with the output's length."""

from __future__ import annotations

import random
from typing import Any

import pytest
from tokenizers import Tokenizer as FastTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from depthwave import SamplingParams
from depthwave.engine.output import TextStream, cut_at_stop_strings
from depthwave.model.loading import BUILTIN_DIR
from depthwave.model.tokenizer import Tokenizer, load_tokenizer

QUESTIONS = [
    "A shop gets 26 stamps on Wednesday and 68 stamps on Friday. How many stamps does it have?",
    "Zoë has 12 crêpes and eats 5. How many are left?",
    "What is 17 + 25?",
    "hello",
]
MULTI_BYTE = "Zoë, ça coûte 5 € — 中文 🙂👍🏽 naïve café\u0301 ∑ x² ½"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = load_tokenizer(BUILTIN_DIR)
    assert tok is not None
    return tok


@pytest.fixture(scope="module")
def outputs(builtin_llm: Any) -> list[list[int]]:
    """Real outputs of the built-in model: greedy and sampled (hot samples hold stray byte tokens)."""
    llm = builtin_llm
    prompts = [q for q in QUESTIONS for _ in range(3)]
    params = [
        SamplingParams(temperature=(0.0, 1.0, 2.0)[i % 3], max_new_tokens=96, seed=i, ignore_eos=True)
        for i in range(len(prompts))
    ]
    results = llm.generate(prompts, params, sampler="static", chat=True, progress=False)
    return [r.token_ids for r in results]


def stream(tok: Any, ids: list[int], chunk: int = 1, **kwargs: Any) -> tuple[list[str], TextStream]:
    """The deltas of `ids` fed `chunk` tokens at a time, and the stream (not finished)."""
    text = TextStream(tok, **kwargs)
    return [text.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)], text


def random_ids(rng: random.Random, vocab: int, count: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(count)]


# ---- streamed text == full decode ------------------------------------------------------------------------------
def test_streamed_text_is_the_full_decode_of_real_outputs(tokenizer: Tokenizer, outputs: list[list[int]]) -> None:
    assert len(outputs) == 12 and all(len(ids) == 96 for ids in outputs)
    for ids in outputs:
        full = tokenizer.decode(ids)
        for chunk in (1, 3, 7):
            deltas, text = stream(tokenizer, ids, chunk)
            assert "".join(deltas) + text.finish() == full
        # Every prefix of the output streams to its own full decode, less at most a held incomplete character.
        deltas, _ = stream(tokenizer, ids)
        sent = ""
        for n, delta in enumerate(deltas, 1):
            sent += delta
            assert tokenizer.decode(ids[:n]).startswith(sent)
            assert len(tokenizer.decode(ids[:n])) - len(sent) <= 1


def test_multi_byte_characters_split_across_tokens_are_never_split(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MULTI_BYTE)
    # Byte-level BPE: these characters take several tokens each (none of their pieces decodes alone).
    assert len(ids) > len(MULTI_BYTE)
    assert "\ufffd" in tokenizer.decode(tokenizer.encode("🙂")[:1])
    deltas, text = stream(tokenizer, ids)
    assert "".join(deltas) == MULTI_BYTE == tokenizer.decode(ids) and text.finish() == ""
    assert not any("\ufffd" in d for d in deltas)
    assert deltas.count("") >= 10  # the tokens that only began a character
    # Special tokens between the pieces of a character are skipped, as decoding does.
    end_turn = tokenizer.token_to_id("<|end_turn|>")
    assert end_turn is not None
    mixed = [t for i in ids for t in (i, end_turn)]
    deltas, text = stream(tokenizer, mixed)
    assert "".join(deltas) + text.finish() == MULTI_BYTE == tokenizer.decode(mixed)


def test_random_token_sequences_stream_to_their_full_decode(tokenizer: Tokenizer) -> None:
    """Arbitrary ids, byte tokens that form no character included: a trailing incomplete sequence is held back
    and `finish` gives it out as the full decode does (U+FFFD)."""
    rng = random.Random(0)
    for _ in range(300):
        ids = random_ids(rng, tokenizer.vocab_size, rng.randint(1, 50))
        deltas, text = stream(tokenizer, ids, rng.randint(1, 4))
        assert "".join(deltas) + text.finish() == tokenizer.decode(ids)
    for end in ("é", "🙂"):
        pieces = tokenizer.encode(end)
        deltas, text = stream(tokenizer, tokenizer.encode("ab") + pieces[:-1])
        assert "".join(deltas) == "ab" and text.finish() == "\ufffd" == tokenizer.decode(pieces[:-1])


def test_a_long_run_of_invalid_bytes_streams_in_linear_work(tokenizer: Tokenizer) -> None:
    """Lone continuation bytes keep the text ending in U+FFFD: the stream cuts the run where decoding allows."""
    lone = [i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == "\ufffd"]
    rng = random.Random(1)
    ids = [rng.choice(lone) for _ in range(2000)] + tokenizer.encode("é ok")
    deltas, text = stream(tokenizer, ids)
    assert "".join(deltas) + text.finish() == tokenizer.decode(ids)
    assert text.decoded_tokens < 15 * len(ids)


def byte_fallback_tokenizer() -> FastTokenizer:
    """Llama-2 style: sentencepiece BPE whose unknown characters fall back to <0xNN> byte tokens, decoded by
    Replace/ByteFallback/Fuse/Strip."""
    pieces = ["<unk>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *"▁abcdefghijklmnopqrstuvwxyz"]
    pieces += ["▁t", "he", "▁the"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he")]
    tok = FastTokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["</s>"])
    return tok


def metaspace_tokenizer() -> FastTokenizer:
    tok = FastTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        [MULTI_BYTE + " the quick brown fox"] * 20, trainers.BpeTrainer(vocab_size=120, show_progress=False)
    )
    return tok


@pytest.mark.parametrize("make", [byte_fallback_tokenizer, metaspace_tokenizer])
def test_other_decoders_stream_to_their_full_decode(make: Any) -> None:
    tok = make()
    rng = random.Random(2)
    for _ in range(200):
        ids = random_ids(rng, tok.get_vocab_size(), rng.randint(1, 40))
        deltas, text = stream(tok, ids)
        assert "".join(deltas) + text.finish() == tok.decode(ids, skip_special_tokens=True)
    if make is byte_fallback_tokenizer:  # 🙂 as four byte tokens
        ids = tok.encode("the cat 🙂 ça").ids
        assert [tok.id_to_token(i) for i in ids[6:10]] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
        deltas, text = stream(tok, ids)
        assert "".join(deltas) + text.finish() == "the cat 🙂 ça" == tok.decode(ids)
        # A byte run goes out whole once the next token closes it (a later invalid byte would make it all U+FFFD).
        assert deltas[6:11] == ["", "", "", "", "🙂 "] and not any("\ufffd" in d for d in deltas)
        a = tok.token_to_id("a")
        for tail, full in (([0x82], "\ufffd" * 5 + "a"), ([], "🙂a")):  # F0 9F 99 82 82: invalid as a whole
            ids = [tok.token_to_id(f"<0x{b:02X}>") for b in [0xF0, 0x9F, 0x99, 0x82, *tail]] + [a]
            deltas, text = stream(tok, ids)
            assert "".join(deltas) + text.finish() == full == tok.decode(ids) and deltas[-1] == full


class PlainTokenizer:
    """A tokenizer known only by its `decode` (no `tokenizers.Tokenizer` inside): the windowed fallback."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.decoded = 0

    def decode(self, ids: list[int]) -> str:
        self.decoded += len(ids)
        return self.inner.decode(ids)


def test_the_windowed_fallback_streams_the_full_decode(tokenizer: Tokenizer, outputs: list[list[int]]) -> None:
    rng = random.Random(3)
    cases = [*outputs, tokenizer.encode(MULTI_BYTE), *(random_ids(rng, tokenizer.vocab_size, 40) for _ in range(100))]
    for ids in cases:
        deltas, text = stream(PlainTokenizer(tokenizer), ids)
        assert "".join(deltas) + text.finish() == tokenizer.decode(ids)


def test_a_decode_stream_error_falls_back_to_the_window(tokenizer: Tokenizer) -> None:
    """DecodeStream raises for a decoder whose text is not prefix-stable; the stream carries on without it."""

    class Failing:
        def step(self, *args: Any) -> str:
            raise Exception("Invalid prefix encountered")

    ids = tokenizer.encode(MULTI_BYTE)
    text = TextStream(tokenizer)
    head = text.add(ids[:5])
    text._stream = Failing()
    assert head + text.add(ids[5:]) + text.finish() == MULTI_BYTE


def test_without_a_tokenizer_the_text_is_the_ids() -> None:
    deltas, text = stream(None, [5, 17, 3], prefix="> ")
    assert deltas == ["> 5", " 17", " 3"] and text.finish() == ""


# ---- stop strings and finish -----------------------------------------------------------------------------------
def check_stops(tokenizer: Tokenizer, ids: list[int], stops: tuple[str, ...], prefix: str = "") -> None:
    full = tokenizer.decode(ids)
    cut = cut_at_stop_strings(full, stops)
    for final in (cut, None):
        text = TextStream(tokenizer, stops, prefix)
        sent = ""
        for n in range(len(ids)):
            sent += text.add(ids[n : n + 1])
            assert sent.startswith(prefix)
            body = sent[len(prefix) :]
            assert cut.startswith(body)  # nothing from the first stop string on
            assert not any(stop in body for stop in stops)
            # nothing that may begin a stop string goes out before the text is known not to end there
            decoded = tokenizer.decode(ids[: n + 1])
            if cut_at_stop_strings(decoded, stops) == decoded:
                hold = max(map(len, stops), default=1) - 1
                assert len(body) <= max(len(decoded) - hold, 0)
        rest = text.finish(final)
        assert sent + rest == prefix + cut  # finish flushes exactly the rest
        assert text.finish(final) == "" and text.add(ids[:1]) == ""


def test_stop_strings_split_across_tokens_never_leak(tokenizer: Tokenizer, outputs: list[list[int]]) -> None:
    checked = 0
    for ids in outputs:
        full = tokenizer.decode(ids)
        for stop in (" = ", "answer is", "\n", "s.\nThe", full[40:52]):
            if stop:
                check_stops(tokenizer, ids, (stop,))
                checked += stop in full
        check_stops(tokenizer, ids, ("zzz", " = ", "\n\n"), prefix="echo: ")
        check_stops(tokenizer, ids, ("never there",))
    assert checked >= 40


def test_multi_byte_stop_strings(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MULTI_BYTE)
    for stops in (("€",), ("🙂👍",), ("ça c", "中"), ("é\u0301",), ("½",), ("x",)):
        check_stops(tokenizer, ids, stops)
    text = TextStream(tokenizer, ("🙂",))
    sent = "".join(text.add([t]) for t in ids)
    assert sent == MULTI_BYTE[: MULTI_BYTE.index("🙂")] and text.stopped


def test_finish_flushes_the_held_back_text(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("The answer is 42")
    text = TextStream(tokenizer, ("answer was",), prefix=">")
    sent = "".join(text.add([t]) for t in ids)
    assert sent == ">The ans"  # "answer was" is 10 characters: the last 9 are held back
    assert text.finish() == "wer is 42"
    # With the engine's final text, the rest of it; the prefix goes out even with nothing else.
    text = TextStream(tokenizer, ("answer was",), prefix=">")
    assert text.finish("The answer is 42") == ">The answer is 42"
    text = TextStream(tokenizer, (), prefix=">")
    assert text.add([]) == ">" and text.add(tokenizer.encode("é")[:1]) == ""


# ---- linear work ----------------------------------------------------------------------------------------------
def long_output(tokenizer: Tokenizer, count: int) -> list[int]:
    from depthwave.data.arithmetic import iter_train

    ids: list[int] = []
    for problem in iter_train(0):
        ids += tokenizer.encode(f"{problem.question}\n\n{problem.solution} {MULTI_BYTE}\n")
        if len(ids) >= count:
            return ids[:count]
    raise AssertionError("unreachable")


def test_decoding_work_per_token_does_not_grow_with_length(tokenizer: Tokenizer) -> None:
    """Tokens handed to the tokenizer for 4,000 streamed tokens: a bounded number per token (re-decoding the
    whole output would be about 2,000 per token)."""
    ids = long_output(tokenizer, 4000)
    deltas, text = stream(tokenizer, ids, stops=(" = ", "answer is"))
    assert "".join(deltas) + text.finish() == cut_at_stop_strings(tokenizer.decode(ids), (" = ", "answer is"))
    deltas, text = stream(tokenizer, ids)
    assert "".join(deltas) + text.finish() == tokenizer.decode(ids)
    assert text.decoded_tokens < 10 * len(ids)
    # The first and the last 1,000 tokens cost alike.
    head = TextStream(tokenizer)
    head.add(ids[:1000])
    work_head = head.decoded_tokens
    head.add(ids[1000:3000])
    before = head.decoded_tokens
    head.add(ids[3000:])
    assert head.decoded_tokens - before < 2 * work_head
    # The windowed fallback, counted at the tokenizer's own decode.
    plain = PlainTokenizer(tokenizer)
    deltas, text = stream(plain, ids)
    assert "".join(deltas) + text.finish() == tokenizer.decode(ids)
    assert plain.decoded < 10 * len(ids)
