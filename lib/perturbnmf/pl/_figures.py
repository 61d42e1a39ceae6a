"""The figures of the four steps' reports (re-exported by :mod:`perturbnmf.pl`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import Normalize

CONTROL_COLOR = "#7f7f7f"
# Colour bar of clustered heatmaps right of the row labels (the default sits on the dendrograms).
_CBAR_RIGHT = (1.1, 0.3, 0.015, 0.4)
PALETTE = "tab10"
#: Above this many perturbation groups a figure shows the groups that differ most from control (and the
#: control), or a distribution, instead of one row per group: a genome-wide screen has ~10,000.
MAX_GROUPS_SHOWN = 40
#: Rows of the effect heatmap above which it shows only the perturbations with the strongest hits.
MAX_HEATMAP_ROWS = 60


def _shorten(text: str, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _group_height(n_groups: int, per_group: float = 0.28, minimum: float = 3.0) -> float:
    return max(minimum, per_group * n_groups + 1.2)


def _panel_grid(n_panels: int, ncols: int, width: float, height: float, header: float = 0.0):
    """A figure of ``n_panels`` panels of ``width`` × ``height`` inches, ``ncols`` a row, ``header`` inches
    above them; the grid's unused cells hidden. Returns the figure and the panels' axes, in order."""
    ncols = max(1, min(ncols, n_panels))
    nrows = int(np.ceil(n_panels / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + header), squeeze=False)
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n_panels])


# --- 01 preprocess -----------------------------------------------------------------------

def qc_distributions(obs: pd.DataFrame, batch_key: str | None = None):
    """Violins of UMIs, detected genes and mitochondrial share per cell (split by batch)."""
    metrics = [("total_counts", "UMIs per cell"), ("n_genes_by_counts", "Genes detected per cell"),
               ("pct_counts_mito", "Mitochondrial UMIs (%)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (column, label) in zip(axes, metrics):
        if batch_key:
            sns.violinplot(data=obs, x=batch_key, y=column, ax=ax, cut=0, inner="quartile",
                           hue=batch_key, palette=PALETTE, legend=False)
            ax.set_xlabel("batch")
        else:
            sns.violinplot(data=obs, y=column, ax=ax, cut=0, inner="quartile", color="#8fb0d9")
            ax.set_xlabel("all cells")
        ax.set_ylabel(label)
        ax.set_title(label)
    fig.suptitle("Quality control per cell", fontweight="bold")
    fig.tight_layout()
    return fig


def gene_selection(var: pd.DataFrame):
    """Mean expression vs normalised dispersion, selected genes highlighted."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    selected = var["highly_variable"].to_numpy(dtype=bool)
    if "dispersions_norm" in var:
        x, y = var["means"], var["dispersions_norm"]
        ax.set_ylabel("normalised dispersion")
    else:  # all genes used: no dispersion computed
        x, y = var["mean_counts"], var["n_cells_by_counts"]
        ax.set_ylabel("cells with counts")
    ax.scatter(x[~selected], y[~selected], s=6, c="#bbbbbb", label=f"not selected ({(~selected).sum()})", rasterized=True)
    ax.scatter(x[selected], y[selected], s=6, c="#d62728", label=f"selected ({selected.sum()})", rasterized=True)
    ax.set_xscale("log")
    ax.set_xlabel("mean expression" + (" (log-normalised)" if "dispersions_norm" in var else " (UMIs)"))
    ax.set_title("Genes selected for factorisation")
    ax.legend(frameon=False, loc="best")
    fig.tight_layout()
    return fig


def cells_per_group(obs: pd.DataFrame, perturbation_key: str, control_label: str, batch_key: str | None = None,
                    max_groups: int = MAX_GROUPS_SHOWN):
    """Cells per perturbation: horizontal bars (stacked by batch, control in grey) for up to ``max_groups``
    groups; above that a histogram of the perturbations' cell counts with the control's marked."""
    if obs[perturbation_key].nunique() > max_groups:
        return _cells_per_group_histogram(obs[perturbation_key], control_label)
    if batch_key:
        table = pd.crosstab(obs[perturbation_key], obs[batch_key])
    else:
        table = obs[perturbation_key].value_counts().to_frame("cells")
    table = table.loc[table.sum(axis=1).sort_values().index]
    fig, ax = plt.subplots(figsize=(7, _group_height(len(table), 0.22)))
    colors = sns.color_palette(PALETTE, table.shape[1]) if batch_key else ["#4c72b0"]
    table.plot.barh(stacked=True, ax=ax, width=0.8, color=colors, legend=bool(batch_key))
    for label in ax.get_yticklabels():
        if label.get_text() == control_label:
            label.set_fontweight("bold")
            label.set_color(CONTROL_COLOR)
    ax.set_xlabel("cells")
    ax.set_ylabel("perturbation")
    ax.set_title(f"Cells per perturbation ({control_label} in bold)")
    if batch_key:
        ax.legend(title="batch", frameon=False, loc="lower right")
    fig.tight_layout()
    return fig


def _cells_per_group_histogram(groups: pd.Series, control_label: str):
    counts = groups.astype(str).value_counts()
    perturbed = counts.drop(control_label, errors="ignore")
    fig, ax = plt.subplots(figsize=(7, 3.6))
    low, high = int(perturbed.min()), int(perturbed.max())
    bins = np.arange(low, high + 2) - 0.5 if high - low < 60 else 60  # whole cells when the range is narrow
    ax.hist(perturbed.to_numpy(), bins=bins, color="#4c72b0", edgecolor="white", linewidth=0.5)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.axvline(perturbed.median(), color="black", linestyle="--", linewidth=0.8,
               label=f"median {perturbed.median():g} cells")
    ax.set_xlabel("cells per perturbation")
    ax.set_ylabel("perturbations")
    ax.set_title(f"Cells per perturbation: {len(perturbed):,} perturbations\n{control_label}: "
                 f"{counts.get(control_label, 0):,} cells; fewest {perturbed.min():,} ({perturbed.idxmin()})")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def _phase_table(obs: pd.DataFrame, perturbation_key: str, max_groups: int) -> tuple[pd.DataFrame, str]:
    """Share of each group's cells per phase, and what the figure shows: every group, or the
    ``max_groups`` whose shares differ most (L1) from those of all cells."""
    table = pd.crosstab(obs[perturbation_key], obs["phase"], normalize="index")
    table = table.reindex(columns=[c for c in ("G1", "S", "G2M") if c in table.columns])
    which = ""
    if len(table) > max_groups:
        overall = obs["phase"].value_counts(normalize=True).reindex(table.columns, fill_value=0.0)
        distance = (table - overall).abs().sum(axis=1).sort_values(ascending=False, kind="stable")
        which = f": the {max_groups} of {len(table):,} groups whose phases differ most from all cells'"
        table = table.loc[distance.index[:max_groups]]
    return table.sort_values(table.columns[0]), which


def cell_cycle_phases(obs: pd.DataFrame, perturbation_key: str, max_groups: int = MAX_GROUPS_SHOWN):
    """Share of cells in G1 / S / G2M per perturbation group (above ``max_groups`` groups, the groups
    whose shares differ most from all cells')."""
    table, which = _phase_table(obs, perturbation_key, max_groups)
    fig, ax = plt.subplots(figsize=(7, _group_height(len(table), 0.22)))
    table.plot.barh(stacked=True, ax=ax, width=0.8, color=["#c7d7ea", "#6baed6", "#08519c"][: table.shape[1]])
    ax.set_xlabel("fraction of cells")
    ax.set_ylabel("perturbation")
    ax.set_xlim(0, 1)
    ax.set_title("Cell-cycle phase per perturbation" + which, **({"fontsize": 9} if which else {}))
    ax.legend(title="phase", frameon=False, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    fig.tight_layout()
    return fig


# --- 02 factorize ------------------------------------------------------------------------

def k_selection(table: pd.DataFrame, k: int, suggested_k: int):
    """Error (all cells and held-out cells) and stability vs k; suggested and chosen k marked."""
    fig, (ax_err, ax_stab) = plt.subplots(1, 2, figsize=(11, 4))
    ax_err.plot(table["k"], table["relative_error"], "o-", color="#1f77b4", label="consensus model, training cells")
    if table["holdout_relative_error"].notna().all():
        ax_err.plot(table["k"], table["holdout_relative_error"], "s--", color="#ff7f0e",
                    label="consensus model, held-out cells")
    ax_err.plot(table["k"], table["best_restart_relative_error"], ":", color="#7f7f7f", label="best single restart")
    ax_err.set_ylabel("relative error ‖X − WH‖ / ‖X‖")
    ax_err.set_title("Reconstruction error vs k")
    se = table["stability_se"] if "stability_se" in table else None
    ax_stab.errorbar(table["k"], table["stability"], yerr=se, fmt="o-", color="#2ca02c", capsize=3,
                     label="stability ± 1 SE" if se is not None else "stability")
    ax_stab.set_ylabel("stability (silhouette of restarts' programs)")
    ax_stab.set_title("Stability of programs across restarts vs k")
    ax_stab.set_ylim(min(0.0, float(np.nanmin(table["stability"])) - 0.05) if table["stability"].notna().any() else 0, 1.02)
    for ax in (ax_err, ax_stab):
        ax.axvline(suggested_k, color="#9467bd", linestyle="--", linewidth=1, label=f"suggested k = {suggested_k}")
        if k != suggested_k:
            ax.axvline(k, color="#d62728", linewidth=1.5, label=f"chosen k = {k} (parameter)")
        ax.set_xlabel("number of programs k")
        ax.set_xticks(table["k"])
    ax_err.legend(frameon=False, fontsize=8)
    ax_stab.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def restart_similarity(programs: np.ndarray, labels: np.ndarray, names: list[str] | None = None):
    """Cosine similarity of every restart's programs, grouped by consensus program (cNMF's clustergram).

    ``labels[i]`` is restart program i's consensus program, −1 for an outlier left out of the
    consensus (drawn first, as the group "outliers").
    """
    order = np.argsort(labels, kind="stable")
    similarity = programs[order] @ programs[order].T
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(similarity, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    bounds = np.flatnonzero(np.diff(labels[order])) + 0.5
    for b in bounds:
        ax.axhline(b, color="black", linewidth=0.4)
        ax.axvline(b, color="black", linewidth=0.4)
    starts = np.concatenate([[0], np.ceil(bounds).astype(int)])
    stops = np.concatenate([np.ceil(bounds).astype(int), [len(order)]])
    centres = (starts + stops - 1) / 2
    present = np.unique(labels)
    ticks = [("outliers" if c < 0 else names[c] if names is not None else f"group {c + 1}") for c in present]
    ax.set_xticks(centres)
    ax.set_xticklabels(ticks, rotation=90, fontsize=7)
    ax.set_yticks(centres)
    ax.set_yticklabels(ticks, fontsize=7)
    ax.set_xlabel("restart programs, grouped by consensus program")
    ax.set_ylabel("restart programs")
    ax.set_title("Agreement of restarts (cosine of unit-norm programs)")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="cosine similarity")
    fig.tight_layout()
    return fig


def objective_trace(objective: np.ndarray, k: int):
    """The objective ½‖X − WH‖² at every iteration of the best restart for the chosen k."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(objective) + 1), objective, color="#2ca02c")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("½‖X − WH‖²")
    ax.set_title(f"Convergence of the best restart (k = {k})")
    fig.tight_layout()
    return fig


def _groups_differing_most(usage: pd.DataFrame, groups: pd.Series, control_label: str, n: int) -> list[str]:
    """The ``n`` perturbation groups whose mean usage (each program in units of its SD) lies farthest
    from the control's (from all cells' without a control group), farthest first."""
    scaled = usage / usage.std(ddof=0).replace(0, 1.0)
    means = scaled.groupby(np.asarray(groups)).mean()
    reference = means.loc[control_label] if control_label in means.index else scaled.mean()
    distance = ((means - reference) ** 2).sum(axis=1).drop(control_label, errors="ignore")
    return distance.sort_values(ascending=False, kind="stable").index[:n].tolist()


def _sampled_usage(usage: pd.DataFrame, groups: pd.Series, control_label: str, max_cells_per_group: int,
                   seed: int, shown: list[str] | None = None) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """Usage of up to ``max_cells_per_group`` random cells per group, control first, then groups sorted
    (only the groups ``shown`` when given).

    Returns the (cells, programs) usage scaled to each program's 99th percentile and clipped to
    [0, 1], and ``(group, start, stop)``: the rows of each group.
    """
    rng = np.random.default_rng(seed)
    order = [control_label] + sorted(g for g in (groups.unique() if shown is None else shown) if g != control_label)
    picked, bounds = [], []
    for group in order:
        cells = np.flatnonzero((groups == group).to_numpy())
        if len(cells) > max_cells_per_group:
            cells = np.sort(rng.choice(cells, max_cells_per_group, replace=False))
        picked.extend(cells)
        bounds.append((group, len(picked) - len(cells), len(picked)))
    values = usage.iloc[picked].to_numpy()
    scale = np.quantile(values, 0.99, axis=0)
    scale[scale == 0] = 1.0
    return np.clip(values / scale, 0, 1), bounds


def usage_heatmap(usage: pd.DataFrame, groups: pd.Series, control_label: str,
                  max_cells_per_group: int = 40, seed: int = 0, max_groups: int = MAX_GROUPS_SHOWN):
    """Program usage of cells grouped by perturbation (a random sample per group), scaled per program.

    With more than ``max_groups`` groups, the control and the ``max_groups - 1`` perturbations whose
    mean usage differs most from the control's are shown.
    """
    n_groups = groups.nunique()
    shown = (_groups_differing_most(usage, groups, control_label, max_groups - 1) if n_groups > max_groups
             else None)
    values, bounds = _sampled_usage(usage, groups, control_label, max_cells_per_group, seed, shown)
    fig, ax = plt.subplots(figsize=(min(16, 5 + 0.06 * len(values)), 1.8 + 0.28 * usage.shape[1]))
    image = ax.imshow(values.T, aspect="auto", cmap="viridis", interpolation="nearest")
    for _, start, stop in bounds[1:]:
        ax.axvline(start - 0.5, color="white", linewidth=0.6)
    ax.set_xticks([(start + stop - 1) / 2 for _, start, stop in bounds])
    ax.set_xticklabels([name for name, _, _ in bounds], rotation=90, fontsize=8)
    ax.set_yticks(range(usage.shape[1]))
    ax.set_yticklabels(usage.columns, fontsize=8)
    which = ("" if shown is None else
             f"; the {len(shown)} of {n_groups - 1:,} perturbations whose mean usage differs most from control")
    ax.set_xlabel(f"cells grouped by perturbation (up to {max_cells_per_group} per group{which})")
    ax.set_ylabel("program")
    ax.set_title("Program usage W per cell (scaled to each program's 99th percentile)")
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01, label="scaled usage")
    fig.tight_layout()
    return fig


def loadings_heatmap(loadings: pd.DataFrame, n_genes_per_program: int = 6):
    """Clustered heatmap of signed loadings H for each program's top positive genes."""
    genes = []
    for program in loadings.columns:
        for gene in loadings[program].nlargest(n_genes_per_program).index:
            if gene not in genes:
                genes.append(gene)
    data = loadings.loc[genes].T
    limit = float(np.abs(data.to_numpy()).max()) or 1.0
    grid = sns.clustermap(
        data, cmap="RdBu_r", vmin=-limit, vmax=limit, center=0,
        figsize=(min(22, 3 + 0.16 * len(genes)), min(14, 3 + 0.32 * data.shape[0])),
        xticklabels=True, yticklabels=True, cbar_kws={"label": "loading"}, dendrogram_ratio=(0.08, 0.12),
        cbar_pos=_CBAR_RIGHT,
        method="average", metric="correlation" if data.shape[0] > 2 else "euclidean",
    )
    grid.ax_heatmap.set_xlabel(f"top {n_genes_per_program} genes per program")
    grid.ax_heatmap.set_ylabel("program")
    grid.ax_heatmap.tick_params(axis="x", labelsize=7)
    grid.figure.suptitle("Gene loadings H (clustered programs and genes)", fontweight="bold", y=1.02)
    return grid.figure


def similarity_heatmap(similarity: pd.DataFrame, title: str = "Planted vs recovered programs (cosine)"):
    """Annotated heatmap of a planted × recovered similarity matrix."""
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * similarity.shape[1], 1.2 + 0.4 * similarity.shape[0]))
    sns.heatmap(similarity, cmap="RdBu_r", vmin=-1, vmax=1, center=0, annot=similarity.shape[1] <= 25,
                fmt=".2f", annot_kws={"fontsize": 7}, cbar_kws={"label": "cosine similarity"}, ax=ax)
    ax.set_xlabel("recovered program")
    ax.set_ylabel("planted program")
    ax.set_title(title)
    fig.tight_layout()
    return fig


# --- 03 stats ----------------------------------------------------------------------------

def _boxplot_groups(frame: pd.DataFrame, program: str, control_label: str, max_groups: int) -> list[str]:
    """The groups of one program's boxplot, by median usage: every group, or, with more than
    ``max_groups``, the control and the ``max_groups - 1`` perturbations whose mean usage of the program
    differs most from the control's."""
    by_group = frame.groupby("_group")[program]
    if by_group.ngroups > max_groups:
        kept = _groups_differing_most(frame[[program]], frame["_group"], control_label, max_groups - 1)
        by_group = frame[frame["_group"].isin(kept + [control_label])].groupby("_group")[program]
    return by_group.median().sort_values(ascending=False).index.tolist()


#: Perturbations a boxplot panel shows for a program without any hit (the largest |d|).
N_SHOWN_WITHOUT_HIT = 10


def _largest_effects(contrasts: pd.DataFrame, program: str, fdr: float, n: int) -> tuple[list[str], str]:
    """The perturbations a program's panel shows, chosen by the contrasts: its hits (q < ``fdr``) with the
    largest |Cohen's d|, at most ``n``; without a hit the :data:`N_SHOWN_WITHOUT_HIT` largest |d|. Returns
    them and a line saying which they are."""
    rows = contrasts.loc[contrasts["program"] == program, ["perturbation", "effect_std", "qvalue"]]
    rows = rows.assign(perturbation=rows["perturbation"].astype(str), _size=rows["effect_std"].abs())
    rows = rows.sort_values("_size", ascending=False, kind="stable")
    hits = rows[rows["qvalue"] < fdr]
    if len(hits):
        which = (f"its {len(hits)} hit{'s' * (len(hits) > 1)} (q < {fdr})" if len(hits) <= n
                 else f"{n} of its {len(hits):,} hits (q < {fdr}), largest |d|")
        return hits["perturbation"].head(n).tolist(), which
    shown = rows["perturbation"].head(min(n, N_SHOWN_WITHOUT_HIT)).tolist()
    return shown, f"no hit at q < {fdr}: the {len(shown)} largest |d|"


def _panel_groups(frame: pd.DataFrame, program: str, control_label: str, max_groups: int, contrasts, fdr: float
                  ) -> tuple[list[str], str]:
    """One boxplot panel's groups by median usage, and the line saying which (empty when every group is shown)."""
    if contrasts is None or frame["_group"].nunique() <= max_groups:
        return _boxplot_groups(frame, program, control_label, max_groups), ""
    shown, which = _largest_effects(contrasts, program, fdr, max_groups - 1)
    kept = frame[frame["_group"].isin(shown + [control_label])]
    return kept.groupby("_group")[program].median().sort_values(ascending=False).index.tolist(), which


def program_boxplots(usage: pd.DataFrame, groups: pd.Series, programs: list[str], control_label: str,
                     titles: dict[str, str] | None = None, ncols: int = 3, max_groups: int = MAX_GROUPS_SHOWN,
                     contrasts: pd.DataFrame | None = None, fdr: float = 0.05):
    """Usage of each program across perturbation groups, groups ordered by median, control in grey.

    With more than ``max_groups`` groups, each panel shows the control and at most ``max_groups - 1``
    perturbations: given ``contrasts`` (:func:`perturbnmf.tl.program_contrasts`), the program's hits
    (q < ``fdr``) with the largest effects (|Cohen's d|), or without a hit the few largest |d|; without
    it, the perturbations that shift the program's mean usage most.
    """
    n_groups = groups.nunique()
    frame = usage[programs].assign(_group=groups.astype(str).to_numpy())
    panels = {program: _panel_groups(frame, program, control_label, max_groups, contrasts, fdr)
              for program in programs}
    tallest = max(len(order) for order, _ in panels.values())
    fig, axes = _panel_grid(len(programs), ncols, width=5.2, height=_group_height(tallest, 0.2, 3.5))
    for ax, program in zip(axes, programs):
        order, which = panels[program]
        colors = {g: (CONTROL_COLOR if g == control_label else "#4c72b0") for g in order}
        sns.boxplot(data=frame[frame["_group"].isin(order)] if n_groups > max_groups else frame, y="_group",
                    x=program, order=order, hue="_group", palette=colors, legend=False, ax=ax, fliersize=1,
                    linewidth=0.8)
        ax.axvline(frame.loc[frame["_group"] == control_label, program].median(), color=CONTROL_COLOR,
                   linestyle="--", linewidth=0.8)
        ax.set_ylabel("perturbation")
        ax.set_xlabel("usage")
        ax.tick_params(axis="y", labelsize=7)
        title = (titles or {}).get(program, program)
        ax.set_title(title + (f"\n{which}" if which else ""), fontsize=10 if not which else 9)
    _boxplot_suptitle(fig, n_groups, max_groups, contrasts is not None)
    return fig


def _boxplot_suptitle(fig, n_groups: int, max_groups: int, by_contrasts: bool) -> None:
    title = "Program usage by perturbation (dashed: control median)"
    if n_groups <= max_groups:
        fig.suptitle(title, fontweight="bold")
        fig.tight_layout()
        return
    which = (f"the perturbations with the largest effects among its hits (of {n_groups - 1:,} perturbations)"
             if by_contrasts else f"the {max_groups - 1} of {n_groups - 1:,} perturbations that shift it most")
    fig.suptitle(f"{title}\nper program, the control and {which}", fontweight="bold")
    fig.tight_layout(rect=(0, 0, 1, 0.97))


#: Perturbations the effect heatmap shows when no perturbation has a hit (the largest |effect|).
N_HEATMAP_WITHOUT_HIT = 20


def _strongest_perturbations(contrasts: pd.DataFrame, fdr: float, value: str, n: int) -> tuple[list[str], int]:
    """The perturbations with a hit, strongest first (smallest q, then largest |value|), at most ``n``, and
    how many have a hit; without any hit the :data:`N_HEATMAP_WITHOUT_HIT` largest |value|."""
    per = contrasts.assign(_abs=contrasts[value].abs()).groupby("perturbation").agg(q=("qvalue", "min"),
                                                                                  size=("_abs", "max"))
    hits = per[per["q"] < fdr].sort_values(["q", "size"], ascending=[True, False], kind="stable")
    if len(hits):
        return hits.index[:n].tolist(), len(hits)
    return per.sort_values("size", ascending=False, kind="stable").index[:min(n, N_HEATMAP_WITHOUT_HIT)].tolist(), 0


def _heatmap_subset(contrasts: pd.DataFrame, fdr: float, value: str, max_rows: int) -> tuple[pd.DataFrame, str]:
    """The rows of the effect heatmap, and the title's words for them: every perturbation up to
    ``max_rows``; above, the perturbations with a hit only (the ``max_rows`` strongest)."""
    n_perturbations = contrasts["perturbation"].nunique()
    if n_perturbations <= max_rows:
        return contrasts, ""
    shown, n_hits = _strongest_perturbations(contrasts, fdr, value, max_rows)
    if not n_hits:
        which = f": no hit; the {len(shown)} of {n_perturbations:,} perturbations with the largest |d|"
    elif n_hits > len(shown):
        which = f": the {len(shown)} strongest of {n_hits:,} perturbations with a hit (of {n_perturbations:,})"
    else:
        which = f": the {n_hits} perturbations with a hit (of {n_perturbations:,}), clustered"
    return contrasts[contrasts["perturbation"].isin(shown)], which


def effect_heatmap(contrasts: pd.DataFrame, fdr: float, value: str = "effect_std", labels: dict | None = None,
                   max_rows: int = MAX_HEATMAP_ROWS):
    """Clustered perturbation × program heatmap of standardised effects; * marks q < fdr.

    ``labels`` maps program names to the labels shown on the x axis (e.g. from enrichment). With more
    than ``max_rows`` perturbations, only perturbations with a hit are shown (the ``max_rows`` strongest:
    smallest q, then largest |effect|), so the figure's size is bounded whatever the screen's.
    """
    contrasts, subset = _heatmap_subset(contrasts, fdr, value, max_rows)
    table = contrasts.pivot(index="perturbation", columns="program", values=value)
    qvalues = contrasts.pivot(index="perturbation", columns="program", values="qvalue").reindex_like(table)
    marks = np.where(qvalues.to_numpy() < fdr, "*", "")
    limit = float(np.nanmax(np.abs(table.to_numpy()))) if table.size else 1.0
    clustered = table.shape[0] > 2 and table.shape[1] > 2 and not table.isna().any().any()
    kwargs = dict(cmap="RdBu_r", center=0, vmin=-limit, vmax=limit, annot=marks, fmt="",
                  annot_kws={"fontsize": 9}, xticklabels=True, yticklabels=True,
                  cbar_kws={"label": "effect (Cohen's d vs control)"})
    size = (min(20, 3 + 0.42 * table.shape[1]), min(26, 2.5 + 0.3 * table.shape[0]))
    if clustered:
        grid = sns.clustermap(table.fillna(0), figsize=size, method="average", dendrogram_ratio=(0.1, 0.08),
                              cbar_pos=_CBAR_RIGHT, **kwargs)
        ax, fig = grid.ax_heatmap, grid.figure
        fig.suptitle(f"Perturbation effects on programs (* q < {fdr}){subset}", fontweight="bold", y=1.02)
    else:
        fig, ax = plt.subplots(figsize=size)
        sns.heatmap(table, ax=ax, **kwargs)
        ax.set_title(f"Perturbation effects on programs (* q < {fdr}){subset}")
    if labels:
        ax.set_xticklabels([labels.get(t.get_text(), t.get_text()) for t in ax.get_xticklabels()], rotation=90)
    ax.set_xlabel("program")
    ax.set_ylabel("perturbation")
    return fig


#: Above this many points per volcano panel the points are drawn smaller and translucent.
_MANY_POINTS = 500


def _volcano_panel(ax, rows: pd.DataFrame, fdr: float, x_limit: float, n_named: int) -> int:
    """One program's volcano: non-hits grey, hits red, the ``n_named`` hits with the smallest p named
    (left of a point with d < 0, right of one with d > 0). Returns the number of hits."""
    y = -np.log10(np.clip(rows["pvalue"].to_numpy(dtype=float), 1e-300, 1.0))
    x = rows["effect_std"].to_numpy(dtype=float)
    hit = (rows["qvalue"] < fdr).to_numpy()
    many = len(rows) > _MANY_POINTS
    ax.scatter(x[~hit], y[~hit], s=4 if many else 10, color="#b0b0b0", alpha=0.6 if many else 1.0,
               rasterized=many, linewidths=0)
    ax.scatter(x[hit], y[hit], s=14, color="#c0392b", zorder=3)
    strongest = np.argsort(-np.where(hit, y, -np.inf), kind="stable")[: min(n_named, int(hit.sum()))]
    for rank, i in enumerate(strongest):
        left = x[i] < 0
        ax.annotate(str(rows["perturbation"].iloc[i]), (x[i], y[i]), fontsize=7, ha="right" if left else "left",
                    va="center", xytext=(-4 if left else 4, 6 * (rank % 2) - 3), textcoords="offset points")
    ax.axvline(0, color="#888888", linewidth=0.6)
    ax.set_xlim(-x_limit, x_limit)
    top = float(np.nanmax(y)) if np.isfinite(y).any() else 1.0
    ax.set_ylim(0, max(top, 1.0) * 1.12)  # room for the names of the top points
    return int(hit.sum())


def volcano(contrasts: pd.DataFrame, fdr: float, labels: dict | None = None, ncols: int = 4, n_named: int = 3):
    """One volcano per program: Cohen's d against −log10 p, hits (q < fdr) red and the ``n_named`` with the
    smallest p named (only those: a genome-wide screen has 10,000 points per panel).

    Parameters
    ----------
    contrasts : DataFrame
        :func:`perturbnmf.tl.program_contrasts` output (``program``, ``perturbation``,
        ``effect_std``, ``pvalue``, ``qvalue``).
    labels : dict, optional
        Program → label for the panel titles.
    """
    programs = list(dict.fromkeys(contrasts["program"]))
    fig, axes = _panel_grid(len(programs), ncols, width=3.6, height=3.0, header=0.6)
    # room beside the outermost points for their names
    x_limit = float(np.nanmax(np.abs(contrasts["effect_std"]))) * 1.35 if len(contrasts) else 1.0
    for ax, program in zip(axes, programs):
        n_hits = _volcano_panel(ax, contrasts[contrasts["program"] == program], fdr, x_limit, n_named)
        ax.set_title(_shorten((labels or {}).get(program, program), 38) + f" ({n_hits} hit{'s' * (n_hits != 1)})",
                     fontsize=9)
        ax.set_xlabel("effect (Cohen's d)", fontsize=8)
        ax.set_ylabel("−log10 p", fontsize=8)
        ax.tick_params(labelsize=7)
    n_perturbations = contrasts["perturbation"].nunique()
    handles = [plt.Line2D([], [], marker="o", linestyle="", color="#b0b0b0", label=f"q ≥ {fdr}"),
               plt.Line2D([], [], marker="o", linestyle="", color="#c0392b", label=f"q < {fdr} (hit)")]
    fig.suptitle(f"Volcano plot per program: each point is one of {n_perturbations:,} perturbations against control "
                 f"cells; the {n_named} hits with the smallest p named", fontweight="bold", fontsize=10)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.0 - 0.45 / fig.get_figheight()),
               ncol=2, frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.6 / fig.get_figheight()))
    return fig


def guide_effects(hits: pd.DataFrame, guide_table: pd.DataFrame, labels: dict | None = None):
    """Per-guide effects (dots) beside each hit's overall effect (bar), one row per perturbation → program hit."""
    names = [f"{p} → {_shorten((labels or {}).get(g, g), 30)}" for p, g in zip(hits["perturbation"], hits["program"])]
    fig, ax = plt.subplots(figsize=(7, _group_height(len(hits), 0.38, 2.5)))
    y = np.arange(len(hits))
    ax.barh(y, hits["effect"], color="#c6d4e8", label="all cells of the target")
    value = "effect_batch_adjusted" if "effect_batch_adjusted" in guide_table.columns else "effect"
    keyed = guide_table.set_index(["perturbation", "program"]).sort_index()
    for row, (pert, program) in enumerate(zip(hits["perturbation"], hits["program"])):
        if (pert, program) in keyed.index:
            values = np.atleast_1d(keyed.loc[(pert, program), value].to_numpy(dtype=float))
            ax.scatter(values, np.full(values.size, row), color="#1f3b73", s=18, zorder=3,
                       label="one guide" if row == 0 else None)
    ax.axvline(0, color="#888888", linewidth=0.7)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("effect on usage vs control cells")
    ax.set_title("Do the guides of a target agree? (strongest hits)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def split_half_scatter(comparison: pd.DataFrame, fdr: float, min_cosine: float):
    """Effects on the test half: programs that saw these cells (x) vs programs that did not (y).

    ``comparison`` has one row per perturbation × program with ``effect_std_seen``,
    ``effect_std_unseen``, ``qvalue_seen``, ``qvalue_unseen`` and ``program_reproduced`` (its cosine
    with its learn-half twin is at least ``min_cosine``, named in the legend).
    """
    fig, ax = plt.subplots(figsize=(5.5, 5))
    matched = comparison["program_reproduced"].to_numpy(dtype=bool)
    for mask, color, name in ((matched, "#4c72b0", f"program reproduced on the learn half (cosine ≥ {min_cosine})"),
                              (~matched, "#c8c8c8", f"program not reproduced (cosine < {min_cosine})")):
        ax.scatter(comparison.loc[mask, "effect_std_seen"], comparison.loc[mask, "effect_std_unseen"], s=12,
                   color=color, label=name, rasterized=len(comparison) > _MANY_POINTS)
    both = (comparison["qvalue_seen"] < fdr) & (comparison["qvalue_unseen"] < fdr)
    ax.scatter(comparison.loc[both, "effect_std_seen"], comparison.loc[both, "effect_std_unseen"], s=40,
               facecolors="none", edgecolors="#c0392b", label=f"q < {fdr} in both")
    limit = float(np.nanmax(np.abs(comparison[["effect_std_seen", "effect_std_unseen"]].to_numpy()))) * 1.05
    ax.plot([-limit, limit], [-limit, limit], color="#888888", linewidth=0.7, linestyle="--")
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_xlabel("effect with programs learned on all cells (d)")
    ax.set_ylabel("effect with programs learned on the other half (d)")
    ax.set_title("Double-dipping check on the test half of the cells")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def _qq_points(values):
    p = np.asarray(values, dtype=float)
    p = np.sort(np.clip(p[np.isfinite(p)], 1e-300, 1.0))
    expected = -np.log10((np.arange(1, p.size + 1) - 0.5) / max(p.size, 1))
    return expected, -np.log10(p)


def null_qq(null_pvalues, real_pvalues=None):
    """QQ plots of −log10 p: the test on control-only pseudo-perturbations alone, and beside the real tests."""
    panels = [("Null: control cells only", [(null_pvalues, "#7f7f7f", "null")])]
    if real_pvalues is not None:
        panels.append(("Null and real perturbations",
                       [(null_pvalues, "#7f7f7f", "null"), (real_pvalues, "#d62728", "real perturbations")]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        top = 0.0
        for values, colour, label in series:
            expected, observed = _qq_points(values)
            if expected.size:
                ax.scatter(expected, observed, s=9, color=colour, label=f"{label} ({expected.size:,} tests)",
                           rasterized=True)
                top = max(top, float(expected.max()), float(observed.max()) if label == "null" else 0.0)
        ax.plot([0, top], [0, top], color="black", linewidth=0.8, linestyle="--", label="calibrated (y = x)")
        ax.set_xlabel("expected −log10 p (uniform)")
        ax.set_ylabel("observed −log10 p")
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=8, loc="upper left")
    fig.suptitle("Calibration of the perturbation test", fontweight="bold")
    fig.tight_layout()
    return fig


# --- 04 enrichment -----------------------------------------------------------------------

def _wrap_term(text: str, width: int, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters (ending "…") and wrapped onto at most two lines of ``width``."""
    import textwrap

    text = " ".join(str(text).split())
    if len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    if len(text) <= width:
        return text
    # MSigDB-style names are one long word: let lines break after underscores too
    lines = textwrap.wrap(text.replace("_", "_ "), width=width, break_long_words=True, break_on_hyphens=False)
    lines = [line.replace("_ ", "_") for line in lines]
    if len(lines) > 2:
        second = " ".join(lines[1:])
        lines = [lines[0], second[: width - 1].rstrip() + "…"]
    return "\n".join(lines)


def _label_mapping(labels) -> dict:
    if labels is None:
        return {}
    if isinstance(labels, pd.DataFrame):
        if not {"program", "label"}.issubset(labels.columns):
            raise ValueError("labels: a DataFrame must have columns 'program' and 'label' (program_labels() output)")
        return dict(zip(labels["program"], labels["label"]))
    if isinstance(labels, pd.Series):
        return labels.to_dict()
    if isinstance(labels, dict) or hasattr(labels, "items"):
        return dict(labels.items())
    raise ValueError(f"labels must be a mapping program -> label (or program_labels() output), got {type(labels)!r}")


_DOTPLOT_FONT = 8
# side of a program's loadings -> column order; any other side value sorts last, unmarked
_SIDE_RANK = {"positive": 0, "negative": 1}
_SIDE_MARK = {0: " (+)", 1: " (−)", 2: ""}
# the size legend shows up to four of these, those not below the smallest q-value plotted
_LEGEND_QVALUES = (0.05, 1e-3, 1e-6, 1e-10, 1e-20)


@dataclass(frozen=True)
class _Dotplot:
    """What :func:`enrichment_dotplot` draws, computed without drawing."""

    dots: pd.DataFrame  # one row per (program, side, term): ``column``, ``row`` (positions), ``size``, ``colour``
    column_labels: list[str]
    row_labels: list[str]  # wrapped term names
    xlabel: str
    colour_label: str
    cmap: str
    norm: Normalize | None  # None: the colour range is the data's
    legend_sizes: list[tuple[float, float]]  # (q-value, dot size) per entry of the size legend


class _LabelExtents(NamedTuple):
    """Inches taken by what surrounds the dot grid, measured on the drawn figure."""

    ytick_width: float
    xtick_height: float
    legend_width: float
    legend_height: float
    colour_bar_width: float
    title_width: float


def _check_dotplot_args(top: pd.DataFrame, max_term_chars, wrap_width, max_label_chars) -> None:
    missing = [c for c in ("program", "term", "qvalue") if c not in top.columns]
    if missing:
        raise ValueError(f"top lacks column(s) {missing}; expected top_terms() output")
    if len(top) == 0:
        raise ValueError("top is empty: no terms to plot (did any term pass the FDR threshold?)")
    for name, value, low in (("max_term_chars", max_term_chars, 2), ("wrap_width", wrap_width, 5),
                             ("max_label_chars", max_label_chars, 2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _dot_size(neglog_q, largest: float):
    """Marker area from −log10 q: 20 points² plus up to 180 for the largest value plotted."""
    return 20 + 180 * np.asarray(neglog_q, dtype=float) / largest


def _sorted_terms(top: pd.DataFrame) -> pd.DataFrame:
    """``top`` with a side rank ``_side`` and a term identity ``_term_key``, by program, side and p-value."""
    data = top.copy()
    if "pvalue" not in data.columns:
        data["pvalue"] = data["qvalue"]
    data["_side"] = data["side"].map(_SIDE_RANK).fillna(2) if "side" in data.columns else 0
    data["_term_key"] = (list(zip(data["library"], data["term"])) if "library" in data.columns
                         else list(data["term"]))
    return data.sort_values(["program", "_side", "pvalue", "term"], kind="mergesort")


def _column_labels(columns, label_of: dict, max_label_chars: int, has_side: bool) -> list[str]:
    """Program label (or id), cut to ``max_label_chars``, marked with its side."""
    texts = []
    for program, side in columns:
        text = str(label_of.get(program, program))
        if len(text) > max_label_chars:
            text = text[: max_label_chars - 1].rstrip() + "…"
        texts.append(text + (_SIDE_MARK[side] if has_side else ""))
    return texts


def _row_labels(data: pd.DataFrame, keys: list, tidy_terms: bool, wrap_width: int, max_term_chars: int) -> list[str]:
    """The name of each term, tidied if asked, cut and wrapped."""
    dedup = data.drop_duplicates("_term_key")
    first = dict(zip(dedup["_term_key"], dedup["term"]))
    if tidy_terms:
        from ..tl import tidy_term
        names = [tidy_term(first[k], max_chars=None) for k in keys]
    else:
        names = [str(first[k]) for k in keys]
    return [_wrap_term(n, wrap_width, max_term_chars) for n in names]


def _dot_colours(data: pd.DataFrame) -> tuple[np.ndarray, str, str, Normalize | None]:
    """Colour value per dot, colour map, colour-bar label and norm."""
    if "combined_score" in data.columns:
        # Enrichr's odds ratio explodes for small sets, so the combined score spans decades: colour on log10.
        colour = np.log10(data["combined_score"].astype(float).clip(lower=1e-3)).to_numpy()
        return colour, "viridis_r", "log10 combined score", None
    if "nes" in data.columns:
        colour = data["nes"].astype(float).to_numpy()
        lim = max(float(np.nanmax(np.abs(colour))), 1e-9)
        return colour, "RdBu_r", "NES", Normalize(-lim, lim)
    return np.full(len(data), 0.5), "viridis_r", "", None


def _dotplot_data(top: pd.DataFrame, *, max_term_chars: int, labels, wrap_width: int, max_label_chars: int,
                  tidy_terms: bool) -> _Dotplot:
    """Positions, sizes, colours and labels of the enrichment dot plot (see :func:`enrichment_dotplot`)."""
    label_of = _label_mapping(labels)
    data = _sorted_terms(top)
    has_side = "side" in data.columns
    # columns: programs in sorted order, positive before negative
    columns = list(dict.fromkeys(zip(data["program"], data["_side"])))
    # rows: terms in order of first appearance (program, side, pvalue): a rough diagonal
    keys = list(dict.fromkeys(data["_term_key"]))
    column_of = {key: i for i, key in enumerate(columns)}
    row_of = {key: i for i, key in enumerate(keys)}
    neglog = -np.log10(data["qvalue"].astype(float).clip(lower=1e-300)).to_numpy()
    largest = max(float(np.nanmax(neglog)), 1e-9)
    colour, cmap, colour_label, norm = _dot_colours(data)
    dots = pd.DataFrame({
        "column": [column_of[(p, s)] for p, s in zip(data["program"], data["_side"])],
        "row": [row_of[k] for k in data["_term_key"]],
        "size": _dot_size(neglog, largest),
        "colour": colour,
    })
    qmin = float(data["qvalue"].min())
    levels = [q for q in _LEGEND_QVALUES if q >= qmin][:4] or [qmin]
    return _Dotplot(
        dots=dots,
        column_labels=_column_labels(columns, label_of, max_label_chars, has_side),
        row_labels=_row_labels(data, keys, tidy_terms, wrap_width, max_term_chars),
        xlabel="program (+ positive / − negative loadings)" if has_side else "program",
        colour_label=colour_label,
        cmap=cmap,
        norm=norm,
        legend_sizes=[(q, float(_dot_size(-np.log10(max(q, 1e-300)), largest))) for q in levels],
    )


def _draw_dots(fig, plot: _Dotplot, title: str):
    """The dot grid with its tick labels, axis labels and title; returns the axes and the dots."""
    ax = fig.add_axes([0.3, 0.3, 0.4, 0.4])  # provisional: _fit_dotplot places it once labels are measured
    dots = plot.dots
    points = ax.scatter(dots["column"].to_numpy(), dots["row"].to_numpy(), s=dots["size"].to_numpy(),
                        c=dots["colour"].to_numpy(), cmap=plot.cmap, norm=plot.norm, edgecolors="black",
                        linewidths=0.3)
    n_columns, n_rows = len(plot.column_labels), len(plot.row_labels)
    ax.set_xticks(range(n_columns))
    ax.set_xticklabels(plot.column_labels, rotation=90, fontsize=_DOTPLOT_FONT)
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels(plot.row_labels, fontsize=_DOTPLOT_FONT, linespacing=0.95)
    ax.set_xlim(-0.6, n_columns - 0.4)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.grid(True, color="#eeeeee", linewidth=0.5, zorder=0)
    ax.set_axisbelow(True)
    ax.set_xlabel(plot.xlabel)
    ax.set_ylabel("gene set")
    ax.set_title(title, fontsize=10)
    return ax, points


def _draw_colour_bar(fig, points, label: str):
    cax = fig.add_axes([0.8, 0.3, 0.02, 0.3])  # provisional, as the dot axes
    cbar = fig.colorbar(points, cax=cax)
    cbar.set_label(label, fontsize=_DOTPLOT_FONT)
    cbar.ax.tick_params(labelsize=_DOTPLOT_FONT)
    return cax


def _draw_size_legend(fig, ax, legend_sizes: list[tuple[float, float]]):
    # empty scatters on the dot axes make legend markers styled as the dots
    handles = [ax.scatter([], [], s=size, c="white", edgecolors="black", label=f"q = {q:.2g}")
               for q, size in legend_sizes]
    return fig.legend(handles=handles, title="size: −log10 q", frameon=False, fontsize=_DOTPLOT_FONT,
                      title_fontsize=_DOTPLOT_FONT, loc="upper left", labelspacing=1.2, borderaxespad=0.0)


def _label_extents(fig, ax, cax, legend) -> _LabelExtents:
    renderer = fig.canvas.get_renderer()
    dpi = fig.dpi

    def _largest(artists, attr):
        sizes = [getattr(a.get_window_extent(renderer), attr) for a in artists if a.get_text()]
        return max(sizes, default=0.0) / dpi

    ytick_width = _largest(ax.get_yticklabels(), "width")
    xtick_height = _largest(ax.get_xticklabels(), "height")
    legend_box = legend.get_window_extent(renderer)
    return _LabelExtents(
        ytick_width=ytick_width,
        xtick_height=xtick_height,
        legend_width=legend_box.width / dpi,
        legend_height=legend_box.height / dpi,
        colour_bar_width=cax.get_tightbbox(renderer).width / dpi,
        title_width=ax.title.get_window_extent(renderer).width / dpi,
    )


def _fit_dotplot(fig, ax, cax, legend, plot: _Dotplot) -> None:
    """Size the figure in inches around a grid of fixed cells; legend and colour bar in a column right of it."""
    extents = _label_extents(fig, ax, cax, legend)
    col_w = 0.3
    row_h = 0.34 if any("\n" in t for t in plot.row_labels) else 0.22
    cbar_min_h = 1.2
    ax_w = max(len(plot.column_labels) * col_w, 1.5)
    ax_h = max(len(plot.row_labels) * row_h, extents.legend_height + 0.4 + cbar_min_h)
    left = extents.ytick_width + 0.45
    bottom = extents.xtick_height + 0.55
    top_m = 0.45
    gap = 0.3
    panel_w = max(extents.legend_width, extents.colour_bar_width) + 0.2
    width = left + ax_w + gap + panel_w
    # keep the title inside the figure when the dot grid is narrow
    width = max(width, left + ax_w / 2 + extents.title_width / 2 + 0.1)
    height = bottom + ax_h + top_m
    fig.set_size_inches(width, height)
    ax.set_position([left / width, bottom / height, ax_w / width, ax_h / height])
    panel_x = left + ax_w + gap
    legend.set_bbox_to_anchor((panel_x / width, (bottom + ax_h) / height), transform=fig.transFigure)
    cbar_h = min(2.2, ax_h - extents.legend_height - 0.4)
    cax.set_position([panel_x / width, bottom / height, 0.15 / width, cbar_h / height])


def enrichment_dotplot(top: pd.DataFrame, max_term_chars: int = 60, labels=None, *, wrap_width: int = 36,
                       max_label_chars: int = 48, tidy_terms: bool = False,
                       title: str = "Top enriched gene sets per program"):
    """Program × term dots: size −log10 q, colour log10 combined score (as the original analysis).

    Readable with many programs and terms: every column (program and side) and every row (term) gets a
    fixed size in inches, so the figure grows with their numbers; long term names are cut to
    ``max_term_chars`` characters and wrapped onto at most two lines; the colour bar and the size legend
    sit in their own column right of the dots, so they never cover dots or labels.

    Parameters
    ----------
    top : pandas.DataFrame
        Rows to plot, e.g. ``enrichment.top_terms()`` output: columns ``program``, ``term``, ``qvalue``,
        ``pvalue``; optional ``side`` (one column per program and side, "(+)"/"(−)"), ``library`` (terms
        of the same name in two libraries stay apart) and ``combined_score`` (colour; without it, but with
        ``nes`` as in ``enrichment.prerank()`` output, colour = NES).
    max_term_chars : int, default 60
        Longest term name shown (then "…").
    labels : mapping program -> str, pandas.Series or DataFrame, optional
        Program labels for the x axis (e.g. ``enrichment.program_labels()`` output); programs missing from
        it keep their id.  Labels longer than ``max_label_chars`` are cut.
    wrap_width : int, default 36
        Characters per line of a term name.
    max_label_chars : int, default 48
        Longest program label shown.
    tidy_terms : bool, default False
        Show ``enrichment.tidy_term`` names (GO ids and ``HALLMARK_`` prefixes stripped ...).
    title : str
        Axes title.

    Returns
    -------
    matplotlib.figure.Figure
        Size about ``0.3`` in per column and ``0.22`` in (one-line names) or ``0.34`` in (wrapped names)
        per term, plus margins measured from the labels.

    Raises
    ------
    ValueError
        ``top`` empty or lacking columns, or bad ``labels``.
    """
    _check_dotplot_args(top, max_term_chars, wrap_width, max_label_chars)
    plot = _dotplot_data(top, max_term_chars=max_term_chars, labels=labels, wrap_width=wrap_width,
                         max_label_chars=max_label_chars, tidy_terms=tidy_terms)
    fig = plt.figure(figsize=(8, 6))
    ax, points = _draw_dots(fig, plot, title)
    cax = _draw_colour_bar(fig, points, plot.colour_label)
    legend = _draw_size_legend(fig, ax, plot.legend_sizes)
    _fit_dotplot(fig, ax, cax, legend, plot)
    return fig
