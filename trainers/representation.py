"""The representation metrics of the three views, the one definition shared by the causal trainer's logs and the
evaluation (:mod:`evaluation.metrics` documents them: cosine of benign vs counterfactual and benign vs injected
representations, their difference, and the centred variants)."""
from __future__ import annotations

import numpy as np


def cosine_rows(a: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise cosine similarity of two (N, H) arrays → (N,); a zero row gives 0. Raises on shape mismatch."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (N, H) arrays of the same shape, got {a.shape} and {b.shape}")
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > eps, num / np.maximum(den, eps), 0.0)


REPRESENTATION_KEYS = ("cos_benign_counterfactual", "cos_benign_injected", "causal_discrimination")


def representation_metrics(benign: np.ndarray, counterfactual: np.ndarray | None, injected: np.ndarray, *,
                           centred: bool = True) -> dict:
    """The representation metrics (module docstring) from (N, D) arrays of the three views.

    Returns ``cos_benign_counterfactual``, ``cos_benign_injected``, ``causal_discrimination`` and, with
    ``centred``, the same three with the suffix ``_centered`` computed after subtracting the mean row of all views.
    ``counterfactual`` None → the keys that need it are None; no rows → every key None.
    """
    keys = list(REPRESENTATION_KEYS) + ([k + "_centered" for k in REPRESENTATION_KEYS] if centred else [])
    if len(benign) == 0:
        return {k: None for k in keys}

    def three(b, c, i):
        cbi = float(cosine_rows(b, i).mean())
        cbc = float(cosine_rows(b, c).mean()) if c is not None else None
        return {"cos_benign_counterfactual": cbc, "cos_benign_injected": cbi,
                "causal_discrimination": (cbc - cbi) if cbc is not None else None}

    out = three(benign, counterfactual, injected)
    if centred:
        views = [benign, injected] + ([counterfactual] if counterfactual is not None else [])
        mu = np.concatenate([np.asarray(v, dtype=np.float64) for v in views]).mean(0, keepdims=True)
        cen = three(np.asarray(benign, dtype=np.float64) - mu,
                    None if counterfactual is None else np.asarray(counterfactual, dtype=np.float64) - mu,
                    np.asarray(injected, dtype=np.float64) - mu)
        out.update({k + "_centered": v for k, v in cen.items()})
    return out
