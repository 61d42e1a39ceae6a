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


def table(frame: pd.DataFrame, caption: str, max_rows: int = 25, float_format: str = "{:.3g}") -> None:
    """Show a table with its explaining sentence and, when long, how many rows were left out."""
    shown = frame.head(max_rows)
    formatters = {c: float_format.format for c in shown.columns if pd.api.types.is_float_dtype(shown[c])}
    markup = shown.to_html(index=False, classes="pnmf-table", border=0, formatters=formatters, na_rep="–")
    more = f" Showing {max_rows} of {len(frame)} rows; the full table is in the data folder." if len(frame) > max_rows else ""
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
