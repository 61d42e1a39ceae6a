"""The built-in null: the contrast test on pseudo-perturbations made only of control cells."""

import numpy as np
import pandas as pd
import pytest

from perturbnmf.tl import calibration_summary, control_null


def null_screen(seed=0, n_control=1200, n_groups=15, group_size=80, n_programs=8, shifted_guide=None):
    """Usage with no perturbation effect at all (skewed, zero-inflated like program usage)."""
    rng = np.random.default_rng(seed)
    n = n_control + n_groups * group_size
    usage = rng.gamma(0.6, 1.0, (n, n_programs)) * (rng.random((n, n_programs)) < 0.7)
    groups = np.array(["NT"] * n_control + [f"T{i:02d}" for i in range(n_groups) for _ in range(group_size)])
    guides = np.where(groups == "NT", rng.choice(["NTg1", "NTg2", "NTg3", "NTg4"], n), groups + "g1")
    if shifted_guide:
        usage[guides == shifted_guide, 0] += 0.8  # a control guide that is not neutral
    frame = pd.DataFrame(usage, columns=[f"P{i + 1:02d}" for i in range(n_programs)])
    return frame, groups, guides


def test_random_pseudo_groups_give_calibrated_p_values():
    usage, groups, _ = null_screen()
    null = control_null(usage, groups, "NT", n_pseudo=40, seed=1)
    assert set(null["null_split"]) == {"random"} and null["perturbation"].nunique() == 40
    summary = calibration_summary(null["pvalue"], fdr=0.05)
    assert summary["n_tests"] == 40 * 8
    assert 0.75 < summary["inflation"] < 1.33
    assert summary["ks_pvalue"] > 0.001
    assert summary["n_null_hits"] == 0


def test_control_guides_become_the_pseudo_groups():
    usage, groups, guides = null_screen()
    null = control_null(usage, groups, "NT", guides=guides)
    assert set(null["null_split"]) == {"control guide"}
    assert sorted(null["perturbation"].unique()) == ["null:NTg1", "null:NTg2", "null:NTg3", "null:NTg4"]
    sizes = null.groupby("perturbation")["n_cells"].first()
    assert sizes["null:NTg1"] == int(((groups == "NT") & (guides == "NTg1")).sum())
    # each guide is tested against the other control cells
    assert (null["n_cells"] + null["n_control"] == int((groups == "NT").sum())).all()


def test_a_non_neutral_control_guide_shows_up_in_the_null():
    usage, groups, guides = null_screen(shifted_guide="NTg2")
    null = control_null(usage, groups, "NT", guides=guides)
    hits = null[null["qvalue"] < 0.05]
    assert ("null:NTg2", "P01") in set(zip(hits["perturbation"], hits["program"]))


def test_calibration_summary_detects_inflation():
    rng = np.random.default_rng(3)
    uniform = calibration_summary(rng.random(5000))
    assert uniform["inflation"] == pytest.approx(1.0, abs=0.08)
    assert uniform["share_below_0_05"] == pytest.approx(0.05, abs=0.01)
    inflated = calibration_summary(rng.random(5000) ** 2)
    assert inflated["inflation"] > 1.5 and inflated["ks_pvalue"] < 1e-6


def test_too_few_control_cells_is_refused():
    usage, groups, _ = null_screen(n_control=3)
    with pytest.raises(ValueError, match="control cells"):
        control_null(usage, groups, "NT")


def confounded_screen(seed=0):
    """Batch 2 raises program P01; the perturbation's cells sit mostly in batch 2, the controls in batch 1."""
    rng = np.random.default_rng(seed)
    n_c, n_g = 600, 300
    groups = np.array(["NT"] * n_c + ["KO"] * n_g)
    batch = np.r_[np.where(rng.random(n_c) < 0.8, "b1", "b2"), np.where(rng.random(n_g) < 0.8, "b2", "b1")]
    usage = rng.gamma(2.0, 1.0, (n_c + n_g, 3))
    usage[batch == "b2", 0] += 1.0  # a batch effect, no perturbation effect
    return pd.DataFrame(usage, columns=["P01", "P02", "P03"]), groups, batch


def test_batch_confounding_fools_welch_but_not_the_batch_aware_test():
    from perturbnmf.tl import program_contrasts

    usage, groups, batch = confounded_screen()
    welch = program_contrasts(usage, groups, "NT", batch=batch, method="welch").set_index("program")
    aware = program_contrasts(usage, groups, "NT", batch=batch, method="ols_batch").set_index("program")
    assert welch.loc["P01", "qvalue"] < 1e-4  # a false hit when batch is ignored
    assert aware.loc["P01", "pvalue"] > 0.01  # none when it is modelled
    assert abs(aware.loc["P01", "effect"]) < 0.2


def test_batch_aware_test_matches_statsmodels_hc3():
    import statsmodels.formula.api as smf

    from perturbnmf.tl import program_contrasts

    usage, groups, batch = confounded_screen(seed=1)
    usage.loc[groups == "KO", "P02"] += 0.7  # a real effect
    aware = program_contrasts(usage, groups, "NT", batch=batch, method="ols_batch").set_index("program")
    frame = usage.assign(perturbed=(groups == "KO").astype(float), batch=batch)
    for program in ["P01", "P02"]:
        fit = smf.ols(f"{program} ~ perturbed + C(batch)", data=frame).fit(cov_type="HC3")
        assert aware.loc[program, "effect"] == pytest.approx(fit.params["perturbed"], rel=1e-8)
        assert aware.loc[program, "statistic"] == pytest.approx(fit.tvalues["perturbed"], rel=1e-6)
    assert aware.loc["P02", "qvalue"] < 1e-3


def test_batch_aware_test_needs_batch():
    from perturbnmf.tl import program_contrasts

    usage, groups, _ = confounded_screen()
    with pytest.raises(ValueError, match="needs the batch"):
        program_contrasts(usage, groups, "NT", method="ols_batch")


def test_batch_confounding_fools_mann_whitney_but_not_van_elteren():
    from perturbnmf.tl import program_contrasts

    usage, groups, batch = confounded_screen()
    plain = program_contrasts(usage, groups, "NT", method="mannwhitney").set_index("program")
    stratified = program_contrasts(usage, groups, "NT", batch=batch, method="mannwhitney").set_index("program")
    assert plain.loc["P01", "qvalue"] < 1e-4  # batch B's shift, credited to the perturbation
    assert stratified.loc["P01", "pvalue"] > 0.01  # ranks within batch: no hit
    assert abs(stratified.loc["P01", "effect"]) < 0.2  # the batch-adjusted difference of means
    assert plain.loc["P01", "effect"] > 0.4  # the raw difference carries the batch shift
    # a real effect is still found by the stratified test
    usage.loc[groups == "KO", "P02"] += 0.7
    stratified = program_contrasts(usage, groups, "NT", batch=batch, method="mannwhitney").set_index("program")
    assert stratified.loc["P02", "qvalue"] < 1e-4


@pytest.mark.parametrize("batched", [False, True])
def test_control_null_with_the_rank_test_is_calibrated(batched):
    usage, groups, _ = null_screen(seed=2)
    batch = np.random.default_rng(5).choice(["b1", "b2", "b3"], len(groups)) if batched else None
    null = control_null(usage, groups, "NT", batch=batch, n_pseudo=40, seed=1, method="mannwhitney")
    assert null.attrs["method"] == "mannwhitney"
    summary = calibration_summary(null["pvalue"], fdr=0.05)
    assert summary["n_tests"] == 40 * 8
    assert 0.75 < summary["inflation"] < 1.33
    assert summary["ks_pvalue"] > 0.001
    assert summary["n_null_hits"] == 0
