"""NMF and semi-NMF on a cell-chunked Dask array: the in-memory HALS fit, with W held by the chunks.

For screens too large for one machine (millions of cells): X is a ``dask.array.Array`` chunked along
cells only, each chunk a scipy CSR matrix or a dense array. The fit is the block coordinate descent
of ``NMF`` / ``SemiNMF(solver="hals")`` (``_seminmf.py``), reorganised around the chunks:

* **per chunk** (a task where its rows live): ``X_c H^T``, its share of the objective
  ``sum(W_c * X_c H^T)``, the W sweeps (:func:`_seminmf._hals_w_step`, the in-memory W block; rows
  are independent), and the partial Gram terms of the new usage ``W_c^T W_c`` (k × k) and
  ``W_c^T X_c`` (k × genes): one pass over the chunk's X per iteration, two products, as in memory;
* **on the driver**: the sums of those terms (a tree reduction in a fixed order, so the numbers do
  not depend on the scheduler), the H step from them alone (least squares for semi-NMF, HALS sweeps
  on ``H >= 0`` for NMF: both need only ``W^T W`` and ``W^T X``), and the objective
  ``0.5 (||X||^2 - 2 tr(W^T X H^T) + tr(W^T W H H^T))``, stopped by the in-memory rule.

W stays in the chunks (a persisted Dask array: futures on the workers under ``dask.distributed``)
and never reaches the driver during the fit; the driver holds k × genes arrays. Because the
objective of iteration t needs ``X H_t^T``, it is formed in iteration t + 1's pass: a fit runs one
pass more than it has iterations (the last pass only evaluates the objective when ``max_iter`` is
reached; after convergence its W update is discarded).

Numbers: a sparse chunk is read as float32 CSR and its products accumulate in float64, as the
in-memory HALS reads a sparse X; a dense chunk is read in float64 (the Gram-form H step has no
counterpart of the in-memory SVD fallback for float32 products). With the same start the fit
follows the in-memory one up to the order of floating-point sums. The random start is drawn per
chunk from ``numpy.random.SeedSequence(random_state)`` spawned per chunk (reproducible for a given
chunking), and so is the usage of a re-seeded dead component.

Scheduler: whatever Dask uses when the fit runs (a ``distributed.Client`` if one is active, else
Dask's default); the library creates none. A user's X is read as its graph says in every pass:
persist it first (``X = X.persist()``) when it fits in the cluster's memory; an in-memory matrix
is wrapped in row chunks of ``chunk_rows`` and persisted.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import warnings
from dataclasses import dataclass
from numbers import Integral, Real

import dask
import dask.array as da
import numba
import numpy as np
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from ..errors import InputError, ParameterError
from ._consensus import refit_usage
from ._parallel import active_client
from ._seminmf import (
    _NMF_INIT_H_SWEEPS,
    _canonical_csr,
    _gram_objective,
    _hals_w_step,
    _inner_sweeps_for,
    _nonnegative_h_sweeps,
    _random_start_scale,
    _residual_norm,
    _safe_Wt_X,
    _safe_X_Ht,
    _solve_gram,
    _squared_norm,
    _stopping_rule,
    _uniform_open_closed,
    _warn_dead,
)

__all__ = ["ChunkedFit", "fit_chunked", "transform_chunked", "polish_chunked", "cross_products"]

#: Rows per chunk when an in-memory X is wrapped.
DEFAULT_CHUNK_ROWS = 10_000
#: Partial sums combined per task of the tree reduction (a fixed tree: the order of the sums, and so
#: the numbers, do not depend on the scheduler).
_FAN_IN = 8
#: Serialises chunk tasks within a process when their kernels use several threads (they already use
#: every core) or when numba's threading layer is not thread-safe (workqueue aborts when two threads
#: enter a parallel kernel at once).
_KERNEL_LOCK = threading.Lock()


def _chunk_task(func):
    """A chunk task: its compiled kernels on at most ``OMP_NUM_THREADS`` threads when that is set
    (``dask.distributed``'s nanny sets it to 1 in each worker: the workers' threads are the
    parallelism), one task at a time per process unless each runs single-threaded on a thread-safe
    layer. The kernels' results do not depend on the thread count."""
    @functools.wraps(func)
    def task(*args):
        threads = _kernel_threads()
        alone = threads > 1 or not _thread_safe_layer()
        with _KERNEL_LOCK if alone else contextlib.nullcontext():
            before = numba.get_num_threads()
            numba.set_num_threads(threads)
            try:
                return func(*args)
            finally:
                numba.set_num_threads(before)
    return task


def _thread_safe_layer():
    """numba's threading layer is known and thread-safe (omp, tbb); unknown before the first kernel runs."""
    try:
        return numba.threading_layer() in ("omp", "tbb")
    except ValueError:
        return False


def _kernel_threads():
    """numba's thread count, capped by ``OMP_NUM_THREADS`` when it is set to a positive integer."""
    limit = os.environ.get("OMP_NUM_THREADS", "")
    threads = numba.config.NUMBA_NUM_THREADS
    return max(1, min(threads, int(limit))) if limit.isdigit() and int(limit) > 0 else threads


@dataclass
class ChunkedFit:
    """Result of :func:`fit_chunked`.

    Attributes
    ----------
    W : dask.array.Array of shape (n_cells, k)
        Usage (``>= 0``), row-chunked like X and persisted (held by the workers under
        ``dask.distributed``); covariates excluded.
    H : ndarray of shape (k, n_genes)
        Loadings (``>= 0`` for NMF).
    covariate_components : ndarray of shape (n_covariates, n_genes)
        Loadings of the known covariates (0 rows without them), as ``covariate_components_``.
    n_iter : int
    objective : ndarray of shape (n_iter,)
        ``0.5 ||X - W H||_F^2`` after every iteration.
    converged : bool
        Stopped by ``tol`` (the in-memory rule), not by ``max_iter``.
    initial_objective : float
    n_reseeded : int
        Dead components (all-zero usage) re-seeded during the fit.
    """

    W: da.Array
    H: np.ndarray
    covariate_components: np.ndarray
    n_iter: int
    objective: np.ndarray
    converged: bool
    initial_objective: float
    n_reseeded: int


@dataclass
class _Problem:
    """What every pass needs: X and the covariates (row-chunked alike), k, the model, the seeds,
    and what the first pass learnt (``||X||^2``, W sweeps per pass, whether chunks are sparse)."""

    X: da.Array
    Z: da.Array | None
    k: int
    nonnegative_h: bool
    seeds: np.random.SeedSequence
    norm_X_sq: float = 0.0
    n_sweeps: int = 1
    sparse: bool = False

    @property
    def n_fixed(self) -> int:
        return 0 if self.Z is None else self.Z.shape[1]

    @property
    def width(self) -> int:
        return self.k + self.n_fixed

    def seed(self, chunk, *stream):
        """The SeedSequence of one chunk (``stream``: none for the start, ``(t,)`` for iteration t)."""
        return np.random.SeedSequence(self.seeds.entropy, spawn_key=(*self.seeds.spawn_key, chunk, *stream))


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------
def fit_chunked(X, n_components, *, nonnegative_h=True, W=None, covariates=None, max_iter=500, tol=1e-4,
                random_state=None, verbose=0, progress=None, chunk_rows=DEFAULT_CHUNK_ROWS) -> ChunkedFit:
    """NMF (or semi-NMF) ``X ~= W H`` of a cell-chunked Dask array, W kept in the chunks.

    The HALS fit of :class:`~perturbnmf.NMF` (``nonnegative_h=True``) or
    :class:`~perturbnmf.SemiNMF` (``solver="hals"``), one pass over X's chunks per iteration (see
    the module's docstring), the same stopping rule and the same re-seeding of dead components.

    Parameters
    ----------
    X : dask.array.Array, ndarray or sparse matrix of shape (n_cells, n_genes)
        Chunked along cells only (one chunk across all genes); chunks are CSR matrices or dense
        arrays. NMF needs ``X >= 0``. An in-memory matrix is wrapped in chunks of ``chunk_rows``.
    n_components : int
        Number of programs k, ``1 <= k < min(n_cells, n_genes)``.
    nonnegative_h : bool, default=True
        NMF (``H >= 0``); False: semi-NMF (signed H, X of any sign).
    W : ndarray or dask.array.Array of shape (n_cells, n_components), optional
        Custom start (non-negative); default: a random start as ``init="random"``, drawn per chunk.
    covariates : ndarray or dask.array.Array of shape (n_cells, n_covariates), optional
        Known, fixed non-negative usage (e.g. batch indicators), rechunked like X.
    max_iter : int, default=500
    tol : float, default=1e-4
        Stop when the objective fell by less than ``tol`` (relative) in the last iteration (the HALS rule
        of :func:`~perturbnmf.decomposition._seminmf._stopping_rule`).
    random_state : None, int or numpy.random.SeedSequence
        Seed of the random start and of re-seeded components (spawned per chunk).
    verbose : int, default=0
        Print the objective every 10 iterations when > 0.
    progress : callable, optional
        Called after every iteration as ``progress(iteration, objective, seconds)``.
    chunk_rows : int, default=10000
        Rows per chunk when X is not a Dask array.

    Returns
    -------
    ChunkedFit
    """
    _check_loop_parameters(max_iter, tol, progress)
    problem, W0 = _prepare(X, n_components, nonnegative_h, W, covariates, random_state, chunk_rows)
    scale = _scan(problem, W0)
    # sparse chunks: the compiled kernels use every core; idle BLAS threads beside them cost time
    with threadpool_limits(1 if problem.sparse else None, user_api="blas"):
        W, H, gram = _start(problem, W0, scale)
        fit = _iterate(problem, W, H, gram, max_iter=max_iter, tol=tol, verbose=verbose, progress=progress)
    if not fit.converged:
        warnings.warn(f"fit_chunked did not converge within max_iter={max_iter} iterations; increase max_iter "
                      "or tol.", ConvergenceWarning, stacklevel=2)
    return fit


def transform_chunked(X, H, covariates=None, covariate_components=None, *, chunk_rows=DEFAULT_CHUNK_ROWS):
    """Usage of every cell for fixed programs, chunk by chunk: ``argmin_{W >= 0} ||X - Z H_cov - W H||``.

    Each chunk's rows are solved as :func:`~perturbnmf.decomposition.refit_usage` (and
    ``SemiNMF.transform``) solves them: exact non-negative least squares per row. Chunks are read as
    in :func:`fit_chunked` (sparse as float32 CSR, as the estimators read a sparse X).

    Parameters
    ----------
    X : dask.array.Array, ndarray or sparse matrix of shape (n_cells, n_genes)
        Chunked along cells only, as for :func:`fit_chunked`.
    H : ndarray of shape (k, n_genes)
    covariates : ndarray or dask.array.Array of shape (n_cells, n_covariates), optional
        Known usage whose part of the fit, ``covariates @ covariate_components``, is held fixed.
    covariate_components : ndarray of shape (n_covariates, n_genes), optional
        Needed with ``covariates`` (``ChunkedFit.covariate_components``).
    chunk_rows : int, default=10000
        Rows per chunk when X is not a Dask array.

    Returns
    -------
    W : dask.array.Array of shape (n_cells, k)
        Lazy, row-chunked like X.
    """
    X = _as_row_chunked(X, chunk_rows)
    H = _check_loadings(H, X.shape[1], "H")
    Z = _row_chunked_like(covariates, X, "covariates")
    if (Z is None) != (covariate_components is None):
        raise ParameterError("covariates and covariate_components go together: pass both (the known usage and "
                             "its loadings, ChunkedFit.covariate_components) or neither.")
    H_cov = None if Z is None else _check_loadings(covariate_components, X.shape[1], "covariate_components",
                                                   n_rows=Z.shape[1])
    tasks = _map(_chunk_usage, [X, Z], (dask.delayed(H), dask.delayed(H_cov)))
    return _assemble(tasks, X.chunks[0], H.shape[0])


def polish_chunked(X, H, covariates=None, covariate_components=None, *, nonnegative_h=True, max_iter=500, tol=1e-4,
                   random_state=None, progress=None):
    """Consensus programs fitted once more on every cell, chunk by chunk.

    The chunked counterpart of the consensus sweep's final fit (``_consensus._polish``): each cell's
    usage refitted to ``H`` (:func:`transform_chunked`), then :func:`fit_chunked` from that usage to
    ``tol``, so that the programs are the fitted optimum nearest the consensus.

    Parameters
    ----------
    X : dask.array.Array, ndarray or sparse matrix of shape (n_cells, n_genes)
    H : ndarray of shape (k, n_genes)
        The consensus programs.
    covariates : ndarray or dask.array.Array of shape (n_cells, b), optional
    covariate_components : ndarray of shape (b, n_genes), optional
        Needed with ``covariates``.
    nonnegative_h, max_iter, tol, random_state, progress
        As :func:`fit_chunked`.

    Returns
    -------
    H : ndarray of shape (k, n_genes)
        Unit L2 rows.
    covariate_components : ndarray of shape (b, n_genes)
    """
    start = transform_chunked(X, H, covariates, covariate_components).persist()  # read by two passes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # convergence is judged on the restarts
        fit = fit_chunked(X, H.shape[0], nonnegative_h=nonnegative_h, W=start, covariates=covariates,
                          max_iter=max_iter, tol=tol, random_state=random_state, progress=progress)
    norms = np.linalg.norm(fit.H, axis=1)
    norms[norms == 0] = 1.0
    return fit.H / norms[:, None], fit.covariate_components


def cross_products(X, A, *, chunk_rows=DEFAULT_CHUNK_ROWS):
    """``A^T X`` and ``||X||_F^2`` in one pass over X's chunks (a sparse chunk read as float32 CSR).

    Parameters
    ----------
    X : dask.array.Array, ndarray or sparse matrix of shape (n_cells, n_genes)
    A : ndarray or dask.array.Array of shape (n_cells, m)
    chunk_rows : int, default=10000
        Rows per chunk when X is not a Dask array.

    Returns
    -------
    AtX : ndarray of shape (m, n_genes)
    norm_sq : float
    """
    X = _as_row_chunked(X, chunk_rows)
    part = _gather(_map(_chunk_cross_products, [X, _row_chunked_like(A, X, "A")]))
    return part["AtX"], part["norm_sq"]


def relative_error_chunked(X, W, H, *, products=None, chunk_rows=DEFAULT_CHUNK_ROWS):
    """``||X - W H||_F / ||X||_F`` chunk by chunk, judged as :func:`fit_chunked` judges its objective.

    From the Gram terms of one pass (``W^T X`` and ``||X||^2``); when their rounding could exceed the
    residual (a near-exact fit), the residual is formed chunk by chunk in a second pass instead.

    Parameters
    ----------
    X : dask.array.Array, ndarray or sparse matrix of shape (n_cells, n_genes)
    W : ndarray of shape (n_cells, k)
    H : ndarray of shape (k, n_genes)
    products : tuple (ndarray of shape (k, n_genes), float), optional
        ``cross_products(X, W)`` when the caller has it (no pass of its own then).
    chunk_rows : int, default=10000
        Rows per chunk when X is not a Dask array.

    Returns
    -------
    float
        NaN for an all-zero X.
    """
    X = _as_row_chunked(X, chunk_rows)
    W, H = np.asarray(W, dtype=np.float64), _check_loadings(H, X.shape[1], "H", n_rows=np.shape(W)[1])
    WtX, norm_sq = cross_products(X, W) if products is None else products
    if norm_sq == 0:
        return float("nan")
    terms = WtX * H
    value = _gram_objective(norm_sq, float(terms.sum()), float(np.abs(terms).sum()), W.T @ W, H @ H.T,
                            np.finfo(np.float64).eps)
    if value is None:
        value = 0.5 * _gather(_map(_chunk_residual, [X, _row_chunked_like(W, X, "W")], (dask.delayed(H),)))[
            "residual_sq"]
    return float(np.sqrt(2.0 * value / norm_sq))


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------
def _prepare(X, n_components, nonnegative_h, W, covariates, random_state, chunk_rows):
    """Checked inputs as a :class:`_Problem` and the custom start (None or row-chunked like X).

    Shapes and parameters are checked here; values (finite, signs) in the first pass (:func:`_scan`).
    """
    wrapped = not isinstance(X, da.Array)
    X = _as_row_chunked(X, chunk_rows)
    k = _check_n_components(n_components, X.shape)
    try:
        seeds = random_state if isinstance(random_state, np.random.SeedSequence) else np.random.SeedSequence(
            random_state)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"random_state must be None, a non-negative int or a numpy.random.SeedSequence; "
                             f"got {random_state!r}.") from exc
    Z = _row_chunked_like(covariates, X, "covariates")
    W0 = _row_chunked_like(W, X, "W", width=k)
    if wrapped:  # every pass reads X: wrapped once (under dask.distributed, sent to the workers once)
        X = _sent_once(X)
    return _Problem(X=X, Z=Z, k=k, nonnegative_h=bool(nonnegative_h), seeds=seeds), W0


def _as_row_chunked(X, chunk_rows):
    """X as a Dask array chunked along rows only (lazy).

    Parameters
    ----------
    X : dask.array.Array, ndarray or sparse matrix of shape (n_cells, n_genes)
    chunk_rows : int
        Rows per chunk of a wrapped in-memory X (a sparse one read as float32 CSR first).

    Returns
    -------
    dask.array.Array of shape (n_cells, n_genes)
    """
    if not isinstance(X, da.Array):
        chunk_rows = _check_int("chunk_rows", chunk_rows, 1)
        X = X.tocsr() if sp.issparse(X) else np.asarray(X)
        _check_matrix(X, "X")
        return da.from_array(_read_chunk(X) if sp.issparse(X) else X, chunks=(chunk_rows, -1), asarray=False)
    _check_matrix(X, "X")
    if X.numblocks[1] != 1:
        raise InputError(f"X is chunked along genes ({X.numblocks[1]} column chunks of {X.chunks[1]} genes); the "
                         "chunked fit needs whole cells per chunk: rechunk with X.rechunk({1: -1}).")
    if any(np.isnan(c) for c in X.chunks[0]):
        raise InputError("X has unknown chunk sizes: call X.compute_chunk_sizes() first.")
    return X


def _check_matrix(X, name):
    """Refuse an X that is not a non-empty, numeric 2-D matrix (InputError naming ``name``)."""
    if X.ndim != 2 or 0 in X.shape:
        raise InputError(f"{name} must be a non-empty 2-D matrix (cells × genes); got shape {X.shape}.")
    if X.dtype.kind not in "biuf":
        raise InputError(f"{name} must be numeric; got dtype {X.dtype}.")


def _check_int(name, value, minimum):
    """``value`` as an int ``>= minimum``, else a ParameterError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ParameterError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def _check_n_components(n_components, shape):
    """k as an int with ``1 <= k < min(shape)``, else a ParameterError naming ``n_components``."""
    k = _check_int("n_components", n_components, 1)
    limit = min(shape)
    if k >= limit:
        raise ParameterError(f"n_components={k} must be smaller than min(n_cells, n_genes) = min{tuple(shape)} = "
                             f"{limit}; set n_components to at most {limit - 1}.")
    return k


def _check_loop_parameters(max_iter, tol, progress):
    """Refuse a max_iter below 1, a tol that is not positive, a progress that is not callable."""
    _check_int("max_iter", max_iter, 1)
    if isinstance(tol, bool) or not isinstance(tol, Real) or not tol > 0:
        raise ParameterError(f"tol must be a positive number; got {tol!r}.")
    if progress is not None and not callable(progress):
        raise ParameterError(f"progress must be a callable(iteration, objective, seconds) or None; got {progress!r}.")


def _row_chunked_like(A, X, name, width=None):
    """``A`` (n_cells × width) as a Dask array with X's row chunks; None stays None.

    Parameters
    ----------
    A : None, ndarray or dask.array.Array of shape (n_cells, width)
    X : dask.array.Array of shape (n_cells, n_genes)
    name : str
        The parameter named in the error.
    width : int, optional
        Required number of columns (any >= 1 when None).

    Returns
    -------
    None or dask.array.Array of shape (n_cells, width), one chunk across the columns
    """
    if A is None:
        return None
    if not isinstance(A, da.Array):
        A = np.asarray(A)
    expected = f"({X.shape[0]}, {'>= 1' if width is None else width})"
    if A.ndim != 2 or A.shape[0] != X.shape[0] or A.shape[1] == 0 or (width is not None and A.shape[1] != width):
        raise ParameterError(f"{name} must have shape (n_cells, ...) = {expected} to match X; got {A.shape}.")
    if A.dtype.kind not in "biuf":
        raise ParameterError(f"{name} must be numeric; got dtype {A.dtype}.")
    if isinstance(A, da.Array):
        return A.rechunk((X.chunks[0], -1))
    return _sent_once(da.from_array(A, chunks=(X.chunks[0], -1)))


def _sent_once(A):
    """An array wrapped from the driver's memory, persisted: under ``dask.distributed`` its chunks go to
    the workers once, not inside the graph of every pass that reads them (without a client the
    chunks are views or row slices held in memory).

    Sending that data is the point here, so distributed's warning about large graphs (meant for data
    re-sent by mistake: ~100 MiB of covariates at 2M cells) is raised past its size for this call.
    """
    if active_client() is None:  # (no client: distributed's settings are not even loaded)
        return A.persist()
    limit = max(int(np.prod(A.shape, dtype=np.float64) * A.dtype.itemsize) * 2, 10 * 2**20)
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": limit}):
        return A.persist()


def _check_loadings(H, n_genes, name, n_rows=None):
    """Loadings as a finite float64 array of shape (k >= 1, n_genes), else a ParameterError."""
    H = np.asarray(H, dtype=np.float64)
    if H.ndim != 2 or H.shape[1] != n_genes or H.shape[0] == 0 or (n_rows is not None and H.shape[0] != n_rows):
        raise ParameterError(f"{name} must have shape ({'k' if n_rows is None else n_rows}, n_genes = {n_genes}); "
                             f"got {H.shape}.")
    if not np.all(np.isfinite(H)):
        raise ParameterError(f"{name} contains NaN or infinite values.")
    return H


# --------------------------------------------------------------------------
# The driver: passes over the chunks and what is done with their sums
# --------------------------------------------------------------------------
def _scan(problem, W0):
    """First pass: ``||X||^2``, non-zeros (W sweeps per pass) and the checks of the values.

    Parameters
    ----------
    problem : _Problem
        Filled in: ``norm_X_sq``, ``n_sweeps``, ``sparse``.
    W0 : None or dask.array.Array of shape (n_cells, k)

    Returns
    -------
    float
        Scale of the random start, ``sqrt(mean|X| / k)``.
    """
    X = problem.X
    part = _gather(_map(_chunk_scan, [X, problem.Z, W0]))
    if part["nonfinite"]:
        raise InputError(f"X contains {part['nonfinite']} NaN or infinite values; remove or impute them first.")
    if problem.nonnegative_h and part["negative"]:
        raise InputError(f"NMF (nonnegative_h=True) needs a non-negative X, but {part['negative']} values are "
                         "negative: use log-normalised expression without centring, or nonnegative_h=False.")
    for name, bad in (("covariates", part["bad_z"]), ("W", part["bad_w"])):
        if bad:
            raise ParameterError(f"{name} must be finite and non-negative; {bad} entries are not.")
    problem.norm_X_sq = part["norm_sq"]
    problem.n_sweeps = _inner_sweeps_for(part["nnz"], X.shape[0], problem.width)
    problem.sparse = part["sparse"] == X.numblocks[0]
    return _random_start_scale(part["abs_sum"], X.shape, problem.k)


def _start(problem, W0, scale):
    """Second pass: the start W (with the covariates) in the chunks, and its H.

    Returns
    -------
    W : dask.array.Array of shape (n_cells, k + n_covariates), persisted
    H : ndarray of shape (k + n_covariates, n_genes)
        Least squares for W (then ``_NMF_INIT_H_SWEEPS`` non-negative sweeps for NMF), as ``_initialize``.
    gram : ndarray of shape (k + n_covariates, k + n_covariates)
        ``W^T W``.
    """
    seeds = [(problem.seed(i),) for i in range(problem.X.numblocks[0])]
    tasks = _map(_chunk_start, [problem.X, W0, problem.Z], (scale, problem.k), chunk_args=seeds)
    W, part = _collect(tasks, problem)
    _warn_dead(np.flatnonzero(part["alive"] == 0), set(), 0)
    H = _solve_gram(part["gram"], part["WtX"])
    if problem.nonnegative_h:
        H = _nonnegative_h_sweeps(part["gram"], part["WtX"], H, _NMF_INIT_H_SWEEPS)
    return W, H, part["gram"]


def _iterate(problem, W, H, gram, *, max_iter, tol, verbose, progress):
    """The fit loop: pass t evaluates the objective of (W_t, H_t) and updates W; H is solved here.

    Parameters
    ----------
    problem : _Problem
    W : dask.array.Array of shape (n_cells, k + n_covariates)
        Start usage, persisted.
    H : ndarray of shape (k + n_covariates, n_genes)
    gram : ndarray of shape (k + n_covariates, k + n_covariates)
        ``W^T W``.

    Returns
    -------
    ChunkedFit
    """
    trace, n_reseeded, start_time, initial, converged = [], 0, time.perf_counter(), None, False
    for t in range(max_iter + 1):
        HHt = H @ H.T
        W_next, part = _pass(problem, W, H, HHt, update=t < max_iter)
        f = _objective_value(problem, part, W, H, gram, HHt)
        if t == 0:
            initial = f
        else:
            trace.append(f)
            rel_change, converged = _stopping_rule(trace, initial, tol)
            _report(verbose, progress, t, f, rel_change, time.perf_counter() - start_time)
            if converged:
                break
        if W_next is None:
            break
        W, part, reseeded = _reseed_dead(problem, W_next, part, t + 1)
        n_reseeded += reseeded
        H = _h_step(problem, part, H)
        gram = part["gram"]
    if verbose:
        print(f"fit_chunked {'converged' if converged else 'stopped at max_iter'} after {len(trace)} iterations, "
              f"objective {trace[-1]:.6e}")
    k = problem.k
    return ChunkedFit(W=W if problem.n_fixed == 0 else W[:, :k].persist(), H=H[:k], covariate_components=H[k:],
                      n_iter=len(trace), objective=np.asarray(trace, dtype=np.float64), converged=converged,
                      initial_objective=initial, n_reseeded=n_reseeded)


def _pass(problem, W, H, HHt, *, update):
    """One pass over the chunks: the objective's cross term for (W, H) and, with ``update``, the W step.

    Returns
    -------
    W_next : dask.array.Array (persisted) or None (without ``update``)
    part : dict
        Summed partial terms: ``cross``, ``abs_cross``; with ``update`` also ``gram``, ``WtX``,
        ``alive``, ``w_sum`` of ``W_next``.
    """
    shared = (dask.delayed(H), dask.delayed(HHt))
    if not update:
        return None, _gather(_map(_chunk_objective, [problem.X, W], shared[:1]))
    return _collect(_map(_chunk_iteration, [problem.X, W], (*shared, problem.n_sweeps, problem.n_fixed)), problem)


def _objective_value(problem, part, W, H, gram, HHt):
    """``0.5 ||X - W H||^2`` from the summed terms (exactly, in an extra pass, where their rounding could
    exceed ``_OBJECTIVE_RTOL ||X||^2``, as :func:`_seminmf._objective` does)."""
    value = _gram_objective(problem.norm_X_sq, part["cross"], part["abs_cross"], gram, HHt, np.finfo(np.float64).eps)
    if value is None:
        value = 0.5 * _gather(_map(_chunk_residual, [problem.X, W], (dask.delayed(H),)))["residual_sq"]
    return value


def _h_step(problem, part, H):
    """The H step from the summed ``W^T W`` and ``W^T X``: HALS sweeps on ``H >= 0`` (NMF) or least squares."""
    if problem.nonnegative_h:
        return _nonnegative_h_sweeps(part["gram"], part["WtX"], H, problem.n_sweeps)
    return _solve_gram(part["gram"], part["WtX"])


def _reseed_dead(problem, W, part, iteration):
    """Re-seed components whose usage died (all zero in every chunk), as ``_hals_iteration`` does.

    The new usage is ``mean(W)`` times uniform (0, 1] draws from each chunk's own seed for this
    iteration; one extra pass then gives the Gram terms of the re-seeded W. Returns
    ``(W, part, n_dead)`` (unchanged W and part when no component died).
    """
    dead = np.flatnonzero(part["alive"] == 0)
    if not dead.size:
        return W, part, 0
    scale = part["w_sum"] / (problem.X.shape[0] * problem.width) if part["w_sum"] > 0 else 1.0
    seeds = [(problem.seed(i, iteration),) for i in range(problem.X.numblocks[0])]
    W, fresh = _collect(_map(_chunk_reseed, [problem.X, W], (dead, scale, problem.n_fixed), chunk_args=seeds),
                        problem)
    return W, {**part, **fresh}, int(dead.size)


def _report(verbose, progress, iteration, objective, rel_change, seconds):
    """Call ``progress(iteration, objective, seconds)``; print a line every 10 iterations when verbose."""
    if progress is not None:
        progress(iteration, objective, seconds)
    if verbose and (iteration % 10 == 0 or iteration == 1):
        print(f"fit_chunked iteration {iteration:5d}: objective {objective:.6e}, relative change "
              f"{rel_change:.3e} ({seconds:.2f} s)")


# --------------------------------------------------------------------------
# Graph plumbing: one task per row chunk, a fixed tree of sums
# --------------------------------------------------------------------------
def _map(func, arrays, args=(), chunk_args=None):
    """One delayed task per row chunk: ``func(*row_blocks_i, *args, *chunk_args[i])``.

    Parameters
    ----------
    func : callable
    arrays : list of dask.array.Array or None
        Row-chunked alike (one chunk across the columns); None passes None to every task.
    args : tuple
        The same for every task (wrap large arrays in ``dask.delayed`` so the graph holds them once).
    chunk_args : list of tuple, optional
        Per chunk.

    Returns
    -------
    list of dask.delayed.Delayed
    """
    blocks = [None if a is None else a.to_delayed(optimize_graph=False).ravel() for a in arrays]
    n_chunks = next(len(b) for b in blocks if b is not None)
    call = dask.delayed(func)
    return [call(*(None if b is None else b[i] for b in blocks), *args, *(chunk_args[i] if chunk_args else ()))
            for i in range(n_chunks)]


def _sum_parts(*parts):
    """Key-wise sum of partial-term dicts, left to right (inputs are not modified)."""
    total = dict(parts[0])
    for part in parts[1:]:
        total = {key: value + part[key] for key, value in total.items()}
    return total


def _tree_sum(parts):
    """The sum of delayed partial-term dicts as a tree of ``_FAN_IN``-way sums over consecutive chunks."""
    while len(parts) > 1:
        parts = [dask.delayed(_sum_parts)(*parts[i:i + _FAN_IN]) for i in range(0, len(parts), _FAN_IN)]
    return parts[0]


def _gather(parts):
    """Compute the summed partial terms (a dict) of tasks that each return one dict."""
    (total,) = dask.compute(_tree_sum(parts))
    return _aligned(total)


def _aligned(part):
    """The partial-term dict with every array aligned: arrays that arrive from ``dask.distributed``
    can sit at unaligned addresses, which scipy's solvers refuse (a TypeError)."""
    return {key: np.require(value, requirements="A") if isinstance(value, np.ndarray) else value
            for key, value in part.items()}


def _assemble(blocks, rows, width):
    """One dask array (n_cells × width, float64) from per-chunk delayed blocks of ``rows[i]`` rows."""
    return da.concatenate([da.from_delayed(b, shape=(r, width), dtype=np.float64, meta=np.empty((0, 0)))
                           for b, r in zip(blocks, rows)], axis=0)


def _collect(tasks, problem):
    """Persist the chunks' new W (each task's first result) and gather their summed terms (second).

    Returns
    -------
    W : dask.array.Array of shape (n_cells, k + n_covariates), persisted (on the workers when distributed)
    part : dict
    """
    W = _assemble([t[0] for t in tasks], problem.X.chunks[0], problem.width)
    # one graph for both, not optimised per collection: optimising would rename the chunk tasks
    # differently for the array and for the sums, and every chunk task would run twice
    W, total = dask.persist(W, _tree_sum([t[1] for t in tasks]), optimize_graph=False)
    return W, _aligned(total.compute())


# --------------------------------------------------------------------------
# Chunk tasks (run where the chunk is; each sees only its rows)
# --------------------------------------------------------------------------
def _read_chunk(x):
    """A chunk as the solver reads it: sparse → canonical float32 CSR (as the in-memory HALS reads a
    sparse X); dense → float64 ndarray. Shape (n_rows, n_genes)."""
    if sp.issparse(x):
        return _canonical_csr(x, np.dtype(np.float32))
    return np.asarray(x, dtype=np.float64)


def _count_bad(A):
    """Entries of ``A`` (None: none) that are not finite or are negative."""
    return 0 if A is None else int(np.count_nonzero(~np.isfinite(A) | (np.asarray(A) < 0)))


@_chunk_task
def _chunk_scan(x, z, w):
    """One chunk's ``||x||^2``, ``sum|x|``, non-zeros, non-finite and negative values, bad covariates
    or start values (x: (n_rows, n_genes); z, w: the chunk's rows of the covariates and start, or None)."""
    x = _read_chunk(x)
    values = x.data if sp.issparse(x) else x
    finite = np.isfinite(values)
    return {"norm_sq": _squared_norm(x) if finite.all() else 0.0,
            "abs_sum": float(np.abs(values).sum(dtype=np.float64)), "nnz": int(np.count_nonzero(values)),
            "nonfinite": int(values.size - np.count_nonzero(finite)), "negative": int(np.count_nonzero(values < 0)),
            "sparse": int(sp.issparse(x)), "bad_z": _count_bad(z), "bad_w": _count_bad(w)}


def _gram_part(x, W, n_free):
    """A chunk's Gram terms of its usage W (n_rows × K): ``W^T W``, ``W^T x``, rows with positive usage per
    free component, and ``sum(W)``."""
    return {"gram": W.T @ W, "WtX": _safe_Wt_X(x, W), "alive": np.count_nonzero(W[:, :n_free] > 0, axis=0),
            "w_sum": float(W.sum())}


def _cross_part(W, XHt):
    """A chunk's share of the objective's cross term: ``sum(W * x H^T)`` and ``sum|W * x H^T|``."""
    cross = W * XHt
    return {"cross": float(np.sum(cross)), "abs_cross": float(np.abs(cross).sum())}


@_chunk_task
def _chunk_start(x, w, z, scale, k, seed):
    """A chunk's start usage ``[w, z]`` (w drawn as ``scale`` × uniform (0, 1] from ``seed`` when None)
    and its Gram terms. Returns (W of shape (n_rows, k + n_covariates), part)."""
    x = _read_chunk(x)
    if w is None:
        w = scale * _uniform_open_closed(np.random.default_rng(seed), (x.shape[0], k))
    W = np.array(w, dtype=np.float64, order="C")
    if z is not None:
        W = np.hstack([W, np.asarray(z, dtype=np.float64)])
    return W, _gram_part(x, W, k)


@_chunk_task
def _chunk_iteration(x, W, H, HHt, n_sweeps, n_fixed):
    """A chunk's pass: the objective's cross term for (W, H), the W sweeps, the new W's Gram terms.

    Parameters
    ----------
    x : CSR matrix or ndarray of shape (n_rows, n_genes)
    W : ndarray of shape (n_rows, K)
        Current usage (not modified).
    H : ndarray of shape (K, n_genes)
    HHt : ndarray of shape (K, K)
    n_sweeps, n_fixed : int

    Returns
    -------
    W_new : ndarray of shape (n_rows, K)
    part : dict
    """
    x = _read_chunk(x)
    XHt = _safe_X_Ht(x, H)
    part = _cross_part(W, XHt)
    W = _hals_w_step(W, XHt, HHt, n_sweeps=n_sweeps, n_fixed=n_fixed)
    part.update(_gram_part(x, W, W.shape[1] - n_fixed))
    return W, part


@_chunk_task
def _chunk_objective(x, W, H):
    """A chunk's share of the objective's cross term only (the last pass of a fit at ``max_iter``)."""
    return _cross_part(W, _safe_X_Ht(_read_chunk(x), H))


@_chunk_task
def _chunk_residual(x, W, H):
    """A chunk's exact ``||x - W H||^2`` (row blocks; when the Gram form would round too much)."""
    return {"residual_sq": _residual_norm(_read_chunk(x), W, H) ** 2}


@_chunk_task
def _chunk_reseed(x, W, dead, scale, n_fixed, seed):
    """A copy of the chunk's W with the ``dead`` columns drawn anew (``scale`` × uniform (0, 1] from
    ``seed``), and its Gram terms. Returns (W of shape (n_rows, K), part)."""
    x = _read_chunk(x)
    W = np.array(W, dtype=np.float64, order="C", copy=True)
    W[:, dead] = scale * _uniform_open_closed(np.random.default_rng(seed), (W.shape[0], dead.size))
    return W, _gram_part(x, W, W.shape[1] - n_fixed)


@_chunk_task
def _chunk_cross_products(x, a):
    """A chunk's ``a^T x`` (a: its rows of A, (n_rows, m)) and ``||x||^2``."""
    x = _read_chunk(x)
    return {"AtX": _safe_Wt_X(x, np.ascontiguousarray(a, dtype=np.float64)), "norm_sq": _squared_norm(x)}


@_chunk_task
def _chunk_usage(x, z, H, H_cov):
    """A chunk's usage for fixed loadings (:func:`refit_usage`); shape (n_rows, k)."""
    return refit_usage(_read_chunk(x), H, None if z is None else np.asarray(z, dtype=np.float64), H_cov)
