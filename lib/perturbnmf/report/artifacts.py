"""Every file a step writes into the run's ``data/`` folder, and the reading of earlier steps' files.

The notebooks call these by name (``artifacts.save_table(anova, paths.program_anova)``), so a
step's outputs are written in one visible place; the report sections only display. Files are
written whole or not at all (h5ad through a temporary name), and later steps read what earlier
steps wrote through :func:`read_h5ad` / :func:`read_table`, which name the step to run when a
file is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import anndata as ad
import h5py
import pandas as pd
import yaml

from ..pp import read_matrix_lazily
from .runfolder import RunPaths

__all__ = ["atomic_write", "save_h5ad", "read_h5ad", "save_table", "read_table", "save_json", "save_k_selection",
           "update_recovery", "save_calibration", "write_workbook", "EXCEL_MAX_ROWS", "save_summary_workbook",
           "save_params_yaml", "SUMMARY_SHEETS"]


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(temporary_path)``, then rename it to ``path``: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.partial")
    write(tmp)
    os.replace(tmp, path)


#: HDF5 compression of the steps' h5ad files: gzip (any HDF5 reader has it, unlike lzf), level 1 — on
#: log-normalised expression 3.4× smaller than uncompressed, at ~50 MB/s per core (level 4: no smaller, slower).
H5AD_COMPRESSION = {"compression": "gzip", "compression_opts": 1}


def save_h5ad(adata: ad.AnnData, path: Path, step: str, record: dict[str, Any]) -> Path:
    """A step's AnnData, compressed, with the step's provenance in ``uns['perturbnmf']['<step>_provenance']``.

    A Dask-backed X is written chunk by chunk (AnnData computes one chunk at a time).
    """
    adata.uns.setdefault("perturbnmf", {})[f"{step}_provenance"] = json.dumps(record, default=str)
    atomic_write(Path(path), lambda tmp: adata.write_h5ad(tmp, **H5AD_COMPRESSION))
    return Path(path)


def _require(path: Path, producing_step: str) -> None:
    """An earlier step's file exists, or say which step to run first."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist: run the {producing_step} step of this run first "
                                f"(python run_all.py PARAMS.yaml --from {producing_step}).")


def read_h5ad(path: Path, producing_step: str, matrix: bool | str = True) -> ad.AnnData:
    """Read the artifact of an earlier step, or say which step to run first.

    ``matrix=False`` leaves the expression matrix (``X``, ``layers``) on disk: the AnnData has
    ``X = None`` and everything else (``obs``, ``var``, ``obsm``, ``varm``, ``uns``) — for the steps
    that only need the usage and the programs, whatever the number of cells. ``matrix="lazy"``: the
    same with ``X`` a Dask array chunked by cells (:func:`perturbnmf.pp.read_matrix_lazily`), read
    chunk by chunk as a computation needs it — for a matrix larger than memory.
    """
    _require(path, producing_step)
    if matrix is True:
        return ad.read_h5ad(path)
    with h5py.File(path, "r") as file:
        parts = {key: ad.io.read_elem(file[key]) for key in ("obs", "var", "obsm", "varm", "uns") if key in file}
    return ad.AnnData(X=read_matrix_lazily(path) if matrix == "lazy" else None, **parts)


def save_table(frame: pd.DataFrame, path: Path) -> Path:
    """A table as CSV (no index: every column is named)."""
    frame.to_csv(path, index=False)
    return Path(path)


def read_table(path: Path, producing_step: str) -> pd.DataFrame:
    """A CSV table of an earlier step, or say which step to run first."""
    _require(path, producing_step)
    return pd.read_csv(path, low_memory=False)  # a column empty on most rows (role) is read as one type


def save_json(mapping: dict[str, Any], path: Path) -> Path:
    Path(path).write_text(json.dumps(mapping, indent=2))
    return Path(path)


#: The keys of ``uns['snmf']`` that the index page shows (k_selection.json).
K_SELECTION_KEYS = ("model", "k", "suggested_k", "k_rule", "k_source", "relative_error", "holdout_relative_error",
                    "stability")


def save_k_selection(adata: ad.AnnData, paths: RunPaths) -> Path:
    """k_selection.json: the kept and suggested k, the rule and the fit of the kept model."""
    return save_json({key: adata.uns["snmf"][key] for key in K_SELECTION_KEYS}, paths.k_selection_json)


def update_recovery(paths: RunPaths, values: dict[str, Any]) -> Path:
    """Add ``values`` to demo_recovery.json (steps 2 and 3 each add their part of the truth check)."""
    record = json.loads(paths.recovery_json.read_text()) if paths.recovery_json.exists() else {}
    record.update(values)
    return save_json(record, paths.recovery_json)


def save_calibration(null: pd.DataFrame, summary: dict[str, Any], paths: RunPaths) -> None:
    """calibration_null.csv (every null test) and calibration.json (its summary)."""
    save_table(null, paths.calibration_null)
    save_json(summary, paths.calibration_json)


#: Rows of an Excel sheet, the header included (Excel's limit).
EXCEL_MAX_ROWS = 1_048_576


def _sheets(name: str, frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """A table as one sheet, or, when longer than Excel allows, as consecutive sheets "name (1)", "name (2)", …
    (names cut to Excel's 31 characters)."""
    rows = EXCEL_MAX_ROWS - 1
    if len(frame) <= rows:
        return [(name[:31], frame)]
    parts = range(0, len(frame), rows)
    return [(f"{name[:31 - len(f' ({i})')]} ({i})", frame.iloc[start:start + rows])
            for i, start in enumerate(parts, 1)]


def write_workbook(path: str | Path, sheets: dict[str, pd.DataFrame]) -> Path:
    """One Excel workbook, a sheet per table; a table longer than Excel's row limit continues on numbered
    sheets, so no row is lost (every table is also a CSV in data/)."""
    path = Path(path)
    with pd.ExcelWriter(path, engine="openpyxl") as writer:
        for name, frame in sheets.items():
            for sheet, part in _sheets(name, frame):
                part.to_excel(writer, sheet_name=sheet, index=False)
    return path


#: summary.xlsx: sheet name -> the run file it holds (the answer first, then the original analysis's sheets).
SUMMARY_SHEETS = {
    "Perturbation Hits": "perturbation_hits", "Perturbations": "perturbation_summary", "Program Labels": "program_labels", "W_ANOVA": "program_anova",
    "Significant Factors": "program_anova", "Pathway Enrichment": "enrichment", "Top Pathways": "top_terms",
    "Program Contrasts": "program_contrasts", "Guide Effects": "guide_effects", "Prerank": "prerank",
    "Top Genes": "top_genes",
}


def save_summary_workbook(paths: RunPaths, fdr: float) -> Path:
    """summary.xlsx: every table of the run that exists, a sheet each; "Significant Factors" are the
    programs whose ANOVA q < ``fdr``."""
    tables = {field: pd.read_csv(getattr(paths, field), low_memory=False)  # role: one type, no DtypeWarning
              for field in dict.fromkeys(SUMMARY_SHEETS.values()) if getattr(paths, field).exists()}
    sheets = {}
    for name, field in SUMMARY_SHEETS.items():
        if field in tables:
            frame = tables[field]
            sheets[name] = frame[frame["qvalue"] < fdr] if name == "Significant Factors" else frame
    return write_workbook(paths.summary_xlsx, sheets)


def save_params_yaml(path: Path, values: dict[str, Any]) -> Path:
    """The run's validated parameters (defaults filled in), ready to rerun."""
    Path(path).write_text("# The parameters of this run, as validated (defaults filled in).\n"
                          "# Rerun it with: python run_all.py <this file>\n"
                          + yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return Path(path)
