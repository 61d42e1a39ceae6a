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

Rank-based test of the whole loading vector (:func:`prerank`)
-------------------------------------------------------------
Over-representation only looks at the top genes of each side.  :func:`prerank`
runs ``gseapy.prerank`` (GSEA on a pre-ranked list) on the full signed loading
vector of every program, offline (gene sets passed as dicts, no output
directory, no plots), with a fixed seed.  Read its docstring for the choices
(fgsea multilevel p-values by default, one BH over the whole table).

Labels and libraries
--------------------
:func:`program_labels` turns the enrichment table into one short, unique label
per program (best significant term, else the top genes); :func:`tidy_term`
shortens a term name for display.  :func:`load_library` reads a GMT path, or
fetches an Enrichr library by name -- the only function here that may use the
network, and it fails with a clear message when Enrichr is unreachable.
"""

from __future__ import annotations

import inspect
import os
import re
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.stats import hypergeom

from ...errors import LibraryUnavailableError
from .._multitest import benjamini_hochberg

__all__ = [
    "read_gmt",
    "load_library",
    "LibraryUnavailableError",
    "top_genes",
    "over_representation",
    "top_terms",
    "prerank",
    "tidy_term",
    "program_labels",
]

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
PRERANK_COLUMNS = [
    "program",
    "library",
    "term",
    "n_genes",
    "es",
    "nes",
    "pvalue",
    "qvalue",
    "leading_edge_size",
    "leading_edge",
]
LABEL_COLUMNS = ["program", "label", "term", "library", "side", "qvalue", "source"]


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


class _TimeoutSession:
    """Stand-in for gseapy's ``requests`` session: one try, a short timeout.

    gseapy's own session retries five times with back-off and downloads with
    ``timeout=None``, which makes an offline machine hang; here every request
    gets ``timeout`` seconds and is not retried.
    """

    def __init__(self, timeout: float):
        import requests

        self._session = requests.Session()
        self._timeout = timeout

    def get(self, url, **kwargs):
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        return self._session.get(url, **kwargs)


_OFFLINE_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, socket.timeout, socket.gaierror)


def _offline_errors() -> tuple[type[BaseException], ...]:
    try:
        import requests
    except ImportError:  # pragma: no cover - requests comes with gseapy
        return _OFFLINE_ERRORS
    return _OFFLINE_ERRORS + (requests.exceptions.ConnectionError, requests.exceptions.Timeout)


def _fetch_enrichr_library(name: str, organism: str, timeout: float) -> dict[str, list[str]]:
    """Download an Enrichr library with gseapy (``EnrichrAPI.download_libraries``)."""
    from gseapy.enrichr import EnrichrAPI

    api = EnrichrAPI(organism)
    api._session = _TimeoutSession(timeout)
    return api.download_libraries(name)


def _enrichr_cache_dir() -> str:
    import sys

    import gseapy.enrichr  # noqa: F401  (the submodule; ``gseapy.enrichr`` the attribute is a function)

    return sys.modules["gseapy.enrichr"].DEFAULT_CACHE_PATH


def _clean_library(sets: Mapping, source: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for term, genes in sets.items():
        if isinstance(genes, str):
            raise ValueError(f"{source}: term {term!r}: genes must be a list, not a string")
        genes = list(dict.fromkeys(str(g).strip() for g in genes if str(g).strip()))
        if genes:
            out[str(term)] = genes
    if not out:
        raise ValueError(f"{source}: no gene sets (the library is empty)")
    return out


def load_library(
    spec, *, organism: str = "human", timeout: float = 10.0, use_cache: bool = True
) -> dict[str, list[str]]:
    """A gene-set library from a GMT path, or from Enrichr by name.

    Parameters
    ----------
    spec : str, os.PathLike or mapping {term: genes}
        * an existing file: read with :func:`read_gmt` (no network), whatever
          its name -- also when it looks like an Enrichr name;
        * a mapping: returned as a ``dict`` of lists (genes stripped,
          duplicates and empty terms dropped);
        * a string ending in ``.gmt`` or containing a path separator that is
          not a file: ``FileNotFoundError`` (never sent to Enrichr);
        * any other string, e.g. ``"GO_Biological_Process_2023"``: an Enrichr
          library name.  gseapy's download cache
          (``~/.cache/gseapy/Enrichr.<name>.gmt``) is read when present and
          ``use_cache``; otherwise the library is downloaded from Enrichr with
          gseapy (``EnrichrAPI.download_libraries``, one try, ``timeout``
          seconds), which also writes that cache file.
    organism : str, default "human"
        Enrichr instance for names (gseapy's names: human/mouse -> Enrichr,
        fly, yeast, worm, fish).
    timeout : float, default 10
        Seconds to wait for Enrichr (connect and each read).
    use_cache : bool, default True
        Read a previously downloaded copy from gseapy's cache.

    Returns
    -------
    dict[str, list[str]]
        Term -> genes.

    Raises
    ------
    LibraryUnavailableError
        (a ``ValueError``) ``spec`` is a name and Enrichr cannot be reached
        (connection error, DNS failure or time-out): the message names the
        library and says to download the GMT and pass its path.
    ValueError
        Enrichr answered but returned no such library, bad ``timeout``, or a
        malformed GMT file / mapping.
    FileNotFoundError
        ``spec`` looks like a path (``.gmt`` suffix or a separator) but is not
        a file.
    """
    if isinstance(spec, Mapping):
        return _clean_library(spec, "library mapping")
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(
            f"spec must be a path to a .gmt file, an Enrichr library name or a mapping {{term: genes}}, got {spec!r}"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    path = os.fspath(spec)
    if os.path.isfile(path):
        return read_gmt(path)
    if isinstance(spec, os.PathLike) or path.lower().endswith(".gmt") or os.sep in path or "/" in path:
        raise FileNotFoundError(f"GMT file not found: {path!r}")
    name = path.strip()
    if not name:
        raise ValueError("spec is an empty string; give a .gmt path or an Enrichr library name")
    cached = os.path.join(_enrichr_cache_dir(), f"Enrichr.{name}.gmt")
    if use_cache and os.path.isfile(cached):
        return read_gmt(cached)
    try:
        sets = _fetch_enrichr_library(name, organism, float(timeout))
    except _offline_errors() as exc:
        detail = f"{type(exc).__name__}: {exc}"
        if len(detail) > 200:
            detail = detail[:199] + "\u2026"
        raise LibraryUnavailableError(
            f"Gene-set library {name!r} is not a local file, and fetching it from Enrichr "
            f"(https://maayanlab.cloud/Enrichr, organism {organism!r}) failed because Enrichr is unreachable "
            f"({detail}; time-out {timeout:g} s): this machine is probably offline. Download the library as a "
            f"GMT file on a machine with internet access (Enrichr > Libraries > {name}, or "
            f"gseapy.get_library({name!r}, save='{name}.gmt')), copy it here and pass its path instead of the "
            f"name, e.g. load_library('/path/to/{name}.gmt')."
        ) from exc
    except Exception as exc:
        if type(exc) is not Exception:  # gseapy raises a bare Exception for a non-OK answer
            raise
        raise ValueError(
            f"Enrichr did not return a gene-set library named {name!r} for organism {organism!r} ({exc}). "
            "Check the name at https://maayanlab.cloud/Enrichr/#libraries, or pass the path of a .gmt file."
        ) from exc
    if not sets:
        raise ValueError(
            f"Enrichr returned no gene sets for {name!r} (organism {organism!r}); check the library name at "
            "https://maayanlab.cloud/Enrichr/#libraries, or pass the path of a .gmt file."
        )
    return _clean_library(sets, f"Enrichr library {name!r}")


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


# --------------------------------------------------------------------------- #
# Rank-based test of the whole loading vector (gseapy.prerank, offline)
# --------------------------------------------------------------------------- #
_PRERANK_METHODS = ("multilevel", "permutation")


def _empty_prerank() -> pd.DataFrame:
    ints, floats = ("n_genes", "leading_edge_size"), ("es", "nes", "pvalue", "qvalue")
    return pd.DataFrame(
        {c: pd.Series(dtype=int if c in ints else float if c in floats else object) for c in PRERANK_COLUMNS}
    )


def _check_loadings(loadings: Any) -> np.ndarray:
    if not isinstance(loadings, pd.DataFrame):
        raise ValueError("loadings must be a pandas DataFrame (genes x programs, index = genes)")
    if not loadings.index.is_unique:
        dup = loadings.index[loadings.index.duplicated()].unique()[:3].tolist()
        raise ValueError(f"loadings: gene index has duplicates, e.g. {dup}")
    if not loadings.columns.is_unique:
        dup = loadings.columns[loadings.columns.duplicated()].unique()[:3].tolist()
        raise ValueError(f"loadings: program columns have duplicates, e.g. {dup}")
    try:
        return loadings.to_numpy(dtype=float)
    except (TypeError, ValueError):
        raise ValueError("loadings must be numeric") from None


def prerank(
    loadings: pd.DataFrame,
    libraries: Mapping[str, Mapping[str, list[str]]],
    min_set_size: int = 15,
    max_set_size: int = 500,
    permutations: int = 1000,
    seed: int = 0,
    *,
    method: str = "multilevel",
    eps: float = 1e-10,
    weight: float = 1.0,
    threads: int = 1,
    max_leading_edge: int = 10,
) -> pd.DataFrame:
    """GSEA on the whole signed loading vector of every program (gseapy.prerank).

    For each program the genes are ranked by their loading (descending, ties
    broken by gene name, NaN loadings dropped) and every term is tested with
    ``gseapy.prerank`` -- offline: the gene sets are passed as dicts, with no
    output directory, no plots, ``threads`` threads and a fixed ``seed``.  A
    positive NES means the term's genes sit at the positive end of the
    program's loadings, a negative NES at the negative end.

    Filters are those of :func:`over_representation`: genes are matched
    exactly (gseapy's silent upper-casing of mouse symbols cannot happen:
    genes are passed to gseapy under neutral ids) and a term is tested when
    its size among the program's genes lies in ``[min_set_size,
    max_set_size]`` (and is smaller than the number of genes, which gseapy
    requires).

    P-values: ``method="multilevel"`` (default) is gseapy's port of fgsea's
    multilevel procedure, which estimates small p-values accurately (down to
    ``eps``) rather than bounding them by ``1 / permutations``; its NES is
    normalised with ``permutations`` random gene sets.  ``method="permutation"``
    is classic GSEA (``permutations`` gene-set permutations); a nominal p-value
    of 0 (no permuted ES as extreme) is reported as ``1 / permutations``.  With
    a BH correction over many tests, permutation p-values are too coarse: with
    1000 permutations and 30 programs x 50 Hallmark sets (1500 tests) a term
    reaches q < 0.05 only if >= 30 tests sit at the floor -- hence the default.

    ``qvalue`` is **our own** Benjamini-Hochberg over all rows of the returned
    table (every program x library x tested term; the project convention of
    one BH over all tests).  gseapy's "FDR q-val" is not used: it is computed
    per program (GSEA's NES-based FDR for ``"permutation"``, BH within the
    program for ``"multilevel"``).

    Parameters
    ----------
    loadings : pandas.DataFrame, shape (n_genes, n_programs)
        Signed gene loadings; index = gene symbols (unique), columns = programs
        (unique).
    libraries : mapping {library name: {term: list of genes}}
        One or several libraries (e.g. via :func:`read_gmt` or
        :func:`load_library`).
    min_set_size, max_set_size : int, default 15 and 500
        Bounds on a term's size among the program's genes (GSEA's defaults).
    permutations : int, default 1000
        Permutations (``"permutation"``) or random sets for the NES
        normalisation (``"multilevel"``); >= 1.
    seed : int, default 0
        Random seed; results are identical for the same seed.
    method : {"multilevel", "permutation"}, default "multilevel"
        See above.
    eps : float, default 1e-10
        ``"multilevel"`` only: p-values below ``eps`` are reported as ``eps``
        (smaller ``eps`` = finer ranking of very strong terms, slower).
        0 estimates them as small as machine precision allows.
    weight : float, default 1.0
        GSEA's weight ``p`` of the running sum (0 = unweighted KS statistic).
    threads : int, default 1
        Threads for gseapy (it uses at most ``os.cpu_count() - 1``).
    max_leading_edge : int, default 10
        Leading-edge genes listed in ``leading_edge`` (>= 1).

    Returns
    -------
    pandas.DataFrame, shape (n_tests, 10)
        One row per (program, library, tested term), columns ``program``,
        ``library``, ``term``, ``n_genes`` (term genes among the program's
        ranked genes), ``es``, ``nes``, ``pvalue``, ``qvalue``,
        ``leading_edge_size`` (genes in the leading edge), ``leading_edge``
        (its first ``max_leading_edge`` genes, most extreme loading first,
        ``";"``-joined); sorted by program (column order of ``loadings``),
        library (order of ``libraries``), pvalue, term.  ``attrs``:
        ``terms_tested`` ({library: terms passing the size filter among all
        genes}), ``method``, ``permutations``, ``seed``.  No testable term
        gives an empty DataFrame with these columns.

    Raises
    ------
    ValueError
        Bad arguments, non-numeric/duplicated loadings, fewer than 2 genes, or
        a library sharing no gene with the loadings (identifier mismatch; the
        message names the library and shows example genes), or
        ``method="multilevel"`` with a gseapy that lacks it.

    Notes
    -----
    Runtime (one core, gseapy 1.3.1): 30 programs x Hallmark (50 sets) on
    2000 genes, 1000 permutations, takes about 7.5 s with ``"multilevel"`` and
    about 18 s with ``"permutation"`` (gseapy's permutation walks the whole
    ranking for every permutation: time ~ genes x sets x permutations per
    program).  Never let gseapy plot (``no_plot=False`` draws figures for
    the top terms of every program, minutes): this function does not.
    gseapy logs a warning when loadings are tied ("the order of those genes
    will be arbitrary"); here ties are ordered by gene name, so results stay
    reproducible.
    """
    import gseapy

    values = _check_loadings(loadings)
    min_set_size = _check_int(min_set_size, "min_set_size", 1)
    max_set_size = _check_int(max_set_size, "max_set_size", min_set_size)
    permutations = _check_int(permutations, "permutations", 1)
    seed = _check_int(seed, "seed", 0)
    threads = _check_int(threads, "threads", 1)
    max_leading_edge = _check_int(max_leading_edge, "max_leading_edge", 1)
    if method not in _PRERANK_METHODS:
        raise ValueError(f"method must be one of {_PRERANK_METHODS}, got {method!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not 0 <= eps < 1:
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)) or not np.isfinite(weight):
        raise ValueError(f"weight must be a finite number, got {weight!r}")
    if not isinstance(libraries, Mapping) or len(libraries) == 0:
        raise ValueError("libraries must be a non-empty mapping {library name: {term: genes}}")
    if "method" not in inspect.signature(gseapy.prerank).parameters:
        if method == "multilevel":
            raise ValueError(
                f"method='multilevel' needs gseapy >= 1.3 (installed: {gseapy.__version__}); "
                "upgrade gseapy or use method='permutation'"
            )
    if values.shape[0] < 2:
        raise ValueError(f"loadings must have at least 2 genes, got {values.shape[0]}")
    if np.isinf(values).any():
        bad = loadings.columns[np.isinf(values).any(axis=0)][:3].tolist()
        raise ValueError(f"loadings contain infinite values (programs {bad}); only finite values or NaN")

    genes = list(loadings.index)
    gene_pos = {g: i for i, g in enumerate(genes)}
    names = np.asarray(loadings.index.astype(str), dtype=str)
    codes = np.asarray([f"G{i}" for i in range(len(genes))], dtype=object)

    # every term as an index array into the genes; key "T<k>" -> (library, term)
    term_idx: list[np.ndarray] = []
    term_key: list[tuple[Any, Any]] = []
    terms_tested: dict[Any, int] = {}
    n_all = len(genes)
    for library, terms in libraries.items():
        if not isinstance(terms, Mapping) or len(terms) == 0:
            raise ValueError(f"gene-set library {library!r} must be a non-empty mapping {{term: genes}}")
        any_hit, n_ok = False, 0
        for term, members in terms.items():
            if isinstance(members, str):
                raise ValueError(f"library {library!r}, term {term!r}: genes must be a list, not a string")
            idx = np.asarray(sorted({gene_pos[g] for g in members if g in gene_pos}), dtype=np.int64)
            any_hit = any_hit or idx.size > 0
            if min_set_size <= idx.size <= max_set_size and idx.size < n_all:
                term_idx.append(idx)
                term_key.append((library, term))
                n_ok += 1
        if not any_hit:
            lib_genes = list(dict.fromkeys(g for members in terms.values() for g in members))
            raise _mismatch_error(str(library), lib_genes, genes)
        terms_tested[library] = n_ok

    kwargs: dict[str, Any] = {}
    if method == "multilevel":
        kwargs = {"method": "multilevel", "eps": float(eps)}
    elif "method" in inspect.signature(gseapy.prerank).parameters:
        kwargs = {"method": "permutation"}

    frames = []
    for j, program in enumerate(loadings.columns):
        v = values[:, j]
        ok = ~np.isnan(v)
        n_ok = int(ok.sum())
        if n_ok < 2:
            continue
        sets = {}
        for k, idx in enumerate(term_idx):
            sub = idx[ok[idx]]
            if min_set_size <= sub.size <= max_set_size and sub.size < n_ok:
                sets[f"T{k}"] = codes[sub].tolist()
        if not sets:
            continue
        order = np.flatnonzero(ok)
        order = order[np.lexsort((names[order], -v[order]))]
        ranking = pd.Series(v[order], index=codes[order], name=str(program))
        res = gseapy.prerank(
            rnk=ranking,
            gene_sets=sets,
            outdir=None,
            no_plot=True,
            min_size=min_set_size,
            max_size=max_set_size,
            permutation_num=permutations,
            weight=float(weight),
            ascending=None,  # already sorted, ties by gene name
            threads=threads,
            seed=seed,
            verbose=False,
            **kwargs,
        ).res2d
        code_gene = dict(zip(codes[order], np.asarray(genes, dtype=object)[order]))
        k_rows = [int(str(t)[1:]) for t in res["Term"]]
        lead = [
            [code_gene[c] for c in str(s).split(";") if c] if isinstance(s, str) else [] for s in res["Lead_genes"]
        ]
        pval = pd.to_numeric(res["NOM p-val"], errors="coerce").to_numpy(dtype=float)
        if method == "permutation":
            pval = np.where(pval == 0, 1.0 / permutations, pval)
        frames.append(
            pd.DataFrame(
                {
                    "program": program,
                    "library": [term_key[k][0] for k in k_rows],
                    "term": [term_key[k][1] for k in k_rows],
                    "n_genes": [len(sets[f"T{k}"]) for k in k_rows],
                    "es": pd.to_numeric(res["ES"], errors="coerce").to_numpy(dtype=float),
                    "nes": pd.to_numeric(res["NES"], errors="coerce").to_numpy(dtype=float),
                    "pvalue": np.clip(pval, 0.0, 1.0),
                    "qvalue": np.nan,
                    "leading_edge_size": [len(g) for g in lead],
                    "leading_edge": [";".join(map(str, g[:max_leading_edge])) for g in lead],
                    "_prog": j,
                    "_lib": [list(libraries).index(term_key[k][0]) for k in k_rows],
                }
            )
        )

    if not frames:
        out = _empty_prerank()
    else:
        out = pd.concat(frames, ignore_index=True)
        out["qvalue"] = benjamini_hochberg(out["pvalue"].to_numpy())
        out = out.sort_values(["_prog", "_lib", "pvalue", "term"], kind="mergesort", ignore_index=True)
        out = out[PRERANK_COLUMNS]
        for c in ("n_genes", "leading_edge_size"):
            out[c] = out[c].astype(int)
    out.attrs.update(terms_tested=terms_tested, method=method, permutations=permutations, seed=seed)
    return out


# --------------------------------------------------------------------------- #
# Program labels
# --------------------------------------------------------------------------- #
_GO_ID = re.compile(r"\s*\((?:GO|HP|MP|DOID):\d+\)")
_TRAILING_ID = re.compile(r"\s+(?:R-[A-Z]{3}-\d+|WP\d+|hsa\d{5}|mmu\d{5})$")
_COLLECTION_PREFIX = re.compile(r"^(?:HALLMARK|KEGG|REACTOME|BIOCARTA|PID|WP|GOBP|GOCC|GOMF|HP)_")
_KEEP_UPPER = frozenset(
    "DNA RNA MRNA TRNA RRNA UV MYC KRAS TNFA NFKB JAK STAT PI3K AKT MTOR TGF WNT EMT ROS UPR ATP NAD NADH "
    "GTP ER ECM HIV MHC NK T B IL IFN EGF EGFR ERBB MAPK ERK HDAC".split()
)
_WORDS = {"DN": "down", "UP": "up"}


def _truncate(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters, at a word boundary where possible, with "…"."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 1]
    space = cut.rfind(" ")
    if space >= 0.6 * (max_chars - 1):
        cut = cut[:space]
    return cut.rstrip(" ,;:-/(") + "\u2026"


def tidy_term(term: str, max_chars: int | None = 40) -> str:
    """A gene-set name shortened for labels and plots.

    Strips ontology ids (``"(GO:0034341)"``), trailing Reactome/WikiPathways/
    KEGG ids, MSigDB collection prefixes (``HALLMARK_``, ``KEGG_``,
    ``REACTOME_``, ``GOBP_`` ...), turns underscores into spaces and, for
    all-capitals MSigDB names, lower-cases the words except acronyms and
    gene-like tokens with digits (``"HALLMARK_TNFA_SIGNALING_VIA_NFKB"`` ->
    ``"TNFA signaling via NFKB"``, ``"HALLMARK_UV_RESPONSE_DN"`` -> ``"UV
    response down"``).  Names with lower-case letters keep their case.

    Parameters
    ----------
    term : str
        The term name as in the library.
    max_chars : int or None, default 40
        Longer results are cut at a word boundary and end with "…" (the
        result has at most ``max_chars`` characters); None keeps the length.

    Returns
    -------
    str
    """
    if max_chars is not None:
        max_chars = _check_int(max_chars, "max_chars", 2)
    name = _GO_ID.sub("", str(term)).strip()
    name = _TRAILING_ID.sub("", name).strip()
    name = _COLLECTION_PREFIX.sub("", name)
    name = " ".join(name.replace("_", " ").split())
    if name and not any(ch.islower() for ch in name):
        words = []
        for w in name.split(" "):
            if w in _WORDS:
                words.append(_WORDS[w])
            elif w in _KEEP_UPPER or any(ch.isdigit() for ch in w):
                words.append(w)
            else:
                words.append(w.lower())
        name = " ".join(words)
    if not name:
        name = str(term).strip()
    return name if max_chars is None else _truncate(name, max_chars)


_ARROW = {"positive": "\u2191", "negative": "\u2193"}


def _side_text(side: Any, term: Any, max_chars: int) -> str:
    arrow = _ARROW.get(side)
    name = tidy_term(term, max_chars)
    return f"{arrow} {name}" if arrow else name


def program_labels(
    enrichment: pd.DataFrame,
    top_genes: pd.DataFrame | None = None,
    fdr: float = 0.05,
    *,
    programs: Sequence | None = None,
    max_chars: int = 40,
    n_genes: int = 3,
    both_sides: bool = False,
    prefer_positive: bool = True,
) -> pd.DataFrame:
    """One short, unique, human-readable label per program.

    The label is the program id, an arrow for the side of the loadings
    (``↑`` positive, ``↓`` negative) and the tidied name (:func:`tidy_term`)
    of the program's best significant term over both sides and all libraries
    -- smallest qvalue, then pvalue, then the larger combined score (or
    ``|nes|``), then term name: ``"P03 ↑ interferon gamma response"``.
    Without a term at ``qvalue < fdr`` the label lists the top ``n_genes``
    positively loaded genes, ``"P05: GENE1, GENE2, GENE3"`` (negative ones,
    ``"P05: ↓ GENE1, ..."``, for a program without positive loadings), and
    without genes either it is the program id.

    Parameters
    ----------
    enrichment : pandas.DataFrame
        Output of :func:`over_representation` (columns ``program``, ``side``,
        ``term``, ``qvalue``, optionally ``library``, ``pvalue``,
        ``combined_score``) or of :func:`prerank` (no ``side``: the sign of
        ``nes`` gives it).  May be empty.
    top_genes : pandas.DataFrame, optional
        For the fallback: the output of :func:`top_genes` (long format), or
        the loadings themselves (genes x programs), whose columns then also
        give the default ``programs``.
    fdr : float, default 0.05
        A term is significant when ``qvalue < fdr``.
    programs : sequence, optional
        The programs to label, in order (unique); give ``loadings.columns`` so
        that every program gets a label.  Default: the loadings' columns when
        ``top_genes`` is the loadings, else the programs of ``top_genes`` and
        ``enrichment`` in order of appearance.
    max_chars : int, default 40
        Maximum characters of the term (or gene list) part of a label.
    n_genes : int, default 3
        Genes in a fallback label.
    both_sides : bool, default False
        Append the best significant term of the other side when there is one:
        ``"P03 ↑ interferon gamma response / ↓ MYC targets V1"``.
    prefer_positive : bool, default True
        Label from the positive side when it has a significant term, else from the negative
        side. Cells that use a program more express its positive-loading genes more, so those
        say what the program does; the negative side is often what the program is contrasted
        with (programs are signed blends). False: the best term of either side.

    Returns
    -------
    pandas.DataFrame, shape (n_programs, 7)
        Columns ``program``, ``label`` (unique), ``term`` (the best term, as in
        the library; None for a fallback), ``library``, ``side``
        (``"positive"``/``"negative"``; for a gene fallback the side of the
        genes), ``qvalue`` (NaN for a fallback), ``source`` (``"term"``,
        ``"genes"`` or ``"none"``); one row per program, in order.

    Raises
    ------
    ValueError
        Missing columns, duplicated ``programs``, bad ``fdr``/``max_chars``/
        ``n_genes``.
    """
    if not isinstance(enrichment, pd.DataFrame):
        raise ValueError("enrichment must be a DataFrame (over_representation() or prerank() output)")
    if not (isinstance(fdr, (int, float, np.floating)) and not isinstance(fdr, bool) and 0 < fdr <= 1):
        raise ValueError(f"fdr must be in (0, 1], got {fdr!r}")
    max_chars = _check_int(max_chars, "max_chars", 2)
    n_genes = _check_int(n_genes, "n_genes", 1)
    missing = [c for c in ("program", "term", "qvalue") if c not in enrichment.columns]
    if missing:
        raise ValueError(
            f"enrichment table lacks column(s) {missing}; expected over_representation() or prerank() output"
        )
    enr = enrichment.copy()
    if "side" not in enr.columns:
        if "nes" not in enr.columns:
            raise ValueError("enrichment table needs a 'side' column (over_representation) or 'nes' (prerank)")
        enr["side"] = np.where(enr["nes"] < 0, "negative", "positive")
    if "library" not in enr.columns:
        enr["library"] = None
    if "pvalue" not in enr.columns:
        enr["pvalue"] = enr["qvalue"]
    if "combined_score" in enr.columns:
        enr["_strength"] = -enr["combined_score"].astype(float)
    elif "nes" in enr.columns:
        enr["_strength"] = -enr["nes"].astype(float).abs()
    else:
        enr["_strength"] = 0.0

    # fallback genes: long table {program: (side, [genes])}
    genes_long = None
    default_programs: list = []
    if top_genes is not None:
        if not isinstance(top_genes, pd.DataFrame):
            raise ValueError("top_genes must be a DataFrame: top_genes() output or the loadings (genes x programs)")
        if {"program", "side", "gene"}.issubset(top_genes.columns):
            genes_long = top_genes
        else:
            try:
                genes_long = _top_genes_table(top_genes, n_top=n_genes)
            except ValueError as exc:
                raise ValueError(
                    f"top_genes must be top_genes() output (columns program, side, rank, gene) "
                    f"or the loadings (genes x numeric programs): {exc}"
                ) from None
            default_programs = list(top_genes.columns)
    if programs is None:
        if default_programs:
            programs = default_programs
        else:
            seen = [] if genes_long is None else list(genes_long["program"])
            programs = list(dict.fromkeys(seen + list(enr["program"])))
    else:
        if isinstance(programs, str):
            raise ValueError("programs must be a sequence of program names, not a single string")
        programs = list(programs)
    if len(set(programs)) != len(programs):
        dup = pd.Index(programs)[pd.Index(programs).duplicated()].unique()[:3].tolist()
        raise ValueError(f"programs has duplicates, e.g. {dup}")

    enr["_side_rank"] = (enr["side"] != "positive").astype(int) if prefer_positive else 0
    sig = enr[enr["qvalue"] < fdr].sort_values(
        ["program", "_side_rank", "qvalue", "pvalue", "_strength", "term"], kind="mergesort"
    )
    best = {p: g for p, g in sig.groupby("program", sort=False)}

    rows = []
    for program in programs:
        pid = str(program)
        if program in best:
            group = best[program]
            top = group.iloc[0]
            label = f"{pid} {_side_text(top['side'], top['term'], max_chars)}"
            if both_sides:
                other = group[group["side"] != top["side"]]
                if len(other):
                    o = other.iloc[0]
                    label += f" / {_side_text(o['side'], o['term'], max_chars)}"
            rows.append((program, label, top["term"], top["library"], top["side"], float(top["qvalue"]), "term"))
            continue
        label, side, source = pid, None, "none"
        if genes_long is not None:
            mine = genes_long[genes_long["program"] == program]
            for s, prefix in (("positive", ""), ("negative", "\u2193 ")):
                part = mine[mine["side"] == s]
                if "rank" in part.columns:
                    part = part.sort_values("rank", kind="mergesort")
                listed = [str(g) for g in part["gene"].head(n_genes)]
                if listed:
                    label = f"{pid}: " + _truncate(prefix + ", ".join(listed), max_chars)
                    side, source = s, "genes"
                    break
        rows.append((program, label, None, None, side, np.nan, source))

    out = pd.DataFrame(rows, columns=LABEL_COLUMNS)
    # program ids are unique, so the labels are; guard against odd ids anyway ("P1" vs "P1: ..." style clashes)
    dup = out["label"].duplicated(keep=False)
    if dup.any():
        counts: dict[str, int] = {}
        new = []
        for lab, d in zip(out["label"], dup):
            if d:
                counts[lab] = counts.get(lab, 0) + 1
                lab = f"{lab} ({counts[lab]})"
            new.append(lab)
        out["label"] = new
    out["qvalue"] = out["qvalue"].astype(float)
    return out


_top_genes_table = top_genes
