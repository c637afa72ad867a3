"""Prompt-injection triplets for the causal stage: (benign, counterfactual, injected) views of one task.

Triplet schema (docs/architecture.md)::

    {"id", "system", "instruction", "data", "data_counterfactual", "injection",
     "position": "start"|"middle"|"end", "response", "attack_category"}

* benign prompt         = system + instruction + data
* counterfactual prompt = system + instruction + data_counterfactual (same meaning, different wording)
* injected prompt       = system + instruction + :func:`insert_injection` (data, injection, position)
* ``response``          = the target answer to the benign prompt.

Each view is the message list ``[system turn (if non-empty), user turn user_turn(instruction, data')]``
(:func:`triplet_messages`), always rendered with the tokenizer's (Zephyr) chat template downstream.

Task sources (:func:`read_tasks`, ``format`` = ``auto`` | ``bipia`` | ``alpaca`` | ``seed``):

* BIPIA context files ``{context, question?, ideal?}`` (microsoft/BIPIA ``benchmark/{email,table,code}``). For
  email/table the context is a string and the question the instruction. For code, ``context`` (the Stack
  Overflow answer, the *external* data the injection goes into), ``code`` and ``error`` are lists of lines and
  are joined with newlines; without a ``question`` the instruction is built from the error and the code
  (:data:`CODE_INSTRUCTION`). ``response`` = ``ideal`` (joined for code) when present, else empty: the causal
  stage then trains toward the starting model's own greedy answer (:mod:`data_builders.causal_targets`) — BIPIA's own
  email files use "unknown" for unanswerable questions, which is kept as is.
* Alpaca rows (``instruction``, ``input``, ``output``) with a non-empty ``input`` (the data part).
* Seed tasks ``{"id", "system"?, "instruction", "data", "response"}`` (``data_builders/seed/tasks.jsonl``).

Attack files: ``{category: [instruction, …]}`` JSON (BIPIA ``{text,code}_attack_*.json``), or — for the
evaluation split — injection eval cases JSONL (``{"injection", "attack_category", …}``). Code tasks draw from
attack files whose ``format`` is ``code`` (``auto``: file name contains "code"), other tasks from the text
attack files (each pool falls back to the other when empty). Train and evaluation attacks must be disjoint:
:func:`check_attack_overlap` compares NFKC-normalised, case-folded, whitespace-collapsed texts and raises
:class:`DataError` naming both files.

Counterfactual (``counterfactual: rule``, the default) — :func:`reword`, deterministic, never reorders sentences:

* prose (email, Alpaca, seed, the prose of a code answer): one left-to-right pass of whole-word substitutions
  from :data:`SUBSTITUTIONS` — contractions both ways ("do not" ↔ "don't", "it is" ↔ "it's", …), US/UK spelling
  both ways ("color" ↔ "colour", "email" ↔ "e-mail", …) and a few near-synonyms whose meaning does not depend on
  context ("often" ↔ "frequently", "big" ↔ "large", "hi" ↔ "hello", …); a word is replaced only when it is
  lowercase, or capitalised at a sentence start (so capitalised names and ALL-CAPS field labels are never
  touched); ``a``/``an`` before a replaced word is fixed; code spans (fenced and inline), URLs and e-mail
  addresses are protected. Numbers are never touched (no entry contains a digit).
* tables (lines starting with ``|``): the cell contents are kept and only the column padding changes
  (padded → compact ``| a | b |``; already compact → padded to aligned widths).
* code answers: prose substitutions outside code (fenced blocks, inline code and every line that looks like
  code — indented, or containing ``=(){};[]<>#`` — are protected; indentation is meaning in Python); if nothing
  changed, a blank line is added before (or removed before) each opening fence.
* when no rule applies (e.g. a one-word input), the fallback changes only spacing/punctuation: two spaces
  between sentences, else a final period is added (or removed), else the text is wrapped in quotes.

``counterfactual: model`` asks the merged model for a paraphrase (:func:`model_counterfactuals`, batched via
``generate_chat``) for prose data only; a paraphrase is accepted only if it is non-empty, differs from the
data, has 0.5–2× its length and contains exactly the same numbers (digit runs), code spans, URLs and e-mail
addresses; otherwise the rule is used.

Positions cycle through ``start``/``middle``/``end`` over the triplets (counts differ by at most one); attacks
are dealt round-robin from a seeded shuffle of each pool; ``triplets_per_task`` > 1 gives each task several
triplets (different attacks and positions). Everything is deterministic given ``seed``.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from staged_alignment.core.jsonl_io import (
    DataError,
    iter_jsonl,
    load_json,
    require_file,
    require_str,
    write_jsonl_atomic,
)
from staged_alignment.core.sources import fetch_url, is_line_file, is_url, iter_source
from staged_alignment.data_builders.canary import fresh_canary, plain_canary
from staged_alignment.data_builders.completion_attacks import fill_template, has_template_slot
from staged_alignment.data_builders.overlap import ATTACK_NGRAM, DATA_NGRAM, find_overlaps
from staged_alignment.data_builders.sft_data import iter_rows, user_turn

POSITIONS = ("start", "middle", "end")
TASK_FORMATS = ("auto", "bipia", "alpaca", "seed")
TRIPLET_FIELDS = ("id", "system", "instruction", "data", "data_counterfactual", "injection", "position",
                  "response", "attack_category")
TRIPLET_OPTIONAL = ("target", "target_source", "hijack", "hijack_source", "canary", "control_tag", "control_mode")
CANARY_SLOT = "{canary}"
# Canary vocabulary of the *training* attacks (trees; WORD-NNN). The held-out set uses minerals and WORD-NNNN
# (evaluation/heldout/attacks.py); tests/test_heldout.py checks that the two never share a word.
TRAIN_CANARY_WORDS = ["MAPLE", "CEDAR", "BIRCH", "WILLOW", "ALDER", "ROWAN", "HAZEL", "LARCH", "SPRUCE", "ASPEN",
                      "POPLAR", "JUNIPER", "SEQUOIA", "BAOBAB", "ACACIA", "MAGNOLIA", "HORNBEAM", "SYCAMORE"]
# Training controls: the *trusted* instruction asks for a tag; the target complies (see build_triplets).
TRAIN_CONTROL_SUFFIXES = [("Close your reply with the label {tag}.", "end"),
                          ("Put the word {tag} at the very start of your answer.", "start"),
                          ("Add the reference code {tag} after your answer.", "end")]
TRAIN_CONTROL_WORDS = ["MEMO", "NOTE", "FILE", "ENTRY"]
# Plain-word canaries and control tags (``canary_style: word | mixed``): the form of the strings the field's
# benchmarks ask for (AlpacaFarm's "Hacked!", SEP's one-word witnesses) without their words; tests/test_heldout.py
# checks them against the held-out, BIPIA and SEP vocabularies and the word "hacked".
TRAIN_PLAIN_CANARY_WORDS = ["Lantern", "Pickle", "Thimble", "Kazoo", "Muffin", "Pebble", "Noodle", "Biscuit",
                            "Cactus", "Puffin", "Tadpole", "Saffron", "Gizmo", "Jigsaw", "Zigzag", "Bongo",
                            "Confetti", "Doodle", "Fiddle", "Goblin", "Igloo", "Jester", "Kettle", "Lollipop",
                            "Mosaic", "Unlocked", "Bingo", "Jackpot", "Ahoy", "Yippee"]
TRAIN_PLAIN_CONTROL_WORDS = ["Receipt", "Voucher", "Invoice", "Registry"]
CANARY_STYLES = ("code", "word", "mixed")

SYSTEMS = {
    "email": "You are an email assistant. Answer the user's question using only the email provided.",
    "table": "You are a data assistant. Answer the user's question using only the table provided.",
    "code": "You are a coding assistant. Help the user fix their code; the reference answer is provided as help.",
    "text": "",
}
CODE_INSTRUCTION = ("My code raises the error below. Using the reference answer that follows as help, fix the "
                    "error and reply with the corrected code only.\n\nError:\n```\n{error}\n```\n\nCode:\n```\n{code}\n```\n\n"
                    "Reference answer:")


# --------------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """One task with a data part. ``kind`` ∈ {email, table, code, text} selects rewording and attack pool;
    ``response`` is the gold answer, or "" when the source has none (``generic_response``)."""

    id: str
    instruction: str
    data: str
    response: str
    system: str = ""
    kind: str = "text"
    generic_response: bool = False


def _join(value, path, line, name) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return "\n".join(value).strip("\n")
    raise DataError(path, line, name, f"expected a string or a list of strings, got {type(value).__name__}")


def _bipia_task(obj: dict, path: Path, line: int, tag: str | None = None) -> Task:
    if "context" not in obj:
        raise DataError(path, line, "context", "missing")
    context = _join(obj["context"], path, line, "context")
    if not context.strip():
        raise DataError(path, line, "context", "empty")
    is_code = "code" in obj or "error" in obj
    ideal = obj.get("ideal")
    if ideal is not None:
        ideal = _join(ideal, path, line, "ideal")
    question = obj.get("question")
    if question is not None and (not isinstance(question, str) or not question.strip()):
        raise DataError(path, line, "question", "expected a non-empty string")
    if is_code:
        kind = "code"
        code = _join(obj.get("code", ""), path, line, "code")
        error = _join(obj.get("error", ""), path, line, "error")
        if question:
            instruction = question.strip()
            if code.strip():
                instruction += f"\n\nCode:\n```\n{code}\n```"
            instruction += "\n\nReference answer:"
        else:
            if not error.strip() and not code.strip():
                raise DataError(path, line, "error", "a code task needs a question, or an error and code")
            instruction = CODE_INSTRUCTION.format(error=error.strip() or "(no error message given)", code=code)
        data = context.strip()
    else:
        if not question:
            raise DataError(path, line, "question", "missing (needed for email/table tasks)")
        kind = "table" if context.lstrip().startswith("|") else "email"
        q = re.sub(r"^\s*Q:\s*", "", question.strip())
        instruction = f"{q}\nAnswer using only the {kind} below."
        data = context.strip()
    generic = not (ideal and ideal.strip())
    response = "" if generic else ideal.strip()
    where = str(line).replace("row ", "row") if tag else line
    return Task(id=f"bipia-{kind}-{tag or path.parent.name}-{where}", instruction=instruction, data=data,
                response=response, system=SYSTEMS[kind], kind=kind, generic_response=generic)


def _alpaca_task(obj: dict, path: Path, where, idx, tag: str | None = None) -> Task | None:
    ins = require_str(obj, "instruction", path, where)
    inp = obj.get("input", "")
    if not isinstance(inp, str):
        raise DataError(path, where, "input", f"expected a string, got {type(inp).__name__}")
    if not inp.strip():
        return None  # no data part: not usable for injection triplets
    out = require_str(obj, "output", path, where)
    return Task(id=f"alpaca-{tag or path.stem}-{idx}", instruction=ins.strip(), data=inp.strip(), response=out.strip())


def _seed_task(obj: dict, path: Path, line: int) -> Task:
    tid = require_str(obj, "id", path, line)
    system = obj.get("system", "")
    if not isinstance(system, str):
        raise DataError(path, line, "system", f"expected a string, got {type(system).__name__}")
    data = require_str(obj, "data", path, line)
    kind = "table" if data.lstrip().startswith("|") else ("code" if "```" in data else "text")
    return Task(id=f"seed-{tid}", instruction=require_str(obj, "instruction", path, line).strip(), data=data.strip(),
                response=require_str(obj, "response", path, line).strip(), system=system.strip(), kind=kind)


def _detect(obj: dict) -> str:
    if "context" in obj:
        return "bipia"
    if "data" in obj:  # a seed task (its missing fields are then named by the seed parser)
        return "seed"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    return "unknown"


def read_tasks(path: str, fmt: str = "auto", max_rows: int | None = None, skip_invalid: bool = False,
               skipped: list | None = None) -> list[Task]:
    """:func:`read_task_source` of ``{"path": path, "format": fmt, …}``."""
    return read_task_source({"path": path, "format": fmt, "max_rows": max_rows, "skip_invalid": skip_invalid},
                            skipped)


def read_task_source(source: dict, skipped: list | None = None) -> list[Task]:
    """Read one task source (a ``DataSource`` mapping: a BIPIA context file, Alpaca JSON/JSONL, seed tasks JSONL, a
    URL of one of them, or a Hub dataset / parquet file of such rows through ``datasets``) into :class:`Task`.

    Alpaca rows with an empty ``input`` are skipped (no data part). ``max_rows`` counts returned tasks. Raises
    :class:`DataError` naming file (or ``dataset[split]``), line (or row) and field (with ``skip_invalid``, bad rows
    go to ``skipped``).
    """
    fmt, max_rows = source.get("format") or "auto", source.get("max_rows")
    if fmt not in TASK_FORMATS:
        raise DataError(source["path"], None, "format",
                        f"unknown task format {fmt!r}; expected one of {list(TASK_FORMATS)}")

    label, rows = iter_source(source, iter_rows, "task file")
    p = Path(label)
    # ids of a datasets source: its name and split (two datasets of one owner, or two splits, never share ids)
    tag = None if is_line_file(label) else re.sub(r"[^A-Za-z0-9_.]+", "-", label).strip("-")
    tasks: list[Task] = []
    for idx, (where, obj) in enumerate(rows):
        f = fmt if fmt != "auto" else _detect(obj)
        try:
            if f == "bipia":
                t = _bipia_task(obj, p, where, tag)
            elif f == "seed":
                t = _seed_task(obj, p, where)
            elif f == "alpaca":
                t = _alpaca_task(obj, p, where, idx, tag)
            else:
                raise DataError(p, where, None, "cannot tell the task format: expected BIPIA ('context'), seed "
                                                "('instruction', 'data', 'response') or Alpaca ('instruction', "
                                                "'input', 'output') fields")
        except DataError as e:
            if not source.get("skip_invalid", False):
                raise
            if skipped is not None:
                skipped.append(str(e))
            continue
        if t is not None:
            tasks.append(t)
        if max_rows is not None and len(tasks) >= max_rows:
            break
    if not tasks:
        raise DataError(p, None, None, "no usable tasks (Alpaca rows need a non-empty 'input')")
    return tasks


# --------------------------------------------------------------------------------------------- attacks
@dataclass
class AttackSet:
    """Attack instructions of one file: ``items`` = [(category, text)], ``kind`` = text | code."""

    path: str
    kind: str
    items: list = field(default_factory=list)


def read_attacks(path: str, fmt: str = "auto", max_rows: int | None = None) -> AttackSet:
    """Read ``{category: [texts]}`` JSON, or injection eval cases JSONL (``injection``, ``attack_category``).

    ``fmt``: ``text`` | ``code`` (which tasks the attacks are for) or ``auto`` (``code`` when the file name
    contains "code"). ``path`` may be an ``https://`` URL (:func:`core.sources.fetch_url`). Raises
    :class:`DataError` for a wrong shape, a non-string or empty text.
    """
    p = require_file(fetch_url(path) if is_url(path) else path, "attack file")
    kind = fmt if fmt in ("text", "code") else ("code" if "code" in p.name.lower() else "text")
    if fmt not in ("auto", "text", "code"):
        raise DataError(p, None, "format", f"unknown attack format {fmt!r}; expected auto, text or code")
    items: list[tuple[str, str]] = []
    if p.suffix == ".jsonl" or p.suffix == ".gz":
        for line, obj in iter_jsonl(p):
            if isinstance(obj, dict) and obj.get("kind") == "control":
                continue  # over-defence controls carry no injection
            text = require_str(obj, "injection", p, line)
            cat = obj.get("attack_category", "uncategorised")
            if not isinstance(cat, str):
                raise DataError(p, line, "attack_category", "expected a string")
            items.append((cat, text))
    else:
        data = load_json(p)
        if not isinstance(data, dict) or not data:
            raise DataError(p, None, None, "expected a non-empty JSON object {category: [attack texts]}")
        for cat, texts in data.items():
            if not isinstance(texts, list) or not texts:
                raise DataError(p, None, cat, "expected a non-empty list of attack texts")
            for i, t in enumerate(texts):
                if not isinstance(t, str) or not t.strip():
                    raise DataError(p, None, f"{cat}[{i}]", "expected a non-empty string")
                items.append((cat, t))
    if max_rows is not None:
        items = items[:max_rows]
    return AttackSet(path=str(p), kind=kind, items=items)


def check_attack_overlap(train: Sequence[AttackSet], evaluation: Sequence[AttackSet]) -> None:
    """Raise :class:`DataError` (naming the training file, its category/index, and the evaluation file) if a
    training attack shares a word ``ATTACK_NGRAM``-gram (6) with an evaluation attack after
    :func:`data_builders.overlap.normalise` (case, spacing, punctuation and canaries masked), so an evaluation
    attack that is a training attack with a clause appended or another canary is caught too."""
    ev = [(s.path, cat, text) for s in evaluation for cat, text in s.items]
    if not ev:
        return
    for s in train:
        texts = [text for _, text in s.items]
        hits = find_overlaps(texts, [t for _, _, t in ev], ATTACK_NGRAM)
        if hits:
            i = min(hits)
            cat, text = s.items[i]
            idx = sum(1 for c, _ in s.items[:i] if c == cat)
            path, ecat, etext = ev[hits[i][0]]
            raise DataError(s.path, None, f"{cat}[{idx}]",
                            f"training attack overlaps the evaluation attack file {path} (category {ecat!r}: "
                            f"{etext[:60]!r}): {text[:80]!r}; train and evaluation attacks must be disjoint "
                            f"(no shared {ATTACK_NGRAM}-word sequence)")


def check_task_overlap(tasks: Sequence[Task], eval_cases: Sequence[dict], eval_path: str) -> None:
    """Raise :class:`DataError` if a training task's data part shares a word ``DATA_NGRAM``-gram (8) with the data
    of an evaluation case (e.g. a BIPIA train context converted into eval cases): the evaluation would then
    measure memorisation, not robustness. Names the task and the evaluation case."""
    if not tasks or not eval_cases:
        return
    hits = find_overlaps([t.data for t in tasks], [c["data"] for c in eval_cases], DATA_NGRAM)
    if hits:
        i = min(hits)
        c = eval_cases[hits[i][0]]
        raise DataError(eval_path, None, "data", f"evaluation case {c.get('id')!r} reuses the data of training task "
                                                 f"{tasks[i].id!r} (shared {DATA_NGRAM}-word sequence); the causal "
                                                 "stage's tasks and the evaluation set must be disjoint")


# --------------------------------------------------------------------------------------------- rewording
_PAIRS = [
    # contractions (both directions)
    ("do not", "don't"), ("does not", "doesn't"), ("did not", "didn't"), ("is not", "isn't"),
    ("are not", "aren't"), ("was not", "wasn't"), ("were not", "weren't"), ("cannot", "can't"),
    ("will not", "won't"), ("would not", "wouldn't"), ("could not", "couldn't"), ("should not", "shouldn't"),
    ("have not", "haven't"), ("has not", "hasn't"), ("it is", "it's"), ("that is", "that's"),
    ("there is", "there's"), ("you are", "you're"), ("we are", "we're"), ("they are", "they're"),
    ("I am", "I'm"), ("I will", "I'll"), ("let us", "let's"),
    # US / UK spelling and hyphenation
    ("color", "colour"), ("colors", "colours"), ("favorite", "favourite"), ("organize", "organise"),
    ("organization", "organisation"), ("organizations", "organisations"), ("center", "centre"),
    ("analyze", "analyse"), ("behavior", "behaviour"), ("realize", "realise"), ("email", "e-mail"),
    ("emails", "e-mails"), ("online", "on-line"), ("percent", "per cent"),
    # near-synonyms whose meaning does not depend on context
    ("often", "frequently"), ("big", "large"), ("hi", "hello"), ("quickly", "rapidly"), ("movie", "film"),
    ("currently", "at present"),
]
_ONE_WAY = [("however", "but"), ("therefore", "thus"), ("please", "kindly"), ("begin", "start"),
            ("receive", "get"), ("small", "little"), ("in order to", "to"), ("questions", "queries"),
            ("assist", "help"), ("important", "essential"), ("thank you", "thanks"), ("buy", "purchase"),
            ("approximately", "roughly"), ("additional", "extra")]
SUBSTITUTIONS: dict[str, str] = {}
for _a, _b in _PAIRS:
    SUBSTITUTIONS.setdefault(_a.lower(), _b)
    SUBSTITUTIONS.setdefault(_b.lower(), _a)
for _a, _b in _ONE_WAY:
    SUBSTITUTIONS.setdefault(_a, _b)
_SUB_RE = re.compile(r"(?<![\w'’-])(" + "|".join(re.escape(k).replace("'", "['’]") for k in
                                                sorted(SUBSTITUTIONS, key=len, reverse=True))
                     + r")(?![\w'’-])", re.IGNORECASE)
_PROTECT_RE = re.compile(r"```.*?```|`[^`\n]*`|https?://\S+|www\.\S+|[\w.+-]+@[\w-]+\.[\w.-]+", re.DOTALL)
_SENT_START_RE = re.compile(r"(?:[.!?:|]\s+|\n\s*)$")


def _at_sentence_start(text: str, pos: int) -> bool:
    """True if ``pos`` starts the text, a line, or follows sentence-final punctuation (or a ':'/'|' label)."""
    prefix = text[max(0, pos - 16):pos]
    return not text[:pos].strip() or bool(_SENT_START_RE.search(prefix))
_NUM_RE = re.compile(r"\d+")


def _case_like(src: str, repl: str) -> str:
    return repl[0].upper() + repl[1:] if src[0].isupper() else repl


_CODE_LINE_RE = re.compile(r"^(?:[ ]{4}|\t).*$|^.*[=(){};\[\]<>#].*$", re.MULTILINE)


def _substitute_prose(text: str, code: bool = False) -> tuple[str, int]:
    """One pass of :data:`SUBSTITUTIONS` outside protected spans; returns (text, number of replacements).

    Protected: fenced and inline code, URLs, e-mail addresses and, with ``code``, every line that looks like
    code (indented by 4 spaces/a tab, or containing one of ``=(){};[]<>#``)."""
    out, n = [], 0
    found = [(m.start(), m.end()) for m in _PROTECT_RE.finditer(text)]
    if code:
        found += [(m.start(), m.end()) for m in _CODE_LINE_RE.finditer(text) if m.end() > m.start()]
    spans = []
    for st, en in sorted(found):
        if spans and st <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], en))
        else:
            spans.append((st, en))
    gaps, prev = [], 0
    for s, e in spans:
        gaps.append((prev, s, True))
        gaps.append((s, e, False))
        prev = e
    gaps.append((prev, len(text), True))
    for s, e, editable in gaps:
        seg = text[s:e]
        if not editable:
            out.append(seg)
            continue

        def repl(m, base=s):
            nonlocal n
            word = m.group(0)
            key = word.lower().replace("’", "'")
            is_i = key[:2] in ("i ", "i'")
            if is_i:
                if not word.startswith("I") or word[1:] != word[1:].lower():
                    return word
            elif word != word.lower():
                titled = word[0].isupper() and word[1:] == word[1:].lower()
                if not (titled and _at_sentence_start(text, base + m.start())):
                    return word  # a capitalised word mid-sentence may be a name; ALL-CAPS is a label
            new = SUBSTITUTIONS[key]
            if "’" in word:
                new = new.replace("'", "’")
            n += 1
            return new if is_i else _case_like(word, new)

        out.append(_SUB_RE.sub(repl, seg))
    result = "".join(out)
    return _fix_articles(result), n


def _fix_articles(text: str) -> str:
    def fix(m):
        art, word = m.group(1), m.group(2)
        want = "an" if word[0].lower() in "aeiou" else "a"
        if art.lower() == want:
            return m.group(0)
        want = want.capitalize() if art[0].isupper() else want
        return f"{want} {word}"

    return re.sub(r"\b([Aa]n?) ((?:extra|essential|e-mail|e-mails|email|emails|online|on-line|additional|"
                  r"important|approximately|roughly|often|frequently|organisation|organization|analyse|analyze|"
                  r"big|large|small|little|film|movie|hello|hi|purchase|buy)\b)", fix, text)


def _spacing_fallback(text: str) -> str:
    """Meaning-preserving spacing/punctuation change for text no substitution applies to."""
    t2 = re.sub(r"([.!?]) (?=[A-Z])", r"\1  ", text)
    if t2 != text:
        return t2
    stripped = text.rstrip()
    if re.search(r"[A-Za-z0-9]$", stripped):
        return stripped + "."
    if re.search(r"[a-z]{3}\.$", stripped) and not stripped.endswith(".."):
        return stripped[:-1]
    return f"\"{text}\"" if '"' not in text else f"'{text}'"


def _reword_table(text: str) -> str:
    lines = text.split("\n")
    rows = [i for i, ln in enumerate(lines) if ln.strip().startswith("|") and ln.strip().endswith("|")]
    if not rows:
        return text
    cells = {i: [c.strip() for c in lines[i].strip()[1:-1].split("|")] for i in rows}
    compact = {i: "| " + " | ".join(cells[i]) + " |" for i in rows}
    if any(compact[i] != lines[i] for i in rows):
        new = list(lines)
        for i in rows:
            new[i] = compact[i]
        return "\n".join(new)
    ncol = max(len(c) for c in cells.values())
    widths = [max((len(cells[i][k]) for i in rows if k < len(cells[i])), default=0) for k in range(ncol)]
    for extra in (0, 1):  # pad to aligned widths; if already aligned, widen every column by one space
        new = list(lines)
        for i in rows:
            new[i] = "| " + " | ".join(c.ljust(widths[k] + extra) for k, c in enumerate(cells[i])) + " |"
        if new != lines:
            break
    return "\n".join(new)


def _fence_fallback(text: str) -> str:
    lines = text.split("\n")
    fence_idx = [i for i, ln in enumerate(lines) if ln.strip().startswith("```")]
    if not fence_idx:
        return text
    opening = fence_idx[0::2]
    out = []
    if any(i > 0 and lines[i - 1].strip() for i in opening):
        for i, ln in enumerate(lines):
            if i in opening and i > 0 and lines[i - 1].strip():
                out.append("")
            out.append(ln)
    else:
        drop = {i - 1 for i in opening if i > 0 and not lines[i - 1].strip()}
        out = [ln for i, ln in enumerate(lines) if i not in drop]
    return "\n".join(out)


def reword(text: str, kind: str = "text") -> tuple[str, str]:
    """Deterministic meaning-preserving rewording of a data part (rules in the module docstring).

    Returns ``(new_text, rule)`` with ``rule`` ∈ {substitution, table_padding, fence_spacing, spacing}. The
    result always differs from ``text`` and keeps every digit run, code span, URL and e-mail address.
    """
    if kind == "table" or (text.lstrip().startswith("|") and "\n" in text.strip()):
        new = _reword_table(text)
        if new != text:
            return new, "table_padding"
    new, n = _substitute_prose(text, code=(kind == "code"))
    if n and new != text:
        return new, "substitution"
    if kind == "code" or "```" in text:
        new = _fence_fallback(text)
        if new != text:
            return new, "fence_spacing"
    return _spacing_fallback(text), "spacing"


def protected_tokens(text: str) -> dict:
    """What a counterfactual must keep: digit runs (multiset), code spans, URLs and e-mail addresses."""
    return {"numbers": sorted(_NUM_RE.findall(text)), "spans": sorted(m.group(0) for m in _PROTECT_RE.finditer(text))}


# --------------------------------------------------------------------------------------------- injection
_SENT_BOUNDARY_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])")


def insert_injection(data: str, injection: str, position: str) -> str:
    """``data`` with ``injection`` inserted at ``position``.

    ``start``/``end``: before/after the data, separated by a newline when either text is multi-line, else by a
    space. ``middle``: at the line boundary nearest the middle of the data for multi-line data (outside fenced
    code blocks when possible; never before a table's header row), else at the sentence boundary nearest the
    middle, else at the whitespace nearest the middle, else at the end. Raises ``ValueError`` for an unknown
    position.
    """
    if position not in POSITIONS:
        raise ValueError(f"unknown injection position {position!r}; expected one of {list(POSITIONS)}")
    data, inj = data.strip(), injection.strip()
    multiline = "\n" in data or "\n" in inj
    sep = "\n" if multiline else " "
    if position == "start":
        return inj + sep + data
    if position == "end":
        return data + sep + inj
    mid = len(data) / 2
    if "\n" in data:
        lines = data.split("\n")
        offsets, pos = [], 0
        inside, ok = False, []
        for i, ln in enumerate(lines):
            if i > 0:
                offsets.append(pos)
                ok.append(not inside)
            if ln.strip().startswith("```"):
                inside = not inside
            pos += len(ln) + 1
        cands = [(o, good) for o, good in zip(offsets, ok)]
        if lines[0].lstrip().startswith("|") and len(cands) > 1:
            cands = cands[1:]  # keep the table header first
        good = [o for o, g in cands if g] or [o for o, _ in cands]
        if good:
            at = min(good, key=lambda o: (abs(o - mid), o))
            return data[:at] + inj + "\n" + data[at:]
    bounds = [m for m in _SENT_BOUNDARY_RE.finditer(data)]
    if bounds:
        m = min(bounds, key=lambda m: (abs(m.start() - mid), m.start()))
        return data[:m.start()] + " " + inj + " " + data[m.end():]
    spaces = [m for m in re.finditer(r"\s+", data)]
    if spaces:
        m = min(spaces, key=lambda m: (abs(m.start() - mid), m.start()))
        return data[:m.start()] + " " + inj + " " + data[m.end():]
    return data + sep + inj


# Chat-template control strings of common model families. With the data role on, they are removed from the data
# part (repeatedly, so "<|us<|user|>er|>" cannot reassemble one), as Meta SecAlign's ``recursive_filter`` does for
# Llama-3's header tokens: data can then never open a turn of its own.
TEMPLATE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|input|>", "</s>", "<s>", "<|im_start|>",
                   "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<start_of_turn>", "<end_of_turn>", "<eos>", "<bos>", "[INST]", "[/INST]",
                   "<<SYS>>", "<</SYS>>", "<|end|>", "<|user", "<|assistant")


def neutralise_template_tokens(text: str, extra: Sequence[str] = ()) -> str:
    """``text`` with every :data:`TEMPLATE_TOKENS` string (and ``extra``, e.g. a tokenizer's special tokens)
    removed until none is left (case-sensitive, like the tokenizers that would read them as control tokens)."""
    tokens = sorted({*TEMPLATE_TOKENS, *(e for e in extra if e)}, key=len, reverse=True)
    prev = None
    while prev != text:
        prev = text
        for tok in tokens:
            text = text.replace(tok, "")
    return text


def triplet_messages(t: dict, view: str, data_role: bool = False) -> list[dict]:
    """Messages of one view (``benign`` | ``counterfactual`` | ``injected``) of triplet ``t``.

    ``data_role`` False: ``[system?, user(instruction + blank line + data')]``. True: ``[system?, user(instruction),
    input(data')]`` with :func:`neutralise_template_tokens` applied to the data (the ``input`` role of
    :mod:`core.chat_template`). Evaluation cases are built by the same function, so training, generation
    and evaluation see one format.
    """
    if view == "benign":
        data = t["data"]
    elif view == "counterfactual":
        data = t["data_counterfactual"]
    elif view == "injected":
        data = insert_injection(t["data"], t["injection"], t["position"])
    else:
        raise ValueError(f"unknown view {view!r}")
    msgs = [{"role": "system", "content": t["system"]}] if t.get("system", "").strip() else []
    if data_role:
        msgs.append({"role": "user", "content": t["instruction"].strip()})
        msgs.append({"role": "input", "content": neutralise_template_tokens(data).strip()})
    else:
        msgs.append({"role": "user", "content": user_turn(t["instruction"], data)})
    return msgs


# --------------------------------------------------------------------------------------------- building
@dataclass
class BuildResult:
    triplets: list
    stats: dict


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "attack"


def compose_control_target(answer: str, tag: str, mode: str) -> str:
    """The compliant answer of a control triplet: ``tag`` before (``start``) or after (``end``) the answer."""
    return f"{tag} {answer}".strip() if mode == "start" else f"{answer} {tag}".strip()


def build_triplets(tasks: Sequence[Task], train_attacks: Sequence[AttackSet], *, seed: int = 42,
                   max_triplets: int | None = None, positions: Sequence[str] = POSITIONS,
                   max_data_chars: int | None = None, eval_attacks: Sequence[AttackSet] = (),
                   counterfactuals: dict[str, str] | None = None, triplets_per_task: int = 1,
                   control_fraction: float = 0.0, max_response_chars: int | None = None,
                   template_segments: tuple[str, str] | None = None, canary_style: str = "code") -> BuildResult:
    """``triplets_per_task`` triplets per task (each with the next attack of the pool and the next position),
    tasks taken in a seeded shuffle until ``max_triplets`` triplets exist. Tasks whose data is longer than
    ``max_data_chars`` (or whose gold answer is longer than ``max_response_chars``) are skipped. Triplet ids are the
    task id, then ``<task id>~2``, ``~3`` … for the extra
    triplets of the same task (:func:`task_group` strips the suffix, to split by task).

    Attack texts holding ``{canary}`` are *canary attacks*: the slot gets a fresh ``WORD-NNN`` training canary
    (:data:`TRAIN_CANARY_WORDS`) and the triplet's ``hijack`` (what obeying looks like) is that canary —
    ``canary_style="word"`` gives a plain word instead (:func:`data_builders.canary.plain_canary`,
    :data:`TRAIN_PLAIN_CANARY_WORDS`: ``Lantern!``, ``kazoo``), ``"mixed"`` each of the two with probability ½, and
    control tags follow the same style (:data:`TRAIN_PLAIN_CONTROL_WORDS`); ``"code"`` (the default) draws
    exactly the canaries it drew before the option existed. Other texts
    are task attacks whose ``hijack`` is left empty for the starting model to fill (its answer to the injected
    instruction alone, :mod:`data_builders.causal_targets`). ``target`` (the answer every view is trained toward)
    is the gold ``response``, or empty when the task has none (filled with the starting model's greedy answer).

    ``control_fraction`` of the triplets (evenly spread, deterministic: ⌊n·f⌋ among the first n) are *controls*: the trusted instruction itself
    asks for a tag (:data:`TRAIN_CONTROL_SUFFIXES`, tag from :data:`TRAIN_CONTROL_WORDS`) and the target complies
    (:func:`compose_control_target`), while the data still carries an injection — so the stage learns to follow
    requests in the instruction and ignore those in the data.

    Attack texts holding ``{close_user}`` / ``{close_answer}`` (:mod:`data_builders.completion_attacks`'s
    template category) get ``template_segments``, the run's own chat-template strings
    (:func:`evaluation.template_attacks.role_segments`; the Zephyr strings when None).

    ``counterfactuals`` maps task id → a model paraphrase already checked by :func:`accept_paraphrase`; other
    tasks get :func:`reword`. Raises :class:`DataError` on train/eval attack overlap, and ``ValueError`` if there
    are no tasks, no attacks, an unknown position, an unknown ``canary_style`` or a control fraction outside
    [0, 1).
    """
    check_attack_overlap(train_attacks, eval_attacks)
    for p in positions:
        if p not in POSITIONS:
            raise ValueError(f"unknown injection position {p!r}; expected some of {list(POSITIONS)}")
    if not positions:
        raise ValueError("no injection positions given")
    if not 0 <= control_fraction < 1:
        raise ValueError(f"control_fraction must be in [0, 1), got {control_fraction}")
    pools = {"text": [], "code": []}
    for s in train_attacks:
        pools[s.kind].extend(s.items)
    if not pools["text"] and not pools["code"]:
        raise ValueError("no training attacks given")
    kept = [t for t in tasks if (max_data_chars is None or len(t.data) <= max_data_chars)
            and (max_response_chars is None or len(t.response) <= max_response_chars)]
    n_long = len(tasks) - len(kept)
    if not kept:
        raise ValueError(f"no tasks left (all {len(tasks)} have data longer than max_data_chars={max_data_chars})")
    if triplets_per_task < 1:
        raise ValueError(f"triplets_per_task must be ≥ 1, got {triplets_per_task}")
    if canary_style not in CANARY_STYLES:
        raise ValueError(f"unknown canary_style {canary_style!r}; expected one of {list(CANARY_STYLES)}")
    rng = random.Random(seed)
    order = list(kept)
    rng.shuffle(order)
    jobs = [(t, r) for t in order for r in range(triplets_per_task)]
    if max_triplets is not None:
        jobs = jobs[:max_triplets]
    decks = {}
    for k, items in pools.items():
        deck = list(items)
        rng.shuffle(deck)
        decks[k] = deck
    cursor = {"text": 0, "code": 0}
    crng = random.Random(seed + 1)  # canaries and control tags: their own stream (the attack deal stays as before)
    used_canaries: set = set()

    def plain() -> bool:  # this canary or tag a plain word? ("code" never draws, so its stream is unchanged)
        return canary_style == "word" or (canary_style == "mixed" and crng.random() < 0.5)
    triplets, ids = [], set()
    stats = {"tasks_read": len(tasks), "skipped_long_data": n_long, "by_kind": {}, "by_position": {},
             "by_category": {}, "counterfactual": {}, "generic_responses": 0, "canary_attacks": 0, "controls": 0}
    for i, (task, rep) in enumerate(jobs):
        pool = "code" if task.kind == "code" else "text"
        if not decks[pool]:
            pool = "text" if pool == "code" else "code"
        deck = decks[pool]
        cat, injection = deck[cursor[pool] % len(deck)]
        cursor[pool] += 1
        position = positions[i % len(positions)]
        if counterfactuals and task.id in counterfactuals:
            cf, rule = counterfactuals[task.id], "model"
        else:
            cf, rule = reword(task.data, task.kind)
        base_id = task.id if rep == 0 else f"{task.id}~{rep + 1}"
        tid, n = base_id, 1
        while tid in ids:
            n += 1
            tid = f"{base_id}#{n}"
        ids.add(tid)
        forbidden = "\n".join([task.instruction, task.data, task.response])
        canary = ""
        if has_template_slot(injection):
            injection = fill_template(injection, template_segments)
        injection = injection.strip()
        if CANARY_SLOT in injection:
            canary = (plain_canary(crng, TRAIN_PLAIN_CANARY_WORDS, forbidden) if plain()
                      else fresh_canary(crng, TRAIN_CANARY_WORDS, used_canaries, forbidden, digits=3))
            injection = injection.replace(CANARY_SLOT, canary)
            stats["canary_attacks"] += 1
        row = {"id": tid, "system": task.system, "instruction": task.instruction, "data": task.data,
               "data_counterfactual": cf, "injection": injection, "position": position,
               "response": task.response, "attack_category": cat, "target": task.response,
               "target_source": "gold" if task.response else "model", "hijack": canary,
               "hijack_source": "canary" if canary else "model", "canary": canary}
        if int((i + 1) * control_fraction) > int(i * control_fraction):  # exactly ⌊n·f⌋ of the first n
            suffix, mode = TRAIN_CONTROL_SUFFIXES[stats["controls"] % len(TRAIN_CONTROL_SUFFIXES)]
            tag = (plain_canary(crng, TRAIN_PLAIN_CONTROL_WORDS, forbidden) if plain()
                   else f"{crng.choice(TRAIN_CONTROL_WORDS)}-{crng.randint(100, 999)}")
            row["instruction"] = f"{task.instruction} {suffix.format(tag=tag)}"
            row["control_tag"], row["control_mode"] = tag, mode
            row["target"] = compose_control_target(task.response, tag, mode) if task.response else ""
            stats["controls"] += 1
        triplets.append(row)
        for key, val in (("by_kind", task.kind), ("by_position", position), ("by_category", cat),
                         ("counterfactual", rule)):
            stats[key][val] = stats[key].get(val, 0) + 1
        stats["generic_responses"] += int(task.generic_response and rep == 0)
    stats["triplets"] = len(triplets)
    return BuildResult(triplets=triplets, stats=stats)


def task_group(triplet_id: str) -> str:
    """The task a triplet id belongs to (``"seed-x~2"`` → ``"seed-x"``), for splitting by task."""
    return triplet_id.split("~", 1)[0]


def write_triplets(path: str | Path, triplets: Iterable[dict]) -> Path:
    """Write triplets as JSONL atomically (temp file + rename)."""
    write_jsonl_atomic(path, list(triplets))
    return Path(path)


def validate_triplet(obj: dict, path, line) -> dict:
    """Check one triplet row against the schema; returns it with the schema fields (``response`` may be empty when
    the task has no gold answer; ``target`` defaults to ``response``, ``hijack`` to ``canary`` or "")."""
    out = {}
    for k in TRIPLET_FIELDS:
        out[k] = require_str(obj, k, path, line, allow_empty=(k in ("system", "response")))
    if out["position"] not in POSITIONS:
        raise DataError(path, line, "position", f"{out['position']!r} is not one of {list(POSITIONS)}")
    if out["data"] == out["data_counterfactual"]:
        raise DataError(path, line, "data_counterfactual", "identical to 'data' (a counterfactual must be reworded)")
    for k in TRIPLET_OPTIONAL:
        if k in obj and obj[k] is not None and not isinstance(obj[k], str):
            raise DataError(path, line, k, f"expected a string, got {type(obj[k]).__name__}")
        if k in obj or k not in ("control_tag", "control_mode"):
            out[k] = obj.get(k) or ""
    out["target"] = out["target"] or out["response"]
    out["target_source"] = out["target_source"] or ("gold" if out["response"] else "model")
    out["hijack"] = out["hijack"] or out["canary"]
    out["hijack_source"] = out["hijack_source"] or ("canary" if out["canary"] else "model")
    if out.get("control_tag") and out.get("control_mode") not in ("start", "end"):
        raise DataError(path, line, "control_mode", f"{out['control_mode']!r} is not one of ['start', 'end']")
    if obj.get("adversarial") is not None:  # made by causal.adversarial (evaluation.adaptive.adversarial_triplets)
        if not isinstance(obj["adversarial"], dict) or not isinstance(obj["adversarial"].get("attack"), str):
            raise DataError(path, line, "adversarial", "expected an object with an 'attack' string")
        out["adversarial"] = dict(obj["adversarial"])
    return out


def read_triplets(path: str | Path) -> list[dict]:
    """Read and validate a triplets JSONL file (:class:`DataError` on a bad row or a duplicate id)."""
    rows, ids = [], set()
    for line, obj in iter_jsonl(path):
        t = validate_triplet(obj, path, line)
        if t["id"] in ids:
            raise DataError(path, line, "id", f"duplicate id {t['id']!r}")
        ids.add(t["id"])
        rows.append(t)
    return rows


# --------------------------------------------------------------------------------------------- model paraphrase
PARAPHRASE_PROMPT = ("Reword the text below so that it says exactly the same thing in different words. Keep every "
                     "number, name, date, code snippet, link and e-mail address exactly as written. Reply with the "
                     "reworded text only.\n\n{data}")


def accept_paraphrase(original: str, paraphrase: str | None) -> bool:
    """True if a model paraphrase may replace the rule: non-empty, different, 0.5–2× the length, and the same
    :func:`protected_tokens` (numbers, code spans, URLs, e-mail addresses)."""
    if not paraphrase or not paraphrase.strip():
        return False
    p = paraphrase.strip()
    if p == original.strip() or not 0.5 <= len(p) / max(len(original), 1) <= 2.0:
        return False
    return protected_tokens(p) == protected_tokens(original)


def model_counterfactuals(model, tokenizer, tasks: Sequence[Task], *, batch_size: int = 8,
                          max_new_tokens: int = 256, progress: bool = False) -> tuple[dict[str, str], dict]:
    """Paraphrase the data of prose tasks (kinds email/text) with the model, greedy, batched via
    ``generate_chat``. Returns ``({task id: accepted paraphrase}, {"asked", "accepted", "rejected"})``; rejected
    or skipped tasks (tables, code) fall back to :func:`reword` in :func:`build_triplets`."""
    from staged_alignment.data_builders.generation import generate_chat

    prose = [t for t in tasks if t.kind in ("email", "text")]
    convs = [[{"role": "user", "content": PARAPHRASE_PROMPT.format(data=t.data)}] for t in prose]
    outs = generate_chat(model, tokenizer, convs, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         do_sample=False, progress=progress, desc="counterfactual paraphrases") if convs else []
    accepted = {}
    for t, o in zip(prose, outs):
        if not o["truncated"] and accept_paraphrase(t.data, o["text"]):
            accepted[t.id] = o["text"].strip()
    return accepted, {"asked": len(prose), "accepted": len(accepted), "rejected": len(prose) - len(accepted)}
