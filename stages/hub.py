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
import shutil
from pathlib import Path

from data_builders.jsonl_io import atomic_directory

log = logging.getLogger(__name__)
STAGE_TITLES = {"sft": "Zephyr SFT", "dpo": "Constitutional DPO", "causal": "Causal contrastive (prompt injection)"}


class HubPushError(RuntimeError):
    """The upload failed; local artifacts are intact."""


def escape_md(text: str) -> str:
    """Escape untrusted text for Markdown/HTML (model cards, reports): HTML entities and Markdown specials."""
    text = html.escape(str(text), quote=True)
    for ch in "\\`*_{}[]()#+!|":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", " ")


def model_card(cfg, stage: str, metrics: dict, sources: list[str]) -> str:
    """Model card text naming base model, stage, data sources, config and metrics (untrusted text escaped)."""
    from stages.config import resolved_yaml

    lines = ["---", "library_name: peft", f"base_model: {escape_md(cfg.model.name_or_path)}",
             "tags: [staged-alignment, lora, " + stage + "]", "---", "",
             f"# {escape_md(cfg.run_name)}: {STAGE_TITLES.get(stage, stage)} adapter", "",
             f"- **Base model:** `{escape_md(cfg.model.name_or_path)}` (chat template: {cfg.model.chat_template})",
             f"- **Stage:** {stage}",
             "- **Data sources:** " + (", ".join(escape_md(s) for s in sources) or "none recorded"), "",
             "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {escape_md(k)} | {escape_md(v)} |" for k, v in sorted((metrics or {}).items())]
    safe_yaml = html.escape(resolved_yaml(cfg), quote=False).replace("```", "'''")  # no raw HTML from data
    lines += ["", "## Config", "", "```yaml", safe_yaml, "```", ""]
    return "\n".join(lines)


def stage_sources(cfg, stage: str) -> list[str]:
    sec = getattr(cfg, stage)
    keys = {"sft": ["data"], "dpo": ["prompts"], "causal": ["tasks", "train_attacks"]}.get(stage, [])
    out = [s["path"] if isinstance(s, dict) else str(s) for k in keys for s in getattr(sec, k)]
    if stage == "dpo":
        out.append(cfg.dpo.constitution)
    return out


def push_stage_adapter(cfg, stage: str, adapter_dir: str | Path, metrics: dict | None = None,
                       extra_files: list | None = None) -> Path | str:
    """Build the upload folder (adapter files, extra files, README.md) and push it, or write it (dry run).

    Returns the dry-run folder, or the repo URL. Raises :class:`HubPushError` (one clear message) when the
    upload fails, and ``ValueError`` when ``hub_model_id`` is not set for the stage.
    """
    repo_id = getattr(cfg, stage).hub_model_id
    if not repo_id:
        raise ValueError(f"{stage}.hub_model_id is not set; set it or turn hub.push_to_hub off")
    if cfg.hub.organization and "/" not in repo_id:
        repo_id = f"{cfg.hub.organization}/{repo_id}"
    upload = cfg.run_dir / stage / "hub_upload"
    with atomic_directory(upload) as tmp:
        for f in Path(adapter_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        for f in extra_files or []:
            shutil.copy2(f, tmp / Path(f).name)
        (tmp / "README.md").write_text(model_card(cfg, stage, metrics or {}, stage_sources(cfg, stage)))
        (tmp / "training_metrics.json").write_text(json.dumps(metrics or {}, indent=2, default=str))
    if cfg.hub.push_dry_run:
        log.info("hub dry run: %s would be uploaded to %s (private=%s)", upload, repo_id, cfg.hub.private)
        return upload
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=cfg.hub.private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(upload),
                                 commit_message=f"{cfg.run_name}: {stage} adapter")
    except Exception as e:  # network, auth, permissions: one message, never the token
        reason = type(e).__name__ + (": " + str(e).splitlines()[0][:200] if str(e) else "")
        raise HubPushError(f"push of the {stage} adapter to {repo_id} failed ({reason}); local artifacts are "
                           f"saved in {adapter_dir} and {upload}") from None
    return str(getattr(info, "commit_url", repo_id))
