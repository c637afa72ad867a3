"""Pushing a stage's adapter (and projection head) to the Hugging Face Hub with a model card.

The token comes from ``HF_TOKEN`` or the ``huggingface-cli login`` store through huggingface_hub itself; this
module never reads, prints, logs or writes it. ``hub.push_dry_run`` writes exactly the folder that would be
uploaded to ``<run_dir>/<stage>/hub_upload`` and uploads nothing. A push is attempted only after every local
artifact is saved; without network it fails fast with one :class:`HubPushError` message.
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from staged_alignment.core.config import resolved_yaml
from staged_alignment.core.jsonl_io import atomic_directory, atomic_write_text, error_line
from staged_alignment.core.run_dir import Manifest

log = logging.getLogger(__name__)
DATA_SUFFIXES = {".json", ".jsonl", ".gz", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".yaml", ".yml"}
STAGE_TITLES = {"sft": "Zephyr SFT", "dpo": "Constitutional DPO", "causal": "Causal contrastive (prompt injection)"}


class HubPushError(RuntimeError):
    """The upload failed; local artifacts are intact."""


def escape_md(text: str) -> str:
    """Escape untrusted text for Markdown/HTML (model cards, reports): HTML entities and Markdown specials."""
    text = html.escape(str(text), quote=True)
    for ch in "\\`*_{}[]()#+!|":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", " ")


def is_hub_id(name) -> bool:
    """A Hub repo id by huggingface_hub's own rule (``validate_repo_id``), not an existing local path and not a
    data file's path (a suffix in :data:`DATA_SUFFIXES`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or "/" not in name or Path(name).exists() or name.startswith(("embedded:", ".")):
        return False
    if Path(name).suffix.lower() in DATA_SUFFIXES:  # a data file's path (data/x.jsonl), not a repo
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def stage_repo_id(cfg, stage: str, merged: bool = False) -> str | None:
    """``<stage>.hub_model_id`` with ``hub.organization`` prefixed where it has no owner; ``-merged`` for the merged
    model's repo; None when the stage has no repo."""
    repo_id = getattr(cfg, stage).hub_model_id
    if not repo_id:
        return None
    if cfg.hub.organization and "/" not in repo_id:
        repo_id = f"{cfg.hub.organization}/{repo_id}"
    return repo_id + ("-merged" if merged else "")


def previous_stage(cfg, stage: str) -> str | None:
    """The stage whose merged model ``stage`` trains on: dpo ← sft, causal ← ``causal.base``; None for sft."""
    return {"sft": None, "dpo": "sft", "causal": cfg.causal.base}.get(stage)


def base_model_id(cfg, stage: str) -> str | None:
    """The Hub repo a stage's adapter loads on, for the card's ``base_model`` (None when it is not on the Hub).

    SFT: ``model.name_or_path`` when it is a Hub id; for an embedded model, the Hub model it was converted from.
    DPO and causal: the previous stage's merged model, which is on the Hub only when that stage pushes it
    (``hub.push_to_hub``, ``hub.push_merged`` and its ``hub_model_id``). A local folder gives None: the Hub refuses
    a ``base_model`` that is not a repo id.
    """
    prev = previous_stage(cfg, stage)
    if prev is None:
        name = cfg.model.name_or_path
        if isinstance(name, str) and name.startswith("embedded:"):
            from staged_alignment.core.models import EMBEDDED

            return EMBEDDED[name][3] if name in EMBEDDED else None
        return name if is_hub_id(name) else None
    if cfg.hub.push_to_hub and cfg.hub.push_merged and stage_repo_id(cfg, prev):
        return stage_repo_id(cfg, prev, merged=True)
    return None


# metrics.json keys reported as model-index results (the key is the metric_type) and their readable names
EVAL_METRICS = (("attack_success_rate", "attack success rate (held-out injections)"),
                ("utility_clean", "utility without injection"),
                ("utility_under_attack", "utility under attack"),
                ("harmful_refusal_rate", "refusal rate on red-team prompts"),
                ("benign_over_refusal_rate", "over-refusal rate on benign prompts"))


def eval_results(metrics: dict, label: str) -> list:
    """``huggingface_hub.EvalResult`` entries (the card's ``model-index``) of the model ``label`` in an evaluation's
    ``metrics.json``: attack success rate, utility clean and under attack (dataset: the injection eval file, its
    case count in the name), refusal and over-refusal rates (the red-team and benign prompts). Metrics that are
    missing or null are left out; [] when ``label`` was not evaluated."""
    from huggingface_hub import EvalResult

    m = (metrics.get("models") or {}).get(label)
    if not m:
        return []
    eval_file = Path(str(metrics.get("eval_file") or "injection eval")).name
    out = []
    for key, name in EVAL_METRICS:
        value = m.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):  # the Hub refuses NaN in model-index
            continue
        if key == "harmful_refusal_rate":
            dtype, dname, n = "redteam-prompts", "held-out red-team prompts", m.get("n_redteam")
        elif key == "benign_over_refusal_rate":
            dtype, dname, n = "benign-prompts", "benign prompts", m.get("n_benign")
        else:
            dtype, dname, n = Path(eval_file).stem, f"injection cases of {eval_file}", m.get("n_cases")
        out.append(EvalResult(task_type="text-generation", task_name="prompt-injection robustness and safety",
                              dataset_type=f"staged-alignment/{dtype}",
                              dataset_name=dname + (f" (n={n})" if n is not None else ""),
                              metric_type=key, metric_name=name, metric_value=round(float(value), 4)))
    return out


def card_data(cfg, stage: str, sources: list[str], merged: bool = False, results: list | None = None):
    """``huggingface_hub.ModelCardData`` of a stage's adapter (``library_name: peft``) or merged model
    (``transformers``): base_model (:func:`base_model_id`, with ``base_model_relation``), tags, the sources that are
    Hub datasets, pipeline tag, and ``results`` (:func:`eval_results`) as the ``model-index``."""
    from huggingface_hub import ModelCardData

    base = base_model_id(cfg, stage)
    kw = dict(library_name="transformers" if merged else "peft", pipeline_tag="text-generation",
              tags=["staged-alignment", stage, "merged" if merged else "lora"],
              datasets=[s for s in sources if is_hub_id(s)] or None, model_name=stage_repo_id(cfg, stage, merged))
    if base:
        kw.update(base_model=base, base_model_relation="finetune" if merged else "adapter")
    if results:
        kw["eval_results"] = results
    return ModelCardData(**kw)


def model_card(cfg, stage: str, metrics: dict, sources: list[str], merged: bool = False,
               results: list | None = None) -> str:
    """The card (``huggingface_hub.ModelCard`` text): YAML metadata from :func:`card_data` (written by
    huggingface_hub, so no Markdown escaping inside it), then a body naming the base, the stage, the data sources,
    the metrics and the resolved config, with every untrusted string escaped (:func:`escape_md`)."""
    from huggingface_hub import ModelCard

    data = card_data(cfg, stage, sources, merged, results)
    prev = previous_stage(cfg, stage)
    trained_on = data.base_model or (f"the merged {prev} model of this run (`{prev}/merged`; push it with "
                                     "`hub.push_merged: true` to make this card name it)" if prev else
                                     f"the local model `{escape_md(cfg.model.name_or_path)}`")
    what = "merged model (the adapter folded into its base)" if merged else "LoRA adapter"
    lines = [f"# {escape_md(cfg.run_name)}: {STAGE_TITLES.get(stage, stage)} {what}", "",
             f"- **Trained on:** {escape_md(trained_on) if data.base_model else trained_on}",
             f"- **Stage:** {stage}; chat template: {escape_md(Path(cfg.model.chat_template).name)}",
             "- **Data sources:** " + (", ".join(escape_md(s) for s in sources) or "none recorded")]
    if isinstance(cfg.model.name_or_path, str) and cfg.model.name_or_path.startswith("embedded:"):
        lines.append("- **Note:** trained on the project's embedded copy of the base, converted from a Q4_1 GGUF: "
                     "a degraded copy of the model named as base_model.")
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {escape_md(k)} | {escape_md(v)} |" for k, v in sorted((metrics or {}).items())]
    safe_yaml = html.escape(resolved_yaml(cfg), quote=False).replace("```", "'''")  # no raw HTML from data
    lines += ["", "## Config", "", "```yaml", safe_yaml, "```", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def stage_sources(cfg, stage: str) -> list[str]:
    sec = getattr(cfg, stage)
    keys = {"sft": ["data"], "dpo": ["prompts"], "causal": ["tasks", "train_attacks"]}.get(stage, [])
    out = [s["path"] if isinstance(s, Mapping) else str(s) for k in keys for s in getattr(sec, k)]
    if stage == "dpo":
        out.append(cfg.dpo.constitution)
    return out


def _fill_upload(tmp: Path, folder: Path, extra_files) -> None:
    for f in Path(folder).iterdir():
        if f.is_file():
            try:
                os.link(f, tmp / f.name)  # large merged weights: a hard link, not a copy, where the disk allows
            except OSError:
                shutil.copy2(f, tmp / f.name)
    for f in extra_files or []:
        shutil.copy2(f, tmp / Path(f).name)


def _upload(cfg, repo_id: str, folder: Path, what: str, local: str) -> str:
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=cfg.hub.private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"{cfg.run_name}: {what}")
    except Exception as e:  # network, auth, permissions: one message, never the token
        raise HubPushError(f"push of the {what} to {repo_id} failed ({error_line(e, 200)}); local artifacts are "
                           f"saved in {local} and {folder}") from None
    return str(getattr(info, "commit_url", repo_id))


def upload_folder(cfg, stage: str, merged: bool = False) -> Path:
    """The folder written for a stage's upload: ``<run>/<stage>/hub_upload`` (``hub_upload_merged``)."""
    return cfg.run_dir / stage / ("hub_upload_merged" if merged else "hub_upload")


def pushed_key(cfg) -> str:
    """The manifest output key of a stage's push: ``hub_upload`` (the folder, dry run) or ``hub`` (the repo URL)."""
    return "hub_upload" if cfg.hub.push_dry_run else "hub"


def push_stage_adapter(cfg, stage: str, adapter_dir: str | Path, metrics: dict | None = None,
                       extra_files: list | None = None, merged_dir: str | Path | None = None) -> Path | str:
    """Build the upload folder (adapter files, extra files, README.md card, training_metrics.json) and push it, or
    write it (dry run); with ``hub.push_merged`` also the merged model (``merged_dir``, default the adapter's
    sibling ``merged``) to ``<repo>-merged``, its folder ``hub_upload_merged``.

    Returns the dry-run folder, or the adapter repo's URL. Raises :class:`HubPushError` (one clear message) when an
    upload fails, and ``ValueError`` when ``hub_model_id`` is not set for the stage or the merged folder is missing.
    """
    repo_id = stage_repo_id(cfg, stage)
    if not repo_id:
        raise ValueError(f"{stage}.hub_model_id is not set; set it or turn hub.push_to_hub off")
    sources = stage_sources(cfg, stage)
    uploads = [(repo_id, Path(adapter_dir), upload_folder(cfg, stage), False, list(extra_files or []))]
    if cfg.hub.push_merged:
        merged = Path(merged_dir) if merged_dir else Path(adapter_dir).parent / "merged"
        if not (merged / "config.json").is_file():
            raise ValueError(f"hub.push_merged: no merged model at {merged}")
        uploads.append((stage_repo_id(cfg, stage, merged=True), merged, upload_folder(cfg, stage, merged=True), True,
                        []))
    for rid, src, upload, is_merged, extra in uploads:
        with atomic_directory(upload) as tmp:
            _fill_upload(tmp, src, extra)
            (tmp / "README.md").write_text(model_card(cfg, stage, metrics or {}, sources, merged=is_merged))
            (tmp / "training_metrics.json").write_text(json.dumps(metrics or {}, indent=2, default=str))
    if cfg.hub.push_dry_run:
        for rid, _, upload, _, _ in uploads:
            log.info("hub dry run: %s would be uploaded to %s (private=%s)", upload, rid, cfg.hub.private)
        return uploads[0][2]
    urls = [_upload(cfg, rid, upload, f"{stage} {'merged model' if m else 'adapter'}", str(src))
            for rid, src, upload, m, _ in uploads]
    return urls[0]


def push_eval_results(cfg, metrics: dict) -> dict:
    """After evaluation: rewrite the card (``README.md``) of every stage whose adapter was pushed in this run, as the
    run's manifest records it (``hub`` after an upload, ``hub_upload`` after a dry run, the mode the config now
    asks for), and of its merged model with ``hub.push_merged``, with that model's results as ``model-index``
    (:func:`eval_results` of the stage's label in ``metrics``); upload only that file (dry run: the upload folder's
    card is rewritten, nothing is uploaded).

    Returns ``{stage: repo id or folder}``, plus ``hub_error`` when anything failed (the evaluation is kept).
    """
    if not (cfg.hub.push_to_hub or cfg.hub.push_dry_run):
        return {}
    done: dict = {}
    try:
        _push_eval_results(cfg, metrics, done)
    except Exception as e:  # noqa: BLE001 - network, Hub, a bad training_metrics.json: one line, files kept
        done["hub_error"] = f"updating the pushed cards with the evaluation results failed ({error_line(e, 200)})"
    return done


def _push_eval_results(cfg, metrics: dict, done: dict) -> None:
    recorded = Manifest(cfg.run_dir).read()["stages"]
    for stage in ("sft", "dpo", "causal"):
        results = eval_results(metrics, stage)
        pushed = pushed_key(cfg) in ((recorded.get(stage) or {}).get("outputs") or {})
        if not results or not stage_repo_id(cfg, stage) or not pushed:
            continue
        for merged in (False, True) if cfg.hub.push_merged else (False,):
            folder = upload_folder(cfg, stage, merged)
            card = folder / "README.md"
            if not card.is_file():
                continue
            trained = folder / "training_metrics.json"
            train_metrics = json.loads(trained.read_text()) if trained.is_file() else {}
            atomic_write_text(card, model_card(cfg, stage, train_metrics, stage_sources(cfg, stage), merged=merged,
                                               results=results))
            rid = stage_repo_id(cfg, stage, merged=merged)
            if cfg.hub.push_dry_run:
                done[stage + ("-merged" if merged else "")] = str(folder)
                continue
            from huggingface_hub import HfApi

            HfApi().upload_file(path_or_fileobj=str(card), path_in_repo="README.md", repo_id=rid,
                                commit_message="Evaluation results (model-index) from staged-alignment")
            done[stage + ("-merged" if merged else "")] = rid
