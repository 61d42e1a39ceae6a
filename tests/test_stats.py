"""Tests of the statistics of perturbnmf.tl against statsmodels / scipy and hand computations."""

import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from scipy import stats as sps
from statsmodels.stats.anova import anova_lm
from statsmodels.stats.multitest import multipletests

from perturbnmf.tl import benjamini_hochberg, program_anova, program_contrasts


# --------------------------------------------------------------------------- #
# Benjamini-Hochberg
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bh_equals_statsmodels(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(size=150), rng.uniform(0, 1e-3, size=50), [0.0, 1.0, 0.5, 0.5]])
    rng.shuffle(p)
    q = benjamini_hochberg(p)
    expected = multipletests(p, method="fdr_bh")[1]
    np.testing.assert_allclose(q, expected, rtol=1e-12, atol=0)
    assert np.all(q >= p)
    order = np.argsort(p)
    assert np.all(np.diff(q[order]) >= 0), "q must be monotone in p"
    assert q.max() <= 1.0


def test_bh_nan_excluded_from_number_of_tests():
    rng = np.random.default_rng(3)
    p = rng.uniform(size=60) ** 3
    p[[0, 7, 30]] = np.nan
    q = benjamini_hochberg(list(p))
    assert q.shape == p.shape
    assert np.isnan(q[[0, 7, 30]]).all()
    ok = ~np.isnan(p)
    np.testing.assert_allclose(q[ok], multipletests(p[ok], method="fdr_bh")[1], rtol=1e-12)
    # all-NaN and empty inputs
    assert np.isnan(benjamini_hochberg([np.nan, np.nan])).all()
    assert benjamini_hochberg([]).shape == (0,)


@pytest.mark.parametrize("bad", [[0.1, 1.2], [-0.01, 0.5], [np.inf, 0.2]])
def test_bh_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        benjamini_hochberg(bad)


def test_bh_rejects_2d():
    with pytest.raises(ValueError, match="1-D"):
        benjamini_hochberg(np.full((2, 2), 0.5))


# --------------------------------------------------------------------------- #
# ANOVA
# --------------------------------------------------------------------------- #
def _usage_table(rng, groups, shifts):
    """Three programs with group-dependent means and unequal noise."""
    n = len(groups)
    base = np.array([shifts.get(g, 0.0) for g in groups])
    return pd.DataFrame(
        {
            "P01": 1.0 + base + rng.normal(scale=0.5, size=n),
            "P02": 2.0 + 0.1 * base + rng.normal(scale=1.0, size=n),
            "P03": rng.gamma(2.0, size=n),
        }
    )


def _sm_typ2(y, g, b=None):
    df = pd.DataFrame({"y": y, "g": g})
    formula = "y ~ C(g)"
    if b is not None:
        df["b"] = b
        formula += " + C(b)"
    fit = smf.ols(formula, df).fit()
    tab = anova_lm(fit, typ=2)
    return tab.loc["C(g)"], fit


def test_anova_matches_statsmodels_unbalanced():
    rng = np.random.default_rng(10)
    g = np.array(["NT"] * 9 + ["A"] * 4 + ["B"] * 6 + ["C"] * 2 + ["D"])  # includes a 1-cell group
    usage = _usage_table(rng, g, {"A": 1.5, "B": -0.7, "C": 0.3, "D": 2.0})
    res = program_anova(usage, g)
    assert list(res.columns) == ["program", "F", "pvalue", "qvalue", "df_group", "df_resid", "eta_squared"]
    assert list(res["program"]) == ["P01", "P02", "P03"]
    for _, row in res.iterrows():
        ref, fit = _sm_typ2(usage[row["program"]].to_numpy(), g)
        np.testing.assert_allclose(row["F"], ref["F"], rtol=1e-8)
        np.testing.assert_allclose(row["pvalue"], ref["PR(>F)"], rtol=1e-8)
        assert row["df_group"] == ref["df"] == 4
        assert row["df_resid"] == fit.df_resid == len(g) - 5
        eta = ref["sum_sq"] / (ref["sum_sq"] + fit.ssr)
        np.testing.assert_allclose(row["eta_squared"], eta, rtol=1e-8)
    np.testing.assert_allclose(res["qvalue"], multipletests(res["pvalue"], method="fdr_bh")[1], rtol=1e-12)


def test_anova_with_batch_matches_statsmodels_typ2():
    rng = np.random.default_rng(11)
    g = np.array(["NT"] * 10 + ["A"] * 5 + ["B"] * 7)
    b = np.array(["b1", "b2"] * 11)
    usage = _usage_table(rng, g, {"A": 1.0, "B": -1.0})
    usage["P01"] += (b == "b2") * 3.0  # strong batch effect
    res = program_anova(usage, pd.Series(g), batch=pd.Series(b))
    for _, row in res.iterrows():
        ref, fit = _sm_typ2(usage[row["program"]].to_numpy(), g, b)
        np.testing.assert_allclose(row["F"], ref["F"], rtol=1e-8)
        np.testing.assert_allclose(row["pvalue"], ref["PR(>F)"], rtol=1e-8)
        assert row["df_group"] == 2 and row["df_resid"] == fit.df_resid


def test_anova_batch_level_in_one_group_only_matches_statsmodels():
    # batch "b3" occurs only among the A cells (but does not cover them)
    rng = np.random.default_rng(12)
    g = np.array(list("AAAAABBBBCCCCCCC"))
    b = np.array(["b1", "b1", "b3", "b3", "b2", "b1", "b2", "b2", "b1", "b1", "b2", "b1", "b2", "b2", "b1", "b2"])
    usage = _usage_table(rng, g, {"B": 1.0})
    res = program_anova(usage, g, batch=b)
    for _, row in res.iterrows():
        ref, fit = _sm_typ2(usage[row["program"]].to_numpy(), g, b)
        np.testing.assert_allclose(row["F"], ref["F"], rtol=1e-8)
        np.testing.assert_allclose(row["pvalue"], ref["PR(>F)"], rtol=1e-8)
        assert row["df_resid"] == fit.df_resid == 11


def test_anova_rank_deficient_confounded_batch_matches_nested_models():
    # batch "b3" is exactly group C: the design is rank deficient, C's effect is
    # absorbed by batch and only one group df remains (A vs B within b1/b2).
    rng = np.random.default_rng(13)
    g = np.array(list("AAAAABBBBCCCCCCC"))
    b = np.where(g == "C", "b3", np.where(np.arange(g.size) % 2 == 0, "b1", "b2"))
    usage = _usage_table(rng, g, {"B": 1.2, "C": -0.5})
    res = program_anova(usage, g, batch=b)
    assert (res["df_group"] == 1).all() and (res["df_resid"] == 12).all()
    for _, row in res.iterrows():
        df = pd.DataFrame({"y": usage[row["program"]].to_numpy(), "g": g, "b": b})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # statsmodels warns about the rank deficiency
            full = smf.ols("y ~ C(g) + C(b)", df).fit()
            reduced = smf.ols("y ~ C(b)", df).fit()
            cmp = anova_lm(reduced, full)
        assert full.df_resid == row["df_resid"]
        np.testing.assert_allclose(row["F"], cmp["F"].iloc[1], rtol=1e-8)
        np.testing.assert_allclose(row["pvalue"], cmp["Pr(>F)"].iloc[1], rtol=1e-8)
        assert cmp["df_diff"].iloc[1] == row["df_group"]


def test_anova_constant_program_is_nan_and_excluded():
    rng = np.random.default_rng(14)
    g = np.repeat(["NT", "A", "B"], [6, 5, 4])
    usage = _usage_table(rng, g, {"A": 1.0})
    usage["P04"] = 0.3
    res = program_anova(usage, g)
    row = res.set_index("program").loc["P04"]
    assert np.isnan(row["F"]) and np.isnan(row["pvalue"]) and np.isnan(row["qvalue"])
    ok = res["program"] != "P04"
    np.testing.assert_allclose(res.loc[ok, "qvalue"], multipletests(res.loc[ok, "pvalue"], method="fdr_bh")[1])


def test_anova_validation():
    usage = pd.DataFrame({"P01": [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(ValueError, match="groups has 3 entries"):
        program_anova(usage, ["a", "b", "a"])
    with pytest.raises(ValueError, match="at least 2 distinct groups"):
        program_anova(usage, ["a"] * 4)
    with pytest.raises(ValueError, match="usage contains NaN"):
        program_anova(usage.assign(P01=[1.0, np.nan, 3.0, 4.0]), ["a", "b", "a", "b"])
    with pytest.raises(ValueError, match="groups has 1 missing"):
        program_anova(usage, ["a", None, "a", "b"])
    with pytest.raises(ValueError, match="batch has 1 missing"):
        program_anova(usage, ["a", "b", "a", "b"], batch=["x", "y", np.nan, "x"])
    with pytest.raises(ValueError, match="batch has 2 entries"):
        program_anova(usage, ["a", "b", "a", "b"], batch=["x", "y"])


def test_anova_series_aligned_by_index():
    rng = np.random.default_rng(15)
    cells = [f"c{i}" for i in range(12)]
    g = pd.Series(np.repeat(["NT", "A", "B"], 4), index=cells)
    usage = _usage_table(rng, g.to_numpy(), {"A": 1.0}).set_axis(cells)
    shuffled = g.iloc[rng.permutation(12)]
    pd.testing.assert_frame_equal(program_anova(usage, shuffled), program_anova(usage, g))
    with pytest.raises(ValueError, match="index does not match"):
        program_anova(usage, g.reset_index(drop=True))


def test_anova_on_realistic_size():
    rng = np.random.default_rng(16)
    n = 20_000
    g = rng.integers(0, 26, n).astype(str)
    b = rng.integers(0, 4, n).astype(str)
    usage = pd.DataFrame(rng.gamma(1.0, size=(n, 45)), columns=[f"P{i:02d}" for i in range(1, 46)])
    res = program_anova(usage, g, batch=b)
    assert res.shape == (45, 7)
    assert (res["df_group"] == 25).all() and (res["df_resid"] == n - 29).all()


# --------------------------------------------------------------------------- #
# Contrasts
# --------------------------------------------------------------------------- #
def _contrast_data(seed=20):
    rng = np.random.default_rng(seed)
    g = np.array(["non-targeting"] * 12 + ["GATA1"] * 7 + ["TP53"] * 5 + ["MYC"] * 1)
    usage = _usage_table(rng, g, {"GATA1": 1.5, "TP53": -0.8})
    return usage, g


def test_contrasts_match_scipy_welch_and_bh():
    usage, g = _contrast_data()
    res = program_contrasts(usage, g, control_label="non-targeting", method="welch")
    assert list(res.columns) == [
        "program", "perturbation", "n_cells", "n_control", "mean_perturbed", "mean_control",
        "effect", "effect_std", "statistic", "pvalue", "qvalue",
    ]
    assert res.attrs["skipped_groups"] == ["MYC"]
    assert set(res["perturbation"]) == {"GATA1", "TP53"}
    assert len(res) == 2 * 3
    ctrl = usage[g == "non-targeting"]
    for _, row in res.iterrows():
        pert = usage[g == row["perturbation"]]
        a, c = pert[row["program"]].to_numpy(), ctrl[row["program"]].to_numpy()
        ref = sps.ttest_ind(a, c, equal_var=False)
        np.testing.assert_allclose(row["statistic"], ref.statistic, rtol=1e-10)
        np.testing.assert_allclose(row["pvalue"], ref.pvalue, rtol=1e-10)
        assert row["n_cells"] == len(a) and row["n_control"] == len(c) == 12
        np.testing.assert_allclose(row["effect"], a.mean() - c.mean(), rtol=1e-12)
        # Cohen's d by hand
        n1, n0 = len(a), len(c)
        pooled = np.sqrt(((n1 - 1) * a.var(ddof=1) + (n0 - 1) * c.var(ddof=1)) / (n1 + n0 - 2))
        np.testing.assert_allclose(row["effect_std"], (a.mean() - c.mean()) / pooled, rtol=1e-10)
    # BH over the whole table, not per perturbation
    np.testing.assert_allclose(res["qvalue"], multipletests(res["pvalue"], method="fdr_bh")[1], rtol=1e-12)
    per_group = res.groupby("perturbation")["pvalue"].transform(lambda p: multipletests(p, method="fdr_bh")[1])
    assert not np.allclose(per_group, res["qvalue"])


def test_contrasts_min_cells_skips_groups():
    usage, g = _contrast_data()
    res = program_contrasts(usage, g, control_label="non-targeting", min_cells=6)
    assert res.attrs["skipped_groups"] == ["MYC", "TP53"]
    assert set(res["perturbation"]) == {"GATA1"}
    with pytest.raises(ValueError, match="min_cells"):
        program_contrasts(usage, g, control_label="non-targeting", min_cells=1)


def test_contrasts_missing_control_label_raises():
    usage, g = _contrast_data()
    with pytest.raises(ValueError, match=r"'NTC'.*'GATA1'.*'non-targeting'"):
        program_contrasts(usage, g, control_label="NTC")


def test_contrasts_small_control_raises():
    usage, g = _contrast_data()
    with pytest.raises(ValueError, match="control group 'MYC' has 1 cell"):
        program_contrasts(usage, g, control_label="MYC")


def test_contrasts_zero_variance_program_gives_nan():
    usage, g = _contrast_data()
    usage["P04"] = 0.0  # constant everywhere: 0/0
    usage["P05"] = np.where(g == "GATA1", 1.0, 0.0)  # constant within both groups, different means
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warnings leak out
        res = program_contrasts(usage, g, control_label="non-targeting", method="welch")
    sub = res[res["program"].isin(["P04", "P05"])]
    assert sub["pvalue"].isna().all() and sub["statistic"].isna().all() and sub["qvalue"].isna().all()
    ok = res["pvalue"].notna()
    assert ok.sum() == 2 * 3
    np.testing.assert_allclose(res.loc[ok, "qvalue"], multipletests(res.loc[ok, "pvalue"], method="fdr_bh")[1])
    # effect is still reported
    gata_p05 = res[(res["program"] == "P05") & (res["perturbation"] == "GATA1")].iloc[0]
    assert gata_p05["effect"] == 1.0


def test_contrasts_effect_batch_adjusted_by_hand():
    # two batches; perturbation X has 3 cells in b1 and 1 in b2; a third batch
    # holds only control cells and is ignored; Y exists only in b3 (no control)
    g = np.array(["NT", "NT", "X", "X", "X", "NT", "NT", "NT", "X", "NT", "NT", "Y", "Y"])
    b = np.array(["b1", "b1", "b1", "b1", "b1", "b2", "b2", "b2", "b2", "b3", "b3", "b4", "b4"])
    y = np.array([1.0, 3.0, 5.0, 6.0, 7.0, 10.0, 12.0, 14.0, 20.0, 0.0, 2.0, 4.0, 5.0])
    usage = pd.DataFrame({"P01": y, "P02": 2 * y})
    res = program_contrasts(usage, g, control_label="NT", batch=b, method="welch")
    assert res.columns[-1] == "effect_batch_adjusted"
    assert res.attrs["batch_adjusted"] is True
    # by hand: b1: mean X = 6, mean NT = 2, diff 4, weight 3; b2: 20 - 12 = 8, weight 1
    expected = (3 * 4 + 1 * 8) / 4
    x = res[res["perturbation"] == "X"].set_index("program")
    assert x.loc["P01", "effect_batch_adjusted"] == pytest.approx(expected, rel=1e-12)
    assert x.loc["P02", "effect_batch_adjusted"] == pytest.approx(2 * expected, rel=1e-12)
    # the unadjusted effect differs (batch composition differs between groups)
    assert x.loc["P01", "effect"] == pytest.approx(np.mean([5, 6, 7, 20]) - np.mean([1, 3, 10, 12, 14, 0, 2]))
    assert x.loc["P01", "effect"] != pytest.approx(expected)
    # Y shares no batch with the control
    assert res[res["perturbation"] == "Y"]["effect_batch_adjusted"].isna().all()


def test_contrasts_without_batch_has_no_adjusted_column():
    usage, g = _contrast_data()
    res = program_contrasts(usage, g, control_label="non-targeting")
    assert "effect_batch_adjusted" not in res.columns
    assert res.attrs["batch_adjusted"] is False


def test_contrasts_all_groups_skipped_gives_empty_table():
    usage, g = _contrast_data()
    res = program_contrasts(usage, g, control_label="non-targeting", min_cells=10)
    assert res.empty and list(res.columns)[:3] == ["program", "perturbation", "n_cells"]
    assert res.attrs["skipped_groups"] == ["GATA1", "MYC", "TP53"]


# --------------------------------------------------------------------------- #
# Rank test: Mann-Whitney U and van Elteren
# --------------------------------------------------------------------------- #
def _zero_inflated(rng, n, p, decimals=1):
    """Skewed usage with many exact zeros and (after rounding) many ties."""
    return np.round(rng.gamma(1.5, size=(n, p)) * (rng.random((n, p)) < 0.6), decimals)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mannwhitney_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    g = rng.permutation(np.array(["NT"] * 40 + ["A"] * 25 + ["B"] * 9 + ["C"] * 3))
    usage = pd.DataFrame(_zero_inflated(rng, len(g), 6), columns=[f"P{i:02d}" for i in range(1, 7)])
    usage.loc[g == "A", "P01"] += 0.8  # a real shift
    usage["P05"] = np.where(g == "B", 2.0, 0.0)  # constant within both groups: still a valid rank test
    usage["P06"] = 0.0  # all tied: no test
    res = program_contrasts(usage, g, control_label="NT", method="mannwhitney")
    assert list(res.columns) == [
        "program", "perturbation", "n_cells", "n_control", "mean_perturbed", "mean_control",
        "effect", "effect_std", "statistic", "pvalue", "qvalue",
    ]
    assert res.attrs["method"] == "mannwhitney"
    ctrl = usage[g == "NT"]
    for _, row in res.iterrows():
        a = usage.loc[g == row["perturbation"], row["program"]].to_numpy()
        c = ctrl[row["program"]].to_numpy()
        np.testing.assert_allclose(row["effect"], a.mean() - c.mean(), rtol=1e-12)
        if np.ptp(np.r_[a, c]) == 0:  # all tied (P06; P05 except for B): no test, as for Welch
            assert np.isnan(row["statistic"]) and np.isnan(row["pvalue"])  # scipy: p = 1
            continue
        ref = sps.mannwhitneyu(a, c, method="asymptotic", use_continuity=True)
        np.testing.assert_allclose(row["pvalue"], ref.pvalue, rtol=1e-10, atol=1e-300)
        # the z statistic: sign of U - n1 n0 / 2 (0 within the continuity correction), reproduces the p-value
        deviation = ref.statistic - len(a) * len(c) / 2
        assert np.sign(row["statistic"]) == (np.sign(deviation) if abs(deviation) > 0.5 else 0.0)
        np.testing.assert_allclose(min(1.0, 2 * sps.norm.sf(abs(row["statistic"]))), ref.pvalue, rtol=1e-10)
    assert res.set_index(["perturbation", "program"]).loc[("A", "P01"), "statistic"] > 3
    ok = res["pvalue"].notna()
    np.testing.assert_allclose(res.loc[ok, "qvalue"], multipletests(res.loc[ok, "pvalue"], method="fdr_bh")[1])


def _van_elteren_by_hand(a, c, batch_a, batch_c):
    """Straightforward van Elteren: scipy ranks per batch, weights 1 / (N_b + 1)."""
    num, var = 0.0, 0.0
    for level in set(batch_a) & set(batch_c):
        x, y = a[batch_a == level], c[batch_c == level]
        n1, n0 = len(x), len(y)
        n = n1 + n0
        ranks = sps.rankdata(np.r_[x, y])
        _, t = np.unique(np.r_[x, y], return_counts=True)
        w = 1.0 / (n + 1)
        num += w * (ranks[:n1].sum() - n1 * (n + 1) / 2)
        var += w**2 * n1 * n0 / 12 * ((n + 1) - (t**3 - t).sum() / (n * (n - 1)))
    z = num / np.sqrt(var)
    return z, 2 * sps.norm.sf(abs(z))


@pytest.mark.parametrize("seed", [0, 1])
def test_van_elteren_matches_direct_implementation(seed):
    rng = np.random.default_rng(seed)
    g = np.array(["NT"] * 60 + ["A"] * 30 + ["B"] * 12)
    b = rng.choice(["b1", "b2", "b3"], size=len(g), p=[0.5, 0.3, 0.2])
    b[np.flatnonzero(g == "A")[:4]] = "b4"  # perturbed cells only: contributes nothing
    b[np.flatnonzero(g == "NT")[:5]] = "b5"  # control cells only: contributes nothing
    usage = pd.DataFrame(_zero_inflated(rng, len(g), 4), columns=["P01", "P02", "P03", "P04"])
    usage.loc[b == "b2", "P02"] += 1.0  # batch shift
    usage.loc[g == "A", "P03"] += 1.0  # perturbation effect
    res = program_contrasts(usage, g, "NT", batch=b, method="mannwhitney")
    assert res.columns[-1] == "effect_batch_adjusted"
    ctrl = g == "NT"
    for _, row in res.iterrows():
        pert = g == row["perturbation"]
        y = usage[row["program"]].to_numpy()
        z, p = _van_elteren_by_hand(y[pert], y[ctrl], b[pert], b[ctrl])
        np.testing.assert_allclose(row["statistic"], z, rtol=1e-10)
        np.testing.assert_allclose(row["pvalue"], p, rtol=1e-10, atol=1e-300)
        # effect is the batch-adjusted difference of means
        assert row["effect"] == pytest.approx(row["effect_batch_adjusted"], rel=1e-12)
    assert res.set_index(["perturbation", "program"]).loc[("A", "P03"), "pvalue"] < 1e-4


def test_van_elteren_with_one_batch_is_mann_whitney_without_continuity():
    rng = np.random.default_rng(4)
    g = np.array(["NT"] * 30 + ["A"] * 20)
    usage = pd.DataFrame(_zero_inflated(rng, 50, 3), columns=["P01", "P02", "P03"])
    res = program_contrasts(usage, g, "NT", batch=["b1"] * 50, method="mannwhitney")
    for _, row in res.iterrows():
        y = usage[row["program"]].to_numpy()
        ref = sps.mannwhitneyu(y[g == "A"], y[g == "NT"], method="asymptotic", use_continuity=False)
        np.testing.assert_allclose(row["pvalue"], ref.pvalue, rtol=1e-10)


def test_van_elteren_group_sharing_no_batch_with_control_is_nan():
    g = np.array(["NT"] * 6 + ["X"] * 4 + ["Y"] * 3)
    b = np.array(["b1"] * 6 + ["b1", "b1", "b2", "b2"] + ["b3"] * 3)
    usage = pd.DataFrame({"P01": np.arange(13.0), "P02": np.arange(13.0) % 3})
    res = program_contrasts(usage, g, "NT", batch=b, method="mannwhitney").set_index(["perturbation", "program"])
    assert res.loc["Y", ["statistic", "pvalue", "qvalue", "effect"]].isna().all().all()
    assert res.loc["X", "pvalue"].notna().all()


def test_unknown_method_is_refused():
    usage, g = _contrast_data()
    with pytest.raises(ValueError, match=r"method must be one of 'welch', 'ols_batch', 'mannwhitney'"):
        program_contrasts(usage, g, control_label="non-targeting", method="wilcoxon")


def test_mannwhitney_on_realistic_size():
    rng = np.random.default_rng(17)
    n = 20_000
    g = np.where(rng.random(n) < 0.25, "NT", rng.integers(0, 30, n).astype(str))
    b = rng.integers(0, 4, n).astype(str)
    usage = pd.DataFrame(rng.gamma(1.0, size=(n, 50)) * (rng.random((n, 50)) < 0.6))
    plain = program_contrasts(usage, g, "NT", method="mannwhitney")
    stratified = program_contrasts(usage, g, "NT", batch=b, method="mannwhitney")
    assert len(plain) == len(stratified) == 30 * 50
    assert plain["pvalue"].between(0, 1).all() and stratified["pvalue"].between(0, 1).all()
