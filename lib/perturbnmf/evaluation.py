"""Scoring a pipeline run against the truth of a simulated screen.

Typical use with a :func:`perturbnmf.datasets.simulate_screen` result ``sim`` and a run on
the genes ``genes`` with recovered loadings ``H`` (k x genes)::

    truth = sim[:, genes].varm["simulation_weights"]            # (n_genes, n_true)
    match = match_programs(truth, H.T, sim.uns["simulation"]["program_names"], names)
    scores = effect_recovery(contrasts, sim.uns["simulation"]["effects"], match)

Semi-NMF loadings are scale-ambiguous and signed; the cosine similarity is computed on the
raw vectors, so a planted program (positive weights on its genes) matches a recovered
program with positive loadings on the same genes, and scale does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from .tl import factorized_matrix, gene_scores, regression_scores, usage

__all__ = ["program_similarity", "match_programs", "implied_effects", "effect_recovery", "program_recovery",
           "screen_effect_recovery", "RECOVERY_SUMMARY_KEYS"]


def _as_matrix(name: str, value) -> tuple[np.ndarray, pd.Index | None, pd.Index | None]:
    """2-D float array plus the row / column labels of a DataFrame input."""
    rows = cols = None
    if isinstance(value, pd.DataFrame):
        rows, cols = value.index, value.columns
        value = value.to_numpy()
    elif hasattr(value, "toarray"):  # scipy sparse
        value = value.toarray()
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric (n_genes, n_programs) matrix: {err}") from None
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_genes, n_programs), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr, rows, cols


def _names(name: str, given, columns, n: int, prefix: str) -> list[str]:
    if given is None:
        if columns is not None:
            return [str(c) for c in columns]
        width = max(2, len(str(n)))
        return [f"{prefix}{i + 1:0{width}d}" for i in range(n)]
    if isinstance(given, str):
        raise ValueError(f"{name} must be a sequence of names, not a string")
    names = [str(x) for x in given]
    if len(names) != n:
        raise ValueError(f"{name} has {len(names)} names but the matrix has {n} programs")
    if len(set(names)) != n:
        raise ValueError(f"{name} contains duplicate names")
    return names


def _prepare(true_weights, loadings, true_names, program_names):
    truth, t_rows, t_cols = _as_matrix("true_weights", true_weights)
    load, l_rows, l_cols = _as_matrix("loadings", loadings)
    if t_rows is not None and l_rows is not None and not t_rows.equals(l_rows):
        if set(t_rows) != set(l_rows) or t_rows.has_duplicates or l_rows.has_duplicates:
            raise ValueError("loadings and true_weights are indexed by different genes")
        load = pd.DataFrame(load, index=l_rows).reindex(t_rows).to_numpy()
    if load.shape[0] != truth.shape[0]:
        raise ValueError(
            f"loadings has {load.shape[0]} genes (rows) but true_weights has {truth.shape[0]}; "
            "both must be (n_genes, n_programs) on the same genes"
        )
    t_names = _names("true_names", true_names, t_cols, truth.shape[1], "T")
    p_names = _names("program_names", program_names, l_cols, load.shape[1], "P")
    return truth, load, t_names, p_names


def _cosine(truth: np.ndarray, load: np.ndarray) -> np.ndarray:
    tn = np.linalg.norm(truth, axis=0)
    ln = np.linalg.norm(load, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (truth.T @ load) / np.outer(tn, ln)
    cos[~np.isfinite(cos)] = 0.0  # an all-zero column is similar to nothing
    return np.clip(cos, -1.0, 1.0)


def program_similarity(true_weights, loadings, true_names: Sequence[str] | None = None,
                       program_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Cosine similarity between every planted and every recovered program.

    Parameters
    ----------
    true_weights
        (n_genes, n_true) planted weights (array or DataFrame; DataFrame columns are used as
        default ``true_names``).
    loadings
        (n_genes, k) recovered loadings on the same genes in the same order (``H.T`` for a
        k x genes ``H``). If both inputs are DataFrames with the same genes in a different
        order, ``loadings`` is reordered to ``true_weights``.
    true_names, program_names
        Names of the planted / recovered programs; default ``T01``... / ``P01``...

    Returns
    -------
    pandas.DataFrame
        (n_true, k) cosine similarities, index ``planted_program``, columns ``program``. A
        program whose vector is all zero has similarity 0 with everything.

    Raises
    ------
    ValueError
        On a gene-count mismatch, non-finite values or wrong number of names.
    """
    truth, load, t_names, p_names = _prepare(true_weights, loadings, true_names, program_names)
    return pd.DataFrame(
        _cosine(truth, load),
        index=pd.Index(t_names, name="planted_program"),
        columns=pd.Index(p_names, name="program"),
    )


def match_programs(true_weights, loadings, true_names: Sequence[str] | None = None,
                   program_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Match planted programs one-to-one to recovered programs by cosine similarity.

    The matching maximises the total cosine similarity (:func:`scipy.optimize.
    linear_sum_assignment`); ``k`` may differ from ``n_true``. With ``k < n_true`` some planted
    programs stay unmatched (``program`` is None and ``cosine`` NaN).

    Parameters
    ----------
    true_weights
        (n_genes, n_true) planted weights.
    loadings
        (n_genes, k) recovered loadings, same genes and order.
    true_names, program_names
        See :func:`program_similarity`.

    Returns
    -------
    pandas.DataFrame
        One row per planted program, in planted order, columns ``planted_program``,
        ``program`` (matched recovered program name), ``cosine`` (similarity of the matched
        pair) and ``best_cosine_any`` (largest similarity with any recovered program).
    """
    sim = program_similarity(true_weights, loadings, true_names, program_names)
    cos = sim.to_numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    matched = np.full(cos.shape[0], None, dtype=object)
    matched_cos = np.full(cos.shape[0], np.nan)
    matched[rows] = sim.columns[cols].to_numpy()
    matched_cos[rows] = cos[rows, cols]
    return pd.DataFrame(
        {
            "planted_program": sim.index.to_list(),
            "program": matched,
            "cosine": matched_cos,
            "best_cosine_any": cos.max(axis=1),
        }
    )


def _require_columns(name: str, df, columns: Sequence[str]) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {missing}; it has {list(df.columns)}")
    return df


def implied_effects(true_usage, usage: pd.DataFrame, groups, control_label: str) -> pd.DataFrame:
    """The shift of every recovered program that the planted usage changes imply.

    A planted effect changes more than its matched program: recovered programs are blends of
    planted ones, and a program whose genes rise takes a larger share of every cell's counts,
    so after ``normalize_total`` all other genes fall a little (composition). Both are real
    shifts of recovered usage, not errors of the test. This function computes them from the
    truth alone: recovered usage is regressed on planted usage over all cells (no group
    labels), ``W ≈ a + U M``, and the shift implied for perturbation ``t`` on program ``p``
    is ``(mean U[t] − mean U[control]) · M[:, p]``.

    Parameters
    ----------
    true_usage : ndarray of shape (n_cells, n_true)
        Planted usage after the effects (``obsm["simulation_usage"]``), rows matching ``usage``.
    usage : DataFrame of shape (n_cells, k)
        Recovered usage.
    groups : array-like of shape (n_cells,)
        Perturbation label per cell.
    control_label : str

    Returns
    -------
    DataFrame
        One row per perturbation × program: ``perturbation``, ``program``, ``implied_effect``
        and ``implied_effect_std`` (divided by the pooled SD of recovered usage of the
        perturbed and control cells, as Cohen's d in the contrasts), plus ``r_squared`` of the
        program's regression on planted usage.
    """
    U = np.asarray(true_usage, dtype=float)
    W = usage.to_numpy(dtype=float)
    labels = np.asarray(groups).astype(str)
    if U.shape[0] != W.shape[0] or labels.shape[0] != W.shape[0]:
        raise ValueError(f"true_usage ({U.shape[0]}), usage ({W.shape[0]}) and groups ({labels.shape[0]}) "
                         "must have one row per cell")
    control = labels == control_label
    if control.sum() < 2:
        raise ValueError(f"control_label {control_label!r} has fewer than 2 cells")
    design = np.column_stack([np.ones(len(U)), U])
    coef, *_ = np.linalg.lstsq(design, W, rcond=None)
    residual = W - design @ coef
    total = ((W - W.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r_squared = np.where(total > 0, 1.0 - (residual**2).sum(axis=0) / total, np.nan)
    n_c = int(control.sum())
    # the controls' summaries once, and each target's cells from one sort (the same rows, in the same
    # order, as a mask over all cells would give): 10,000 targets cost seconds, not minutes
    U_control_mean, W_control_var = U[control].mean(axis=0), W[control].var(axis=0, ddof=1)
    codes, names = pd.factorize(labels, sort=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(codes, minlength=len(names)))]
    shifts, scales, targets = [], [], []
    for code, target in enumerate(names):
        if target == control_label:
            continue
        cells = order[bounds[code]: bounds[code + 1]]
        n_t = len(cells)
        shift = (U[cells].mean(axis=0) - U_control_mean) @ coef[1:]
        pooled_sd = np.sqrt(((n_t - 1) * W[cells].var(axis=0, ddof=1) + (n_c - 1) * W_control_var)
                            / max(n_t + n_c - 2, 1)) if n_t > 1 else np.full(W.shape[1], np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            scales.append(np.where(pooled_sd > 0, shift / pooled_sd, np.nan))
        shifts.append(shift)
        targets.append(target)
    k = W.shape[1]
    return pd.DataFrame({"perturbation": np.repeat(np.array(targets, dtype=object), k),
                         "program": np.tile(np.array(list(usage.columns), dtype=object), len(targets)),
                         "implied_effect": np.concatenate(shifts), "implied_effect_std": np.concatenate(scales),
                         "r_squared": np.tile(r_squared, len(targets))})


def _check_fdr(fdr) -> float:
    if isinstance(fdr, bool) or not isinstance(fdr, (int, float, np.floating, np.integer)):
        raise ValueError(f"fdr must be a number in (0, 1], got {fdr!r}")
    fdr = float(fdr)
    if not 0.0 < fdr <= 1.0:
        raise ValueError(f"fdr must be in (0, 1], got {fdr}")
    return fdr


def _tested_pairs(contrasts: pd.DataFrame) -> pd.DataFrame:
    """The contrasts reduced to perturbation, program (as str), effect and qvalue (float), one row per pair."""
    tests = pd.DataFrame(
        {
            "perturbation": contrasts["perturbation"].astype(str).to_numpy(),
            "program": contrasts["program"].astype(str).to_numpy(),
            "effect": pd.to_numeric(contrasts["effect"], errors="coerce").to_numpy(dtype=float),
            "qvalue": pd.to_numeric(contrasts["qvalue"], errors="coerce").to_numpy(dtype=float),
        }
    )
    if tests.duplicated(["perturbation", "program"]).any():
        dup = tests.loc[tests.duplicated(["perturbation", "program"]), ["perturbation", "program"]]
        raise ValueError(
            f"contrasts has duplicate (perturbation, program) rows, e.g. {tuple(dup.iloc[0])}"
        )
    return tests


def _matched_programs(program_match: pd.DataFrame) -> dict[str, str | None]:
    """Planted program -> its matched recovered program (None when unmatched)."""
    match = program_match.loc[:, ["planted_program", "program"]]
    if match["planted_program"].duplicated().any():
        raise ValueError("program_match lists a planted program twice")
    return {
        str(p): (None if pd.isna(r) else str(r))
        for p, r in zip(match["planted_program"], match["program"])
    }


def _planted_effects(truth_effects: pd.DataFrame, to_recovered: dict[str, str | None]) -> pd.DataFrame:
    """The planted effects as ``perturbation``, ``planted_program``, ``direction`` (lower case), ``fold_change``."""
    truth = truth_effects.reset_index(drop=True)
    directions = truth["direction"].astype(str).str.lower()
    bad = sorted(set(directions) - {"up", "down"})
    if bad:
        raise ValueError(f"truth_effects has direction(s) {bad}; expected 'up' or 'down'")
    planted_programs = truth["program"].astype(str)
    unknown = sorted(set(planted_programs) - set(to_recovered))
    if unknown:
        raise ValueError(f"program_match has no row for planted program(s) {unknown} of truth_effects")
    perts = truth["perturbation"].astype(str)
    if pd.DataFrame({"a": perts, "b": planted_programs}).duplicated().any():
        raise ValueError("truth_effects lists a (perturbation, program) effect twice")
    fold_changes = (
        [float(truth["fold_change"].iloc[i]) for i in range(len(truth))] if "fold_change" in truth.columns
        else [np.nan] * len(truth)
    )
    return pd.DataFrame({"perturbation": perts.to_list(), "planted_program": planted_programs.to_list(),
                         "direction": directions.to_list(), "fold_change": fold_changes})


def _recovery_table(planted: pd.DataFrame, to_recovered: dict[str, str | None], tests: pd.DataFrame,
                    fdr: float) -> pd.DataFrame:
    """Each planted effect beside the contrast of its matched program: found when significant with the right sign."""
    lookup = tests.set_index(["perturbation", "program"])
    rows = []
    for pert, planted_program, direction, fold_change in planted.itertuples(index=False):
        recovered_program = to_recovered[planted_program]
        effect = qvalue = np.nan
        if recovered_program is not None and (pert, recovered_program) in lookup.index:
            effect, qvalue = lookup.loc[(pert, recovered_program), ["effect", "qvalue"]]
        sign = 1.0 if direction == "up" else -1.0
        ok = bool(np.isfinite(qvalue) and qvalue < fdr and np.isfinite(effect) and np.sign(effect) == sign)
        rows.append(
            {
                "perturbation": pert,
                "planted_program": planted_program,
                "program": recovered_program,
                "direction": direction,
                "fold_change": fold_change,
                "effect": float(effect),
                "qvalue": float(qvalue),
                "recovered": ok,
            }
        )
    table = pd.DataFrame(
        rows,
        columns=["perturbation", "planted_program", "program", "direction", "fold_change",
                 "effect", "qvalue", "recovered"],
    )
    table["recovered"] = table["recovered"].astype(bool)
    return table


def _recovery_rates(table: pd.DataFrame) -> dict:
    n_planted = int(len(table))
    n_recovered = int(table["recovered"].sum())
    return {
        "n_planted": n_planted,
        "n_recovered": n_recovered,
        "sensitivity": (n_recovered / n_planted) if n_planted else float("nan"),
    }


def _discovery_rates(discoveries: pd.DataFrame, table: pd.DataFrame) -> dict:
    """Discoveries split into true (a recovered planted pair), null-target and spillover ones."""
    found = table.loc[table["recovered"]]
    true_pairs = set(zip(found["perturbation"], found["program"]))
    is_true = [(p, g) in true_pairs for p, g in zip(discoveries["perturbation"], discoveries["program"])]
    n_disc = int(len(discoveries))
    n_true = int(np.sum(is_true))
    on_null_target = ~discoveries["perturbation"].isin(set(table["perturbation"])).to_numpy()
    n_null = int(on_null_target.sum())
    return {
        "n_discoveries": n_disc,
        "n_false_discoveries": n_disc - n_true,
        "n_true_discoveries": n_true,
        "n_null_target_discoveries": n_null,
        "n_spillover_discoveries": n_disc - n_true - n_null,
        "false_discovery_proportion": ((n_disc - n_true) / n_disc) if n_disc else 0.0,
    }


def _judged_against_implied(discoveries: pd.DataFrame, implied: pd.DataFrame, min_implied_effect: float) -> dict:
    """Sign errors and negligible shifts among the discoveries, by the shift the truth implies."""
    _require_columns("implied", implied, ["perturbation", "program", "implied_effect_std"])
    merged = discoveries.merge(implied.astype({"perturbation": str, "program": str}),
                               on=["perturbation", "program"], how="left")
    implied_d = merged["implied_effect_std"].to_numpy(dtype=float)
    sign_error = np.sign(implied_d) != np.sign(merged["effect"].to_numpy(dtype=float))
    negligible = ~sign_error & ~(np.abs(implied_d) >= min_implied_effect)
    n_disc = int(len(discoveries))
    return {
        "n_sign_errors": int(sign_error.sum()),
        "n_negligible": int(negligible.sum()),
        "min_implied_effect": float(min_implied_effect),
        "implied_false_discovery_proportion": float((sign_error | negligible).sum() / n_disc) if n_disc else 0.0,
        "directional_false_discovery_proportion": float(sign_error.sum() / n_disc) if n_disc else 0.0,
    }


def effect_recovery(contrasts: pd.DataFrame, truth_effects: pd.DataFrame,
                    program_match: pd.DataFrame, fdr: float = 0.05, implied: pd.DataFrame | None = None,
                    min_implied_effect: float = 0.1) -> dict:
    """Sensitivity and false discoveries of the perturbation x program tests.

    A planted effect (perturbation, planted program) is *recovered* when the contrast of that
    perturbation on the matched recovered program has ``qvalue < fdr`` and an ``effect`` whose
    sign agrees with the planted ``direction``. A *discovery* is any contrast with
    ``qvalue < fdr``; it is true when it is the contrast of a recovered planted effect (right
    pair, right sign) and false otherwise (null targets, unaffected programs, unmatched
    recovered programs and sign mismatches).

    Parameters
    ----------
    contrasts
        One row per tested perturbation x recovered program, columns ``program``,
        ``perturbation``, ``effect``, ``qvalue`` (other columns are ignored; rows with a NaN
        q-value are never discoveries).
    truth_effects
        Planted effects, columns ``perturbation``, ``program`` (planted name), ``direction``
        (``"up"``/``"down"``) and optionally ``fold_change``; e.g.
        ``adata.uns["simulation"]["effects"]``.
    program_match
        Output of :func:`match_programs` (columns ``planted_program``, ``program``).
    fdr
        Significance threshold on ``qvalue``, in (0, 1].

    Returns
    -------
    dict
        ``n_planted``, ``n_recovered``, ``sensitivity`` (``n_recovered / n_planted``, NaN
        without planted effects), ``n_discoveries``, ``n_false_discoveries``,
        ``n_true_discoveries``, ``false_discovery_proportion`` (0 without discoveries),
        ``n_null_target_discoveries`` (discoveries on perturbations without any planted
        effect: false at the perturbation level), ``n_spillover_discoveries`` (false
        discoveries on perturbations that do have a planted effect, on another program: with
        programs recovered as blends of the planted ones, part of a real effect shows up there),
        ``fdr`` and ``table``: a DataFrame with one row per planted effect and columns
        ``perturbation``, ``planted_program``, ``program``, ``direction``, ``fold_change``,
        ``effect``, ``qvalue``, ``recovered`` (bool).

        With ``implied`` (output of :func:`implied_effects`) a discovery is also judged against
        the shift the truth implies for that very program: ``n_sign_errors`` (implied shift of
        the other sign), ``n_negligible`` (|implied_effect_std| < ``min_implied_effect``, the
        same sign) and ``implied_false_discovery_proportion`` = (sign errors + negligible) /
        discoveries; ``directional_false_discovery_proportion`` = sign errors / discoveries.
    """
    fdr = _check_fdr(fdr)
    _require_columns("contrasts", contrasts, ["program", "perturbation", "effect", "qvalue"])
    _require_columns("truth_effects", truth_effects, ["perturbation", "program", "direction"])
    _require_columns("program_match", program_match, ["planted_program", "program"])
    tests = _tested_pairs(contrasts)
    to_recovered = _matched_programs(program_match)
    planted = _planted_effects(truth_effects, to_recovered)
    table = _recovery_table(planted, to_recovered, tests, fdr)
    discoveries = tests[tests["qvalue"] < fdr]
    judged = {} if implied is None else _judged_against_implied(discoveries, implied, min_implied_effect)
    return (judged | _recovery_rates(table) | _discovery_rates(discoveries, table)
            | {"fdr": fdr, "table": table})


# --- truth checks of a pipeline run on a simulated screen (``adata.uns['simulation']``) -----------

def _planted_and_recovered_scores(adata) -> tuple[np.ndarray, list[str], pd.DataFrame]:
    """Gene scores of the planted programs (expression regressed on the planted usage) and of the
    recovered ones: the same scale for any model, so signed and non-negative loadings compare alike."""
    X = factorized_matrix(adata)
    planted = regression_scores(X, np.asarray(adata.obsm["simulation_usage"], dtype=float)).T
    return planted, list(adata.uns["simulation"]["program_names"]), gene_scores(adata)


def program_recovery(adata) -> tuple[pd.DataFrame, pd.DataFrame]:
    """How well a factorised simulated screen recovered its planted programs.

    Also stores the match in ``uns['simulation']['program_match']``, where
    :func:`screen_effect_recovery` finds it without the expression matrix.

    Returns
    -------
    match : pandas.DataFrame
        :func:`match_programs` of the planted and recovered gene scores (columns as there).
    similarity : pandas.DataFrame, shape (planted programs, recovered programs)
        :func:`program_similarity` of the same.
    """
    planted, names, scores = _planted_and_recovered_scores(adata)
    match = match_programs(planted, scores.to_numpy(), names, list(scores.columns))
    similarity = program_similarity(planted, scores.to_numpy(), names, list(scores.columns))
    # kept with the factors, so step 3 needs no expression matrix (h5ad stores no None: "" = unmatched)
    adata.uns["simulation"]["program_match"] = match.assign(program=match["program"].fillna("").astype(str))
    return match, similarity


def screen_effect_recovery(adata, contrasts: pd.DataFrame, groups: pd.Series, control_label: str,
                           fdr: float) -> dict:
    """:func:`effect_recovery` of step 3's ``contrasts`` on a simulated screen, against its planted
    effects (programs matched as :func:`program_recovery` stored them, or matched now) and the shifts they imply, plus ``n_targets_called`` (targets with a hit),
    ``n_null_targets`` and ``n_null_targets_called`` (targets with no planted effect that got a hit)."""
    truth = adata.uns["simulation"]
    implied = implied_effects(adata.obsm["simulation_usage"], usage(adata), groups.to_numpy(),
                              control_label)
    if "program_match" in truth:
        match = truth["program_match"].assign(program=lambda m: m["program"].replace("", None))
    else:
        match = program_recovery(adata)[0]
    result = effect_recovery(contrasts, pd.DataFrame(truth["effects"]), match, fdr=fdr, implied=implied)
    called = set(contrasts.loc[contrasts["qvalue"] < fdr, "perturbation"])
    result.update(n_targets_called=len(called), n_null_targets=len(truth["null_targets"]),
                  n_null_targets_called=len(called & set(truth["null_targets"])))
    return result


#: The keys of :func:`screen_effect_recovery` that demo_recovery.json keeps (the rest is the table).
RECOVERY_SUMMARY_KEYS = (
    "n_planted", "n_recovered", "sensitivity", "n_discoveries", "n_false_discoveries", "n_null_target_discoveries",
    "n_spillover_discoveries", "false_discovery_proportion", "n_sign_errors", "n_negligible", "min_implied_effect",
    "implied_false_discovery_proportion", "directional_false_discovery_proportion", "n_null_targets_called",
)
