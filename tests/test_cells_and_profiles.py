"""The pictures of the cells (program-usage UMAP), the per-perturbation summary and the program profiles."""

import matplotlib

matplotlib.use("Agg")

import anndata as ad  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from perturbnmf import pl, tl  # noqa: E402


def _factorized(n_groups=30, cells_per_group=40, n_control=400, k=4, seed=0):
    """A screen whose usage has k clear programs: target i raises program i % k in its cells."""
    rng = np.random.default_rng(seed)
    groups = ["non-targeting"] * n_control + [f"TGT{g:03d}" for g in range(n_groups) for _ in range(cells_per_group)]
    usage = rng.gamma(2.0, 0.5, size=(len(groups), k))
    for g in range(n_groups):
        rows = slice(n_control + g * cells_per_group, n_control + (g + 1) * cells_per_group)
        usage[rows, g % k] += 4.0
    adata = ad.AnnData(obs=pd.DataFrame({"perturbation": pd.Categorical(groups)},
                                        index=[f"c{i}" for i in range(len(groups))]))
    adata.obsm["X_snmf"] = usage.astype(np.float32)
    adata.uns["snmf"] = {"program_names": [f"P{i + 1:02d}" for i in range(k)]}
    return adata


def test_stratified_sample_keeps_every_groups_share():
    groups = pd.Series(["a"] * 700 + ["b"] * 200 + ["c"] * 97 + ["d"] * 3)
    chosen = tl.stratified_sample(groups, 100, seed=1)
    assert len(chosen) == 100 and len(np.unique(chosen)) == 100 and np.all(np.diff(chosen) > 0)
    counts = groups.iloc[chosen].value_counts()
    exact = groups.value_counts() * 100 / len(groups)
    assert (abs(counts.reindex(exact.index, fill_value=0) - exact) < 1).all()  # within one cell of the share
    assert counts["a"] == 70 and counts["b"] == 20
    assert np.array_equal(chosen, tl.stratified_sample(groups, 100, seed=1))  # reproducible
    assert not np.array_equal(chosen, tl.stratified_sample(groups, 100, seed=2))
    assert np.array_equal(tl.stratified_sample(groups, 5_000), np.arange(1000))  # fewer cells than asked: all


def test_umap_on_all_cells_separates_the_programs_and_is_reproducible():
    adata = _factorized()
    tl.umap(adata, "perturbation", max_cells=None, seed=3)
    xy = adata.obsm["X_umap_snmf"]
    assert xy.shape == (adata.n_obs, 2) and np.isfinite(xy).all()
    assert adata.uns["umap_snmf"]["n_cells"] == adata.n_obs
    assert adata.uns["umap_snmf"]["params"]["random_state"] == 3
    # cells raising the same program sit together: nearer their own group's centre than another program's
    groups = adata.obs["perturbation"].astype(str)
    centres = pd.DataFrame(xy, index=groups.index).groupby(groups.to_numpy()).mean()
    own = np.linalg.norm(centres.loc["TGT000"] - centres.loc["TGT004"])  # both raise P01
    other = np.linalg.norm(centres.loc["TGT000"] - centres.loc["TGT001"])  # P01 vs P02
    assert own < other
    again = _factorized()
    tl.umap(again, "perturbation", max_cells=None, seed=3)
    np.testing.assert_allclose(again.obsm["X_umap_snmf"], xy)


@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")  # scanpy's own call
def test_umap_on_a_stratified_subsample_leaves_the_other_cells_nan():
    # 9,200 cells: where scanpy's default neighbours (pynndescent) failed on scipy >= 1.15
    adata = _factorized(n_groups=220)
    tl.umap(adata, "perturbation", max_cells=9000, seed=0)
    embedded = np.isfinite(adata.obsm["X_umap_snmf"]).all(axis=1)
    assert embedded.sum() == 9000 == adata.uns["umap_snmf"]["n_cells"]
    shares = adata.obs.loc[embedded, "perturbation"].value_counts() / 9000
    expected = adata.obs["perturbation"].value_counts() / adata.n_obs
    assert (abs(shares - expected) * 9000 < 1).all()  # every perturbation keeps its share
    # scanpy's embedding plot reads it as any other basis
    import scanpy as sc

    sc.pl.embedding(adata, basis="umap_snmf", color="perturbation", show=False)
    plt.close("all")
    with pytest.raises(ValueError, match="max_cells"):
        tl.umap(adata, "perturbation", max_cells=5)


def test_embedding_figures_are_titled_and_one_panel_per_group():
    adata = _factorized()
    tl.umap(adata, "perturbation", max_cells=600, seed=0)
    fig = pl.program_embedding(adata)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in titled] == ["P01", "P02", "P03", "P04"]
    assert "600 of 1,600 cells" in fig._suptitle.get_text()
    plt.close(fig)
    fig = pl.perturbation_embedding(adata, adata.obs["perturbation"], ["TGT001", "TGT002"], "non-targeting",
                                    notes={"TGT001": "primary P02"})
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert titles[0].startswith("non-targeting") and titles[1].startswith("TGT001") and "primary P02" in titles[1]
    assert " of 40 cells" in titles[1]  # on a subsample: how many of the target's cells are embedded
    # each panel draws its group's embedded cells on top of the rest
    embedded = np.isfinite(adata.obsm["X_umap_snmf"]).all(axis=1)
    n_target = int((adata.obs["perturbation"][embedded] == "TGT001").sum())
    assert len(fig.axes[1].collections[1].get_offsets()) == n_target
    plt.close(fig)
    with pytest.raises(ValueError, match="tl.umap"):
        pl.program_embedding(_factorized())


@pytest.fixture
def contrasts():
    rows = []
    effects = {("A", "P01"): (1.2, 1e-8), ("A", "P02"): (-0.4, 1e-3), ("B", "P02"): (0.9, 1e-5),
               ("C", "P01"): (0.3, 0.2), ("C", "P03"): (-0.2, 0.01)}
    for target in ("A", "B", "C", "D"):
        for program in ("P01", "P02", "P03"):
            d, q = effects.get((target, program), (0.05, 0.9))
            rows.append({"program": program, "perturbation": target, "n_cells": 50, "effect_std": d, "qvalue": q})
    return pd.DataFrame(rows)


def test_perturbation_summary_one_row_per_target(contrasts):
    summary = tl.perturbation_summary(contrasts, fdr=0.05).set_index("perturbation")
    assert list(summary.reset_index().columns) == tl.SUMMARY_COLUMNS
    assert list(summary.index) == ["A", "B", "C", "D"]  # most hits first, then q
    assert summary.loc["A", "n_hits"] == 2 and summary.loc["A", "strongest_program"] == "P01"
    assert summary.loc["A", "programs_up"] == "P01" and summary.loc["A", "programs_down"] == "P02"
    # C's only hit (P03, smaller |d|) is its strongest, not the larger non-significant P01
    assert summary.loc["C", "strongest_program"] == "P03" and summary.loc["C", "qvalue"] == 0.01
    assert summary.loc["D", "n_hits"] == 0 and summary.loc["D", "programs_up"] == ""
    summary = summary.reset_index()
    assert tl.top_targets(summary, 2) == ["A", "B"]
    assert tl.top_targets(summary, 10) == ["A", "B", "C"]  # no target without a hit


def test_program_profiles_colour_the_hits(contrasts):
    fig = pl.program_profiles(contrasts, ["A", "C"], fdr=0.05)
    first = fig.axes[0]
    heights = [bar.get_height() for bar in first.patches]
    assert heights == pytest.approx([1.2, -0.4, 0.05])
    colours = [matplotlib.colors.to_hex(bar.get_facecolor()) for bar in first.patches]
    assert colours == ["#c0392b", "#2c7fb8", "#c8c8c8"]  # raised hit, lowered hit, not significant
    assert first.get_title().startswith("A (2 hits") and first.get_ylabel() == "Cohen's d"
    assert "perturbations with the most hits" in fig._suptitle.get_text()
    plt.close(fig)


def test_compact_figure_keeps_a_scatter_of_cells_small(monkeypatch):
    import io

    from PIL import Image

    from perturbnmf.report import html

    shown = []
    monkeypatch.setattr("IPython.display.display", shown.append)
    adata = _factorized(n_groups=60)
    tl.umap(adata, "perturbation", max_cells=None, seed=0)
    fig = pl.program_embedding(adata)
    full = io.BytesIO()
    fig.savefig(full, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    size = html.compact_figure(fig)
    assert not plt.fignum_exists(fig.number)  # closed: the inline backend does not show it a second time
    assert len(shown) == 1 and len(shown[0].data) == size < full.tell() / 2
    image = Image.open(io.BytesIO(shown[0].data))
    assert image.mode == "P" and len(image.getcolors()) <= 64


@pytest.mark.filterwarnings("ignore:The set_bad function:PendingDeprecationWarning")  # scanpy's own call
def test_factorized_h5ad_of_a_run_carries_the_embedding_for_scanpy(tiny_run):
    import scanpy as sc

    run, _ = tiny_run
    adata = ad.read_h5ad(run / "data" / "factorized.h5ad")
    xy = adata.obsm["X_umap_snmf"]
    assert xy.shape == (adata.n_obs, 2) and np.isfinite(xy).all()  # a tiny screen: every cell embedded
    params = adata.uns["umap_snmf"]["params"]
    assert params["random_state"] == 0 and params["stratified_by"] == "perturbation"
    assert params["max_cells"] == 50_000 and adata.uns["umap_snmf"]["n_cells"] == adata.n_obs
    sc.pl.embedding(adata, basis="umap_snmf", color="perturbation", show=False)
    plt.close("all")
    summary = pd.read_csv(run / "data" / "perturbation_summary.csv")
    contrasts = pd.read_csv(run / "data" / "program_contrasts.csv")
    assert list(summary.columns) == tl.SUMMARY_COLUMNS
    assert set(summary["perturbation"]) == set(contrasts["perturbation"])
