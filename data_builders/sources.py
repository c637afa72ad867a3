"""Rows of one data source: a local JSON Lines / JSON file, or anything ``datasets.load_dataset`` reads.

A data source (``stages.config.DataSource``) is a mapping ``{"path", "format", "max_rows", "skip_invalid", "name",
"data_dir", "data_files", "split", "revision", "columns"}``, mirroring TRL's dataset config:

* ``*.jsonl``, ``*.jsonl.gz``, ``*.json`` (a JSON list, Alpaca's shape): read line by line by the project's own
  readers, so errors name the file and line;
* everything else goes through ``datasets``: a Hub dataset id (``Anthropic/hh-rlhf`` with ``data_dir:
  harmless-base``), a local folder laid out like a Hub dataset repo (data files + README config), a
  ``save_to_disk`` folder (``datasets.load_from_disk``), or a ``.parquet`` / ``.csv`` / ``.arrow`` file; ``name``,
  ``data_dir``, ``data_files``, ``split`` (default ``train``) and ``revision`` are passed through, and the result
  is cached by ``datasets`` itself. Rows are located as ``row N`` of ``<path>[<split>]``.

``columns`` renames columns before the format is read (``{"question": "prompt"}``); a column it names that the
source does not have is a :class:`~data_builders.jsonl_io.DataError` naming the source. Nothing is downloaded while
``HF_HUB_OFFLINE`` is set: an uncached Hub dataset is then a located error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from data_builders.jsonl_io import DataError

LINE_SUFFIXES = (".jsonl", ".json", ".gz")
BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".tsv": "csv"}


def is_line_file(path: str) -> bool:
    """A local file the project reads line by line (JSON Lines, gzip JSON Lines, a JSON list)."""
    p = Path(path)
    return p.is_file() and p.suffix.lower() in LINE_SUFFIXES


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
        if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(label, None, "split", f"no split {split!r}; the folder has {sorted(ds)}")
                ds = ds[split]
            return ds
        kwargs = {k: source[k] for k in ("name", "data_dir", "data_files", "revision") if source.get(k)}
        if p.is_file():
            builder = BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise DataError(path, None, "path", f"cannot read {p.suffix!r} files; use .jsonl, .json, .parquet, "
                                                    ".csv or .arrow, a dataset folder or a Hub dataset id")
            return datasets.load_dataset(builder, data_files=str(p), split=split)
        if not p.exists() and "/" not in path and os.sep not in path:
            raise DataError(path, None, "path", "neither an existing file or folder nor a Hub dataset id (org/name)")
        return datasets.load_dataset(path, split=split, **kwargs)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; one located line
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise DataError(label, None, None, f"cannot load with datasets ({type(e).__name__}: {msg})") from None


def iter_source(source: dict, line_rows, what: str = "input file") -> tuple[str, Iterator[tuple[object, dict]]]:
    """``(label, rows)`` of one source: ``rows`` yields ``(location, row dict)`` with ``columns`` renamed.

    ``line_rows(path)`` is the reader's own iterator for line files (``(line, row)``); other sources are read by
    :func:`load_rows` and located as ``row N``. A path with a line-file suffix that does not exist is a
    :class:`DataError` naming ``what`` (``require_file``)."""
    from data_builders.jsonl_io import require_file

    renames = dict(source.get("columns") or {})
    path = source["path"]
    if Path(path).suffix.lower() in LINE_SUFFIXES:
        require_file(path, what)
    if is_line_file(path):
        label, rows = path, line_rows(Path(path))
    else:
        ds = load_rows(source)
        missing = [c for c in renames if c not in ds.column_names]
        if missing:
            raise DataError(source_label(source), None, "columns",
                            f"no column(s) {missing} to rename; the source has {ds.column_names}")
        label = source_label(source)
        rows = ((f"row {i}", dict(r)) for i, r in enumerate(ds))

    def renamed():
        for where, row in rows:
            if renames:
                missing_here = [c for c in renames if c not in row]
                if missing_here:
                    raise DataError(label, where, "columns", f"no column(s) {missing_here} to rename")
                row = {renames.get(k, k): v for k, v in row.items()}
            yield where, row

    return label, renamed()
