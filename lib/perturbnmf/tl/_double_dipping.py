"""Double dipping: the perturbation tests on cells that did not shape the programs.

``tl.split_half`` (step 2) learns the programs again on a random half of every perturbation
group and refits the other half's usage to them; here the step's contrast test runs on that
test half with the kept programs (which saw those cells) and with the learn-half programs
(which did not). If learning and testing on the same cells inflated the results, the first
would find more and larger effects.
"""

from __future__ import annotations

import pandas as pd

from ._factorize import REPRODUCED_COSINE, split_usage, usage
from ._contrasts import program_contrasts

__all__ = ["split_half_comparison", "add_split_columns"]


def split_half_comparison(adata, groups: pd.Series, control_label: str, batch: pd.Series | None,
                          method: str) -> pd.DataFrame:
    """Test-half effects with the kept programs (they saw these cells) and with the learn-half programs.

    The step's contrast test (``method``) runs on the test-half cells twice. Returns one row per
    perturbation × program: ``effect``, ``effect_std`` and ``qvalue`` for both (suffixes
    ``_seen`` and ``_unseen``), ``cosine`` of the program with its learn-half twin and
    ``program_reproduced`` (cosine ≥ :data:`REPRODUCED_COSINE`).
    """
    def contrast_test(part: pd.DataFrame) -> pd.DataFrame:
        return program_contrasts(part, groups[part.index], control_label,
                                 batch=None if batch is None else batch[part.index], method=method)

    unseen = split_usage(adata)
    seen = usage(adata).loc[unseen.index]
    columns = ["perturbation", "program", "effect", "effect_std", "qvalue"]
    comparison = contrast_test(seen)[columns].merge(contrast_test(unseen)[columns], on=["perturbation", "program"],
                                                    suffixes=("_seen", "_unseen"))
    cosine = dict(zip(adata.uns["snmf"]["program_names"], adata.uns["snmf"]["split_half"]["cosine"]))
    comparison["cosine"] = comparison["program"].map(cosine)
    comparison["program_reproduced"] = comparison["cosine"] >= REPRODUCED_COSINE
    return comparison


def add_split_columns(contrasts: pd.DataFrame, comparison: pd.DataFrame) -> pd.DataFrame:
    """``contrasts`` with the test-half results of :func:`split_half_comparison` beside each pair:
    ``effect_split``, ``effect_std_split``, ``qvalue_split`` (learn-half programs on the test half)
    and ``split_program_cosine``."""
    split = comparison.rename(columns={"effect_unseen": "effect_split", "effect_std_unseen": "effect_std_split",
                                       "qvalue_unseen": "qvalue_split", "cosine": "split_program_cosine"})
    return contrasts.merge(split[["perturbation", "program", "effect_split", "effect_std_split", "qvalue_split",
                                  "split_program_cosine"]], on=["perturbation", "program"], how="left")
