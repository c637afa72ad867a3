"""Rows of one data source: a local JSON Lines / JSON file, or anything ``datasets.load_dataset`` reads.

A data source (``core.config.DataSource``) is a mapping ``{"path", "format", "max_rows", "skip_invalid", "name",
"data_dir", "data_files", "split", "revision", "columns"}``, mirroring TRL's dataset config:

* ``*.jsonl``, ``*.jsonl.gz``, ``*.json`` (a JSON list, Alpaca's shape): read line by line by the project's own
  readers, so errors name the file and line;
* everything else goes through ``datasets``: a Hub dataset id (``Anthropic/hh-rlhf`` with ``data_dir:
  harmless-base``), a local folder laid out like a Hub dataset repo (data files + README config), a
  ``save_to_disk`` folder (``datasets.load_from_disk``), or a ``.parquet`` / ``.csv`` / ``.arrow`` file; ``name``,
  ``data_dir``, ``data_files``, ``split`` (default ``train``) and ``revision`` are passed through, and the result
  is cached by ``datasets`` itself. Rows are located as ``row N`` of ``<path>[<split>]``.

* an ``https://`` URL of a line file (``.jsonl``, ``.jsonl.gz``, ``.json``), e.g. BIPIA's files on GitHub pinned to
  a commit: downloaded once into the ``datasets`` download cache (:func:`fetch_url`) and read as a local line file;
  URLs of parquet/csv files go to ``datasets`` directly.

``streaming: true`` reads a ``datasets`` source as an ``IterableDataset`` (``load_dataset(..., streaming=True)``), so
with ``max_rows`` only the first rows are fetched rather than the whole split (``--smoke`` sets it for Hub datasets).

``columns`` renames columns before the format is read (``{"question": "prompt"}``); a column it names that the
source does not have is a :class:`~core.jsonl_io.DataError` naming the source. Nothing is downloaded while
``HF_HUB_OFFLINE`` is set: an uncached Hub dataset or URL is then a located error; :func:`unavailable` tells
beforehand (``--smoke`` and ``--dry-run --target`` use it to stand in the shipped seed data on an offline machine).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from staged_alignment.core.jsonl_io import DataError, error_line, require_file

LINE_SUFFIXES = (".jsonl", ".json", ".gz")  # local files; is_line_name for names and URLs
BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".tsv": "csv"}


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``HF_DATASETS_OFFLINE``) is set: nothing is downloaded; Hub datasets, models
    and URLs come from the cache."""
    return any(os.environ.get(k, "0").lower() in {"1", "true", "yes", "on"}
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _file_part(path) -> str:
    """A path as given, or a URL's path (no query or fragment)."""
    return urlparse(str(path)).path if is_url(path) else str(path)


def file_suffix(path) -> str:
    """The lower-case suffix of a file path or URL (of the URL's path only: no query or fragment)."""
    return Path(_file_part(path)).suffix.lower()


def is_line_name(path) -> bool:
    """A name the project reads line by line: ``.jsonl``, ``.json``, ``.jsonl.gz``, ``.json.gz`` (a file or URL)."""
    return _file_part(path).lower().endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))


def is_url(path) -> bool:
    """An ``http(s)://`` address."""
    return str(path).startswith(("https://", "http://"))


def is_remote(path) -> bool:
    """A source that is fetched rather than found on this machine: a URL, or a Hub dataset id (``org/name``, not an
    existing path, not starting with ``.``/``/``/``~``, no file suffix the project reads)."""
    path = str(path)
    if is_url(path):
        return True
    code_root = Path(__file__).resolve().parents[1]  # where core.config.resolve_input also looks
    if Path(path).expanduser().exists() or (code_root / path).exists() or path.startswith((".", "/", "~")):
        return False
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not is_line_name(path) and file_suffix(path) not in BUILDERS


def url_cache_paths(url: str) -> tuple[Path, Path]:
    """``(datasets' cached file, the project's named link to it)`` of ``url``."""
    import datasets
    from datasets.utils.file_utils import hash_url_to_filename

    downloads = Path(datasets.config.DOWNLOADED_DATASETS_PATH)
    parts = [x for x in _file_part(url).split("/") if x]
    if not parts:
        raise DataError(url, None, "path", "the URL names no file")
    named = downloads / "staged-alignment" / hashlib.sha256(url.encode()).hexdigest()[:16] / Path(*parts[-2:])
    return downloads / hash_url_to_filename(url, etag=None), named


def fetch_url(url: str) -> Path:
    """The local copy of the line file at ``url``, downloaded once by ``datasets``
    (``datasets.utils.file_utils.cached_path`` with ``use_etag=False``: the cache is keyed by the URL alone, so pin
    URLs to a commit) and linked under its own name (``…/staged-alignment/<hash>/<parent>/<file>``), so task ids and
    error messages keep the file's name and its folder.

    Raises :class:`DataError` naming the URL when it is not cached while :func:`offline`, or cannot be downloaded."""
    cached, named = url_cache_paths(url)
    if named.is_file():
        return named
    if not cached.is_file():
        if offline():
            raise DataError(url, None, "path", "not in the local datasets cache and HF_HUB_OFFLINE is set")
        from datasets import DownloadConfig
        from datasets.utils.file_utils import cached_path

        try:
            got = cached_path(url, download_config=DownloadConfig(cache_dir=str(cached.parent), use_etag=False))
        except Exception as e:  # noqa: BLE001 - fsspec/requests raise many types; one located line
            raise DataError(url, None, "path", f"cannot download ({error_line(e)})") from None
        cached = Path(got)
    named.parent.mkdir(parents=True, exist_ok=True)
    tmp = named.with_name(named.name + f".{os.getpid()}.tmp")
    try:
        os.link(cached, tmp)
    except OSError:
        shutil.copyfile(cached, tmp)
    os.replace(tmp, named)
    return named


_PROBED: dict = {}  # (source, offline) → (why it is unavailable or None, whether the Hub answered for it)


@contextlib.contextmanager
def forced_offline():
    """A context in which ``datasets`` and ``huggingface_hub`` do not touch the network (their offline flags, read
    once at import, set for its duration): reading the local cache without five retries per file."""
    import datasets
    import huggingface_hub.constants as hub_constants

    old = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = old


def unavailable(source: dict | str) -> str | None:
    """Why ``source`` cannot be read on this machine now, or None when it can: a local path (a missing one is left
    to the readers' own located errors); a URL that is cached or whose server answers; a Hub dataset the Hub
    answers for (``HfApi.dataset_info``; a missing or gated one is left to the reader's error) or that is in the
    local cache (read without the network). Otherwise "not in the local cache, offline" (``HF_HUB_OFFLINE``), or
    that the Hub (the address) cannot be reached and it is not in the local cache. Answers are remembered for the
    process."""
    return _probe(source)[0]


def hub_answers(source: dict | str) -> bool:
    """Whether the Hub answered for this Hub dataset in :func:`unavailable` (online and reachable)."""
    return _probe(source)[1]


def is_cached(source: dict) -> bool:
    """Whether a remote source reads without the network: a line-file URL already downloaded (:func:`fetch_url`'s
    files), or a Hub dataset in the local ``datasets`` cache (read with :func:`forced_offline`, not streamed)."""
    if is_url(source["path"]):
        return is_line_name(source["path"]) and any(p.is_file() for p in url_cache_paths(source["path"]))
    try:
        with forced_offline():
            load_rows({"split": "train", **source, "streaming": False})
    except DataError:
        return False
    return True


def _probe(source: dict | str) -> tuple[str | None, bool]:
    """``(unavailable reason, the Hub answered)`` of a source, computed once per process and offline state."""
    src = {"split": "train", **({"path": source} if isinstance(source, str) else source), "streaming": False}
    if not is_remote(src["path"]):
        return None, False

    key = (json.dumps({k: src.get(k) for k in ("path", "name", "data_dir", "data_files", "split", "revision")},
                      sort_keys=True, default=str), offline())
    if key not in _PROBED:
        _PROBED[key] = _probe_url(src) if is_url(src["path"]) else _probe_hub(src)
    return _PROBED[key]


def _probe_url(src: dict) -> tuple[str | None, bool]:
    if is_cached(src):
        return None, False
    if offline():
        return "not in the local cache, offline", False
    from huggingface_hub import get_session

    try:
        get_session().head(src["path"], timeout=10, follow_redirects=True)  # any status: the server answered
    except Exception:  # noqa: BLE001 - no answer (DNS, refused, timeout)
        return "the address cannot be reached and it is not in the local cache", False
    return None, False


def _probe_hub(src: dict) -> tuple[str | None, bool]:
    reason = "not in the local cache, offline"
    if not offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError

        try:
            HfApi().dataset_info(src["path"], revision=src.get("revision"), timeout=10)
            return None, True
        except (HfHubHTTPError, HFValidationError):  # the Hub answered (not found, gated, …) or a bad id: the
            return None, False  # reader names it
        except Exception:  # noqa: BLE001 - no answer (DNS, refused, timeout): the cache may still have it
            reason = "the Hub cannot be reached and it is not in the local cache"
    return (None if is_cached(src) else reason), False


def is_line_file(path: str) -> bool:
    """A local file the project reads line by line (JSON Lines, gzip JSON Lines, a JSON list)."""
    p = Path(path)
    return p.is_file() and p.suffix.lower() in LINE_SUFFIXES


def local_folder_cache(folder: Path) -> Path:
    """The ``datasets`` cache folder for a local dataset folder: one per folder and content (its absolute path and
    every file's relative path, size and modification time), under the datasets cache.

    datasets 4.8.5 keys a local folder's build by the folder's name and its README config only: a second folder of
    the same name (other rows, another parent) got the first one's cached rows, and after a rebuild still its
    cached features (measured in ``tests/test_sources.py``). Raises ``OSError`` when the folder cannot be listed."""
    import datasets

    h = hashlib.sha256(str(folder.resolve()).encode())
    for f in sorted(x for x in folder.rglob("*") if x.is_file() and ".git" not in x.parts):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return Path(datasets.config.HF_DATASETS_CACHE) / "staged-alignment-local" / h.hexdigest()[:16]


def source_label(source: dict) -> str:
    """How errors name a ``datasets`` source: ``path[split]`` (with ``name`` / ``data_dir`` when given)."""
    extra = "".join(f", {k}={source[k]}" for k in ("name", "data_dir") if source.get(k))
    return f"{source['path']}[{source.get('split') or 'train'}{extra}]"


def load_rows(source: dict):
    """The ``datasets.Dataset`` of a non-line source (see the module docstring). Raises :class:`DataError` naming
    the source when it cannot be found or read (offline and not cached, a missing split, a bad file)."""
    import datasets

    path, split = source["path"], source.get("split") or "train"
    label = source_label(source)
    p = Path(path)
    try:
        stream = {"streaming": True} if source.get("streaming") else {}
        if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(label, None, "split", f"no split {split!r}; the folder has {sorted(ds)}")
                ds = ds[split]
            return ds
        kwargs = {k: source[k] for k in ("name", "data_dir", "data_files", "revision") if source.get(k)}
        if is_url(path):  # a parquet/csv/arrow file by URL (line files go through fetch_url)
            builder = BUILDERS.get(file_suffix(path))
            if builder is None:
                raise DataError(path, None, "path", "a URL must end in .jsonl, .jsonl.gz, .json, .parquet, .csv or "
                                                    ".arrow")
            return datasets.load_dataset(builder, data_files=path, split=split, **stream)
        if p.is_file():
            builder = BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise DataError(path, None, "path", f"cannot read {p.suffix!r} files; use .jsonl, .json, .parquet, "
                                                    ".csv or .arrow, a dataset folder or a Hub dataset id")
            return datasets.load_dataset(builder, data_files=str(p), split=split, **stream)
        if not p.exists() and "/" not in path and os.sep not in path:
            raise DataError(path, None, "path", "neither an existing file or folder nor a Hub dataset id (org/name)")
        if p.is_dir() and not stream:
            kwargs["cache_dir"] = str(local_folder_cache(p))
        return datasets.load_dataset(path, split=split, **kwargs, **stream)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; one located line
        raise DataError(label, None, None, f"cannot load with datasets ({error_line(e)})") from None


def iter_source(source: dict, line_rows, what: str = "input file") -> tuple[str, Iterator[tuple[object, dict]]]:
    """``(label, rows)`` of one source: ``rows`` yields ``(location, row dict)`` with ``columns`` renamed.

    ``line_rows(path)`` is the reader's own iterator for line files (``(line, row)``); other sources are read by
    :func:`load_rows` and located as ``row N``. A path with a line-file suffix that does not exist is a
    :class:`DataError` naming ``what`` (``require_file``)."""
    renames = dict(source.get("columns") or {})
    path = source["path"]
    if is_url(path) and is_line_name(path):
        path = str(fetch_url(path))
    if Path(path).suffix.lower() in LINE_SUFFIXES:
        require_file(path, what)
    if is_line_file(path):
        label, rows = path, line_rows(Path(path))
    else:
        ds = load_rows(source)
        names = ds.column_names  # None for a stream whose features are not known before reading
        missing = [c for c in renames if names is not None and c not in names]
        if missing:
            raise DataError(source_label(source), None, "columns",
                            f"no column(s) {missing} to rename; the source has {ds.column_names}")
        label = source_label(source)
        # datasets fills a row's absent keys with None (a column of another row): absent again here, so format
        # detection and the parsers see the row as it was written
        rows = ((f"row {i}", {k: v for k, v in r.items() if v is not None}) for i, r in enumerate(ds))

    def renamed():
        for where, row in rows:
            if renames:
                missing_here = [c for c in renames if c not in row]
                if missing_here:
                    raise DataError(label, where, "columns", f"no column(s) {missing_here} to rename")
                row = {renames.get(k, k): v for k, v in row.items()}
            yield where, row

    return label, renamed()
