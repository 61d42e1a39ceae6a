"""Per-guide effects and the replication columns (guides and batches agreeing) of a contrasts table."""


import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from perturbnmf.tl import CONSISTENCY_COLUMNS, add_consistency, guide_effects, program_anova, program_contrasts

PROGRAMS = ["P01", "P02", "P03", "P04"]

# target -> guide -> (cells, fold change of P01)
DESIGN = {
    "AGREE": {"g1": (80, 2.5), "g2": (80, 2.5), "g3": (80, 2.5)},
    "MIXED": {"g1": (80, 2.5), "g2": (80, 2.5), "g3": (80, 0.3)},  # g3 lowers P01
    "NULL": {"g1": (80, 1.0), "g2": (80, 1.0), "g3": (80, 1.0)},
    "LONE": {"g1": (80, 2.5), "g2": (1, 1.0)},  # g2 has too few cells to count
}


def guide_screen(seed=0, n_control=400):
    """Zero-inflated gamma usage (40 % zeros, shape 3); guide names repeat across targets; two batches."""
    rng = np.random.default_rng(seed)
    groups = ["NT"] * n_control
    guides = list(rng.choice(["NT1", "NT2", "NT3", "NT4"], n_control))
    folds = [1.0] * n_control
    for target, design in DESIGN.items():
        for guide, (cells, fold) in design.items():
            groups += [target] * cells
            guides += [guide] * cells
            folds += [fold] * cells
    groups, guides, folds = np.array(groups, dtype=object), np.array(guides, dtype=object), np.array(folds)
    n = len(groups)
    batch = rng.choice(["b1", "b2"], n)
    usage = rng.gamma(3.0, 1.0, (n, len(PROGRAMS))) * (rng.random((n, len(PROGRAMS))) > 0.4)
    usage[:, 0] *= folds
    usage[batch == "b2", 1] *= 1.5  # a batch effect on P02
    return pd.DataFrame(usage, columns=PROGRAMS), groups, guides, batch


def row(table, perturbation, program):
    return table.set_index(["perturbation", "program"]).loc[(perturbation, program)]


# --------------------------------------------------------------------------- #
# guide_effects
# --------------------------------------------------------------------------- #
def test_guide_effects_one_row_per_guide_and_program():
    usage, groups, guides, _ = guide_screen()
    table = guide_effects(usage, groups, guides, "NT", method="welch")
    assert list(table.columns[:3]) == ["program", "perturbation", "guide"]
    assert {"n_cells", "n_control", "effect", "effect_std", "statistic", "pvalue", "qvalue"} <= set(table.columns)
    tested = table[["perturbation", "guide"]].drop_duplicates()
    assert sorted(map(tuple, tested.to_numpy())) == [
        ("AGREE", "g1"), ("AGREE", "g2"), ("AGREE", "g3"), ("LONE", "g1"),
        ("MIXED", "g1"), ("MIXED", "g2"), ("MIXED", "g3"), ("NULL", "g1"), ("NULL", "g2"), ("NULL", "g3"),
    ]  # no control guides; "g1" of AGREE and of MIXED are different guides
    assert len(table) == 10 * len(PROGRAMS)
    assert table.attrs["skipped_guides"] == [("LONE", "g2")]
    assert (table["n_control"] == 400).all()
    assert (table.loc[table["perturbation"] != "LONE", "n_cells"] == 80).all()
    # rows sorted by perturbation, guide, then program in usage's column order
    keys = list(zip(table["perturbation"], table["guide"]))
    assert keys == sorted(keys)
    assert list(table["program"][:4]) == PROGRAMS
    mixed = table[(table["perturbation"] == "MIXED") & (table["program"] == "P01")].set_index("guide")
    assert mixed.loc["g1", "effect"] > 0 and mixed.loc["g2", "effect"] > 0 and mixed.loc["g3", "effect"] < 0
    assert (mixed["pvalue"] < 0.01).all()


@pytest.mark.parametrize("method, batched", [("welch", False), ("mannwhitney", False), ("mannwhitney", True),
                                             ("ols_batch", True)])
def test_guide_effects_are_program_contrasts_of_each_guide_against_all_controls(method, batched):
    usage, groups, guides, batch = guide_screen(seed=1)
    b = batch if batched else None
    table = guide_effects(usage, groups, guides, "NT", batch=b, method=method)
    assert table.attrs["method"] == method
    control = groups == "NT"
    columns = ["n_cells", "n_control", "effect", "effect_std", "statistic", "pvalue"]
    for target, guide in [("AGREE", "g2"), ("MIXED", "g3"), ("LONE", "g1")]:
        cells = control | ((groups == target) & (guides == guide))
        ref = program_contrasts(usage[cells], groups[cells], "NT", batch=None if b is None else b[cells],
                                method=method)
        mine = table[(table["perturbation"] == target) & (table["guide"] == guide)]
        np.testing.assert_allclose(mine[columns].to_numpy(float), ref[columns].to_numpy(float), rtol=1e-10)


def test_guide_effects_series_are_aligned_and_all_skipped_gives_empty_table():
    usage, groups, guides, batch = guide_screen()
    cells = [f"c{i}" for i in range(len(groups))]
    shuffled = np.random.default_rng(0).permutation(len(groups))
    as_series = [pd.Series(x, index=cells).iloc[shuffled] for x in (groups, guides, batch)]
    by_index = guide_effects(usage.set_axis(cells), as_series[0], as_series[1], "NT", batch=as_series[2])
    pd.testing.assert_frame_equal(by_index, guide_effects(usage, groups, guides, "NT", batch=batch))
    empty = guide_effects(usage, groups, guides, "NT", min_cells=100)
    assert empty.empty and list(empty.columns[:3]) == ["program", "perturbation", "guide"]
    assert len(empty.attrs["skipped_guides"]) == 11


def test_guide_effects_validation():
    usage, groups, guides, _ = guide_screen()
    with pytest.raises(ValueError, match="guides has 3 entries"):
        guide_effects(usage, groups, guides[:3], "NT")
    with pytest.raises(ValueError, match="control_label 'NTC' is not among"):
        guide_effects(usage, groups, guides, "NTC")
    with pytest.raises(ValueError, match="guides has 1 missing"):
        guide_effects(usage, groups, np.where(np.arange(len(guides)) == 5, None, guides), "NT")


# --------------------------------------------------------------------------- #
# add_consistency
# --------------------------------------------------------------------------- #
def test_consistency_counts_agreeing_and_disagreeing_guides():
    usage, groups, guides, batch = guide_screen()
    contrasts = program_contrasts(usage, groups, "NT")
    table = add_consistency(contrasts, usage, groups, "NT", guides=guides, batch=batch)
    assert list(table.columns) == list(contrasts.columns) + CONSISTENCY_COLUMNS
    pd.testing.assert_frame_equal(table[contrasts.columns], contrasts)

    agree = row(table, "AGREE", "P01")
    assert agree["effect"] > 0
    assert (agree["n_guides"], agree["n_guides_same_sign"]) == (3, 3)
    assert 0 < agree["guide_effect_min"] <= agree["effect"] <= agree["guide_effect_max"]
    assert (agree["n_batches"], agree["n_batches_same_sign"]) == (2, 2)
    assert agree["consistency"] == "3/3 guides, 2/2 batches agree"
    assert agree["guide_heterogeneity_pvalue"] > 0.05  # three guides with the same effect

    mixed = row(table, "MIXED", "P01")
    assert mixed["effect"] > 0  # two strong guides win the pooled mean ...
    assert (mixed["n_guides"], mixed["n_guides_same_sign"]) == (3, 2)  # ... but one guide disagrees
    assert mixed["guide_effect_min"] < 0 < mixed["guide_effect_max"]
    assert mixed["guide_heterogeneity_pvalue"] < 1e-5
    assert mixed["consistency"].startswith("2/3 guides")

    lone = row(table, "LONE", "P01")
    assert (lone["n_guides"], lone["n_guides_same_sign"]) == (1, 1)  # the 1-cell guide does not count
    assert np.isnan(lone["guide_heterogeneity_pvalue"])  # a single guide: nothing to compare
    assert lone["guide_effect_min"] == lone["guide_effect_max"]

    assert table["n_guides"].dtype.kind == "i" and table["n_batches_same_sign"].dtype.kind == "i"
    assert (table["n_guides_same_sign"] <= table["n_guides"]).all()
    assert (table["n_batches_same_sign"] <= table["n_batches"]).all()


@pytest.mark.parametrize("method, batched", [("welch", False), ("welch", True), ("mannwhitney", True)])
def test_guide_extremes_are_those_of_guide_effects(method, batched):
    usage, groups, guides, batch = guide_screen(seed=2)
    b = batch if batched else None
    contrasts = program_contrasts(usage, groups, "NT", batch=b, method=method)
    table = add_consistency(contrasts, usage, groups, guides=guides, batch=b)
    per_guide = guide_effects(usage, groups, guides, "NT", batch=b, method=method)
    extremes = per_guide.groupby(["perturbation", "program"])["effect"].agg(["min", "max", "size"])
    mine = table.set_index(["perturbation", "program"]).loc[extremes.index]
    np.testing.assert_allclose(mine["guide_effect_min"], extremes["min"], rtol=1e-10)
    np.testing.assert_allclose(mine["guide_effect_max"], extremes["max"], rtol=1e-10)
    np.testing.assert_array_equal(mine["n_guides"], extremes["size"])
    same = per_guide.merge(contrasts[["perturbation", "program", "effect"]], on=["perturbation", "program"],
                           suffixes=("", "_all"))
    same = (np.sign(same["effect"]) == np.sign(same["effect_all"])).groupby(
        [same["perturbation"], same["program"]]).sum()
    np.testing.assert_array_equal(mine["n_guides_same_sign"], same.loc[extremes.index])


def test_heterogeneity_pvalue_is_the_guide_anova_within_the_target():
    usage, groups, guides, batch = guide_screen(seed=3)
    contrasts = program_contrasts(usage, groups, "NT")
    for b in [None, batch]:
        table = add_consistency(contrasts, usage, groups, guides=guides, batch=b)
        for target in ["AGREE", "MIXED", "NULL"]:
            cells = groups == target
            ref = program_anova(usage[cells], guides[cells], batch=None if b is None else b[cells])
            mine = table[table["perturbation"] == target]
            np.testing.assert_allclose(mine["guide_heterogeneity_pvalue"], ref["pvalue"], rtol=1e-10)


def test_heterogeneity_pvalues_are_uniform_when_guides_are_exchangeable():
    rng = np.random.default_rng(4)
    n_targets, n_guides, cells, n_prog = 60, 4, 40, 5
    groups = np.r_[["NT"] * 200, np.repeat([f"T{i:02d}" for i in range(n_targets)], n_guides * cells)]
    guides = np.r_[["NTg"] * 200, np.tile(np.repeat([f"g{j}" for j in range(n_guides)], cells), n_targets)]
    usage = pd.DataFrame(rng.gamma(3.0, size=(len(groups), n_prog)) * (rng.random((len(groups), n_prog)) > 0.4))
    contrasts = program_contrasts(usage, groups, "NT")
    p = add_consistency(contrasts, usage, groups, guides=guides)["guide_heterogeneity_pvalue"].to_numpy()
    assert p.size == n_targets * n_prog and np.isfinite(p).all()
    assert sps.kstest(p, "uniform").pvalue > 0.001
    assert (p < 0.05).mean() < 0.1


def test_batch_columns_by_hand():
    usage, groups, guides, batch = guide_screen(seed=5)
    batch = batch.copy()
    batch[np.flatnonzero(groups == "NULL")[:1]] = "b3"  # one NULL cell alone in b3 (no control there)
    # AGREE's P01 rises in b1 but falls in b2
    usage.loc[(groups == "AGREE") & (batch == "b2"), "P01"] *= 0.1
    contrasts = program_contrasts(usage, groups, "NT", batch=batch)
    table = add_consistency(contrasts, usage, groups, batch=batch)
    agree = row(table, "AGREE", "P01")
    y = usage["P01"].to_numpy()
    per_batch = [y[(groups == "AGREE") & (batch == k)].mean() - y[(groups == "NT") & (batch == k)].mean()
                 for k in ["b1", "b2"]]
    assert per_batch[0] > 0 > per_batch[1]
    assert agree["n_batches"] == 2
    assert agree["n_batches_same_sign"] == 1  # whatever the pooled sign, one batch disagrees
    assert agree["consistency"] == "1/2 batches agree"
    assert (table.loc[table["perturbation"] == "NULL", "n_batches"] == 2).all()  # b3 has no control: not counted
    # a batch needs min_cells perturbed cells
    table = add_consistency(contrasts, usage, groups, batch=batch, min_cells=60)
    counts = (groups == "LONE") & (batch == "b1"), (groups == "LONE") & (batch == "b2")
    expected = sum(int(c.sum() >= 60) for c in counts)
    assert (table.loc[table["perturbation"] == "LONE", "n_batches"] == expected).all()
    assert expected < 2


def test_without_guides_or_batch_the_columns_are_empty():
    usage, groups, guides, batch = guide_screen()
    contrasts = program_contrasts(usage, groups, "NT")
    bare = add_consistency(contrasts, usage, groups)
    assert (bare[["n_guides", "n_guides_same_sign", "n_batches", "n_batches_same_sign"]] == 0).all().all()
    assert bare[["guide_effect_min", "guide_effect_max", "guide_heterogeneity_pvalue"]].isna().all().all()
    assert (bare["consistency"] == "").all()
    only_batch = add_consistency(contrasts, usage, groups, batch=batch)
    assert row(only_batch, "AGREE", "P01")["consistency"] == "2/2 batches agree"
    assert (only_batch["n_guides"] == 0).all()
    only_guides = add_consistency(contrasts, usage, groups, guides=guides)
    assert row(only_guides, "AGREE", "P01")["consistency"] == "3/3 guides agree"
    assert (only_guides["n_batches"] == 0).all()


def test_filtered_reordered_table_and_repeated_calls():
    usage, groups, guides, batch = guide_screen()
    contrasts = program_contrasts(usage, groups, "NT")
    full = add_consistency(contrasts, usage, groups, guides=guides, batch=batch)
    subset = contrasts[contrasts["pvalue"] < 0.5].iloc[::-1]
    part = add_consistency(subset, usage, groups, guides=guides, batch=batch)
    pd.testing.assert_frame_equal(part, full.loc[subset.index])
    assert part.attrs["control_label"] == "NT" and part.attrs["consistency"]["min_cells"] == 2
    again = add_consistency(full, usage, groups, guides=guides, batch=batch)  # replaces, does not duplicate
    pd.testing.assert_frame_equal(again, full)
    # an undefined overall effect agrees with nothing
    nan_effect = add_consistency(contrasts.assign(effect=np.nan), usage, groups, guides=guides, batch=batch)
    assert (nan_effect["n_guides_same_sign"] == 0).all() and (nan_effect["n_batches_same_sign"] == 0).all()


def test_consistency_validation():
    usage, groups, guides, batch = guide_screen()
    contrasts = program_contrasts(usage, groups, "NT")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['effect'\]"):
        add_consistency(contrasts.drop(columns="effect"), usage, groups)
    with pytest.raises(ValueError, match=r"perturbation\(s\) \['GHOST'\]"):
        add_consistency(contrasts.assign(perturbation="GHOST"), usage, groups)
    with pytest.raises(ValueError, match=r"program\(s\) \['P99'\]"):
        add_consistency(contrasts.assign(program="P99"), usage, groups)
    bare = contrasts.copy()
    bare.attrs = {}
    with pytest.raises(ValueError, match="control_label is not given"):
        add_consistency(bare, usage, groups)
    adjusted = program_contrasts(usage, groups, "NT", batch=batch, method="ols_batch")
    with pytest.raises(ValueError, match="batch-adjusted effects"):
        add_consistency(adjusted, usage, groups, guides=guides)
    with pytest.raises(ValueError, match="min_cells"):
        add_consistency(contrasts, usage, groups, min_cells=1)


def test_consistency_on_realistic_size():
    rng = np.random.default_rng(6)
    n, n_prog = 20_000, 50
    control = rng.random(n) < 0.2
    groups = np.where(control, "NT", np.char.add("T", rng.integers(0, 30, n).astype(str)))
    guides = np.char.add("g", rng.integers(0, 4, n).astype(str))
    batch = rng.integers(0, 4, n).astype(str)
    usage = pd.DataFrame(rng.gamma(3.0, size=(n, n_prog)) * (rng.random((n, n_prog)) > 0.4))
    contrasts = program_contrasts(usage, groups, "NT", batch=batch, method="mannwhitney")
    table = add_consistency(contrasts, usage, groups, guides=guides, batch=batch)
    assert len(table) == 30 * n_prog and (table["n_guides"] == 4).all() and (table["n_batches"] == 4).all()
