"""Pictures of the cells: the program-usage UMAP (:func:`perturbnmf.tl.umap`) coloured by each
program's usage, and by perturbation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._figures import CONTROL_COLOR, _panel_grid, _shorten

HIT_COLOR = "#c0392b"
BACKGROUND_COLOR = "#d9d9d9"


def _embedded(adata, basis: str) -> tuple[np.ndarray, np.ndarray]:
    """The embedded cells' positions and their coordinates (cells outside the subsample are NaN)."""
    key = f"X_{basis}"
    if key not in adata.obsm:
        raise ValueError(f"adata.obsm has no '{key}': run perturbnmf.tl.umap(adata) first")
    coordinates = np.asarray(adata.obsm[key])
    cells = np.flatnonzero(np.isfinite(coordinates).all(axis=1))
    return cells, coordinates[cells]


def _point_size(n_cells: int) -> float:
    # scanpy's rule (120,000 / cells), bounded so a few hundred cells stay visible
    return float(np.clip(120_000 / max(n_cells, 1), 0.3, 12))


def _style_panel(ax, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("UMAP 1", fontsize=8)
    ax.set_ylabel("UMAP 2", fontsize=8)


def _subsample_text(adata, n_embedded: int, basis: str) -> str:
    params = adata.uns.get(basis, {}).get("params", {})
    if n_embedded < adata.n_obs:
        by = params.get("stratified_by")
        return f"{n_embedded:,} of {adata.n_obs:,} cells, a subsample" + (f" stratified by {by}" if by else "")
    return f"{n_embedded:,} cells"


def program_embedding(adata, programs: list[str] | None = None, labels: dict | None = None, max_panels: int = 12,
                      ncols: int = 4, basis: str = "umap_snmf"):
    """The cells on the program-usage UMAP, one panel per program coloured by its usage.

    Parameters
    ----------
    adata : AnnData
        With ``obsm['X_snmf']`` (cells × k usage) and ``obsm['X_umap_snmf']`` (cells × 2).
    programs : list of str, optional
        Programs to show (default: the first ``max_panels`` of ``uns['snmf']['program_names']``).
    labels : dict, optional
        Program → label for the panel titles.

    Each panel's colour scale ends at the 99th percentile of the program's usage, so a few extreme
    cells do not wash the rest out; the cells using the program most are drawn on top.
    """
    names = list(adata.uns["snmf"]["program_names"])
    programs = list(programs or names)[:max_panels]
    cells, xy = _embedded(adata, basis)
    usage = np.asarray(adata.obsm["X_snmf"])[cells]
    fig, axes = _panel_grid(len(programs), ncols, width=3.3, height=3.0, header=0.7)
    size = _point_size(len(cells))
    for ax, program in zip(axes, programs):
        values = usage[:, names.index(program)]
        order = np.argsort(values, kind="stable")
        top = float(np.percentile(values, 99)) or float(values.max()) or 1.0
        points = ax.scatter(xy[order, 0], xy[order, 1], c=values[order], s=size, cmap="viridis", vmin=0, vmax=top,
                            linewidths=0, rasterized=True)
        colour_bar = fig.colorbar(points, ax=ax, fraction=0.046, pad=0.02)
        colour_bar.ax.tick_params(labelsize=7)
        colour_bar.set_label("usage", fontsize=7)
        label = (labels or {}).get(program)
        _style_panel(ax, program + (f": {_shorten(label, 30)}" if label else ""))
    fig.suptitle(f"Cells on the UMAP of their program usage ({_subsample_text(adata, len(cells), basis)}), "
                 "coloured by each program's usage", fontweight="bold", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.35 / fig.get_figheight()))
    return fig


def perturbation_embedding(adata, groups: pd.Series, targets: list[str], control_label: str,
                           notes: dict | None = None, ncols: int = 4, basis: str = "umap_snmf"):
    """The cells of the control group and of each of ``targets`` on the program-usage UMAP, one panel each:
    the group's cells coloured on top of all embedded cells in grey.

    Parameters
    ----------
    groups : Series
        Each cell's perturbation (aligned with ``adata.obs``).
    notes : dict, optional
        Target → a short text added to its panel title (e.g. its primary program).
    """
    cells, xy = _embedded(adata, basis)
    all_labels = np.asarray(groups.astype(str))
    labels = all_labels[cells]
    subsampled = len(cells) < len(all_labels)
    panels = [control_label] + [t for t in targets if t != control_label]
    fig, axes = _panel_grid(len(panels), ncols, width=3.3, height=3.0, header=0.7)
    size = _point_size(len(cells))
    for ax, group in zip(axes, panels):
        mine = labels == group
        ax.scatter(xy[~mine, 0], xy[~mine, 1], c=BACKGROUND_COLOR, s=size, linewidths=0, rasterized=True)
        colour = CONTROL_COLOR if group == control_label else HIT_COLOR
        ax.scatter(xy[mine, 0], xy[mine, 1], c=colour, s=max(size * 3, 4), linewidths=0, rasterized=True)
        note = (notes or {}).get(group)
        count = (f"{int(mine.sum()):,} of {int((all_labels == group).sum()):,} cells" if subsampled
                 else f"{int(mine.sum()):,} cells")
        title = f"{_shorten(group, 24)} ({count})" + (f"\n{note}" if note else "")
        _style_panel(ax, title + (" — controls" if group == control_label else ""))
    fig.suptitle(f"Cells of the control group and of the {len(panels) - 1} perturbations with the most hits on "
                 f"the program-usage UMAP (grey: all {_subsample_text(adata, len(cells), basis)})",
                 fontweight="bold", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.35 / fig.get_figheight()))
    return fig
