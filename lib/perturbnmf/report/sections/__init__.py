"""What each step's report shows, one module per step: tables with the sentence that explains them,
notes, warnings and figures. Sections only display; the notebooks compute with ``tl`` and write
files with :mod:`perturbnmf.report.artifacts`."""

from __future__ import annotations

from pathlib import Path

from .. import html
from . import enrichment, factorize, preprocess, stats

__all__ = ["preprocess", "factorize", "stats", "enrichment", "show_written"]


def show_written(adata, path: Path) -> None:
    """The note under a step's output: which h5ad it wrote, of what size."""
    matrix = ("" if adata.X is not None else
              " (usage and programs; the expression matrix stays in <code>preprocessed.h5ad</code>)")
    html.note(f"Wrote <code>{Path(path).name}</code>: {adata.n_obs} cells × {adata.n_vars} genes{matrix}.")
