"""Step 1: read a screen, check it, QC, normalise, score the cell cycle, pick genes.

Every function takes and returns an :class:`~anndata.AnnData` (scanpy's ``pp`` style) and
records what it did in ``adata.uns['perturbnmf']['preprocess']`` so the report can show it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from .errors import InputError, InsufficientMemoryError

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
    "available_memory",
    "check_dense_fits",
    "dense_bytes",
    "format_bytes",
    "MAX_MEMORY_ENV",
]

#: Old symbols in the Tirosh 2016 list and their current HGNC names (matched either way).
CELL_CYCLE_ALIASES = {"MLF1IP": "CENPU", "FAM64A": "PIMREG", "HN1": "JPT1"}
N_TIROSH_S = 43  # the 97-line list: 43 S-phase markers, then 54 G2/M markers


def _log(adata: ad.AnnData) -> dict[str, Any]:
    return adata.uns.setdefault("perturbnmf", {}).setdefault("preprocess", {})


#: How to turn other common single-cell formats into an .h5ad (by file suffix).
_CONVERSIONS = {
    ".h5": "a 10x .h5 file: adata = sc.read_10x_h5(path), add the obs columns, then adata.write_h5ad('screen.h5ad')",
    ".mtx": "a Matrix Market file: adata = sc.read_10x_mtx(folder) (or sc.read_mtx), then adata.write_h5ad('screen.h5ad')",
    ".loom": "a loom file: adata = sc.read_loom(path), then adata.write_h5ad('screen.h5ad')",
    ".csv": "a table: adata = sc.read_csv(path) (cells as rows), then adata.write_h5ad('screen.h5ad')",
    ".tsv": "a table: adata = sc.read_text(path) (cells as rows), then adata.write_h5ad('screen.h5ad')",
    ".txt": "a table: adata = sc.read_text(path) (cells as rows), then adata.write_h5ad('screen.h5ad')",
    ".rds": "an R object: convert it in R (e.g. zellkonverter::writeH5AD or SeuratDisk::Convert) to .h5ad",
    ".zarr": "a zarr store: adata = anndata.read_zarr(path), then adata.write_h5ad('screen.h5ad')",
}


def _closest(name: str, options) -> str:
    """`` Did you mean 'x'?`` for the closest option (case-insensitive), or an empty string."""
    import difflib

    options = [str(o) for o in options]
    lowered = {o.lower(): o for o in options}
    match = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.6)
    return f" Did you mean {lowered[match[0]]!r}?" if match else ""


def _listing(values, limit: int = 20) -> str:
    values = [str(v) for v in values]
    return ", ".join(values[:limit]) + (f" ... ({len(values)} in all)" if len(values) > limit else "")


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

    Raises
    ------
    InputError
        Before any computation, for a file that is missing, not an ``.h5ad`` or unreadable;
        an empty matrix; a missing column; duplicate cell or gene names; unlabelled cells;
        a control label that is absent; a single group; and counts that are not raw
        (see :func:`check_counts`). Each message names the file, parameter or column and the fix.
    """
    path = Path(path)
    adata = _read_h5ad(path)
    _check_obs_columns(adata, path, perturbation_key=perturbation_key, batch_key=batch_key, guide_key=guide_key,
                       keep_cells_key=keep_cells_key)
    _check_unique_names(adata, path)
    _labels_as_categories(adata, perturbation_key=perturbation_key, batch_key=batch_key, guide_key=guide_key)
    if keep_cells_key is not None:
        adata = _keep_flagged_cells(adata, keep_cells_key)
    _check_groups(adata, perturbation_key, control_label)
    check_counts(adata, source=str(path))
    return adata


def _where(path: Path) -> str:
    """How messages about the input file name it."""
    return f"Input file {str(path)!r} (parameter 'input')"


def _read_h5ad(path: Path) -> ad.AnnData:
    """The AnnData of an existing, readable ``.h5ad`` file with a non-empty X, or an InputError that says why not."""
    where = _where(path)
    if path.is_dir():
        raise InputError(f"{where} is a folder, not a file; give the path of the .h5ad file itself.")
    if not path.is_file():
        raise InputError(f"{where} does not exist; check the path (relative paths are relative to the repository).")
    if path.suffix.lower() != ".h5ad":
        how = _CONVERSIONS.get(path.suffix.lower())
        raise InputError(
            f"{where} is not an .h5ad file" + (f"; it looks like {how}." if how else
                                               "; convert it to AnnData and save it with adata.write_h5ad('screen.h5ad').")
        )
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for a damaged file
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise InputError(
            f"{where} could not be read as h5ad ({reason}). Is it complete (an interrupted copy or download) "
            "and readable? Re-write it with adata.write_h5ad() and try again."
        ) from None
    if adata.X is None:
        layers = list(adata.layers)
        raise InputError(
            f"{where} has no X matrix; put the raw UMI counts in X"
            + (f" (e.g. adata.X = adata.layers[{layers[0]!r}]; layers: {', '.join(layers)})." if layers else ".")
        )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(
            f"{where} has an empty matrix ({adata.n_obs} cells × {adata.n_vars} genes); "
            "it must hold cells as rows and genes as columns with their raw counts."
        )
    return adata


def _check_obs_columns(adata: ad.AnnData, path: Path, **keys: str | None) -> None:
    """Every given column (parameter name -> obs column, None when not used) is in ``obs``."""
    for name, key in keys.items():
        if key is not None and key not in adata.obs:
            optional = "" if name == "perturbation_key" else f", or set '{name}: null' if there is none"
            raise InputError(
                f"Column {key!r} (parameter {name!r}) is not in the obs of {str(path)!r}.{_closest(key, adata.obs)} "
                f"Available columns: {_listing(adata.obs.columns) or 'none'}. Set {name!r} to one of them{optional}."
            )


def _check_unique_names(adata: ad.AnnData, path: Path) -> None:
    """Cell and gene names are unique: later steps index by name."""
    if adata.obs_names.has_duplicates:
        dup = adata.obs_names[adata.obs_names.duplicated()].unique()[:5].tolist()
        raise InputError(
            f"{_where(path)} has duplicate cell names (e.g. {dup}); make them unique with "
            "adata.obs_names_make_unique() (cells pooled from several lanes often need a lane prefix)."
        )
    if adata.var_names.has_duplicates:
        dup = adata.var_names[adata.var_names.duplicated()].unique()[:5].tolist()
        raise InputError(
            f"{_where(path)} has duplicate gene names (e.g. {dup}); call adata.var_names_make_unique() "
            "or sum the duplicated genes' counts."
        )


def _labels_as_categories(adata: ad.AnnData, **keys: str | None) -> None:
    """Each given label column (parameter name -> obs column), complete, as a categorical of strings, in place."""
    for name, key in keys.items():
        if key is not None:
            missing = int(adata.obs[key].isna().sum())
            if missing:
                raise InputError(
                    f"Column {key!r} (parameter {name!r}) has {missing} missing values; label every cell "
                    + ("(or remove the unlabelled cells, e.g. with 'keep_cells_key')." if name == "perturbation_key"
                       else "or set the parameter to null.")
                )
            adata.obs[key] = adata.obs[key].astype(str).astype("category")


def _keep_flagged_cells(adata: ad.AnnData, keep_cells_key: str) -> ad.AnnData:
    """A copy with the cells whose boolean ``obs[keep_cells_key]`` is True; the counts go to the log."""
    keep = adata.obs[keep_cells_key]
    if keep.dtype != bool:
        raise InputError(
            f"Column {keep_cells_key!r} (parameter 'keep_cells_key') must be boolean (True for the cells to "
            f"analyse), got {keep.dtype} (values e.g. {_listing(pd.unique(keep)[:5])}); convert it, e.g. "
            f"adata.obs[{keep_cells_key!r}] = adata.obs[{keep_cells_key!r}] == 'True'."
        )
    if not keep.any():
        raise InputError(
            f"Column {keep_cells_key!r} (parameter 'keep_cells_key') is False for every cell: no cell is left; "
            "check the column or set 'keep_cells_key: null'."
        )
    n_before = adata.n_obs
    adata = adata[keep.to_numpy()].copy()
    _log(adata)["kept_by_" + keep_cells_key] = [int(adata.n_obs), int(n_before)]
    return adata


def _check_groups(adata: ad.AnnData, perturbation_key: str, control_label: str) -> None:
    """Drop unused perturbation categories (in place); the control group and at least one other must be left."""
    groups = adata.obs[perturbation_key].cat.remove_unused_categories()
    adata.obs[perturbation_key] = groups
    if control_label not in set(groups):
        raise InputError(
            f"Control label {control_label!r} (parameter 'control_label') is not a value of column "
            f"{perturbation_key!r} (parameter 'perturbation_key').{_closest(control_label, groups.cat.categories)} "
            f"Values (cells): {_listing(f'{g} ({n})' for g, n in groups.value_counts().items())}. "
            "Set 'control_label' to the label of the "
            "non-targeting control cells."
        )
    if groups.nunique() < 2:
        raise InputError(
            f"Column {perturbation_key!r} (parameter 'perturbation_key') has a single group ({control_label!r}); "
            "a screen needs control and perturbed cells. Is it the column with each cell's target?"
        )


#: Values are checked in blocks of this many, so the check needs little memory beyond X.
_BLOCK = 1 << 22


def _value_blocks(X):
    if sp.issparse(X):
        data = X.data
        for start in range(0, data.size, _BLOCK):
            yield data[start:start + _BLOCK]
        return
    X = np.asarray(X)
    rows = max(1, _BLOCK // max(1, X.shape[1]))
    for start in range(0, X.shape[0], rows):
        yield np.asarray(X[start:start + rows]).ravel()


def _raw_counts_hint(adata: ad.AnnData) -> str:
    if "counts" in adata.layers:
        return " layers['counts'] exists: put it in X (adata.X = adata.layers['counts']) and save the file again."
    if adata.raw is not None:
        return " adata.raw exists: if it holds the raw counts, use adata = adata.raw.to_adata() and save the file again."
    return " Put the raw UMI counts in X (scanpy's normalize_total/log1p run inside the pipeline)."


def check_counts(adata: ad.AnnData, source: str | None = None) -> None:
    """Refuse matrices that are not raw counts: negative, non-integer, non-finite, logged or normalised.

    The check runs over ``X`` in blocks (no copy of the whole matrix) and raises
    :class:`InputError` naming the file (``source``) and the fix: which layer holds the
    raw counts when one does.
    """
    where = f"The count matrix X of {source!r} (parameter 'input')" if source else "The count matrix X"
    X = adata.X
    if X is None:
        raise InputError(f"{where} is missing; put the raw UMI counts in X.")
    dtype = X.dtype
    if not (np.issubdtype(dtype, np.number) or dtype == bool):
        raise InputError(f"{where} has non-numeric type {dtype}; it must hold raw UMI counts.")
    scan = _scan_values(X, integer=np.issubdtype(dtype, np.integer) or dtype == bool)
    if scan.n_non_finite:
        raise InputError(
            f"{where} contains {scan.n_non_finite} NaN or infinite values; it must hold raw UMI counts "
            "(whole numbers >= 0)." + _raw_counts_hint(adata)
        )
    if scan.n_nonzero == 0:
        raise InputError(f"{where} has no non-zero entries: every count is 0. Is X the right matrix?"
                         + _raw_counts_hint(adata))
    if scan.minimum < 0:
        raise InputError(
            f"{where} has negative values (minimum {float(scan.minimum):.3g}): it looks scaled or centred "
            "(e.g. sc.pp.scale), but it must hold raw UMI counts." + _raw_counts_hint(adata)
        )
    if scan.n_fractional:
        raise InputError(
            f"{where} has non-integer values where raw UMI counts are expected.{_non_integer_diagnosis(adata, scan)}"
            + _raw_counts_hint(adata)
        )


class _ValueScan(NamedTuple):
    """What one pass over the values of X found (non-finite values are left out of the others)."""

    n_nonzero: int
    minimum: float
    maximum: float
    n_non_finite: int
    n_fractional: int
    fractional_example: float | None


def _scan_values(X, integer: bool) -> _ValueScan:
    """Count and range of X's values, block by block; an integer X skips the finiteness and fraction tests."""
    n_nonzero, minimum, maximum, n_non_finite, n_fractional, example = 0, 0, 0, 0, 0, None
    for block in _value_blocks(X):
        if block.size == 0:
            continue
        if not integer:
            finite = np.isfinite(block)
            if not finite.all():
                n_non_finite += int(block.size - finite.sum())
                block = block[finite]
                if block.size == 0:
                    continue
            whole = block == np.floor(block)
            if not whole.all():
                n_fractional += int(block.size - whole.sum())
                if example is None:
                    example = float(block[~whole][0])
        n_nonzero += int(np.count_nonzero(block))
        minimum = min(minimum, block.min())
        maximum = max(maximum, block.max())
    return _ValueScan(n_nonzero, minimum, maximum, n_non_finite, n_fractional, example)


def _non_integer_diagnosis(adata: ad.AnnData, scan: _ValueScan) -> str:
    """Why X has fractions, as far as it shows: logged (scanpy's mark or small values), normalised, or neither."""
    if "log1p" in adata.uns:
        return " It is already log-transformed (uns['log1p'] is set by scanpy's log1p)."
    if scan.maximum < 30:
        return (f" It looks already log-transformed: the largest value is {float(scan.maximum):.3g}, "
                "while raw UMI counts are whole numbers that reach the hundreds.")
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    totals = totals[totals > 0]
    if totals.size and np.ptp(totals) <= 1e-3 * totals.mean():
        return f" It looks already normalised: every cell sums to {float(totals.mean()):.6g} (normalize_total)."
    return (f" {scan.n_fractional} values are fractional (e.g. {scan.fractional_example:.4g}); if these are "
            "ambient-corrected counts, round them to whole numbers first.")


def filter_cells_and_genes(
    adata: ad.AnnData,
    mito_prefix: str = "MT-",
    min_counts_per_cell: int = 0,
    min_genes_per_cell: int = 0,
    max_pct_mito: float = 100.0,
    min_cells_per_gene: int = 3,
) -> ad.AnnData:
    """QC metrics (scanpy's, with the mitochondrial share) and the cell and gene filters.

    Cells are filtered first; genes are then counted on the kept cells, so a gene seen only in
    dropped cells (all zero, zero variance) is dropped too, and so is a cell left without counts.
    Adds ``obs['total_counts', 'n_genes_by_counts', 'pct_counts_mito']`` and
    ``var['mito', 'n_cells_by_counts', 'mean_counts']`` (genes' metrics over the kept cells).
    Returns a filtered copy.
    """
    adata.var["mito"] = adata.var_names.str.upper().str.startswith(mito_prefix.upper())
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mito"], percent_top=None, log1p=False, inplace=True)
    keep_cells = (
        (adata.obs["total_counts"] >= min_counts_per_cell)
        & (adata.obs["n_genes_by_counts"] >= min_genes_per_cell)
        & (adata.obs["pct_counts_mito"] <= max_pct_mito)
    ).to_numpy()
    log = _log(adata)
    log.update(n_cells_input=int(adata.n_obs), n_genes_input=int(adata.n_vars),
               n_mito_genes=int(adata.var["mito"].sum()), n_cells_failed_qc=int((~keep_cells).sum()))
    if keep_cells.sum() == 0:
        raise InputError(
            f"No cell passes QC (min_counts_per_cell={min_counts_per_cell}, min_genes_per_cell={min_genes_per_cell}, "
            f"max_pct_mito={max_pct_mito}; median per cell: {adata.obs['total_counts'].median():.0f} UMIs, "
            f"{adata.obs['n_genes_by_counts'].median():.0f} genes, {adata.obs['pct_counts_mito'].median():.1f}% "
            "mitochondrial); relax those parameters."
        )
    out = adata[keep_cells].copy()
    if not keep_cells.all():  # the genes' metrics over the kept cells (the cells' own metrics do not change)
        sc.pp.calculate_qc_metrics(out, qc_vars=["mito"], percent_top=None, log1p=False, inplace=True)
    keep_genes = (out.var["n_cells_by_counts"] >= max(min_cells_per_gene, 1)).to_numpy()
    if not keep_genes.any():
        raise InputError(
            f"No gene is detected in >= {max(min_cells_per_gene, 1)} of the {out.n_obs} cells that pass QC "
            "(parameter 'min_cells_per_gene'); lower it or relax the cell QC filters."
        )
    out = out[:, keep_genes].copy()
    has_counts = np.asarray(out.X.sum(axis=1)).ravel() > 0
    if not has_counts.all():
        out = out[has_counts].copy()
    _log(out).update(n_genes_too_rare=int((~keep_genes).sum()), n_cells_without_counts=int((~has_counts).sum()))
    return out


def drop_small_groups(adata: ad.AnnData, perturbation_key: str, control_label: str, min_cells: int) -> ad.AnnData:
    """Drop perturbation groups with fewer than ``min_cells`` cells, listing them in the log.

    The dropped groups and their sizes go to ``uns['perturbnmf']['preprocess']['dropped_small_groups']``
    (the report shows them as a warning). Raises :class:`InputError` when the control group is
    too small or when fewer than two groups (control and one perturbation) are left.
    """
    counts = adata.obs[perturbation_key].value_counts()
    if counts.get(control_label, 0) < min_cells:
        raise InputError(
            f"The control group {control_label!r} (parameter 'control_label') has {counts.get(control_label, 0)} "
            f"cells after QC, fewer than min_cells_per_group={min_cells}; lower 'min_cells_per_group' or relax "
            "the QC filters."
        )
    small = sorted(counts.index[(counts < min_cells) & (counts > 0)].astype(str))
    dropped = {g: int(counts[g]) for g in small}
    _log(adata)["dropped_small_groups"] = dropped
    if small:
        adata = adata[~adata.obs[perturbation_key].isin(small).to_numpy()].copy()
    adata.obs[perturbation_key] = adata.obs[perturbation_key].cat.remove_unused_categories()
    if adata.obs[perturbation_key].nunique() < 2:
        listed = ", ".join(f"{g} ({n})" for g, n in list(dropped.items())[:20])
        raise InputError(
            f"Only the control group has >= {min_cells} cells (parameter 'min_cells_per_group'), so nothing is "
            f"left to compare; the perturbation groups below it (cells) are: {listed or 'none'}. "
            "Lower 'min_cells_per_group' or relax the QC filters."
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
    check_dense_fits(adata.n_obs, adata.n_vars, adata.X.dtype if sp.issparse(adata.X) else np.float32,
                     "cell-cycle scoring (a scaled dense copy of the data)", "set cell_cycle_genes: null to skip "
                     "scoring, or analyse fewer cells or genes (keep_cells_key, QC thresholds)", copies=2)
    dense = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X, dtype=np.float32)
    scaled = ad.AnnData(dense, obs=pd.DataFrame(index=adata.obs_names), var=pd.DataFrame(index=adata.var_names))
    sc.pp.scale(scaled, max_value=10)
    sc.tl.score_genes_cell_cycle(scaled, s_genes=s_present, g2m_genes=g2m_present, random_state=seed)
    for column in ("S_score", "G2M_score", "phase"):
        adata.obs[column] = scaled.obs[column].to_numpy()
    adata.obs["phase"] = adata.obs["phase"].astype("category")
    _log(adata)["cell_cycle"] = summary
    return summary


def _column_extreme(X, which: str) -> np.ndarray:
    value = getattr(X, which)(axis=0)
    return np.asarray(value.toarray() if sp.issparse(value) else value).ravel()


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
    selected: their share tracks cell quality, not a program; nor are genes with zero
    variance in ``X`` (the same value in every cell carries no program).
    """
    candidates = ~adata.var["mito"].to_numpy(dtype=bool) if "mito" in adata.var else np.ones(adata.n_vars, bool)
    constant = _column_extreme(adata.X, "max") == _column_extreme(adata.X, "min")
    _log(adata)["n_genes_zero_variance"] = int((constant & candidates).sum())
    candidates &= ~constant
    if not candidates.any():
        raise InputError(
            "Every gene left after QC has zero variance (the same value in every cell) or is mitochondrial "
            "(parameter 'mito_prefix'): nothing to factorise. Check that X holds each cell's counts."
        )
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
            f"Gene selection ({method}) kept {n} genes (of {int(candidates.sum())} non-mitochondrial genes with "
            "non-zero variance); lower 'hvg_min_disp'/'hvg_min_mean', set 'hvg_n_top_genes', or set "
            "'hvg_use_all_genes: true'."
        )
    return n


# --- memory guards ---------------------------------------------------------------------
# Memory checks before a large dense array is made.
#
# Sparse count matrices stay sparse through the pipeline; where a step must make a dense
# copy (for example the scaled copy that cell-cycle scoring needs), it first calls
# :func:`check_dense_fits`, which estimates the array's size and refuses, naming the
# parameter to change, when it would not fit in the memory available now.
#
# The memory available is the smallest of: the operating system's estimate
# (``psutil.virtual_memory().available`` when psutil is installed, else ``MemAvailable`` in
# ``/proc/meminfo``), the room left under a cgroup (container) memory limit, and the
# environment variable ``PERTURBNMF_MAX_MEMORY`` (bytes, or with a suffix: ``512M``, ``8G``),
# which caps what the pipeline may assume on a shared machine.

#: Environment variable capping the memory the pipeline assumes it may use.
MAX_MEMORY_ENV = "PERTURBNMF_MAX_MEMORY"

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def format_bytes(n: float) -> str:
    """``1.5 GiB``-style size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"{MAX_MEMORY_ENV}={text!r} is not a size such as 2000000000, 512M or 8G.")
    return int(float(match[1]) * _UNITS[match[2]])


def _system_available() -> int | None:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes left under the cgroup v2 (or v1) memory limit of this process, if there is one."""
    candidates = [
        (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
        (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes")),
    ]
    for limit_file, usage_file in candidates:
        try:
            limit_text = limit_file.read_text().strip()
            if limit_text == "max":
                return None
            limit, usage = int(limit_text), int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # cgroup v1 reports "unlimited" as a huge number
            return None
        return max(limit - usage, 0)
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate, as far as can be told; ``None`` when unknown."""
    sizes = [size for size in (_system_available(), _cgroup_room()) if size is not None]
    cap = os.environ.get(MAX_MEMORY_ENV)
    if cap:
        sizes.append(_parse_size(cap))
    return min(sizes) if sizes else None


def dense_bytes(n_rows: int, n_cols: int, dtype, copies: int = 1) -> int:
    """Bytes of ``copies`` dense ``n_rows × n_cols`` arrays of ``dtype``."""
    return int(n_rows) * int(n_cols) * np.dtype(dtype).itemsize * int(copies)


def check_dense_fits(n_rows: int, n_cols: int, dtype, what: str, parameter_hint: str, copies: int = 1) -> int:
    """Refuse to densify when the result would not fit in the available memory.

    Parameters
    ----------
    n_rows, n_cols, dtype
        Shape and type of the dense array about to be made.
    what
        What the array is for, e.g. ``"cell-cycle scoring (a scaled dense copy of the data)"``.
    parameter_hint
        The parameter(s) to change, e.g. ``"set cell_cycle_genes: null to skip scoring"``.
    copies
        How many arrays of that size exist at the peak (the copy and its temporaries).

    Returns
    -------
    int
        The estimated bytes.

    Raises
    ------
    InsufficientMemoryError
        When the estimate exceeds :func:`available_memory`.
    """
    need = dense_bytes(n_rows, n_cols, dtype, copies)
    available = available_memory()
    if available is not None and need > available:
        cap = os.environ.get(MAX_MEMORY_ENV)
        capped = f" (capped by {MAX_MEMORY_ENV}={cap})" if cap else ""
        raise InsufficientMemoryError(
            f"Not enough memory for {what}: it needs a dense {n_rows:,} × {n_cols:,} {np.dtype(dtype).name} array"
            + (f" ({copies} copies at the peak)" if copies > 1 else "")
            + f", about {format_bytes(need)}, but only {format_bytes(available)} is available{capped}. "
            f"To fix it: {parameter_hint}."
        )
    return need
