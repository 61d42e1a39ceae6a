"""Replication columns for a contrasts table: do a target's guides, and the batches, agree?

:func:`add_consistency` adds three independent checks to every perturbation x program row
of a :func:`perturbnmf.tl.program_contrasts` table: guide agreement (how many of the
target's guides shift the program in the row's direction), guide heterogeneity (do the
guides differ from each other) and batch agreement (how many batches show the shift).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from ._anova import _anova_core
from ._common import (
    _as_labels,
    _as_usage,
    _batch_adjusted_effect,
    _batch_differences,
    _batch_sums,
    _check_control,
    _check_min_cells,
    _group_sums,
    _pair_codes,
)

__all__ = ["add_consistency"]

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
    control_label, min_cells = _defaults_from_table(contrasts, control_label, min_cells)
    usage = _as_usage(usage)
    g = _as_labels(groups, usage, "groups")
    b = None if batch is None else _as_labels(batch, usage, "batch")
    guide = None if guides is None else _as_labels(guides, usage, "guides")
    is_control = _check_control(g, control_label)
    # guide effects are defined as the table's effect: batch-adjusted when its test used the batches
    adjusted = contrasts.attrs.get("method") in ("ols_batch", "mannwhitney") and bool(
        contrasts.attrs.get("batch_adjusted", False)
    )
    if adjusted and guide is not None and b is None:
        raise ValueError(
            f"contrasts has batch-adjusted effects (method={contrasts.attrs.get('method')!r}); pass the same "
            "batch labels so that guide effects are defined the same way"
        )

    targets = pd.Index(pd.unique(g[~is_control]))
    rows = _contrast_rows(contrasts, usage, targets, control_label)
    Y = usage.to_numpy(dtype=float)
    Y_ctrl, Y_pert = Y[is_control], Y[~is_control]
    t_codes = targets.get_indexer(g[~is_control])
    batches = None
    if b is not None:
        b_codes, b_levels = pd.factorize(b, sort=False)
        control_count, control_sum = _group_sums(b_codes[is_control], len(b_levels), Y_ctrl)
        batches = _Batches(b_codes[~is_control], len(b_levels), control_count, control_sum)

    out = _unreplicated(len(contrasts))
    if guide is not None:
        pairs = _guide_pairs(t_codes, guide[~is_control], len(targets), Y_pert, min_cells)
        out.update(_guide_agreement(pairs, Y_pert, Y_ctrl, batches if adjusted else None, rows))
        out["guide_heterogeneity_pvalue"] = _guide_heterogeneity(
            pairs, Y_pert, t_codes, None if batches is None else batches.perturbed, rows
        )
    if batches is not None:
        out.update(_batch_agreement(batches, Y_pert, t_codes, len(targets), min_cells, rows))
    out["consistency"] = _consistency_text(out, guide is not None, b is not None)

    res = contrasts.drop(columns=[c for c in CONSISTENCY_COLUMNS if c in contrasts.columns])
    res = res.assign(**{c: out[c] for c in CONSISTENCY_COLUMNS})
    res.attrs = dict(contrasts.attrs)
    res.attrs["consistency"] = {
        "min_cells": int(min_cells),
        "guide_effect": "batch-adjusted difference of means" if adjusted else "difference of means",
        "heterogeneity_test": "F-test of usage ~ C(guide)" + (" + C(batch)" if b is not None else ""),
    }
    return res


class _Rows(NamedTuple):
    """The rows of a contrasts table: each row's target code, program column and sign of its effect."""

    target: np.ndarray
    program: np.ndarray
    sign: np.ndarray

    def pick(self, table: np.ndarray) -> np.ndarray:
        """Each row's entry of a (target, program) table."""
        return table[self.target, self.program]

    def agreeing(self, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
        """Per row, how many of its target's estimates share the sign of its effect.

        ``positive``, ``negative``: (target, program) counts of the estimates > 0 and < 0.
        """
        agreeing = np.where(self.sign > 0, self.pick(positive), np.where(self.sign < 0, self.pick(negative), 0))
        return agreeing.astype(int)


class _Batches(NamedTuple):
    """Batch codes of the perturbed cells, and the control cells' count and usage sum per batch."""

    perturbed: np.ndarray
    n: int
    control_count: np.ndarray
    control_sum: np.ndarray


class _GuidePairs(NamedTuple):
    """The (target, guide) pairs of the perturbed cells; a pair counts when it has ``min_cells`` cells."""

    codes: np.ndarray  # pair of each perturbed cell
    target: np.ndarray  # target code of each pair
    count: np.ndarray  # cells per pair
    usage_sum: np.ndarray  # their usage summed, shape (n_pairs, n_programs)
    valid: np.ndarray  # whether the pair counts
    per_target: np.ndarray  # pairs that count, per target


def _defaults_from_table(contrasts: pd.DataFrame, control_label, min_cells) -> tuple[Any, int]:
    """``control_label`` and ``min_cells``, by default those of ``contrasts.attrs``; checks the table's columns."""
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
    return control_label, min_cells


def _unreplicated(n_rows: int) -> dict[str, np.ndarray]:
    """The replication columns before any guide or batch is looked at: counts 0, effects and p-values NaN."""
    return {
        "n_guides": np.zeros(n_rows, dtype=int),
        "n_guides_same_sign": np.zeros(n_rows, dtype=int),
        "guide_effect_min": np.full(n_rows, np.nan),
        "guide_effect_max": np.full(n_rows, np.nan),
        "guide_heterogeneity_pvalue": np.full(n_rows, np.nan),
        "n_batches": np.zeros(n_rows, dtype=int),
        "n_batches_same_sign": np.zeros(n_rows, dtype=int),
    }


def _contrast_rows(contrasts: pd.DataFrame, usage: pd.DataFrame, targets: pd.Index, control_label) -> _Rows:
    """Where every row of ``contrasts`` points; ``ValueError`` for a program or perturbation not in the data."""
    program_idx = pd.Index(usage.columns).get_indexer(contrasts["program"])
    if (program_idx < 0).any():
        bad = pd.unique(contrasts["program"][program_idx < 0])
        raise ValueError(f"contrasts: program(s) {list(bad[:5])} are not columns of usage")
    target_idx = targets.get_indexer(contrasts["perturbation"])
    if (target_idx < 0).any():
        bad = pd.unique(contrasts["perturbation"][target_idx < 0])
        raise ValueError(
            f"contrasts: perturbation(s) {list(map(str, bad[:5]))} are not among the perturbation labels of "
            f"groups (control {control_label!r} excluded)"
        )
    effect = contrasts["effect"].to_numpy(dtype=float)
    return _Rows(target_idx, program_idx, np.sign(np.nan_to_num(effect)))  # sign 0 for NaN: nothing agrees with it


def _sign_counts(values: np.ndarray, owner: np.ndarray, n_owner: int) -> tuple[np.ndarray, np.ndarray]:
    """Per (owner, program): how many of ``values`` (shape (k, p), owner of each row: ``owner``) are > 0 and < 0."""
    positive = np.zeros((n_owner, values.shape[1]))
    negative = np.zeros((n_owner, values.shape[1]))
    np.add.at(positive, owner, values > 0)
    np.add.at(negative, owner, values < 0)
    return positive, negative


def _guide_pairs(t_codes, guide_labels, n_targets: int, Y_pert: np.ndarray, min_cells: int) -> _GuidePairs:
    """Code the perturbed cells' (target, guide) pairs; ``t_codes``, ``guide_labels``: per perturbed cell."""
    codes, pair_target, _ = _pair_codes(t_codes, guide_labels)
    pair_target = pair_target.astype(np.int64)
    count, usage_sum = _group_sums(codes, len(pair_target), Y_pert)
    valid = count >= min_cells
    return _GuidePairs(codes, pair_target, count, usage_sum, valid,
                       np.bincount(pair_target[valid], minlength=n_targets))


def _guide_agreement(pairs: _GuidePairs, Y_pert, Y_ctrl, adjust_for: _Batches | None, rows: _Rows) -> dict:
    """The columns ``n_guides`` to ``guide_effect_max``: each counting guide's effect against all controls.

    The guide effect is the difference of means, or with ``adjust_for`` the batch-adjusted one,
    as the table's ``effect``.
    """
    if adjust_for is None:
        effect = pairs.usage_sum / np.maximum(pairs.count, 1)[:, None] - Y_ctrl.mean(axis=0)
    else:
        count, usage_sum = _batch_sums(pairs.codes, len(pairs.target), adjust_for.perturbed, adjust_for.n, Y_pert)
        effect = _batch_adjusted_effect(count, usage_sum, adjust_for.control_count, adjust_for.control_sum)
    effect, owner = effect[pairs.valid], pairs.target[pairs.valid]
    n_targets = len(pairs.per_target)
    lowest = np.full((n_targets, effect.shape[1]), np.nan)
    highest = np.full((n_targets, effect.shape[1]), np.nan)
    np.fmin.at(lowest, owner, effect)  # fmin/fmax skip NaN
    np.fmax.at(highest, owner, effect)
    return {
        "n_guides": pairs.per_target[rows.target],
        "n_guides_same_sign": rows.agreeing(*_sign_counts(effect, owner, n_targets)),
        "guide_effect_min": rows.pick(lowest),
        "guide_effect_max": rows.pick(highest),
    }


def _guide_heterogeneity(pairs: _GuidePairs, Y_pert, t_codes, batch_pert, rows: _Rows) -> np.ndarray:
    """``guide_heterogeneity_pvalue``: the F-test of ``usage ~ C(guide) [+ C(batch)]`` per target.

    Among the cells of the counting guides, for the targets of ``rows`` with at least two of
    them; ``batch_pert``: batch code of each perturbed cell, or None.
    """
    n_targets = len(pairs.per_target)
    pvalue = np.full((n_targets, Y_pert.shape[1]), np.nan)
    counting = pairs.valid[pairs.codes]
    order = np.argsort(t_codes, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(t_codes, minlength=n_targets))]
    wanted = np.unique(rows.target)
    for t in wanted[pairs.per_target[wanted] >= 2]:
        cells = order[bounds[t]: bounds[t + 1]]
        cells = cells[counting[cells]]
        guide_codes = pd.factorize(pairs.codes[cells])[0]
        batch_codes = None if batch_pert is None else pd.factorize(batch_pert[cells])[0]
        pvalue[t] = _anova_core(Y_pert[cells], guide_codes, batch_codes)[1]
    return rows.pick(pvalue)


def _batch_agreement(batches: _Batches, Y_pert, t_codes, n_targets: int, min_cells: int, rows: _Rows) -> dict:
    """``n_batches``, ``n_batches_same_sign``: the within-batch difference of means per target.

    Only batches with at least ``min_cells`` perturbed and ``min_cells`` control cells count.
    """
    count, usage_sum = _batch_sums(t_codes, n_targets, batches.perturbed, batches.n, Y_pert)
    valid = (count >= min_cells) & (batches.control_count >= min_cells)[None, :]
    effect = _batch_differences(count, usage_sum, batches.control_count, batches.control_sum)
    effect = effect.reshape(n_targets * batches.n, Y_pert.shape[1])[valid.ravel()]
    owner = np.repeat(np.arange(n_targets), batches.n)[valid.ravel()]
    return {
        "n_batches": valid.sum(axis=1)[rows.target],
        "n_batches_same_sign": rows.agreeing(*_sign_counts(effect, owner, n_targets)),
    }


def _consistency_text(out: dict, with_guides: bool, with_batch: bool) -> np.ndarray:
    """The ``consistency`` column, such as "3/4 guides, 2/2 batches agree"; "" without guides and batch."""
    parts = []
    if with_guides:
        parts.append([f"{a}/{n} guides" for a, n in zip(out["n_guides_same_sign"], out["n_guides"])])
    if with_batch:
        parts.append([f"{a}/{n} batches" for a, n in zip(out["n_batches_same_sign"], out["n_batches"])])
    return np.array(
        [", ".join(p) + " agree" for p in zip(*parts)] if parts else [""] * len(out["n_guides"]), dtype=object
    )
