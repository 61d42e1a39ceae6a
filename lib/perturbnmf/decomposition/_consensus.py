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
BLAS and the compiled kernels, so nothing is oversubscribed — or, when a ``dask.distributed``
client is active, as tasks on its cluster (see :mod:`._parallel`). Every restart's seed comes from
``numpy.random.SeedSequence(random_state)``, and the kernels' results do not depend on the
thread count, so parallel and serial sweeps give identical numbers (for sparse X).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_samples

from ._parallel import available_cores, executor, resolve
from ._seminmf import NMF, SemiNMF, _nnls_rows_cd, _objective, _residual_blocks, _safe_X_Ht, _squared_norm

__all__ = ["MODELS", "ConsensusSweep", "consensus_sweep", "holdout_error", "refit_usage", "relative_error",
           "suggest_k"]

#: model name -> estimator: "nmf" (identifiable, the default) or "seminmf" (signed loadings).
MODELS = {"nmf": NMF, "seminmf": SemiNMF}
#: Progress (each restart, each k's consensus) goes to this logger at level INFO.
LOG = logging.getLogger("perturbnmf")
#: Stopping tolerance of the restarts (one iteration's relative objective decrease), ten times tighter
#: than a single fit's default: stability compares the restarts' programs, which keep moving after
#: the objective has flattened. Measured on the Papalexi screen: at 1e-4 the stability of k = 10 fell
#: from 0.79 to 0.60 and the suggested k from 10 to 5; at 1e-5 both are as with a 10-iteration window.
SWEEP_TOL = 1e-5
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
    covariate_components : dict
        ``{k: H_cov}``: the covariates' loadings (b × n_genes; b = 0 without covariates).
    """

    table: pd.DataFrame
    components: dict = field(repr=False)
    restart_components: dict = field(repr=False)
    best_traces: dict = field(repr=False)
    suggested_k: int
    rule: str
    holdout_cells: np.ndarray = field(repr=False)
    covariate_components: dict = field(repr=False, default_factory=dict)


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


def refit_usage(X, H, covariates=None, covariate_components=None) -> np.ndarray:
    """Non-negative usage of every cell for fixed programs: ``argmin_{W ≥ 0} ‖X − W H‖``.

    As :meth:`SemiNMF.transform <perturbnmf.SemiNMF.transform>`: exact (KKT) solutions, and usage
    0 for a program whose loadings are zero or at rounding level.

    Parameters
    ----------
    X : ndarray or CSR matrix of shape (n_cells, n_genes)
    H : ndarray of shape (k, n_genes)
    covariates : ndarray of shape (n_cells, b), optional
        Known usage (e.g. batch indicators) whose part of the fit, ``covariates @
        covariate_components`` (b × n_genes), is held fixed: ``argmin ‖X − Z H_cov − W H‖``.

    Returns
    -------
    W : ndarray of shape (n_cells, k)

    Raises
    ------
    ValueError
        Shapes that do not match, or non-finite H.
    """
    X, H, _ = _check_factors(X, H)
    B = _safe_X_Ht(X, H)
    if covariates is not None:
        B -= covariates @ (covariate_components @ H.T)
    W, _, _ = _nnls_rows_cd(B, H @ H.T)
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
    residual_sq, norm_sq = _holdout_residuals(X_holdout, H, gene_halves)
    return float(np.sqrt(residual_sq.sum() / norm_sq)) if norm_sq > 0 else float("nan")


def _holdout_residuals(X_holdout, H, gene_halves, covariates=None, covariate_components=None
                       ) -> tuple[np.ndarray, float]:
    """Per held-out cell, the squared bi-cross-validation residual over both gene halves.

    With covariates (known usage, e.g. batch indicators) their fitted part is part of the
    prediction, on both halves.

    Returns
    -------
    residual_sq : ndarray of shape (n_cells,)
    norm_sq : float
        ‖X_holdout‖², the denominator of the relative error.
    """
    X_holdout, H, _ = _check_factors(X_holdout, H)
    residual_sq = np.zeros(X_holdout.shape[0])
    Z, H_cov = covariates, covariate_components
    for fit_genes, test_genes in (gene_halves, gene_halves[::-1]):
        H_cov_fit, H_cov_test = (None, None) if Z is None else (H_cov[:, fit_genes], H_cov[:, test_genes])
        W = refit_usage(X_holdout[:, fit_genes], H[:, fit_genes], Z, H_cov_fit)
        residual_sq += _row_residuals(X_holdout[:, test_genes], *with_covariates(W, H[:, test_genes], Z, H_cov_test))
    return residual_sq, _squared_norm(X_holdout)


def with_covariates(W, H, covariates, covariate_components):
    """The full factors ``[W, Z]`` and ``[H; H_cov]`` of a fit with known usage (W, H without covariates)."""
    if covariates is None:
        return W, H
    return np.hstack([W, covariates]), np.vstack([H, covariate_components])


def _row_residuals(X, W, H, *, block_rows=4096) -> np.ndarray:
    """``‖x_i − w_i H‖²`` per row, in row blocks (a sparse X is densified a block at a time)."""
    out = np.empty(X.shape[0])
    for rows, R in _residual_blocks(X, W, H, block_rows=block_rows):
        out[rows] = np.einsum("ij,ij->i", R, R)
    return out


def _fit_restart(X, Z, k, seed, model, solver, init, max_iter, tol, alpha_W, l1_ratio, threads):
    """One restart in a worker: limit threads, fit, return unit-norm programs and fit facts."""
    import numba
    from threadpoolctl import threadpool_limits

    X, Z = resolve(X), resolve(Z)
    numba.set_num_threads(threads)
    start = time.perf_counter()
    with threadpool_limits(threads):
        estimator = MODELS[model](n_components=k, solver=solver, init=init, max_iter=max_iter, tol=tol,
                                  alpha_W=alpha_W, l1_ratio=l1_ratio, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-convergence is counted in the table
            estimator.fit(X, covariates=Z)
    H = estimator.components_
    norms = np.linalg.norm(H, axis=1, keepdims=True)
    return {
        "k": k, "H": H / np.where(norms > 0, norms, 1.0), "H_cov": estimator.covariate_components_,
        "objective": float(estimator.objective_[-1]),
        "trace": estimator.objective_, "n_iter": int(estimator.n_iter_), "converged": bool(estimator.converged_),
        "seconds": time.perf_counter() - start,
    }


def _consensus_for_k(X_train, X_holdout, Z_train, Z_holdout, gene_halves, fits, k, n_restarts, model, solver,
                     max_iter, tol, alpha_W, l1_ratio, density_threshold, seed, threads):
    """Cluster one k's restarts, polish the consensus, and measure it (runs in a worker)."""
    import numba
    from threadpoolctl import threadpool_limits

    X_train, X_holdout, Z_train, Z_holdout = (resolve(a) for a in (X_train, X_holdout, Z_train, Z_holdout))
    numba.set_num_threads(threads)
    with threadpool_limits(threads):
        H_all = np.vstack([res["H"] for res in fits])
        kept = _dense_programs(H_all, n_restarts, density_threshold)
        H_median, labels, stability, stability_se = _cluster(H_all, kept, k, n_restarts, seed)
        H_cov = np.median([res["H_cov"] for res in fits], axis=0)  # covariates' loadings: aligned, no grouping
        W_train, H, H_cov = _polish(X_train, H_median, H_cov, Z_train, model, solver, max_iter, tol, alpha_W,
                                    l1_ratio, random_state=seed)
        best = min(fits, key=lambda res: res["objective"])
        residuals = (_holdout_residuals(X_holdout, H, gene_halves, Z_holdout, H_cov) if X_holdout is not None
                     else None)
        row = {
            "k": k,
            "relative_error": relative_error(X_train, *with_covariates(W_train, H, Z_train, H_cov)),
            "holdout_relative_error": (float(np.sqrt(residuals[0].sum() / residuals[1])) if residuals
                                       and residuals[1] > 0 else np.nan),
            "best_restart_relative_error": _relative(best["objective"], _squared_norm(X_train)),
            "stability": stability,
            "stability_se": stability_se,
            "n_restarts": n_restarts,
            "n_outlier_programs": int((~kept).sum()),
            "median_n_iter": float(np.median([res["n_iter"] for res in fits])),
            "n_converged": int(sum(res["converged"] for res in fits)),
            "seconds": float(sum(res["seconds"] for res in fits)),
        }
    return row, (H, H_cov), (H_all, labels), best["trace"], residuals


def _relative(objective: float, norm_sq: float) -> float:
    """sqrt(2 f / ||X||²), the relative error of objective f (NaN for an all-zero X)."""
    return float(np.sqrt(2.0 * objective / norm_sq)) if norm_sq > 0 else float("nan")


def _dense_programs(H_all: np.ndarray, n_restarts: int, density_threshold: float | None) -> np.ndarray:
    """Which restart programs lie in a dense neighbourhood (cNMF's local-density filter).

    A program's local density is its mean Euclidean distance (unit-norm rows) to its
    ``max(1, round(0.3 · n_restarts))`` nearest programs of other restarts; programs farther
    than ``density_threshold`` are outliers (a restart's blend or split of the real programs)
    and take no part in the consensus median. ``None`` keeps all.

    Returns
    -------
    kept : ndarray of bool, shape (n_restarts · k,)
    """
    kept = np.ones(len(H_all), dtype=bool)
    if density_threshold is None or n_restarts < 2:
        return kept
    k = len(H_all) // n_restarts
    restart = np.repeat(np.arange(n_restarts), k)
    distance = np.sqrt(np.maximum(2.0 - 2.0 * (H_all @ H_all.T), 0.0))
    distance[restart[:, None] == restart[None, :]] = np.inf  # a program's neighbours are other restarts'
    n_neighbors = min(max(1, int(round(0.3 * n_restarts))), n_restarts - 1)
    density = np.sort(distance, axis=1)[:, :n_neighbors].mean(axis=1)
    kept = density <= density_threshold
    return kept if kept.sum() >= k else density <= np.sort(density)[k - 1]  # never fewer than k programs


def _cluster(H_all: np.ndarray, kept: np.ndarray, k: int, n_restarts: int, seed: int):
    """Group the restarts' kept programs into k consensus programs; return (H, labels, stability, its SE).

    Stability is the mean silhouette of the restart programs (cosine), its standard error the
    SD of the programs' silhouettes over √(number of programs).

    ``labels`` has one entry per restart program, −1 for the outliers left out (see
    :func:`_dense_programs`); the silhouette is over all programs with outliers assigned to
    their nearest group, so that disagreeing restarts lower it whether or not they are filtered.
    Degenerate restarts (fewer distinct programs than k, e.g. all-zero programs of an all-zero
    or low-rank X) leave groups empty: their consensus program is zero and the stability NaN
    wherever the silhouette (or, for k = 1, the cosine with the median) is undefined.
    """
    if k == 1:
        labels = np.zeros(len(H_all), dtype=int)
        median_norm = np.linalg.norm(np.median(H_all[kept], axis=0))
        scores = (H_all @ np.median(H_all[kept], axis=0) / median_norm if median_norm > 0
                  else np.full(len(H_all), np.nan))
    else:
        with warnings.catch_warnings():
            # fewer distinct programs than k: KMeans warns and leaves clusters empty (handled below)
            warnings.filterwarnings("ignore", message="Number of distinct clusters", category=ConvergenceWarning)
            kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(H_all[kept])
        labels = kmeans.predict(H_all)
        n_labels = len(np.unique(labels))
        valid = n_restarts > 1 and 2 <= n_labels <= len(H_all) - 1  # silhouette's domain
        scores = silhouette_samples(H_all, labels, metric="cosine") if valid else np.full(len(H_all), np.nan)
    stability = float(np.mean(scores))
    stability_se = float(np.std(scores, ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else float("nan")
    H = np.vstack([np.median(H_all[kept & (labels == c)], axis=0) if np.any(kept & (labels == c))
                   else np.zeros(H_all.shape[1]) for c in range(k)])
    norms = np.linalg.norm(H, axis=1, keepdims=True)
    return H / np.where(norms > 0, norms, 1.0), np.where(kept, labels, -1), stability, stability_se


def _polish(X, H_median, H_cov, Z, model, solver, max_iter, tol, alpha_W=0.0, l1_ratio=0.0, random_state=None):
    """Fit once more from the consensus: usage refitted to the median programs, then the solver
    to tolerance. The median of restarts that disagree fits worse than any restart; this finds
    the nearby optimum, so the kept programs are the consensus ones, fitted. ``random_state``
    seeds the re-seeding of a program whose usage dies (the start itself is the consensus), so
    that a sweep with a seed gives the same programs every time.

    Returns
    -------
    W : ndarray of shape (n_cells, k)
    H : ndarray of shape (k, n_genes), unit L2 rows (their scale moved into W)
    H_cov : ndarray of shape (b, n_genes)
        The covariates' loadings (b = 0 without covariates).
    """
    estimator = MODELS[model](n_components=H_median.shape[0], solver=solver, init="custom", max_iter=max_iter,
                              tol=tol, alpha_W=alpha_W, l1_ratio=l1_ratio, random_state=random_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence is judged on the restarts
        W = estimator.fit_transform(X, W=refit_usage(X, H_median, Z, H_cov), H=H_median, covariates=Z)
    norms = np.linalg.norm(estimator.components_, axis=1)
    norms[norms == 0] = 1.0
    return W * norms, estimator.components_ / norms[:, None], estimator.covariate_components_


def _holdout_excess(residuals: dict) -> pd.DataFrame:
    """Per k, the held-out squared error in excess of the best k's and its standard error.

    Both are relative to ‖X_holdout‖² and computed from paired per-cell differences
    ``r_i(k) − r_i(k_best)``, so cell-to-cell variation common to all k cancels.
    """
    ks = sorted(residuals)
    norm_sq = residuals[ks[0]][1]
    best = min(ks, key=lambda k: residuals[k][0].sum())
    rows = []
    for k in ks:
        difference = residuals[k][0] - residuals[best][0]
        n = len(difference)
        se = float(np.std(difference, ddof=1) * np.sqrt(n) / norm_sq) if n > 1 and norm_sq > 0 else np.nan
        rows.append({"k": k, "holdout_excess": float(difference.sum() / norm_sq) if norm_sq > 0 else np.nan,
                     "holdout_excess_se": se})
    return pd.DataFrame(rows)


def _reproducible_edge(candidates: pd.DataFrame) -> tuple[int, pd.Series, float]:
    """Walk up k from the floor while stability stays within tolerance of the best so far.

    The tolerance is the larger of the best k's standard error and ``1 / (n_restarts · k)``: one of
    its restart programs switching from agreeing to disagreeing moves the mean silhouette by
    that much, so smaller differences between stabilities near 1 carry no information.

    Returns
    -------
    k : int
        The last k reached.
    best : Series
        The row of the most stable k reached.
    tolerance : float
    """
    rows = [row for _, row in candidates.sort_values("k").iterrows()]
    best, k = rows[0], int(rows[0]["k"])
    for row in rows[1:]:
        tolerance = _stability_tolerance(best)
        if row["stability"] < best["stability"] - tolerance:
            break
        k = int(row["k"])
        if row["stability"] > best["stability"]:
            best = row
    return k, best, _stability_tolerance(best)


def _stability_tolerance(row: pd.Series) -> float:
    se = row.get("stability_se", np.nan)
    return max(se if np.isfinite(se) else 0.0, 1.0 / (row["n_restarts"] * row["k"]))


def suggest_k(table: pd.DataFrame) -> tuple[int, str]:
    """The suggested k and the rule, stated for the report.

    Two measured criteria, each judged against its own standard error:

    1. **A floor from held-out cells** (columns ``holdout_excess``, ``holdout_excess_se``): the
       smallest k whose held-out squared error exceeds the lowest by at most one standard error
       of the per-cell paired difference — the one-standard-error rule of cross-validation.
       Fewer programs predict unseen cells measurably worse. Above the floor the held-out error
       cannot decide: each cell's usage is fitted from its own noisy counts, so an extra real
       program costs about as much prediction as it brings.
    2. **The edge of reproducibility** (``stability``, ``stability_se``): from the floor up,
       the last k before stability falls below the highest so far by more than a tolerance
       (:func:`_reproducible_edge`). Too few programs merge real ones the same way in every
       restart (still stable); too many split them differently in each restart, and stability
       falls. The right k is the edge; a later recovery at much larger k (programs split into
       many small, consistent pieces) is not followed.

    Without a hold-out the floor is the smallest k of the sweep.
    """
    table = table.sort_values("k").reset_index(drop=True)
    holdout = {"holdout_excess", "holdout_excess_se"} <= set(table) and table["holdout_excess"].notna().all()
    if holdout:
        within = table[table["holdout_excess"] <= table["holdout_excess_se"].fillna(0.0)]
        floor = int(within["k"].min())
        best_k = int(table.loc[table["holdout_excess"].idxmin(), "k"])
        floor_text = (f"k = {floor} is the smallest k whose error on held-out cells (programs learned without them) "
                      f"is within one standard error of the lowest (k = {best_k})")
    else:
        floor = int(table["k"].min())
        floor_text = "no cells were held out, so every k of the sweep is considered"
    candidates = table[(table["k"] >= floor) & np.isfinite(table["stability"])]
    if len(candidates):
        k, best, tolerance = _reproducible_edge(candidates)
        rule = (f"Suggested k = {k}: {floor_text}; from there up, k = {k} is the last k whose stability "
                f"({table.loc[table['k'] == k, 'stability'].iloc[0]:.3f}) stays as high as the highest so far "
                f"(k = {int(best['k'])}, {best['stability']:.3f}) within {tolerance:.3f} (its standard error or one "
                "restart program's share of it, whichever is larger): beyond it restarts stop agreeing.")
    else:  # no stability (single restarts): the floor itself
        k = floor
        rule = f"Suggested k = {k}: {floor_text} (stability needs n_restarts ≥ 2)."
    if len(table) > 1 and k in (table["k"].min(), table["k"].max()):
        side = "smallest" if k == table["k"].min() else "largest"
        beyond = "smaller" if side == "smallest" else "larger"
        rule += (f" It is the {side} k tried: extend 'k_values' to {beyond} values to see whether the evidence "
                 "continues past it.")
    stability = table.loc[table["k"] == k, "stability"].iloc[0]
    if np.isfinite(stability) and stability < LOW_STABILITY:
        rule += (f" Its stability is low ({stability:.2f}): restarts find different programs, so use the "
                 "consensus programs and read single programs with care.")
    return k, rule


def _progress(restarts, tasks, enabled):
    """Pass the restarts' results on, logging each one (logger ``perturbnmf``, INFO) and, when
    ``enabled``, drawing a progress bar on stderr."""
    bar = None
    if enabled:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="restarts", unit="fit")
    n_per_k = Counter(k for k, _ in tasks)
    done = Counter()
    for result in restarts:
        done[result["k"]] += 1
        LOG.info("k = %d: restart %d of %d, %d iterations, %.1f s", result["k"], done[result["k"]],
                 n_per_k[result["k"]], result["n_iter"], result["seconds"])
        if bar is not None:
            bar.update()
        yield result
    if bar is not None:
        bar.close()


def _logged(consensus: tuple) -> tuple:
    """Log one k's consensus (see :func:`_consensus_for_k`) and pass it on."""
    row = consensus[0]
    LOG.info("k = %d: consensus of %d restarts, stability %.2f, held-out relative error %.4f", row["k"],
             row["n_restarts"], row["stability"], row["holdout_relative_error"])
    return consensus


def consensus_sweep(
    X,
    k_values,
    *,
    model: str = "nmf",
    n_restarts: int = 5,
    solver: str = "hals",
    init: str = "random",
    max_iter: int = 500,
    tol: float = SWEEP_TOL,
    alpha_W: float = 0.0,
    l1_ratio: float = 0.0,
    density_threshold: float | None = 0.5,
    covariates=None,
    holdout_fraction: float = 0.1,
    random_state: int = 0,
    n_jobs: int | None = None,
    progress: bool | None = None,
) -> ConsensusSweep:
    """Fit ``n_restarts`` factorisations per k, measure error and stability, build consensus programs.

    Parameters
    ----------
    X : ndarray or sparse matrix of shape (n_cells, n_genes)
        Normalised expression (non-negative for ``model="nmf"``, any sign for "seminmf").
        Sparse input is never densified.
    k_values : list of int
        Numbers of programs, each ``1 <= k < min(n_cells, n_genes)``.
    model : {"nmf", "seminmf"}
        :class:`~perturbnmf.NMF` (non-negative loadings, identifiable) or
        :class:`~perturbnmf.SemiNMF` (signed loadings, the original analysis's model).
    n_restarts : int
        Fits per k from different random starts (≥ 1; stability needs ≥ 2).
    solver, init, max_iter
        Passed to the estimator (``init="random"`` so restarts differ).
    tol
        Tolerance of every restart and of the consensus model's final fit. Restarts run to
        the same tolerance as the final fit: stopped early they differ by where they stopped,
        and their disagreement would read as instability of the programs.
    alpha_W, l1_ratio : float
        Usage penalty of the estimator (off by default).
    density_threshold : float or None
        Restart programs whose mean distance to their nearest programs of other restarts
        exceeds this are left out of the consensus (cNMF's filter and default; None keeps all).
    covariates : ndarray of shape (n_cells, b), optional
        Known, fixed usage of every cell (e.g. one indicator column per batch): each covariate
        gets loadings of its own (a batch's baseline expression) instead of taking programs.
    holdout_fraction : float
        Share of cells (in [0, 0.5]) held out: programs are learned on the rest, and the
        held-out error refits W on these cells with the programs fixed.
    random_state : int
        Master seed; every restart's seed is derived from it.
    n_jobs : int or None
        Parallel worker processes (None: all cores, at most one per restart).
    progress : bool or None
        A progress bar on stderr (None: only when stderr is a terminal). Each finished restart is
        also logged (logger ``"perturbnmf"``, level INFO).

    Returns
    -------
    ConsensusSweep

    Raises
    ------
    ValueError
        An unknown ``model``, ``n_restarts < 1``, ``holdout_fraction`` outside [0, 0.5], a k that is not
        ``1 <= k < min(n_training_cells, n_genes)``, or an X that is all zeros on the training
        cells.
    """
    k_values = sorted(int(k) for k in k_values)
    _check_sweep_options(model, n_restarts, holdout_fraction)
    split = _split_cells(X, covariates, MODELS[model](n_components=max(k_values), solver=solver), holdout_fraction,
                         random_state)
    tasks = _restart_tasks(k_values, n_restarts, random_state)
    if progress is None:
        progress = sys.stderr.isatty()
    start = time.perf_counter()
    n_jobs, threads = _worker_layout(n_jobs, len(tasks))
    with executor(n_jobs) as pool:
        if pool.kind == "dask":  # the cluster's workers, one thread per task
            n_jobs, threads = pool.n_jobs, 1
        X_train, X_holdout, Z_train, Z_holdout = (pool.share(a) for a in split[:4])
        restarts = list(_progress(
            pool.run((_fit_restart, (X_train, Z_train, k, seed, model, solver, init, max_iter, tol, alpha_W,
                                     l1_ratio, threads))
                     for k, seed in tasks),
            tasks, progress,
        ))
        fit_seconds = time.perf_counter() - start
        per_k = [_logged(result) for result in pool.run(
            (_consensus_for_k, (X_train, X_holdout, Z_train, Z_holdout, split.gene_halves,
                                [res for res in restarts if res["k"] == k], k,
                                n_restarts, model, solver, max_iter, tol, alpha_W, l1_ratio, density_threshold,
                                random_state, threads))
            for k in k_values
        )]
    result = _sweep_result(k_values, per_k, split.holdout)
    result.table.attrs.update(wall_seconds=time.perf_counter() - start, fit_wall_seconds=fit_seconds,
                              n_jobs=n_jobs, threads_per_job=threads)
    return result


def _check_sweep_options(model: str, n_restarts: int, holdout_fraction: float) -> None:
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}.")
    if n_restarts < 1:
        raise ValueError(f"n_restarts must be >= 1, got {n_restarts}.")
    if not 0 <= holdout_fraction <= 0.5:
        raise ValueError(f"holdout_fraction must lie in [0, 0.5], got {holdout_fraction}.")


class _CellSplit(NamedTuple):
    """The cells a sweep learns from and the held-out ones (X and covariates), and the genes' two halves."""

    X_train: np.ndarray | sp.csr_matrix
    X_holdout: np.ndarray | sp.csr_matrix | None
    Z_train: np.ndarray | None
    Z_holdout: np.ndarray | None
    holdout: np.ndarray
    gene_halves: list[np.ndarray]


def _split_cells(X, covariates, probe: SemiNMF, holdout_fraction: float, random_state: int) -> _CellSplit:
    """Validate X (and the covariates) with ``probe``, the estimator of the largest k, and draw the hold-out.

    The cells held out and the gene halves of bi-cross-validation come from child 0 of
    ``SeedSequence(random_state)``; the restarts' seeds are the next children.

    Raises
    ------
    ValueError
        As :func:`consensus_sweep`.
    """
    # Validate and convert once (dtype, CSR), so workers receive the matrix they fit.
    X = probe._validate_X(X, reset=True)
    probe._check_sign(X)
    n_cells = X.shape[0]
    rng = np.random.default_rng(np.random.SeedSequence(random_state).spawn(1)[0])
    n_holdout = int(round(holdout_fraction * n_cells))
    holdout = np.sort(rng.choice(n_cells, n_holdout, replace=False)) if n_holdout else np.array([], dtype=int)
    train = np.setdiff1d(np.arange(n_cells), holdout)
    Z = None if covariates is None else probe._check_covariates(X, covariates)
    split = _CellSplit(
        X_train=X[train] if n_holdout else X, X_holdout=X[holdout] if n_holdout else None,
        Z_train=None if Z is None else Z[train], Z_holdout=None if Z is None or not n_holdout else Z[holdout],
        holdout=holdout, gene_halves=np.array_split(rng.permutation(X.shape[1]), 2),
    )
    probe._check_n_components(split.X_train)
    if _squared_norm(split.X_train) == 0:
        raise ValueError(
            f"X is all zeros on the {split.X_train.shape[0]} training cells: there are no programs to find. "
            "Check the input layer (normalised expression of the selected genes)."
        )
    return split


def _restart_tasks(k_values: list[int], n_restarts: int, random_state: int) -> list[tuple[int, int]]:
    """``(k, seed)`` of every restart, k by k; the seeds are children 1, 2, ... of ``SeedSequence(random_state)``."""
    seeds = [int(s.generate_state(1)[0])
             for s in np.random.SeedSequence(random_state).spawn(len(k_values) * n_restarts + 1)[1:]]
    return [(k, seeds[i * n_restarts + r]) for i, k in enumerate(k_values) for r in range(n_restarts)]


def _worker_layout(n_jobs: int | None, n_tasks: int) -> tuple[int, int]:
    """Worker processes (None: one per core, never more than tasks) and threads per worker, to fill the cores once."""
    cores = available_cores()
    n_jobs = min(cores if n_jobs is None else max(1, n_jobs), n_tasks)
    return n_jobs, max(1, cores // n_jobs)


def _sweep_result(k_values: list[int], per_k: list[tuple], holdout: np.ndarray) -> ConsensusSweep:
    """The sweep from each k's ``_consensus_for_k`` result, with the held-out excess error and the suggested k."""
    table = pd.DataFrame([row for row, _, _, _, _ in per_k])
    by_k = dict(zip(k_values, per_k))
    if holdout.size:
        table = table.merge(_holdout_excess({k: residuals for k, (_, _, _, _, residuals) in by_k.items()}), on="k")
    suggested, rule = suggest_k(table)
    return ConsensusSweep(
        table,
        components={k: H for k, (_, (H, _), _, _, _) in by_k.items()},
        restart_components={k: grouped for k, (_, _, grouped, _, _) in by_k.items()},
        best_traces={k: trace for k, (_, _, _, trace, _) in by_k.items()},
        suggested_k=suggested,
        rule=rule,
        holdout_cells=holdout,
        covariate_components={k: H_cov for k, (_, (_, H_cov), _, _, _) in by_k.items()},
    )
