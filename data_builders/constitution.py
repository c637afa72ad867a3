"""Constitutions for critique-and-rewrite: loading, validation, seeded principle draws, few-shot turns.

Two file shapes are accepted (docs/architecture.md, "Constitution"):

- the project's own: ``{"name": str, "principles": [{"id", "critique", "revision"}, …], "few_shot": [[messages…], …]}``
  (``few_shot`` optional);
- llm-swarm's (``examples/constitutional-ai/constitution_*.json``):
  ``{"constitutions": [{"critic", "revision"}, …], "system_chat": [[messages…], …]}``. Its principles have no ids;
  they get ``p00``, ``p01``, … in file order, and the name is the file stem.

A few-shot conversation is a list of ``{"role", "content"}`` messages alternating ``user``/``assistant``,
starting with ``user`` and ending with ``assistant`` (in practice: red-team prompt, harmful-ish answer, critique
request, critique, revision request, revision). Every problem raises
:class:`~core.jsonl_io.DataError` naming the file and the field (``principles[3].revision``,
``few_shot[1][2].content``, …): no principles, an empty or non-string field, a duplicate id, a bad role order.
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from staged_alignment.core.jsonl_io import DataError, load_json

ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class Principle:
    """One constitutional principle: a critique request and the matching revision request (user-turn texts)."""

    id: str
    critique: str
    revision: str


@dataclass
class Constitution:
    """A named list of principles plus few-shot critique-and-rewrite conversations."""

    name: str
    principles: list[Principle]
    few_shot: list[list[dict]] = field(default_factory=list)
    path: str | None = None
    format: str = "project"  # project | llm-swarm

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.principles]

    def get(self, principle_id: str) -> Principle:
        """The principle with this id; ``KeyError`` if absent."""
        for p in self.principles:
            if p.id == principle_id:
                return p
        raise KeyError(f"no principle {principle_id!r} in constitution {self.name!r}")

    def draw(self, seed: int, prompt_id: str) -> Principle:
        """The principle for one prompt: see :func:`draw_principle`."""
        return draw_principle(self, seed, prompt_id)

    def few_shot_messages(self, n: int) -> list[dict]:
        """The first ``n`` few-shot conversations flattened into one message list (earlier turns of a chat).

        ``n`` larger than the number available uses all of them; ``n <= 0`` gives ``[]``.
        """
        out: list[dict] = []
        for conv in self.few_shot[:max(n, 0)]:
            out.extend({"role": m["role"], "content": m["content"]} for m in conv)
        return out


def draw_principle(constitution: Constitution, seed: int, prompt_id: str) -> Principle:
    """Draw one principle for ``prompt_id`` with an RNG seeded by ``(seed, prompt_id)``.

    The draw depends only on the seed, the prompt id and the principle list (never on how many prompts were
    processed before), so a resumed or re-ordered run draws the same principle for the same prompt. The seed
    material is hashed with sha256 (independent of ``PYTHONHASHSEED``).
    """
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}".encode("utf-8")).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return constitution.principles[rng.randrange(len(constitution.principles))]


# ------------------------------------------------------------------------------------------------ loading
def _require_text(obj, key: str, path, fld: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(path, None, fld, f"expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise DataError(path, None, f"{fld}.{key}", "missing")
    val = obj[key]
    if not isinstance(val, str):
        raise DataError(path, None, f"{fld}.{key}", f"expected a string, got {type(val).__name__}")
    if not val.strip():
        raise DataError(path, None, f"{fld}.{key}", "empty string")
    return val.strip()


def _parse_conversations(convs, path, fld: str) -> list[list[dict]]:
    if convs is None:
        return []
    if not isinstance(convs, list):
        raise DataError(path, None, fld, f"expected a list of conversations, got {type(convs).__name__}")
    out = []
    for i, conv in enumerate(convs):
        cf = f"{fld}[{i}]"
        if not isinstance(conv, list) or not conv:
            raise DataError(path, None, cf, "expected a non-empty list of messages")
        msgs = []
        for j, m in enumerate(conv):
            mf = f"{cf}[{j}]"
            role = _require_text(m, "role", path, mf)
            expected = "user" if j % 2 == 0 else "assistant"
            if role != expected:
                raise DataError(path, None, f"{mf}.role",
                                f"expected {expected!r} (turns alternate user/assistant, starting with user), got {role!r}")
            msgs.append({"role": role, "content": _require_text(m, "content", path, mf)})
        if msgs[-1]["role"] != "assistant":
            raise DataError(path, None, f"{cf}[{len(msgs) - 1}]", "a few-shot conversation must end with an assistant turn")
        out.append(msgs)
    return out


def _check_ids(principles: list[Principle], path) -> None:
    seen: dict[str, int] = {}
    for i, p in enumerate(principles):
        if not set(p.id) <= ID_CHARS:
            raise DataError(path, None, f"principles[{i}].id",
                            f"{p.id!r} has characters outside [A-Za-z0-9-_.] (ids become metric names)")
        if p.id in seen:
            raise DataError(path, None, f"principles[{i}].id", f"duplicate id {p.id!r} (first used at principles[{seen[p.id]}])")
        seen[p.id] = i


def load_constitution(path: str | os.PathLike) -> Constitution:
    """Load and validate a constitution in the project's or llm-swarm's format (see module docstring).

    Raises :class:`DataError` (file + field) for a missing/empty/malformed file, an unknown shape, no principles,
    a missing, non-string or empty ``id``/``critique``/``revision`` (llm-swarm: ``critic``/``revision``), a duplicate
    or badly formed id, and a malformed few-shot conversation.
    """
    p = Path(path)
    data = load_json(p)
    if not isinstance(data, dict):
        raise DataError(p, None, None, f"expected a JSON object, got {type(data).__name__}")
    if "principles" in data:
        name = data.get("name", p.stem)
        if not isinstance(name, str) or not name.strip():
            raise DataError(p, None, "name", "expected a non-empty string")
        raw = data["principles"]
        if not isinstance(raw, list) or not raw:
            raise DataError(p, None, "principles", "expected a non-empty list of principles")
        principles = [Principle(id=_require_text(x, "id", p, f"principles[{i}]"),
                                critique=_require_text(x, "critique", p, f"principles[{i}]"),
                                revision=_require_text(x, "revision", p, f"principles[{i}]"))
                      for i, x in enumerate(raw)]
        _check_ids(principles, p)
        few = _parse_conversations(data.get("few_shot"), p, "few_shot")
        return Constitution(name=name, principles=principles, few_shot=few, path=str(p), format="project")
    if "constitutions" in data:
        raw = data["constitutions"]
        if not isinstance(raw, list) or not raw:
            raise DataError(p, None, "constitutions", "expected a non-empty list of {critic, revision} objects")
        width = max(2, len(str(len(raw) - 1)))
        principles = [Principle(id=f"p{i:0{width}d}",
                                critique=_require_text(x, "critic", p, f"constitutions[{i}]"),
                                revision=_require_text(x, "revision", p, f"constitutions[{i}]"))
                      for i, x in enumerate(raw)]
        few = _parse_conversations(data.get("system_chat"), p, "system_chat")
        return Constitution(name=p.stem, principles=principles, few_shot=few, path=str(p), format="llm-swarm")
    raise DataError(p, None, None, "not a constitution: expected a 'principles' list (project format) or a "
                                   "'constitutions' list (llm-swarm format)")
