"""Figures, tables and reports of a genome-wide screen (10,000 targets, 30,000 guides) stay readable
and small: each figure summarises (the groups that differ most, the strongest hits, a distribution)
instead of drawing one row per perturbation, each table shows its first rows and says where the rest
is, and the statistics stay vectorised; with few perturbations the figures are unchanged.

``write_factorized_screen`` builds what steps 3 and 4 read (a factorised screen's obs, usage, gene
scores and truth) directly, without steps 1-2, at any size; ``benchmarks/bench_reports.py`` runs the
two steps' notebooks on it and measures them.
"""

import io
import json
import re
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from perturbnmf import pl  # noqa: E402
from perturbnmf.report import artifacts  # noqa: E402

CONTROL = "non-targeting"
N_TARGETS = 10_000


@pytest.fixture(scope="module")
def screen():
    """Usage of 4 programs in 10,000 perturbations × 6 cells + 600 control cells; targets TGT0000-0009
    (30 cells each) raise program P1 strongly, TGT0010-0019 (30 cells each) lower P2."""
    rng = np.random.default_rng(0)
    groups = np.array([CONTROL] * 600 + [f"TGT{i:04d}" for i in range(N_TARGETS) for _ in range(30 if i < 20 else 6)])
    usage = pd.DataFrame(rng.gamma(2.0, 1.0, size=(len(groups), 4)), columns=["P1", "P2", "P3", "P4"])
    usage["P2"] = rng.gamma(8.0, 1.0, size=len(groups))  # a program every cell uses, so that losing it shows
    usage.loc[np.isin(groups, [f"TGT{i:04d}" for i in range(10)]), "P1"] += 8.0
    usage.loc[np.isin(groups, [f"TGT{i:04d}" for i in range(10, 20)]), "P2"] *= 0.05
    obs = pd.DataFrame({"perturbation": groups, "batch": rng.choice(["b1", "b2"], len(groups))})
    return usage, pd.Series(groups), obs


@pytest.fixture(scope="module")
def contrasts(screen):
    rng = np.random.default_rng(1)
    rows = [{"perturbation": f"TGT{i:04d}", "program": p, "effect_std": rng.normal(0, 0.2), "pvalue": rng.random()}
            for i in range(N_TARGETS) for p in ("P1", "P2", "P3", "P4")]
    table = pd.DataFrame(rows)
    strong = table["perturbation"].isin([f"TGT{i:04d}" for i in range(20)])
    table.loc[strong, "effect_std"] = 3.0
    table.loc[strong, "pvalue"] = 1e-12
    table["qvalue"] = np.minimum(1.0, table["pvalue"] * len(table) / table["pvalue"].rank())
    table["effect"] = table["effect_std"]
    return table


def _png_bytes(fig) -> int:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.tell()


def _y_labels(ax) -> list[str]:
    return [t.get_text() for t in ax.get_yticklabels() if t.get_text()]


def test_boxplots_show_the_control_and_the_perturbations_that_shift_the_program_most(screen):
    usage, groups, _ = screen
    start = time.perf_counter()
    fig = pl.program_boxplots(usage, groups, ["P1", "P2"], CONTROL)
    seconds = time.perf_counter() - start
    first, second = fig.axes[:2]
    assert len(_y_labels(first)) == pl.MAX_GROUPS_SHOWN and CONTROL in _y_labels(first)
    assert {f"TGT{i:04d}" for i in range(10)} <= set(_y_labels(first))  # the planted shifts of P1
    assert {f"TGT{i:04d}" for i in range(10, 20)} <= set(_y_labels(second))
    assert fig.get_size_inches()[1] < 15 and seconds < 20
    assert _png_bytes(fig) < 1_000_000


def test_effect_heatmap_shows_the_strongest_hits_only(contrasts):
    fig = pl.effect_heatmap(contrasts, 0.05)
    heatmap = next(ax for ax in fig.axes if len(_y_labels(ax)) > 5)
    shown = set(_y_labels(heatmap))
    assert len(shown) <= pl.MAX_HEATMAP_ROWS
    assert {f"TGT{i:04d}" for i in range(20)} <= shown
    assert "with a hit" in fig.texts[0].get_text()
    assert _png_bytes(fig) < 2_000_000


def test_usage_heatmap_shows_the_groups_that_differ_most(screen):
    usage, groups, _ = screen
    fig = pl.usage_heatmap(usage, groups, CONTROL)
    names = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(names) == pl.MAX_GROUPS_SHOWN and names[0] == CONTROL
    assert {f"TGT{i:04d}" for i in range(20)} <= set(names)
    assert _png_bytes(fig) < 1_000_000


def test_cells_per_group_becomes_a_histogram(screen):
    _, _, obs = screen
    fig = pl.cells_per_group(obs, "perturbation", CONTROL, "batch")
    ax = fig.axes[0]
    assert f"{N_TARGETS:,} perturbations" in ax.get_title() and "600 cells" in ax.get_title()
    assert len(_y_labels(ax)) < 20  # a count axis, not one label per perturbation
    assert _png_bytes(fig) < 300_000


def test_few_perturbations_keep_one_row_each(screen):
    usage, groups, obs = screen
    few = groups.isin([CONTROL] + [f"TGT{i:04d}" for i in range(12)]).to_numpy()
    fig = pl.program_boxplots(usage[few], groups[few], ["P1"], CONTROL)
    assert len(_y_labels(fig.axes[0])) == 13
    plt.close(fig)
    fig = pl.cells_per_group(obs[few], "perturbation", CONTROL, "batch")
    assert len(_y_labels(fig.axes[0])) == 13
    plt.close(fig)


def test_a_table_longer_than_excel_allows_continues_on_numbered_sheets(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "EXCEL_MAX_ROWS", 11)  # 10 data rows per sheet
    table = pd.DataFrame({"perturbation": [f"TGT{i:02d}" for i in range(25)], "effect": np.arange(25.0) + 0.5})
    path = artifacts.write_workbook(tmp_path / "summary.xlsx", {"Guide Effects": table, "Small": table.head(3)})
    sheets = pd.read_excel(path, sheet_name=None)
    assert list(sheets) == ["Guide Effects (1)", "Guide Effects (2)", "Guide Effects (3)", "Small"]
    pd.testing.assert_frame_equal(pd.concat([sheets[f"Guide Effects ({i})"] for i in (1, 2, 3)], ignore_index=True),
                                  table)


def test_cell_cycle_phases_show_the_groups_that_differ_most(screen):
    _, groups, obs = screen
    rng = np.random.default_rng(2)
    phases = rng.choice(["G1", "S", "G2M"], size=len(obs), p=[0.5, 0.3, 0.2])
    arrested = obs["perturbation"].isin([f"TGT{i:04d}" for i in range(5)]).to_numpy()
    phases[arrested] = "G2M"  # five targets arrest their cells in G2/M
    fig = pl.cell_cycle_phases(obs.assign(phase=phases), "perturbation")
    shown = _y_labels(fig.axes[0])
    assert len(shown) == pl.MAX_GROUPS_SHOWN and {f"TGT{i:04d}" for i in range(5)} <= set(shown)
    assert "differ most" in fig.axes[0].get_title()
    assert _png_bytes(fig) < 500_000


def test_anova_with_thousands_of_groups_needs_no_dense_design():
    """5,000 groups × 50,000 cells with batches: the old dense design alone was 2 GB; now the memory
    follows cells × programs."""
    import tracemalloc

    from perturbnmf.tl import program_anova

    rng = np.random.default_rng(3)
    n = 50_000
    groups = pd.Series(rng.integers(0, 5000, n).astype(str))
    batch = pd.Series(rng.integers(0, 4, n).astype(str))
    usage = pd.DataFrame(rng.gamma(2.0, 1.0, size=(n, 3)), columns=["P1", "P2", "P3"])
    usage["P1"] += groups.astype(int).to_numpy() % 7 * 0.5  # P1 differs between groups, P2 and P3 do not
    tracemalloc.start()
    start = time.perf_counter()
    table = program_anova(usage, groups, batch=batch)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 200 * 2**20 and seconds < 20, (peak, seconds)
    pvalues = table.set_index("program")["pvalue"]
    assert pvalues["P1"] < 1e-10 and pvalues["P2"] > 1e-4 and pvalues["P3"] > 1e-4
    assert int(table["df_group"].iloc[0]) == 4999 and int(table["df_resid"].iloc[0]) == n - 5000 - 3


# --- 10,000 perturbations: what each figure draws -----------------------------------------------

@pytest.fixture(scope="module")
def tested(screen):
    """program_contrasts of the 10,000-perturbation screen (the real test, as step 3 runs it)."""
    from perturbnmf.tl import program_contrasts

    usage, groups, obs = screen
    start = time.perf_counter()
    table = program_contrasts(usage, groups, CONTROL, batch=obs["batch"].to_numpy())
    return table, time.perf_counter() - start


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts if t.get_text()]


def test_contrasts_of_10000_perturbations_are_vectorised(tested):
    """The rank test of every perturbation at once: 10,000 perturbations in seconds (it was a Python loop
    over groups, each scanning all cells: 80 s at 200,000 cells), and the planted shifts are found."""
    table, seconds = tested
    assert seconds < 20, seconds
    assert table["perturbation"].nunique() == N_TARGETS and len(table) == 4 * N_TARGETS
    hits = table[table["qvalue"] < 0.05]
    assert {f"TGT{i:04d}" for i in range(10)} <= set(hits.loc[hits["program"] == "P1", "perturbation"])
    assert {f"TGT{i:04d}" for i in range(10, 20)} <= set(hits.loc[hits["program"] == "P2", "perturbation"])


def test_each_groups_test_does_not_depend_on_the_other_groups(screen, tested):
    """The vectorised test gives every perturbation exactly (to the bit) the numbers it gets when tested
    alone against the same controls."""
    from perturbnmf.tl import program_contrasts

    usage, groups, obs = screen
    table, _ = tested
    some = [CONTROL, "TGT0003", "TGT0015", "TGT4321", "TGT9999"]
    keep = groups.isin(some).to_numpy()
    alone = program_contrasts(usage[keep], groups[keep], CONTROL, batch=obs["batch"].to_numpy()[keep])
    together = table[table["perturbation"].isin(some)].reset_index(drop=True)
    columns = ["program", "perturbation", "n_cells", "mean_perturbed", "effect", "effect_std", "statistic", "pvalue"]
    pd.testing.assert_frame_equal(alone[columns], together[columns], check_exact=True)


def test_boxplots_given_the_contrasts_show_each_programs_largest_hits(screen, tested):
    usage, groups, _ = screen
    table, _ = tested
    start = time.perf_counter()
    fig = pl.program_boxplots(usage, groups, ["P1", "P2", "P3"], CONTROL, contrasts=table, fdr=0.05)
    seconds = time.perf_counter() - start
    first, second, third = fig.axes[:3]
    hits_p1 = set(table.loc[(table["program"] == "P1") & (table["qvalue"] < 0.05), "perturbation"])
    assert set(_y_labels(first)) == hits_p1 | {CONTROL}  # the hits only, and the control
    assert {f"TGT{i:04d}" for i in range(10, 20)} <= set(_y_labels(second))
    assert "hit" in first.get_title() and "(q < 0.05)" in first.get_title()
    assert not ((table["program"] == "P3") & (table["qvalue"] < 0.05)).any()  # P3: no hit, so the few largest |d|
    assert len(_y_labels(third)) == pl.N_SHOWN_WITHOUT_HIT + 1 and "no hit" in third.get_title()
    assert all(len(_y_labels(ax)) <= pl.MAX_GROUPS_SHOWN for ax in fig.axes)
    assert seconds < 20 and fig.get_size_inches()[1] < 15
    assert _png_bytes(fig) < 1_000_000


def test_effect_heatmap_of_a_screen_shows_its_hits_only_clustered(tested):
    table, _ = tested
    fig = pl.effect_heatmap(table, 0.05)
    heatmap = next(ax for ax in fig.axes if len(_y_labels(ax)) > 5)
    hit_perturbations = set(table.loc[table["qvalue"] < 0.05, "perturbation"])
    shown = set(_y_labels(heatmap))
    assert shown <= hit_perturbations  # no perturbation without a hit fills the rows
    assert len(shown) == min(len(hit_perturbations), pl.MAX_HEATMAP_ROWS)
    assert hasattr(fig, "axes") and len(fig.axes) >= 3  # clustermap: heatmap, two dendrograms, colour bar
    title = fig.texts[0].get_text()
    assert "with a hit" in title and f"{N_TARGETS:,}" in title
    assert _png_bytes(fig) < 2_000_000


def test_effect_heatmap_without_any_hit_says_so(contrasts):
    quiet = contrasts.assign(qvalue=1.0)
    fig = pl.effect_heatmap(quiet, 0.05)
    heatmap = next(ax for ax in fig.axes if len(_y_labels(ax)) > 5)
    assert len(_y_labels(heatmap)) == pl.N_HEATMAP_WITHOUT_HIT
    assert "no hit" in fig.texts[0].get_text()
    plt.close(fig)


def test_volcano_names_only_the_strongest_hits(tested):
    table, _ = tested
    start = time.perf_counter()
    fig = pl.volcano(table, 0.05, n_named=3)
    seconds = time.perf_counter() - start
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 4 and seconds < 20
    for ax in panels:
        names = _texts(ax)
        program = ax.get_title().split(" (")[0]
        hits = table[(table["program"] == program) & (table["qvalue"] < 0.05)]
        assert len(names) == min(3, len(hits))  # 10,000 points, at most three names
        third_smallest = hits["pvalue"].nsmallest(3).max()
        assert set(names) <= set(hits.loc[hits["pvalue"] <= third_smallest, "perturbation"])
        assert ax.get_xlabel() and ax.get_ylabel() and f"{len(hits)} hit" in ax.get_title()
        low, high = ax.get_ylim()
        assert high > -np.log10(max(table.loc[table["program"] == program, "pvalue"].min(), 1e-300))  # names fit
    assert f"{N_TARGETS:,} perturbations" in fig.get_suptitle()
    assert _png_bytes(fig) < 1_500_000


def test_calibration_and_split_half_figures_of_100000_tests_stay_small():
    rng = np.random.default_rng(4)
    fig = pl.null_qq(rng.random(2000), rng.random(100_000))
    assert "100,000 tests" in " ".join(t.get_text() for t in fig.axes[1].get_legend().get_texts())
    assert _png_bytes(fig) < 500_000
    d = rng.normal(0, 0.3, 100_000)
    comparison = pd.DataFrame({"effect_std_seen": d, "effect_std_unseen": d + rng.normal(0, 0.05, d.size),
                               "qvalue_seen": rng.random(d.size), "qvalue_unseen": rng.random(d.size),
                               "program_reproduced": True})
    fig = pl.split_half_scatter(comparison, 0.05, 0.8)
    assert _png_bytes(fig) < 500_000


def test_a_long_table_shows_its_first_rows_and_says_where_the_rest_is(monkeypatch):
    from perturbnmf.report import html

    shown = []
    monkeypatch.setattr(html, "_display", shown.append)
    frame = pd.DataFrame({"perturbation": [f"TGT{i:05d}" for i in range(10_000)], "qvalue": np.linspace(0, 1, 10_000)})
    html.table(frame, "Every perturbation.", full="program_contrasts.csv")
    assert shown[0].count("<tr") == 26  # the header and 25 rows
    assert "Showing the first 25 of 10,000 rows; all of them: program_contrasts.csv." in shown[0]


# --- the reports of steps 3 and 4 at 5,000 targets ---------------------------------------------

def write_factorized_screen(folder, n_targets=10_000, n_cells=200_000, *, n_guides=3, n_control_guides=50,
                            n_programs=10, n_genes=2000, n_batches=4, n_planted=50, control_fraction=0.1,
                            n_random_sets=400, planted_coverage=1.0, truth=True, seed=0) -> dict:
    """A run folder as steps 3 and 4 read it, built directly (no steps 1-2): ``data/factorized.h5ad``
    (obs, usage, split-half usage, gene scores, ``uns['snmf']``; no X), ``data/k_selection.json`` and a
    GMT library ``gene_sets.gmt``.

    ``n_targets`` targets × ``n_guides`` guides and ``n_control_guides`` control guides over ``n_cells``
    cells (``control_fraction`` of them controls; the guides of planted targets ``planted_coverage`` times
    as many as the others) in ``n_batches`` batches; the usage of ``n_programs``
    programs is zero-inflated gamma, and the first ``n_planted`` targets raise (6×) or lower (0.1×) one
    program, the first ten of them a second one (3×), each guide with an efficacy of 0.5-1. Each program
    raises 50 genes and lowers 10, and the library holds one set for each side plus ``n_random_sets``
    random sets. With ``truth``, ``uns['simulation']`` and ``obsm['simulation_usage']`` record the planted
    effects as a simulated screen does (step 3's truth check). Returns the paths and the planted table.
    """
    import anndata as ad

    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    programs = [f"P{i + 1:02d}" for i in range(n_programs)]
    targets = [f"GENE{i:05d}" for i in range(n_targets)]
    obs = _screen_obs(rng, targets, n_cells, n_guides, n_control_guides, n_batches, control_fraction,
                      np.repeat(np.where(np.arange(n_targets) < n_planted, planted_coverage, 1.0), n_guides))
    usage, planted = _planted_usage(rng, obs, targets[:n_planted], n_programs, n_guides)
    split = (usage * rng.lognormal(0.0, 0.05, usage.shape)).astype(np.float32)
    split[(obs["snmf_half"] == "learn").to_numpy()] = np.nan
    genes, scores = _gene_scores(rng, n_genes, n_programs)
    adata = ad.AnnData(obs=obs, var=pd.DataFrame({"snmf_used": np.ones(n_genes, dtype=bool)}, index=genes))
    adata.obsm["X_snmf"], adata.obsm["X_snmf_split"] = usage, split
    adata.varm["snmf_gene_scores"] = scores
    positive = np.clip(scores, 0, None)
    adata.varm["snmf_loadings"] = positive / np.linalg.norm(positive, axis=0)
    selection = {"model": "nmf", "k": n_programs, "suggested_k": n_programs, "k_rule": "built directly",
                 "k_source": "suggested", "relative_error": 0.5, "holdout_relative_error": 0.52, "stability": 0.99}
    n_learn = int((obs["snmf_half"] == "learn").sum())
    adata.uns["snmf"] = dict(selection, program_names=programs, n_restarts=5, solver="hals",
                             split_half={"seed": 0, "n_learn": n_learn, "n_test": n_cells - n_learn,
                                         "cosine": np.full(n_programs, 0.97)},
                             params={"layer": "", "mask_var": "snmf_used"})
    if truth:
        _record_truth(adata, planted, targets, programs, n_planted, usage)
    paths = {"factorized": folder / "data" / "factorized.h5ad", "gmt": folder / "gene_sets.gmt"}
    adata.write_h5ad(paths["factorized"])
    (folder / "data" / "k_selection.json").write_text(json.dumps(selection, indent=2))
    paths["gmt"].write_text(_gene_set_library(rng, genes, n_programs, n_random_sets))
    return {"paths": paths, "planted": planted, "n_cells": n_cells}


def _screen_obs(rng, targets, n_cells, n_guides, n_control_guides, n_batches, control_fraction, coverage):
    """Each cell's guide (the targets' guides drawn in proportion to ``coverage``), target and batch, and
    the half (learn/test) of its group it falls in."""
    n_control = int(control_fraction * n_cells)
    guides = np.array([f"{t}_g{j + 1}" for t in targets for j in range(n_guides)], dtype=object)
    control_guides = np.array([f"NTC_{j + 1:03d}" for j in range(n_control_guides)], dtype=object)
    guide = np.concatenate([rng.choice(control_guides, n_control),
                            rng.choice(guides, n_cells - n_control, p=coverage / coverage.sum())])
    target = np.where(np.char.startswith(guide.astype(str), "NTC_"), CONTROL,
                      np.char.partition(guide.astype(str), "_g")[:, 0]).astype(object)
    batch = np.array([f"lane{i + 1}" for i in rng.integers(0, n_batches, n_cells)], dtype=object)
    obs = pd.DataFrame({"perturbation": pd.Categorical(target), "guide": pd.Categorical(guide),
                        "batch": pd.Categorical(batch)}, index=[f"cell{i:07d}" for i in range(n_cells)])
    learn = np.zeros(n_cells, dtype=bool)
    for cells in obs.groupby("perturbation", observed=True).indices.values():
        learn[rng.permutation(cells)[: len(cells) // 2]] = True
    obs["snmf_half"] = pd.Categorical(np.where(learn, "learn", "test"), categories=["learn", "test"])
    return obs


def _planted_usage(rng, obs, planted_targets, n_programs, n_guides):
    """Zero-inflated gamma usage with a mild batch shift, and the planted effects (with their table)."""
    n_cells = len(obs)
    shape = rng.uniform(1.0, 4.0, n_programs)
    zeros = rng.uniform(0.05, 0.4, n_programs)
    usage = rng.gamma(shape, 1.0, size=(n_cells, n_programs)) * (rng.random((n_cells, n_programs)) > zeros)
    usage *= 1.0 + 0.05 * obs["batch"].cat.codes.to_numpy()[:, None] * (np.arange(n_programs) % 2)[None, :]
    guide = obs["guide"].astype(str).to_numpy()
    rows = []
    for i, target in enumerate(planted_targets):
        main, direction = i % n_programs, "up" if i % 3 else "down"
        effects = [(main, direction, 6.0 if direction == "up" else 0.1)] + (
            [((main + 1) % n_programs, "up", 3.0)] if i < 10 else [])
        rows += [{"perturbation": target, "program": f"S{p + 1:02d}", "direction": d, "fold_change": f}
                 for p, d, f in effects]
        for j in range(n_guides):
            cells = guide == f"{target}_g{j + 1}"
            efficacy = rng.uniform(0.5, 1.0)
            for program, _, fold in effects:
                usage[cells, program] *= 1.0 + efficacy * (fold - 1.0)
    return usage.astype(np.float32), pd.DataFrame(rows)


def _gene_scores(rng, n_genes, n_programs):
    genes = [f"G{i:05d}" for i in range(n_genes)]
    scores = rng.normal(0.0, 0.03, size=(n_genes, n_programs))
    for p in range(n_programs):
        scores[p * 60: p * 60 + 50, p] += rng.uniform(0.4, 1.0, 50)
        scores[p * 60 + 50: p * 60 + 60, p] -= rng.uniform(0.3, 0.6, 10)
    return genes, scores


def _gene_set_library(rng, genes, n_programs, n_random_sets) -> str:
    lines = []
    for p in range(n_programs):
        lines.append(f"PROGRAM_{p + 1:02d}_UP\tplanted\t" + "\t".join(genes[p * 60: p * 60 + 40]))
        lines.append(f"PROGRAM_{p + 1:02d}_DOWN\tplanted\t" + "\t".join(genes[p * 60 + 50: p * 60 + 60]))
    for s in range(n_random_sets):
        lines.append(f"RANDOM_SET_{s:04d}\trandom\t" + "\t".join(rng.choice(genes, int(rng.integers(15, 200)),
                                                                            replace=False)))
    return "\n".join(lines) + "\n"


def _record_truth(adata, planted, targets, programs, n_planted, usage):
    """uns['simulation'] as a simulated screen has it; the usage was recovered exactly (planted = recovered)."""
    planted_names = [f"S{i + 1:02d}" for i in range(len(programs))]
    adata.obsm["simulation_usage"] = usage.astype(np.float64)
    adata.uns["simulation"] = {
        "effects": planted, "null_targets": np.array(targets[n_planted:], dtype=object),
        "targets": np.array(targets, dtype=object), "program_names": planted_names,
        "program_match": pd.DataFrame({"planted_program": planted_names, "program": programs,
                                       "cosine": np.ones(len(programs))}),
    }


STEP_NOTEBOOKS = {"stats": "03_stats", "enrichment": "04_enrichment"}


def run_report_steps(folder, steps=("stats", "enrichment"), notebooks=None) -> dict:
    """Execute the notebooks of steps 3 and 4 on a run folder as run_all.py does (papermill with the step's
    parameters, then the HTML report); returns each step's seconds."""
    import papermill as pm

    from perturbnmf.report.html import render_html
    from perturbnmf.report.runfolder import REPO_ROOT

    folder = Path(folder)
    (folder / "notebooks").mkdir(exist_ok=True)
    common = {"run_name": "scale", "output_dir": str(folder), "perturbation_key": "perturbation",
              "control_label": CONTROL}
    parameters = {"stats": dict(common, batch_key="batch", guide_key="guide"),
                  "enrichment": dict(common, gene_sets=[str(folder / "gene_sets.gmt")])}
    seconds = {}
    for step in steps:
        stem = STEP_NOTEBOOKS[step]
        executed = folder / "notebooks" / f"{stem}.ipynb"
        start = time.perf_counter()
        pm.execute_notebook(str(Path(notebooks or REPO_ROOT / "notebooks") / f"{stem}.ipynb"), str(executed),
                            parameters=parameters[step], kernel_name="python3", cwd=str(REPO_ROOT),
                            progress_bar=False, log_output=False)
        seconds[step] = time.perf_counter() - start
        render_html(executed, folder / f"{stem}.html")
    return seconds


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    """Steps 3 and 4 of a 5,000-target screen (2 guides each, 3 programs, 25,000 cells; the 15 planted
    targets with 10 times the coverage, so that they are found)."""
    folder = tmp_path_factory.mktemp("screen5k")
    write_factorized_screen(folder, n_targets=5000, n_cells=25_000, n_guides=2, n_control_guides=20, n_programs=3,
                            n_genes=400, n_random_sets=40, n_planted=15, planted_coverage=10.0, truth=False)
    return folder, run_report_steps(folder)


def _html_tables(page: str) -> list[str]:
    return re.findall(r"<table.*?</table>", page, flags=re.S)


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["03_stats", "04_enrichment"])
def test_reports_of_a_5000_target_screen_are_small_and_clean(report_run, stem):
    import nbformat

    folder, _ = report_run
    page = (folder / f"{stem}.html").read_text()
    assert len(page.encode()) < 5_000_000
    assert all(table.count("<tr") <= 26 for table in _html_tables(page))  # header + at most 25 rows
    nb = nbformat.read(str(folder / "notebooks" / f"{stem}.ipynb"), as_version=4)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error"
            assert output.get("name") != "stderr", output.get("text")  # no stray warning or traceback
            assert "PosixPath" not in str(output.get("data", {}).get("text/plain", ""))  # no stray return value
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert 3 <= len(images) <= 10
    assert max(len(o["data"]["image/png"]) for o in images) < 1_500_000  # base64 bytes of the largest figure


@pytest.mark.slow
def test_index_of_a_5000_target_screen_leads_with_the_hits(report_run):
    from perturbnmf.report.index import write_index
    from perturbnmf.report.runfolder import RunPaths

    folder, seconds = report_run
    record = {"parameters": {"run_name": "scale"},
              "steps": {step: {"status": "complete", "seconds": s} for step, s in seconds.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DtypeWarning from reading the 20,000-row contrasts
        page = write_index(RunPaths.at(folder), record).read_text()
    # every hit and every perturbation are searchable in the page, which stays near 100 bytes a row
    hits = pd.read_csv(folder / "data" / "perturbation_hits.csv")
    tested = pd.read_csv(folder / "data" / "program_contrasts.csv", usecols=["perturbation"])["perturbation"]
    assert tested.nunique() > 4000 and len(hits) > 15
    assert len(page.encode()) < 100_000 + 150 * (len(hits) + tested.nunique())
    tables = _html_tables(page)
    assert tables[0].count("<tr") <= 16 and tables[-1].count("<tr") <= 16  # static first pages
    carried = [json.loads(m.replace("<\\/", "</")) for m in
               re.findall(r'<script type="application/json">(.*?)</script>', page, flags=re.S)]
    assert [len(table["rows"]) for table in carried] == [len(hits), tested.nunique()]
    assert {row[0] for row in carried[1]["rows"]} == set(tested.astype(str))
    assert f"{tested.nunique():,}</b>perturbations tested" in page  # the card, with a thousands separator
    assert f"{len(hits):,} hits at q &lt; 0.05" in page and "data/perturbation_hits.csv" in page
