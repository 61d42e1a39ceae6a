"""The omnibus test: does a program's usage differ between perturbation groups at all?

:func:`program_anova` runs one F-test per program (optionally adjusting for batch);
:func:`_anova_core` is that test for any grouping. The models are fitted from per-group and
per-batch sums, so thousands of perturbation groups cost no dense design matrix.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as _sps

from ._common import _as_labels, _as_usage, _group_sums
from ._multitest import benjamini_hochberg

__all__ = ["program_anova"]

ANOVA_COLUMNS = ["program", "F", "pvalue", "qvalue", "df_group", "df_resid", "eta_squared"]


def _renumbered(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Codes as ``0 .. levels - 1`` (a caller's codes may skip values) and the number of levels."""
    codes = np.unique(codes, return_inverse=True)[1]
    return codes, int(codes.max()) + 1 if codes.size else 0


def _fitted(Yc: np.ndarray, g_codes: np.ndarray, b_codes=None) -> tuple[np.ndarray, int]:
    """Least-squares fitted values of every column of ``Yc`` (centred) under ``C(group) [+ C(batch)]``,
    and the model's rank (intercept included).

    Solved from the groups' and batches' sums (the normal equations of the indicator design), never
    from the n × (groups + batches) design itself: the group block is diagonal, so it is eliminated
    and only the batches' Schur complement (batches × batches) is solved. Memory and time follow
    cells × programs, not cells × groups (a genome-wide screen has 10,000 groups).
    """
    g_codes, n_groups = _renumbered(g_codes)
    n_g, s_g = _group_sums(g_codes, n_groups, Yc)
    if b_codes is None:
        return (s_g / n_g[:, None])[g_codes], n_groups
    b_codes, n_batches = _renumbered(b_codes)
    n_b, s_b = _group_sums(b_codes, n_batches, Yc)
    crossed = np.bincount(g_codes * n_batches + b_codes, minlength=n_groups * n_batches)
    crossed = crossed.reshape(n_groups, n_batches)  # cells per (group, batch)
    schur = np.diag(n_b) - crossed.T @ (crossed / n_g[:, None])
    beta_b, _, rank_b, _ = np.linalg.lstsq(schur, s_b - crossed.T @ (s_g / n_g[:, None]), rcond=None)
    beta_g = (s_g - crossed @ beta_b) / n_g[:, None]
    return beta_g[g_codes] + beta_b[b_codes], n_groups + int(rank_b)


def _anova_core(Y: np.ndarray, g_codes: np.ndarray, b_codes=None):
    """Type II F-test of ``C(group)`` in ``y ~ C(group) [+ C(batch)]`` for every column of ``Y``.

    Parameters
    ----------
    Y : ndarray, shape (n, p)
    g_codes : ndarray of int, shape (n,)
        Group codes ``0 .. n_groups - 1``.
    b_codes : ndarray of int, shape (n,), optional
        Batch codes ``0 .. n_batches - 1``.

    Returns
    -------
    F, pvalue, eta_squared : ndarrays of shape (p,)
    df_group, df_resid : int
        See :func:`program_anova`.
    """
    n = Y.shape[0]
    # Both models contain the intercept: centring Y removes it exactly and
    # improves the conditioning of the least-squares problems.
    Yc = Y - Y.mean(axis=0)
    fit_full, rank_full = _fitted(Yc, g_codes, b_codes)
    if b_codes is None:
        fit_red, rank_red = np.zeros_like(Yc), 1  # centred data: intercept fit is 0
    else:
        fit_red, rank_red = _fitted(Yc, b_codes)

    ss_group = np.sum((fit_full - fit_red) ** 2, axis=0)
    ss_resid = np.sum((Yc - fit_full) ** 2, axis=0)
    # Sums of squares at rounding level (below 1e-20 of the total, i.e. fitted values within
    # 1e-10 of the data's spread) are exact zeros: usage explained exactly by batch would
    # otherwise give F = noise / noise and an arbitrary p-value.
    negligible = 1e-20 * np.sum(Yc**2, axis=0)
    ss_group = np.where(ss_group <= negligible, 0.0, ss_group)
    ss_resid = np.where(ss_resid <= negligible, 0.0, ss_resid)
    df_group = rank_full - rank_red
    df_resid = n - rank_full

    constant = np.ptp(Y, axis=0) == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = ss_group / (ss_group + ss_resid)
        if df_group > 0 and df_resid > 0:
            F = (ss_group / df_group) / (ss_resid / df_resid)
            pvalue = _sps.f.sf(F, df_group, df_resid)
        else:
            F = np.full(Y.shape[1], np.nan)
            pvalue = np.full(Y.shape[1], np.nan)
    F = np.where(constant, np.nan, F)
    pvalue = np.where(constant | np.isnan(F), np.nan, pvalue)
    eta = np.where(constant | (df_group == 0), np.nan, eta)
    return F, pvalue, eta, df_group, df_resid


def program_anova(usage: pd.DataFrame, groups, batch=None) -> pd.DataFrame:
    """One-way (or batch-adjusted) ANOVA of every program's usage on perturbation.

    For each program ``y`` (a column of ``usage``) this fits the OLS model
    ``y ~ C(group)`` or, with ``batch``, ``y ~ C(group) + C(batch)``, and tests
    the group term with type II sums of squares, i.e. against the reduced model
    ``y ~ 1`` / ``y ~ C(batch)``:

    * ``SS_group = RSS(reduced) - RSS(full)`` (computed as the squared norm of
      the difference of the fitted values, which is the same quantity without
      cancellation),
    * ``df_group = rank(X_full) - rank(X_reduced)``, ``df_resid = n - rank(X_full)``,
    * ``F = (SS_group / df_group) / (RSS(full) / df_resid)``.

    All programs are fitted at once (one least-squares solve per model).
    Degrees of freedom come from the matrix rank, so rank-deficient designs
    (a batch confounded with a group) are handled: the group term then only
    gets the degrees of freedom not already explained by batch.  For full-rank
    designs the result equals ``statsmodels`` ``anova_lm(ols("y ~ C(g) + C(b)"),
    typ=2)``; for rank-deficient designs it equals the nested-model comparison
    ``anova_lm(ols("y ~ C(b)"), ols("y ~ C(g) + C(b)"))`` (statsmodels' ``typ=2``
    table then reports a Wald test of non-identified coefficients instead).

    Parameters
    ----------
    usage : pandas.DataFrame, shape (n_cells, n_programs)
        Program usage per cell; no NaN/inf allowed.
    groups : pandas.Series or array-like, shape (n_cells,)
        Perturbation label of each cell; at least two distinct labels.  Groups
        with a single cell are allowed.
    batch : pandas.Series or array-like, shape (n_cells,), optional
        Batch label of each cell, added as a fixed effect.

    Returns
    -------
    pandas.DataFrame, shape (n_programs, 7)
        One row per program, in the column order of ``usage`` (not sorted),
        with columns ``program``, ``F``, ``pvalue``, ``qvalue`` (BH over the
        programs), ``df_group``, ``df_resid`` (ints) and ``eta_squared`` (partial
        eta squared, ``SS_group / (SS_group + SS_resid)``).  ``F``, ``pvalue``
        and ``eta_squared`` are NaN for a program with constant usage or with
        usage explained exactly by ``batch`` (no group and no residual sum of
        squares left), and ``F``/``pvalue`` are NaN when ``df_group`` or
        ``df_resid`` is 0.  Usage explained exactly by the groups (no residual,
        some group variance) gets ``F = inf``, ``pvalue = 0``.

    Raises
    ------
    ValueError
        Mismatched lengths, NaN in ``usage``/``groups``/``batch`` (the message
        names the input), or fewer than two groups.
    """
    usage = _as_usage(usage)
    g = _as_labels(groups, usage, "groups")
    b = None if batch is None else _as_labels(batch, usage, "batch")

    g_codes, g_levels = pd.factorize(g, sort=False)
    if len(g_levels) < 2:
        raise ValueError(
            f"groups: need at least 2 distinct groups for an ANOVA, found {len(g_levels)} "
            f"({list(map(str, g_levels))})"
        )
    Y = usage.to_numpy(dtype=float)
    b_codes = None if b is None else pd.factorize(b, sort=False)[0]
    F, pvalue, eta, df_group, df_resid = _anova_core(Y, g_codes, b_codes)

    return pd.DataFrame(
        {
            "program": np.asarray(usage.columns, dtype=object),
            "F": F,
            "pvalue": pvalue,
            "qvalue": benjamini_hochberg(pvalue),
            "df_group": np.full(Y.shape[1], df_group, dtype=int),
            "df_resid": np.full(Y.shape[1], df_resid, dtype=int),
            "eta_squared": eta,
        },
        columns=ANOVA_COLUMNS,
    )
