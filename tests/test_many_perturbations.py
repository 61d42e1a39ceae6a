"""Figures and tables of a genome-wide screen (thousands of perturbations) stay readable and small:
each figure summarises (the groups that differ most, the strongest hits, a distribution) instead of
drawing one row per perturbation; with few perturbations the figures are unchanged."""

import io
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from perturbnmf import pl  # noqa: E402
from perturbnmf.report import artifacts  # noqa: E402

CONTROL = "non-targeting"
N_TARGETS = 2000


@pytest.fixture(scope="module")
def screen():
    """Usage of 4 programs in 2,000 perturbations × 6 cells + 600 control cells; targets TGT0000-0009
    raise program P1 strongly, TGT0010-0019 lower P2."""
    rng = np.random.default_rng(0)
    groups = np.array([CONTROL] * 600 + [f"TGT{i:04d}" for i in range(N_TARGETS) for _ in range(6)])
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
    assert "strongest hits" in fig.texts[0].get_text() if fig.texts else "strongest hits" in heatmap.get_title()
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
