"""The one Zephyr chat template of the project, used at training, generation and evaluation.

Format (HuggingFaceH4/zephyr-7b-beta's template, with the tokenizer's own ``eos_token``)::

    <|system|>\n{system}{eos}\n<|user|>\n{user}{eos}\n<|assistant|>\n{assistant}{eos}\n

The assistant content and its ``eos`` are wrapped in ``{% generation %}`` markers so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` (used by TRL's ``assistant_only_loss``)
marks exactly those tokens as trained. With ``add_generation_prompt=True`` the rendered prompt ends in
``<|assistant|>\n``, which is byte-identical to the prefix of the training text before the assistant content.
"""
from __future__ import annotations

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TEMPLATES = {"zephyr": ZEPHYR_TEMPLATE}
ROLES = ("system", "user", "assistant")


def get_template(name: str) -> str:
    """Return the Jinja template called ``name``; raises ``ValueError`` for an unknown name."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat_template '{name}'; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def apply_template(tokenizer, name: str = "zephyr"):
    """Set ``tokenizer.chat_template`` to the named template and make sure a pad token exists.

    The pad token falls back to ``eos_token`` (padding is masked everywhere, so this is safe); the tokenizer's
    ``eos_token`` must be set (raises ``ValueError`` otherwise). Returns the tokenizer.
    """
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no eos_token; the Zephyr template needs one")
    tokenizer.chat_template = get_template(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """Render ``messages`` (ending with a user turn) as the generation prompt, ending in ``<|assistant|>\\n``."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_conversation(tokenizer, messages: list[dict]) -> str:
    """Render a full conversation (training text)."""
    return tokenizer.apply_chat_template(messages, tokenize=False)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the generation prompt, tokenized exactly as at training (no extra special tokens)."""
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
