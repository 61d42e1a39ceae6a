"""Glue the notebooks call: paths, artifacts between steps, and the report sections.

Each ``show_*`` function displays one section (tables with their explaining sentence and
figures) so the notebooks stay a list of calls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import enrichment, evaluation, factorize, plotting, report, simulate
from .preprocess import InputError
from .provenance import REPO_ROOT

__all__ = [
    "resolve", "write_simulated_inputs", "check_gene_sets", "library_name", "write_h5ad", "read_h5ad",
    "show_input", "show_simulation_truth", "show_qc", "show_cell_cycle", "show_k_selection", "show_factorization",
    "show_program_recovery", "show_effect_recovery", "show_calibration", "show_top_genes", "show_enrichment",
    "write_summary_workbook",
]


def resolve(path: str | Path) -> Path:
    """A parameter path: absolute as given, relative ones against the repository root."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


# --- inputs ------------------------------------------------------------------------------

def write_simulated_inputs(input_path: str, gene_sets_path: str, cell_cycle_path: str | None, seed: int = 0,
                           n_cells: int = 4000, n_genes: int = 2000) -> None:
    """Write the demo's simulated screen, its gene sets and cell-cycle markers to the given paths.

    Refuses to overwrite an ``input`` file that is not itself a simulated screen.
    """
    target = resolve(input_path)
    if target.exists():
        existing = ad.read_h5ad(target, backed="r")
        is_simulated = "simulation" in existing.uns
        existing.file.close()
        if not is_simulated:
            raise InputError(
                f"'simulate' is true but {input_path!r} (parameter 'input') exists and is not a simulated screen; "
                "set 'simulate: false' to analyse it, or point 'input' at a new file."
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    adata = simulate.simulate_screen(n_cells=n_cells, n_genes=n_genes, seed=seed)
    _atomic_write(target, lambda tmp: adata.write_h5ad(tmp))
    gmt = resolve(gene_sets_path)
    gmt.parent.mkdir(parents=True, exist_ok=True)
    simulate.write_gmt(gmt, simulate.planted_gene_sets(adata, seed=seed))
    if cell_cycle_path:
        markers = resolve(cell_cycle_path)
        markers.parent.mkdir(parents=True, exist_ok=True)
        simulate.write_cell_cycle_genes(markers, adata)


def library_name(path: str | Path) -> str:
    """Short name of a gene-set library from its file name (``h.all.v7.0.symbols.gmt`` → ``h.all.v7.0.symbols``)."""
    return Path(path).name.removesuffix(".gmt")


def check_gene_sets(paths: list[str], genes: pd.Index) -> dict[str, dict[str, Any]]:
    """Read each GMT early and check it shares genes with the data; return a summary per library."""
    summary = {}
    gene_set = set(genes)
    for path in paths:
        if not str(path).endswith(".gmt"):
            raise InputError(
                f"Gene-set library {path!r} (parameter 'gene_sets') is not a .gmt file. Enrichment runs offline: "
                "download the library as GMT (e.g. from Enrichr or MSigDB) and give its path."
            )
        sets = enrichment.read_gmt(resolve(path))
        members = set().union(*sets.values())
        shared = members & gene_set
        if not shared:
            raise InputError(
                f"Gene-set library {path!r} shares no gene with the data (e.g. data {sorted(gene_set)[:3]}, "
                f"library {sorted(members)[:3]}). Are the identifiers of the same kind (symbols vs Ensembl IDs, "
                "human vs mouse case)?"
            )
        summary[library_name(path)] = {"path": str(path), "gene_sets": len(sets), "genes": len(members),
                                       "genes_in_data": len(shared)}
    return summary


# --- artifacts between steps -------------------------------------------------------------

def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    write(tmp)
    os.replace(tmp, path)


def write_h5ad(adata: ad.AnnData, path: Path, step: str, record: dict[str, Any]) -> None:
    """Write a step's AnnData (atomically), with the step's provenance in ``uns['perturbnmf']``."""
    adata.uns.setdefault("perturbnmf", {})[f"{step}_provenance"] = json.dumps(record, default=str)
    _atomic_write(Path(path), lambda tmp: adata.write_h5ad(tmp))
    report.note(f"Wrote <code>{Path(path).name}</code>: {adata.n_obs} cells × {adata.n_vars} genes.")


def read_h5ad(path: Path, producing_step: str) -> ad.AnnData:
    """Read the artifact of an earlier step, or say which step to run first."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"{path} does not exist: run the {producing_step} step of this run first "
            f"(python run_all.py PARAMS.yaml --from {producing_step})."
        )
    return ad.read_h5ad(path)


# --- report sections ---------------------------------------------------------------------

def show_input(adata, perturbation_key, control_label, batch_key, guide_key, libraries) -> None:
    groups = adata.obs[perturbation_key]
    rows = [
        ("cells × genes", f"{adata.n_obs} × {adata.n_vars}"),
        ("perturbation groups", f"{groups.nunique()} ({groups.nunique() - 1} perturbations + {control_label!r})"),
        ("control cells", int((groups == control_label).sum())),
        ("batches", ", ".join(map(str, adata.obs[batch_key].cat.categories)) if batch_key else "none given"),
        ("guides", adata.obs[guide_key].nunique() if guide_key else "none given"),
    ]
    rows += [(f"gene sets: {name}", f"{info['gene_sets']} sets, {info['genes_in_data']} of their genes in the data")
             for name, info in libraries.items()]
    report.table(pd.DataFrame(rows, columns=["", "value"]), "The screen as read, before QC.")


def show_simulation_truth(adata) -> None:
    truth = adata.uns["simulation"]
    effects = pd.DataFrame(truth["effects"])
    report.note(
        f"This is a simulated screen with known truth: {len(truth['program_names'])} planted programs "
        f"({', '.join(truth['program_names'])}); {effects['perturbation'].nunique()} targets shift a program, "
        f"{len(truth['null_targets'])} targets do nothing ({', '.join(truth['null_targets'])})."
    )
    report.table(effects, "Planted perturbation effects (fold change of the program's usage in the target's cells).")


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
    report.table(pd.DataFrame(rows, columns=["", "value"]),
                 f"Quality control: thresholds min_counts_per_cell={params['min_counts_per_cell']}, "
                 f"min_genes_per_cell={params['min_genes_per_cell']}, max_pct_mito={params['max_pct_mito']}.")
    dropped = log.get("dropped_small_groups", {})
    if dropped:
        report.warning(
            f"Dropped {len(dropped)} perturbation group(s) with fewer than {params['min_cells_per_group']} cells "
            "(parameter min_cells_per_group): " + ", ".join(f"{g} ({n})" for g, n in dropped.items())
        )


def show_cell_cycle(adata, summary: dict[str, Any], perturbation_key: str) -> None:
    used = len(summary["s_markers_used"]) + len(summary["g2m_markers_used"])
    missing = summary["s_markers_missing"] + summary["g2m_markers_missing"]
    text = (f"{used} cell-cycle markers found in the data ({len(summary['s_markers_used'])} S, "
            f"{len(summary['g2m_markers_used'])} G2/M). ")
    text += (f"Missing from the data ({len(missing)}): {', '.join(missing)}." if missing else "No marker is missing.")
    if "skipped" in summary:
        report.warning(f"Cell-cycle scoring skipped: {summary['skipped']}. {text}")
        return
    report.note(text + " Scores computed on a scaled copy of the log-normalised data (X is not scaled).")
    plotting.cell_cycle_phases(adata.obs, perturbation_key)
    plt.show()


def show_k_selection(adata, k_table: pd.DataFrame, paths) -> None:
    """The sweep table, the rule that suggested k and the k-selection plot; k_selection.json for the index."""
    info = adata.uns["snmf"]
    paths.k_selection_json.write_text(json.dumps(
        {key: info[key] for key in ("k", "suggested_k", "k_rule", "k_source", "relative_error",
                                    "holdout_relative_error", "stability")}, indent=2))
    report.table(k_table, f"Per k, {info['n_restarts']} semi-NMF restarts ({info['solver']} solver) on "
                 f"{1 - info['params']['holdout_fraction']:.0%} of the cells: relative error of the consensus model "
                 "on those cells and on the held-out cells (usage refitted, programs fixed), of the best single "
                 "restart, stability (silhouette of all restarts' unit-norm programs grouped into k consensus "
                 "programs; 1 = every restart finds the same programs), median iterations, restarts that "
                 "converged, fit time summed over restarts.", max_rows=50)
    chosen = (f"Kept k = {info['k']}, the suggested k." if info["k_source"] == "suggested"
              else f"Kept k = {info['k']}, set by the parameter k (the suggestion was {info['suggested_k']}).")
    report.note(f"{info['k_rule']} {chosen}")
    plotting.k_selection(k_table, info["k"], info["suggested_k"])
    plt.show()
    if info["stability"] < 0.5:
        report.warning(
            f"Stability at k = {info['k']} is {info['stability']:.2f}: restarts find different programs. "
            "Semi-NMF is unique only up to mixing programs (W → WQ with H free), so the consensus programs "
            "are the medians of groups that differ; interpret single programs with care."
        )


def show_factorization(adata) -> None:
    info = adata.uns["snmf"]
    report.note(
        f"The kept model is the consensus of {info['n_restarts']} restarts at k = {info['k']}: each program is the "
        "median of its group of restart programs, and every cell's usage is refitted to them by non-negative "
        f"least squares. Relative error {info['relative_error']:.4f} on all cells, "
        f"{info['holdout_relative_error']:.4f} on held-out cells; stability {info['stability']:.2f}. Stored in "
        "obsm['X_snmf'] (usage), varm['snmf_loadings'] (loadings, unit L2 norm per program) and uns['snmf']."
    )
    plotting.restart_similarity(info["restart_programs"], np.asarray(info["restart_labels"]), info["program_names"])
    plt.show()
    if not info["converged"]:
        report.warning("Not every restart of the kept k converged within max_iter: raise max_iter or tol.")


def _planted_weights(adata) -> tuple[np.ndarray, list[str]]:
    used = adata.var["snmf_used"].to_numpy(dtype=bool)
    return adata.varm["simulation_weights"][used], list(adata.uns["simulation"]["program_names"])


def _program_match(adata) -> pd.DataFrame:
    weights, names = _planted_weights(adata)
    loadings = factorize.loadings(adata)
    return evaluation.match_programs(weights, loadings.to_numpy(), names, list(loadings.columns))


def _update_recovery(paths, values: dict[str, Any]) -> None:
    record = json.loads(paths.recovery_json.read_text()) if paths.recovery_json.exists() else {}
    record.update(values)
    paths.recovery_json.write_text(json.dumps(record, indent=2))


def show_program_recovery(adata, paths) -> None:
    """Demo only: how well the planted programs were recovered (cosine of loadings)."""
    weights, names = _planted_weights(adata)
    loadings = factorize.loadings(adata)
    match = evaluation.match_programs(weights, loadings.to_numpy(), names, list(loadings.columns))
    similarity = evaluation.program_similarity(weights, loadings.to_numpy(), names, list(loadings.columns))
    report.table(match, "Truth check (simulated data): each planted program matched one-to-one to a recovered "
                        "program (Hungarian matching on the cosine similarity of gene loadings).")
    plotting.similarity_heatmap(similarity)
    plt.show()
    _update_recovery(paths, {"mean_program_cosine": float(match["cosine"].mean()),
                             "min_program_cosine": float(match["cosine"].min())})


def show_effect_recovery(adata, contrasts: pd.DataFrame, paths, fdr: float) -> None:
    """Demo only: planted perturbation effects found, and false discoveries."""
    result = evaluation.effect_recovery(contrasts, pd.DataFrame(adata.uns["simulation"]["effects"]),
                                        _program_match(adata), fdr=fdr)
    report.note(
        f"Truth check (simulated data): {result['n_recovered']} of {result['n_planted']} planted effects found "
        f"(sensitivity {result['sensitivity']:.2f}) at q < {fdr}; {result['n_false_discoveries']} of "
        f"{result['n_discoveries']} discoveries are not planted pairs (false discovery proportion "
        f"{result['false_discovery_proportion']:.2f}): {result['n_null_target_discoveries']} on targets "
        f"without any planted effect, {result['n_spillover_discoveries']} on other programs of targets that do "
        "have one (recovered programs blend planted ones, so part of a real effect spills over)."
    )
    report.table(result["table"], "Each planted effect, the recovered program it maps to, and what the test found.")
    _update_recovery(paths, {key: result[key] for key in ("n_planted", "n_recovered", "sensitivity",
                                                          "n_discoveries", "n_false_discoveries",
                                                          "n_null_target_discoveries", "n_spillover_discoveries",
                                                          "false_discovery_proportion")})


def show_calibration(null: pd.DataFrame, contrasts: pd.DataFrame, fdr: float, paths) -> dict[str, Any]:
    """The contrast test on control-only pseudo-perturbations: summary, QQ plot, null table on disk."""
    from .stats import calibration_summary

    null.to_csv(paths.calibration_null, index=False)
    summary = calibration_summary(null["pvalue"], fdr=fdr)
    split = null["null_split"].iloc[0]
    rows = [
        ("pseudo-perturbations", f"{null['perturbation'].nunique()} ({'one per control guide' if split == 'control guide' else 'random control subsets sized like real groups'})"),
        ("null tests (pseudo-perturbation × program)", summary["n_tests"]),
        ("inflation factor λ (1 = calibrated)", f"{summary['inflation']:.2f}"),
        ("share of null p < 0.05 (0.05 = calibrated)", f"{summary['share_below_0_05']:.3f}"),
        (f"null hits at q < {fdr}", summary["n_null_hits"]),
        ("uniformity (Kolmogorov–Smirnov p)", f"{summary['ks_pvalue']:.3g}"),
    ]
    report.table(pd.DataFrame(rows, columns=["", "value"]),
                 "Control cells carry no perturbation, so every test on pseudo-perturbations made of them is "
                 "null: a calibrated test gives uniform p-values (λ ≈ 1) and no hits. The test is exactly the one "
                 "used for the real perturbations. Null table: calibration_null.csv.")
    plotting.null_qq(null["pvalue"], contrasts["pvalue"])
    plt.show()
    if summary["inflation"] > 1.2 or summary["n_null_hits"] > 0:
        report.warning(
            f"The test is anti-conservative on control cells (λ = {summary['inflation']:.2f}, "
            f"{summary['n_null_hits']} null hits at q < {fdr}): cells are not independent replicates "
            "(guides, batches), so read the real q-values with caution."
        )
    return summary


def show_top_genes(top: pd.DataFrame, n_shown: int = 10) -> None:
    wide = (top[top["rank"] <= n_shown].groupby(["program", "side"])["gene"]
            .apply(lambda genes: ", ".join(genes)).unstack("side").reindex(columns=["positive", "negative"]))
    report.table(wide.reset_index().fillna("–"),
                 f"The {n_shown} genes with the largest positive and the most negative loadings per program "
                 "(loadings are signed; each side is its own gene list). All top genes are in top_genes.csv.",
                 max_rows=200)


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
    report.table(shown, f"Gene sets over-represented at q < {fdr} among each program's top genes: overlap = genes of "
                        "the list in the set / genes in the list; term size counts the set's genes among the "
                        f"background (the {n_background} factorised genes); q = Benjamini–Hochberg over the gene "
                        "sets of one library tested for one list.")


def write_summary_workbook(paths, fdr: float) -> None:
    """summary.xlsx with the sheets of the original analysis plus contrasts and top genes."""
    anova = pd.read_csv(paths.program_anova) if paths.program_anova.exists() else pd.DataFrame()
    sheets = {
        "W_ANOVA": anova,
        "Significant Factors": anova[anova["qvalue"] < fdr] if len(anova) else anova,
        "Pathway Enrichment": pd.read_csv(paths.enrichment),
        "Top Pathways": pd.read_csv(paths.top_terms),
        "Program Contrasts": pd.read_csv(paths.program_contrasts) if paths.program_contrasts.exists() else pd.DataFrame(),
        "Top Genes": pd.read_csv(paths.top_genes),
    }
    report.write_workbook(paths.summary_xlsx, sheets)
