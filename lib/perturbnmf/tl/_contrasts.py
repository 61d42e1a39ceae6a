"""Every perturbation, or every guide, against the control cells, per program.

* :func:`program_contrasts` -- every perturbation against the control cells, per
  program (Mann-Whitney / van Elteren rank test, Welch t-test, or batch-adjusted
  OLS; effect sizes).
* :func:`guide_effects` -- the same test for every guide of every perturbation
  against all control cells.
* :func:`mark_primary`, :func:`significant_pairs` -- the hits of a contrasts table,
  and which of a perturbation's hits are its primary programs.

Choosing the contrast test
--------------------------
Usage is non-negative, skewed and zero-inflated.  In simulated screens of that
kind (``tests/test_stats_power.py``: 150 cells per perturbation, 40 % zeros) the
Welch and HC3 t-tests have uniform p-values in the bulk but ~1.8x too many below
3e-4, where BH decides the first discoveries (share of null screens with a false
discovery at q < 0.05: 0.09-0.11); the rank test (``method="mannwhitney"``, the
default) stays calibrated there (0.06) at some loss of power for multiplicative
effects, which leave the zeros tied.  With ``batch``, ``"ols_batch"`` and the
stratified rank test protect against perturbations whose cells sit in another batch
than the controls; Welch and the unstratified rank test do not.
"""

from __future__ import annotations

import warnings
from functools import cached_property

import numpy as np
import pandas as pd
from scipy import stats as _sps

from ._common import (
    _as_labels,
    _as_usage,
    _batch_adjusted_effect,
    _check_control,
    _check_min_cells,
    _format_levels,
    _pair_codes,
)
from ._multitest import benjamini_hochberg

__all__ = ["program_contrasts", "guide_effects", "mark_primary", "significant_pairs"]

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
# The tests, for all programs of one group at once
# --------------------------------------------------------------------------- #
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


class _Controls:
    """The control cells of a contrasts table, and what the test of every group reuses."""

    def __init__(self, Y: np.ndarray, batch: np.ndarray | None):
        self.Y = Y
        self.batch = batch
        self.mean = Y.mean(axis=0)
        self.var = Y.var(axis=0, ddof=1)

    @cached_property
    def rank_reference(self) -> dict:
        """:func:`_rank_reference` of the controls, computed once for the rank tests of all groups."""
        return _rank_reference(self.Y, self.batch)


# Each test compares one group's cells (usage ``Y_g``, batches ``batch_g`` or None) with the
# controls, given the group's difference of means ``effect`` and its batch-adjusted effect
# ``adjusted`` (None without batch), and returns the effect it reports, its statistic and
# p-value, each of shape (n_programs,).
def _welch_contrast(Y_g, batch_g, controls: _Controls, effect, adjusted):
    """Welch t-test; batch is ignored and the effect stays the difference of means."""
    return (effect, *_welch(Y_g, controls.Y))


def _ols_batch_contrast(Y_g, batch_g, controls: _Controls, effect, adjusted):
    """HC3 t-test of the perturbation coefficient of ``usage ~ perturbed + C(batch)``, which is the effect."""
    return _ols_batch_test(Y_g, controls.Y, batch_g, controls.batch)


def _rank_contrast(Y_g, batch_g, controls: _Controls, effect, adjusted):
    """Mann-Whitney U, or with batch van Elteren's test, whose effect is then the batch-adjusted one."""
    z, p = _rank_sum_test(Y_g, controls.rank_reference, batch_g)
    return (effect if adjusted is None else adjusted), z, p


_TESTS = {"welch": _welch_contrast, "ols_batch": _ols_batch_contrast, "mannwhitney": _rank_contrast}
METHODS = tuple(_TESTS)


# --------------------------------------------------------------------------- #
# Perturbation vs control
# --------------------------------------------------------------------------- #
def program_contrasts(
    usage: pd.DataFrame,
    groups,
    control_label: str,
    batch=None,
    min_cells: int = 2,
    method: str = "mannwhitney",
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
    method : {"welch", "ols_batch", "mannwhitney"}, default "mannwhitney"
        ``"mannwhitney"`` (recommended, see the module notes): a rank test, suited
        to usage that is non-negative, skewed and zero-inflated.  Without ``batch``
        the Mann-Whitney U test (normal approximation with tie and continuity
        correction; p-values equal ``scipy.stats.mannwhitneyu(method="asymptotic")``,
        except NaN where scipy reports 1 for all-tied values); with ``batch`` van
        Elteren's stratified test: ranks within each batch, per-batch rank sums
        weighted by ``1 / (N_b + 1)`` (``N_b`` cells of the two groups in batch
        ``b``), batches lacking perturbed or control cells contribute nothing, no
        continuity correction.  ``statistic`` is the standardised z (positive
        when perturbed usage ranks higher); ``effect`` stays a difference of
        means -- with ``batch`` the batch-adjusted one (``effect_batch_adjusted``).
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
    if method not in _TESTS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if method == "ols_batch" and batch is None:
        raise ValueError("method='ols_batch' needs the batch labels (parameter batch / batch_key)")
    usage = _as_usage(usage)
    g = _as_labels(groups, usage, "groups")
    b = None if batch is None else _as_labels(batch, usage, "batch")

    codes, levels, ctrl_code, counts = _coded_groups(g, control_label, min_cells)
    Y = usage.to_numpy(dtype=float)
    ctrl_rows = codes == ctrl_code
    controls = _Controls(Y[ctrl_rows], None if b is None else b[ctrl_rows])
    if b is not None:
        gb_count, gb_sum = _group_batch_sums(codes, len(levels), b, Y)
    order = sorted((i for i in range(len(levels)) if i != ctrl_code), key=lambda i: str(levels[i]))
    tested = [i for i in order if counts[i] >= min_cells]
    programs = np.asarray(usage.columns, dtype=object)
    blocks = []
    for i in tested:
        rows = codes == i
        adjusted = None
        if b is not None:
            adjusted = _batch_adjusted_effect(gb_count[i], gb_sum[i], gb_count[ctrl_code], gb_sum[ctrl_code])
        blocks.append(_contrast_block(programs, levels[i], Y[rows], None if b is None else b[rows], controls,
                                      _TESTS[method], adjusted))

    res = _contrast_table(blocks, batch_adjusted=b is not None)
    res.attrs["skipped_groups"] = [levels[i] for i in order if counts[i] < min_cells]
    res.attrs["control_label"] = control_label
    res.attrs["min_cells"] = int(min_cells)
    res.attrs["batch_adjusted"] = b is not None
    res.attrs["method"] = method
    return res


def _coded_groups(g: np.ndarray, control_label, min_cells: int) -> tuple[np.ndarray, list, int, np.ndarray]:
    """Group code of every cell, the groups, the control's code and the cells per group.

    ``ValueError`` when the control is not among the groups or has fewer than ``min_cells`` cells.
    """
    codes, levels = pd.factorize(g, sort=False)
    levels = list(levels)
    if control_label not in levels:
        raise ValueError(
            f"control_label {control_label!r} is not among the {len(levels)} groups: "
            f"{_format_levels(levels)}"
        )
    ctrl_code = levels.index(control_label)
    counts = np.bincount(codes, minlength=len(levels))
    if counts[ctrl_code] < min_cells:
        raise ValueError(
            f"control group {control_label!r} has {int(counts[ctrl_code])} cell(s), fewer than min_cells={min_cells}"
        )
    return codes, levels, ctrl_code, counts


def _group_batch_sums(codes: np.ndarray, n_levels: int, b: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells and usage sums per (group, batch), shapes (n_levels, n_batches), (n_levels, n_batches, p).

    Summed cell by cell (np.add.at), not by :func:`_common._batch_sums`, whose np.add.reduceat
    rounds differently: the batch-adjusted effects stay bit-identical to those of earlier runs.
    """
    b_codes, b_levels = pd.factorize(b, sort=False)
    n_b = len(b_levels)
    gb = codes * n_b + b_codes
    gb_count = np.bincount(gb, minlength=n_levels * n_b).reshape(n_levels, n_b)
    gb_sum = np.zeros((n_levels * n_b, Y.shape[1]))
    np.add.at(gb_sum, gb, Y)
    return gb_count, gb_sum.reshape(n_levels, n_b, Y.shape[1])


def _contrast_block(programs, label, Y_g, batch_g, controls: _Controls, test, adjusted) -> pd.DataFrame:
    """One group's rows of the contrasts table (no q-values yet): means, the test's effect, statistic, p-value."""
    n_g, n_c = len(Y_g), len(controls.Y)
    mean_g = Y_g.mean(axis=0)
    effect, statistic, pvalue = test(Y_g, batch_g, controls, mean_g - controls.mean, adjusted)
    pooled_sd = np.sqrt(((n_g - 1) * Y_g.var(axis=0, ddof=1) + (n_c - 1) * controls.var) / (n_g + n_c - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        effect_std = np.where(pooled_sd > 0, effect / pooled_sd, np.nan)
    block = {
        "program": programs,
        "perturbation": np.full(len(programs), label, dtype=object),
        "n_cells": np.full(len(programs), n_g, dtype=int),
        "n_control": np.full(len(programs), n_c, dtype=int),
        "mean_perturbed": mean_g,
        "mean_control": controls.mean,
        "effect": effect,
        "effect_std": effect_std,
        "statistic": statistic,
        "pvalue": pvalue,
    }
    if adjusted is not None:
        block["effect_batch_adjusted"] = adjusted
    return pd.DataFrame(block)


def _contrast_table(blocks: list[pd.DataFrame], batch_adjusted: bool) -> pd.DataFrame:
    """The groups' blocks stacked, with q-values by BH over the whole table, in the documented column order."""
    columns = CONTRAST_COLUMNS + (["effect_batch_adjusted"] if batch_adjusted else [])
    if not blocks:
        return _empty_contrasts(columns)
    res = pd.concat(blocks, ignore_index=True)
    res["qvalue"] = benjamini_hochberg(res["pvalue"].to_numpy())
    return res[columns]


def _empty_contrasts(columns: list[str]) -> pd.DataFrame:
    dtypes = {
        "program": object,
        "perturbation": object,
        "n_cells": int,
        "n_control": int,
    }
    return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, float)) for c in columns})


# --------------------------------------------------------------------------- #
# Guides
# --------------------------------------------------------------------------- #
def guide_effects(
    usage: pd.DataFrame,
    groups,
    guides,
    control_label: str,
    batch=None,
    min_cells: int = 2,
    method: str = "mannwhitney",
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
    method : {"welch", "ols_batch", "mannwhitney"}, default "mannwhitney"
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


# --------------------------------------------------------------------------- #
# Hits
# --------------------------------------------------------------------------- #
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
