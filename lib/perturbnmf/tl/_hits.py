"""The hit tables of the report: step 3's contrasts told with step 4's program labels."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._contrasts import significant_pairs

__all__ = ["with_labels", "top_hit_programs", "perturbation_summary", "top_targets", "SUMMARY_COLUMNS"]

#: Columns of :func:`perturbation_summary`, in order.
SUMMARY_COLUMNS = ["perturbation", "n_cells", "n_hits", "strongest_program", "effect_std", "qvalue",
                   "programs_up", "programs_down"]


def with_labels(contrasts: pd.DataFrame, label_of: dict[str, str]) -> pd.DataFrame:
    """``contrasts`` with a ``label`` column (third) naming each row's program by ``label_of``."""
    labelled = contrasts.copy()
    labelled.insert(2, "label", labelled["program"].map(label_of))
    return labelled


def top_hit_programs(contrasts: pd.DataFrame, fdr: float, n: int) -> list[str]:
    """Programs with the strongest hits (smallest q first), at most ``n``."""
    return list(dict.fromkeys(significant_pairs(contrasts, fdr)["program"]))[:n]


def perturbation_summary(contrasts: pd.DataFrame, fdr: float) -> pd.DataFrame:
    """One row per tested perturbation: what it did to the programs, for a reader looking up *their* target.

    Parameters
    ----------
    contrasts : DataFrame
        :func:`program_contrasts` output (one row per perturbation × program: ``perturbation``,
        ``program``, ``n_cells``, ``effect_std``, ``qvalue``).

    Returns
    -------
    DataFrame
        Columns :data:`SUMMARY_COLUMNS`: ``n_hits`` = programs shifted at q < ``fdr``;
        ``strongest_program`` = the hit with the largest ``|effect_std|`` (the primary program), or
        without a hit the program with the smallest q, and its ``effect_std`` (Cohen's d) and
        ``qvalue``; ``programs_up`` / ``programs_down`` = the hit programs raised / lowered, largest
        ``|d|`` first ("" when none). Perturbations with the most hits first, then by q.
    """
    hit = (contrasts["qvalue"] < fdr).to_numpy()
    size = contrasts["effect_std"].abs().fillna(0.0).to_numpy()
    # hits before non-hits; among hits the largest |d|, among the rest the smallest q
    ranked = contrasts.assign(_hit=hit, _rank=np.where(hit, -size, contrasts["qvalue"].fillna(np.inf)))
    ranked = ranked.sort_values(["perturbation", "_hit", "_rank"], ascending=[True, False, True], kind="stable")
    strongest = ranked.drop_duplicates("perturbation").set_index("perturbation")
    hits = ranked[ranked["_hit"]]
    listed = {side: hits[sign * hits["effect_std"] > 0].groupby("perturbation")["program"].agg(", ".join)
              for side, sign in (("programs_up", 1), ("programs_down", -1))}
    summary = pd.DataFrame({
        "perturbation": strongest.index,
        "n_cells": strongest["n_cells"].to_numpy(),
        "n_hits": hits.groupby("perturbation").size().reindex(strongest.index, fill_value=0).to_numpy(),
        "strongest_program": strongest["program"].to_numpy(),
        "effect_std": strongest["effect_std"].to_numpy(),
        "qvalue": strongest["qvalue"].to_numpy(),
        **{side: programs.reindex(strongest.index, fill_value="").to_numpy() for side, programs in listed.items()},
    })
    return summary.sort_values(["n_hits", "qvalue", "perturbation"], ascending=[False, True, True],
                               kind="stable", ignore_index=True)


def top_targets(summary: pd.DataFrame, n: int) -> list[str]:
    """The ``n`` perturbations with the most hits, ties by their largest ``|effect_std|`` (then by name);
    perturbations without a hit are not listed.

    ``summary``: :func:`perturbation_summary` output, whose ``effect_std`` of a perturbation with a hit
    is that of its hit with the largest ``|effect_std|``.
    """
    with_hits = summary[summary["n_hits"] > 0]
    ordered = with_hits.assign(_size=with_hits["effect_std"].abs()).sort_values(
        ["n_hits", "_size", "perturbation"], ascending=[False, False, True], kind="stable")
    return ordered["perturbation"].head(n).tolist()
