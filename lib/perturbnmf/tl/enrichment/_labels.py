"""Short, readable names for gene programs and gene-set terms.

:func:`program_labels` turns an enrichment table (over-representation or prerank) into one
short, unique label per program (best significant term, else the top genes); :func:`tidy_term`
shortens a term name for display.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..._checks import check_int
from . import _ora

__all__ = ["tidy_term", "program_labels", "LABEL_COLUMNS"]

LABEL_COLUMNS = ["program", "label", "term", "library", "side", "qvalue", "source"]

# --------------------------------------------------------------------------- #
# Term names
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


def _display_word(word: str) -> str:
    """One word of an all-capitals MSigDB name as displayed: spelled out, kept, or lower-cased."""
    if word in _WORDS:
        return _WORDS[word]
    if word in _KEEP_UPPER or any(ch.isdigit() for ch in word):
        return word
    return word.lower()


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
        max_chars = check_int("max_chars", max_chars, 2)
    name = _GO_ID.sub("", str(term)).strip()
    name = _TRAILING_ID.sub("", name).strip()
    name = _COLLECTION_PREFIX.sub("", name)
    name = " ".join(name.replace("_", " ").split())
    if name and not any(ch.islower() for ch in name):
        name = " ".join(_display_word(w) for w in name.split(" "))
    if not name:
        name = str(term).strip()
    return name if max_chars is None else _truncate(name, max_chars)


# --------------------------------------------------------------------------- #
# Program labels
# --------------------------------------------------------------------------- #
_ARROW = {"positive": "\u2191", "negative": "\u2193"}
# gene fallback: the side tried first, and how its genes are introduced
_FALLBACK_SIDES = (("positive", ""), ("negative", "\u2193 "))
# tie-breaker after qvalue and pvalue (smaller = stronger), from the first of these columns present
_STRENGTH = (
    ("combined_score", lambda enr: -enr["combined_score"].astype(float)),
    ("nes", lambda enr: -enr["nes"].astype(float).abs()),
)


def _side_text(side: Any, term: Any, max_chars: int) -> str:
    arrow = _ARROW.get(side)
    name = tidy_term(term, max_chars)
    return f"{arrow} {name}" if arrow else name


def _ranking_table(enrichment: pd.DataFrame, prefer_positive: bool) -> pd.DataFrame:
    """A copy of ``enrichment`` with every column the term ranking needs (``side``, ``library``,
    ``pvalue``, ``_strength``, ``_side_rank``), whichever table it came from."""
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
    enr["_strength"] = next((strength(enr) for column, strength in _STRENGTH if column in enr.columns), 0.0)
    enr["_side_rank"] = (enr["side"] != "positive").astype(int) if prefer_positive else 0
    return enr


def _fallback_genes(genes_or_loadings: pd.DataFrame | None, n_genes: int) -> tuple[pd.DataFrame | None, list]:
    """The long top-genes table for gene labels, and the programs given by loadings' columns (if
    loadings were passed, else no programs)."""
    if genes_or_loadings is None:
        return None, []
    if not isinstance(genes_or_loadings, pd.DataFrame):
        raise ValueError("top_genes must be a DataFrame: top_genes() output or the loadings (genes x programs)")
    if {"program", "side", "gene"}.issubset(genes_or_loadings.columns):
        return genes_or_loadings, []
    try:
        genes_long = _ora.top_genes(genes_or_loadings, n_top=n_genes)
    except ValueError as exc:
        raise ValueError(
            f"top_genes must be top_genes() output (columns program, side, rank, gene) "
            f"or the loadings (genes x numeric programs): {exc}"
        ) from None
    return genes_long, list(genes_or_loadings.columns)


def _programs_to_label(
    programs: Sequence | None, default_programs: list, genes_long: pd.DataFrame | None, enr: pd.DataFrame
) -> list:
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
    return programs


def _term_row(program: Any, ranked: pd.DataFrame, max_chars: int, both_sides: bool) -> tuple:
    """The label row of a program from its significant terms, best first."""
    top = ranked.iloc[0]
    label = f"{program!s} {_side_text(top['side'], top['term'], max_chars)}"
    if both_sides:
        other = ranked[ranked["side"] != top["side"]]
        if len(other):
            o = other.iloc[0]
            label += f" / {_side_text(o['side'], o['term'], max_chars)}"
    return (program, label, top["term"], top["library"], top["side"], float(top["qvalue"]), "term")


def _gene_row(program: Any, genes_long: pd.DataFrame | None, n_genes: int, max_chars: int) -> tuple:
    """The label row of a program without a significant term: its top genes, else its id."""
    if genes_long is not None:
        mine = genes_long[genes_long["program"] == program]
        for side, prefix in _FALLBACK_SIDES:
            part = mine[mine["side"] == side]
            if "rank" in part.columns:
                part = part.sort_values("rank", kind="mergesort")
            listed = [str(g) for g in part["gene"].head(n_genes)]
            if listed:
                label = f"{program!s}: " + _truncate(prefix + ", ".join(listed), max_chars)
                return (program, label, None, None, side, np.nan, "genes")
    return (program, str(program), None, None, None, np.nan, "none")


def _numbered_duplicates(labels: pd.Series, duplicated: pd.Series) -> list[str]:
    """The labels with " (1)", " (2)" ... appended to each occurrence of a repeated one."""
    counts: dict[str, int] = {}
    numbered = []
    for label, is_dup in zip(labels, duplicated):
        if is_dup:
            counts[label] = counts.get(label, 0) + 1
            label = f"{label} ({counts[label]})"
        numbered.append(label)
    return numbered


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
    max_chars = check_int("max_chars", max_chars, 2)
    n_genes = check_int("n_genes", n_genes, 1)
    enr = _ranking_table(enrichment, prefer_positive)
    genes_long, default_programs = _fallback_genes(top_genes, n_genes)
    programs = _programs_to_label(programs, default_programs, genes_long, enr)

    sig = enr[enr["qvalue"] < fdr].sort_values(
        ["program", "_side_rank", "qvalue", "pvalue", "_strength", "term"], kind="mergesort"
    )
    ranked = {p: g for p, g in sig.groupby("program", sort=False)}
    rows = [
        _term_row(program, ranked[program], max_chars, both_sides)
        if program in ranked
        else _gene_row(program, genes_long, n_genes, max_chars)
        for program in programs
    ]
    out = pd.DataFrame(rows, columns=LABEL_COLUMNS)
    # program ids are unique, so the labels are; guard against odd ids anyway ("P1" vs "P1: ..." style clashes)
    duplicated = out["label"].duplicated(keep=False)
    if duplicated.any():
        out["label"] = _numbered_duplicates(out["label"], duplicated)
    out["qvalue"] = out["qvalue"].astype(float)
    return out
