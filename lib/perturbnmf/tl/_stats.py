"""Perturbation statistics on gene-program usage.

Semi-NMF gives every cell a non-negative *usage* of every gene program (a
``cells x programs`` DataFrame, columns such as ``"P01"``).  This module tests
which programs respond to the perturbations:

* :func:`program_anova` -- one omnibus F-test per program: does usage differ
  between perturbation groups at all (optionally adjusting for batch)?
* :func:`program_contrasts` -- every perturbation against the control cells,
  per program (Welch t-test, batch-adjusted OLS, or a Mann-Whitney / van Elteren
  rank test; effect sizes).
* :func:`guide_effects` -- the same test for every guide of every perturbation
  against all control cells.
* :func:`add_consistency` -- replication columns for a contrasts table: do the
  guides of a target, and the batches, agree on the sign of its effect?
* :func:`control_null`, :func:`calibration_summary` -- the same contrast test on
  pseudo-perturbations of control cells only, and how its p-values behave.
* :func:`benjamini_hochberg` -- the FDR correction used by both (and by
  :mod:`perturbnmf.enrichment`).

Alignment of labels
-------------------
``groups``, ``guides`` and ``batch`` may be arrays (matched to the rows of
``usage`` by position) or :class:`pandas.Series`.  A Series whose index is not
identical to ``usage.index`` is re-ordered to it when both indexes hold the same
unique labels; otherwise a ``ValueError`` is raised (pass ``series.to_numpy()``
to match by position instead).  This avoids silently mis-assigning labels.

Choosing the contrast test
--------------------------
Usage is non-negative, skewed and zero-inflated.  In simulated screens of that
kind (``tests/test_stats_power.py``: 150 cells per perturbation, 40 % zeros) the
Welch and HC3 t-tests have uniform p-values in the bulk but ~1.8x too many below
3e-4, where BH decides the first discoveries (share of null screens with a false
discovery at q < 0.05: 0.09-0.11); the rank test (``method="mannwhitney"``) stays
calibrated there (0.06) at some loss of power for multiplicative effects, which
leave the zeros tied.  With ``batch``, ``"ols_batch"`` and the stratified rank
test protect against perturbations whose cells sit in another batch than the
controls; Welch and the unstratified rank test do not.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _sps

from ._multitest import benjamini_hochberg

__all__ = [
    "mark_primary",
    "benjamini_hochberg",
    "program_anova",
    "program_contrasts",
    "guide_effects",
    "add_consistency",
    "control_null",
    "significant_pairs",
    "calibration_summary",
]

METHODS = ("welch", "ols_batch", "mannwhitney")

ANOVA_COLUMNS = ["program", "F", "pvalue", "qvalue", "df_group", "df_resid", "eta_squared"]
CONTRAST_COLUMNS = [
    "program",
    "perturbation",
    "n_cells",
    "n_control",
    "mean_perturbed",
    "mean_control",
    "effect",
    "effect_std",
    "statistic",
    "pvalue",
    "qvalue",
]

CONSISTENCY_COLUMNS = [
    "n_guides",
    "n_guides_same_sign",
    "guide_effect_min",
    "guide_effect_max",
    "guide_heterogeneity_pvalue",
    "n_batches",
    "n_batches_same_sign",
    "consistency",
]


# --------------------------------------------------------------------------- #
# Input handling
# --------------------------------------------------------------------------- #
def _as_usage(usage: Any) -> pd.DataFrame:
    if isinstance(usage, pd.DataFrame):
        df = usage
    else:
        arr = np.asarray(usage)
        if arr.ndim != 2:
            raise ValueError(f"usage must be a cells x programs table, got shape {arr.shape}")
        df = pd.DataFrame(arr, columns=[f"P{i + 1:02d}" for i in range(arr.shape[1])])
    if df.shape[1] == 0:
        raise ValueError("usage has no program columns")
    try:
        values = df.to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise ValueError("usage must be numeric (cells x programs)") from None
    finite = np.isfinite(values)
    if not finite.all():
        bad_cols = [str(c) for c, ok in zip(df.columns, finite.all(axis=0)) if not ok]
        raise ValueError(
            f"usage contains NaN or infinite values ({int((~finite).sum())} entries) in "
            f"program(s) {bad_cols[:5]}{' ...' if len(bad_cols) > 5 else ''}"
        )
    return df


def _as_labels(labels: Any, usage: pd.DataFrame, name: str) -> np.ndarray:
    """Labels as an object array aligned to the rows of ``usage``."""
    if isinstance(labels, pd.Series):
        if not labels.index.equals(usage.index):
            same = (
                len(labels) == len(usage)
                and labels.index.is_unique
                and usage.index.is_unique
                and labels.index.isin(usage.index).all()
            )
            if not same:
                raise ValueError(
                    f"{name}: the Series index does not match usage.index; pass "
                    f"{name}.to_numpy() to match cells by position"
                )
            labels = labels.reindex(usage.index)
        arr = labels.to_numpy(dtype=object)
    else:
        arr = np.asarray(labels, dtype=object)
        if arr.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if len(arr) != len(usage):
        raise ValueError(f"{name} has {len(arr)} entries but usage has {len(usage)} cells (rows)")
    missing = pd.isna(arr)
    if missing.any():
        raise ValueError(f"{name} has {int(missing.sum())} missing label(s) (NaN/None)")
    return arr


def _dummies(codes: np.ndarray, n_levels: int) -> np.ndarray:
    """Treatment-coded indicator columns (first level dropped), shape (n, n_levels - 1)."""
    out = np.zeros((codes.size, max(n_levels - 1, 0)))
    rows = np.flatnonzero(codes > 0)
    out[rows, codes[rows] - 1] = 1.0
    return out


def _fitted(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, int]:
    """Least-squares fitted values of every column of Y and the rank of X."""
    beta, _, rank, _ = np.linalg.lstsq(X, Y, rcond=None)
    return X @ beta, int(rank)


# --------------------------------------------------------------------------- #
# Omnibus test
# --------------------------------------------------------------------------- #
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
    parts_red = [np.ones((n, 1))]
    if b_codes is not None:
        parts_red.append(_dummies(b_codes, int(b_codes.max()) + 1))
    X_red = np.hstack(parts_red)
    X_full = np.hstack([X_red, _dummies(g_codes, int(g_codes.max()) + 1)])

    fit_full, rank_full = _fitted(X_full, Yc)
    if X_red.shape[1] == 1:
        fit_red, rank_red = np.zeros_like(Yc), 1  # centred data: intercept fit is 0
    else:
        fit_red, rank_red = _fitted(X_red, Yc)

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


# --------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------- #
# Perturbation vs control
# --------------------------------------------------------------------------- #
def _format_levels(levels, limit: int = 20) -> str:
    shown = sorted(map(str, levels))
    more = f", ... ({len(shown)} in total)" if len(shown) > limit else ""
    return ", ".join(repr(s) for s in shown[:limit]) + more


def _check_min_cells(min_cells) -> None:
    if isinstance(min_cells, bool) or not isinstance(min_cells, (int, np.integer)) or min_cells < 2:
        raise ValueError(f"min_cells must be an integer >= 2 (Welch's test needs a variance), got {min_cells!r}")


def _check_control(g: np.ndarray, control_label) -> np.ndarray:
    is_control = g == control_label
    if not is_control.any():
        levels = pd.unique(g)
        raise ValueError(
            f"control_label {control_label!r} is not among the {len(levels)} groups: {_format_levels(levels)}"
        )
    return is_control


def _welch(a: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Welch t statistic and p-value per column; NaN where both samples are constant."""
    with warnings.catch_warnings():
        # scipy warns about "catastrophic cancellation" for (nearly) constant
        # columns; those are handled explicitly below.
        warnings.simplefilter("ignore", RuntimeWarning)
        with np.errstate(divide="ignore", invalid="ignore"):
            res = _sps.ttest_ind(a, c, axis=0, equal_var=False)
    t = np.asarray(res.statistic, dtype=float)
    p = np.asarray(res.pvalue, dtype=float)
    both_constant = (np.ptp(a, axis=0) == 0) & (np.ptp(c, axis=0) == 0)
    t = np.where(both_constant, np.nan, t)
    p = np.where(both_constant, np.nan, p)
    return t, p


def _batch_adjusted_effect(count_g, sum_g, count_c, sum_c, min_cells: int = 1) -> np.ndarray:
    """Within-batch difference of means, averaged with the perturbed cells' batch sizes as weights.

    Parameters
    ----------
    count_g : ndarray, shape (..., n_batches)
        Perturbed cells per batch (leading axes: several perturbed groups at once).
    sum_g : ndarray, shape (..., n_batches, n_programs)
        Their usage summed per batch.
    count_c : ndarray, shape (n_batches,)
        Control cells per batch.
    sum_c : ndarray, shape (n_batches, n_programs)
        Their usage summed per batch.
    min_cells : int
        Batches with fewer perturbed or fewer control cells are left out.

    Returns
    -------
    ndarray, shape (..., n_programs)
        ``sum_b w_b (mean_g_b - mean_c_b) / sum_b w_b`` with ``w_b = count_g[b]``;
        NaN when no batch qualifies.
    """
    count_g = np.asarray(count_g, dtype=float)
    count_c = np.asarray(count_c, dtype=float)
    both = (count_g >= min_cells) & (count_c >= min_cells) & (count_g > 0) & (count_c > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = sum_g / count_g[..., None] - sum_c / count_c[:, None]
    diff = np.where(both[..., None], diff, 0.0)
    w = np.where(both, count_g, 0.0)
    total = w.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total[..., None] > 0, (w[..., None] * diff).sum(axis=-2) / total[..., None], np.nan)


def _ols_batch_test(Y_g, Y_c, batch_g, batch_c):
    """Perturbation coefficient of ``usage ~ perturbed + C(batch)`` with HC3 standard errors.

    Fitted on the group's and the control cells, for all programs at once. HC3
    (MacKinnon & White 1985) keeps the test valid when the variance differs between
    perturbed and control cells, as Welch's does. Batch levels without both kinds of cell
    carry no contrast and are absorbed by their own dummy.

    Returns
    -------
    beta, t, p : ndarrays of shape (n_programs,)
        Batch-adjusted difference of means, its t statistic and two-sided p-value
        (t distribution, residual degrees of freedom). All NaN when no batch holds both
        perturbed and control cells: the perturbation is then confounded with batch and its
        coefficient not identified.
    """
    if not set(batch_g) & set(batch_c):
        nan = np.full(Y_g.shape[1], np.nan)
        return nan, nan.copy(), nan.copy()
    Y = np.vstack([Y_g, Y_c])
    indicator = np.r_[np.ones(len(Y_g)), np.zeros(len(Y_c))]
    batch_all = np.r_[batch_g, batch_c]
    batch_codes, _ = pd.factorize(batch_all)
    dummies = np.eye(batch_codes.max() + 1)[batch_codes][:, 1:]
    D = np.column_stack([np.ones(len(Y)), indicator, dummies])
    pinv = np.linalg.pinv(D)
    rank = np.linalg.matrix_rank(D)
    leverage = np.einsum("ij,ji->i", D, pinv)
    coef = pinv @ Y
    residual = Y - D @ coef
    # Only the cells of batches holding both kinds of cell inform the coefficient: the others
    # are absorbed by their batch dummy (their entry of pinv[1] is 0 up to rounding). A cell
    # with leverage 1 (the only perturbed or control cell of its batch) is fitted exactly: its
    # HC3 term is 0 / 0 and adds nothing, as in HC0. Rounding-level terms would add noise.
    informative = pd.Index(batch_all).isin(list(set(batch_g) & set(batch_c))) & (leverage < 1.0 - 1e-8)
    weights = np.where(informative, pinv[1] / np.where(informative, 1.0 - leverage, 1.0), 0.0) ** 2
    se = np.sqrt(weights @ residual**2)
    # No residual variance left among those cells (usage constant within the perturbed and
    # within the control cells of the shared batches): nothing to test against, NaN as Welch.
    ss_total = np.sum((Y - Y.mean(axis=0)) ** 2, axis=0)
    no_residual = np.sum(residual[informative] ** 2, axis=0) <= 1e-20 * ss_total
    both_constant = (np.ptp(Y_g, axis=0) == 0) & (np.ptp(Y_c, axis=0) == 0)
    se = np.where(no_residual | both_constant, 0.0, se)
    df = max(len(Y) - rank, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, coef[1] / se, np.nan)
    return coef[1], t, 2.0 * _sps.t.sf(np.abs(t), df)


def _rank_reference(Y_c: np.ndarray, batch_c=None) -> dict:
    """Control usage sorted once per batch, for the rank-sum tests of all groups.

    Returns
    -------
    dict
        batch label (``None`` without batches) -> ``(sorted_c, tie_c)``: the control
        cells' usage sorted within each program, shape (n_programs, n_control_b), and
        its tie term ``sum (t^3 - t)`` per program, shape (n_programs,).
    """
    if batch_c is None:
        parts = {None: Y_c}
    else:
        parts = {level: Y_c[batch_c == level] for level in pd.unique(batch_c)}
    reference = {}
    for level, part in parts.items():
        sorted_c = np.sort(part.T, axis=1)
        reference[level] = (sorted_c, _tie_term(sorted_c)[0])
    return reference


def _tie_term(sorted_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Runs of equal values in every row of a row-wise sorted array, shape (p, n).

    Returns ``(tie_term, starts, lengths, rows)``: ``sum (t^3 - t)`` per row, shape (p,),
    and for every run its flat start index, its length ``t`` and its row.
    """
    p, n = sorted_rows.shape
    new_run = np.ones((p, n), dtype=bool)
    new_run[:, 1:] = sorted_rows[:, 1:] != sorted_rows[:, :-1]
    starts = np.flatnonzero(new_run)
    lengths = np.diff(np.r_[starts, p * n]).astype(float)
    rows = starts // n if n else starts
    return np.bincount(rows, weights=lengths**3 - lengths, minlength=p), starts, lengths, rows


def _u_statistic(Y_a: np.ndarray, sorted_c: np.ndarray, tie_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mann-Whitney U of ``Y_a`` against pre-sorted control values, and the pooled tie term.

    ``U = sum_i (#{c < a_i} + #{c = a_i} / 2)`` per program (``R_a - n_a (n_a + 1) / 2``
    with ``R_a`` the rank sum of the ``a`` cells among both), found by binary search in
    the sorted controls.  The pooled tie term is that of the controls, plus that of
    ``a``, plus ``3 t_a t_c (t_a + t_c)`` for every value present in both.

    Parameters
    ----------
    Y_a : ndarray, shape (n_a, n_programs)
    sorted_c : ndarray, shape (n_programs, n_c)
    tie_c : ndarray, shape (n_programs,)

    Returns
    -------
    U, tie_term : ndarrays of shape (n_programs,)
    """
    sorted_a = np.sort(Y_a.T, axis=1)
    n_prog, n_a = sorted_a.shape
    below = np.empty((n_prog, n_a))
    equal = np.empty((n_prog, n_a))
    for j in range(n_prog):
        lo = np.searchsorted(sorted_c[j], sorted_a[j], side="left")
        hi = np.searchsorted(sorted_c[j], sorted_a[j], side="right")
        below[j] = lo
        equal[j] = hi - lo
    U = below.sum(axis=1) + 0.5 * equal.sum(axis=1)
    tie_a, starts, t_a, rows = _tie_term(sorted_a)
    t_c = equal.ravel()[starts]
    cross = np.bincount(rows, weights=3.0 * t_a * t_c * (t_a + t_c), minlength=n_prog)
    return U, tie_c + tie_a + cross


def _rank_sum_test(Y_g: np.ndarray, reference: dict, batch_g=None) -> tuple[np.ndarray, np.ndarray]:
    """Mann-Whitney U test per program, or van Elteren's stratified version with batches.

    Without batches: the asymptotic normal test with tie and continuity correction,
    ``z = sign(U - mu) max(|U - mu| - 1/2, 0) / sigma`` with ``U`` the perturbed cells'
    U statistic, ``mu = n1 n0 / 2`` and
    ``sigma^2 = n1 n0 / 12 ((N + 1) - sum(t^3 - t) / (N (N - 1)))``; the p-value
    ``min(1, 2 Phi(-|z|))`` equals ``scipy.stats.mannwhitneyu(method="asymptotic")``.

    With batches (van Elteren 1960): in every batch ``b`` holding both perturbed and
    control cells, the perturbed cells' rank sum ``W_b`` among that batch's cells, its
    null mean ``E_b = n1b (N_b + 1) / 2`` and tie-corrected variance
    ``V_b = n1b n0b / 12 ((N_b + 1) - T_b / (N_b (N_b - 1)))`` are combined with weights
    ``w_b = 1 / (N_b + 1)``: ``z = sum w_b (W_b - E_b) / sqrt(sum w_b^2 V_b)`` (no
    continuity correction: the weighted sum has no unit lattice). Batches lacking
    either kind of cell contribute nothing.

    Parameters
    ----------
    Y_g : ndarray, shape (n_g, n_programs)
        Usage of the perturbed cells.
    reference : dict
        :func:`_rank_reference` of the control cells (with batches iff ``batch_g``).
    batch_g : ndarray, shape (n_g,), optional
        Batch of each perturbed cell.

    Returns
    -------
    z, p : ndarrays of shape (n_programs,)
        Signed standardised statistic (positive: perturbed usage ranks higher) and
        two-sided p-value; NaN where the compared cells are all tied or no batch holds
        both kinds of cell.
    """
    if batch_g is None:
        strata = [(Y_g, None)]
    else:
        strata = [(Y_g[batch_g == level], level) for level in pd.unique(batch_g) if level in reference]
    continuity = batch_g is None
    n_prog = Y_g.shape[1]
    dev = np.zeros(n_prog)
    var = np.zeros(n_prog)
    var_no_ties = 0.0  # the variance were there no ties: the scale of "all tied"
    for a, level in strata:
        sorted_c, tie_c = reference[level]
        n1, n0 = len(a), sorted_c.shape[1]
        n = n1 + n0
        U, tie_term = _u_statistic(a, sorted_c, tie_c)
        weight = 1.0 if continuity else 1.0 / (n + 1)
        dev += weight * (U - n1 * n0 / 2.0)  # = w (W - E)
        var += weight**2 * n1 * n0 / 12.0 * ((n + 1) - tie_term / (n * (n - 1)))
        var_no_ties += weight**2 * n1 * n0 / 12.0 * (n + 1)
    if continuity:
        dev = np.sign(dev) * np.maximum(np.abs(dev) - 0.5, 0.0)
    ok = var > 1e-10 * var_no_ties
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(ok, dev / np.sqrt(np.where(ok, var, 1.0)), np.nan)
    p = np.minimum(1.0, 2.0 * _sps.norm.sf(np.abs(z)))
    return z, p


def program_contrasts(
    usage: pd.DataFrame,
    groups,
    control_label: str,
    batch=None,
    min_cells: int = 2,
    method: str = "welch",
) -> pd.DataFrame:
    """Every perturbation against the control cells, per program.

    For every group ``g != control_label`` with at least ``min_cells`` cells and
    every program, usage in the ``g`` cells is compared with usage in the
    control cells by the test chosen with ``method`` (all programs of a group in
    one vectorised call).  q-values are Benjamini-Hochberg over **all**
    perturbation x program tests of the table together (as pertpy does).

    Parameters
    ----------
    usage : pandas.DataFrame, shape (n_cells, n_programs)
        Program usage per cell; no NaN/inf allowed.
    groups : pandas.Series or array-like, shape (n_cells,)
        Perturbation label per cell (target gene or ``control_label``).
    control_label : str
        Label of the control cells (e.g. ``"non-targeting"``).
    batch : pandas.Series or array-like, shape (n_cells,), optional
        Batch label per cell, used by ``method="ols_batch"`` and
        ``"mannwhitney"`` (the Welch test ignores it).  When given, the column
        ``effect_batch_adjusted`` is appended: ``sum_b w_b (mean_perturbed_b - mean_control_b) / sum_b w_b``
        with ``w_b`` = number of perturbed cells in batch ``b``, over the
        batches that contain both perturbed and control cells (NaN if none).
    min_cells : int, default 2
        Groups with fewer cells are skipped (listed in
        ``result.attrs["skipped_groups"]``).  Must be >= 2 (a variance needs two
        cells); the control group must also reach it.
    method : {"welch", "ols_batch", "mannwhitney"}, default "welch"
        ``"welch"``: Welch t-test of perturbed vs control cells. ``"ols_batch"``
        (needs ``batch``): the perturbation coefficient of ``usage ~ perturbed +
        C(batch)`` with HC3 standard errors, so a perturbation whose cells sit in
        another batch than the controls is not credited with the batch's shift;
        ``effect`` and ``statistic`` are then the batch-adjusted difference and its t.
        ``"mannwhitney"``: a rank test, suited to usage that is non-negative,
        skewed and zero-inflated.  Without ``batch`` the Mann-Whitney U test
        (normal approximation with tie and continuity correction; p-values equal
        ``scipy.stats.mannwhitneyu(method="asymptotic")``, except NaN where scipy
        reports 1 for all-tied values); with ``batch`` van
        Elteren's stratified test: ranks within each batch, per-batch rank sums
        weighted by ``1 / (N_b + 1)`` (``N_b`` cells of the two groups in batch
        ``b``), batches lacking perturbed or control cells contribute nothing, no
        continuity correction.  ``statistic`` is the standardised z (positive
        when perturbed usage ranks higher); ``effect`` stays a difference of
        means -- with ``batch`` the batch-adjusted one (``effect_batch_adjusted``).

    Returns
    -------
    pandas.DataFrame, shape (n_tested_groups * n_programs, 11 or 12)
        Rows ordered by perturbation (sorted as strings), then program (column
        order of ``usage``).  Columns, in this order:

        ``program``, ``perturbation``, ``n_cells`` (perturbed cells),
        ``n_control``, ``mean_perturbed``, ``mean_control``,
        ``effect`` (``mean_perturbed - mean_control``),
        ``effect_std`` (Cohen's d: effect / pooled SD,
        ``sqrt(((n1-1) s1^2 + (n0-1) s0^2) / (n1+n0-2))``; NaN if that is 0),
        ``statistic`` (Welch t, HC3 t, or rank-test z), ``pvalue``, ``qvalue``
        [, ``effect_batch_adjusted``].

        A program that is constant within both the perturbed and the control
        cells (t-tests), or whose compared values are all tied (rank test), gets
        ``statistic``/``pvalue`` NaN and is excluded from BH; so does a group
        sharing no batch with the control under the batch-aware methods (with
        ``"ols_batch"`` its ``effect`` is NaN too: confounded with batch), and,
        under ``"ols_batch"``, a program without residual variance in the
        batches shared by the group and the control.

        ``attrs``: ``skipped_groups`` (list of labels with < ``min_cells``
        cells, sorted as strings), ``control_label``, ``min_cells``,
        ``batch_adjusted`` (bool; whether ``effect_batch_adjusted`` is present),
        ``method``.

    Raises
    ------
    ValueError
        ``control_label`` not among the groups (the message lists them), the
        control has fewer than ``min_cells`` cells, ``min_cells < 2``, an unknown
        ``method``, ``method="ols_batch"`` without ``batch``, or invalid inputs
        (see :func:`program_anova`).
    """
    _check_min_cells(min_cells)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if method == "ols_batch" and batch is None:
        raise ValueError("method='ols_batch' needs the batch labels (parameter batch / batch_key)")
    usage = _as_usage(usage)
    g = _as_labels(groups, usage, "groups")
    b = None if batch is None else _as_labels(batch, usage, "batch")

    codes, levels = pd.factorize(g, sort=False)
    levels = list(levels)
    if control_label not in levels:
        raise ValueError(
            f"control_label {control_label!r} is not among the {len(levels)} groups: "
            f"{_format_levels(levels)}"
        )
    ctrl_code = levels.index(control_label)
    counts = np.bincount(codes, minlength=len(levels))
    n_ctrl = int(counts[ctrl_code])
    if n_ctrl < min_cells:
        raise ValueError(
            f"control group {control_label!r} has {n_ctrl} cell(s), fewer than min_cells={min_cells}"
        )

    Y = usage.to_numpy(dtype=float)
    programs = np.asarray(usage.columns, dtype=object)
    n_prog = Y.shape[1]
    ctrl_rows = codes == ctrl_code
    Yc = Y[ctrl_rows]
    mean_c = Yc.mean(axis=0)
    var_c = Yc.var(axis=0, ddof=1)

    if b is not None:
        b_codes, _ = pd.factorize(b, sort=False)
        n_b = int(b_codes.max()) + 1
        # per (group, batch) counts and usage sums, for the batch-adjusted effect
        gb = codes * n_b + b_codes
        gb_count = np.bincount(gb, minlength=len(levels) * n_b).reshape(len(levels), n_b)
        gb_sum = np.zeros((len(levels) * n_b, n_prog))
        np.add.at(gb_sum, gb, Y)
        gb_sum = gb_sum.reshape(len(levels), n_b, n_prog)

    order = sorted(
        (i for i in range(len(levels)) if i != ctrl_code), key=lambda i: str(levels[i])
    )
    skipped = [levels[i] for i in order if counts[i] < min_cells]
    tested = [i for i in order if counts[i] >= min_cells]

    if method == "mannwhitney":
        reference = _rank_reference(Yc, None if b is None else b[ctrl_rows])
    blocks = []
    for i in tested:
        Yg = Y[codes == i]
        n_g = Yg.shape[0]
        mean_g = Yg.mean(axis=0)
        var_g = Yg.var(axis=0, ddof=1)
        effect = mean_g - mean_c
        pooled_sd = np.sqrt(((n_g - 1) * var_g + (n_ctrl - 1) * var_c) / (n_g + n_ctrl - 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            effect_std = np.where(pooled_sd > 0, effect / pooled_sd, np.nan)
        adjusted = None
        if b is not None:
            adjusted = _batch_adjusted_effect(gb_count[i], gb_sum[i], gb_count[ctrl_code], gb_sum[ctrl_code])
        if method == "ols_batch":
            effect, t, p = _ols_batch_test(Yg, Yc, b[codes == i], b[ctrl_rows])
        elif method == "mannwhitney":
            if b is None:
                t, p = _rank_sum_test(Yg, reference)
            else:
                t, p = _rank_sum_test(Yg, reference, b[codes == i])
                effect = adjusted
        else:
            t, p = _welch(Yg, Yc)
        if method != "welch":
            with np.errstate(divide="ignore", invalid="ignore"):
                effect_std = np.where(pooled_sd > 0, effect / pooled_sd, np.nan)
        block = {
            "program": programs,
            "perturbation": np.full(n_prog, levels[i], dtype=object),
            "n_cells": np.full(n_prog, n_g, dtype=int),
            "n_control": np.full(n_prog, n_ctrl, dtype=int),
            "mean_perturbed": mean_g,
            "mean_control": mean_c,
            "effect": effect,
            "effect_std": effect_std,
            "statistic": t,
            "pvalue": p,
        }
        if adjusted is not None:
            block["effect_batch_adjusted"] = adjusted
        blocks.append(pd.DataFrame(block))

    columns = CONTRAST_COLUMNS + (["effect_batch_adjusted"] if b is not None else [])
    if blocks:
        res = pd.concat(blocks, ignore_index=True)
        res["qvalue"] = benjamini_hochberg(res["pvalue"].to_numpy())
        res = res[columns]
    else:
        res = _empty_contrasts(columns)
    res.attrs["skipped_groups"] = skipped
    res.attrs["control_label"] = control_label
    res.attrs["min_cells"] = int(min_cells)
    res.attrs["batch_adjusted"] = b is not None
    res.attrs["method"] = method
    return res


def _empty_contrasts(columns: list[str]) -> pd.DataFrame:
    dtypes = {
        "program": object,
        "perturbation": object,
        "n_cells": int,
        "n_control": int,
    }
    return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, float)) for c in columns})


# --------------------------------------------------------------------------- #
# Guides and replication
# --------------------------------------------------------------------------- #
def _group_sums(codes: np.ndarray, n_levels: int, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells per code and column sums of ``Y`` per code: shapes (n_levels,), (n_levels, p)."""
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=n_levels)
    sums = np.zeros((n_levels, Y.shape[1]))
    nonempty = counts > 0
    if nonempty.any():
        bounds = np.r_[0, np.cumsum(counts)[:-1]][nonempty]
        sums[nonempty] = np.add.reduceat(Y[order], bounds, axis=0)
    return counts, sums


def _pair_codes(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes of the distinct (first, second) label pairs, in order of appearance.

    Returns ``codes`` (shape (n,)) and the pairs' ``first`` and ``second`` labels
    (shape (n_pairs,) each).
    """
    a_codes, a_levels = pd.factorize(first, sort=False)
    b_codes, b_levels = pd.factorize(second, sort=False)
    n_b = max(len(b_levels), 1)
    codes, uniques = pd.factorize(a_codes.astype(np.int64) * n_b + b_codes, sort=False)
    return codes, np.asarray(a_levels, dtype=object)[uniques // n_b], np.asarray(b_levels, dtype=object)[uniques % n_b]


def guide_effects(
    usage: pd.DataFrame,
    groups,
    guides,
    control_label: str,
    batch=None,
    min_cells: int = 2,
    method: str = "welch",
) -> pd.DataFrame:
    """Every guide of every perturbation against all control cells, per program.

    The cells of each (perturbation, guide) pair form one group and are tested
    against **all** control cells (every control guide pooled) with
    :func:`program_contrasts` -- the same test, effect definitions and batch
    handling as the per-perturbation table.  Control guides are not tested.

    Parameters
    ----------
    usage : pandas.DataFrame, shape (n_cells, n_programs)
        Program usage per cell; no NaN/inf allowed.
    groups : pandas.Series or array-like, shape (n_cells,)
        Perturbation (target) label per cell, ``control_label`` for controls.
    guides : pandas.Series or array-like, shape (n_cells,)
        Guide label per cell.  A guide is identified by its (perturbation,
        guide) pair, so guide names may repeat across targets (``"g1"``).
    control_label : str
        Label of the control cells in ``groups``.
    batch : pandas.Series or array-like, shape (n_cells,), optional
        Batch label per cell, as in :func:`program_contrasts`.
    min_cells : int, default 2
        Guides with fewer cells are skipped (``attrs["skipped_guides"]``).
    method : {"welch", "ols_batch", "mannwhitney"}, default "welch"
        The test, as in :func:`program_contrasts`.

    Returns
    -------
    pandas.DataFrame, shape (n_tested_guides * n_programs, 12 or 13)
        Rows ordered by perturbation, guide (both sorted as strings), then
        program.  Columns: ``program``, ``perturbation``, ``guide``, then those of
        :func:`program_contrasts` from ``n_cells`` on (``n_cells`` = the guide's
        cells, ``effect``, ``effect_std``, ``statistic``, ``pvalue``, ``qvalue``
        = BH over this table, [``effect_batch_adjusted``]).  ``attrs``:
        ``skipped_guides`` (list of (perturbation, guide) tuples), ``control_label``,
        ``min_cells``, ``batch_adjusted``, ``method``.

    Raises
    ------
    ValueError
        As :func:`program_contrasts`; also when ``guides`` is misaligned or has
        missing labels.
    """
    _check_min_cells(min_cells)
    usage = _as_usage(usage)
    g = _as_labels(groups, usage, "groups")
    guide = _as_labels(guides, usage, "guides")
    is_control = _check_control(g, control_label)
    if is_control.sum() < min_cells:
        raise ValueError(
            f"control group {control_label!r} has {int(is_control.sum())} cell(s), fewer than min_cells={min_cells}"
        )
    # one integer label per (perturbation, guide) pair; -1 for every control cell
    pair_codes, pair_target, pair_guide = _pair_codes(g[~is_control], guide[~is_control])
    labels = np.full(len(g), -1, dtype=np.int64)
    labels[~is_control] = pair_codes
    table = program_contrasts(usage, labels, -1, batch=batch, min_cells=min_cells, method=method)

    attrs = dict(table.attrs)
    skipped = [(pair_target[int(i)], pair_guide[int(i)]) for i in attrs.pop("skipped_groups")]
    codes = table["perturbation"].to_numpy(dtype=np.int64)
    target = pair_target[codes]
    guide_name = pair_guide[codes]
    program_pos = pd.Index(usage.columns).get_indexer(table["program"])
    table = table.assign(perturbation=target)
    table.insert(2, "guide", guide_name)
    order = np.lexsort((program_pos, guide_name.astype(str), target.astype(str)))
    table = table.iloc[order].reset_index(drop=True)
    attrs.update(skipped_guides=sorted(skipped, key=lambda pair: tuple(map(str, pair))), control_label=control_label)
    table.attrs = attrs
    return table


def add_consistency(
    contrasts: pd.DataFrame,
    usage: pd.DataFrame,
    groups,
    control_label: str | None = None,
    guides=None,
    batch=None,
    min_cells: int | None = None,
) -> pd.DataFrame:
    """Add replication columns to a :func:`program_contrasts` table: do guides and batches agree?

    A perturbation's shift of a program is more credible when every guide of
    the target, and every batch, shows it.  For each row (perturbation x
    program) of ``contrasts`` this compares with the sign of the row's
    ``effect``:

    * guides (when ``guides`` is given; only the target's guides with at least
      ``min_cells`` cells count): each guide's effect against **all** control
      cells, defined like the table's ``effect`` -- the difference of means, or,
      when ``contrasts`` was made by a batch-aware method (``"ols_batch"`` or
      ``"mannwhitney"`` with batch), the batch-adjusted difference of means of
      ``effect_batch_adjusted`` (for ``"welch"`` and ``"mannwhitney"`` this is the
      ``effect`` of :func:`guide_effects`; for ``"ols_batch"`` it approximates the
      regression coefficient);
    * ``guide_heterogeneity_pvalue``: do the target's guides differ from each
      other?  The F-test of ``usage ~ C(guide)`` (``+ C(batch)`` when ``batch``
      is given, so guides sequenced in different batches are not called
      different) among the target's cells, as :func:`program_anova`.  Under the
      null the guides' cells are exchangeable -- equal variances included -- so
      the F-test is valid for skewed, zero-inflated usage at the usual tens to
      hundreds of cells per guide; a small p-value flags a guide that behaves
      differently (off-target, inefficient), even when all guides agree in sign;
    * batches (when ``batch`` is given): per batch with at least ``min_cells``
      perturbed and ``min_cells`` control cells, ``mean_perturbed_b -
      mean_control_b``.

    Parameters
    ----------
    contrasts : pandas.DataFrame
        A table with columns ``perturbation``, ``program`` and ``effect`` (the
        output of :func:`program_contrasts`, possibly filtered).  Its ``attrs``
        supply ``control_label``, ``min_cells`` and ``method`` by default.
    usage : pandas.DataFrame, shape (n_cells, n_programs)
        The usage the contrasts were computed from.
    groups : pandas.Series or array-like, shape (n_cells,)
        Perturbation label per cell.
    control_label : str, optional
        Label of the control cells; default ``contrasts.attrs["control_label"]``.
    guides : pandas.Series or array-like, shape (n_cells,), optional
        Guide label per cell; without it the guide columns are 0 / NaN.
    batch : pandas.Series or array-like, shape (n_cells,), optional
        Batch label per cell; without it the batch columns are 0.  Required when
        ``contrasts`` has batch-adjusted effects and ``guides`` is given.
    min_cells : int, optional
        Default ``contrasts.attrs["min_cells"]`` (else 2).

    Returns
    -------
    pandas.DataFrame
        A copy of ``contrasts`` (same rows, order and ``attrs``) with the
        columns, appended in this order (replaced if already present):

        ``n_guides`` (int), ``n_guides_same_sign`` (int; guides whose effect has
        the sign of ``effect``; 0 when ``effect`` is 0 or NaN),
        ``guide_effect_min``, ``guide_effect_max`` (NaN without guides),
        ``guide_heterogeneity_pvalue`` (NaN with fewer than 2 guides, constant
        usage, or guides confounded with batch), ``n_batches`` (int),
        ``n_batches_same_sign`` (int), ``consistency`` (str such as
        ``"3/4 guides, 2/2 batches agree"``; ``""`` when neither guides nor batch
        is given).  ``attrs["consistency"]`` records ``min_cells`` and the guide
        effect definition.

    Raises
    ------
    ValueError
        Missing columns in ``contrasts``, a perturbation or program of
        ``contrasts`` absent from ``groups`` / ``usage``, no control label,
        ``min_cells < 2``, or invalid inputs (see :func:`program_anova`).
    """
    missing = [c for c in ("perturbation", "program", "effect") if c not in contrasts.columns]
    if missing:
        raise ValueError(f"contrasts lacks the column(s) {missing}; pass a program_contrasts table")
    if control_label is None:
        control_label = contrasts.attrs.get("control_label")
        if control_label is None:
            raise ValueError("control_label is not given and contrasts.attrs has no 'control_label'")
    if min_cells is None:
        min_cells = contrasts.attrs.get("min_cells", 2)
    _check_min_cells(min_cells)
    usage = _as_usage(usage)
    g = _as_labels(groups, usage, "groups")
    b = None if batch is None else _as_labels(batch, usage, "batch")
    guide = None if guides is None else _as_labels(guides, usage, "guides")
    is_control = _check_control(g, control_label)
    adjusted = contrasts.attrs.get("method") in ("ols_batch", "mannwhitney") and bool(
        contrasts.attrs.get("batch_adjusted", False)
    )
    if adjusted and guide is not None and b is None:
        raise ValueError(
            f"contrasts has batch-adjusted effects (method={contrasts.attrs.get('method')!r}); pass the same "
            "batch labels so that guide effects are defined the same way"
        )

    # rows of contrasts -> (target, program) indices
    Y = usage.to_numpy(dtype=float)
    n_prog = Y.shape[1]
    program_idx = pd.Index(usage.columns).get_indexer(contrasts["program"])
    if (program_idx < 0).any():
        bad = pd.unique(contrasts["program"][program_idx < 0])
        raise ValueError(f"contrasts: program(s) {list(bad[:5])} are not columns of usage")
    targets = pd.Index(pd.unique(g[~is_control]))
    target_idx = targets.get_indexer(contrasts["perturbation"])
    if (target_idx < 0).any():
        bad = pd.unique(contrasts["perturbation"][target_idx < 0])
        raise ValueError(
            f"contrasts: perturbation(s) {list(map(str, bad[:5]))} are not among the perturbation labels of "
            f"groups (control {control_label!r} excluded)"
        )
    n_targets = len(targets)
    effect = contrasts["effect"].to_numpy(dtype=float)
    sign = np.sign(np.nan_to_num(effect))  # 0 for NaN: nothing agrees with an undefined sign
    n_rows = len(contrasts)

    Y_ctrl = Y[is_control]
    Y_pert = Y[~is_control]
    t_codes = targets.get_indexer(g[~is_control])
    if b is not None:
        b_codes, b_levels = pd.factorize(b, sort=False)
        n_b = len(b_levels)
        b_pert = b_codes[~is_control]
        cb_count, cb_sum = _group_sums(b_codes[is_control], n_b, Y_ctrl)

    def same_sign_count(values, valid, owner, n_owner):
        """Per (owner, program): number of valid entries > 0 and < 0; values (k, p)."""
        pos = np.zeros((n_owner, n_prog))
        neg = np.zeros((n_owner, n_prog))
        np.add.at(pos, owner[valid], values[valid] > 0)
        np.add.at(neg, owner[valid], values[valid] < 0)
        agree = np.where(sign > 0, pos[target_idx, program_idx], np.where(sign < 0, neg[target_idx, program_idx], 0))
        return agree.astype(int)

    out = {
        "n_guides": np.zeros(n_rows, dtype=int),
        "n_guides_same_sign": np.zeros(n_rows, dtype=int),
        "guide_effect_min": np.full(n_rows, np.nan),
        "guide_effect_max": np.full(n_rows, np.nan),
        "guide_heterogeneity_pvalue": np.full(n_rows, np.nan),
        "n_batches": np.zeros(n_rows, dtype=int),
        "n_batches_same_sign": np.zeros(n_rows, dtype=int),
    }
    if guide is not None:
        pair_codes, pair_target, _ = _pair_codes(t_codes, guide[~is_control])
        pair_target = pair_target.astype(np.int64)
        n_pairs = len(pair_target)
        pair_count, pair_sum = _group_sums(pair_codes, n_pairs, Y_pert)
        if adjusted:
            pb_count, pb_sum = _group_sums(pair_codes * n_b + b_pert, n_pairs * n_b, Y_pert)
            g_effect = _batch_adjusted_effect(
                pb_count.reshape(n_pairs, n_b), pb_sum.reshape(n_pairs, n_b, n_prog), cb_count, cb_sum
            )
        else:
            g_effect = pair_sum / np.maximum(pair_count, 1)[:, None] - Y_ctrl.mean(axis=0)
        valid = pair_count >= min_cells
        n_guides = np.bincount(pair_target[valid], minlength=n_targets)
        out["n_guides"] = n_guides[target_idx]
        out["n_guides_same_sign"] = same_sign_count(g_effect, valid, pair_target, n_targets)
        g_min = np.full((n_targets, n_prog), np.nan)
        g_max = np.full((n_targets, n_prog), np.nan)
        np.fmin.at(g_min, pair_target[valid], g_effect[valid])  # fmin/fmax skip NaN
        np.fmax.at(g_max, pair_target[valid], g_effect[valid])
        out["guide_effect_min"] = g_min[target_idx, program_idx]
        out["guide_effect_max"] = g_max[target_idx, program_idx]
        # heterogeneity among the valid guides of each target with >= 2 of them
        het = np.full((n_targets, n_prog), np.nan)
        cell_valid = valid[pair_codes]
        order = np.argsort(t_codes, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(t_codes, minlength=n_targets))]
        wanted = np.unique(target_idx)
        for t in wanted[n_guides[wanted] >= 2]:
            rows = order[bounds[t]: bounds[t + 1]]
            rows = rows[cell_valid[rows]]
            sub_guides = pd.factorize(pair_codes[rows])[0]
            sub_batch = None if b is None else pd.factorize(b_pert[rows])[0]
            het[t] = _anova_core(Y_pert[rows], sub_guides, sub_batch)[1]
        out["guide_heterogeneity_pvalue"] = het[target_idx, program_idx]
    if b is not None:
        tb_count, tb_sum = _group_sums(t_codes * n_b + b_pert, n_targets * n_b, Y_pert)
        tb_count = tb_count.reshape(n_targets, n_b)
        tb_sum = tb_sum.reshape(n_targets, n_b, n_prog)
        valid_tb = (tb_count >= min_cells) & (cb_count >= min_cells)[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            b_effect = tb_sum / tb_count[..., None] - cb_sum / cb_count[:, None]
        owner = np.repeat(np.arange(n_targets), n_b)
        out["n_batches"] = valid_tb.sum(axis=1)[target_idx]
        out["n_batches_same_sign"] = same_sign_count(
            b_effect.reshape(n_targets * n_b, n_prog), valid_tb.ravel(), owner, n_targets
        )
    parts = []
    if guide is not None:
        parts.append([f"{a}/{n} guides" for a, n in zip(out["n_guides_same_sign"], out["n_guides"])])
    if b is not None:
        parts.append([f"{a}/{n} batches" for a, n in zip(out["n_batches_same_sign"], out["n_batches"])])
    out["consistency"] = np.array(
        [", ".join(p) + " agree" for p in zip(*parts)] if parts else [""] * n_rows, dtype=object
    )

    res = contrasts.drop(columns=[c for c in CONSISTENCY_COLUMNS if c in contrasts.columns])
    res = res.assign(**{c: out[c] for c in CONSISTENCY_COLUMNS})
    res.attrs = dict(contrasts.attrs)
    res.attrs["consistency"] = {
        "min_cells": int(min_cells),
        "guide_effect": "batch-adjusted difference of means" if adjusted else "difference of means",
        "heterogeneity_test": "F-test of usage ~ C(guide)" + (" + C(batch)" if b is not None else ""),
    }
    return res


# --------------------------------------------------------------------------- #
# Calibration on a built-in null
# --------------------------------------------------------------------------- #
def control_null(
    usage: pd.DataFrame,
    groups,
    control_label: str,
    guides=None,
    batch=None,
    n_pseudo: int = 20,
    seed: int = 0,
    min_cells: int = 2,
    method: str = "welch",
) -> pd.DataFrame:
    """The contrast test on pseudo-perturbations made of control cells only.

    Control cells carry no perturbation, so every test here is null. With control guides
    (``guides`` given and at least two guides among the control cells), each control guide in
    turn is a pseudo-perturbation against the remaining control cells — the split a real
    perturbation has; guides with fewer than ``min_cells`` cells, or leaving fewer than
    ``min_cells`` other control cells, are left out. Otherwise (or when no guide is left)
    ``n_pseudo`` random pseudo-groups are drawn from the control
    cells with the sizes of real perturbation groups (at most half of the controls), each
    against the other control cells. The test is :func:`program_contrasts`, identical to the
    real analysis.

    Parameters
    ----------
    usage : DataFrame of shape (n_cells, n_programs)
    groups, guides, batch : array-like of shape (n_cells,)
    control_label : str
    n_pseudo : int
        Random pseudo-groups when control guides are not available.
    seed : int
    method : {"welch", "ols_batch", "mannwhitney"}
        The test, as in :func:`program_contrasts` (with ``batch``, the batch-aware
        methods use the control cells' batches).

    Returns
    -------
    DataFrame
        :func:`program_contrasts` columns (``perturbation`` holds the pseudo-group's name) plus
        ``null_split`` ("control guide" or "random"); q-values are BH over this table.
    """
    _check_min_cells(min_cells)
    if isinstance(n_pseudo, bool) or not isinstance(n_pseudo, (int, np.integer)) or n_pseudo < 1:
        raise ValueError(f"n_pseudo must be an integer >= 1, got {n_pseudo!r}")
    usage = _as_usage(usage)
    g = _as_labels(groups, usage, "groups")
    is_control = g == control_label
    if is_control.sum() < 2 * min_cells:
        raise ValueError(f"control_null needs at least {2 * min_cells} control cells; found {int(is_control.sum())}.")
    control_usage = usage.loc[is_control]
    control_batch = None if batch is None else _as_labels(batch, usage, "batch")[is_control]
    guide_labels = None if guides is None else _as_labels(guides, usage, "guides")[is_control]
    pseudo = []
    if guide_labels is not None and len(np.unique(guide_labels)) >= 2:
        split = "control guide"
        # a split is testable when the guide and the remaining control cells both have min_cells
        pseudo = [(f"null:{guide}", guide_labels == guide) for guide in sorted(np.unique(guide_labels))
                  if min_cells <= np.sum(guide_labels == guide) <= len(guide_labels) - min_cells]
    if not pseudo:
        split = "random"
        rng = np.random.default_rng(seed)
        sizes = pd.Series(g[~is_control]).value_counts().to_numpy()
        if sizes.size == 0:
            sizes = np.array([max(min_cells, len(control_usage) // 4)])
        sizes = np.clip(sizes, min_cells, len(control_usage) // 2)
        pseudo = []
        for i in range(n_pseudo):
            cells = rng.choice(len(control_usage), int(rng.choice(sizes)), replace=False)
            mask = np.zeros(len(control_usage), dtype=bool)
            mask[cells] = True
            pseudo.append((f"null:{i + 1:02d}", mask))
    tables = []
    for name, mask in pseudo:
        labels = np.where(mask, name, "control")
        tables.append(program_contrasts(control_usage, labels, "control", batch=control_batch, min_cells=min_cells,
                                        method=method))
    table = pd.concat(tables, ignore_index=True)
    table["qvalue"] = benjamini_hochberg(table["pvalue"].to_numpy())
    table["null_split"] = split
    return table


#: A hit is primary when its |d| is at least this share of its perturbation's largest hit |d|.
PRIMARY_SHARE = 0.5


def mark_primary(contrasts: pd.DataFrame, fdr: float, share: float = PRIMARY_SHARE) -> pd.DataFrame:
    """Which of a perturbation's hits are its primary programs, which are spill-over.

    A perturbation that moves one program also moves others a little (programs share genes;
    after normalisation a program's rise lowers every other gene's share). Among each
    perturbation's hits (``qvalue < fdr``) the one with the largest ``|effect_std|`` and every
    hit whose ``|effect_std|`` reaches ``share`` of it are *primary*; the rest *secondary*.

    Returns
    -------
    DataFrame
        ``contrasts`` with a column ``role``: "primary", "secondary", or "" for non-hits.
    """
    out = contrasts.copy()
    hit = (out["qvalue"] < fdr).to_numpy()
    size = out["effect_std"].abs().where(hit)
    largest = size.groupby(out["perturbation"]).transform("max")
    out["role"] = np.where(~hit, "", np.where(size >= share * largest, "primary", "secondary"))
    return out


def significant_pairs(contrasts: pd.DataFrame, fdr: float) -> pd.DataFrame:
    """The hits of a contrasts table: rows with ``qvalue < fdr``, strongest first.

    Sorted by q-value, ties by perturbation and program, so every report lists them in one order.
    """
    hits = contrasts[contrasts["qvalue"] < fdr]
    return hits.sort_values(["qvalue", "perturbation", "program"], kind="stable")


def calibration_summary(pvalues, fdr: float = 0.05) -> dict[str, Any]:
    """How a set of null p-values behaves: inflation factor, null hits at ``fdr``, uniformity.

    Returns
    -------
    dict
        ``n_tests``; ``inflation`` λ = median(χ²₁ quantile of p) / 0.455 (1 when calibrated,
        > 1 when the test is anti-conservative); ``n_null_hits`` (BH q < fdr);
        ``share_below_0_05`` (0.05 when calibrated); ``ks_pvalue`` of a
        Kolmogorov–Smirnov test of uniformity.
    """
    p = np.asarray(pvalues, dtype=float)
    p = p[np.isfinite(p)]
    if p.size == 0:
        return {"n_tests": 0, "inflation": np.nan, "n_null_hits": 0, "share_below_0_05": np.nan, "ks_pvalue": np.nan}
    chi2 = _sps.chi2.isf(np.clip(p, 1e-300, 1.0), df=1)
    return {
        "n_tests": int(p.size),
        "inflation": float(np.median(chi2) / _sps.chi2.ppf(0.5, df=1)),
        "n_null_hits": int((benjamini_hochberg(p) < fdr).sum()),
        "share_below_0_05": float((p < 0.05).mean()),
        "ks_pvalue": float(_sps.kstest(p, "uniform").pvalue),
    }
