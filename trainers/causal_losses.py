"""Pooling, projection heads and the contrastive losses of the causal stage (stage 2).

Notation: for a batch of B triplets, ``z_b``, ``z_c``, ``z_i`` (each (B, D)) are the projected, pooled
representations of the benign, counterfactual and injected prompts; ``cos`` is the row-wise cosine similarity
and τ the temperature (0.01 ≤ τ ≤ 1). The stage's objective (ARCHITECTURE.md, stage 2) is

    L = λ_task · L_LM  +  L_contrastive

where ``L_LM`` is the token-level NLL of the benign response (see ``trainers/causal.py`` for its normalisation
under gradient accumulation) and ``L_contrastive`` is one of (each a mean over the B triplets):

* ``cosine``  : −λ_causal · cos(z_b, z_c)/τ + λ_spurious · cos(z_b, z_i)/τ
  (pull the counterfactual — same meaning, different wording — towards the benign prompt; push the prompt that
  carries an injected instruction away: the representation should depend on the task's causal content, not on
  the surface form, and should change when an instruction is smuggled into the data).
* ``infonce`` : λ_causal · InfoNCE with the counterfactual as the positive and the injection as the negative
  (van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding", eq. 4:
  L_N = −E[ log f(x⁺, c) / Σ_{x_j ∈ X} f(x_j, c) ] with f(x, c) = exp(cos(x, c)/τ)):

      ℓ_k = −log  exp(cos(b_k, c_k)/τ) / ( exp(cos(b_k, c_k)/τ) + exp(cos(b_k, i_k)/τ) + Σ_{j≠k} [exp(cos(b_k, c_j)/τ)
                                                                                               + exp(cos(b_k, i_j)/τ)] )

  where the Σ_{j≠k} in-batch negatives are included only with ``in_batch_negatives=True``. λ_spurious is not
  used (the injection enters as the negative); ``loss_spurious`` is reported as 0.
* ``margin``  : −λ_causal · cos(z_b, z_c)/τ + λ_spurious · relu(cos(z_b, z_i) − floor)/τ, i.e. the cosine
  variant whose separation term stops at a floor: once the benign and injected prompts are at most ``floor``
  similar, they are no longer pushed apart (the ReLU(cos) representation-rerouting loss of Circuit Breakers,
  Zou et al. 2024, "Improving Alignment and Robustness with Circuit Breakers", §3, with floor = 0).

Everything here is computed in float32, whatever the model's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HEAD_TYPES = ("linear", "mlp", "bottleneck")
LOSS_VARIANTS = ("cosine", "infonce", "margin")
TAU_MIN, TAU_MAX = 0.01, 1.0


# --------------------------------------------------------------------------------------------- pooling
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
