"""Run the peer tool cNMF (Kotliar et al. 2019, PyPI ``cnmf``) on one count matrix.

Benchmark-only: run it with the peer venv's interpreter (``bash benchmarks/peers/setup.sh``
builds it), never with the project venv::

    benchmarks/peers/.venv/bin/python benchmarks/peers/run_cnmf.py \\
        --counts IN.h5ad --k 10 [--n-iter 100] [--seed 0] [--density-threshold 0.5] \\
        [--n-workers 2] --out OUTDIR

IN.h5ad holds raw integer UMI counts in X (cells x genes, gene names in var_names).
The steps are those of cNMF's README (Python API) with cNMF's own defaults apart from the
flags above: ``prepare`` (num_highvar_genes=2000, beta_loss='frobenius', init='random',
max_NMF_iter=1000, TPM computed by cNMF), ``factorize`` (``n_iter`` restarts spread over
``--n-workers`` processes with ``factorize_multi_process``; with one worker the plain
``factorize(worker_i=0, total_workers=1)``), ``combine``, ``consensus`` (local_neighborhood_size
0.30, build_ref=True, refit_usage=True; the clustergram figure is off unless
``--show-clustering``, as in cNMF's CLI, and it does not change any result) and
``load_results`` (usage normalised to sum 1 per cell).

OUTDIR receives
    usage.csv            cells x k, as load_results returns it (index = cell names), P01..Pk
    spectra_scores.csv   genes x k, cNMF's z-score gene spectra ("gene_spectra_score")
    spectra_tpm.csv      genes x k, cNMF's spectra in TPM units
    overdispersed_genes.txt   the genes cNMF factorised (one a line)
    info.json            versions, parameters, status and wall seconds per stage
cNMF's working directory (OUTDIR/cnmf_work) is removed on success unless --keep-workdir;
on failure it is kept for inspection.

Exit status: 0 success; 3 consensus failed (e.g. too few spectra left after the density
filter, typical at a low --density-threshold); 1 any other stage failed. info.json is
written in every case, with ``status`` and ``error``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
import traceback
import warnings
from importlib.metadata import version as _pkg_version

os.environ.setdefault("MPLBACKEND", "Agg")  # cNMF imports pyplot at import time
# cNMF's consensus scales a view of its TPM AnnData (tpm[:, hvgs]); scanpy then warns and
# copies. Harmless, and the copy is what cNMF intends.
warnings.filterwarnings("ignore", message="Received a view of an AnnData", category=UserWarning)

EXIT_OK, EXIT_FAIL, EXIT_CONSENSUS = 0, 1, 3
RUN_NAME = "cnmf"  # cNMF's "name": files live in OUTDIR/cnmf_work/cnmf/


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run cNMF (benchmark-only peer) with its defaults on a raw-count h5ad.")
    p.add_argument("--counts", required=True, help="input .h5ad, raw integer counts in X")
    p.add_argument("--k", required=True, type=int, help="number of programs")
    p.add_argument("--n-iter", type=int, default=100, help="NMF restarts (cNMF default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of cNMF's per-restart NMF seeds")
    p.add_argument("--density-threshold", type=float, default=0.5,
                   help="consensus local-density threshold (cNMF default 0.5; >=2 = no filter)")
    p.add_argument("--n-workers", type=int, default=2, help="factorize processes")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--show-clustering", action="store_true",
                   help="also let cNMF draw its clustergram PNG (slow; kept only with --keep-workdir)")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep cNMF's working directory OUTDIR/cnmf_work")
    a = p.parse_args(argv)
    if not a.counts.endswith(".h5ad"):
        p.error("--counts must be an .h5ad file")
    if not os.path.isfile(a.counts):
        p.error(f"--counts: no such file: {a.counts}")
    if a.k < 2:
        p.error("--k must be >= 2")
    if a.n_iter < 1:
        p.error("--n-iter must be >= 1")
    if a.n_workers < 1:
        p.error("--n-workers must be >= 1")
    if not a.density_threshold > 0:
        p.error("--density-threshold must be > 0")
    return a


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _program_names(cols, k: int) -> list[str]:
    width = max(2, len(str(k)))
    return [f"P{int(c):0{width}d}" for c in cols]


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = _parse_args(argv)
    t_start = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    work = os.path.join(out, "cnmf_work")
    if os.path.exists(work):  # a stale run would make cNMF skip/reuse files
        shutil.rmtree(work)
    info_path = os.path.join(out, "info.json")
    for stale in ("usage.csv", "spectra_scores.csv", "spectra_tpm.csv",
                  "overdispersed_genes.txt", "info.json"):
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))

    info: dict = {
        "tool": "cnmf",
        "cnmf_version": _pkg_version("cnmf"),
        "status": "running",
        "error": None,
        "counts": os.path.abspath(args.counts),
        "k": args.k,
        "n_iter": args.n_iter,
        "density_threshold": args.density_threshold,
        "seed": args.seed,
        "n_workers": args.n_workers,
        "cnmf_parameters": {
            "num_highvar_genes": 2000,
            "beta_loss": "frobenius",
            "init": "random",
            "max_NMF_iter": 1000,
            "alpha_usage": 0.0,
            "alpha_spectra": 0.0,
            "local_neighborhood_size": 0.30,
            "build_ref": True,
            "refit_usage": True,
            "normalize_tpm_spectra": False,
            "load_results_norm_usage": True,
            "show_clustering": bool(args.show_clustering),
            "kmeans_random_state": 1,
        },
        "seconds": {},
        "versions": {
            "python": platform.python_version(),
            **{m: _pkg_version(m) for m in
               ("numpy", "scipy", "scikit-learn", "pandas", "anndata", "scanpy")},
        },
        "host": {"cpu_count": os.cpu_count(),
                 "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]},
    }
    secs = info["seconds"]
    stage = "import"

    def fail(exc: BaseException, code: int) -> int:
        info["status"] = "failed"
        info["error"] = {"stage": stage, "type": type(exc).__name__, "message": str(exc)}
        if stage == "consensus":
            info["error"]["hint"] = (
                "cNMF's consensus failed; at a low --density-threshold too few replicate "
                "spectra may survive the local-density filter for k clusters. Try a higher "
                "--density-threshold (2 disables the filter) or more --n-iter.")
        info["workdir_kept"] = work if os.path.exists(work) else None
        secs["total"] = round(time.perf_counter() - t_start, 3)
        _write_json(info_path, info)
        with open(os.path.join(out, "error.log"), "w") as fh:
            traceback.print_exception(exc, file=fh)
        print(f"run_cnmf: FAILED at stage '{stage}': {type(exc).__name__}: {exc}\n"
              f"  details: {info_path} and {os.path.join(out, 'error.log')}", file=sys.stderr)
        return code

    try:
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import anndata as ad
            from cnmf import cNMF
        secs["import"] = round(time.perf_counter() - t, 3)

        stage = "input"
        a = ad.read_h5ad(args.counts, backed="r")
        info["n_cells"], info["n_genes"] = int(a.n_obs), int(a.n_vars)
        genes_unique = bool(a.var_names.is_unique)
        a.file.close()
        del a
        if not genes_unique:
            raise ValueError("var_names are not unique; cNMF selects genes by name")

        obj = cNMF(output_dir=work, name=RUN_NAME)

        stage = "prepare"
        t = time.perf_counter()
        obj.prepare(counts_fn=os.path.abspath(args.counts), components=[args.k],
                    n_iter=args.n_iter, seed=args.seed)  # num_highvar_genes=2000 (default)
        secs["prepare"] = round(time.perf_counter() - t, 3)

        stage = "factorize"
        t = time.perf_counter()
        if args.n_workers == 1:
            obj.factorize(worker_i=0, total_workers=1)
        else:
            obj.factorize_multi_process(args.n_workers)
        secs["factorize"] = round(time.perf_counter() - t, 3)

        stage = "combine"
        t = time.perf_counter()
        obj.combine(components=[args.k])
        secs["combine"] = round(time.perf_counter() - t, 3)
        from cnmf import load_df_from_npz
        merged = load_df_from_npz(obj.paths["merged_spectra"] % args.k)
        n_spectra = int(merged.shape[0])
        info["n_replicate_spectra"] = n_spectra
        if n_spectra != args.k * args.n_iter:
            raise RuntimeError(f"combine found {n_spectra} spectra, expected "
                               f"{args.k * args.n_iter} (k x n_iter); a factorize worker failed")
        del merged

        stage = "consensus"
        t = time.perf_counter()
        obj.consensus(k=args.k, density_threshold=args.density_threshold,
                      local_neighborhood_size=0.30, show_clustering=args.show_clustering,
                      close_clustergram_fig=True)
        secs["consensus"] = round(time.perf_counter() - t, 3)
        dens = load_df_from_npz(obj.paths["local_density_cache"] % args.k).iloc[:, 0]
        info["n_spectra_kept_by_density_filter"] = int((dens < args.density_threshold).sum())

        stage = "load_results"
        t = time.perf_counter()
        usage, spectra_scores, spectra_tpm, _top = obj.load_results(
            K=args.k, density_threshold=args.density_threshold)
        names = _program_names(usage.columns, args.k)
        if names != _program_names(range(1, args.k + 1), args.k):
            raise RuntimeError(f"unexpected usage columns from load_results: {list(usage.columns)}")
        usage.columns = names
        if [int(c) for c in spectra_scores.columns] != list(range(1, args.k + 1)) or \
           [int(c) for c in spectra_tpm.columns] != list(range(1, args.k + 1)):
            raise RuntimeError("unexpected spectra columns from load_results")
        spectra_scores.columns = names
        spectra_tpm.columns = names
        usage.index = usage.index.astype(str)
        usage.index.name = "cell"
        spectra_scores.index = spectra_scores.index.astype(str)
        spectra_tpm.index = spectra_tpm.index.astype(str)
        spectra_scores.index.name = spectra_tpm.index.name = "gene"
        if usage.isna().any().any():
            info["warning"] = f"{int(usage.isna().any(axis=1).sum())} cells have NaN usage"
        usage.to_csv(os.path.join(out, "usage.csv"))
        spectra_scores.to_csv(os.path.join(out, "spectra_scores.csv"))
        spectra_tpm.to_csv(os.path.join(out, "spectra_tpm.csv"))
        shutil.copyfile(obj.paths["nmf_genes_list"], os.path.join(out, "overdispersed_genes.txt"))
        secs["load_results"] = round(time.perf_counter() - t, 3)
        info["shapes"] = {"usage": list(usage.shape), "spectra_scores": list(spectra_scores.shape),
                          "spectra_tpm": list(spectra_tpm.shape)}

        stage = "cleanup"
        info["workdir_bytes"] = _dir_bytes(work)
        if args.keep_workdir:
            info["workdir_kept"] = work
        else:
            shutil.rmtree(work)
            info["workdir_kept"] = None
    except Exception as exc:  # noqa: BLE001  report every failure the same way
        return fail(exc, EXIT_CONSENSUS if stage == "consensus" else EXIT_FAIL)

    secs["total"] = round(time.perf_counter() - t_start, 3)
    info["host"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["status"] = "ok"
    _write_json(info_path, info)
    print(f"run_cnmf: ok  k={args.k} n_iter={args.n_iter} dt={args.density_threshold} "
          f"cells={info['n_cells']} genes={info['n_genes']}  "
          + "  ".join(f"{s}={secs[s]:.1f}s" for s in
                      ("prepare", "factorize", "combine", "consensus", "total")))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
