"""Pooling, projection heads and the loss terms of the causal stage (stage 2).

Notation: a triplet gives the benign prompt x_b, its counterfactual x_c (same meaning, reworded), the injected
prompt x_i (an instruction smuggled into the data part), the target answer y (gold, or the starting model's own
answer to x_b) and the hijacked answer y_a (what obeying the injection looks like). p_θ is the trained model, p_ref
the same model with its LoRA adapter disabled (the starting model), sg[·] stops the gradient, τ ∈ [0.01, 1] a
temperature. The stage's objective is a weighted sum (``causal.loss``; each weight may be 0):

    L = λ_task·NLL(y|x_b) + λ_lm_injected·NLL(y|x_i) + λ_lm_counterfactual·NLL(y|x_c)
        + λ_kl·L_KL + λ_pref·L_pref + L_contrastive + λ_retain_sft·L_retain_sft + λ_retain_dpo·L_retain_dpo

* ``lm_injected``: NLL(y|x_i), the injected prompt trained toward the benign answer — StruQ's structured
  instruction tuning (Chen et al. 2024, "StruQ: Defending Against Prompt Injection with Structured Queries", §4:
  fine-tune on injected samples with the response to the original instruction).
* ``kl_invariance`` (:func:`token_kl`): L_KL = (1/|y|) Σ_t KL( sg[p_θ(·|x_b, y<t)] ‖ p_θ(·|x_i, y<t) ), the
  injected prompt's next-token distributions pulled toward the clean prompt's along y (consistency training: Irpan
  et al. 2025, "Consistency Training Helps Stop Sycophancy and Jailbreaks", bias-augmented consistency training
  with the clean prompt's outputs as targets; Xie et al. 2020 UDA's consistency loss for the KL form).
* ``pref_injected`` (:func:`dpo_sigmoid_loss`): L_pref = −log σ(β[(log p_θ(y|x_i) − log p_ref(y|x_i)) −
  (log p_θ(y_a|x_i) − log p_ref(y_a|x_i))]), DPO's sigmoid loss (Rafailov et al. 2023, eq. 7) on the injected
  prompt with y ≻ y_a — SecAlign's objective (Chen et al. 2024, "SecAlign: Defending Against Prompt Injection
  with Preference Optimization", §4) computed inside the same step (TRL 1.14's DPOTrainer has the loss only inline
  in ``_compute_loss``, so the formula is written here; its sigmoid branch is the same expression).
* ``contrastive`` v2 (:func:`anchored_infonce`): z = projection head over layer-ℓ states mean-pooled over the
  *response* positions; anchor a = sg[z(x_b, y)], positives z(x_i, y) (and z(x_c, y)), negative z(x_i, y_a), the
  hijacked trajectory; per positive p: −log( e^{cos(a,p)/τ} / (e^{cos(a,p)/τ} + e^{cos(a,n)/τ}) ), averaged over
  the positives (InfoNCE, van den Oord et al. 2018 eq. 4, with one negative). This re-anchors the seed's idea on the
  output: the model's states while writing y under injection stay with the clean ones and away from the states of
  obeying (the Circuit Breakers analogue, Zou et al. 2024, §3, which moves the states of harmful continuations).
* ``contrastive`` v1 (:func:`contrastive_loss`): the seed's formula on prompt-pooled states, kept for comparison:
  ``cosine``  : −λ_causal · cos(z_b, z_c)/τ + λ_spurious · cos(z_b, z_i)/τ;
  ``infonce`` : λ_causal · InfoNCE with the counterfactual as positive and the injection as negative (van den Oord
  et al. 2018, eq. 4; optional in-batch negatives):
      ℓ_k = −log  exp(cos(b_k, c_k)/τ) / ( exp(cos(b_k, c_k)/τ) + exp(cos(b_k, i_k)/τ) + Σ_{j≠k} [exp(cos(b_k, c_j)/τ)
                                                                                           + exp(cos(b_k, i_j)/τ)] );
  ``margin``  : −λ_causal · cos(z_b, z_c)/τ + λ_spurious · relu(cos(z_b, z_i) − floor)/τ (Circuit Breakers'
  ReLU(cos) rerouting loss, Zou et al. 2024, §3, with floor = 0).
  v1 pushes the injected *prompt* away from the benign one, which rewards the model for letting the injection change
  its state — the opposite of what robustness needs; the ablation (``stages/ablate.py``) measures it.
* retention (``lambda_retain_sft``, ``lambda_retain_dpo``): a later stage must not undo an earlier one, so the DPO
  stage's preference pairs (x_r, y_w ≻ y_l) are replayed inside the causal stage's steps (experience replay for
  continual learning: Rolnick et al. 2019, "Experience Replay for Continual Learning"), one pair per triplet:
  ``retain_sft`` = (1/|y_w|) Σ_t −log p_θ(y_w,t | x_r, y_w,<t), the token-mean NLL of the chosen answer (the NLL
  term RPO adds to DPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization", eq. 2; TRL's ``sft`` loss
  type); ``retain_dpo`` = −log σ(β_r[(log p_θ(y_w|x_r) − log p_ref(y_w|x_r)) − (log p_θ(y_l|x_r) − log
  p_ref(y_l|x_r))]) (:func:`dpo_sigmoid_loss`, Rafailov et al. 2023 eq. 7) against the same adapter-disabled
  reference, i.e. the DPO stage's own objective kept satisfied. Both are per-triplet terms.

Everything here is computed in float32, whatever the model's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from staged_alignment.core.causal_objective import CONTRASTIVE_VERSIONS as CONTRASTIVE  # noqa: F401 (re-exported)
from staged_alignment.core.causal_objective import HEAD_TYPES
from staged_alignment.core.causal_objective import V1_VARIANTS as LOSS_VARIANTS

TAU_MIN, TAU_MAX = 0.01, 1.0


# --------------------------------------------------------------------------------------------- pooling
@torch.no_grad()
def lm_head_reproduces_logits(model, output_embeddings: nn.Module, probe_ids: torch.Tensor) -> bool:
    """Whether ``output_embeddings(hidden_states[-1])`` reproduces ``model``'s logits on ``probe_ids`` ((1, T)
    token ids; a few tokens suffice), in eval mode (the mode is restored).

    When it does, callers apply the output embedding to the positions they need only, instead of materialising
    (B, L, V) logits. Models that post-process their logits (soft-capping, scaling) fail the check (rtol 1e-3,
    atol 1e-3 · max |logit|, compared in fp32) and callers use the model's own logits.
    """
    was = model.training
    model.eval()
    try:
        out = model(input_ids=probe_ids, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        ref = out.logits[:, -1].float()
        mine = output_embeddings(out.hidden_states[-1][:, -1]).float()
    finally:
        model.train(was)
    return logits_agree(ref, mine)


def logits_agree(model_logits: torch.Tensor, head_logits: torch.Tensor | None) -> bool:
    """Whether the output embedding's logits match the model's ((…, V) each, compared in fp32): same shape and
    ``allclose`` with rtol 1e-3, atol 1e-3 · max |model logit|. The shared tolerance of
    :func:`lm_head_reproduces_logits` and :class:`trainers.causal.CausalPeftModel`."""
    if head_logits is None or model_logits.shape != head_logits.shape:
        return False
    ref, mine = model_logits.float(), head_logits.float()
    return bool(torch.allclose(ref, mine, rtol=1e-3, atol=1e-3 * ref.abs().max()))


def pool_hidden_states(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden_states`` over the positions where ``attention_mask`` is 1.

    Args:
        hidden_states: (B, L, H) hidden states of one layer (any float dtype).
        attention_mask: (B, L) 0/1 (or bool) mask of the positions to average — the attention mask, or, in
            training, the prompt-token mask (``pool_mask``); works for left and right padding alike since only
            the mask decides which positions count.
    Returns:
        (B, H) float32 tensor: Σ_t m_t·h_t / Σ_t m_t. Masked positions are excluded with ``torch.where`` (not by
        multiplying), so NaN/inf in padded positions never leaks into the mean or its gradient.
    Raises:
        ValueError: shapes disagree, or a row has no unmasked position.
    """
    if hidden_states.dim() != 3 or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(f"expected hidden_states (B, L, H) and mask (B, L), got {tuple(hidden_states.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    mask = attention_mask.to(device=hidden_states.device).bool()
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("a row of the mask has no unmasked position; cannot mean-pool an empty sequence")
    h = torch.where(mask.unsqueeze(-1), hidden_states.float(), torch.zeros((), dtype=torch.float32,
                                                                          device=hidden_states.device))
    return h.sum(dim=1) / counts.unsqueeze(-1).float()


# --------------------------------------------------------------------------------------------- heads
class ProjectionHead(nn.Module):
    """Projection head g: R^H → R^D applied to pooled hidden states (SimCLR-style, Chen et al. 2020 §2.1).

    Types:
        ``linear``     : Linear(H, D).
        ``mlp``        : Linear(H, hidden) → GELU → Linear(hidden, D).
        ``bottleneck`` : LayerNorm(H) → Linear(H, hidden) → GELU → Linear(hidden, D), meant with hidden < D
                         (a narrow, normalised middle; the LayerNorm tames the large outlier dimensions of
                         last-layer LLM states).
    Always float32; inputs are cast to float32. Forward: (B, H) → (B, D).
    """

    def __init__(self, head_type: str, in_dim: int, dim: int = 128, hidden: int = 256):
        super().__init__()
        if head_type not in HEAD_TYPES:
            raise ValueError(f"unknown projection head type {head_type!r}; expected one of {list(HEAD_TYPES)}")
        if min(in_dim, dim, hidden) < 1:
            raise ValueError(f"head dims must be ≥ 1 (in_dim={in_dim}, dim={dim}, hidden={hidden})")
        self.head_type, self.in_dim, self.dim, self.hidden = head_type, int(in_dim), int(dim), int(hidden)
        if head_type == "linear":
            self.net = nn.Sequential(nn.Linear(in_dim, dim))
        elif head_type == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        else:
            self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.float()

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled.float())

    def config(self) -> dict:
        """The JSON-serialisable description saved beside the weights (``causal_projection.json``)."""
        return {"type": self.head_type, "in_dim": self.in_dim, "dim": self.dim, "hidden": self.hidden}


def build_projection_head(head_type: str, in_dim: int, dim: int = 128, hidden: int = 256,
                          seed: int | None = None) -> ProjectionHead:
    """A :class:`ProjectionHead`, initialised from ``torch.Generator(seed)`` when ``seed`` is given (reproducible
    without touching the global RNG)."""
    if seed is None:
        return ProjectionHead(head_type, in_dim, dim, hidden)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        head = ProjectionHead(head_type, in_dim, dim, hidden)
    finally:
        torch.random.set_rng_state(state)
    return head


# --------------------------------------------------------------------------------------------- losses
def check_temperature(tau: float) -> float:
    """Return τ if 0.01 ≤ τ ≤ 1, else raise ``ValueError`` (a smaller τ makes 1/τ-scaled cosines explode)."""
    if not isinstance(tau, (int, float)) or math.isnan(tau) or not TAU_MIN <= tau <= TAU_MAX:
        raise ValueError(f"temperature τ={tau!r} is outside [{TAU_MIN}, {TAU_MAX}]")
    return float(tau)


@dataclass
class ContrastiveOutput:
    """Per-micro-batch means (scalars, float32). ``loss = loss_causal + loss_spurious`` (with grad)."""

    loss: torch.Tensor
    loss_causal: torch.Tensor
    loss_spurious: torch.Tensor
    cos_bc: torch.Tensor  # (B,) cos(z_b, z_c), detached
    cos_bi: torch.Tensor  # (B,) cos(z_b, z_i), detached


def contrastive_loss(z_b: torch.Tensor, z_c: torch.Tensor, z_i: torch.Tensor, *, variant: str = "cosine",
                     temperature: float = 0.1, lambda_causal: float = 1.0, lambda_spurious: float = 1.0,
                     margin_floor: float = 0.0, in_batch_negatives: bool = False) -> ContrastiveOutput:
    """The contrastive term of the causal stage, averaged over the B triplets (formulas in the module docstring).

    Args:
        z_b, z_c, z_i: (B, D) projected representations of the benign, counterfactual and injected prompts.
        variant: ``cosine`` | ``infonce`` | ``margin``.
        temperature: τ in [0.01, 1] (``ValueError`` otherwise).
        in_batch_negatives: InfoNCE only; adds the other triplets' counterfactuals and injections as negatives.
            With it, a micro-batch's loss depends on which triplets share the micro-batch, so gradient
            accumulation is no longer equivalent to one large batch.
    Returns:
        :class:`ContrastiveOutput` (``loss`` is the batch mean and carries the gradient).
    Raises:
        ValueError: unknown variant, τ out of range, or mismatched shapes.
    """
    tau = check_temperature(temperature)
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"unknown loss variant {variant!r}; expected one of {list(LOSS_VARIANTS)}")
    if not (z_b.shape == z_c.shape == z_i.shape) or z_b.dim() != 2:
        raise ValueError(f"expected three (B, D) tensors, got {tuple(z_b.shape)}, {tuple(z_c.shape)}, {tuple(z_i.shape)}")
    z_b, z_c, z_i = z_b.float(), z_c.float(), z_i.float()
    cos_bc = F.cosine_similarity(z_b, z_c, dim=-1)
    cos_bi = F.cosine_similarity(z_b, z_i, dim=-1)
    zero = cos_bc.new_zeros(())
    if variant == "cosine":
        loss_causal = -lambda_causal * cos_bc.mean() / tau
        loss_spurious = lambda_spurious * cos_bi.mean() / tau
    elif variant == "margin":
        loss_causal = -lambda_causal * cos_bc.mean() / tau
        loss_spurious = lambda_spurious * F.relu(cos_bi - margin_floor).mean() / tau
    else:  # infonce
        if in_batch_negatives:
            nb = F.normalize(z_b, dim=-1)
            cands = F.normalize(torch.cat([z_c, z_i], dim=0), dim=-1)  # (2B, D): [c_1..c_B, i_1..i_B]
            logits = nb @ cands.T / tau  # (B, 2B); the positive of row k is column k
            target = torch.arange(z_b.shape[0], device=z_b.device)
            nce = F.cross_entropy(logits, target)
        else:
            logits = torch.stack([cos_bc, cos_bi], dim=1) / tau  # (B, 2); positive in column 0
            nce = -F.log_softmax(logits, dim=1)[:, 0].mean()
        loss_causal = lambda_causal * nce
        loss_spurious = zero
    return ContrastiveOutput(loss=loss_causal + loss_spurious, loss_causal=loss_causal, loss_spurious=loss_spurious,
                             cos_bc=cos_bc.detach(), cos_bi=cos_bi.detach())


def lm_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of ``targets`` under ``logits``, returned as a (N,) vector over the positions whose target
    is not -100 (ignored positions are *selected out* before ``log_softmax``, so NaN logits at padding can never
    reach the loss or its gradient).

    Args:
        logits: (R, K, V) next-token logits; targets: (R, K) token ids or -100 (already shifted: the target of
        ``logits[:, k]`` is ``targets[:, k]``).
    """
    valid = targets != -100
    if not bool(valid.any()):
        return logits.new_zeros((0,), dtype=torch.float32)
    return F.cross_entropy(logits[valid].float(), targets[valid], reduction="none")


def token_kl(logits_ref: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-row mean token KL( sg[softmax(logits_ref)] ‖ softmax(logits) ) (the ``kl_invariance`` term).

    Args:
        logits_ref: (N, V) next-token logits of the clean prompt at the N response positions (detached here).
        logits: (N, V) logits of the injected prompt at the same positions (same tokens of y, same order).
        rows: (N,) the row (triplet) 0..n_rows-1 each position belongs to.
    Returns:
        (n_rows,) float32: (1/|y_r|) Σ_t KL_t for each row (0 for a row without positions).
    Raises:
        ValueError: shapes disagree.
    """
    if logits_ref.shape != logits.shape or logits.dim() != 2 or rows.shape != logits.shape[:1]:
        raise ValueError(f"expected (N, V) logits twice and (N,) rows, got {tuple(logits_ref.shape)}, "
                         f"{tuple(logits.shape)}, {tuple(rows.shape)}")
    lp_ref = F.log_softmax(logits_ref.detach().float(), dim=-1)
    lp = F.log_softmax(logits.float(), dim=-1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)  # (N,)
    total = torch.zeros(n_rows, dtype=torch.float32, device=kl.device).index_add(0, rows, kl)
    count = torch.zeros(n_rows, dtype=torch.float32, device=kl.device).index_add(0, rows, torch.ones_like(kl))
    return total / count.clamp(min=1)


def sequence_logps(token_logps: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(n_rows,) Σ_t log p(token_t) per row from (N,) token log-probabilities and their rows."""
    return torch.zeros(n_rows, dtype=torch.float32, device=token_logps.device).index_add(0, rows,
                                                                                         token_logps.float())


def dpo_sigmoid_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-example DPO sigmoid loss (Rafailov et al. 2023, eq. 7): −log σ(β[(π_w − r_w) − (π_l − r_l)]).

    All four are (B,) sequence log-probabilities; the reference ones carry no gradient. Returns (B,) float32.
    Raises ``ValueError`` for β ≤ 0 or mismatched shapes.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not (policy_chosen.shape == policy_rejected.shape == ref_chosen.shape == ref_rejected.shape):
        raise ValueError("the four log-probability tensors must have the same shape")
    logits = beta * ((policy_chosen.float() - ref_chosen.detach().float())
                     - (policy_rejected.float() - ref_rejected.detach().float()))
    return -F.logsigmoid(logits)


def anchored_infonce(anchor: torch.Tensor, positives: list, negative: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-example contrastive v2 loss (module docstring): anchor (B, D) is detached; each positive (B, D) is
    contrasted with the one negative (B, D). Returns (B,) float32, the mean over the positives."""
    tau = check_temperature(temperature)
    if not positives:
        raise ValueError("anchored_infonce needs at least one positive")
    a = anchor.detach().float()
    s_neg = F.cosine_similarity(a, negative.float(), dim=-1) / tau
    losses = []
    for p in positives:
        s_pos = F.cosine_similarity(a, p.float(), dim=-1) / tau
        losses.append(-F.log_softmax(torch.stack([s_pos, s_neg], dim=1), dim=1)[:, 0])
    return torch.stack(losses, dim=0).mean(0)
