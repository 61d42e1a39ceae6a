"""What each program is: gene-set libraries, over-representation, prerank and labels.

Workflow: :func:`top_genes` lists the top positively and negatively loaded genes of every
program; :func:`over_representation` tests these lists against gene-set libraries (read with
:func:`read_gmt` or :func:`load_library`) within the background, and :func:`top_terms` picks
the best significant terms per list; :func:`prerank` tests the whole loading vectors instead;
:func:`program_labels` names each program from either table.  Only :func:`load_library`, given
an Enrichr library name, may use the network.

Modules: ``_gmt`` (libraries), ``_ora`` (top genes and over-representation), ``_prerank``,
``_labels``, and ``_common`` (the helpers over-representation and prerank share).
"""

from ...errors import LibraryUnavailableError
from ._gmt import load_library, read_gmt
from ._labels import LABEL_COLUMNS, program_labels, tidy_term
from ._ora import ENRICHMENT_COLUMNS, TOP_GENES_COLUMNS, over_representation, top_genes, top_terms
from ._prerank import PRERANK_COLUMNS, prerank

__all__ = ["read_gmt", "load_library", "top_genes", "over_representation", "top_terms", "prerank", "tidy_term",
           "program_labels", "LibraryUnavailableError", "TOP_GENES_COLUMNS", "ENRICHMENT_COLUMNS", "PRERANK_COLUMNS", "LABEL_COLUMNS"]
