"""The causal stage's objective and projection head settings, declared once (no torch import).

:class:`CausalLossSettings` and :class:`CausalHeadSettings` are the single declaration of every loss weight, view
and head setting: their defaults are the objective the ablation measured best (arm A5: benign LM + injected LM
+ KL invariance, no contrastive term; ``docs/results.md``), each field carries its ``help``, and
:meth:`CausalLossSettings.validate` holds the constraints. The pipeline's ``causal.loss`` and ``causal.head``
YAML sections are read into them (``core.config``), and :class:`trainers.causal.CausalConfig` (a
``TrainingArguments`` subclass, as ``trl.DPOConfig`` is) has one flat field per setting generated from them
(head settings prefixed ``head_``, as :data:`HEAD_PREFIX` says).

Formulas and sources of each term: ``trainers/causal_losses.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

CONTRASTIVE_VERSIONS = ("none", "v1", "v2")
V1_VARIANTS = ("cosine", "infonce", "margin")
HEAD_TYPES = ("linear", "mlp", "bottleneck")
HEAD_PREFIX = "head_"


def _f(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class CausalLossSettings:
    """Weights and settings of the causal stage's objective, a weighted sum of terms (each ≥ 0; a weight of 0
    turns its term off and, where no other term needs it, its view out of the batch).

    Raises ``ValueError`` from :meth:`validate` (called by :class:`trainers.causal.CausalConfig` and the pipeline's
    config check) naming the field."""

    lambda_task: float = _f(1.0, "NLL(y | x_b): the benign prompt toward the target answer")
    lambda_lm_injected: float = _f(1.0, "NLL(y | x_i): the injected prompt toward the same target (StruQ, Chen et "
                                        "al. 2024)")
    lambda_lm_counterfactual: float = _f(0.0, "NLL(y | x_c): the counterfactual prompt toward the target")
    lambda_kl: float = _f(1.0, "KL(sg[p(.|x_b, y<t)] || p(.|x_i, y<t)) over response tokens (consistency training)")
    lambda_pref: float = _f(0.0, "DPO sigmoid on x_i with y preferred to the hijacked answer, against the "
                                 "adapter-disabled reference (SecAlign, Chen et al. 2025)")
    pref_beta: float = _f(0.1, "beta of the preference term")
    contrastive: str = _f("none", "contrastive term: none | v1 (the seed's prompt-pooled states; collapsed utility "
                                  "in the ablation) | v2 (response states, hijacked answer as negative)")
    lambda_contrastive: float = _f(1.0, "weight of the v2 contrastive term")
    contrastive_counterfactual: bool = _f(True, "v2: z(x_c, y) as a second positive (adds the counterfactual view)")
    variant: str = _f("cosine", "v1 loss form: cosine | infonce | margin")
    temperature: float = _f(0.1, "tau of v1 and v2, 0.01 <= tau <= 1")
    lambda_causal: float = _f(1.0, "v1: weight of the benign/counterfactual pull")
    lambda_spurious: float = _f(1.0, "v1: weight of the benign/injected push")
    margin_floor: float = _f(0.0, "v1 margin variant: the separation term stops at cos <= floor")
    in_batch_negatives: bool = _f(False, "v1 infonce: other triplets' counterfactuals/injections as extra negatives")
    lambda_retain_sft: float = _f(0.0, "retention: NLL(chosen | prompt) of replayed DPO-stage pairs")
    lambda_retain_dpo: float = _f(0.0, "retention: DPO sigmoid on replayed pairs against the adapter-disabled "
                                       "reference")
    retain_beta: float = _f(0.1, "beta of the retention DPO term")

    WEIGHTS = ("lambda_task", "lambda_lm_injected", "lambda_lm_counterfactual", "lambda_kl", "lambda_pref",
               "lambda_contrastive", "lambda_causal", "lambda_spurious", "lambda_retain_sft", "lambda_retain_dpo")

    def validate(self, prefix: str = "") -> None:
        """Raise ``ValueError("<prefix><field>: …")`` for a setting outside its constraint: weights and betas
        finite and ≥ 0 (betas > 0), a known contrastive version and v1 variant, 0.01 ≤ temperature ≤ 1, and at
        least one LM term (λ_task, λ_lm_injected or λ_lm_counterfactual > 0)."""
        for name in self.WEIGHTS + ("pref_beta", "retain_beta", "margin_floor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{prefix}{name}: {v!r} is not a finite number")
            if name in self.WEIGHTS and v < 0:
                raise ValueError(f"{prefix}{name}: a weight must be ≥ 0 (got {v})")
            if name.endswith("_beta") and v <= 0:
                raise ValueError(f"{prefix}{name}: must be > 0 (got {v})")
        if self.contrastive not in CONTRASTIVE_VERSIONS:
            raise ValueError(f"{prefix}contrastive: {self.contrastive!r} is not one of {list(CONTRASTIVE_VERSIONS)}")
        if self.variant not in V1_VARIANTS:
            raise ValueError(f"{prefix}variant: {self.variant!r} is not one of {list(V1_VARIANTS)}")
        if not -1.0 <= self.margin_floor <= 1.0:
            raise ValueError(f"{prefix}margin_floor: must be a cosine in [-1, 1] (got {self.margin_floor})")
        if not 0.01 <= self.temperature <= 1.0:
            raise ValueError(f"{prefix}temperature: {self.temperature} is outside [0.01, 1]")
        if not (self.lambda_task > 0 or self.lambda_lm_injected > 0 or self.lambda_lm_counterfactual > 0):
            raise ValueError(f"{prefix}lambda_task: the objective needs at least one LM term (lambda_task, "
                             "lambda_lm_injected or lambda_lm_counterfactual > 0)")


@dataclass
class CausalHeadSettings:
    """The projection head on pooled hidden states (used by a contrastive term only)."""

    type: str = _f("mlp", "linear | mlp | bottleneck")
    dim: int = _f(128, "output dimension of the head")
    hidden: int = _f(256, "hidden width of the mlp/bottleneck head")
    pool_layer: int = _f(-1, "hidden-state layer pooled for the head (-1: the last)")
    learning_rate: float | None = _f(None, "the head's own learning rate (default: the training learning rate)")

    def validate(self, prefix: str = "") -> None:
        """Raise ``ValueError("<prefix><field>: …")``: a known type, dim and hidden ≥ 1, a bottleneck narrower
        than its output (hidden < dim), a positive head learning rate when set."""
        if self.type not in HEAD_TYPES:
            raise ValueError(f"{prefix}type: {self.type!r} is not one of {sorted(HEAD_TYPES)}")
        if self.dim < 1 or self.hidden < 1:
            raise ValueError(f"{prefix}dim: dim and hidden must be ≥ 1")
        if self.type == "bottleneck" and self.hidden >= self.dim:
            raise ValueError(f"{prefix}hidden: a bottleneck head needs hidden < dim (got {self.hidden} ≥ {self.dim})")
        if self.learning_rate is not None and not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"{prefix}learning_rate: must be > 0 (got {self.learning_rate})")


def loss_field_names() -> list[str]:
    return [f.name for f in fields(CausalLossSettings)]


def head_field_names() -> list[str]:
    """The head settings as :class:`trainers.causal.CausalConfig` names them (``head_type``, ``head_dim``, …)."""
    return [HEAD_PREFIX + f.name for f in fields(CausalHeadSettings)]


def needed_views(*, lambda_task: float = 1.0, lambda_lm_injected: float = 0.0, lambda_lm_counterfactual: float = 0.0,
                 lambda_kl: float = 0.0, lambda_pref: float = 0.0, contrastive: str = "none",
                 contrastive_counterfactual: bool = True, lambda_retain_sft: float = 0.0,
                 lambda_retain_dpo: float = 0.0, **_) -> tuple[list[str], list[str]]:
    """``(views, lm_views)`` a causal objective needs: the benign view always; the injected view for any term on
    x_i; the counterfactual view only when a term uses it (``lm_counterfactual``, contrastive v1, or v2 with its
    counterfactual positive) — otherwise the step costs one forward fewer; the hijack view for ``pref_injected`` and
    contrastive v2; ``retain_chosen`` for either retention term and ``retain_rejected`` for the DPO one.
    ``lm_views`` are the triplet views whose response tokens carry an LM loss (weight > 0); retention rows never
    carry ``labels`` (their terms are per-example, so Trainer's token count stays that of the LM views)."""
    views = ["benign"]
    if lambda_lm_injected > 0 or lambda_kl > 0 or lambda_pref > 0 or contrastive in ("v1", "v2"):
        views.append("injected")
    if lambda_lm_counterfactual > 0 or contrastive == "v1" or (contrastive == "v2" and contrastive_counterfactual):
        views.append("counterfactual")
    if lambda_pref > 0 or contrastive == "v2":
        views.append("hijack")
    if lambda_retain_sft > 0 or lambda_retain_dpo > 0:
        views.append("retain_chosen")
    if lambda_retain_dpo > 0:
        views.append("retain_rejected")
    lm = [v for v, w in (("benign", lambda_task), ("injected", lambda_lm_injected),
                         ("counterfactual", lambda_lm_counterfactual)) if w > 0 and v in views]
    return views, lm
