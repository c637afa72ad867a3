"""Reading and writing JSON Lines with errors that name file, line and field, and atomic writes.

Every reader in ``data_builders`` goes through :func:`iter_jsonl` so a malformed row is reported the same
way everywhere: ``<file>:<line>: field '<field>': <what is wrong>``. Writers never leave a half file:
:func:`atomic_write_text` writes a temporary sibling, fsyncs it and renames it over the target;
:func:`append_jsonl` appends whole lines and fsyncs, and :func:`read_jsonl_tolerant` drops a torn last line
left by a killed writer so an append-only file can always be resumed.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

MAX_JSON_DOCUMENT_BYTES = 1 << 30  # a .json list is parsed whole; JSONL is streamed line by line
MAX_LINE_BYTES = 1_000_000  # a line above 1 MB is almost surely not a data row (e.g. a binary file)


class DataError(ValueError):
    """A bad input: names the file, the 1-based line (or None for a whole-file problem) and the field."""

    def __init__(self, path: str | os.PathLike, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        shown = short_path(self.path)
        where = shown if line is None else f"{shown}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


def error_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line for a located message: ``Type: first line of its text`` (cut at ``limit``
    characters), or ``Type`` alone when it has no text. Libraries (datasets, fsspec, huggingface_hub) raise many
    types with multi-line texts; the user gets one line."""
    text = str(e)
    return type(e).__name__ + (": " + text.splitlines()[0][:limit] if text.strip() else "")


def short_path(path: str, limit: int = 200) -> str:
    """``path`` for a message: as it is up to ``limit`` characters, else its start and end around ``…``."""
    return path if len(path) <= limit else f"{path[:100]}…{path[-60:]}"


NAME_MAX, PATH_MAX = 255, 4096  # bytes, as Linux file systems count them


def path_name_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot name a file on this system, before any ``stat``: a NUL byte, a character that is not
    encodable, a component over :data:`NAME_MAX` bytes or a path over :data:`PATH_MAX`; None when it can."""
    text = os.fspath(path)
    if "\x00" in text:
        return "holds a NUL byte"
    try:
        raw = os.fsencode(text)
    except UnicodeEncodeError:
        return "holds a character the file system cannot encode"
    if len(raw) > PATH_MAX:
        return f"is {len(raw)} bytes long; a path may be at most {PATH_MAX}"
    longest = max((len(c) for c in raw.split(b"/")), default=0)
    if longest > NAME_MAX:
        return f"has a name of {longest} bytes; a file or folder name may be at most {NAME_MAX}"
    return None


def exists(path: str | os.PathLike) -> bool:
    """``Path(path).exists()`` that answers False instead of raising for a name the system cannot stat."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False


def require_file(path: str | os.PathLike, what: str = "input file") -> Path:
    """Return ``Path(path)``; raise :class:`DataError` if it cannot name a file (:func:`path_name_problem`), is
    missing, not a file or empty."""
    p = Path(path)
    problem = path_name_problem(p)
    if problem:
        raise DataError(p, None, None, f"{what} {problem}")
    if not exists(p):
        raise DataError(p, None, None, f"{what} does not exist")
    if not p.is_file():
        raise DataError(p, None, None, f"{what} is not a regular file")
    if p.stat().st_size == 0:
        raise DataError(p, None, None, f"{what} is empty")
    if not os.access(p, os.R_OK):
        raise DataError(p, None, None, f"{what} is not readable (permission denied)")
    return p


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _bounded_lines(fh, p: Path) -> Iterator[tuple[int, bytes]]:
    """``(line_number, bytes)`` of a binary file, reading at most ``MAX_LINE_BYTES + 1`` bytes per line (a
    decompressed single-line bomb never fills memory). A ``.gz`` that is not gzip or is cut short raises
    :class:`DataError` at the line where reading failed."""
    lineno = 0
    while True:
        try:
            raw = fh.readline(MAX_LINE_BYTES + 1)
        except (OSError, EOFError, zlib.error) as e:
            what = "not a gzip file" if "gzip" in str(e).lower() or "magic" in str(e).lower() else "cut short or corrupt"
            raise DataError(p, lineno + 1, None, f"cannot decompress ({what}: {type(e).__name__}: {e})") from None
        if not raw:
            return
        lineno += 1
        if len(raw) > MAX_LINE_BYTES:
            raise DataError(p, lineno, None, f"line is over the {MAX_LINE_BYTES}-byte limit")
        yield lineno, raw


def iter_jsonl(path: str | os.PathLike, *, allow_empty: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file (``.gz`` accepted).

    Raises :class:`DataError` for: a missing or empty file, a line over ``MAX_LINE_BYTES``, bytes that are
    not UTF-8, a line that is not JSON, a line that is not a JSON object, and (unless ``allow_empty``) a file
    with no rows.
    """
    p = require_file(path)
    n = 0
    with _open_text(p) as fh:
        for lineno, raw in _bounded_lines(fh, p):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(p, lineno, None, f"not valid UTF-8 (byte {e.start})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(p, lineno, None, f"malformed JSON ({e.msg}; column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(p, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
            n += 1
            yield lineno, obj
    if n == 0 and not allow_empty:
        raise DataError(p, None, None, "file has no rows")


def load_json(path: str | os.PathLike) -> Any:
    """Load one JSON document, raising :class:`DataError` with the line of a syntax error."""
    p = require_file(path)
    size = p.stat().st_size
    if size > MAX_JSON_DOCUMENT_BYTES:
        raise DataError(p, None, None, f"{size / 2 ** 30:.1f} GiB: a JSON document (not JSONL) is read whole, and "
                                       f"this one is above the {MAX_JSON_DOCUMENT_BYTES >> 30} GiB limit; convert "
                                       "it to JSONL (one row per line), which is streamed")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(p, None, None, f"not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(p, e.lineno, None, f"malformed JSON ({e.msg}; column {e.colno})") from None


def json_list_item_lines(text: str) -> list[int]:
    """1-based line on which each item of a top-level JSON list starts (``text`` must parse as a list).

    Used to report a bad item of a pretty-printed JSON list (Alpaca's ``.json``) by its line, like JSONL rows.
    """
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    lines, n = [], len(text)
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return lines
        lines.append(text.count("\n", 0, i) + 1)
        _, i = dec.raw_decode(text, i)


def require_str(obj: dict, key: str, path, line, *, prefix: str = "", allow_empty: bool = False) -> str:
    """Return ``obj[key]`` if it is a (non-empty, unless ``allow_empty``) string, else raise :class:`DataError`."""
    name = prefix + key
    if key not in obj:
        raise DataError(path, line, name, "missing")
    val = obj[key]
    if not isinstance(val, str):
        raise DataError(path, line, name, f"expected a string, got {type(val).__name__}")
    if not allow_empty and not val.strip():
        raise DataError(path, line, name, "empty string")
    return val


def read_jsonl_tolerant(path: str | os.PathLike) -> list[dict]:
    """Read an append-only JSONL output, dropping a torn (unterminated, unparsable) last line.

    Used to resume generation: a process killed mid-``write`` can leave a partial last line; every earlier
    line was written whole (see :func:`append_jsonl`). A malformed line that is *not* last is an error.
    """
    p = Path(path)
    if not p.exists():
        return []
    rows: list[dict] = []
    lines = p.read_bytes().split(b"\n")
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rows.append(json.loads(raw.decode("utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i == len(lines):  # torn tail (no trailing newline)
                break
            raise DataError(p, i, None, "malformed JSON in the middle of an append-only output") from None
    return rows


def repair_torn_tail(path: str | os.PathLike) -> None:
    """Truncate an append-only JSONL file after its last complete line (no-op if it ends in a newline)."""
    p = Path(path)
    if not p.exists():
        return
    data = p.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with open(p, "r+b") as fh:
        fh.truncate(cut)
        fh.flush()
        os.fsync(fh.fileno())


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Append rows as whole lines, flush and fsync, so a kill loses at most the line being written."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    repair_torn_tail(p)
    with open(p, "a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """:func:`atomic_write_text` of ``json.dumps(obj, indent=2)``."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary sibling name and rename it to ``target`` only when the block succeeds.

    A killed process leaves ``.<name>.partial-*`` behind, never a half ``target``; such leftovers are removed
    on the next call. With ``overwrite`` an existing ``target`` is replaced (moved aside, then deleted).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            if not overwrite:
                raise FileExistsError(target)
            old = target.parent / f".{target.name}.partial-old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def validate_rows(path, parse: Callable[[dict, str, int], Any]) -> list:
    """Parse every row of a JSONL file with ``parse(obj, path, line)``; errors propagate as :class:`DataError`."""
    return [parse(obj, str(path), line) for line, obj in iter_jsonl(path)]


class ConverterParser(argparse.ArgumentParser):
    """``argparse`` for the data converters and builders, with the project's one-line error format: a usage error
    raises :class:`DataError` (``error: command line: …``) instead of printing argparse's usage block."""

    def error(self, message):  # argparse's hook for every usage error
        raise DataError("command line", None, None, f"{self.prog}: {message} (see --help)")


def positive_int(text: str) -> int:
    """``argparse`` type: an integer ≥ 1 (``--n -5`` would slice rows off the end of a list)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1 (got {value})")
    return value


def check_output_file(path: str | os.PathLike, field: str = "--out") -> Path:
    """``path`` as the file a converter will write (atomically, afterwards): refused with :class:`DataError`
    naming ``field`` when it is a folder, an existing non-regular file, or its parent is a file or not writable."""
    p = Path(path)
    if p.is_dir():
        raise DataError(str(p), None, field, "is a folder; give the output file's path (e.g. cases.jsonl)")
    if p.exists() and not p.is_file():
        raise DataError(str(p), None, field, "exists and is not a regular file")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DataError(str(p), None, field, f"{parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise DataError(str(p), None, field, f"{parent} is not writable")
    return p


def os_error_line(e: OSError, unnamed: str = "input") -> str:
    """An ``OSError`` as the one ``error:`` line of an entry point: the file it names (else ``unnamed``) and the
    system's reason."""
    return f"error: {getattr(e, 'filename', None) or unnamed}: {e.strerror or e}"


def run_converter(main_fn: Callable[[], int]) -> int:
    """Run a converter's body under the project's one error handler: a :class:`DataError` (bad input, bad command
    line) or an ``OSError`` (permission, name too long, disk full) becomes one ``error:`` line and exit 2."""
    try:
        return main_fn()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if not hasattr(e, "message"):  # a located config error (core.config.ConfigError) has one; a bug has not
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(os_error_line(e, "output"), file=sys.stderr)
        return 2
