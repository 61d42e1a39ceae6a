"""Run folders, report headers and tables, HTML rendering, the index page and the workbook.

A run writes ``reports/<run_name>/``::

    index.html                 key results, links, parameters, provenance
    01_preprocess.html ...     one self-contained report per step
    notebooks/*.ipynb          the executed notebooks
    data/                      h5ad, CSV, xlsx and run.json (the contract later steps use)

run_all.py writes a run into a temporary sibling folder ``.<run_name>.running-<pid>`` and puts it
in place only when every step succeeded; a failed or interrupted run is kept as
``<run_name>.failed-<timestamp>/`` (with ``ERROR.txt``) and the previous report stays as it was.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import provenance
from .stats import significant_pairs

__all__ = ["STEPS", "RunPaths", "run_paths", "final_root", "staging_root", "public_path", "header", "table", "note",
           "warning", "render_html", "write_workbook", "write_index"]

REPO_ROOT = provenance.REPO_ROOT
TEMPLATES = Path(__file__).resolve().parent / "templates"

#: step name -> (notebook file stem, title)
STEPS = {
    "preprocess": ("01_preprocess", "1 · Preprocess: QC, normalisation, cell cycle, gene selection"),
    "factorize": ("02_factorize", "2 · Factorise: gene programs (consensus NMF or semi-NMF)"),
    "stats": ("03_stats", "3 · Statistics: which perturbations shift which programs"),
    "enrichment": ("04_enrichment", "4 · Enrichment: what each program is"),
}


@dataclass(frozen=True)
class RunPaths:
    """Every file of a run, by name."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    def __getattr__(self, name: str) -> Path:
        files = {
            "preprocessed": "preprocessed.h5ad", "factorized": "factorized.h5ad",
            "program_anova": "program_anova.csv", "program_contrasts": "program_contrasts.csv",
            "enrichment": "enrichment.csv", "top_genes": "top_genes.csv", "top_terms": "top_terms.csv",
            "k_sweep": "k_sweep.csv", "summary_xlsx": "summary.xlsx", "run_json": "run.json",
            "recovery_json": "demo_recovery.json", "k_selection_json": "k_selection.json",
            "calibration_null": "calibration_null.csv", "guide_effects": "guide_effects.csv",
            "split_half": "split_half.csv", "program_labels": "program_labels.csv", "prerank": "prerank.csv",
            "perturbation_hits": "perturbation_hits.csv", "calibration_json": "calibration.json",
        }
        if name in files:
            return self.data / files[name]
        raise AttributeError(name)

    def html(self, step: str) -> Path:
        return self.root / f"{STEPS[step][0]}.html"

    def executed(self, step: str) -> Path:
        return self.notebooks / f"{STEPS[step][0]}.ipynb"


#: Set by run_all.py while a run is in progress: the run folder (``RUN_DIR_ENV``) whose files
#: are written to a temporary staging folder (``STAGING_DIR_ENV``) until every step succeeded.
RUN_DIR_ENV = "PERTURBNMF_RUN_DIR"
STAGING_DIR_ENV = "PERTURBNMF_STAGING_DIR"


def final_root(run_name: str, output_dir: str | None = None) -> Path:
    """Where the complete report of a run lives: ``output_dir`` if given, else ``reports/<run_name>``."""
    root = Path(output_dir) if output_dir else REPO_ROOT / "reports" / run_name
    if not root.is_absolute():  # as every path parameter: relative to the repository
        root = REPO_ROOT / root
    return root.resolve()


def staging_root(root: Path) -> Path | None:
    """The staging folder that stands in for run folder ``root`` while run_all.py runs, if any."""
    run_dir, staging = os.environ.get(RUN_DIR_ENV), os.environ.get(STAGING_DIR_ENV)
    if run_dir and staging and Path(run_dir).resolve() == Path(root).resolve():
        return Path(staging).resolve()
    return None


def public_path(path: str | Path) -> str:
    """``path`` as it will be once the run in progress is complete (a staging path mapped to the run folder)."""
    run_dir, staging = os.environ.get(RUN_DIR_ENV), os.environ.get(STAGING_DIR_ENV)
    if run_dir and staging:
        try:
            return str(Path(run_dir) / Path(path).resolve().relative_to(Path(staging).resolve()))
        except ValueError:
            pass
    return str(path)


def run_paths(run_name: str, output_dir: str | None = None, create: bool = True) -> RunPaths:
    """Folder of a run: ``output_dir`` if given, else ``reports/<run_name>`` under the repository.

    While run_all.py runs, the folder's files go to a temporary staging folder next to it
    (``.<name>.running-<pid>``), which replaces the run folder only when every step succeeded;
    the notebooks still name the run folder in their parameters and provenance.
    """
    root = final_root(run_name, output_dir)
    paths = RunPaths(staging_root(root) or root)
    if create:
        paths.data.mkdir(parents=True, exist_ok=True)
    return paths


# --- pieces a notebook displays ----------------------------------------------------------

def _display(markup: str):
    from IPython.display import HTML, display

    display(HTML(markup))


def header(step: str, parameters: dict[str, Any], input_path: str | None = None, intro: str = "") -> dict[str, Any]:
    """Show the step's title, a one-paragraph intro, its parameters and provenance; return the record."""
    record = provenance.collect(parameters, input_path)
    nav = " ".join(
        f'<a href="{stem}.html">{html.escape(title.split(":")[0])}</a>' for stem, title in STEPS.values()
    )
    _display(
        f'<p class="pnmf-nav"><a href="index.html">Summary</a> {nav}</p>'
        f"<h1>{html.escape(STEPS[step][1])}</h1>"
        + (f"<p>{intro}</p>" if intro else "")
        + provenance.to_html(record)
    )
    return record


def note(text: str) -> None:
    """A one-sentence explanation under a table or figure."""
    _display(f'<p class="pnmf-note">{text}</p>')


def warning(text: str) -> None:
    """A highlighted warning box."""
    _display(f'<div class="pnmf-warning">{text}</div>')


def table(frame: pd.DataFrame, caption: str, max_rows: int = 25, float_format: str = "{:.3g}") -> None:
    """Show a table with its explaining sentence and, when long, how many rows were left out."""
    shown = frame.head(max_rows)
    formatters = {c: float_format.format for c in shown.columns if pd.api.types.is_float_dtype(shown[c])}
    markup = shown.to_html(index=False, classes="pnmf-table", border=0, formatters=formatters, na_rep="–")
    more = f" Showing {max_rows} of {len(frame)} rows; the full table is in the data folder." if len(frame) > max_rows else ""
    _display(f'<p class="pnmf-note">{caption}{more}</p>{markup}')


# --- rendering ---------------------------------------------------------------------------

def render_html(notebook: str | Path, html_path: str | Path) -> Path:
    """Render an executed notebook to a self-contained HTML report (code hidden, images inline)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    exporter = HTMLExporter(
        template_name="perturbnmf_report", extra_template_basedirs=[str(TEMPLATES)],
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
    )
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": Path(html_path).stem}})
    html_path = Path(html_path)
    html_path.write_text(body, encoding="utf-8")
    return html_path


# --- workbook and index ------------------------------------------------------------------

def write_workbook(path: str | Path, sheets: dict[str, pd.DataFrame]) -> Path:
    """One Excel workbook, a sheet per table (names cut to Excel's 31 characters)."""
    path = Path(path)
    with pd.ExcelWriter(path, engine="openpyxl") as writer:
        for name, frame in sheets.items():
            frame.to_excel(writer, sheet_name=name[:31], index=False)
    return path


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


def _frame_html(frame: pd.DataFrame) -> str:
    formatters = {c: "{:.3g}".format for c in frame.columns if pd.api.types.is_float_dtype(frame[c])}
    return frame.to_html(index=False, border=0, formatters=formatters, na_rep="–", escape=True)


#: columns of the summary's hit table, in order, when present (name in the file -> heading)
_HIT_COLUMNS = {
    "perturbation": "perturbation", "program": "program", "label": "program label", "role": "role", "n_cells": "cells",
    "effect": "effect", "effect_std": "d", "qvalue": "q", "consistency": "guides / batches agree",
    "qvalue_split": "q, split half",
}


def _top_hits_html(paths: RunPaths, fdr: float, n_hits: int) -> str:
    """The answer: the strongest perturbation → program hits with their program's label and consistency."""
    source = paths.perturbation_hits if paths.perturbation_hits.exists() else paths.program_contrasts
    if not source.exists():
        return ""
    table = pd.read_csv(source)
    hits = significant_pairs(table, fdr)
    top = hits.head(n_hits)
    columns = [c for c in _HIT_COLUMNS if c in top.columns]
    labelled = "label" in top.columns
    text = (f"<h2>Top perturbation → program effects</h2><p class='note'>Each row: cells with this perturbation "
            "use this program more (effect &gt; 0) or less than non-targeting control cells; effect is the "
            "difference of mean usage, d the standardised effect (Cohen's d), q the Benjamini–Hochberg q-value over "
            "all perturbation × program tests"
            + (", the program label its most enriched gene set (step 4)" if labelled else
               "; program labels appear once step 4 has run")
            + ("; role: primary = the perturbation's strongest programs, secondary = a smaller spill-over onto "
               "another program" if "role" in top.columns else "")
            + ("; guides / batches agree counts the guides and batches whose own effect has the same sign"
               if "consistency" in top.columns else "")
            + ("; q, split half is the test on half of the cells with programs learned on the other half"
               if "qvalue_split" in top.columns else "")
            + f". The {len(top)} strongest of {len(hits)} hits at q &lt; {fdr}.</p>")
    if not len(top):
        return text + "<p>No hits.</p>"
    return text + _frame_html(top[columns].rename(columns=_HIT_COLUMNS))


def write_index(paths: RunPaths, record: dict[str, Any], fdr: float = 0.05, n_hits: int = 15) -> Path:
    """``index.html``: the answer first (top hits), then links, timings, parameters, provenance."""
    parts = [f"<h1>perturbnmf report: {html.escape(record['parameters'].get('run_name', ''))}</h1>"]
    parts.append('<p>Gene programs learned from a Perturb-seq screen by consensus matrix factorisation, the '
                 'perturbations that shift them against non-targeting controls, and the gene sets that describe '
                 'them.</p>')
    cards = []
    if paths.k_selection_json.exists():
        selection = json.loads(paths.k_selection_json.read_text())
        cards.append(("model", {"nmf": "NMF", "seminmf": "semi-NMF"}.get(selection.get("model"), "semi-NMF")))
        cards.append(("programs (k)", selection["k"]))
        cards.append(("suggested k", selection["suggested_k"]))
        cards.append(("held-out relative error", f"{selection['holdout_relative_error']:.3f}"))
        cards.append(("stability", f"{selection['stability']:.2f}"))
    if paths.program_anova.exists():
        anova = pd.read_csv(paths.program_anova)
        cards.append((f"programs differing across groups (q < {fdr})", int((anova["qvalue"] < fdr).sum())))
    if paths.program_contrasts.exists():
        contrasts = pd.read_csv(paths.program_contrasts)
        hits = contrasts[contrasts["qvalue"] < fdr]
        cards.append((f"perturbation → program hits (q < {fdr})", len(hits)))
        cards.append(("perturbations with a hit", hits["perturbation"].nunique()))
    if paths.calibration_json.exists():
        calibration = json.loads(paths.calibration_json.read_text())
        cards.append(("null calibration: inflation λ (1 = calibrated)", f"{calibration['inflation']:.2f}"))
        cards.append((f"null hits on control pseudo-perturbations (q < {fdr})", calibration["n_null_hits"]))
    if paths.recovery_json.exists():
        recovery = json.loads(paths.recovery_json.read_text())
        for key, label in (("mean_program_cosine", "planted programs recovered (mean cosine)"),
                           ("sensitivity", "planted effects found"),
                           ("implied_false_discovery_proportion", "false discovery proportion (vs implied shifts)"),
                           ("false_discovery_proportion", "strict false discovery proportion (planted pairs only)"),
                           ("n_null_target_discoveries", "hits on targets with no planted effect")):
            if key in recovery:
                value = recovery[key]
                cards.append((label, value if isinstance(value, int) else f"{value:.2f}"))
    parts.append(_top_hits_html(paths, fdr, n_hits))
    if cards:
        parts.append('<h2>Key results</h2><div class="cards">' + "".join(
            f'<div class="card"><b>{html.escape(str(v))}</b>{html.escape(label)}</div>' for label, v in cards
        ) + "</div>")
    links = []
    for step, (stem, title) in STEPS.items():
        status = record.get("steps", {}).get(step, {})
        state = status.get("status", "not run")
        seconds = status.get("seconds")
        text = f"{state}" + (f", {seconds:.1f} s" if seconds is not None else "")
        css = ' class="failed"' if state == "failed" else ""
        link = f'<a href="{stem}.html">{html.escape(title)}</a>' if paths.html(step).exists() else html.escape(title)
        links.append(f"<tr><td>{link}</td><td{css}>{text}</td></tr>")
    parts.append("<h2>Reports</h2><table><tr><th>step</th><th>status, time</th></tr>" + "".join(links) + "</table>")
    files = sorted(p.name for p in paths.data.iterdir()) if paths.data.exists() else []
    parts.append("<h2>Result files</h2><p>" + ", ".join(f'<a href="data/{html.escape(f)}">{html.escape(f)}</a>'
                                                        for f in files) + "</p>")
    parts.append("<h2>Parameters and provenance</h2>" + provenance.to_html(record))
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>perturbnmf: "
            f"{html.escape(record['parameters'].get('run_name', ''))}</title><style>{_INDEX_CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>")
    path = paths.root / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
