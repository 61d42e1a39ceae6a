"""The factorization on a cell-chunked Dask array (issue 11): ``fit_chunked`` follows the in-memory
HALS fit (NMF and semi-NMF, covariates, stopping rule), its random start is reproducible per
chunking, it gives the same numbers on a ``dask.distributed`` cluster with W left on the workers,
and bad input is refused by name."""

import logging
import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.exceptions import ConvergenceWarning

from perturbnmf import NMF, SemiNMF
from perturbnmf.decomposition import (cross_products, fit_chunked, polish_chunked, refit_usage, relative_error,
                                      relative_error_chunked, transform_chunked)
from perturbnmf.errors import InputError, ParameterError

N_CELLS, N_GENES, K = 3000, 200, 5
ROWS = 500  # six chunks


def planted(seed=0, n=N_CELLS, m=N_GENES, k=K):
    """Sparse non-negative X = W H + noise with sparse gamma factors (about 30 % non-zero), float64 CSR."""
    rng = np.random.default_rng(seed)
    W = rng.gamma(1.0, 1.0, (n, k)) * (rng.random((n, k)) < 0.5)
    H = rng.gamma(1.0, 1.0, (k, m)) * (rng.random((k, m)) < 0.3)
    X = W @ H + 0.1 * rng.random((n, m))
    X[X < 0.5] = 0.0
    return sp.csr_matrix(X)


def chunked(X, rows=ROWS):
    """X as a Dask array in row chunks (CSR chunks for a sparse X)."""
    return da.from_array(X, chunks=(rows, -1), asarray=False)


@pytest.fixture(scope="module")
def X():
    return planted()


@pytest.fixture(scope="module")
def W0():
    return np.random.default_rng(1).random((N_CELLS, K)) + 0.1


@pytest.fixture(scope="module")
def batches():
    Z = np.zeros((N_CELLS, 2))
    Z[: N_CELLS // 2, 0] = 1.0
    Z[N_CELLS // 2 :, 1] = 1.0
    return Z


def objective_error(X, objective):
    return np.sqrt(2.0 * objective / sp.linalg.norm(X) ** 2)


# --------------------------------------------------------------------------
# 1. The same fit as in memory, from the same start
# --------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_nmf_follows_the_in_memory_fit_from_the_same_start(X, W0, scheduler):
    model = NMF(K, init="custom", max_iter=200)
    W_mem = model.fit_transform(X, W=W0)  # sparse X: read as float32, products in float64
    with dask.config.set(scheduler=scheduler):
        fit = fit_chunked(chunked(X), K, W=W0, max_iter=200)
        W = fit.W.compute()
    assert model.converged_ and fit.converged and fit.n_iter == model.n_iter_  # the same stopping rule
    assert fit.n_iter > 10  # a real run, not a stop at the window
    assert_allclose(fit.initial_objective, model.initial_objective_, rtol=1e-9)
    assert_allclose(fit.objective, model.objective_, rtol=1e-7)  # only the order of float sums differs
    assert_allclose(fit.H, model.components_, rtol=1e-6, atol=1e-9 * model.components_.max())
    assert_allclose(W, W_mem, rtol=1e-6, atol=1e-9 * W_mem.max())
    assert fit.W.chunks == ((ROWS,) * (N_CELLS // ROWS), (K,)) and fit.n_reseeded == 0


def test_nmf_with_covariates_follows_the_in_memory_fit(X, W0, batches):
    model = NMF(K, init="custom", max_iter=200)
    W_mem = model.fit_transform(X, W=W0, covariates=batches)
    with dask.config.set(scheduler="synchronous"):
        fit = fit_chunked(chunked(X), K, W=W0, covariates=batches, max_iter=200)
        W = fit.W.compute()
    assert fit.n_iter == model.n_iter_
    assert_allclose(fit.objective, model.objective_, rtol=1e-7)
    assert_allclose(fit.covariate_components, model.covariate_components_, rtol=1e-6, atol=1e-9)
    assert_allclose(W, W_mem, rtol=1e-6, atol=1e-9 * W_mem.max())
    assert fit.W.shape == (N_CELLS, K)  # the covariates' columns are not usage


def test_seminmf_follows_the_in_memory_fit_on_dense_signed_data(W0):
    X = planted(seed=2).toarray()
    X -= X.mean(axis=0)  # any sign: semi-NMF; dense float64 chunks
    model = SemiNMF(K, init="custom", max_iter=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 30 iterations are enough to compare traces
        W_mem = model.fit_transform(X, W=W0)
        with dask.config.set(scheduler="synchronous"):
            fit = fit_chunked(da.from_array(X, chunks=(1000, -1)), K, nonnegative_h=False, W=W0, max_iter=30)
    assert fit.n_iter == model.n_iter_ == 30
    assert_allclose(fit.objective, model.objective_, rtol=1e-7)
    assert np.any(fit.H < 0)  # signed loadings
    assert_allclose(fit.H, model.components_, rtol=1e-6, atol=1e-9 * np.abs(model.components_).max())
    assert_allclose(fit.W.compute(), W_mem, rtol=1e-6, atol=1e-9 * W_mem.max())


def test_exact_residual_pass_gives_the_same_objective(X, W0, monkeypatch):
    """Where the Gram form could round too much, the objective comes from an exact pass over the chunks."""
    from perturbnmf.decomposition import _chunked

    monkeypatch.setattr(_chunked, "_gram_objective", lambda *args: None)  # always "too much rounding"
    model = NMF(K, init="custom", max_iter=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, W=W0)
        with dask.config.set(scheduler="synchronous"):
            fit = fit_chunked(chunked(X), K, W=W0, max_iter=5)
    assert_allclose(fit.initial_objective, model.initial_objective_, rtol=1e-9)
    assert_allclose(fit.objective, model.objective_, rtol=1e-9)


def test_transform_chunked_equals_the_in_memory_usage(X, batches):
    model = NMF(K, random_state=0, max_iter=50).fit(X, covariates=batches)
    with dask.config.set(scheduler="synchronous"):
        U = transform_chunked(chunked(X), model.components_, batches, model.covariate_components_)
        assert U.chunks == ((ROWS,) * (N_CELLS // ROWS), (K,))
        assert_allclose(U.compute(), model.transform(X, covariates=batches), rtol=1e-10, atol=1e-12)
        plain = transform_chunked(X, model.components_, chunk_rows=700).compute()  # an in-memory X is wrapped
    # a sparse X is read as float32, as the estimators read it
    assert_allclose(plain, refit_usage(X.astype(np.float32), model.components_), rtol=1e-10, atol=1e-12)


def test_cross_products_are_one_pass_of_the_exact_products(X, batches):
    A = np.hstack([np.random.default_rng(1).random((N_CELLS, 3)), batches])
    X32 = X.astype(np.float32).astype(np.float64)  # a sparse chunk is read as float32
    AtX, norm_sq = cross_products(chunked(X), A)
    assert_allclose(AtX, A.T @ X32.toarray(), rtol=1e-10)
    assert norm_sq == pytest.approx(float(X32.multiply(X32).sum()), rel=1e-12)


def test_relative_error_chunked_is_the_in_memory_error(X):
    W = np.random.default_rng(4).random((N_CELLS, K))
    H = np.random.default_rng(5).random((K, N_GENES))
    X32 = X.astype(np.float32)
    assert relative_error_chunked(chunked(X), W, H) == pytest.approx(relative_error(X32, W, H), rel=1e-9)
    exact = W @ H  # an exact fit: zero up to the Gram terms' rounding (~sqrt(eps)), as in memory
    assert relative_error_chunked(chunked(exact), W, H) < 1e-7 and relative_error(exact, W, H) < 1e-7
    assert np.isnan(relative_error_chunked(chunked(sp.csr_matrix((N_CELLS, N_GENES))), W, H))


def test_polish_chunked_is_the_in_memory_consensus_fit(X, batches):
    """From consensus programs (here a short fit's, perturbed): the fitted optimum nearby, as in memory."""
    from perturbnmf.decomposition._consensus import _polish

    model = NMF(K, random_state=0, max_iter=20).fit(X, covariates=batches)
    start = model.components_ * np.random.default_rng(2).uniform(0.8, 1.2, model.components_.shape)
    _, H_memory, H_cov_memory = _polish(X, start, model.covariate_components_, batches, "nmf", "hals", 300, 1e-6,
                                        random_state=0)
    H, H_cov = polish_chunked(chunked(X), start, batches, model.covariate_components_, max_iter=300, tol=1e-6,
                              random_state=0)
    assert_allclose(np.linalg.norm(H, axis=1), 1.0)
    assert np.sum(H * H_memory, axis=1).min() > 0.999
    assert_allclose(H_cov, H_cov_memory, rtol=0.02, atol=1e-3 * np.abs(H_cov_memory).max())


# --------------------------------------------------------------------------
# 2. Random starts
# --------------------------------------------------------------------------
def test_random_start_reaches_the_in_memory_error_and_is_reproducible_per_chunking(X):
    memory = NMF(K, random_state=0).fit(X)
    with dask.config.set(scheduler="synchronous"):
        fit = fit_chunked(chunked(X), K, random_state=0)
        again = fit_chunked(chunked(X), K, random_state=0)
        other_chunks = fit_chunked(chunked(X, rows=750), K, random_state=0)
        with pytest.warns(ConvergenceWarning, match="max_iter=1"):
            other_seed = fit_chunked(chunked(X), K, random_state=1, max_iter=1)
        W = fit.W.compute()
    error = objective_error(X, memory.objective_[-1])
    assert error < 0.2  # the planted rank-5 structure is found
    for result in (fit, other_chunks):
        assert result.converged
        assert abs(objective_error(X, result.objective[-1]) - error) <= 0.01 * error
    assert_array_equal(again.objective, fit.objective)  # same seed and chunking: the same numbers
    assert_array_equal(again.W.compute(), W)
    assert other_seed.initial_objective != fit.initial_objective
    assert other_chunks.initial_objective != fit.initial_objective  # the start is drawn per chunk
    assert np.all(W >= 0) and np.all(fit.H >= 0)


def test_dead_component_is_reseeded_per_chunk_and_never_raises_the_objective(X, W0):
    start = W0.copy()
    start[:, 2] = 0.0  # dead from the start: only re-seeding revives it
    with dask.config.set(scheduler="synchronous"), pytest.warns(RuntimeWarning, match="component 2 is dead"):
        fit = fit_chunked(chunked(X), K, W=start, random_state=0, max_iter=200)
    assert fit.n_reseeded >= 1
    assert np.all(fit.W[:, 2].compute().reshape(-1, ROWS).max(axis=1) > 0)  # every chunk drew usage
    trace = np.concatenate([[fit.initial_objective], fit.objective])
    assert np.all(np.diff(trace) <= 1e-10 * trace[:-1])


def test_each_chunk_is_read_once_per_pass(X, W0, monkeypatch):
    """A pass runs one task per chunk that returns both the chunk's new W and its partial sums: they
    must come from one run of it, not one for the persisted W and another for the sums."""
    from perturbnmf.decomposition import _chunked

    runs = []
    step = _chunked._chunk_iteration

    def counted(x, *args):
        runs.append(x.shape[0])
        return step(x, *args)

    monkeypatch.setattr(_chunked, "_chunk_iteration", counted)
    with dask.config.set(scheduler="synchronous"), pytest.warns(ConvergenceWarning, match="max_iter=4"):
        fit_chunked(chunked(X), K, W=W0, max_iter=4)
    assert len(runs) == 4 * (N_CELLS // ROWS)  # 4 updating passes (the 5th only evaluates the objective)


def test_progress_and_verbose_report_every_iteration(X, W0, capsys):
    seen = []
    with dask.config.set(scheduler="synchronous"), pytest.warns(ConvergenceWarning, match="max_iter=10"):
        fit = fit_chunked(chunked(X), K, W=W0, max_iter=10, verbose=1,
                          progress=lambda it, f, s: seen.append((it, f, s)))
    assert [it for it, _, _ in seen] == list(range(1, 11))
    assert_array_equal([f for _, f, _ in seen], fit.objective)
    assert [s for _, _, s in seen] == sorted(s for _, _, s in seen)
    out = capsys.readouterr().out
    assert "iteration     1" in out and "iteration    10" in out and "stopped at max_iter" in out


# --------------------------------------------------------------------------
# 3. A dask.distributed cluster
# --------------------------------------------------------------------------
@pytest.fixture
def client():
    """Two worker processes of one thread; closed after the test (function scope: no other test runs on it).

    distributed logs its start and shutdown at INFO (including a benign CommClosedError traceback when
    the client disconnects): only its warnings and errors are kept, on the console and in pytest's log."""
    distributed = pytest.importorskip("distributed")
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                      silence_logs=logging.WARNING) as cluster, distributed.Client(cluster) as client:
            yield client
    finally:
        logger.setLevel(level)


def test_distributed_cluster_gives_the_same_fit_and_keeps_w_on_the_workers(X, W0, batches, client):
    from distributed import futures_of, wait

    with dask.config.set(scheduler="synchronous"):
        local = fit_chunked(chunked(X), K, W=W0, covariates=batches, max_iter=200)
        local_W = local.W.compute()
    fit = fit_chunked(chunked(X), K, W=W0, covariates=batches, max_iter=200)  # the active client's cluster
    assert fit.n_iter == local.n_iter
    assert_allclose(fit.objective, local.objective, rtol=1e-6)
    assert_allclose(fit.H, local.H, rtol=1e-6, atol=1e-12)
    assert isinstance(fit.W, da.Array) and fit.W.chunks == ((ROWS,) * (N_CELLS // ROWS), (K,))
    futures = futures_of(fit.W)  # persisted: one future per row chunk, held by the workers
    wait(futures)
    assert len(futures) == fit.W.numblocks[0] and all(f.status == "finished" for f in futures)
    holders = client.who_has(futures)
    assert all(holders[f.key] for f in futures)
    assert_allclose(fit.W.compute(), local_W, rtol=1e-6, atol=1e-12)
    usage = transform_chunked(chunked(X), fit.H, batches, fit.covariate_components).compute()
    expected = refit_usage(X.astype(np.float32), fit.H, batches, fit.covariate_components)
    assert_allclose(usage, expected, rtol=1e-10, atol=1e-12)


def test_in_memory_covariates_reach_the_workers_once_not_with_every_pass(X, client):
    """Each pass's graph carries H and the chunk keys only: a covariate table wrapped from memory is
    persisted once (silently: sending it is intended), so no pass resends its 2M x 6 values."""
    Xd = chunked(X).persist()
    Z = np.random.default_rng(2).random((N_CELLS, 8))  # 192 kB, above the lowered warning threshold
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "100kB"}), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_chunked(Xd, K, covariates=Z, max_iter=8, random_state=0)
        transform_chunked(Xd, fit.H, Z, fit.covariate_components).compute()
        cross_products(Xd, np.hstack([Z, Z]))
    assert fit.n_iter == 8
    assert not [w for w in caught if "large graph" in str(w.message)]


# --------------------------------------------------------------------------
# 4. Bad input
# --------------------------------------------------------------------------
def _bad_cases():
    X = planted(seed=3, n=600, m=40)
    good = chunked(X, rows=200)
    nan = X.copy()
    nan.data[5] = np.nan
    return [
        ("columns", lambda: fit_chunked(da.from_array(X, chunks=(200, 20), asarray=False), 3), InputError,
         r"X is chunked along genes .*X\.rechunk\(\{1: -1\}\)"),
        ("k = min", lambda: fit_chunked(good, 40), ParameterError, r"n_components=40 must be smaller"),
        ("k = 0", lambda: fit_chunked(good, 0), ParameterError, "n_components must be an integer >= 1"),
        ("W shape", lambda: fit_chunked(good, 3, W=np.ones((600, 4))), ParameterError, r"W must have shape"),
        ("W negative", lambda: fit_chunked(good, 3, W=-np.ones((600, 3))), ParameterError, "W must be finite and "),
        ("covariates rows", lambda: fit_chunked(good, 3, covariates=np.ones((10, 1))), ParameterError,
         "covariates must have shape"),
        ("negative X", lambda: fit_chunked(chunked(-X, rows=200), 3), InputError, "needs a non-negative X"),
        ("NaN", lambda: fit_chunked(chunked(nan, rows=200), 3), InputError, "1 NaN or infinite"),
        ("tol", lambda: fit_chunked(good, 3, tol=0), ParameterError, "tol must be a positive number"),
        ("random_state", lambda: fit_chunked(good, 3, random_state="x"), ParameterError, "random_state must be"),
        ("chunk_rows", lambda: fit_chunked(X, 3, chunk_rows=0), ParameterError, "chunk_rows must be"),
        ("H shape", lambda: transform_chunked(good, np.ones((3, 41))), ParameterError, r"H must have shape"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda case: case[0])
def test_bad_input_is_refused_naming_the_parameter(case):
    _, call, error, message = case
    with dask.config.set(scheduler="synchronous"), pytest.raises(error, match=message):
        call()
