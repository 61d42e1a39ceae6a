"""Tests of perturbnmf.tl.enrichment.prerank (gseapy.prerank on whole loading vectors; offline)."""


import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from perturbnmf.tl import PRERANK_COLUMNS, prerank

pytest.importorskip("gseapy")

N_GENES = 400
GENES = [f"Gene{i:03d}" for i in range(N_GENES)]  # mouse-style case on purpose


def _loadings():
    rng = np.random.default_rng(7)
    v = rng.normal(size=N_GENES)
    # P02 is P01 mirrored: the same genes at the other end
    return pd.DataFrame({"P01": v, "P02": -v}, index=GENES)


def _library(loadings):
    order = loadings["P01"].sort_values(ascending=False).index
    rng = np.random.default_rng(3)
    return {
        "TOP": list(order[:25]),
        "BOTTOM": list(order[-25:]),
        "RANDOM": list(rng.choice(GENES, size=25, replace=False)),
        # 14 genes in the loadings + 10 that are not: size 14 < 15 -> not tested
        "SMALL": list(order[:14]) + [f"ABSENT{i}" for i in range(10)],
        # 20 genes in the loadings + others: tested with n_genes = 20
        "PARTLY_OUTSIDE": list(order[100:120]) + [f"ABSENT{i}" for i in range(30)],
    }


@pytest.mark.parametrize("method", ["multilevel", "permutation"])
def test_prerank_top_set_strongly_positive_random_set_not(no_network, method):
    loadings = _loadings()
    res = prerank(loadings, {"hand": _library(loadings)}, permutations=1000, seed=0, method=method)
    assert list(res.columns) == PRERANK_COLUMNS
    p1 = res[res["program"] == "P01"].set_index("term")
    p2 = res[res["program"] == "P02"].set_index("term")
    # size filter among the loadings' genes: SMALL (14 genes here) is not tested
    assert set(p1.index) == {"TOP", "BOTTOM", "RANDOM", "PARTLY_OUTSIDE"}
    assert p1.loc["PARTLY_OUTSIDE", "n_genes"] == 20 and p1.loc["TOP", "n_genes"] == 25
    assert res.attrs["terms_tested"] == {"hand": 4}
    assert res.attrs["method"] == method and res.attrs["seed"] == 0
    floor = 1e-10 if method == "multilevel" else 1e-3
    # the 25 top-loading genes: ES = 1 (all hits first), large positive NES, smallest possible p
    assert p1.loc["TOP", "es"] == pytest.approx(1.0)
    assert p1.loc["TOP", "nes"] > 2.5
    assert p1.loc["TOP", "pvalue"] <= 1.001 * floor
    assert p1.loc["BOTTOM", "nes"] < -2.5 and p1.loc["BOTTOM", "pvalue"] <= 1.001 * floor
    # mirrored program: signs flip
    assert p2.loc["TOP", "nes"] < -2.5 and p2.loc["BOTTOM", "nes"] > 2.5
    # a random set is not enriched
    assert abs(p1.loc["RANDOM", "nes"]) < 1.5
    assert p1.loc["RANDOM", "pvalue"] > 0.05 and p1.loc["RANDOM", "qvalue"] > 0.05
    # leading edge of TOP: all 25 genes, the 10 with the largest loadings listed, in loading order
    top10 = list(loadings["P01"].sort_values(ascending=False).index[:10])
    assert p1.loc["TOP", "leading_edge_size"] == 25
    assert p1.loc["TOP", "leading_edge"].split(";") == top10
    # ... and of BOTTOM most negative first; genes come back with their own (mixed-case) names
    bottom1 = loadings["P01"].idxmin()
    assert p1.loc["BOTTOM", "leading_edge"].split(";")[0] == bottom1
    assert res["pvalue"].between(0, 1).all()


def test_prerank_qvalue_is_one_bh_over_the_whole_table():
    loadings = _loadings()
    lib = _library(loadings)
    res = prerank(loadings, {"a": lib, "b": {"TOP_AGAIN": lib["TOP"], "RANDOM_B": lib["RANDOM"]}}, seed=1)
    assert len(res) == 2 * (4 + 2)
    np.testing.assert_allclose(res["qvalue"], multipletests(res["pvalue"], method="fdr_bh")[1], rtol=1e-12)
    assert (res["qvalue"] >= res["pvalue"] - 1e-15).all()
    # sorted by program (column order), library (given order), pvalue
    assert list(res["program"]) == ["P01"] * 6 + ["P02"] * 6
    assert list(res["library"]) == (["a"] * 4 + ["b"] * 2) * 2
    for _, g in res.groupby(["program", "library"]):
        assert g["pvalue"].is_monotonic_increasing


@pytest.mark.parametrize("method", ["multilevel", "permutation"])
def test_prerank_is_deterministic_for_a_fixed_seed(method):
    loadings = _loadings()
    lib = _library(loadings)
    a = prerank(loadings, {"h": lib}, seed=5, method=method, permutations=200)
    b = prerank(loadings, {"h": lib}, seed=5, method=method, permutations=200)
    pd.testing.assert_frame_equal(a, b)
    # the input is not modified
    pd.testing.assert_frame_equal(loadings, _loadings())


def test_prerank_nan_loadings_are_dropped_per_program():
    loadings = _loadings()
    lib = _library(loadings)
    top = lib["TOP"]
    loadings.loc[top[:12], "P02"] = np.nan  # P02: TOP keeps 13 genes -> below min_set_size
    res = prerank(loadings, {"h": lib}, permutations=100)
    assert "TOP" in set(res.loc[res["program"] == "P01", "term"])
    assert "TOP" not in set(res.loc[res["program"] == "P02", "term"])
    res5 = prerank(loadings, {"h": lib}, min_set_size=5, permutations=100)
    row = res5[(res5["program"] == "P02") & (res5["term"] == "TOP")]
    assert int(row["n_genes"].iloc[0]) == 13


def test_prerank_exact_gene_matching_and_errors():
    loadings = _loadings()
    # upper-case symbols do not match the mixed-case genes (gseapy would silently upper-case them)
    upper = {"TOP_UPPER": [g.upper() for g in _library(loadings)["TOP"]]}
    with pytest.raises(ValueError, match="'mouse'.*none of its 25 genes.*case is ignored"):
        prerank(loadings, {"mouse": upper})
    with pytest.raises(ValueError, match="method must be one of"):
        prerank(loadings, {"h": _library(loadings)}, method="fgsea")
    with pytest.raises(ValueError, match="permutations must be an integer >= 1"):
        prerank(loadings, {"h": _library(loadings)}, permutations=0)
    with pytest.raises(ValueError, match="max_set_size must be an integer >= 15"):
        prerank(loadings, {"h": _library(loadings)}, max_set_size=10)
    with pytest.raises(ValueError, match="libraries must be a non-empty mapping"):
        prerank(loadings, {})
    with pytest.raises(ValueError, match="loadings must be a pandas DataFrame"):
        prerank(loadings.to_numpy(), {"h": _library(loadings)})
    inf = loadings.copy()
    inf.iloc[0, 1] = np.inf
    with pytest.raises(ValueError, match=r"infinite values \(programs \['P02'\]\)"):
        prerank(inf, {"h": _library(loadings)})
    dup = pd.concat([loadings, loadings.iloc[:1]])
    with pytest.raises(ValueError, match="gene index has duplicates"):
        prerank(dup, {"h": _library(loadings)})
    # nothing testable: empty table with the columns
    empty = prerank(loadings, {"h": {"TINY": GENES[:3]}})
    assert list(empty.columns) == PRERANK_COLUMNS and len(empty) == 0


def test_prerank_on_realistic_size():
    """10 programs x 50 sets of 15-200 genes on 2000 genes, 1000 permutations: the planted sets are found.

    (30 programs x Hallmark on 2000 genes: ~7.5 s with "multilevel", ~18 s with "permutation" on one core.)
    """
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(2000)]
    lib = {f"SET{t}": list(rng.choice(genes, size=int(rng.integers(15, 200)), replace=False)) for t in range(50)}
    loadings = pd.DataFrame(rng.normal(size=(2000, 10)), index=genes, columns=[f"P{i:02d}" for i in range(10)])
    for j in range(10):  # plant two enriched sets per program
        for t in rng.choice(50, 2, replace=False):
            loadings.loc[lib[f"SET{t}"], f"P{j:02d}"] += 1.0
    res = prerank(loadings, {"synthetic": lib}, permutations=1000, seed=0)
    assert len(res) == 10 * 50
    assert (res["qvalue"] < 0.05).sum() >= 20
