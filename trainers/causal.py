"""Stage 2 trainer: causal contrastive training on prompt-injection triplets.

:class:`CausalContrastiveTrainer` (a ``transformers.Trainer``) takes the (3B, L) batches of
:class:`data_builders.token_cache.TripletCollator` — rows [0:B] benign, [B:2B] counterfactual, [2B:3B] injected
— and, in ONE forward pass with ``output_hidden_states=True``:

1. mean-pools the hidden states of layer ``pool_layer`` (default −1, the last, after the final norm) over the
   prompt tokens of each row (:func:`trainers.causal_losses.pool_hidden_states`; padding on either side is
   ignored) and projects them with the head (:class:`trainers.causal_losses.ProjectionHead`) → z_b, z_c, z_i;
2. computes the language-model loss on the response tokens of the benign rows (and of the injected rows when
   ``injected_lm_loss``: the injected prompt is trained toward the *benign* response, weighted λ_injected);
3. adds the contrastive term of the chosen variant (cosine | infonce | margin; formulas in
   ``trainers/causal_losses.py``):

       loss = λ_task · L_LM + L_contrastive

Gradient accumulation is exact (one optimizer step over k micro-batches = one step over their union):

* ``L_LM = Σ_tokens w·NLL / num_items_in_batch``, with w = 1 on benign tokens and λ_injected on injected ones.
  ``num_items_in_batch`` is what ``Trainer.get_batch_samples`` counts over ALL micro-batches of the optimizer
  step (labels[..., 1:] ≠ −100, i.e. every labelled token: benign, plus injected when enabled), summed over
  processes when ``average_tokens_across_devices`` (the transformers 5 default). Because DDP then *averages*
  gradients across the P processes, ``Trainer.compute_loss`` multiplies the loss by P; this trainer does the
  same (``model_accepts_loss_kwargs`` is forced to True so Trainer neither divides by the accumulation steps
  nor skips the count).
* the contrastive term is a per-micro-batch mean over its B_micro triplets; it is weighted by
  B_micro / B_step, where B_step is the number of triplets in the whole optimizer step (all micro-batches, all
  processes — counted in :meth:`get_batch_samples` and attached to each micro-batch), so the k weighted
  micro-batch means add up to the mean over the step's triplets — exactly the loss of one big batch. (With
  InfoNCE ``in_batch_negatives`` the negatives differ between one big batch and micro-batches, so there the
  equality does not hold; it is documented, not corrected.)

Without ``num_items_in_batch`` (evaluation, or a direct call), L_LM is the micro-batch token mean and the
contrastive term the micro-batch mean.

Logged (Trainer's log keys; W&B/TensorBoard show them as ``train/<key>`` and ``eval/<key>``, evaluation keys
being ``eval_<key>`` in ``log_history``): ``loss_lm`` (benign response token-mean NLL), ``loss_lm_injected``
(if enabled), ``loss_causal``, ``loss_spurious``, ``loss_contrastive`` (their sum), ``causal_stability`` =
mean cos(z_b, z_c), ``spurious_similarity`` = mean cos(z_b, z_i), ``causal_discrimination`` = their difference,
and ``pooled_causal_stability`` / ``pooled_spurious_similarity`` (the same cosines on the pooled states before
the head: whether the *model's* representations moved, not only the head). Training values are averaged over
the triplets seen since the last log; evaluation values are running sums over eval batches (nothing held).

The head is saved in every checkpoint and adapter folder as ``causal_projection.safetensors`` (+
``causal_projection.json`` with its type and dims), restored on resume and with ``load_best_model_at_end``;
:func:`load_projection_head` loads it for evaluation. Only safetensors is used for the head.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import Trainer

from trainers.causal_losses import (ProjectionHead, build_projection_head, check_temperature, contrastive_loss,
                                    lm_token_nll, pool_hidden_states)

log = logging.getLogger(__name__)

HEAD_WEIGHTS = "causal_projection.safetensors"
HEAD_CONFIG = "causal_projection.json"
HEAD_ATTR = "causal_projection_head"
STEP_KEYS = ("step_triplets",)
METRIC_KEYS = ("loss_lm", "loss_lm_injected", "loss_causal", "loss_spurious", "loss_contrastive",
               "causal_stability", "spurious_similarity", "causal_discrimination", "pooled_causal_stability",
               "pooled_spurious_similarity")


# --------------------------------------------------------------------------------------------- head files
def save_projection_head(head: ProjectionHead, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``causal_projection.safetensors`` and ``causal_projection.json`` into ``directory``; returns the
    weights path. ``extra`` (e.g. ``{"pool_layer": -1}``) is stored in the JSON."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in head.state_dict().items()}
    save_file(state, str(d / HEAD_WEIGHTS), metadata={"format": "pt"})
    meta = {**head.config(), "pooling": "mean over prompt tokens", **(extra or {})}
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
def encode_prompts(model, tokenizer, texts_or_messages: Sequence, head: nn.Module | None = None, layer: int = -1,
                   batch_size: int = 8, *, max_length: int | None = None) -> torch.Tensor:
    """Representations of prompts, pooled exactly as in training.

    Each item is a message list (rendered with the tokenizer's chat template as a generation prompt, like the
    training prompts) or a string (taken as one user message). The hidden states of ``layer`` (−1 = last) are
    mean-pooled over all prompt tokens (:func:`pool_hidden_states`) and, if ``head`` is given, projected.

    Returns:
        (N, D) float32 CPU tensor (D = head output dim, or the hidden size H without a head).
    Raises:
        ValueError: empty input, or a prompt longer than ``max_length`` tokens (when given).
    """
    from data_builders.chat_template import prompt_ids

    if not texts_or_messages:
        raise ValueError("encode_prompts needs at least one prompt")
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
        for start in range(0, len(texts_or_messages), batch_size):
            chunk = texts_or_messages[start:start + batch_size]
            ids = []
            for item in chunk:
                msgs = [{"role": "user", "content": item}] if isinstance(item, str) else list(item)
                p = prompt_ids(tokenizer, msgs)
                if max_length is not None and len(p) > max_length:
                    raise ValueError(f"prompt {start + len(ids)} has {len(p)} tokens > max_length={max_length}")
                ids.append(p)
            L = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), L), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), L), dtype=torch.long)
            for r, x in enumerate(ids):
                input_ids[r, :len(x)] = torch.tensor(x)
                mask[r, :len(x)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            outputs = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                            use_cache=False, logits_to_keep=1)
            pooled = pool_hidden_states(outputs.hidden_states[layer], mask)
            out.append((head(pooled) if head is not None else pooled).float().cpu())
    finally:
        model.train(was_training)
        if head is not None:
            head.train(head_was_training)
    return torch.cat(out, dim=0)


# --------------------------------------------------------------------------------------------- trainer
class CausalContrastiveTrainer(Trainer):
    """``transformers.Trainer`` with the causal contrastive objective (see the module docstring).

    Args (besides Trainer's):
        projection_head: the :class:`ProjectionHead` (registered on the model as ``causal_projection_head`` so
            the Trainer's optimizer, device placement and train/eval mode cover it).
        variant, temperature, lambda_task, lambda_causal, lambda_spurious, margin_floor, in_batch_negatives,
        injected_lm_loss, lambda_injected: the loss (``causal.loss`` section).
        pool_layer: index into ``hidden_states`` (−1 = last layer).
        head_learning_rate: learning rate of the head's parameter group (None = ``args.learning_rate``).
    Inputs: the (3B, L) batch of ``TripletCollator`` (input_ids, attention_mask, position_ids, labels, pool_mask).
    Raises ``ValueError`` at construction for τ outside [0.01, 1] or an unknown variant.
    """

    def __init__(self, *args, projection_head: ProjectionHead, variant: str = "cosine", temperature: float = 0.1,
                 lambda_task: float = 1.0, lambda_causal: float = 1.0, lambda_spurious: float = 1.0,
                 margin_floor: float = 0.0, in_batch_negatives: bool = False, injected_lm_loss: bool = False,
                 lambda_injected: float = 1.0, pool_layer: int = -1, head_learning_rate: float | None = None,
                 **kwargs):
        check_temperature(temperature)
        if variant not in ("cosine", "infonce", "margin"):
            raise ValueError(f"unknown loss variant {variant!r}")
        model = kwargs.get("model") if "model" in kwargs else (args[0] if args else None)
        if model is None:
            raise ValueError("CausalContrastiveTrainer needs a model")
        setattr(model, HEAD_ATTR, projection_head)  # registered submodule: optimizer, .to(device), train()/eval()
        self.projection_head = projection_head
        # DDP (docs/distributed.md): the head is a submodule of the model DDP wraps, so its gradients are
        # all-reduced with the LoRA ones, but it runs AFTER the wrapped forward. DDP's unused-parameter search
        # (Trainer turns it on for peft models) would mark the head "unused" at forward time and then fail in
        # backward ("marked as ready twice"). Every trainable parameter gets a gradient each step, so it is off.
        targs = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        if targs is not None:
            if targs.ddp_find_unused_parameters:
                raise ValueError("the causal stage needs ddp_find_unused_parameters=False (its projection head runs "
                                 "outside the DDP-wrapped forward)")
            targs.ddp_find_unused_parameters = False
        self.loss_cfg = dict(variant=variant, temperature=temperature, lambda_causal=lambda_causal,
                             lambda_spurious=lambda_spurious, margin_floor=margin_floor,
                             in_batch_negatives=in_batch_negatives)
        self.lambda_task, self.injected_lm_loss, self.lambda_injected = lambda_task, injected_lm_loss, lambda_injected
        self.pool_layer, self.head_learning_rate = pool_layer, head_learning_rate
        super().__init__(*args, **kwargs)
        # our compute_loss uses num_items_in_batch: Trainer must count it and must not divide by the GA steps
        self.model_accepts_loss_kwargs = True
        self._sums = {"train": self._zero_sums(), "eval": self._zero_sums()}
        self._fast_lm: bool | None = None

    # ------------------------------------------------------------------ optimizer: own group for the head
    def create_optimizer(self, model=None):
        opt = super().create_optimizer(model)
        if self.head_learning_rate is not None and self.optimizer is not None:
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
            n = torch.tensor(sum(b["input_ids"].shape[0] // 3 for b in batch_samples), device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                n = self.accelerator.gather(n.reshape(1)).sum()
            for b in batch_samples:
                b["step_triplets"] = n
        return batch_samples, num_items_in_batch

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        step_triplets = inputs.pop("step_triplets", None)
        labels = inputs.pop("labels")
        pool_mask = inputs.pop("pool_mask")
        input_ids = inputs["input_ids"]
        rows = input_ids.shape[0]
        if rows % 3:
            raise ValueError(f"a causal batch has 3B rows (benign, counterfactual, injected); got {rows}")
        B = rows // 3
        # next-token targets: position p predicts labels[:, p + 1]
        targets = labels[:, 1:]
        fast = self._use_hidden_state_logits(model, input_ids)
        if fast:  # logits only for the labelled (row, position) pairs, from the final hidden states
            needed = None
            logits_to_keep = 1
        else:  # model-specific logit processing: let the model compute logits at the needed positions
            needed = (targets != -100).any(dim=0).nonzero().squeeze(-1)
            logits_to_keep = needed if needed.numel() else 1
        fwd = dict(input_ids=input_ids, attention_mask=inputs.get("attention_mask"), output_hidden_states=True,
                   use_cache=False, logits_to_keep=logits_to_keep)
        if "position_ids" in inputs:
            fwd["position_ids"] = inputs["position_ids"]
        outputs = model(**fwd)

        # language-model loss (sum of token NLL over benign [+ injected] response tokens; normalised below)
        if fast:
            valid = targets != -100
            rows_of = valid.nonzero()[:, 0]
            h = outputs.hidden_states[-1][:, :-1][valid]  # (N, H) final (normed) states of labelled positions
            logits = self._output_embeddings(model)(h)
            nll = lm_token_nll(logits.unsqueeze(0), targets[valid].unsqueeze(0))
        else:
            sub = targets[:, needed]  # (3B, K): the targets of the K kept logit positions
            rows_of = (sub != -100).nonzero()[:, 0]
            nll = lm_token_nll(outputs.logits, sub) if needed.numel() else outputs.logits.new_zeros((0,)).float()
        nll_b = nll[rows_of < B]
        nll_i = nll[rows_of >= 2 * B] if self.injected_lm_loss else None
        lm_sum = nll_b.sum() + (self.lambda_injected * nll_i.sum() if nll_i is not None else 0.0)
        n_local = nll_b.numel() + (nll_i.numel() if nll_i is not None else 0)

        # contrastive term on projected, mean-pooled prompt representations
        hidden = outputs.hidden_states[self.pool_layer]
        pooled = pool_hidden_states(hidden, pool_mask)
        z = self.projection_head(pooled)
        con = contrastive_loss(z[:B], z[B:2 * B], z[2 * B:], **self.loss_cfg)

        if num_items_in_batch is not None:
            lm = lm_sum / num_items_in_batch
            share = B / step_triplets if step_triplets is not None else 1.0 / max(
                getattr(self, "current_gradient_accumulation_steps", 1), 1)
            scale = 1
            if self.args.average_tokens_across_devices:
                scale = self.accelerator.num_processes
            loss = (self.lambda_task * lm + con.loss * share) * scale
        else:
            lm = lm_sum / max(n_local, 1)
            loss = self.lambda_task * lm + con.loss
        if not torch.isfinite(loss.detach()).all():
            from trainers.callbacks import NonFiniteLossError

            raise NonFiniteLossError(f"non-finite causal loss {loss.item()} at step {self.state.global_step}")

        with torch.no_grad():
            pb, pc, pi = pooled[:B], pooled[B:2 * B], pooled[2 * B:]
            vals = {
                "loss_lm": nll_b.mean() if nll_b.numel() else torch.zeros(()),
                "loss_causal": con.loss_causal, "loss_spurious": con.loss_spurious, "loss_contrastive": con.loss,
                "causal_stability": con.cos_bc.mean(), "spurious_similarity": con.cos_bi.mean(),
                "pooled_causal_stability": torch.nn.functional.cosine_similarity(pb, pc, dim=-1).mean(),
                "pooled_spurious_similarity": torch.nn.functional.cosine_similarity(pb, pi, dim=-1).mean(),
            }
            if nll_i is not None and nll_i.numel():
                vals["loss_lm_injected"] = nll_i.mean()
            self._accumulate("train" if model.training else "eval", vals, B)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ LM head on selected positions
    def _output_embeddings(self, model):
        return self.accelerator.unwrap_model(model).get_output_embeddings()

    @torch.no_grad()
    def _use_hidden_state_logits(self, model, input_ids) -> bool:
        """Whether ``lm_head(hidden_states[-1])`` reproduces the model's logits (checked once on a 4-token probe).

        If so, the LM loss applies the output embedding only to the labelled (row, position) pairs — far less
        memory than logits for all 3B rows (the vocabulary is large). Models with extra logit processing
        (soft-capping, scaling) or an untied last hidden state fail the check and get logits from the model
        (``logits_to_keep`` = the labelled positions) instead. The probe runs in eval mode and restores the mode.
        """
        if self._fast_lm is None:
            emb = self._output_embeddings(model)
            ok = emb is not None
            if ok:
                was = model.training
                model.eval()
                try:
                    probe = input_ids[:1, :4]
                    out = model(input_ids=probe, output_hidden_states=True, use_cache=False, logits_to_keep=1)
                    ref = out.logits[:, -1].float()
                    mine = emb(out.hidden_states[-1][:, -1]).float()
                    tol = 1e-3 if ref.dtype == torch.float32 and mine.dtype == torch.float32 else 2e-2
                    ok = ref.shape == mine.shape and bool(torch.allclose(ref, mine, rtol=tol, atol=tol * ref.abs().max()))
                finally:
                    model.train(was)
            self._fast_lm = ok
            log.info("causal LM loss: %s", "lm_head on labelled positions only" if ok else
                     "model logits at labelled positions (the model post-processes its logits)")
        return self._fast_lm

    # ------------------------------------------------------------------ metrics
    @staticmethod
    def _zero_sums() -> dict:
        return {"count": 0.0, **{k: 0.0 for k in METRIC_KEYS if k != "causal_discrimination"}, "n_inj": 0.0}

    def _accumulate(self, mode: str, vals: dict, weight: int) -> None:
        s = self._sums[mode]
        s["count"] += weight
        for k, v in vals.items():
            s[k] += float(v) * weight
        if "loss_lm_injected" in vals:
            s["n_inj"] += weight

    def _averages(self, mode: str) -> dict:
        s = self._sums[mode]
        keys = sorted(s)
        if self.args.world_size > 1:
            t = torch.tensor([s[k] for k in keys], dtype=torch.float64, device=self.args.device)
            t = self.accelerator.reduce(t, reduction="sum")
            s = dict(zip(keys, t.tolist()))
        self._sums[mode] = self._zero_sums()
        if s["count"] <= 0:
            return {}
        out = {k: s[k] / s["count"] for k in METRIC_KEYS if k in s and k != "loss_lm_injected"}
        if s["n_inj"] > 0:
            out["loss_lm_injected"] = s["loss_lm_injected"] / s["n_inj"]
        out["causal_discrimination"] = out["causal_stability"] - out["spurious_similarity"]
        return {k: round(v, 6) for k, v in out.items()}

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
        return {"pool_layer": self.pool_layer}

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        save_projection_head(self.projection_head, output_dir or self.args.output_dir, self._head_extra())

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        _load_head_into(self.projection_head, resume_from_checkpoint)
        log.info("restored the causal projection head from %s", resume_from_checkpoint)

    def _load_best_model(self):
        super()._load_best_model()
        if self.state.best_model_checkpoint:
            _load_head_into(self.projection_head, self.state.best_model_checkpoint)


def make_head(head_type: str, hidden_size: int, dim: int, hidden: int, seed: int) -> ProjectionHead:
    """Convenience alias of :func:`build_projection_head` with the model's hidden size."""
    return build_projection_head(head_type, hidden_size, dim, hidden, seed=seed)
