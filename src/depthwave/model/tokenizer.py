"""The tokenizer of a model folder: `tokenizer.json` (the `tokenizers` library), the chat template from
`tokenizer_config.json`, and the stop tokens from `generation_config.json`, `config.json` and the special tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from depthwave.errors import CheckpointError
from depthwave.model.config import HuginnConfig

# Tokens the Huginn reference always treats as stops (begin_text, end_text, end_turn), named so that any
# tokenizer that defines them gets the same behaviour.
HUGINN_STOP_TOKENS = ("<|begin_text|>", "<|end_text|>", "<|end_turn|>")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens either as strings or as AddedToken objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any, where: Path) -> list[int]:
    """eos_token_id: absent (None), an id or a list of ids; anything else is a damaged file, not a silent default."""
    values = [value] if isinstance(value, int) else value
    if value is None:
        return []
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise CheckpointError(f"{where}: eos_token_id must be a token id or a list of token ids, got {value!r}")
    return values


class Tokenizer:
    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer as FastTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        try:
            self._tok = FastTokenizer.from_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None
        self.config_path = folder / "tokenizer_config.json"
        self.config = _read_json(self.config_path)
        self.chat_template: str | None = self.config.get("chat_template")
        self._template = self._compile_template()
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        # transformers' Llama tokenizers prepend BOS by this flag as well as (or instead of) a post-processor.
        bos_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self._prepend_bos = bos_id if self.config.get("add_bos_token") is True else None
        self._special = {i for i, token in self._tok.get_added_tokens_decoder().items() if token.special}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos is not None and ids[:1] != [self._prepend_bos]:
            ids.insert(0, self._prepend_bos)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise CheckpointError(f"this tokenizer has no chat_template in {self.config_path}")
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:
            raise CheckpointError(f"the chat_template of {self.config_path} failed: {exc}") from None

    def _compile_template(self) -> Any:
        """The chat template compiled once, as transformers renders it; a syntax error names the file."""
        if not self.chat_template:
            return None
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise CheckpointError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template)
        except TemplateSyntaxError as exc:
            raise CheckpointError(
                f"the chat_template in {self.config_path} is not valid Jinja (template line {exc.lineno}: "
                f"{exc.message})"
            ) from None


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The folder's tokenizer, or None when it ships none (e.g. test checkpoints that work on raw token ids)."""
    folder = Path(folder)
    return Tokenizer(folder) if (folder / "tokenizer.json").is_file() else None


def default_stop_ids(folder: str | Path, config: HuginnConfig, tokenizer: Tokenizer | None) -> list[int]:
    """Stop tokens: generation_config.json's eos_token_id (int or list), else config.json's, plus the tokenizer's
    eos token and the Huginn end/begin-of-text and end-of-turn tokens where the tokenizer defines them.

    The retrofitted models' configs (and the generation configs written from them) carry Huginn's special ids,
    which are ordinary words in the Llama-3 vocabulary: for that family an id from those files counts only when
    the tokenizer marks it special, and the tokenizer's own eos token is the stop."""
    folder = Path(folder)
    generation = _read_json(folder / "generation_config.json")
    stops = _ids(generation.get("eos_token_id"), folder / "generation_config.json") or config.eos_ids
    if tokenizer is not None and config.family != "huginn":
        stops = [token for token in stops if tokenizer.is_special(token)]
    if tokenizer is not None:
        for name in (tokenizer.eos_token, *HUGINN_STOP_TOKENS):
            token_id = tokenizer.token_to_id(name) if name else None
            if token_id is not None:
                stops.append(token_id)
    return sorted(set(stops))
