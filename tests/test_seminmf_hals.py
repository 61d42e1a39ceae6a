"""The default solver (block coordinate descent: HALS W step, least-squares H step), the SVD
start, float32, the compiled products, and dead-component re-seeding."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal
from scipy.optimize import linear_sum_assignment
from sklearn.exceptions import ConvergenceWarning

from perturbnmf.decomposition import _kernels
from perturbnmf.decomposition._seminmf import SemiNMF, _initialize, _objective, _safe_Wt_X, _safe_X_Ht, _svd_start


def planted(seed, n=400, m=150, k=5, density=0.4, noise=0.05):
    """X = W H + noise with sparse gamma W >= 0 (so the programs are identifiable) and signed H."""
    rng = np.random.default_rng(seed)
    W = rng.gamma(2.0, 1.0, (n, k)) * (rng.random((n, k)) < density)
    H = rng.normal(size=(k, m))
    return W @ H + noise * rng.normal(size=(n, m)), W, H


def log_normalised_like(seed, n=500, m=120, density=0.2):
    rng = np.random.default_rng(seed)
    X = sp.random(n, m, density=density, format="csr", random_state=seed, dtype=np.float64)
    X.data = np.log1p(5 * X.data * rng.gamma(2.0, 1.0, X.nnz))
    return X


def matched_cosine(H, H_true):
    Hn = H / np.linalg.norm(H, axis=1, keepdims=True)
    Tn = H_true / np.linalg.norm(H_true, axis=1, keepdims=True)
    C = Tn @ Hn.T
    rows, cols = linear_sum_assignment(-C)
    return C[rows, cols]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_compiled_products_equal_scipy(dtype, index_dtype):
    X = log_normalised_like(0).astype(dtype)
    X.indices = X.indices.astype(index_dtype)
    X.indptr = X.indptr.astype(index_dtype)
    rng = np.random.default_rng(1)
    H, W = rng.normal(size=(7, X.shape[1])), rng.random((X.shape[0], 7))
    Xd = X.toarray().astype(np.float64)
    assert_allclose(_safe_X_Ht(X, H), Xd @ H.T, rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-9)
    assert_allclose(_safe_Wt_X(X, W), W.T @ Xd, rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-9)


def test_compiled_products_do_not_depend_on_the_thread_count():
    import numba

    X = log_normalised_like(2, n=3000)
    W = np.random.default_rng(0).random((3000, 6))
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        results.append(_safe_Wt_X(X, W))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert_array_equal(results[0], results[1])


def test_coordinate_descent_solves_the_w_subproblem():
    """Many sweeps reach the KKT point of min_{W>=0} ½||X - WH||² for fixed H."""
    rng = np.random.default_rng(3)
    X, H = rng.normal(size=(60, 30)), rng.normal(size=(4, 30))
    W = rng.random((60, 4))
    _kernels.coordinate_descent_rows(W, X @ H.T, H @ H.T, 500, 0.0)
    gradient = W @ (H @ H.T) - X @ H.T
    assert np.all(W >= 0)
    assert np.abs(gradient[W > 0]).max() < 1e-8  # zero gradient on the support
    assert gradient[W == 0].min() > -1e-8  # non-negative gradient on the bound


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_objective_never_increases_and_w_is_nonnegative(fmt):
    X = log_normalised_like(4).toarray() - 0.3  # both signs
    X = X if fmt == "dense" else sp.csr_matrix(X)
    model = SemiNMF(n_components=6, random_state=0, max_iter=200, tol=1e-9, dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(X)
    trace = np.concatenate([[model.initial_objective_], model.objective_])
    assert np.all(np.diff(trace) <= 1e-10 * trace[:-1])
    assert np.all(W >= 0) and np.all(np.isfinite(model.components_))


def test_planted_factorisation_is_recovered():
    """Semi-NMF is unique only up to W -> WQ (H free), so the planted model is recovered as a fit at
    the noise floor whose loadings span the planted programs (individual programs need restarts
    and consensus, see test_consensus.py)."""
    from scipy.linalg import subspace_angles

    X, W_true, H_true = planted(0)
    model = SemiNMF(n_components=5, random_state=0, max_iter=500, tol=1e-7, dtype="float64").fit(X)
    noise_floor = np.linalg.norm(X - W_true @ H_true)
    assert model.reconstruction_err_ <= noise_floor
    assert np.degrees(subspace_angles(model.components_.T, H_true.T)).max() < 1.0
    # started at the truth, the solver stays there
    near = SemiNMF(n_components=5, init="custom", max_iter=200, tol=1e-9, dtype="float64")
    near.fit(X, W=W_true)
    assert matched_cosine(near.components_, H_true).min() > 0.999


def test_hals_beats_mu_at_equal_iterations():
    X = log_normalised_like(5, n=800)
    common = dict(n_components=8, random_state=0, max_iter=30, tol=1e-12, dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        hals = SemiNMF(solver="hals", init="random", **common).fit(X)
        mu = SemiNMF(solver="mu", init="random", **common).fit(X)
    assert hals.objective_[-1] < mu.objective_[-1]


def test_svd_start_is_at_least_as_good_as_the_rank_k_minus_1_svd():
    X = log_normalised_like(6).toarray()
    k = 6
    W0, H0 = _initialize(X, k, "svd", 0)
    assert np.all(W0 >= 0)
    s = np.linalg.svd(X, compute_uv=False)
    best_rank_k_minus_1 = 0.5 * np.sum(s[k - 1:] ** 2)
    # exact for the exact SVD; the randomized SVD (2 power iterations) is within 1 %
    assert _objective(X, W0, H0) <= best_rank_k_minus_1 * 1.01


def test_svd_start_reproduces_a_low_rank_matrix():
    """Gillis & Kumar: a rank-(k-1) matrix is represented exactly by the rank-k start."""
    rng = np.random.default_rng(7)
    X = rng.normal(size=(80, 3)) @ rng.normal(size=(3, 50))
    W0 = _svd_start(X, 4, 0)
    H0 = np.linalg.lstsq(W0, X, rcond=None)[0]
    assert np.all(W0 >= 0)
    assert np.linalg.norm(X - W0 @ H0) < 1e-8 * np.linalg.norm(X)


def test_float32_matches_float64():
    X = log_normalised_like(8)
    W32 = SemiNMF(n_components=5, random_state=0, max_iter=300, tol=1e-6, dtype="float32").fit(X)
    W64 = SemiNMF(n_components=5, random_state=0, max_iter=300, tol=1e-6, dtype="float64").fit(X)
    assert W32.reconstruction_err_ == pytest.approx(W64.reconstruction_err_, rel=1e-4)
    assert matched_cosine(W32.components_, W64.components_).min() > 0.999


def test_input_is_not_copied_when_already_float32_csr_or_dense():
    X = log_normalised_like(9).astype(np.float32)
    before = X.data.copy()
    model = SemiNMF(n_components=4, random_state=0)
    assert model._validate_X(X, reset=True).data is X.data
    dense = X.toarray().astype(np.float64)
    assert model._validate_X(dense, reset=True) is dense  # a dense array is used as it is
    model.fit(X)
    assert_array_equal(X.data, before)


def test_dense_equals_sparse_and_same_seed_is_identical():
    X = log_normalised_like(10)
    kwargs = dict(n_components=5, random_state=3, max_iter=100, tol=1e-6)
    a = SemiNMF(**kwargs).fit_transform(X)
    b = SemiNMF(**kwargs).fit_transform(X)
    assert_array_equal(a, b)
    c = SemiNMF(**kwargs).fit_transform(X.toarray())  # dense float64 as is vs sparse read as float32
    assert_allclose(a, c, rtol=1e-3, atol=1e-5)
    d = SemiNMF(**{**kwargs, "random_state": 4}, init="random").fit_transform(X)
    assert not np.allclose(a, d)


def test_dead_component_is_reseeded_and_counted():
    rng = np.random.default_rng(11)
    X = rng.normal(size=(60, 40))
    W0 = rng.random((60, 4))
    W0[:, 2] = 0.0  # dead from the start: its loading row is zero, HALS cannot revive it alone
    model = SemiNMF(n_components=4, init="custom", random_state=0, max_iter=50, tol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        W = model.fit_transform(X, W=W0)
    assert model.n_reseeded_ >= 1
    assert np.any(W[:, 2] > 0) and np.linalg.norm(model.components_[2]) > 0
    trace = np.concatenate([[model.initial_objective_], model.objective_])
    assert np.all(np.diff(trace) <= 1e-10 * trace[:-1])  # re-seeding never raises the objective
