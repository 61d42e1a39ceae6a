"""What a notebook shows: the step's header, tables with their sentence, notes, warnings; and
the rendering of an executed notebook to a self-contained HTML report."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from . import provenance
from .runfolder import STEPS

__all__ = ["header", "note", "warning", "table", "render_html"]

TEMPLATES = Path(__file__).resolve().parent / "templates"


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


def table(frame: pd.DataFrame, caption: str, max_rows: int = 25, float_format: str = "{:.3g}",
          full: str | None = None) -> None:
    """Show a table with its explaining sentence and, when long, its first ``max_rows`` rows and where the
    rest is: ``full`` (e.g. "program_contrasts.csv, rows with q < 0.05"), else the data folder.

    The shown rows are bounded, so a report stays small whatever the screen's size (a genome-wide
    screen has 10,000 perturbations and 100,000 perturbation × program rows).
    """
    shown = frame.head(max_rows)
    formatters = {c: float_format.format for c in shown.columns if pd.api.types.is_float_dtype(shown[c])}
    markup = shown.to_html(index=False, classes="pnmf-table", border=0, formatters=formatters, na_rep="–")
    more = ""
    if len(frame) > max_rows:
        where = f"all of them: {full}" if full else "the full table is in the data folder"
        more = f" Showing the first {max_rows} of {len(frame):,} rows; {where}."
    _display(f'<p class="pnmf-note">{caption}{more}</p>{markup}')


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
