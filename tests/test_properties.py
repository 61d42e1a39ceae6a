"""Property-based tests (hypothesis) of the library's public functions.

Random shapes, sparsity, dtypes and degenerate cases (all-zero rows and columns, constant
columns, 2 x 2 matrices, k = 1 and k = min(n, m) - 1, single-cell groups, ties). Every call
either returns a result with the stated properties or raises a clear ``ValueError`` -- never a
numpy / scipy internal error (LinAlgError, IndexError, ZeroDivisionError, ...).

Examples are derandomised (the same on every run, so CI is deterministic) and few per test:
the whole file runs in well under a minute on two cores.
"""

from __future__ import annotations

import itertools
import os
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats as sps
from sklearn.exceptions import ConvergenceWarning

from perturbnmf import SemiNMF
from perturbnmf.decomposition import consensus_sweep, holdout_error, refit_usage, relative_error
from perturbnmf.tl import (
    over_representation,
    program_labels,
    read_gmt,
    tidy_term,
    top_genes,
    top_terms,
)
from perturbnmf.evaluation import effect_recovery, implied_effects, match_programs, program_similarity
from perturbnmf.tl import normalize_factors
from perturbnmf.datasets import write_gmt
from perturbnmf.tl import (
    add_consistency,
    benjamini_hochberg,
    calibration_summary,
    control_null,
    guide_effects,
    program_anova,
    program_contrasts,
)


#: More examples for a local search: PERTURBNMF_PROPERTY_SCALE=20 (and PERTURBNMF_PROPERTY_SEARCH=1 for
#: fresh random examples instead of the derandomised ones CI runs).
SCALE = int(os.environ.get("PERTURBNMF_PROPERTY_SCALE", "1"))
SEARCH = os.environ.get("PERTURBNMF_PROPERTY_SEARCH") == "1"


def examples(n: int):
    """Settings: ``n`` derandomised examples, no deadline (the first call compiles numba kernels)."""
    return settings(
        max_examples=n * SCALE,
        deadline=None,
        derandomize=not SEARCH,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------
#: Values of a matrix entry: small integers (exact ties, rank deficiency) or any float in range.
ENTRY = st.one_of(
    st.sampled_from([0.0, 0.0, 1.0, -1.0, 2.0, 0.5]),
    # magnitudes below 1e-8 become exact zeros: squares near underflow are not what is tested here
    st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False).map(lambda v: v if abs(v) >= 1e-8 else 0.0),
)
FORMATS = ["dense64", "dense32", "fortran", "int64", "csr", "csc", "csr32"]


@st.composite
def matrices(draw, min_side=2, max_n=7, max_m=7, formats=FORMATS):
    """``(X, X_ref)``: X in a random format, X_ref the same values dense float64.

    Degenerate features: a sparsity mask, all-zero rows and columns, constant columns, a
    global scale from 1e-3 to 1e3.
    """
    n = draw(st.integers(min_side, max_n))
    m = draw(st.integers(min_side, max_m))
    X = draw(hnp.arrays(np.float64, (n, m), elements=ENTRY))
    density = draw(st.sampled_from([1.0, 0.5, 0.2]))
    if density < 1.0:
        keep = draw(hnp.arrays(np.bool_, (n, m), elements=st.booleans()))
        if density < 0.5:
            keep &= draw(hnp.arrays(np.bool_, (n, m), elements=st.booleans()))
        X = np.where(keep, X, 0.0)
    for i in draw(st.sets(st.integers(0, n - 1), max_size=n)):
        X[i] = 0.0
    for j in draw(st.sets(st.integers(0, m - 1), max_size=m)):
        X[:, j] = 0.0
    for j in draw(st.sets(st.integers(0, m - 1), max_size=2)):
        X[:, j] = draw(st.sampled_from([1.0, -2.0, 0.25]))
    X = X * draw(st.sampled_from([1.0, 1.0, 1e-3, 1e3]))
    fmt = draw(st.sampled_from(formats))
    if fmt.endswith("32"):
        X = X.astype(np.float32).astype(np.float64)  # the reference holds the float32 values
    if fmt == "int64":
        X = np.round(X)
    converted = {
        "dense64": lambda A: A.copy(),
        "dense32": lambda A: A.astype(np.float32),
        "fortran": lambda A: np.asfortranarray(A),
        "int64": lambda A: A.astype(np.int64),
        "csr": sp.csr_matrix,
        "csc": sp.csc_matrix,
        "csr32": lambda A: sp.csr_matrix(A.astype(np.float32)),
    }[fmt](X)
    return converted, X


def pick_k(data, n, m):
    """k = 1, k = min(n, m) - 1 or anything between."""
    limit = min(n, m) - 1
    return data.draw(st.one_of(st.just(1), st.just(limit), st.integers(1, limit)), label="k")


def _is_float32(X, solver="hals", dtype="auto"):
    """Whether SemiNMF reads X in float32 (objective and products accurate to ~1e-7 only)."""
    if dtype != "auto":
        return dtype == "float32"
    if sp.issparse(X):
        return solver == "hals" or X.dtype == np.float32
    if X.dtype.kind != "f":  # read in the solver's dtype
        return solver == "hals"
    return X.dtype == np.float32


def _quiet_fit(model, X, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="SemiNMF: component", category=RuntimeWarning)
        return model.fit_transform(X, **kwargs)


def assert_nnls_kkt(W, X_ref, H, rtol):
    """W solves min_{W >= 0} ||X - W H||: W >= 0, gradient >= 0, gradient = 0 where W > 0.

    Programs with zero loadings or loadings at rounding level (squared norm <= eps times the
    largest) get no usage (documented) and are left out of the conditions.
    """
    sq = np.sum(H**2, axis=1)
    negligible = sq <= sq.max(initial=0.0) * np.finfo(np.float64).eps
    assert np.all(W[:, negligible] == 0)
    W, H = W[:, ~negligible], H[~negligible]
    B = X_ref @ H.T
    Q = H @ H.T
    G = W @ Q - B
    scale = np.abs(B).max(initial=0.0) + np.abs(W).max(initial=0.0) * np.abs(Q).max(initial=0.0)
    tol = rtol * scale + 1e-300
    assert np.all(np.isfinite(W)) and np.all(W >= 0)
    assert np.all(G >= -tol), f"negative gradient {G.min()} (tol {tol})"
    assert np.all(np.abs(G[W > 0]) <= tol), f"non-zero gradient {np.abs(G[W > 0]).max()} on a free entry"


# --------------------------------------------------------------------------------------------
# SemiNMF
# --------------------------------------------------------------------------------------------
@examples(120)
@given(
    Xs=matrices(),
    solver=st.sampled_from(["hals", "mu"]),
    init=st.sampled_from(["random", "svd", "custom"]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_seminmf_fit_transform(Xs, solver, init, seed, data):
    X, X_ref = Xs
    n, m = X_ref.shape
    k = pick_k(data, n, m)
    W0 = None
    if init == "custom":  # any non-negative start, dead (all-zero) components included
        W0 = data.draw(hnp.arrays(np.float64, (n, k), elements=st.sampled_from([0.0, 0.0, 0.5, 1.0, 3.0])),
                       label="W0")
    model = SemiNMF(n_components=k, solver=solver, init=init, max_iter=25, tol=1e-6, random_state=seed)
    W = _quiet_fit(model, X, W=W0)
    H = model.components_
    # usage: the right shape, float64, finite, non-negative; loadings finite
    assert W.shape == (n, k) and W.dtype == np.float64
    assert np.all(np.isfinite(W)) and np.all(W >= 0)
    assert H.shape == (k, m) and np.all(np.isfinite(H))
    assert model.n_components_ == k and model.n_features_in_ == m
    assert model.n_iter_ == len(model.objective_) >= 1
    # the objective never increases and never exceeds the zero model's 0.5 ||X||^2, up to
    # rounding: with X read as float32, X H^T has float32 rounding, which large loadings of
    # nearly collinear programs amplify (the bound: eps32 sum W * (|X| |H|^T))
    half_norm = 0.5 * float(np.sum(X_ref**2))
    rtol = 1e-5 if _is_float32(X, solver) else 1e-9
    slack = rtol * half_norm + 1e-300
    if _is_float32(X, solver):
        slack += 2 * np.finfo(np.float32).eps * float(np.sum(W * (np.abs(X_ref) @ np.abs(H).T)))
    trace = np.r_[model.initial_objective_, model.objective_]
    assert np.all(np.isfinite(trace)) and np.all(trace >= 0)
    assert np.all(np.diff(trace) <= slack), np.diff(trace).max()
    assert trace[0] <= half_norm * (1 + rtol) + 1e-300
    # the reported objective and error are those of the returned factors
    residual = float(np.sum((X_ref - W @ H) ** 2))
    assert abs(model.objective_[-1] - 0.5 * residual) <= 10 * slack
    assert model.reconstruction_err_ == pytest.approx(np.sqrt(residual), rel=1e-4, abs=1e-6 * np.sqrt(half_norm))
    # same seed, same result
    again = _quiet_fit(SemiNMF(n_components=k, solver=solver, init=init, max_iter=25, tol=1e-6,
                               random_state=seed), X, W=W0)
    np.testing.assert_array_equal(W, again)


def _with_stored_zeros(X):
    """CSR holding every entry of X, its zeros included (explicit zeros)."""
    rows, cols = np.indices(X.shape)
    return sp.csr_matrix((X.ravel(), (rows.ravel(), cols.ravel())), shape=X.shape)


_SPARSE_WIDE = np.random.default_rng(0).normal(size=(30, 20)) * (np.random.default_rng(1).random((30, 20)) < 0.1)


@examples(60)
@given(Xs=matrices(max_n=10, max_m=12, formats=["dense64"]), solver=st.sampled_from(["hals", "mu"]), data=st.data())
def test_seminmf_dense_and_sparse_agree(Xs, solver, data):
    _, X = Xs
    n, m = X.shape
    _assert_dense_and_sparse_agree(X, pick_k(data, n, m), solver)


@pytest.mark.parametrize("k", [2, 5])
def test_seminmf_dense_and_sparse_agree_with_few_non_zeros_per_cell(k):
    # HALS repeats its W sweep by the non-zeros per cell: counted alike for dense and sparse X
    _assert_dense_and_sparse_agree(_SPARSE_WIDE, k, "hals", max_iter=30)


def _assert_dense_and_sparse_agree(X, k, solver, max_iter=8):
    kwargs = dict(n_components=k, solver=solver, max_iter=max_iter, tol=1e-12, dtype="float64", random_state=1)
    inputs = {"dense": X, "csr": sp.csr_matrix(X), "csc": sp.csc_matrix(X), "stored zeros": _with_stored_zeros(X)}
    models = {name: SemiNMF(**kwargs) for name in inputs}
    W = {name: _quiet_fit(models[name], Xin) for name, Xin in inputs.items()}
    # CSC is converted to CSR: identical numbers; stored zeros change nothing
    np.testing.assert_array_equal(W["csr"], W["csc"])
    np.testing.assert_allclose(W["stored zeros"], W["csr"], rtol=1e-9, atol=1e-12)
    scale = np.sqrt(np.sum(X**2)) + 1e-300
    np.testing.assert_allclose(W["csr"] @ models["csr"].components_, W["dense"] @ models["dense"].components_,
                               rtol=1e-6, atol=1e-7 * scale)
    sparse_trace, dense_trace = models["csr"].objective_, models["dense"].objective_
    n_common = min(len(sparse_trace), len(dense_trace))
    np.testing.assert_allclose(sparse_trace[:n_common], dense_trace[:n_common], rtol=1e-6, atol=1e-9 * scale**2)
    # a relative change at the stopping threshold (rounding apart) may end one fit an iteration later,
    # but only where the objective no longer moves
    longer = sparse_trace if len(sparse_trace) > len(dense_trace) else dense_trace
    assert abs(len(sparse_trace) - len(dense_trace)) <= 1
    np.testing.assert_allclose(longer[n_common - 1:], longer[n_common - 1], rtol=1e-9, atol=1e-12 * scale**2)


@pytest.mark.filterwarnings("error:SemiNMF.transform:sklearn.exceptions.ConvergenceWarning")
@examples(80)
@given(Xs=matrices(), Xs_new=matrices(max_n=5), data=st.data())
def test_seminmf_transform_is_nnls_optimal(Xs, Xs_new, data):
    X, X_ref = Xs
    n, m = X_ref.shape
    k = pick_k(data, n, m)
    model = SemiNMF(n_components=k, max_iter=10, random_state=0)
    W_fit = _quiet_fit(model, X)
    H = model.components_
    rtol = 1e-4 if _is_float32(X) else 1e-7
    # usage of the training cells: NNLS-optimal for the fitted programs
    assert_nnls_kkt(model.transform(X), X_ref, H, rtol)
    # cells that are exactly W H are reconstructed exactly (W itself has zero residual)
    X_exact = W_fit @ H
    W_exact = model.transform(X_exact)
    np.testing.assert_allclose(W_exact @ H, X_exact, rtol=1e-5, atol=1e-6 * (np.abs(X_exact).max() + 1e-300))
    # new cells with the same genes, any format
    X_new, X_new_ref = Xs_new
    if X_new_ref.shape[1] != m:
        with pytest.raises(ValueError, match="features"):
            model.transform(X_new)
        return
    W_new = model.transform(X_new)
    assert W_new.shape == (X_new_ref.shape[0], k)
    assert_nnls_kkt(W_new, X_new_ref, H, 1e-4 if _is_float32(X_new) else 1e-7)
    np.testing.assert_allclose(model.inverse_transform(W_new), W_new @ H)


@examples(25)
@given(
    shape=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    k=st.integers(1, 5),
    fmt=st.sampled_from(["dense", "csr"]),
)
def test_seminmf_refuses_impossible_shapes_with_a_value_error(shape, k, fmt):
    n, m = shape
    X = np.ones((n, m)) + np.arange(n * m).reshape(n, m)
    X = sp.csr_matrix(X) if fmt == "csr" else X
    model = SemiNMF(n_components=k, max_iter=5, random_state=0)
    if n >= 2 and m >= 2 and k < min(n, m):
        assert _quiet_fit(model, X).shape == (n, k)
    else:
        with pytest.raises(ValueError, match="n_components|empty|at least 2"):
            model.fit_transform(X)


@examples(80)
@given(Xs=matrices(), data=st.data())
def test_refit_usage_is_nnls_optimal(Xs, data):
    X, X_ref = Xs
    n, m = X_ref.shape
    k = data.draw(st.integers(1, 4), label="k")
    H = data.draw(hnp.arrays(np.float64, (k, m), elements=ENTRY), label="H")
    for row in data.draw(st.sets(st.integers(0, k - 1), max_size=k), label="zero rows"):
        H[row] = 0.0  # a dead program
    if k >= 2 and data.draw(st.booleans(), label="duplicate"):
        H[1] = H[0]  # a repeated program: the NNLS solution is not unique
    tiny = k >= 2 and H[1:].any() and data.draw(st.booleans(), label="tiny")
    if tiny:
        H[0] = 1e-20 * np.abs(H[1:]).max() * np.sign(H[0])  # a program at rounding level
    W = refit_usage(X, H)
    assert W.shape == (n, k) and W.dtype == np.float64
    if tiny:  # counted as zero: no usage (not noise divided by noise)
        assert np.all(W[:, 0] == 0)
    # programs over another number of genes: a clear error (the compiled kernels check no bounds)
    for bad in (H[:, :-1], np.hstack([H, H])):
        with pytest.raises(ValueError, match="H must have shape"):
            refit_usage(X, bad)
    with pytest.raises(ValueError, match="W must have shape"):
        relative_error(X, W[:, :0] if k > 1 else W.T, H)
    rtol = 1e-4 if X.dtype == np.float32 else 1e-7
    assert_nnls_kkt(W, X_ref, H, rtol)
    assert np.all(W[:, ~H.any(axis=1)] == 0)  # a zero program has no usage
    # never worse than no usage at all, or than a random non-negative usage
    err = np.sum((X_ref - W @ H) ** 2)
    assert err <= np.sum(X_ref**2) * (1 + rtol) + 1e-300
    other = np.random.default_rng(0).random((n, k))
    assert err <= np.sum((X_ref - other @ H) ** 2) * (1 + rtol) + 1e-300
    # relative_error is ||X - WH|| / ||X|| (NaN for an all-zero X)
    rel = relative_error(X, W, H)
    norm = np.sqrt(np.sum(X_ref**2))
    if norm == 0:
        assert np.isnan(rel)
    else:
        assert rel == pytest.approx(np.sqrt(err) / norm, rel=1e-3, abs=1e-3)


@examples(50)
@given(Xs=matrices(min_side=2), data=st.data())
def test_holdout_error_is_a_relative_error(Xs, data):
    X, X_ref = Xs
    X = X.tocsr() if sp.issparse(X) else X
    n, m = X_ref.shape
    k = data.draw(st.integers(1, 3), label="k")
    H = data.draw(hnp.arrays(np.float64, (k, m), elements=ENTRY), label="H")
    genes = np.asarray(data.draw(st.permutations(range(m)), label="genes"))
    cut = data.draw(st.integers(1, m - 1), label="cut")
    err = holdout_error(X, H, (genes[:cut], genes[cut:]))
    if np.sum(X_ref**2) == 0:
        assert np.isnan(err)
    else:
        assert np.isfinite(err) and err >= 0


@examples(8)
@given(
    Xs=matrices(min_side=5, max_n=9, max_m=7, formats=["dense64", "csr"]),
    holdout=st.sampled_from([0.0, 0.2]),
    data=st.data(),
)
def test_consensus_sweep_table_and_components(Xs, holdout, data):
    X, X_ref = Xs
    n, m = X_ref.shape
    n_train = n - int(round(holdout * n))
    limit = min(n_train, m) - 1
    k_values = data.draw(st.lists(st.integers(1, limit), min_size=1, max_size=2, unique=True), label="k_values")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="SemiNMF: component", category=RuntimeWarning)
        try:
            res = consensus_sweep(X, k_values, model="seminmf", n_restarts=2, max_iter=20, holdout_fraction=holdout,
                                  n_jobs=1, progress=False)
        except ValueError as exc:  # documented: nothing to factorise on the training cells
            assert "all zeros on the" in str(exc)
            assert np.count_nonzero(X_ref.any(axis=1)) <= n - n_train
            return
    table = res.table
    assert sorted(table["k"]) == sorted(k_values) and res.suggested_k in k_values
    assert len(res.holdout_cells) == n - n_train
    for k in k_values:
        H = res.components[k]
        assert H.shape == (k, m) and np.all(np.isfinite(H))
        norms = np.linalg.norm(H, axis=1)
        assert np.all((np.abs(norms - 1) < 1e-9) | (norms == 0))
    errors = table[["relative_error", "best_restart_relative_error"]].to_numpy()
    if np.sum(X_ref**2) > 0:
        assert np.all(np.isfinite(errors)) and np.all(errors >= 0)


# --------------------------------------------------------------------------------------------
# factorize.normalize_factors
# --------------------------------------------------------------------------------------------
@examples(60)
@given(data=st.data(), n=st.integers(1, 6), m=st.integers(1, 6), k=st.integers(1, 4))
def test_normalize_factors_keeps_the_product(data, n, m, k):
    W = data.draw(hnp.arrays(np.float64, (n, k), elements=st.floats(0, 5, allow_subnormal=False)), label="W")
    H = data.draw(hnp.arrays(np.float64, (k, m), elements=ENTRY), label="H")
    W2, H2, order = normalize_factors(W, H)
    np.testing.assert_allclose(W2 @ H2, W @ H, rtol=1e-12, atol=1e-12)
    assert sorted(order) == list(range(k)) and np.all(W2 >= 0)
    norms = np.linalg.norm(H2, axis=1)
    assert np.all((np.abs(norms - 1) < 1e-12) | (norms == 0))
    assert np.all(np.diff(W2.sum(axis=0)) <= 1e-12 * (1 + W2.sum()))  # ordered by total usage


# --------------------------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------------------------
PVALUE = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 0.05, 0.5, np.nan]))


def _bh_by_definition(p):
    """q_i = min over sorted p_(j) >= p_i of min(1, m p_(j) / j)."""
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    s = np.sort(p[ok])
    m = s.size
    for i in np.flatnonzero(ok):
        j = np.flatnonzero(s >= p[i])
        q[i] = min(1.0, np.min(s[j] / ((j + 1) / m)))
    return q


@examples(150)
@given(p=st.lists(PVALUE, max_size=30).map(lambda v: np.asarray(v, dtype=float)), seed=st.integers(0, 1000))
def test_benjamini_hochberg(p, seed):
    q = benjamini_hochberg(p)
    assert q.shape == p.shape and q.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(q), np.isnan(p))  # NaN kept, nothing else NaN
    ok = ~np.isnan(p)
    assert np.all(q[ok] >= p[ok]) and np.all(q[ok] <= 1)
    # monotone in p, equal p-values get equal q-values
    order = np.argsort(p[ok], kind="stable")
    assert np.all(np.diff(q[ok][order]) >= 0)
    np.testing.assert_allclose(q, _bh_by_definition(p), rtol=1e-12)
    # invariant to permutation; NaN entries do not count as tests
    perm = np.random.default_rng(seed).permutation(p.size)
    np.testing.assert_array_equal(benjamini_hochberg(p[perm]), q[perm])
    np.testing.assert_array_equal(benjamini_hochberg(p[ok]), q[ok])


@examples(20)
@given(bad=st.one_of(st.floats(allow_nan=False).filter(lambda v: not 0 <= v <= 1), st.just(np.inf)))
def test_benjamini_hochberg_refuses_out_of_range(bad):
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        benjamini_hochberg([0.5, bad])


USAGE_VALUE = {
    "ties": st.sampled_from([0.0, 0.0, 0.0, 0.5, 1.0, 2.0]),
    "continuous": st.floats(0, 10, allow_nan=False).map(lambda v: v if v >= 1e-8 else 0.0),
}


@st.composite
def screens(draw, max_cells=14, max_programs=3, n_groups=4, n_control=2):
    """(usage DataFrame, groups, batch, guides): ties, constant programs, single-cell groups.

    The first ``n_control`` cells are controls ("ctrl"); others draw one of A, B, C, ... (a group
    may get a single cell or none).
    """
    n = draw(st.integers(n_control + 1, max_cells))
    p = draw(st.integers(1, max_programs))
    Y = draw(hnp.arrays(np.float64, (n, p), elements=USAGE_VALUE[draw(st.sampled_from(sorted(USAGE_VALUE)))]))
    for j in draw(st.sets(st.integers(0, p - 1), max_size=p)):
        if draw(st.booleans()):
            Y[:, j] = draw(st.sampled_from([0.0, 1.5]))
    labels = ["ctrl"] * n_control + draw(
        st.lists(st.sampled_from("ABCDEFG"[: n_groups - 1]), min_size=n - n_control, max_size=n - n_control))
    batch = draw(st.lists(st.sampled_from(["b1", "b2", "b3"]), min_size=n, max_size=n))
    guides = draw(st.lists(st.sampled_from(["g1", "g2"]), min_size=n, max_size=n))
    usage = pd.DataFrame(Y, columns=[f"P{j + 1:02d}" for j in range(p)], index=[f"c{i}" for i in range(n)])
    return usage, np.asarray(labels, dtype=object), np.asarray(batch, dtype=object), np.asarray(guides, dtype=object)


def _assert_pvalues(p, q=None):
    p = np.asarray(p, dtype=float)
    finite = ~np.isnan(p)
    assert np.all((p[finite] >= 0) & (p[finite] <= 1))
    if q is not None:
        q = np.asarray(q, dtype=float)
        np.testing.assert_array_equal(np.isnan(q), np.isnan(p))
        assert np.all(q[finite] >= p[finite] - 1e-15) and np.all(q[finite] <= 1)


@examples(120)
@given(screen=screens(), with_batch=st.booleans(), seed=st.integers(0, 1000))
def test_program_anova(screen, with_batch, seed):
    usage, groups, batch, _ = screen
    batch = batch if with_batch else None
    res = program_anova(usage, groups, batch=batch)
    Y = usage.to_numpy()
    assert list(res["program"]) == list(usage.columns)
    _assert_pvalues(res["pvalue"], res["qvalue"])
    F, p, eta = (res[c].to_numpy() for c in ("F", "pvalue", "eta_squared"))
    assert np.all(F[~np.isnan(F)] >= 0)
    assert np.all((eta[~np.isnan(eta)] >= 0) & (eta[~np.isnan(eta)] <= 1 + 1e-12))
    constant = np.ptp(Y, axis=0) == 0
    assert np.all(np.isnan(p[constant])) and np.all(np.isnan(F[constant])) and np.all(np.isnan(eta[constant]))
    df_group, df_resid = int(res["df_group"].iloc[0]), int(res["df_resid"].iloc[0])
    n_groups = len(set(groups))
    if batch is None:
        assert (df_group, df_resid) == (n_groups - 1, len(Y) - n_groups)
    if df_group > 0 and df_resid > 0:
        # NaN only where documented: constant usage, or usage explained exactly by batch
        explained = constant.copy()
        if batch is not None:
            B = pd.get_dummies(pd.Series(batch)).to_numpy(dtype=float)
            resid = Y - B @ np.linalg.lstsq(B, Y, rcond=None)[0]
            explained |= np.sum(resid**2, axis=0) <= 1e-20 * np.sum((Y - Y.mean(axis=0)) ** 2, axis=0)
        np.testing.assert_array_equal(np.isnan(p), explained)
    # the same result for the cells in another order, and for renamed groups
    perm = np.random.default_rng(seed).permutation(len(Y))
    renamed = np.array([f"x_{g}" for g in groups], dtype=object)
    for u, g, b in ((usage.iloc[perm], groups[perm], None if batch is None else batch[perm]),
                    (usage, renamed, batch)):
        other = program_anova(u, g, batch=b)
        np.testing.assert_allclose(other["pvalue"], res["pvalue"], rtol=1e-6, atol=1e-12)
        assert other["df_group"].iloc[0] == df_group


@examples(10)
@given(screen=screens(n_groups=2))
def test_program_anova_needs_two_groups(screen):
    usage, groups, _, _ = screen
    with pytest.raises(ValueError, match="at least 2 distinct groups"):
        program_anova(usage, np.full(len(usage), "ctrl", dtype=object))


@examples(150)
@given(
    screen=screens(),
    method=st.sampled_from(["welch", "mannwhitney", "ols_batch"]),
    with_batch=st.booleans(),
    min_cells=st.integers(2, 3),
)
def test_program_contrasts(screen, method, with_batch, min_cells):
    usage, groups, batch, _ = screen
    batch = batch if (with_batch or method == "ols_batch") else None
    n_ctrl = int(np.sum(groups == "ctrl"))
    if n_ctrl < min_cells:
        with pytest.raises(ValueError, match="min_cells"):
            program_contrasts(usage, groups, "ctrl", batch=batch, min_cells=min_cells, method=method)
        return
    res = program_contrasts(usage, groups, "ctrl", batch=batch, min_cells=min_cells, method=method)
    Y = usage.to_numpy()
    counts = pd.Series(groups[groups != "ctrl"]).value_counts()
    tested = sorted(g for g, c in counts.items() if c >= min_cells)
    # small groups (a single cell included) are skipped and listed, not crashed on
    assert res.attrs["skipped_groups"] == sorted(g for g, c in counts.items() if c < min_cells)
    assert len(res) == len(tested) * Y.shape[1]
    assert list(pd.unique(res["perturbation"])) == tested
    _assert_pvalues(res["pvalue"], res["qvalue"])
    ctrl = Y[groups == "ctrl"]
    for (pert, program), row in res.set_index(["perturbation", "program"]).iterrows():
        a = Y[groups == pert, usage.columns.get_loc(program)]
        c = ctrl[:, usage.columns.get_loc(program)]
        assert row["n_cells"] == len(a) and row["n_control"] == len(c)
        assert row["mean_perturbed"] == pytest.approx(a.mean()) and row["mean_control"] == pytest.approx(c.mean())
        if method == "welch" or (method == "mannwhitney" and batch is None):
            assert row["effect"] == pytest.approx(a.mean() - c.mean(), abs=1e-12)
        if np.ptp(a) == 0 and np.ptp(c) == 0 and method != "mannwhitney":
            assert np.isnan(row["pvalue"]) and np.isnan(row["statistic"])  # documented NaN
        if batch is not None and method != "welch" and not set(batch[groups == pert]) & set(batch[groups == "ctrl"]):
            # no batch holds both kinds of cell: confounded with batch, nothing to test
            assert np.isnan(row["pvalue"]) and np.isnan(row["statistic"])
            if method == "ols_batch":
                assert np.isnan(row["effect"])
        if method == "welch" and not (np.ptp(a) == 0 and np.ptp(c) == 0):
            assert np.isfinite(row["pvalue"])
            with warnings.catch_warnings():  # scipy on nearly constant samples
                warnings.simplefilter("ignore", RuntimeWarning)
                expected = sps.ttest_ind(a, c, equal_var=False).pvalue
            assert row["pvalue"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
        if method == "mannwhitney" and batch is None:
            all_tied = np.ptp(np.r_[a, c]) == 0
            assert np.isnan(row["pvalue"]) == all_tied
            if not all_tied:
                expected = sps.mannwhitneyu(a, c, method="asymptotic").pvalue
                assert row["pvalue"] == pytest.approx(expected, rel=1e-6, abs=1e-12)


@examples(120)
@given(
    screen=screens(n_groups=3, n_control=0, max_cells=12),
    method=st.sampled_from(["welch", "mannwhitney", "ols_batch"]),
    with_batch=st.booleans(),
)
def test_program_contrasts_swapping_the_groups_negates_the_effect(screen, method, with_batch):
    usage, groups, batch, _ = screen
    # two groups A and B, each the other's control
    batch = batch if (with_batch or method == "ols_batch") else None
    counts = pd.Series(groups).value_counts()
    if counts.get("A", 0) < 2 or counts.get("B", 0) < 2:
        with pytest.raises(ValueError):
            program_contrasts(usage, groups, "A" if counts.get("A", 0) < 2 else "B", batch=batch, method=method)
        return
    ab = program_contrasts(usage, groups, "A", batch=batch, method=method)
    ba = program_contrasts(usage, groups, "B", batch=batch, method=method)
    # the batch-adjusted effect of the rank test weights batches by the perturbed group's cells
    # (documented), so it is not antisymmetric; the statistic and p-value are
    weighted = method == "mannwhitney" and batch is not None
    for col in ("statistic",) if weighted else ("effect", "effect_std", "statistic"):
        np.testing.assert_allclose(ab[col], -ba[col], rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(ab["pvalue"], ba["pvalue"], rtol=1e-7, atol=1e-12)


@examples(80)
@given(screen=screens(), method=st.sampled_from(["welch", "mannwhitney", "ols_batch"]), with_batch=st.booleans())
def test_guide_effects_and_consistency(screen, method, with_batch):
    usage, groups, batch, guides = screen
    batch = batch if (with_batch or method == "ols_batch") else None
    res = guide_effects(usage, groups, guides, "ctrl", batch=batch, method=method)
    _assert_pvalues(res["pvalue"], res["qvalue"])
    pairs = pd.Series(list(zip(groups, guides)))[groups != "ctrl"].value_counts()
    assert res.attrs["skipped_guides"] == sorted((t, g) for (t, g), c in pairs.items() if c < 2)
    assert len(res) == int(np.sum(pairs >= 2)) * usage.shape[1]
    contrasts = program_contrasts(usage, groups, "ctrl", batch=batch, method=method)
    out = add_consistency(contrasts, usage, groups, guides=guides, batch=batch)
    assert len(out) == len(contrasts)
    assert np.all(out["n_guides_same_sign"] <= out["n_guides"])
    assert np.all(out["n_batches_same_sign"] <= out["n_batches"])
    both = out[["guide_effect_min", "guide_effect_max"]].dropna()
    assert np.all(both["guide_effect_min"] <= both["guide_effect_max"])
    _assert_pvalues(out["guide_heterogeneity_pvalue"])


@examples(80)
@given(
    screen=screens(n_control=4, max_cells=14),
    with_guides=st.booleans(),
    method=st.sampled_from(["welch", "mannwhitney"]),
    n_control=st.integers(0, 4),
)
@example(  # control guides 3 + 1: the 3-cell guide leaves a single control cell
    screen=(pd.DataFrame({"P01": [0.0, 1.0, 2.0, 0.5, 0.0]}), np.array(["ctrl"] * 4 + ["A"], dtype=object),
            np.array(["b1"] * 5, dtype=object), np.array(["g1", "g1", "g1", "g2", "g1"], dtype=object)),
    with_guides=True, method="welch", n_control=4,
)
def test_control_null(screen, with_guides, method, n_control):
    usage, groups, batch, guides = screen
    groups = groups.copy()
    groups[n_control:4] = "A"  # 0 to 4 control cells
    if n_control < 4:
        with pytest.raises(ValueError, match="control cells"):
            control_null(usage, groups, "ctrl", guides=guides if with_guides else None, method=method, n_pseudo=3)
        return
    table = control_null(usage, groups, "ctrl", guides=guides if with_guides else None, method=method, n_pseudo=3)
    _assert_pvalues(table["pvalue"], table["qvalue"])
    assert len(table) > 0 and set(table["null_split"]) <= {"control guide", "random"}
    if table["null_split"].iloc[0] == "control guide":  # only testable guide splits
        control_guides = pd.Series(guides[:4]).value_counts()
        testable = [g for g, c in control_guides.items() if 2 <= c <= 4 - 2]
        assert sorted(pd.unique(table["perturbation"])) == sorted(f"null:{g}" for g in testable)
    summary = calibration_summary(table["pvalue"])
    assert summary["n_tests"] == int(table["pvalue"].notna().sum())


@examples(60)
@given(p=st.lists(PVALUE, max_size=30))
def test_calibration_summary(p):
    s = calibration_summary(p)
    finite = np.asarray(p, dtype=float)
    finite = finite[np.isfinite(finite)]
    assert s["n_tests"] == finite.size
    if finite.size:
        assert 0 <= s["share_below_0_05"] <= 1 and 0 <= s["ks_pvalue"] <= 1 and s["inflation"] >= 0
        assert 0 <= s["n_null_hits"] <= finite.size


# --------------------------------------------------------------------------------------------
# enrichment
# --------------------------------------------------------------------------------------------
NAME = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="\t\r\n\x0b\x0c"),
    min_size=1, max_size=8,
)


@examples(80)
@given(sets=st.dictionaries(NAME, st.lists(NAME, min_size=1, max_size=6), min_size=1, max_size=5))
def test_read_gmt_round_trips_write_gmt(tmp_path_factory, sets):
    # read_gmt strips fields and drops empty genes and repeats (documented); the model:
    expected = {}
    for name, genes in sets.items():
        kept = list(dict.fromkeys(g.strip() for g in genes if g.strip()))
        expected[name.strip()] = kept
    path = tmp_path_factory.mktemp("gmt") / "sets.gmt"
    write_gmt(path, sets)
    names = [name.strip() for name in sets]
    if any(not name for name in names) or len(set(names)) != len(names) or any(not v for v in expected.values()):
        with pytest.raises(ValueError, match="line"):
            read_gmt(path)
        return
    assert read_gmt(path) == expected


GENES = [f"G{i}" for i in range(12)]


@st.composite
def enrichment_inputs(draw):
    N = draw(st.integers(1, 12))
    background = GENES[:N]
    gene = st.sampled_from(GENES + ["OUT1", "OUT2"])
    terms = draw(st.dictionaries(st.sampled_from([f"T{i}" for i in range(6)]), st.lists(gene, min_size=1, max_size=12),
                                 min_size=1, max_size=5))
    lists = draw(st.dictionaries(st.tuples(st.sampled_from(["P1", "P2"]), st.sampled_from(["positive", "negative"])),
                                 st.lists(gene, max_size=12), max_size=3))
    return lists, {"lib": terms}, background


@examples(120)
@given(inputs=enrichment_inputs(), min_set_size=st.integers(1, 3), min_overlap=st.integers(0, 2))
def test_over_representation(inputs, min_set_size, min_overlap):
    lists, gene_sets, background = inputs
    bg = set(background)
    if not any(g in bg for genes in gene_sets["lib"].values() for g in genes):
        with pytest.raises(ValueError, match="none of its"):
            over_representation(lists, gene_sets, background)
        return
    res = over_representation(lists, gene_sets, background, min_set_size=min_set_size, min_overlap=min_overlap)
    _assert_pvalues(res["pvalue"], res["qvalue"])
    assert np.all(res["odds_ratio"] >= 0) and np.all(np.isfinite(res["combined_score"]))
    assert np.all(res["combined_score"] >= 0)
    N = len(bg)
    for _, row in res.iterrows():
        query = set(lists[(row["program"], row["side"])]) & bg
        term = set(gene_sets["lib"][row["term"]]) & bg
        overlap = sorted(query & term)
        assert row["overlap"] == len(overlap) >= min_overlap
        assert row["overlap_genes"] == ";".join(overlap)
        assert (row["query_size"], row["term_size"], row["background_size"]) == (len(query), len(term), N)
        assert len(term) >= min_set_size
        expected = sps.hypergeom.sf(len(overlap) - 1, N, len(term), len(query)) if overlap else 1.0
        assert row["pvalue"] == pytest.approx(min(1.0, expected), rel=1e-9, abs=1e-15)
    assert res.attrs["terms_tested"]["lib"] == sum(
        min_set_size <= len(set(g) & bg) <= 2000 for g in gene_sets["lib"].values())
    picked = top_terms(res, n=2, fdr=1.0)
    assert np.all(picked.groupby(["program", "side"]).size() <= 2)
    assert np.all(picked["qvalue"] < 1.0)
    programs = ["P1", "P2", "P3"]
    labels = program_labels(res, programs=programs, fdr=1.0)
    assert list(labels["program"]) == programs and labels["label"].is_unique
    termed = labels[labels["source"] == "term"]
    assert set(termed["program"]) == set(res.loc[res["qvalue"] < 1.0, "program"])


@examples(80)
@given(data=st.data(), n_genes=st.integers(1, 8), k=st.integers(1, 3), n_top=st.integers(1, 4))
def test_top_genes_and_program_labels(data, n_genes, k, n_top):
    values = data.draw(hnp.arrays(np.float64, (n_genes, k), elements=st.one_of(ENTRY, st.just(np.nan))), label="L")
    loadings = pd.DataFrame(values, index=GENES[:n_genes], columns=[f"P{j}" for j in range(k)])
    tg = top_genes(loadings, n_top=n_top)
    for (program, side), part in tg.groupby(["program", "side"]):
        assert len(part) <= n_top and list(part["rank"]) == list(range(1, len(part) + 1))
        v = part["loading"].to_numpy()
        assert np.all(v > 0) and np.all(np.diff(v) <= 0) if side == "positive" else np.all(v < 0) and np.all(
            np.diff(v) >= 0)
        col = loadings[program]
        wanted = col[col > 0] if side == "positive" else col[col < 0]
        assert len(part) == min(n_top, len(wanted))
    labels = program_labels(pd.DataFrame(columns=["program", "side", "term", "qvalue"]), loadings)
    assert list(labels["program"]) == list(loadings.columns) and labels["label"].is_unique


@examples(100)
@given(term=st.text(max_size=60), max_chars=st.integers(2, 50))
def test_tidy_term_fits(term, max_chars):
    out = tidy_term(term, max_chars)
    assert isinstance(out, str) and len(out) <= max_chars
    assert isinstance(tidy_term(term, None), str)


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
@examples(80)
@given(data=st.data(), n_genes=st.integers(1, 6), n_true=st.integers(1, 4), k=st.integers(1, 4))
def test_program_similarity_and_matching(data, n_genes, n_true, k):
    truth = data.draw(hnp.arrays(np.float64, (n_genes, n_true), elements=ENTRY), label="truth")
    load = data.draw(hnp.arrays(np.float64, (n_genes, k), elements=ENTRY), label="loadings")
    sim = program_similarity(truth, load).to_numpy()
    assert sim.shape == (n_true, k) and np.all(np.abs(sim) <= 1)
    assert np.all(sim[:, ~load.any(axis=0)] == 0) and np.all(sim[~truth.any(axis=0)] == 0)
    # scale does not matter, the sign does
    np.testing.assert_allclose(program_similarity(truth, 3.0 * load).to_numpy(), sim, atol=1e-12)
    np.testing.assert_allclose(program_similarity(truth, -load).to_numpy(), -sim, atol=1e-12)
    match = match_programs(truth, load)
    matched = match["program"].dropna()
    assert matched.is_unique and len(matched) == min(n_true, k)
    assert np.all(match["best_cosine_any"] >= match["cosine"].fillna(-np.inf) - 1e-12)
    # the matching maximises the total cosine (brute force)
    if k <= n_true:
        best = max(sim[list(rows), range(k)].sum() for rows in itertools.permutations(range(n_true), k))
    else:
        best = max(sim[range(n_true), list(cols)].sum() for cols in itertools.permutations(range(k), n_true))
    assert match["cosine"].sum() == pytest.approx(best, abs=1e-9)


@examples(80)
@given(screen=screens(), n_true=st.integers(1, 3), data=st.data())
def test_implied_effects_and_effect_recovery(screen, n_true, data):
    usage, groups, _, _ = screen
    U = data.draw(hnp.arrays(np.float64, (len(usage), n_true), elements=USAGE_VALUE["ties"]), label="U")
    implied = implied_effects(U, usage, groups, "ctrl")
    targets = sorted(set(groups) - {"ctrl"})
    assert len(implied) == len(targets) * usage.shape[1]
    single = [t for t in targets if np.sum(groups == t) == 1]
    assert implied.loc[implied["perturbation"].isin(single), "implied_effect_std"].isna().all()
    assert np.all(np.isfinite(implied["implied_effect"]))
    r2 = implied["r_squared"].dropna()
    assert np.all((r2 >= -1e-9) & (r2 <= 1 + 1e-9))
    contrasts = program_contrasts(usage, groups, "ctrl")
    names = [f"T{i}" for i in range(n_true)]
    match = pd.DataFrame({"planted_program": names, "program": list(usage.columns[:n_true]) +
                          [None] * max(0, n_true - usage.shape[1])})
    effects = pd.DataFrame({"perturbation": targets[:1] * n_true, "program": names, "direction": "up"})
    scores = effect_recovery(contrasts, effects, match, fdr=0.5, implied=implied)
    assert scores["n_true_discoveries"] + scores["n_false_discoveries"] == scores["n_discoveries"]
    assert scores["n_null_target_discoveries"] + scores["n_spillover_discoveries"] == scores["n_false_discoveries"]
    if scores["n_planted"]:
        assert 0 <= scores["sensitivity"] <= 1
    assert 0 <= scores["false_discovery_proportion"] <= 1
