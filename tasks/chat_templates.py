"""Chat templates: the named ones we define, the tokenizer's template for training, and the
check that a saved tokenizer still renders what training saw.

Every template here has ``{% generation %}`` markers around the assistant's replies, so trl's
assistant_only_loss can mask everything else.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from data_contracts.config import TrainConfig

log = logging.getLogger(__name__)

# The builtin tiny model's own template too (tasks/base_model.py).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
ALPACA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' }}"
    "{% generation %}{{ message['content'] + (eos_token or '') }}{% endgeneration %}{{ '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama-3": LLAMA3_TEMPLATE, "alpaca": ALPACA_TEMPLATE}
# Marker strings each named template expects to be single tokens, and its end-of-turn token.
TEMPLATE_TOKENS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama-3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "alpaca": [],
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama-3": "<|eot_id|>"}


def prepare_tokenizer(base: str, cfg: TrainConfig) -> tuple[Any, str]:
    """Load the tokenizer and fix its chat template: its own, or a named one we define."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=cfg.trust_remote_code)
    name = cfg.chat_template
    if name == "auto" and tokenizer.chat_template:
        source = "tokenizer"
    else:
        if name == "auto":
            log.warning("%s has no chat template; using chatml", base)
            name = "chatml"
        vocab = tokenizer.get_vocab()
        missing = [t for t in TEMPLATE_TOKENS[name] if t not in vocab]
        if missing:
            log.warning("chat template %s: %s are not tokens of this vocabulary and will be split "
                        "into pieces", name, missing)
        tokenizer.chat_template = NAMED_TEMPLATES[name]
        source = name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, source


def training_template(tokenizer: Any) -> tuple[str | None, str | None]:
    """The template trl will tokenize with for assistant-only loss, or why it cannot mask.

    Returns (template or None when the tokenizer's own one has generation markers, problem).
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return None, None
    try:
        return get_training_chat_template(tokenizer), None
    except ValueError as err:
        return None, f"chat template has no {{% generation %}} markers and trl cannot patch it: {err}"


def encode(tokenizer: Any, row: dict[str, Any], template: str | None = None) -> list[int]:
    """A row's token ids as trl renders them (chat template, or text with EOS appended)."""
    if "messages" in row:
        return list(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                                  chat_template=template)["input_ids"])
    text, eos = row["text"], tokenizer.eos_token or ""
    return list(tokenizer(text if text.endswith(eos) else text + eos)["input_ids"])


def check_round_trip(merged_dir: Path, row: dict[str, Any], expected: list[int],
                     cfg: TrainConfig) -> None:
    """The saved tokenizer must render a training sample to the very ids we trained on."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(merged_dir),
                                             trust_remote_code=cfg.trust_remote_code)
    got = encode(reloaded, row)
    if len(expected) >= cfg.max_length:  # trl truncated the sample to max_length
        got = got[:len(expected)]
    if got != expected:
        at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b),
                  min(len(got), len(expected)))
        raise RuntimeError(
            f"chat template round trip failed: the tokenizer saved in {merged_dir} encodes a "
            f"training sample differently from the training tokenizer (first difference at "
            f"token {at}: {got[at:at + 5]} vs {expected[at:at + 5]}); the exported model would "
            "be prompted in a format it was not trained on")
