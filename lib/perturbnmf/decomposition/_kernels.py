"""Compiled kernels for semi-NMF: the products with a sparse X and the HALS W sweeps.

The two products with X (``X Hᵀ`` and ``Wᵀ X``) cost ``nnz(X)·k`` each and dominate every
iteration; scipy runs them on one thread. These numba kernels use all threads and
accumulate in float64 whatever X's dtype (float32 halves the bytes read per pass).

Results do not depend on the number of threads: ``X Hᵀ`` is computed row by row, and
``Wᵀ X`` sums a fixed number of row blocks in a fixed order, so a restart gives the same
numbers in a parallel worker with one thread as serially with all cores.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: Fixed number of row blocks for ``Wᵀ X`` (independent of the thread count).
N_BLOCKS = 16
#: A loading row whose squared norm is at most this share of the largest one is treated as zero
#: (float64 epsilon: its norm is below 1.5e-8 of the largest, i.e. rounding noise of the H step).
NEGLIGIBLE_LOADING = np.finfo(np.float64).eps


@njit(parallel=True, cache=True)
def csr_times_dense_t(indptr, indices, data, Ht):  # pragma: no cover - compiled
    """``X @ H.T`` for CSR ``X`` (n × m) and ``Ht = H.T`` (m × k); returns (n × k) float64."""
    n = indptr.shape[0] - 1
    k = Ht.shape[1]
    out = np.zeros((n, k))
    for i in prange(n):
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            v = np.float64(data[p])
            for c in range(k):
                out[i, c] += v * Ht[j, c]
    return out


@njit(parallel=True, cache=True)
def csr_t_times_dense(indptr, indices, data, W, n_features):  # pragma: no cover - compiled
    """``W.T @ X`` for CSR ``X`` (n × m) and ``W`` (n × k); returns (k × m) float64."""
    n = indptr.shape[0] - 1
    k = W.shape[1]
    block = (n + N_BLOCKS - 1) // N_BLOCKS
    partial = np.zeros((N_BLOCKS, n_features, k))
    for b in prange(N_BLOCKS):
        stop = min(n, (b + 1) * block)
        for i in range(b * block, stop):
            for p in range(indptr[i], indptr[i + 1]):
                j = indices[p]
                v = np.float64(data[p])
                for c in range(k):
                    partial[b, j, c] += v * W[i, c]
    total = np.zeros((k, n_features))
    for b in range(N_BLOCKS):
        for j in range(n_features):
            for c in range(k):
                total[c, j] += partial[b, j, c]
    return total


@njit(parallel=True, cache=True)
def coordinate_descent_rows(W, XHt, HHt, max_sweeps, tol):  # pragma: no cover - compiled
    """Exact coordinate descent on ``min_{W ≥ 0} ½‖X − W H‖²`` for fixed H, in place.

    Rows are independent; each runs up to ``max_sweeps`` passes over its k entries,
    ``w_ic ← max(0, w_ic − g_c / HHt_cc)`` with the row's gradient ``g = w HHt − XHt_i`` kept
    up to date in O(k) per changed entry (entries held at zero cost nothing), and stops
    early when a sweep changes it by at most ``tol`` times its norm (``tol = 0``: only when
    nothing changes). A component with ``HHt_cc <= eps · max(diag(HHt))`` (a zero row of H, or
    one at rounding level, whose update would divide noise by noise) is left unchanged.
    HALS runs a few sweeps per pass over X; ``transform`` runs to tolerance.

    Returns
    -------
    int
        The most sweeps any row used.
    """
    n, k = W.shape
    used = np.zeros(n, dtype=np.int64)
    d_max = 0.0
    for c in range(k):
        d_max = max(d_max, HHt[c, c])
    d_min = d_max * NEGLIGIBLE_LOADING
    for i in prange(n):
        g = np.empty(k)
        for c in range(k):
            acc = -XHt[i, c]
            for l in range(k):
                acc += W[i, l] * HHt[l, c]
            g[c] = acc
        for sweep in range(max_sweeps):
            change = 0.0
            for c in range(k):
                d = HHt[c, c]
                if d <= d_min:
                    continue
                new = W[i, c] - g[c] / d
                if new < 0.0:
                    new = 0.0
                delta = new - W[i, c]
                if delta != 0.0:
                    W[i, c] = new
                    change += delta * delta
                    for l in range(k):
                        g[l] += delta * HHt[c, l]
            used[i] = sweep + 1
            norm = 0.0
            for c in range(k):
                norm += W[i, c] * W[i, c]
            if change <= tol * tol * norm:
                break
    return used.max() if n > 0 else 0


@njit(parallel=True, cache=True)
def sum_of_squares(values):  # pragma: no cover - compiled
    """Σ v² in float64 over a 1-D array of any float dtype (fixed blocks: thread-count independent)."""
    n = values.shape[0]
    block = (n + N_BLOCKS - 1) // N_BLOCKS
    partial = np.zeros(N_BLOCKS)
    for b in prange(N_BLOCKS):
        acc = 0.0
        for i in range(b * block, min(n, (b + 1) * block)):
            v = np.float64(values[i])
            acc += v * v
        partial[b] = acc
    total = 0.0
    for b in range(N_BLOCKS):
        total += partial[b]
    return total
