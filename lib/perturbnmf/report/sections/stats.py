"""Report sections of step 3 (stats): ANOVA, perturbation effects, guides, double dipping, calibration."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from ... import pl, tl
from .. import html

__all__ = ["show_header", "show_anova", "show_hits", "show_guide_consistency", "show_guides_skipped",
           "show_split_half", "show_split_half_skipped", "show_calibration", "show_effect_recovery",
           "show_perturbation_summary", "show_target_profiles", "show_target_cells"]

INTRO = ("Which programs differ across perturbation groups (one ANOVA per program), and which perturbation "
         "shifts which program compared with the non-targeting control cells (one test per perturbation × program, "
         "one false discovery rate over all of them).")


def show_header(params: dict[str, Any], paths) -> dict[str, Any]:
    """The step's title, intro, parameters and provenance (of factorized.h5ad); returns the provenance record."""
    return html.header("stats", params, input_path=paths.factorized, intro=INTRO)


def show_anova(anova: pd.DataFrame, perturbation_key: str, batch_key: str | None, fdr: float) -> None:
    model = f"usage ~ C({perturbation_key})" + (f" + C({batch_key})" if batch_key else "")
    html.table(anova, f"One OLS model per program, <code>{model}</code>; F and p for the perturbation term "
               "(type II sums of squares), q = Benjamini–Hochberg over programs, eta_squared = partial η².",
               full="program_anova.csv")
    significant = anova[anova["qvalue"] < fdr]
    html.note(f"{len(significant)} of {len(anova)} programs differ across perturbation groups at q < {fdr}.")


#: contrast method -> what the hit table's caption says the test is
_TESTS = {
    "welch": "Welch t-test of usage in the perturbed cells against control cells; effect = difference of mean usage",
    "ols_batch": "the perturbation coefficient of usage ~ perturbed + C({batch}) on the perturbed and control cells "
                 "(HC3 standard errors), so batch differences are not credited to the perturbation; effect = the "
                 "batch-adjusted difference of mean usage",
    "mannwhitney": "Mann–Whitney rank test of usage in the perturbed cells against control cells (stratified by "
                   "batch as van Elteren's test when a batch key is given), robust to the skewed, zero-inflated "
                   "usage; effect = difference of mean usage (batch-adjusted with a batch key)",
}


def show_hits(hits: pd.DataFrame, method: str, batch_key: str | None, fdr: float) -> None:
    columns = [c for c in ("perturbation", "program", "role", "n_cells", "effect", "effect_std", "statistic", "qvalue",
                           "consistency", "guide_heterogeneity_pvalue") if c in hits.columns]
    html.table(hits[columns], f"Perturbation × program pairs with q < {fdr}: {_TESTS[method].format(batch=batch_key)}"
                 "; effect_std = effect / pooled SD (Cohen's d), q = Benjamini–Hochberg over all perturbation × "
                 f"program tests; role: primary = the perturbation's largest |d| and any within "
                 f"{tl.PRIMARY_SHARE:.0%} of it, secondary = a smaller shift of another program (spill-over); "
                 "consistency counts the target's guides and the batches whose own effect has the "
                 "same sign; guide_heterogeneity_pvalue tests whether the target's guides differ from each other.",
               max_rows=15, interactive=True,
               full=f"program_contrasts.csv, rows with qvalue < {fdr} (every perturbation × program test is there)")


def show_perturbation_summary(summary: pd.DataFrame, fdr: float) -> None:
    """Every tested perturbation in one searchable table: what it did to the programs."""
    n_hit = int((summary["n_hits"] > 0).sum())
    html.table(summary, f"Every perturbation tested against the controls, one row each ({n_hit:,} of {len(summary):,} "
                        f"shift at least one program at q < {fdr}): n_hits = programs shifted; strongest_program = "
                        "its hit with the largest |d| (the primary program) or, without a hit, the program with the "
                        "smallest q, with that test's effect_std (Cohen's d) and qvalue; programs_up / programs_down "
                        "= the hit programs raised / lowered, largest |d| first.",
               max_rows=15, interactive=True, full="perturbation_summary.csv")


def show_target_profiles(contrasts: pd.DataFrame, targets: list[str], fdr: float) -> None:
    """Per target, its standardised effect on every program: which program is primary, which spill-over."""
    if not targets:
        html.note(f"No perturbation shifts a program at q < {fdr}: no program profiles to show.")
        return
    html.note(f"The program profile of the {len(targets)} perturbations with the most hits (ties: the largest |d|; "
              "parameter n_top_targets): each bar is the perturbation's standardised effect on one program against "
              f"control cells, coloured when the test is significant (q < {fdr}). The tallest coloured bar is the "
              "primary program; smaller coloured bars are spill-over onto programs that share genes with it. Each panel "
              "has its own scale (read the size of an effect on its axis). Every "
              "perturbation's numbers: perturbation_summary.csv and program_contrasts.csv.")
    pl.program_profiles(contrasts, targets, fdr)
    plt.show()


def show_target_cells(adata, groups: pd.Series, targets: list[str], control_label: str,
                      summary: pd.DataFrame) -> None:
    """The cells of the controls and of the perturbations with the most hits on step 2's program-usage UMAP."""
    if tl.UMAP_BASIS not in adata.uns:
        html.note("No program-usage UMAP in factorized.h5ad (step 2 ran before it was added): run step 2 again.")
        return
    strongest = summary.set_index("perturbation")
    notes = {t: f"primary {strongest.at[t, 'strongest_program']} (d = {strongest.at[t, 'effect_std']:.2f})"
             for t in targets}
    html.note("Step 2's UMAP of the cells on their program usage: in each panel the cells of one group in colour, "
              "every embedded cell in grey. A perturbation that shifts a program moves its cells toward the region "
              "where that program is used (step 2 shows each program's usage on the same map); a modest shift of "
              "mean usage (|d| well below 1) moves the cloud only a little."
              + (f" Step 2 embedded a subsample of {adata.uns[tl.UMAP_BASIS]['n_cells']:,} of the {adata.n_obs:,} "
                 "cells (parameter umap_max_cells), every perturbation keeping its share: each panel shows the "
                 "group's cells in it." if adata.uns[tl.UMAP_BASIS]["n_cells"] < adata.n_obs else ""))
    html.compact_figure(pl.perturbation_embedding(adata, groups, targets, control_label, notes=notes))


def show_guide_consistency(hits: pd.DataFrame, guide_table: pd.DataFrame, n_shown: int = 12) -> None:
    """How many hits every guide supports, and the per-guide effects of the strongest hits."""
    with_guides = hits[hits["n_guides"] > 1]
    if not len(with_guides):
        html.note("No hit has two or more guides with enough cells, so guide consistency cannot be judged.")
        return
    all_agree = int((with_guides["n_guides_same_sign"] == with_guides["n_guides"]).sum())
    heterogeneous = int((with_guides["guide_heterogeneity_pvalue"] < 0.01).sum())
    html.note(f"{all_agree} of {len(with_guides)} hits with two or more guides have every guide shifting the "
                f"program in the same direction; {heterogeneous} show guides that differ from each other "
                "(heterogeneity p < 0.01). "
                + (f"The figure shows the {n_shown} strongest of them. " if len(with_guides) > n_shown else "")
                + "Per-guide effects of every guide and program: guide_effects.csv.")
    pl.guide_effects(with_guides.head(n_shown), guide_table)
    plt.show()


def show_guides_skipped() -> None:
    html.note("No guide_key given: per-guide effects and guide consistency are not computed.")


def show_split_half(comparison: pd.DataFrame, fdr: float, n_learn: int) -> None:
    """The double-dipping check: a summary per group of programs (reproduced or not) and the scatter."""
    min_cosine = tl.REPRODUCED_COSINE
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
    html.table(pd.DataFrame(rows).iloc[::-1],
                 f"Double-dipping check. The programs were learned again on a random half of every perturbation "
                 f"group ({n_learn} cells) and the other half's usage refitted to them. On that test half, every "
                 "perturbation is tested twice: with the kept programs, which were learned on all cells including "
                 "these (seen), and with the learn-half programs, which never saw them (unseen). If learning and "
                 "testing on the same cells inflated the results, the seen test would find more and larger effects.")
    pl.split_half_scatter(comparison, fdr, min_cosine)
    plt.show()


def show_split_half_skipped() -> None:
    html.note("Skipped: step 2 ran with split_half false, so every test uses the cells that shaped the programs.")


def show_calibration(null: pd.DataFrame, summary: dict[str, Any], contrasts: pd.DataFrame, fdr: float) -> None:
    """The contrast test on control-only pseudo-perturbations: its summary, the QQ plot, a warning when inflated."""
    split = null["null_split"].iloc[0]
    rows = [
        ("pseudo-perturbations", f"{null['perturbation'].nunique()} ({'one per control guide' if split == 'control guide' else 'random control subsets sized like real groups'})"),
        ("null tests (pseudo-perturbation × program)", summary["n_tests"]),
        ("inflation factor λ (1 = calibrated)", f"{summary['inflation']:.2f}"),
        ("share of null p < 0.05 (0.05 = calibrated)", f"{summary['share_below_0_05']:.3f}"),
        (f"null hits at q < {fdr}", summary["n_null_hits"]),
        ("uniformity (Kolmogorov–Smirnov p)", f"{summary['ks_pvalue']:.3g}"),
    ]
    html.table(pd.DataFrame(rows, columns=["", "value"]),
                 "Control cells carry no perturbation, so every test on pseudo-perturbations made of them is "
                 "null: a calibrated test gives uniform p-values (λ ≈ 1) and no hits. The test is exactly the one "
                 "used for the real perturbations. Null table: calibration_null.csv.")
    pl.null_qq(null["pvalue"], contrasts["pvalue"])
    plt.show()
    if summary["inflation"] > 1.2 or summary["n_null_hits"] > 0:
        html.warning(
            f"The test is anti-conservative on control cells (λ = {summary['inflation']:.2f}, "
            f"{summary['n_null_hits']} null hits at q < {fdr}): cells are not independent replicates "
            "(guides, batches), so read the real q-values with caution."
        )


def show_effect_recovery(result: dict[str, Any], fdr: float) -> None:
    """Demo only: planted perturbation effects found, and false discoveries judged three ways
    (``result``: :func:`perturbnmf.evaluation.screen_effect_recovery`)."""
    n_targets, null_called = result["n_targets_called"], result["n_null_targets_called"]
    n_null_targets = result["n_null_targets"]
    rows = [
        ("planted effects found (right program, right sign)",
         f"{result['n_recovered']} of {result['n_planted']} (sensitivity {result['sensitivity']:.2f})"),
        (f"discoveries (q < {fdr})", result["n_discoveries"]),
        ("targets with a discovery / null targets among them",
         f"{n_targets:,} / {null_called:,} of {n_null_targets:,}"),
        ("discoveries against the sign of the implied shift (directional FDP)",
         f"{result['n_sign_errors']} ({result['directional_false_discovery_proportion']:.3f})"),
        (f"… or with an implied shift below |d| = {result['min_implied_effect']} (FDP)",
         f"{result['n_sign_errors'] + result['n_negligible']} ({result['implied_false_discovery_proportion']:.3f})"),
        ("discoveries that are not a planted pair (strict FDP)",
         f"{result['n_false_discoveries']} ({result['false_discovery_proportion']:.3f}): "
         f"{result['n_null_target_discoveries']} on null targets, {result['n_spillover_discoveries']} on other "
         "programs of perturbed targets"),
    ]
    html.table(pd.DataFrame(rows, columns=["truth check (simulated data)", "value"]),
                 "A planted effect changes more than its own program: recovered programs blend planted ones, and "
                 "a program whose genes rise takes a larger share of each cell's counts, so after normalisation "
                 "every other gene falls a little. These shifts are real in the data. The implied shift of each "
                 "perturbation × program is computed from the truth alone (recovered usage regressed on planted "
                 "usage over all cells, applied to the planted change of each target's mean usage); a discovery "
                 "is false when the implied shift has the other sign or is negligible. The strict count treats "
                 "every pair that was not planted as false.")
    _show_planted_effects(result["table"])


def _show_planted_effects(table: pd.DataFrame, max_rows: int = 25) -> None:
    """Each planted effect and what the test found; when there are more than ``max_rows``, the missed ones first."""
    caption = "Each planted effect, the recovered program it maps to, and what the test found."
    if len(table) > max_rows:
        missed = int((~table["recovered"].astype(bool)).sum())
        table = table.sort_values("recovered", kind="stable")
        caption += f" {missed} of {len(table):,} planted effects were missed; they come first."
    html.table(table, caption, max_rows=max_rows,
               full="uns['simulation']['effects'] of factorized.h5ad (the planted effects) and program_contrasts.csv "
                    "(their tests)")
