"""Semi-non-negative matrix factorisation (semi-NMF).

Model
-----
A cells x genes matrix ``X`` of any sign (for example a centred or scaled
Perturb-seq expression matrix) is approximated by a product of two factors::

    X  ~=  W @ H,      W >= 0   (n_samples x k, program usage per cell)
                       H signed (k x n_features, gene loadings per program)

by minimising the objective ``0.5 * ||X - W H||_F ** 2``.  Only the usage
``W`` is constrained; the loadings ``H`` can be negative, so a program can
both raise and lower genes.

Algorithm
---------
``solver="mu"`` is the alternating scheme of Ding, Li & Jordan (2010),
"Convex and Semi-Nonnegative Matrix Factorizations", IEEE Transactions on
Pattern Analysis and Machine Intelligence 32(1):45-55:

1. H step: the exact least-squares ``H = argmin_H ||X - W H||_F``, i.e. the
   solution of the Gram system ``(W^T W) H = W^T X``.  It is solved with
   :func:`scipy.linalg.lstsq` (never an explicit inverse), so a rank-deficient
   ``W`` (for example a dead, all-zero column) yields the minimum-norm
   solution instead of ``inf``/``nan``.
2. W step: the multiplicative update::

       W <- W * sqrt( ([X H^T]^+ + W [H H^T]^-) / ([X H^T]^- + W [H H^T]^+ + eps) )

   with ``A^+ = (|A| + A) / 2`` and ``A^- = (|A| - A) / 2``.  Ding et al. prove
   that this update does not increase the objective, and it keeps ``W >= 0``.

The pair (H step, W step) is iterated until the relative decrease of the
objective falls below ``tol`` — over the last iteration for HALS, over the
last 10 for the multiplicative rule (a one-step test stops it on the plateaus
multiplicative updates cross) — or ``max_iter`` iterations have run.

Sparse input is never densified as a whole: only the products ``X @ H.T`` and
``X.T @ W`` are formed, and the objective is evaluated as::

    ||X||^2 - 2 sum(W * (X H^T)) + sum((W^T W) * (H H^T))

Each solver is one small private "iteration" function plugged into a shared
driver (:func:`_fit_loop`) that handles the objective trace, stopping,
dead-component detection and warnings, so that further solvers (e.g. HALS /
block coordinate descent) can be added as another entry of ``_SOLVERS``.
"""

from __future__ import annotations

import functools
import time
import warnings
from numbers import Integral, Real

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse as sp
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

from . import _kernels

__all__ = ["NMF", "SemiNMF"]

#: Relative size of the guard added to the denominator of the multiplicative
#: update (relative to the largest numerator/denominator entry).
_EPS_REL = 1e-12
#: Smallest positive float64, used to avoid division by an exact zero.
_TINY = np.finfo(np.float64).tiny

#: Up to this many X entries, reconstruction_err_ is formed exactly in dense row blocks
#: (it costs n·m·k); beyond, it comes from the objective's Gram form.
_EXACT_RESIDUAL_MAX_ELEMENTS = 50_000_000

# Transform (non-negative least squares per cell) settings.
_TRANSFORM_MAX_SWEEPS = 2000
_TRANSFORM_TOL = 1e-10


# --------------------------------------------------------------------------
# Small linear-algebra helpers
# --------------------------------------------------------------------------
def _pos(A):
    """Positive part ``(|A| + A) / 2`` (element-wise, same shape as ``A``)."""
    return (np.abs(A) + A) / 2.0


def _neg(A):
    """Negative part ``(|A| - A) / 2`` (element-wise, same shape as ``A``)."""
    return (np.abs(A) - A) / 2.0


def _safe_X_Ht(X, H):
    """``X @ H.T`` without densifying a sparse ``X``, in float64.

    A CSR ``X`` goes through the threaded kernel (float32 or float64 data); a dense
    ``X`` through BLAS in ``X``'s own dtype (``H`` is cast, ``X`` never copied).

    Parameters
    ----------
    X : ndarray or CSR matrix of shape (n_samples, n_features)
    H : ndarray of shape (k, n_features)

    Returns
    -------
    XHt : ndarray of shape (n_samples, k), float64
    """
    if sp.issparse(X):
        X = X.tocsr()
        return _kernels.csr_times_dense_t(X.indptr, X.indices, X.data, np.ascontiguousarray(H.T, dtype=np.float64))
    return np.asarray(X @ np.ascontiguousarray(H.T, dtype=_product_dtype(X)), dtype=np.float64)


def _product_dtype(X):
    """dtype of the factor multiplied with a dense X: X's own when float32/float64 (no copy of X),
    else float64 (an integer X must not truncate the factor)."""
    return X.dtype if X.dtype in (np.float32, np.float64) else np.dtype(np.float64)


def _safe_Wt_X(X, W):
    """``W.T @ X`` without densifying or transposing a sparse ``X``, in float64.

    Parameters
    ----------
    X : ndarray or CSR matrix of shape (n_samples, n_features)
    W : ndarray of shape (n_samples, k)

    Returns
    -------
    WtX : ndarray of shape (k, n_features), float64
    """
    if sp.issparse(X):
        X = X.tocsr()
        return _kernels.csr_t_times_dense(X.indptr, X.indices, X.data, np.ascontiguousarray(W, dtype=np.float64),
                                          X.shape[1])
    # A C-contiguous Wᵀ lets BLAS stream X once (the transposed view is ~5x slower).
    return np.asarray(np.ascontiguousarray(W.T, dtype=_product_dtype(X)) @ X, dtype=np.float64)


def _squared_norm(X):
    """Squared Frobenius norm of a dense or sparse matrix.

    Parameters
    ----------
    X : ndarray or sparse matrix of shape (n_samples, n_features)
        Sparse input must be in canonical format (no duplicate entries).

    Returns
    -------
    float
    """
    data = X.data if sp.issparse(X) else np.ascontiguousarray(X).reshape(-1)
    return float(_kernels.sum_of_squares(data))  # float64 accumulation, no float64 copy of X


# --------------------------------------------------------------------------
# Per-iteration building blocks (kept small so tests can call them directly)
# --------------------------------------------------------------------------
def _update_h_least_squares(X, W, *, WtX=None):
    """H step: exact least squares ``H = argmin_H ||X - W H||_F``.

    Solves the Gram system ``(W^T W) H = W^T X`` by Cholesky; when the Gram
    matrix is singular or ill-conditioned (scipy's condition warning), by
    :func:`scipy.linalg.lstsq` (SVD based), which returns the minimum-norm
    solution when ``W`` is rank deficient (e.g. has an all-zero column); that
    component's row of ``H`` is then zero. No explicit inverse is formed.

    Parameters
    ----------
    X : ndarray or sparse matrix of shape (n_samples, n_features)
        Data, float64.
    W : ndarray of shape (n_samples, k)
        Current non-negative usage matrix.
    WtX : ndarray of shape (k, n_features), optional
        Precomputed ``W.T @ X``.

    Returns
    -------
    H : ndarray of shape (k, n_features)
        Least-squares loadings (finite even when ``W`` is rank deficient).

    Notes
    -----
    A dense float32 ``X`` gives ``W^T X`` with float32 rounding, which the Gram system
    amplifies by ``cond(W)`` in the fit ``W H`` (an objective that rises by orders of
    magnitude when usage columns are nearly collinear). When ``cond(W)`` exceeds
    ``1e-4 / eps(float32)`` the loadings come from the SVD ``W = U S V^T`` instead,
    ``H = V S^-1 U^T X`` with ``U^T X`` accumulated in float64 (:func:`_update_h_svd`).
    """
    gram = W.T @ W
    if not sp.issparse(X) and X.dtype == np.float32 and W.shape[1] > 0:
        s = np.linalg.eigvalsh(gram)
        if s[0] <= s[-1] * (np.finfo(np.float32).eps / 1e-4) ** 2:
            return _update_h_svd(X, W)
    if WtX is None:
        WtX = _safe_Wt_X(X, W)
    return _solve_gram(gram, WtX)


def _solve_gram(gram, WtX):
    """Least-squares loadings from the Gram system ``gram H = WtX`` (the H step without X).

    Cholesky; a singular or ill-conditioned ``gram`` (scipy's condition warning) falls back to
    :func:`scipy.linalg.lstsq` (minimum-norm solution). Used by :func:`_update_h_least_squares`
    and by the chunked fit, which sums ``gram`` and ``WtX`` over row chunks.

    Parameters
    ----------
    gram : ndarray of shape (k, k)
        ``W^T W``.
    WtX : ndarray of shape (k, n_features)
        ``W^T X``.

    Returns
    -------
    H : ndarray of shape (k, n_features)
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:  # Cholesky: ~50x faster than an SVD-based solve for k x k with many right-hand sides
            return np.ascontiguousarray(scipy.linalg.solve(gram, WtX, assume_a="pos", check_finite=False))
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgWarning):
            pass  # singular or ill-conditioned Gram (e.g. a dead component): minimum-norm solution
    H, _, _, _ = scipy.linalg.lstsq(gram, WtX, check_finite=False, lapack_driver="gelsd")
    return np.ascontiguousarray(H)


def _update_h_svd(X, W, *, block_elements=2**22):
    """Minimum-norm least-squares ``H`` from the SVD of ``W`` (see :func:`_update_h_least_squares`).

    ``U^T X`` is formed in float64 from row blocks of the dense float32 X (no float64 copy of
    X as a whole): divided by the small singular values, float32 rounding would give loadings
    of huge, cancelling rows, and X H^T in float32 then loses the fit.
    """
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    keep = s > s.max(initial=0.0) * max(W.shape) * np.finfo(np.float64).eps
    U = U[:, keep]
    UtX = np.zeros((U.shape[1], X.shape[1]))
    step = max(1, block_elements // max(X.shape[1], 1))
    for start in range(0, X.shape[0], step):
        UtX += U[start:start + step].T @ np.asarray(X[start:start + step], dtype=np.float64)
    return np.ascontiguousarray(Vt[keep].T @ (UtX / s[keep, None]))


def _update_h_nonnegative(X, W, H, *, n_sweeps=1, WtX=None):
    """H step of NMF: exact coordinate descent on ``min_{H >= 0} ||X - W H||_F`` from ``H``.

    The rows of ``H.T`` are the genes' non-negative least-squares problems with Gram matrix
    ``W^T W`` and right-hand sides ``(W^T X)^T``: the same compiled kernel as the W step
    (:func:`perturbnmf._kernels.coordinate_descent_rows`), each sweep an exact block
    minimisation, so the objective never increases.

    Parameters
    ----------
    X : ndarray or sparse matrix of shape (n_samples, n_features)
    W : ndarray of shape (n_samples, k)
    H : ndarray of shape (k, n_features)
        Current (non-negative) loadings, the starting point.
    n_sweeps : int
        Coordinate-descent sweeps over each gene's k loadings.
    WtX : ndarray of shape (k, n_features), optional
        Precomputed ``W.T @ X``.

    Returns
    -------
    H : ndarray of shape (k, n_features), non-negative
    """
    if WtX is None:
        WtX = _safe_Wt_X(X, W)
    return _nonnegative_h_sweeps(W.T @ W, WtX, H, n_sweeps)


def _nonnegative_h_sweeps(gram, WtX, H, n_sweeps):
    """The NMF H step from the Gram terms alone: ``n_sweeps`` coordinate-descent sweeps from ``H``.

    Parameters
    ----------
    gram : ndarray of shape (k, k)
        ``W^T W``.
    WtX : ndarray of shape (k, n_features)
        ``W^T X``.
    H : ndarray of shape (k, n_features)
        Starting loadings (clipped at 0).
    n_sweeps : int

    Returns
    -------
    H : ndarray of shape (k, n_features), non-negative
    """
    Ht = np.array(np.maximum(H, 0.0).T, dtype=np.float64, order="C")
    _kernels.coordinate_descent_rows(Ht, np.ascontiguousarray(WtX.T), np.ascontiguousarray(gram), n_sweeps, 0.0)
    return np.ascontiguousarray(Ht.T)


def _update_w_multiplicative(X, W, H, *, XHt=None, HHt=None, eps=None):
    """W step: one Ding-Li-Jordan multiplicative update.

    ``W <- W * sqrt((P(XHt) + W N(HHt)) / (N(XHt) + W P(HHt) + eps))`` with
    ``P(A) = (|A| + A) / 2`` and ``N(A) = (|A| - A) / 2``.

    Parameters
    ----------
    X : ndarray or sparse matrix of shape (n_samples, n_features)
        Data (only used when ``XHt`` is not given).
    W : ndarray of shape (n_samples, k)
        Current non-negative usage matrix (not modified).
    H : ndarray of shape (k, n_features)
        Current loadings (only used when ``XHt``/``HHt`` are not given).
    XHt : ndarray of shape (n_samples, k), optional
        Precomputed ``X @ H.T``.
    HHt : ndarray of shape (k, k), optional
        Precomputed ``H @ H.T``.
    eps : float, optional
        Guard added to the denominator.  Default: ``1e-12`` times the largest
        entry of the numerator and denominator (so the guard scales with the
        data), or the smallest positive float when everything is zero.

    Returns
    -------
    W_new : ndarray of shape (n_samples, k)
        Updated usage, ``>= 0``.
    """
    if XHt is None:
        XHt = _safe_X_Ht(X, H)
    if HHt is None:
        HHt = H @ H.T
    numer = _pos(XHt) + W @ _neg(HHt)
    denom = _neg(XHt) + W @ _pos(HHt)
    if eps is None:
        scale = max(float(numer.max(initial=0.0)), float(denom.max(initial=0.0)))
        eps = _EPS_REL * scale if scale > 0 else _TINY
    return W * np.sqrt(numer / (denom + eps))


def _objective(X, W, H, *, norm_X_sq=None, XHt=None, HHt=None):
    """Objective ``0.5 * ||X - W H||_F ** 2`` without forming ``X - W H``.

    Uses ``||X||^2 - 2 sum(W * XH^T) + sum((W^T W) * (H H^T))``, clipped at 0. The terms
    cancel: where their rounding (float32 for a dense float32 X's ``X H^T``) could exceed
    ``1e-5 ||X||^2`` -- huge, cancelling loadings of nearly collinear usage columns -- the
    residual is formed exactly instead (:func:`_residual_norm`, row blocks).

    Parameters
    ----------
    X : ndarray or sparse matrix of shape (n_samples, n_features)
        Data (only used for quantities that are not given).
    W : ndarray of shape (n_samples, k)
    H : ndarray of shape (k, n_features)
    norm_X_sq : float, optional
        Precomputed ``||X||_F ** 2``.
    XHt : ndarray of shape (n_samples, k), optional
        Precomputed ``X @ H.T``.
    HHt : ndarray of shape (k, k), optional
        Precomputed ``H @ H.T``.

    Returns
    -------
    float
    """
    if norm_X_sq is None:
        norm_X_sq = _squared_norm(X)
    if XHt is None:
        XHt = _safe_X_Ht(X, H)
    if HHt is None:
        HHt = H @ H.T
    cross_terms = W * XHt
    eps = np.finfo(np.float32 if not sp.issparse(X) and X.dtype == np.float32 else np.float64).eps
    value = _gram_objective(norm_X_sq, float(np.sum(cross_terms)), float(np.abs(cross_terms).sum()), W.T @ W, HHt,
                            eps)
    if value is None:
        return 0.5 * _residual_norm(X, W, H) ** 2
    return value


#: Largest rounding (relative to ``||X||^2``) accepted from the Gram form of the objective.
_OBJECTIVE_RTOL = 1e-5


def _gram_objective(norm_X_sq, cross, abs_cross, gram, HHt, eps):
    """``0.5 * (||X||^2 - 2 cross + sum(W^T W * H H^T))`` clipped at 0, or None when its rounding
    could exceed ``_OBJECTIVE_RTOL * ||X||^2`` (the caller then forms the residual exactly).

    Parameters
    ----------
    norm_X_sq : float
        ``||X||_F^2``.
    cross, abs_cross : float
        ``sum(W * X H^T)`` and ``sum(|W * X H^T|)``.
    gram : ndarray of shape (k, k)
        ``W^T W``.
    HHt : ndarray of shape (k, k)
        ``H H^T``.
    eps : float
        Machine epsilon of the products' precision.

    Returns
    -------
    float or None
    """
    quad_terms = gram * HHt
    value = 0.5 * max(norm_X_sq - 2.0 * cross + float(np.sum(quad_terms)), 0.0)
    size = norm_X_sq + 2.0 * abs_cross + float(np.abs(quad_terms).sum())
    if eps * size > _OBJECTIVE_RTOL * norm_X_sq:
        return None
    return value


def _residual_norm(X, W, H, *, block_elements=2**22):
    """Exact ``||X - W H||_F``, formed in row blocks (sparse X never densified whole).

    Parameters
    ----------
    X : ndarray or sparse matrix of shape (n_samples, n_features)
    W : ndarray of shape (n_samples, k)
    H : ndarray of shape (k, n_features)
    block_elements : int
        Approximate number of dense elements per block.

    Returns
    -------
    float
    """
    total = 0.0
    for _, R in _residual_blocks(X, W, H, block_rows=max(1, block_elements // max(X.shape[1], 1))):
        total += float(np.dot(R.ravel(), R.ravel()))
    return float(np.sqrt(total))


def _residual_blocks(X, W, H, *, block_rows):
    """The residual ``X - W H`` in dense float64 blocks of ``block_rows`` rows, top to bottom.

    Only one block of a sparse X is densified at a time. Callers reduce the blocks (a total,
    or a norm per row) in this fixed order, so their sums do not depend on who calls.

    Yields
    ------
    rows : slice
        The rows of X the block covers.
    R : ndarray of shape (n_block_rows, n_features)
    """
    for start in range(0, X.shape[0], block_rows):
        rows = slice(start, start + block_rows)
        block = X[rows]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        yield rows, block - W[rows] @ H


def _uniform_open_closed(random_state, shape):
    """Uniform draws on (0, 1] (no exact zeros).

    Parameters
    ----------
    random_state : None, int, numpy.random.Generator or numpy.random.RandomState
    shape : tuple of int

    Returns
    -------
    ndarray of the given shape
    """
    if isinstance(random_state, np.random.RandomState):
        u = random_state.random_sample(shape)
    else:
        u = np.random.default_rng(random_state).random(shape)
    return 1.0 - u


#: Power iterations of the randomized SVD start (each costs two passes over X).
_SVD_POWER_ITER = 2


def _child_rng(random_state, stream: int):
    """Generator of one stream derived from ``random_state``: 1 re-seeds dead components, 2 draws the
    subsample start (apart from the initialisation's own stream). A Generator is used as it is."""
    if isinstance(random_state, np.random.Generator):
        return random_state
    if isinstance(random_state, np.random.RandomState):
        return np.random.default_rng(random_state.randint(2**31))
    return np.random.default_rng(None if random_state is None else [int(random_state), stream])


def _reseed_rng(random_state):
    """Generator for re-seeded components, a stream apart from the initialisation's."""
    return _child_rng(random_state, 1)


#: From this many cells on, ``init="auto"`` starts from the programs of a fit on a subsample of the cells.
SUBSAMPLE_START_MIN_CELLS = 50_000
#: The subsample start fits this share of the cells (at least ``_SUBSAMPLE_START_MIN_ROWS``) first.
_SUBSAMPLE_START_FRACTION = 0.1
_SUBSAMPLE_START_MIN_ROWS = 10_000


def _subsample_start(estimator, X, covariates, random_state):
    """Initial usage of every cell from the programs of a fit on a random tenth of the cells.

    An iteration's cost grows with the cells, but far fewer cells pin the programs down: the
    subsample fit (random start, the estimator's own stopping rule) costs about a tenth of an
    iteration per iteration, and one pass over all cells then gives each cell its usage for those
    programs (least squares, clipped at 0). From there the full fit needs a few iterations.

    Parameters
    ----------
    estimator : SemiNMF or NMF
        Its parameters are used for the subsample fit (``init="random"``).
    X : ndarray or CSR matrix of shape (n_samples, n_features)
    covariates : ndarray of shape (n_samples, b) or None
    random_state : None, int, Generator or RandomState

    Returns
    -------
    W : ndarray of shape (n_samples, n_components), non-negative
    """
    from sklearn.base import clone

    rng = _child_rng(random_state, 2)
    n = X.shape[0]
    rows = np.sort(rng.choice(n, min(n, max(_SUBSAMPLE_START_MIN_ROWS, int(_SUBSAMPLE_START_FRACTION * n))),
                              replace=False))
    sub = clone(estimator).set_params(init="random", random_state=int(rng.integers(2**31)), verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a start: the full fit decides convergence
        sub.fit(X[rows], covariates=None if covariates is None else covariates[rows])
    H = sub.components_
    XHt = _safe_X_Ht(X, H)
    if covariates is not None:  # the covariates' share of X is known: remove it before solving for usage
        XHt -= covariates @ (sub.covariate_components_ @ H.T)
    return np.maximum(_solve_gram(H @ H.T, XHt.T).T, 0.0)  # (H Hᵀ) Wᵀ = (X Hᵀ)ᵀ, the H step's system


def _initialize(X, n_components, init, random_state, *, W=None, H=None, nonnegative_h=False, covariates=None):
    """Initial factors.

    ``init="random"``: ``W`` uniform on (0, 1] times ``sqrt(mean|X| / k)``
    (strictly positive: a multiplicative update cannot move an exact zero),
    drawn from ``numpy.random.default_rng(random_state)``.
    ``init="svd"``: the Gillis & Kumar (2015) start — the best rank-(k-1)
    approximation ``U V`` from a randomized truncated SVD, turned into an exact
    rank-k semi-NMF ``W = [U + t 1ᵀ, t]`` with ``t_i = max(0, -min_j U_ij)``, so the
    start is at least as good as the rank-(k-1) SVD.
    ``init="custom"``: the given ``W`` (validated by the caller).
    In both cases ``H`` is the least-squares loading matrix for that ``W``
    (the mu solver starts with an H step, so a custom ``H`` is not used); with
    ``nonnegative_h`` (NMF) it is the non-negative least-squares ``H`` instead,
    from the clipped least-squares one.

    Parameters
    ----------
    X : ndarray or sparse matrix of shape (n_samples, n_features)
    n_components : int
    init : {"random", "svd", "custom"}
    random_state : None, int, Generator or RandomState
    W : ndarray of shape (n_samples, n_components), optional
        Custom initial usage (``init="custom"``).
    H : ndarray of shape (n_components, n_features), optional
        Custom initial loadings; ignored (recomputed by the H step).
    nonnegative_h : bool
        Start an NMF (``H >= 0``).
    covariates : ndarray of shape (n_samples, n_covariates), optional
        Known usage appended to W (its loadings are fitted with the others).

    Returns
    -------
    W : ndarray of shape (n_samples, n_components [+ n_covariates])
    H : ndarray of shape (n_components [+ n_covariates], n_features)
    """
    n_samples, n_features = X.shape
    if init == "svd" and n_components > 1:
        W = _svd_start(X, n_components, random_state)
    elif init in ("random", "svd"):  # a rank-0 SVD start is no start: k = 1 starts at random
        data = X.data if sp.issparse(X) else X
        scale = _random_start_scale(float(np.abs(data).sum(dtype=np.float64)), X.shape, n_components)
        W = scale * _uniform_open_closed(random_state, (n_samples, n_components))
    elif init == "custom":
        W = np.array(W, dtype=np.float64, copy=True)
    else:  # pragma: no cover - guarded by parameter validation
        raise ValueError(f"Invalid init={init!r}; valid values are 'random', 'svd', 'custom'.")
    if covariates is not None:
        W = np.hstack([W, covariates])
    H = _update_h_least_squares(X, W)
    if nonnegative_h:
        H = _update_h_nonnegative(X, W, H, n_sweeps=_NMF_INIT_H_SWEEPS)
    return W, H


def _random_start_scale(abs_sum, shape, n_components):
    """Scale ``sqrt(mean|X| / k)`` of the random start (1 for an all-zero X); ``abs_sum`` is ``sum|X|``,
    ``shape`` X's (n_samples, n_features)."""
    mean_abs = abs_sum / (shape[0] * shape[1])
    return np.sqrt(mean_abs / n_components) if mean_abs > 0 else 1.0


#: Coordinate-descent sweeps that turn the clipped least-squares H of the start into an NMF H.
_NMF_INIT_H_SWEEPS = 20


def _svd_start(X, n_components, random_state, n_oversamples=10):
    """Initial W from a rank-(k-1) randomized SVD (Gillis & Kumar 2015, SIMAX 36:1404).

    The range finder uses the same X products as the solvers (no copy of X, no
    change of dtype). ``U V`` (rank k-1) becomes the rank-k semi-NMF
    ``W = [U + t 1ᵀ, t]``, ``H = [V; -1ᵀ V]`` with ``W H = U V`` and ``W >= 0``.

    Parameters
    ----------
    X : ndarray or CSR matrix of shape (n_samples, n_features)
    n_components : int, >= 2

    Returns
    -------
    W : ndarray of shape (n_samples, n_components)
    """
    rank = n_components - 1
    rng = random_state if isinstance(random_state, np.random.Generator) else np.random.default_rng(
        random_state if not isinstance(random_state, np.random.RandomState) else random_state.randint(2**31)
    )
    width = min(rank + n_oversamples, min(X.shape))
    Q, _ = np.linalg.qr(_safe_X_Ht(X, rng.standard_normal((width, X.shape[1]))))
    for _ in range(_SVD_POWER_ITER):
        Z, _ = np.linalg.qr(_safe_Wt_X(X, Q).T)
        Q, _ = np.linalg.qr(_safe_X_Ht(X, Z.T))
    Ub, S, _ = np.linalg.svd(_safe_Wt_X(X, Q), full_matrices=False)
    U = (Q @ Ub[:, :rank]) * S[:rank]
    shift = np.maximum(0.0, -U.min(axis=1))
    return np.hstack([U + shift[:, None], shift[:, None]])


# --------------------------------------------------------------------------
# Solvers: one iteration each, plugged into a shared driver
# --------------------------------------------------------------------------
def _mu_iteration(X, W, H, XHt, HHt, rng):
    """One Ding-Li-Jordan iteration.

    Performs the W step for the current ``H`` and then the H step for the new
    ``W``.  Starting from ``H = lstsq(W0)`` this generates exactly the sequence
    of the alternating (H step, W step) scheme, while the returned ``H`` is
    always the exact least-squares loading for the returned ``W``.

    Parameters
    ----------
    X : ndarray or sparse matrix of shape (n_samples, n_features)
    W : ndarray of shape (n_samples, k)
    H : ndarray of shape (k, n_features)
    XHt : ndarray of shape (n_samples, k)
        ``X @ H.T`` for the current ``H``.
    HHt : ndarray of shape (k, k)
        ``H @ H.T`` for the current ``H``.

    rng : numpy.random.Generator
        Unused (the multiplicative rule cannot revive a dead component).

    Returns
    -------
    W, H, XHt, HHt
        Updated factors and the products for the updated ``H``, with the
        shapes above.
    n_reseeded : int
        Always 0.
    """
    W = _update_w_multiplicative(X, W, H, XHt=XHt, HHt=HHt)
    H = _update_h_least_squares(X, W)
    XHt = _safe_X_Ht(X, H)
    HHt = H @ H.T
    return W, H, XHt, HHt, 0


#: Most W sweeps per pass over X in HALS (see :func:`_hals_inner_sweeps`).
_HALS_INNER_SWEEPS = 3


def _hals_inner_sweeps(X, k):
    """W sweeps per pass over X: repeat the sweep while it is cheap next to the pass.

    A pass over X (both products) costs ``2·nnz(X)·k``, a sweep ``n·k²``; their ratio is
    ``ρ = 2·nnz_per_row / k``. Repeating the W sweep is nearly free when ρ is large
    (Gillis & Glineur 2012); measured on 2,000 genes with 400 non-zeros per cell (ρ ≈ 27)
    3 sweeps reach a given objective fastest, on 299 genes with 66 per cell at k = 45
    (ρ ≈ 3) one sweep does. So: ``clip(floor(ρ / 3), 1, 3)``.

    The non-zero values are counted whatever X's format (stored zeros of a sparse X and zeros
    of a dense X alike are not counted), so a dense and a sparse X with the same values take
    the same steps and give the same factors.
    """
    return _inner_sweeps_for(np.count_nonzero(X.data if sp.issparse(X) else X), X.shape[0], k)


def _inner_sweeps_for(nnz, n_samples, k):
    """:func:`_hals_inner_sweeps` from X's count of non-zero values and rows (e.g. summed over chunks)."""
    per_row = nnz / max(n_samples, 1)
    return int(np.clip((2.0 * per_row / k) // 3, 1, _HALS_INNER_SWEEPS))


def _hals_iteration(X, W, H, XHt, HHt, rng, *, n_sweeps=1, nonnegative_h=False, l1=0.0, l2=0.0, n_fixed=0):
    """One block-coordinate-descent iteration: HALS sweeps on W, then exact least-squares H.

    The W block is solved by exact coordinate descent (each entry's non-negative
    minimiser in turn, 1–3 sweeps by :func:`_hals_inner_sweeps`) for the current ``H``; the H
    block is the exact least-squares solution for the new ``W`` (Gillis & Kumar
    2015, Algorithm 1). Each block is minimised exactly, so the objective never
    increases. A component whose usage column became all zeros is re-seeded with
    random positive usage before the H step (the H step then can only lower the
    objective, since a zero loading row reproduces the previous fit).

    Parameters
    ----------
    X : ndarray or CSR matrix of shape (n_samples, n_features)
    W : ndarray of shape (n_samples, k)
    H : ndarray of shape (k, n_features)
    XHt : ndarray of shape (n_samples, k)
        ``X @ H.T`` for the current ``H``.
    HHt : ndarray of shape (k, k)
    rng : numpy.random.Generator
        Source of the re-seeded usage.
    n_sweeps : int
        W sweeps per pass over X; :func:`_fit_loop` sets it once per fit from
        :func:`_hals_inner_sweeps` (it depends only on X and k).
    nonnegative_h : bool
        NMF: the H block is ``n_sweeps`` HALS sweeps on ``H >= 0`` (Cichocki & Phan 2009)
        instead of the least-squares solution.
    l1, l2 : float
        Penalties ``l1 * sum(W) + l2 / 2 * ||W||^2`` of the W block (``alpha_W``). With a
        penalty the programs are rescaled to unit L2 norm after the H step (W takes the
        scale), otherwise shrinking W would only grow H.
    n_fixed : int
        The last ``n_fixed`` columns of W are known covariates (e.g. batch indicators): never
        updated, their loadings fitted with the rest in the H step.

    Returns
    -------
    W, H, XHt, HHt
        Updated factors and products, shapes as above.
    n_reseeded : int
        Components re-seeded in this iteration.
    """
    W = _hals_w_step(W, XHt, HHt, n_sweeps=n_sweeps, l1=l1, l2=l2, n_fixed=n_fixed)
    n_free = W.shape[1] - n_fixed
    dead = _dead_components(W[:, :n_free])
    if dead.size:
        scale = float(W.mean()) if W.any() else 1.0
        W[:, dead] = scale * _uniform_open_closed(rng, (W.shape[0], dead.size))
    if nonnegative_h:
        H = _update_h_nonnegative(X, W, H, n_sweeps=n_sweeps)
    else:
        H = _update_h_least_squares(X, W)
    if l1 or l2:
        norms = np.ones(len(H))
        norms[:n_free] = np.linalg.norm(H[:n_free], axis=1)
        norms[norms == 0] = 1.0
        W *= norms
        H = H / norms[:, None]
    XHt = _safe_X_Ht(X, H)
    HHt = H @ H.T
    return W, H, XHt, HHt, int(dead.size)


def _hals_w_step(W, XHt, HHt, *, n_sweeps=1, l1=0.0, l2=0.0, n_fixed=0):
    """The W block of :func:`_hals_iteration`: ``n_sweeps`` exact coordinate-descent sweeps, on a copy.

    Rows are independent, so a block of rows (with its rows of ``XHt``) is updated exactly as
    within the whole W; the chunked fit calls this per row chunk.

    Parameters
    ----------
    W : ndarray of shape (n_samples, k)
    XHt : ndarray of shape (n_samples, k)
        ``X @ H.T`` for the current ``H``.
    HHt : ndarray of shape (k, k)
    n_sweeps : int
    l1, l2 : float
        Usage penalties (see :func:`_hals_iteration`).
    n_fixed : int
        The last ``n_fixed`` columns are known covariates, left unchanged.

    Returns
    -------
    W : ndarray of shape (n_samples, k), float64, a new array
    """
    W = np.array(W, dtype=np.float64, order="C", copy=True)
    # the penalised block is the plain one with shifted terms: b - l1 and Q + l2 I
    Q = HHt + l2 * np.eye(len(HHt))
    fixed = np.arange(W.shape[1] - n_fixed, W.shape[1])
    Q[fixed, fixed] = 0.0  # the kernel leaves a column with a zero diagonal unchanged
    _kernels.coordinate_descent_rows(W, np.ascontiguousarray(XHt - l1), np.ascontiguousarray(Q), n_sweeps, 0.0)
    return W


#: solver name -> one-iteration function ``(X, W, H, XHt, HHt, rng) -> (W, H, XHt, HHt, n_reseeded)``.
_SOLVERS = {"hals": _hals_iteration, "mu": _mu_iteration}


def _dead_components(W):
    """Indices of all-zero columns of ``W`` (shape (n_samples, k)); 1-D int array."""
    return np.flatnonzero(~np.any(W > 0, axis=0))


def _warn_dead(dead, already, iteration):
    """Warn (RuntimeWarning) once per newly dead component; update ``already``."""
    for j in dead:
        j = int(j)
        if j in already:
            continue
        already.add(j)
        where = "in the initial W" if iteration == 0 else f"at iteration {iteration}"
        warnings.warn(
            f"SemiNMF: component {j} is dead {where}: its usage column W[:, {j}] "
            "is all zeros, so it contributes nothing to the fit (its row of H is "
            "set to zero). Consider a smaller n_components or another random_state.",
            RuntimeWarning,
            stacklevel=4,
        )


#: Iterations over which the relative objective decrease is compared with ``tol``, per solver.
#: HALS minimises each block exactly, so the objective falls every iteration and one iteration
#: tells whether the next pays; multiplicative updates cross plateaus (saddle regions) where a
#: single step changes the objective by less than 1e-4 before they speed up again, so MU is judged
#: over 10 iterations.
_CONVERGENCE_WINDOW = {"hals": 1, "mu": 10}
#: Fewest iterations before the stopping rule may stop a fit.
_MIN_ITER = 3


def _stopping_rule(trace, initial_objective, tol, solver="hals"):
    """The fit's stopping rule, shared by :func:`_fit_loop` and the chunked fit.

    ``(f[t - w] - f[t]) / f[t - w] < tol`` with ``w = _CONVERGENCE_WINDOW[solver]`` (the initial
    objective stands in for ``f[t - w]`` in the first ``w`` iterations), once at least
    ``max(w, _MIN_ITER)`` iterations have run.

    Parameters
    ----------
    trace : sequence of float
        Objective after each iteration so far (``trace[-1]`` is the current one).
    initial_objective : float
    tol : float
    solver : {"hals", "mu"}

    Returns
    -------
    rel_change : float
        The relative decrease over the window.
    stop : bool
    """
    window = _CONVERGENCE_WINDOW[solver]
    reference = trace[-1 - window] if len(trace) > window else initial_objective
    rel_change = (reference - trace[-1]) / max(reference, _TINY)
    return rel_change, bool(rel_change < tol and len(trace) >= max(window, _MIN_ITER))


def _fit_loop(X, W, H, *, solver, max_iter, tol, rng, verbose=0, nonnegative_h=False, l1=0.0, l2=0.0, n_fixed=0):
    """Iterate a solver until the relative objective decrease is below ``tol``.

    The decrease is measured by :func:`_stopping_rule`: over the last iteration for HALS, over
    the last 10 for the multiplicative rule (which crosses plateaus).

    Parameters
    ----------
    X : ndarray or sparse CSR matrix of shape (n_samples, n_features), float64
    W : ndarray of shape (n_samples, k)
        Initial usage.
    H : ndarray of shape (k, n_features)
        Initial loadings (least squares for ``W``).
    solver : str
        Key of ``_SOLVERS``.
    max_iter : int
    tol : float
    rng : numpy.random.Generator
        For re-seeding dead components (hals).
    verbose : int
    nonnegative_h : bool
        NMF (``H >= 0``); only with ``solver="hals"``.
    l1, l2 : float
        Usage penalties (``solver="hals"``); the objective traced includes them.
    n_fixed : int
        Known covariate columns at the end of W, never updated (``solver="hals"``).

    Returns
    -------
    W : ndarray of shape (n_samples, k)
    H : ndarray of shape (k, n_features)
    n_iter : int
    initial_objective : float
    objective : ndarray of shape (n_iter,)
    converged : bool
    rel_change : float
        Last relative objective change.
    n_reseeded : int
        Dead components re-seeded during the fit.
    """
    step = _SOLVERS[solver]
    if solver == "hals":  # counting X's non-zeros is a pass over X: once per fit, not per iteration
        step = functools.partial(step, n_sweeps=_hals_inner_sweeps(X, W.shape[1]), nonnegative_h=nonnegative_h,
                                 l1=l1, l2=l2, n_fixed=n_fixed)
    n_free = W.shape[1] - n_fixed
    norm_X_sq = _squared_norm(X)
    XHt = _safe_X_Ht(X, H)
    HHt = H @ H.T

    def penalty(W):
        W = W[:, :n_free]
        return l1 * float(W.sum()) + 0.5 * l2 * float(np.sum(W * W)) if (l1 or l2) else 0.0

    f_prev = _objective(X, W, H, norm_X_sq=norm_X_sq, XHt=XHt, HHt=HHt) + penalty(W)
    initial_objective = f_prev
    trace = []
    dead_warned: set[int] = set()
    _warn_dead(_dead_components(W[:, :n_free]), dead_warned, 0)
    converged = False
    rel_change = np.inf
    n_reseeded = 0
    start_time = time.time()
    for it in range(1, max_iter + 1):
        W, H, XHt, HHt, reseeded = step(X, W, H, XHt, HHt, rng)
        n_reseeded += reseeded
        f = _objective(X, W, H, norm_X_sq=norm_X_sq, XHt=XHt, HHt=HHt) + penalty(W)
        trace.append(f)
        _warn_dead(_dead_components(W[:, :n_free]), dead_warned, it)
        rel_change, stop = _stopping_rule(trace, initial_objective, tol, solver)
        if verbose and (it % 10 == 0 or it == 1):
            print(
                f"SemiNMF iteration {it:5d}: objective {f:.6e}, relative change "
                f"{rel_change:.3e} ({time.time() - start_time:.2f} s)"
            )
        f_prev = f
        if stop:
            converged = True
            break
    n_iter = it
    if verbose:
        status = "converged" if converged else "stopped at max_iter"
        print(f"SemiNMF {status} after {n_iter} iterations, objective {f_prev:.6e}")
    return W, H, n_iter, initial_objective, np.asarray(trace, dtype=np.float64), converged, rel_change, n_reseeded


def _nnls_rows_cd(B, Q, *, max_sweeps=_TRANSFORM_MAX_SWEEPS, tol=_TRANSFORM_TOL):
    """Row-wise non-negative least squares by exact cyclic coordinate descent.

    Minimises ``0.5 * w Q w^T - w b^T`` over ``w >= 0`` for every row (which
    equals ``0.5 * ||x - w H||^2`` up to a constant when ``Q = H H^T`` and
    ``b = x H^T``); rows run in parallel in a compiled kernel, each until it is stable.
    A program with ``Q_cc <= eps max(diag Q)`` (zero loadings, or loadings at rounding
    level) gets usage 0.

    Parameters
    ----------
    B : ndarray of shape (n_samples, k)
        ``X @ H.T``.
    Q : ndarray of shape (k, k)
        ``H @ H.T`` (symmetric positive semi-definite).
    max_sweeps : int
    tol : float
        A row stops when a full sweep changes it by at most ``tol`` times its norm.

    Returns
    -------
    W : ndarray of shape (n_samples, k)
        Non-negative solution.
    n_sweeps : int
        The most sweeps any row needed.
    converged : bool
        Every row meets the optimality (KKT) conditions, those that coordinate descent left
        short of them solved exactly (:func:`_nnls_rows_exact`).
    """
    # Warm start: unconstrained least squares, clipped at zero.
    Z, _, _, _ = scipy.linalg.lstsq(Q, B.T, check_finite=False, lapack_driver="gelsd")
    W = np.ascontiguousarray(np.maximum(Z.T, 0.0))
    B = np.ascontiguousarray(B, dtype=np.float64)
    Q = np.ascontiguousarray(Q, dtype=np.float64)
    # Programs whose loadings are zero or at rounding level (see _kernels.NEGLIGIBLE_LOADING)
    # get no usage: any other value would be noise divided by noise.
    diag = np.diag(Q)
    active = np.flatnonzero(diag > diag.max(initial=0.0) * _kernels.NEGLIGIBLE_LOADING)
    W[:, np.setdiff1d(np.arange(Q.shape[0]), active)] = 0.0
    n_sweeps = int(_kernels.coordinate_descent_rows(W, B, Q, max_sweeps, tol))
    if active.size == 0:
        return W, n_sweeps, True
    # Coordinate descent crawls when Q is (nearly) singular, e.g. more programs than the rank
    # of the data, and its step test can stop it early there: solve the rows it left short of
    # the KKT conditions exactly (none in well-conditioned problems; the check costs n k^2).
    if active.size == Q.shape[0]:
        return W, n_sweeps, _nnls_rows_exact(W, B, Q, _kkt_violators(W, B, Q))
    W_a, B_a, Q_a = np.ascontiguousarray(W[:, active]), B[:, active], Q[np.ix_(active, active)]
    converged = _nnls_rows_exact(W_a, B_a, Q_a, _kkt_violators(W_a, B_a, Q_a))
    W[:, active] = W_a
    return W, n_sweeps, converged


#: Relative tolerance of the KKT conditions checked by :func:`_kkt_violators`.
_KKT_RTOL = 1e-9


def _kkt_violators(W, B, Q, rtol=_KKT_RTOL):
    """Rows of ``W`` that miss the KKT conditions of ``min_{w >= 0} 0.5 w Q w^T - w b^T``.

    The gradient ``g = w Q - b`` must be ``>= 0`` everywhere and ``0`` where ``w > 0``, up to
    ``rtol`` times the row's scale ``max|b| + max|w| max|Q|``. Returns their indices.
    """
    G = W @ Q - B
    violation = np.where(W > 0, np.abs(G), np.maximum(-G, 0.0)).max(axis=1, initial=0.0)
    scale = np.abs(B).max(axis=1, initial=0.0) + np.abs(W).max(axis=1, initial=0.0) * np.abs(Q).max(initial=0.0)
    return np.flatnonzero(violation > rtol * scale)


def _nnls_rows_exact(W, B, Q, rows):
    """Solve the given rows of the Gram-form NNLS exactly (active set), in place.

    With ``Q = V diag(s) V^T`` (its range), ``A = diag(sqrt(s)) V^T`` and ``y = b V / sqrt(s)``,
    ``||y - A w^T||^2 = w Q w^T - 2 w b^T + const`` for every ``b`` in the range of ``Q`` (so for
    ``b = x H^T``, ``Q = H H^T``), which :func:`scipy.optimize.nnls` solves exactly. A row keeps
    its coordinate-descent value unless the exact one meets the KKT conditions or has a lower
    objective.

    Returns
    -------
    bool
        The rows now meet the KKT conditions (for ``b``'s part in the range of ``Q``).
    """
    if rows.size == 0:
        return True
    s, V = np.linalg.eigh(Q)
    keep = s > max(float(s.max(initial=0.0)), 0.0) * Q.shape[0] * np.finfo(np.float64).eps
    if not keep.any():  # Q = 0: every w is optimal
        return True
    A = np.sqrt(s[keep])[:, None] * V[:, keep].T
    Y = (B[rows] @ V[:, keep]) / np.sqrt(s[keep])
    # KKT judged on b's part in the range of Q: no w can match the rest (e.g. the rounding of
    # a float32 X H^T), which would otherwise leave a gradient along Q's null space
    B_range = (B[rows] @ V[:, keep]) @ V[:, keep].T

    def objective(w, b):
        return 0.5 * w @ Q @ w - w @ b

    for i, (row, y) in enumerate(zip(rows, Y)):
        try:
            w, _ = scipy.optimize.nnls(A, y, maxiter=50 * Q.shape[0])
        except RuntimeError:  # iteration limit (older scipy raise): keep coordinate descent's value
            continue
        w = np.maximum(w, 0.0)
        if not np.all(np.isfinite(w)):
            continue
        optimal = _kkt_violators(w[None], B_range[i : i + 1], Q).size == 0
        if optimal or objective(w, B[row]) <= objective(W[row], B[row]):
            W[row] = w
    return _kkt_violators(W[rows], B_range, Q).size == 0


# --------------------------------------------------------------------------
# Input checks (the estimator's _validate_X)
# --------------------------------------------------------------------------
def _check_shape_and_kinds(X):
    """Refuse an X that is not 2-D, is empty or is complex, before any conversion.

    Parameters
    ----------
    X : array-like, sparse matrix or DataFrame

    Returns
    -------
    set of str
        The dtype kinds of X's values (one per column of a DataFrame), e.g. ``{"f"}``.
    """
    if sp.issparse(X) or (hasattr(X, "shape") and hasattr(X, "dtypes")):
        array = None
        shape = tuple(X.shape)
    else:
        array = np.asarray(X)
        shape = array.shape
    if len(shape) != 2:
        raise ValueError(
            "X must be a 2-D array of shape (n_samples, n_features); got "
            f"{len(shape)}-D input of shape {shape}. Reshape your data: use "
            "X.reshape(1, -1) for a single sample or X.reshape(-1, 1) for a "
            "single feature."
        )
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(
            f"X is empty: found array with {shape[0]} sample(s) and {shape[1]} "
            f"feature(s) (shape={shape}) while a minimum of 1 is required; X "
            "needs at least one sample (row) and one feature (column)."
        )
    if array is not None:
        kinds = {array.dtype.kind}
    elif sp.issparse(X):
        kinds = {X.dtype.kind}
    else:  # DataFrame
        kinds = {getattr(dt, "kind", "O") for dt in X.dtypes}
    if "c" in kinds:
        raise ValueError(
            "X must be real-valued: Complex data not supported by SemiNMF."
        )
    return kinds


def _canonical_csr(X, dtype):
    """A sparse X as CSR without duplicate entries (they would count twice in ``||X||``), values in ``dtype``."""
    X = X.tocsr()
    if not X.has_canonical_format:
        X = X.copy()
        X.sum_duplicates()
    if X.dtype != dtype:  # convert the values only; indices are shared
        X = sp.csr_matrix((X.data.astype(dtype), X.indices, X.indptr), shape=X.shape, copy=False)
    return X


# --------------------------------------------------------------------------
# Estimator
# --------------------------------------------------------------------------
class SemiNMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Semi-non-negative matrix factorisation ``X ~= W H`` with ``W >= 0``.

    ``X`` (cells x genes) can have any sign; the usage ``W`` is non-negative
    and the loadings ``H`` (``components_``) are unconstrained.  The objective
    ``0.5 * ||X - W H||_F ** 2`` is minimised with the alternating scheme of
    Ding, Li & Jordan (2010, IEEE TPAMI 32(1):45-55).

    Parameters
    ----------
    n_components : int, default=10
        Number of programs ``k``; ``1 <= k < min(n_samples, n_features)``.
    solver : {"hals", "mu"}, default="hals"
        ``"hals"``: block coordinate descent — exact least-squares H step and
        HALS (exact coordinate descent) W step with several W sweeps per pass
        over X (Gillis & Kumar 2015; Gillis & Glineur 2012); dead components are
        re-seeded. ``"mu"``: least-squares H step + the Ding-Li-Jordan
        multiplicative W step, the rule of the original analysis.
    init : {"auto", "random", "subsample", "svd", "custom"}, default="auto"
        ``"auto"``: ``"subsample"`` from ``SUBSAMPLE_START_MIN_CELLS`` (50,000) cells on,
        else ``"random"``.
        ``"random"``: ``W`` uniform on (0, 1] scaled by ``sqrt(mean|X| / k)`` (as
        the original analysis; with HALS it reaches a given objective sooner than
        the SVD start on 100,000 × 2,000 cells × genes, see benchmarks/);
        ``"subsample"``: the programs of a fit (random start) on a random tenth of the
        cells (at least 10,000), every cell's usage for them by clipped least squares —
        fewer passes over all cells (see :func:`_subsample_start`);
        ``"svd"``: the Gillis & Kumar (2015) start from a randomized rank-(k-1)
        SVD (never worse than that SVD, deterministic up to the SVD's sketch);
        ``"custom"``: use the ``W`` passed to :meth:`fit_transform`.  The first
        ``H`` is always the least-squares ``H`` for the initial ``W`` (a custom
        ``H`` is validated but not used).
    max_iter : int, default=500
        Maximum number of iterations (one iteration = one H step + one W step).
    tol : float, default=1e-4
        Stop when the objective ``f`` decreased by less than ``tol`` (relative) in the
        last iteration (``"hals"``: each block is minimised exactly, so the objective
        falls every iteration) or over the last 10 (``"mu"``, which crosses plateaus):
        ``(f[t-w] - f[t]) / f[t-w] < tol``, after at least 3 iterations.
    dtype : {"auto", "float32", "float64"}, default="auto"
        Precision in which X is read: ``"auto"`` reads a sparse X as float32 for
        ``"hals"`` (half the memory traffic; products and objective accumulate in
        float64) and float64 for ``"mu"`` (as the original analysis), converting
        only its values (never densified), and uses a dense float X as it is
        (other dense X, e.g. integers, is converted to the solver's dtype, as a
        sparse X).
    alpha_W : float, default=0.0
        Strength of the penalty on the usage W (as scikit-learn's ``NMF``): the objective
        gains ``alpha_W * n_features * (l1_ratio * sum(W) + (1 - l1_ratio) / 2 * ||W||^2)``;
        with a penalty the programs are kept at unit L2 norm. Off by default; ``"hals"``
        only. ``transform`` fits usage without the penalty.
    l1_ratio : float, default=0.0
        Share of the penalty that is L1 (sparse usage), in [0, 1].
    random_state : int, numpy.random.Generator, RandomState or None, default=None
        Seed of the initialisation and of re-seeded components.
    verbose : int, default=0
        Print the objective every 10 iterations when > 0.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        Loadings ``H``.
    n_components_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Only when ``X`` was a DataFrame with string column names.
    n_iter_ : int
        Number of iterations run.
    reconstruction_err_ : float
        ``||X - W H||_F`` at the end of fitting (computed exactly).
    initial_objective_ : float
        ``0.5 * ||X - W0 H0||_F ** 2`` for the initial factors.
    objective_ : ndarray of shape (n_iter_,)
        Objective ``0.5 * ||X - W H||_F ** 2`` after every iteration.
    converged_ : bool
        True when fitting stopped because of ``tol``.
    n_reseeded_ : int
        Dead components (all-zero usage) re-seeded during fitting (``"hals"``).

    References
    ----------
    C. Ding, T. Li and M. I. Jordan, "Convex and Semi-Nonnegative Matrix
    Factorizations", IEEE TPAMI 32(1):45-55, 2010.
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "solver": [StrOptions(set(_SOLVERS))],
        "init": [StrOptions({"auto", "random", "subsample", "svd", "custom"})],
        "dtype": [StrOptions({"auto", "float32", "float64"})],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "alpha_W": [Interval(Real, 0, None, closed="left")],
        "l1_ratio": [Interval(Real, 0, 1, closed="both")],
        "random_state": ["random_state", np.random.Generator],
        "verbose": ["verbose"],
    }

    #: NMF sets this: loadings constrained to H >= 0.
    _nonnegative_components = False

    def __init__(
        self,
        n_components=10,
        *,
        solver="hals",
        init="auto",
        max_iter=500,
        tol=1e-4,
        dtype="auto",
        alpha_W=0.0,
        l1_ratio=0.0,
        random_state=None,
        verbose=0,
    ):
        self.n_components = n_components
        self.solver = solver
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.dtype = dtype
        self.alpha_W = alpha_W
        self.l1_ratio = l1_ratio
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------
    def _fit_dtype(self):
        if self.dtype != "auto":
            return np.dtype(self.dtype)
        return np.dtype(np.float32 if self.solver == "hals" else np.float64)

    def _validate_X(self, X, *, reset):
        """Validate ``X``; return it dense or CSR in the fitting dtype (values converted only)."""
        kinds = _check_shape_and_kinds(X)
        dtype = self._fit_dtype()
        try:
            X = validate_data(
                self,
                X,
                accept_sparse=("csr", "csc"),
                # float data keeps its precision; integers etc. go straight to the fitting dtype
                # (not through float32, which rounds integers above 2**24)
                dtype=(np.float32, np.float64) if kinds == {"f"} else dtype,
                ensure_all_finite=False,
                reset=reset,
            )
        except (ValueError, TypeError) as exc:
            if kinds <= set("biuf"):
                raise
            raise type(exc)(f"X must contain only numeric values: {exc}") from exc
        if sp.issparse(X):
            X = _canonical_csr(X, dtype)
            values = X.data
        else:
            if self.dtype != "auto":  # "auto" uses a dense float array as it is: no copy
                X = X.astype(dtype, copy=False)
            values = X
        if not np.all(np.isfinite(values)):
            n_nan = int(np.count_nonzero(np.isnan(values)))
            n_inf = int(np.count_nonzero(np.isinf(values)))
            raise ValueError(
                f"X contains NaN or infinite values ({n_nan} NaN, {n_inf} infinite); "
                "remove or impute them before using SemiNMF."
            )
        return X

    def _check_sign(self, X):
        """Any sign is allowed (NMF overrides this)."""

    def _check_n_components(self, X):
        n_samples, n_features = X.shape
        limit = min(n_samples, n_features)
        if limit < 2:
            raise ValueError(
                f"X has shape ({n_samples}, {n_features}) ({n_samples} sample(s), "
                f"{n_features} feature(s)); SemiNMF needs at least 2 samples and 2 "
                "features because n_components must be < min(n_samples, n_features)."
            )
        if self.n_components >= limit:
            raise ValueError(
                f"n_components={self.n_components} must be smaller than "
                f"min(n_samples, n_features) = min({n_samples}, {n_features}) = {limit}; "
                f"set n_components to at most {limit - 1} or provide more "
                f"{'samples' if n_samples <= n_features else 'features'}."
            )

    def _check_custom_init(self, X, W, H):
        n_samples, n_features = X.shape
        k = self.n_components
        if W is None:
            raise ValueError(
                "init='custom' requires an initial W: call fit_transform(X, W=W0) "
                f"with W0 of shape (n_samples, n_components) = ({n_samples}, {k})."
            )
        W = np.asarray(W, dtype=np.float64)
        if W.shape != (n_samples, k):
            raise ValueError(
                f"The custom initial W has shape {W.shape}; expected "
                f"(n_samples, n_components) = ({n_samples}, {k})."
            )
        if not np.all(np.isfinite(W)):
            raise ValueError("The custom initial W contains NaN or infinite values.")
        if np.any(W < 0):
            raise ValueError("The custom initial W must be non-negative (W >= 0).")
        if H is not None:
            H = np.asarray(H, dtype=np.float64)
            if H.shape != (k, n_features):
                raise ValueError(
                    f"The custom initial H has shape {H.shape}; expected "
                    f"(n_components, n_features) = ({k}, {n_features})."
                )
            if not np.all(np.isfinite(H)):
                raise ValueError("The custom initial H contains NaN or infinite values.")
        return W, H

    # ------------------------------------------------------------------
    @_fit_context(prefer_skip_nested_validation=True)
    def fit_transform(self, X, y=None, W=None, H=None, covariates=None):
        """Fit the model and return the usage ``W`` of the training cells.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
            Data of any sign; sparse input is never densified as a whole.
        y : Ignored
        W : array-like of shape (n_samples, n_components), optional
            Initial usage for ``init="custom"`` (non-negative).
        H : array-like of shape (n_components, n_features), optional
            Initial loadings for ``init="custom"``; validated but not used by
            ``solver="mu"``, which starts with the least-squares H step.
        covariates : array-like of shape (n_samples, n_covariates), optional
            Known, fixed usage (``solver="hals"``): e.g. one indicator column per batch, so
            that each batch's baseline expression has its own loadings
            (``covariate_components_``) instead of taking programs. ``transform`` then needs
            the covariates of the new cells.

        Returns
        -------
        W : ndarray of shape (n_samples, n_components)
            Non-negative usage of the programs (covariates excluded).
        """
        X = self._validate_X(X, reset=True)
        self._check_n_components(X)
        self._check_sign(X)
        if self.alpha_W and self.solver != "hals":
            raise ValueError(f"alpha_W > 0 needs solver='hals' (got solver={self.solver!r}).")
        Z = self._check_covariates(X, covariates)
        if Z is not None and self.solver != "hals":
            raise ValueError(f"covariates need solver='hals' (got solver={self.solver!r}).")
        init = self.init
        if init == "auto":
            init = "subsample" if X.shape[0] >= SUBSAMPLE_START_MIN_CELLS else "random"
        if init == "custom":
            W, H = self._check_custom_init(X, W, H)
        elif W is not None or H is not None:
            warnings.warn(
                f"init={self.init!r}: the W/H passed to fit_transform are ignored; "
                "set init='custom' to use them as the initialisation.",
                RuntimeWarning,
                stacklevel=2,
            )
        # With a sparse X the compiled kernels do the heavy work on all cores; the BLAS calls
        # left are k x k, and idle BLAS threads spinning beside the kernels' threads cost ~30 %.
        with threadpool_limits(1 if sp.issparse(X) else None, user_api="blas"):
            if init == "subsample":
                init, W = "custom", _subsample_start(self, X, Z, self.random_state)
            W0, H0 = _initialize(X, self.n_components, init, self.random_state, W=W, H=H,
                                 nonnegative_h=self._nonnegative_components, covariates=Z)
            W, H, n_iter, f0, trace, converged, rel_change, n_reseeded = _fit_loop(
                X, W0, H0, solver=self.solver, max_iter=self.max_iter, tol=self.tol,
                rng=_reseed_rng(self.random_state), verbose=self.verbose,
                nonnegative_h=self._nonnegative_components,
                l1=self.alpha_W * self.l1_ratio * X.shape[1], l2=self.alpha_W * (1.0 - self.l1_ratio) * X.shape[1],
                n_fixed=0 if Z is None else Z.shape[1],
            )
        if not converged:
            warnings.warn(
                f"{type(self).__name__} did not converge within max_iter={self.max_iter} iterations "
                f"(last relative objective change {rel_change:.3e} >= tol={self.tol:g}); "
                "increase max_iter or tol.",
                ConvergenceWarning,
                stacklevel=2,
            )
        k = self.n_components
        self.components_ = H[:k]
        self.covariate_components_ = H[k:]
        self.n_components_ = k
        self.n_iter_ = n_iter
        self.initial_objective_ = f0
        self.objective_ = trace
        self.converged_ = bool(converged)
        self.n_reseeded_ = n_reseeded
        if X.shape[0] * X.shape[1] <= _EXACT_RESIDUAL_MAX_ELEMENTS:
            self.reconstruction_err_ = _residual_norm(X, W, H)
        else:  # the Gram form costs nothing more; its cancellation is harmless at real-data error levels
            self.reconstruction_err_ = float(np.sqrt(2.0 * trace[-1]))
        return W[:, :k]

    def _check_covariates(self, X, covariates):
        """None, or the covariates as a finite, non-negative float64 array of shape (n_samples, b)."""
        if covariates is None:
            return None
        Z = np.asarray(covariates, dtype=np.float64)
        if Z.ndim != 2 or Z.shape[0] != X.shape[0] or Z.shape[1] == 0:
            raise ValueError(f"covariates must have shape (n_samples = {X.shape[0]}, n_covariates >= 1); got {Z.shape}.")
        if not np.all(np.isfinite(Z)) or np.any(Z < 0):
            raise ValueError("covariates must be finite and non-negative (e.g. batch indicator columns).")
        return np.ascontiguousarray(Z)

    def fit(self, X, y=None, **params):
        """Fit the model.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
        y : Ignored
        **params
            Passed to :meth:`fit_transform` (``W``, ``H`` for ``init="custom"``).

        Returns
        -------
        self : SemiNMF
        """
        self.fit_transform(X, **params)
        return self

    def transform(self, X, covariates=None):
        """Usage of (new) cells for the fitted components.

        Solves ``min_{W >= 0} ||X - W H||_F`` with ``H = components_`` fixed
        (a non-negative least-squares problem per row) by exact cyclic
        coordinate descent, vectorised over rows; rows it leaves short of the
        optimality (KKT) conditions, as happens when the programs are nearly
        collinear, are then solved exactly by an active-set method.  A program
        whose loadings are zero, or at rounding level (squared norm at most
        float64 eps times the largest), gets usage 0.  Sparse ``X`` is not
        densified.

        Parameters
        ----------
        X : array-like or sparse matrix of shape (n_samples, n_features)
        covariates : array-like of shape (n_samples, n_covariates)
            Needed when the model was fitted with covariates: their part of the fit is held fixed.

        Returns
        -------
        W : ndarray of shape (n_samples, n_components)
            Non-negative usage.
        """
        check_is_fitted(self)
        X = self._validate_X(X, reset=False)
        H = self.components_
        H_cov = getattr(self, "covariate_components_", np.zeros((0, H.shape[1])))
        if len(H_cov) and covariates is None:
            raise ValueError(f"This model was fitted with {len(H_cov)} covariates: pass covariates= for the new cells.")
        B = _safe_X_Ht(X, H)
        if len(H_cov):
            Z = self._check_covariates(X, covariates)
            if Z.shape[1] != len(H_cov):
                raise ValueError(f"covariates must have {len(H_cov)} columns, as in fit; got {Z.shape[1]}.")
            B -= Z @ (H_cov @ H.T)
        W, n_sweeps, converged = _nnls_rows_cd(B, H @ H.T)
        if not converged:
            warnings.warn(
                f"{type(self).__name__}.transform: the non-negative least-squares solver did not "
                f"converge within {n_sweeps} sweeps; the usage may be inaccurate.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return W

    def inverse_transform(self, W):
        """Reconstruct data from usage: ``W @ components_``.

        Parameters
        ----------
        W : array-like of shape (n_samples, n_components)

        Returns
        -------
        X_hat : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        W = np.asarray(W, dtype=np.float64)
        if W.ndim != 2 or W.shape[1] != self.components_.shape[0]:
            raise ValueError(
                f"W must have shape (n_samples, n_components={self.components_.shape[0]}); "
                f"got {W.shape}."
            )
        return W @ self.components_

    @property
    def _n_features_out(self):
        """Number of transformed output features (``n_components_``)."""
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        tags.transformer_tags.preserves_dtype = ["float64"]
        return tags


class NMF(SemiNMF):
    """Non-negative matrix factorisation ``X ~= W H`` with ``W >= 0`` and ``H >= 0``.

    The identifiable sibling of :class:`SemiNMF`: with signed loadings any ``W Q``,
    ``Q^-1 H`` with ``W Q >= 0`` fits equally well, so semi-NMF programs come out as blends of
    the real ones; non-negative loadings pin them down (Fu, Huang & Sidiropoulos 2018).
    ``X`` must be non-negative (e.g. log-normalised expression). Fitted by the same driver as
    :class:`SemiNMF` with ``solver="hals"``: HALS sweeps on W, then HALS sweeps on H
    (Cichocki & Phan 2009, scikit-learn's ``solver="cd"``), several per pass over X. All
    parameters and attributes are those of :class:`SemiNMF` (only ``solver="hals"``);
    ``components_`` is non-negative.

    A program cannot lower genes in this model: genes that fall as a program rises are read
    from the signed regression of expression on usage (:func:`perturbnmf.tl.gene_scores`).
    """

    _parameter_constraints: dict = {**SemiNMF._parameter_constraints, "solver": [StrOptions({"hals"})]}
    _nonnegative_components = True

    def _check_sign(self, X):
        values = X.data if sp.issparse(X) else X
        if values.size and float(values.min()) < 0:
            raise ValueError(
                f"NMF needs a non-negative X (its minimum is {float(values.min()):.3g}): use log-normalised "
                "expression without centring, or SemiNMF for data of any sign."
            )
