"""A small byte-level BPE tokenizer for the built-in model, saved in the files Huginn-0125 ships.

Every digit is its own token (a pre-tokenizer isolates digits before BPE can merge them): multi-digit arithmetic
is then learned digit by digit, and numbers never fall apart into arbitrary chunks. Words merge as usual.

The special tokens, the chat template and the stop tokens follow Huginn-0125, so the built-in model is loaded and
prompted through the same code path as the released model: `tokenizer.json`, `tokenizer_config.json` (chat
template, BOS/EOS/pad) and `generation_config.json` (a list of stop ids).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from depthwave.data.arithmetic import Distribution, iter_train

BEGIN_TEXT = "<|begin_text|>"
END_TEXT = "<|end_text|>"
BEGIN_HEADER = "<|begin_header|>"
END_HEADER = "<|end_header|>"
END_TURN = "<|end_turn|>"
PAD = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (BEGIN_TEXT, END_TEXT, BEGIN_HEADER, END_HEADER, END_TURN, PAD)
ASSISTANT_ROLE = "Huginn"

# Huginn's format: BOS before the first message; each message is a header with the role, two newlines, the
# trimmed content and <|end_turn|>; "assistant" is rendered as "Huginn". Special tokens are written as literals
# so that the template does not depend on which variables a renderer passes.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ '" + BEGIN_TEXT + "' }}{% endif %}"
    "{{ '" + BEGIN_HEADER + "' }}"
    "{% if message['role'] in ['assistant', '" + ASSISTANT_ROLE + "'] %}{{ '" + ASSISTANT_ROLE + "' }}"
    "{% else %}{{ message['role'] }}{% endif %}"
    "{{ '" + END_HEADER + "\\n\\n' + (message['content'] | trim) + '" + END_TURN + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + BEGIN_HEADER + ASSISTANT_ROLE + END_HEADER + "\\n\\n' }}"
    "{% else %}{{ '" + END_TEXT + "' }}{% endif %}"
)

# Words of the chat format that are not in the problems, so that BPE gives them tokens too.
_FORMAT_WORDS = "user Huginn system assistant"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
    """Byte-level BPE with isolated digits and the Huginn special tokens at ids 0-5.

    `vocab_size` is an upper bound: on a small corpus BPE runs out of pairs to merge earlier."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Special tokens are kept out of the corpus: the trainer does not split them off, and would learn merges
    # for their pieces.
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def train_arithmetic_tokenizer(
    vocab_size: int = 1024, seed: int = 0, num_problems: int = 4096, distribution: Distribution = "classic"
) -> Tokenizer:
    """A tokenizer for the arithmetic problems, trained on train-split problems only. The built-in model's is
    the classic one; the byte-level alphabet splits any word it never merged (an unseen name) into byte pieces."""
    problems = islice(iter_train(seed, distribution), num_problems)
    texts = [_FORMAT_WORDS, *(f"{p.question}\n\n{p.solution}" for p in problems)]
    return train_tokenizer(texts, vocab_size)


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"the tokenizer lacks the special tokens {missing}")
    return ids  # type: ignore[return-value]


def stop_token_ids(tokenizer: Tokenizer) -> list[int]:
    """What ends generation, as in Huginn's generation config: end of text and end of turn."""
    ids = special_token_ids(tokenizer)
    return [ids[END_TEXT], ids[END_TURN]]


@lru_cache(maxsize=1)
def _compiled_template() -> Template:
    # The settings transformers renders chat templates with.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE)


def render_chat(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """Render messages ({"role", "content"}) with the chat template."""
    return _compiled_template().render(messages=list(messages), add_generation_prompt=add_generation_prompt)


def question_prompt(question: str) -> str:
    """A single user turn followed by the assistant header: what the model answers."""
    return render_chat([{"role": "user", "content": question}], add_generation_prompt=True)


def save_tokenizer_files(tokenizer: Tokenizer, folder: str | Path, model_max_length: int) -> Path:
    """Write `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` into a model folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = special_token_ids(tokenizer)
    added: dict[str, dict[str, Any]] = {
        str(i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, i in sorted(ids.items(), key=lambda item: item[1])
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BEGIN_TEXT,
        "eos_token": END_TEXT,
        "pad_token": PAD,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": ids[BEGIN_TEXT],
        "eos_token_id": stop_token_ids(tokenizer),
        "pad_token_id": ids[PAD],
        "do_sample": False,
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return folder
