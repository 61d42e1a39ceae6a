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
from typing import NamedTuple

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


class _Strata(NamedTuple):
    """The strata of the rank tests of many groups: one per (tested group, control batch) holding cells.

    ``cells``: the tested cells that belong to a stratum, in the data's order; ``stratum``: each one's
    stratum, numbered ``row * n_levels + level`` (``row``: its group's row in the result, ``level``: its
    batch's position among ``keys``, the batches of the reference, or ``[None]`` without batches).
    """

    cells: np.ndarray
    stratum: np.ndarray
    level: np.ndarray
    n_levels: int
    keys: list


def _strata(codes: np.ndarray, tested: np.ndarray, reference: dict, batch) -> _Strata:
    """Every tested cell with its stratum; cells of a batch without control cells belong to none (as in
    van Elteren's test, such a batch contributes nothing)."""
    row_of = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
    row_of[tested] = np.arange(len(tested))
    cells = np.flatnonzero(row_of[codes] >= 0)
    keys = list(reference)
    if batch is None:
        level = np.zeros(len(cells), dtype=np.int64)
    else:
        level = pd.Index(keys).get_indexer(batch[cells]).astype(np.int64)
        cells, level = cells[level >= 0], level[level >= 0]
    return _Strata(cells, row_of[codes[cells]] * len(keys) + level, level, len(keys), keys)


def _rank_sums(Y: np.ndarray, strata: _Strata, reference: dict) -> tuple[np.ndarray, np.ndarray]:
    """U statistic and pooled tie term of every stratum and program, shapes (n_strata_codes, p).

    Per stratum: ``U = sum_i (#{c < a_i} +
    #{c = a_i} / 2)`` by binary search in the batch's sorted controls, and the tie term
    ``tie_c + tie_a + cross`` with the stratum's runs of equal values taken in ascending order — the
    same sums of the same (integer) terms, so the same numbers.
    """
    n_codes, p = (int(strata.stratum.max()) + 1 if len(strata.stratum) else 0), Y.shape[1]
    below, equal = np.zeros((n_codes, p)), np.zeros((n_codes, p))
    tie_a, cross, tie_c = np.zeros((n_codes, p)), np.zeros((n_codes, p)), np.zeros((n_codes, p))
    for level, key in enumerate(strata.keys):
        sorted_c, tie_ref = reference[key]
        mine = strata.level == level
        cells, stratum = strata.cells[mine], strata.stratum[mine]
        tie_c[np.unique(stratum)] = tie_ref
        for j in range(p):
            values = Y[cells, j]
            lo = np.searchsorted(sorted_c[j], values, side="left")
            hi = np.searchsorted(sorted_c[j], values, side="right")
            below[:, j] += np.bincount(stratum, weights=lo.astype(float), minlength=n_codes)
            equal[:, j] += np.bincount(stratum, weights=(hi - lo).astype(float), minlength=n_codes)
            own_ties, crossed = _tie_terms(values, stratum, (hi - lo).astype(float), n_codes)
            tie_a[:, j] += own_ties  # each stratum lies in one batch: the other batches add 0.0
            cross[:, j] += crossed
    return below + 0.5 * equal, tie_c + tie_a + cross


def _tie_terms(values: np.ndarray, stratum: np.ndarray, equal_c: np.ndarray, n_codes: int):
    """Per stratum: ``sum (t^3 - t)`` over its runs of equal values, and ``sum 3 t t_c (t + t_c)`` with
    ``t_c`` the controls equal to the run's value (``equal_c``, per cell); runs in ascending order."""
    order = np.lexsort((values, stratum))
    v, s = values[order], stratum[order]
    new_run = np.ones(len(v), dtype=bool)
    new_run[1:] = (v[1:] != v[:-1]) | (s[1:] != s[:-1])
    starts = np.flatnonzero(new_run)
    t_a = np.diff(np.r_[starts, len(v)]).astype(float)
    t_c = equal_c[order][starts]
    owner = s[starts]
    return (np.bincount(owner, weights=t_a**3 - t_a, minlength=n_codes),
            np.bincount(owner, weights=3.0 * t_a * t_c * (t_a + t_c), minlength=n_codes))


def _strata_in_order(strata: _Strata) -> tuple[np.ndarray, np.ndarray]:
    """The strata present, and each one's rank among its group's strata by first appearance in the data
    (``pd.unique`` of the group's batches)."""
    present, first = np.unique(strata.stratum, return_index=True)
    row = present // strata.n_levels
    order = np.lexsort((first, row))
    present, row = present[order], row[order]
    starts = np.r_[0, np.flatnonzero(np.diff(row)) + 1]
    rank = np.arange(len(present)) - np.repeat(starts, np.diff(np.r_[starts, len(present)]))
    return present, rank


def _rank_sum_tests(Y: np.ndarray, codes: np.ndarray, tested: np.ndarray, reference: dict,
                    batch=None) -> tuple[np.ndarray, np.ndarray]:
    """Mann-Whitney U test per program, or van Elteren's stratified version with batches, for every
    tested group against the controls at once.

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

    Vectorised over groups (a genome-wide screen has 10,000 targets and 30,000 guides): the rank
    sums of all groups come from one binary search of all tested cells per batch and program
    (:func:`_rank_sums`, exact integer sums); each group's strata are then combined in the order
    of their first appearance in the group's cells, with the arithmetic of a one-group loop, so
    each group's numbers do not depend on the other groups.

    Parameters
    ----------
    Y : ndarray, shape (n_cells, n_programs)
    codes : ndarray of int, shape (n_cells,)
        Group code of every cell.
    tested : ndarray of int
        The codes to test, in the order of the result's rows.
    reference : dict
        :func:`_rank_reference` of the control cells (with batches iff ``batch``).
    batch : ndarray, shape (n_cells,), optional
        Batch of every cell.

    Returns
    -------
    z, p : ndarrays of shape (len(tested), n_programs)
        Signed standardised statistic (positive: perturbed usage ranks higher) and
        two-sided p-value; NaN where the compared cells are all tied or no batch holds
        both kinds of cell.
    """
    strata = _strata(codes, tested, reference, batch)
    n_groups, p = len(tested), Y.shape[1]
    continuity = batch is None
    dev, var, var_no_ties = np.zeros((n_groups, p)), np.zeros((n_groups, p)), np.zeros(n_groups)
    if len(strata.cells):
        U, tie = _rank_sums(Y, strata, reference)
        n1_all = np.bincount(strata.stratum, minlength=len(U))
        n0_of_level = np.array([reference[key][0].shape[1] for key in strata.keys], dtype=np.int64)
        present, rank = _strata_in_order(strata)
        for r in range(strata.n_levels):
            code = present[rank == r]
            row = code // strata.n_levels
            n1, n0 = n1_all[code].astype(np.int64), n0_of_level[code % strata.n_levels]
            n = n1 + n0
            weight = np.ones(len(code)) if continuity else 1.0 / (n + 1)
            squared = np.array([float(w) ** 2 for w in weight])  # Python's power, as the one-group test
            dev[row] += weight[:, None] * (U[code] - (n1 * n0 / 2.0)[:, None])
            var[row] += (squared * n1 * n0 / 12.0)[:, None] * ((n + 1)[:, None] - tie[code] / (n * (n - 1))[:, None])
            var_no_ties[row] += squared * n1 * n0 / 12.0 * (n + 1)
    if continuity:
        dev = np.sign(dev) * np.maximum(np.abs(dev) - 0.5, 0.0)
    ok = var > 1e-10 * var_no_ties[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(ok, dev / np.sqrt(np.where(ok, var, 1.0)), np.nan)
    return z, np.minimum(1.0, 2.0 * _sps.norm.sf(np.abs(z)))


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


class _Groups(NamedTuple):
    """The tested groups: the data, each cell's group code, the codes tested (in the table's order) and
    where each group's cells lie (``order[bounds[c]:bounds[c + 1]]``: the cells of code ``c``, in the data's
    order, so each group's usage is the very array a boolean mask would select)."""

    Y: np.ndarray
    codes: np.ndarray
    batch: np.ndarray | None
    tested: np.ndarray
    order: np.ndarray
    bounds: np.ndarray

    def cells(self, code: int) -> np.ndarray:
        return self.order[self.bounds[code]: self.bounds[code + 1]]


def _groups(Y: np.ndarray, codes: np.ndarray, batch, tested: list[int]) -> _Groups:
    order = np.argsort(codes, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(codes))]
    return _Groups(Y, codes, batch, np.asarray(tested, dtype=np.int64), order, bounds)


# Each test compares every tested group's cells with the controls, given the groups' differences of
# means ``effect`` and batch-adjusted effects ``adjusted`` (None without batch), and returns the effect
# it reports, its statistic and p-value, each of shape (n_tested, n_programs).
def _per_group(test):
    """The test of one group (``test(Y_g, batch_g, controls, effect_g)`` -> effect, statistic, p-value of
    shape (n_programs,)), run group by group."""
    def run(groups: _Groups, controls: _Controls, effect, adjusted):
        results = [test(groups.Y[cells], None if groups.batch is None else groups.batch[cells], controls, effect[row])
                   for row, cells in enumerate(map(groups.cells, groups.tested))]
        return tuple(np.array(part, dtype=float) for part in zip(*results))
    return run


def _welch_contrast(Y_g, batch_g, controls: _Controls, effect):
    """Welch t-test; batch is ignored and the effect stays the difference of means."""
    return (effect, *_welch(Y_g, controls.Y))


def _ols_batch_contrast(Y_g, batch_g, controls: _Controls, effect):
    """HC3 t-test of the perturbation coefficient of ``usage ~ perturbed + C(batch)``, which is the effect."""
    return _ols_batch_test(Y_g, controls.Y, batch_g, controls.batch)


def _rank_contrast(groups: _Groups, controls: _Controls, effect, adjusted):
    """Mann-Whitney U, or with batch van Elteren's test, whose effect is then the batch-adjusted one;
    all groups at once."""
    z, p = _rank_sum_tests(groups.Y, groups.codes, groups.tested, controls.rank_reference, groups.batch)
    return (effect if adjusted is None else adjusted), z, p


_TESTS = {"welch": _per_group(_welch_contrast), "ols_batch": _per_group(_ols_batch_contrast),
          "mannwhitney": _rank_contrast}
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
    order = sorted((i for i in range(len(levels)) if i != ctrl_code), key=lambda i: str(levels[i]))
    groups = _groups(Y, codes, b, [i for i in order if counts[i] >= min_cells])
    adjusted = None
    if b is not None:
        gb_count, gb_sum = _group_batch_sums(codes, len(levels), b, Y)
        adjusted = np.zeros((len(groups.tested), Y.shape[1]))
        for row, i in enumerate(groups.tested):
            adjusted[row] = _batch_adjusted_effect(gb_count[i], gb_sum[i], gb_count[ctrl_code], gb_sum[ctrl_code])
    res = _contrast_table(groups, levels, np.asarray(usage.columns, dtype=object), controls, _TESTS[method],
                          adjusted)
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


def _group_moments(groups: _Groups) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance (ddof 1) of every tested group's usage, shapes (n_tested, n_programs)."""
    mean = np.empty((len(groups.tested), groups.Y.shape[1]))
    var = np.empty_like(mean)
    for row, code in enumerate(groups.tested):
        Y_g = groups.Y[groups.cells(code)]
        mean[row] = Y_g.mean(axis=0)
        var[row] = Y_g.var(axis=0, ddof=1)
    return mean, var


def _contrast_table(groups: _Groups, levels: list, programs: np.ndarray, controls: _Controls, test,
                    adjusted: np.ndarray | None) -> pd.DataFrame:
    """The contrasts table: per tested group and program, means, the test's effect, statistic and p-value,
    Cohen's d; q-values by BH over the whole table; the documented column order."""
    columns = CONTRAST_COLUMNS + (["effect_batch_adjusted"] if adjusted is not None else [])
    if not len(groups.tested):
        return _empty_contrasts(columns)
    mean_g, var_g = _group_moments(groups)
    n_g, n_c = np.diff(groups.bounds)[groups.tested], len(controls.Y)
    effect, statistic, pvalue = test(groups, controls, mean_g - controls.mean, adjusted)
    pooled_sd = np.sqrt(((n_g - 1)[:, None] * var_g + (n_c - 1) * controls.var) / (n_g + n_c - 2)[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        effect_std = np.where(pooled_sd > 0, effect / pooled_sd, np.nan)
    n_groups, n_programs = mean_g.shape
    labels = np.empty(n_groups, dtype=object)
    for row, code in enumerate(groups.tested):
        labels[row] = levels[code]
    table = {
        "program": np.tile(programs, n_groups),
        "perturbation": np.repeat(labels, n_programs),
        "n_cells": np.repeat(n_g, n_programs).astype(int),
        "n_control": np.full(n_groups * n_programs, n_c, dtype=int),
        "mean_perturbed": mean_g.ravel(),
        "mean_control": np.tile(controls.mean, n_groups),
        "effect": effect.ravel(),
        "effect_std": effect_std.ravel(),
        "statistic": statistic.ravel(),
        "pvalue": pvalue.ravel(),
    }
    if adjusted is not None:
        table["effect_batch_adjusted"] = adjusted.ravel()
    res = pd.DataFrame(table)
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
