"""Figures for the four reports (scanpy's ``pl``): every figure titled, axes labelled.

Each function draws with pyplot and returns the Figure; in a notebook end the call with
``;`` so the inline backend shows it once. No backend is set here (setting ``Agg`` would
silently drop every figure from the reports).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = [
    "qc_distributions", "gene_selection", "cells_per_group", "cell_cycle_phases",
    "k_selection", "restart_similarity", "objective_trace", "usage_heatmap", "loadings_heatmap", "similarity_heatmap",
    "program_boxplots", "effect_heatmap", "null_qq", "enrichment_dotplot",
]

CONTROL_COLOR = "#7f7f7f"
# Colour bar of clustered heatmaps right of the row labels (the default sits on the dendrograms).
_CBAR_RIGHT = (1.1, 0.3, 0.015, 0.4)
PALETTE = "tab10"


def _group_height(n_groups: int, per_group: float = 0.28, minimum: float = 3.0) -> float:
    return max(minimum, per_group * n_groups + 1.2)


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


def cells_per_group(obs: pd.DataFrame, perturbation_key: str, control_label: str, batch_key: str | None = None):
    """Horizontal bars of cells per perturbation (stacked by batch), control in grey."""
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


def cell_cycle_phases(obs: pd.DataFrame, perturbation_key: str):
    """Share of cells in G1 / S / G2M per perturbation group."""
    table = pd.crosstab(obs[perturbation_key], obs["phase"], normalize="index")
    table = table.reindex(columns=[c for c in ("G1", "S", "G2M") if c in table.columns])
    table = table.sort_values(table.columns[0])
    fig, ax = plt.subplots(figsize=(7, _group_height(len(table), 0.22)))
    table.plot.barh(stacked=True, ax=ax, width=0.8, color=["#c7d7ea", "#6baed6", "#08519c"][: table.shape[1]])
    ax.set_xlabel("fraction of cells")
    ax.set_ylabel("perturbation")
    ax.set_xlim(0, 1)
    ax.set_title("Cell-cycle phase per perturbation")
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
    ax_stab.plot(table["k"], table["stability"], "o-", color="#2ca02c")
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
    """Cosine similarity of every restart's programs, grouped by consensus program (cNMF's clustergram)."""
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
    ticks = names if names is not None else [f"group {c + 1}" for c in range(len(centres))]
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


def usage_heatmap(usage: pd.DataFrame, groups: pd.Series, control_label: str,
                  max_cells_per_group: int = 40, seed: int = 0):
    """Program usage of cells grouped by perturbation (a random sample per group), scaled per program."""
    rng = np.random.default_rng(seed)
    order = [control_label] + sorted(g for g in groups.unique() if g != control_label)
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
    values = np.clip(values / scale, 0, 1)
    fig, ax = plt.subplots(figsize=(min(16, 5 + 0.06 * len(picked)), 1.8 + 0.28 * usage.shape[1]))
    image = ax.imshow(values.T, aspect="auto", cmap="viridis", interpolation="nearest")
    for _, start, stop in bounds[1:]:
        ax.axvline(start - 0.5, color="white", linewidth=0.6)
    ax.set_xticks([(start + stop - 1) / 2 for _, start, stop in bounds])
    ax.set_xticklabels([name for name, _, _ in bounds], rotation=90, fontsize=8)
    ax.set_yticks(range(usage.shape[1]))
    ax.set_yticklabels(usage.columns, fontsize=8)
    ax.set_xlabel(f"cells grouped by perturbation (up to {max_cells_per_group} per group)")
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

def program_boxplots(usage: pd.DataFrame, groups: pd.Series, programs: list[str], control_label: str,
                    titles: dict[str, str] | None = None, ncols: int = 3):
    """Usage of each program across perturbation groups, groups ordered by median, control in grey."""
    n = len(programs)
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    n_groups = groups.nunique()
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, _group_height(n_groups, 0.2, 3.5) * nrows),
                             squeeze=False)
    frame = usage[programs].assign(_group=groups.astype(str).to_numpy())
    for ax, program in zip(axes.flat, programs):
        order = frame.groupby("_group")[program].median().sort_values(ascending=False).index.tolist()
        colors = {g: (CONTROL_COLOR if g == control_label else "#4c72b0") for g in order}
        sns.boxplot(data=frame, y="_group", x=program, order=order, hue="_group", palette=colors, legend=False,
                    ax=ax, fliersize=1, linewidth=0.8)
        ax.axvline(frame.loc[frame["_group"] == control_label, program].median(), color=CONTROL_COLOR,
                   linestyle="--", linewidth=0.8)
        ax.set_ylabel("perturbation")
        ax.set_xlabel("usage")
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title((titles or {}).get(program, program), fontsize=10)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle("Program usage by perturbation (dashed: control median)", fontweight="bold")
    fig.tight_layout()
    return fig


def effect_heatmap(contrasts: pd.DataFrame, fdr: float, value: str = "effect_std"):
    """Clustered perturbation × program heatmap of standardised effects; * marks q < fdr."""
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
        fig.suptitle(f"Perturbation effects on programs (* q < {fdr})", fontweight="bold", y=1.02)
    else:
        fig, ax = plt.subplots(figsize=size)
        sns.heatmap(table, ax=ax, **kwargs)
        ax.set_title(f"Perturbation effects on programs (* q < {fdr})")
    ax.set_xlabel("program")
    ax.set_ylabel("perturbation")
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
                ax.scatter(expected, observed, s=9, color=colour, label=f"{label} ({expected.size} tests)",
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

def enrichment_dotplot(top: pd.DataFrame, max_term_chars: int = 60):
    """Program × term dots: size −log10 q, colour log10 combined score (as the original analysis)."""
    data = top.copy()
    data["list"] = data["program"] + np.where(data["side"] == "negative", " (−)", " (+)")
    data["term_label"] = [t if len(t) <= max_term_chars else t[: max_term_chars - 1] + "…" for t in data["term"]]
    data["neglog10q"] = -np.log10(data["qvalue"].clip(lower=1e-300))
    lists = sorted(data["list"].unique())
    terms = list(dict.fromkeys(data.sort_values(["program", "side", "pvalue"])["term_label"]))
    fig, ax = plt.subplots(figsize=(min(24, 5 + 0.45 * len(lists) + 0.06 * max_term_chars),
                                    min(30, 3 + 0.3 * len(terms))))
    x = data["list"].map({v: i for i, v in enumerate(lists)})
    y = data["term_label"].map({v: i for i, v in enumerate(terms)})
    sizes = 20 + 180 * data["neglog10q"] / max(data["neglog10q"].max(), 1e-9)
    # Enrichr's odds ratio explodes for small sets, so the combined score spans decades: colour on log10.
    colour = np.log10(data["combined_score"].clip(lower=1e-3))
    points = ax.scatter(x, y, s=sizes, c=colour, cmap="viridis_r", edgecolors="black", linewidths=0.3)
    ax.set_xticks(range(len(lists)))
    ax.set_xticklabels(lists, rotation=90, fontsize=8)
    ax.set_yticks(range(len(terms)))
    ax.set_yticklabels(terms, fontsize=8)
    ax.set_xlim(-0.7, len(lists) - 0.3)
    ax.set_ylim(len(terms) - 0.5, -0.5)
    ax.set_xlabel("program (+ positive / − negative loadings)")
    ax.set_ylabel("gene set")
    ax.set_title("Top enriched gene sets per program")
    fig.colorbar(points, ax=ax, fraction=0.03, pad=0.01, label="log10 combined score")
    for q in (0.05, 1e-3, 1e-6):
        if data["qvalue"].min() <= q:
            ax.scatter([], [], s=20 + 180 * -np.log10(q) / max(data["neglog10q"].max(), 1e-9), c="white",
                       edgecolors="black", label=f"q = {q:g}")
    ax.legend(title="size: −log10 q", frameon=False, bbox_to_anchor=(1.0, -0.12 - 0.5 / max(len(terms), 1)),
              loc="upper right", ncol=3)
    fig.tight_layout()
    return fig
