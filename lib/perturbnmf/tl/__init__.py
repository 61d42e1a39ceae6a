"""Tools: programs from a preprocessed screen, their statistics, and what they are.

Flat, as scanpy's ``tl``: ``factorize`` (the consensus k sweep on an AnnData) and its
accessors, the perturbation statistics (ANOVA, contrasts against controls, consistency,
calibration on a null of control cells) and gene-set enrichment (``tl.enrichment``,
re-exported here). Every function is a pure computation on tables or AnnData; none writes
a file or shows anything.
"""

from ._factorize import (
    COVARIATE_KNOTS,
    REPRODUCED_COSINE,
    baseline_design,
    factorize,
    factorized_matrix,
    gene_scores,
    loadings,
    normalize_factors,
    program_names,
    regression_scores,
    split_half,
    split_usage,
    usage,
)
from ._multitest import benjamini_hochberg
from ._anova import ANOVA_COLUMNS, program_anova
from ._calibration import calibration_summary, control_null
from ._consistency import CONSISTENCY_COLUMNS, add_consistency
from ._contrasts import (
    CONTRAST_COLUMNS,
    METHODS,
    PRIMARY_SHARE,
    guide_effects,
    mark_primary,
    program_contrasts,
    significant_pairs,
)
from ._double_dipping import add_split_columns, split_half_comparison
from ._embedding import UMAP_BASIS, stratified_sample, umap
from ._hits import SUMMARY_COLUMNS, perturbation_summary, top_hit_programs, top_targets, with_labels
from . import enrichment
from .enrichment import (
    ENRICHMENT_COLUMNS,
    LABEL_COLUMNS,
    PRERANK_COLUMNS,
    LibraryUnavailableError,
    TOP_GENES_COLUMNS,
    load_library,
    over_representation,
    prerank,
    program_labels,
    read_gmt,
    tidy_term,
    top_genes,
    top_terms,
)

__all__ = [
    # factorisation
    "factorize", "factorized_matrix", "split_half", "usage", "split_usage", "loadings", "gene_scores", "program_names",
    "normalize_factors", "regression_scores", "baseline_design", "COVARIATE_KNOTS", "REPRODUCED_COSINE",
    "umap", "stratified_sample", "UMAP_BASIS",
    # statistics
    "program_anova", "program_contrasts", "guide_effects", "add_consistency", "mark_primary", "significant_pairs",
    "control_null", "calibration_summary", "benjamini_hochberg", "METHODS", "PRIMARY_SHARE", "ANOVA_COLUMNS",
    "CONTRAST_COLUMNS", "CONSISTENCY_COLUMNS", "split_half_comparison", "add_split_columns", "with_labels",
    "top_hit_programs", "perturbation_summary", "top_targets", "SUMMARY_COLUMNS",
    # enrichment
    "enrichment", "read_gmt", "load_library", "top_genes", "over_representation", "top_terms", "prerank",
    "tidy_term", "program_labels", "LibraryUnavailableError", "TOP_GENES_COLUMNS", "ENRICHMENT_COLUMNS", "PRERANK_COLUMNS", "LABEL_COLUMNS",
]
