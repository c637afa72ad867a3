"""Verification with hyppo / causal-learn / statsmodels on constructed data (evaluation/verification.py).

The first HSIC call in a fresh environment compiles hyppo's numba kernels (~1 minute, cached on disk after).
"""
from __future__ import annotations

import numpy as np
import pytest

from staged_alignment.evaluation import verification as V


def paired(n=30, shift=0.0, seed=0, dim=6):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n, dim))
    y = np.r_[np.zeros(n), np.ones(n)]
    x[:, 0] += shift * y
    return x, y, np.r_[np.arange(n), np.arange(n)]


def test_hsic_detects_dependence_and_not_independence():
    x, y, blocks = paired(shift=1.5, seed=1)
    dep = V.hsic_test(x, y, reps=200, seed=0, blocks=blocks)
    assert dep["skipped"] is None and dep["p_value"] < 0.01
    x, y, blocks = paired(shift=0.0, seed=2)
    ind = V.hsic_test(x, y, reps=200, seed=0, blocks=blocks)
    assert ind["p_value"] > 0.05
    # p-value granularity of the permutation test: (1 + #null ≥ stat) / (1 + reps)
    assert dep["p_value"] >= 1 / 201
    # fixed seed → identical p-value (hyppo's blocked permutations use numpy's global RNG; we seed it)
    again = V.hsic_test(x, y, reps=200, seed=0, blocks=blocks)
    assert again["p_value"] == ind["p_value"]
    # the median heuristic: labels 0/1 split in half → median off-diagonal distance 1 → gamma = 1/2
    assert ind["gamma_y"] == pytest.approx(0.5)


def test_hsic_degenerate_inputs_are_skipped():
    x, y, _ = paired(n=10)
    assert "constant" in V.hsic_test(np.ones_like(x), y)["skipped"]
    assert "constant" in V.hsic_test(x, np.zeros_like(y))["skipped"]
    assert "rows" in V.hsic_test(x[:4], y[:4])["skipped"]
    assert V.hsic_test(x, y[:5])["skipped"]


def test_pc_on_tiny_constructed_datasets():
    rng = np.random.default_rng(0)
    m = 400
    a = rng.normal(size=m)
    b = a + 0.5 * rng.normal(size=m)
    c = b + 0.5 * rng.normal(size=m)
    chain = V.pc_search(np.c_[a, b, c], ["a", "b", "c"])
    pairs = {frozenset((e[0], e[2])) for e in chain["edges"]}
    assert pairs == {frozenset("ab"), frozenset("bc")}  # a ⟂ c | b: no a–c edge
    a, b = rng.normal(size=m), rng.normal(size=m)
    c = a + b + 0.5 * rng.normal(size=m)
    collider = V.pc_search(np.c_[a, b, c], ["a", "b", "c"])
    assert sorted(map(tuple, collider["edges"])) == [("a", "-->", "c"), ("b", "-->", "c")]
    # background knowledge: c (tier 0) may not be caused by a, b (tier 1) → the collider cannot be oriented into c
    tiered = V.pc_search(np.c_[a, b, c], ["a", "b", "c"], tiers={"c": 0, "a": 1, "b": 1})
    assert ("a", "-->", "c") not in map(tuple, tiered["edges"])
    assert "need" in V.pc_search(np.zeros((4, 3)), ["a", "b", "c"])["skipped"]


def test_ci_test_and_prepare_columns():
    rng = np.random.default_rng(3)
    m = 300
    a = rng.normal(size=m)
    b = a + 0.5 * rng.normal(size=m)
    c = b + 0.5 * rng.normal(size=m)
    data, names, dropped = V.prepare_columns({"a": a, "b": b, "c": c, "k": np.ones(m), "a2": 2 * a + 1})
    assert names == ["a", "b", "c"] and dropped["k"] == "constant" and "linearly dependent" in dropped["a2"]
    assert V.ci_test(data, names, "a", "c", ["b"])["p_value"] > 0.05
    assert V.ci_test(data, names, "a", "c")["p_value"] < 1e-6
    assert "dropped" in V.ci_test(data, names, "a", "k")["skipped"]


def test_holm_hand_computed():
    tests = [{"name": "t1", "p_value": 0.01}, {"name": "t2", "p_value": 0.04}, {"name": "t3", "p_value": 0.03},
             {"name": "t4", "p_value": None, "skipped": "why"}]
    V.holm(tests, alpha=0.05)
    # sorted p: .01*3 = .03; .03*2 = .06; max(.06, .04*1) = .06
    assert [t["p_holm"] for t in tests[:3]] == pytest.approx([0.03, 0.06, 0.06])
    assert [t["reject"] for t in tests] == [True, False, False, None]


def cases(n):
    cats, pos = ["x", "y", "z"], ["start", "middle", "end"]
    return [{"attack_category": cats[i % 3], "position": pos[(i // 3) % 3], "data": "d" * (20 + 7 * i)}
            for i in range(n)]


def test_verify_end_to_end_and_degenerate():
    n = 30
    rng = np.random.default_rng(5)
    benign = rng.normal(size=(n, 8))
    injected = benign + rng.normal(scale=0.1, size=(n, 8))
    injected[:, 0] += 2.0  # the injection moves one direction of the representation
    counterfactual = benign + rng.normal(scale=0.1, size=(n, 8))
    out = V.verify(benign, injected, counterfactual, cases(n), reps=100, pc_components=2, seed=0)
    by = {t["name"]: t for t in out["tests"]}
    assert by["HSIC representation ⟂ injected"]["reject"] is True
    assert by["HSIC representation ⟂ counterfactual (control)"]["reject"] is False
    assert all("p_holm" in t for t in out["tests"])
    assert out["pc"]["skipped"] is None and out["pc"]["injection_edges"]
    # no PC edge may point from a representation component into a prompt factor
    assert not [e for e in out["pc"]["edges"] if e[1] == "-->" and e[0].startswith("rep_pc")
                and not e[2].startswith("rep_pc")]
    few = V.verify(benign[:3], injected[:3], None, cases(3))
    assert "at least" in few["skipped"] and few["tests"] == []
    const = V.verify(np.ones((n, 4)), np.ones((n, 4)), None, cases(n), reps=50)
    assert "constant" in const["tests"][0]["skipped"] and "representation" in const["dropped"]
