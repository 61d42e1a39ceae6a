"""Choosing k: restarts, stability and consensus programs (after cNMF, Kotliar et al. 2019).

For every k the semi-NMF is fitted ``n_restarts`` times from different random starts on a
training share of the cells. Each restart's programs (rows of H) are scaled to unit L2 norm,
all ``n_restarts · k`` of them are clustered into k groups (k-means), and

* **stability** is the silhouette of that clustering (cosine geometry): near 1 when every
  restart finds the same k programs, low when restarts disagree;
* the **consensus** program of a group is the element-wise median of its members; the usage
  is refitted to these by non-negative least squares and the model is then fitted to
  tolerance from there (the median of restarts that disagree fits worse than any restart);
* **error** is the consensus model's relative error ‖X − WH‖/‖X‖ on the training cells and on
  held-out cells the programs never saw, bi-cross-validated: each held-out cell's usage is
  fitted on half of the genes and predicts the other half (Owen & Perry 2009), so the error
  rises again once extra programs only fit noise.

Restarts run in parallel processes (joblib/loky), each limited to its share of the cores for
BLAS and the compiled kernels, so nothing is oversubscribed. Every restart's seed comes from
``numpy.random.SeedSequence(random_state)``, and the kernels' results do not depend on the
thread count, so parallel and serial sweeps give identical numbers (for sparse X).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

from ._seminmf import SemiNMF, _nnls_rows_cd, _objective, _safe_X_Ht, _squared_norm

__all__ = ["ConsensusSweep", "consensus_sweep", "holdout_error", "refit_usage", "relative_error", "suggest_k"]

#: The suggested k is the smallest whose held-out error is within this share of the best.
ERROR_TOLERANCE = 0.01
#: Below this silhouette the report warns that restarts disagree.
LOW_STABILITY = 0.5


@dataclass
class ConsensusSweep:
    """Result of :func:`consensus_sweep`.

    Attributes
    ----------
    table : DataFrame
        One row per k: ``k, relative_error, holdout_relative_error, best_restart_relative_error,
        stability, n_restarts, median_n_iter, n_converged, seconds``.
    components : dict
        ``{k: H}`` consensus programs, (k × n_genes), rows of unit L2 norm: the fit started from
        the median programs of the restarts.
    restart_components : dict
        ``{k: (H_all, labels)}``: every restart's unit-norm programs (n_restarts·k × n_genes)
        and their consensus group.
    best_traces : dict
        ``{k: objective trace}`` of the restart with the lowest final objective.
    suggested_k : int
    rule : str
        The rule that picked ``suggested_k``, in words, for the report.
    holdout_cells : ndarray
        Indices of the held-out cells (empty without a hold-out).
    """

    table: pd.DataFrame
    components: dict = field(repr=False)
    restart_components: dict = field(repr=False)
    best_traces: dict = field(repr=False)
    suggested_k: int
    rule: str
    holdout_cells: np.ndarray = field(repr=False)


def _check_factors(X, H, W=None):
    """X as a 2-D array or sparse matrix, H (and W) as finite float arrays of matching shapes.

    Raises a ValueError naming the mismatch: the compiled kernels do not check bounds.
    """
    if not sp.issparse(X):
        X = np.asarray(X)
    if X.dtype.kind not in "biuf":
        raise ValueError(f"X must be a numeric (n_cells, n_genes) matrix, got dtype {X.dtype}")
    if X.dtype not in (np.float32, np.float64):  # integers and booleans: float64 products
        X = X.astype(np.float64)
    if sp.issparse(X):
        X = X.tocsr()
        if not X.has_canonical_format:  # duplicate entries would count twice in ||X||
            X = X.copy()
            X.sum_duplicates()
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_cells, n_genes), got shape {X.shape}")
    H = np.asarray(H, dtype=np.float64)
    if H.ndim != 2 or H.shape[1] != X.shape[1] or H.shape[0] == 0:
        raise ValueError(f"H must have shape (k >= 1, n_genes = {X.shape[1]}) to match X {X.shape}; got {H.shape}")
    if not np.all(np.isfinite(H)):
        raise ValueError("H contains NaN or infinite values")
    if W is not None:
        W = np.asarray(W, dtype=np.float64)
        if W.shape != (X.shape[0], H.shape[0]):
            raise ValueError(f"W must have shape (n_cells, k) = {(X.shape[0], H.shape[0])}; got {W.shape}")
        if not np.all(np.isfinite(W)):
            raise ValueError("W contains NaN or infinite values")
    return X, H, W


def refit_usage(X, H) -> np.ndarray:
    """Non-negative usage of every cell for fixed programs: ``argmin_{W ≥ 0} ‖X − W H‖``.

    As :meth:`SemiNMF.transform <perturbnmf.SemiNMF.transform>`: exact (KKT) solutions, and usage
    0 for a program whose loadings are zero or at rounding level.

    Parameters
    ----------
    X : ndarray or CSR matrix of shape (n_cells, n_genes)
    H : ndarray of shape (k, n_genes)

    Returns
    -------
    W : ndarray of shape (n_cells, k)

    Raises
    ------
    ValueError
        Shapes that do not match, or non-finite H.
    """
    X, H, _ = _check_factors(X, H)
    W, _, _ = _nnls_rows_cd(_safe_X_Ht(X, H), H @ H.T)
    return W


def relative_error(X, W, H) -> float:
    """‖X − W H‖_F / ‖X‖_F, from the Gram form (X is never densified).

    Parameters
    ----------
    X : ndarray or CSR matrix of shape (n_cells, n_genes)
    W : ndarray of shape (n_cells, k)
    H : ndarray of shape (k, n_genes)
    """
    X, H, W = _check_factors(X, H, W)
    norm_sq = _squared_norm(X)
    if norm_sq == 0:
        return float("nan")
    return float(np.sqrt(2.0 * _objective(X, W, H, norm_X_sq=norm_sq) / norm_sq))


def holdout_error(X_holdout, H, gene_halves) -> float:
    """Bi-cross-validated relative error on held-out cells (Owen & Perry 2009).

    The programs H were learned without these cells. Each cell's usage is fitted on one half
    of the genes and the other half is predicted, then the halves swap; the error is
    ‖X_B − W_A H_B‖ over both directions relative to ‖X‖. Unlike refitting W on all genes, this
    error rises again once extra programs only fit noise.

    Parameters
    ----------
    X_holdout : ndarray or CSR matrix of shape (n_cells, n_genes)
    H : ndarray of shape (k, n_genes)
    gene_halves : tuple of two index arrays partitioning the genes
    """
    X_holdout, H, _ = _check_factors(X_holdout, H)
    residual_sq = norm_sq = 0.0
    for fit_genes, test_genes in (gene_halves, gene_halves[::-1]):
        W = refit_usage(X_holdout[:, fit_genes], H[:, fit_genes])
        X_test, H_test = X_holdout[:, test_genes], H[:, test_genes]
        block_norm = _squared_norm(X_test)
        residual_sq += 2.0 * _objective(X_test, W, H_test, norm_X_sq=block_norm)
        norm_sq += block_norm
    return float(np.sqrt(residual_sq / norm_sq)) if norm_sq > 0 else float("nan")


def _fit_restart(X, k, seed, solver, init, max_iter, tol, threads):
    """One restart in a worker: limit threads, fit, return unit-norm programs and fit facts."""
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(threads)
    start = time.perf_counter()
    with threadpool_limits(threads):
        model = SemiNMF(n_components=k, solver=solver, init=init, max_iter=max_iter, tol=tol, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-convergence is counted in the table
            model.fit(X)
    H = model.components_
    norms = np.linalg.norm(H, axis=1, keepdims=True)
    return {
        "k": k, "H": H / np.where(norms > 0, norms, 1.0), "objective": float(model.objective_[-1]),
        "trace": model.objective_,
        "n_iter": int(model.n_iter_), "converged": bool(model.converged_), "seconds": time.perf_counter() - start,
    }


def _consensus_for_k(X_train, X_holdout, gene_halves, fits, k, n_restarts, solver, max_iter, tol, seed, threads):
    """Cluster one k's restarts, polish the consensus, and measure it (runs in a worker)."""
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(threads)
    with threadpool_limits(threads):
        H_all = np.vstack([res["H"] for res in fits])
        H_median, labels, stability = _cluster(H_all, k, n_restarts, seed)
        W_train, H = _polish(X_train, H_median, solver, max_iter, tol)
        best = min(fits, key=lambda res: res["objective"])
        row = {
            "k": k,
            "relative_error": relative_error(X_train, W_train, H),
            "holdout_relative_error": holdout_error(X_holdout, H, gene_halves) if X_holdout is not None else np.nan,
            "best_restart_relative_error": _relative(best["objective"], _squared_norm(X_train)),
            "stability": stability,
            "n_restarts": n_restarts,
            "median_n_iter": float(np.median([res["n_iter"] for res in fits])),
            "n_converged": int(sum(res["converged"] for res in fits)),
            "seconds": float(sum(res["seconds"] for res in fits)),
        }
    return row, H, (H_all, labels), best["trace"]


def _relative(objective: float, norm_sq: float) -> float:
    """sqrt(2 f / ||X||²), the relative error of objective f (NaN for an all-zero X)."""
    return float(np.sqrt(2.0 * objective / norm_sq)) if norm_sq > 0 else float("nan")


def _cluster(H_all: np.ndarray, k: int, n_restarts: int, seed: int):
    """Group the restarts' programs into k consensus programs; return (H, labels, silhouette).

    Degenerate restarts (fewer distinct programs than k, e.g. all-zero programs of an all-zero
    or low-rank X) leave groups empty: their consensus program is zero and the stability NaN
    wherever the silhouette (or, for k = 1, the cosine with the median) is undefined.
    """
    if k == 1:
        labels = np.zeros(len(H_all), dtype=int)
        median_norm = np.linalg.norm(np.median(H_all, axis=0))
        stability = (float(np.mean(H_all @ np.median(H_all, axis=0)) / median_norm) if median_norm > 0
                     else float("nan"))
    else:
        with warnings.catch_warnings():
            # fewer distinct programs than k: KMeans warns and leaves clusters empty (handled below)
            warnings.filterwarnings("ignore", message="Number of distinct clusters", category=ConvergenceWarning)
            labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(H_all)
        n_labels = len(np.unique(labels))
        valid = n_restarts > 1 and 2 <= n_labels <= len(H_all) - 1  # silhouette's domain
        stability = float(silhouette_score(H_all, labels, metric="cosine")) if valid else float("nan")
    H = np.vstack([np.median(H_all[labels == c], axis=0) if np.any(labels == c) else np.zeros(H_all.shape[1])
                   for c in range(k)])
    norms = np.linalg.norm(H, axis=1, keepdims=True)
    return H / np.where(norms > 0, norms, 1.0), labels, stability


def _polish(X, H_median, solver, max_iter, tol):
    """Fit once more from the consensus: usage refitted to the median programs, then the solver
    to tolerance. The median of restarts that disagree fits worse than any restart; this finds
    the nearby optimum, so the kept programs are the consensus ones, fitted.

    Returns
    -------
    W : ndarray of shape (n_cells, k)
    H : ndarray of shape (k, n_genes), unit L2 rows (their scale moved into W)
    """
    model = SemiNMF(n_components=H_median.shape[0], solver=solver, init="custom", max_iter=max_iter, tol=tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence is judged on the restarts
        W = model.fit_transform(X, W=refit_usage(X, H_median))
    norms = np.linalg.norm(model.components_, axis=1)
    norms[norms == 0] = 1.0
    return W * norms, model.components_ / norms[:, None]


def suggest_k(table: pd.DataFrame, tolerance: float = ERROR_TOLERANCE) -> tuple[int, str]:
    """The suggested k and the rule, stated for the report.

    The smallest k whose consensus model's held-out relative error (training error without a
    hold-out) is within ``tolerance`` (relative) of the lowest one in the sweep — the most
    parsimonious model that predicts unseen cells about as well as the best, in the spirit of
    the one-standard-error rule of cross-validation.
    """
    error = "holdout_relative_error" if table["holdout_relative_error"].notna().all() else "relative_error"
    best_error = table[error].min()
    within = table[table[error] <= best_error * (1 + tolerance)]
    if within.empty:  # no error defined (all-zero cells): nothing favours a larger k
        within = table
    k = int(within["k"].min())
    where = "held-out cells (programs learned without them)" if error.startswith("holdout") else "all cells"
    rule = (f"Suggested k = {k}: the smallest k whose consensus model's relative error on {where} is within "
            f"{tolerance:.0%} of the lowest in the sweep ({best_error:.4f}).")
    if k == table["k"].max() and len(table) > 1:
        rule += " It is the largest k tried: the error still falls, so larger k_values may fit better."
    stability = table.loc[table["k"] == k, "stability"].iloc[0]
    if np.isfinite(stability) and stability < LOW_STABILITY:
        rule += (f" Its stability is low ({stability:.2f}): restarts find different programs, so use the "
                 "consensus programs and read single programs with care.")
    return k, rule


def _progress(iterable, total, enabled):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc="semi-NMF restarts", unit="fit")


def consensus_sweep(
    X,
    k_values,
    *,
    n_restarts: int = 5,
    solver: str = "hals",
    init: str = "random",
    max_iter: int = 500,
    tol: float = 1e-4,
    restart_tol: float = 1e-3,
    holdout_fraction: float = 0.1,
    random_state: int = 0,
    n_jobs: int | None = None,
    progress: bool | None = None,
) -> ConsensusSweep:
    """Fit ``n_restarts`` semi-NMFs per k, measure error and stability, build consensus programs.

    Parameters
    ----------
    X : ndarray or sparse matrix of shape (n_cells, n_genes)
        Normalised expression (any sign). Sparse input is never densified.
    k_values : list of int
        Numbers of programs, each ``1 <= k < min(n_cells, n_genes)``.
    n_restarts : int
        Fits per k from different random starts (≥ 1; stability needs ≥ 2).
    solver, init, max_iter
        Passed to :class:`~perturbnmf.SemiNMF` (``init="random"`` so restarts differ).
    tol
        Tolerance of the consensus model's final fit.
    restart_tol
        Tolerance of each restart: a restart only has to reach its basin to be clustered,
        and stops 2x sooner at 1e-3 than at 1e-4 with an objective ~0.1 % higher.
    holdout_fraction : float
        Share of cells (in [0, 0.5]) held out: programs are learned on the rest, and the
        held-out error refits W on these cells with the programs fixed.
    random_state : int
        Master seed; every restart's seed is derived from it.
    n_jobs : int or None
        Parallel worker processes (None: all cores, at most one per restart).
    progress : bool or None
        A progress bar on stderr (None: only when stderr is a terminal).

    Returns
    -------
    ConsensusSweep

    Raises
    ------
    ValueError
        ``n_restarts < 1``, ``holdout_fraction`` outside [0, 0.5], a k that is not
        ``1 <= k < min(n_training_cells, n_genes)``, or an X that is all zeros on the training
        cells.
    """
    k_values = sorted(int(k) for k in k_values)
    if n_restarts < 1:
        raise ValueError(f"n_restarts must be >= 1, got {n_restarts}.")
    if not 0 <= holdout_fraction <= 0.5:
        raise ValueError(f"holdout_fraction must lie in [0, 0.5], got {holdout_fraction}.")
    # Validate and convert once (dtype, CSR), so workers receive the matrix they fit.
    probe = SemiNMF(n_components=max(k_values), solver=solver)
    X = probe._validate_X(X, reset=True)
    n_cells = X.shape[0]
    rng = np.random.default_rng(np.random.SeedSequence(random_state).spawn(1)[0])
    n_holdout = int(round(holdout_fraction * n_cells))
    holdout = np.sort(rng.choice(n_cells, n_holdout, replace=False)) if n_holdout else np.array([], dtype=int)
    train = np.setdiff1d(np.arange(n_cells), holdout)
    X_train = X[train] if n_holdout else X
    X_holdout = X[holdout] if n_holdout else None
    gene_halves = np.array_split(rng.permutation(X.shape[1]), 2)
    probe._check_n_components(X_train)
    if _squared_norm(X_train) == 0:
        raise ValueError(
            f"X is all zeros on the {X_train.shape[0]} training cells: there are no programs to find. "
            "Check the input layer (normalised expression of the selected genes)."
        )

    seeds = [int(s.generate_state(1)[0])
             for s in np.random.SeedSequence(random_state).spawn(len(k_values) * n_restarts + 1)[1:]]
    tasks = [(k, seeds[i * n_restarts + r]) for i, k in enumerate(k_values) for r in range(n_restarts)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n_jobs = min(cores if n_jobs is None else max(1, n_jobs), len(tasks))
    threads = max(1, cores // n_jobs)
    if progress is None:
        progress = sys.stderr.isatty()
    start = time.perf_counter()
    if n_jobs == 1:
        def run(calls):
            return (function(*args) for function, args in calls)
    else:
        from joblib import Parallel, delayed

        parallel = Parallel(n_jobs=n_jobs, backend="loky", return_as="generator")

        def run(calls):
            return parallel(delayed(function)(*args) for function, args in calls)

    restarts = list(_progress(
        run((_fit_restart, (X_train, k, seed, solver, init, max_iter, restart_tol, threads)) for k, seed in tasks),
        len(tasks), progress,
    ))
    fit_seconds = time.perf_counter() - start
    per_k = list(run(
        (_consensus_for_k, (X_train, X_holdout, gene_halves, [res for res in restarts if res["k"] == k], k,
                            n_restarts, solver, max_iter, tol, random_state, threads))
        for k in k_values
    ))
    rows = [row for row, _, _, _ in per_k]
    components = {k: H for k, (_, H, _, _) in zip(k_values, per_k)}
    restart_components = {k: grouped for k, (_, _, grouped, _) in zip(k_values, per_k)}
    best_traces = {k: trace for k, (_, _, _, trace) in zip(k_values, per_k)}
    table = pd.DataFrame(rows)
    table.attrs["wall_seconds"] = time.perf_counter() - start
    table.attrs["fit_wall_seconds"] = fit_seconds
    table.attrs["n_jobs"], table.attrs["threads_per_job"] = n_jobs, threads
    suggested, rule = suggest_k(table)
    return ConsensusSweep(table, components, restart_components, best_traces, suggested, rule, holdout)
