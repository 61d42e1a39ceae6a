"""Choosing k: restarts in parallel, stability, consensus programs, held-out error, the k rule."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal

from perturbnmf.consensus import consensus_sweep, refit_usage, relative_error, suggest_k


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
    return X, H, consensus_sweep(X, [2, 3, 4, 5, 6, 7], n_restarts=4, random_state=0, n_jobs=2, max_iter=300)


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
    serial = consensus_sweep(X, [3, 4], n_restarts=3, random_state=5, n_jobs=1, max_iter=100)
    parallel = consensus_sweep(X, [3, 4], n_restarts=3, random_state=5, n_jobs=2, max_iter=100)
    for k in (3, 4):
        assert_array_equal(serial.restart_components[k][0], parallel.restart_components[k][0])
        assert_array_equal(serial.components[k], parallel.components[k])
    pd.testing.assert_frame_equal(serial.table.drop(columns="seconds"), parallel.table.drop(columns="seconds"))


def test_another_seed_gives_other_restarts():
    X, _, _ = planted_screen(seed=1, n=300)
    a = consensus_sweep(X, [4], n_restarts=2, random_state=1, n_jobs=1, max_iter=50)
    b = consensus_sweep(X, [4], n_restarts=2, random_state=2, n_jobs=1, max_iter=50)
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
    table = pd.DataFrame({"k": [5, 10, 15, 20], "holdout_relative_error": [0.60, 0.503, 0.500, 0.499],
                          "relative_error": [0.6, 0.5, 0.5, 0.5], "stability": [0.9, 0.8, 0.3, 0.2]})
    k, rule = suggest_k(table)
    assert k == 10  # 0.503 is within 1 % of the best (0.499); 5 is not
    assert "within 1%" in rule
    k, rule = suggest_k(table.assign(holdout_relative_error=[0.6, 0.55, 0.52, 0.49]))
    assert k == 20 and "largest k tried" in rule and "stability is low" in rule


@pytest.mark.parametrize("kwargs, message", [
    ({"n_restarts": 0}, "n_restarts"),
    ({"holdout_fraction": 0.7}, "holdout_fraction"),
])
def test_bad_parameters_are_refused(kwargs, message):
    X, _, _ = planted_screen(n=100)
    with pytest.raises(ValueError, match=message):
        consensus_sweep(X, [3], **kwargs)
