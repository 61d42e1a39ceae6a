"""Tests of perturbnmf.evaluation: scoring recovered programs and effects against the truth."""

import numpy as np
import pandas as pd
import pytest

from perturbnmf.evaluation import effect_recovery, implied_effects, match_programs, program_similarity

TRUE_NAMES = ["IFN", "S_PHASE", "G2M", "HYPOXIA", "MHC"]


def _truth(n_genes=200, n_true=5, seed=0):
    """Planted weights: disjoint blocks of 30 genes with positive weights."""
    rng = np.random.default_rng(seed)
    W = np.zeros((n_genes, n_true))
    for p in range(n_true):
        W[p * 30:(p + 1) * 30, p] = rng.uniform(0.5, 1.5, size=30)
    return W


def test_permuted_rescaled_copy_is_recovered():
    W = _truth()
    perm = np.array([3, 0, 4, 1, 2])  # recovered program j is planted program perm[j]
    scale = np.array([0.1, 5.0, 2.0, 0.7, 30.0])
    loadings = W[:, perm] * scale
    names = [f"P{j + 1:02d}" for j in range(5)]
    match = match_programs(W, loadings, TRUE_NAMES)
    assert list(match.columns) == ["planted_program", "program", "cosine", "best_cosine_any"]
    assert match["planted_program"].tolist() == TRUE_NAMES
    expected = {TRUE_NAMES[perm[j]]: names[j] for j in range(5)}
    assert dict(zip(match["planted_program"], match["program"])) == expected
    np.testing.assert_allclose(match["cosine"], 1.0)
    np.testing.assert_allclose(match["best_cosine_any"], 1.0)


def test_extra_noise_components_still_match():
    rng = np.random.default_rng(1)
    W = _truth()
    noisy = W + rng.normal(0, 0.05, size=W.shape)  # signed noise everywhere
    extra = rng.normal(0, 0.3, size=(W.shape[0], 3))  # k = 8 > n_true = 5
    loadings = np.column_stack([extra[:, 0], noisy[:, 2], extra[:, 1], noisy[:, 0],
                                noisy[:, 4], noisy[:, 1], extra[:, 2], noisy[:, 3]])
    names = ["A", "B", "C", "D", "E", "F", "G", "H"]
    match = match_programs(W, loadings, TRUE_NAMES, names)
    assert match["program"].tolist() == ["D", "F", "B", "H", "E"]
    assert (match["cosine"] > 0.9).all()
    assert (match["cosine"] == match["best_cosine_any"]).all()
    sim = program_similarity(W, loadings, TRUE_NAMES, names)
    assert sim.shape == (5, 8)
    assert sim.index.tolist() == TRUE_NAMES and sim.columns.tolist() == names
    assert sim.index.name == "planted_program" and sim.columns.name == "program"
    assert (sim.loc[:, ["A", "C", "G"]].abs().to_numpy() < 0.5).all()


def test_sign_matters():
    W = _truth()
    loadings = np.column_stack([-W[:, 0], W[:, 0] + 0.01, W[:, 1:]])
    match = match_programs(W, loadings, TRUE_NAMES)
    assert match.loc[0, "program"] == "P02"  # not the flipped copy
    assert program_similarity(W, loadings).iloc[0, 0] == pytest.approx(-1.0)


def test_default_names_and_dataframes():
    W = _truth()
    match = match_programs(W, W[:, ::-1])
    assert match["planted_program"].tolist() == ["T01", "T02", "T03", "T04", "T05"]
    assert match["program"].tolist() == ["P05", "P04", "P03", "P02", "P01"]
    genes = [f"G{i}" for i in range(W.shape[0])]
    truth_df = pd.DataFrame(W, index=genes, columns=TRUE_NAMES)
    load_df = pd.DataFrame(W[:, [1, 0, 2, 3, 4]], index=genes, columns=["a", "b", "c", "d", "e"])
    match = match_programs(truth_df, load_df.iloc[::-1])  # reordered genes are aligned
    assert match["planted_program"].tolist() == TRUE_NAMES
    assert match["program"].tolist() == ["b", "a", "c", "d", "e"]
    np.testing.assert_allclose(match["cosine"], 1.0)


def test_fewer_recovered_than_planted():
    W = _truth()
    match = match_programs(W, W[:, [4, 1, 2]])
    assert match["program"].isna().sum() == 2
    assert match.loc[match["program"].notna(), "cosine"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert match.loc[match["program"].isna(), "cosine"].isna().all()


def test_shape_mismatch_raises():
    W = _truth()
    with pytest.raises(ValueError, match="loadings"):
        match_programs(W, W[:-1])
    with pytest.raises(ValueError, match="loadings"):
        program_similarity(W, W[:-1])
    with pytest.raises(ValueError, match="true_weights"):
        match_programs(W[:, 0], W)
    with pytest.raises(ValueError, match="program_names"):
        match_programs(W, W, program_names=["a", "b"])
    with pytest.raises(ValueError, match="true_names"):
        match_programs(W, W, true_names=["a"] * 5)
    with pytest.raises(ValueError, match="loadings"):
        match_programs(W, np.full_like(W, np.nan))


# ---- effect recovery --------------------------------------------------------------------
@pytest.fixture
def recovery_inputs():
    match = pd.DataFrame({
        "planted_program": ["IFN", "HYPOXIA", "MHC"],
        "program": ["P02", "P01", "P03"],
        "cosine": [0.9, 0.8, 0.7],
        "best_cosine_any": [0.9, 0.8, 0.7],
    })
    truth = pd.DataFrame({
        "perturbation": ["T1", "T2", "T3", "T3", "T4"],
        "program": ["IFN", "HYPOXIA", "IFN", "MHC", "MHC"],
        "fold_change": [2.5, 0.3, 2.0, 0.25, 2.2],
        "direction": ["up", "down", "up", "down", "up"],
    })
    rows = []
    for pert in ["T1", "T2", "T3", "T4", "TNULL"]:
        for prog in ["P01", "P02", "P03", "P04"]:
            rows.append({"program": prog, "perturbation": pert, "effect": 0.01, "qvalue": 0.8})
    con = pd.DataFrame(rows).set_index(["perturbation", "program"])
    con.loc[("T1", "P02"), ["effect", "qvalue"]] = [0.5, 0.001]   # recovered (up)
    con.loc[("T2", "P01"), ["effect", "qvalue"]] = [-0.4, 0.01]   # recovered (down)
    con.loc[("T3", "P02"), ["effect", "qvalue"]] = [-0.3, 0.02]   # significant, wrong sign
    con.loc[("T3", "P03"), ["effect", "qvalue"]] = [-0.2, 0.20]   # right sign, not significant
    # T4 x P03 (planted up) stays at q = 0.8: missed
    con.loc[("TNULL", "P01"), ["effect", "qvalue"]] = [0.3, 0.001]  # discovery on a null target
    con.loc[("T1", "P04"), ["effect", "qvalue"]] = [0.2, 0.04]   # unmatched recovered program
    con.loc[("T2", "P02"), ["effect", "qvalue"]] = [0.2, 0.05]   # q == fdr: not a discovery
    contrasts = con.reset_index()
    contrasts["pvalue"] = contrasts["qvalue"] / 10  # extra columns are ignored
    return contrasts, truth, match


def test_effect_recovery_hand_counted(recovery_inputs):
    contrasts, truth, match = recovery_inputs
    res = effect_recovery(contrasts, truth, match, fdr=0.05)
    assert res["n_planted"] == 5
    assert res["n_recovered"] == 2
    assert res["sensitivity"] == pytest.approx(2 / 5)
    # discoveries: T1xP02, T2xP01 (true); T3xP02 (sign), TNULLxP01, T1xP04 (false)
    assert res["n_discoveries"] == 5
    assert res["n_false_discoveries"] == 3
    assert res["false_discovery_proportion"] == pytest.approx(3 / 5)
    # of the 3 false ones, TNULLxP01 is on a target without any planted effect
    assert res["n_null_target_discoveries"] == 1
    assert res["n_spillover_discoveries"] == 2
    table = res["table"]
    assert list(table.columns) == ["perturbation", "planted_program", "program", "direction",
                                   "fold_change", "effect", "qvalue", "recovered"]
    assert table["recovered"].dtype == bool
    assert table["recovered"].tolist() == [True, True, False, False, False]
    assert table["program"].tolist() == ["P02", "P01", "P02", "P03", "P03"]
    assert table.loc[2, "effect"] == pytest.approx(-0.3)
    assert table.loc[2, "qvalue"] == pytest.approx(0.02)
    assert table["fold_change"].tolist() == [2.5, 0.3, 2.0, 0.25, 2.2]


def test_effect_recovery_threshold_and_empty(recovery_inputs):
    contrasts, truth, match = recovery_inputs
    res = effect_recovery(contrasts, truth, match, fdr=0.25)
    # now T3xP03 (q 0.20, right sign) is recovered and T2xP02 (q 0.05) is a false discovery
    assert res["n_recovered"] == 3
    assert res["n_discoveries"] == 7
    assert res["n_false_discoveries"] == 4
    quiet = contrasts.assign(qvalue=0.9)
    res = effect_recovery(quiet, truth, match)
    assert res["n_discoveries"] == 0 and res["false_discovery_proportion"] == 0.0
    assert res["sensitivity"] == 0.0


def test_effect_recovery_unmatched_planted_program(recovery_inputs):
    contrasts, truth, match = recovery_inputs
    match = match.copy()
    match.loc[2, "program"] = None  # MHC not matched (k < n_true)
    res = effect_recovery(contrasts, truth, match)
    mhc = res["table"][res["table"]["planted_program"] == "MHC"]
    assert mhc["program"].isna().all() and not mhc["recovered"].any()
    assert mhc["qvalue"].isna().all()
    assert res["n_recovered"] == 2


def test_effect_recovery_bad_inputs(recovery_inputs):
    contrasts, truth, match = recovery_inputs
    with pytest.raises(ValueError, match="contrasts"):
        effect_recovery(contrasts.drop(columns="qvalue"), truth, match)
    with pytest.raises(ValueError, match="truth_effects"):
        effect_recovery(contrasts, truth.drop(columns="direction"), match)
    with pytest.raises(ValueError, match="program_match"):
        effect_recovery(contrasts, truth, match.drop(columns="program"))
    with pytest.raises(ValueError, match="program_match"):
        effect_recovery(contrasts, truth.assign(program="UNKNOWN"), match)
    with pytest.raises(ValueError, match="contrasts"):
        effect_recovery(pd.concat([contrasts, contrasts.iloc[:1]]), truth, match)
    with pytest.raises(ValueError, match="fdr"):
        effect_recovery(contrasts, truth, match, fdr=0)
    with pytest.raises(ValueError, match="direction"):
        effect_recovery(contrasts, truth.assign(direction="sideways"), match)


def _blended_screen(seed=0, n_per_group=300):
    """Planted usage U with one real effect; recovered usage is a known blend W = 0.5 + U M."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(["ctrl", "A", "B"], n_per_group)
    U = rng.gamma(3.0, 0.5, size=(groups.size, 3))
    U[groups == "A", 0] *= 2.0  # A doubles planted program 0; B does nothing
    M = np.array([[1.0, 0.3, 0.0],   # recovered P1 is mostly planted 0, P2 takes 30 % of it
                  [0.0, 1.0, 0.0],
                  [0.0, 0.0, 1.0]])
    W = 0.5 + U @ M
    return U, pd.DataFrame(W, columns=["P1", "P2", "P3"]), groups, M


def test_implied_effects_follow_the_blend_of_planted_programs():
    U, W, groups, M = _blended_screen()
    implied = implied_effects(U, W, groups, "ctrl").set_index(["perturbation", "program"])
    shift_A = U[groups == "A"].mean(0) - U[groups == "ctrl"].mean(0)
    for j, program in enumerate(W.columns):
        np.testing.assert_allclose(implied.loc[("A", program), "implied_effect"], shift_A @ M[:, j], rtol=1e-8)
    # the blend carries A's effect onto P2 but not P3
    assert implied.loc[("A", "P2"), "implied_effect_std"] > 0.2
    assert abs(implied.loc[("A", "P3"), "implied_effect_std"]) < 0.1
    np.testing.assert_allclose(implied["r_squared"], 1.0)


def test_discoveries_are_judged_against_implied_shifts():
    U, W, groups, _ = _blended_screen()
    implied = implied_effects(U, W, groups, "ctrl")
    truth = pd.DataFrame({"perturbation": ["A"], "program": ["T0"], "direction": ["up"]})
    match = pd.DataFrame({"planted_program": ["T0"], "program": ["P1"]})
    contrasts = pd.DataFrame({
        "perturbation": ["A", "A", "A", "B", "B", "B"], "program": ["P1", "P2", "P3"] * 2,
        "effect": [1.0, 0.3, 0.2, -0.1, 0.0, 0.0], "qvalue": [1e-9, 1e-3, 0.01, 0.02, 0.9, 0.9],
    })
    result = effect_recovery(contrasts, truth, match, fdr=0.05, implied=implied)
    assert result["n_discoveries"] == 4
    assert result["false_discovery_proportion"] == pytest.approx(3 / 4)  # strict: only A→P1 was planted
    # A→P2 is a real (blended) shift; A→P3 and B→P1 have negligible implied shifts
    assert result["n_negligible"] + result["n_sign_errors"] == 2
    assert result["implied_false_discovery_proportion"] == pytest.approx(2 / 4)
