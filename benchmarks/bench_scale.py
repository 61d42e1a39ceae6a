#!/usr/bin/env python
"""Scale benchmark: the whole pipeline on simulated screens of 100k to 2M cells x 8,000 genes.

Usage::

    .venv/bin/python benchmarks/bench_scale.py --quick                  # 10k, 20k cells x 2,000 genes: ~8 min
    .venv/bin/python benchmarks/bench_scale.py --sizes 300k --cluster none   # the 20 min / 8 GiB target
    .venv/bin/python benchmarks/bench_scale.py --sizes 2M --cluster local   # the 3 h / 16 GiB target
    .venv/bin/python benchmarks/bench_scale.py --spot-check             # then: 2M hits vs a 300k subset in process
    .venv/bin/python benchmarks/bench_scale.py [--sizes 100k,300k,1M,2M] [--genes 8000] [--targets N]
        [--cluster none,local] [--data-dir DIR] [--steps all] [--repeats N] [--compression gzip]
        [--timeout-min M]

For each size the benchmark

1. writes a simulated screen (``perturbnmf.datasets.write_simulated_screen``: the demo's design,
   planted programs and effects, ~4,000 UMIs per cell, written chunk by chunk so that a 2M-cell
   matrix never sits in memory) with its planted gene sets (GMT) and cell-cycle markers into
   ``--data-dir`` (default ``~/.cache/perturbnmf-bench``; reused when present), in a subprocess
   whose time and peak memory are measured;
2. writes a parameter file with params/demo.yaml's structure (its k sweep, gene sets, prerank;
   ``simulate: false``; ``cluster: local`` only when ``--cluster local`` is asked for: the pipeline
   refuses parameters it does not know, and the benchmark then says so);
3. runs ``run_all.py`` on it in a subprocess, sampling every 0.5 s the summed RSS of the whole
   process tree (run_all.py, the papermill kernels and any worker processes they start: loky
   restarts, Dask workers), per step (the step is read from run_all.py's progress lines); step
   times and planted-truth recovery come from the run folder (``data/run.json``,
   ``data/demo_recovery.json``, ``data/k_selection.json``).

``--spot-check`` (after the 2M run) writes a 300k-cell subset of the 2M screen (all cells of 1,176
randomly drawn targets, so each keeps its ~170 cells, and 100,000 of its controls;
``datasets.write_screen_subset``), runs it in process with the same parameters, and compares the two
runs' hits on the subset's targets: programs matched one to one by the cosine of their gene scores, a
hit being (program, perturbation, sign); the target is a Jaccard index >= 0.9 with no hit of opposite
sign (``results/scale/spot_check.json``).

It prints a side-by-side table per size (steps x cluster modes), a scaling table (cells vs time
and peak memory) and the two targets with met / NOT met:

* 300k cells x 8,000 genes x 2,000 targets, defaults (``cluster`` unset): <= 20 min, peak <= 8 GiB;
* 2M cells x 8,000 genes x 10,000 targets, ``cluster: local``: <= 3 h, peak <= 16 GiB.

A target whose size was not run is reported as not measured, with a linear extrapolation in cells
from the sizes that were (labelled as such). Results go to ``benchmarks/results/scale/`` (one JSON
per size and cluster mode, and ``summary.json``; ``quick_`` prefixed for ``--quick``).

``--targets`` defaults to 2,000 targets up to 300k cells and 10,000 above. ``--cluster`` defaults to
both modes (``none``: the pipeline in its own processes, parameter unset; ``local``: ``cluster: local``).
``--quick`` runs 10k and 20k cells x 2,000 genes (one target per ~150 cells) with a shortened k sweep
([6, 8, 10], 3 restarts) so that both modes finish in about 8 minutes on 2 cores; it checks the
machinery, its numbers are not the targets'.
``--steps`` runs only some steps: ``all`` (default), ``none`` (write the screens only), one step
(``run_all.py --only``) or the steps from one on (e.g. ``stats,enrichment``: ``--from stats``); the
last two need a complete earlier run of the same size in the data folder. ``--repeats N`` runs the
pipeline N times per size and mode and quotes medians.

Memory is the sum of the processes' RSS: pages shared between processes count once per process, so
it is an upper bound of what the tree needs; a spike shorter than the sampling interval can be missed
(the writer's own peak is also taken from ``getrusage`` in its process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import yaml

from bench_seminmf import banner, print_table  # the same tables and banners as the solver benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale"
DEMO_PARAMS = ROOT / "params" / "demo.yaml"
DEFAULT_DATA_DIR = Path("~/.cache/perturbnmf-bench").expanduser()
STEPS = ["preprocess", "factorize", "stats", "enrichment"]
NOTEBOOK_STEP = {"01_preprocess": "preprocess", "02_factorize": "factorize", "03_stats": "stats",
                 "04_enrichment": "enrichment"}
GIB = 1024 ** 3
SAMPLE_S = 0.5
SEED = 0
QUICK_SIZES = "10k,20k"
QUICK_GENES = 2000
#: --quick: a shorter sweep around the planted 8 programs, so that the check takes minutes.
QUICK_OVERRIDES = {"k_values": [6, 8, 10], "n_restarts": 3}
#: (name, cells, genes, targets, cluster, max seconds, max peak bytes)
TARGETS = [
    ("300k x 8,000 genes x 2,000 targets, defaults", 300_000, 8000, 2000, "none", 20 * 60, 8 * GIB),
    ("2M x 8,000 genes x 10,000 targets, cluster local", 2_000_000, 8000, 10_000, "local", 3 * 3600, 16 * GIB),
]
#: Bytes on disk per non-zero (int32 data + int32 indices; gzip measured at ~2.2) and the share of
#: non-zero entries at 8,000 genes (~0.27), for the disk-space check before writing.
BYTES_PER_NNZ = {None: 8.3, "lzf": 5.0, "gzip": 2.3}
DENSITY_ESTIMATE = 0.3
#: A run folder's data/preprocessed.h5ad (the selected genes, gzip) and factorized.h5ad: 0.6 bytes per
#: non-zero of the screen at 2M cells (2.5 GB + 0.34 GB for 4.6 billion non-zeros); with a margin.
RUN_BYTES_PER_NNZ = 1.0


# --------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------
def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def fmt_gib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / GIB:.2f} GiB"


def fmt_bytes(nbytes: float | None) -> str:
    if nbytes is None:
        return "n/a"
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.0f} MB"


def fmt_cells(n: int) -> str:
    if n >= 1_000_000 and n % 100_000 == 0:
        return f"{n / 1e6:g}M"
    return f"{n / 1e3:g}k" if n % 1000 == 0 else str(n)


def fmt_num(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def cpu_busy_fraction(interval: float = 1.0) -> float | None:
    """Share of all cores' time that was busy over ``interval`` seconds, or None."""
    try:
        before = psutil.cpu_times()
        time.sleep(interval)
        after = psutil.cpu_times()
    except Exception:
        return None
    total = sum(after) - sum(before)
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0) - getattr(before, "iowait", 0))
    return None if total <= 0 else 1.0 - idle / total


def report_load(label: str) -> float | None:
    busy = cpu_busy_fraction()
    if busy is not None:
        warn = "  WARNING: other processes use the CPUs; the times are upper bounds" if busy > 0.15 else ""
        print(f"  CPU busy before {label}: {busy:.0%} of all cores (1 s sample){warn}", flush=True)
    return busy


# --------------------------------------------------------------------------
# Memory of a process tree
# --------------------------------------------------------------------------
class TreeMemory:
    """Sample the summed RSS of a process and all its descendants every ``interval`` seconds.

    ``phase`` (set from outside, e.g. the pipeline step now running) labels the samples, so that
    ``peaks`` holds the peak per phase and ``peak`` the overall peak (bytes).
    """

    def __init__(self, pid: int, interval: float = SAMPLE_S):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.phase = "startup"
        self.peak = 0
        self.peaks: dict[str, int] = {}
        self.max_processes = 0
        self.n_samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> int | None:
        """Summed RSS of the tree now (bytes), or None when the root has ended."""
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        phase = self.phase
        self.peak = max(self.peak, total)
        self.peaks[phase] = max(self.peaks.get(phase, 0), total)
        self.max_processes = max(self.max_processes, len(processes))
        self.n_samples += 1
        return total

    def _loop(self) -> None:
        while self.sample() is not None and not self._stop.wait(self.interval):
            pass


def stop_tree(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process (run_all.py stops its kernels and keeps the partial run), then SIGKILL its tree."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


# --------------------------------------------------------------------------
# Sizes, files, parameters
# --------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """``300k`` -> 300000, ``2M`` -> 2000000, ``1.5M``, ``50000``."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 300k, 2M)")
    factor = {"": 1, "k": 1_000, "m": 1_000_000}[match.group(2).lower()]
    return int(round(float(match.group(1)) * factor))


def default_targets(n_cells: int, quick: bool) -> int:
    """2,000 targets up to 300k cells, 10,000 above; --quick: one target per ~150 cells."""
    if quick:
        return max(6, n_cells // 150)
    return 2000 if n_cells <= 300_000 else 10_000


def screen_files(data_dir: Path, n_cells: int, genes: int, targets: int, compression: str | None) -> dict[str, Path]:
    stem = f"screen_{fmt_cells(n_cells)}_{genes}g_{targets}t_seed{SEED}_{compression or 'raw'}"
    return {"h5ad": data_dir / f"{stem}.h5ad", "gmt": data_dir / f"{stem}_gene_sets.gmt",
            "cell_cycle": data_dir / f"{stem}_cell_cycle_genes.tsv", "record": data_dir / f"{stem}.write.json"}


def writer_spec(files: dict[str, Path], n_cells: int, genes: int, targets: int, compression: str | None) -> dict:
    """Arguments of datasets.write_simulated_screen for one screen (the demo's design)."""
    from perturbnmf.datasets import DEMO_DESIGN

    return {"path": str(files["h5ad"]), "n_cells": n_cells, "n_genes": genes, "n_targets": targets, "seed": SEED,
            "compression": compression, "gene_sets_path": str(files["gmt"]),
            "cell_cycle_path": str(files["cell_cycle"]),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in DEMO_DESIGN.items()}}


def write_params(path: Path, run_name: str, output_dir: Path, files: dict[str, Path], cluster: str,
                 quick: bool) -> dict:
    """params/demo.yaml with this screen's files, ``simulate: false`` and (only if asked) ``cluster``."""
    values = yaml.safe_load(DEMO_PARAMS.read_text())
    values.update(run_name=run_name, output_dir=str(output_dir), simulate=False, input=str(files["h5ad"]),
                  gene_sets=[str(files["gmt"])], cell_cycle_genes=str(files["cell_cycle"]), seed=SEED)
    if quick:
        values.update(QUICK_OVERRIDES)
    if cluster != "none":
        values["cluster"] = cluster
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# Written by benchmarks/bench_scale.py ({time.strftime('%Y-%m-%d %H:%M')}): params/demo.yaml's\n"
              f"# structure on a simulated screen of {files['h5ad'].name}.\n")
    path.write_text(header + yaml.safe_dump(values, sort_keys=False))
    return values


def step_arguments(steps: list[str]) -> list[str]:
    """run_all.py's flags for ``steps``: all four, one (--only) or a run to the end (--from)."""
    if steps == STEPS:
        return []
    if len(steps) == 1:
        return ["--only", steps[0]]
    return ["--from", steps[0]]


def parse_steps(text: str) -> list[str]:
    if text in ("all", ""):
        return list(STEPS)
    if text == "none":
        return []
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown step(s) {unknown}; steps are {STEPS}, 'all' or 'none'")
    first = STEPS.index(steps[0])
    if len(steps) > 1 and steps != STEPS[first:]:
        raise argparse.ArgumentTypeError("--steps must be all, none, one step, or the steps from one to the end "
                                         "(run_all.py runs --only STEP or --from STEP)")
    return steps


# --------------------------------------------------------------------------
# Writing the screen (in its own process)
# --------------------------------------------------------------------------
def write_worker(spec_json: str) -> int:
    """--write-screen: write one screen and print its summary (with this process's peak RSS) as JSON."""
    from perturbnmf import datasets

    spec = json.loads(spec_json)
    if spec.get("guide_efficacy") is not None:
        spec["guide_efficacy"] = tuple(spec["guide_efficacy"])
    summary = datasets.write_simulated_screen(**spec)
    summary["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("WRITE-SUMMARY " + json.dumps(summary), flush=True)
    return 0


def check_disk(data_dir: Path, n_cells: int, genes: int, compression: str | None) -> None:
    need = n_cells * genes * DENSITY_ESTIMATE * BYTES_PER_NNZ[compression]
    free = shutil.disk_usage(data_dir).free
    if need > 0.9 * free:
        raise SystemExit(f"error: the {fmt_cells(n_cells)} x {genes} screen needs about {need / 1e9:.0f} GB in "
                         f"{data_dir}, but only {free / 1e9:.0f} GB are free; use --data-dir on a larger disk"
                         + (" or --compression gzip" if compression != "gzip" else ""))


def ensure_screen(data_dir: Path, n_cells: int, genes: int, targets: int, compression: str | None) -> dict:
    """The screen's files, written now (time and peak memory measured) or reused from an earlier run."""
    files = screen_files(data_dir, n_cells, genes, targets, compression)
    spec = writer_spec(files, n_cells, genes, targets, compression)
    if all(p.is_file() for p in files.values()):
        record = json.loads(files["record"].read_text())
        if record.get("spec") == spec:
            print(f"  screen: reusing {files['h5ad']} (written in {fmt_s(record['seconds'])}, "
                  f"peak {fmt_gib(record['peak_tree_rss_bytes'])})")
            return {**record, "reused": True, "files": {k: str(v) for k, v in files.items()}}
    data_dir.mkdir(parents=True, exist_ok=True)
    check_disk(data_dir, n_cells, genes, compression)
    print(f"  screen: writing {files['h5ad']} ...", flush=True)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--write-screen", json.dumps(spec)],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
    with TreeMemory(process.pid) as memory:
        out, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"error: writing the screen failed (exit {process.returncode})")
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("WRITE-SUMMARY "))[14:])
    record = {**summary, "spec": spec, "wall_seconds": time.perf_counter() - started,
              "peak_tree_rss_bytes": max(memory.peak, summary["ru_maxrss_bytes"]), "written": time.strftime("%F %T")}
    files["record"].write_text(json.dumps(record, indent=1))
    print(f"  screen: {record['nnz']:,} non-zeros ({record['density']:.1%}), median {record['umis_per_cell_median']:.0f}"
          f" UMIs / {record['genes_per_cell_median']:.0f} genes per cell, {fmt_bytes(record['bytes'])} on disk, "
          f"written in {fmt_s(record['seconds'])}, peak {fmt_gib(record['peak_tree_rss_bytes'])}")
    return {**record, "reused": False, "files": {k: str(v) for k, v in files.items()}}


# --------------------------------------------------------------------------
# Running the pipeline
# --------------------------------------------------------------------------
class ProgressReader(threading.Thread):
    """Echo run_all.py's stdout as it comes and tell ``memory`` which step is running.

    run_all.py prints ``[1/4] 01_preprocess ... `` (no newline until the step ends), so the pipe is
    read in raw chunks, not lines.
    """

    MARK = re.compile(r"\[(\d+)/(\d+)\] (\S+) \.\.\.")
    DONE = re.compile(r"(done in|FAILED after) [0-9.]+ s")

    def __init__(self, stream, memory: TreeMemory):
        super().__init__(daemon=True)
        self.stream, self.memory, self.text, self.line_start = stream, memory, "", True

    def echo(self, piece: str) -> None:
        """Write ``piece`` indented, each line of run_all.py's output once prefixed."""
        for line in piece.splitlines(True):
            sys.stdout.write(("    | " if self.line_start else "") + line)
            self.line_start = line.endswith("\n")
        sys.stdout.flush()

    def run(self) -> None:
        fd = self.stream.fileno()
        while chunk := os.read(fd, 4096):
            piece = chunk.decode(errors="replace")
            self.text += piece
            self.echo(piece)
            marks = list(self.MARK.finditer(self.text))
            done = list(self.DONE.finditer(self.text))
            if not marks:
                continue
            last = marks[-1]
            finished = done and done[-1].start() > last.start() and last.group(1) == last.group(2)
            # the gap between two steps counts to the step before it; after the last one: index, publishing
            self.memory.phase = "finish" if finished else NOTEBOOK_STEP.get(last.group(3), last.group(3))


def run_pipeline(params_path: Path, steps: list[str], timeout_s: float | None) -> dict:
    """Run run_all.py on ``params_path``; wall time, exit status, output and tree memory per step."""
    command = [sys.executable, str(ROOT / "run_all.py"), str(params_path), *step_arguments(steps)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    stderr_chunks: list[bytes] = []
    err_reader = threading.Thread(target=lambda: stderr_chunks.append(process.stderr.read()), daemon=True)
    with TreeMemory(process.pid) as memory:
        reader = ProgressReader(process.stdout, memory)
        reader.start()
        err_reader.start()
        try:
            process.wait(timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            print(f"    timeout after {fmt_s(timeout_s)}: stopping the run", flush=True)
            stop_tree(process)
            timed_out = True
        reader.join()
        err_reader.join()
    stderr = b"".join(stderr_chunks).decode(errors="replace")
    if stderr.strip():
        print("".join(f"    ! {line}" for line in stderr.splitlines(True)), end="", flush=True)
    return {"command": command, "returncode": process.returncode, "timed_out": timed_out,
            "wall_seconds": time.perf_counter() - started, "peak_tree_rss_bytes": memory.peak,
            "peak_tree_rss_by_step": dict(memory.peaks), "max_processes": memory.max_processes,
            "n_samples": memory.n_samples, "stdout": reader.text[-4000:], "stderr": stderr[-4000:]}


def run_folder_results(output_dir: Path, stderr: str, since: float) -> dict:
    """Step times and status (data/run.json), recovery and k of this run: the run folder when the run
    completed, the kept ``.failed-`` folder when it failed; nothing from an older run (a run.json
    older than ``since``, a time.time()). Steps reused by --from / --only are left out of the step times."""
    kept = re.search(r"The partial run is kept in (.+?) \(see", stderr)
    folder = Path(kept.group(1)) if kept else output_dir
    data = folder / "data"
    fresh = (data / "run.json").is_file() and (data / "run.json").stat().st_mtime >= since
    out: dict = {"run_folder": str(folder)}
    for key, name in (("run", "run.json"), ("recovery", "demo_recovery.json"), ("k_selection", "k_selection.json")):
        path = data / name
        out[key] = json.loads(path.read_text()) if fresh and path.is_file() else None
    run = out.pop("run") or {}
    steps = {s: v for s, v in run.get("steps", {}).items() if not v.get("reused")}
    out["status_in_run_json"] = run.get("status")
    out["step_seconds"] = {s: v["seconds"] for s, v in steps.items() if v.get("seconds") is not None}
    out["step_status"] = {s: v.get("status") for s, v in steps.items()}
    out["reused_steps"] = [s for s, v in run.get("steps", {}).items() if v.get("reused")]
    return out


def error_message(stderr: str, returncode: int) -> str:
    """run_all.py's error paragraph (from its ``error:`` line), on one line, without the list of known keys."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    if start is None:
        return lines[-1].strip() if lines else f"exit status {returncode}"
    block = []
    for line in lines[start:]:
        if not line.strip() or line.startswith(("The partial run", "(run with --debug")):
            break
        block.append(line.strip())
    return re.sub(r"\s*Known keys:.*", "", " ".join(block).removeprefix("error: "))


#: run_all.py's refusal of the parameter itself (unknown key, or a value it does not accept).
CLUSTER_REFUSAL = re.compile(r"key 'cluster'(?!\w)|'cluster' must|parameter 'cluster'")


def classify(result: dict, cluster: str) -> tuple[str, str]:
    """(status, one-line explanation) of a pipeline run."""
    rc = result["returncode"]
    if result["timed_out"]:
        return "timeout", "stopped at the --timeout-min limit"
    if rc == 0:
        return "complete", ""
    message = error_message(result["stderr"], rc)
    if rc == 2 and cluster != "none" and CLUSTER_REFUSAL.search(message):
        return "refused", f"the pipeline does not accept 'cluster: {cluster}': {message}"
    return ("refused" if rc == 2 else "failed"), message


def bench_run(screen: dict, n_cells: int, genes: int, targets: int, cluster: str, args, label: str | None = None) -> dict:
    """Write the parameters and run the pipeline ``args.repeats`` times for one size and cluster mode."""
    label = label or f"scale_{fmt_cells(n_cells)}_{genes}g_{targets}t_{cluster}"
    output_dir = args.data_dir / "runs" / label
    params_path = args.data_dir / "params" / f"{label}.yaml"
    params = write_params(params_path, label, output_dir, {k: Path(v) for k, v in screen["files"].items()},
                          cluster, args.quick)
    need, free = RUN_BYTES_PER_NNZ * screen["nnz"], shutil.disk_usage(args.data_dir).free
    if need > free:
        print(f"  WARNING: the run folder will need about {fmt_bytes(need)} (its h5ad intermediates), "
              f"{args.data_dir} has {fmt_bytes(free)} free", flush=True)
    runs = []
    for repeat in range(args.repeats):
        print(f"\n  run_all.py {params_path.name} (cluster: {cluster}, run {repeat + 1} of {args.repeats})", flush=True)
        busy = report_load("the run")
        since = time.time() - 1
        result = run_pipeline(params_path, args.steps, args.timeout_min * 60 if args.timeout_min else None)
        result.update(run_folder_results(output_dir, result["stderr"], since), cpu_busy_before=busy)
        result["status"], result["explanation"] = classify(result, cluster)
        if result["explanation"]:
            print(f"  => {result['status'].upper()}: {result['explanation']}", flush=True)
        runs.append(result)
        if result["status"] != "complete":
            break
    return {"label": label, "n_cells": n_cells, "genes": genes, "targets": targets, "cluster": cluster,
            "steps": args.steps, "params_file": str(params_path), "params": params, "screen": screen,
            "runs": runs, **summarise_runs(runs)}


def summarise_runs(runs: list[dict]) -> dict:
    """Medians over the repeats (complete runs only, else the last run's figures)."""
    done = [r for r in runs if r["status"] == "complete"] or runs[-1:]
    steps = {s for r in done for s in r["step_seconds"]}
    last = runs[-1]
    return {
        "status": last["status"], "explanation": last["explanation"], "n_runs": len(done),
        "wall_seconds": statistics.median(r["wall_seconds"] for r in done),
        "max_processes": max(r["max_processes"] for r in done),
        "peak_tree_rss_bytes": statistics.median(r["peak_tree_rss_bytes"] for r in done),
        "step_seconds": {s: statistics.median(r["step_seconds"][s] for r in done if r["step_seconds"].get(s) is not None)
                         for s in steps if any(r["step_seconds"].get(s) is not None for r in done)},
        "peak_tree_rss_by_step": {s: statistics.median(r["peak_tree_rss_by_step"][s] for r in done
                                                       if s in r["peak_tree_rss_by_step"])
                                  for s in {s for r in done for s in r["peak_tree_rss_by_step"]}},
        "recovery": last.get("recovery"), "k_selection": last.get("k_selection"),
    }


# --------------------------------------------------------------------------
# Printing the results
# --------------------------------------------------------------------------
def print_size_table(rows: list[dict]) -> None:
    """Steps x cluster modes, side by side: time and peak tree memory."""
    screen = rows[0]["screen"]
    headers = ["step"]
    for row in rows:
        headers += [f"{row['cluster']}: time", f"{row['cluster']}: peak"]
    table = [["write screen" + (" (reused)" if screen.get("reused") else "")]
             + [fmt_s(screen["seconds"]), fmt_gib(screen["peak_tree_rss_bytes"])] * len(rows)]
    for step in ["startup", *STEPS, "finish"]:
        if not any(step in r["step_seconds"] or step in r["peak_tree_rss_by_step"] for r in rows):
            continue
        line = [step]
        for row in rows:
            line += [fmt_s(row["step_seconds"].get(step)), fmt_gib(row["peak_tree_rss_by_step"].get(step))]
        table.append(line)
    total = ["run_all.py total"]
    for row in rows:
        total += [fmt_s(row["wall_seconds"]), fmt_gib(row["peak_tree_rss_bytes"])]
    table.append(total)
    table.append(["processes (max)"] + [x for row in rows for x in (row["max_processes"], "")])
    table.append(["status"] + [x for row in rows for x in (row["status"], f"{row['n_runs']} run(s)")])
    print_table(headers, table)
    for row in rows:
        if row["explanation"]:
            print(f"  {row['cluster']}: {row['status'].upper()}: {row['explanation']}")


def recovery_cells(row: dict) -> list[str]:
    rec, ksel = row.get("recovery") or {}, row.get("k_selection") or {}
    return [fmt_num(ksel.get("k")), fmt_num(rec.get("mean_program_cosine")), fmt_num(rec.get("sensitivity")),
            fmt_num(rec.get("false_discovery_proportion")), fmt_num(rec.get("n_null_target_discoveries"))]


def print_scaling_table(rows: list[dict]) -> None:
    headers = ["cells", "genes", "targets", "cluster", "nnz", "file", "write", "write peak", "run_all",
               "run peak", "s / 1k cells", "status", "k", "cosine", "sensitivity", "strict FDP", "null hits",
               "run (commit)"]
    table = []
    for row in sorted(rows, key=lambda r: (r["n_cells"], r["cluster"] != "none")):
        s = row["screen"]
        per_k = row["wall_seconds"] / (row["n_cells"] / 1000) if row["status"] == "complete" else None
        table.append([fmt_cells(row["n_cells"]), row["genes"], row["targets"], row["cluster"], f"{s['nnz']:,}",
                      fmt_bytes(s["bytes"]), fmt_s(s["seconds"]), fmt_gib(s["peak_tree_rss_bytes"]),
                      fmt_s(row["wall_seconds"]), fmt_gib(row["peak_tree_rss_bytes"]), fmt_num(per_k),
                      row["status"], *recovery_cells(row),
                      f"{row.get('when', 'earlier')[:16]} ({row.get('commit', '?')})"])
    print_table(headers, table)
    print("  cosine: mean cosine of the planted programs' gene scores with the recovered ones; sensitivity: planted"
          "\n  effects found; strict FDP: discoveries that are no planted pair; null hits: hits on targets that do nothing."
          "\n  Rows from earlier invocations (results/scale/*.json) are included; 'run' says when and from which commit.")


def extrapolate(rows: list[dict], n_cells: int, key: str) -> float | None:
    """Linear fit in cells of ``key`` over complete rows (two or more sizes), evaluated at ``n_cells``."""
    points = sorted({r["n_cells"]: r[key] for r in rows if r["status"] == "complete"}.items())
    if len(points) < 2:
        return None
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + (y1 - y0) / (x1 - x0) * (n_cells - x1)


def judge_targets(rows: list[dict]) -> list[dict]:
    """Each target: met / NOT met when its size was run, else not measured with an extrapolation."""
    verdicts = []
    for name, cells, genes, targets, cluster, max_s, max_bytes in TARGETS:
        limits = f"<= {fmt_s(max_s)} and peak <= {fmt_gib(max_bytes)}"
        match = [r for r in rows if (r["n_cells"], r["genes"], r["targets"], r["cluster"]) == (cells, genes, targets, cluster)
                 and r["steps"] == STEPS]
        verdict = {"target": name, "limits": limits}
        if match and match[0]["status"] == "complete":
            r = match[0]
            ok = r["wall_seconds"] <= max_s and r["peak_tree_rss_bytes"] <= max_bytes
            verdict.update(result="met" if ok else "NOT met", seconds=r["wall_seconds"], peak=r["peak_tree_rss_bytes"])
        elif match:
            verdict.update(result="NOT met", why=f"{match[0]['status']}: {match[0]['explanation']}")
        else:
            complete = [r for r in rows if r["status"] == "complete" and r["steps"] == STEPS]
            same = [r for r in complete if r["cluster"] == cluster]
            if len({r["n_cells"] for r in same}) < 2:  # e.g. cluster local refused: the in-process runs
                same = [r for r in complete if r["cluster"] == "none"]
            verdict.update(result="not measured", seconds=extrapolate(same, cells, "wall_seconds"),
                           peak=extrapolate(same, cells, "peak_tree_rss_bytes"),
                           basis=sorted({(r["n_cells"], r["genes"], r["cluster"]) for r in same}))
        verdicts.append(verdict)
    return verdicts


def print_targets(verdicts: list[dict]) -> None:
    for v in verdicts:
        line = f"  {v['target']}: {v['limits']}: "
        if v["result"] == "not measured":
            line += "not measured"
            if v["seconds"] is not None:
                genes = ", ".join(f"{fmt_cells(c)} x {g} genes (cluster {m})" for c, g, m in v["basis"])
                line += (f" (linear extrapolation in cells from {genes}: {fmt_s(v['seconds'])}, "
                         f"peak {fmt_gib(v['peak'])}; not a measurement)")
        elif "why" in v:
            line += f"{v['result']} ({v['why']})"
        elif "detail" in v:
            line += f"{v['detail']} -> {v['result']}"
        else:
            line += f"{fmt_s(v['seconds'])}, peak {fmt_gib(v['peak'])} -> {v['result']}"
        print(line)


def provenance() -> dict:
    """When a run was made, and from which commit of this repository (``+`` when the tree had changes other
    than the benchmarks' own results)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"when": time.strftime("%F %T"), "commit": git("rev-parse", "--short", "HEAD") + ("+" if git(
        "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results") else "")}


def earlier_rows(rows: list[dict], prefix: str) -> list[dict]:
    """The saved results of sizes and cluster modes this invocation did not run (``results/scale/``), so
    that the scaling table and the targets cover every measurement; each row says when it was made."""
    ran = {row["label"] for row in rows}
    found = []
    for path in sorted(RESULTS.glob(f"{prefix}scale_*.json")):
        if prefix == "" and path.name.startswith("quick_"):
            continue
        row = json.loads(path.read_text())
        if row["label"] not in ran:
            found.append(row)
    return found


def machine() -> dict:
    memory = psutil.virtual_memory()
    return {"cpus": os.cpu_count(), "memory_bytes": memory.total, "available_bytes": memory.available,
            "platform": platform.platform(), "python": platform.python_version(), "host": platform.node()}


def save(rows: list[dict], verdicts: list[dict], args, seconds: float) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    prefix = "quick_" if args.quick else ""
    for row in rows:
        (RESULTS / f"{prefix}{row['label']}.json").write_text(json.dumps(row, indent=1, default=str))
    summary = {"when": time.strftime("%F %T"), "machine": machine(), "argv": sys.argv[1:], "quick": args.quick,
               "seconds": seconds, "targets": verdicts,
               "rows": [{k: v for k, v in row.items() if k not in ("runs", "params")} for row in rows]}
    path = RESULTS / f"{prefix}summary.json"
    path.write_text(json.dumps(summary, indent=1, default=str))
    return path


# --------------------------------------------------------------------------
# Spot check: the 2M run's hits against an in-process run of a 300k-cell subset
# --------------------------------------------------------------------------
SPOT_SOURCE = "scale_2M_8000g_10000t_local"
SPOT_CELLS = 300_000
SPOT_CONTROLS = 100_000
#: Share of hits both runs make (Jaccard of (program, perturbation, sign)), fixed before measuring.
SPOT_AGREEMENT = 0.9


def spot_check_cells(source: Path) -> tuple[np.ndarray, list[str]]:
    """The subset: all cells of randomly drawn targets (seed 0) and SPOT_CONTROLS control cells, SPOT_CELLS
    in all, so each kept target has as many cells as in the whole screen (the same power per target)."""
    import anndata

    backed = anndata.read_h5ad(source, backed="r")
    obs = backed.obs[["perturbation", "is_control"]].copy()
    backed.file.close()
    rng = np.random.default_rng(SEED)
    keep = np.zeros(len(obs), dtype=bool)
    keep[rng.choice(np.flatnonzero(obs["is_control"].to_numpy()), SPOT_CONTROLS, replace=False)] = True
    sizes = obs.loc[~obs["is_control"], "perturbation"].astype(str).value_counts()
    drawn = sizes.index[rng.permutation(len(sizes))]
    chosen = list(drawn[: int(np.searchsorted(sizes[drawn].cumsum().to_numpy(), SPOT_CELLS - SPOT_CONTROLS))])
    keep |= obs["perturbation"].isin(chosen).to_numpy()
    return keep, chosen


def spot_check_screen(args) -> dict:
    """The subset's screen, written once next to the 2M screen (reused when present)."""
    from perturbnmf import datasets

    whole = screen_files(args.data_dir, 2_000_000, 8000, 10_000, "gzip")
    if not whole["h5ad"].is_file():
        raise SystemExit(f"error: --spot-check needs the 2M screen {whole['h5ad']}; run --sizes 2M --cluster local first")
    files = {**whole, "h5ad": whole["h5ad"].with_name(whole["h5ad"].stem + "_subset300k.h5ad")}
    record_path = files["h5ad"].with_suffix(".write.json")
    if files["h5ad"].is_file() and record_path.is_file():
        print(f"  subset: reusing {files['h5ad']}")
        return {**json.loads(record_path.read_text()), "reused": True, "files": {k: str(v) for k, v in files.items()}}
    keep, chosen = spot_check_cells(whole["h5ad"])
    print(f"  subset: writing {files['h5ad']} ({keep.sum():,} cells: {len(chosen):,} targets and {SPOT_CONTROLS:,} "
          "controls) ...", flush=True)
    record = datasets.write_screen_subset(whole["h5ad"], files["h5ad"], keep)
    record.update(peak_tree_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  n_chosen_targets=len(chosen))
    record_path.write_text(json.dumps(record, indent=1))
    print(f"  subset: {record['nnz']:,} non-zeros, {fmt_bytes(record['bytes'])}, written in {fmt_s(record['seconds'])}")
    return {**record, "reused": False, "files": {k: str(v) for k, v in files.items()}}


def run_hits(folder: Path, targets: set[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """A run folder's gene scores (genes x programs), hits and contrasts (restricted to ``targets``)."""
    import anndata
    from perturbnmf import tl

    scores = tl.gene_scores(anndata.read_h5ad(folder / "data" / "factorized.h5ad", backed="r"))
    hits, contrasts = (pd.read_csv(folder / "data" / name) for name in ("perturbation_hits.csv", "program_contrasts.csv"))
    if targets is not None:
        hits, contrasts = (t[t["perturbation"].isin(targets)] for t in (hits, contrasts))
    return scores, hits, contrasts


def compare_hits(whole: Path, subset: Path) -> dict:
    """The whole screen's hits on the subset's targets vs the subset run's hits, programs matched one to one
    by the cosine of their gene scores (shared genes); a hit is (program, perturbation, sign of the effect)."""
    from perturbnmf.evaluation import match_programs

    sub_scores, sub_hits, sub_contrasts = run_hits(subset)
    targets = set(sub_contrasts["perturbation"])
    scores, hits, contrasts = run_hits(whole, targets)
    genes = scores.index.intersection(sub_scores.index)
    match = match_programs(scores.loc[genes].to_numpy(), sub_scores.loc[genes].to_numpy(), list(scores.columns),
                           list(sub_scores.columns))
    to_subset = dict(zip(match["planted_program"], match["program"]))
    as_set = lambda t, rename: {(rename(p), q, e > 0) for p, q, e in zip(t["program"], t["perturbation"], t["effect"])}
    a, b = as_set(hits, to_subset.get), as_set(sub_hits, lambda p: p)
    both = a & b
    paired = contrasts.assign(program=contrasts["program"].map(to_subset)).merge(
        sub_contrasts, on=["program", "perturbation"], suffixes=("", "_subset"))
    return {"n_targets": len(targets), "n_genes_shared": len(genes), "k": scores.shape[1], "k_subset": sub_scores.shape[1],
            "program_cosine": dict(zip(match["planted_program"], match["cosine"].round(4))),
            "n_hits_whole": len(a), "n_hits_subset": len(b), "n_hits_both": len(both),
            "jaccard": len(both) / max(1, len(a | b)), "whole_found_in_subset": len(both) / max(1, len(a)),
            "subset_found_in_whole": len(both) / max(1, len(b)),
            "n_opposite_sign": sum((p, q, not up) in b for p, q, up in a),
            "effect_std_correlation": float(np.corrcoef(paired["effect_std"], paired["effect_std_subset"])[0, 1])}


def spot_check(args) -> dict:
    """Write the subset, run it in process and compare its hits with the 2M run's; the verdict."""
    whole = args.data_dir / "runs" / SPOT_SOURCE
    if not (whole / "data" / "perturbation_hits.csv").is_file():
        raise SystemExit(f"error: --spot-check compares with the 2M run in {whole}; run --sizes 2M --cluster local first")
    banner(f"Spot check: the 2M run's hits vs an in-process run of a {fmt_cells(SPOT_CELLS)}-cell subset")
    screen = spot_check_screen(args)
    row = provenance() | bench_run(screen, screen["n_cells"], screen["n_genes"], screen["n_targets"], "none", args,
                                   label="spot_2M_subset300k_none")
    if row["status"] == "complete":
        row["comparison"] = compare_hits(whole, Path(row["runs"][-1]["run_folder"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "spot_check.json").write_text(json.dumps(row, indent=1, default=str))
    return row


def spot_verdict(row: dict | None) -> dict:
    name = f"2M hits = in-process hits of a {fmt_cells(SPOT_CELLS)}-cell subset on its targets"
    verdict = {"target": name, "limits": f"Jaccard of the hits >= {SPOT_AGREEMENT}"}
    if row is None:
        return verdict | {"result": "not measured", "seconds": None}
    if "comparison" not in row:
        return verdict | {"result": "NOT met", "why": f"{row['status']}: {row['explanation']}"}
    c = row["comparison"]
    ok = c["jaccard"] >= SPOT_AGREEMENT and c["n_opposite_sign"] == 0
    return verdict | {"result": "met" if ok else "NOT met", "detail": (
        f"{c['n_hits_both']:,} hits in both, {c['n_hits_whole']:,} in the 2M run and {c['n_hits_subset']:,} in the "
        f"subset's on {c['n_targets']:,} targets: Jaccard {c['jaccard']:.3f}, {c['n_opposite_sign']} of opposite sign, "
        f"effect correlation {c['effect_std_correlation']:.3f} ({row.get('when', '')[:16]}, {row.get('commit', '?')})")}


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", help="cells per screen, comma-separated (default 100k,300k,1M,2M; quick 10k,20k)")
    parser.add_argument("--genes", type=int, help="genes per screen (default 8000; quick 2000)")
    parser.add_argument("--targets", type=int, help="targets per screen (default 2,000 up to 300k cells, 10,000 above)")
    parser.add_argument("--cluster", default="none,local", help="cluster modes, comma-separated (default none,local)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"screens and runs (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--quick", action="store_true", help="10k and 20k cells x 2,000 genes, short k sweep: minutes")
    parser.add_argument("--steps", type=parse_steps, default=list(STEPS), help="all (default), none, STEP or STEP,...")
    parser.add_argument("--repeats", type=int, default=1, help="pipeline runs per size and mode; medians are quoted")
    parser.add_argument("--compression", default="gzip", choices=["gzip", "lzf", "none"],
                        help="HDF5 compression of the screens' X (default gzip: ~2.3 bytes per non-zero)")
    parser.add_argument("--timeout-min", type=float, default=0, help="stop a pipeline run after this many minutes")
    parser.add_argument("--spot-check", action="store_true",
                        help="after a 2M cluster-local run: run a 300k-cell subset in process and compare the hits")
    parser.add_argument("--write-screen", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [parse_size(s) for s in (args.sizes or (QUICK_SIZES if args.quick else "100k,300k,1M,2M")).split(",")]
    args.genes = args.genes or (QUICK_GENES if args.quick else 8000)
    args.clusters = [c.strip() for c in args.cluster.split(",")]
    if any(c not in ("none", "local") for c in args.clusters):
        parser.error("--cluster takes none and/or local")
    args.compression = None if args.compression == "none" else args.compression
    args.data_dir = args.data_dir.expanduser().resolve()
    if args.data_dir == ROOT or ROOT in args.data_dir.parents:
        parser.error("--data-dir must be outside the repository (the screens are large)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_screen:
        return write_worker(args.write_screen)
    started = time.perf_counter()
    info = machine()
    what = ("the spot check (2M screen, 300k-cell subset in process)" if args.spot_check else
            f"sizes {', '.join(fmt_cells(n) for n in args.sizes)} x {args.genes} genes, cluster {', '.join(args.clusters)}")
    print(f"bench_scale.py: {what}, steps {','.join(args.steps) or 'none'}, {'QUICK, ' if args.quick else ''}"
          f"started {time.strftime('%F %T')}\n  machine: {info['cpus']} CPUs, {fmt_gib(info['memory_bytes'])} memory "
          f"({fmt_gib(info['available_bytes'])} available), {info['platform']}; data in {args.data_dir}")
    rows = []
    for n_cells in ([] if args.spot_check else args.sizes):
        targets = args.targets or default_targets(n_cells, args.quick)
        banner(f"{fmt_cells(n_cells)} cells x {args.genes:,} genes x {targets:,} targets")
        screen = ensure_screen(args.data_dir, n_cells, args.genes, targets, args.compression)
        if not args.steps:
            continue
        size_rows = [provenance() | bench_run(screen, n_cells, args.genes, targets, cluster, args)  # commit at start
                     for cluster in args.clusters]
        print(f"\n  {fmt_cells(n_cells)} cells: per step (time from data/run.json; peak = summed RSS of the process tree)")
        print_size_table(size_rows)
        rows += size_rows
    every = rows + earlier_rows(rows, "quick_" if args.quick else "")
    if every:
        banner("Scaling")
        print_scaling_table(every)
    spot = spot_check(args) if args.spot_check else None
    saved_spot = RESULTS / "spot_check.json"
    if spot is None and saved_spot.is_file() and not args.quick:
        spot = json.loads(saved_spot.read_text())
    verdicts = judge_targets(every) + ([] if args.quick else [spot_verdict(spot)])
    banner("Targets")
    print_targets(verdicts)
    seconds = time.perf_counter() - started
    if rows:
        print(f"\n  results: {save(rows, verdicts, args, seconds)}")
    print(f"\n(total benchmark wall time {fmt_s(seconds)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
