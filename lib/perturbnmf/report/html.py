"""What a notebook shows: the step's header, tables with their sentence, notes, warnings; and
the rendering of an executed notebook to a self-contained HTML report."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from . import provenance
from .runfolder import STEPS

__all__ = ["header", "note", "warning", "table", "table_markup", "table_assets", "compact_figure", "render_html"]

TEMPLATES = Path(__file__).resolve().parent / "templates"
_TABLE_ASSETS = TEMPLATES / "perturbnmf_report"
#: Rows an interactive table carries in the page: every perturbation of a genome-wide screen (10,000), at
#: 60-150 bytes a row, so a table adds at most ~1.5 MB; the full tables are in the data folder.
INTERACTIVE_MAX_ROWS = 10_000


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
          full: str | None = None, interactive: bool = False) -> None:
    """Show a table with its explaining sentence and, when long, where the rest is: ``full`` (e.g.
    "program_contrasts.csv, rows with q < 0.05"), else the data folder.

    A static table shows its first ``max_rows`` rows. An ``interactive`` one (for the hit tables a reader
    searches for *their* target) carries up to :data:`INTERACTIVE_MAX_ROWS` rows, pages of ``max_rows``,
    a search box and sortable columns (``tables.js``, embedded in the rendered page; without scripts the
    first page shows). Either way the page stays bounded whatever the screen's size.
    """
    markup, n_carried = table_markup(frame, max_rows, float_format, interactive)
    more = ""
    if interactive and len(frame) > max_rows:
        more = f" Search, sort (click a heading) and page through the {n_carried:,} rows"
        more += (f" (the {n_carried:,} first of {len(frame):,}; all of them: {full or 'the data folder'})."
                 if n_carried < len(frame) else ".")
    elif len(frame) > max_rows:
        where = f"all of them: {full}" if full else "the full table is in the data folder"
        more = f" Showing the first {max_rows} of {len(frame):,} rows; {where}."
    _display(f'<p class="pnmf-note">{caption}{more}</p>{markup}')


def table_markup(frame: pd.DataFrame, page_size: int = 25, float_format: str = "{:.3g}",
                 interactive: bool = True) -> tuple[str, int]:
    """HTML of ``frame``'s first ``page_size`` rows and, if ``interactive``, its first
    :data:`INTERACTIVE_MAX_ROWS` rows as JSON for ``tables.js``; returns the markup and the rows carried."""
    formatters = {c: float_format.format for c in frame.columns if pd.api.types.is_float_dtype(frame[c])}
    static = frame.head(page_size).to_html(index=False, classes="pnmf-table", border=0, formatters=formatters,
                                           na_rep="–")
    if not interactive:
        return static, min(len(frame), page_size)
    carried = frame.head(INTERACTIVE_MAX_ROWS)
    columns = {}
    for name in carried.columns:
        values = carried[name]
        text = values.map(formatters[name]) if name in formatters else values.astype(str)
        columns[name] = text.where(values.notna(), "–")
    numeric = [bool(pd.api.types.is_numeric_dtype(carried[c]) and not pd.api.types.is_bool_dtype(carried[c]))
               for c in carried.columns]
    data = {"rows": pd.DataFrame(columns).to_numpy().tolist(), "numeric": numeric, "page_size": page_size,
            "n_total": len(frame)}
    # "</" inside a script element would end it early
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    return (f'<div class="pnmf-itable"><script type="application/json">{payload}</script>{static}</div>',
            len(carried))


def table_assets() -> str:
    """The style and script that make ``pnmf-itable`` tables interactive, to embed once per page."""
    css = (_TABLE_ASSETS / "tables.css").read_text(encoding="utf-8")
    script = (_TABLE_ASSETS / "tables.js").read_text(encoding="utf-8")
    return f"<style>{css}</style><script>{script}</script>"


def compact_figure(fig, colours: int = 64, dpi: int = 100) -> int:
    """Show a figure of many coloured points (an embedding of thousands of cells) as a PNG of at most
    ``colours`` colours, and close it; returns the PNG's size in bytes.

    A scatter of cells in full colour compresses poorly (~1 MB a figure); a palette of 64 colours keeps it
    readable at about a quarter of that, so the mailed report stays small.
    """
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image, display
    from PIL import Image as PILImage

    full = io.BytesIO()
    fig.savefig(full, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    image = PILImage.open(io.BytesIO(full.getvalue())).convert("RGB")
    compact = io.BytesIO()
    image.quantize(colors=colours, method=PILImage.Quantize.MEDIANCUT).save(compact, format="png", optimize=True)
    display(Image(data=compact.getvalue(), format="png"))
    return compact.tell()


def render_html(notebook: str | Path, html_path: str | Path) -> Path:
    """Render an executed notebook to a self-contained HTML report (code hidden, images inline)."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    exporter = HTMLExporter(
        template_name="perturbnmf_report", extra_template_basedirs=[str(TEMPLATES)],
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
    )
    resources = {"metadata": {"name": Path(html_path).stem}, "pnmf_table_assets": table_assets()}
    body, _ = exporter.from_notebook_node(nb, resources=resources)
    html_path = Path(html_path)
    html_path.write_text(body, encoding="utf-8")
    return html_path
