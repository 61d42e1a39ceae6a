"""Which factorisation gives programs a biologist can trust? Planted truth, candidates and cNMF.

Simulated Perturb-seq screens (``perturbnmf.datasets.simulate_screen`` with
``expression="mixture"``: programs are count-space expression profiles that raise some genes
and lower 40 others; 30 % of the targets do nothing; guides of efficacy 0.5-1; two batches)
are analysed by each candidate the way the pipeline does it with its defaults:

    QC (defaults) -> normalize_total + log1p -> HVG (default cutoffs)
    -> consensus factorisation over K_VALUES, k chosen by the candidate's own rule
    -> usage of every program tested per perturbation against the controls
       (van Elteren / Mann-Whitney, the pipeline's default) with one BH over all pairs

and scored against the truth:

* **programs found**: planted programs whose matched recovered program has a gene-score cosine
  >= 0.8 with the oracle's (gene scores = regression of the log-normalised expression on the
  usage, ``perturbnmf.tl.regression_scores``; the oracle regresses on the planted usage,
  so every method is scored on the same scale, loadings of any sign);
* **sensitivity**: planted (target, program) effects found on the matched program, right sign;
* **strict FDP**: discoveries that are not a planted pair (wrong program, null target, sign);
* **null share**: discoveries on targets that do nothing, as a share of all discoveries;
* **k**: the k the method chose (cNMF has no rule: it is told the planted k).

Candidates: the seed's semi-NMF consensus with the seed's k rule (``seminmf-seed``: smallest k
within 1 % of the lowest held-out error), semi-NMF with cNMF's local-density filter of restart
programs and the new k rule (``seminmf+density``), semi-NMF with an L1 penalty on usage on
gene-centred data, its strength chosen by the held-out error (``sparse-seminmf``), NMF with the
same consensus machinery and a baseline per batch (``nmf``, the pipeline's default, density filter
on), without the filter (``nmf-nofilter``) and without the batch baselines (``nmf-nobaseline``), and cNMF 1.7 (``benchmarks/peers``, its own venv; skipped when
absent) at the planted k with its default 100 restarts.

Run (about 1 h 30 min on 2 cores; results are cached per screen and candidate in
``benchmarks/results/programs/`` so an interrupted run resumes)::

    .venv/bin/python benchmarks/bench_programs.py            # all sizes and seeds
    .venv/bin/python benchmarks/bench_programs.py --quick    # one small screen
    bash benchmarks/peers/setup.sh                           # once, to include cNMF
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import perturbnmf as pnmf
from perturbnmf import datasets, evaluation, tl
from perturbnmf.decomposition import refit_usage
from perturbnmf.tl._factorize import _used_matrix
from perturbnmf.decomposition._consensus import _holdout_excess, _holdout_residuals, consensus_sweep

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "programs"
CNMF_PYTHON = ROOT / "benchmarks" / "peers" / ".venv" / "bin" / "python"
CNMF_RUNNER = ROOT / "benchmarks" / "peers" / "run_cnmf.py"

PLANTED_K = 10
#: The default sweep's values and step (5), cut at 25 to fit the benchmark in time.
K_VALUES = [5, 10, 15, 20, 25]
SIZES = {"10k": dict(n_cells=10_000, n_targets=100), "20k": dict(n_cells=20_000, n_targets=200)}
SEEDS = [1, 2, 3]
FDR = 0.05
FOUND_COSINE = 0.8
CANDIDATES = ["nmf", "cnmf", "seminmf-seed", "seminmf+density", "sparse-seminmf", "nmf-nofilter", "nmf-nobaseline"]
#: L1 strengths tried by sparse-seminmf (sklearn's alpha_W scale: times n_genes per unit of usage).
SPARSE_ALPHAS = [0.0, 3e-4, 1e-3, 3e-3]
#: The seed's k rule: the smallest k whose held-out error is within 1 % of the lowest.
SEED_TOLERANCE = 0.01


def screen(size: str, seed: int):
    """Simulate and preprocess one screen as the pipeline's step 1 does with its defaults."""
    adata = datasets.simulate_screen(n_genes=2000, n_programs=PLANTED_K, seed=seed, **datasets.DEMO_DESIGN,
                                     **SIZES[size])
    counts = adata.copy()
    adata = pnmf.pp.filter_cells_and_genes(adata, mito_prefix="MT-", min_counts_per_cell=0, min_genes_per_cell=0,
                                          max_pct_mito=100.0, min_cells_per_gene=3)
    pnmf.pp.normalize(adata)
    pnmf.pp.select_genes(adata)
    return counts, adata


def score(adata, X, usage: np.ndarray, k: int) -> dict:
    """Programs found, effects found and false discoveries for one method's usage."""
    names = list(adata.uns["simulation"]["program_names"])
    oracle = tl.regression_scores(X, adata.obsm["simulation_usage"])
    scores = tl.regression_scores(X, usage)
    columns = tl.program_names(k)
    match = evaluation.match_programs(oracle.T, scores.T, names, columns)
    usage_df = pd.DataFrame(usage, index=adata.obs_names, columns=columns)
    contrasts = tl.program_contrasts(usage_df, adata.obs["perturbation"].astype(str), datasets.CONTROL_LABEL,
                                        batch=adata.obs["batch"].astype(str), method="mannwhitney")
    recovery = evaluation.effect_recovery(contrasts, adata.uns["simulation"]["effects"], match, fdr=FDR)
    n_disc = recovery["n_discoveries"]
    return {"k": k, "programs_found": int((match["cosine"] >= FOUND_COSINE).sum()),
            "mean_cosine": float(match["cosine"].mean()), "sensitivity": recovery["sensitivity"],
            "strict_fdp": recovery["false_discovery_proportion"], "discoveries": n_disc,
            "null_share": recovery["n_null_target_discoveries"] / n_disc if n_disc else 0.0}


def run_consensus(X, model: str, density_threshold, seed_rule: bool = False, baseline=None):
    """The pipeline's factorisation: sweep, the k rule, consensus usage on all cells."""
    sweep = consensus_sweep(X, K_VALUES, model=model, density_threshold=density_threshold, covariates=baseline,
                            random_state=0)
    k = seed_k(sweep.table) if seed_rule else sweep.suggested_k
    return refit_usage(X, sweep.components[k], baseline, sweep.covariate_components[k]), k, sweep.table


def seed_k(table: pd.DataFrame) -> int:
    """The k the seed's rule picked: smallest k with held-out error within 1 % of the lowest."""
    error = table["holdout_relative_error"]
    return int(table.loc[error <= error.min() * (1 + SEED_TOLERANCE), "k"].min())


def run_sparse_seminmf(X):
    """Semi-NMF with an L1 penalty on usage, genes centred (the shared expression needs no usage).

    k comes from the unpenalised semi-NMF sweep; the strength is the largest of SPARSE_ALPHAS
    whose held-out error (bi-cross-validation on 10 % of the cells) is within one standard error
    of the best: the rule that picks k, applied to the penalty.
    """
    Xc = X.toarray() if hasattr(X, "toarray") else np.asarray(X, dtype=float)
    Xc = Xc - Xc.mean(axis=0)
    k = consensus_sweep(Xc, K_VALUES, model="seminmf", density_threshold=None, random_state=0).suggested_k
    rng = np.random.default_rng(0)
    held = rng.random(Xc.shape[0]) < 0.1
    halves = np.array_split(rng.permutation(Xc.shape[1]), 2)
    programs, residuals = {}, {}
    for alpha in SPARSE_ALPHAS:
        sweep = consensus_sweep(Xc[~held], [k], model="seminmf", alpha_W=alpha, l1_ratio=1.0, density_threshold=None,
                                holdout_fraction=0.0, random_state=0)
        programs[alpha] = sweep.components[k]
        residuals[alpha] = _holdout_residuals(Xc[held], programs[alpha], halves)
    excess = _holdout_excess(residuals).rename(columns={"k": "alpha"})
    chosen = float(excess.loc[excess["holdout_excess"] <= excess["holdout_excess_se"], "alpha"].max())
    return refit_usage(Xc, programs[chosen]), k, chosen


def run_cnmf(counts, workdir: Path, n_restarts: int):
    """cNMF at the planted k with its defaults but ``n_restarts``, in its own venv; its consensus usage."""
    path = workdir / "counts.h5ad"
    counts.write_h5ad(path)
    out = workdir / "cnmf"
    subprocess.run([str(CNMF_PYTHON), str(CNMF_RUNNER), "--counts", str(path), "--k", str(PLANTED_K),
                    "--n-iter", str(n_restarts), "--out", str(out), "--n-workers", "2"], check=True,
                   capture_output=True)
    usage = pd.read_csv(out / "usage.csv", index_col=0)
    return usage


def evaluate(size: str, seed: int, candidate: str, cnmf_restarts: int = 100) -> dict:
    cache = RESULTS / f"{size}_seed{seed}_{candidate}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    counts, adata = screen(size, seed)
    X = _used_matrix(adata, None, "highly_variable")
    start = time.perf_counter()
    extra = {}
    if candidate == "cnmf":
        with tempfile.TemporaryDirectory() as tmp:
            usage = run_cnmf(counts, Path(tmp), cnmf_restarts).reindex(adata.obs_names).to_numpy()
        k = PLANTED_K
        extra["cnmf_restarts"] = cnmf_restarts
    elif candidate == "sparse-seminmf":
        usage, k, alpha = run_sparse_seminmf(X)
        extra["alpha_W"] = alpha
    else:
        model = candidate.split("+")[0].split("-")[0]
        density = None if candidate in ("seminmf-seed", "nmf-nofilter") else 0.5
        # the pipeline's NMF: a baseline per batch as known usage (factorize.baseline_design)
        baseline = tl.baseline_design(adata, "batch")[1] if candidate in ("nmf", "nmf-nofilter") else None
        usage, k, table = run_consensus(X, model, density, seed_rule=candidate == "seminmf-seed", baseline=baseline)
        extra["sweep"] = table.drop(columns=["seconds"]).round(5).to_dict(orient="list")
    seconds = time.perf_counter() - start
    result = {"size": size, "seed": seed, "candidate": candidate, "seconds": seconds,
              **score(adata, X, usage, k), **extra}
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one 10k screen (seed 1)")
    parser.add_argument("--candidates", nargs="+", default=CANDIDATES, choices=CANDIDATES)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    parser.add_argument("--cached", action="store_true", help="print the table of the cached results only")
    parser.add_argument("--cnmf-restarts", type=int, default=100,
                        help="cNMF restarts (its default 100 takes ~1 h per 10k screen on 2 busy cores)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    sizes, seeds = (["10k"], [1]) if args.quick else (args.sizes, args.seeds)
    candidates = [c for c in args.candidates if c != "cnmf" or CNMF_PYTHON.exists()]
    if "cnmf" in args.candidates and "cnmf" not in candidates:
        print("cNMF skipped: run `bash benchmarks/peers/setup.sh` first.")
    rows = []
    for candidate in candidates:
        for size in sizes:
            for seed in seeds:
                cache = RESULTS / f"{size}_seed{seed}_{candidate}.json"
                if args.cached and not cache.exists():
                    continue
                row = evaluate(size, seed, candidate, args.cnmf_restarts)
                print(f"{size} seed {seed} {candidate:>16}: k {row['k']:2d}, found {row['programs_found']:2d}/"
                      f"{PLANTED_K}, sensitivity {row['sensitivity']:.2f}, strict FDP {row['strict_fdp']:.2f}, "
                      f"null share {row['null_share']:.3f}, {row['seconds']:.0f} s", flush=True)
                rows.append(row)
    table = pd.DataFrame(rows)
    summary = table.groupby(["candidate", "size"], sort=False).agg(
        seeds=("seed", lambda v: ",".join(str(x) for x in v)),
        k=("k", lambda v: "/".join(str(x) for x in v)), found=("programs_found", "median"),
        sensitivity=("sensitivity", "median"), strict_fdp=("strict_fdp", "median"),
        null_share=("null_share", "max"), seconds=("seconds", "median"))
    print(f"\nMedians over the seeds listed (k: each seed's; null share: the largest); planted k = {PLANTED_K}, "
          f"sweep {K_VALUES}")
    print(summary.to_string(float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
