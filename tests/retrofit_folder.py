"""A retrofitted-recurrence model folder as a user downloads it: the fixture's weights and config, with the Huginn
special ids these configs carry, plus a Llama-3-style tokenizer (a BPE with `<|begin_of_text|>` prepended by its
post-processor, `<|end_of_text|>` as eos and the Llama-3 chat format), small enough for the fixture's vocabulary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADERS = ("<|start_header_id|>", "<|end_header_id|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) "
    "+ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CORPUS = [
    "Leo has 45 marbles. He buys 3 boxes with 12 marbles in each. How many marbles does Leo have now?",
    "The quick brown fox jumps over the lazy dog, and the answer is 42.",
    "user assistant system What is 17 * 24? Compute 345 - 78.",
] * 20


def make_retrofit_folder(fixture: Path, out: Path, vocab_size: int, bos_by_flag: bool = False) -> Path:
    """`bos_by_flag`: BOS comes from tokenizer_config.json's `add_bos_token` instead of a post-processor."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(fixture / "model.safetensors", out / "model.safetensors")
    config = json.loads((fixture / "config.json").read_text())
    # What the released retrofits carry (Huginn's ids, ordinary tokens of the Llama-3 vocabulary), and the
    # generation config transformers writes from them.
    config.update(bos_token_id=65504, eos_token_id=65505, pad_token_id=65509)
    (out / "config.json").write_text(json.dumps(config))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 65504, "eos_token_id": 65505}))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, EOT, *HEADERS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_special_tokens(specials)
    bos = tokenizer.token_to_id(BOS)
    if not bos_by_flag:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
        )
    tokenizer.save(str(out / "tokenizer.json"))
    settings = {"bos_token": BOS, "eos_token": EOS, "chat_template": CHAT_TEMPLATE, "model_max_length": 256}
    if bos_by_flag:
        settings["add_bos_token"] = True
    (out / "tokenizer_config.json").write_text(json.dumps(settings))
    assert tokenizer.get_vocab_size() <= vocab_size
    return out
