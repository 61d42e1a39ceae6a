"""Report sections of step 1 (preprocess): what was read, QC, normalisation, cell cycle, genes."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from ... import pl
from .. import html
from ..runfolder import resolve

__all__ = ["show_header", "show_input", "show_simulation_truth", "show_qc", "show_normalization", "show_cell_cycle",
           "show_cell_cycle_skipped", "show_gene_selection"]

INTRO = ("Reads the screen's raw counts chunk by chunk of cells, computes per-cell quality metrics, normalises "
         "each cell to 10,000 UMIs and log-transforms, scores the cell cycle and selects the genes to factorise. "
         "<code>preprocessed.h5ad</code> holds the log-normalised expression of the selected genes only "
         "(<code>X</code>); the raw counts stay in the input file, which it names, and every gene that passed "
         "QC is listed with its metrics in <code>genes.csv</code>.")


def show_header(params: dict[str, Any]) -> dict[str, Any]:
    """The step's title, intro, parameters and provenance (of the input file); returns the provenance record."""
    return html.header("preprocess", params, input_path=resolve(params["input"]), intro=INTRO)


def show_input(adata, perturbation_key, control_label, batch_key, guide_key, libraries) -> None:
    groups = adata.obs[perturbation_key]
    rows = [
        ("cells × genes", f"{adata.n_obs} × {adata.n_vars}"),
        *_chunking(adata),
        ("perturbation groups", f"{groups.nunique()} ({groups.nunique() - 1} perturbations + {control_label!r})"),
        ("control cells", int((groups == control_label).sum())),
        ("batches", ", ".join(map(str, adata.obs[batch_key].cat.categories)) if batch_key else "none given"),
        ("guides", adata.obs[guide_key].nunique() if guide_key else "none given"),
    ]
    rows += [(f"gene sets: {name}", f"{info['gene_sets']} sets, {info['genes_in_data']} of their genes in the data")
             for name, info in libraries.items()]
    html.table(pd.DataFrame(rows, columns=["", "value"]), "The screen as read, before QC.")


def _chunking(adata) -> list[tuple[str, str]]:
    """The row saying how the counts are read (chunks of cells), when they are read lazily."""
    stored = adata.uns.get("perturbnmf", {}).get("preprocess", {}).get("input", {})
    if not stored.get("n_chunks"):
        return []
    return [("counts read in", f"{stored['n_chunks']} chunk(s) of up to {stored['chunk_cells']:,} cells")]


def show_simulation_truth(adata, max_named: int = 10, max_rows: int = 25) -> None:
    """The planted truth of a simulated screen: programs, targets that shift one, targets that do nothing.

    A genome-wide simulation has thousands of targets: the note names at most ``max_named`` of the
    targets that do nothing, and with more than ``max_rows`` planted effects the table counts them per
    program and direction instead of listing each (all of them: ``uns['simulation']['effects']``).
    """
    truth = adata.uns["simulation"]
    effects = pd.DataFrame(truth["effects"])
    nulls = [str(t) for t in truth["null_targets"]]
    named = ", ".join(nulls[:max_named]) + (f", … ({len(nulls):,} in all)" if len(nulls) > max_named else "")
    html.note(
        f"This is a simulated screen with known truth: {len(truth['program_names'])} planted programs "
        f"({', '.join(truth['program_names'])}); {effects['perturbation'].nunique():,} targets shift a program, "
        f"{len(nulls):,} targets do nothing" + (f" ({named})." if nulls else ".")
    )
    if len(effects) <= max_rows:
        html.table(effects, "Planted perturbation effects (fold change of the program's usage in the target's cells).")
        return
    per_program = (effects.groupby(["program", "direction"])
                   .agg(targets=("perturbation", "nunique"), fold_change_min=("fold_change", "min"),
                        fold_change_max=("fold_change", "max"))
                   .reset_index())
    html.table(per_program, f"The {len(effects):,} planted perturbation effects, counted per program and direction "
                            "(fold change of the program's usage in the target's cells); each effect is in "
                            "uns['simulation']['effects'] of preprocessed.h5ad.", max_rows=max_rows,
               full="uns['simulation']['effects'] of preprocessed.h5ad")


def show_qc(adata, params) -> None:
    log = adata.uns["perturbnmf"]["preprocess"]
    rows = [
        ("cells before / after QC", f"{log['n_cells_input']} / {adata.n_obs}"),
        ("genes before / after filter", f"{log['n_genes_input']} / {adata.n_vars}"),
        ("cells failing QC thresholds", log["n_cells_failed_qc"]),
        (f"genes in < {params['min_cells_per_gene']} cells (dropped)", log["n_genes_too_rare"]),
        (f"mitochondrial genes ({params['mito_prefix']}*)", log["n_mito_genes"]),
        ("median UMIs / genes / mito % per cell",
         f"{adata.obs['total_counts'].median():.0f} / {adata.obs['n_genes_by_counts'].median():.0f} / "
         f"{adata.obs['pct_counts_mito'].median():.2f}"),
    ]
    html.table(pd.DataFrame(rows, columns=["", "value"]),
                 f"Quality control: thresholds min_counts_per_cell={params['min_counts_per_cell']}, "
                 f"min_genes_per_cell={params['min_genes_per_cell']}, max_pct_mito={params['max_pct_mito']}.")
    dropped = log.get("dropped_small_groups", {})
    if dropped:
        html.warning(
            f"Dropped {len(dropped)} perturbation group(s) with fewer than {params['min_cells_per_group']} cells "
            "(parameter min_cells_per_group): " + ", ".join(f"{g} ({n})" for g, n in dropped.items())
        )


def show_normalization(batch_columns: list[str]) -> None:
    html.note(
        "Counts normalised to 10,000 UMIs per cell and log1p-transformed. "
        + (f"Batch indicator columns added to obs: {', '.join(batch_columns)}." if batch_columns else "No batch key given.")
    )


def show_cell_cycle(adata, summary: dict[str, Any], perturbation_key: str) -> None:
    used = len(summary["s_markers_used"]) + len(summary["g2m_markers_used"])
    missing = summary["s_markers_missing"] + summary["g2m_markers_missing"]
    text = (f"{used} cell-cycle markers found in the data ({len(summary['s_markers_used'])} S, "
            f"{len(summary['g2m_markers_used'])} G2/M). ")
    text += (f"Missing from the data ({len(missing)}): {', '.join(missing)}." if missing else "No marker is missing.")
    if "skipped" in summary:
        html.warning(f"Cell-cycle scoring skipped: {summary['skipped']}. {text}")
        return
    html.note(text + " Scores computed on the scaled columns of the markers and their control genes (X is not "
              "scaled); control genes drawn from bins of mean log-normalised expression.")
    pl.cell_cycle_phases(adata.obs, perturbation_key)
    plt.show()


def show_cell_cycle_skipped() -> None:
    html.note("Cell-cycle scoring skipped: the parameter cell_cycle_genes is not set.")


def show_gene_selection(adata, genes: pd.DataFrame) -> None:
    """``adata``: the selected genes (step 1's output); ``genes``: every gene that passed QC (genes.csv)."""
    html.note(
        f"{adata.n_vars} of {len(genes)} genes selected ({adata.uns['perturbnmf']['preprocess']['gene_selection']}); "
        "mitochondrial genes are never selected. Only the selected genes are kept in preprocessed.h5ad; "
        "genes.csv lists every gene that passed QC with its metrics."
    )
    pl.gene_selection(genes)
