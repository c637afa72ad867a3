"""Stage 1 trainer: TRL's DPOTrainer with per-principle reward metrics for constitutional preference pairs.

DPO (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7) with TRL's own loss, unchanged: any
``DPOConfig.loss_type`` (a name or a list of names combined with ``loss_weights``) works. The implicit reward of a
completion y for prompt x is ``r(x, y) = β · (log π_θ(y|x) − log π_ref(y|x))`` (eq. 5), log-probs summed over the
completion tokens; the margin of a pair is ``r(x, y_chosen) − r(x, y_rejected)``.

Reference model: with a peft LoRA model and ``ref_model=None`` (how stage 1 builds it: ``peft_config`` passed to
the trainer), TRL keeps **no second copy** of the model: ``trainer.ref_model is None`` and the reference
log-probs are computed by the same network with the adapter disabled (``use_adapter(model, None)`` →
``model.disable_adapter()``), i.e. by the merged SFT model the adapter was added to.

Metrics added to TRL's (which already logs ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies`` — the share of pairs with a strictly positive margin — and ``logps/*``):

- ``rewards/margin/<principle_id>``: mean margin of the batch's pairs critiqued under that principle;
- ``rewards/accuracy/<principle_id>``: share of those pairs with a positive margin;
- ``rewards/margins_std``, ``rewards/margins_min``: spread and worst pair of the batch (gathered over ranks);
- ``rewards/chosen_per_token``, ``rewards/rejected_per_token``: rewards divided by completion length (tokens),
  which separates "the revision got likelier" from "the revision is shorter".

Like TRL's, each is the mean over the batches since the last log. Per-principle keys appear only for the
principles present in those batches.

Retention of the SFT stage (``retain_sft`` rows and ``retain_sft_weight`` λ > 0): a later stage must not undo an
earlier one, so each training micro-batch of B pairs also replays B rows of the SFT data (experience replay,
Rolnick et al. 2019, "Experience Replay for Continual Learning") and the loss becomes TRL's DPO loss + λ · the
token-mean NLL of their assistant answers, ``retain_sft/nll`` in the logs. Rows are taken in order, cycling, rank r
of P starting at r·B and every process advancing by P·B, so processes replay different rows; the position follows
``global_step`` on resume. TRL's own ``loss_type: [sigmoid, sft]`` with ``loss_weights`` adds the NLL of the
*chosen* answers instead (RPO, Pang et al. 2024 eq. 2); this term keeps the SFT data's answers. The replay forward
is a second call of the policy within the step, followed by one backward over both; with several processes this is
untested (DDP allows it when no parameter goes unused, which holds for LoRA).

How the principle id reaches ``compute_loss``: TRL's ``DataCollatorForPreference`` builds tensors only from
``prompt_ids``/``chosen_ids``/``rejected_ids`` and drops every other key, and ``remove_unused_columns`` removes
non-signature columns before that. This trainer adds ``principle_id`` to the signature columns and wraps the
collator (:class:`PrincipleCollator`) so each batch carries ``principle_idx`` (LongTensor (B,), index into
``trainer.principle_ids``, -1 for an unknown/missing id). ``compute_loss`` pops it before the model sees the batch.

How the per-pair rewards are obtained without a second reference forward: before calling TRL's loss,
``compute_loss`` computes the reference log-probs once with TRL's own ``compute_ref_log_probs`` (adapter
disabled), puts them in the batch as ``ref_chosen_logps``/``ref_rejected_logps`` and lets TRL's loss read them
(its precomputed-reference path). The policy log-probs per pair come from the logits TRL returns
(``return_outputs=True``). With ``use_liger_kernel`` (no logits materialised) the added metrics are skipped.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import torch
from trl import DPOTrainer
from trl.trainer.utils import selective_log_softmax

log = logging.getLogger(__name__)

UNKNOWN = -1


def metric_safe(principle_id: str) -> str:
    """A principle id usable inside a metric name (W&B/TensorBoard): other characters become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(principle_id))


class PrincipleCollator:
    """Wrap a preference collator: pop each example's ``principle_id`` and add ``principle_idx`` (B,) to the batch."""

    def __init__(self, collator, principle_ids: list[str]):
        self.collator = collator
        self.index = {p: i for i, p in enumerate(principle_ids)}

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        idx = []
        clean = []
        for ex in examples:
            ex = dict(ex)
            pid = ex.pop("principle_id", None)
            idx.append(self.index.get(pid, UNKNOWN) if pid is not None else UNKNOWN)
            clean.append(ex)
        batch = self.collator(clean)
        batch["principle_idx"] = torch.tensor(idx, dtype=torch.long)
        return batch


def _principles_of(*datasets) -> list[str]:
    ids: list[str] = []
    for ds in datasets:
        if ds is None:
            continue
        parts = ds.values() if isinstance(ds, dict) else [ds]
        for d in parts:
            cols = getattr(d, "column_names", None) or []
            if "principle_id" in cols:
                for p in d["principle_id"]:
                    if p is not None and p not in ids:
                        ids.append(p)
    return sorted(ids)


class ConstitutionalDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with reward metrics by constitutional principle (see the module docstring).

    Takes the same arguments as ``DPOTrainer``. Datasets are TRL conversational preference rows
    (``prompt``/``chosen``/``rejected`` message lists) with an optional ``principle_id`` string column.
    Attributes after each ``compute_loss``: ``last_pair_margins`` (B,) float tensor of this rank's per-pair
    margins and ``last_principle_idx`` (B,), for inspection and tests.
    """

    def __init__(self, *args, retain_sft: list[dict] | None = None, retain_sft_weight: float = 0.0, **kwargs):
        if retain_sft_weight < 0:
            raise ValueError(f"retain_sft_weight must be ≥ 0, got {retain_sft_weight}")
        if retain_sft_weight > 0 and not retain_sft:
            raise ValueError("retain_sft_weight > 0 needs retain_sft rows ({'input_ids', 'labels'})")
        self.retain_sft, self.retain_sft_weight = list(retain_sft or []), retain_sft_weight
        self._retain_calls = 0
        train_ds = kwargs.get("train_dataset")
        eval_ds = kwargs.get("eval_dataset")
        self.principle_ids = _principles_of(train_ds, eval_ds)
        super().__init__(*args, **kwargs)
        if self.principle_ids:
            self.data_collator = PrincipleCollator(self.data_collator, self.principle_ids)
        self._metric_names = [metric_safe(p) for p in self.principle_ids]
        self.last_pair_margins: torch.Tensor | None = None
        self.last_principle_idx: torch.Tensor | None = None
        self._warned_liger = False

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "principle_id" not in self._signature_columns:
            self._signature_columns = list(self._signature_columns) + ["principle_id"]

    # ---------------------------------------------------------------------------------------------- loss
    def _sequence_logps(self, logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """Summed completion log-probs (2B,) from logits (2B, L, V), exactly as TRL's ``_compute_loss`` sums them
        (including the ``ld_alpha`` length-desensitised variant, Liu et al. 2024 "LD-DPO")."""
        shift_mask = completion_mask[..., 1:]
        per_tok = selective_log_softmax(logits[..., :-1, :].detach(), input_ids[..., 1:], row_mask=shift_mask)
        if self.ld_alpha is None:
            return per_tok.sum(dim=1)
        comp_pos = shift_mask.cumsum(dim=1)
        comp_lens = shift_mask.sum(dim=1).long()
        chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
        shared = torch.minimum(chosen_lens, rejected_lens)
        shared = torch.cat([shared, shared], dim=0).unsqueeze(1)
        shared_mask = (comp_pos > 0) & (comp_pos <= shared)
        tail_mask = comp_pos > shared
        return (per_tok * shared_mask).sum(1) + self.ld_alpha * (per_tok * tail_mask).sum(1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's DPO loss (unchanged) plus the metrics of the module docstring.

        ``inputs``: ``input_ids``/``attention_mask``/``completion_mask`` (2B, L) — chosen rows first, then rejected —
        and ``principle_idx`` (B,). Returns the loss (and TRL's outputs when ``return_outputs``).
        """
        inputs = dict(inputs)
        principle_idx = inputs.pop("principle_idx", None)
        if self.use_liger_kernel:
            if not self._warned_liger:
                log.warning("use_liger_kernel: per-principle reward metrics are not computed (no logits)")
                self._warned_liger = True
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        injected = False
        if not self.precompute_ref_logps:
            # One reference forward (adapter disabled / ref model), handed to TRL's loss as if precomputed.
            ref_model = self.ref_model if self.ref_model is not None else model
            ref_chosen, ref_rejected = self.compute_ref_log_probs(ref_model, inputs)
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref_chosen, ref_rejected
            injected = True
        self.precompute_ref_logps = True
        try:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        finally:
            if injected:
                self.precompute_ref_logps = False
        if not torch.isfinite(loss.detach()).all():  # the Trainer's logging_nan_inf_filter would hide it
            from staged_alignment.core.callbacks import NonFiniteLossError

            raise NonFiniteLossError(f"non-finite DPO loss {loss.item()} at step {self.state.global_step}; the last "
                                     "good checkpoint is kept, lower the learning rate or check the pairs")
        self._log_pair_metrics(outputs.logits, inputs, principle_idx)
        if self.retain_sft_weight > 0 and model.training:
            nll = self._retain_sft_nll(model, inputs["input_ids"].shape[0] // 2)
            loss = loss + self.retain_sft_weight * nll
            self._metrics["train"]["retain_sft/nll"].append(nll.item())
        return (loss, outputs) if return_outputs else loss

    def retain_sft_batch(self, n: int) -> dict[str, torch.Tensor]:
        """The next ``n`` replayed SFT rows of this process, right-padded: ``input_ids``, ``attention_mask`` and
        ``labels`` (-100 on prompt and padding), each (n, L). Position: ``(k·P + r)·n`` for the k-th call of the
        run (resumed runs start at k = global_step · gradient_accumulation_steps)."""
        k = max(self._retain_calls, self.state.global_step * self.args.gradient_accumulation_steps)
        self._retain_calls = k + 1
        P, r, N = max(self.args.world_size, 1), self.args.process_index, len(self.retain_sft)
        rows = [self.retain_sft[((k * P + r) * n + j) % N] for j in range(n)]
        L = max(len(x["input_ids"]) for x in rows)
        pad = self.processing_class.pad_token_id if self.processing_class.pad_token_id is not None else 0
        ids = torch.full((n, L), pad, dtype=torch.long)
        att = torch.zeros((n, L), dtype=torch.long)
        lab = torch.full((n, L), -100, dtype=torch.long)
        for i, x in enumerate(rows):
            m = len(x["input_ids"])
            ids[i, :m], att[i, :m], lab[i, :m] = torch.tensor(x["input_ids"]), 1, torch.tensor(x["labels"])
        return {"input_ids": ids, "attention_mask": att, "labels": lab}

    def _retain_sft_nll(self, model, n: int) -> torch.Tensor:
        """Token-mean NLL of the assistant tokens of the next ``n`` replayed SFT rows under the policy."""
        import torch.nn.functional as F

        b = {k: v.to(self.args.device) for k, v in self.retain_sft_batch(n).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), ignore_index=-100)

    @torch.no_grad()
    def _log_pair_metrics(self, logits, inputs, principle_idx) -> None:
        mode = "train" if self.model.training else "eval"
        logps = self._sequence_logps(logits, inputs["input_ids"], inputs["completion_mask"])
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        ref_chosen = inputs["ref_chosen_logps"].to(chosen_logps.device, chosen_logps.dtype)
        ref_rejected = inputs["ref_rejected_logps"].to(chosen_logps.device, chosen_logps.dtype)
        chosen_rewards = self.beta * (chosen_logps - ref_chosen)
        rejected_rewards = self.beta * (rejected_logps - ref_rejected)
        margins = (chosen_rewards - rejected_rewards).float()
        lens = inputs["completion_mask"][..., 1:].sum(dim=1).clamp(min=1).to(margins.dtype)
        chosen_len, rejected_len = lens.chunk(2, dim=0)
        self.last_pair_margins = margins.detach().cpu()
        if principle_idx is None:
            principle_idx = torch.full_like(margins, UNKNOWN, dtype=torch.long)
        principle_idx = principle_idx.to(margins.device)
        self.last_principle_idx = principle_idx.detach().cpu()

        all_margins = self.accelerator.gather_for_metrics(margins)
        all_idx = self.accelerator.gather_for_metrics(principle_idx)
        m = self._metrics[mode]
        m["rewards/margins_std"].append(all_margins.std(unbiased=False).item() if all_margins.numel() > 1 else 0.0)
        m["rewards/margins_min"].append(all_margins.min().item())
        m["rewards/chosen_per_token"].append(
            self.accelerator.gather_for_metrics(chosen_rewards.float() / chosen_len).mean().item())
        m["rewards/rejected_per_token"].append(
            self.accelerator.gather_for_metrics(rejected_rewards.float() / rejected_len).mean().item())
        for k in torch.unique(all_idx).tolist():
            if k == UNKNOWN or k >= len(self._metric_names):
                continue
            sel = all_margins[all_idx == k]
            name = self._metric_names[k]
            m[f"rewards/margin/{name}"].append(sel.mean().item())
            m[f"rewards/accuracy/{name}"].append((sel > 0).float().mean().item())
