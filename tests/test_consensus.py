"""Choosing k: restarts in parallel, stability, consensus programs, held-out error, the k rule.

The machinery is checked on semi-NMF data (signed programs, ``model="seminmf"``); the default
model, NMF, on non-negative planted programs: identifiable, found across seeds, k found.
"""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal

from perturbnmf.decomposition import consensus_sweep, refit_usage, relative_error, suggest_k
from test_seminmf_hals import matched_cosine


def planted_screen(seed=0, n=600, m=80, k=4, noise=0.4):
    """Programs with near-separable usage (most cells use one program) plus noise: k is clear."""
    rng = np.random.default_rng(seed)
    W = np.zeros((n, k))
    main = rng.integers(0, k, n)
    W[np.arange(n), main] = rng.gamma(4.0, 1.0, n)
    W += (rng.random((n, k)) < 0.15) * rng.gamma(1.0, 0.5, (n, k))
    H = rng.normal(size=(k, m))
    X = W @ H + noise * rng.normal(size=(n, m))
    return sp.csr_matrix(X), W, H


@pytest.fixture(scope="module")
def sweep():
    X, _, H = planted_screen()
    return X, H, consensus_sweep(X, [2, 3, 4, 5, 6, 7], model="seminmf", density_threshold=None, n_restarts=4,
                                 random_state=0, n_jobs=2, max_iter=300)


def test_the_planted_k_is_suggested(sweep):
    _, _, result = sweep
    assert result.suggested_k == 4
    assert "Suggested k = 4" in result.rule


def test_consensus_programs_match_the_planted_ones(sweep):
    from scipy.optimize import linear_sum_assignment

    _, H_true, result = sweep
    H = result.components[4]
    Tn = H_true / np.linalg.norm(H_true, axis=1, keepdims=True)
    cosine = Tn @ H.T
    rows, cols = linear_sum_assignment(-cosine)
    assert cosine[rows, cols].min() > 0.95
    assert_allclose(np.linalg.norm(H, axis=1), 1.0)


def test_stability_is_high_at_the_planted_k(sweep):
    table = sweep[2].table.set_index("k")
    assert table.loc[4, "stability"] > 0.8
    assert table["stability"].between(-1, 1).all()


def test_table_reports_errors_consistently(sweep):
    X, _, result = sweep
    table = result.table
    assert list(table["k"]) == [2, 3, 4, 5, 6, 7]
    assert (table["n_restarts"] == 4).all() and (table["n_converged"] <= 4).all()
    # held-out cells: 10 % of the cells, never used to learn the programs
    holdout = result.holdout_cells
    assert len(holdout) == 60 and len(np.unique(holdout)) == 60
    H = result.components[4]
    X_holdout = X[holdout].toarray()
    # bi-cross-validation by hand: usage from one half of the genes predicts the other half
    rng = np.random.default_rng(np.random.SeedSequence(0).spawn(1)[0])
    rng.choice(X.shape[0], 60, replace=False)
    halves = np.array_split(rng.permutation(X.shape[1]), 2)
    residual = norm = 0.0
    for fit, test in (halves, halves[::-1]):
        W = refit_usage(X_holdout[:, fit], H[:, fit])
        residual += np.linalg.norm(X_holdout[:, test] - W @ H[:, test]) ** 2
        norm += np.linalg.norm(X_holdout[:, test]) ** 2
    assert table.set_index("k").loc[4, "holdout_relative_error"] == pytest.approx(np.sqrt(residual / norm), rel=1e-8)
    # training error: the Gram form equals the direct residual
    train = np.setdiff1d(np.arange(X.shape[0]), holdout)
    X_train = X[train].toarray()
    W = refit_usage(X_train, H)
    assert relative_error(X_train, W, H) == pytest.approx(
        np.linalg.norm(X_train - W @ H) / np.linalg.norm(X_train), rel=1e-8)


def test_holdout_error_rises_past_the_planted_k(sweep):
    """Unlike refitting usage on all genes, the bi-cross-validated error penalises extra programs."""
    errors = sweep[2].table.set_index("k")["holdout_relative_error"]
    assert errors.idxmin() == 4 and errors[7] > errors[4]


def test_parallel_restarts_equal_serial_restarts():
    X, _, _ = planted_screen(seed=1, n=300)
    serial = consensus_sweep(X, [3, 4], model="seminmf", n_restarts=3, random_state=5, n_jobs=1, max_iter=100)
    parallel = consensus_sweep(X, [3, 4], model="seminmf", n_restarts=3, random_state=5, n_jobs=2, max_iter=100)
    for k in (3, 4):
        assert_array_equal(serial.restart_components[k][0], parallel.restart_components[k][0])
        assert_array_equal(serial.components[k], parallel.components[k])
    pd.testing.assert_frame_equal(serial.table.drop(columns="seconds"), parallel.table.drop(columns="seconds"))


def test_another_seed_gives_other_restarts():
    X, _, _ = planted_screen(seed=1, n=300)
    a = consensus_sweep(X, [4], model="seminmf", n_restarts=2, random_state=1, n_jobs=1, max_iter=50)
    b = consensus_sweep(X, [4], model="seminmf", n_restarts=2, random_state=2, n_jobs=1, max_iter=50)
    assert not np.array_equal(a.restart_components[4][0], b.restart_components[4][0])


def test_refit_usage_solves_the_nonnegative_least_squares_problem():
    rng = np.random.default_rng(2)
    X, H = rng.normal(size=(50, 30)), rng.normal(size=(5, 30))
    W = refit_usage(X, H)
    gradient = W @ (H @ H.T) - X @ H.T
    assert np.all(W >= 0)
    assert np.abs(gradient[W > 0]).max() < 1e-6
    assert gradient[W == 0].min() > -1e-6


def test_suggest_k_rule():
    """The one-SE floor from held-out cells, then the largest k whose stability is as high as the best's."""
    table = pd.DataFrame({"k": [5, 10, 15, 20], "holdout_excess": [0.05, 0.001, 0.0, 0.002],
                          "holdout_excess_se": [0.004, 0.002, 0.0, 0.001], "stability": [0.99, 0.95, 0.94, 0.5],
                          "stability_se": [0.01] * 4, "n_restarts": [5] * 4})
    k, rule = suggest_k(table)
    assert k == 15  # floor 10 (0.001 <= 1 SE; 5 predicts held-out cells worse); 0.94 is within 1/50 of 0.95
    assert "k = 10 is the smallest k" in rule and "the last k whose stability" in rule
    k, rule = suggest_k(table.assign(stability=[0.99, 0.95, 0.90, 0.5]))
    assert k == 10 and "smallest k tried" not in rule
    k, rule = suggest_k(table.assign(holdout_excess=[0.05, 0.04, 0.03, 0.0], stability=[0.9, 0.9, 0.9, 0.3]))
    assert k == 20 and "largest k tried" in rule and "stability is low" in rule
    # stabilities near 1 that differ by less than one restart program's share (1/25 at k = 5) are equal
    saturated = table.assign(holdout_excess=[0.0001, 0.0, 0.03, 0.07], holdout_excess_se=[0.0003, 0, 0.001, 0.001],
                             stability=[0.998, 0.995, 0.79, 0.48], stability_se=[0.0005, 0.0007, 0.04, 0.06])
    assert suggest_k(saturated)[0] == 10
    k, rule = suggest_k(table.assign(holdout_excess=np.nan, stability=[0.99, 0.97, 0.80, 0.5]))
    assert k == 10 and "no cells were held out" in rule
    # the edge, not a later recovery: stability falls at 15 and comes back at 20
    assert suggest_k(saturated.assign(stability=[0.79, 0.79, 0.59, 0.79], stability_se=[0.05] * 4))[0] == 10


def nonnegative_screen(seed=0, n=1500, m=200, k=6, noise=0.3):
    """Non-negative programs (each raises its own genes, shares a few), sparse-ish usage, noise."""
    rng = np.random.default_rng(seed)
    H = np.zeros((k, m))
    for p, genes in enumerate(np.array_split(rng.permutation(m), k)):
        H[p, genes] = rng.gamma(3.0, 1.0, len(genes))
        H[p, rng.choice(m, 5, replace=False)] += rng.gamma(2.0, 0.5, 5)
    W = rng.gamma(2.0, 1.0, (n, k)) * (rng.random((n, k)) < 0.4)
    X = np.maximum(W @ H + noise * rng.normal(size=(n, m)) + 0.5, 0.0)  # a baseline all cells share
    return sp.csr_matrix(X), W, H


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmf_programs_are_identifiable(seed):
    """NMF recovers every planted program (up to order and scale) at cosine >= 0.95 across seeds; semi-NMF,
    whose signed loadings let programs mix, does not on the same data."""
    X, _, H_true = nonnegative_screen(seed=seed)
    k = len(H_true)
    baseline = np.ones((X.shape[0], 1))  # the expression all cells share has its own term, as in the pipeline
    nmf = consensus_sweep(X, [k], model="nmf", covariates=baseline, n_restarts=3, random_state=seed, n_jobs=1,
                          holdout_fraction=0.0)
    semi = consensus_sweep(X, [k], model="seminmf", covariates=baseline, n_restarts=3, random_state=seed, n_jobs=1,
                           holdout_fraction=0.0)
    assert matched_cosine(nmf.components[k], H_true).min() >= 0.95
    assert np.all(nmf.components[k] >= 0)
    assert matched_cosine(semi.components[k], H_true).min() < 0.95
    assert nmf.table["stability"].iloc[0] > 0.9 > semi.table["stability"].iloc[0]


@pytest.mark.parametrize("n_programs", [6, 10, 14])
def test_the_k_rule_finds_the_planted_number_of_programs(n_programs):
    """With 6-14 planted programs (and a baseline all cells share) the suggested k is within one sweep step."""
    X, _, H_true = nonnegative_screen(seed=n_programs, n=2000, m=280, k=n_programs)
    planted = n_programs
    k_values = [planted - 4, planted - 2, planted, planted + 2, planted + 4]
    result = consensus_sweep(X, k_values, model="nmf", covariates=np.ones((X.shape[0], 1)), n_restarts=4,
                             random_state=0, n_jobs=2)
    assert abs(result.suggested_k - planted) <= 2, result.table
    table = result.table.set_index("k")
    assert table.loc[planted, "stability"] >= 0.8
    assert table.loc[planted + 4, "stability"] < table.loc[planted, "stability"]


def test_covariates_take_the_baseline_not_a_program():
    """A baseline per batch (known usage 1 in its cells) gets its own loadings; the k programs are the planted ones."""
    from perturbnmf import NMF

    X, W_true, H_true = nonnegative_screen(seed=4, n=1200, m=150, k=4, noise=0.1)
    batch = np.random.default_rng(4).integers(0, 2, X.shape[0])
    Z = np.eye(2)[batch]
    X = sp.csr_matrix(X.toarray() + Z @ np.array([[0.0] * 150, [1.5] * 150]))  # batch 2 has a higher baseline
    model = NMF(4, random_state=0).fit(X, covariates=Z)
    assert matched_cosine(model.components_, H_true).min() >= 0.95
    assert model.covariate_components_.shape == (2, 150)
    assert model.covariate_components_[1].mean() - model.covariate_components_[0].mean() == pytest.approx(1.5, abs=0.15)
    W = model.transform(X, covariates=Z)
    fit = W @ model.components_ + Z @ model.covariate_components_
    assert np.linalg.norm(X.toarray() - fit) / np.linalg.norm(X.toarray()) < 0.1
    with pytest.raises(ValueError, match="pass covariates="):
        model.transform(X)


def test_density_filter_drops_outlier_programs():
    from perturbnmf.decomposition._consensus import _dense_programs

    rng = np.random.default_rng(0)
    programs = np.eye(3, 20)
    H_all = np.vstack([programs + 0.01 * rng.normal(size=programs.shape) for _ in range(4)])
    H_all[5] = rng.normal(size=20)  # restart 1's second program is a stray blend
    H_all /= np.linalg.norm(H_all, axis=1, keepdims=True)
    kept = _dense_programs(H_all, n_restarts=4, density_threshold=0.5)
    assert not kept[5] and kept.sum() == 11
    assert _dense_programs(H_all, n_restarts=4, density_threshold=None).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"n_restarts": 0}, "n_restarts"),
    ({"holdout_fraction": 0.7}, "holdout_fraction"),
    ({"model": "pca"}, "model must be one of"),
])
def test_bad_parameters_are_refused(kwargs, message):
    X, _, _ = planted_screen(n=100)
    with pytest.raises(ValueError, match=message):
        consensus_sweep(X, [3], **{"model": "seminmf", **kwargs})


def test_nmf_refuses_negative_data_naming_the_fix():
    X, _, _ = planted_screen(n=100)
    with pytest.raises(ValueError, match="NMF needs a non-negative X.*SemiNMF"):
        consensus_sweep(X, [3])


def test_polishing_a_consensus_with_a_dead_program_is_reproducible():
    """A consensus program whose usage dies is re-seeded during the final fit; with the sweep's seed the
    re-seeding is the same every time (it drew from the operating system's entropy before)."""
    from perturbnmf.decomposition._consensus import _polish

    rng = np.random.default_rng(0)
    X = rng.random((120, 30)) @ np.diag(rng.random(30) + 0.5)
    H_median = np.vstack([rng.random((2, 30)), np.zeros((1, 30))])  # the third program is dead
    H_cov = np.zeros((0, 30))
    runs = [_polish(X, H_median, H_cov, None, "seminmf", "hals", 50, 1e-6, random_state=7) for _ in range(2)]
    assert np.abs(runs[0][1][2]).sum() > 0  # the dead program was re-seeded
    for first, second in zip(*runs):
        assert_array_equal(first, second)
