"""Glue the notebooks call: paths, artifacts between steps, and the report sections.

Each ``show_*`` function displays one section (tables with their explaining sentence and
figures) so the notebooks stay a list of calls.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import enrichment, evaluation, factorize, plotting, report, simulate, stats
from .preprocess import InputError
from .provenance import REPO_ROOT

__all__ = [
    "resolve", "write_simulated_inputs", "library_name", "load_libraries", "check_gene_sets", "write_h5ad",
    "read_h5ad", "show_input", "show_simulation_truth", "show_qc", "show_cell_cycle", "show_k_selection",
    "show_factorization", "show_program_recovery", "show_split_half_programs", "contrast_method", "show_hits",
    "show_guide_consistency", "split_half_comparison", "show_split_half", "show_calibration", "show_effect_recovery",
    "show_top_genes", "show_enrichment", "show_program_labels", "run_prerank", "show_prerank", "labelled_hits",
    "top_hit_programs", "write_summary_workbook",
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
    adata = simulate.simulate_screen(n_cells=n_cells, n_genes=n_genes, seed=seed, **simulate.DEMO_DESIGN)
    _atomic_write(target, lambda tmp: adata.write_h5ad(tmp))
    gmt = resolve(gene_sets_path)
    gmt.parent.mkdir(parents=True, exist_ok=True)
    simulate.write_gmt(gmt, simulate.planted_gene_sets(adata, seed=seed))
    if cell_cycle_path:
        markers = resolve(cell_cycle_path)
        markers.parent.mkdir(parents=True, exist_ok=True)
        simulate.write_cell_cycle_genes(markers, adata)


def library_name(spec: str | Path) -> str:
    """Short name of a gene-set library: the GMT file name without ``.gmt``, or the Enrichr name."""
    return Path(spec).name.removesuffix(".gmt")


def _is_path(spec: str) -> bool:
    return str(spec).endswith(".gmt") or "/" in str(spec) or resolve(spec).is_file()


def load_libraries(specs: list[str]) -> dict[str, dict[str, list[str]]]:
    """Every gene-set library of parameter ``gene_sets``: GMT paths read locally, other names from Enrichr."""
    libraries = {}
    for spec in specs:
        try:
            libraries[library_name(spec)] = enrichment.load_library(resolve(spec) if _is_path(spec) else spec)
        except (OSError, ValueError) as exc:
            raise InputError(f"Gene-set library {spec!r} (parameter 'gene_sets'): {exc}") from None
    return libraries


def _identifier_kind(names) -> str:
    """What a sample of gene identifiers looks like: Ensembl IDs, upper-case (human) or capitalised (mouse) symbols."""
    names = [str(n) for n in names][:2000]
    if not names:
        return "no identifiers"
    if sum(n.upper().startswith("ENS") and any(c.isdigit() for c in n) for n in names) > len(names) / 2:
        return "Ensembl IDs"
    letters = [n for n in names if any(c.isalpha() for c in n)]
    if sum(n[:1].isupper() and n[1:] == n[1:].lower() and n[1:] != n[1:].upper() for n in letters) > len(letters) / 2:
        return "capitalised (mouse-style) symbols"
    if sum(n == n.upper() for n in letters) > len(letters) / 2:
        return "upper-case (human-style) symbols"
    return "other identifiers"


def check_gene_sets(specs: list[str], genes: pd.Index) -> dict[str, dict[str, Any]]:
    """Read each library early and check it shares genes with the data; return a summary per library."""
    summary = {}
    gene_set = set(genes)
    for spec, (name, sets) in zip(specs, load_libraries(specs).items()):
        members = set().union(*sets.values())
        shared = members & gene_set
        if not shared:
            data_kind, library_kind = _identifier_kind(sorted(gene_set)), _identifier_kind(sorted(members))
            diagnosis = (f"The data uses {data_kind}, the library uses {library_kind}: convert one to the other "
                         "(e.g. var names from a gene-symbol column) or use a library with the data's identifiers."
                         if data_kind != library_kind else
                         "Both look like the same kind of identifier; is it a library for another organism?")
            raise InputError(
                f"Gene-set library {spec!r} (parameter 'gene_sets') shares no gene with the data (e.g. data "
                f"{sorted(gene_set)[:3]}, library {sorted(members)[:3]}). {diagnosis}"
            )
        summary[name] = {"path": str(spec), "gene_sets": len(sets), "genes": len(members),
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


#: model -> how the factorize report introduces it.
_MODEL_INTROS = {
    "nmf": "NMF writes the log-normalised expression of the selected genes as <b>X ≈ W H</b>: <b>W</b> (cells × k, "
           "non-negative) is how much each cell uses each program, <b>H</b> (k × genes, non-negative) the program's "
           "gene loadings. Both factors being non-negative makes the programs identifiable (the real programs, not "
           "blends of them), which is why NMF is the default (README, 'Which model'). Every batch's baseline "
           "expression, shared by all its cells, has loadings of its own (fixed usage 1 for the batch's cells), so "
           "the k programs are what varies between cells. Genes a program lowers show as negative <i>gene "
           "scores</i> (regression of expression on usage).",
    "seminmf": "Semi-NMF (the original analysis's model) writes the normalised expression of the selected genes as "
               "<b>X ≈ W H</b>: <b>W</b> (cells × k, non-negative) is how much each cell uses each program, <b>H</b> "
               "(k × genes, signed) the program's gene loadings. Signed loadings leave the programs defined only up "
               "to mixing (W → WQ, H → Q⁻¹H), so they can come out as blends of the real ones.",
}


def factorize_intro(model: str) -> str:
    """The factorize report's opening paragraph for ``model``."""
    return (_MODEL_INTROS[model] + " For every k several restarts are fitted; the error on held-out cells and the "
            "restarts' agreement (stability) suggest k, and the kept model is the consensus of the restarts.")


def model_name(info: dict) -> str:
    """'NMF' or 'semi-NMF', as ``uns['snmf']`` records the model."""
    return {"nmf": "NMF", "seminmf": "semi-NMF"}[info.get("model", "seminmf")]


def show_k_selection(adata, k_table: pd.DataFrame, paths) -> None:
    """The sweep table, the rule that suggested k and the k-selection plot; k_selection.json for the index."""
    info = adata.uns["snmf"]
    paths.k_selection_json.write_text(json.dumps(
        {key: info[key] for key in ("model", "k", "suggested_k", "k_rule", "k_source", "relative_error",
                                    "holdout_relative_error", "stability")}, indent=2))
    report.table(k_table, f"Per k, {info['n_restarts']} {model_name(info)} restarts ({info['solver']} solver) on "
                 f"{1 - info['params']['holdout_fraction']:.0%} of the cells: relative error of the consensus model "
                 "on those cells and on the held-out cells (each held-out cell's usage fitted on half of the genes "
                 "predicts the other half), of the best single restart, stability (silhouette of all restarts' "
                 "unit-norm programs grouped into k consensus programs; 1 = every restart finds the same programs), "
                 "restart programs left out of the consensus as outliers (local density), median iterations, "
                 "restarts that converged, fit time summed over restarts; holdout_excess: held-out squared error "
                 "above the best k's, with its standard error over cells (paired).", max_rows=50)
    chosen = (f"Kept k = {info['k']}, the suggested k." if info["k_source"] == "suggested"
              else f"Kept k = {info['k']}, set by the parameter k (the suggestion was {info['suggested_k']}).")
    report.note(f"{info['k_rule']} {chosen}")
    plotting.k_selection(k_table, info["k"], info["suggested_k"])
    plt.show()
    if info["stability"] < 0.5:
        why = (" Semi-NMF is unique only up to mixing programs (W → WQ with H free); model: nmf gives identifiable "
               "programs." if info.get("model") == "seminmf" else "")
        report.warning(
            f"Stability at k = {info['k']} is {info['stability']:.2f}: restarts find different programs, so the "
            f"consensus programs are the medians of groups that differ; interpret single programs with care.{why}"
        )


def show_factorization(adata) -> None:
    info = adata.uns["snmf"]
    report.note(
        f"The kept model is the {model_name(info)} consensus of {info['n_restarts']} restarts at k = {info['k']}: "
        "each program is the median of its group of restart programs (outliers left out), fitted once more from "
        "there, and every cell's usage is refitted to them by non-negative least squares. Relative error "
        f"{info['relative_error']:.4f} on all cells, {info['holdout_relative_error']:.4f} on held-out cells; "
        f"stability {info['stability']:.2f}. Stored in obsm['X_snmf'] (usage), varm['snmf_loadings'] (loadings, unit "
        "L2 norm per program), varm['snmf_gene_scores'] (signed gene scores), varm['snmf_baseline'] (NMF: each "
        "batch's baseline) and uns['snmf']."
    )
    plotting.restart_similarity(info["restart_programs"], np.asarray(info["restart_labels"]), info["program_names"])
    plt.show()
    if not info["converged"]:
        report.warning("Not every restart of the kept k converged within max_iter: raise max_iter or tol.")


def _planted_and_recovered_scores(adata) -> tuple[np.ndarray, list[str], pd.DataFrame]:
    """Gene scores of the planted programs (expression regressed on the planted usage) and of the
    recovered ones: the same scale for any model, so signed and non-negative loadings compare alike."""
    info = adata.uns["snmf"]
    X = factorize._used_matrix(adata, info["params"]["layer"], info["params"]["mask_var"])
    planted = factorize.regression_scores(X, np.asarray(adata.obsm["simulation_usage"], dtype=float)).T
    return planted, list(adata.uns["simulation"]["program_names"]), factorize.gene_scores(adata)


def _program_match(adata) -> pd.DataFrame:
    planted, names, scores = _planted_and_recovered_scores(adata)
    return evaluation.match_programs(planted, scores.to_numpy(), names, list(scores.columns))


def _update_recovery(paths, values: dict[str, Any]) -> None:
    record = json.loads(paths.recovery_json.read_text()) if paths.recovery_json.exists() else {}
    record.update(values)
    paths.recovery_json.write_text(json.dumps(record, indent=2))


def show_program_recovery(adata, paths) -> None:
    """Demo only: how well the planted programs were recovered (cosine of gene scores)."""
    planted, names, scores = _planted_and_recovered_scores(adata)
    match = evaluation.match_programs(planted, scores.to_numpy(), names, list(scores.columns))
    similarity = evaluation.program_similarity(planted, scores.to_numpy(), names, list(scores.columns))
    report.table(match, "Truth check (simulated data): each planted program matched one-to-one to a recovered "
                        "program (Hungarian matching on the cosine similarity of gene scores: each gene's expression "
                        "regressed on the recovered usage, and on the planted usage for the planted programs).")
    plotting.similarity_heatmap(similarity)
    plt.show()
    _update_recovery(paths, {"mean_program_cosine": float(match["cosine"].mean()),
                             "min_program_cosine": float(match["cosine"].min())})


def show_effect_recovery(adata, contrasts: pd.DataFrame, groups: pd.Series, control_label: str, paths,
                         fdr: float) -> None:
    """Demo only: planted perturbation effects found, and false discoveries judged three ways."""
    implied = evaluation.implied_effects(adata.obsm["simulation_usage"], factorize.usage(adata), groups.to_numpy(),
                                         control_label)
    result = evaluation.effect_recovery(contrasts, pd.DataFrame(adata.uns["simulation"]["effects"]),
                                        _program_match(adata), fdr=fdr, implied=implied)
    n_targets = contrasts.loc[contrasts["qvalue"] < fdr, "perturbation"].nunique()
    n_null_targets = len(adata.uns["simulation"]["null_targets"])
    null_called = len(set(contrasts.loc[contrasts["qvalue"] < fdr, "perturbation"])
                      & set(adata.uns["simulation"]["null_targets"]))
    rows = [
        ("planted effects found (right program, right sign)",
         f"{result['n_recovered']} of {result['n_planted']} (sensitivity {result['sensitivity']:.2f})"),
        (f"discoveries (q < {fdr})", result["n_discoveries"]),
        ("targets with a discovery / null targets among them", f"{n_targets} / {null_called} of {n_null_targets}"),
        ("discoveries against the sign of the implied shift (directional FDP)",
         f"{result['n_sign_errors']} ({result['directional_false_discovery_proportion']:.3f})"),
        (f"… or with an implied shift below |d| = {result['min_implied_effect']} (FDP)",
         f"{result['n_sign_errors'] + result['n_negligible']} ({result['implied_false_discovery_proportion']:.3f})"),
        ("discoveries that are not a planted pair (strict FDP)",
         f"{result['n_false_discoveries']} ({result['false_discovery_proportion']:.3f}): "
         f"{result['n_null_target_discoveries']} on null targets, {result['n_spillover_discoveries']} on other "
         "programs of perturbed targets"),
    ]
    report.table(pd.DataFrame(rows, columns=["truth check (simulated data)", "value"]),
                 "A planted effect changes more than its own program: recovered programs blend planted ones, and "
                 "a program whose genes rise takes a larger share of each cell's counts, so after normalisation "
                 "every other gene falls a little. These shifts are real in the data. The implied shift of each "
                 "perturbation × program is computed from the truth alone (recovered usage regressed on planted "
                 "usage over all cells, applied to the planted change of each target's mean usage); a discovery "
                 "is false when the implied shift has the other sign or is negligible. The strict count treats "
                 "every pair that was not planted as false.")
    report.table(result["table"], "Each planted effect, the recovered program it maps to, and what the test found.")
    keys = ("n_planted", "n_recovered", "sensitivity", "n_discoveries", "n_false_discoveries",
            "n_null_target_discoveries", "n_spillover_discoveries", "false_discovery_proportion", "n_sign_errors",
            "n_negligible", "min_implied_effect", "implied_false_discovery_proportion",
            "directional_false_discovery_proportion")
    _update_recovery(paths, {key: result[key] for key in keys} | {"n_null_targets_called": null_called})


def show_calibration(null: pd.DataFrame, contrasts: pd.DataFrame, fdr: float, paths) -> dict[str, Any]:
    """The contrast test on control-only pseudo-perturbations: summary, QQ plot, null table on disk."""
    null.to_csv(paths.calibration_null, index=False)
    summary = stats.calibration_summary(null["pvalue"], fdr=fdr)
    paths.calibration_json.write_text(json.dumps(summary, indent=2))
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


_TESTS = {
    "welch": "Welch t-test of usage in the perturbed cells against control cells; effect = difference of mean usage",
    "ols_batch": "the perturbation coefficient of usage ~ perturbed + C({batch}) on the perturbed and control cells "
                 "(HC3 standard errors), so batch differences are not credited to the perturbation; effect = the "
                 "batch-adjusted difference of mean usage",
    "mannwhitney": "Mann–Whitney rank test of usage in the perturbed cells against control cells (stratified by "
                   "batch as van Elteren's test when a batch key is given), robust to the skewed, zero-inflated "
                   "usage; effect = difference of mean usage (batch-adjusted with a batch key)",
}


def contrast_method(test: str, batch_key: str | None) -> str:
    """The contrast test of parameter ``test``.

    ``auto`` is the rank test (van Elteren's, stratified by batch, when there are batches): on
    zero-inflated usage the t-tests give about twice too many p-values in the far tail where
    Benjamini–Hochberg makes its first calls (tests/test_stats_power.py), the rank tests do not.
    """
    if test == "auto":
        return "mannwhitney"
    if test == "ols_batch" and not batch_key:
        raise InputError("Parameter 'test' is 'ols_batch' but 'batch_key' is not set: the batch-adjusted test "
                         "needs batches. Set 'batch_key', or use test 'welch', 'mannwhitney' or 'auto'.")
    return test


def show_hits(hits: pd.DataFrame, method: str, batch_key: str | None, fdr: float) -> None:
    columns = [c for c in ("perturbation", "program", "role", "n_cells", "effect", "effect_std", "statistic", "qvalue",
                           "consistency", "guide_heterogeneity_pvalue") if c in hits.columns]
    report.table(hits[columns], f"Perturbation × program pairs with q < {fdr}: {_TESTS[method].format(batch=batch_key)}"
                 "; effect_std = effect / pooled SD (Cohen's d), q = Benjamini–Hochberg over all perturbation × "
                 f"program tests; role: primary = the perturbation's largest |d| and any within "
                 f"{stats.PRIMARY_SHARE:.0%} of it, secondary = a smaller shift of another program (spill-over); "
                 "consistency counts the target's guides and the batches whose own effect has the "
                 "same sign; guide_heterogeneity_pvalue tests whether the target's guides differ from each other.")


def show_guide_consistency(hits: pd.DataFrame, guide_table: pd.DataFrame, n_shown: int = 12) -> None:
    """How many hits every guide supports, and the per-guide effects of the strongest hits."""
    with_guides = hits[hits["n_guides"] > 1]
    if not len(with_guides):
        report.note("No hit has two or more guides with enough cells, so guide consistency cannot be judged.")
        return
    all_agree = int((with_guides["n_guides_same_sign"] == with_guides["n_guides"]).sum())
    heterogeneous = int((with_guides["guide_heterogeneity_pvalue"] < 0.01).sum())
    report.note(f"{all_agree} of {len(with_guides)} hits with two or more guides have every guide shifting the "
                f"program in the same direction; {heterogeneous} show guides that differ from each other "
                "(heterogeneity p < 0.01). Per-guide effects of all pairs: guide_effects.csv.")
    plotting.guide_effects(with_guides.head(n_shown), guide_table)
    plt.show()


def show_split_half_programs(adata, match: pd.DataFrame) -> None:
    """How closely the programs learned on half of the cells resemble the kept ones."""
    info = adata.uns["snmf"]["split_half"]
    min_cosine = factorize.REPRODUCED_COSINE
    reproduced = int((match["cosine"] >= min_cosine).sum())
    wide = pd.DataFrame([match["cosine"].to_numpy(dtype=float)], columns=match["program"].tolist())
    wide.insert(0, "", "cosine with the learn-half twin")
    report.table(wide,
                 f"Consensus {model_name(adata.uns['snmf'])} with the same k, refitted on a random half of every "
                 "perturbation group "
                 f"({info['n_learn']} cells); each kept program and the cosine of its loadings with its matched "
                 f"learn-half twin. {reproduced} of {len(match)} programs are reproduced (cosine ≥ {min_cosine}). "
                 f"The other {info['n_test']} cells' usage of the learn-half programs is in obsm['X_snmf_split']; "
                 "step 3 tests on them.", max_rows=5)


def split_half_comparison(adata, groups: pd.Series, control_label: str, batch: pd.Series | None,
                          method: str) -> pd.DataFrame:
    """Test-half effects with the kept programs (they saw these cells) and with the learn-half programs.

    The step's contrast test (``method``) runs on the test-half cells twice. Returns one row per
    perturbation × program: ``effect``, ``effect_std`` and ``qvalue`` for both (suffixes
    ``_seen`` and ``_unseen``), ``cosine`` of the program with its learn-half twin and
    ``program_reproduced`` (cosine ≥ :data:`perturbnmf.factorize.REPRODUCED_COSINE`).
    """
    def contrast_test(part: pd.DataFrame) -> pd.DataFrame:
        return stats.program_contrasts(part, groups[part.index], control_label,
                                       batch=None if batch is None else batch[part.index], method=method)

    unseen = factorize.split_usage(adata)
    seen = factorize.usage(adata).loc[unseen.index]
    columns = ["perturbation", "program", "effect", "effect_std", "qvalue"]
    comparison = contrast_test(seen)[columns].merge(contrast_test(unseen)[columns], on=["perturbation", "program"],
                                                    suffixes=("_seen", "_unseen"))
    cosine = dict(zip(adata.uns["snmf"]["program_names"], adata.uns["snmf"]["split_half"]["cosine"]))
    comparison["cosine"] = comparison["program"].map(cosine)
    comparison["program_reproduced"] = comparison["cosine"] >= factorize.REPRODUCED_COSINE
    return comparison


def show_split_half(comparison: pd.DataFrame, contrasts: pd.DataFrame, fdr: float, n_learn: int) -> pd.DataFrame:
    """The double-dipping check: summary per group of programs, the scatter; contrasts gain split columns."""
    min_cosine = factorize.REPRODUCED_COSINE
    rows = []
    for reproduced, part in comparison.groupby("program_reproduced"):
        rows.append({
            "programs": (f"reproduced on the learn half (cosine ≥ {min_cosine})" if reproduced
                         else f"not reproduced (cosine < {min_cosine})"),
            "n programs": part["program"].nunique(),
            "correlation of d (seen vs unseen)": part["effect_std_seen"].corr(part["effect_std_unseen"]),
            f"hits q < {fdr}, seen": int((part["qvalue_seen"] < fdr).sum()),
            f"hits q < {fdr}, unseen": int((part["qvalue_unseen"] < fdr).sum()),
            "hits in both": int(((part["qvalue_seen"] < fdr) & (part["qvalue_unseen"] < fdr)).sum()),
        })
    report.table(pd.DataFrame(rows).iloc[::-1],
                 f"Double-dipping check. The programs were learned again on a random half of every perturbation "
                 f"group ({n_learn} cells) and the other half's usage refitted to them. On that test half, every "
                 "perturbation is tested twice: with the kept programs, which were learned on all cells including "
                 "these (seen), and with the learn-half programs, which never saw them (unseen). If learning and "
                 "testing on the same cells inflated the results, the seen test would find more and larger effects.")
    plotting.split_half_scatter(comparison, fdr, min_cosine)
    plt.show()
    split = comparison.rename(columns={"effect_unseen": "effect_split", "effect_std_unseen": "effect_std_split",
                                       "qvalue_unseen": "qvalue_split", "cosine": "split_program_cosine"})
    return contrasts.merge(split[["perturbation", "program", "effect_split", "effect_std_split", "qvalue_split",
                                  "split_program_cosine"]], on=["perturbation", "program"], how="left")


def show_top_genes(top: pd.DataFrame, n_shown: int = 10) -> None:
    wide = (top[top["rank"] <= n_shown].groupby(["program", "side"])["gene"]
            .apply(lambda genes: ", ".join(genes)).unstack("side").reindex(columns=["positive", "negative"]))
    report.table(wide.reset_index().fillna("–"),
                 f"The {n_shown} genes with the largest positive and the most negative gene scores per program: "
                 "positive = expression rises with the program's usage, negative = it falls (each side is its own "
                 "gene list). All top genes are in top_genes.csv.",
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


def show_program_labels(labels: pd.DataFrame, fdr: float) -> None:
    shown = labels[["program", "label", "library", "term", "qvalue"]]
    n_terms = int((labels["source"] == "term").sum())
    report.table(shown, f"A short label per program, used in the figures below and in the summary: the gene set with "
                        f"the smallest q (< {fdr}) over every library among the positive gene scores (↑), else among "
                        f"the negative gene scores (↓), else the program's three top genes. {n_terms} of {len(labels)} programs are labelled by a "
                        "gene set. Table: program_labels.csv.", max_rows=100)


def run_prerank(loadings: pd.DataFrame, libraries, **kwargs) -> tuple[pd.DataFrame, list[str]]:
    """:func:`perturbnmf.enrichment.prerank`, with gseapy's messages (written by its compiled core
    straight to file descriptor 2, past Python's ``sys.stderr``) collected for the report."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            ranked = enrichment.prerank(loadings, libraries, **kwargs)
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
        report.note(caption + f" No gene set reaches q < {fdr}.")
    else:
        report.table(significant[["program", "library", "term", "n_genes", "nes", "pvalue", "qvalue", "leading_edge"]],
                     caption + f" Shown: q < {fdr}. NES > 0: the set's genes load positively; leading_edge: the "
                     "genes that drive it.", max_rows=n_shown)
    for message in messages:
        report.note(f"gseapy: {html.escape(message)}")


def labelled_hits(paths, label_of: dict[str, str], fdr: float) -> pd.DataFrame:
    """Step 3's contrasts with each program's label; the hits (q < fdr) go to perturbation_hits.csv."""
    contrasts = pd.read_csv(paths.program_contrasts)
    contrasts.insert(2, "label", contrasts["program"].map(label_of))
    hits = stats.significant_pairs(contrasts, fdr)
    hits.to_csv(paths.perturbation_hits, index=False)
    columns = [c for c in ("perturbation", "label", "role", "effect", "effect_std", "qvalue", "consistency",
                           "qvalue_split") if c in hits.columns]
    report.table(hits[columns], f"The perturbation → program hits of step 3 (q < {fdr}), each program named by its "
                                "label: role = primary (the perturbation's strongest programs) or secondary "
                                "(spill-over), effect = shift of mean usage against control cells, effect_std = Cohen's d, "
                                "consistency = guides and batches agreeing in sign, qvalue_split = the test on half "
                                "of the cells with programs learned on the other half. All: perturbation_hits.csv.")
    return contrasts


def top_hit_programs(contrasts: pd.DataFrame, fdr: float, n: int) -> list[str]:
    """Programs with the strongest hits (smallest q first), at most ``n``."""
    return list(dict.fromkeys(stats.significant_pairs(contrasts, fdr)["program"]))[:n]


def write_summary_workbook(paths, fdr: float) -> None:
    """summary.xlsx: the answer first, then the sheets of the original analysis and the other tables."""
    def read(path):
        return pd.read_csv(path) if path.exists() else None

    anova = read(paths.program_anova)
    sheets = {
        "Perturbation Hits": read(paths.perturbation_hits),
        "Program Labels": read(paths.program_labels),
        "W_ANOVA": anova,
        "Significant Factors": anova[anova["qvalue"] < fdr] if anova is not None else None,
        "Pathway Enrichment": read(paths.enrichment),
        "Top Pathways": read(paths.top_terms),
        "Program Contrasts": read(paths.program_contrasts),
        "Guide Effects": read(paths.guide_effects),
        "Prerank": read(paths.prerank),
        "Top Genes": read(paths.top_genes),
    }
    report.write_workbook(paths.summary_xlsx, {name: frame for name, frame in sheets.items() if frame is not None})
