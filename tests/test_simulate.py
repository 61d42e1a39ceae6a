"""Tests of perturbnmf.datasets: a Perturb-seq screen with known truth."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbnmf.datasets import (
    planted_gene_sets,
    simulate_screen,
    write_cell_cycle_genes,
    write_gmt,
)

SMALL = dict(n_cells=600, n_genes=300)


@pytest.fixture(scope="module")
def default_screen():
    return simulate_screen()


@pytest.fixture(scope="module")
def small_screen():
    return simulate_screen(**SMALL, seed=3)


def _usage_ratio(adata, perturbation, program):
    sim = adata.uns["simulation"]
    usage = adata.obsm["simulation_usage"]
    p = sim["program_names"].index(program)
    cells = (adata.obs["perturbation"] == perturbation).to_numpy()
    ctrl = adata.obs["is_control"].to_numpy()
    return usage[cells, p].mean() / usage[ctrl, p].mean()


# ---- defaults, layout and counts --------------------------------------------------------
def test_defaults_meet_minimums(default_screen):
    a = default_screen
    assert a.n_obs >= 3000 and a.n_vars >= 1500
    targets = [c for c in a.obs["perturbation"].cat.categories if c != "non-targeting"]
    assert len(targets) >= 15
    assert "non-targeting" in a.obs["perturbation"].cat.categories
    assert list(a.obs["batch"].cat.categories) == ["batch_1", "batch_2"]
    assert a.obs_names.is_unique and a.var_names.is_unique
    assert all(g == g.upper() for g in a.var_names)
    totals = np.asarray(a.X.sum(axis=1)).ravel()
    assert 3000 <= np.median(totals) <= 5000
    means = np.asarray(a.X.mean(axis=0)).ravel()
    assert np.percentile(means, 95) / np.percentile(means, 5) > 20  # realistic spread
    # about 200 cells per target with the defaults
    sizes = a.obs["perturbation"].value_counts()
    assert sizes.drop("non-targeting").between(180, 260).all()


def test_counts_are_csr_int32(small_screen):
    X = small_screen.X
    assert isinstance(X, sp.csr_matrix)
    assert X.dtype == np.int32
    assert X.data.min() >= 0
    assert X.shape == (600, 300)


def test_obs_columns_and_categories(small_screen):
    a = small_screen
    for col in ("perturbation", "guide", "batch"):
        assert isinstance(a.obs[col].dtype, pd.CategoricalDtype), col
    assert a.obs["is_control"].dtype == bool
    ctrl = a.obs["is_control"].to_numpy()
    assert (a.obs["perturbation"].astype(str)[ctrl] == "non-targeting").all()
    assert (a.obs["perturbation"].astype(str)[~ctrl] != "non-targeting").all()
    assert set(a.obs["guide"].astype(str)[ctrl]) <= {"NTg1", "NTg2", "NTg3", "NTg4"}
    guides = a.obs["guide"].astype(str)[~ctrl]
    perts = a.obs["perturbation"].astype(str)[~ctrl]
    assert all(g.startswith(p) and g[len(p):] in ("g1", "g2", "g3") for g, p in zip(guides, perts))
    assert a.uns["control_label"] == "non-targeting"
    assert a.obsm["simulation_usage"].shape == (600, 8)
    assert a.varm["simulation_weights"].shape == (300, 8)
    assert (a.obsm["simulation_usage"] >= 0).all()
    assert (a.varm["simulation_weights"] >= 0).all()


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_control_fraction(fraction):
    a = simulate_screen(**SMALL, control_fraction=fraction)
    assert abs(a.obs["is_control"].mean() - fraction) <= 0.03


def test_determinism():
    a = simulate_screen(**SMALL, seed=7)
    b = simulate_screen(**SMALL, seed=7)
    c = simulate_screen(**SMALL, seed=8)
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.uns["simulation"]["effects"], b.uns["simulation"]["effects"])
    assert (a.X != c.X).nnz > 0


def test_defaults_unchanged_checksum(small_screen):
    """Regression: the default random stream must not change (new options draw elsewhere)."""
    a = small_screen  # n_cells=600, n_genes=300, seed=3
    X = a.X
    assert int(X.sum()) == 2524039 and X.nnz == 139748
    assert X[0].indices[:6].tolist() == [0, 2, 3, 4, 5, 7]
    assert X[0].data[:6].tolist() == [41, 42, 2, 6, 2, 53]
    assert [int(X[i, j]) for i, j in [(0, 0), (17, 5), (599, 299), (250, 120)]] == [41, 0, 11, 1]
    assert np.asarray(X.sum(axis=0)).ravel()[:5].tolist() == [47981, 54, 12609, 785, 1629]
    assert np.asarray(X.sum(axis=1)).ravel()[-3:].tolist() == [3568, 5095, 3253]
    sim = a.uns["simulation"]
    assert a.varm["simulation_weights"].sum() == pytest.approx(164.37163504694172, rel=1e-9)
    assert a.obsm["simulation_usage"].sum() == pytest.approx(3278.8262395605625, rel=1e-9)
    assert sim["effects"]["fold_change"].sum() == pytest.approx(22.32776513694399, rel=1e-9)
    assert sim["null_targets"] == ["TGT05", "TGT07", "TGT11", "TGT13", "TGT14"]
    assert a.obs["guide"].astype(str).iloc[:3].tolist() == ["TGT04g1", "NTg3", "TGT03g1"]
    assert "guide_efficacy" not in sim
    assert set(sim["params"]) == {
        "n_cells", "n_genes", "n_programs", "n_targets", "n_batches",
        "n_guides_per_target", "n_control_guides", "control_fraction", "seed",
    }


# ---- truth ------------------------------------------------------------------------------
def test_programs_planted(small_screen):
    sim = small_screen.uns["simulation"]
    names = sim["program_names"]
    assert len(names) == 8 and len(set(names)) == 8
    assert "S_PHASE" in names and "G2M_CHECKPOINT" in names
    W = small_screen.varm["simulation_weights"]
    members = (W > 0).sum(axis=0)
    assert (members >= 8).all()
    assert not (W[small_screen.var_names.str.startswith("MT-")] > 0).any()


def test_program_sizes_with_default_genes(default_screen):
    members = (default_screen.varm["simulation_weights"] > 0).sum(axis=0)
    assert ((members >= 30) & (members <= 85)).all()


def test_effects_table(default_screen):
    sim = default_screen.uns["simulation"]
    effects = sim["effects"]
    assert list(effects.columns) == ["perturbation", "program", "fold_change", "direction"]
    nulls = set(sim["null_targets"])
    targets = set(default_screen.obs["perturbation"].cat.categories) - {"non-targeting"}
    assert len(nulls) >= 4
    assert nulls <= targets
    assert not set(effects["perturbation"]) & nulls
    assert set(effects["perturbation"]) | nulls == targets
    assert set(effects["direction"]) == {"up", "down"}
    assert set(effects["program"]) <= set(sim["program_names"])
    per_target = effects.groupby("perturbation").size()
    assert per_target.max() <= 2 and (per_target == 1).sum() >= len(targets) // 3
    up = effects["direction"] == "up"
    assert (effects.loc[up, "fold_change"] > 1).all() and (effects.loc[~up, "fold_change"] < 1).all()
    assert sim["params"]["n_cells"] == 4000 and sim["seed"] == 0


def test_effects_are_real(default_screen):
    a = default_screen
    sim = a.uns["simulation"]
    for row in sim["effects"].itertuples():
        ratio = _usage_ratio(a, row.perturbation, row.program)
        if row.direction == "up":
            assert ratio > 1.5, (row.perturbation, row.program, ratio)
        else:
            assert ratio < 0.67, (row.perturbation, row.program, ratio)
    for target in sim["null_targets"]:
        for program in sim["program_names"]:
            ratio = _usage_ratio(a, target, program)
            assert abs(ratio - 1) < 0.15, (target, program, ratio)


def test_cell_cycle_programs_follow_phase(small_screen):
    a = small_screen
    names = a.uns["simulation"]["program_names"]
    usage = a.obsm["simulation_usage"]
    phase = a.obs["simulation_phase"].astype(str).to_numpy()
    s = usage[:, names.index("S_PHASE")]
    g2m = usage[:, names.index("G2M_CHECKPOINT")]
    assert s[phase == "S"].mean() > 5 * s[phase != "S"].mean()
    assert g2m[phase == "G2M"].mean() > 5 * g2m[phase != "G2M"].mean()


def test_target_knockdown(small_screen):
    a = small_screen
    X = a.X.toarray().astype(float)
    norm = X / X.sum(axis=1, keepdims=True)
    ctrl = a.obs["is_control"].to_numpy()
    target = "TGT01"
    cells = (a.obs["perturbation"] == target).to_numpy()
    j = a.var_names.get_loc(target)
    assert norm[cells, j].mean() < 0.6 * norm[ctrl, j].mean()


def test_mito_genes_visible(default_screen):
    a = default_screen
    mito = a.var_names.str.startswith("MT-")
    assert 8 <= mito.sum() <= 13
    assert {"MT-ND1", "MT-CO1"} <= set(a.var_names)
    totals = np.asarray(a.X.sum(axis=1)).ravel()
    share = np.asarray(a.X[:, mito].sum(axis=1)).ravel() / totals
    assert 0.02 < np.median(share) < 0.15
    assert share.max() > 2 * np.median(share)  # some damaged cells for QC to catch
    means = np.asarray(a.X.mean(axis=0)).ravel()
    assert np.median(means[mito]) > np.percentile(means[~mito], 95)  # highly expressed


# ---- benchmark options: down-regulated genes and guide efficacy --------------------------
DOWN = dict(n_cells=1500, n_genes=400, n_down_genes=12, seed=4)


@pytest.fixture(scope="module")
def down_screen():
    return simulate_screen(**DOWN)


def test_down_genes_layout(down_screen):
    a = down_screen
    W = a.varm["simulation_weights"]
    plain = a.var_names.str.startswith("GENE")
    neg, pos = W < 0, W > 0
    assert (neg.sum(axis=0) == 12).all()
    assert not neg[~plain].any()  # never targets or mitochondrial genes
    assert not (neg & pos).any()  # never a member of the program it lowers
    # plenty of room here: lowered genes are in no program and distinct between programs
    assert not (neg.any(axis=1) & pos.any(axis=1)).any()
    assert (neg.sum(axis=1) <= 1).all()
    assert ((-W[neg] >= 0.3) & (-W[neg] <= 2.0)).all()
    assert a.uns["simulation"]["params"]["n_down_genes"] == 12
    # separate random stream: the rest of the truth is that of the same seed without them
    plain_run = simulate_screen(**{**DOWN, "n_down_genes": 0})
    np.testing.assert_array_equal(np.where(pos, W, 0.0), plain_run.varm["simulation_weights"])
    np.testing.assert_array_equal(a.obsm["simulation_usage"], plain_run.obsm["simulation_usage"])
    pd.testing.assert_frame_equal(a.uns["simulation"]["effects"], plain_run.uns["simulation"]["effects"])
    pd.testing.assert_frame_equal(a.obs, plain_run.obs)


def test_down_genes_are_lowered(down_screen):
    a = down_screen
    W = a.varm["simulation_weights"]
    usage = a.obsm["simulation_usage"]
    X = a.X.toarray().astype(float)
    norm = X / X.sum(axis=1, keepdims=True)
    names = a.uns["simulation"]["program_names"]
    for p, name in enumerate(names):
        if name in ("S_PHASE", "G2M_CHECKPOINT"):  # never exactly zero: low vs high phase usage
            low = usage[:, p] <= np.quantile(usage[:, p], 0.25)
        else:
            low = usage[:, p] == 0
        high = usage[:, p] >= np.quantile(usage[:, p], 0.75)
        genes = np.flatnonzero(W[:, p] < 0)
        ratio = norm[high][:, genes].mean(axis=0) / norm[low][:, genes].mean(axis=0)
        assert np.median(ratio) < 0.6, (name, ratio)
        assert (ratio < 1).mean() >= 0.9, (name, ratio)
        # and raw counts too
        assert X[high][:, genes].mean() < X[low][:, genes].mean(), name


EFFICACY = dict(n_cells=3000, n_genes=400, n_targets=20, seed=6)


@pytest.fixture(scope="module")
def efficacy_screens():
    return simulate_screen(**EFFICACY, guide_efficacy=(0.2, 1.0)), simulate_screen(**EFFICACY)


def test_guide_efficacy_stored(efficacy_screens):
    a, full = efficacy_screens
    sim = a.uns["simulation"]
    eff = sim["guide_efficacy"]
    assert isinstance(eff, pd.DataFrame)
    targeting = [g for g in a.obs["guide"].cat.categories if not g.startswith("NT")]
    assert list(eff.index) == targeting
    assert list(eff["perturbation"]) == [g[:-2] for g in targeting]
    assert eff["efficacy"].between(0.2, 1.0).all()
    assert eff["efficacy"].std() > 0.1
    assert sim["params"]["guide_efficacy"] == [0.2, 1.0]
    # the effects table keeps the nominal fold change; design and truth otherwise unchanged
    pd.testing.assert_frame_equal(sim["effects"], full.uns["simulation"]["effects"])
    pd.testing.assert_frame_equal(a.obs, full.obs)
    np.testing.assert_array_equal(a.varm["simulation_weights"], full.varm["simulation_weights"])


def test_guide_efficacy_scales_effects(efficacy_screens):
    a, full = efficacy_screens
    sim = a.uns["simulation"]
    eff = sim["guide_efficacy"]["efficacy"]
    names = sim["program_names"]
    guides = a.obs["guide"].astype(str).to_numpy()
    ctrl = a.obs["is_control"].to_numpy()
    usage, usage_full = a.obsm["simulation_usage"], full.obsm["simulation_usage"]
    strong, weak = [], []
    median = eff.median()
    for row in sim["effects"].itertuples():
        p = names.index(row.program)
        for guide in eff.index[eff.index.str.startswith(row.perturbation + "g")]:
            cells = guides == guide
            # exact: usage is the full-efficacy usage times fold_change ** (e - 1)
            np.testing.assert_allclose(
                usage[cells, p], usage_full[cells, p] * row.fold_change ** (eff[guide] - 1.0), rtol=1e-12
            )
            size = abs(np.log(usage[cells, p].mean() / usage[ctrl, p].mean()))
            (strong if eff[guide] > median else weak).append(size)
    assert len(strong) >= 20 and len(weak) >= 20
    assert np.mean(strong) > 1.25 * np.mean(weak)  # ~1.9 here; >= 1.38 over seeds 0-19


# ---- files ------------------------------------------------------------------------------
def test_planted_gene_sets(small_screen):
    sets = planted_gene_sets(small_screen, n_decoys=12, seed=1)
    names = small_screen.uns["simulation"]["program_names"]
    planted = [k for k in sets if k.startswith("PLANTED_")]
    decoys = [k for k in sets if k.startswith("DECOY_")]
    assert planted == [f"PLANTED_{n}" for n in names]
    assert decoys == [f"DECOY_{i:03d}" for i in range(1, 13)]
    W = small_screen.varm["simulation_weights"]
    genes = set(small_screen.var_names)
    for p, name in enumerate(names):
        expected = set(small_screen.var_names[W[:, p] > 0])
        assert set(sets[f"PLANTED_{name}"]) == expected
    sizes = [len(sets[k]) for k in planted]
    for k in decoys:
        assert min(sizes) <= len(sets[k]) <= max(sizes)
        assert set(sets[k]) <= genes and len(set(sets[k])) == len(sets[k])
    assert planted_gene_sets(small_screen, n_decoys=12, seed=1) == sets
    assert planted_gene_sets(small_screen, n_decoys=12, seed=2) != sets


def test_gmt_round_trip(tmp_path):
    sets = {"SET_A": ["G1", "G2", "G3"], "SET_B": ["G4"], "PLANTED_X": ["GENE0001", "GENE0002"]}
    path = write_gmt(tmp_path / "sets.gmt", sets, description="demo")
    parsed = {}
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        assert fields[1] == "demo"
        parsed[fields[0]] = fields[2:]
    assert parsed == sets
    # empty description: still three or more tab-separated fields per line
    path = write_gmt(tmp_path / "plain.gmt", sets)
    assert all(len(line.split()) >= 3 for line in path.read_text().splitlines())
    with pytest.raises(ValueError, match="gene_sets"):
        write_gmt(tmp_path / "bad.gmt", {"EMPTY": []})


def test_cell_cycle_file(small_screen, tmp_path):
    path = write_cell_cycle_genes(tmp_path / "cc.tsv", small_screen)
    lines = path.read_text().splitlines()
    assert lines[0] == "gene\tphase"
    table = pd.read_csv(path, sep="\t")
    assert set(table["phase"]) == {"S", "G2M"}
    assert table["gene"].is_unique
    present = set(small_screen.var_names)
    absent = table[~table["gene"].isin(present)]
    assert (absent["phase"] == "S").sum() == 3 and (absent["phase"] == "G2M").sum() == 3
    names = small_screen.uns["simulation"]["program_names"]
    W = small_screen.varm["simulation_weights"]
    s_genes = set(table.loc[table["phase"] == "S", "gene"]) & present
    g2m_genes = set(table.loc[table["phase"] == "G2M", "gene"]) & present
    s_members = set(small_screen.var_names[W[:, names.index("S_PHASE")] > 0])
    g2m_members = set(small_screen.var_names[W[:, names.index("G2M_CHECKPOINT")] > 0])
    assert s_genes <= s_members and g2m_genes <= g2m_members
    assert s_genes | g2m_genes == s_members | g2m_members


def test_simulated_inputs_survive_the_files(tmp_path):
    """The demo's three input files (as report.inputs.write_simulated_inputs writes them) read back whole."""
    paths = {"input": tmp_path / "simulated_screen.h5ad", "gene_sets": tmp_path / "simulated_gene_sets.gmt",
             "cell_cycle_genes": tmp_path / "simulated_cell_cycle_genes.tsv"}
    adata = simulate_screen(seed=5, **SMALL)
    adata.write_h5ad(paths["input"])
    write_gmt(paths["gene_sets"], planted_gene_sets(adata, seed=5))
    write_cell_cycle_genes(paths["cell_cycle_genes"], adata)
    assert all(p.is_file() for p in paths.values())
    back = anndata.read_h5ad(paths["input"])
    fresh = simulate_screen(seed=5, **SMALL)
    assert (back.X != fresh.X).nnz == 0
    assert back.uns["control_label"] == "non-targeting"
    sim = back.uns["simulation"]
    assert list(sim["program_names"]) == fresh.uns["simulation"]["program_names"]
    pd.testing.assert_frame_equal(
        sim["effects"].reset_index(drop=True), fresh.uns["simulation"]["effects"], check_dtype=False
    )
    assert list(sim["null_targets"]) == fresh.uns["simulation"]["null_targets"]
    np.testing.assert_allclose(back.varm["simulation_weights"], fresh.varm["simulation_weights"])
    np.testing.assert_allclose(back.obsm["simulation_usage"], fresh.obsm["simulation_usage"])
    gmt = paths["gene_sets"].read_text().splitlines()
    assert len(gmt) == 8 + 40
    assert pd.read_csv(paths["cell_cycle_genes"], sep="\t").columns.tolist() == ["gene", "phase"]


# ---- argument checks --------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n_cells": 0}, "n_cells"),
        ({"n_cells": 50}, "n_cells"),
        ({"n_cells": 600.5}, "n_cells"),
        ({"n_genes": 100}, "n_genes"),
        ({"n_programs": 2}, "n_programs"),
        ({"n_targets": 3}, "n_targets"),
        ({"n_batches": 0}, "n_batches"),
        ({"n_guides_per_target": 0}, "n_guides_per_target"),
        ({"n_control_guides": 0}, "n_control_guides"),
        ({"control_fraction": 0.0}, "control_fraction"),
        ({"control_fraction": 1.5}, "control_fraction"),
        ({"control_fraction": "a lot"}, "control_fraction"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"n_down_genes": -1}, "n_down_genes"),
        ({"n_down_genes": 2.5}, "n_down_genes"),
        ({"n_down_genes": True}, "n_down_genes"),
        ({"n_down_genes": 68}, "n_down_genes"),  # 300 genes leave room for 67 at most
        ({"guide_efficacy": (0.0, 1.0)}, "guide_efficacy"),
        ({"guide_efficacy": (0.5, 1.2)}, "guide_efficacy"),
        ({"guide_efficacy": (0.9, 0.5)}, "guide_efficacy"),
        ({"guide_efficacy": (0.5, float("nan"))}, "guide_efficacy"),
        ({"guide_efficacy": (0.5,)}, "guide_efficacy"),
        ({"guide_efficacy": (0.2, 0.5, 1.0)}, "guide_efficacy"),
        ({"guide_efficacy": 0.5}, "guide_efficacy"),
        ({"guide_efficacy": "0.5,1"}, "guide_efficacy"),
        ({"guide_efficacy": (True, 1.0)}, "guide_efficacy"),
    ],
)
def test_bad_arguments(kwargs, name):
    args = {**SMALL, **kwargs}
    with pytest.raises(ValueError, match=name):
        simulate_screen(**args)


def test_bad_arguments_of_helpers(small_screen, tmp_path):
    with pytest.raises(ValueError, match="n_decoys"):
        planted_gene_sets(small_screen, n_decoys=-1)
    bare = anndata.AnnData(np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="simulation"):
        planted_gene_sets(bare)
    with pytest.raises(ValueError, match="simulation"):
        write_cell_cycle_genes(tmp_path / "cc.tsv", bare)
