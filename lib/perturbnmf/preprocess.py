"""Step 1: read a screen, check it, QC, normalise, score the cell cycle, pick genes.

Every function takes and returns an :class:`~anndata.AnnData` (scanpy's ``pp`` style) and
records what it did in ``adata.uns['perturbnmf']['preprocess']`` so the report can show it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

__all__ = [
    "InputError",
    "read_screen",
    "check_counts",
    "filter_cells_and_genes",
    "drop_small_groups",
    "add_batch_one_hot",
    "normalize",
    "read_cell_cycle_genes",
    "score_cell_cycle",
    "select_genes",
]

#: Old symbols in the Tirosh 2016 list and their current HGNC names (matched either way).
CELL_CYCLE_ALIASES = {"MLF1IP": "CENPU", "FAM64A": "PIMREG", "HN1": "JPT1"}
N_TIROSH_S = 43  # the 97-line list: 43 S-phase markers, then 54 G2/M markers


class InputError(ValueError):
    """Input data that cannot be analysed as given; the message says how to fix it."""


def _log(adata: ad.AnnData) -> dict[str, Any]:
    return adata.uns.setdefault("perturbnmf", {}).setdefault("preprocess", {})


def read_screen(
    path: str | Path,
    perturbation_key: str,
    control_label: str,
    batch_key: str | None = None,
    guide_key: str | None = None,
    keep_cells_key: str | None = None,
) -> ad.AnnData:
    """Read an ``.h5ad`` screen and check the columns the pipeline needs.

    Parameters
    ----------
    path
        ``.h5ad`` with raw UMI counts in ``X`` (cells × genes).
    perturbation_key, control_label
        ``obs`` column with each cell's target, and its label for control cells.
    batch_key, guide_key, keep_cells_key
        Optional ``obs`` columns: batch, guide id, and a boolean column whose ``True``
        cells are kept (e.g. ``single_guide``).

    Returns
    -------
    AnnData
        With the perturbation, batch and guide columns as strings-based categoricals.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Input file {str(path)!r} (parameter 'input') does not exist.")
    if path.suffix != ".h5ad":
        raise InputError(f"Input file {str(path)!r} (parameter 'input') must be an .h5ad file.")
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for a damaged file
        raise InputError(f"Input file {str(path)!r} could not be read as h5ad: {err}") from None
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"Input file {str(path)!r} has an empty matrix ({adata.n_obs} cells × {adata.n_vars} genes).")
    for key, name in ((perturbation_key, "perturbation_key"), (batch_key, "batch_key"),
                      (guide_key, "guide_key"), (keep_cells_key, "keep_cells_key")):
        if key is not None and key not in adata.obs:
            raise InputError(
                f"Column {key!r} (parameter {name!r}) is not in the input's obs. "
                f"Available columns: {', '.join(map(str, adata.obs.columns))}."
            )
    if adata.obs_names.has_duplicates:
        raise InputError(f"Input file {str(path)!r} has duplicate cell names; make obs_names unique.")
    if adata.var_names.has_duplicates:
        dup = adata.var_names[adata.var_names.duplicated()].unique()[:5].tolist()
        raise InputError(
            f"Input file {str(path)!r} has duplicate gene names (e.g. {dup}); call adata.var_names_make_unique()."
        )
    for key in (perturbation_key, batch_key, guide_key):
        if key is not None:
            if adata.obs[key].isna().any():
                raise InputError(f"Column {key!r} has {int(adata.obs[key].isna().sum())} missing values; label every cell.")
            adata.obs[key] = adata.obs[key].astype(str).astype("category")
    if keep_cells_key is not None:
        keep = adata.obs[keep_cells_key]
        if keep.dtype != bool:
            raise InputError(f"Column {keep_cells_key!r} (parameter 'keep_cells_key') must be boolean, got {keep.dtype}.")
        n_before = adata.n_obs
        adata = adata[keep.to_numpy()].copy()
        _log(adata)["kept_by_" + keep_cells_key] = [int(adata.n_obs), int(n_before)]
    groups = adata.obs[perturbation_key]
    if control_label not in set(groups):
        shown = ", ".join(map(str, groups.cat.categories[:20]))
        raise InputError(
            f"Control label {control_label!r} (parameter 'control_label') is not a value of column "
            f"{perturbation_key!r}. Values: {shown}{' ...' if len(groups.cat.categories) > 20 else ''}."
        )
    if groups.nunique() < 2:
        raise InputError(f"Column {perturbation_key!r} has a single group; a screen needs controls and perturbations.")
    check_counts(adata)
    return adata


def check_counts(adata: ad.AnnData) -> None:
    """Refuse matrices that are not raw counts: negative, non-integer, non-finite or logged."""
    values = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X).ravel()
    if values.size == 0:
        raise InputError("The count matrix has no non-zero entries.")
    if not np.all(np.isfinite(values)):
        raise InputError("The count matrix contains NaN or infinite values; 'input' must hold raw UMI counts.")
    if values.min() < 0:
        raise InputError("The count matrix has negative values; 'input' must hold raw UMI counts, not scaled data.")
    if not np.all(np.equal(np.mod(values, 1), 0)):
        hint = (" It looks log-transformed (max %.2g)." % values.max()) if values.max() < 30 else ""
        raise InputError(
            "The count matrix has non-integer values; 'input' must hold raw UMI counts "
            f"(put them in X, e.g. adata.X = adata.layers['counts']).{hint}"
        )


def filter_cells_and_genes(
    adata: ad.AnnData,
    mito_prefix: str = "MT-",
    min_counts_per_cell: int = 0,
    min_genes_per_cell: int = 0,
    max_pct_mito: float = 100.0,
    min_cells_per_gene: int = 3,
) -> ad.AnnData:
    """QC metrics (scanpy's, with the mitochondrial share) and the cell and gene filters.

    Adds ``obs['total_counts', 'n_genes_by_counts', 'pct_counts_mito']`` and
    ``var['mito', 'n_cells_by_counts', 'mean_counts']``. Returns a filtered copy.
    """
    adata.var["mito"] = adata.var_names.str.upper().str.startswith(mito_prefix.upper())
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mito"], percent_top=None, log1p=False, inplace=True)
    keep_cells = (
        (adata.obs["total_counts"] >= min_counts_per_cell)
        & (adata.obs["n_genes_by_counts"] >= min_genes_per_cell)
        & (adata.obs["pct_counts_mito"] <= max_pct_mito)
    ).to_numpy()
    keep_genes = (adata.var["n_cells_by_counts"] >= max(min_cells_per_gene, 1)).to_numpy()
    log = _log(adata)
    log.update(
        n_cells_input=int(adata.n_obs), n_genes_input=int(adata.n_vars),
        n_mito_genes=int(adata.var["mito"].sum()),
        n_cells_failed_qc=int((~keep_cells).sum()), n_genes_too_rare=int((~keep_genes).sum()),
    )
    if keep_cells.sum() == 0:
        raise InputError(
            "No cell passes QC (min_counts_per_cell, min_genes_per_cell, max_pct_mito); relax those parameters."
        )
    out = adata[keep_cells, keep_genes].copy()
    return out


def drop_small_groups(adata: ad.AnnData, perturbation_key: str, control_label: str, min_cells: int) -> ad.AnnData:
    """Drop perturbation groups with fewer than ``min_cells`` cells, listing them in the log."""
    counts = adata.obs[perturbation_key].value_counts()
    if counts.get(control_label, 0) < min_cells:
        raise InputError(
            f"The control group {control_label!r} has {counts.get(control_label, 0)} cells after QC, fewer than "
            f"min_cells_per_group={min_cells}; lower 'min_cells_per_group' or relax the QC filters."
        )
    small = sorted(counts.index[(counts < min_cells) & (counts > 0)].astype(str))
    _log(adata)["dropped_small_groups"] = {g: int(counts[g]) for g in small}
    if small:
        adata = adata[~adata.obs[perturbation_key].isin(small).to_numpy()].copy()
    adata.obs[perturbation_key] = adata.obs[perturbation_key].cat.remove_unused_categories()
    if adata.obs[perturbation_key].nunique() < 2:
        raise InputError(
            f"Only the control group has >= {min_cells} cells (parameter 'min_cells_per_group'); nothing to compare."
        )
    return adata


def add_batch_one_hot(adata: ad.AnnData, batch_key: str) -> list[str]:
    """Add one 0/1 ``obs`` column per batch level, named ``<batch_key>_<level>``; return their names."""
    dummies = pd.get_dummies(adata.obs[batch_key], prefix=batch_key, prefix_sep="_", dtype=np.int8)
    for column in dummies:
        adata.obs[column] = dummies[column].to_numpy()
    _log(adata)["batch_columns"] = list(dummies.columns)
    return list(dummies.columns)


def normalize(adata: ad.AnnData, target_sum: float = 1e4) -> None:
    """``layers['counts']`` (raw), then normalize_total + log1p into ``X`` and ``layers['normalized']``."""
    adata.X = adata.X.astype(np.float32) if not sp.issparse(adata.X) else sp.csr_matrix(adata.X, dtype=np.float32)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    adata.layers["normalized"] = adata.X.copy()
    _log(adata).update(normalize_target_sum=float(target_sum), transform="log1p")


def read_cell_cycle_genes(path: str | Path) -> tuple[list[str], list[str]]:
    """S and G2/M marker lists from a file.

    Two formats: the 97-line Tirosh 2016 list (one symbol per line, 43 S then 54 G2/M), or a
    tab-separated file with header ``gene<TAB>phase`` and phase ``S`` or ``G2M``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Cell-cycle marker file {str(path)!r} (parameter 'cell_cycle_genes') does not exist.")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and lines[0].lower().split("\t")[:2] == ["gene", "phase"]:
        rows = [line.split("\t") for line in lines[1:]]
        bad = [i + 2 for i, r in enumerate(rows) if len(r) != 2 or r[1] not in ("S", "G2M")]
        if bad:
            raise InputError(f"{str(path)!r}: line(s) {bad[:5]} are not 'gene<TAB>S' or 'gene<TAB>G2M'.")
        s_genes = [g for g, phase in rows if phase == "S"]
        g2m_genes = [g for g, phase in rows if phase == "G2M"]
    elif len(lines) == 97 and all("\t" not in line for line in lines):
        s_genes, g2m_genes = lines[:N_TIROSH_S], lines[N_TIROSH_S:]
    else:
        raise InputError(
            f"{str(path)!r} (parameter 'cell_cycle_genes') is neither the 97-line Tirosh list "
            "(43 S then 54 G2/M symbols) nor a 'gene<TAB>phase' table."
        )
    if not s_genes or not g2m_genes:
        raise InputError(f"{str(path)!r} must list both S and G2M markers.")
    return s_genes, g2m_genes


def _resolve_markers(markers: list[str], var_names: pd.Index) -> tuple[list[str], list[str]]:
    aliases = {**CELL_CYCLE_ALIASES, **{v: k for k, v in CELL_CYCLE_ALIASES.items()}}
    present, missing = [], []
    for gene in markers:
        if gene in var_names:
            present.append(gene)
        elif aliases.get(gene) in var_names:
            present.append(aliases[gene])
        else:
            missing.append(gene)
    return present, missing


def score_cell_cycle(adata: ad.AnnData, s_genes: list[str], g2m_genes: list[str], seed: int = 0) -> dict[str, Any]:
    """Tirosh/Seurat cell-cycle scores into ``obs['S_score', 'G2M_score', 'phase']``.

    Scores are computed on a scaled *copy* of the log-normalised data, so ``X`` is untouched.
    Returns (and logs) which markers were found and which are missing from the data.
    """
    s_present, s_missing = _resolve_markers(s_genes, adata.var_names)
    g2m_present, g2m_missing = _resolve_markers(g2m_genes, adata.var_names)
    summary = {
        "s_markers_used": s_present, "s_markers_missing": s_missing,
        "g2m_markers_used": g2m_present, "g2m_markers_missing": g2m_missing,
    }
    if len(s_present) < 2 or len(g2m_present) < 2:
        summary["skipped"] = (
            f"only {len(s_present)} S and {len(g2m_present)} G2/M markers are in the data (need >= 2 each)"
        )
        _log(adata)["cell_cycle"] = summary
        return summary
    # Scaling centres every gene, so the copy is dense (cells × genes float32) for the time of scoring.
    dense = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X, dtype=np.float32)
    scaled = ad.AnnData(dense, obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=adata.var_names))
    sc.pp.scale(scaled, max_value=10)
    sc.tl.score_genes_cell_cycle(scaled, s_genes=s_present, g2m_genes=g2m_present, random_state=seed)
    for column in ("S_score", "G2M_score", "phase"):
        adata.obs[column] = scaled.obs[column].to_numpy()
    adata.obs["phase"] = adata.obs["phase"].astype("category")
    _log(adata)["cell_cycle"] = summary
    return summary


def select_genes(
    adata: ad.AnnData,
    min_mean: float = 0.0125,
    max_mean: float = 3.0,
    min_disp: float = 0.5,
    n_top_genes: int | None = None,
    use_all_genes: bool = False,
) -> int:
    """Mark the genes to factorise in ``var['highly_variable']``; return how many.

    Dispersion-based HVGs (scanpy ``flavor='seurat'``) with the cutoffs, or the ``n_top_genes``
    most dispersed genes, or every gene with ``use_all_genes``. Mitochondrial genes are never
    selected: their share tracks cell quality, not a program.
    """
    candidates = ~adata.var["mito"].to_numpy(dtype=bool) if "mito" in adata.var else np.ones(adata.n_vars, bool)
    if use_all_genes:
        adata.var["highly_variable"] = candidates
        method = "all genes"
    else:
        table = sc.pp.highly_variable_genes(
            adata[:, candidates], flavor="seurat", min_mean=min_mean, max_mean=max_mean, min_disp=min_disp,
            n_top_genes=n_top_genes, inplace=False,
        )
        table.index = adata.var_names[candidates]
        for column in ("means", "dispersions", "dispersions_norm"):
            adata.var[column] = table[column].reindex(adata.var_names).to_numpy()
        adata.var["highly_variable"] = table["highly_variable"].reindex(adata.var_names, fill_value=False).to_numpy(bool)
        method = (f"top {n_top_genes} by dispersion" if n_top_genes
                  else f"dispersion: mean in [{min_mean}, {max_mean}], dispersion >= {min_disp}")
    n = int(adata.var["highly_variable"].sum())
    _log(adata).update(gene_selection=method, n_genes_selected=n)
    if n < 2:
        raise InputError(
            f"Gene selection ({method}) kept {n} genes; lower 'hvg_min_disp'/'hvg_min_mean', "
            "set 'hvg_n_top_genes', or set 'hvg_use_all_genes: true'."
        )
    return n
