"""Tests of perturbnmf.datasets.write_simulated_screen: a simulated screen written chunk by chunk."""

import tracemalloc

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest

from perturbnmf import datasets, pp
from perturbnmf.datasets import DEMO_DESIGN, simulate_screen, write_simulated_screen

#: 3 blocks of 1,024 cells, the last one short.
SMALL = dict(n_cells=3000, n_genes=300, n_targets=16, seed=3)


def _same_csr(a, b) -> bool:
    return (a.shape == b.shape and np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
            and np.array_equal(a.data, b.data))


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chunked")
    path = folder / "screen.h5ad"
    summary = write_simulated_screen(path, **SMALL, chunk_cells=1000, gene_sets_path=folder / "sets.gmt",
                                     cell_cycle_path=folder / "cc.tsv")
    return path, summary


def test_file_reads_with_anndata_and_holds_the_truth(small_file):
    path, summary = small_file
    adata = anndata.read_h5ad(path)
    fresh = simulate_screen(**SMALL)
    assert adata.shape == (3000, 300) and adata.X.format == "csr" and adata.X.dtype == np.int32
    assert adata.X.has_canonical_format and adata.X.nnz == summary["nnz"]
    # the design and the truth are simulate_screen's (same draws); only the counts come from other streams
    pd.testing.assert_frame_equal(adata.obs, fresh.obs)
    pd.testing.assert_frame_equal(adata.var, fresh.var)
    np.testing.assert_array_equal(adata.obsm["simulation_usage"], fresh.obsm["simulation_usage"])
    np.testing.assert_array_equal(adata.varm["simulation_weights"], fresh.varm["simulation_weights"])
    sim, truth = adata.uns["simulation"], fresh.uns["simulation"]
    pd.testing.assert_frame_equal(sim["effects"].reset_index(drop=True), truth["effects"], check_dtype=False)
    assert list(sim["null_targets"]) == truth["null_targets"]
    assert list(sim["program_names"]) == truth["program_names"]
    assert sim["params"]["cell_block"] == 1024 and "n_measured_targets" not in sim["params"]
    assert adata.uns["control_label"] == "non-targeting"
    assert summary["n_cells"] == 3000 and summary["n_chunks"] == 3 and summary["bytes"] == path.stat().st_size
    assert summary["chunk_cells"] == 1024  # rounded up to whole blocks
    assert 3000 <= summary["umis_per_cell_median"] <= 5000
    assert not list(path.parent.glob(".*partial*"))


def test_counts_do_not_depend_on_chunk_cells(small_file, tmp_path):
    reference = anndata.read_h5ad(small_file[0]).X
    for chunk_cells in (1, 2500, 100_000):
        path = tmp_path / f"chunk{chunk_cells}.h5ad"
        write_simulated_screen(path, **SMALL, chunk_cells=chunk_cells)
        assert _same_csr(anndata.read_h5ad(path).X, reference), chunk_cells
    other = tmp_path / "seed4.h5ad"
    write_simulated_screen(other, **{**SMALL, "seed": 4})
    assert not _same_csr(anndata.read_h5ad(other).X, reference)


def test_compressed_file_holds_the_same_counts(small_file, tmp_path):
    path = tmp_path / "lzf.h5ad"
    write_simulated_screen(path, **SMALL, compression="lzf")
    assert _same_csr(anndata.read_h5ad(path).X, anndata.read_h5ad(small_file[0]).X)
    with h5py.File(path) as f:
        assert f["X/data"].compression == "lzf"


def test_backed_and_lazy_reading(small_file):
    path, _ = small_file
    whole = anndata.read_h5ad(path).X
    backed = anndata.read_h5ad(path, backed="r")
    try:
        assert _same_csr(backed.X[1000:1100], whole[1000:1100])
    finally:
        backed.file.close()
    with h5py.File(path) as f:
        assert dict(f["X"].attrs)["encoding-type"] == "csr_matrix"
        assert dict(f["X"].attrs)["encoding-version"] == "0.1.0"
        assert tuple(f["X"].attrs["shape"]) == (3000, 300)
        lazy = anndata.experimental.read_elem_lazy(f["X"])
        assert lazy.shape == (3000, 300)
        assert _same_csr(lazy[2040:2060].compute(), whole[2040:2060])


def test_read_screen_accepts_the_file(small_file):
    adata = pp.read_screen(small_file[0], "perturbation", "non-targeting", batch_key="batch", guide_key="guide")
    assert adata.n_obs == 3000 and adata.obs["perturbation"].nunique() == 17


def test_gene_set_and_marker_files(small_file, tmp_path):
    path, _ = small_file
    fresh = simulate_screen(**SMALL)
    datasets.write_gmt(tmp_path / "sets.gmt", datasets.planted_gene_sets(fresh, seed=SMALL["seed"]))
    datasets.write_cell_cycle_genes(tmp_path / "cc.tsv", fresh)
    assert (path.parent / "sets.gmt").read_text() == (tmp_path / "sets.gmt").read_text()
    assert (path.parent / "cc.tsv").read_text() == (tmp_path / "cc.tsv").read_text()


def test_many_targets_fit_in_fewer_genes(tmp_path):
    """Targets beyond n_genes // 4 are not measured genes: 100 targets on a 300-gene panel."""
    path = tmp_path / "many.h5ad"
    summary = write_simulated_screen(path, n_cells=1400, n_genes=300, n_targets=100, seed=1)
    adata = anndata.read_h5ad(path)
    assert summary["n_measured_targets"] == 75
    assert adata.uns["simulation"]["params"]["n_measured_targets"] == 75
    assert "TGT075" in adata.var_names and "TGT076" not in adata.var_names
    assert adata.obs["perturbation"].nunique() == 101
    assert len(adata.uns["simulation"]["targets"]) == 100
    # a measured target is knocked down in its own cells
    groups = adata.obs["perturbation"].astype(str).to_numpy()
    gene = adata.var_names.get_loc("TGT003")
    libraries = np.asarray(adata.X.sum(axis=1)).ravel()
    share = np.asarray(adata.X[:, gene].todense()).ravel() / libraries
    assert share[groups == "TGT003"].mean() < 0.6 * share[groups == "non-targeting"].mean()
    with pytest.raises(ValueError, match="n_measured_targets"):
        write_simulated_screen(tmp_path / "bad.h5ad", n_cells=1400, n_genes=300, n_targets=100,
                               n_measured_targets=101)


def test_realistic_depth_and_sparsity(tmp_path):
    """8,000 genes: ~4,000 UMIs per cell, three quarters of the entries zero."""
    summary = write_simulated_screen(tmp_path / "deep.h5ad", n_cells=1100, n_genes=8000, n_targets=20,
                                     compression="gzip", **DEMO_DESIGN)
    assert 3000 <= summary["umis_per_cell_median"] <= 5000
    assert summary["density"] < 0.35
    assert summary["bytes"] < 4 * summary["nnz"]  # gzip: ~2 bytes per non-zero


def _peak_bytes(path, n_cells: int) -> int:
    tracemalloc.start()
    try:
        write_simulated_screen(path, n_cells=n_cells, n_genes=600, n_targets=20, chunk_cells=2048, seed=2)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_follows_the_chunk_not_the_matrix(tmp_path):
    small = _peak_bytes(tmp_path / "small.h5ad", 6_000)
    large = _peak_bytes(tmp_path / "large.h5ad", 30_000)
    with h5py.File(tmp_path / "large.h5ad") as f:
        matrix = sum(f["X"][name].size * f["X"][name].dtype.itemsize for name in ("data", "indices", "indptr"))
    # 24,000 more cells add ~95 MB of CSR but only their design, usage and obs rows (~100 bytes a cell)
    assert large - small < 0.1 * matrix, (small, large, matrix)
    assert large < 0.5 * matrix, (large, matrix)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"path": "screen.zarr"}, "path"),
        ({"chunk_cells": 0}, "chunk_cells"),
        ({"compression": "bz2"}, "compression"),
        ({"n_cells": 50}, "n_cells"),
        ({"n_genes": 100}, "n_genes"),
        ({"guide_efficacy": (0.9, 0.5)}, "guide_efficacy"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, name):
    args = {"path": "screen.h5ad", **SMALL, **kwargs}
    args["path"] = tmp_path / args["path"]
    with pytest.raises(ValueError, match=name):
        write_simulated_screen(**args)
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(datasets, "_append_counts", fail)
    with pytest.raises(OSError, match="disk full"):
        write_simulated_screen(tmp_path / "screen.h5ad", **SMALL)
    assert not list(tmp_path.iterdir())


def test_subset_holds_the_kept_cells_and_their_truth(small_file, tmp_path):
    full = anndata.read_h5ad(small_file[0])
    targets = [t for t in full.obs["perturbation"].cat.categories if t != datasets.CONTROL_LABEL][:3]
    keep = full.obs["perturbation"].isin([datasets.CONTROL_LABEL, *targets]).to_numpy()
    path = tmp_path / "subset.h5ad"
    summary = datasets.write_screen_subset(small_file[0], path, keep, chunk_cells=700)
    sub = anndata.read_h5ad(path)
    assert summary["n_cells"] == sub.n_obs == keep.sum() and summary["nnz"] == sub.X.nnz
    assert _same_csr(sub.X, full.X[keep])
    assert sub.obs_names.equals(full.obs_names[keep])
    np.testing.assert_array_equal(sub.obsm["simulation_usage"], full.obsm["simulation_usage"][keep])
    assert set(sub.obs["perturbation"].cat.categories) == {datasets.CONTROL_LABEL, *targets}
    truth = sub.uns["simulation"]
    assert set(truth["effects"]["perturbation"]) <= set(targets) and set(truth["targets"]) == set(targets)
    planted = full.uns["simulation"]["effects"]
    assert len(truth["effects"]) == planted["perturbation"].isin(targets).sum()
    assert truth["subset_of"]["n_cells"] == full.n_obs


def test_subset_positions_and_bad_cells(small_file, tmp_path):
    n = anndata.read_h5ad(small_file[0], backed="r").n_obs
    positions = np.arange(0, n, 7)
    sub = anndata.read_h5ad(datasets.write_screen_subset(small_file[0], tmp_path / "s.h5ad", positions)["path"])
    assert sub.n_obs == positions.size
    with pytest.raises(ValueError, match="cells: a boolean mask"):
        datasets.write_screen_subset(small_file[0], tmp_path / "t.h5ad", np.ones(n + 1, dtype=bool))
    with pytest.raises(ValueError, match=r"cells: positions must lie"):
        datasets.write_screen_subset(small_file[0], tmp_path / "t.h5ad", [n])
    with pytest.raises(ValueError, match="cells: no cell"):
        datasets.write_screen_subset(small_file[0], tmp_path / "t.h5ad", np.zeros(n, dtype=bool))
    assert not (tmp_path / "t.h5ad").exists()
