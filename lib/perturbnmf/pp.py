"""Step 1: read a screen, check it, QC, normalise, score the cell cycle, pick genes.

Every function takes and returns an :class:`~anndata.AnnData` (scanpy's ``pp`` style) and
records what it did in ``adata.uns['perturbnmf']['preprocess']`` so the report can show it.

Memory follows the chunk, not the matrix. :func:`read_screen` reads ``obs``/``var`` and
``uns`` but leaves the counts on disk: ``X`` is a Dask array of cells × genes, chunked by
cells (CSR chunks). The steps either transform it lazily (scanpy's Dask-aware
``normalize_total``, ``log1p`` and ``highly_variable_genes``) or compute what they need in one
pass over the chunks (:func:`_per_chunk`: per-cell or per-gene sums come back, never the
matrix), on whatever Dask scheduler is active (threads in this process, or the
``dask.distributed`` client the notebook connected). Every function also accepts an in-memory
AnnData (treated as one chunk). No copy of the counts is kept (they stay in the input file,
which the log records); the output of the step (:func:`keep_selected_genes`) holds the
log-normalised expression of the selected genes only.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, NamedTuple

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from .decomposition._parallel import active_client
from .errors import InputError, InsufficientMemoryError

#: Progress of the passes over the chunks goes to this logger at level INFO (run_all.py echoes it).
LOG = logging.getLogger("perturbnmf")

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
    "keep_selected_genes",
    "GENE_TABLE_COLUMNS",
    "auto_chunk_cells",
    "available_memory",
    "check_dense_fits",
    "check_sparse_fits",
    "check_stored_matrix_fits",
    "preprocessed_fits",
    "read_matrix_lazily",
    "dense_bytes",
    "sparse_bytes",
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
    chunk_cells: int | None = None,
) -> ad.AnnData:
    """Read a screen (``.h5ad`` file or ``.zarr`` folder) lazily and check the columns the pipeline needs.

    ``obs``, ``var``, ``uns``, ``obsm`` and ``varm`` are read into memory; ``X`` stays on disk
    as a Dask array chunked by cells (CSR chunks), read chunk by chunk by the later steps.
    Other layers and ``raw`` are not read (the report names them when X is not raw counts).

    Parameters
    ----------
    path
        ``.h5ad`` file or ``.zarr`` folder with raw UMI counts in ``X`` (cells × genes).
    perturbation_key, control_label
        ``obs`` column with each cell's target, and its label for control cells.
    batch_key, guide_key, keep_cells_key
        Optional ``obs`` columns: batch, guide id, and a boolean column whose ``True``
        cells are kept (e.g. ``single_guide``).
    chunk_cells
        Cells per chunk; ``None`` chooses it from the matrix (:func:`auto_chunk_cells`: about
        :data:`TARGET_CHUNK_BYTES` of stored counts per chunk, so a small screen is one chunk).

    Returns
    -------
    AnnData
        With a lazy ``X``, the perturbation, batch and guide columns as strings-based
        categoricals, and the input file (path, size, modification time) recorded in
        ``uns['perturbnmf']['preprocess']['input']``: the raw counts stay there.

    Raises
    ------
    InputError
        Before any computation, for a file that is missing, not an ``.h5ad`` or unreadable;
        an empty matrix; a missing column; duplicate cell or gene names; unlabelled cells;
        a control label that is absent; a single group; and counts that are not raw
        (see :func:`check_counts`, which scans the values chunk by chunk). Each message
        names the file, parameter or column and the fix.
    InsufficientMemoryError
        When not even a chunk of cells fits in the available memory.
    """
    path = Path(path)
    adata = _read_h5ad(path, chunk_cells)
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


def _is_zarr(path: Path) -> bool:
    return path.suffix.lower() == ".zarr"


def _check_input_path(path: Path) -> None:
    """An existing ``.h5ad`` file or ``.zarr`` folder, or an InputError that says what it is instead."""
    where = _where(path)
    if path.is_dir() and not _is_zarr(path):
        raise InputError(f"{where} is a folder, not a file; give the path of the .h5ad file itself.")
    if not path.exists():
        raise InputError(f"{where} does not exist; check the path (relative paths are relative to the repository).")
    if path.suffix.lower() not in (".h5ad", ".zarr"):
        how = _CONVERSIONS.get(path.suffix.lower())
        raise InputError(
            f"{where} is not an .h5ad file" + (f"; it looks like {how}." if how else
                                               "; convert it to AnnData and save it with adata.write_h5ad('screen.h5ad').")
        )


def _read_h5ad(path: Path, chunk_cells: int | None = None) -> ad.AnnData:
    """The AnnData (lazy X) of an existing, readable ``.h5ad``/``.zarr`` with a non-empty X, or an InputError
    that says why not."""
    _check_input_path(path)
    where = _where(path)
    try:
        adata = _read_store(path, chunk_cells)
    except (InputError, InsufficientMemoryError):
        raise
    except Exception as err:  # h5py/zarr/anndata raise many types for a damaged file
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise InputError(
            f"{where} could not be read as {'zarr' if _is_zarr(path) else 'h5ad'} ({reason}). Is it complete (an "
            "interrupted copy or download) and readable? Re-write it with adata.write_h5ad() and try again."
        ) from None
    if adata.X is None:
        layers = list(_input_record(adata).get("layers", []))
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


def _open_store(path: Path):
    """The root group of an ``.h5ad`` file (h5py) or a ``.zarr`` folder (zarr), read-only."""
    if _is_zarr(path):
        import zarr

        return zarr.open_group(str(path), mode="r")
    import h5py

    return h5py.File(path, "r")


def _read_store(path: Path, chunk_cells: int | None) -> ad.AnnData:
    """obs, var, uns, obsm, varm into memory, X as a lazy Dask array; the input recorded in the log."""
    store = _open_store(path)
    try:
        parts = {key: ad.io.read_elem(store[key]) for key in ("obs", "var", "uns", "obsm", "varm") if key in store}
        X, per_cell = None, None
        if "X" in store:
            (n_cells, _), nbytes, _ = _stored_shape_and_bytes(store["X"])
            X, per_cell = _lazy_matrix(store["X"], chunk_cells), nbytes / max(n_cells, 1)
        layers = list(store["layers"].keys()) if "layers" in store else []
        has_raw = "raw" in store and "X" in store["raw"]
    finally:
        if not _is_zarr(path):
            store.close()
    adata = ad.AnnData(X=X, **parts)
    lazy = isinstance(X, da.Array)
    _log(adata)["input"] = {**_file_record(path), "layers": layers, "raw": bool(has_raw), "bytes_per_cell": per_cell,
                            "chunk_cells": int(X.chunks[0][0]) if lazy else None,
                            "n_chunks": int(X.numblocks[0]) if lazy else None}
    return adata


def _file_record(path: Path) -> dict[str, Any]:
    """Where the raw counts are: the input's absolute path, size in bytes and modification time (UTC)."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    mtime = max(p.stat().st_mtime for p in files) if files else path.stat().st_mtime
    return {"path": str(path.resolve()), "bytes": int(sum(p.stat().st_size for p in files)),
            "mtime": datetime.fromtimestamp(mtime, timezone.utc).isoformat(timespec="seconds"), "matrix": "X"}


def _input_record(adata: ad.AnnData) -> dict[str, Any]:
    """What :func:`read_screen` recorded about the input file (empty for an AnnData made in memory)."""
    return adata.uns.get("perturbnmf", {}).get("preprocess", {}).get("input", {})


def _stored_shape_and_bytes(elem) -> tuple[tuple[int, int], int, str]:
    """Shape, stored bytes (values and indices, uncompressed) and encoding of an X group or dataset."""
    encoding = elem.attrs.get("encoding-type", "array")
    if encoding in ("csr_matrix", "csc_matrix"):
        shape = tuple(int(n) for n in elem.attrs["shape"])
        nbytes = sum(int(np.prod(elem[k].shape)) * elem[k].dtype.itemsize for k in ("data", "indices", "indptr"))
        return shape, nbytes, encoding
    shape = tuple(int(n) for n in elem.shape)
    return shape, int(np.prod(shape)) * elem.dtype.itemsize, encoding


def _lazy_matrix(elem, chunk_cells: int | None):
    """X as a Dask array chunked by cells (CSR chunks for sparse X); an empty X in memory."""
    (n_cells, n_genes), nbytes, encoding = _stored_shape_and_bytes(elem)
    if n_cells == 0 or n_genes == 0:
        return sp.csr_matrix((n_cells, n_genes), dtype=np.float32)
    rows = auto_chunk_cells(n_cells, nbytes / n_cells, chunk_cells)
    if encoding == "csc_matrix":  # stored by genes: a chunk of cells would read everything; convert in memory
        check_sparse_fits(nbytes, "reading an X stored column-wise (CSC), which cannot be read by cells",
                          "store X by rows: adata.X = adata.X.tocsr(), then adata.write_h5ad('screen.h5ad')", copies=3)
        return _chunked(ad.io.read_elem(elem).tocsr(), rows)
    return ad.experimental.read_elem_lazy(elem, chunks=(rows, n_genes))


def _chunked(X, rows: int) -> da.Array:
    """An in-memory matrix as a Dask array of ``rows`` cells per chunk (CSR chunks for sparse X)."""
    if sp.issparse(X):
        X = sp.csr_matrix(X)
    return da.from_array(X, chunks=(rows, X.shape[1]), asarray=False)


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


# --- chunks of cells -------------------------------------------------------------------------
# X is read and processed by chunks of cells. While a chunk is processed, a few arrays of its
# size exist at once (the counts read, the float32 copy, the normalised values, their log,
# scanpy's temporaries): CHUNK_WORKING_COPIES of them, on each of the Dask scheduler's threads.
# A small screen is one chunk; a larger one gets chunks of at most TARGET_CHUNK_BYTES of stored
# counts, and small enough that the chunks in flight hold no more than the matrix itself; all
# are made smaller when the memory available could not hold them.

#: Stored bytes of counts per chunk at most (a large screen's chunks).
TARGET_CHUNK_BYTES = 128 << 20
#: A matrix of at most this many stored bytes is read as one chunk.
ONE_CHUNK_BYTES = 64 << 20
#: Chunks smaller than this (unless memory is short) make the per-chunk overhead dominate.
MIN_CHUNK_BYTES = 16 << 20
#: Chunk-sized arrays alive at once while a chunk is processed (3.5-4.5 measured on step 1's passes, plus margin).
CHUNK_WORKING_COPIES = 6
#: The smallest chunk the memory guard accepts (only memory this short makes chunks this small).
MIN_CHUNK_CELLS = 32


def _dask_threads() -> int:
    """Chunks processed at once in this process: the local scheduler's threads (1 under a distributed
    client, whose workers hold the chunks in their own memory)."""
    if "distributed" in sys.modules:
        try:
            from distributed import default_client

            default_client()
            return 1
        except ValueError:  # no client
            pass
    return int(dask.config.get("num_workers", None) or dask.system.CPU_COUNT)


def auto_chunk_cells(n_cells: int, bytes_per_cell: float, chunk_cells: int | None = None) -> int:
    """Cells per chunk for a matrix of ``n_cells`` with ``bytes_per_cell`` of stored counts.

    ``chunk_cells`` if given; else the whole matrix when it stores at most :data:`ONE_CHUNK_BYTES`,
    otherwise chunks of at most :data:`TARGET_CHUNK_BYTES`, no larger than the matrix divided among
    the chunks in flight (:data:`CHUNK_WORKING_COPIES` per thread) and no smaller than
    :data:`MIN_CHUNK_BYTES`; fewer cells when the memory available could not hold the chunks in flight.

    Raises
    ------
    InsufficientMemoryError
        When the given chunks, or chunks of :data:`MIN_CHUNK_CELLS`, would not fit.
    """
    bytes_per_cell = max(float(bytes_per_cell), 1.0)
    threads = _dask_threads()
    in_flight = bytes_per_cell * CHUNK_WORKING_COPIES * threads  # bytes held at once per cell of a chunk
    available = available_memory()
    if chunk_cells is not None:
        rows = max(1, min(int(chunk_cells), n_cells))
        if available is not None and rows * in_flight > available:
            raise InsufficientMemoryError(
                f"Not enough memory for chunks of {rows:,} cells: {threads} at once need about "
                f"{format_bytes(rows * in_flight)}, but only {format_bytes(available)} is available. To fix it: "
                "lower chunk_cells (argument of pp.read_screen), or leave it unset to choose it from the memory."
            )
        return rows
    matrix = bytes_per_cell * n_cells
    rows = n_cells if matrix <= ONE_CHUNK_BYTES else min(
        TARGET_CHUNK_BYTES, max(MIN_CHUNK_BYTES, matrix / (CHUNK_WORKING_COPIES * threads))) / bytes_per_cell
    if available is not None and rows * in_flight > available:
        rows = available / in_flight
        if rows < min(MIN_CHUNK_CELLS, n_cells):
            cap = os.environ.get(MAX_MEMORY_ENV)
            raise InsufficientMemoryError(
                f"Not enough memory to read the counts by chunks: {MIN_CHUNK_CELLS} cells at once on {threads} "
                f"threads need about {format_bytes(MIN_CHUNK_CELLS * in_flight)}, but only {format_bytes(available)} "
                f"is available{f' (capped by {MAX_MEMORY_ENV}={cap})' if cap else ''}. To fix it: free memory, or run "
                "the step on a Dask cluster with more memory per worker (parameter 'cluster')."
            )
    return int(max(min(n_cells, rows), min(MIN_CHUNK_CELLS, n_cells)))


def _per_chunk(X, func: Callable, *args) -> list:
    """``func(chunk, *args)`` for every chunk of cells of ``X``, the results in chunk order.

    Runs on the active Dask scheduler, so only the results (per-cell or per-gene arrays) come
    back, never the matrix; an in-memory ``X`` is one chunk.
    """
    if not isinstance(X, da.Array):
        return [func(X, *args)]
    if X.numblocks[1] != 1:
        X = X.rechunk({1: -1})
    what, n_chunks, client = _PASSES.get(func.__name__, func.__name__), X.numblocks[0], active_client()
    # chunks done are counted in this process (Dask's threads), or on a cluster as the workers finish them
    call = dask.delayed(func if client is not None else _counted(func, n_chunks, what), pure=True)
    tasks = [call(block, *args) for block in X.to_delayed()[:, 0]]
    if client is None:
        results = list(dask.compute(*tasks))
    else:
        from distributed import as_completed

        futures = client.compute(tasks)
        for i, _ in enumerate(as_completed(futures), 1):
            _log_chunks_done(i, n_chunks, what)
        results = client.gather(futures)
    if n_chunks > 1:
        LOG.info("%s: %d chunks of cells read", what, n_chunks)
    return results


#: What each pass over the chunks computes, as the progress log says it.
_PASSES = {"_chunk_row_sums": "counts per cell", "_scan_values": "checking the counts", "_qc_chunk": "QC metrics",
           "_cell_cycle_chunk": "cell-cycle scores", "_gene_stats_chunk": "gene statistics"}


def _counted(func: Callable, n_chunks: int, what: str) -> Callable:
    """``func`` that logs every tenth of the chunks it has done (in this process: Dask's threads)."""
    done, lock = itertools.count(1), threading.Lock()

    def run(chunk, *args):
        result = func(chunk, *args)
        with lock:
            i = next(done)
        _log_chunks_done(i, n_chunks, what)
        return result

    return run


def _log_chunks_done(i: int, n_chunks: int, what: str) -> None:
    """Log the pass's progress at every tenth of its chunks (its end is logged once, by the caller)."""
    if i % max(1, n_chunks // 10) == 0 and i < n_chunks:
        LOG.info("%s: %d of %d chunks", what, i, n_chunks)


def _as_csr(X) -> sp.csr_matrix:
    """A chunk as CSR without explicit zeros (copied only when it has some, or is not CSR)."""
    if not (sp.issparse(X) and X.format == "csr"):
        return sp.csr_matrix(np.asarray(X))
    if X.nnz and not X.data.all():
        X = X.copy()
        X.eliminate_zeros()
    return X


def _chunk_row_sums(X) -> np.ndarray:
    """Each cell's total (float64) in a chunk."""
    return np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()


def _row_sums(X) -> np.ndarray:
    return np.concatenate(_per_chunk(X, _chunk_row_sums))


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
    stored = _input_record(adata)
    if "counts" in adata.layers or "counts" in stored.get("layers", []):
        return " layers['counts'] exists: put it in X (adata.X = adata.layers['counts']) and save the file again."
    if adata.raw is not None or stored.get("raw"):
        return " adata.raw exists: if it holds the raw counts, use adata = adata.raw.to_adata() and save the file again."
    return " Put the raw UMI counts in X (scanpy's normalize_total/log1p run inside the pipeline)."


def check_counts(adata: ad.AnnData, source: str | None = None) -> None:
    """Refuse matrices that are not raw counts: negative, non-integer, non-finite, logged or normalised.

    The check runs over ``X`` chunk by chunk, and within a chunk in blocks (no copy of the
    matrix), and raises :class:`InputError` naming the file (``source``) and the fix: which
    layer holds the raw counts when one does.
    """
    where = f"The count matrix X of {source!r} (parameter 'input')" if source else "The count matrix X"
    X = adata.X
    if X is None:
        raise InputError(f"{where} is missing; put the raw UMI counts in X.")
    dtype = X.dtype
    if not (np.issubdtype(dtype, np.number) or dtype == bool):
        raise InputError(f"{where} has non-numeric type {dtype}; it must hold raw UMI counts.")
    integer = bool(np.issubdtype(dtype, np.integer) or dtype == bool)
    scan = _combine_scans(_per_chunk(X, _scan_values, integer))
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


def _combine_scans(scans: list[_ValueScan]) -> _ValueScan:
    """One scan of the whole matrix from the scans of its chunks (in chunk order)."""
    examples = [s.fractional_example for s in scans if s.fractional_example is not None]
    return _ValueScan(sum(s.n_nonzero for s in scans), min(s.minimum for s in scans), max(s.maximum for s in scans),
                      sum(s.n_non_finite for s in scans), sum(s.n_fractional for s in scans),
                      examples[0] if examples else None)


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
    totals = _row_sums(adata.X)
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
    Adds ``obs['n_genes_by_counts', 'total_counts', 'log1p_total_counts', 'total_counts_mito', 'pct_counts_mito']`` and
    ``var['mito', 'n_cells_by_counts', 'mean_counts', 'pct_dropout_by_counts', 'total_counts']``
    (genes' metrics over the kept cells), the values ``sc.pp.calculate_qc_metrics`` gives, from one
    pass over the chunks (a cell's filters depend on its own row only, so the genes' metrics over
    the kept cells come from the same pass). Returns a filtered copy (lazy when X is).
    """
    adata.var["mito"] = adata.var_names.str.upper().str.startswith(mito_prefix.upper())
    cells, keep_cells, genes = _qc_metrics(adata.X, adata.var["mito"].to_numpy(dtype=bool),
                                           (min_counts_per_cell, min_genes_per_cell, max_pct_mito))
    for column in cells:
        adata.obs[column] = cells[column].to_numpy()
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
    for column in genes:  # the genes' metrics over the kept cells
        out.var[column] = genes[column].to_numpy()
    keep_genes = (out.var["n_cells_by_counts"] >= max(min_cells_per_gene, 1)).to_numpy()
    if not keep_genes.any():
        raise InputError(
            f"No gene is detected in >= {max(min_cells_per_gene, 1)} of the {out.n_obs} cells that pass QC "
            "(parameter 'min_cells_per_gene'); lower it or relax the cell QC filters."
        )
    out = out[:, keep_genes].copy()
    has_counts = _cells_with_counts(out, n_genes_dropped=int((~keep_genes).sum()))
    if not has_counts.all():
        out = out[has_counts].copy()
    _log(out).update(n_genes_too_rare=int((~keep_genes).sum()), n_cells_without_counts=int((~has_counts).sum()))
    return out


def _qc_metrics(X, mito: np.ndarray, thresholds: tuple[float, float, float]
                ) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Per-cell metrics (all cells), which cells pass the thresholds, and per-gene metrics over those cells."""
    parts = list(zip(*_per_chunk(X, _qc_chunk, mito, thresholds)))
    n_genes, total, total_mito, keep = (np.concatenate(p) for p in parts[:4])
    gene_nnz, gene_total = (np.sum(p, axis=0) for p in parts[4:])
    with np.errstate(divide="ignore", invalid="ignore"):
        pct_mito = total_mito / total * 100
    cells = pd.DataFrame({"n_genes_by_counts": n_genes, "total_counts": total, "log1p_total_counts": np.log1p(total),
                          "total_counts_mito": total_mito, "pct_counts_mito": pct_mito})
    n_kept = max(int(keep.sum()), 1)
    genes = pd.DataFrame({"n_cells_by_counts": gene_nnz, "mean_counts": gene_total / n_kept,
                          "pct_dropout_by_counts": (1 - gene_nnz / n_kept) * 100, "total_counts": gene_total})
    return cells, keep, genes


def _qc_chunk(X, mito: np.ndarray, thresholds: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """One chunk's per-cell genes, total, mitochondrial total and pass/fail, and its passing cells' per-gene
    detection counts and totals (integers stay integers, as in scanpy's metrics)."""
    X = _as_csr(X)
    min_counts, min_genes, max_pct_mito = thresholds
    dtype = np.int64 if (np.issubdtype(X.dtype, np.integer) or X.dtype == bool) else np.float64
    n_genes = np.diff(X.indptr).astype(np.int32)
    total = np.asarray(X.sum(axis=1, dtype=dtype)).ravel()
    total_mito = np.asarray(X[:, np.flatnonzero(mito)].sum(axis=1, dtype=dtype)).ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = (total >= min_counts) & (n_genes >= min_genes) & (total_mito / total * 100 <= max_pct_mito)
    kept = X if keep.all() else X[keep]
    gene_nnz = np.bincount(kept.indices, minlength=X.shape[1]).astype(np.int64)
    gene_total = np.asarray(kept.sum(axis=0, dtype=dtype)).ravel()
    return n_genes, total, total_mito, keep, gene_nnz, gene_total


def _cells_with_counts(adata: ad.AnnData, n_genes_dropped: int) -> np.ndarray:
    """Which cells still have counts after the gene filter. Only a cell that detected no more genes than were
    dropped can have lost all of them, so only those cells are read again (usually none)."""
    has_counts = np.ones(adata.n_obs, dtype=bool)
    suspects = adata.obs["n_genes_by_counts"].to_numpy() <= n_genes_dropped
    if suspects.any():
        has_counts[suspects] = _row_sums(adata.X[suspects]) > 0
    return has_counts


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
    """``X`` becomes normalize_total (``target_sum`` per cell) + log1p of the counts, as float32, in place.

    Lazy for a lazy ``X`` (scanpy's Dask-aware functions: each chunk is normalised when it is
    read). No copy of the counts is kept: they stay in the input file (``read_screen`` records it).
    """
    X = adata.X
    adata.X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else X.astype(np.float32)
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
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


#: sc.pp.scale's max_value for the cell-cycle scores (scaled values are clipped to ±10).
SCALE_MAX_VALUE = 10.0
#: sc.tl.score_genes's bins of mean expression from which control genes are drawn.
N_EXPRESSION_BINS = 25


def score_cell_cycle(adata: ad.AnnData, s_genes: list[str], g2m_genes: list[str], seed: int = 0) -> dict[str, Any]:
    """Tirosh/Seurat cell-cycle scores into ``obs['S_score', 'G2M_score', 'phase']``.

    scanpy's ``score_genes_cell_cycle`` on the data scaled per gene (zero mean, unit variance,
    clipped at ±10, as ``sc.pp.scale(max_value=10)``): a score is the mean scaled expression of
    the markers minus that of their control genes, and the phase is G2M or S by the larger
    score, G1 when both are negative. Only the markers' and the control genes' columns are
    scaled, chunk by chunk, so no dense copy of the data is made and ``X`` is untouched. The
    control genes are scanpy's choice (``ctrl_size`` = the shorter list, drawn with
    ``random_state=seed`` from the expression bins the markers fall in), with genes binned by
    their mean log-normalised expression, as the method intends: binned by the means of the
    scaled data, as scanpy does when handed a scaled copy, every gene's mean is zero up to
    rounding, so the bins (and the control genes) would be set by floating-point noise.

    Returns (and logs) which markers were found, which are missing from the data, and the
    control genes.
    """
    s_present, s_missing = _resolve_markers(s_genes, adata.var_names)
    g2m_present, g2m_missing = _resolve_markers(g2m_genes, adata.var_names)
    summary: dict[str, Any] = {
        "s_markers_used": s_present, "s_markers_missing": s_missing,
        "g2m_markers_used": g2m_present, "g2m_markers_missing": g2m_missing,
    }
    if len(s_present) < 2 or len(g2m_present) < 2:
        summary["skipped"] = (
            f"only {len(s_present)} S and {len(g2m_present)} G2/M markers are in the data (need >= 2 each)"
        )
        _log(adata)["cell_cycle"] = summary
        return summary
    stats = _gene_stats(adata.X)
    markers = {"S": list(pd.unique(np.asarray(s_present))), "G2M": list(pd.unique(np.asarray(g2m_present)))}
    ctrl_size = min(len(s_present), len(g2m_present))
    controls = {phase: _control_genes(adata.var_names, stats["mean"].to_numpy(), genes, ctrl_size, seed)
                for phase, genes in markers.items()}
    gene_lists = [markers["S"], controls["S"], markers["G2M"], controls["G2M"]]
    _check_cell_cycle_fits(adata, len(set().union(*gene_lists)))
    scores = _cell_cycle_scores(adata, stats, gene_lists)
    adata.obs["S_score"], adata.obs["G2M_score"] = scores[:, 0], scores[:, 1]
    phase = np.where(scores[:, 1] > scores[:, 0], "G2M", "S")
    phase[(scores < 0).all(axis=1)] = "G1"
    adata.obs["phase"] = pd.Categorical(phase)
    summary.update(s_control_genes=controls["S"], g2m_control_genes=controls["G2M"],
                   control_gene_bins=f"{N_EXPRESSION_BINS} bins of mean log-normalised expression")
    _log(adata)["cell_cycle"] = summary
    return summary


def _check_cell_cycle_fits(adata: ad.AnnData, n_columns: int) -> int:
    """Refuse cell-cycle scoring when the chunks processed at once, each with its counts' working copies and
    its scaled marker and control columns (dense float32, three copies while the means are taken), would
    not fit in the memory available. Returns the estimated bytes."""
    X = adata.X
    lazy = isinstance(X, da.Array)
    rows = max(X.chunks[0]) if lazy else adata.n_obs
    at_once = min(_dask_threads(), X.numblocks[0]) if lazy else 1
    per_cell = _input_record(adata).get("bytes_per_cell") or (0 if lazy else _bytes_per_cell(X))
    need = int(at_once * rows * (per_cell * CHUNK_WORKING_COPIES + n_columns * np.dtype(np.float32).itemsize * 3))
    return _refuse_if_over(
        need, f"cell-cycle scoring (the scaled columns of {n_columns} marker and control genes for {at_once} "
        f"chunk(s) of {rows:,} cells at once, with their counts)",
        "set cell_cycle_genes: null to skip scoring, or read the counts in smaller chunks (chunk_cells of "
        "pp.read_screen)")


def _bytes_per_cell(X) -> float:
    """Bytes per cell of an in-memory matrix (values and indices of a sparse one)."""
    nbytes = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes if sp.issparse(X) else np.asarray(X).nbytes
    return nbytes / max(X.shape[0], 1)


def _control_genes(var_names: pd.Index, means: np.ndarray, genes: list[str], ctrl_size: int, seed: int) -> list[str]:
    """scanpy's control genes for ``genes`` (``sc.tl.score_genes(random_state=seed)``), genes binned by ``means``.

    scanpy's own bin-and-draw is fed a one-row "matrix" of the means, whose column means are the
    means; rounded to 12 decimals so that the bins do not depend on the order of the chunks' sums.
    """
    from scanpy.tools._score_genes import _score_genes_bins

    np.random.seed(seed)  # what score_genes does with random_state before drawing
    row = np.round(means, 12)[None, :]
    chosen = pd.Index([], dtype="string")
    for drawn in _score_genes_bins(pd.Index(genes), var_names.astype("string"), ctrl_as_ref=True, ctrl_size=ctrl_size,
                                   n_bins=N_EXPRESSION_BINS, get_subset=lambda _genes: row):
        chosen = chosen.union(drawn)
    return [str(g) for g in chosen]


def _cell_cycle_scores(adata: ad.AnnData, stats: pd.DataFrame, gene_lists: list[list[str]]) -> np.ndarray:
    """Cells × 2 (S, G2M) scores from the scaled columns of ``gene_lists`` (S markers, S controls, G2M markers,
    G2M controls), chunk by chunk."""
    columns = pd.Index(pd.unique(np.concatenate([np.asarray(g, dtype=object) for g in gene_lists])))
    index = adata.var_names.get_indexer(columns)
    positions = [columns.get_indexer(g) for g in gene_lists]
    mean = stats["mean"].to_numpy()[index]
    std = np.sqrt(stats["var"].to_numpy()[index])
    std[std == 0] = 1
    return np.concatenate(_per_chunk(adata.X, _cell_cycle_chunk, index, mean, std, positions))


def _cell_cycle_chunk(X, index: np.ndarray, mean: np.ndarray, std: np.ndarray, positions: list[np.ndarray]):
    """One chunk's (S, G2M) scores: its columns ``index`` scaled as sc.pp.scale does (float32 arithmetic)."""
    if X.shape[0] == 0:
        return np.empty((0, 2))
    x = X[:, index]
    x = (x.toarray() if sp.issparse(x) else np.array(x)).astype(np.float32, copy=False)
    np.subtract(x, mean, out=x)
    np.true_divide(x, std, out=x)
    np.clip(x, -SCALE_MAX_VALUE, SCALE_MAX_VALUE, out=x)
    s, s_control, g2m, g2m_control = (np.nanmean(x[:, p], axis=1, dtype=np.float64) for p in positions)
    return np.column_stack([s - s_control, g2m - g2m_control])


#: The last :func:`_gene_stats` of a lazy X (keyed by the Dask graph's name): cell-cycle scoring and gene
#: selection both need them, and a lazy X would otherwise be read and normalised again.
_GENE_STATS_CACHE: dict[str, pd.DataFrame] = {}


def _gene_stats(X) -> pd.DataFrame:
    """Per gene over all cells: ``mean``, ``var`` (unbiased, as scanpy's), ``max`` and ``min``, in one pass."""
    key = X.name if isinstance(X, da.Array) else None
    if key is not None and key in _GENE_STATS_CACHE:
        return _GENE_STATS_CACHE[key]
    n, total, squares, high, low = zip(*_per_chunk(X, _gene_stats_chunk))
    n = sum(n)
    mean = np.sum(total, axis=0) / n
    var = np.maximum(np.sum(squares, axis=0) - n * mean**2, 0) / max(n - 1, 1)
    stats = pd.DataFrame({"mean": mean, "var": var, "max": np.max(high, axis=0), "min": np.min(low, axis=0)})
    if key is not None:
        _GENE_STATS_CACHE.clear()
        _GENE_STATS_CACHE[key] = stats
    return stats


def _gene_stats_chunk(X) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One chunk's cells, per-gene sums and sums of squares (float64), maxima and minima (zeros included)."""
    n_cells, n_genes = X.shape
    if n_cells == 0:
        return 0, np.zeros(n_genes), np.zeros(n_genes), np.full(n_genes, -np.inf), np.full(n_genes, np.inf)
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        wide = sp.csr_matrix((X.data.astype(np.float64), X.indices, X.indptr), shape=X.shape)
        total = np.asarray(wide.sum(axis=0)).ravel()
        np.square(wide.data, out=wide.data)
        squares = np.asarray(wide.sum(axis=0)).ravel()
        del wide
        by_gene = X.tocsc()  # the maxima and minima (implicit zeros included) along its major axis
        return n_cells, total, squares, by_gene.max(axis=0).toarray().ravel(), by_gene.min(axis=0).toarray().ravel()
    values = np.asarray(X, dtype=np.float64)
    return n_cells, values.sum(axis=0), (values * values).sum(axis=0), values.max(axis=0), values.min(axis=0)


def select_genes(
    adata: ad.AnnData,
    min_mean: float = 0.0125,
    max_mean: float = 3.0,
    min_disp: float = 0.5,
    n_top_genes: int | None = None,
    use_all_genes: bool = False,
) -> int:
    """Mark the genes to factorise in ``var['highly_variable']``; return how many.

    Dispersion-based HVGs (scanpy ``flavor='seurat'``, Dask-aware: one pass over the chunks) with
    the cutoffs, or the ``n_top_genes`` most dispersed genes, or every gene with
    ``use_all_genes``. Mitochondrial genes are never selected: their share tracks cell quality,
    not a program; nor are genes with zero variance in ``X`` (the same value in every cell
    carries no program). :func:`keep_selected_genes` then keeps just the marked genes.
    """
    candidates = ~adata.var["mito"].to_numpy(dtype=bool) if "mito" in adata.var else np.ones(adata.n_vars, bool)
    stats = _gene_stats(adata.X)
    constant = (stats["max"] == stats["min"]).to_numpy()
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
            _hvg_input(adata, candidates), flavor="seurat", min_mean=min_mean, max_mean=max_mean, min_disp=min_disp,
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


def _hvg_input(adata: ad.AnnData, candidates: np.ndarray) -> ad.AnnData:
    """The candidate genes for scanpy's gene selection. A lazy X goes in as float64: scanpy's Dask path takes
    each gene's variance as E[x²] − E[x]², which in float32 is off by ~1e-5 (its in-memory path computes it exactly)."""
    subset = adata[:, candidates]
    if not isinstance(adata.X, da.Array):
        return subset
    return ad.AnnData(subset.X.astype(np.float64), obs=pd.DataFrame(index=subset.obs_names),
                      var=pd.DataFrame(index=subset.var_names), uns={"log1p": dict(adata.uns.get("log1p", {}))})


#: The columns of the per-gene table (genes.csv) that exist: identity, QC metrics, dispersion, selection.
GENE_TABLE_COLUMNS = ("mito", "n_cells_by_counts", "mean_counts", "pct_dropout_by_counts", "total_counts", "means",
                      "dispersions", "dispersions_norm", "highly_variable")


def keep_selected_genes(adata: ad.AnnData) -> tuple[ad.AnnData, pd.DataFrame]:
    """The output of step 1 (the selected genes only) and the table of every gene that passed QC.

    Returns
    -------
    AnnData
        ``X`` the log-normalised expression of the genes marked in ``var['highly_variable']``
        (float32; lazy when ``X`` is, so writing it reads the input chunk by chunk), ``var`` those
        genes with their QC and dispersion columns, ``obs``, ``obsm``, ``uns`` as they were. No
        layers: the raw counts stay in the input file named in ``uns['perturbnmf']['preprocess']['input']``.
    DataFrame
        One row per gene that passed QC: ``gene`` and :data:`GENE_TABLE_COLUMNS` (those computed),
        for the report (the gene-selection figure) and ``genes.csv``.
    """
    selected = adata.var["highly_variable"].to_numpy(dtype=bool)
    columns = [c for c in GENE_TABLE_COLUMNS if c in adata.var]
    genes = adata.var[columns].rename_axis("gene").reset_index()
    out = adata[:, selected].copy()
    for key in list(out.layers):
        del out.layers[key]
    _log(out)["n_genes_after_qc"] = int(adata.n_vars)
    return out, genes


# --- memory guards ---------------------------------------------------------------------
# Memory checks before a large array is made or read.
#
# Sparse count matrices stay sparse through the pipeline, and step 1 reads them by chunks
# whose size :func:`auto_chunk_cells` fits to the memory available (refusing, and naming what
# helps, when not even small chunks fit). Where a step must hold a whole matrix (step 2 the
# selected genes: :func:`preprocessed_fits`) or make a dense copy, it first calls
# :func:`check_sparse_fits` / :func:`check_dense_fits`, which estimate the size and refuse,
# naming the parameter to change, when it would not fit in the memory available now.
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
    array = (f"a dense {n_rows:,} × {n_cols:,} {np.dtype(dtype).name} array"
             + (f" ({copies} copies at the peak)" if copies > 1 else ""))
    return _refuse_if_over(dense_bytes(n_rows, n_cols, dtype, copies), what, parameter_hint, array)


def sparse_bytes(n_rows: int, nnz: int, dtype=np.float32, index_dtype=np.int32, copies: int = 1) -> int:
    """Bytes of ``copies`` CSR matrices with ``n_rows`` rows and ``nnz`` stored values."""
    index = np.dtype(index_dtype).itemsize
    return (int(nnz) * (np.dtype(dtype).itemsize + index) + (int(n_rows) + 1) * index) * int(copies)


def _refuse_if_over(need: int, what: str, parameter_hint: str, array: str | None = None) -> int:
    """``need`` (bytes), or an InsufficientMemoryError naming ``what``, ``array`` (its shape) and the fix."""
    available = available_memory()
    if available is not None and need > available:
        cap = os.environ.get(MAX_MEMORY_ENV)
        capped = f" (capped by {MAX_MEMORY_ENV}={cap})" if cap else ""
        raise InsufficientMemoryError(
            f"Not enough memory for {what}: it needs {f'{array}, ' if array else ''}about {format_bytes(need)}, "
            f"but only {format_bytes(available)} is available{capped}. To fix it: {parameter_hint}."
        )
    return need


def check_sparse_fits(nbytes: int, what: str, parameter_hint: str, copies: int = 1) -> int:
    """Refuse to load a sparse matrix of ``nbytes`` (``copies`` of it at the peak) that would not fit in the
    available memory; the message names ``what`` it is for and the ``parameter_hint``. Returns the bytes."""
    return _refuse_if_over(int(nbytes) * int(copies), what + (f" ({copies} copies at the peak)" if copies > 1 else ""),
                           parameter_hint)


def check_stored_matrix_fits(path: str | Path, what: str, parameter_hint: str, copies: int = 2) -> int:
    """:func:`check_sparse_fits` for the ``X`` of an ``.h5ad``/``.zarr`` about to be read into memory (as CSR with
    32-bit indices), from its stored shape and number of values, before anything is read."""
    store = _open_store(Path(path))
    try:
        (n_rows, n_cols), _, encoding = _stored_shape_and_bytes(store["X"])
        nnz = int(store["X"]["data"].shape[0]) if encoding != "array" else n_rows * n_cols
        dtype = store["X"]["data"].dtype if encoding != "array" else store["X"].dtype
    finally:
        if not _is_zarr(Path(path)):
            store.close()
    return check_sparse_fits(sparse_bytes(n_rows, nnz, dtype), what, parameter_hint, copies=copies)


def preprocessed_fits(path: str | Path, copies: int = 2) -> bool:
    """Whether step 2 can read step 1's ``X`` (the log-normalised selected genes, ``copies`` of it at the
    peak) into memory; when not, it reads it chunk by chunk (:func:`read_matrix_lazily`) and factorises
    out of core. A missing file: True (the reader then names the step to run)."""
    if not Path(path).exists():
        return True
    try:
        check_stored_matrix_fits(path, "factorising the selected genes in memory", "", copies=copies)
    except InsufficientMemoryError:
        return False
    return True


def read_matrix_lazily(path: str | Path) -> da.Array:
    """The ``X`` of an ``.h5ad``/``.zarr`` as a Dask array chunked by cells (CSR chunks for sparse X; chunk
    size as for step 1's input, :func:`auto_chunk_cells`); each chunk is read when a task needs it."""
    store = _open_store(Path(path))
    try:
        return _lazy_matrix(store["X"], None)
    finally:
        if not _is_zarr(Path(path)):
            store.close()
