"""Simulated Perturb-seq screens with known gene programs and perturbation effects.

The simulator produces a cells x genes UMI count matrix in which

* ``n_programs`` gene programs are planted: each program is a set of member genes with
  positive log-fold weights (and, with ``n_down_genes > 0``, a set of genes it lowers, with
  negative weights), and every cell has a non-negative *usage* of every program;
* ``n_targets`` CRISPR targets (plus non-targeting controls) each shift the usage of zero,
  one or two programs by a known multiplicative factor (scaled per guide with
  ``guide_efficacy``);
* counts are negative binomial (gamma-Poisson with gene-wise dispersion) around

      mu[c, g] = L[c] * normalise_c( b[g] * exp(sum_p U[c, p] * W[g, p]) * B[batch(c), g] )

  with ``b`` a lognormal baseline expression profile, ``U`` the usage, ``W`` the planted
  weights, ``B`` modest gene-wise batch factors and ``L`` a lognormal library size.

The truth (weights, usage, effects) is stored alongside the counts in the returned
:class:`anndata.AnnData` so that :mod:`perturbnmf.evaluation` can score a pipeline run.

Layout of the returned object
-----------------------------
``X``
    ``scipy.sparse.csr_matrix`` of ``int32`` UMI counts, cells x genes.
``obs``
    ``perturbation`` (categorical: ``"non-targeting"`` then the targets), ``guide``
    (categorical), ``batch`` (categorical ``batch_1`` ...), ``is_control`` (bool) and
    ``simulation_phase`` (categorical ``G1``/``S``/``G2M``, the planted cell-cycle phase).
``var``
    index = unique upper-case gene symbols (``GENE0001`` ..., the targets ``TGT01`` ...
    which are measured and knocked down in their own cells, and ``MT-ND1`` ... mitochondrial
    genes); columns ``simulation_baseline`` (baseline expression share) and
    ``simulation_dispersion`` (NB dispersion).
``varm["simulation_weights"]``
    genes x n_programs planted log-fold weights: positive for member genes, negative for the
    ``n_down_genes`` genes each program lowers (none by default), 0 elsewhere.
``obsm["simulation_usage"]``
    cells x n_programs planted usage, *after* the perturbation effects.
``uns["simulation"]``
    dict with ``program_names``, ``effects`` (DataFrame: perturbation, program,
    fold_change, direction; ``fold_change`` is the nominal, full-efficacy factor),
    ``null_targets``, ``targets``, ``params``, ``seed``; with ``guide_efficacy`` also
    ``guide_efficacy`` (DataFrame indexed by targeting guide: perturbation, efficacy).
    ``params`` holds ``n_down_genes`` / ``guide_efficacy`` only when they are switched on.

Screens larger than memory
--------------------------
:func:`write_simulated_screen` writes the same model to an ``.h5ad`` file chunk by chunk (the
counts drawn per block of 1,024 cells from their own streams), for benchmarks at millions of cells.
There only some targets need be measured genes (``n_measured_targets``), so a screen may have
more targets than genes.

Options for identifiability benchmarks
--------------------------------------
``n_down_genes`` and ``guide_efficacy`` are off by default, and with them off the result is
identical to earlier versions. Their random draws come from separate streams derived from
``seed`` (:class:`numpy.random.SeedSequence` spawn keys 1 and 2), so switching either on keeps
the programs' members, the usage before effects, the effects table and the design of the same
seed; only what the option changes (and hence the counts) differs.
``uns["control_label"]``
    ``"non-targeting"``.
"""

from __future__ import annotations

import math
import numbers
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import special

from ._checks import check_int

__all__ = [
    "CONTROL_LABEL",
    "DEMO_DESIGN",
    "PROGRAM_NAMES",
    "simulate_screen",
    "write_simulated_screen",
    "write_screen_subset",
    "planted_gene_sets",
    "write_gmt",
    "write_cell_cycle_genes",
]

CONTROL_LABEL = "non-targeting"

#: Names given to the planted programs, in order; beyond this list ``PROGRAM_<i>`` is used.
PROGRAM_NAMES = (
    "INTERFERON_RESPONSE",
    "S_PHASE",
    "G2M_CHECKPOINT",
    "HYPOXIA",
    "MHC_CLASS_II",
    "RIBOSOME_BIOGENESIS",
    "UNFOLDED_PROTEIN_RESPONSE",
    "GLYCOLYSIS",
    "TNFA_SIGNALING_VIA_NFKB",
    "CHOLESTEROL_BIOSYNTHESIS",
    "OXIDATIVE_PHOSPHORYLATION",
    "P53_PATHWAY",
    "MYC_TARGETS",
    "EPITHELIAL_MESENCHYMAL_TRANSITION",
    "HEAT_SHOCK_RESPONSE",
    "APOPTOSIS",
)
S_PROGRAM = "S_PHASE"
G2M_PROGRAM = "G2M_CHECKPOINT"
_CELL_CYCLE_PROGRAMS = (S_PROGRAM, G2M_PROGRAM)

#: Mitochondrially encoded genes (the first ``_N_MITO`` are simulated).
_MITO_GENES = (
    "MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8",
    "MT-ATP6", "MT-CO3", "MT-ND3", "MT-ND4L", "MT-ND4",
    "MT-ND5", "MT-ND6", "MT-CYB",
)
_N_MITO = 10

#: Real cell-cycle markers (Tirosh et al. 2016) that never occur in simulated data; three per
#: phase are appended to the marker file so the pipeline can report missing markers.
_ABSENT_MARKERS = {
    "S": ("MCM5", "PCNA", "TYMS", "FEN1", "MCM2", "MCM4", "RRM1", "UNG"),
    "G2M": ("HMGB2", "CDK1", "NUSAP1", "UBE2C", "BIRC5", "TPX2", "TOP2A", "NDC80"),
}

# Fractions of cells per planted phase (stratified within each perturbation group so that
# the phase mix does not differ between groups by chance).
_PHASE_FRACTIONS = {"S": 0.25, "G2M": 0.20}



#: The demo's and the benchmark's design: programs as count-space profiles that raise some genes and
#: lower 40 others, guides of efficacy 0.5-1 (``bench_programs.py`` measures the models on it).
DEMO_DESIGN = {"expression": "mixture", "n_down_genes": 40, "guide_efficacy": (0.5, 1.0)}

#: How usage becomes expression (see simulate_screen's ``expression``).
_EXPRESSION_MODELS = ("log_linear", "mixture")
#: Mixture model: a program profile is b * exp(_MIXTURE_CONTRAST * weights); a cell mixes
#: _MIXTURE_SHARE * usage of each profile into its baseline.
_MIXTURE_CONTRAST = 3.0
_MIXTURE_SHARE = 0.1
#: Mixture model: added to each program's active fraction (0.3-0.6 in the log-linear model).
_MIXTURE_EXTRA_ACTIVE = 0.3


def _mixture_log_expression(base: np.ndarray, usage: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """log(b + share · usage @ profiles), cells × genes: programs as count-space profiles."""
    profiles = base[None, :] * np.exp(_MIXTURE_CONTRAST * weights.T)
    profiles /= profiles.sum(axis=1, keepdims=True)
    mix = usage @ profiles
    mix *= _MIXTURE_SHARE
    mix += base[None, :]
    return np.log(np.maximum(mix, 1e-300), out=mix)


def _check_efficacy(value) -> tuple[float, float] | None:
    """``guide_efficacy``: None or a (low, high) pair with 0 < low <= high <= 1."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ValueError(f"guide_efficacy must be None or a (low, high) pair, got {value!r}")
    pair = list(value)
    if len(pair) != 2 or any(
        isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) for v in pair
    ):
        raise ValueError(f"guide_efficacy must be a (low, high) pair of numbers, got {value!r}")
    low, high = float(pair[0]), float(pair[1])
    if not (math.isfinite(low) and math.isfinite(high) and 0.0 < low <= high <= 1.0):
        raise ValueError(f"guide_efficacy must satisfy 0 < low <= high <= 1, got ({low}, {high})")
    return low, high


def _check_control_fraction(value) -> float:
    """``control_fraction`` as a float in (0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"control_fraction must be a number, got {value!r}")
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"control_fraction must be in (0, 1), got {value}")
    return value


def _check_screen_size(
    n_cells: int,
    n_genes: int,
    n_programs: int,
    n_targets: int,
    n_down_genes: int,
    control_fraction: float,
    n_measured_targets: int | None = None,
) -> int:
    """Number of control cells; ``ValueError`` if the genes or cells are too few for the design.

    ``n_measured_targets`` (default: all ``n_targets``) is how many targets are measured genes.
    """
    n_measured = n_targets if n_measured_targets is None else n_measured_targets
    # 2 * n_down_genes guarantees every program >= n_down_genes plain non-member genes
    min_genes = _N_MITO + n_measured + 15 * n_programs + 20 + 2 * n_down_genes
    if n_genes < min_genes:
        down = f", n_down_genes={n_down_genes}" if n_down_genes else ""
        measured = f", n_measured_targets={n_measured}" if n_measured != n_targets else ""
        raise ValueError(
            f"n_genes must be >= {min_genes} for n_programs={n_programs} and "
            f"n_targets={n_targets}{measured}{down}, got {n_genes}"
        )
    n_control = int(round(control_fraction * n_cells))
    if n_control < 10:
        raise ValueError(
            f"n_cells * control_fraction must give >= 10 control cells, got {n_control} "
            f"(n_cells={n_cells}, control_fraction={control_fraction})"
        )
    if (n_cells - n_control) < 10 * n_targets:
        raise ValueError(
            f"n_cells={n_cells} is too small: need >= 10 cells per target "
            f"({n_targets} targets, {n_cells - n_control} non-control cells)"
        )
    return n_control


def _option_rng(seed: int, stream: int) -> np.random.Generator:
    """Generator for an optional feature, independent of ``default_rng(seed)``.

    Optional features draw from their own stream so that the main stream, and with it the
    default output, is the same whether or not they are switched on.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))


def _member_weights(rng: np.random.Generator, size: int) -> np.ndarray:
    """Log-fold weights of program members: lognormal around 0.8, clipped to [0.3, 2]."""
    return np.clip(rng.lognormal(np.log(0.8), 0.3, size=size), 0.3, 2.0)


def _program_names(n_programs: int) -> list[str]:
    names = list(PROGRAM_NAMES[:n_programs])
    names += [f"PROGRAM_{i + 1:02d}" for i in range(len(names), n_programs)]
    return names


def _cells_per_value(values: np.ndarray, n_values: int) -> list[np.ndarray]:
    """Per value ``v`` in ``0 .. n_values - 1``: the cells (ascending) whose value is ``v``.

    The same arrays as ``np.flatnonzero(values == v)`` for every ``v``, from one stable sort
    instead of one scan of all cells per value (thousands of targets x millions of cells).
    """
    order = np.argsort(values, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(values, minlength=n_values))])
    return [order[bounds[v]:bounds[v + 1]] for v in range(n_values)]


def _stratified_uniform(rng: np.random.Generator, strata: np.ndarray, n_cols: int) -> np.ndarray:
    """Uniform(0, 1) draws, stratified within each stratum.

    Returns an (n_cells, n_cols) array; within every stratum of ``m`` cells each column holds
    one value from each interval ``[i/m, (i+1)/m)`` in random order. Strata are non-negative
    integers, visited in increasing order.
    """
    out = np.empty((strata.size, n_cols))
    for cells in _cells_per_value(strata, int(strata.max()) + 1 if strata.size else 0):
        m = cells.size
        if not m:
            continue
        ranks = rng.permuted(np.tile(np.arange(m), (n_cols, 1)), axis=1).T
        out[cells] = (ranks + rng.random((m, n_cols))) / m
    return out


def _effect_layout(n_targets: int, n_eligible: int) -> tuple[int, int, int]:
    """Numbers of (null, single-program, two-program) targets."""
    n_null = max(4, math.ceil(0.3 * n_targets))
    rest = n_targets - n_null
    n_double = min(round(0.2 * n_targets), max(0, rest - 2)) if n_eligible >= 2 else 0
    return n_null, rest - n_double, n_double


# --------------------------------------------------------------------------------------
# simulation
# --------------------------------------------------------------------------------------
def simulate_screen(
    n_cells: int = 4000,
    n_genes: int = 2000,
    n_programs: int = 8,
    n_targets: int = 16,
    n_batches: int = 2,
    n_guides_per_target: int = 3,
    n_control_guides: int = 4,
    control_fraction: float = 0.15,
    seed: int = 0,
    n_down_genes: int = 0,
    guide_efficacy: tuple[float, float] | None = None,
    expression: str = "log_linear",
) -> anndata.AnnData:
    """Simulate a Perturb-seq screen with planted gene programs and perturbation effects.

    Parameters
    ----------
    n_cells
        Number of cells (rows). Every target must get at least 10 cells and the control
        group at least 10 cells.
    n_genes
        Number of measured genes (columns), including 10 mitochondrial genes
        (``MT-ND1`` ...) and the ``n_targets`` target genes, which are measured and knocked
        down in their own cells. Must be >= ``10 + n_targets + 15 * n_programs + 20 +
        2 * n_down_genes``.
    n_programs
        Number of planted programs, >= 3. ``S_PHASE`` and ``G2M_CHECKPOINT`` are always
        among them; they follow the planted cell-cycle phase and are not perturbed.
    n_targets
        Number of targeted genes, >= 6. ``max(4, ceil(0.3 n))`` targets have no effect,
        about ``0.2 n`` shift two programs and the rest (about half) shift one program.
    n_batches
        Number of batches (``batch_1`` ...), each with modest gene-wise multiplicative
        effects (log-sd 0.15) and a small library-size shift.
    n_guides_per_target
        Guides per target, named ``<TARGET>g1`` ...
    n_control_guides
        Non-targeting guides, named ``NTg1`` ...
    control_fraction
        Fraction of cells carrying a non-targeting guide, in (0, 1).
    seed
        Seed of :func:`numpy.random.default_rng`; the result is a deterministic function
        of all arguments.
    n_down_genes
        Number of genes each program *lowers*, >= 0 (default 0: none). They are drawn from
        the plain genes (neither targets nor mitochondrial) that are not members of that
        program, preferring genes in no program and not yet lowered by another program, then
        genes in no program, then members of other programs. Their weights are drawn like
        the member weights (lognormal around 0.8, clipped to [0.3, 2]) and negated, and are
        stored as negative entries of ``varm["simulation_weights"]``.
    guide_efficacy
        ``None`` (default: every guide has full effect) or ``(low, high)`` with
        ``0 < low <= high <= 1``: every targeting guide gets an efficacy
        ``e ~ Uniform(low, high)`` and a planted effect multiplies the usage of a cell with
        that guide by ``fold_change ** e``. The efficacies are stored in
        ``uns["simulation"]["guide_efficacy"]``; the ``effects`` table keeps the nominal
        ``fold_change``. The target's own knockdown is not affected.
    expression
        How usage becomes expression. ``"log_linear"`` (default): log-expression is the
        baseline plus ``usage @ weights.T``. ``"mixture"``: each program is a count-space
        expression profile ``b * exp(3 * weights[:, p])`` (normalised; members raised up to
        e^6-fold, lowered genes cut as much), and a cell's expression is the mixture
        ``b + 0.1 * usage_c @ profiles`` — programs add transcripts, as in cNMF's
        generative model (Kotliar et al. 2019), so a program active in a cell takes a
        share of its counts (~15 % at usage 1.6). No random draw depends on it.

    Returns
    -------
    anndata.AnnData
        ``n_cells x n_genes`` with integer counts in a CSR ``int32`` ``X`` and the truth in
        ``varm["simulation_weights"]`` (n_genes x n_programs), ``obsm["simulation_usage"]``
        (n_cells x n_programs) and ``uns["simulation"]`` (see the module docstring).

    Raises
    ------
    ValueError
        If an argument is out of range; the message names the argument.

    Notes
    -----
    * Programs have 30-80 member genes (proportionally fewer when ``n_genes`` is small),
      drawn disjointly and then sharing 0-3 genes with other programs; member weights are
      lognormal around 0.8 (clipped to [0.3, 2]).
    * Usage of the non-cell-cycle programs is zero-inflated gamma (active in 30-60 % of
      cells, mean 1.2-2 when active), drawn by stratified sampling within each perturbation
      group so that the unperturbed group means agree to within a few percent. ``S_PHASE`` /
      ``G2M_CHECKPOINT`` usage is ~2 in cells of the planted phase (25 % S, 20 % G2M, also
      stratified per group; ``obs["simulation_phase"]``) and ~0.1 elsewhere; these two
      programs are never perturbed.
    * Effects multiply a program's usage in all cells of the target by 2-3 ("up") or
      0.2-0.4 ("down"), raised to the guide's efficacy with ``guide_efficacy``;
      single-program targets alternate up/down. Every target gene is knocked down to
      10-40 % (guide-specific) in its own cells, null targets included.
    * ``n_down_genes`` and ``guide_efficacy`` draw from their own random streams (see the
      module docstring): with both off the output is that of earlier versions, and
      switching one on leaves the rest of the truth of the same ``seed`` unchanged.
    * Library sizes are lognormal (median ~4,000 UMIs); mitochondrial genes take ~5 % of
      the counts, with 3 % damaged cells (5x mito share, 0.4x library).
    """
    setup = _check_setup(
        n_cells, n_genes, n_programs, n_targets, n_batches, n_guides_per_target, n_control_guides,
        control_fraction, seed, n_down_genes, guide_efficacy, expression,
    )
    rng = np.random.default_rng(setup.seed)
    truth = _draw_truth(rng, setup)
    counts = _draw_counts(rng, truth.genes, truth.design, truth.usage, truth.weights, setup.expression)
    return _screen_anndata(counts, truth)


@dataclass(frozen=True)
class _Setup:
    """The checked arguments of a simulated screen (see :func:`simulate_screen`)."""

    n_cells: int
    n_genes: int
    n_programs: int
    n_targets: int
    n_batches: int
    n_guides_per_target: int
    n_control_guides: int
    control_fraction: float
    seed: int
    n_down_genes: int
    guide_efficacy: tuple[float, float] | None
    expression: str
    n_measured_targets: int  # targets that are measured genes (all of them in simulate_screen)
    n_control: int  # control cells

    @property
    def params(self) -> dict:
        """``uns["simulation"]["params"]``: the arguments, options only when switched on."""
        return {
            "n_cells": self.n_cells, "n_genes": self.n_genes, "n_programs": self.n_programs,
            "n_targets": self.n_targets, "n_batches": self.n_batches,
            "n_guides_per_target": self.n_guides_per_target, "n_control_guides": self.n_control_guides,
            "control_fraction": self.control_fraction, "seed": self.seed,
            **_switched_on_options(self.n_down_genes, self.guide_efficacy, self.expression),
        }


def _check_setup(
    n_cells, n_genes, n_programs, n_targets, n_batches, n_guides_per_target, n_control_guides,
    control_fraction, seed, n_down_genes, guide_efficacy, expression, n_measured_targets=None,
) -> _Setup:
    """Check :func:`simulate_screen`'s arguments (``ValueError`` naming the argument)."""
    n_cells = check_int("n_cells", n_cells, 1)
    n_genes = check_int("n_genes", n_genes, 1)
    n_programs = check_int("n_programs", n_programs, 3)
    n_targets = check_int("n_targets", n_targets, 6)
    n_batches = check_int("n_batches", n_batches, 1)
    n_guides_per_target = check_int("n_guides_per_target", n_guides_per_target, 1)
    n_control_guides = check_int("n_control_guides", n_control_guides, 1)
    seed = check_int("seed", seed, 0)
    n_down_genes = check_int("n_down_genes", n_down_genes, 0)
    if expression not in _EXPRESSION_MODELS:
        raise ValueError(f"expression must be one of {_EXPRESSION_MODELS}, got {expression!r}")
    guide_efficacy = _check_efficacy(guide_efficacy)
    control_fraction = _check_control_fraction(control_fraction)
    if n_measured_targets is None:
        n_measured_targets = n_targets
    n_measured_targets = check_int("n_measured_targets", n_measured_targets, 0)
    if n_measured_targets > n_targets:
        raise ValueError(f"n_measured_targets must be <= n_targets={n_targets}, got {n_measured_targets}")
    n_control = _check_screen_size(
        n_cells, n_genes, n_programs, n_targets, n_down_genes, control_fraction, n_measured_targets
    )
    return _Setup(
        n_cells, n_genes, n_programs, n_targets, n_batches, n_guides_per_target, n_control_guides,
        control_fraction, seed, n_down_genes, guide_efficacy, expression, n_measured_targets, n_control,
    )


@dataclass(frozen=True)
class _Truth:
    """Everything of a simulated screen but its counts: genes, programs, design, usage, effects."""

    setup: _Setup
    genes: _Genes
    program_names: list[str]
    weights: np.ndarray  # genes x programs
    design: _Design
    usage: np.ndarray  # cells x programs, after the effects
    effects: list[tuple[str, str, float, str]]
    null_targets: list[str]
    efficacy: np.ndarray | None  # targets x guides

    def uns(self) -> dict:
        """``uns["simulation"]`` (see the module docstring)."""
        setup = self.setup
        truth = {
            "program_names": self.program_names,
            "effects": pd.DataFrame(self.effects, columns=["perturbation", "program", "fold_change", "direction"]),
            "null_targets": self.null_targets, "targets": self.genes.targets, "params": setup.params,
            "seed": setup.seed,
        }
        if self.efficacy is not None:
            targeting_guides = self.design.guide_names[setup.n_control_guides:]
            truth["guide_efficacy"] = _efficacy_table(self.efficacy, self.genes.targets, targeting_guides)
        return truth


def _draw_truth(rng: np.random.Generator, setup: _Setup) -> _Truth:
    """Genes, planted programs, design, usage and effects, drawn from ``rng`` in a fixed order.

    Memory: O(n_cells x n_programs) (the usage) plus O(n_genes x n_programs); no cells x genes array.
    """
    genes = _draw_genes(rng, setup.n_genes, setup.n_targets, setup.n_measured_targets)
    program_names = _program_names(setup.n_programs)
    weights = _draw_weights(
        rng, setup.n_genes, genes.plain_idx, setup.n_programs, setup.n_down_genes, setup.seed
    )
    design = _draw_design(
        rng, setup.n_cells, setup.n_control, genes.targets, setup.n_batches, setup.n_guides_per_target,
        setup.n_control_guides,
    )
    usage = _draw_usage(rng, design, program_names, setup.expression)
    effects, null_targets = _draw_effects(rng, genes.targets, program_names)
    efficacy = _draw_guide_efficacy(setup.seed, setup.guide_efficacy, setup.n_targets, setup.n_guides_per_target)
    _apply_effects(usage, effects, design, genes.targets, program_names, efficacy)
    return _Truth(setup, genes, program_names, weights, design, usage, effects, null_targets, efficacy)


def _switched_on_options(n_down_genes: int, guide_efficacy, expression: str) -> dict:
    """The optional features' entries of ``params``.

    Recorded only when switched on, so that the default ``params`` stay as they were before
    the options existed.
    """
    options = {}
    if n_down_genes:
        options["n_down_genes"] = n_down_genes
    if guide_efficacy is not None:
        options["guide_efficacy"] = list(guide_efficacy)
    if expression != "log_linear":
        options["expression"] = expression
    return options


@dataclass(frozen=True)
class _Genes:
    """The measured genes: names (plain genes, then targets, then mitochondrial) and profiles."""

    names: list[str]
    targets: list[str]
    plain_idx: np.ndarray
    target_idx: np.ndarray  # column of each measured target (the first target_idx.size targets)
    mito_idx: np.ndarray
    baseline: np.ndarray  # share of the expression profile, sums to 1
    dispersion: np.ndarray  # NB dispersion phi: var = mu + phi mu^2


def _draw_genes(
    rng: np.random.Generator, n_genes: int, n_targets: int, n_measured: int | None = None
) -> _Genes:
    """Gene names and profiles; the first ``n_measured`` targets (default: all) are measured genes."""
    n_measured = n_targets if n_measured is None else n_measured
    width_t = max(2, len(str(n_targets)))
    targets = [f"TGT{i + 1:0{width_t}d}" for i in range(n_targets)]
    n_plain = n_genes - _N_MITO - n_measured
    width_g = max(4, len(str(n_plain)))
    plain = [f"GENE{i + 1:0{width_g}d}" for i in range(n_plain)]
    mito = list(_MITO_GENES[:_N_MITO])
    target_idx = np.arange(n_plain, n_plain + n_measured)
    mito_idx = np.arange(n_plain + n_measured, n_genes)

    # baseline expression: lognormal spread over ~2 orders of magnitude (non-mito genes
    # share 92 % of the baseline profile); mitochondrial genes are highly expressed.
    log_base = rng.normal(0.0, 1.3, size=n_genes)
    # targets: moderately-to-highly expressed so that the knockdown is visible
    log_base[target_idx] = rng.uniform(1.0, 2.5, size=n_measured)
    base = np.exp(log_base)
    base[mito_idx] = 0.0
    base /= base.sum()
    base *= 0.92
    mito_share = rng.lognormal(0.0, 0.4, size=_N_MITO)
    base[mito_idx] = 0.08 * mito_share / mito_share.sum()
    dispersion = np.exp(rng.normal(np.log(0.1), 0.5, size=n_genes))
    return _Genes(
        names=plain + targets[:n_measured] + mito,
        targets=targets,
        plain_idx=np.arange(n_plain),
        target_idx=target_idx,
        mito_idx=mito_idx,
        baseline=base,
        dispersion=dispersion,
    )


def _draw_weights(
    rng: np.random.Generator,
    n_genes: int,
    plain_idx: np.ndarray,
    n_programs: int,
    n_down_genes: int,
    seed: int,
) -> np.ndarray:
    """Planted log-fold weights, genes x programs: members, then (option) lowered genes."""
    sizes = rng.integers(30, 81, size=n_programs)
    capacity = int(0.7 * plain_idx.size)  # >= 10.5 genes per program given the n_genes check
    if sizes.sum() > capacity:  # small gene panels: shrink programs proportionally
        sizes = np.maximum(8, np.floor(sizes * capacity / sizes.sum())).astype(int)
    order = rng.permutation(plain_idx)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    members = [order[starts[p]:starts[p + 1]] for p in range(n_programs)]
    # a few genes shared with another program
    for p in range(n_programs):
        others = np.concatenate([members[q] for q in range(n_programs) if q != p])
        n_shared = int(rng.integers(0, 4))
        if n_shared:
            shared = rng.choice(others, size=n_shared, replace=False)
            members[p] = np.union1d(members[p], shared)
    weights = np.zeros((n_genes, n_programs))
    for p, genes in enumerate(members):
        weights[genes, p] = _member_weights(rng, genes.size)
    if n_down_genes:
        _plant_down_genes(_option_rng(seed, 1), weights, members, plain_idx, n_down_genes)
    return weights


def _plant_down_genes(
    rng: np.random.Generator,
    weights: np.ndarray,
    members: list[np.ndarray],
    plain_idx: np.ndarray,
    n_down: int,
) -> None:
    """Give every program ``n_down`` genes with negative weights (in place in ``weights``).

    Candidates for program ``p`` are the plain genes that are not members of ``p``, taken in
    the order: genes in no program and not yet lowered by another program, genes in no
    program, members of other programs (random order within each tier).
    """
    n_genes, n_programs = weights.shape
    in_any = np.zeros(n_genes, dtype=bool)
    for genes in members:
        in_any[genes] = True
    lowered = np.zeros(n_genes, dtype=bool)
    for p in range(n_programs):
        in_p = np.zeros(n_genes, dtype=bool)
        in_p[members[p]] = True
        candidates = plain_idx[~in_p[plain_idx]]
        if candidates.size < n_down:  # excluded by the n_genes check; kept as a guard
            raise ValueError(
                f"n_down_genes={n_down} is too large: program {p + 1} has only "
                f"{candidates.size} plain non-member genes"
            )
        tier = np.where(in_any[candidates], 2, np.where(lowered[candidates], 1, 0))
        order = np.lexsort((rng.random(candidates.size), tier))
        chosen = np.sort(candidates[order[:n_down]])
        lowered[chosen] = True
        weights[chosen, p] = -_member_weights(rng, n_down)


@dataclass(frozen=True)
class _Design:
    """Which cell got which guide, batch and planted cell-cycle phase."""

    group: np.ndarray  # per cell: 0 = control, t + 1 = target t
    group_labels: list[str]  # CONTROL_LABEL, then the targets
    guide_names: list[str]  # the control guides, then each target's guides
    guide_within: np.ndarray  # per cell: index of its guide among its group's guides
    guide_code: np.ndarray  # per cell: index into guide_names
    phase: np.ndarray  # per cell: 0 = G1, 1 = S, 2 = G2M
    batch: np.ndarray  # per cell: batch index
    n_batches: int
    n_guides_per_target: int

    @property
    def is_control(self) -> np.ndarray:
        return self.group == 0


def _draw_design(
    rng: np.random.Generator,
    n_cells: int,
    n_control: int,
    targets: list[str],
    n_batches: int,
    n_guides_per_target: int,
    n_control_guides: int,
) -> _Design:
    n_targets = len(targets)
    n_per_target = np.full(n_targets, (n_cells - n_control) // n_targets)
    n_per_target[: (n_cells - n_control) % n_targets] += 1
    group_sizes = np.concatenate([[n_control], n_per_target])
    group = np.repeat(np.arange(n_targets + 1), group_sizes)
    group = group[rng.permutation(n_cells)]
    is_control = group == 0

    # guides: uniform within a group
    guide_names = [f"NTg{j + 1}" for j in range(n_control_guides)]
    guide_names += [f"{t}g{j + 1}" for t in targets for j in range(n_guides_per_target)]
    guide_within = np.where(
        is_control,
        rng.integers(0, n_control_guides, size=n_cells),
        rng.integers(0, n_guides_per_target, size=n_cells),
    )
    guide_code = np.where(
        is_control, guide_within, n_control_guides + (group - 1) * n_guides_per_target + guide_within
    )

    phase = _draw_phases(rng, group, n_targets + 1)
    return _Design(
        group=group,
        group_labels=[CONTROL_LABEL] + targets,
        guide_names=guide_names,
        guide_within=guide_within,
        guide_code=guide_code,
        phase=phase,
        batch=rng.integers(0, n_batches, size=n_cells),
        n_batches=n_batches,
        n_guides_per_target=n_guides_per_target,
    )


def _draw_phases(rng: np.random.Generator, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Planted cell-cycle phase per cell (0 = G1, 1 = S, 2 = G2M), stratified within each group."""
    phase = np.zeros(group.size, dtype=np.int8)
    for cells in _cells_per_value(group, n_groups):
        n_s = int(round(_PHASE_FRACTIONS["S"] * cells.size))
        n_g2m = int(round(_PHASE_FRACTIONS["G2M"] * cells.size))
        labels = np.zeros(cells.size, dtype=np.int8)
        labels[:n_s] = 1
        labels[n_s:n_s + n_g2m] = 2
        phase[cells] = rng.permutation(labels)
    return phase


def _draw_usage(
    rng: np.random.Generator, design: _Design, program_names: list[str], expression: str
) -> np.ndarray:
    """Planted usage before the perturbation effects, cells x programs."""
    # Zero-inflated gamma usage: a program is active in a fraction `active` of the cells,
    # with a gamma-distributed usage when active. Values are drawn by stratified (Latin
    # hypercube) sampling within each perturbation group, so every cell's usage has exactly
    # the intended marginal distribution while the group means of the unperturbed usage agree
    # closely between groups: the planted fold changes are then the group-level truth.
    n_programs = len(program_names)
    active = rng.uniform(0.3, 0.6, size=n_programs)
    if expression == "mixture":  # programs as profiles: active in 60-90 % of cells
        active += _MIXTURE_EXTRA_ACTIVE
    shape = rng.uniform(2.5, 4.5, size=n_programs)
    active_mean = rng.uniform(1.2, 2.0, size=n_programs)
    u = _stratified_uniform(rng, design.group, n_programs)
    q = np.clip((u - (1.0 - active)) / active, 0.0, 1.0 - 1e-12)
    usage = np.where(
        u > 1.0 - active, special.gammaincinv(shape, q) * (active_mean / shape), 0.0
    )
    # cell-cycle programs follow the planted phase: mean 2 in the phase, 0.1 outside
    cc_strata = design.group * 3 + design.phase
    for label, code in ((S_PROGRAM, 1), (G2M_PROGRAM, 2)):
        p = program_names.index(label)
        u = _stratified_uniform(rng, cc_strata, 1)[:, 0]
        usage[:, p] = np.where(
            design.phase == code,
            special.gammaincinv(8.0, u) * (2.0 / 8.0),
            special.gammaincinv(2.0, u) * (0.1 / 2.0),
        )
    return usage


def _draw_effects(
    rng: np.random.Generator, targets: list[str], program_names: list[str]
) -> tuple[list[tuple[str, str, float, str]], list[str]]:
    """Planted effects as (perturbation, program, fold_change, direction) rows, and the
    targets without an effect.

    Null, single-program and two-program roles are shuffled over the targets; the programs
    are dealt from a reshuffled cycle over the non-cell-cycle programs so that every program
    gets a similar number of effects.
    """
    eligible = [p for p, name in enumerate(program_names) if name not in _CELL_CYCLE_PROGRAMS]
    n_null, n_single, n_double = _effect_layout(len(targets), len(eligible))
    roles = rng.permutation(np.repeat([0, 1, 2], [n_null, n_single, n_double]))
    cycle: list[int] = []
    effects = []
    single_count = 0
    for target, role in zip(targets, roles):
        if role == 1:
            direction = "up" if single_count % 2 == 0 else "down"
            single_count += 1
            p = _next_program(rng, cycle, eligible)
            effects.append((target, program_names[p], _fold_change(rng, direction), direction))
        elif role == 2:
            p1 = _next_program(rng, cycle, eligible)
            p2 = _next_program(rng, cycle, eligible, exclude=p1)
            for p in (p1, p2):
                direction = "up" if rng.random() < 0.5 else "down"
                effects.append((target, program_names[p], _fold_change(rng, direction), direction))
    null_targets = [target for target, role in zip(targets, roles) if role == 0]
    return effects, null_targets


def _next_program(
    rng: np.random.Generator, cycle: list[int], eligible: list[int], exclude: int | None = None
) -> int:
    """Take the next program other than ``exclude`` from ``cycle``, refilling it when empty.

    Such a program always exists: ``exclude`` was just taken from the cycle, whose entries
    are distinct, or the cycle was just refilled with all ``eligible`` programs (at least two
    whenever two-program targets are planted).
    """
    if not cycle:
        cycle.extend(rng.permutation(eligible).tolist())
    i = next(i for i, p in enumerate(cycle) if p != exclude)
    return cycle.pop(i)


def _fold_change(rng: np.random.Generator, direction: str) -> float:
    return float(rng.uniform(2.0, 3.0) if direction == "up" else rng.uniform(0.2, 0.4))


def _draw_guide_efficacy(
    seed: int, guide_efficacy: tuple[float, float] | None, n_targets: int, n_guides_per_target: int
) -> np.ndarray | None:
    """Efficacy of every targeting guide (targets x guides), from its own stream; None when off."""
    if guide_efficacy is None:
        return None
    low, high = guide_efficacy
    return _option_rng(seed, 2).uniform(low, high, size=(n_targets, n_guides_per_target))


def _efficacy_table(
    efficacy: np.ndarray, targets: list[str], targeting_guides: list[str]
) -> pd.DataFrame:
    """``uns["simulation"]["guide_efficacy"]``: perturbation and efficacy per targeting guide."""
    return pd.DataFrame(
        {
            "perturbation": np.repeat(targets, efficacy.shape[1]),
            "efficacy": efficacy.ravel(),
        },
        index=pd.Index(targeting_guides, name="guide"),
    )


def _apply_effects(
    usage: np.ndarray,
    effects: list[tuple[str, str, float, str]],
    design: _Design,
    targets: list[str],
    program_names: list[str],
    efficacy: np.ndarray | None,
) -> None:
    """Multiply ``usage`` (in place) by each effect's fold change in the target's cells.

    With ``efficacy`` (targets x guides) a cell's factor is ``fold_change ** efficacy`` of its
    guide.
    """
    target_of = {t: i for i, t in enumerate(targets)}
    program_of = {name: i for i, name in enumerate(program_names)}
    cells_of = _cells_per_value(design.group, len(targets) + 1)
    for pert, prog, fc, _ in effects:
        t = target_of[pert]
        p = program_of[prog]
        cells = cells_of[t + 1]
        if efficacy is None:
            usage[cells, p] *= fc
        else:
            usage[cells, p] *= fc ** efficacy[t, design.guide_within[cells]]


@dataclass(frozen=True)
class _ScreenDraws:
    """Screen-wide draws of the expression model (shared by all cells)."""

    batch_log: np.ndarray  # batches x genes: gene-wise batch effects (log scale, 0 for mito genes)
    remaining: np.ndarray  # targets x guides: share of the target's mRNA a guide leaves (0.1-0.4)
    batch_lib: np.ndarray  # per batch: library-size factor


@dataclass(frozen=True)
class _CellRows:
    """Some cells' rows of the design with their own draws (mito factor, library size)."""

    group: np.ndarray  # 0 = control, t + 1 = target t
    guide_within: np.ndarray
    batch: np.ndarray
    mito_log: np.ndarray  # log factor of the mitochondrial genes
    library: np.ndarray  # expected UMIs


def _draw_batch_log(rng: np.random.Generator, n_batches: int, genes: _Genes) -> np.ndarray:
    """Gene-wise batch effects, batches x genes (log-sd 0.15; none on mitochondrial genes)."""
    batch_log = rng.normal(0.0, 0.15, size=(n_batches, genes.baseline.size))
    batch_log[:, genes.mito_idx] = 0.0
    return batch_log


def _draw_damage(rng: np.random.Generator, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Damaged cells (3 %) and each cell's log mitochondrial factor: lognormal, x5 when damaged."""
    damaged = rng.random(n_cells) < 0.03
    mito_log = rng.normal(0.0, 0.35, size=n_cells) + np.where(damaged, np.log(5.0), 0.0)
    return damaged, mito_log


def _draw_remaining(rng: np.random.Generator, n_targets: int, n_guides: int) -> np.ndarray:
    """Share of the target's mRNA each guide leaves, targets x guides."""
    return rng.uniform(0.1, 0.4, size=(n_targets, n_guides))


def _draw_batch_library(rng: np.random.Generator, n_batches: int) -> np.ndarray:
    """Library-size factor per batch."""
    return np.exp(rng.normal(0.0, 0.1, size=n_batches))


def _draw_library(rng: np.random.Generator, damaged: np.ndarray, batch_factor: np.ndarray) -> np.ndarray:
    """Expected UMIs per cell: lognormal around 4,000, times its batch's factor, x0.4 when damaged."""
    library = rng.lognormal(np.log(4000.0), 0.35, size=damaged.size) * batch_factor
    library *= np.where(damaged, 0.4, 1.0)
    return library


def _expression_means(
    rng: np.random.Generator,
    genes: _Genes,
    design: _Design,
    usage: np.ndarray,
    weights: np.ndarray,
    expression: str,
) -> np.ndarray:
    """Expected UMI counts mu, cells x genes (see the module docstring)."""
    n_cells = usage.shape[0]
    batch_log = _draw_batch_log(rng, design.n_batches, genes)
    damaged, mito_log = _draw_damage(rng, n_cells)
    remaining = _draw_remaining(rng, genes.target_idx.size, design.n_guides_per_target)
    batch_lib = _draw_batch_library(rng, design.n_batches)
    library = _draw_library(rng, damaged, batch_lib[design.batch])
    rows = _CellRows(design.group, design.guide_within, design.batch, mito_log, library)
    return _cell_means(genes, _ScreenDraws(batch_log, remaining, batch_lib), rows, usage, weights, expression)


def _cell_means(
    genes: _Genes,
    screen: _ScreenDraws,
    rows: _CellRows,
    usage: np.ndarray,
    weights: np.ndarray,
    expression: str,
) -> np.ndarray:
    """Expected UMI counts of the cells ``rows`` (usage: their rows), cells x genes float64.

    Each row depends only on that cell's inputs and the screen-wide draws, so the cells can be
    taken a block at a time (:func:`write_simulated_screen`).
    """
    # (usage @ W.T + log b) + batch, computed in place: the same IEEE operations as
    # log b + usage @ W.T + batch (addition is commutative), without the extra temporaries
    if expression == "mixture":
        log_mu = _mixture_log_expression(genes.baseline, usage, weights)
    else:
        log_mu = usage @ weights.T
        log_mu += np.log(np.maximum(genes.baseline, 1e-300))[None, :]
    log_mu += screen.batch_log[rows.batch]
    # mitochondrial share: lognormal per cell, with 3 % damaged cells (high mito, small library)
    log_mu[:, genes.mito_idx] += rows.mito_log[:, None]
    log_mu -= log_mu.max(axis=1, keepdims=True)
    mu = np.exp(log_mu, out=log_mu)
    # target knockdown: guide-specific remaining fraction of the (measured) target's mRNA
    pert_cells = np.flatnonzero(rows.group > 0)
    target = rows.group[pert_cells] - 1
    measured = target < genes.target_idx.size
    if not measured.all():
        pert_cells, target = pert_cells[measured], target[measured]
    mu[pert_cells, genes.target_idx[target]] *= screen.remaining[target, rows.guide_within[pert_cells]]
    mu /= mu.sum(axis=1, keepdims=True)
    mu *= rows.library[:, None]
    return mu


def _draw_counts(
    rng: np.random.Generator,
    genes: _Genes,
    design: _Design,
    usage: np.ndarray,
    weights: np.ndarray,
    expression: str,
) -> sp.csr_matrix:
    """Gamma-Poisson (negative binomial) UMI counts, CSR ``int32``.

    The expression means are made in the call, so that only :func:`_nb_counts` holds them.
    """
    return _nb_counts(rng, _expression_means(rng, genes, design, usage, weights, expression), genes.dispersion)


def _nb_counts(rng: np.random.Generator, mu: np.ndarray, dispersion: np.ndarray) -> sp.csr_matrix:
    """Gamma-Poisson counts around ``mu`` (cells x genes, overwritten), CSR ``int32``.

    Pass ``mu`` as a temporary: the dense cells x genes arrays are freed as soon as they are used up.
    """
    inv_phi = 1.0 / dispersion
    mu /= inv_phi[None, :]  # the gamma scale; mu is not needed afterwards
    lam = rng.gamma(inv_phi[None, :], mu)
    del mu
    counts = rng.poisson(lam)
    del lam
    return sp.csr_matrix(counts.astype(np.int32), dtype=np.int32)


def _obs_frame(design: _Design) -> pd.DataFrame:
    """``obs``: perturbation, guide, batch, is_control, simulation_phase; cells ``CELL00001`` ..."""
    n_cells = design.group.size
    width_c = max(5, len(str(n_cells)))
    return pd.DataFrame(
        {
            "perturbation": pd.Categorical.from_codes(design.group, categories=design.group_labels),
            "guide": pd.Categorical.from_codes(design.guide_code, categories=design.guide_names),
            "batch": pd.Categorical.from_codes(
                design.batch, categories=[f"batch_{b + 1}" for b in range(design.n_batches)]
            ),
            "is_control": design.is_control,
            "simulation_phase": pd.Categorical.from_codes(
                design.phase, categories=["G1", "S", "G2M"]
            ),
        },
        index=pd.Index([f"CELL{i + 1:0{width_c}d}" for i in range(n_cells)], name="cell"),
    )


def _screen_anndata(counts: sp.csr_matrix | None, truth: _Truth) -> anndata.AnnData:
    """The counts (None: no ``X``) with the design in ``obs``, the gene profiles in ``var`` and the truth."""
    genes = truth.genes
    var = pd.DataFrame(
        {"simulation_baseline": genes.baseline, "simulation_dispersion": genes.dispersion},
        index=pd.Index(genes.names, name="gene"),
    )
    adata = anndata.AnnData(X=counts, obs=_obs_frame(truth.design), var=var)
    adata.varm["simulation_weights"] = truth.weights
    adata.obsm["simulation_usage"] = truth.usage
    adata.uns["control_label"] = CONTROL_LABEL
    adata.uns["simulation"] = truth.uns()
    return adata


# --------------------------------------------------------------------------------------
# screens larger than memory, written chunk by chunk
# --------------------------------------------------------------------------------------
#: Cells per block of the per-cell random streams: block ``b`` (cells ``b * 1024`` ...) draws its
#: damage, library sizes and counts from ``SeedSequence(seed, spawn_key=(3, b))``, so the counts do
#: not depend on how many cells are written at a time.
_CELL_BLOCK = 1024
_BLOCK_STREAM = 3
#: Elements per HDF5 chunk of X's ``data`` / ``indices`` / ``indptr`` (1 MiB of int32).
_H5_CHUNK = 1 << 18
_COMPRESSIONS = (None, "gzip", "lzf")


def write_simulated_screen(
    path,
    n_cells: int,
    n_genes: int,
    n_targets: int,
    *,
    chunk_cells: int = 50_000,
    seed: int = 0,
    n_programs: int = 8,
    n_batches: int = 2,
    n_guides_per_target: int = 3,
    n_control_guides: int = 4,
    control_fraction: float = 0.15,
    n_down_genes: int = 0,
    guide_efficacy: tuple[float, float] | None = None,
    expression: str = "log_linear",
    n_measured_targets: int | None = None,
    compression: str | None = None,
    gene_sets_path=None,
    cell_cycle_path=None,
) -> dict:
    """Write a simulated screen to an ``.h5ad`` file chunk by chunk: screens larger than memory.

    The generative model and the file's layout are :func:`simulate_screen`'s (see there and the
    module docstring): planted programs, perturbation effects, non-targeting controls, batches,
    guides, cell-cycle and mitochondrial genes, NB counts of ~4,000 UMIs per cell (most entries
    zero). The counts are drawn in blocks of 1,024 cells and appended to ``X`` on disk every
    ``chunk_cells`` cells, so the cells x genes matrix is never held whole.

    Parameters
    ----------
    path
        Output ``.h5ad`` (its folder is created). Written as a hidden ``.partial`` file next to it
        and renamed when complete, so ``path`` is never a half-written screen.
    n_cells, n_genes, n_targets
        Cells, measured genes and CRISPR targets, as in :func:`simulate_screen`.
    chunk_cells
        Cells appended to the file at a time (rounded up to whole blocks of 1,024 cells). Memory
        follows it: about ``chunk_cells x`` (non-zeros per cell) ``x 8`` bytes for the chunk's CSR,
        plus one block's dense 1,024 x ``n_genes`` float64 arrays.
    seed, n_programs, n_batches, n_guides_per_target, n_control_guides, control_fraction, \
    n_down_genes, guide_efficacy, expression
        As in :func:`simulate_screen` (e.g. ``**DEMO_DESIGN`` for the demo's design).
    n_measured_targets
        How many targets are also measured genes (the first ones, ``TGT...``; knocked down in
        their own cells); the others are not in ``var``. Default: all of them, but at most a
        quarter of the genes (and no more than the panel leaves room for), so 10,000 targets fit
        in 8,000 genes (2,000 measured).
    compression
        HDF5 filter of ``X``: None (default, fastest to read), ``"lzf"`` or ``"gzip"``.
    gene_sets_path, cell_cycle_path
        If given, also write the planted gene sets (GMT, :func:`planted_gene_sets` with ``seed``)
        and the cell-cycle marker table (:func:`write_cell_cycle_genes`) there, as the demo's
        inputs are written.

    Returns
    -------
    dict
        ``path``, ``n_cells``, ``n_genes``, ``n_targets``, ``n_measured_targets``, ``n_programs``,
        ``nnz``, ``density``, ``umis_per_cell_median``, ``genes_per_cell_median``, ``bytes`` (file
        size), ``seconds``, ``chunk_cells`` (as rounded), ``n_chunks``, ``compression``.

    Notes
    -----
    * The file: ``X`` CSR ``int32`` (``indptr`` int64) written with h5py in anndata's on-disk
      format, so ``anndata.read_h5ad`` reads it and backed mode / ``read_elem_lazy`` read it
      lazily; ``obs``, ``var``, ``varm["simulation_weights"]``, ``obsm["simulation_usage"]``
      (cells x programs) and ``uns["simulation"]`` (its tables are O(n_targets)) as
      :func:`simulate_screen` stores them; ``params`` also holds ``cell_block`` and, when not
      every target is measured, ``n_measured_targets``.
    * Deterministic per ``seed`` and independent of ``chunk_cells``. The design and truth (obs,
      var, programs, usage, effects) equal :func:`simulate_screen`'s for the same arguments when
      every target is measured; the counts come from per-block streams, so they differ from
      :func:`simulate_screen`'s.
    * Memory besides the chunk: O(n_cells x n_programs) for the design and the usage (2M cells:
      ~0.5 GB), O(n_genes x n_programs) for the programs.
    """
    started = time.perf_counter()
    path = pathlib.Path(path)
    chunk_cells = _check_writer_args(path, chunk_cells, compression)
    if n_measured_targets is None:
        n_measured_targets = _default_measured(n_targets, n_genes, n_programs, n_down_genes)
    setup = _check_setup(
        n_cells, n_genes, n_programs, n_targets, n_batches, n_guides_per_target, n_control_guides,
        control_fraction, seed, n_down_genes, guide_efficacy, expression, n_measured_targets,
    )
    rng = np.random.default_rng(setup.seed)
    truth = _draw_truth(rng, setup)
    screen = _ScreenDraws(
        _draw_batch_log(rng, setup.n_batches, truth.genes),
        _draw_remaining(rng, setup.n_targets, setup.n_guides_per_target),
        _draw_batch_library(rng, setup.n_batches),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial-{os.getpid()}.h5ad")
    try:
        _write_skeleton(partial, truth, gene_sets_path, cell_cycle_path)
        written = _append_counts(partial, truth, screen, chunk_cells, compression)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return {
        "path": str(path), "n_cells": setup.n_cells, "n_genes": setup.n_genes, "n_targets": setup.n_targets,
        "n_measured_targets": setup.n_measured_targets, "n_programs": setup.n_programs, **written,
        "density": written["nnz"] / (setup.n_cells * setup.n_genes), "bytes": path.stat().st_size,
        "seconds": time.perf_counter() - started, "compression": compression,
    }


def _default_measured(n_targets, n_genes, n_programs, n_down_genes) -> int:
    """Measured targets by default: all, at most a quarter of the genes and what the gene panel leaves."""
    n_targets = check_int("n_targets", n_targets, 6)
    n_genes = check_int("n_genes", n_genes, 1)
    fixed = _N_MITO + 15 * check_int("n_programs", n_programs, 3) + 20 + 2 * check_int("n_down_genes", n_down_genes, 0)
    return max(0, min(n_targets, n_genes // 4, n_genes - fixed))


def _check_writer_args(path: pathlib.Path, chunk_cells, compression) -> int:
    """``chunk_cells`` rounded up to whole blocks; ``ValueError`` for a bad path, chunk or filter."""
    if path.suffix != ".h5ad":
        raise ValueError(f"path must end in .h5ad, got {str(path)!r}")
    chunk_cells = check_int("chunk_cells", chunk_cells, 1)
    if compression not in _COMPRESSIONS:
        raise ValueError(f"compression must be one of {_COMPRESSIONS}, got {compression!r}")
    return -(-chunk_cells // _CELL_BLOCK) * _CELL_BLOCK


def _write_skeleton(path: pathlib.Path, truth: _Truth, gene_sets_path, cell_cycle_path) -> None:
    """Everything but ``X`` (obs, var, obsm, varm, uns), and the optional gene-set and marker files."""
    adata = _screen_anndata(None, truth)
    adata.uns["simulation"]["params"]["cell_block"] = _CELL_BLOCK
    if truth.setup.n_measured_targets != truth.setup.n_targets:
        adata.uns["simulation"]["params"]["n_measured_targets"] = truth.setup.n_measured_targets
    adata.write_h5ad(path)
    if gene_sets_path is not None:
        write_gmt(gene_sets_path, planted_gene_sets(adata, seed=truth.setup.seed))
    if cell_cycle_path is not None:
        write_cell_cycle_genes(cell_cycle_path, adata)


def _append_counts(
    path: pathlib.Path, truth: _Truth, screen: _ScreenDraws, chunk_cells: int, compression: str | None
) -> dict:
    """Draw the counts block by block and append them to a CSR ``X`` in ``path``, one chunk at a time.

    Returns ``nnz``, the median UMIs and detected genes per cell, ``chunk_cells`` and ``n_chunks``.
    """
    setup = truth.setup
    n_blocks = -(-setup.n_cells // _CELL_BLOCK)
    per_chunk = chunk_cells // _CELL_BLOCK
    umis = np.empty(setup.n_cells, dtype=np.int64)
    detected = np.empty(setup.n_cells, dtype=np.int64)
    with h5py.File(path, "a") as f:
        group = _create_csr_group(f, (setup.n_cells, setup.n_genes), compression)
        for first in range(0, n_blocks, per_chunk):
            pieces = [_block_counts(truth, screen, b) for b in range(first, min(first + per_chunk, n_blocks))]
            rows = slice(first * _CELL_BLOCK, first * _CELL_BLOCK + sum(p.shape[0] for p in pieces))
            umis[rows] = np.concatenate([np.asarray(p.sum(axis=1)).ravel() for p in pieces])
            detected[rows] = np.concatenate([np.diff(p.indptr) for p in pieces])
            _append_rows(group, pieces)
            del pieces
        nnz = int(group["data"].shape[0])
        _narrow_indptr(group, nnz)
    return {"nnz": nnz, "umis_per_cell_median": float(np.median(umis)),
            "genes_per_cell_median": float(np.median(detected)), "chunk_cells": chunk_cells,
            "n_chunks": -(-n_blocks // per_chunk)}


def _block_counts(truth: _Truth, screen: _ScreenDraws, block: int) -> sp.csr_matrix:
    """Counts of cell block ``block`` (1,024 cells; the last may be shorter), CSR int32, from its own stream."""
    setup, design = truth.setup, truth.design
    rows = slice(block * _CELL_BLOCK, min((block + 1) * _CELL_BLOCK, setup.n_cells))
    rng = np.random.default_rng(np.random.SeedSequence(setup.seed, spawn_key=(_BLOCK_STREAM, block)))
    damaged, mito_log = _draw_damage(rng, rows.stop - rows.start)
    library = _draw_library(rng, damaged, screen.batch_lib[design.batch[rows]])
    cells = _CellRows(design.group[rows], design.guide_within[rows], design.batch[rows], mito_log, library)
    return _nb_counts(
        rng, _cell_means(truth.genes, screen, cells, truth.usage[rows], truth.weights, setup.expression),
        truth.genes.dispersion,
    )


def _create_csr_group(f: h5py.File, shape: tuple[int, int], compression: str | None) -> h5py.Group:
    """An empty, resizable CSR group ``X`` in anndata's on-disk format (encoding csr_matrix 0.1.0)."""
    group = f.create_group("X")
    group.attrs["encoding-type"] = "csr_matrix"
    group.attrs["encoding-version"] = "0.1.0"
    group.attrs["shape"] = np.asarray(shape, dtype=np.int64)
    options = {"maxshape": (None,), "chunks": (_H5_CHUNK,), "compression": compression}
    group.create_dataset("data", shape=(0,), dtype=np.int32, **options)
    group.create_dataset("indices", shape=(0,), dtype=np.int32, **options)
    group.create_dataset("indptr", data=np.zeros(1, dtype=np.int64), **options)
    return group


def _narrow_indptr(group: h5py.Group, nnz: int) -> None:
    """Store ``indptr`` as int32 when the non-zeros allow it, as scipy (and anndata) would."""
    if nnz > np.iinfo(np.int32).max:
        return
    indptr = group["indptr"][:].astype(np.int32)
    del group["indptr"]
    group.create_dataset("indptr", data=indptr, chunks=(min(_H5_CHUNK, indptr.size),),
                         compression=group["data"].compression)


def _append_rows(group: h5py.Group, pieces: list[sp.csr_matrix]) -> None:
    """Append the rows of the CSR ``pieces`` (in order) to the on-disk CSR ``group``."""
    data, indices, indptr = group["data"], group["indices"], group["indptr"]
    offset = data.shape[0]
    added = sum(p.nnz for p in pieces)
    data.resize((offset + added,))
    indices.resize((offset + added,))
    pointers = []
    for piece in pieces:
        if piece.nnz:
            data[offset:offset + piece.nnz] = piece.data
            indices[offset:offset + piece.nnz] = piece.indices
        pointers.append(piece.indptr[1:].astype(np.int64) + offset)
        offset += piece.nnz
    pointers = np.concatenate(pointers)
    n_rows = indptr.shape[0]
    indptr.resize((n_rows + pointers.size,))
    indptr[n_rows:] = pointers


def write_screen_subset(source, path, cells, *, chunk_cells: int = 50_000, compression: str | None = "gzip") -> dict:
    """Write some cells of a simulated screen on disk to a new ``.h5ad``, chunk by chunk.

    For spot checks of a large screen on a part of it (e.g. a 300k-cell subset of a 2M-cell screen,
    run in process and compared with the whole screen's run): the counts are read and written
    ``chunk_cells`` source rows at a time, so neither matrix is ever held whole.

    Parameters
    ----------
    source
        An ``.h5ad`` written by :func:`write_simulated_screen` (CSR ``X``).
    path
        The subset's ``.h5ad`` (written as a hidden ``.partial`` file and renamed when complete).
    cells
        The cells to keep: a boolean mask or integer positions over the source's cells (kept in
        the source's order).
    chunk_cells
        Source rows read at a time; memory follows it.
    compression
        HDF5 filter of the subset's ``X``: ``"gzip"`` (default), ``"lzf"`` or None.

    Returns
    -------
    dict
        ``path``, ``source``, ``n_cells``, ``n_genes``, ``n_targets`` (targets with a kept cell),
        ``nnz``, ``bytes``, ``seconds``.

    Notes
    -----
    ``obs``, ``var``, ``obsm`` and ``varm`` are the source's, restricted to the kept cells.
    ``uns["simulation"]`` keeps only the targets with a kept cell (``effects``, ``guide_efficacy``,
    ``null_targets``, ``targets``), so that a run on the subset is judged against the effects it
    can see, and records ``subset_of`` (the source's path and cell count).
    """
    started = time.perf_counter()
    source, path = pathlib.Path(source), pathlib.Path(path)
    chunk_cells = _check_writer_args(path, chunk_cells, compression)
    with h5py.File(source, "r") as f:
        n_source = int(f["X"].attrs["shape"][0])
    keep = _kept_cells(cells, n_source)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial-{os.getpid()}.h5ad")
    try:
        skeleton = _subset_skeleton(source, keep)
        skeleton.write_h5ad(partial)
        nnz = _copy_rows(source, partial, keep, chunk_cells, compression, skeleton.n_vars)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return {"path": str(path), "source": str(source), "n_cells": int(keep.sum()), "n_genes": skeleton.n_vars,
            "n_targets": len(skeleton.uns["simulation"]["targets"]), "nnz": nnz, "bytes": path.stat().st_size,
            "seconds": time.perf_counter() - started}


def _kept_cells(cells, n_source: int) -> np.ndarray:
    """``cells`` (mask or positions) as a boolean mask over ``n_source`` cells; clear errors otherwise."""
    cells = np.asarray(cells)
    if cells.dtype == bool:
        if cells.shape != (n_source,):
            raise ValueError(f"cells: a boolean mask must have one entry per source cell ({n_source:,}), "
                             f"got shape {cells.shape}")
        keep = cells
    else:
        if cells.ndim != 1 or not np.issubdtype(cells.dtype, np.integer):
            raise ValueError("cells: pass a boolean mask or integer positions of the cells to keep")
        if cells.size and (cells.min() < 0 or cells.max() >= n_source):
            raise ValueError(f"cells: positions must lie in [0, {n_source:,})")
        keep = np.zeros(n_source, dtype=bool)
        keep[cells] = True
    if not keep.any():
        raise ValueError("cells: no cell is kept")
    return keep


def _subset_skeleton(source: pathlib.Path, keep: np.ndarray) -> anndata.AnnData:
    """The source's obs, var, obsm, varm and uns for the kept cells, without ``X``."""
    backed = anndata.read_h5ad(source, backed="r")
    try:
        adata = anndata.AnnData(obs=backed.obs[keep].copy(), var=backed.var.copy(),
                                obsm={k: np.asarray(v)[keep] for k, v in backed.obsm.items()},
                                varm={k: np.asarray(v) for k, v in backed.varm.items()}, uns=dict(backed.uns))
    finally:
        backed.file.close()
    for column in adata.obs.select_dtypes("category"):
        adata.obs[column] = adata.obs[column].cat.remove_unused_categories()
    truth = adata.uns["simulation"] = dict(adata.uns["simulation"])
    seen = set(adata.obs["perturbation"].astype(str))
    truth["effects"] = truth["effects"][truth["effects"]["perturbation"].isin(seen)].reset_index(drop=True)
    if "guide_efficacy" in truth:
        truth["guide_efficacy"] = truth["guide_efficacy"][truth["guide_efficacy"]["perturbation"].isin(seen)]
    truth["null_targets"] = [t for t in truth["null_targets"] if t in seen]
    truth["targets"] = [t for t in truth["targets"] if t in seen]
    truth["subset_of"] = {"path": str(source), "n_cells": int(keep.size)}
    return adata


def _copy_rows(source: pathlib.Path, path: pathlib.Path, keep: np.ndarray, chunk_cells: int,
               compression: str | None, n_genes: int) -> int:
    """Append the kept rows of the source's CSR ``X`` to ``path``'s, ``chunk_cells`` source rows at a time."""
    with h5py.File(source, "r") as src, h5py.File(path, "a") as dst:
        data, indices, indptr = src["X"]["data"], src["X"]["indices"], src["X"]["indptr"][:]
        group = _create_csr_group(dst, (int(keep.sum()), n_genes), compression)
        for start in range(0, keep.size, chunk_cells):
            stop = min(start + chunk_cells, keep.size)
            rows = keep[start:stop]
            if not rows.any():
                continue
            lo, hi = int(indptr[start]), int(indptr[stop])
            chunk = sp.csr_matrix((data[lo:hi], indices[lo:hi], indptr[start:stop + 1] - lo),
                                  shape=(stop - start, n_genes))
            _append_rows(group, [chunk[rows]])
        nnz = int(group["data"].shape[0])
        _narrow_indptr(group, nnz)
    return nnz


# --------------------------------------------------------------------------------------
# gene sets and marker files
# --------------------------------------------------------------------------------------
def _truth(adata: anndata.AnnData) -> tuple[list[str], np.ndarray]:
    if "simulation" not in adata.uns or "simulation_weights" not in adata.varm:
        raise ValueError(
            "adata does not look like a simulate_screen() result: "
            "uns['simulation'] or varm['simulation_weights'] is missing"
        )
    names = [str(n) for n in adata.uns["simulation"]["program_names"]]
    weights = np.asarray(adata.varm["simulation_weights"], dtype=float)
    if weights.shape != (adata.n_vars, len(names)):
        raise ValueError(
            f"adata.varm['simulation_weights'] has shape {weights.shape}, expected "
            f"({adata.n_vars}, {len(names)})"
        )
    return names, weights


def _program_members(adata: anndata.AnnData) -> dict[str, list[str]]:
    """Planted program -> member genes, sorted by decreasing weight."""
    names, weights = _truth(adata)
    genes = np.asarray(adata.var_names)
    out = {}
    for p, name in enumerate(names):
        idx = np.flatnonzero(weights[:, p] > 0)
        idx = idx[np.argsort(-weights[idx, p], kind="stable")]
        out[name] = genes[idx].tolist()
    return out


def planted_gene_sets(adata: anndata.AnnData, n_decoys: int = 40, seed: int = 0) -> dict[str, list[str]]:
    """Gene sets for an enrichment demo: the planted programs plus random decoys.

    Parameters
    ----------
    adata
        Output of :func:`simulate_screen` (uses ``varm["simulation_weights"]`` and
        ``uns["simulation"]["program_names"]``).
    n_decoys
        Number of decoy sets ``DECOY_001`` ... of random non-mitochondrial genes whose sizes
        are drawn from the range of the planted program sizes.
    seed
        Seed for the decoys.

    Returns
    -------
    dict[str, list[str]]
        ``PLANTED_<PROGRAM>`` -> member genes of that program (sorted by decreasing planted
        weight), then ``DECOY_<i>`` -> random genes. Deterministic for a given ``seed``.
    """
    n_decoys = check_int("n_decoys", n_decoys, 0)
    seed = check_int("seed", seed, 0)
    members = _program_members(adata)
    sets = {f"PLANTED_{name}": genes for name, genes in members.items()}
    sizes = [len(g) for g in members.values()]
    lo, hi = min(sizes), max(sizes)
    pool = np.asarray([g for g in adata.var_names if not g.startswith("MT-")])
    rng = np.random.default_rng(seed)
    width = max(3, len(str(n_decoys)))
    for i in range(n_decoys):
        size = min(int(rng.integers(lo, hi + 1)), pool.size)
        sets[f"DECOY_{i + 1:0{width}d}"] = rng.choice(pool, size=size, replace=False).tolist()
    return sets


def write_gmt(path, gene_sets: Mapping[str, Sequence[str]], description: str = "") -> pathlib.Path:
    """Write gene sets in the GMT format.

    One line per set: ``name <TAB> description <TAB> gene1 <TAB> gene2 ...``. An empty
    ``description`` is written as ``na`` so that the file also survives parsers that split on
    any whitespace.

    Parameters
    ----------
    path
        Output file; its parent directory must exist.
    gene_sets
        Set name -> genes (non-empty; names and genes must not contain tabs or newlines).
    description
        Text of the second column, the same for every set.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = pathlib.Path(path)
    if not isinstance(gene_sets, Mapping) or not gene_sets:
        raise ValueError("gene_sets must be a non-empty mapping of set name -> genes")
    description = str(description) if description else "na"
    if any(c in description for c in "\t\r\n"):
        raise ValueError("description must not contain tabs or newlines")
    lines = []
    for name, genes in gene_sets.items():
        name = str(name)
        if isinstance(genes, str):
            raise ValueError(f"gene_sets[{name!r}] must be a list of genes, not a string")
        genes = [str(g) for g in genes]
        if not name or any(c in name for c in "\t\r\n"):
            raise ValueError(f"gene_sets: invalid set name {name!r}")
        if not genes:
            raise ValueError(f"gene_sets[{name!r}] is empty")
        if any(not g or any(c in g for c in "\t\r\n") for g in genes):
            raise ValueError(f"gene_sets[{name!r}] contains an empty gene or one with tabs/newlines")
        lines.append("\t".join([name, description, *genes]))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_cell_cycle_genes(path, adata: anndata.AnnData) -> pathlib.Path:
    """Write a cell-cycle marker table for a simulated screen.

    Tab-separated, header ``gene<TAB>phase``; the ``S_PHASE`` program genes with phase
    ``S`` and the ``G2M_CHECKPOINT`` genes with phase ``G2M`` (a gene in both programs is
    listed once, under the program where its weight is larger), then three real markers per
    phase that are absent from ``adata`` so that the pipeline can report missing markers.

    Parameters
    ----------
    path
        Output file; its parent directory must exist.
    adata
        Output of :func:`simulate_screen` with ``S_PHASE`` and ``G2M_CHECKPOINT`` programs.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = pathlib.Path(path)
    names, weights = _truth(adata)
    for required in _CELL_CYCLE_PROGRAMS:
        if required not in names:
            raise ValueError(f"adata has no planted {required} program")
    s = weights[:, names.index(S_PROGRAM)]
    g2m = weights[:, names.index(G2M_PROGRAM)]
    genes = np.asarray(adata.var_names)
    s_idx = np.flatnonzero((s > 0) & (s >= g2m))
    g2m_idx = np.flatnonzero((g2m > 0) & (g2m > s))
    s_idx = s_idx[np.argsort(-s[s_idx], kind="stable")]
    g2m_idx = g2m_idx[np.argsort(-g2m[g2m_idx], kind="stable")]
    present = set(adata.var_names)
    rows = [(g, "S") for g in genes[s_idx]] + [(g, "G2M") for g in genes[g2m_idx]]
    for phase_name in ("S", "G2M"):
        absent = [m for m in _ABSENT_MARKERS[phase_name] if m not in present][:3]
        rows += [(m, phase_name) for m in absent]
    table = pd.DataFrame(rows, columns=["gene", "phase"])
    table.to_csv(path, sep="\t", index=False)
    return path
