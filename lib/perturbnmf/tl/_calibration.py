"""Calibration of the contrast test on a null built from the control cells.

:func:`control_null` runs :func:`perturbnmf.tl.program_contrasts` on pseudo-perturbations
made of control cells only, where every test is null; :func:`calibration_summary` says how
a set of such p-values behaves (inflation, null hits, uniformity).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _sps

from .._checks import check_int
from ._common import _as_labels, _as_usage, _check_min_cells
from ._contrasts import program_contrasts
from ._multitest import benjamini_hochberg

__all__ = ["control_null", "calibration_summary"]


def control_null(
    usage: pd.DataFrame,
    groups,
    control_label: str,
    guides=None,
    batch=None,
    n_pseudo: int = 20,
    seed: int = 0,
    min_cells: int = 2,
    method: str = "mannwhitney",
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
    method : {"welch", "ols_batch", "mannwhitney"}, default "mannwhitney"
        The test, as in :func:`program_contrasts` (with ``batch``, the batch-aware
        methods use the control cells' batches); pass the one of the real analysis.

    Returns
    -------
    DataFrame
        :func:`program_contrasts` columns (``perturbation`` holds the pseudo-group's name) plus
        ``null_split`` ("control guide" or "random"); q-values are BH over this table.
    """
    _check_min_cells(min_cells)
    check_int("n_pseudo", n_pseudo, 1)
    usage = _as_usage(usage)
    g = _as_labels(groups, usage, "groups")
    is_control = g == control_label
    if is_control.sum() < 2 * min_cells:
        raise ValueError(f"control_null needs at least {2 * min_cells} control cells; found {int(is_control.sum())}.")
    control_usage = usage.loc[is_control]
    control_batch = None if batch is None else _as_labels(batch, usage, "batch")[is_control]
    guide_labels = None if guides is None else _as_labels(guides, usage, "guides")[is_control]
    split = "control guide"
    pseudo = [] if guide_labels is None else _control_guide_splits(guide_labels, min_cells)
    if not pseudo:
        split = "random"
        # real perturbation group sizes, the sizes random pseudo-groups are drawn with
        sizes = pd.Series(g[~is_control]).value_counts().to_numpy()
        pseudo = _random_splits(len(control_usage), sizes, n_pseudo, seed, min_cells)
    tables = []
    for name, mask in pseudo:
        labels = np.where(mask, name, "control")
        tables.append(program_contrasts(control_usage, labels, "control", batch=control_batch, min_cells=min_cells,
                                        method=method))
    table = pd.concat(tables, ignore_index=True)
    table["qvalue"] = benjamini_hochberg(table["pvalue"].to_numpy())
    table["null_split"] = split
    return table


def _control_guide_splits(guide_labels: np.ndarray, min_cells: int) -> list[tuple[str, np.ndarray]]:
    """Each control guide against the other control cells: (name, mask over the control cells).

    A split is testable when the guide and the remaining control cells both have ``min_cells``
    (so a single control guide, leaving no other control cells, gives none).
    """
    return [(f"null:{guide}", guide_labels == guide) for guide in sorted(np.unique(guide_labels))
            if min_cells <= np.sum(guide_labels == guide) <= len(guide_labels) - min_cells]


def _random_splits(n_control: int, sizes: np.ndarray, n_pseudo: int, seed: int,
                   min_cells: int) -> list[tuple[str, np.ndarray]]:
    """``n_pseudo`` random pseudo-groups of control cells: (name, mask over the control cells).

    Each has the size of a randomly chosen real group (``sizes``; a quarter of the controls when
    there is none), clipped to ``min_cells`` .. half of the controls.
    """
    rng = np.random.default_rng(seed)
    if sizes.size == 0:
        sizes = np.array([max(min_cells, n_control // 4)])
    sizes = np.clip(sizes, min_cells, n_control // 2)
    splits = []
    for i in range(n_pseudo):
        cells = rng.choice(n_control, int(rng.choice(sizes)), replace=False)
        mask = np.zeros(n_control, dtype=bool)
        mask[cells] = True
        splits.append((f"null:{i + 1:02d}", mask))
    return splits


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
