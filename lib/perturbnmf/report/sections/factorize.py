"""Report sections of step 2 (factorize): choosing k, the kept model, its programs, the split-half refit."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ... import pl, tl
from .. import html

__all__ = ["show_header", "intro", "model_name", "show_k_selection", "show_factorization", "show_program_recovery",
           "show_split_half_programs", "show_split_half_skipped", "show_cells"]


_MODEL_INTROS = {
    "nmf": "NMF writes the log-normalised expression of the selected genes as <b>X ≈ W H</b>: <b>W</b> (cells × k, "
           "non-negative) is how much each cell uses each program, <b>H</b> (k × genes, non-negative) the program's "
           "gene loadings. Both factors being non-negative makes the programs identifiable (the real programs, not "
           "blends of them), which is why NMF is the default (README, 'Which model'). Every batch's baseline "
           "expression, shared by all its cells, has loadings of its own (fixed usage 1 for the batch's cells), and "
           "so has each technical covariate (<code>covariate_keys</code>: sequencing depth and the mitochondrial "
           "share by default, each as known usage: every gene follows its own curve in it, piecewise linear through "
           "knots at the covariate's quantiles), so the k programs are "
           "the biology that varies between cells. Genes a program lowers show as negative <i>gene "
           "scores</i> (regression of expression on usage).",
    "seminmf": "Semi-NMF (the original analysis's model) writes the normalised expression of the selected genes as "
               "<b>X ≈ W H</b>: <b>W</b> (cells × k, non-negative) is how much each cell uses each program, <b>H</b> "
               "(k × genes, signed) the program's gene loadings. Signed loadings leave the programs defined only up "
               "to mixing (W → WQ, H → Q⁻¹H), so they can come out as blends of the real ones.",
}


def intro(model: str) -> str:
    """The factorize report's opening paragraph for ``model``."""
    return (_MODEL_INTROS[model] + " For every k several restarts are fitted; the error on held-out cells and the "
            "restarts' agreement (stability) suggest k, and the kept model is the consensus of the restarts.")


def show_header(params: dict[str, Any], paths) -> dict[str, Any]:
    """The step's title, intro, parameters and provenance (of preprocessed.h5ad); returns the provenance record."""
    return html.header("factorize", params, input_path=paths.preprocessed, intro=intro(params["model"]))


def model_name(info: dict) -> str:
    """'NMF' or 'semi-NMF', as ``uns['snmf']`` records the model."""
    return {"nmf": "NMF", "seminmf": "semi-NMF"}[info.get("model", "seminmf")]


def show_k_selection(adata, k_table: pd.DataFrame) -> None:
    """The sweep table, the rule that suggested k and the k-selection plot."""
    info = adata.uns["snmf"]
    params = info["params"]
    n_sweep = params.get("n_sweep_cells", params["n_cells"])
    cells = ("the cells" if n_sweep == params["n_cells"] else
             f"a random {n_sweep:,} of the {params['n_cells']:,} cells (parameter sweep_max_cells; the kept k's "
             "programs were then fitted on all cells)")
    html.table(k_table, f"Per k, {info['n_restarts']} {model_name(info)} restarts ({info['solver']} solver) on "
                 f"{1 - params['holdout_fraction']:.0%} of {cells}: relative error of the consensus model "
                 "on those cells and on the held-out cells (each held-out cell's usage fitted on half of the genes "
                 "predicts the other half), of the best single restart, stability (silhouette of all restarts' "
                 "unit-norm programs grouped into k consensus programs; 1 = every restart finds the same programs), "
                 "restart programs left out of the consensus as outliers (local density), median iterations, "
                 "restarts that converged, fit time summed over restarts; holdout_excess: held-out squared error "
                 "above the best k's, with its standard error over cells (paired).", max_rows=50)
    chosen = (f"Kept k = {info['k']}, the suggested k." if info["k_source"] == "suggested"
              else f"Kept k = {info['k']}, set by the parameter k (the suggestion was {info['suggested_k']}).")
    html.note(f"{info['k_rule']} {chosen}")
    pl.k_selection(k_table, info["k"], info["suggested_k"])
    plt.show()
    if info["stability"] < 0.5:
        why = (" Semi-NMF is unique only up to mixing programs (W → WQ with H free); model: nmf gives identifiable "
               "programs." if info.get("model") == "seminmf" else "")
        html.warning(
            f"Stability at k = {info['k']} is {info['stability']:.2f}: restarts find different programs, so the "
            f"consensus programs are the medians of groups that differ; interpret single programs with care.{why}"
        )


def show_factorization(adata) -> None:
    info = adata.uns["snmf"]
    html.note(
        f"The kept model is the {model_name(info)} consensus of {info['n_restarts']} restarts at k = {info['k']}: "
        "each program is the median of its group of restart programs (outliers left out), fitted once more from "
        "there, and every cell's usage is refitted to them by non-negative least squares. Relative error "
        f"{info['relative_error']:.4f} on all cells, {info['holdout_relative_error']:.4f} on held-out cells; "
        f"stability {info['stability']:.2f}. Stored in obsm['X_snmf'] (usage), varm['snmf_loadings'] (loadings, unit "
        "L2 norm per program), varm['snmf_gene_scores'] (signed gene scores), varm['snmf_baseline'] (NMF: each "
        "batch's baseline and the loadings of the technical covariates, uns['snmf']['baseline']['levels']) and "
        "uns['snmf']."
    )
    pl.restart_similarity(info["restart_programs"], np.asarray(info["restart_labels"]), info["program_names"])
    plt.show()
    if not info["converged"]:
        html.warning("Not every restart of the kept k converged within max_iter: raise max_iter or tol.")


def show_program_recovery(match: pd.DataFrame, similarity: pd.DataFrame) -> None:
    """Demo only: how well the planted programs were recovered (cosine of gene scores)."""
    html.table(match, "Truth check (simulated data): each planted program matched one-to-one to a recovered "
                      "program (Hungarian matching on the cosine similarity of gene scores: each gene's expression "
                      "regressed on the recovered usage, and on the planted usage for the planted programs).")
    pl.similarity_heatmap(similarity)
    plt.show()


def show_split_half_programs(adata, match: pd.DataFrame) -> None:
    """How closely the programs learned on half of the cells resemble the kept ones."""
    info = adata.uns["snmf"]["split_half"]
    min_cosine = tl.REPRODUCED_COSINE
    reproduced = int((match["cosine"] >= min_cosine).sum())
    wide = pd.DataFrame([match["cosine"].to_numpy(dtype=float)], columns=match["program"].tolist())
    wide.insert(0, "", "cosine with the learn-half twin")
    html.table(wide,
                 f"Consensus {model_name(adata.uns['snmf'])} with the same k, refitted on a random half of every "
                 "perturbation group "
                 f"({info['n_learn']} cells); each kept program and the cosine of its loadings with its matched "
                 f"learn-half twin. {reproduced} of {len(match)} programs are reproduced (cosine ≥ {min_cosine}). "
                 f"The other {info['n_test']} cells' usage of the learn-half programs is in obsm['X_snmf_split']; "
                 "step 3 tests on them.", max_rows=5)


def show_split_half_skipped() -> None:
    html.note("Skipped (parameter split_half is false): step 3 tests on the cells that shaped the programs.")


def show_cells(adata) -> None:
    """The cells on the UMAP of their program usage, one panel per program (at most 12)."""
    info = adata.uns[tl.UMAP_BASIS]
    params = info["params"]
    n_programs = len(adata.uns["snmf"]["program_names"])
    subsample = (f"a subsample of {info['n_cells']:,} of the {adata.n_obs:,} cells, every {params['stratified_by']} "
                 "keeping its share (parameter umap_max_cells)" if info["n_cells"] < adata.n_obs
                 else f"all {adata.n_obs:,} cells")
    html.note(f"A neighbours graph ({params['n_neighbors']} neighbours) and UMAP (min_dist {params['min_dist']}, "
              f"seed {params['random_state']}) of {subsample}, on their usage of the {n_programs} programs (each "
              "divided by its standard deviation, so every program weighs the same). Cells close together use the "
              "programs alike. Stored in obsm['X_umap_snmf'] (NaN for cells not embedded), its parameters in "
              "uns['umap_snmf']: <code>sc.pl.embedding(adata, basis='umap_snmf', color=...)</code> works on "
              "factorized.h5ad. Step 3 shows the cells of the perturbations with the most hits on it."
              + (f" The first 12 of the {n_programs} programs are shown." if n_programs > 12 else ""))
    html.compact_figure(pl.program_embedding(adata))
