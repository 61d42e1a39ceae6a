"""Helpers shared by over-representation and prerank: loadings checks, typed empty tables and
the indexing of gene-set libraries against the genes under test."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

__all__ = ["IndexedLibrary", "check_loadings", "empty_frame", "index_libraries", "mismatch_error"]


def check_loadings(loadings: Any, *, unique_programs: bool = False) -> np.ndarray:
    """The loadings (genes x programs DataFrame, unique gene index) as a float array; ``ValueError``
    otherwise.  ``unique_programs`` also requires unique column names."""
    if not isinstance(loadings, pd.DataFrame):
        raise ValueError("loadings must be a pandas DataFrame (genes x programs, index = genes)")
    if not loadings.index.is_unique:
        dup = loadings.index[loadings.index.duplicated()].unique()[:3].tolist()
        raise ValueError(f"loadings: gene index has duplicates, e.g. {dup}")
    if unique_programs and not loadings.columns.is_unique:
        dup = loadings.columns[loadings.columns.duplicated()].unique()[:3].tolist()
        raise ValueError(f"loadings: program columns have duplicates, e.g. {dup}")
    try:
        return loadings.to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise ValueError("loadings must be numeric") from None


def empty_frame(
    columns: Sequence[str], int_columns: Sequence[str] = (), float_columns: Sequence[str] = ()
) -> pd.DataFrame:
    """A table with no rows but the given columns and dtypes (object unless named int or float), so
    that an empty result concatenates and compares like a full one."""
    dtypes = {c: int if c in int_columns else float if c in float_columns else object for c in columns}
    return pd.DataFrame({c: pd.Series(dtype=dtype) for c, dtype in dtypes.items()})


def mismatch_error(library: str, lib_genes: list, background: list) -> ValueError:
    """The error for a library sharing no gene with the background, with the likely cause."""
    ex_bg = [str(g) for g in background[:3]]
    ex_lib = [str(g) for g in lib_genes[:3]]
    hints = []
    bg_ens = sum(str(g).upper().startswith("ENS") for g in background[:200])
    lib_ens = sum(str(g).upper().startswith("ENS") for g in lib_genes[:200])
    if (bg_ens > 0) != (lib_ens > 0):
        hints.append("one side looks like Ensembl IDs, the other like gene symbols")
    upper_bg = {str(g).upper() for g in background}
    n_ci = sum(str(g).upper() in upper_bg for g in lib_genes)
    if n_ci:
        hints.append(
            f"{n_ci} library genes match when case is ignored (mouse 'Actb' vs human 'ACTB' style symbols?)"
        )
    hint = "; ".join(hints) if hints else (
        "check the identifier type (Ensembl IDs vs gene symbols) and the species (mouse vs human symbol case)"
    )
    return ValueError(
        f"gene-set library {library!r}: none of its {len(lib_genes)} genes is in the background "
        f"({len(background)} genes) -- identifier mismatch? {hint}. "
        f"Example background genes: {ex_bg}; example library genes: {ex_lib}"
    )


class IndexedLibrary(NamedTuple):
    """The terms of one library that passed the size filter, each as positions into the genes."""

    name: Any
    terms: list
    members: list[np.ndarray]  # per term: sorted int64 positions of its genes in the gene list


def index_libraries(
    libraries: Mapping, genes: list, min_size: int, max_size: int
) -> list[IndexedLibrary]:
    """Every library's terms restricted to ``genes`` (unique), keeping those whose restricted size
    lies in ``[min_size, max_size]``, in library and term order.

    Raises ``ValueError`` for a library that is not a non-empty mapping, a term whose genes are a
    string, or a library sharing no gene with ``genes`` (checked before the size filter, so a
    library whose terms are merely too small or too large is not called a mismatch).
    """
    gene_pos = {g: i for i, g in enumerate(genes)}
    indexed = []
    for library, terms in libraries.items():
        if not isinstance(terms, Mapping) or len(terms) == 0:
            raise ValueError(f"gene-set library {library!r} must be a non-empty mapping {{term: genes}}")
        kept_terms, kept_members = [], []
        any_hit = False
        for term, term_genes in terms.items():
            if isinstance(term_genes, str):
                raise ValueError(f"library {library!r}, term {term!r}: genes must be a list, not a string")
            idx = np.asarray(sorted({gene_pos[g] for g in term_genes if g in gene_pos}), dtype=np.int64)
            any_hit = any_hit or idx.size > 0
            if min_size <= idx.size <= max_size:
                kept_terms.append(term)
                kept_members.append(idx)
        if not any_hit:
            lib_genes = list(dict.fromkeys(g for term_genes in terms.values() for g in term_genes))
            raise mismatch_error(str(library), lib_genes, genes)
        indexed.append(IndexedLibrary(library, kept_terms, kept_members))
    return indexed
