"""What each program is: gene-set libraries, over-representation, prerank and labels."""

from ...errors import LibraryUnavailableError
from ._enrichment import (
    ENRICHMENT_COLUMNS,
    LABEL_COLUMNS,
    PRERANK_COLUMNS,
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

__all__ = ["read_gmt", "load_library", "top_genes", "over_representation", "top_terms", "prerank", "tidy_term",
           "program_labels", "LibraryUnavailableError", "TOP_GENES_COLUMNS", "ENRICHMENT_COLUMNS", "PRERANK_COLUMNS", "LABEL_COLUMNS"]
