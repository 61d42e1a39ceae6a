#!/usr/bin/env python
"""Benchmark of perturbnmf.SemiNMF: the default solver against the original analysis' rule.

Usage::

    python benchmarks/bench_seminmf.py [--part 1|2|3|all] [--quick] [--repeats N]

Part 1 - the default fit, end to end (synthetic 100,000 cells x 2,000 genes, ~20 % non-zero, k = 30):
    the original rule (Ding-Li-Jordan multiplicative updates, random start, a fixed 100
    iterations on a dense float64 copy) against ``SemiNMF(k).fit(X)`` and ``NMF(k).fit(X)`` with all
    their defaults (HALS, init "auto", float32 CSR, the default stopping rule), each also under the
    stopping rule before issue 11 for comparison.
Part 2 - the full k sweep (k = 5, 10, ..., 45) on the Papalexi 2021 THP-1 screen: one original
    fit per k against ``perturbnmf.decomposition.consensus_sweep`` (5 restarts per k + consensus).
Part 3 - scale (synthetic 1,000,000 cells x 2,000 genes, k = 30): fit time and peak memory of
    the default solver, each size in its own subprocess so its memory is measured alone.

``--quick`` shrinks the synthetic sizes (part 1: 10,000 cells; part 3: 20,000 and 200,000
cells) for development. All synthetic data are generated here with fixed seeds.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy
import scipy.sparse as sp

N_GENES = 2_000
DENSITY = 0.2
TRUE_RANK = 20
K_SYNTH = 30
DATA_SEED = 12345
GEN_CHUNK_ROWS = 10_000
LONG_RUN_S = 10.0  # a measurement longer than this is run once

PAPALEXI_H5AD = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "papalexi2021_thp1_lowmoi"
                 / "papalexi2021_thp1_lowmoi.h5ad")
PART2_K = list(range(5, 50, 5))

SIZES = {
    False: {"part1": 100_000, "part3": (100_000, 1_000_000)},
    True: {"part1": 10_000, "part3": (20_000, 200_000)},
}


# --------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------
def fmt_s(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "n/a"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def fmt_gb(nbytes: float | None) -> str:
    if nbytes is None:
        return "n/a"
    return f"{nbytes / 1e9:.2f} GB"


def fmt_obj(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6e}"


def print_table(headers: list[str], rows: list[list[object]], indent: str = "  ") -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        # first column left-aligned (labels), the others right-aligned (numbers)
        line = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        print(indent + line.rstrip())
        if n == 0:
            print(indent + "  ".join("-" * w for w in widths))


def banner(title: str) -> None:
    print()
    print("=" * 78)
    print(title)
    print("=" * 78, flush=True)


def cpu_busy_fraction(interval: float = 1.0) -> float | None:
    """Share of all cores' time that was busy over ``interval`` seconds (from /proc/stat), or None."""
    def read():
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals[:8]), idle
    try:
        total0, idle0 = read()
        time.sleep(interval)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return None if total <= 0 else 1.0 - (idle1 - idle0) / total


def report_machine_load(label: str) -> None:
    """Print how busy the machine is right now; timings taken under other load are not comparable."""
    busy = cpu_busy_fraction()
    if busy is None:
        return
    warn = ""
    if busy > 0.15:
        warn = ("  WARNING: other processes are using the CPUs; OpenBLAS/OpenMP threads slow down badly "
                "when cores are shared, so the timings below are not representative")
    print(f"  CPU busy before {label}: {busy:.0%} of all cores (1 s sample){warn}", flush=True)


def timed(fn):
    """Run ``fn()``; return (seconds, result)."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def timed_repeats(fn, repeats: int, *, always_repeat: bool = False):
    """Median wall time of ``fn()`` over ``repeats`` runs.

    Unless ``always_repeat``, a first run longer than ``LONG_RUN_S`` is not repeated.
    Returns (median seconds, list of seconds, result of the last run).
    """
    times, out = [], None
    for i in range(max(1, repeats)):
        dt, out = timed(fn)
        times.append(dt)
        if i == 0 and dt > LONG_RUN_S and not always_repeat:
            break
    return statistics.median(times), times, out


def n_runs(times: list[float]) -> str:
    return f"median of {len(times)}" if len(times) > 1 else "1 run"


# --------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------
def make_synthetic_csr(n_cells: int, n_genes: int = N_GENES, *, density: float = DENSITY, rank: int = TRUE_RANK,
                       seed: int = DATA_SEED, chunk_rows: int = GEN_CHUNK_ROWS) -> sp.csr_matrix:
    """Sparse "log-normalised-like" float32 CSR matrix with low-rank structure.

    ``W_true`` (cells x rank) ~ Gamma(0.5), ``H_true`` (rank x genes) ~ Gamma(0.3). Each cell
    detects exactly ``round(density * n_genes)`` genes, drawn by weighted sampling without
    replacement with weights proportional to the gene mean (exponential clocks: the genes with
    the smallest ``Exp(1) / weight`` keys win); a detected value is
    ``log1p(3 * (W_true H_true)_ij * LogNormal(0, 0.3))``.

    Rows are generated in chunks written straight into preallocated ``data`` (float32),
    ``indices`` (int32) and ``indptr`` (int64) arrays, so peak memory stays near the final CSR
    size plus a few chunk-sized temporaries. scipy may store ``indptr`` as int32 when the
    number of non-zeros fits.
    """
    rng = np.random.default_rng(seed)
    nnz_row = int(round(density * n_genes))
    H_true = rng.gamma(0.3, 1.0, size=(rank, n_genes)).astype(np.float32)
    gene_mean = 0.5 * H_true.sum(axis=0, dtype=np.float64)  # E[W_true] = 0.5
    inv_weight = (1.0 / gene_mean).astype(np.float32)
    nnz = n_cells * nnz_row
    data = np.empty(nnz, dtype=np.float32)
    indices = np.empty(nnz, dtype=np.int32)
    indptr = np.arange(n_cells + 1, dtype=np.int64) * nnz_row
    for start in range(0, n_cells, chunk_rows):
        stop = min(start + chunk_rows, n_cells)
        m = stop - start
        W_chunk = rng.gamma(0.5, 1.0, size=(m, rank)).astype(np.float32)
        keys = rng.standard_exponential((m, n_genes), dtype=np.float32)
        keys *= inv_weight
        cols = np.argpartition(keys, nnz_row - 1, axis=1)[:, :nnz_row]
        del keys
        cols.sort(axis=1)
        mean = W_chunk @ H_true
        vals = np.take_along_axis(mean, cols, axis=1)
        del mean
        noise = rng.standard_normal((m, nnz_row), dtype=np.float32)
        noise *= 0.3
        np.exp(noise, out=noise)
        vals *= noise
        vals *= 3.0
        np.log1p(vals, out=vals)
        lo, hi = start * nnz_row, stop * nnz_row
        data[lo:hi] = vals.ravel()
        indices[lo:hi] = cols.ravel()
        del vals, noise, cols, W_chunk
    X = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes), copy=False)
    X.has_sorted_indices = True
    X.has_canonical_format = True
    return X


def csr_nbytes(X: sp.csr_matrix) -> int:
    return int(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------
def warm_up() -> None:
    """Compile / load the compiled kernels and touch both solvers on a tiny problem."""
    from perturbnmf import SemiNMF

    X = make_synthetic_csr(500, 200, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SemiNMF(5, random_state=0, max_iter=5, tol=1e-12).fit(X)
        SemiNMF(5, init="random", random_state=0, max_iter=5, tol=1e-12).fit(X)
        SemiNMF(5, solver="mu", init="random", dtype="float64", max_iter=5, tol=1e-12,
                random_state=0).fit(X.toarray().astype(np.float64))


def print_environment() -> None:
    import numba
    import threadpoolctl

    banner("Environment")
    cpu_model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "n/a"
    print(f"  CPU: {cpu_model}")
    print(f"  os.cpu_count() = {os.cpu_count()}, len(os.sched_getaffinity(0)) = {affinity}")
    try:
        mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
        print(f"  RAM: {mem_kb * 1024 / 2**30:.1f} GiB ({mem_kb * 1024 / 1e9:.1f} GB)")
    except (OSError, StopIteration):
        pass
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()
        print(f"  load average at start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min; "
              f"other work on the machine inflates every timing below)")
    print(f"  Python {platform.python_version()} ({platform.python_implementation()}), {platform.platform()}")
    print(f"  numpy {np.__version__}, scipy {scipy.__version__}, numba {numba.__version__}")
    try:
        import perturbnmf
        print(f"  perturbnmf {perturbnmf.__version__}")
    except Exception:  # pragma: no cover - diagnostic only
        pass
    warm_up()
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = "not yet initialised"
    print(f"  numba: NUMBA_NUM_THREADS = {numba.config.NUMBA_NUM_THREADS}, get_num_threads() = "
          f"{numba.get_num_threads()}, threading layer = {layer}")
    info = threadpoolctl.threadpool_info()
    if not info:
        print("  BLAS: threadpoolctl found no thread pool")
    for pool in info:
        print(f"  {pool.get('user_api')}: internal_api = {pool.get('internal_api')}, version = "
              f"{pool.get('version')}, num_threads = {pool.get('num_threads')}, "
              f"architecture = {pool.get('architecture', 'n/a')}, file = {Path(pool.get('filepath', '')).name}")
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    print(f"  OPENBLAS_CORETYPE = {coretype!r}" + (" (set: OpenBLAS kernel choice forced)" if coretype else " (not set)"))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        if var in os.environ:
            print(f"  {var} = {os.environ[var]}")
    print("  (JIT kernels warmed up on a tiny problem before any timing)", flush=True)


# --------------------------------------------------------------------------
# Part 1
# --------------------------------------------------------------------------
def first_reaching(objective: np.ndarray, target: float) -> int | None:
    """First iteration (1-based) whose objective is <= target, or None."""
    hits = np.flatnonzero(objective <= target)
    return int(hits[0]) + 1 if hits.size else None


def fit_quietly(estimator, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimator.fit(X)


def previous_rule():
    """The stopping rule before issue 11 (HALS judged over 10 iterations), for a side-by-side row."""
    from perturbnmf.decomposition import _seminmf

    class Rule:
        def __enter__(self):
            self.saved = dict(_seminmf._CONVERGENCE_WINDOW)
            _seminmf._CONVERGENCE_WINDOW["hals"] = 10

        def __exit__(self, *exc):
            _seminmf._CONVERGENCE_WINDOW.update(self.saved)

    return Rule()


def part1(quick: bool, repeats: int) -> dict:
    """The default fit, end to end, against the original rule; and the pipeline's default model (NMF)."""
    from perturbnmf import NMF, SemiNMF

    n_cells, k = SIZES[quick]["part1"], K_SYNTH
    banner(f"Part 1 - the default fit, end to end: {n_cells:,} cells x {N_GENES:,} genes, k = {k}")
    report_machine_load("part 1")
    gen_s, X = timed(lambda: make_synthetic_csr(n_cells))
    print(f"  data: {X.shape[0]:,} x {X.shape[1]:,} float32 CSR, nnz = {X.nnz:,} "
          f"({X.nnz / (X.shape[0] * X.shape[1]):.1%}), CSR size {fmt_gb(csr_nbytes(X))}, generated in {fmt_s(gen_s)}")
    dens_s, Xd = timed(lambda: X.toarray().astype(np.float64))
    print(f"  densified to float64 ({fmt_gb(Xd.nbytes)}) in {fmt_s(dens_s)} (not counted in the fit time)", flush=True)
    mu_s, mu_times, mu = timed_repeats(lambda: fit_quietly(
        SemiNMF(k, solver="mu", init="random", dtype="float64", max_iter=100, tol=1e-12, random_state=0), Xd), repeats)
    del Xd
    gc.collect()
    f_mu = float(mu.objective_[-1])
    print(f"  original rule: {fmt_s(mu_s)} ({n_runs(mu_times)}), 100 iterations, objective {fmt_obj(f_mu)}", flush=True)
    rows = {"original": {"seconds": mu_s, "times": mu_times, "n_iter": mu.n_iter_, "objective": f_mu}}
    for name, make in (("seminmf", lambda: SemiNMF(k, random_state=0)), ("nmf", lambda: NMF(k, random_state=0))):
        med, times, model = timed_repeats(lambda: fit_quietly(make(), X), repeats, always_repeat=True)
        with previous_rule():
            old_s, old_times, old = timed_repeats(lambda: fit_quietly(make(), X), 1)
        rows[name] = {"seconds": med, "times": times, "n_iter": model.n_iter_, "objective": float(model.objective_[-1]),
                      "converged": bool(model.converged_), "first_reaching": first_reaching(model.objective_, f_mu),
                      "previous_rule": {"seconds": old_s, "n_iter": old.n_iter_,
                                        "objective": float(old.objective_[-1])}}
        print(f"  {name} default: {fmt_s(med)} ({n_runs(times)}), {model.n_iter_} iterations, objective "
              f"{fmt_obj(rows[name]['objective'])}; previous rule: {fmt_s(old_s)}, {old.n_iter_} iterations, "
              f"objective {fmt_obj(rows[name]['previous_rule']['objective'])}", flush=True)
    report_part1(rows, f_mu)
    ratio = mu_s / rows["seminmf"]["seconds"]
    return {"n_cells": n_cells, "mu_s": mu_s, "f_mu": f_mu, "rows": rows, "ratio": ratio,
            "no_worse": bool(rows["seminmf"]["objective"] <= f_mu), "dens_s": dens_s}


def report_part1(rows: dict, f_mu: float) -> None:
    print()
    o = rows["original"]
    table = [["original rule (mu, random start, 100 iterations, dense float64)", fmt_s(o["seconds"]),
              n_runs(o["times"]), o["n_iter"], fmt_obj(o["objective"]), "-", "1.0x"]]
    for name, label in (("seminmf", "SemiNMF(k).fit(X): defaults (hals, init auto, CSR float32)"),
                        ("nmf", "NMF(k).fit(X): defaults, the pipeline's model")):
        r = rows[name]
        same_model = name == "seminmf"
        table.append([label, fmt_s(r["seconds"]), n_runs(r["times"]), r["n_iter"], fmt_obj(r["objective"]),
                      ("yes" if r["objective"] <= f_mu else "NO") if same_model else "other model",
                      f"{o['seconds'] / r['seconds']:.1f}x"])
        p = r["previous_rule"]
        table.append([f"  same, stopping rule before issue 11 (hals over 10 iterations)", fmt_s(p["seconds"]), "1 run",
                      p["n_iter"], fmt_obj(p["objective"]), "-", f"{o['seconds'] / p['seconds']:.1f}x"])
    print_table(["fit", "wall time", "timing", "iter.", "final objective", "no worse", "vs original"], table)
    print("  Times are end to end: validation, start (init auto: a fit on a tenth of the cells from 50,000 cells),")
    print("  iterations until the stopping rule, reconstruction error. The densification is excluded.")
    s = rows["seminmf"]
    ratio = o["seconds"] / s["seconds"]
    print(f"  default semi-NMF vs original rule: {ratio:.1f}x faster (target >= 10x: {'met' if ratio >= 10 else 'NOT met'}),"
          f" objective no worse: {'yes' if s['objective'] <= f_mu else 'NO'} ({fmt_obj(s['objective'])} vs "
          f"{fmt_obj(f_mu)}); it first reached the original's objective at iteration {s['first_reaching']}.")
    n = rows["nmf"]
    print(f"  default NMF: {n['previous_rule']['seconds'] / n['seconds']:.1f}x faster than under the previous rule, "
          f"objective {(n['objective'] / n['previous_rule']['objective'] - 1):+.2e} relative to it.")


# --------------------------------------------------------------------------
# Part 2
# --------------------------------------------------------------------------
def load_papalexi():
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(PAPALEXI_H5AD)
    keep = adata.obs["single_guide"].astype(bool).to_numpy()
    adata = adata[keep].copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    X.sort_indices()
    return X


def part2(quick: bool, repeats: int) -> dict:
    from perturbnmf import SemiNMF

    banner(f"Part 2 - full k sweep on the Papalexi 2021 THP-1 screen, k = {PART2_K[0]}..{PART2_K[-1]}")
    if not PAPALEXI_H5AD.exists():
        print(f"  part 2: skipped, data file not found: {PAPALEXI_H5AD}")
        return {"skipped": "data file not found"}
    try:
        available = importlib.util.find_spec("perturbnmf.decomposition") is not None
    except (ImportError, ValueError):
        available = False
    consensus_sweep = None
    if available:
        try:
            from perturbnmf.decomposition import consensus_sweep
        except Exception as exc:  # noqa: BLE001 - a module being edited may fail in any way
            print(f"  part 2: perturbnmf.decomposition not importable ({type(exc).__name__}: {exc})")
            available = False
    if not available or consensus_sweep is None:
        print("  part 2: perturbnmf.decomposition not available yet")
        return {"skipped": "perturbnmf.decomposition not available yet"}

    report_machine_load("part 2")
    X = load_papalexi()
    norm_x = float(np.sqrt(np.dot(X.data.astype(np.float64), X.data.astype(np.float64))))
    print(f"  data: {X.shape[0]:,} single-guide cells x {X.shape[1]} genes, normalize_total(1e4) + log1p, "
          f"float32 CSR, nnz = {X.nnz:,} ({X.nnz / (X.shape[0] * X.shape[1]):.1%})")

    # --- original: one MU fit per k on the dense float64 matrix ---------------------------
    Xd = X.toarray().astype(np.float64)
    orig = {}
    for k in PART2_K:
        def fit_mu(k=k):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return SemiNMF(k, solver="mu", init="random", dtype="float64", max_iter=100, tol=1e-12,
                               random_state=0).fit(Xd)
        med, times, model = timed_repeats(fit_mu, repeats)
        orig[k] = {"seconds": med, "times": times, "relative_error": model.reconstruction_err_ / norm_x}
        print(f"    original k = {k:2d}: {fmt_s(med)} ({n_runs(times)})", flush=True)
    del Xd
    orig_total = sum(v["seconds"] for v in orig.values())

    # --- ours: consensus_sweep -------------------------------------------------------------
    def run_ours():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return consensus_sweep(X, PART2_K, n_restarts=5, random_state=0)

    try:
        ours_total, ours_times, result = timed_repeats(run_ours, repeats)
    except Exception as exc:  # noqa: BLE001 - report and go on with part 3
        print(f"  part 2: consensus_sweep failed ({type(exc).__name__}: {exc})")
        return {"skipped": f"consensus_sweep failed: {type(exc).__name__}"}
    table = result.table
    print(f"    consensus_sweep (5 restarts per k + consensus): {fmt_s(ours_total)} ({n_runs(ours_times)})",
          flush=True)

    def col(r, name, fmt):
        if r is None or name not in r.index:
            return "n/a"
        try:
            return fmt(float(r[name]))
        except (TypeError, ValueError):
            return str(r[name])

    has_holdout = "holdout_relative_error" in table.columns
    rows = []
    by_k = {int(r["k"]): r for _, r in table.iterrows()}
    for k in PART2_K:
        r = by_k.get(k)
        row = [k, fmt_s(orig[k]["seconds"]), f"{orig[k]['relative_error']:.4f}", col(r, "seconds", fmt_s),
               col(r, "relative_error", lambda v: f"{v:.4f}")]
        if has_holdout:
            row.append(col(r, "holdout_relative_error", lambda v: f"{v:.4f}"))
        row.append(col(r, "stability", lambda v: f"{v:.3f}"))
        rows.append(row)
    sum_table = float(table["seconds"].sum()) if "seconds" in table.columns else float("nan")
    rows.append(["total", fmt_s(orig_total), "", fmt_s(sum_table), ""] + ([""] if has_holdout else []) + [""])
    print()
    print_table(["k", "original (1 fit)", "orig. rel. err.", "ours: table seconds", "ours rel. err."]
                + (["ours holdout rel. err."] if has_holdout else []) + ["stability"], rows)
    attrs = getattr(table, "attrs", {}) or {}
    if "wall_seconds" in attrs:
        extra = f", of which restart fits {fmt_s(attrs['fit_wall_seconds'])}" if "fit_wall_seconds" in attrs else ""
        print(f"  consensus_sweep's own wall clock (table.attrs): {fmt_s(attrs['wall_seconds'])}{extra}")
    ratio = orig_total / ours_total if ours_total > 0 else float("nan")
    print(f"  original: one 100-iteration MU fit per k on dense float64, per-k times are "
          f"{'medians of up to ' + str(repeats) + ' runs' if repeats > 1 else 'single runs'}; "
          f"relative error = ||X - WH||_F / ||X||_F")
    print(f"  ours: per-k 'seconds' as reported in result.table (restarts run in parallel, so their sum can "
          f"exceed the wall time); the wall time of the whole consensus_sweep call is "
          f"{fmt_s(ours_total)} ({n_runs(ours_times)})")
    print(f"  totals: original {fmt_s(orig_total)} (1 fit per k) vs ours {fmt_s(ours_total)} "
          f"(5 restarts per k + consensus): ours takes {ratio:.2f}x less time "
          f"(target < original: {'met' if ours_total < orig_total else 'NOT met'})")
    return {"orig_total": orig_total, "ours_total": ours_total, "ratio": ratio, "n_cells": X.shape[0],
            "n_genes": X.shape[1]}


# --------------------------------------------------------------------------
# Part 3
# --------------------------------------------------------------------------
def _status_kb(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def scale_worker(n_cells: int) -> None:
    """Generate, reset the peak-RSS counter, fit, report JSON on stdout (run in a subprocess)."""
    from perturbnmf import SemiNMF

    warm_up()
    gen_s, X = timed(lambda: make_synthetic_csr(n_cells))
    nbytes = csr_nbytes(X)
    gc.collect()
    clear_ok = True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        clear_ok = False
    rss_before = _status_kb("VmRSS")
    hwm_before = _status_kb("VmHWM")
    model = SemiNMF(K_SYNTH, random_state=0, max_iter=500, tol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_s, _ = timed(lambda: model.fit(X))
    hwm = _status_kb("VmHWM")
    out = {
        "n_cells": n_cells, "n_genes": X.shape[1], "nnz": int(X.nnz), "csr_bytes": nbytes,
        "index_dtypes": [str(X.indices.dtype), str(X.indptr.dtype)],
        "gen_seconds": gen_s, "fit_seconds": fit_s, "n_iter": int(model.n_iter_),
        "converged": bool(model.converged_), "objective": float(model.objective_[-1]),
        "clear_refs_ok": clear_ok,
        "rss_before_fit_bytes": None if rss_before is None else rss_before * 1024,
        "hwm_before_fit_bytes": None if hwm_before is None else hwm_before * 1024,
        "peak_rss_bytes": None if hwm is None else hwm * 1024,
    }
    print(json.dumps(out), flush=True)


def run_scale_worker(n_cells: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--scale-worker", str(n_cells)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"n_cells": n_cells, "error": f"worker exited with status {proc.returncode}"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"n_cells": n_cells, "error": "worker printed no JSON"}
    res = json.loads(lines[-1])
    res["process_wall_seconds"] = wall
    return res


def part3(quick: bool, repeats: int) -> dict:
    small, large = SIZES[quick]["part3"]
    banner(f"Part 3 - scale: {small:,} and {large:,} cells x {N_GENES:,} genes (~{DENSITY:.0%} non-zero), "
           f"k = {K_SYNTH}, default solver to tol = 1e-4")
    print("  each size runs in its own subprocess: generate the CSR, reset the peak-RSS counter "
          "(/proc/self/clear_refs), fit, read VmHWM", flush=True)
    report_machine_load("part 3")
    res = {}
    for n in (small, large):
        r = run_scale_worker(n)
        res[n] = r
        if "error" in r:
            print(f"    {n:,} cells: {r['error']}", flush=True)
        else:
            print(f"    {n:,} cells: generated in {fmt_s(r['gen_seconds'])}, fit in {fmt_s(r['fit_seconds'])} "
                  f"({r['n_iter']} iterations)", flush=True)
    ok = [n for n in (small, large) if "error" not in res[n]]
    if ok:
        rows_def = [
            ("CSR size (data+indices+indptr)", lambda r: fmt_gb(r["csr_bytes"])),
            ("non-zeros", lambda r: f"{r['nnz']:,}"),
            ("RSS at fit start", lambda r: fmt_gb(r["rss_before_fit_bytes"])),
            ("peak RSS during fit (VmHWM)", lambda r: fmt_gb(r["peak_rss_bytes"])),
            ("peak RSS / CSR size", lambda r: f"{r['peak_rss_bytes'] / r['csr_bytes']:.2f}x"),
            ("fit's extra memory (peak - start)",
             lambda r: fmt_gb(r["peak_rss_bytes"] - r["rss_before_fit_bytes"])),
            ("fit time (end to end)", lambda r: fmt_s(r["fit_seconds"])),
            ("iterations", lambda r: str(r["n_iter"])),
            ("converged (tol 1e-4)", lambda r: "yes" if r["converged"] else "no"),
            ("time per iteration (fit time / iter.)", lambda r: fmt_s(r["fit_seconds"] / r["n_iter"])),
        ]
        print()
        print_table(["", *[f"{n:,} cells" for n in ok]], [[label, *[f(res[n]) for n in ok]] for label, f in rows_def])
        if not all(res[n]["clear_refs_ok"] for n in ok):
            print("  NOTE: /proc/self/clear_refs could not be written: VmHWM is the peak of the whole worker "
                  "(including data generation), not of the fit alone")
    per_iter_ratio = None
    if len(ok) == 2:
        a, b = (res[n]["fit_seconds"] / res[n]["n_iter"] for n in ok)
        per_iter_ratio = b / a
        print(f"  per-iteration time ratio {large:,} / {small:,} cells: {per_iter_ratio:.1f} "
              f"(linear scaling: {large / small:.0f})")
    if large in ok:
        r = res[large]
        peak_ratio = r["peak_rss_bytes"] / r["csr_bytes"]
        print(f"  peak RSS / CSR size at {large:,} cells: {peak_ratio:.2f}x "
              f"(target <= 2x: {'met' if peak_ratio <= 2 else 'NOT met'})")

    # the original rule at 1M cells, by computation only
    n_full = SIZES[False]["part3"][1]
    dense64 = n_full * N_GENES * 8
    dense32 = n_full * N_GENES * 4
    try:
        ram = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) * 1024
    except (OSError, StopIteration):
        ram = 24 * 2**30
    print(f"  original rule at {n_full:,} x {N_GENES:,} cells x genes (computed, never allocated):")
    print(f"    dense float64 X alone: {fmt_gb(dense64)} ({dense64 / 2**30:.1f} GiB) = {dense64 / ram:.0%} of this "
          f"machine's {ram / 2**30:.1f} GiB RAM")
    print(f"    densifying as the original did, toarray() (float32, {fmt_gb(dense32)}) then astype(float64): "
          f"{fmt_gb(dense32 + dense64)} held at once")
    print(f"    plus one per-iteration temporary of X's size (e.g. X - WH): {fmt_gb(2 * dense64)} "
          f"> {ram / 1e9:.1f} GB RAM")
    print("    => the original rule cannot run at this size on this machine; the default solver works on the "
          "CSR as is.")
    return {"small": res.get(small), "large": res.get(large), "per_iter_ratio": per_iter_ratio,
            "dense64_bytes": dense64, "ram_bytes": ram}


# --------------------------------------------------------------------------
# Summary and entry point
# --------------------------------------------------------------------------
def print_summary(out: dict, quick: bool) -> None:
    banner("Summary" + (" (QUICK mode: reduced sizes, not the headline figures)" if quick else ""))
    p1 = out.get("part1")
    if p1:
        s = p1["rows"]["seminmf"]
        print(f"- Part 1 ({p1['n_cells']:,} x {N_GENES:,}, ~20% non-zero, k = {K_SYNTH}): SemiNMF(k).fit(X) with "
              f"defaults takes {fmt_s(s['seconds'])} ({s['n_iter']} iterations) vs {fmt_s(p1['mu_s'])} for the "
              f"original rule — {p1['ratio']:.1f}x faster, objective no worse: {'yes' if p1['no_worse'] else 'no'}.")
    p2 = out.get("part2")
    if p2:
        if "skipped" in p2:
            print(f"- Part 2: skipped ({p2['skipped']}).")
        else:
            print(f"- Part 2 (Papalexi 2021 THP-1, {p2['n_cells']:,} cells x {p2['n_genes']} genes, k = 5..45): "
                  f"consensus sweep with 5 restarts per k {fmt_s(p2['ours_total'])} vs {fmt_s(p2['orig_total'])} "
                  f"for one original fit per k ({p2['ratio']:.2f}x less time).")
    p3 = out.get("part3")
    if p3:
        large = p3.get("large")
        small = p3.get("small")
        if large and "error" not in large:
            ratio = large["peak_rss_bytes"] / large["csr_bytes"]
            extra = ""
            if p3.get("per_iter_ratio") is not None and small:
                extra = (f"; per-iteration time x{p3['per_iter_ratio']:.1f} from {small['n_cells']:,} to "
                         f"{large['n_cells']:,} cells")
            print(f"- Part 3 ({large['n_cells']:,} x {N_GENES:,}, k = {K_SYNTH}): CSR {fmt_gb(large['csr_bytes'])}, "
                  f"peak RSS during the fit {fmt_gb(large['peak_rss_bytes'])} ({ratio:.2f}x the CSR), fit to "
                  f"tol 1e-4 in {fmt_s(large['fit_seconds'])} ({large['n_iter']} iterations, "
                  f"{fmt_s(large['fit_seconds'] / large['n_iter'])} per iteration){extra}. The original rule would "
                  f"need a {fmt_gb(p3['dense64_bytes'])} dense float64 copy at 1M cells.")
        else:
            print("- Part 3: the scale worker failed.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["1", "2", "3", "all"], default="all", help="which part to run")
    parser.add_argument("--quick", action="store_true", help="small synthetic sizes, for development")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per short measurement; the median is quoted (default 3)")
    parser.add_argument("--scale-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.scale_worker is not None:
        scale_worker(args.scale_worker)
        return 0

    t0 = time.perf_counter()
    print(f"bench_seminmf.py: part {args.part}, {'QUICK' if args.quick else 'full'} sizes, "
          f"repeats = {args.repeats}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print_environment()
    parts = ["1", "2", "3"] if args.part == "all" else [args.part]
    out = {}
    if "1" in parts:
        out["part1"] = part1(args.quick, args.repeats)
        gc.collect()
    if "2" in parts:
        out["part2"] = part2(args.quick, args.repeats)
        gc.collect()
    if "3" in parts:
        out["part3"] = part3(args.quick, args.repeats)
    print_summary(out, args.quick)
    print(f"\n(total benchmark wall time {fmt_s(time.perf_counter() - t0)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
