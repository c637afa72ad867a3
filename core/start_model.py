"""Where a stage (or an evaluated model) starts: a model folder, a Hub id, or a LoRA adapter on top of its base.

``dpo.base_model``, ``causal.base_model`` and ``evaluate.py --model`` take any of:

* a complete model folder (``config.json`` + safetensors weights): used as it is;
* a Hub model id (``org/name``): the snapshot in the local Hugging Face cache, downloaded (weights, configs and
  tokenizer files only) when it is not cached and ``HF_HUB_OFFLINE`` is not set;
* a LoRA adapter, as a folder or a Hub repo (``adapter_config.json`` + ``adapter_model.safetensors``): merged into
  its base (``base_model_name_or_path`` of its config: a folder or a Hub id, resolved the same way) by
  :func:`core.models.merge_adapter`, into a folder the caller names, reused while the adapter is unchanged
  (generation and the next stage need a plain model; never a 4-bit one).

:func:`check_start` checks a spec without loading or merging anything (config validation, exit 2 with the field
named); :func:`materialize` returns the model folder to load.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from staged_alignment.core.config import ModelSection
from staged_alignment.core.hub import is_hub_id
from staged_alignment.core.sources import offline

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MARKER = "start_model.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "tokenizer*"]


def locate(spec: str, *, download: bool = False) -> Path | None:
    """The local folder of ``spec``: an existing folder as it is; a Hub id's snapshot in the local cache (downloaded
    when ``download`` and not offline); None when it is neither (or a Hub id not cached and not downloaded)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    if not is_hub_id(spec):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, local_files_only=True, allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        if not download or offline():
            return None
    return Path(snapshot_download(spec, allow_patterns=HUB_PATTERNS))


def folder_kind(folder: Path) -> str | None:
    """``"model"`` (config.json + safetensors), ``"adapter"`` (adapter config + safetensors weights) or None."""
    from staged_alignment.core.models import is_complete_model_dir

    if all((folder / f).is_file() for f in ADAPTER_FILES):
        return "adapter"
    if is_complete_model_dir(folder):
        return "model"
    return None


def check_start(spec: str, error) -> dict:
    """Check ``spec`` without loading or merging: ``{"kind": "model"|"adapter"|"hub", "folder", "base"}``.

    ``"hub"``: a Hub id not in the local cache, fetched when the stage runs (online only). ``error(message)`` builds
    the exception to raise (a :class:`core.config.ConfigError` naming the field): not a folder or Hub id, a
    folder that is neither a model nor an adapter, an uncached Hub id while ``HF_HUB_OFFLINE`` is set, an adapter
    whose config names no base or a base that is itself missing.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise error("must be a model folder, a Hub id or a LoRA adapter (folder or Hub repo)")
    folder = locate(spec)
    if folder is None:
        if is_hub_id(spec):
            if offline():
                raise error(f"{spec} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
            return {"kind": "hub", "folder": None, "base": None}
        raise error(f"{spec} is neither an existing folder nor a Hub id (org/name)")
    kind = folder_kind(folder)
    if kind is None:
        raise error(f"{folder} is neither a complete model folder (config.json + *.safetensors) nor a LoRA adapter "
                    f"({' + '.join(ADAPTER_FILES)})")
    base = None
    if kind == "adapter":
        from staged_alignment.core.models import read_json_file

        conf = read_json_file(folder / "adapter_config.json", error)
        base = conf.get("base_model_name_or_path") if isinstance(conf, dict) else None
        if not isinstance(base, str) or not base:
            raise error(f"{folder}/adapter_config.json names no base_model_name_or_path")
        from staged_alignment.core.models import check_weights

        check_weights(folder, error)  # the adapter's safetensors header
        sub = check_start(base, lambda m: error(f"the adapter's base: {m}"))
        if sub["kind"] == "adapter":
            raise error(f"the adapter's base {base} is itself an adapter; merge it first")
    return {"kind": kind, "folder": str(folder), "base": base}


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        with open(folder / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def materialize(spec: str, merged_dir: str | os.PathLike, model_cfg) -> Path:
    """The model folder to load for ``spec``: a model folder or cached/downloaded Hub model as it is; an adapter
    merged into its base at ``merged_dir`` (written atomically, with ``start_model.json`` recording the spec and
    the adapter's sha256, and reused when both match). Raises ``FileNotFoundError`` or ``ValueError`` naming the
    spec when it cannot be resolved."""
    from staged_alignment.core.models import load_tokenizer, merge_adapter, resolve_model_path

    if spec.startswith("embedded:"):
        return Path(resolve_model_path(ModelSection(name_or_path=spec, cache_dir=model_cfg.cache_dir)))
    folder = locate(spec, download=True)
    if folder is None:
        raise FileNotFoundError(f"{spec}: neither a folder nor a Hub id that could be found or downloaded")
    kind = folder_kind(folder)
    if kind == "model":
        return folder
    if kind != "adapter":
        raise ValueError(f"{folder} is neither a complete model folder nor a LoRA adapter")
    merged_dir = Path(merged_dir)
    fp = _fingerprint(folder)
    marker = merged_dir / MARKER
    if marker.is_file() and folder_kind(merged_dir) == "model":
        old = json.loads(marker.read_text())
        if old.get("spec") == spec and old.get("adapter_sha256") == fp:
            return merged_dir
    base_spec = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = materialize(base_spec, merged_dir.with_name(merged_dir.name + "-base"), model_cfg)
    tok_src = folder if (folder / "tokenizer_config.json").is_file() else base
    merge_adapter(str(base), folder, merged_dir, model_cfg, load_tokenizer(str(tok_src), model_cfg))
    tmp = marker.with_name(MARKER + ".tmp")
    tmp.write_text(json.dumps({"spec": spec, "adapter": str(folder), "adapter_sha256": fp, "base": base_spec}))
    os.replace(tmp, marker)
    return merged_dir


def start_dir(spec: str | None, default: Path, merged_dir: Path, state, model_cfg) -> Path:
    """Where a stage starts: ``default`` (the previous stage's merged model) when ``spec`` is empty, else
    :func:`materialize` of ``spec``, the main process first (an adapter is merged once; the others then reuse it).
    ``state``: accelerate's ``PartialState`` of the stage."""
    if not spec:
        return default
    with state.main_process_first():
        return materialize(spec, merged_dir, model_cfg)


def check_models(cfg) -> dict | None:
    """Every model a run starts from, checked without loading: ``dpo.base_model`` and ``causal.base_model`` when set
    (a model folder, a Hub id or an adapter: :func:`check_start`, then the folder's files), then the configured
    model (:func:`core.models.check_model`, whose ``config.json`` it returns). Raises ``ConfigError`` naming the
    field."""
    from staged_alignment.core.models import check_model, check_model_folder

    for field_name in ("dpo.base_model", "causal.base_model"):
        spec = getattr(getattr(cfg, field_name.split(".")[0]), "base_model", None)
        if spec:
            where = check_start(spec, lambda m, f=field_name: cfg.error(f, m))
            if where["kind"] == "model":
                check_model_folder(where["folder"], lambda m, f=field_name: cfg.error(f, m))
    return check_model(cfg)
