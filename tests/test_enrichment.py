"""Tests of perturbnmf.tl.enrichment (offline; hand-made gene sets)."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import hypergeom
from statsmodels.stats.multitest import multipletests

from perturbnmf.tl import (
    ENRICHMENT_COLUMNS,
    over_representation,
    read_gmt,
    top_genes,
    top_terms,
)

# 40 background genes G00..G39
BACKGROUND = [f"G{i:02d}" for i in range(40)]
LIBRARY = {
    "HALLMARK_A": ["G00", "G01", "G02", "G03", "G04", "G05"],  # 6
    "HALLMARK_B": ["G00", "G01", "G10", "G11", "G12", "OUTSIDE1"],  # 5 in background
    "HALLMARK_C": ["G20", "G21", "G22", "G23"],  # 4, no overlap with the query
    "HALLMARK_TINY": ["G00", "G30", "OUTSIDE2", "OUTSIDE3"],  # 2 in background -> filtered
    "HALLMARK_D": ["G02", "G03", "G30", "G31", "G32", "G33", "G34", "G35"],  # 8
}
QUERY = ["G00", "G01", "G02", "G03", "G10", "NOT_IN_BG", "G00"]  # 5 distinct in background


def _hand_p(x, N, K, n):
    return hypergeom.sf(x - 1, N, K, n)


def test_over_representation_pvalues_and_bh_by_hand():
    res = over_representation({("P01", "positive"): QUERY}, {"hallmark": LIBRARY}, BACKGROUND)
    assert list(res.columns) == ENRICHMENT_COLUMNS
    res = res.set_index("term")
    # reported: overlapping terms that passed the size filter
    assert set(res.index) == {"HALLMARK_A", "HALLMARK_B", "HALLMARK_D"}
    N, n = 40, 5
    expected = {"HALLMARK_A": (4, 6), "HALLMARK_B": (3, 5), "HALLMARK_D": (2, 8)}
    for term, (x, K) in expected.items():
        row = res.loc[term]
        assert (row["overlap"], row["term_size"], row["query_size"], row["background_size"]) == (x, K, n, N)
        assert row["pvalue"] == pytest.approx(_hand_p(x, N, K, n), rel=1e-12)
        b, c, d = K - x, n - x, N - K - n + x
        odds = x * d / max(b * c, 1)
        assert row["odds_ratio"] == pytest.approx(odds, rel=1e-12)
        assert row["combined_score"] == pytest.approx(-np.log(row["pvalue"]) * odds, rel=1e-12)
    assert res.loc["HALLMARK_A", "overlap_genes"] == "G00;G01;G02;G03"
    assert res.loc["HALLMARK_B", "overlap_genes"] == "G00;G01;G10"
    # BH over the four terms that passed the size filter (C has overlap 0: p = 1)
    tested = {**expected, "HALLMARK_C": (0, 4)}
    p_all = np.array([_hand_p(x, N, K, n) for x, K in tested.values()])
    q_all = multipletests(p_all, method="fdr_bh")[1]
    for t, q in zip(tested, q_all):
        if t in res.index:
            assert res.loc[t, "qvalue"] == pytest.approx(q, rel=1e-12)
    # ... which is more conservative than BH over the reported terms only
    assert p_all[3] == 1.0  # HALLMARK_C
    q_reported = multipletests(p_all[:3], method="fdr_bh")[1]
    assert res.loc["HALLMARK_D", "qvalue"] > q_reported[2]
    assert res.attrs["terms_tested"] == {"hallmark": 4}


def test_larger_background_makes_same_overlap_more_significant():
    small = over_representation({("P01", "positive"): QUERY}, {"h": LIBRARY}, BACKGROUND)
    big_bg = BACKGROUND + [f"UNRELATED{i}" for i in range(400)]
    big = over_representation({("P01", "positive"): QUERY}, {"h": LIBRARY}, big_bg)
    s, b = small.set_index("term"), big.set_index("term")
    for term in s.index:
        assert b.loc[term, "overlap"] == s.loc[term, "overlap"]
        assert b.loc[term, "background_size"] == 440
        assert b.loc[term, "pvalue"] < s.loc[term, "pvalue"]
        assert b.loc[term, "pvalue"] == pytest.approx(
            _hand_p(s.loc[term, "overlap"], 440, s.loc[term, "term_size"], 5), rel=1e-12
        )


def test_background_restriction_of_terms_and_query():
    # dropping G10..G12 from the background removes them from the query and from term B
    bg = [g for g in BACKGROUND if g not in ("G10", "G11", "G12")]
    res = over_representation({("P01", "positive"): QUERY}, {"h": LIBRARY}, bg).set_index("term")
    assert "HALLMARK_B" not in res.index  # B shrinks to {G00, G01}: below min_set_size
    row = res.loc["HALLMARK_A"]
    assert (row["query_size"], row["term_size"], row["background_size"]) == (4, 6, 37)
    assert row["pvalue"] == pytest.approx(_hand_p(4, 37, 6, 4), rel=1e-12)


def test_set_size_filters():
    gl = {("P01", "positive"): QUERY}
    res = over_representation(gl, {"h": LIBRARY}, BACKGROUND, min_set_size=2)
    assert "HALLMARK_TINY" in set(res["term"])  # size 2 in background, overlap 1
    assert res.attrs["terms_tested"] == {"h": 5}
    res = over_representation(gl, {"h": LIBRARY}, BACKGROUND, max_set_size=5)
    assert set(res["term"]) == {"HALLMARK_B"}  # A (6) and D (8) too large, C no overlap
    assert res.attrs["terms_tested"] == {"h": 2}
    # with only B and C tested, B's q-value is BH over 2 tests
    p_b = _hand_p(3, 40, 5, 5)
    assert res["qvalue"].iloc[0] == pytest.approx(min(1.0, p_b * 2), rel=1e-12)
    with pytest.raises(ValueError, match="max_set_size"):
        over_representation(gl, {"h": LIBRARY}, BACKGROUND, min_set_size=5, max_set_size=4)


def test_min_overlap_filters_rows_but_not_bh():
    gl = {("P01", "positive"): QUERY}
    res1 = over_representation(gl, {"h": LIBRARY}, BACKGROUND)
    res3 = over_representation(gl, {"h": LIBRARY}, BACKGROUND, min_overlap=3)
    assert set(res3["term"]) == {"HALLMARK_A", "HALLMARK_B"}
    pd.testing.assert_series_equal(
        res3.set_index("term")["qvalue"], res1.set_index("term").loc[res3["term"], "qvalue"]
    )
    res0 = over_representation(gl, {"h": LIBRARY}, BACKGROUND, min_overlap=0)
    c = res0.set_index("term").loc["HALLMARK_C"]
    assert c["overlap"] == 0 and c["pvalue"] == 1.0 and c["overlap_genes"] == ""


def test_several_lists_libraries_sorting_and_bh_per_list_library():
    lib2 = {"GO_X": ["G00", "G01", "G02", "G39"], "GO_Y": ["G10", "G11", "G12", "G13", "G14"]}
    gl = {
        ("P02", "negative"): ["G10", "G11", "G12", "G13"],
        ("P01", "positive"): QUERY,
        ("P01", "negative"): ["G30", "G31", "G32", "G33", "G02"],
    }
    res = over_representation(gl, {"hallmark": LIBRARY, "go": lib2}, BACKGROUND)
    keys = list(zip(res["program"], res["side"], res["library"]))
    assert keys == sorted(keys)
    for _, grp in res.groupby(["program", "side", "library"]):
        assert grp["pvalue"].is_monotonic_increasing
    # the go library has 2 terms tested per list: BH over 2 even if 1 is reported
    row = res[(res["program"] == "P02") & (res["library"] == "go")]
    assert list(row["term"]) == ["GO_Y"]
    assert row["qvalue"].iloc[0] == pytest.approx(min(1.0, 2 * _hand_p(4, 40, 5, 4)), rel=1e-12)
    # empty inputs
    empty = over_representation({}, {"go": lib2}, BACKGROUND)
    assert empty.empty and list(empty.columns) == ENRICHMENT_COLUMNS


def test_identifier_mismatch_raises_helpful_error():
    ensembl_bg = [f"ENSG{i:011d}" for i in range(50)]
    with pytest.raises(ValueError) as exc:
        over_representation({("P01", "positive"): ensembl_bg[:5]}, {"hallmark": LIBRARY}, ensembl_bg)
    msg = str(exc.value)
    assert "'hallmark'" in msg and "identifier" in msg and "Ensembl" in msg
    assert "ENSG00000000000" in msg  # example background genes shown
    assert "G00" in msg  # example library genes shown
    # mouse-style symbols vs human library: hint at case
    mouse_bg = [g.capitalize() for g in ["ACTB", "GAPDH", "MYC", "TP53"]]
    with pytest.raises(ValueError, match="case"):
        over_representation({}, {"h": {"T": ["ACTB", "GAPDH", "MYC"]}}, mouse_bg)


def test_top_terms_picks_best_significant_rows():
    rows = []
    for prog, side, pvals, qvals in [
        ("P01", "positive", [1e-6, 1e-4, 1e-3, 2e-3, 0.5], [1e-5, 1e-3, 0.01, 0.04, 0.6]),
        ("P01", "negative", [1e-2, 0.2], [0.06, 0.3]),
        ("P02", "positive", [3e-3, 1e-5], [0.01, 1e-4]),
    ]:
        for i, (p, q) in enumerate(zip(pvals, qvals)):
            rows.append({"program": prog, "side": side, "library": "lib", "term": f"{prog}{side}{i}",
                         "pvalue": p, "qvalue": q})
    enr = pd.DataFrame(rows).sample(frac=1.0, random_state=0)
    top = top_terms(enr, n=3, fdr=0.05)
    assert list(top["term"]) == ["P01positive0", "P01positive1", "P01positive2", "P02positive1", "P02positive0"]
    assert (top["qvalue"] < 0.05).all()
    top1 = top_terms(enr, n=1, fdr=0.005)
    assert list(top1["term"]) == ["P01positive0", "P02positive1"]


# --------------------------------------------------------------------------- #
# top_genes
# --------------------------------------------------------------------------- #
def test_top_genes_sides_sorted_disjoint_and_ties():
    loadings = pd.DataFrame(
        {
            "P01": [3.0, -1.0, 2.0, 0.0, -5.0, 2.0, 0.5, -1.0, np.nan],
            "P02": [-1.0, -2.0, -3.0, -4.0, -0.5, -0.1, -0.2, -0.3, -0.4],
        },
        index=["MYC", "ACTB", "ZFP1", "GAPDH", "TP53", "ABL1", "KRAS", "CD4", "NANOG"],
    )
    res = top_genes(loadings, n_top=3)
    assert list(res.columns) == ["program", "side", "rank", "gene", "loading"]
    p1 = res[res["program"] == "P01"]
    pos = p1[p1["side"] == "positive"]
    neg = p1[p1["side"] == "negative"]
    assert list(pos["gene"]) == ["MYC", "ABL1", "ZFP1"]  # tie 2.0: ABL1 before ZFP1
    assert list(pos["rank"]) == [1, 2, 3]
    assert list(neg["gene"]) == ["TP53", "ACTB", "CD4"]  # tie -1.0: ACTB before CD4
    assert (pos["loading"] > 0).all() and (neg["loading"] < 0).all()
    assert pos["loading"].is_monotonic_decreasing and neg["loading"].is_monotonic_increasing
    assert not set(pos["gene"]) & set(neg["gene"])
    assert "GAPDH" not in set(p1["gene"]) and "NANOG" not in set(p1["gene"])  # 0 and NaN
    # P02 has no positive loadings: only a negative side
    p2 = res[res["program"] == "P02"]
    assert set(p2["side"]) == {"negative"}
    assert list(p2["gene"]) == ["GAPDH", "ZFP1", "ACTB"]
    # a side shorter than n_top
    big = top_genes(loadings, n_top=100)
    assert (big[(big["program"] == "P01") & (big["side"] == "positive")]["gene"].size) == 4  # MYC, ABL1, ZFP1, KRAS
    with pytest.raises(ValueError, match="n_top"):
        top_genes(loadings, n_top=0)


# --------------------------------------------------------------------------- #
# read_gmt
# --------------------------------------------------------------------------- #
def test_read_gmt_enrichr_style(tmp_path):
    path = tmp_path / "lib.gmt"
    path.write_text(
        "HALLMARK_A\t\tG1\tG2\tG3\n"
        "\n"
        "SET_B\thttp://example.org/b\t G4 \tG5\t\tG4\tG6\t\n"
        "  \n"
        "SET_C\tdesc\tG7\r\n"
    )
    gmt = read_gmt(path)
    assert gmt == {"HALLMARK_A": ["G1", "G2", "G3"], "SET_B": ["G4", "G5", "G6"], "SET_C": ["G7"]}


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("A\t\tG1\nB\tonly_description\n", r"line 2: .*3 tab-separated fields"),
        ("A\t\tG1\tG2\n\nA\t\tG3\n", r"line 3: duplicate gene-set name 'A' \(first defined on line 1\)"),
        ("\n  \n", r"no gene sets"),
        ("A\t\tG1\nB d G1 G2\n", r"line 2: .*tab-separated\?"),
        ("A\tdesc\t\t\t\nB\t\tG1\n", r"line 1: gene set 'A' has no genes"),
        ("\tdesc\tG1\n", r"line 1: empty gene-set name"),
    ],
)
def test_read_gmt_errors_name_file_and_line(tmp_path, content, pattern):
    path = tmp_path / "bad.gmt"
    path.write_text(content)
    with pytest.raises(ValueError, match=pattern) as exc:
        read_gmt(path)
    assert "bad.gmt" in str(exc.value)


def test_read_gmt_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gmt"):
        read_gmt(tmp_path / "nope.gmt")


def test_gmt_to_over_representation_roundtrip(tmp_path):
    path = tmp_path / "h.gmt"
    path.write_text("".join(f"{t}\t\t" + "\t".join(g) + "\n" for t, g in LIBRARY.items()))
    a = over_representation({("P01", "positive"): QUERY}, {"h": read_gmt(path)}, BACKGROUND)
    b = over_representation({("P01", "positive"): QUERY}, {"h": LIBRARY}, BACKGROUND)
    pd.testing.assert_frame_equal(a, b)


# --------------------------------------------------------------------------- #
# gseapy agreement (offline)
# --------------------------------------------------------------------------- #
def test_gseapy_enrich_offline_agrees_in_documented_way(no_network):
    gseapy = pytest.importorskip("gseapy")
    enr = gseapy.enrich(
        gene_list=[g for g in QUERY if g != "NOT_IN_BG"] + ["NOT_IN_BG"],
        gene_sets=LIBRARY,
        background=BACKGROUND,
        outdir=None,
        no_plot=True,
        verbose=False,
    )
    gs = enr.results.set_index("Term")
    # include every overlapping term (gseapy has no size filter)
    ours = over_representation(
        {("P01", "positive"): QUERY}, {"h": LIBRARY}, BACKGROUND, min_set_size=1
    ).set_index("term")
    # gseapy reports exactly the terms with overlap > 0 ...
    assert set(gs.index) == set(ours.index) == {"HALLMARK_A", "HALLMARK_B", "HALLMARK_D", "HALLMARK_TINY"}
    for term in ours.index:
        x, K, n, N = ours.loc[term, ["overlap", "term_size", "query_size", "background_size"]]
        # ... with identical p-values and the same background-restricted overlap/term size
        assert gs.loc[term, "P-value"] == pytest.approx(ours.loc[term, "pvalue"], rel=1e-12)
        assert gs.loc[term, "Overlap"] == f"{x}/{K}"
        # its odds ratio is Haldane-Anscombe corrected (+0.5 per cell), ours is Enrichr's
        b, c, d = K - x, n - x, N - K - n + x
        haldane = (x + 0.5) * (d + 0.5) / ((b + 0.5) * (c + 0.5))
        assert gs.loc[term, "Odds Ratio"] == pytest.approx(haldane, rel=1e-12)
        assert ours.loc[term, "odds_ratio"] == pytest.approx(x * d / max(b * c, 1), rel=1e-12)
    # gseapy's BH runs over the overlapping terms only; ours over every tested term
    # (here also the zero-overlap HALLMARK_C), so ours is never smaller
    q_gs = multipletests(gs.loc[ours.index, "P-value"], method="fdr_bh")[1]
    np.testing.assert_allclose(gs.loc[ours.index, "Adjusted P-value"], q_gs, rtol=1e-12)
    assert (ours["qvalue"].to_numpy() >= gs.loc[ours.index, "Adjusted P-value"].to_numpy() - 1e-15).all()
    assert (ours["qvalue"].to_numpy() > gs.loc[ours.index, "Adjusted P-value"].to_numpy()).any()


def test_over_representation_on_realistic_inputs():
    rng = np.random.default_rng(0)
    bg = [f"GENE{i}" for i in range(8000)]
    lib = {f"TERM{t}": list(rng.choice(bg, size=int(rng.integers(3, 400)), replace=False)) for t in range(3000)}
    lists = {(f"P{p:02d}", s): list(rng.choice(bg, size=100, replace=False))
             for p in range(1, 31) for s in ("positive", "negative")}
    res = over_representation(lists, {"go": lib}, bg)
    assert res["program"].nunique() == 30
