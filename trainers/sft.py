"""Stage 0 trainer: TRL's SFTTrainer on Zephyr conversations with assistant-only loss."""
from __future__ import annotations

import torch
from trl import SFTTrainer


class ZephyrSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` whose ``compute_loss`` also logs the tokens that carry loss.

    TRL's loss is kept unchanged (mean token NLL over label positions ≠ -100, normalised with
    ``num_items_in_batch`` under gradient accumulation). Added metrics, in TRL's ``_metrics`` so they reach
    every ``report_to`` backend: ``num_trained_tokens`` (cumulative count of assistant tokens, incl. eos, that
    carried loss, summed over ranks) and ``trained_token_fraction`` (trained / attended tokens in the batch).
    Inputs: ``input_ids``/``attention_mask``/``labels`` of shape (B, L); labels are -100 outside assistant turns.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._trained_tokens_total = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if labels is not None:
            mode = "train" if self.model.training else "eval"
            trained = self.accelerator.gather_for_metrics((labels[:, 1:] != -100).sum()).sum().item()
            attended = (self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                        if "attention_mask" in inputs else labels.numel())
            if mode == "train":
                self._trained_tokens_total += trained
                self._metrics[mode]["num_trained_tokens"] = [self._trained_tokens_total]
            self._metrics[mode]["trained_token_fraction"].append(trained / max(attended, 1))
        loss = result[0] if return_outputs else result
        if not torch.isfinite(loss.detach()).all():
            from staged_alignment.core.callbacks import NonFiniteLossError

            raise NonFiniteLossError(f"non-finite SFT loss {loss.item()} at step {self.state.global_step}")
        return result
