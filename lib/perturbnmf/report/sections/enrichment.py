"""Report sections of step 4 (enrichment): top genes, gene sets, labels, prerank, labelled hits."""

from __future__ import annotations

import html as html_text
import os
from typing import Any

import pandas as pd

from ... import pl, tl
from .. import artifacts, html

__all__ = ["show_header", "show_top_genes", "show_enrichment", "show_program_labels", "show_dotplot",
           "run_prerank", "show_prerank", "show_prerank_skipped", "show_labelled_hits", "show_workbook"]

INTRO = ("What each program is: its top genes on each side of its signed gene scores (the change in a gene's "
         "expression per standard deviation of the program's usage: positive = raised, negative = lowered), the gene "
         "sets over-represented "
         "among them (hypergeometric test against the genes that entered the factorisation), a short label per program "
         "from its best gene set, and step 3's perturbation effects told with those labels.")


def show_header(params: dict[str, Any], paths) -> dict[str, Any]:
    """The step's title, intro, parameters and provenance (of factorized.h5ad); returns the provenance record."""
    return html.header("enrichment", params, input_path=paths.factorized, intro=INTRO)


def show_top_genes(top: pd.DataFrame, n_shown: int = 10) -> None:
    wide = (top[top["rank"] <= n_shown].groupby(["program", "side"])["gene"]
            .apply(lambda genes: ", ".join(genes)).unstack("side").reindex(columns=["positive", "negative"]))
    wide.columns.name = None  # no stray "side" heading above the program column
    html.table(wide.reset_index().fillna("–"),
                 f"The {n_shown} genes with the largest positive and the most negative gene scores per program: "
                 "positive = expression rises with the program's usage, negative = it falls (each side is its own "
                 "gene list). All top genes are in top_genes.csv.",
                 max_rows=200, full="top_genes.csv")


def show_enrichment(enrichment_table: pd.DataFrame, fdr: float, n_background: int) -> None:
    """The significant terms as a compact table (all columns are in enrichment.csv)."""
    significant = enrichment_table[enrichment_table["qvalue"] < fdr]
    genes = significant["overlap_genes"].str.split(";")
    shown = pd.DataFrame({
        "program": significant["program"], "side": significant["side"], "library": significant["library"],
        "term": significant["term"],
        "overlap": significant["overlap"].astype(str) + " / " + significant["query_size"].astype(str),
        "term size": significant["term_size"], "odds ratio": significant["odds_ratio"],
        "q": significant["qvalue"],
        "genes": [", ".join(g[:8]) + (" …" if len(g) > 8 else "") for g in genes],
    })
    html.table(shown, f"Gene sets over-represented at q < {fdr} among each program's top genes: overlap = genes of "
                        "the list in the set / genes in the list; term size counts the set's genes among the "
                        f"background (the {n_background} factorised genes); q = Benjamini–Hochberg over the gene "
                        "sets of one library tested for one list.",
               max_rows=15, interactive=True, full=f"enrichment.csv, rows with qvalue < {fdr} (every tested set is there)")


def show_program_labels(labels: pd.DataFrame, fdr: float) -> None:
    shown = labels[["program", "label", "library", "term", "qvalue"]]
    n_terms = int((labels["source"] == "term").sum())
    html.table(shown, f"A short label per program, used in the figures below and in the summary: the gene set with "
                        f"the smallest q (< {fdr}) over every library among the positive gene scores (↑), else among "
                        f"the negative gene scores (↓), else the program's three top genes. {n_terms} of {len(labels)} programs are labelled by a "
                        "gene set. Table: program_labels.csv.", max_rows=100, full="program_labels.csv")


def show_dotplot(top_terms: pd.DataFrame, label_of: dict[str, str], fdr: float) -> None:
    """The dot plot of every program's best gene sets, or a warning when no set is significant."""
    if len(top_terms):
        pl.enrichment_dotplot(top_terms, labels=label_of)
    else:
        html.warning(f"No gene set reaches q < {fdr} for any program; the dot plot is empty.")


def run_prerank(loadings: pd.DataFrame, libraries, **kwargs) -> tuple[pd.DataFrame, list[str]]:
    """:func:`perturbnmf.tl.prerank`, with gseapy's messages (written by its compiled core
    straight to file descriptor 2, past Python's ``sys.stderr``) collected for the report."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            ranked = tl.prerank(loadings, libraries, **kwargs)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        messages = [line.strip() for line in captured.read().decode(errors="replace").splitlines() if line.strip()]
    return ranked, messages


def show_prerank(ranked: pd.DataFrame, fdr: float, messages: list[str] = (), n_shown: int = 25) -> None:
    tested = len(ranked)
    significant = ranked[ranked["qvalue"] < fdr].sort_values("qvalue", kind="stable")
    caption = (f"GSEA prerank on each program's whole signed loading vector (multilevel p-values, fgsea's method), "
               f"{tested} program × gene-set tests (sets with too few genes among the factorised genes are not "
               "tested), q = Benjamini–Hochberg over all of them; all in prerank.csv.")
    if not len(significant):
        html.note(caption + f" No gene set reaches q < {fdr}.")
    else:
        html.table(significant[["program", "library", "term", "n_genes", "nes", "pvalue", "qvalue", "leading_edge"]],
                     caption + f" Shown: q < {fdr}. NES > 0: the set's genes load positively; leading_edge: the "
                     "genes that drive it.", max_rows=n_shown, full=f"prerank.csv, rows with qvalue < {fdr}")
    for message in messages:
        html.note(f"gseapy: {html_text.escape(message)}")


def show_prerank_skipped() -> None:
    html.note("Skipped (parameter prerank is false): only the top genes of each side were tested.")


def show_labelled_hits(hits: pd.DataFrame, fdr: float) -> None:
    """Step 3's hits (q < ``fdr``), each program named by its label."""
    columns = [c for c in ("perturbation", "label", "role", "effect", "effect_std", "qvalue", "consistency",
                           "qvalue_split") if c in hits.columns]
    html.table(hits[columns], f"The perturbation → program hits of step 3 (q < {fdr}), each program named by its "
                                "label: role = primary (the perturbation's strongest programs) or secondary "
                                "(spill-over), effect = shift of mean usage against control cells, effect_std = Cohen's d, "
                                "consistency = guides and batches agreeing in sign, qvalue_split = the test on half "
                                "of the cells with programs learned on the other half. All: perturbation_hits.csv.",
               max_rows=15, interactive=True, full="perturbation_hits.csv (and every test in program_contrasts.csv)")


def show_workbook(paths) -> None:
    html.note(f"Workbook {paths.summary_xlsx.name}: sheets Perturbation Hits, Perturbations (one row per perturbation), Program Labels, W_ANOVA, Significant "
              "Factors, Pathway Enrichment, Top Pathways, Program Contrasts, Guide Effects, Prerank, Top Genes (those "
              "that were computed); a table longer than Excel's sheets allow "
              f"({artifacts.EXCEL_MAX_ROWS - 1:,} rows) continues on numbered sheets (Guide Effects (1), (2), …). "
              f"CSV: {paths.perturbation_hits.name}, {paths.perturbation_summary.name}, {paths.program_labels.name}, "
              f"{paths.top_genes.name}, {paths.enrichment.name}.")
