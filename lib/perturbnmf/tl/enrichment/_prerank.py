"""Rank-based test of the whole loading vector of every program (gseapy.prerank, offline).

Over-representation (:func:`~perturbnmf.tl.enrichment.over_representation`) only looks at the
top genes of each side.  :func:`prerank` runs ``gseapy.prerank`` (GSEA on a pre-ranked list) on
the full signed loading vector of every program, offline (gene sets passed as dicts, no output
directory, no plots), with a fixed seed.  Read its docstring for the choices (fgsea multilevel
p-values by default, one BH over the whole table).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..._checks import check_int
from .._multitest import benjamini_hochberg
from ._common import check_loadings, empty_frame, index_libraries

__all__ = ["prerank", "PRERANK_COLUMNS"]

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
_PRERANK_METHODS = ("multilevel", "permutation")


def _has_method_parameter(gseapy: Any) -> bool:
    """Whether this gseapy's prerank takes ``method`` (gseapy >= 1.3); older ones only permute."""
    return "method" in inspect.signature(gseapy.prerank).parameters


def _check_options(method: Any, eps: Any, weight: Any, libraries: Any, gseapy: Any) -> None:
    if method not in _PRERANK_METHODS:
        raise ValueError(f"method must be one of {_PRERANK_METHODS}, got {method!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not 0 <= eps < 1:
        raise ValueError(f"eps must be a number in [0, 1), got {eps!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)) or not np.isfinite(weight):
        raise ValueError(f"weight must be a finite number, got {weight!r}")
    if not isinstance(libraries, Mapping) or len(libraries) == 0:
        raise ValueError("libraries must be a non-empty mapping {library name: {term: genes}}")
    if method == "multilevel" and not _has_method_parameter(gseapy):
        raise ValueError(
            f"method='multilevel' needs gseapy >= 1.3 (installed: {gseapy.__version__}); "
            "upgrade gseapy or use method='permutation'"
        )


def _check_values(values: np.ndarray, loadings: pd.DataFrame) -> None:
    if values.shape[0] < 2:
        raise ValueError(f"loadings must have at least 2 genes, got {values.shape[0]}")
    if np.isinf(values).any():
        bad = loadings.columns[np.isinf(values).any(axis=0)][:3].tolist()
        raise ValueError(f"loadings contain infinite values (programs {bad}); only finite values or NaN")


def _method_kwargs(method: str, eps: float, gseapy: Any) -> dict[str, Any]:
    """The gseapy.prerank arguments that select ``method`` (none for a gseapy without ``method``,
    which only permutes; multilevel on such a gseapy was refused by the checks)."""
    if not _has_method_parameter(gseapy):
        return {}
    return {"method": "multilevel", "eps": float(eps)} if method == "multilevel" else {"method": "permutation"}


class _PrerankRun:
    """Everything shared by the per-program gseapy runs.

    Genes are passed to gseapy under neutral codes ``G<i>`` (so gseapy cannot upper-case mouse
    symbols) and terms as ``T<k>``, ``k`` indexing ``term_members``/``term_keys`` over all libraries.
    """

    def __init__(self, gseapy, loadings, libraries, min_set_size, max_set_size, method, permutations,
                 max_leading_edge, gsea_kwargs):
        self.gseapy = gseapy
        self.genes = np.asarray(list(loadings.index), dtype=object)
        self.names = np.asarray(loadings.index.astype(str), dtype=str)
        self.codes = np.asarray([f"G{i}" for i in range(len(self.genes))], dtype=object)
        # gseapy needs a term smaller than the ranked list, hence the bound len - 1
        indexed = index_libraries(
            libraries, list(loadings.index), min_set_size, min(max_set_size, len(self.genes) - 1)
        )
        self.terms_tested = {lib.name: len(lib.terms) for lib in indexed}
        self.term_members = [m for lib in indexed for m in lib.members]
        # (library position, library, term): the position orders the output like ``libraries``
        self.term_keys = [(i, lib.name, t) for i, lib in enumerate(indexed) for t in lib.terms]
        self.min_set_size, self.max_set_size = min_set_size, max_set_size
        self.method, self.permutations, self.max_leading_edge = method, permutations, max_leading_edge
        self.gsea_kwargs = gsea_kwargs

    def gene_sets(self, ok: np.ndarray, n_ok: int) -> dict[str, list[str]]:
        """The terms still within the size bounds among the genes ``ok`` (non-NaN loadings)."""
        sets = {}
        for k, idx in enumerate(self.term_members):
            sub = idx[ok[idx]]
            if self.min_set_size <= sub.size <= self.max_set_size and sub.size < n_ok:
                sets[f"T{k}"] = self.codes[sub].tolist()
        return sets

    def program(self, j: int, program: Any, v: np.ndarray) -> pd.DataFrame | None:
        """The result rows of program ``j`` (loadings ``v``); None when nothing can be tested."""
        ok = ~np.isnan(v)
        n_ok = int(ok.sum())
        if n_ok < 2:
            return None
        sets = self.gene_sets(ok, n_ok)
        if not sets:
            return None
        order = np.flatnonzero(ok)
        order = order[np.lexsort((self.names[order], -v[order]))]
        ranking = pd.Series(v[order], index=self.codes[order], name=str(program))
        res = self.gseapy.prerank(
            rnk=ranking,
            gene_sets=sets,
            outdir=None,
            no_plot=True,
            min_size=self.min_set_size,
            max_size=self.max_set_size,
            ascending=None,  # already sorted, ties by gene name
            verbose=False,
            **self.gsea_kwargs,
        ).res2d
        code_gene = dict(zip(self.codes[order], self.genes[order]))
        return self.result_rows(res, j, program, sets, code_gene)

    def result_rows(self, res: pd.DataFrame, j: int, program: Any, sets: dict, code_gene: dict) -> pd.DataFrame:
        """gseapy's ``res2d`` translated back to libraries, terms and genes."""
        k_rows = [int(str(t)[1:]) for t in res["Term"]]
        keys = [self.term_keys[k] for k in k_rows]
        lead = [
            [code_gene[c] for c in str(s).split(";") if c] if isinstance(s, str) else [] for s in res["Lead_genes"]
        ]
        pval = pd.to_numeric(res["NOM p-val"], errors="coerce").to_numpy(dtype=float)
        if self.method == "permutation":
            # no permuted ES as extreme: the resolution of the test, not 0
            pval = np.where(pval == 0, 1.0 / self.permutations, pval)
        return pd.DataFrame(
            {
                "program": program,
                "library": [lib for _, lib, _ in keys],
                "term": [term for _, _, term in keys],
                "n_genes": [len(sets[f"T{k}"]) for k in k_rows],
                "es": pd.to_numeric(res["ES"], errors="coerce").to_numpy(dtype=float),
                "nes": pd.to_numeric(res["NES"], errors="coerce").to_numpy(dtype=float),
                "pvalue": np.clip(pval, 0.0, 1.0),
                "qvalue": np.nan,
                "leading_edge_size": [len(g) for g in lead],
                "leading_edge": [";".join(map(str, g[: self.max_leading_edge])) for g in lead],
                "_prog": j,
                "_lib": [pos for pos, _, _ in keys],
            }
        )


def _prerank_table(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """All programs' rows with one BH over the whole table, sorted by program, library, pvalue, term."""
    if not frames:
        return empty_frame(PRERANK_COLUMNS, ("n_genes", "leading_edge_size"), ("es", "nes", "pvalue", "qvalue"))
    out = pd.concat(frames, ignore_index=True)
    out["qvalue"] = benjamini_hochberg(out["pvalue"].to_numpy())
    out = out.sort_values(["_prog", "_lib", "pvalue", "term"], kind="mergesort", ignore_index=True)
    out = out[PRERANK_COLUMNS]
    for c in ("n_genes", "leading_edge_size"):
        out[c] = out[c].astype(int)
    return out


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

    values = check_loadings(loadings, unique_programs=True)
    min_set_size = check_int("min_set_size", min_set_size, 1)
    max_set_size = check_int("max_set_size", max_set_size, min_set_size)
    permutations = check_int("permutations", permutations, 1)
    seed = check_int("seed", seed, 0)
    threads = check_int("threads", threads, 1)
    max_leading_edge = check_int("max_leading_edge", max_leading_edge, 1)
    _check_options(method, eps, weight, libraries, gseapy)
    _check_values(values, loadings)

    gsea_kwargs = dict(permutation_num=permutations, weight=float(weight), threads=threads, seed=seed,
                       **_method_kwargs(method, eps, gseapy))
    run = _PrerankRun(gseapy, loadings, libraries, min_set_size, max_set_size, method, permutations,
                      max_leading_edge, gsea_kwargs)
    frames = [run.program(j, program, values[:, j]) for j, program in enumerate(loadings.columns)]
    out = _prerank_table([f for f in frames if f is not None])
    out.attrs.update(terms_tested=run.terms_tested, method=method, permutations=permutations, seed=seed)
    return out
