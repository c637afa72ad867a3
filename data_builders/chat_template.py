"""The one Zephyr chat template of the project, used at training, generation and evaluation.

Format (HuggingFaceH4/zephyr-7b-beta's template, with the tokenizer's own ``eos_token``)::

    [bos]<|system|>\n{system}{eos}\n<|user|>\n{user}{eos}\n[<|input|>\n{data}{eos}\n]<|assistant|>\n{assistant}{eos}\n

``bos`` is written only for tokenizers whose own template or configuration starts sequences with one
(:func:`uses_bos`: Llama/TinyLlama/Gemma-style SentencePiece tokenizers; not SmolLM2). The ``input`` role carries the
untrusted data part of a prompt in its own turn when ``model.data_role`` is on (Meta SecAlign's "input" role,
Chen et al. 2025); :func:`data_builders.triplets.triplet_messages` builds such conversations.

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
    "{% elif message['role'] == 'input' %}"
    "{{ '<|input|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ZEPHYR_BOS_TEMPLATE = "{{ bos_token }}" + ZEPHYR_TEMPLATE
TEMPLATES = {"zephyr": ZEPHYR_TEMPLATE}
ROLES = ("system", "user", "assistant")  # roles of SFT data; "input" is built only by the triplet/eval code


def get_template(name: str) -> str:
    """Return the Jinja template called ``name``; raises ``ValueError`` for an unknown name."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat_template '{name}'; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def uses_bos(tokenizer) -> bool:
    """Whether sequences of this tokenizer start with its BOS token: its own chat template writes ``bos_token``, or
    plain tokenization adds it (``add_bos_token``, e.g. Llama's SentencePiece tokenizers). False without a BOS token.

    The project's template replaces the tokenizer's own, so it carries the BOS over explicitly; every prompt is then
    tokenized with ``add_special_tokens=False`` (the BOS is in the text), at training, generation and evaluation.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or tokenizer.bos_token_id is None:
        return False
    own = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    if own and own not in (ZEPHYR_TEMPLATE, ZEPHYR_BOS_TEMPLATE) and "bos_token" in own:
        return True
    if own == ZEPHYR_BOS_TEMPLATE:  # already applied (a merged model's saved tokenizer)
        return True
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode plain text adds no BOS we could see
        return False
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def apply_template(tokenizer, name: str = "zephyr"):
    """Set ``tokenizer.chat_template`` to the named template and make sure a pad token exists.

    The template starts with ``bos_token`` when :func:`uses_bos` says the tokenizer's sequences do. The pad token
    falls back to ``eos_token`` (padding is masked everywhere, so this is safe); the tokenizer's ``eos_token`` must
    be set (raises ``ValueError`` otherwise). Returns the tokenizer.
    """
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no eos_token; the Zephyr template needs one")
    template = get_template(name)
    if name == "zephyr" and uses_bos(tokenizer):
        template = ZEPHYR_BOS_TEMPLATE
    tokenizer.chat_template = template
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


def prompt_response_ids(tokenizer, messages: list[dict], response: str) -> tuple[list[int], int]:
    """Token ids of ``messages`` + the assistant ``response`` (+ eos), tokenized *jointly*, and the prompt length.

    The text is the generation prompt followed by ``response`` and the eos token, i.e. exactly what the model reads
    and writes at generation time. Tokenizing the response on its own would give SentencePiece tokenizers a
    different first token ("▁The" alone, "The" after "\\n"), so the whole text is tokenized once and split at the
    token where the response's first character starts (offsets of a fast tokenizer).

    Returns:
        ``(ids, n_prompt)``: ``ids[:n_prompt]`` are the prompt tokens, ``ids[n_prompt:]`` the response tokens
        ending in eos.
    Raises:
        ValueError: a token straddles the prompt/response boundary (the split would be ambiguous), or the prompt
        tokens of the joint text differ from :func:`prompt_ids` (generation would then see another prompt).
    """
    prompt = render_prompt(tokenizer, messages)
    text = prompt + response + tokenizer.eos_token
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    cut = len(prompt)
    n_prompt = next((i for i, (a, b) in enumerate(offsets) if b > cut or (a >= cut and b > a)), len(ids))
    if n_prompt < len(ids) and offsets[n_prompt][0] < cut:
        raise ValueError(f"a token spans the prompt/response boundary ({text[offsets[n_prompt][0]:offsets[n_prompt][1]]!r})")
    if ids[:n_prompt] != prompt_ids(tokenizer, messages):
        raise ValueError("the prompt tokens of the joint text differ from the prompt tokenized alone")
    return ids, n_prompt
