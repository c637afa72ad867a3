"""Stage 2 trainer: the causal stage on prompt-injection triplets (output-level targets, invariance, contrast).

:class:`CausalContrastiveTrainer` (a ``transformers.Trainer``) takes the (V·B, L) batches of
:class:`data_builders.token_cache.TripletCollator` — the views the objective needs
(:func:`core.causal_objective.needed_views`: benign, injected, counterfactual, hijack), B rows each — and, in
ONE forward pass with ``output_hidden_states=True``, computes the terms of ``trainers/causal_losses.py``:

    L = λ_task·NLL(y|x_b) + λ_lm_injected·NLL(y|x_i) + λ_lm_counterfactual·NLL(y|x_c)
        + λ_kl·KL-invariance + λ_pref·SecAlign-DPO(y ≻ y_a | x_i) + contrastive (v1 | v2 | none)
        + λ_retain_sft·NLL(chosen|x_r) + λ_retain_dpo·DPO(chosen ≻ rejected | x_r)      (retention, replayed pairs)

Everything that touches parameters runs inside ONE call of the (DDP/FSDP/ZeRO-3-wrapped) model,
:meth:`CausalPeftModel.forward`: the fused forward, next-token logits at the response positions only (the output
embedding applied to the final hidden states of those positions; models that post-process logits get the model's
own logits there instead), never the whole (V·B, L, vocab) tensor; the reference log-probs (one no-grad forward of
the rows ``pref_injected`` and ``retain_dpo`` need, with the LoRA adapter disabled: the reference model = the
starting model, as in the DPO stage); the pooling and the projection head. ``compute_loss`` only combines the
tensors it returns.

Gradient accumulation is exact (one optimizer step over k micro-batches = one step over their union):

* LM terms: ``Σ_v λ_v Σ_tokens NLL_v / N_y``, where N_y = ``num_items_in_batch`` / (number of LM views) is the
  number of target tokens of the whole optimizer step (every LM view holds the same y, so each view has N_y
  labelled tokens); ``num_items_in_batch`` is what ``Trainer.get_batch_samples`` counts over ALL micro-batches of
  the step (labels ≠ −100), summed over processes when ``average_tokens_across_devices``. Because DDP then
  *averages* gradients across the P processes, the loss is multiplied by P (as ``Trainer.compute_loss`` does;
  ``model_accepts_loss_kwargs`` is forced True so Trainer neither divides by the accumulation steps nor skips the
  count).
* per-triplet terms (KL, preference, contrastive): a per-micro-batch mean over its B_micro triplets weighted by
  B_micro / B_step, B_step = triplets of the whole step (all micro-batches, all processes; counted in
  :meth:`get_batch_samples`), so the weighted means add up to the mean over the step's triplets. (With v1 InfoNCE
  ``in_batch_negatives`` the negatives differ between one big batch and micro-batches; documented, not corrected.)

Without ``num_items_in_batch`` (evaluation, a direct call), LM terms are per-view token means and the per-triplet
terms micro-batch means.

Logged (Trainer's log keys; W&B/TensorBoard show them as ``train/<key>`` and ``eval/<key>``): ``loss_lm``,
``loss_lm_injected``, ``loss_lm_counterfactual`` (token-mean NLL of y per view present, also when its weight is 0),
``loss_kl``, ``loss_pref``, ``loss_contrastive``, ``margin_injected`` = mean[log p(y|x_i) − log p(y_a|x_i)] (when
the hijack view is present), ``loss_retain_sft`` (token-mean NLL of the replayed chosen answers, whenever they are in
the batch), ``loss_retain_dpo`` and ``retain_margin`` (the replayed pairs' log-ratio margin, before β), and
(the one definition shared with evaluation) with a prefix naming the space: ``head_*`` on the projection head's
outputs (v1: prompt-pooled; v2: response-pooled) and ``pooled_*`` on the prompt-pooled hidden states before any
head. Training values are averaged over the triplets seen since the last log; evaluation values are running sums.

The head (only when a contrastive term is on) is saved in every checkpoint and adapter folder as
``causal_projection.safetensors`` (+ ``causal_projection.json`` with its type, dims, pooling and layer), restored on
resume and with ``load_best_model_at_end``; :func:`load_projection_head` loads it for evaluation. Only safetensors.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.utils import ModelOutput

from staged_alignment.core.causal_objective import (  # noqa: F401
    HEAD_PREFIX,
    CausalHeadSettings,
    CausalLossSettings,
    head_field_names,
    loss_field_names,
    needed_views,
)
from staged_alignment.core.chat_template import prompt_ids, prompt_response_ids
from staged_alignment.core.settings import check, field_infos, plain_type
from staged_alignment.trainers.causal_losses import (
    CONTRASTIVE,
    ProjectionHead,
    anchored_infonce,
    build_projection_head,
    check_temperature,
    contrastive_loss,
    dpo_sigmoid_loss,
    logits_agree,
    pool_hidden_states,
    sequence_logps,
    token_kl,
)
from staged_alignment.trainers.representation import representation_metrics

log = logging.getLogger(__name__)

HEAD_WEIGHTS = "causal_projection.safetensors"
HEAD_CONFIG = "causal_projection.json"
HEAD_ATTR = "causal_projection_head"
STEP_KEYS = ("step_triplets",)
REP_KEYS = ("cos_benign_counterfactual", "cos_benign_injected", "causal_discrimination")
METRIC_KEYS = ("loss_lm", "loss_lm_injected", "loss_lm_counterfactual", "loss_kl", "loss_pref", "loss_contrastive",
               "margin_injected", "loss_retain_sft", "loss_retain_dpo", "retain_margin") + \
    tuple(f"{space}_{k}" for space in ("head", "pooled") for k in REP_KEYS)


# --------------------------------------------------------------------------------------------- head files
def save_projection_head(head: ProjectionHead, directory: str | os.PathLike, extra: dict | None = None,
                         state: dict | None = None) -> Path:
    """Write ``causal_projection.safetensors`` and ``causal_projection.json`` into ``directory``; returns the
    weights path. ``extra`` (e.g. ``{"pool_layer": -1}``) is stored in the JSON. ``state`` (the head's own keys,
    full tensors, e.g. :func:`core.sharded.sub_state` of a gathered state dict) replaces the module's local
    weights, which are shards under FSDP/ZeRO-3; ``ValueError`` if its keys differ from the head's."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if state is not None and set(state) != set(head.state_dict()):
        raise ValueError(f"head state keys {sorted(state)} differ from the head's {sorted(head.state_dict())}")
    src = state if state is not None else head.state_dict()
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in src.items()}
    save_file(state, str(d / HEAD_WEIGHTS), metadata={"format": "pt"})
    meta = {**head.config(), "pooling": "prompt", **(extra or {})}
    (d / HEAD_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return d / HEAD_WEIGHTS


def _head_paths(adapter_dir_or_file: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(adapter_dir_or_file)
    weights = p if p.suffix == ".safetensors" else p / HEAD_WEIGHTS
    return weights, weights.with_name(HEAD_CONFIG)


def read_head_config(adapter_dir_or_file: str | os.PathLike) -> dict:
    """The head's JSON (type, in_dim, dim, hidden, pool_layer, …); ``FileNotFoundError`` naming the path."""
    _, cfg_path = _head_paths(adapter_dir_or_file)
    if not cfg_path.is_file():
        raise FileNotFoundError(f"causal projection head config not found: {cfg_path}")
    return json.loads(cfg_path.read_text())


def load_projection_head(adapter_dir_or_file: str | os.PathLike, hidden_size: int) -> nn.Module:
    """Load the projection head saved beside an adapter (folder or the ``.safetensors`` path itself).

    Args:
        adapter_dir_or_file: ``causal/adapter`` (or a checkpoint folder), or the weights file.
        hidden_size: the model's hidden size H, checked against the saved head's input dim.
    Returns:
        the :class:`ProjectionHead` (float32, CPU, eval mode): (N, H) → (N, D).
    Raises:
        FileNotFoundError: the weights or JSON are missing (message names the path).
        ValueError: the saved input dim differs from ``hidden_size``, or the weights do not match the JSON.
    """
    from safetensors.torch import load_file

    weights, _ = _head_paths(adapter_dir_or_file)
    if not weights.is_file():
        raise FileNotFoundError(f"causal projection head not found: {weights} (expected beside the adapter; was "
                                "this adapter trained by the causal stage?)")
    meta = read_head_config(adapter_dir_or_file)
    if int(meta["in_dim"]) != int(hidden_size):
        raise ValueError(f"{weights}: head input dim {meta['in_dim']} ≠ model hidden size {hidden_size}")
    head = ProjectionHead(meta["type"], int(meta["in_dim"]), int(meta["dim"]), int(meta["hidden"]))
    try:
        head.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights}: weights do not match {HEAD_CONFIG}: {e}") from None
    return head.eval()


def _load_head_into(head: ProjectionHead, directory: str | os.PathLike) -> None:
    """Copy saved head weights into ``head`` in place (keeps the Parameter objects the optimizer holds)."""
    loaded = load_projection_head(directory, head.in_dim)
    if loaded.config() != head.config():
        raise ValueError(f"{directory}: saved head {loaded.config()} differs from the configured {head.config()}")
    with torch.no_grad():
        for (n, p), (n2, q) in zip(head.state_dict(keep_vars=True).items(), loaded.state_dict().items()):
            p.copy_(q.to(p.device, p.dtype))


# --------------------------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_views(model, tokenizer, conversations: Sequence, responses: Sequence[str] | None = None,
                 head: nn.Module | None = None, layer: int = -1, pooling: str = "prompt", batch_size: int = 8, *,
                 max_length: int | None = None) -> torch.Tensor:
    """Representations of prompts (or of prompt + response), pooled exactly as in training.

    Each conversation is a message list rendered with the tokenizer's chat template as a generation prompt (a
    string is taken as one user message). ``pooling="prompt"``: the hidden states of ``layer`` mean-pooled over the
    prompt tokens; ``pooling="response"``: the prompt is followed by ``responses[i]`` + eos, tokenized jointly as in
    the token cache (:func:`core.chat_template.prompt_response_ids`), and the states are pooled over the
    response tokens (contrastive v2). With ``head`` the pooled vectors are projected.

    Returns:
        (N, D) float32 CPU tensor (D = head output dim, or the hidden size H without a head).
    Raises:
        ValueError: empty input, unknown pooling, missing responses, or a sequence longer than ``max_length``.
    """
    if not conversations:
        raise ValueError("encode_views needs at least one conversation")
    if pooling not in ("prompt", "response"):
        raise ValueError(f"pooling must be 'prompt' or 'response', got {pooling!r}")
    if pooling == "response" and (responses is None or len(responses) != len(conversations)):
        raise ValueError("response pooling needs one response per conversation")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if head is not None:
        head_was_training = head.training
        head.eval()
        head.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    try:
        for start in range(0, len(conversations), batch_size):
            seqs, masks = [], []
            for j, item in enumerate(conversations[start:start + batch_size]):
                msgs = [{"role": "user", "content": item}] if isinstance(item, str) else list(item)
                if pooling == "prompt":
                    ids = prompt_ids(tokenizer, msgs)
                    m = [1] * len(ids)
                else:
                    ids, n_prompt = prompt_response_ids(tokenizer, msgs, responses[start + j])
                    m = [0] * n_prompt + [1] * (len(ids) - n_prompt)
                if max_length is not None and len(ids) > max_length:
                    raise ValueError(f"sequence {start + j} has {len(ids)} tokens > max_length={max_length}")
                seqs.append(ids)
                masks.append(m)
            L = max(len(x) for x in seqs)
            input_ids = torch.full((len(seqs), L), pad, dtype=torch.long)
            attn = torch.zeros((len(seqs), L), dtype=torch.long)
            pool = torch.zeros((len(seqs), L), dtype=torch.long)
            for r, (x, m) in enumerate(zip(seqs, masks)):
                input_ids[r, :len(x)] = torch.tensor(x)
                attn[r, :len(x)] = 1
                pool[r, :len(x)] = torch.tensor(m)
            input_ids, attn, pool = input_ids.to(device), attn.to(device), pool.to(device)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            outputs = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, output_hidden_states=True,
                            use_cache=False, logits_to_keep=1)
            pooled = pool_hidden_states(outputs.hidden_states[layer], pool)
            out.append((head(pooled) if head is not None else pooled).float().cpu())
    finally:
        model.train(was_training)
        if head is not None:
            head.train(head_was_training)
    return torch.cat(out, dim=0)


def encode_prompts(model, tokenizer, texts_or_messages: Sequence, head: nn.Module | None = None, layer: int = -1,
                   batch_size: int = 8, *, max_length: int | None = None) -> torch.Tensor:
    """Prompt-pooled representations (:func:`encode_views` with ``pooling="prompt"``): (N, D) float32 CPU."""
    return encode_views(model, tokenizer, texts_or_messages, head=head, layer=layer, pooling="prompt",
                        batch_size=batch_size, max_length=max_length)


# --------------------------------------------------------------------------------------------- the forward
def _peft_causal_lm():
    from peft import PeftModelForCausalLM

    return PeftModelForCausalLM


@dataclass
class CausalForwardOutput(ModelOutput):
    """What :meth:`CausalPeftModel.forward` returns for a causal batch of R = V·B rows (V views, B triplets).

    Attributes:
        response_logits: (N, vocab) next-token logits at the N positions that predict a response token (the
            positions where ``response_mask[:, 1:]`` is 1, row-major), in the model's dtype.
        response_tokens: (N,) the token ids they predict.
        response_rows: (N,) the row (0 … R−1) of each position.
        reference_logps: (K,) float32 Σ log p(response | prompt) under the reference model (LoRA adapter disabled,
            no gradient) of the K rows in ``reference_rows``, in that order; None when none were asked for.
        projections: (R, D) the projection head's outputs (prompt- or response-pooled per ``head_pooling``);
            None without a head.
        pooled_prompt: (R, H) float32 prompt-pooled hidden states of ``pool_layer``, detached; None unless asked.
    """

    response_logits: torch.Tensor | None = None
    response_tokens: torch.Tensor | None = None
    response_rows: torch.Tensor | None = None
    reference_logps: torch.Tensor | None = None
    projections: torch.Tensor | None = None
    pooled_prompt: torch.Tensor | None = None


class CausalPeftModel(_peft_causal_lm()):
    """A peft ``PeftModelForCausalLM`` whose ``forward`` also owns the causal stage's objective inputs.

    Called with ``causal=`` (a dict, below), one ``forward`` runs, on the (V·B, L) batch of the triplet collator:
    the fused forward of every view with ``output_hidden_states``, the output embedding on the response positions
    only (never the (V·B, L, vocab) logits), the reference model's log-probs of the requested rows (the same
    weights with the adapter disabled, no gradient; SecAlign preference and DPO retention), the pooling of
    ``hidden_states[pool_layer]`` and the projection head (``causal_projection_head``, a registered submodule).
    So DDP, FSDP (1 and 2) and DeepSpeed ZeRO-3 see every parameter used inside the forward they wrap: sharded
    parameters (lm_head, the head, the LoRA weights) are gathered by their pre-forward hooks, and gradients flow
    through the wrapper's own autograd hooks. Without ``causal`` it is the plain peft forward (generation,
    evaluation, merging and saving are unchanged: the class adds methods and one cached flag, ``causal_fast_lm``).

    ``causal`` keys: ``response_mask`` (R, L) 0/1 response tokens; ``pool_mask`` (R, L) 0/1 prompt tokens;
    ``pool_layer`` (int index into ``hidden_states``); ``head_pooling`` ``"prompt"`` | ``"response"`` | None (no
    head call); ``reference_rows`` (K,) long row indices or None; ``pooled_prompt`` (bool).

    Whether ``lm_head(hidden_states[-1])`` reproduces the model's logits is checked inside the first causal
    forward (last position of row 0, :func:`trainers.causal_losses.logits_agree`; under several processes the ranks
    agree on one answer, all-reduce MIN) and kept in ``causal_fast_lm``; models that post-process logits
    (soft-capping, scaling) get the model's own logits at the response positions instead.

    Raises ``ValueError`` for a causal call without a head when ``head_pooling`` is set, and from
    :meth:`adopt` for a model that is not a ``PeftModelForCausalLM``.
    """

    @classmethod
    def adopt(cls, model):
        """Give an existing ``PeftModelForCausalLM`` this class's forward (in place; returns it).

        The class adds methods and no instance layout (one flag is cached later), so re-classing the object is
        exact; that keeps everything peft, accelerate and Trainer do for peft models (adapter-only saves, DeepSpeed ``exclude_frozen_parameters``,
        resume through ``load_adapter``). Raises ``ValueError`` for any other model (the causal stage trains a
        LoRA adapter: its reference model is the adapter-disabled policy).
        """
        if isinstance(model, cls):
            return model
        if type(model) is not _peft_causal_lm():
            raise ValueError(f"the causal stage trains a LoRA adapter: expected a peft PeftModelForCausalLM "
                             f"(peft.get_peft_model(model, LoraConfig(task_type='CAUSAL_LM'))), got "
                             f"{type(model).__name__}")
        model.__class__ = cls
        return model

    def forward(self, *args, causal: dict | None = None, **kwargs):
        if causal is None:
            return super().forward(*args, **kwargs)
        return self._causal_forward(causal, **kwargs)

    def _causal_forward(self, causal: dict, input_ids, attention_mask=None, position_ids=None, **_):
        resp_mask = causal["response_mask"]
        fast = getattr(self, "causal_fast_lm", None)
        fwd = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
        if position_ids is not None:
            fwd["position_ids"] = position_ids
        out = super().forward(**fwd, logits_to_keep=1 if fast in (None, True) else 0)
        emb = self.get_output_embeddings()
        if fast is None:  # decided once, on this batch: does lm_head(h_last) give the model's logits?
            with torch.no_grad():
                fast = logits_agree(out.logits[:1, -1], emb(out.hidden_states[-1][:1, -1]) if emb is not None
                                    else None)
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    # every rank must take the same path (the full-logits path runs a second forward: under FSDP
                    # or ZeRO-3 a rank-dependent choice would leave collectives unmatched)
                    flag = torch.tensor([int(fast)], device=out.logits.device)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                    fast = bool(flag.item())
            self.causal_fast_lm = fast
            log.info("causal LM terms: %s", "lm_head on response positions only" if fast else
                     "model logits (the model post-processes its logits)")
            if not fast:
                out = super().forward(**fwd, logits_to_keep=0)
        tgt = resp_mask[:, 1:].bool()
        tokens = input_ids[:, 1:][tgt]
        rows = tgt.nonzero()[:, 0]
        logits = emb(out.hidden_states[-1][:, :-1][tgt]) if fast else out.logits[:, :-1][tgt]

        reference = None
        idx = causal.get("reference_rows")
        if idx is not None and idx.numel():
            with torch.no_grad(), self.disable_adapter():
                rfwd = {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in fwd.items()}
                rout = super().forward(**rfwd, logits_to_keep=1 if fast else 0)
                rtgt = tgt[idx]
                rlog = emb(rout.hidden_states[-1][:, :-1][rtgt]) if fast else rout.logits[:, :-1][rtgt]
                rlp = -F.cross_entropy(rlog.float(), input_ids[idx][:, 1:][rtgt], reduction="none")
                reference = sequence_logps(rlp, rtgt.nonzero()[:, 0], len(idx))

        hidden = out.hidden_states[causal.get("pool_layer", -1)]
        pooled_prompt = None
        if causal.get("pooled_prompt"):
            with torch.no_grad():
                pooled_prompt = pool_hidden_states(hidden.detach(), causal["pool_mask"])
        z = None
        pooling = causal.get("head_pooling")
        if pooling is not None:
            head = getattr(self, HEAD_ATTR, None)
            if head is None:
                raise ValueError(f"head_pooling={pooling!r} but the model has no {HEAD_ATTR}")
            z = head(pool_hidden_states(hidden, resp_mask if pooling == "response" else causal["pool_mask"]))
        return CausalForwardOutput(response_logits=logits, response_tokens=tokens, response_rows=rows,
                                   reference_logps=reference, projections=z, pooled_prompt=pooled_prompt)


# --------------------------------------------------------------------------------------------- trainer
class CausalContrastiveTrainer(Trainer):
    """``transformers.Trainer`` with the causal stage's objective (module docstring).

    The objective comes from ``loss`` (a :class:`core.causal_objective.CausalLossSettings`), else from
    ``args`` when it is a :class:`CausalConfig`, else the settings' defaults (the measured-best objective: task +
    injected LM + KL); any loss field given as a keyword (``lambda_kl=0.5``) replaces the one it names. Most code
    wants :class:`CausalTrainer`, which also builds the head, tokenizes raw triplets and picks the collator.

    Args (besides Trainer's):
        projection_head: the :class:`ProjectionHead` (registered on the model as ``causal_projection_head`` so the
            Trainer's optimizer, device placement and train/eval mode cover it); required when ``contrastive`` is
            ``v1`` or ``v2``, ignored (may be None) otherwise.
        views, lm_views: the views of the collator's batches, in order, and those carrying labels (default:
            :func:`core.causal_objective.needed_views` of the objective).
        loss: the objective's weights and settings (field meanings in :class:`CausalLossSettings`).
        pool_layer: index into ``hidden_states`` (−1 = last layer) for pooling (default: ``args.head_pool_layer``).
        head_learning_rate: learning rate of the head's parameter group (None = ``args.learning_rate``).
    Raises ``ValueError`` at construction for a setting outside its constraint (the fields of
    :class:`CausalLossSettings`), no LM view, or a term whose views are missing.
    """

    def __init__(self, *args, projection_head: ProjectionHead | None = None, views: Sequence[str] | None = None,
                 lm_views: Sequence[str] | None = None, loss: CausalLossSettings | None = None,
                 pool_layer: int | None = None, head_learning_rate: float | None = None, **kwargs):

        targs = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in _LOSS_FIELDS}  # the loss settings as keywords
        if loss is None:
            loss = targs.loss_settings() if isinstance(targs, CausalConfig) else CausalLossSettings()
        loss = check(CausalLossSettings, {**dataclasses.asdict(loss), **given})
        if isinstance(targs, CausalConfig):
            pool_layer = targs.head_pool_layer if pool_layer is None else pool_layer
            head_learning_rate = targs.head_learning_rate if head_learning_rate is None else head_learning_rate
        pool_layer = -1 if pool_layer is None else pool_layer
        if views is None or lm_views is None:
            auto_views, auto_lm = needed_views(**dataclasses.asdict(loss))
            views = auto_views if views is None else views
            lm_views = auto_lm if lm_views is None else lm_views
        self.loss_settings = loss
        (lambda_task, lambda_lm_injected, lambda_lm_counterfactual, lambda_kl, lambda_pref, pref_beta, contrastive,
         lambda_contrastive, contrastive_counterfactual, variant, temperature, lambda_causal, lambda_spurious,
         margin_floor, in_batch_negatives, lambda_retain_sft, lambda_retain_dpo, retain_beta) = (
            getattr(loss, f) for f in _LOSS_FIELDS)
        check_temperature(temperature)
        if variant not in ("cosine", "infonce", "margin"):
            raise ValueError(f"unknown loss variant {variant!r}")
        if contrastive not in CONTRASTIVE:
            raise ValueError(f"unknown contrastive version {contrastive!r}; expected one of {list(CONTRASTIVE)}")
        views, lm_views = list(views), list(lm_views)
        if not lm_views:
            raise ValueError("the causal objective needs at least one LM term (λ_task, λ_lm_injected or "
                             "λ_lm_counterfactual > 0)")
        need = {"injected": lambda_lm_injected > 0 or lambda_kl > 0 or lambda_pref > 0 or contrastive != "none",
                "counterfactual": lambda_lm_counterfactual > 0 or contrastive == "v1",
                "hijack": lambda_pref > 0 or contrastive == "v2",
                "retain_chosen": lambda_retain_sft > 0 or lambda_retain_dpo > 0,
                "retain_rejected": lambda_retain_dpo > 0}
        missing = [v for v, n in need.items() if n and v not in views]
        if missing or "benign" not in views:
            raise ValueError(f"the objective needs the views {missing or ['benign']} in the batch (views={views})")
        model = kwargs.get("model") if "model" in kwargs else (args[0] if args else None)
        if model is None:
            raise ValueError("CausalContrastiveTrainer needs a model")
        if contrastive != "none" and projection_head is None:
            raise ValueError(f"contrastive {contrastive!r} needs a projection head")
        self.projection_head = projection_head if contrastive != "none" else None
        model = CausalPeftModel.adopt(model)  # the module whose forward computes the whole objective's inputs
        if self.projection_head is not None:
            setattr(model, HEAD_ATTR, self.projection_head)  # registered submodule: optimizer, .to(device), modes
        # Every parameter (LoRA, lm_head, head) is used inside the one wrapped forward and every trainable one gets
        # a gradient each step, so DDP's unused-parameter search (which Trainer turns on for peft models) is not
        # needed; it is off unless the user sets it.
        if targs is not None and targs.ddp_find_unused_parameters is None:
            targs.ddp_find_unused_parameters = False
        self.views, self.lm_views = views, lm_views
        self.weights = {"benign": lambda_task, "injected": lambda_lm_injected, "counterfactual": lambda_lm_counterfactual}
        self.lambda_kl, self.lambda_pref, self.pref_beta = lambda_kl, lambda_pref, pref_beta
        self.lambda_retain_sft, self.lambda_retain_dpo = lambda_retain_sft, lambda_retain_dpo
        self.retain_beta = retain_beta
        self.contrastive, self.lambda_contrastive = contrastive, lambda_contrastive
        self.contrastive_counterfactual = contrastive_counterfactual and "counterfactual" in views
        self.temperature = temperature
        self.loss_cfg = dict(variant=variant, temperature=temperature, lambda_causal=lambda_causal,
                             lambda_spurious=lambda_spurious, margin_floor=margin_floor,
                             in_batch_negatives=in_batch_negatives)
        self.pool_layer, self.head_learning_rate = pool_layer, head_learning_rate
        super().__init__(*args, **kwargs)
        # our compute_loss uses num_items_in_batch: Trainer must count it and must not divide by the GA steps
        self.model_accepts_loss_kwargs = True
        self._sums = {"train": self._zero_sums(), "eval": self._zero_sums()}

    @property
    def head_pooling(self) -> str | None:
        """How the head's input is pooled: ``prompt`` (v1), ``response`` (v2), or None without a head."""
        return {"v1": "prompt", "v2": "response"}.get(self.contrastive)

    # ------------------------------------------------------------------ optimizer: own group for the head
    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        if self.head_learning_rate is not None and self.optimizer is not None and self.projection_head is not None:
            head_ids = {id(p) for p in self.projection_head.parameters()}
            moved = []
            for g in self.optimizer.param_groups:
                keep = [p for p in g["params"] if id(p) not in head_ids]
                moved += [p for p in g["params"] if id(p) in head_ids]
                g["params"] = keep
            self.optimizer.param_groups[:] = [g for g in self.optimizer.param_groups if g["params"]]
            self.optimizer.add_param_group({"params": moved, "lr": self.head_learning_rate, "weight_decay": 0.0})
        return opt

    # ------------------------------------------------------------------ step-level counts for exact accumulation
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's micro-batch prefetch, plus the number of triplets in the whole optimizer step (summed over
        processes when ``average_tokens_across_devices``) attached to every micro-batch as ``step_triplets``."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            n = torch.tensor(sum(b["input_ids"].shape[0] // len(self.views) for b in batch_samples), device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                n = self.accelerator.gather(n.reshape(1)).sum()
            for b in batch_samples:
                b["step_triplets"] = n
        return batch_samples, num_items_in_batch

    # ------------------------------------------------------------------ the loss
    def _reference_views(self) -> list[str]:
        """The views whose response log-probs the reference model (adapter disabled) must give, in order."""
        ref = []
        if self.lambda_pref > 0:
            ref += ["injected", "hijack"]
        if self.lambda_retain_dpo > 0:
            ref += ["retain_chosen", "retain_rejected"]
        return ref

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        step_triplets = inputs.pop("step_triplets", None)
        inputs.pop("labels")
        pool_mask = inputs.pop("pool_mask")
        resp_mask = inputs.pop("response_mask")
        input_ids = inputs["input_ids"]
        R, V = input_ids.shape[0], len(self.views)
        if R % V:
            raise ValueError(f"a causal batch has {V}·B rows ({', '.join(self.views)}); got {R}")
        B = R // V
        at = {v: k for k, v in enumerate(self.views)}
        ref_views = self._reference_views()
        ref_rows = (torch.cat([torch.arange(at[v] * B, (at[v] + 1) * B) for v in ref_views]).to(input_ids.device)
                    if ref_views else None)
        # ONE call of the (DDP/FSDP/DeepSpeed-wrapped) model computes everything that touches parameters: the fused
        # forward, the response-position logits, the reference log-probs and the projection head
        # (CausalPeftModel.forward), so every parameter is gathered inside a wrapped forward
        causal = {"response_mask": resp_mask, "pool_mask": pool_mask, "pool_layer": self.pool_layer,
                  "head_pooling": self.head_pooling, "reference_rows": ref_rows, "pooled_prompt": "injected" in at}
        fwd = dict(input_ids=input_ids, attention_mask=inputs.get("attention_mask"), causal=causal)
        if "position_ids" in inputs:
            fwd["position_ids"] = inputs["position_ids"]
        outputs = model(**fwd)
        logits, tok, rows = outputs.response_logits, outputs.response_tokens, outputs.response_rows
        logp_tok = -F.cross_entropy(logits.float(), tok, reduction="none")  # (N,) log p(token)
        ref_logps = {v: outputs.reference_logps[k * B:(k + 1) * B] for k, v in enumerate(ref_views)}
        view_of = rows // B

        def sel(view):
            return view_of == at[view]

        # LM terms (sums of token NLL; normalised below)
        lm_sum, counts, vals = 0.0, {}, {}
        for view in ("benign", "injected", "counterfactual"):
            if view not in at:
                continue
            nll_v = -logp_tok[sel(view)]
            counts[view] = nll_v.numel()
            name = {"benign": "loss_lm", "injected": "loss_lm_injected", "counterfactual": "loss_lm_counterfactual"}[view]
            vals[name] = nll_v.detach().mean() if nll_v.numel() else torch.zeros(())
            if view in self.lm_views:
                lm_sum = lm_sum + self.weights[view] * nll_v.sum()
        if num_items_in_batch is not None:
            lm = lm_sum * len(self.lm_views) / num_items_in_batch
        else:
            lm = sum(self.weights[v] * (-logp_tok[sel(v)]).sum() / max(counts[v], 1) for v in self.lm_views)

        # per-triplet terms, (B,) each
        per_ex = torch.zeros(B, dtype=torch.float32, device=logits.device)
        if self.lambda_kl > 0:
            mb, mi = sel("benign"), sel("injected")
            if mb.sum() != mi.sum() or not torch.equal(tok[mb], tok[mi]):
                raise ValueError("benign and injected rows hold different target tokens; KL invariance needs the same y")
            kl = token_kl(logits[mb], logits[mi], rows[mi] - at["injected"] * B, B)
            per_ex = per_ex + self.lambda_kl * kl
            vals["loss_kl"] = kl.detach().mean()
        if "hijack" in at:
            seq = sequence_logps(logp_tok, rows, R)
            pi_w, pi_l = seq[at["injected"] * B:(at["injected"] + 1) * B], seq[at["hijack"] * B:(at["hijack"] + 1) * B]
            vals["margin_injected"] = (pi_w - pi_l).detach().mean()
            if self.lambda_pref > 0:
                pref = dpo_sigmoid_loss(pi_w, pi_l, ref_logps["injected"], ref_logps["hijack"], self.pref_beta)
                per_ex = per_ex + self.lambda_pref * pref
                vals["loss_pref"] = pref.detach().mean()

        if "retain_chosen" in at:  # retention on replayed DPO-stage pairs (views of the same examples)
            seq = sequence_logps(logp_tok, rows, R)
            n_tok = torch.bincount(rows, minlength=R).clamp(min=1)
            c = slice(at["retain_chosen"] * B, (at["retain_chosen"] + 1) * B)
            nll_c = -seq[c] / n_tok[c]  # (B,) token-mean NLL of each chosen answer
            vals["loss_retain_sft"] = nll_c.detach().mean()
            if self.lambda_retain_sft > 0:
                per_ex = per_ex + self.lambda_retain_sft * nll_c
            if self.lambda_retain_dpo > 0:
                r = slice(at["retain_rejected"] * B, (at["retain_rejected"] + 1) * B)
                rc, rr = ref_logps["retain_chosen"], ref_logps["retain_rejected"]
                ret = dpo_sigmoid_loss(seq[c], seq[r], rc, rr, self.retain_beta)
                per_ex = per_ex + self.lambda_retain_dpo * ret
                vals["loss_retain_dpo"] = ret.detach().mean()
                vals["retain_margin"] = ((seq[c] - rc) - (seq[r] - rr)).detach().mean()

        con_mean = None
        if outputs.pooled_prompt is not None:  # pooled (pre-head) prompt states: did the representation move?
            self._rep_vals(vals, "pooled", outputs.pooled_prompt, B, at)
        z = outputs.projections
        if self.contrastive == "v2":
            pos = [z[at["injected"] * B:(at["injected"] + 1) * B]]
            if self.contrastive_counterfactual:
                pos.append(z[at["counterfactual"] * B:(at["counterfactual"] + 1) * B])
            con = anchored_infonce(z[at["benign"] * B:(at["benign"] + 1) * B], pos,
                                   z[at["hijack"] * B:(at["hijack"] + 1) * B], self.temperature)
            per_ex = per_ex + self.lambda_contrastive * con
            vals["loss_contrastive"] = con.detach().mean()
            self._rep_vals(vals, "head", z.detach(), B, at)
        elif self.contrastive == "v1":
            out = contrastive_loss(z[at["benign"] * B:(at["benign"] + 1) * B],
                                   z[at["counterfactual"] * B:(at["counterfactual"] + 1) * B],
                                   z[at["injected"] * B:(at["injected"] + 1) * B], **self.loss_cfg)
            con_mean = out.loss
            vals["loss_contrastive"] = out.loss.detach()
            self._rep_vals(vals, "head", z.detach(), B, at)
        terms = per_ex.mean() + (con_mean if con_mean is not None else 0.0)

        if num_items_in_batch is not None:
            share = B / step_triplets if step_triplets is not None else 1.0 / max(
                getattr(self, "current_gradient_accumulation_steps", 1), 1)
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            loss = (lm + terms * share) * scale
        else:
            loss = lm + terms
        if not torch.isfinite(loss.detach()).all():
            from staged_alignment.core.callbacks import NonFiniteLossError

            raise NonFiniteLossError(f"non-finite causal loss {loss.item()} at step {self.state.global_step}")
        self._accumulate("train" if model.training else "eval", vals, B)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _rep_vals(vals: dict, space: str, z: torch.Tensor, B: int, at: dict) -> None:
        """The shared representation metrics of one batch (:func:`trainers.representation.representation_metrics`)."""
        def part(v):
            return z[at[v] * B:(at[v] + 1) * B].float().cpu().numpy() if v in at else None

        if "injected" not in at:
            return
        m = representation_metrics(part("benign"), part("counterfactual"), part("injected"), centred=False)
        for k, v in m.items():
            if v is not None:
                vals[f"{space}_{k}"] = torch.tensor(v)

    # ------------------------------------------------------------------ metrics
    @staticmethod
    def _zero_sums() -> dict:
        return {k: [0.0, 0.0] for k in METRIC_KEYS}

    def _accumulate(self, mode: str, vals: dict, weight: int) -> None:
        s = self._sums[mode]
        for k, v in vals.items():
            s[k][0] += float(v) * weight
            s[k][1] += weight

    def _averages(self, mode: str) -> dict:
        s = self._sums[mode]
        keys = list(METRIC_KEYS)
        flat = [x for k in keys for x in s[k]]
        if self.args.world_size > 1:
            t = torch.tensor(flat, dtype=torch.float64, device=self.args.device)
            flat = self.accelerator.reduce(t, reduction="sum").tolist()
        self._sums[mode] = self._zero_sums()
        out = {}
        for i, k in enumerate(keys):
            total, weight = flat[2 * i], flat[2 * i + 1]
            if weight > 0:
                out[k] = round(total / weight, 6)
        return out

    def log(self, logs: dict, start_time=None) -> None:
        """Merge the averaged training metrics into Trainer's training logs (those with ``loss``)."""
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs.update(self._averages("train"))
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss only (no logits are gathered: evaluation metrics are running sums in ``compute_loss``)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._sums["eval"] = self._zero_sums()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=True,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        for k, v in self._averages("eval").items():
            output.metrics[f"{metric_key_prefix}_{k}"] = v
        return output

    # ------------------------------------------------------------------ head persistence
    def _head_extra(self) -> dict:
        return {"pool_layer": self.pool_layer, "pooling": self.head_pooling, "contrastive": self.contrastive}

    def _save(self, output_dir=None, state_dict=None):
        """Trainer's save (peft writes the adapter only) plus the head. Under DeepSpeed ZeRO-3, Trainer passes the
        gathered ``state_dict`` (main process) and the head is taken from it, because the local module holds
        shards; under FSDP the head is written by :meth:`save_model`."""
        super()._save(output_dir, state_dict=state_dict)
        if self.projection_head is not None and not self._fsdp():
            from staged_alignment.core.sharded import sub_state

            head_state = sub_state(state_dict, HEAD_ATTR) if state_dict is not None else {}
            if not head_state and self._sharded():
                raise RuntimeError("a sharded launch saved without the head's gathered weights")
            save_projection_head(self.projection_head, output_dir or self.args.output_dir, self._head_extra(),
                                 state=head_state or None)

    def save_model(self, output_dir=None, _internal_call=False):
        """Trainer's ``save_model`` (also called for every checkpoint), plus, under FSDP, the head gathered by every
        process. Needed because FSDP checkpoints keep the adapter only (accelerate's ``save_fsdp_model(...,
        adapter_only=True)`` for peft models drops the head) and, with ``SHARDED_STATE_DICT``, Trainer writes no
        adapter file at all. Written before ``trainer_state.json``, so a checkpoint counted complete has it."""
        super().save_model(output_dir, _internal_call)
        if self.projection_head is not None and self._fsdp():
            from staged_alignment.core.sharded import sub_state, trainable_state_dict

            full = trainable_state_dict(self)  # collective; the main process gets the full tensors
            if full is not None and self.args.should_save:
                save_projection_head(self.projection_head, output_dir or self.args.output_dir, self._head_extra(),
                                     state=sub_state(full, HEAD_ATTR))

    def _fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def _sharded(self) -> bool:
        """Whether parameters are sharded across processes (FSDP, or DeepSpeed ZeRO-3)."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        return kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and self.accelerator.deepspeed_config
                                                .get("zero_optimization", {}).get("stage") == 3)

    def _restore_head(self, checkpoint: str) -> None:
        """Load the checkpoint's head weights into the (possibly sharded) head.

        One process or DDP: copied in place. FSDP: every process reads the full weights and
        ``torch.distributed.checkpoint.state_dict.set_model_state_dict(full_state_dict=True)`` keeps each rank's
        shard. DeepSpeed ZeRO-3: nothing to do (the engine's checkpoint holds every trainable parameter)."""
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            loaded = load_projection_head(checkpoint, self.projection_head.in_dim)
            if loaded.config() != self.projection_head.config():
                raise ValueError(f"{checkpoint}: saved head {loaded.config()} differs from the configured "
                                 f"{self.projection_head.config()}")
            state = {f"{HEAD_ATTR}.{k}": v for k, v in loaded.state_dict().items()}
            set_model_state_dict(self.model_wrapped, state, options=StateDictOptions(full_state_dict=True,
                                                                                     strict=False))
        elif not self._sharded():
            _load_head_into(self.projection_head, checkpoint)
        else:
            return
        log.info("restored the causal projection head from %s", checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.projection_head is not None:
            self._restore_head(resume_from_checkpoint)

    def _load_best_model(self):
        super()._load_best_model()
        if self.state.best_model_checkpoint and self.projection_head is not None:
            self._restore_head(self.state.best_model_checkpoint)


def make_head(head_type: str, hidden_size: int, dim: int, hidden: int, seed: int) -> ProjectionHead:
    """Convenience alias of :func:`build_projection_head` with the model's hidden size."""
    return build_projection_head(head_type, hidden_size, dim, hidden, seed=seed)


# --------------------------------------------------------------------------------------------- config + trainer
_LOSS_FIELDS = tuple(loss_field_names())


class _CausalConfigChecks:
    """``__post_init__`` of :class:`CausalConfig`: TrainingArguments' own, then the objective's and head's
    constraints (those of the fields of :class:`CausalLossSettings` and :class:`CausalHeadSettings`), and the batch
    layout."""

    def __post_init__(self):
        super().__post_init__()
        self.loss_settings()
        self.head_settings()
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: {self.padding_side!r} is not 'left' or 'right'")
        if self.max_length < 8:
            raise ValueError(f"max_length: {self.max_length} is below 8 tokens")

    def loss_settings(self) -> CausalLossSettings:
        """The objective as a :class:`CausalLossSettings`; raises ``ValueError`` naming the field."""
        return check(CausalLossSettings, {f: getattr(self, f) for f in _LOSS_FIELDS})

    def head_settings(self) -> CausalHeadSettings:
        """The head as a :class:`CausalHeadSettings` (``head_type`` → ``type``, …); raises ``ValueError`` naming the
        field (``head_type``)."""
        return check(CausalHeadSettings, {name: getattr(self, HEAD_PREFIX + name)
                                          for name in field_infos(CausalHeadSettings)}, HEAD_PREFIX)

    @property
    def views(self) -> list[str]:
        """The views a batch stacks for this objective (:func:`core.causal_objective.needed_views`)."""
        return needed_views(**dataclasses.asdict(self.loss_settings()))[0]

    @property
    def lm_views(self) -> list[str]:
        return needed_views(**dataclasses.asdict(self.loss_settings()))[1]


def _make_causal_config():
    from transformers import TrainingArguments

    def flat(prefix, cls):  # each setting's type (Annotated/Strict dropped, as HfArgumentParser reads it), default, help
        return [(prefix + name, plain_type(info.annotation), dataclasses.field(default=info.default,
                                                                   metadata={"help": info.description}))
                for name, info in field_infos(cls).items()]

    extra = flat("", CausalLossSettings) + flat(HEAD_PREFIX, CausalHeadSettings)
    extra += [("max_length", int, dataclasses.field(default=512, metadata={
                  "help": "triplets whose longest view (prompt + answer + eos) is longer are left out"})),
              ("padding_side", str, dataclasses.field(default="right", metadata={"help": "right | left"})),
              ("data_role", bool, dataclasses.field(default=False, metadata={
                  "help": "put a triplet's data in its own <|input|> turn (model.data_role)"})),
              ("remove_unused_columns", bool, dataclasses.field(default=False, metadata={
                  "help": "TrainingArguments' column pruning; off, since the collator reads the view columns"}))]
    cls = dataclasses.make_dataclass("CausalConfig", extra, bases=(_CausalConfigChecks, TrainingArguments))
    cls.__module__ = __name__
    cls.__doc__ = (
        "Training arguments of the causal stage: ``transformers.TrainingArguments`` plus one field per loss weight, "
        "head and batch setting (the pattern of ``trl.DPOConfig``).\n\n"
        "The loss fields are :class:`core.causal_objective.CausalLossSettings`' (defaults: the objective the "
        "ablation measured best, task + injected LM + KL, no contrastive term), the head fields "
        "``head_<name>`` are :class:`CausalHeadSettings`', each with its description as ``help``; they are "
        "declared there once. "
        "``__post_init__`` raises ``ValueError`` naming the field for a value outside its constraint.")
    return cls


CausalConfig = _make_causal_config()


class CausalTrainer(CausalContrastiveTrainer):
    """The causal stage's trainer as TRL users expect one: ``CausalTrainer(model, args=CausalConfig(...),
    train_dataset=..., processing_class=tokenizer)``.

    - ``model``: a ``peft`` LoRA model, or a plain causal LM together with ``peft_config`` (a ``LoraConfig``,
      applied with ``peft.get_peft_model``, as TRL's trainers do).
    - ``train_dataset`` / ``eval_dataset``: triplet rows (``data_builders.triplets``: ``instruction``, ``data``,
      ``counterfactual_data``, ``injected_data``, ``target``, ``hijack``, …) are tokenized with
      ``processing_class`` (its chat template, the control-token guard included) and the rows longer than
      ``args.max_length`` dropped; rows already tokenized (``benign_input_ids`` …) are used as they are.
    - ``data_collator``: default :class:`data_builders.token_cache.TripletCollator` of the objective's views.
    - ``projection_head``: default built from ``args.head_*`` and the model's hidden size when the objective has a
      contrastive term (seeded by ``args.seed``).

    The objective is ``args``' (:class:`CausalConfig`); with no loss argument anywhere it is the measured best.
    Raises ``ValueError`` when ``args`` is not a :class:`CausalConfig`, ``processing_class`` is missing for raw
    triplets, or no triplet fits ``max_length``.
    """

    def __init__(self, model, args: "CausalConfig", train_dataset=None, eval_dataset=None, processing_class=None,
                 data_collator=None, projection_head=None, peft_config=None, **kwargs):
        if not isinstance(args, CausalConfig):
            raise ValueError(f"CausalTrainer needs args=CausalConfig(...), got {type(args).__name__}")
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        train_dataset = self._tokenized(train_dataset, processing_class, args)
        eval_dataset = self._tokenized(eval_dataset, processing_class, args)
        loss = args.loss_settings()
        if data_collator is None:
            from staged_alignment.data_builders.token_cache import TripletCollator

            pad = processing_class.pad_token_id if processing_class is not None else 0
            data_collator = TripletCollator(pad, padding_side=args.padding_side, views=args.views,
                                            lm_views=args.lm_views)
        if projection_head is None and loss.contrastive != "none":
            head = args.head_settings()
            hidden = model.get_base_model().config.get_text_config().hidden_size
            projection_head = build_projection_head(head.type, hidden, head.dim, head.hidden, seed=args.seed)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator,
                         projection_head=projection_head, loss=loss, **kwargs)

    @staticmethod
    def _tokenized(ds, tokenizer, args):
        if ds is None:
            return None
        columns = getattr(ds, "column_names", None) or (list(ds[0]) if len(ds) else [])
        if "benign_input_ids" in columns:
            return ds
        if tokenizer is None:
            raise ValueError("CausalTrainer: raw triplets need processing_class (the tokenizer) to be tokenized")
        from datasets import Dataset

        from staged_alignment.data_builders.token_cache import tokenize_triplet

        rows = [dict(r, **tokenize_triplet(r, tokenizer, args.max_length, data_role=args.data_role)) for r in ds]
        kept = [r for r in rows if r["fits"]]
        if not kept:
            raise ValueError(f"CausalTrainer: none of the {len(rows)} triplets fits in max_length={args.max_length}")
        if len(kept) < len(rows):
            log.info("CausalTrainer: %d of %d triplets are longer than %d tokens and are left out",
                     len(rows) - len(kept), len(rows), args.max_length)
        return Dataset.from_list(kept)
