"""Input handling and per-group summaries shared by the perturbation statistics.

Every statistics function takes a ``cells x programs`` usage table and per-cell labels
(perturbation, guide, batch); this module checks and aligns them, and computes the
summaries several tests share: usage sums per group and the batch-adjusted effect.

Alignment of labels
-------------------
``groups``, ``guides`` and ``batch`` may be arrays (matched to the rows of
``usage`` by position) or :class:`pandas.Series`.  A Series whose index is not
identical to ``usage.index`` is re-ordered to it when both indexes hold the same
unique labels; otherwise a ``ValueError`` is raised (pass ``series.to_numpy()``
to match by position instead).  This avoids silently mis-assigning labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


# --------------------------------------------------------------------------- #
# Input handling
# --------------------------------------------------------------------------- #
def _as_usage(usage: Any) -> pd.DataFrame:
    """``usage`` as a numeric, finite ``cells x programs`` DataFrame (columns ``P01`` ... for an array)."""
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


def _format_levels(levels, limit: int = 20) -> str:
    """The labels sorted as strings, quoted and comma-separated; at most ``limit`` of them."""
    shown = sorted(map(str, levels))
    more = f", ... ({len(shown)} in total)" if len(shown) > limit else ""
    return ", ".join(repr(s) for s in shown[:limit]) + more


def _check_min_cells(min_cells) -> None:
    if isinstance(min_cells, bool) or not isinstance(min_cells, (int, np.integer)) or min_cells < 2:
        raise ValueError(f"min_cells must be an integer >= 2 (Welch's test needs a variance), got {min_cells!r}")


def _check_control(g: np.ndarray, control_label) -> np.ndarray:
    """Which cells are controls; ``ValueError`` listing the groups when there are none."""
    is_control = g == control_label
    if not is_control.any():
        levels = pd.unique(g)
        raise ValueError(
            f"control_label {control_label!r} is not among the {len(levels)} groups: {_format_levels(levels)}"
        )
    return is_control


# --------------------------------------------------------------------------- #
# Per-group summaries
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


def _batch_sums(
    codes: np.ndarray, n_levels: int, batch_codes: np.ndarray, n_batches: int, Y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cells and column sums of ``Y`` per (code, batch): shapes (n_levels, n_batches), (n_levels, n_batches, p)."""
    counts, sums = _group_sums(codes * n_batches + batch_codes, n_levels * n_batches, Y)
    return counts.reshape(n_levels, n_batches), sums.reshape(n_levels, n_batches, Y.shape[1])


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


def _batch_differences(count_g, sum_g, count_c, sum_c) -> np.ndarray:
    """Perturbed minus control mean usage within every batch, shape (..., n_batches, n_programs).

    Arguments as in :func:`_batch_adjusted_effect`; NaN or infinite where a batch lacks either kind of cell.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return sum_g / count_g[..., None] - sum_c / count_c[:, None]


def _batch_adjusted_effect(count_g, sum_g, count_c, sum_c) -> np.ndarray:
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

    Returns
    -------
    ndarray, shape (..., n_programs)
        ``sum_b w_b (mean_g_b - mean_c_b) / sum_b w_b`` with ``w_b = count_g[b]``, over the
        batches holding both perturbed and control cells; NaN when there is none.
    """
    count_g = np.asarray(count_g, dtype=float)
    count_c = np.asarray(count_c, dtype=float)
    both = (count_g > 0) & (count_c > 0)
    diff = np.where(both[..., None], _batch_differences(count_g, sum_g, count_c, sum_c), 0.0)
    w = np.where(both, count_g, 0.0)
    total = w.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total[..., None] > 0, (w[..., None] * diff).sum(axis=-2) / total[..., None], np.nan)
