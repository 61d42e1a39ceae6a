"""A picture of the cells: scanpy's neighbours graph and UMAP on the program usage.

A screen of two million cells is embedded on a stratified subsample (every perturbation keeps its
share of the cells), since a UMAP of all of them would take hours and show no more; cells outside
the subsample get NaN coordinates, as ``obsm['X_snmf_split']`` marks the cells outside its half.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

__all__ = ["umap", "stratified_sample", "UMAP_BASIS"]

#: ``obsm`` key of the embedding (``sc.pl.embedding(adata, basis="umap_snmf")``) and its ``uns`` key.
UMAP_BASIS = "umap_snmf"


def stratified_sample(groups, n_cells: int, seed: int = 0) -> np.ndarray:
    """Sorted positions of ``n_cells`` cells, every group keeping its share of them.

    Each group gets ``n_cells × its share`` cells rounded down, and the cells left over go to the
    groups with the largest remainders (Hamilton's method), so the total is exactly ``n_cells``
    (all cells when there are fewer) and each group's count is within one of its exact share.
    """
    codes = np.unique(pd.Series(groups).astype(str).to_numpy(), return_inverse=True)[1]
    sizes = np.bincount(codes)
    n_total = len(codes)
    if n_cells >= n_total:
        return np.arange(n_total)
    exact = sizes * (n_cells / n_total)
    counts = np.floor(exact).astype(int)
    left = n_cells - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:left]] += 1
    rng = np.random.default_rng(seed)
    by_group = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    chosen = [rng.choice(by_group[start:start + size], count, replace=False)
              for start, size, count in zip(starts, sizes, counts) if count]
    return np.sort(np.concatenate(chosen))


def umap(adata: ad.AnnData, groups_key: str | None = None, max_cells: int | None = 50_000, seed: int = 0,
         n_neighbors: int = 15, min_dist: float = 0.5) -> None:
    """Neighbours graph and UMAP of the cells on their program usage (scanpy, fixed seed), in place.

    Each program's usage is divided by its standard deviation first, so every program weighs
    the same in the cell-to-cell distances whatever its scale.

    Parameters
    ----------
    adata : AnnData
        With ``obsm['X_snmf']`` (cells × k usage, from :func:`factorize`).
    groups_key : str, optional
        ``obs`` column the subsample is stratified by (the perturbation).
    max_cells : int or None
        Embed at most this many cells (a stratified subsample); None: all cells.

    Writes
    ------
    ``obsm['X_umap_snmf']`` (cells × 2, float32; NaN for cells outside the subsample) and
    ``uns['umap_snmf']`` = ``{"params": {...}, "n_cells": cells embedded}``, so
    ``sc.pl.embedding(adata, basis="umap_snmf", color=...)`` works.
    """
    import scanpy as sc

    usage = np.asarray(adata.obsm["X_snmf"], dtype=np.float32)
    n_total = usage.shape[0]
    if max_cells is not None and max_cells < n_neighbors + 1:
        raise ValueError(f"max_cells = {max_cells} is too small for a neighbours graph of {n_neighbors} "
                         f"neighbours; give at least {n_neighbors + 1}, or None for all cells")
    if max_cells is None or max_cells >= n_total:
        chosen = np.arange(n_total)
    else:
        groups = adata.obs[groups_key] if groups_key else np.zeros(n_total)
        chosen = stratified_sample(groups, max_cells, seed)
    embedded = usage[chosen]
    spread = embedded.std(axis=0)
    scaled = embedded / np.where(spread > 0, spread, 1.0)
    cells = ad.AnnData(obs=pd.DataFrame(index=adata.obs_names[chosen]), obsm={"X_usage": scaled})
    # exact neighbours (scikit-learn): the usage has only k dimensions, where a tree search is fast (50,000
    # cells in ~15 s); scanpy's default above 4,096 cells, pynndescent, hands scanpy a sparse array it cannot
    # read with scipy >= 1.15 (AttributeError: getnnz)
    sc.pp.neighbors(cells, n_neighbors=min(n_neighbors, len(chosen) - 1), use_rep="X_usage", random_state=seed,
                    transformer="sklearn")
    sc.tl.umap(cells, min_dist=min_dist, random_state=seed)
    coordinates = np.full((n_total, 2), np.nan, dtype=np.float32)
    coordinates[chosen] = cells.obsm["X_umap"]
    adata.obsm[f"X_{UMAP_BASIS}"] = coordinates
    adata.uns[UMAP_BASIS] = {
        "params": {"use_rep": "X_snmf, each program divided by its standard deviation", "n_neighbors": n_neighbors,
                   "min_dist": min_dist, "random_state": seed, "max_cells": -1 if max_cells is None else max_cells,
                   "stratified_by": groups_key or ""},
        "n_cells": int(len(chosen)),
    }
