"""The run's ``index.html``: the answer first (the strongest hits), key results, links, provenance."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..tl import significant_pairs
from . import provenance
from .html import table_assets, table_markup
from .runfolder import STEPS, RunPaths
from .sections.factorize import model_name

__all__ = ["write_index"]

_INDEX_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #e3e6ea; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 13px; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: #f3f5f8; } .note { color: #555; font-style: italic; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; } .card { border: 1px solid #e3e6ea; border-radius: 8px;
padding: 0.6em 1em; min-width: 150px; background: #fafbfc; } .card b { font-size: 1.5em; display: block; }
code { font-size: 12px; } .failed { color: #b00020; font-weight: bold; }
"""


#: columns of the summary's hit table, in order, when present (name in the file -> heading)
_HIT_COLUMNS = {
    "perturbation": "perturbation", "program": "program", "label": "program label", "role": "role", "n_cells": "cells",
    "effect": "effect", "effect_std": "d", "qvalue": "q", "consistency": "guides / batches agree",
    "qvalue_split": "q, split half",
}


def _hits_html(paths: RunPaths, fdr: float, page_size: int) -> str:
    """The answer: the perturbation → program hits, strongest first, with their program's label and consistency,
    in a table the reader can search for their target."""
    source = paths.perturbation_hits if paths.perturbation_hits.exists() else paths.program_contrasts
    if not source.exists():
        return ""
    # every column read as in the file (low_memory=False: a column empty on most rows, such as role, is
    # not split into parts of different types, which pandas warns about)
    hits = significant_pairs(pd.read_csv(source, low_memory=False), fdr)
    columns = [c for c in _HIT_COLUMNS if c in hits.columns]
    labelled = "label" in hits.columns
    text = ("<h2>Perturbation → program effects</h2><p class='note'>Each row: cells with this perturbation "
            "use this program more (effect &gt; 0) or less than non-targeting control cells; effect is the "
            "difference of mean usage, d the standardised effect (Cohen's d), q the Benjamini–Hochberg q-value over "
            "all perturbation × program tests"
            + (", the program label its most enriched gene set (step 4)" if labelled else
               "; program labels appear once step 4 has run")
            + ("; role: primary = the perturbation's strongest programs, secondary = a smaller spill-over onto "
               "another program" if "role" in hits.columns else "")
            + ("; guides / batches agree counts the guides and batches whose own effect has the same sign"
               if "consistency" in hits.columns else "")
            + ("; q, split half is the test on half of the cells with programs learned on the other half"
               if "qvalue_split" in hits.columns else "")
            + f". {len(hits):,} hits at q &lt; {fdr}, strongest first")
    if not len(hits):
        return text + ".</p><p>No hits.</p>"
    markup, n_carried = table_markup(hits[columns].rename(columns=_HIT_COLUMNS), page_size)
    return (text + _table_how(len(hits), n_carried, page_size, source.name,
                              f" (rows with q &lt; {fdr})" if source == paths.program_contrasts else "")
            + "</p>" + markup)


def _table_how(n_rows: int, n_carried: int, page_size: int, file_name: str, rows_note: str = "") -> str:
    """How to use an interactive table, and where all its rows are."""
    link = f"<a href='data/{file_name}'>{file_name}</a>{rows_note}"
    if n_rows <= page_size:
        return f"; the table: {link}."
    return ("; search (your target), sort (click a heading) and page through them"
            + (f" (the first {n_carried:,} here)" if n_carried < n_rows else "") + f"; the table: {link}.")


#: columns of the per-perturbation table (name in perturbation_summary.csv -> heading)
_SUMMARY_COLUMNS = {"perturbation": "perturbation", "n_cells": "cells", "n_hits": "programs shifted",
                    "strongest_program": "strongest program", "effect_std": "d", "qvalue": "q",
                    "programs_up": "raised", "programs_down": "lowered"}


def _summary_html(paths: RunPaths, fdr: float, page_size: int) -> str:
    """Every tested perturbation, one row each: what did *my* target do, hit or not."""
    if not paths.perturbation_summary.exists():
        return ""
    summary = pd.read_csv(paths.perturbation_summary, keep_default_na=False, na_values=[""],
                          dtype={"perturbation": str, "programs_up": str, "programs_down": str})
    summary[["programs_up", "programs_down"]] = summary[["programs_up", "programs_down"]].fillna("")
    if paths.program_labels.exists():  # step 4 ran: name the strongest program by its label
        labels = pd.read_csv(paths.program_labels)
        summary["strongest_program"] = summary["strongest_program"].map(
            dict(zip(labels["program"], labels["label"]))).fillna(summary["strongest_program"])
    markup, n_carried = table_markup(summary[list(_SUMMARY_COLUMNS)].rename(columns=_SUMMARY_COLUMNS), page_size)
    n_hit = int((summary["n_hits"] > 0).sum())
    return ("<h2>Every perturbation</h2><p class='note'>One row per perturbation tested against the controls "
            f"({n_hit:,} of {len(summary):,} shift at least one program at q &lt; {fdr}): programs shifted = its hits; "
            "strongest program = the hit with the largest |d| or, without a hit, the program with the smallest q, "
            "with that test's d and q; raised / lowered = the programs it shifts up / down"
            + _table_how(len(summary), n_carried, page_size, paths.perturbation_summary.name) + "</p>" + markup)


def _selection_cards(paths: RunPaths) -> list[tuple[str, Any]]:
    selection = json.loads(paths.k_selection_json.read_text())
    return [("model", model_name(selection)),
            ("programs (k)", selection["k"]), ("suggested k", selection["suggested_k"]),
            ("held-out relative error", f"{selection['holdout_relative_error']:.3f}"),
            ("stability", f"{selection['stability']:.2f}")]


def _stats_cards(paths: RunPaths, fdr: float) -> list[tuple[str, Any]]:
    cards = []
    if paths.program_anova.exists():
        anova = pd.read_csv(paths.program_anova)
        cards.append((f"programs differing across groups (q < {fdr})", int((anova["qvalue"] < fdr).sum())))
    if paths.program_contrasts.exists():
        contrasts = pd.read_csv(paths.program_contrasts, usecols=["perturbation", "qvalue"])
        hits = contrasts[contrasts["qvalue"] < fdr]
        cards.append(("perturbations tested against the controls", contrasts["perturbation"].nunique()))
        cards.append((f"perturbation → program hits (q < {fdr})", len(hits)))
        cards.append(("perturbations with a hit", hits["perturbation"].nunique()))
    if paths.calibration_json.exists():
        calibration = json.loads(paths.calibration_json.read_text())
        cards.append(("null calibration: inflation λ (1 = calibrated)", f"{calibration['inflation']:.2f}"))
        cards.append((f"null hits on control pseudo-perturbations (q < {fdr})", calibration["n_null_hits"]))
    return cards


#: demo_recovery.json key -> card label (the simulated screen's truth check)
_RECOVERY_CARDS = {
    "mean_program_cosine": "planted programs recovered (mean cosine)",
    "sensitivity": "planted effects found",
    "implied_false_discovery_proportion": "false discovery proportion (vs implied shifts)",
    "false_discovery_proportion": "strict false discovery proportion (planted pairs only)",
    "n_null_target_discoveries": "hits on targets with no planted effect",
}


def _recovery_cards(paths: RunPaths) -> list[tuple[str, Any]]:
    recovery = json.loads(paths.recovery_json.read_text())
    return [(label, recovery[key] if isinstance(recovery[key], int) else f"{recovery[key]:.2f}")
            for key, label in _RECOVERY_CARDS.items() if key in recovery]


def _cards_html(paths: RunPaths, fdr: float) -> str:
    cards = _selection_cards(paths) if paths.k_selection_json.exists() else []
    cards += _stats_cards(paths, fdr)
    cards += _recovery_cards(paths) if paths.recovery_json.exists() else []
    if not cards:
        return ""
    return '<h2>Key results</h2><div class="cards">' + "".join(
        f'<div class="card"><b>{html.escape(_card_value(v))}</b>{html.escape(label)}</div>' for label, v in cards
    ) + "</div>"


def _card_value(value: Any) -> str:
    """A card's number as read: whole numbers with thousands separators (10,000 perturbations)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    return str(value)


def _steps_html(paths: RunPaths, record: dict[str, Any]) -> str:
    links = []
    for step, (stem, title) in STEPS.items():
        status = record.get("steps", {}).get(step, {})
        state = status.get("status", "not run")
        seconds = status.get("seconds")
        text = f"{state}" + (f", {seconds:.1f} s" if seconds is not None else "")
        css = ' class="failed"' if state == "failed" else ""
        link = f'<a href="{stem}.html">{html.escape(title)}</a>' if paths.html(step).exists() else html.escape(title)
        links.append(f"<tr><td>{link}</td><td{css}>{text}</td></tr>")
    return "<h2>Reports</h2><table><tr><th>step</th><th>status, time</th></tr>" + "".join(links) + "</table>"


def write_index(paths: RunPaths, record: dict[str, Any], fdr: float = 0.05, page_size: int = 15) -> Path:
    """``index.html``: the answer first (the hits, and every perturbation, searchable), then key results, links,
    timings, parameters, provenance."""
    run_name = html.escape(record["parameters"].get("run_name", ""))
    files = sorted(p.name for p in paths.data.iterdir()) if paths.data.exists() else []
    parts = [
        f"<h1>perturbnmf report: {run_name}</h1>",
        "<p>Gene programs learned from a Perturb-seq screen by consensus matrix factorisation, the perturbations "
        "that shift them against non-targeting controls, and the gene sets that describe them.</p>",
        _hits_html(paths, fdr, page_size),
        _cards_html(paths, fdr),
        _summary_html(paths, fdr, page_size),
        _steps_html(paths, record),
        "<h2>Result files</h2><p>" + ", ".join(f'<a href="data/{html.escape(f)}">{html.escape(f)}</a>'
                                               for f in files) + "</p>",
        "<h2>Parameters and provenance</h2>" + provenance.to_html(record),
    ]
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>perturbnmf: "
            f"{run_name}</title><style>{_INDEX_CSS}</style>{table_assets()}</head><body>{''.join(parts)}</body></html>")
    path = paths.root / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
