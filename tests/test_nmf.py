"""The NMF estimator (H >= 0) and the usage penalty: the same driver as SemiNMF, other constraints."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import InvalidParameterError

from perturbnmf import NMF, SemiNMF


def nonnegative_data(seed=0, n=400, m=60, k=4):
    rng = np.random.default_rng(seed)
    W = rng.gamma(1.0, 1.0, (n, k)) * (rng.random((n, k)) < 0.5)
    H = rng.gamma(1.0, 1.0, (k, m)) * (rng.random((k, m)) < 0.4)
    return W @ H + 0.05 * rng.random((n, m))


def test_factors_are_nonnegative_and_the_objective_never_increases():
    X = nonnegative_data()
    model = NMF(4, random_state=0, max_iter=200).fit(X)
    assert np.all(model.components_ >= 0) and np.all(model.transform(X) >= 0)
    assert np.all(np.diff(model.objective_) <= 1e-9 * model.objective_[:-1])
    assert model.reconstruction_err_ / np.linalg.norm(X) < 0.05


def test_dense_and_sparse_input_give_the_same_fit():
    X = nonnegative_data(seed=1)
    X[X < 0.3] = 0.0
    dense = NMF(3, random_state=2, max_iter=50, dtype="float64").fit(X)
    sparse = NMF(3, random_state=2, max_iter=50, dtype="float64").fit(sp.csr_matrix(X))
    np.testing.assert_allclose(dense.components_, sparse.components_, rtol=1e-7, atol=1e-10)


def test_negative_data_and_the_multiplicative_solver_are_refused():
    X = nonnegative_data()
    with pytest.raises(ValueError, match="NMF needs a non-negative X"):
        NMF(3).fit(X - 1.0)
    with pytest.raises(InvalidParameterError, match="solver"):
        NMF(3, solver="mu").fit(X)


def test_covariates_are_checked():
    X = nonnegative_data()
    with pytest.raises(ValueError, match="covariates must have shape"):
        NMF(3).fit(X, covariates=np.ones((10, 1)))
    with pytest.raises(ValueError, match="non-negative"):
        NMF(3).fit(X, covariates=-np.ones((len(X), 1)))
    with pytest.raises(ValueError, match="covariates need solver='hals'"):
        SemiNMF(3, solver="mu").fit(X, covariates=np.ones((len(X), 1)))


def test_l1_penalty_on_usage_makes_it_sparser_and_keeps_programs_unit_norm():
    X = nonnegative_data(seed=3) - 0.3  # any sign: SemiNMF
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        plain = SemiNMF(4, random_state=0, max_iter=30).fit(X)
        sparse = SemiNMF(4, random_state=0, max_iter=30, alpha_W=0.02, l1_ratio=1.0).fit(X)
    zeros = lambda model: np.mean(model.transform(X) == 0)  # noqa: E731
    assert zeros(sparse) > zeros(plain)
    np.testing.assert_allclose(np.linalg.norm(sparse.components_, axis=1), 1.0)
    assert SemiNMF(4).alpha_W == 0.0  # off by default
