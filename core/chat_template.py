"""The chat template of a run, the same at training, generation and evaluation (``model.chat_template``).

``zephyr`` (the default) is the project's own template, below. ``tokenizer`` keeps the model's own template, and a
path to a ``.jinja`` file reads the template from it; both are checked by :func:`check_template` (``{% generation
%}`` markers, generation prompt + response + eos = training text, end-of-turn token trained, the roles the run
uses). A model template without markers is replaced by TRL's training version of it where TRL has one
(``trl.chat_template_utils.get_training_chat_template``: the same text, with markers), otherwise refused with the fix.

The Zephyr template:

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

import logging
import multiprocessing as mp
import resource
from pathlib import Path
from typing import Any, Callable

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
CHOICES = ("zephyr", "tokenizer")  # or the path of a .jinja file
ROLES = ("system", "user", "assistant")  # roles of SFT data; "input" is built only by the triplet/eval code
PROBE_USER, PROBE_REPLY = "Probe question?", "Probe answer."


def get_template(name: str) -> str:
    """Return the Jinja template called ``name`` (``zephyr``) or read from the Jinja file ``name``; raises
    ``ValueError`` for a name that is neither."""
    if name in TEMPLATES:
        return TEMPLATES[name]

    p = Path(name).expanduser()
    if name != "tokenizer" and p.is_file():
        text = p.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"chat template file {p} is empty")
        return text
    raise ValueError(f"unknown chat_template '{name}': expected one of {list(CHOICES)} or the path of a Jinja file")


FIX = ("set model.chat_template: zephyr (the project's template, markers included), or copy the template into a "
       ".jinja file, wrap each assistant message's content and its end-of-turn token in {% generation %}…"
       "{% endgeneration %} and set model.chat_template to that file")


TEMPLATE_CHECK_SECONDS = 20.0  # the probes render in milliseconds; a template past this is refused
TEMPLATE_CHECK_EXTRA_BYTES = 1 << 30  # memory the rendering may add (an output or loop bomb stops there)


def run_bounded(fn: Callable[[], Any], *, seconds: float, extra_bytes: int, what: str) -> Any:
    """Run ``fn()`` in a forked child process under a wall-clock budget (``seconds``) and a memory budget
    (``extra_bytes`` of address space above the parent's, ``RLIMIT_AS``); return its result (picklable).

    A ``ValueError`` raised by ``fn`` is raised again here with its message; running past the time budget, being
    killed or failing for memory raises ``ValueError`` naming ``what``. Used for code that user input controls and
    that cannot be interrupted in-process (a Jinja template's nested loops). Without ``fork`` (not Linux/macOS),
    ``fn`` runs in-process, unbounded."""
    try:
        ctx = mp.get_context("fork")
    except ValueError:
        return fn()
    parent, child = ctx.Pipe(duplex=False)

    def target():
        try:
            with open("/proc/self/statm") as f:
                vsize = int(f.read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (vsize + extra_bytes, vsize + extra_bytes))
        except (OSError, ValueError):
            pass  # no /proc (macOS): the time budget still holds
        try:
            child.send(("ok", fn()))
        except ValueError as e:
            child.send(("value_error", str(e)))
        except MemoryError:
            child.send(("error", f"{what} needs more than {extra_bytes >> 20} MiB"))
        except BaseException as e:  # noqa: BLE001 - reported to the parent as one line
            child.send(("error", f"{what} failed ({type(e).__name__}: {str(e)[:200]})"))

    proc = ctx.Process(target=target, daemon=True)
    proc.start()
    child.close()
    ready = parent.poll(seconds)
    if not ready:
        proc.kill()
        proc.join()
        raise ValueError(f"{what} did not finish within {seconds:g} s (a template's loops or output out of bounds)")
    try:
        kind, value = parent.recv()
    except EOFError:
        proc.join()
        raise ValueError(f"{what} was killed (exit {proc.exitcode}); it ran out of its "
                         f"{extra_bytes >> 20} MiB memory budget or crashed") from None
    proc.join()
    if kind == "ok":
        return value
    raise ValueError(value)


def check_template(tokenizer, source: str, *, data_role: bool = False, needs_bos: bool = False) -> None:
    """:func:`check_template_unbounded` in a child process under a time and memory budget
    (:func:`run_bounded`: :data:`TEMPLATE_CHECK_SECONDS`, :data:`TEMPLATE_CHECK_EXTRA_BYTES`), so that a template
    with nested ``range(100000)`` loops or a huge output is refused in seconds instead of hanging validation.
    Raises ``ValueError``."""
    run_bounded(lambda: check_template_unbounded(tokenizer, source, data_role=data_role, needs_bos=needs_bos),
                seconds=TEMPLATE_CHECK_SECONDS, extra_bytes=TEMPLATE_CHECK_EXTRA_BYTES,
                what=f"rendering the chat template {source}")


def check_template_unbounded(tokenizer, source: str, *, data_role: bool = False, needs_bos: bool = False) -> None:
    """Check the template set on ``tokenizer`` (named ``source`` in errors) for what training and generation assume.

    1. ``{% generation %}`` markers (``trl.chat_template_utils.has_generation_markers``): the assistant-only loss of
       SFT (TRL's ``assistant_only_loss``) masks with them.
    2. The generation prompt of ``[user]`` followed by the reply and ``eos_token`` is a prefix of the rendered
       ``[user, assistant]`` conversation: what the model reads and writes at generation (stopping at eos) is what
       it was trained on (:func:`prompt_response_ids` builds DPO and causal-stage sequences this way).
    3. The assistant's end-of-turn token is inside the loss mask
       (``trl.chat_template_utils.is_chat_template_stop_token_trained``), so the model learns to stop.
    4. A system turn renders (seed tasks and DPO critiques use one), and the ``input`` role when ``data_role``.
    5. With ``needs_bos`` (the tokenizer's sequences start with BOS, :func:`uses_bos`), the prompt starts with
       ``bos_token``: every prompt is tokenized with ``add_special_tokens=False``, so only the template can write it.

    Raises ``ValueError`` naming ``source``, what failed and the fix (:data:`FIX`).
    """
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    eos = tokenizer.eos_token
    if not has_generation_markers(tokenizer.chat_template):
        raise ValueError(f"chat template {source}: no {{% generation %}} markers, which the assistant-only loss "
                         f"needs; {FIX}")
    user = [{"role": "user", "content": PROBE_USER}]
    try:
        prompt = render_prompt(tokenizer, user)
        conv = render_conversation(tokenizer, user + [{"role": "assistant", "content": PROBE_REPLY}])
    except Exception as e:  # noqa: BLE001 - jinja raises TemplateError and others
        raise ValueError(f"chat template {source}: cannot render a user/assistant exchange ({e})") from None
    if not conv.startswith(prompt + PROBE_REPLY + eos):
        raise ValueError(f"chat template {source}: the generation prompt followed by the reply and eos_token "
                         f"({eos!r}) is not how the template writes the assistant turn (prompt {prompt[-40:]!r}, "
                         f"conversation {conv[len(prompt) - 40:][:120]!r}); generation would stop or start "
                         "elsewhere than training. The assistant turn must end with the tokenizer's eos_token "
                         "right after the content")
    if needs_bos and not prompt.startswith(tokenizer.bos_token):
        raise ValueError(f"chat template {source}: this tokenizer's sequences start with {tokenizer.bos_token!r}, but "
                         "the template does not write it and prompts are tokenized without special tokens; start "
                         "the template with {{ bos_token }}")
    if not is_chat_template_stop_token_trained(tokenizer):
        raise ValueError(f"chat template {source}: the assistant's end-of-turn token is outside the "
                         f"{{% generation %}} markers, so the model would never learn to stop; {FIX}")
    roles = [("system", [{"role": "system", "content": "Probe system."}] + user)]
    if data_role:
        roles.append(("input", user + [{"role": "input", "content": "Probe data."}]))
    for role, msgs in roles:
        try:
            text = render_prompt(tokenizer, msgs)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"chat template {source}: a {role!r} turn does not render ({e}); "
                             + ("set model.data_role: false or " if role == "input" else "")
                             + "use a template with that role (zephyr has system and input)") from None
        if msgs[-1 if role == "input" else 0]["content"] not in text:
            raise ValueError(f"chat template {source}: a {role!r} turn's content is dropped by the template"
                             + ("; set model.data_role: false or use zephyr" if role == "input" else ""))


def _own_template(tokenizer) -> str:
    """The tokenizer's own chat template text, or "" (none, or a dict of named templates)."""
    own = getattr(tokenizer, "chat_template", None)
    return own if isinstance(own, str) else ""


def uses_bos(tokenizer) -> bool:
    """Whether sequences of this tokenizer start with its BOS token: its own chat template writes ``bos_token``, or
    plain tokenization adds it (``add_bos_token``, e.g. Llama's SentencePiece tokenizers). False without a BOS token.

    The project's template replaces the tokenizer's own, so it carries the BOS over explicitly; every prompt is then
    tokenized with ``add_special_tokens=False`` (the BOS is in the text), at training, generation and evaluation.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or tokenizer.bos_token_id is None:
        return False
    own = _own_template(tokenizer)
    if own and own not in (ZEPHYR_TEMPLATE, ZEPHYR_BOS_TEMPLATE) and "bos_token" in own:
        return True
    if own == ZEPHYR_BOS_TEMPLATE:  # already applied (a merged model's saved tokenizer)
        return True
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode plain text adds no BOS we could see
        return False
    return bool(ids) and ids[0] == tokenizer.bos_token_id


ZWSP = "\u200b"  # ZERO WIDTH SPACE: splits a control string so that it tokenizes as ordinary text
ZEPHYR_ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|input|>")
CONTROL_POLICIES = ("escape", "refuse")


class ControlTokenError(ValueError):
    """Content holds a control string while ``model.control_tokens: refuse``."""


def control_strings(tokenizer) -> list[str]:
    """The strings that must never reach the tokenizer from content: every special and added-special token of the
    tokenizer (``<|im_end|>``, ``</s>``, ``<|eot_id|>``, …) and the Zephyr template's role markers (plain text for
    most tokenizers, but the very tokens the template's own turn headers produce). Longest first."""
    found = set(ZEPHYR_ROLE_MARKERS)
    for t in getattr(tokenizer, "all_special_tokens", []) or []:
        if isinstance(t, str) and len(t) > 1:
            found.add(t)
    for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(t, "special", False) and len(str(t)) > 1:
            found.add(str(t))
    return sorted(found, key=len, reverse=True)


def neutralise(text: str, controls: list[str], policy: str = "escape") -> str:
    """``text`` with every occurrence of a control string made harmless (the project's one policy for content).

    ``escape``: a ZERO WIDTH SPACE (U+200B) goes after the first character of each occurrence (``<|im_end|>`` →
    ``<\u200b|im_end|>``), so the tokenizer reads it as ordinary text and no content can close a turn or open one;
    the text reads the same to a person. ``refuse``: raise :class:`ControlTokenError` naming the string.
    Idempotent; text without control strings is returned unchanged."""
    if not isinstance(text, str) or not text:
        return text
    for c in controls:
        if c in text:
            if policy == "refuse":
                i = text.index(c)
                raise ControlTokenError(f"content holds the control string {c!r} (…{text[max(0, i - 30):i + 40]!r}…) "
                                        "and model.control_tokens is 'refuse'; remove it or set 'escape'")
            text = text.replace(c, c[0] + ZWSP + c[1:])
    return text


def guard_control_tokens(tokenizer, policy: str = "escape"):
    """Make ``tokenizer.apply_chat_template`` (used by this project's rendering and by TRL's trainers) pass every
    message's content through :func:`neutralise` first; responses tokenized by :func:`prompt_response_ids` go
    through it too. Returns the tokenizer. ``policy`` is ``escape`` or ``refuse`` (``model.control_tokens``)."""
    if policy not in CONTROL_POLICIES:
        raise ValueError(f"model.control_tokens must be one of {CONTROL_POLICIES}, got {policy!r}")
    original = getattr(tokenizer, "_unguarded_apply_chat_template", None) or tokenizer.apply_chat_template
    controls = control_strings(tokenizer)
    tokenizer._unguarded_apply_chat_template = original
    tokenizer._control_strings, tokenizer._control_policy = controls, policy

    def guarded(conversation, *args, **kwargs):
        return original(neutralise_messages(conversation, controls, policy), *args, **kwargs)

    tokenizer.apply_chat_template = guarded
    return tokenizer


def neutralise_messages(conversation, controls, policy):
    """``conversation`` (or a batch of them) with every message's content passed through :func:`neutralise`."""
    if isinstance(conversation, (list, tuple)) and conversation and isinstance(conversation[0], (list, tuple)):
        return [neutralise_messages(c, controls, policy) for c in conversation]  # a batch of conversations
    out = []
    for m in conversation or []:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            m = dict(m, content=neutralise(m["content"], controls, policy))
        out.append(m)
    return out


def neutralise_for(tokenizer, text: str) -> str:
    """:func:`neutralise` with the tokenizer's guard settings (no change for an unguarded tokenizer)."""
    controls = getattr(tokenizer, "_control_strings", None)
    return neutralise(text, controls, tokenizer._control_policy) if controls else text


def apply_template(tokenizer, name: str = "zephyr", *, data_role: bool = False, control_tokens: str = "escape"):
    """Set ``tokenizer.chat_template`` from ``model.chat_template`` and make sure a pad token exists.

    ``zephyr``: the project's template, starting with ``bos_token`` when :func:`uses_bos` says the tokenizer's
    sequences do. ``tokenizer``: the tokenizer's own template; without ``{% generation %}`` markers it is replaced
    by TRL's training version of it (``get_training_chat_template``) where TRL has one. A ``.jinja`` path: that
    file's template. The last two are checked by :func:`check_template` (``data_role``: the ``input`` role must
    render). The pad token falls back to ``eos_token`` (padding is masked everywhere, so this is safe).

    Content is then guarded against control strings (:func:`guard_control_tokens`, ``control_tokens``: ``escape``
    or ``refuse``): no message or response can write a special id or the template's turn markers.

    Raises ``ValueError``: no ``eos_token``; an unknown name or a missing file; a tokenizer with no template of its
    own; a template that fails :func:`check_template` (the message names the fix). Returns the tokenizer.
    """
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no eos_token; the chat template needs one to end assistant turns")
    needs_bos = uses_bos(tokenizer)  # of the tokenizer as loaded, before its template is replaced
    if name == "tokenizer":
        own = _own_template(tokenizer)
        if not own:
            raise ValueError(f"model.chat_template is 'tokenizer' but the tokenizer has no chat template; {FIX}")
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        if not has_generation_markers(own):
            try:
                patched = get_training_chat_template(tokenizer)
            except ValueError:
                raise ValueError("chat template of the tokenizer: no {% generation %} markers, which the assistant-"
                                 f"only loss needs, and TRL has no training version of it; {FIX}") from None
            if patched:
                logging.getLogger("staged_alignment").info(
                    "chat template: the tokenizer's own, with TRL's {% generation %} markers "
                    "(trl.chat_template_utils.get_training_chat_template)")
                tokenizer.chat_template = patched
        check_template(tokenizer, "of the tokenizer", data_role=data_role, needs_bos=needs_bos)
    else:
        template = get_template(name)
        if name == "zephyr" and needs_bos:
            template = ZEPHYR_BOS_TEMPLATE
        tokenizer.chat_template = template
        if name != "zephyr":
            check_template(tokenizer, name, data_role=data_role, needs_bos=needs_bos)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return guard_control_tokens(tokenizer, control_tokens)


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
    text = prompt + neutralise_for(tokenizer, response) + tokenizer.eos_token
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    cut = len(prompt)
    n_prompt = next((i for i, (a, b) in enumerate(offsets) if b > cut or (a >= cut and b > a)), len(ids))
    if n_prompt < len(ids) and offsets[n_prompt][0] < cut:
        raise ValueError(f"a token spans the prompt/response boundary ({text[offsets[n_prompt][0]:offsets[n_prompt][1]]!r})")
    if ids[:n_prompt] != prompt_ids(tokenizer, messages):
        raise ValueError("the prompt tokens of the joint text differ from the prompt tokenized alone")
    return ids, n_prompt
