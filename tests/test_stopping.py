"""When a fit stops, and where the default fit of a large matrix starts (issue 11).

HALS stops as soon as an iteration lowers the objective by less than ``tol`` (relative); the
multiplicative rule keeps its 10-iteration window. From ``SUBSAMPLE_START_MIN_CELLS`` cells the
default start fits the programs on a tenth of the cells first.
"""

import warnings

import numpy as np
import pytest

from perturbnmf import NMF, SemiNMF
from perturbnmf.decomposition import _seminmf
from perturbnmf.decomposition._seminmf import _stopping_rule
from test_seminmf_hals import log_normalised_like, planted


def _one_step_decreases(model):
    f = np.concatenate([[model.initial_objective_], model.objective_])
    return (f[:-1] - f[1:]) / f[:-1]


@pytest.mark.parametrize("cls", [SemiNMF, NMF])
def test_hals_stops_at_the_first_iteration_that_no_longer_pays(cls):
    X = log_normalised_like(0, n=2000, m=150)
    model = cls(6, random_state=0, tol=1e-4).fit(X)
    decreases = _one_step_decreases(model)
    assert model.converged_ and model.n_iter_ >= _seminmf._MIN_ITER
    assert decreases[-1] < 1e-4
    assert np.all(decreases[_seminmf._MIN_ITER - 1:-1] >= 1e-4)  # it did not go on past the first such step


def test_mu_is_still_judged_over_ten_iterations():
    X, _, _ = planted(1)
    model = SemiNMF(5, solver="mu", init="random", random_state=0, tol=1e-4, max_iter=2000).fit(X)
    f = model.objective_
    assert model.n_iter_ >= 10
    assert (f[-11] - f[-1]) / f[-11] < 1e-4
    assert all((f[t - 10] - f[t]) / f[t - 10] >= 1e-4 for t in range(10, len(f) - 1))


def test_stopping_rule_waits_for_the_minimum_iterations():
    assert _stopping_rule([10.0], 10.0, 1e-4) == (0.0, False)  # no decrease, but only one iteration
    assert _stopping_rule([10.0, 10.0, 10.0], 10.0, 1e-4)[1]
    assert not _stopping_rule([9.0, 8.0, 7.0], 10.0, 1e-4)[1]


@pytest.fixture
def small_threshold(monkeypatch):
    """The subsample start from 3,000 cells on (10,000 rows at least are fitted first: set that lower too)."""
    monkeypatch.setattr(_seminmf, "SUBSAMPLE_START_MIN_CELLS", 3000)
    monkeypatch.setattr(_seminmf, "_SUBSAMPLE_START_MIN_ROWS", 400)


@pytest.mark.parametrize("cls", [SemiNMF, NMF])
def test_the_default_start_of_a_large_matrix_fits_a_subsample_first(cls, small_threshold):
    X = log_normalised_like(3, n=6000, m=120)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = cls(8, random_state=0).fit(X)
        random = cls(8, init="random", random_state=0).fit(X)
        again = cls(8, init="subsample", random_state=0).fit(X)
    np.testing.assert_array_equal(auto.components_, again.components_)  # auto = subsample here, reproducibly
    assert auto.n_iter_ < random.n_iter_  # fewer passes over all cells
    assert auto.objective_[-1] <= random.objective_[-1] * 1.005  # and as good a fit
    assert np.isclose(auto.initial_objective_, random.objective_[-1], rtol=0.05)  # it starts near the end


def test_below_the_threshold_auto_is_the_random_start():
    X = log_normalised_like(3, n=1000, m=80)
    a = SemiNMF(5, random_state=4).fit(X)
    b = SemiNMF(5, init="random", random_state=4).fit(X)
    np.testing.assert_array_equal(a.components_, b.components_)


def test_subsample_start_keeps_the_covariates_out_of_the_programs(small_threshold):
    X = log_normalised_like(5, n=5000, m=100).toarray()
    batch = np.repeat([0, 1], 2500)
    X[batch == 1] += 0.5  # a batch shift the baseline covariates must take
    Z = np.eye(2)[batch]
    model = NMF(6, random_state=0).fit(X, covariates=Z)
    reference = NMF(6, init="random", random_state=0).fit(X, covariates=Z)
    assert model.objective_[-1] <= reference.objective_[-1] * 1.005
