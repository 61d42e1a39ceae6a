"""Figures for the four reports (scanpy's ``pl``): every figure titled, axes labelled.

Each function draws with pyplot and returns the Figure; in a notebook end the call with
``;`` so the inline backend shows it once. No backend is set here (setting ``Agg`` would
silently drop every figure from the reports).
"""

from ._figures import (
    CONTROL_COLOR,
    MAX_GROUPS_SHOWN,
    MAX_HEATMAP_ROWS,
    N_HEATMAP_WITHOUT_HIT,
    N_SHOWN_WITHOUT_HIT,
    PALETTE,
    cell_cycle_phases,
    cells_per_group,
    effect_heatmap,
    enrichment_dotplot,
    gene_selection,
    guide_effects,
    k_selection,
    loadings_heatmap,
    null_qq,
    objective_trace,
    program_boxplots,
    qc_distributions,
    restart_similarity,
    similarity_heatmap,
    split_half_scatter,
    usage_heatmap,
    volcano,
)
from ._embedding import perturbation_embedding, program_embedding
from ._profiles import program_profiles

__all__ = [
    "qc_distributions", "gene_selection", "cells_per_group", "cell_cycle_phases",
    "k_selection", "restart_similarity", "objective_trace", "usage_heatmap", "loadings_heatmap", "similarity_heatmap",
    "program_embedding", "program_boxplots", "effect_heatmap", "volcano", "guide_effects", "split_half_scatter",
    "null_qq", "perturbation_embedding", "program_profiles", "enrichment_dotplot",
    "CONTROL_COLOR", "PALETTE", "MAX_GROUPS_SHOWN", "MAX_HEATMAP_ROWS", "N_SHOWN_WITHOUT_HIT", "N_HEATMAP_WITHOUT_HIT",
]
