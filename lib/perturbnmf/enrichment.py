"""Gene-set over-representation of gene programs (offline).

Workflow: :func:`top_genes` takes the signed gene loadings of the programs and
returns, per program, the top positively and the top negatively loaded genes;
:func:`over_representation` tests each of these lists against one or several
gene-set libraries (e.g. read with :func:`read_gmt`) by the hypergeometric test
within the genes that entered the factorisation (the *background*);
:func:`top_terms` picks the best significant terms per list for reports.
Nothing here touches the network.

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

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.stats import hypergeom

from perturbnmf.stats import benjamini_hochberg

__all__ = ["read_gmt", "top_genes", "over_representation", "top_terms"]

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
# GMT
# --------------------------------------------------------------------------- #
def read_gmt(path) -> dict[str, list[str]]:
    """Read a GMT gene-set file.

    Each non-blank line is ``name <TAB> description <TAB> gene1 <TAB> gene2 ...``.
    The description may be empty (Enrichr's GMTs: ``name\\t\\tGENE1\\tGENE2``).
    Fields are stripped of surrounding whitespace, empty gene fields are
    dropped, and duplicate genes within a set are removed (first occurrence
    kept).

    Parameters
    ----------
    path : str or os.PathLike
        The GMT file (UTF-8; a byte-order mark is ignored).

    Returns
    -------
    dict[str, list[str]]
        Set name -> genes, in file order.

    Raises
    ------
    FileNotFoundError
        The file does not exist (the message names it).
    ValueError
        A line with fewer than 3 tab-separated fields, an empty set name, a set
        without genes, a set name used twice, or no sets at all.  Messages name
        the file and the 1-based line number.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GMT file not found: {path!r}")
    sets: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            fields = [f.strip() for f in line.split("\t")]
            # trailing tabs only create empty gene fields; ignore them here
            while len(fields) > 3 and fields[-1] == "":
                fields.pop()
            if len(fields) < 3:
                hint = " (is the file tab-separated?)" if len(fields) == 1 and " " in line.strip() else ""
                raise ValueError(
                    f"{path}, line {lineno}: expected 'name<TAB>description<TAB>gene1<TAB>...' "
                    f"(at least 3 tab-separated fields), found {len(fields)}{hint}"
                )
            name = fields[0]
            if not name:
                raise ValueError(f"{path}, line {lineno}: empty gene-set name")
            genes = list(dict.fromkeys(g for g in fields[2:] if g))
            if not genes:
                raise ValueError(f"{path}, line {lineno}: gene set {name!r} has no genes")
            if name in sets:
                raise ValueError(
                    f"{path}, line {lineno}: duplicate gene-set name {name!r} "
                    f"(first defined on line {first_line[name]})"
                )
            sets[name] = genes
            first_line[name] = lineno
    if not sets:
        raise ValueError(f"{path}: no gene sets found (the file is empty or has only blank lines)")
    return sets


# --------------------------------------------------------------------------- #
# Program gene lists
# --------------------------------------------------------------------------- #
def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


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
    n_top = _check_int(n_top, "n_top", 1)
    if not isinstance(loadings, pd.DataFrame):
        raise ValueError("loadings must be a pandas DataFrame (genes x programs, index = genes)")
    if not loadings.index.is_unique:
        dup = loadings.index[loadings.index.duplicated()].unique()[:3].tolist()
        raise ValueError(f"loadings: gene index has duplicates, e.g. {dup}")
    try:
        values = loadings.to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise ValueError("loadings must be numeric") from None
    genes = np.asarray(loadings.index, dtype=object)
    names = np.asarray(loadings.index.astype(str), dtype=str)

    parts = []
    for j, program in enumerate(loadings.columns):
        v = values[:, j]
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
        return pd.DataFrame(
            {
                "program": pd.Series(dtype=object),
                "side": pd.Series(dtype=object),
                "rank": pd.Series(dtype=int),
                "gene": pd.Series(dtype=object),
                "loading": pd.Series(dtype=float),
            }
        )
    return pd.concat(parts, ignore_index=True)[TOP_GENES_COLUMNS]


# --------------------------------------------------------------------------- #
# Over-representation
# --------------------------------------------------------------------------- #
def _empty_enrichment() -> pd.DataFrame:
    cols = {}
    for c in ENRICHMENT_COLUMNS:
        dtype = int if c in _INT_COLUMNS else float if c in _FLOAT_COLUMNS else object
        cols[c] = pd.Series(dtype=dtype)
    return pd.DataFrame(cols)


def _mismatch_error(library: str, lib_genes: list, background: list) -> ValueError:
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
    min_overlap = _check_int(min_overlap, "min_overlap", 0)
    min_set_size = _check_int(min_set_size, "min_set_size", 1)
    max_set_size = _check_int(max_set_size, "max_set_size", min_set_size)
    if not isinstance(gene_sets, Mapping):
        raise ValueError("gene_sets must be a mapping {library name: {term: genes}}")
    if not isinstance(gene_lists, Mapping):
        raise ValueError("gene_lists must be a mapping {(program, side): genes}")
    for key in gene_lists:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"gene_lists keys must be (program, side) tuples, got {key!r}")
    if isinstance(background, str):
        raise ValueError("background must be a list of genes, not a single string")
    bg = list(dict.fromkeys(background))
    if not bg:
        raise ValueError("background is empty")
    N = len(bg)
    bg_pos = {g: i for i, g in enumerate(bg)}
    bg_names = np.asarray([str(g) for g in bg], dtype=object)
    # column permutation that orders the background by name, so that the
    # overlap genes come out sorted without per-row sorting
    name_rank = np.empty(N, dtype=np.int64)
    name_rank[np.argsort(bg_names.astype(str), kind="mergesort")] = np.arange(N)

    # --- libraries -> sparse term x background matrices (size-filtered) ---
    libs = []
    for library, terms in gene_sets.items():
        if not isinstance(terms, Mapping) or len(terms) == 0:
            raise ValueError(f"gene-set library {library!r} must be a non-empty mapping {{term: genes}}")
        rows, cols, kept_terms = [], [], []
        any_hit = False
        for term, genes in terms.items():
            if isinstance(genes, str):
                raise ValueError(f"library {library!r}, term {term!r}: genes must be a list, not a string")
            idx = {bg_pos[g] for g in genes if g in bg_pos}
            if idx:
                any_hit = True
            if min_set_size <= len(idx) <= max_set_size:
                rows.extend([len(kept_terms)] * len(idx))
                cols.extend(name_rank[list(idx)])
                kept_terms.append(term)
        if not any_hit:
            lib_genes = list(dict.fromkeys(g for genes in terms.values() for g in genes))
            raise _mismatch_error(str(library), lib_genes, bg)
        M = sparse.csr_matrix(
            (np.ones(len(rows), dtype=np.int32), (np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64))),
            shape=(len(kept_terms), N),
        )
        M.sort_indices()
        libs.append((library, np.asarray(kept_terms, dtype=object), M))

    terms_tested = {lib: len(t) for lib, t, _ in libs}
    sorted_names = bg_names[np.argsort(bg_names.astype(str), kind="mergesort")]

    # pass 1: overlaps of every (list, library); pass 2: one hypergeometric
    # evaluation over all of them (sf is slow per element, triples repeat)
    pieces = []
    for (program, side), genes in gene_lists.items():
        if isinstance(genes, str):
            raise ValueError(f"gene list {(program, side)!r} must be a list of genes, not a string")
        q_cols = np.unique([name_rank[bg_pos[g]] for g in set(genes) if g in bg_pos]).astype(np.int64)
        for library, terms, M in libs:
            n_terms = M.shape[0]
            if n_terms == 0:
                continue
            Mq = M[:, q_cols] if q_cols.size else sparse.csr_matrix((n_terms, 0), dtype=M.dtype)
            Mq.sort_indices()
            pieces.append((program, side, library, terms, q_cols, Mq, np.diff(M.indptr).astype(np.int64)))

    frames = []
    if pieces:
        x_all = np.concatenate([np.diff(pc[5].indptr).astype(np.int64) for pc in pieces])
        K_all = np.concatenate([pc[6] for pc in pieces])
        n_all = np.concatenate([np.full(pc[6].size, pc[4].size, dtype=np.int64) for pc in pieces])
        p_all = _hypergeom_sf(x_all, N, K_all, n_all)
        offsets = np.cumsum([0] + [pc[6].size for pc in pieces])
    for i, (program, side, library, terms, q_cols, Mq, K) in enumerate(pieces):
        sl = slice(offsets[i], offsets[i + 1])
        x, p, n_q = x_all[sl], p_all[sl], int(q_cols.size)
        q = benjamini_hochberg(p)  # over all size-filtered terms of this (list, library)
        report = np.flatnonzero(x >= min_overlap)
        if report.size == 0:
            continue
        xr, Kr = x[report], K[report]
        b, c, d = Kr - xr, n_q - xr, N - Kr - n_q + xr
        odds = (xr * d).astype(float) / np.maximum(b * c, 1).astype(float)
        score = _neg_log_p(p[report], xr, N, Kr, np.full(report.size, n_q)) * odds
        q_names = sorted_names[q_cols]
        ptr, ind = Mq.indptr, Mq.indices
        overlap_genes = [";".join(q_names[ind[ptr[r] : ptr[r + 1]]]) for r in report]
        frames.append(
            pd.DataFrame(
                {
                    "program": program,
                    "side": side,
                    "library": library,
                    "term": terms[report],
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
        )

    if not frames:
        res = _empty_enrichment()
    else:
        res = pd.concat(frames, ignore_index=True)[ENRICHMENT_COLUMNS]
        for c in _INT_COLUMNS:
            res[c] = res[c].astype(int)
        res = res.sort_values(
            ["program", "side", "library", "pvalue", "term"], kind="mergesort", ignore_index=True
        )
    res.attrs["terms_tested"] = terms_tested
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
    n = _check_int(n, "n", 1)
    if not (isinstance(fdr, (int, float, np.floating)) and 0 < fdr <= 1):
        raise ValueError(f"fdr must be in (0, 1], got {fdr!r}")
    missing = [c for c in ("program", "side", "term", "pvalue", "qvalue") if c not in enrichment.columns]
    if missing:
        raise ValueError(f"enrichment table lacks column(s) {missing}; expected over_representation() output")
    sig = enrichment[enrichment["qvalue"] < fdr]
    sig = sig.sort_values(["program", "side", "pvalue", "term"], kind="mergesort")
    return sig.groupby(["program", "side"], sort=False).head(n).reset_index(drop=True)
