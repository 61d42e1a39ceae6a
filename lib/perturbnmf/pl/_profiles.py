"""Per-target program profiles: what one perturbation does to every program."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ._figures import _panel_grid, _shorten

UP_COLOR, DOWN_COLOR, NOT_SIGNIFICANT_COLOR = "#c0392b", "#2c7fb8", "#c8c8c8"


def program_profiles(contrasts: pd.DataFrame, targets: list[str], fdr: float, ncols: int = 4):
    """One small bar chart per target: its standardised effect (Cohen's d against control cells) on every
    program, hits (q < ``fdr``) coloured by direction, so the primary program stands out.

    Parameters
    ----------
    contrasts : DataFrame
        :func:`perturbnmf.tl.program_contrasts` output (``perturbation``, ``program``, ``n_cells``,
        ``effect_std``, ``qvalue``).
    targets : list of str
        Perturbations to show, in order (e.g. :func:`perturbnmf.tl.top_targets`).
    """
    programs = sorted(contrasts["program"].unique())
    rows = contrasts[contrasts["perturbation"].isin(targets)].set_index(["perturbation", "program"])
    fig, axes = _panel_grid(len(targets), ncols, width=max(2.6, 0.28 * len(programs) + 1.2), height=2.6,
                             header=0.7)
    x = np.arange(len(programs))
    for ax, target in zip(axes, targets):
        mine = rows.loc[target].reindex(programs)
        d = mine["effect_std"].to_numpy(dtype=float)
        hit = (mine["qvalue"] < fdr).to_numpy()
        colours = np.where(~hit, NOT_SIGNIFICANT_COLOR, np.where(d > 0, UP_COLOR, DOWN_COLOR))
        ax.bar(x, np.nan_to_num(d), color=colours, width=0.75)
        ax.axhline(0, color="#444", linewidth=0.6)
        n_cells = mine["n_cells"].dropna()
        cells = f", {int(n_cells.iloc[0]):,} cells" if len(n_cells) else ""
        n_hits = int(hit.sum())
        ax.set_title(f"{_shorten(target, 22)} ({n_hits} hit{'s' * (n_hits != 1)}{cells})", fontsize=9)
        ax.set_xticks(x, programs, rotation=90 if len(programs) > 6 else 0, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel("Cohen's d", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in (UP_COLOR, DOWN_COLOR, NOT_SIGNIFICANT_COLOR)]
    fig.legend(handles, [f"raised, q < {fdr}", f"lowered, q < {fdr}", f"q ≥ {fdr}"], ncol=3, frameon=False,
               fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.0 - 0.42 / fig.get_figheight()))
    fig.suptitle(f"Program profile of the {len(targets)} perturbations with the most hits: the standardised effect "
                 "on every program against control cells", fontweight="bold", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.75 / fig.get_figheight()))
    return fig
