"""Step 2: consensus factorisation of the normalised selected genes over a sweep of k, stored PCA-style.

The model is NMF (``model="nmf"``, the default: usage and loadings ≥ 0, identifiable, so the
programs are the real ones rather than blends) or the original analysis's semi-NMF
(``model="seminmf"``: signed loadings). Results go where scanpy users look for them (cf.
``sc.pp.pca``), under the same names for both models:

* ``obsm['X_snmf']`` — cells × k program usage W (≥ 0), so ``sc.pl.embedding(adata, basis='snmf')`` works;
* ``varm['snmf_loadings']`` — genes × k loadings Hᵀ (zeros for genes not factorised; ≥ 0 for NMF);
* ``varm['snmf_gene_scores']`` — genes × k signed gene scores: each gene's change in normalised
  expression per standard deviation of a program's usage, from one least-squares regression
  of the expression on all programs' usage (with an intercept). Positive: genes the program
  raises; negative: genes that fall as the program rises — how an NMF program (whose loadings
  cannot be negative) shows the genes it lowers (cf. cNMF's gene spectra scores);
* ``var['snmf_used']`` — the genes that entered the factorisation;
* ``uns['snmf']`` — the model, k (and the suggested k with its rule), solver, seed, restarts, iterations and
  objective trace of the best restart, error, held-out error and stability per k (``sweep``),
  every restart's programs with their consensus group, program names.

Both models are scale-ambiguous ((W D)(D⁻¹ H) fits equally well), so each program's loadings are
scaled to unit L2 norm and W absorbs the scale; programs are then ordered by total usage.
"""

from __future__ import annotations

import logging

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

from ..decomposition._chunked import cross_products, polish_chunked, relative_error_chunked, transform_chunked
from ..decomposition._seminmf import _safe_Wt_X
from ..decomposition._consensus import (SWEEP_TOL, ConsensusSweep, _polish, consensus_sweep, refit_usage,
                                        relative_error, with_covariates)
from ..errors import InputError

#: Progress goes to this logger at level INFO (run_all.py echoes it).
LOG = logging.getLogger("perturbnmf")

#: The k sweep learns from at most this many cells (a random subsample; None: all cells). The sweep
#: costs n_restarts × len(k_values) fits, each growing with the cells, while the programs, their
#: stability and the held-out error are settled by far fewer cells; the kept k's consensus programs
#: are then fitted on all cells.
SWEEP_MAX_CELLS = 50_000

#: Knots of a technical covariate's curves (:func:`baseline_design`), as quantiles of its values: dense in
#: the tails, where shallow or damaged cells bend expression most. Measured on simulated screens (k = 8, the
#: planted programs' mean cosine): a straight line (knots 0, 1) 0.84 at 20k and 300k cells, these nine
#: knots 0.90 and 0.92; evenly spaced deciles 0.91 at 300k.
COVARIATE_KNOTS = (0.0, 0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98, 1.0)

#: A kept program counts as reproduced on half of the cells when its loadings' cosine with its
#: learn-half twin reaches this.
REPRODUCED_COSINE = 0.8

__all__ = ["factorize", "split_half", "factorized_matrix", "program_names", "usage", "split_usage", "loadings",
           "gene_scores", "normalize_factors", "regression_scores", "baseline_design", "COVARIATE_KNOTS"]


def program_names(k: int) -> list[str]:
    """``['P01', 'P02', ...]`` — sortable names for k programs."""
    width = max(2, len(str(k)))
    return [f"P{i + 1:0{width}d}" for i in range(k)]


def normalize_factors(W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-L2 rows of H (scale moved into W), programs ordered by total usage (descending).

    Parameters
    ----------
    W : ndarray of shape (n_cells, k)
    H : ndarray of shape (k, n_genes)

    Returns
    -------
    W, H
        Same shapes; ``W @ H`` is unchanged.
    order : ndarray of shape (k,)
        ``order[i]`` is the input program placed at position ``i``.
    """
    norms = np.linalg.norm(H, axis=1)
    norms[norms == 0] = 1.0
    W = W * norms
    H = H / norms[:, None]
    order = np.argsort(-W.sum(axis=0), kind="stable")
    return W[:, order], H[order], order


def regression_scores(X, W: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of every gene's expression on the standardised usage.

    ``X ≈ 1 b + Z B`` with ``Z`` the usage centred and scaled to unit standard deviation per
    program: ``B[p, g]`` is gene g's change in expression per standard deviation of program
    p's usage, the other programs held fixed. Computed from the Gram terms (X is never
    centred or densified).

    Parameters
    ----------
    X : ndarray, CSR matrix or dask.array.Array (row-chunked, read chunk by chunk) of shape (n_cells, n_genes)
    W : ndarray of shape (n_cells, k)

    Returns
    -------
    B : ndarray of shape (k, n_genes)
        Zero rows for programs without variance.
    """
    products = _transposed_product(X, np.hstack([W, np.ones((W.shape[0], 1))]))
    return _regression_from_products(W, products[:-1], products[-1])


def _regression_from_products(W: np.ndarray, WtX: np.ndarray, gene_sums: np.ndarray) -> np.ndarray:
    """:func:`regression_scores` from ``W^T X`` (k × genes) and X's column sums: X is never centred."""
    n = W.shape[0]
    mean = W.mean(axis=0)
    sd = W.std(axis=0)
    varying = sd > 0
    Z = (W[:, varying] - mean[varying]) / sd[varying]
    ZtX = (WtX[varying] - np.outer(mean[varying], gene_sums)) / sd[varying, None]  # Zᵀ X
    B = np.zeros((W.shape[1], WtX.shape[1]))
    B[varying] = np.linalg.lstsq(Z.T @ Z / n, ZtX / n, rcond=None)[0]
    return B


def _check_k_values(k_values: list[int], n_cells: int, n_genes: int) -> None:
    limit = min(n_cells, n_genes)
    impossible = [k for k in k_values if k >= limit]
    if impossible:
        raise InputError(
            f"k_values {impossible} are impossible: k must be smaller than min(cells, genes) = "
            f"min({n_cells}, {n_genes}) = {limit}. Remove them from 'k_values', or select more genes "
            "(lower 'hvg_min_disp', set 'hvg_n_top_genes', or 'hvg_use_all_genes: true')."
        )


def factorize(
    adata: ad.AnnData,
    k_values: list[int],
    k: int | None = None,
    n_restarts: int = 5,
    solver: str = "hals",
    max_iter: int = 500,
    tol: float = SWEEP_TOL,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    n_jobs: int | None = None,
    layer: str | None = None,
    mask_var: str | None = None,
    model: str = "nmf",
    density_threshold: float | None = 0.5,
    batch_key: str | None = None,
    sweep_max_cells: int | None = SWEEP_MAX_CELLS,
    covariate_keys: list[str] | None = None,
) -> ConsensusSweep:
    """Consensus factorisation over a sweep of k on ``X`` (or ``layers[layer]``), all genes (or ``var[mask_var]``).

    Step 1 writes the log-normalised expression of the selected genes to ``X``, so the defaults
    (``layer=None``: ``X``; ``mask_var=None``: every gene) factorise exactly those; ``layer`` and
    ``mask_var`` point at another matrix or a subset of the genes.

    An X in memory is factorised in memory. A lazy (Dask, row-chunked) X is never read whole: the
    sweep's subsample is read into memory, and the fit on all cells, the usage, the gene scores and
    the error are computed chunk by chunk (:func:`perturbnmf.decomposition.polish_chunked`, on the
    active Dask client if any), so memory follows the chunk (solver ``"hals"``).

    For each k, ``n_restarts`` fits of ``model`` (see :func:`perturbnmf.decomposition.consensus_sweep`)
    give error, held-out error and stability; the kept model is the consensus for ``k`` (the
    suggested k when ``k`` is None), with usage refitted on all cells. Writes
    ``obsm['X_snmf']``, ``varm['snmf_loadings']``, ``varm['snmf_gene_scores']``,
    ``var['snmf_used']`` and ``uns['snmf']`` (see module docstring) and returns the sweep.

    With ``model="nmf"`` every cell also has a fixed, known usage of 1 for its batch's baseline
    (``obs[batch_key]``; one baseline for all cells without a batch key): the expression all
    cells of a batch share gets its own loadings (``varm['snmf_baseline']``, genes × batches)
    instead of taking programs, so the k programs are the programs (an NMF cannot subtract a
    baseline). Semi-NMF keeps the original analysis's model, without baselines. ``covariate_keys``
    names numeric ``obs`` columns of technical variation (e.g. ``log1p_total_counts``,
    ``pct_counts_mito``) whose effect on expression is fitted the same way, as known usage with
    loadings of their own (either sign, see :func:`baseline_design`): log-normalised expression
    carries sequencing depth and the mitochondrial share in every gene, and an NMF without them
    spends a program on each, losing a biological one.

    With more than ``sweep_max_cells`` cells the sweep learns from a random subsample of that many
    (see ``SWEEP_MAX_CELLS``) and the kept k's consensus programs are fitted once more on all cells.
    """
    _check_factorize_options(adata, k_values, k, model, solver, layer, mask_var)
    used = _used_genes(adata, mask_var)
    X = _used_matrix(adata, layer, mask_var)
    _check_k_values(k_values, *X.shape)
    levels, Z = baseline_design(adata, batch_key, covariate_keys) if model == "nmf" else ([], None)
    cells = _sweep_cells(X.shape[0], sweep_max_cells, seed)
    if cells is None:
        X = _in_memory(X)
    LOG.info("k sweep on %d of %d cells, k in %s, %d restarts each", X.shape[0] if cells is None else len(cells),
             X.shape[0], list(k_values), n_restarts)
    result = consensus_sweep(_rows(X, cells), k_values, model=model, n_restarts=n_restarts, solver=solver,
                             max_iter=max_iter, tol=tol, density_threshold=density_threshold, covariates=_rows(Z, cells),
                             holdout_fraction=holdout_fraction, random_state=seed, n_jobs=n_jobs)
    chosen = result.suggested_k if k is None else k
    H, H_baseline = result.components[chosen], result.covariate_components[chosen]
    if cells is not None:
        LOG.info("k = %d: fitting the consensus programs on all %d cells", chosen, X.shape[0])
        H, H_baseline = _fit_on_all_cells(X, H, H_baseline, Z, model, solver, max_iter, tol, seed)
    W, H, order = normalize_factors(_refit_all_usage(X, H, Z, H_baseline), H)
    scores, fitted_error = _scores_and_error(X, W, H, Z, H_baseline)
    _store_factors(adata, used, W, H, scores, None if Z is None else H_baseline)
    table = result.table
    adata.uns["snmf"] = {
        "model": model,
        "baseline": ({"batch_key": batch_key, "covariate_keys": [] if covariate_keys is None else list(covariate_keys), "levels": list(levels)}
                     if Z is not None else {}),
        **_choice_record(result, chosen, k_source="suggested" if k is None else "parameter k"),
        "solver": solver,
        "seed": int(seed),
        "consensus": True,
        "n_restarts": int(n_restarts),
        **_fit_record(result, chosen, n_restarts, fitted_error, position=np.argsort(order)),
        "params": {"k_values": [int(v) for v in k_values], "max_iter": int(max_iter), "tol": float(tol),
                   "density_threshold": None if density_threshold is None else float(density_threshold),
                   "holdout_fraction": float(holdout_fraction), "layer": layer, "mask_var": mask_var,
                   "n_genes": int(used.sum()), "n_cells": int(adata.n_obs),
                   "sweep_max_cells": sweep_max_cells, "n_sweep_cells": int(X.shape[0] if cells is None else len(cells)),
                   "n_jobs": int(table.attrs.get("n_jobs", 1)),
                   "sweep_seconds": float(table.attrs.get("wall_seconds", np.nan))},
    }
    return result


def _sweep_cells(n_cells: int, max_cells: int | None, seed: int) -> np.ndarray | None:
    """The cells the k sweep learns from: None (all of them) up to ``max_cells``, else a random
    subsample of ``max_cells`` (sorted indices, drawn from ``seed``)."""
    if max_cells is None or n_cells <= max_cells:
        return None
    return np.sort(np.random.default_rng([seed, 3]).choice(n_cells, max_cells, replace=False))


def _rows(matrix, cells: np.ndarray | None):
    """``matrix[cells]`` in memory (None stays None; ``cells=None`` keeps every row)."""
    if matrix is None:
        return None
    return _in_memory(matrix if cells is None else matrix[cells])


def _fit_on_all_cells(X, H, H_cov, Z, model: str, solver: str, max_iter: int, tol: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The consensus programs of a subsample, fitted once more on all cells of X (in memory, or chunk by
    chunk for a lazy X). Shapes: H (k × genes, returned with unit rows), H_cov (b × genes), Z (cells × b)."""
    if not isinstance(X, da.Array):
        return _polish(X, H, H_cov, Z, model, solver, max_iter, tol, random_state=seed)[1:]

    def progress(iteration: int, objective: float, seconds: float) -> None:
        LOG.info("all %d cells, iteration %d: objective %.6e (%.0f s)", X.shape[0], iteration, objective, seconds)

    return polish_chunked(X, H, Z, H_cov, nonnegative_h=model == "nmf", max_iter=max_iter, tol=tol,
                          random_state=seed, progress=progress)


def _refit_all_usage(X, H: np.ndarray, Z, H_cov) -> np.ndarray:
    """Every cell's usage for fixed programs (:func:`refit_usage`; chunk by chunk for a lazy X), n_cells × k."""
    if isinstance(X, da.Array):
        return transform_chunked(X, H, Z, H_cov).compute()
    return refit_usage(X, H, Z, H_cov)


def _scores_and_error(X, W: np.ndarray, H: np.ndarray, Z, H_cov) -> tuple[np.ndarray, float]:
    """The gene scores (:func:`regression_scores`, k × genes) and the fit's relative error ‖X − [W Z][H; H_cov]‖ /
    ‖X‖; for a lazy X both from one pass over its chunks (``Aᵀ X`` for A = [W, Z, 1])."""
    W_all, H_all = with_covariates(W, H, Z, H_cov)
    if not isinstance(X, da.Array):
        return regression_scores(X, W), relative_error(X, W_all, H_all)
    products, norm_sq = cross_products(X, np.hstack([W_all, np.ones((X.shape[0], 1))]))
    scores = _regression_from_products(W, products[:W.shape[1]], products[-1])
    return scores, relative_error_chunked(X, W_all, H_all, products=(products[:-1], norm_sq))


def _transposed_product(X, A: np.ndarray) -> np.ndarray:
    """Aᵀ X, shape (m, n_genes), for A of shape (n_cells, m) and an in-memory or lazy X."""
    if isinstance(X, da.Array):
        return cross_products(X, A)[0]
    return _safe_Wt_X(X, np.ascontiguousarray(A))


def _in_memory(X):
    """X as the in-memory solvers read it: a lazy (Dask) matrix computed; sparse as CSR with 32-bit indices
    when they fit."""
    if isinstance(X, da.Array):
        X = X.compute()
    if not sp.issparse(X):
        return np.asarray(X)
    X = sp.csr_matrix(X)
    return sp.csr_matrix((X.data, X.indices, X.indptr), shape=X.shape)  # scipy picks the smallest index type


def _check_factorize_options(adata: ad.AnnData, k_values: list[int], k: int | None, model: str, solver: str,
                             layer: str | None, mask_var: str | None) -> None:
    if k is not None and k not in k_values:
        raise ValueError(f"'k' ({k}) must be one of 'k_values' {k_values}, or None to use the suggested k.")
    if model == "nmf" and solver != "hals":
        raise ValueError(f"'solver' {solver!r} is the multiplicative rule of semi-NMF; with 'model' 'nmf' use "
                         "'solver: hals', or set 'model: seminmf'.")
    if adata.X is None and layer is None:
        raise ValueError("X is missing; run the preprocess step first (it writes the log-normalised selected genes "
                         "to X).")
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"Layer {layer!r} is missing (layers: {', '.join(adata.layers) or 'none'}); layer=None "
                         "factorises X, where the preprocess step writes the log-normalised selected genes.")
    if mask_var is not None and mask_var not in adata.var:
        raise ValueError(f"var[{mask_var!r}] is missing; mask_var=None factorises every gene of the matrix (the "
                         "preprocess step keeps only the selected genes).")
    if solver != "hals" and isinstance(adata.X if layer is None else adata.layers[layer], da.Array):
        raise ValueError(f"'solver' {solver!r} has no out-of-core form: a lazy (Dask) X is fitted chunk by chunk "
                         "with 'solver: hals'; use it, or read the matrix into memory.")


def _store_factors(adata: ad.AnnData, used: np.ndarray, W: np.ndarray, H: np.ndarray, scores: np.ndarray,
                   H_baseline: np.ndarray | None) -> None:
    """Usage into ``obsm``; loadings, gene scores (and baselines) into ``varm``, zero for genes not factorised.

    Shapes: W (n_cells × k); H and scores (k × n_used_genes); H_baseline (b × n_used_genes), or None
    without baselines.
    """
    adata.obsm["X_snmf"] = W.astype(np.float32)
    for key, rows in (("snmf_loadings", H), ("snmf_gene_scores", scores), ("snmf_baseline", H_baseline)):
        if rows is not None:
            per_gene = np.zeros((adata.n_vars, len(rows)))
            per_gene[used] = rows.T
            adata.varm[key] = per_gene
    adata.var["snmf_used"] = used


def _choice_record(result: ConsensusSweep, chosen: int, k_source: str) -> dict:
    """The kept k, how it was chosen, and its programs' names (part of ``uns['snmf']``)."""
    return {
        "k": int(chosen),
        "suggested_k": int(result.suggested_k),
        "k_rule": result.rule,
        "k_source": k_source,
        "program_names": program_names(chosen),
    }


def _fit_record(result: ConsensusSweep, chosen: int, n_restarts: int, fitted_error: float,
                position: np.ndarray) -> dict:
    """The kept k's fit, its row of the sweep, and its restarts' programs (part of ``uns['snmf']``).

    ``fitted_error`` is the relative error of the stored model (usage refitted on all cells);
    ``position`` maps a consensus group to its program's position.
    """
    table = result.table
    row = table.loc[table["k"] == chosen].iloc[0]
    trace = np.asarray(result.best_traces[chosen], dtype=float)
    return {
        "n_iter": int(len(trace)),
        "converged": bool(row["n_converged"] == n_restarts),
        "objective": trace,
        "relative_error": float(fitted_error),
        "holdout_relative_error": float(row["holdout_relative_error"]),
        "stability": float(row["stability"]),
        "sweep": table,
        "restart_programs": result.restart_components[chosen][0],
        "restart_labels": _restart_labels(result.restart_components[chosen][1], position),
    }


def baseline_design(adata: ad.AnnData, batch_key: str | None,
                    covariate_keys: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Each cell's known usage: one indicator column per batch (a column of ones without a batch), then one
    column per knot of each technical covariate.

    A covariate c (``obs[key]``, numeric) enters as the piecewise-linear "tent" functions of c with knots
    at its quantiles :data:`COVARIATE_KNOTS` (a degree-1 B-spline basis): each column is 1 at its knot,
    falls linearly to 0 at the neighbouring knots, and the columns of a cell sum to 1. With non-negative
    loadings every gene then follows its own non-negative piecewise-linear curve in c — rising, falling or
    bending, as log-normalised expression does with sequencing depth (a straight line leaves the bend to
    be taken up by a program). A covariate that does not vary adds nothing.

    Returns
    -------
    levels : list of str
        The batches (``["all cells"]`` without a batch key), then ``"<key> = <knot value> (q<percentile>)"``
        per knot of each covariate: its column of loadings is every gene's baseline at that value.
    Z : ndarray of shape (n_cells, n_levels)

    Raises
    ------
    ValueError
        A covariate column that is missing, not numeric or not finite, named with the parameter.
    """
    if batch_key is None:
        levels, Z = ["all cells"], np.ones((adata.n_obs, 1))
    else:
        batch = pd.Categorical(adata.obs[batch_key].astype(str))
        levels, Z = [str(c) for c in batch.categories], np.eye(len(batch.categories))[batch.codes]
    columns = [Z]
    for key in [] if covariate_keys is None else list(covariate_keys):  # a list, or an array read back from h5ad
        c = _covariate(adata, key)
        knots, first = np.unique(np.quantile(c, COVARIATE_KNOTS), return_index=True)
        if knots.size > 1:
            levels += [f"{key} = {value:.4g} (q{100 * COVARIATE_KNOTS[i]:g})" for value, i in zip(knots, first)]
            columns.append(np.column_stack([np.interp(c, knots, unit) for unit in np.eye(knots.size)]))
    return levels, np.hstack(columns)


def _covariate(adata: ad.AnnData, key: str) -> np.ndarray:
    """``obs[key]`` as finite floats, or a ValueError naming the column and the parameter."""
    if key not in adata.obs:
        raise ValueError(f"Column {key!r} (parameter 'covariate_keys') is not in obs; step 1 writes "
                         "'log1p_total_counts' and 'pct_counts_mito'. Name numeric obs columns, or set "
                         "'covariate_keys: []'.")
    values = pd.to_numeric(adata.obs[key], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(values).all():
        raise ValueError(f"Column {key!r} (parameter 'covariate_keys') has {int((~np.isfinite(values)).sum())} "
                         "missing, non-numeric or infinite values; a covariate needs a number for every cell.")
    return values


def _restart_labels(labels: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Consensus group -> program position for every restart program; outliers (−1) stay −1."""
    return np.where(labels >= 0, position[np.maximum(labels, 0)], -1).astype(np.int64)


def _used_genes(adata: ad.AnnData, mask_var: str | None) -> np.ndarray:
    """The genes factorised: ``var[mask_var]``, or every gene when ``mask_var`` is None."""
    return np.ones(adata.n_vars, dtype=bool) if mask_var is None else adata.var[mask_var].to_numpy(dtype=bool)


def _used_matrix(adata: ad.AnnData, layer: str | None, mask_var: str | None):
    """The matrix factorised (``X`` or ``layers[layer]``, the ``mask_var`` genes): in memory as
    :func:`_in_memory` reads it, or lazy (a Dask array stays one, row-chunked)."""
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise ValueError("X is not loaded (None): read the AnnData with its expression matrix.")
    if mask_var is not None:
        X = X[:, _used_genes(adata, mask_var)]
    return X.rechunk({1: -1}) if isinstance(X, da.Array) else _in_memory(X)


def split_half(adata: ad.AnnData, groups_key: str, n_restarts: int = 5, solver: str = "hals", max_iter: int = 500,
               tol: float = SWEEP_TOL, seed: int = 0, n_jobs: int | None = None) -> pd.DataFrame:
    """Programs learned on one half of the cells, usage of the other half refitted to them.

    Testing perturbations on the cells that also shaped the programs uses the data twice
    ("double dipping"): a program can bend towards a group's idiosyncrasies. Here the cells of
    every perturbation group are split at random into a *learn* and a *test* half; consensus
    semi-NMF with the kept k (``n_restarts`` restarts, as in :func:`factorize`) is fitted on
    the learn half alone, its programs are matched one-to-one to
    the kept programs (Hungarian matching on the cosine of loadings) and named after them, and
    the test cells' usage is refitted to them by non-negative least squares. Step 3 repeats
    the perturbation tests on the test cells only.

    Writes ``obs['snmf_half']`` ("learn"/"test"), ``obsm['X_snmf_split']`` (cells × k; NaN on
    learn cells) and ``uns['snmf']['split_half']`` (match cosines, cell counts, seed). Needs
    :func:`factorize` first.

    Returns
    -------
    DataFrame
        One row per kept program: ``program`` and ``cosine`` with its split-half twin.
    """
    info = adata.uns["snmf"]
    layer, mask_var = info["params"].get("layer"), info["params"].get("mask_var")
    X = _used_matrix(adata, layer, mask_var)
    learn = _learn_half(adata.obs[groups_key].astype(str).to_numpy(), seed)
    # the same consensus procedure as the kept model (restarts on at most sweep_max_cells cells, then
    # fitted on all of them), on the learn half alone
    baseline = info.get("baseline") or {}
    Z = baseline_design(adata, baseline["batch_key"], baseline.get("covariate_keys"))[1] if baseline else None
    model = info.get("model", "seminmf")
    X_learn, Z_learn = X[learn], _rows(Z, np.flatnonzero(learn))
    cells = _sweep_cells(X_learn.shape[0], info["params"].get("sweep_max_cells"), seed)
    if cells is None:
        X_learn = _in_memory(X_learn)
    LOG.info("split half: the k = %d programs learned again on %d cells", info["k"], X_learn.shape[0])
    learned = consensus_sweep(_rows(X_learn, cells), [info["k"]], model=model, n_restarts=n_restarts,
                              solver=solver, max_iter=max_iter, tol=tol,
                              density_threshold=info["params"].get("density_threshold"),
                              covariates=_rows(Z_learn, cells), holdout_fraction=0.0,
                              random_state=seed, n_jobs=n_jobs, progress=False)
    H_learn, H_baseline = learned.components[info["k"]], learned.covariate_components[info["k"]]
    if cells is not None:
        H_learn, H_baseline = _fit_on_all_cells(X_learn, H_learn, H_baseline, Z_learn, model, solver, max_iter, tol,
                                                seed)
    H_kept = adata.varm["snmf_loadings"][_used_genes(adata, mask_var)].T
    cosine = H_kept @ H_learn.T  # kept rows are unit norm
    _, twin = linear_sum_assignment(cosine, maximize=True)  # square: rows come back as 0..k-1
    H_matched = H_learn[twin]
    W_split = np.full((adata.n_obs, info["k"]), np.nan, dtype=np.float32)
    W_split[~learn] = _refit_all_usage(X[~learn], H_matched, None if Z is None else Z[~learn], H_baseline)
    adata.obs["snmf_half"] = pd.Categorical(np.where(learn, "learn", "test"), categories=["learn", "test"])
    adata.obsm["X_snmf_split"] = W_split
    match = pd.DataFrame({"program": info["program_names"], "cosine": cosine[np.arange(len(twin)), twin]})
    info["split_half"] = {"seed": int(seed), "n_learn": int(learn.sum()), "n_test": int((~learn).sum()),
                          "cosine": match["cosine"].to_numpy(dtype=float)}
    return match


def _learn_half(labels: np.ndarray, seed: int) -> np.ndarray:
    """Per group (in sorted label order), a random half of its cells (the larger half when odd): True for
    learn cells. One grouping of the cells, not one scan per group (10,000 groups × 2 million cells)."""
    rng = np.random.default_rng(seed)
    codes, groups = pd.factorize(labels, sort=True)
    order = np.argsort(codes, kind="stable")  # each group's cells in ascending order
    bounds = np.searchsorted(codes[order], np.arange(len(groups) + 1))
    learn = np.zeros(len(labels), dtype=bool)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        cells = rng.permutation(order[start:stop])
        learn[cells[: (len(cells) + 1) // 2]] = True
    return learn


def split_usage(adata: ad.AnnData) -> pd.DataFrame:
    """Usage of the test-half cells refitted to the programs learned on the other half (see :func:`split_half`)."""
    test = (adata.obs["snmf_half"] == "test").to_numpy()
    return pd.DataFrame(adata.obsm["X_snmf_split"][test], index=adata.obs_names[test],
                        columns=adata.uns["snmf"]["program_names"])


def factorized_matrix(adata: ad.AnnData):
    """The matrix the kept model was fitted to (cells × the genes of ``X``, or of the layer and gene mask
    ``uns['snmf']['params']`` names), sparse CSR when it is sparse; a lazy (Dask) X stays lazy."""
    info = adata.uns["snmf"]["params"]
    return _used_matrix(adata, info.get("layer"), info.get("mask_var"))


def usage(adata: ad.AnnData) -> pd.DataFrame:
    """Program usage W as a cells × programs DataFrame."""
    return pd.DataFrame(adata.obsm["X_snmf"], index=adata.obs_names, columns=adata.uns["snmf"]["program_names"])


def loadings(adata: ad.AnnData) -> pd.DataFrame:
    """Loadings H of the factorised genes (signed for semi-NMF, ≥ 0 for NMF), genes × programs."""
    return _per_gene(adata, "snmf_loadings")


def gene_scores(adata: ad.AnnData) -> pd.DataFrame:
    """Signed gene scores of the factorised genes, genes × programs (see the module docstring)."""
    return _per_gene(adata, "snmf_gene_scores")


def _per_gene(adata: ad.AnnData, key: str) -> pd.DataFrame:
    used = adata.var["snmf_used"].to_numpy(dtype=bool)
    return pd.DataFrame(adata.varm[key][used], index=adata.var_names[used], columns=adata.uns["snmf"]["program_names"])
