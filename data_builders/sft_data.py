"""Readers for SFT sources, all producing ``{"messages": [{"role", "content"}, …]}`` rows.

Accepted shapes (docs/architecture.md, "SFT row"):
- ``messages`` JSONL: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, …]}``;
  the conversation must contain a user turn and end with an assistant turn;
- Alpaca JSON (a list) or JSONL: ``{"instruction", "input", "output"}``; the user turn is the instruction,
  followed by a blank line and the input when the input is non-empty;
- self-instruct JSONL: ``{"instruction", "instances": [{"input", "output"}, …]}``; one row per instance;
- prompt/completion (TRL): ``{"prompt", "completion"}``, each a string or a message list;
- ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, …]}``.

Sources are files or anything ``datasets.load_dataset`` reads (:mod:`core.sources`: Hub ids, dataset
folders, parquet, ``split``/``columns`` …); errors name the file and line, or the dataset, split and row.
Every problem raises :class:`~core.jsonl_io.DataError` naming file, line and field.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

from staged_alignment.core.chat_template import ROLES, prompt_response_ids
from staged_alignment.core.jsonl_io import DataError, iter_jsonl, json_list_item_lines, load_json, require_str
from staged_alignment.core.sources import iter_source

FORMATS = ("auto", "messages", "alpaca", "self_instruct", "prompt_completion", "sharegpt")
SHAREGPT_ROLES = {"assistant": "assistant", "gpt": "assistant", "human": "user", "system": "system", "user": "user"}


def user_turn(instruction: str, data: str) -> str:
    """The user message of an instruction with an optional data part (blank line between)."""
    return instruction.strip() + ("\n\n" + data.strip() if data and data.strip() else "")


def parse_messages(messages, path, line, field: str = "messages", *, keys: tuple[str, str] = ("role", "content"),
                   roles: dict | None = None, kind: str = "messages", speaker: str = "role") -> list[dict]:
    """Validate a list of chat messages; returns ``[{"role", "content"}]`` (other keys dropped).

    ``keys`` names the role and content keys of the input turns and ``roles`` maps their role values onto the chat
    roles (default: the chat roles themselves); ShareGPT turns are ``keys=("from", "value")`` with
    :data:`SHAREGPT_ROLES`. ``kind`` and ``speaker`` word the errors. Raises :class:`DataError` naming the field."""
    roles = roles if roles is not None else {r: r for r in ROLES}
    role_key, content_key = keys
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, field, f"expected a non-empty list of {kind}")
    out = []
    for i, m in enumerate(messages):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise DataError(path, line, f, f"expected an object, got {type(m).__name__}")
        role = require_str(m, role_key, path, line, prefix=f + ".")
        if role not in roles:
            raise DataError(path, line, f"{f}.{role_key}", f"unknown {speaker} {role!r}; expected one of "
                                                           f"{list(roles)}")
        content = require_str(m, content_key, path, line, prefix=f + ".")
        out.append({"role": roles[role], "content": content})
    return out


def _messages_row(obj, path, line) -> list[dict]:
    msgs = parse_messages(obj.get("messages"), path, line) if "messages" in obj else None
    if msgs is None:
        raise DataError(path, line, "messages", "missing")
    if msgs[-1]["role"] != "assistant":
        raise DataError(path, line, f"messages[{len(msgs) - 1}].role", "the last message must be the assistant's")
    if not any(m["role"] == "user" for m in msgs):
        raise DataError(path, line, "messages", "no user message")
    check_turn_order(msgs, path, line)
    return [{"messages": msgs}]


def check_turn_order(msgs: list[dict], path, line) -> None:
    """A conversation the chat template renders as meant: an optional system turn first and nowhere else, then
    turns alternating user → assistant (an ``input`` turn, the data role, may follow a user turn). Raises
    :class:`DataError` naming the first turn out of order."""
    prev = None
    for i, m in enumerate(msgs):
        role = m["role"]
        if role == "system":
            if i != 0:
                raise DataError(path, line, f"messages[{i}].role", "a system turn mid-conversation; it must come first "
                                                                   "(the template renders it as the conversation's "
                                                                   "preamble)")
            prev = role
            continue
        allowed = {None: {"user"}, "system": {"user"}, "user": {"assistant", "input"}, "input": {"assistant"},
                   "assistant": {"user"}}[prev]
        if role not in allowed:
            raise DataError(path, line, f"messages[{i}].role", f"{role!r} after {prev or 'the start'!r}: turns must "
                                                               f"alternate user → assistant (expected "
                                                               f"{' or '.join(sorted(allowed))})")
        prev = role


def _alpaca_row(obj, path, line) -> list[dict]:
    ins = require_str(obj, "instruction", path, line)
    inp = obj.get("input", "")
    if not isinstance(inp, str):
        raise DataError(path, line, "input", f"expected a string, got {type(inp).__name__}")
    out = require_str(obj, "output", path, line)
    return [{"messages": [{"role": "user", "content": user_turn(ins, inp)}, {"role": "assistant", "content": out}]}]


def _self_instruct_row(obj, path, line) -> list[dict]:
    ins = require_str(obj, "instruction", path, line)
    inst = obj.get("instances")
    if not isinstance(inst, list) or not inst:
        raise DataError(path, line, "instances", "expected a non-empty list")
    rows = []
    for i, x in enumerate(inst):
        if not isinstance(x, dict):
            raise DataError(path, line, f"instances[{i}]", "expected an object")
        inp = x.get("input", "")
        if not isinstance(inp, str):
            raise DataError(path, line, f"instances[{i}].input", f"expected a string, got {type(inp).__name__}")
        out = require_str(x, "output", path, line, prefix=f"instances[{i}].")
        rows.append({"messages": [{"role": "user", "content": user_turn(ins, inp)},
                                  {"role": "assistant", "content": out}]})
    return rows


def as_messages(value, path, line, field: str, role: str) -> list[dict]:
    """A string (one ``role`` message) or a message list (validated by :func:`parse_messages`), as messages."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(path, line, field, "empty")
        return [{"role": role, "content": value}]
    return parse_messages(value, path, line, field)


def _prompt_completion_row(obj, path, line) -> list[dict]:
    if "prompt" not in obj or "completion" not in obj:
        raise DataError(path, line, "prompt" if "prompt" not in obj else "completion", "missing")
    return _messages_row({"messages": as_messages(obj["prompt"], path, line, "prompt", "user")
                          + as_messages(obj["completion"], path, line, "completion", "assistant")}, path, line)


def _sharegpt_row(obj, path, line) -> list[dict]:
    msgs = parse_messages(obj.get("conversations"), path, line, "conversations", keys=("from", "value"),
                          roles=SHAREGPT_ROLES, kind="{from, value} turns", speaker="speaker")
    return _messages_row({"messages": msgs}, path, line)


PARSERS = {"messages": _messages_row, "alpaca": _alpaca_row, "self_instruct": _self_instruct_row,
           "prompt_completion": _prompt_completion_row, "sharegpt": _sharegpt_row}


def detect_format(obj: dict) -> str:
    """Guess the format from one row: messages, self_instruct (instances) or alpaca (instruction/output)."""
    if "messages" in obj:
        return "messages"
    if "instances" in obj:
        return "self_instruct"
    if "conversations" in obj:
        return "sharegpt"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "instruction" in obj:
        return "alpaca"
    return "unknown"


def iter_rows(path: Path) -> Iterable[tuple[int, dict]]:
    """``(line, row)``: JSONL rows, or the items of a top-level JSON list (Alpaca's ``.json``) with the line each starts on."""
    with open(path, "rb") as fh:  # the first bytes only: a data file is never read whole to sniff its layout
        head = fh.read(64).lstrip()
    if path.suffix == ".json" or head.startswith(b"["):
        data = load_json(path)
        if not isinstance(data, list):
            raise DataError(path, None, None, "expected a JSON list of rows")
        if not data:
            raise DataError(path, None, None, "file has no rows")
        item_lines = json_list_item_lines(path.read_bytes().decode("utf-8"))
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise DataError(path, f"{item_lines[i]} (item {i})", f"[{i}]",
                                f"expected an object, got {type(obj).__name__}")
            # the line on which the item starts; items sharing a line (a one-line JSON file) add their index
            shared = (i > 0 and item_lines[i - 1] == item_lines[i]) or \
                     (i + 1 < len(item_lines) and item_lines[i + 1] == item_lines[i])
            yield (f"{item_lines[i]} (item {i})" if shared else item_lines[i]), obj
    else:
        yield from iter_jsonl(path)


def read_sft_file(path: str, fmt: str = "auto", max_rows: int | None = None, skip_invalid: bool = False,
                  skipped: list | None = None) -> list[dict]:
    """:func:`read_sft_source` of ``{"path": path, "format": fmt, …}``."""
    return read_sft_source({"path": path, "format": fmt, "max_rows": max_rows, "skip_invalid": skip_invalid},
                           skipped)


def read_sft_source(source: dict, skipped: list | None = None) -> list[dict]:
    """Read one SFT source (a ``DataSource`` mapping) into messages rows (``max_rows`` counts output rows).

    Raises :class:`DataError` on the first bad row, or with ``skip_invalid`` drops bad rows and appends their
    errors to ``skipped`` (a malformed file, as opposed to a bad row, is always an error).
    """
    path, fmt = source["path"], source.get("format") or "auto"
    max_rows, skip_invalid = source.get("max_rows"), source.get("skip_invalid", False)
    if fmt not in FORMATS:
        raise DataError(path, None, "format", f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    p, rows_iter = iter_source(source, iter_rows, "SFT data file")
    rows: list[dict] = []
    for where, obj in rows_iter:
        f = fmt if fmt != "auto" else detect_format(obj)
        if f == "unknown":
            raise DataError(p, where, None, "cannot tell the row format: expected 'messages', 'instruction'+'output' "
                                            "(Alpaca), 'instruction'+'instances' (self-instruct), 'prompt'+"
                                            "'completion' or 'conversations' (ShareGPT); or set format / columns")
        try:
            rows.extend(PARSERS[f](obj, p, where))
        except DataError as e:
            if not skip_invalid:
                raise
            if skipped is not None:
                skipped.append(str(e))
        if max_rows is not None and len(rows) >= max_rows:
            return rows[:max_rows]
    return rows


def replay_rows(rows: list[dict], tokenizer, max_length: int, n: int, seed: int) -> list[dict]:
    """A seeded sample of ``n`` SFT rows tokenized for replay in a later stage: ``{"input_ids", "labels"}`` with the
    conversation up to the last assistant turn as the prompt (chat template, generation prompt) and that turn + eos
    as the response, tokenized jointly (:func:`core.chat_template.prompt_response_ids`); labels are -100 on
    the prompt. Rows longer than ``max_length`` are skipped (the sample is drawn from the others)."""

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out = []
    for i in order:
        msgs = rows[i]["messages"]
        ids, n_prompt = prompt_response_ids(tokenizer, msgs[:-1], msgs[-1]["content"])
        if len(ids) <= max_length:
            out.append({"input_ids": ids, "labels": [-100] * n_prompt + ids[n_prompt:]})
        if len(out) >= n:
            break
    return out


def read_sft_sources(sources: list[dict], skipped: list | None = None) -> list[dict]:
    """Concatenate several sources (``DataSource`` mappings: path, format, max_rows, skip_invalid, name, data_dir,
    data_files, split, revision, columns)."""
    rows = []
    for s in sources:
        rows += read_sft_source(s, skipped)
    return rows
