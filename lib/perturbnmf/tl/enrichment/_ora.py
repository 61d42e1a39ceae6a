"""Gene-set over-representation of gene programs (offline).

:func:`top_genes` takes the signed gene loadings of the programs and returns, per program, the
top positively and the top negatively loaded genes; :func:`over_representation` tests each of
these lists against one or several gene-set libraries (e.g. read with
:func:`~perturbnmf.tl.enrichment.read_gmt`) by the hypergeometric test within the genes that
entered the factorisation (the *background*); :func:`top_terms` picks the best significant
terms per list for reports.  Nothing here touches the network.

Statistics of :func:`over_representation`
-----------------------------------------
Per gene list and library, with ``N`` = background size, ``n`` = list genes in
the background, ``K`` = term genes in the background and ``x`` = overlap:

* ``pvalue = scipy.stats.hypergeom.sf(x - 1, N, K, n)`` (P[X >= x]),
* ``odds_ratio = x * d / max(b * c, 1)`` with ``b = K - x``, ``c = n - x``,
  ``d = N - K - n + x`` -- the odds ratio as Enrichr computes it
  (https://maayanlab.cloud/Enrichr/help#background), without any pseudo-count,
* ``combined_score = -ln(pvalue) * odds_ratio`` (Enrichr's combined score with
  that odds ratio; ``-ln p`` is taken from ``hypergeom.logsf`` where ``p``
  underflows to 0, so the score stays finite),
* ``qvalue``: Benjamini-Hochberg over **all terms that passed the size
  filter** (every term that could be tested), per (list, library) -- including
  terms with zero overlap, which are not reported.  This is more conservative
  than gseapy.

Differences from ``gseapy.enrich`` (gseapy 1.3.1, verified in the tests)
------------------------------------------------------------------------
With a dict of gene sets and an explicit background list gseapy also works
offline and gives **identical p-values** (it too restricts the query and every
term to the background), but:

* it drops zero-overlap terms *before* BH, so its adjusted p-values are BH over
  the overlapping terms only (smaller than ours);
* its odds ratio adds 0.5 to every cell of the 2x2 table (Haldane-Anscombe,
  gseapy issue #237): ``(x+.5)(d+.5) / ((b+.5)(c+.5))``, so its odds ratio and
  combined score differ from Enrichr's and ours;
* it has no term-size filter;
* it silently upper-cases the query and background when the gene sets are
  upper-case and the query is not (mouse vs human symbols); here genes are
  matched exactly, and a library sharing no gene with the background raises a
  ``ValueError`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.stats import hypergeom

from ..._checks import check_int
from .._multitest import benjamini_hochberg
from ._common import check_loadings, empty_frame, index_libraries

__all__ = ["top_genes", "over_representation", "top_terms", "TOP_GENES_COLUMNS", "ENRICHMENT_COLUMNS"]

TOP_GENES_COLUMNS = ["program", "side", "rank", "gene", "loading"]
ENRICHMENT_COLUMNS = [
    "program",
    "side",
    "library",
    "term",
    "overlap",
    "query_size",
    "term_size",
    "background_size",
    "overlap_genes",
    "odds_ratio",
    "combined_score",
    "pvalue",
    "qvalue",
]
_INT_COLUMNS = ("overlap", "query_size", "term_size", "background_size")
_FLOAT_COLUMNS = ("odds_ratio", "combined_score", "pvalue", "qvalue")


# --------------------------------------------------------------------------- #
# Program gene lists
# --------------------------------------------------------------------------- #
def top_genes(loadings: pd.DataFrame, n_top: int = 100) -> pd.DataFrame:
    """Top positively and negatively loaded genes of every program.

    Parameters
    ----------
    loadings : pandas.DataFrame, shape (n_genes, n_programs)
        Signed gene loadings; index = gene symbols (unique), columns = programs.
    n_top : int, default 100
        Maximum genes per side (>= 1).

    Returns
    -------
    pandas.DataFrame, shape (<= n_programs * 2 * n_top, 5)
        Long format with columns ``program``, ``side`` (``"positive"`` or
        ``"negative"``), ``rank`` (1-based), ``gene``, ``loading``.  The
        positive side holds the ``n_top`` genes with the largest loadings among
        loadings ``> 0`` (descending), the negative side the ``n_top`` most
        negative among loadings ``< 0`` (ascending), so the sides are disjoint
        and a side may be shorter than ``n_top`` (or absent).  Ties are broken
        by gene name; NaN loadings are ignored.  Rows are ordered by program
        (column order), positive before negative, then rank.

    Raises
    ------
    ValueError
        ``n_top < 1``, non-numeric loadings or a duplicated gene index.
    """
    n_top = check_int("n_top", n_top, 1)
    values = check_loadings(loadings)
    genes = np.asarray(loadings.index, dtype=object)
    names = np.asarray(loadings.index.astype(str), dtype=str)

    parts = []
    for j, program in enumerate(loadings.columns):
        v = values[:, j]
        # (side, genes on that side, sort key: most extreme loading first)
        for side, mask, key in (("positive", v > 0, -v), ("negative", v < 0, v)):
            idx = np.flatnonzero(mask)
            if idx.size == 0:
                continue
            # np.lexsort: the last key is the primary one
            idx = idx[np.lexsort((names[idx], key[idx]))][:n_top]
            parts.append(
                pd.DataFrame(
                    {
                        "program": program,
                        "side": side,
                        "rank": np.arange(1, idx.size + 1),
                        "gene": genes[idx],
                        "loading": v[idx],
                    }
                )
            )
    if not parts:
        return empty_frame(TOP_GENES_COLUMNS, int_columns=("rank",), float_columns=("loading",))
    return pd.concat(parts, ignore_index=True)[TOP_GENES_COLUMNS]


# --------------------------------------------------------------------------- #
# Over-representation
# --------------------------------------------------------------------------- #
def _hypergeom_sf(x: np.ndarray, N: int, K: np.ndarray, n: np.ndarray) -> np.ndarray:
    """P[X >= x] for X ~ Hypergeom(N, K, n), elementwise; 1 where x <= 0.

    ``scipy.stats.hypergeom.sf`` costs ~30 us per element, so it is evaluated
    once per distinct (x, K, n) triple only.
    """
    p = np.ones(x.shape, dtype=float)
    pos = x > 0
    if pos.any():
        trip = np.stack([x[pos], K[pos], n[pos]], axis=1)
        uniq, inv = np.unique(trip, axis=0, return_inverse=True)
        pu = hypergeom.sf(uniq[:, 0] - 1, N, uniq[:, 1], uniq[:, 2])
        p[pos] = np.clip(pu[inv.reshape(-1)], 0.0, 1.0)
    return p


def _neg_log_p(p: np.ndarray, x: np.ndarray, N: int, K: np.ndarray, n: np.ndarray) -> np.ndarray:
    out = np.zeros(p.shape, dtype=float)
    nz = p > 0
    out[nz] = -np.log(p[nz])
    if (~nz).any():
        out[~nz] = -hypergeom.logsf(x[~nz] - 1, N, K[~nz], n[~nz])
    return out


class _Background:
    """The deduplicated background, with its genes' columns ordered by name so that overlap
    genes read off a sparse row come out sorted without per-row sorting."""

    def __init__(self, background: list):
        self.genes = list(dict.fromkeys(background))
        self.size = len(self.genes)
        self.position = {g: i for i, g in enumerate(self.genes)}
        names = np.asarray([str(g) for g in self.genes], dtype=object)
        by_name = np.argsort(names.astype(str), kind="mergesort")
        self.column = np.empty(self.size, dtype=np.int64)  # gene position -> column (rank of its name)
        self.column[by_name] = np.arange(self.size)
        self.sorted_names = names[by_name]  # column -> gene name


class _TermMatrix(NamedTuple):
    """One library's size-filtered terms as a sparse term x background-column 0/1 matrix."""

    library: Any
    terms: np.ndarray
    matrix: sparse.csr_matrix


class _ListVsLibrary(NamedTuple):
    """One (gene list, library) test: the terms restricted to the list's columns."""

    program: Any
    side: Any
    library: Any
    terms: np.ndarray
    query_columns: np.ndarray  # background columns of the list's genes, sorted
    overlap_matrix: sparse.csr_matrix  # terms x query_columns
    term_sizes: np.ndarray

    @property
    def overlaps(self) -> np.ndarray:
        return np.diff(self.overlap_matrix.indptr).astype(np.int64)


def _check_ora_arguments(gene_lists: Any, gene_sets: Any, background: Any) -> None:
    if not isinstance(gene_sets, Mapping):
        raise ValueError("gene_sets must be a mapping {library name: {term: genes}}")
    if not isinstance(gene_lists, Mapping):
        raise ValueError("gene_lists must be a mapping {(program, side): genes}")
    for key in gene_lists:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"gene_lists keys must be (program, side) tuples, got {key!r}")
    if isinstance(background, str):
        raise ValueError("background must be a list of genes, not a single string")


def _term_matrices(gene_sets: Mapping, bg: _Background, min_set_size: int, max_set_size: int) -> list[_TermMatrix]:
    matrices = []
    for library in index_libraries(gene_sets, bg.genes, min_set_size, max_set_size):
        sizes = np.asarray([m.size for m in library.members], dtype=np.int64)
        rows = np.repeat(np.arange(len(library.members), dtype=np.int64), sizes)
        cols = bg.column[np.concatenate([np.empty(0, dtype=np.int64), *library.members])]
        M = sparse.csr_matrix(
            (np.ones(rows.size, dtype=np.int32), (rows, cols)), shape=(len(library.terms), bg.size)
        )
        M.sort_indices()
        matrices.append(_TermMatrix(library.name, np.asarray(library.terms, dtype=object), M))
    return matrices


def _list_vs_libraries(gene_lists: Mapping, matrices: list[_TermMatrix], bg: _Background) -> list[_ListVsLibrary]:
    """Every (list, library) pair with tested terms, its overlaps as a sparse matrix."""
    tests = []
    for (program, side), genes in gene_lists.items():
        if isinstance(genes, str):
            raise ValueError(f"gene list {(program, side)!r} must be a list of genes, not a string")
        q_cols = np.unique([bg.column[bg.position[g]] for g in set(genes) if g in bg.position]).astype(np.int64)
        for library, terms, M in matrices:
            n_terms = M.shape[0]
            if n_terms == 0:
                continue
            Mq = M[:, q_cols] if q_cols.size else sparse.csr_matrix((n_terms, 0), dtype=M.dtype)
            Mq.sort_indices()
            tests.append(_ListVsLibrary(program, side, library, terms, q_cols, Mq, np.diff(M.indptr).astype(np.int64)))
    return tests


def _pvalues(tests: list[_ListVsLibrary], N: int) -> list[np.ndarray]:
    """The hypergeometric p-values of every test's terms, in one evaluation over all tests
    (``hypergeom.sf`` is slow per element and the (x, K, n) triples repeat across tests)."""
    if not tests:
        return []
    x_all = np.concatenate([t.overlaps for t in tests])
    K_all = np.concatenate([t.term_sizes for t in tests])
    n_all = np.concatenate([np.full(t.term_sizes.size, t.query_columns.size, dtype=np.int64) for t in tests])
    p_all = _hypergeom_sf(x_all, N, K_all, n_all)
    return np.split(p_all, np.cumsum([t.term_sizes.size for t in tests])[:-1])


def _reported_terms(test: _ListVsLibrary, p: np.ndarray, bg: _Background, min_overlap: int) -> pd.DataFrame | None:
    """The result rows of one test: terms with overlap >= ``min_overlap`` (None when none)."""
    x, N, n_q = test.overlaps, bg.size, int(test.query_columns.size)
    q = benjamini_hochberg(p)  # over all size-filtered terms of this (list, library)
    report = np.flatnonzero(x >= min_overlap)
    if report.size == 0:
        return None
    xr, Kr = x[report], test.term_sizes[report]
    b, c, d = Kr - xr, n_q - xr, N - Kr - n_q + xr
    odds = (xr * d).astype(float) / np.maximum(b * c, 1).astype(float)
    score = _neg_log_p(p[report], xr, N, Kr, np.full(report.size, n_q)) * odds
    q_names = bg.sorted_names[test.query_columns]
    ptr, ind = test.overlap_matrix.indptr, test.overlap_matrix.indices
    overlap_genes = [";".join(q_names[ind[ptr[r] : ptr[r + 1]]]) for r in report]
    return pd.DataFrame(
        {
            "program": test.program,
            "side": test.side,
            "library": test.library,
            "term": test.terms[report],
            "overlap": xr,
            "query_size": n_q,
            "term_size": Kr,
            "background_size": N,
            "overlap_genes": overlap_genes,
            "odds_ratio": odds,
            "combined_score": score,
            "pvalue": p[report],
            "qvalue": q[report],
        }
    )


def _enrichment_table(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if not frames:
        return empty_frame(ENRICHMENT_COLUMNS, _INT_COLUMNS, _FLOAT_COLUMNS)
    res = pd.concat(frames, ignore_index=True)[ENRICHMENT_COLUMNS]
    for c in _INT_COLUMNS:
        res[c] = res[c].astype(int)
    return res.sort_values(["program", "side", "library", "pvalue", "term"], kind="mergesort", ignore_index=True)


def over_representation(
    gene_lists: Mapping[tuple[str, str], list[str]],
    gene_sets: Mapping[str, Mapping[str, list[str]]],
    background: list[str],
    min_overlap: int = 1,
    min_set_size: int = 3,
    max_set_size: int = 2000,
) -> pd.DataFrame:
    """Hypergeometric over-representation of gene lists in gene-set libraries.

    For each gene list and library the query and every term are restricted to
    the background; terms whose background-restricted size lies in
    ``[min_set_size, max_set_size]`` are tested (see the module docstring for
    the p-value, odds ratio and combined score).  Terms with overlap
    ``< min_overlap`` are not reported, **but BH is computed over all terms
    that passed the size filter** (all terms that could be tested), separately
    per (list, library).  This is more conservative than gseapy, which drops
    zero-overlap terms before BH.

    Parameters
    ----------
    gene_lists : mapping {(program, side): list of genes}
        E.g. built from :func:`top_genes`.  Duplicates and genes outside the
        background are ignored.
    gene_sets : mapping {library name: {term: list of genes}}
        One or several libraries (e.g. GO BP and Hallmark, via :func:`read_gmt`).
    background : list of str, length N
        The genes that entered the factorisation (duplicates ignored).
    min_overlap : int, default 1
        Report terms with at least this overlap (0 reports every tested term).
    min_set_size, max_set_size : int, default 3 and 2000
        Bounds on the background-restricted term size.

    Returns
    -------
    pandas.DataFrame, shape (n_reported, 13)
        Columns ``program``, ``side``, ``library``, ``term``, ``overlap``,
        ``query_size`` (list genes in the background), ``term_size`` (term genes
        in the background), ``background_size``, ``overlap_genes``
        (``";"``-joined, sorted), ``odds_ratio``, ``combined_score``,
        ``pvalue``, ``qvalue``; sorted by program, side, library, pvalue (then
        term).  Empty ``gene_lists`` or ``gene_sets`` give an empty DataFrame
        with these columns.  ``attrs["terms_tested"]``: {library: number of
        terms that passed the size filter}.

    Raises
    ------
    ValueError
        Bad arguments, an empty background, or a library sharing no gene with
        the background (identifier mismatch; the message names the library and
        shows example genes from both sides).
    """
    min_overlap = check_int("min_overlap", min_overlap, 0)
    min_set_size = check_int("min_set_size", min_set_size, 1)
    max_set_size = check_int("max_set_size", max_set_size, min_set_size)
    _check_ora_arguments(gene_lists, gene_sets, background)
    bg = _Background(background)
    if not bg.genes:
        raise ValueError("background is empty")
    matrices = _term_matrices(gene_sets, bg, min_set_size, max_set_size)
    tests = _list_vs_libraries(gene_lists, matrices, bg)
    frames = []
    for test, p in zip(tests, _pvalues(tests, bg.size)):
        frame = _reported_terms(test, p, bg, min_overlap)
        if frame is not None:
            frames.append(frame)
    res = _enrichment_table(frames)
    res.attrs["terms_tested"] = {m.library: len(m.terms) for m in matrices}
    return res


def top_terms(enrichment: pd.DataFrame, n: int = 3, fdr: float = 0.05) -> pd.DataFrame:
    """The ``n`` best significant terms per (program, side).

    Parameters
    ----------
    enrichment : pandas.DataFrame
        Output of :func:`over_representation`.
    n : int, default 3
        Terms kept per (program, side), over all libraries together.
    fdr : float, default 0.05
        Keep rows with ``qvalue < fdr``.

    Returns
    -------
    pandas.DataFrame, shape (<= n * n_lists, n_columns)
        The selected rows with the input columns, ordered by program, side,
        then pvalue (ties: term); fresh RangeIndex.
    """
    n = check_int("n", n, 1)
    if not (isinstance(fdr, (int, float, np.floating)) and 0 < fdr <= 1):
        raise ValueError(f"fdr must be in (0, 1], got {fdr!r}")
    missing = [c for c in ("program", "side", "term", "pvalue", "qvalue") if c not in enrichment.columns]
    if missing:
        raise ValueError(f"enrichment table lacks column(s) {missing}; expected over_representation() output")
    sig = enrichment[enrichment["qvalue"] < fdr]
    sig = sig.sort_values(["program", "side", "pvalue", "term"], kind="mergesort")
    return sig.groupby(["program", "side"], sort=False).head(n).reset_index(drop=True)
