"""The hit tables of the report: step 3's contrasts told with step 4's program labels."""

from __future__ import annotations

import pandas as pd

from ._contrasts import significant_pairs

__all__ = ["with_labels", "top_hit_programs"]


def with_labels(contrasts: pd.DataFrame, label_of: dict[str, str]) -> pd.DataFrame:
    """``contrasts`` with a ``label`` column (third) naming each row's program by ``label_of``."""
    labelled = contrasts.copy()
    labelled.insert(2, "label", labelled["program"].map(label_of))
    return labelled


def top_hit_programs(contrasts: pd.DataFrame, fdr: float, n: int) -> list[str]:
    """Programs with the strongest hits (smallest q first), at most ``n``."""
    return list(dict.fromkeys(significant_pairs(contrasts, fdr)["program"]))[:n]
