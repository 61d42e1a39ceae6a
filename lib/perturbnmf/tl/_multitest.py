"""Multiple-testing correction shared by the statistics and the enrichment tests."""

from __future__ import annotations

import numpy as np

__all__ = ["benjamini_hochberg"]


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini-Hochberg q-values (step-up FDR adjustment).

    Parameters
    ----------
    pvalues : array-like, shape (m,)
        P-values in ``[0, 1]``.  ``NaN`` marks a test that could not be
        carried out: it stays ``NaN`` and does not count towards the number of
        tests.

    Returns
    -------
    numpy.ndarray, shape (m,), float
        q-values; on the non-NaN entries identical to
        ``statsmodels.stats.multitest.multipletests(p, method="fdr_bh")[1]``
        (``q_(i) = min_{j >= i} min(1, m p_(j) / j)`` over the sorted p-values).

    Raises
    ------
    ValueError
        If the input is not one-dimensional, not numeric, or has a value
        outside ``[0, 1]`` (infinite values included).
    """
    try:
        p = np.asarray(pvalues, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"benjamini_hochberg: p-values must be numeric ({exc})") from None
    if p.ndim != 1:
        raise ValueError(f"benjamini_hochberg: expected a 1-D array of p-values, got shape {p.shape}")
    ok = ~np.isnan(p)
    bad = ok & ((p < 0) | (p > 1))
    if bad.any():
        example = p[bad][:3].tolist()
        raise ValueError(
            f"benjamini_hochberg: {int(bad.sum())} p-value(s) outside [0, 1], e.g. {example}"
        )
    q = np.full(p.shape, np.nan)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv, kind="mergesort")
    # p / (j / m) rather than p * m / j: rounding then never puts q below p (j / m <= 1 exactly)
    ranked = pv[order] / (np.arange(1, m + 1) / m)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    np.minimum(ranked, 1.0, out=ranked)
    qv = np.empty(m)
    qv[order] = ranked
    q[ok] = qv
    return q
