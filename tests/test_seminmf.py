"""Tests for perturbnmf.decomposition._seminmf.SemiNMF with the original analysis's rule (solver="mu",
Ding, Li & Jordan 2010); the default solver ("hals", SVD start) is tested in test_seminmf_hals.py."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal
from scipy.linalg import subspace_angles
from scipy.optimize import linear_sum_assignment
from sklearn.exceptions import ConvergenceWarning

from perturbnmf.decomposition._seminmf import (
    SemiNMF,
    _initialize,
    _objective,
    _update_h_least_squares,
    _update_w_multiplicative,
)


# --------------------------------------------------------------------------
# Helpers and fixtures
# --------------------------------------------------------------------------
def _signed_sparse_data(seed, n=80, m=50, density=0.3):
    """Random data of both signs with many exact zeros (dense ndarray)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, m)) + 0.5
    X[rng.random((n, m)) > density] = 0.0
    return X


def _planted(seed, n=300, m=120, k=4, density=0.5, noise=0.01):
    """X = W_true H_true + noise with sparse-ish gamma W_true >= 0 and signed H_true."""
    rng = np.random.default_rng(seed)
    W_true = rng.gamma(2.0, 1.0, (n, k)) * (rng.random((n, k)) < density)
    H_true = rng.normal(size=(k, m))
    N = noise * rng.normal(size=(n, m))
    return W_true @ H_true + N, W_true, H_true, N


def _matched_cosine(H, H_true):
    """Mean cosine of Hungarian-matched rows of H (k, m) and H_true (k, m)."""
    Hn = H / np.linalg.norm(H, axis=1, keepdims=True)
    Tn = H_true / np.linalg.norm(H_true, axis=1, keepdims=True)
    C = Tn @ Hn.T
    rows, cols = linear_sum_assignment(-C)
    return C[rows, cols].mean()


def _fit(X, quiet=True, **kwargs):
    """Fit with the original analysis's rule unless the test asks otherwise."""
    kwargs.setdefault("solver", "mu")
    kwargs.setdefault("init", "random")
    model = SemiNMF(**kwargs)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(X)
    return model, W


# Inline, independent transcription of the Ding-Li-Jordan (2010) rules.
def _dlj_h(X, W):
    return np.linalg.solve(W.T @ W, W.T @ X)


def _dlj_w(X, W, H, eps=0.0):
    A = X @ H.T
    B = H @ H.T
    Ap, An = (np.abs(A) + A) / 2, (np.abs(A) - A) / 2
    Bp, Bn = (np.abs(B) + B) / 2, (np.abs(B) - B) / 2
    return W * np.sqrt((Ap + W @ Bn) / (An + W @ Bp + eps))


# --------------------------------------------------------------------------
# 1. Constraints: W >= 0, finite H
# --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
def test_w_nonnegative_h_finite(fmt):
    X = _signed_sparse_data(0)
    assert X.min() < 0
    Xin = X if fmt == "dense" else getattr(sp, f"{fmt}_matrix")(X)
    model, W = _fit(Xin, n_components=5, random_state=0, max_iter=200)
    H = model.components_
    assert W.shape == (80, 5) and H.shape == (5, 50)
    assert np.all(W >= 0)
    assert np.all(np.isfinite(W)) and np.all(np.isfinite(H))
    assert model.n_components_ == 5 and model.n_features_in_ == 50
    assert 1 <= model.n_iter_ <= 200
    assert model.objective_.shape == (model.n_iter_,)


# --------------------------------------------------------------------------
# 2. Monotone objective under mu
# --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objective_non_increasing(seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(120, 60))
    model, _ = _fit(X, n_components=6, random_state=seed, max_iter=300, tol=1e-12)
    trace = np.concatenate([[model.initial_objective_], model.objective_])
    increase = np.diff(trace)
    assert np.all(increase <= 1e-10 * trace[:-1]), increase.max()
    # it actually decreases, and the trace ends at the reported error
    assert trace[-1] < 0.9 * trace[0]
    assert_allclose(model.objective_[-1], 0.5 * model.reconstruction_err_**2, rtol=1e-8)


# --------------------------------------------------------------------------
# 3. Planted programs
# --------------------------------------------------------------------------
def test_planted_fit_reaches_noise_floor_and_usage_subspace():
    X, W_true, H_true, N = _planted(100)
    noise_floor = np.linalg.norm(N)
    # best of a few random starts (lowest reconstruction error)
    fits = [_fit(X, n_components=4, random_state=s, max_iter=2000, tol=1e-10) for s in range(3)]
    model, W = min(fits, key=lambda f: f[0].reconstruction_err_)
    # the true factors achieve ||N||; the fit must be at least about as good
    assert model.reconstruction_err_ <= 1.1 * noise_floor
    assert model.reconstruction_err_ / np.linalg.norm(X) < 0.01
    # the usage subspace and the program (row) subspace are recovered
    assert np.degrees(subspace_angles(W, W_true)).max() < 1.0
    assert np.degrees(subspace_angles(model.components_.T, H_true.T)).max() < 1.0


def test_planted_truth_is_recovered_from_a_nearby_start():
    # Semi-NMF is only identifiable up to W -> W Q, H -> Q^-1 H for any invertible
    # Q with W Q >= 0 (e.g. any non-negative Q), so recovery of the individual
    # programs is checked from a start near the truth (every entry perturbed,
    # zeros filled in) rather than from an arbitrary random start.
    X, W_true, H_true, N = _planted(101)
    rng = np.random.default_rng(0)
    W0 = W_true * rng.uniform(0.8, 1.2, W_true.shape) + 0.05 * rng.random(W_true.shape)
    model = SemiNMF(n_components=4, init="custom", max_iter=3000, tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(X, W=W0)
    assert _matched_cosine(model.components_, H_true) > 0.95
    assert model.reconstruction_err_ <= 1.1 * np.linalg.norm(N)
    assert model.reconstruction_err_ / np.linalg.norm(X) < 0.01
    assert np.all(W >= 0)

    # noiseless data started exactly at the truth: the truth is a fixed point
    X0 = W_true @ H_true
    model0 = SemiNMF(n_components=4, init="custom", max_iter=50, tol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W_fix = model0.fit_transform(X0, W=W_true)
    assert _matched_cosine(model0.components_, H_true) > 0.9999
    assert_allclose(W_fix, W_true, atol=1e-6 * W_true.max())
    assert model0.reconstruction_err_ / np.linalg.norm(X0) < 1e-6


# --------------------------------------------------------------------------
# 4. Sparse == dense
# --------------------------------------------------------------------------
def test_sparse_and_dense_agree():
    X = _signed_sparse_data(3, n=100, m=60)
    dense, W_d = _fit(X, n_components=5, random_state=7, max_iter=150, tol=1e-12)
    for fmt in (sp.csr_matrix, sp.csc_matrix, sp.csr_array):
        sparse, W_s = _fit(fmt(X), n_components=5, random_state=7, max_iter=150, tol=1e-12)
        assert sparse.n_iter_ == dense.n_iter_
        assert_allclose(W_s, W_d, rtol=1e-8, atol=1e-12)
        assert_allclose(sparse.components_, dense.components_, rtol=1e-8, atol=1e-12)
        assert_allclose(sparse.objective_, dense.objective_, rtol=1e-8)
    # converging by tol: same number of iterations too
    d2, W2 = _fit(X, n_components=5, random_state=7, max_iter=500, tol=1e-4)
    s2, W2s = _fit(sp.csr_matrix(X), n_components=5, random_state=7, max_iter=500, tol=1e-4)
    assert s2.n_iter_ == d2.n_iter_
    assert_allclose(W2s, W2, rtol=1e-8, atol=1e-12)


def test_sparse_input_is_not_modified():
    X = sp.csr_matrix(_signed_sparse_data(4))
    before = X.copy()
    _fit(X, n_components=3, random_state=0, max_iter=20)
    assert (X != before).nnz == 0 and X.dtype == before.dtype


# --------------------------------------------------------------------------
# 5. Reproducibility
# --------------------------------------------------------------------------
def test_random_state_reproducible():
    X = _signed_sparse_data(5)
    a, Wa = _fit(X, n_components=4, random_state=42, max_iter=100)
    b, Wb = _fit(X, n_components=4, random_state=42, max_iter=100)
    c, Wc = _fit(X, n_components=4, random_state=43, max_iter=100)
    assert_array_equal(Wa, Wb)
    assert_array_equal(a.components_, b.components_)
    assert_array_equal(a.objective_, b.objective_)
    assert not np.allclose(Wa, Wc)
    assert not np.allclose(a.components_, c.components_)
    # the random start has no exact zeros (zero-locking) and is reproducible
    Xf = np.asarray(X, dtype=float)
    W0, _ = _initialize(Xf, 4, "random", 42)
    W0b, _ = _initialize(Xf, 4, "random", 42)
    assert np.all(W0 > 0)
    assert_array_equal(W0, W0b)


# --------------------------------------------------------------------------
# 6. Updates equal an independent transcription of Ding-Li-Jordan
# --------------------------------------------------------------------------
def test_updates_match_ding_li_jordan_formulas():
    rng = np.random.default_rng(11)
    X = rng.normal(size=(30, 20))
    W = rng.uniform(0.1, 1.0, size=(30, 4))
    H = rng.normal(size=(4, 20))

    assert_allclose(_update_h_least_squares(X, W), _dlj_h(X, W), rtol=1e-9, atol=1e-12)
    assert_allclose(_update_w_multiplicative(X, W, H, eps=0.0), _dlj_w(X, W, H), rtol=1e-12)
    # the default (tiny, data-relative) eps changes nothing measurable here
    assert_allclose(_update_w_multiplicative(X, W, H), _dlj_w(X, W, H), rtol=1e-10)
    # sparse X gives the same steps
    Xs = sp.csr_matrix(X)
    assert_allclose(_update_w_multiplicative(Xs, W, H, eps=0.0), _dlj_w(X, W, H), rtol=1e-12)
    assert_allclose(_update_h_least_squares(Xs, W), _dlj_h(X, W), rtol=1e-9, atol=1e-12)
    # objective formula vs the direct residual
    assert_allclose(_objective(X, W, H), 0.5 * np.linalg.norm(X - W @ H) ** 2, rtol=1e-10)
    assert_allclose(_objective(Xs, W, H), 0.5 * np.linalg.norm(X - W @ H) ** 2, rtol=1e-10)

    # whole fit: alternate (H step, W step) from a custom W0, compared end to end
    model = SemiNMF(n_components=4, solver="mu", init="custom", max_iter=3, tol=1e-15)
    with pytest.warns(ConvergenceWarning):
        W_fit = model.fit_transform(X, W=W)
    Wk = W.copy()
    trace = []
    for _ in range(3):
        Hk = _dlj_h(X, Wk)
        Wk = _dlj_w(X, Wk, Hk)
        trace.append(0.5 * np.linalg.norm(X - Wk @ _dlj_h(X, Wk)) ** 2)
    assert_allclose(W_fit, Wk, rtol=1e-8)
    assert_allclose(model.components_, _dlj_h(X, Wk), rtol=1e-8, atol=1e-12)
    assert_allclose(model.objective_, trace, rtol=1e-8)
    assert_allclose(model.initial_objective_, 0.5 * np.linalg.norm(X - W @ _dlj_h(X, W)) ** 2, rtol=1e-8)


# --------------------------------------------------------------------------
# 7. Rank deficiency and dead components
# --------------------------------------------------------------------------
def test_h_step_with_dead_column_is_min_norm_and_finite():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 25))
    W = rng.uniform(0.1, 1.0, size=(40, 4))
    W[:, 2] = 0.0
    H = _update_h_least_squares(X, W)
    assert np.all(np.isfinite(H))
    assert_allclose(H[2], 0.0, atol=1e-10)
    assert_allclose(H, np.linalg.pinv(W) @ X, rtol=1e-8, atol=1e-10)
    # the W step keeps the dead column at zero and stays finite
    W_new = _update_w_multiplicative(X, W, H)
    assert np.all(np.isfinite(W_new)) and np.all(W_new >= 0)
    assert np.all(W_new[:, 2] == 0)


def test_dead_component_warns_and_fit_continues():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(50, 30))
    W0 = rng.uniform(0.1, 1.0, size=(50, 3))
    W0[:, 1] = 0.0
    model = SemiNMF(n_components=3, solver="mu", init="custom", max_iter=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.warns(RuntimeWarning, match="component 1"):
            W = model.fit_transform(X, W=W0)
    assert np.all(np.isfinite(W)) and np.all(np.isfinite(model.components_))
    assert np.all(W[:, 1] == 0)
    assert np.all(np.isfinite(model.objective_))


def test_fit_rank_below_k_runs():
    rng = np.random.default_rng(5)
    X = rng.gamma(1.0, 1.0, (60, 2)) @ rng.normal(size=(2, 40))  # rank 2 < k = 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence / dead-component warnings allowed
        for Xin in (X, sp.csr_matrix(X)):
            model = SemiNMF(n_components=5, random_state=0, max_iter=300)
            W = model.fit_transform(Xin)
            assert np.all(np.isfinite(W)) and np.all(W >= 0)
            assert np.all(np.isfinite(model.components_))
            assert np.isfinite(model.reconstruction_err_)
            assert model.reconstruction_err_ / np.linalg.norm(X) < 0.05


# --------------------------------------------------------------------------
# 8. transform
# --------------------------------------------------------------------------
def test_transform_solves_w_subproblem():
    X = _signed_sparse_data(6, n=120, m=60)
    model, W_fit = _fit(X, n_components=5, random_state=0, max_iter=300)
    H = model.components_
    W_t = model.transform(X)
    assert W_t.shape == W_fit.shape
    assert np.all(W_t >= 0)
    err_t = np.linalg.norm(X - W_t @ H)
    assert err_t <= model.reconstruction_err_ * 1.01
    # KKT conditions of min_{W>=0} 0.5||X - W H||^2: gradient G = W HH^T - X H^T
    G = W_t @ (H @ H.T) - X @ H.T
    scale = np.abs(X @ H.T).max()
    assert np.all(G >= -1e-6 * scale)  # no descent direction into the feasible set
    assert np.abs(G[W_t > 0]).max() <= 1e-6 * scale  # zero gradient on the support
    # sparse input gives the same usage; inverse_transform reconstructs
    assert_allclose(model.transform(sp.csr_matrix(X)), W_t, rtol=1e-7, atol=1e-10)
    assert_allclose(model.transform(sp.csc_matrix(X)), W_t, rtol=1e-7, atol=1e-10)
    assert_allclose(model.inverse_transform(W_t), W_t @ H)


def test_transform_checks_features_and_fitted():
    X = _signed_sparse_data(7)
    with pytest.raises(Exception, match="not fitted"):
        SemiNMF(n_components=2).transform(X)
    model, _ = _fit(X, n_components=2, random_state=0, max_iter=20)
    with pytest.raises(ValueError, match="features"):
        model.transform(X[:, :10])


# --------------------------------------------------------------------------
# 9. Parameter validation
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, match",
    [
        ({"n_components": 0}, "n_components"),
        ({"n_components": 20}, "n_components"),  # == min(shape)
        ({"n_components": 50}, "n_components"),
        ({"tol": 0}, "tol"),
        ({"tol": -1}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"solver": "foo"}, "solver.*mu"),
        ({"init": "nndsvd"}, "init"),
    ],
)
def test_bad_parameters(params, match):
    X = np.random.default_rng(0).normal(size=(20, 30))
    with pytest.raises(ValueError, match=match):
        SemiNMF(**params).fit(X)


def test_n_components_message_is_actionable():
    X = np.random.default_rng(0).normal(size=(20, 30))
    with pytest.raises(ValueError, match=r"min\(20, 30\) = 20.*at most 19"):
        SemiNMF(n_components=20).fit(X)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("sparse", [False, True])
def test_non_finite_X(bad, sparse):
    X = np.random.default_rng(0).normal(size=(20, 30))
    X[3, 4] = bad
    Xin = sp.csr_matrix(X) if sparse else X
    with pytest.raises(ValueError, match="X contains NaN or infinite values"):
        SemiNMF(n_components=2).fit(Xin)


@pytest.mark.parametrize(
    "X, match",
    [
        (np.arange(10.0), "X must be a 2-D"),
        (np.zeros((0, 5)), "X is empty"),
        (np.zeros((5, 0)), "X is empty"),
        (np.array([["a", "b"], ["c", "d"]], dtype=object), "X must contain only numeric"),
    ],
)
def test_bad_X(X, match):
    with pytest.raises(ValueError, match=match):
        SemiNMF(n_components=1).fit(X)


def test_bad_custom_init():
    X = np.random.default_rng(0).normal(size=(20, 30))
    model = SemiNMF(n_components=3, init="custom")
    with pytest.raises(ValueError, match="requires an initial W"):
        model.fit(X)
    with pytest.raises(ValueError, match="shape"):
        model.fit(X, W=np.ones((20, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        model.fit(X, W=-np.ones((20, 3)))
    with pytest.raises(ValueError, match="H has shape"):
        model.fit(X, W=np.ones((20, 3)), H=np.ones((2, 30)))


# --------------------------------------------------------------------------
# 10. Convergence reporting
# --------------------------------------------------------------------------
def test_max_iter_1_warns():
    X = _signed_sparse_data(8)
    model = SemiNMF(n_components=3, random_state=0, max_iter=1)
    with pytest.warns(ConvergenceWarning, match="max_iter=1"):
        model.fit(X)
    assert model.n_iter_ == 1 and not model.converged_
    assert model.objective_.shape == (1,)


def test_converged_by_tol():
    X, _, _, _ = _planted(9, n=100, m=40, k=3)
    model = SemiNMF(n_components=3, solver="mu", init="random", random_state=0, max_iter=5000, tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model.fit(X)
    assert model.converged_
    assert model.n_iter_ < 5000
    # The test compares the decrease over the last 10 iterations with tol.
    f = np.concatenate([[model.initial_objective_], model.objective_])
    window_change = (f[:-10] - f[10:]) / f[:-10]  # window_change[t - 10] ends at iteration t
    assert window_change[-1] < 1e-4  # stopped because of tol
    assert np.all(window_change[:-1] >= 1e-4)  # and not earlier


def test_a_plateau_does_not_stop_the_fit():
    """Multiplicative updates cross plateaus where one step changes the objective by < tol;
    the windowed test must carry on to a clearly lower objective."""
    rng = np.random.default_rng(3)
    X = rng.gamma(1.0, 1.0, size=(400, 60)) @ rng.normal(size=(60, 80)) * 0.05 + rng.normal(size=(400, 80))
    model = SemiNMF(n_components=5, solver="mu", init="random", random_state=0, max_iter=3000, tol=1e-4).fit(X)
    f = np.concatenate([[model.initial_objective_], model.objective_])
    one_step = (f[:-1] - f[1:]) / f[:-1]
    first_small_step = int(np.argmax(one_step < 1e-4)) + 1
    assert model.converged_ and model.n_iter_ > first_small_step
    # A one-step rule would have stopped at first_small_step; the fit improved by more than tol after it.
    assert (f[first_small_step] - f[-1]) / f[first_small_step] > 1e-4


# --------------------------------------------------------------------------
# 11. reconstruction_err_
# --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
def test_reconstruction_err(fmt):
    X = _signed_sparse_data(10)
    Xin = X if fmt == "dense" else getattr(sp, f"{fmt}_matrix")(X)
    model, W = _fit(Xin, n_components=4, random_state=1, max_iter=100)
    assert_allclose(model.reconstruction_err_, np.linalg.norm(X - W @ model.components_), rtol=1e-6)


# --------------------------------------------------------------------------
# scikit-learn API
# --------------------------------------------------------------------------
def test_sklearn_api_conventions():
    import pandas as pd
    from sklearn.utils.estimator_checks import check_estimator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_estimator(SemiNMF(n_components=1, max_iter=2000, tol=1e-10))

    X = _signed_sparse_data(12, n=30, m=8)
    df = pd.DataFrame(X, columns=[f"g{i}" for i in range(8)])
    model, _ = _fit(df, n_components=2, random_state=0, max_iter=20)
    assert list(model.feature_names_in_) == list(df.columns)
    assert list(model.get_feature_names_out()) == ["seminmf0", "seminmf1"]
