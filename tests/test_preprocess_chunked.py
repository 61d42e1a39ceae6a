"""Step 1 on a lazy X chunked by cells (issue 11): the results do not depend on the chunks, memory follows
the chunk and not the matrix, the output keeps only the selected genes (no copies of the counts), a zarr
input works, and the QC metrics, gene selection and cell-cycle scores are scanpy's."""

from __future__ import annotations

import time
import tracemalloc
import warnings

import anndata as ad
import dask.array as da
import h5py
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from perturbnmf import datasets, pp, tl
from perturbnmf.errors import InsufficientMemoryError

CONTROL = "non-targeting"
#: The demo screen (4,000 cells × 2,000 genes).
DEMO = dict(n_cells=4000, n_genes=2000, seed=0)
#: QC thresholds that drop some cells (depth, mitochondrial share) and some genes (rare), so the filters are tested.
QC = dict(min_counts_per_cell=2000, max_pct_mito=20.0, min_cells_per_gene=50)
#: Several chunks, the last one short.
CHUNK = 700


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The demo screen as .h5ad and .zarr, and its cell-cycle markers."""
    folder = tmp_path_factory.mktemp("chunked_pp")
    screen = datasets.simulate_screen(**DEMO)
    screen.write_h5ad(folder / "screen.h5ad")
    with warnings.catch_warnings():  # anndata's notice that zarr v3 will become its default format
        warnings.simplefilter("ignore", UserWarning)
        screen.write_zarr(folder / "screen.zarr")
    datasets.write_cell_cycle_genes(folder / "cc.tsv", screen)
    return folder


def read(path, chunk_cells=None) -> ad.AnnData:
    return pp.read_screen(path, "perturbation", CONTROL, batch_key="batch", guide_key="guide", chunk_cells=chunk_cells)


def normalised(path, chunk_cells=None) -> ad.AnnData:
    """Step 1 up to the log-normalised matrix (QC with the thresholds above, small groups dropped)."""
    adata = pp.filter_cells_and_genes(read(path, chunk_cells), **QC)
    adata = pp.drop_small_groups(adata, "perturbation", CONTROL, 10)
    pp.normalize(adata)
    pp.add_batch_one_hot(adata, "batch")
    return adata


def step1(folder, name="screen.h5ad", chunk_cells=None):
    """The notebook's step 1: the output AnnData (lazy X), the per-gene table and the cell-cycle summary."""
    adata = normalised(folder / name, chunk_cells)
    summary = pp.score_cell_cycle(adata, *pp.read_cell_cycle_genes(folder / "cc.tsv"), seed=0)
    pp.select_genes(adata)
    out, genes = pp.keep_selected_genes(adata)
    return out, genes, summary


@pytest.fixture(scope="module")
def one_chunk(files):
    return step1(files)


@pytest.fixture(scope="module")
def chunked(files):
    return step1(files, chunk_cells=CHUNK)


def test_x_is_read_lazily_by_cells(files):
    adata = read(files / "screen.h5ad", chunk_cells=CHUNK)
    assert isinstance(adata.X, da.Array) and sp.issparse(adata.X._meta) and adata.X._meta.format == "csr"
    assert adata.X.chunks[0] == (CHUNK,) * 5 + (4000 - 5 * CHUNK,) and adata.X.numblocks[1] == 1
    assert read(files / "screen.h5ad").X.numblocks == (1, 1), "a small screen is one chunk"
    record = adata.uns["perturbnmf"]["preprocess"]["input"]
    assert record["path"] == str((files / "screen.h5ad").resolve())
    assert record["bytes"] == (files / "screen.h5ad").stat().st_size and record["mtime"] and record["n_chunks"] == 6


def test_the_chunk_size_follows_the_matrix():
    per_cell = 8_000  # bytes of stored counts per cell
    assert pp.auto_chunk_cells(1000, per_cell) == 1000
    rows = pp.auto_chunk_cells(2_000_000, per_cell)
    assert pp.MIN_CHUNK_CELLS <= rows < 2_000_000 and rows * per_cell <= pp.TARGET_CHUNK_BYTES
    assert pp.auto_chunk_cells(2_000_000, per_cell, chunk_cells=5000) == 5000


def _same_frame(a: pd.DataFrame, b: pd.DataFrame, rtol: float = 1e-9) -> None:
    assert list(a.columns) == list(b.columns) and list(a.index) == list(b.index)
    for column in a:
        if a[column].dtype.kind == "f":
            np.testing.assert_allclose(a[column], b[column], rtol=rtol, atol=1e-12, err_msg=column)
        else:
            assert a[column].dtype == b[column].dtype and a[column].equals(b[column]), column


def test_results_do_not_depend_on_the_chunks(one_chunk, chunked):
    (out1, genes1, cc1), (out2, genes2, cc2) = one_chunk, chunked
    assert out2.X.numblocks[0] > 1
    assert list(out1.var_names) == list(out2.var_names) and list(out1.obs_names) == list(out2.obs_names)
    _same_frame(out1.var, out2.var)
    _same_frame(genes1, genes2)
    _same_frame(out1.obs.drop(columns=["S_score", "G2M_score"]), out2.obs.drop(columns=["S_score", "G2M_score"]))
    np.testing.assert_allclose(out1.obs[["S_score", "G2M_score"]], out2.obs[["S_score", "G2M_score"]], atol=1e-6)
    assert cc1["s_control_genes"] == cc2["s_control_genes"] and cc1["g2m_control_genes"] == cc2["g2m_control_genes"]
    X1, X2 = out1.X.compute(), out2.X.compute()
    assert X1.dtype == X2.dtype == np.float32
    np.testing.assert_array_equal(X1.indptr, X2.indptr)
    np.testing.assert_array_equal(X1.indices, X2.indices)
    np.testing.assert_allclose(X1.data, X2.data, rtol=1e-6)


def test_the_output_keeps_only_the_selected_genes(chunked, files, tmp_path):
    out, genes, _ = chunked
    assert not out.layers and out.raw is None
    selected = genes.loc[genes["highly_variable"], "gene"].tolist()
    assert list(out.var_names) == selected and out.var["highly_variable"].all() and len(genes) > out.n_vars
    assert {"n_cells_by_counts", "mean_counts", "means", "dispersions_norm", "mito"} <= set(genes.columns)
    assert out.uns["perturbnmf"]["preprocess"]["n_genes_after_qc"] == len(genes)
    path = tmp_path / "preprocessed.h5ad"
    out.write_h5ad(path)
    with h5py.File(path) as f:
        assert dict(f["X"].attrs)["encoding-type"] == "csr_matrix" and f["X/data"].dtype == np.float32
        assert len(f["layers"]) == 0
    back = ad.read_h5ad(path)
    assert back.X.shape == (out.n_obs, len(selected)) and back.uns["perturbnmf"]["preprocess"]["input"]["path"]
    expected = np.log1p(_normalised_counts(files, back))
    np.testing.assert_allclose(back.X.toarray(), expected, rtol=1e-5, atol=1e-6)


def _normalised_counts(files, back) -> np.ndarray:
    """The counts of the cells and genes kept, normalised to 10⁴ per cell over the genes that passed QC."""
    raw = ad.read_h5ad(files / "screen.h5ad")[back.obs_names]
    kept_genes = np.asarray((raw.X > 0).sum(axis=0)).ravel() >= QC["min_cells_per_gene"]
    counts = raw.X.toarray().astype(np.float64)[:, kept_genes]
    columns = raw.var_names[kept_genes].get_indexer(back.var_names)
    return counts[:, columns] / counts.sum(axis=1, keepdims=True) * 1e4


def test_a_zarr_input_gives_the_same_result(files, chunked):
    out, genes, _ = step1(files, "screen.zarr", chunk_cells=CHUNK)
    assert out.uns["perturbnmf"]["preprocess"]["input"]["path"].endswith("screen.zarr")
    _same_frame(genes, chunked[1])
    np.testing.assert_array_equal(out.X.compute().toarray(), chunked[0].X.compute().toarray())


def test_qc_metrics_are_scanpys(files, one_chunk):
    """The one-pass metrics equal sc.pp.calculate_qc_metrics: cells' on all genes, genes' on the cells kept."""
    raw = ad.read_h5ad(files / "screen.h5ad")
    raw.var["mito"] = raw.var_names.str.upper().str.startswith("MT-")
    cells, _ = sc.pp.calculate_qc_metrics(raw, qc_vars=["mito"], percent_top=None, log1p=False)
    out, genes, _ = one_chunk
    _same_frame(out.obs[cells.columns], cells.loc[out.obs_names])
    kept = raw[cells.index.isin(_qc_passing(cells))].copy()
    _, per_gene = sc.pp.calculate_qc_metrics(kept, percent_top=None, log1p=False)
    _same_frame(genes.set_index("gene")[per_gene.columns], per_gene.loc[genes["gene"]].rename_axis("gene"))


def _qc_passing(cells: pd.DataFrame) -> pd.Index:
    passing = (cells["total_counts"] >= QC["min_counts_per_cell"]) & (cells["pct_counts_mito"] <= QC["max_pct_mito"])
    return cells.index[passing]


def test_gene_selection_is_scanpys_in_memory_result(files, chunked):
    """The Dask path selects the genes the in-memory scanpy selects, with the same dispersions (to 1e-6)."""
    adata = normalised(files / "screen.h5ad")
    adata.X = adata.X.compute()
    pp.select_genes(adata)
    genes = chunked[1].set_index("gene")
    assert (adata.var["highly_variable"] == genes["highly_variable"]).all()
    for column in ("means", "dispersions", "dispersions_norm"):
        np.testing.assert_allclose(genes[column], adata.var[column], rtol=1e-6, atol=1e-6, err_msg=column)


def test_cell_cycle_scores_are_scanpys_on_the_scaled_data(files, monkeypatch):
    """The scores from the markers' and controls' columns equal scanpy's score_genes_cell_cycle on a dense
    scaled copy of all genes (the former implementation), with scanpy's bins given the mean log-normalised
    expression (on the scaled copy every gene's mean is 0 up to rounding, so its bins would be noise)."""
    from scanpy.tools import _score_genes

    adata = normalised(files / "screen.h5ad", chunk_cells=CHUNK)
    s_genes, g2m_genes = pp.read_cell_cycle_genes(files / "cc.tsv")
    summary = pp.score_cell_cycle(adata, s_genes, g2m_genes, seed=0)
    counts = adata.X.compute()
    means = np.round(np.asarray(counts.astype(np.float64).mean(axis=0)).ravel(), 12)
    original = _score_genes._nan_means
    monkeypatch.setattr(_score_genes, "_nan_means",
                        lambda x, *, axis, dtype=None: means if axis == 0 else original(x, axis=axis, dtype=dtype))
    scaled = ad.AnnData(counts.toarray(), obs=pd.DataFrame(index=adata.obs_names),
                        var=pd.DataFrame(index=adata.var_names))
    sc.pp.scale(scaled, max_value=10)
    sc.tl.score_genes_cell_cycle(scaled, s_genes=summary["s_markers_used"], g2m_genes=summary["g2m_markers_used"],
                                 random_state=0)
    np.testing.assert_allclose(adata.obs["S_score"], scaled.obs["S_score"], atol=1e-6)
    np.testing.assert_allclose(adata.obs["G2M_score"], scaled.obs["G2M_score"], atol=1e-6)
    assert (adata.obs["phase"].astype(str) == scaled.obs["phase"].astype(str)).all()
    assert len(summary["s_control_genes"]) >= len(summary["s_markers_used"])


def test_factorize_works_on_the_lean_output(chunked, tmp_path):
    path = tmp_path / "preprocessed.h5ad"
    chunked[0].write_h5ad(path)
    adata = ad.read_h5ad(path)
    tl.factorize(adata, [3], n_restarts=1, max_iter=20, holdout_fraction=0.0, n_jobs=1, batch_key="batch")
    params = adata.uns["snmf"]["params"]
    assert params["layer"] is None and params["mask_var"] is None and params["n_genes"] == adata.n_vars
    assert adata.var["snmf_used"].all() and adata.varm["snmf_loadings"].shape == (adata.n_vars, 3)
    X = tl.factorized_matrix(adata)
    assert sp.issparse(X) and X.indices.dtype == np.int32 and (X != adata.X).nnz == 0
    with pytest.raises(ValueError, match="Layer 'normalized' is missing.*layer=None"):
        tl.factorize(adata, [3], layer="normalized")


# --- memory ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """60,000 cells × 2,000 genes on disk (the simulated screen's counts repeated), and its CSR bytes."""
    screen = datasets.simulate_screen(n_cells=6000, n_genes=2000, seed=1)
    X = sp.vstack([screen.X] * 10, format="csr")
    obs = pd.concat([screen.obs] * 10)
    obs.index = [f"cell{i:05d}" for i in range(len(obs))]
    path = tmp_path_factory.mktemp("big") / "screen.h5ad"
    ad.AnnData(X, obs=obs, var=screen.var).write_h5ad(path)
    return path, X.data.nbytes + X.indices.nbytes + X.indptr.nbytes


def _step1_peak(path, chunk_cells: int) -> int:
    """Peak bytes allocated by step 1 (read and check, QC, normalise, select, write the output) on ``path``."""
    tracemalloc.start()
    try:
        adata = pp.filter_cells_and_genes(read(path, chunk_cells))
        pp.normalize(adata)
        pp.select_genes(adata, n_top_genes=500)
        out, _ = pp.keep_selected_genes(adata)
        out.write_h5ad(path.with_name(f"out{chunk_cells}.h5ad"))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_follows_the_chunk_not_the_matrix(big_file):
    path, matrix_bytes = big_file
    start = time.perf_counter()
    small, large = _step1_peak(path, 2000), _step1_peak(path, 8000)
    # 30 chunks (2 at a time on 2 threads): a third of the 420 MiB matrix, which the former step 1 held 3 times over
    assert small < 0.4 * matrix_bytes, (small, matrix_bytes)
    assert large > 2 * small, (small, large)  # four times larger chunks: the peak grows with them
    assert time.perf_counter() - start < 60


# --- memory guards -------------------------------------------------------------------------------

def test_memory_guards_name_the_parameter(files, monkeypatch, tmp_path):
    monkeypatch.setenv(pp.MAX_MEMORY_ENV, "40M")
    with pytest.raises(InsufficientMemoryError, match="lower chunk_cells"):
        read(files / "screen.h5ad", chunk_cells=4000)
    adata = normalised(files / "screen.h5ad")
    assert adata.X.numblocks[0] > 1, "chunks shrink to fit the memory available"
    # the sparse passes fit in the chunks; the cell-cycle scores' dense columns would not: skip them, it says
    with pytest.raises(InsufficientMemoryError, match="cell-cycle scoring.*set cell_cycle_genes: null"):
        pp.score_cell_cycle(adata, *pp.read_cell_cycle_genes(files / "cc.tsv"))
    monkeypatch.delenv(pp.MAX_MEMORY_ENV)
    out, _, _ = step1(files)
    out.write_h5ad(tmp_path / "preprocessed.h5ad")
    assert pp.preprocessed_fits(tmp_path / "preprocessed.h5ad")
    monkeypatch.setenv(pp.MAX_MEMORY_ENV, "1M")
    assert not pp.preprocessed_fits(tmp_path / "preprocessed.h5ad"), "step 2 then factorises it out of core"
    assert pp.preprocessed_fits(tmp_path / "missing.h5ad")


def test_a_pass_on_a_cluster_reports_its_chunks_as_they_finish(files, caplog):
    """On a dask.distributed cluster, as in process, a pass over the chunks logs its progress per chunk."""
    distributed = pytest.importorskip("distributed")
    adata = read(files / "screen.h5ad", chunk_cells=CHUNK)
    n_chunks = adata.X.numblocks[0]
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0"), \
            caplog.at_level("INFO", logger="perturbnmf"):
        sums = np.concatenate(pp._per_chunk(adata.X, pp._chunk_row_sums))
    assert n_chunks > 2 and sums.shape == (adata.n_obs,)
    np.testing.assert_allclose(sums, np.asarray(adata.X.compute().sum(axis=1)).ravel())
    messages = [r.getMessage() for r in caplog.records if r.name == "perturbnmf"]
    assert [f"counts per cell: {i} of {n_chunks} chunks" for i in range(1, n_chunks)] == messages[:-1]
    assert messages[-1] == f"counts per cell: {n_chunks} chunks of cells read"
