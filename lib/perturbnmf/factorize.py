"""Step 2: semi-NMF of the normalised selected genes, swept over k, stored PCA-style.

Results go where scanpy users look for them (cf. ``sc.pp.pca``):

* ``obsm['X_snmf']`` — cells × k program usage W (≥ 0), so ``sc.pl.embedding(adata, basis='snmf')`` works;
* ``varm['snmf_loadings']`` — genes × k signed loadings Hᵀ (zeros for genes not factorised);
* ``var['snmf_used']`` — the genes that entered the factorisation;
* ``uns['snmf']`` — k, solver, seed, iterations, objective trace, the error per k, program names.

Semi-NMF is scale-ambiguous ((W D)(D⁻¹ H) fits equally well), so each program's loadings are
scaled to unit L2 norm and W absorbs the scale; programs are then ordered by total usage.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning

from ._seminmf import SemiNMF

__all__ = ["factorize", "sweep", "program_names", "usage", "loadings", "normalize_factors"]


def program_names(k: int) -> list[str]:
    """``['P01', 'P02', ...]`` — sortable names for k programs."""
    width = max(2, len(str(k)))
    return [f"P{i + 1:0{width}d}" for i in range(k)]


def normalize_factors(W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-L2 rows of H (scale moved into W), programs ordered by total usage (descending).

    Parameters
    ----------
    W : ndarray of shape (n_cells, k)
    H : ndarray of shape (k, n_genes)

    Returns
    -------
    W, H
        Same shapes; ``W @ H`` is unchanged.
    """
    norms = np.linalg.norm(H, axis=1)
    norms[norms == 0] = 1.0
    W = W * norms
    H = H / norms[:, None]
    order = np.argsort(-W.sum(axis=0), kind="stable")
    return W[:, order], H[order]


def _check_k_values(k_values: list[int], n_cells: int, n_genes: int) -> None:
    limit = min(n_cells, n_genes)
    impossible = [k for k in k_values if k >= limit]
    if impossible:
        raise ValueError(
            f"k_values {impossible} are impossible: k must be smaller than min(cells, genes) = "
            f"min({n_cells}, {n_genes}) = {limit}. Remove them from 'k_values', or select more genes "
            "(lower 'hvg_min_disp', set 'hvg_n_top_genes', or 'hvg_use_all_genes: true')."
        )


def sweep(
    X, k_values: list[int], solver: str = "mu", max_iter: int = 500, tol: float = 1e-4, seed: int = 0
) -> tuple[pd.DataFrame, dict[int, tuple[SemiNMF, np.ndarray]]]:
    """Fit one semi-NMF per k.

    Parameters
    ----------
    X : ndarray or sparse matrix of shape (n_cells, n_genes)

    Returns
    -------
    table : DataFrame
        One row per k: ``k, reconstruction_err, relative_error, n_iter, converged, seconds``.
        ``relative_error`` is ‖X − WH‖_F / ‖X‖_F.
    fits : dict
        ``{k: (fitted SemiNMF, W)}``; ``model.transform`` gives the usage of new cells.
    """
    _check_k_values(k_values, *X.shape)
    norm_x = np.sqrt(X.multiply(X).sum()) if sp.issparse(X) else np.linalg.norm(X)
    rows, fits = [], {}
    for k in sorted(k_values):
        model = SemiNMF(n_components=k, solver=solver, max_iter=max_iter, tol=tol, random_state=seed)
        start = time.perf_counter()
        with warnings.catch_warnings():
            # Non-convergence is reported in the table, per k, instead of as a warning.
            warnings.simplefilter("ignore", ConvergenceWarning)
            W = model.fit_transform(X)
        rows.append({
            "k": k,
            "reconstruction_err": float(model.reconstruction_err_),
            "relative_error": float(model.reconstruction_err_ / norm_x) if norm_x > 0 else np.nan,
            "n_iter": int(model.n_iter_),
            "converged": bool(model.converged_),
            "seconds": time.perf_counter() - start,
        })
        fits[k] = (model, W)
    return pd.DataFrame(rows), fits


def factorize(
    adata: ad.AnnData,
    k_values: list[int],
    k: int,
    solver: str = "mu",
    max_iter: int = 500,
    tol: float = 1e-4,
    seed: int = 0,
    layer: str = "normalized",
    mask_var: str = "highly_variable",
) -> pd.DataFrame:
    """Sweep k on ``layers[layer]`` restricted to ``var[mask_var]``; keep the model for ``k``.

    Writes ``obsm['X_snmf']``, ``varm['snmf_loadings']``, ``var['snmf_used']`` and
    ``uns['snmf']`` (see module docstring) and returns the sweep table.
    """
    if k not in k_values:
        raise ValueError(f"'k' ({k}) must be one of 'k_values' {k_values}.")
    if layer not in adata.layers:
        raise ValueError(f"Layer {layer!r} is missing; run the preprocess step first (it writes 'normalized').")
    if mask_var not in adata.var:
        raise ValueError(f"var[{mask_var!r}] is missing; run the preprocess step first (it selects the genes).")
    used = adata.var[mask_var].to_numpy(dtype=bool)
    X = adata.layers[layer][:, used]
    X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    table, fits = sweep(X, k_values, solver=solver, max_iter=max_iter, tol=tol, seed=seed)
    model, W = fits[k]
    W, H = normalize_factors(W, model.components_)
    names = program_names(k)
    loadings_all = np.zeros((adata.n_vars, k))
    loadings_all[used] = H.T
    adata.obsm["X_snmf"] = W.astype(np.float32)
    adata.varm["snmf_loadings"] = loadings_all
    adata.var["snmf_used"] = used
    adata.uns["snmf"] = {
        "k": int(k),
        "program_names": names,
        "solver": solver,
        "seed": int(seed),
        "n_iter": int(model.n_iter_),
        "converged": bool(model.converged_),
        "objective": np.asarray(model.objective_, dtype=float),
        "reconstruction_err": float(model.reconstruction_err_),
        "relative_error": float(table.loc[table["k"] == k, "relative_error"].iloc[0]),
        "sweep": table,
        "params": {"k_values": [int(v) for v in k_values], "max_iter": int(max_iter), "tol": float(tol),
                   "layer": layer, "mask_var": mask_var, "n_genes": int(used.sum()), "n_cells": int(adata.n_obs)},
    }
    return table


def usage(adata: ad.AnnData) -> pd.DataFrame:
    """Program usage W as a cells × programs DataFrame."""
    return pd.DataFrame(adata.obsm["X_snmf"], index=adata.obs_names, columns=adata.uns["snmf"]["program_names"])


def loadings(adata: ad.AnnData) -> pd.DataFrame:
    """Signed loadings of the factorised genes, genes × programs."""
    used = adata.var["snmf_used"].to_numpy(dtype=bool)
    return pd.DataFrame(
        adata.varm["snmf_loadings"][used], index=adata.var_names[used], columns=adata.uns["snmf"]["program_names"]
    )


def summary(adata: ad.AnnData) -> dict[str, Any]:
    """The chosen model's headline numbers."""
    info = adata.uns["snmf"]
    return {key: info[key] for key in ("k", "solver", "seed", "n_iter", "converged", "relative_error")}
