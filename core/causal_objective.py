"""The causal stage's objective and projection head settings, declared once (no torch import).

:class:`CausalLossSettings` and :class:`CausalHeadSettings` (pydantic dataclasses, :mod:`core.settings`) are the
single declaration of every loss weight, view and head setting: their defaults are the objective the ablation
measured best (arm A5: benign LM + injected LM + KL invariance, no contrastive term; ``docs/results.md``), and each
field carries its constraint and ``description``. The pipeline's ``causal.loss`` and ``causal.head``
YAML sections are read into them (``core.config``), and :class:`trainers.causal.CausalConfig` (a
``TrainingArguments`` subclass, as ``trl.DPOConfig`` is) has one flat field per setting generated from them
(head settings prefixed ``head_``, as :data:`HEAD_PREFIX` says).

Formulas and sources of each term: ``trainers/causal_losses.py``.
"""
from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from staged_alignment.core.settings import Bool, Float, Int, field_infos, invalid, section

Contrastive = Literal["none", "v1", "v2"]
V1Variant = Literal["cosine", "infonce", "margin"]
HeadType = Literal["linear", "mlp", "bottleneck"]
CONTRASTIVE_VERSIONS, V1_VARIANTS, HEAD_TYPES = get_args(Contrastive), get_args(V1Variant), get_args(HeadType)
HEAD_PREFIX = "head_"


def _weight(default: float, description: str):
    return Field(default, ge=0, description=description)


@section
class CausalLossSettings:
    """Weights and settings of the causal stage's objective, a weighted sum of terms (each weight ≥ 0; a weight of
    0 turns its term off and, where no other term needs it, its view out of the batch). Building one validates it:
    a value outside its field's constraint, or an objective with no LM term, raises ``pydantic.ValidationError``
    (a ``ValueError``) naming the field."""

    lambda_task: Float = _weight(1.0, "NLL(y | x_b): the benign prompt toward the target answer")
    lambda_lm_injected: Float = _weight(1.0, "NLL(y | x_i): the injected prompt toward the same target (StruQ, "
                                             "Chen et al. 2024)")
    lambda_lm_counterfactual: Float = _weight(0.0, "NLL(y | x_c): the counterfactual prompt toward the target")
    lambda_kl: Float = _weight(1.0, "KL(sg[p(.|x_b, y<t)] || p(.|x_i, y<t)) over response tokens (consistency "
                                    "training)")
    lambda_pref: Float = _weight(0.0, "DPO sigmoid on x_i with y preferred to the hijacked answer, against the "
                                      "adapter-disabled reference (SecAlign, Chen et al. 2025)")
    pref_beta: Float = Field(0.1, gt=0, description="beta of the preference term")
    contrastive: Contrastive = Field(
        "none", description="contrastive term: none | v1 (the seed's prompt-pooled states; collapsed utility in the "
                            "ablation) | v2 (response states, hijacked answer as negative)")
    lambda_contrastive: Float = _weight(1.0, "weight of the v2 contrastive term")
    contrastive_counterfactual: Bool = Field(True, description="v2: z(x_c, y) as a second positive (adds the "
                                                               "counterfactual view)")
    variant: V1Variant = Field("cosine", description="v1 loss form")
    temperature: Float = Field(0.1, ge=0.01, le=1.0, description="tau of v1 and v2")
    lambda_causal: Float = _weight(1.0, "v1: weight of the benign/counterfactual pull")
    lambda_spurious: Float = _weight(1.0, "v1: weight of the benign/injected push")
    margin_floor: Float = Field(0.0, ge=-1.0, le=1.0, description="v1 margin variant: the separation term stops at "
                                                                  "cos <= floor (a cosine)")
    in_batch_negatives: Bool = Field(False, description="v1 infonce: other triplets' counterfactuals/injections as "
                                                        "extra negatives")
    lambda_retain_sft: Float = _weight(0.0, "retention: NLL(chosen | prompt) of replayed DPO-stage pairs")
    lambda_retain_dpo: Float = _weight(0.0, "retention: DPO sigmoid on replayed pairs against the adapter-disabled "
                                            "reference")
    retain_beta: Float = Field(0.1, gt=0, description="beta of the retention DPO term")

    @model_validator(mode="after")
    def _needs_an_lm_term(self):
        if not (self.lambda_task > 0 or self.lambda_lm_injected > 0 or self.lambda_lm_counterfactual > 0):
            raise invalid("lambda_task", "the objective needs at least one LM term (lambda_task, lambda_lm_injected "
                                         "or lambda_lm_counterfactual > 0)")
        return self


@section
class CausalHeadSettings:
    """The projection head on pooled hidden states (used by a contrastive term only). Building one validates it
    (``pydantic.ValidationError`` naming the field): a bottleneck head must be narrower than its output."""

    type: HeadType = Field("mlp", description="the head's architecture")
    dim: Int = Field(128, ge=1, description="output dimension of the head")
    hidden: Int = Field(256, ge=1, description="hidden width of the mlp/bottleneck head")
    pool_layer: Int = Field(-1, description="hidden-state layer pooled for the head (-1: the last)")
    learning_rate: Float | None = Field(None, gt=0, description="the head's own learning rate (default: the "
                                                                "training learning rate)")

    @model_validator(mode="after")
    def _bottleneck_is_narrow(self):
        if self.type == "bottleneck" and self.hidden >= self.dim:
            raise invalid("hidden", f"a bottleneck head needs hidden < dim (got {self.hidden} ≥ {self.dim})")
        return self


def loss_field_names() -> list[str]:
    return list(field_infos(CausalLossSettings))


def head_field_names() -> list[str]:
    """The head settings as :class:`trainers.causal.CausalConfig` names them (``head_type``, ``head_dim``, …)."""
    return [HEAD_PREFIX + name for name in field_infos(CausalHeadSettings)]


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
