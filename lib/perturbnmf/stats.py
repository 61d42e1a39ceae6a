"""Perturbation statistics on gene-program usage.

Semi-NMF gives every cell a non-negative *usage* of every gene program (a
``cells x programs`` DataFrame, columns such as ``"P01"``).  This module tests
which programs respond to the perturbations:

* :func:`program_anova` -- one omnibus F-test per program: does usage differ
  between perturbation groups at all (optionally adjusting for batch)?
* :func:`program_contrasts` -- every perturbation against the control cells,
  per program (Welch t-test, effect sizes).
* :func:`control_null`, :func:`calibration_summary` -- the same contrast test on
  pseudo-perturbations of control cells only, and how its p-values behave.
* :func:`benjamini_hochberg` -- the FDR correction used by both (and by
  :mod:`perturbnmf.enrichment`).

Alignment of labels
-------------------
``groups`` and ``batch`` may be arrays (matched to the rows of ``usage`` by
position) or :class:`pandas.Series`.  A Series whose index is not identical to
``usage.index`` is re-ordered to it when both indexes hold the same unique
labels; otherwise a ``ValueError`` is raised (pass ``series.to_numpy()`` to
match by position instead).  This avoids silently mis-assigning labels.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _sps

__all__ = ["benjamini_hochberg", "program_anova", "program_contrasts", "control_null", "calibration_summary"]

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


# --------------------------------------------------------------------------- #
# Multiple testing
# --------------------------------------------------------------------------- #
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
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    np.minimum(ranked, 1.0, out=ranked)
    qv = np.empty(m)
    qv[order] = ranked
    q[ok] = qv
    return q


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
        and ``eta_squared`` are NaN for a program with constant usage, and
        ``F``/``pvalue`` are NaN when ``df_group`` or ``df_resid`` is 0.

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
    n = Y.shape[0]
    # Both models contain the intercept: centring Y removes it exactly and
    # improves the conditioning of the least-squares problems.
    Yc = Y - Y.mean(axis=0)
    parts_red = [np.ones((n, 1))]
    if b is not None:
        b_codes, b_levels = pd.factorize(b, sort=False)
        parts_red.append(_dummies(b_codes, len(b_levels)))
    X_red = np.hstack(parts_red)
    X_full = np.hstack([X_red, _dummies(g_codes, len(g_levels))])

    fit_full, rank_full = _fitted(X_full, Yc)
    if X_red.shape[1] == 1:
        fit_red, rank_red = np.zeros_like(Yc), 1  # centred data: intercept fit is 0
    else:
        fit_red, rank_red = _fitted(X_red, Yc)

    ss_group = np.sum((fit_full - fit_red) ** 2, axis=0)
    ss_resid = np.sum((Yc - fit_full) ** 2, axis=0)
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
        (t distribution, residual degrees of freedom).
    """
    Y = np.vstack([Y_g, Y_c])
    indicator = np.r_[np.ones(len(Y_g)), np.zeros(len(Y_c))]
    batch_codes, _ = pd.factorize(np.r_[batch_g, batch_c])
    dummies = np.eye(batch_codes.max() + 1)[batch_codes][:, 1:]
    D = np.column_stack([np.ones(len(Y)), indicator, dummies])
    pinv = np.linalg.pinv(D)
    rank = np.linalg.matrix_rank(D)
    leverage = np.einsum("ij,ji->i", D, pinv)
    coef = pinv @ Y
    residual = Y - D @ coef
    weights = (pinv[1] / np.clip(1.0 - leverage, 1e-12, None)) ** 2
    se = np.sqrt(weights @ residual**2)
    df = max(len(Y) - rank, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, coef[1] / se, np.nan)
    return coef[1], t, 2.0 * _sps.t.sf(np.abs(t), df)


def program_contrasts(
    usage: pd.DataFrame,
    groups,
    control_label: str,
    batch=None,
    min_cells: int = 2,
    method: str = "welch",
) -> pd.DataFrame:
    """Every perturbation against the control cells, per program (Welch t-test).

    For every group ``g != control_label`` with at least ``min_cells`` cells and
    every program, usage in the ``g`` cells is compared with usage in the
    control cells by ``scipy.stats.ttest_ind(equal_var=False)`` (one vectorised
    call per group).  q-values are Benjamini-Hochberg over **all**
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
        Batch label per cell.  The t-test does not use it yet (a batch-aware
        test is planned); when given, the column ``effect_batch_adjusted`` is
        appended: ``sum_b w_b (mean_perturbed_b - mean_control_b) / sum_b w_b``
        with ``w_b`` = number of perturbed cells in batch ``b``, over the
        batches that contain both perturbed and control cells (NaN if none).
    min_cells : int, default 2
        Groups with fewer cells are skipped (listed in
        ``result.attrs["skipped_groups"]``).  Must be >= 2 (a variance needs two
        cells); the control group must also reach it.
    method : {"welch", "ols_batch"}, default "welch"
        ``"welch"``: Welch t-test of perturbed vs control cells. ``"ols_batch"``
        (needs ``batch``): the perturbation coefficient of ``usage ~ perturbed +
        C(batch)`` with HC3 standard errors, so a perturbation whose cells sit in
        another batch than the controls is not credited with the batch's shift;
        ``effect`` and ``statistic`` are then the batch-adjusted difference and its t.

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
        ``statistic`` (Welch t), ``pvalue``, ``qvalue``
        [, ``effect_batch_adjusted``].

        A program that is constant within both the perturbed and the control
        cells gets ``statistic``/``pvalue`` NaN and is excluded from BH.

        ``attrs``: ``skipped_groups`` (list of labels with < ``min_cells``
        cells, sorted as strings), ``control_label``, ``min_cells``,
        ``batch_adjusted`` (bool; whether ``effect_batch_adjusted`` is present).

    Raises
    ------
    ValueError
        ``control_label`` not among the groups (the message lists them), the
        control has fewer than ``min_cells`` cells, ``min_cells < 2``, or
        invalid inputs (see :func:`program_anova`).
    """
    if isinstance(min_cells, bool) or not isinstance(min_cells, (int, np.integer)) or min_cells < 2:
        raise ValueError(f"min_cells must be an integer >= 2 (Welch's test needs a variance), got {min_cells!r}")
    if method not in ("welch", "ols_batch"):
        raise ValueError(f"method must be 'welch' or 'ols_batch', got {method!r}")
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
        if method == "ols_batch":
            effect, t, p = _ols_batch_test(Yg, Yc, b[codes == i], b[ctrl_rows])
            with np.errstate(divide="ignore", invalid="ignore"):
                effect_std = np.where(pooled_sd > 0, effect / pooled_sd, np.nan)
        else:
            t, p = _welch(Yg, Yc)
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
        if b is not None:
            both = (gb_count[i] > 0) & (gb_count[ctrl_code] > 0)
            if both.any():
                w = gb_count[i, both].astype(float)
                m_g = gb_sum[i, both] / w[:, None]
                m_c = gb_sum[ctrl_code, both] / gb_count[ctrl_code, both][:, None]
                block["effect_batch_adjusted"] = (w[:, None] * (m_g - m_c)).sum(axis=0) / w.sum()
            else:
                block["effect_batch_adjusted"] = np.full(n_prog, np.nan)
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
    perturbation has. Otherwise ``n_pseudo`` random pseudo-groups are drawn from the control
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
    method : str
        The test, as in :func:`program_contrasts`.

    Returns
    -------
    DataFrame
        :func:`program_contrasts` columns (``perturbation`` holds the pseudo-group's name) plus
        ``null_split`` ("control guide" or "random"); q-values are BH over this table.
    """
    usage = _as_usage(usage)
    g = _as_labels(groups, usage, "groups")
    is_control = g == control_label
    if is_control.sum() < 2 * min_cells:
        raise ValueError(f"control_null needs at least {2 * min_cells} control cells; found {int(is_control.sum())}.")
    control_usage = usage.loc[is_control]
    control_batch = None if batch is None else _as_labels(batch, usage, "batch")[is_control]
    guide_labels = None if guides is None else _as_labels(guides, usage, "guides")[is_control]
    if guide_labels is not None and len(np.unique(guide_labels)) >= 2:
        split = "control guide"
        pseudo = [(f"null:{guide}", guide_labels == guide) for guide in sorted(np.unique(guide_labels))]
    else:
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
