"""Statistical verification of what the representation encodes about the injection, with libraries only.

Data: for each eval case i we have the pooled representation of its clean prompt b_i, its injected prompt
x_i and its counterfactual prompt c_i (:mod:`evaluation.metrics`). Stacked rows (b_1..b_n, x_1..x_n) get the
prompt factors ``injected`` (0 for b_i, 1 for x_i) and the case's design factors, the same on both rows of a
case: ``position`` of its injection (1 start, 2 middle, 3 end), ``category`` of its attack (1..K in sorted order
of the names) and ``data_length`` (characters of its data). Because both rows of a case share the design
factors, ``injected`` is independent of them by construction (a paired design), so an association between
``injected`` and the representation cannot be explained away by them; position and category can act on the
representation only together with ``injected`` (an interaction that linear tests see only partly).

Tests, one family corrected with Holm's step-down method (Holm 1979; statsmodels ``multipletests``):

1. **HSIC** (Gretton et al. 2007/2008, "A kernel statistical test of independence") of the representation
   against the injection indicator — hyppo ``Hsic``'s statistic with its default Gaussian kernel, whose
   bandwidth is the median heuristic (hyppo 0.5.2 ``tools.common.compute_kern``: ``gamma = 1/(2·med²)`` with
   ``med`` the median of the off-diagonal pairwise Euclidean distances, 1 if that median is 0), and a
   permutation p-value ``(1 + #{null ≥ stat})/(1 + reps)`` from hyppo's ``perm_test``. Because the two rows of
   a case share its data, labels are permuted *within cases and across whole cases* (hyppo ``perm_blocks`` =
   case index), the exchangeability that holds under H0 for this paired design. (``Hsic.test`` cannot do
   that: it has no ``perm_blocks``, ignores its ``random_state`` in hyppo 0.5.2, and for n > 20 with the default
   ``auto=True`` replaces the permutation test by a chi-square approximation; so the library's ``perm_test`` is
   called directly, with a seed, and numpy's global RNG seeded around it because hyppo's block permuter draws
   from it.) The first call in a fresh environment compiles hyppo's numba kernels (about a minute on 2 CPU
   cores; cached on disk afterwards).
2. **HSIC control**: the same test of clean vs counterfactual rows (a meaning-preserving rewording).
3. **Conditional independence** of each of the first k principal components of the representation (sklearn
   ``PCA``) and the injection indicator given ``data_length``: causal-learn ``CIT`` with ``fisherz`` (Fisher
   1921 z-transform of the partial correlation) or ``kci`` (Zhang et al. 2011, kernel CI test).
4. **PC algorithm** (Spirtes, Glymour & Scheines 2000; causal-learn ``pc``) over the prompt factors and the k
   components, with background knowledge that a component never causes a prompt factor (the prompt exists
   before the representation). The PC's own tests run at ``alpha`` without correction (it is a search, not a
   family of reported tests).

:data:`ASSUMPTIONS` lists what a result means and what it rests on. Degenerate inputs (too few cases,
constant or collinear columns) are reported with a skip reason, never a crash.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Sequence

import numpy as np

MIN_CASES = 6  # paired cases; HSIC on 2n rows needs n ≥ 4 (unbiased dCov) and a few more to mean anything
FACTORS = ("injected", "position", "category", "data_length")
POSITION_CODE = {"start": 1, "middle": 2, "end": 3}

ASSUMPTIONS = [
    "Cases are i.i.d. draws from one distribution of prompts. The clean and injected rows of a case share its "
    "data, so rows are not independent: the HSIC permutation respects the pairing; fisherz/KCI and the PC "
    "algorithm treat rows as i.i.d., which makes their p-values optimistic.",
    "Causal sufficiency (PC): no unobserved common cause of two analysed variables. The prompt factors are set "
    "by the eval-set design, but the retained principal components summarise only part of the hidden state.",
    "Faithfulness (PC): every conditional independence in the data comes from the graph, not from cancelling "
    "paths; with few cases weak dependencies are missed (low power), so a missing edge is weak evidence.",
    "fisherz assumes linear relations with Gaussian noise (partial correlations capture all dependence); the "
    "position and category codes are nominal, which fisherz treats as numbers. kci drops linearity/Gaussianity "
    "at the cost of power on small samples.",
    "'No edge from injected to a representation component' means: the PC algorithm found a set of other "
    "variables given which that component is independent of the injection indicator (at alpha), i.e. no "
    "direct effect of the injection on it. It says nothing about the components that were not retained, and "
    "absence of evidence at this sample size is not evidence of absence.",
    "HSIC rejects independence when the representation's distribution differs between clean and injected "
    "prompts in any way (a consistent test with the Gaussian kernel); a dependence is expected for any model "
    "that reads the injected text. The causal stage aims to shrink it relative to the counterfactual control.",
]


def _skip(name: str, reason: str, **extra) -> dict:
    return {"name": name, "statistic": None, "p_value": None, "skipped": reason, **extra}


@contextlib.contextmanager
def _quiet():
    """Silence the libraries' progress bars and warnings (their output would garble the log)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def hsic_test(x: np.ndarray, y: np.ndarray, *, reps: int = 200, seed: int = 0, blocks: np.ndarray | None = None,
              name: str = "HSIC") -> dict:
    """HSIC independence test of ``x`` (n, p) and ``y`` (n,) or (n, q) with hyppo.

    Statistic: hyppo ``Hsic`` (Gaussian kernel, median-heuristic bandwidth, see the module docstring) on the
    kernel matrices from hyppo ``compute_kern``. p-value: hyppo ``perm_test`` with ``reps`` permutations of
    ``y`` (restricted to ``blocks`` when given: rows with the same block label are exchangeable, and blocks are
    exchangeable as wholes), seeded with ``seed``. Returns ``{"name", "statistic", "p_value", "n", "reps",
    "gamma_x", "gamma_y", "skipped"}``; ``skipped`` is a reason (and the numbers None) when n < 8, ``x`` or
    ``y`` is constant, or the shapes disagree.
    """
    from hyppo.independence import Hsic
    from hyppo.tools import compute_kern, perm_test

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x = x.reshape(len(x), -1)
    y = y.reshape(len(y), -1)
    n = len(x)
    if len(y) != n:
        return _skip(name, f"x has {n} rows but y has {len(y)}")
    if n < 8:
        return _skip(name, f"only {n} rows (need ≥ 8)", n=n)
    if not np.isfinite(x).all() or not np.isfinite(y).all():
        return _skip(name, "non-finite values", n=n)
    if np.ptp(x, axis=0).max() == 0:
        return _skip(name, "the representation is constant across rows", n=n)
    if np.ptp(y, axis=0).max() == 0:
        return _skip(name, "the indicator is constant across rows", n=n)
    with _quiet(), _seeded_global_numpy(seed):
        kx, ky = compute_kern(x, y, metric="gaussian")
        stat, p, _ = perm_test(Hsic(compute_kernel=None).statistic, kx, ky, reps=reps, workers=1,
                               is_distsim=True, perm_blocks=None if blocks is None else np.asarray(blocks),
                               random_state=seed)
    return {"name": name, "statistic": float(stat), "p_value": float(p), "n": n, "reps": reps,
            "gamma_x": _median_gamma(x), "gamma_y": _median_gamma(y), "skipped": None}


@contextlib.contextmanager
def _seeded_global_numpy(seed: int):
    """Seed numpy's global RNG for the block, then restore its state: hyppo 0.5.2's ``_PermTree`` permutes
    within blocks with ``np.random`` (its recursion drops the ``rng`` argument), so ``random_state`` alone does
    not make a blocked permutation test reproducible."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _median_gamma(a: np.ndarray) -> float:
    """The median-heuristic ``gamma`` hyppo uses (recomputed for the report)."""
    from sklearn.metrics import pairwise_distances

    d = pairwise_distances(a)
    off = d[~np.eye(len(d), dtype=bool)]
    med = float(np.median(off)) or 1.0
    return 1.0 / (2 * med ** 2)


def prepare_columns(columns: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """Stack named columns into an (n, d) float matrix for fisherz/KCI/PC, dropping the ones that would make the
    correlation matrix singular: constant columns, and columns linearly dependent on earlier kept ones
    (matrix rank of the standardised columns does not grow). Returns ``(data, kept_names, dropped)`` with
    ``dropped = {name: reason}``."""
    kept, names, dropped = [], [], {}
    for name, col in columns.items():
        col = np.asarray(col, dtype=np.float64).ravel()
        if not np.isfinite(col).all():
            dropped[name] = "non-finite values"
            continue
        sd = col.std()
        if sd == 0:
            dropped[name] = "constant"
            continue
        z = (col - col.mean()) / sd
        trial = np.column_stack(kept + [z])
        if np.linalg.matrix_rank(trial, tol=1e-8 * np.sqrt(len(col))) < trial.shape[1]:
            dropped[name] = "linearly dependent on " + ", ".join(names)
            continue
        kept.append(z)
        names.append(name)
    data = np.column_stack(kept) if kept else np.zeros((0, 0))
    return data, names, dropped


def ci_test(data: np.ndarray, names: Sequence[str], x: str, y: str, cond: Sequence[str] = (),
            method: str = "fisherz") -> dict:
    """Conditional independence test ``x ⟂ y | cond`` with causal-learn ``CIT(data, method)``
    (fisherz: Fisher z of the partial correlation, needs n − |cond| − 3 > 0; kci: kernel CI test).
    Returns ``{"name", "p_value", "skipped"}``; a library error becomes a skip reason."""
    from causallearn.utils.cit import CIT

    label = f"CI {x} ⟂ {y}" + (f" | {', '.join(cond)}" if cond else "")
    missing = [v for v in (x, y, *cond) if v not in names]
    if missing:
        return _skip(label, f"column(s) {missing} dropped or absent")
    n = len(data)
    if method == "fisherz" and n - len(cond) - 3 <= 0:
        return _skip(label, f"fisherz needs n − |cond| − 3 > 0 (n={n})")
    try:
        with _quiet():
            test = CIT(data, method)
            p = test(names.index(x), names.index(y), [names.index(c) for c in cond])
    except Exception as e:  # noqa: BLE001 - a degenerate input in a library is a skip, not a crash
        return _skip(label, f"{method} failed: {type(e).__name__}: {e}")
    if p is None or not np.isfinite(p):
        return _skip(label, f"{method} returned p={p}")
    return {"name": label, "statistic": None, "p_value": float(p), "skipped": None, "method": method}


def pc_search(data: np.ndarray, names: Sequence[str], *, alpha: float = 0.05, method: str = "fisherz",
              tiers: dict[str, int] | None = None) -> dict:
    """PC algorithm (causal-learn ``pc``, stable skeleton, ``uc_rule=0``) over the columns ``names``.

    ``tiers``: ``{name: tier}``; an edge from a higher tier to a lower one is forbidden (causal-learn
    ``BackgroundKnowledge.add_node_to_tier``). Returns ``{"nodes", "edges": [[a, mark, b], …], "skipped"}`` where
    mark is ``-->`` (a causes b), ``---`` (undirected) or ``<->`` (bidirected), or a skip reason when there are
    fewer than 2 variables, too few rows (fisherz needs n > d + 3), or the library fails.
    """
    from causallearn.graph.GraphNode import GraphNode
    from causallearn.search.ConstraintBased.PC import pc
    from causallearn.utils.PCUtils.BackgroundKnowledge import BackgroundKnowledge

    names = list(names)
    if len(names) < 2:
        return {"nodes": names, "edges": [], "skipped": f"only {len(names)} usable variable(s)"}
    if len(data) <= len(names) + 3:
        return {"nodes": names, "edges": [], "skipped": f"{len(data)} rows for {len(names)} variables (need > d + 3)"}
    bk = None
    if tiers:
        bk = BackgroundKnowledge()
        for nm in names:
            if nm in tiers:
                bk.add_node_to_tier(GraphNode(nm), int(tiers[nm]))
    try:
        with _quiet():
            cg = pc(data, alpha=alpha, indep_test=method, stable=True, uc_rule=0, show_progress=False,
                    node_names=names, background_knowledge=bk)
    except Exception as e:  # noqa: BLE001
        return {"nodes": names, "edges": [], "skipped": f"pc failed: {type(e).__name__}: {e}"}
    g = cg.G.graph
    edges = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = g[i, j], g[j, i]
            if a == 0 and b == 0:
                continue
            if a == -1 and b == 1:
                edges.append([names[i], "-->", names[j]])
            elif a == 1 and b == -1:
                edges.append([names[j], "-->", names[i]])
            elif a == -1 and b == -1:
                edges.append([names[i], "---", names[j]])
            else:
                edges.append([names[i], "<->", names[j]])
    return {"nodes": names, "edges": edges, "skipped": None}


def holm(tests: list[dict], alpha: float = 0.05) -> list[dict]:
    """Holm step-down correction (statsmodels ``multipletests(method="holm")``) over the non-skipped tests;
    adds ``p_holm`` and ``reject`` (at ``alpha``) to each test dict in place and returns the list."""
    from statsmodels.stats.multitest import multipletests

    live = [t for t in tests if t.get("p_value") is not None and not t.get("skipped")]
    for t in tests:
        t.setdefault("p_holm", None)
        t.setdefault("reject", None)
    if live:
        reject, p_adj, _, _ = multipletests([t["p_value"] for t in live], alpha=alpha, method="holm")
        for t, r, q in zip(live, reject, p_adj):
            t["p_holm"], t["reject"] = float(q), bool(r)
    return tests


def prompt_factors(cases: Sequence[dict]) -> dict[str, np.ndarray]:
    """Factor columns ``{injected, position, category, data_length}`` for the stacked rows (clean rows first,
    then injected rows); see the module docstring."""
    cats = {c: i + 1 for i, c in enumerate(sorted({c["attack_category"] for c in cases}))}
    n = len(cases)
    length = np.array([len(c["data"]) for c in cases], dtype=float)
    pos = np.array([POSITION_CODE[c["position"]] for c in cases], dtype=float)
    cat = np.array([cats[c["attack_category"]] for c in cases], dtype=float)
    return {
        "injected": np.r_[np.zeros(n), np.ones(n)],
        "position": np.r_[pos, pos],
        "category": np.r_[cat, cat],
        "data_length": np.r_[length, length],
    }


def verify(benign: np.ndarray, injected: np.ndarray, counterfactual: np.ndarray | None, cases: Sequence[dict], *,
           reps: int = 200, pc_components: int = 3, alpha: float = 0.05, ci_method: str = "fisherz",
           seed: int = 0) -> dict:
    """Run the verification family on one model's representations ((n, H) arrays, one row per case).

    Returns ``{"n_cases", "tests": [...], "pc": {...}, "explained_variance", "dropped", "skipped"}``; every test
    dict has ``name``, ``p_value``, ``p_holm``, ``reject`` and ``skipped`` (a reason or None).
    """
    n = len(cases)
    out: dict = {"n_cases": n, "tests": [], "pc": None, "explained_variance": None, "dropped": {}, "skipped": None,
                 "alpha": alpha, "ci_method": ci_method, "reps": reps, "pc_components": pc_components}
    if n < MIN_CASES:
        out["skipped"] = f"only {n} case(s); verification needs at least {MIN_CASES}"
        return out
    benign, injected = np.asarray(benign, dtype=np.float64), np.asarray(injected, dtype=np.float64)
    blocks = np.r_[np.arange(n), np.arange(n)]
    tests = [hsic_test(np.vstack([benign, injected]), np.r_[np.zeros(n), np.ones(n)], reps=reps, seed=seed,
                       blocks=blocks, name="HSIC representation ⟂ injected")]
    if counterfactual is not None:
        tests.append(hsic_test(np.vstack([benign, np.asarray(counterfactual, dtype=np.float64)]),
                               np.r_[np.zeros(n), np.ones(n)], reps=reps, seed=seed, blocks=blocks,
                               name="HSIC representation ⟂ counterfactual (control)"))
    rows = np.vstack([benign, injected])
    cols = dict(prompt_factors(cases))
    k = min(pc_components, rows.shape[0] - 1, rows.shape[1])
    if np.ptp(rows, axis=0).max() == 0:
        out["dropped"]["representation"] = "constant across rows: no principal components"
    else:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=k, random_state=seed)
        comps = pca.fit_transform(rows)
        out["explained_variance"] = [float(v) for v in pca.explained_variance_ratio_]
        for j in range(k):
            cols[f"rep_pc{j + 1}"] = comps[:, j]
    data, names, dropped = prepare_columns(cols)
    out["dropped"].update(dropped)
    cond = ["data_length"] if "data_length" in names else []
    for j in range(k):
        tests.append(ci_test(data, names, "injected", f"rep_pc{j + 1}", cond, ci_method))
    out["tests"] = holm(tests, alpha)
    tiers = {nm: (1 if nm.startswith("rep_pc") else 0) for nm in names}
    out["pc"] = pc_search(data, names, alpha=alpha, method=ci_method, tiers=tiers)
    out["pc"]["injection_edges"] = [e for e in out["pc"]["edges"]
                                    if "injected" in (e[0], e[2]) and any(v.startswith("rep_pc") for v in (e[0], e[2]))]
    return out
