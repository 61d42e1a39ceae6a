#!/usr/bin/env python
"""Run the four perturbnmf notebooks with one YAML of parameters and render the reports.

    python run_all.py [PARAMS.yaml] [--only STEP] [--from STEP] [--debug]

Without PARAMS.yaml the demo (params/demo.yaml: a simulated screen with known truth) runs.
The YAML is checked against the notebooks' parameters cells before anything runs: unknown
keys, wrong types and out-of-range values are errors. Relative paths in it are relative to
this repository. Outputs: reports/<run_name>/index.html, one HTML per step, data/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
NOTEBOOKS = REPO_ROOT / "notebooks"
DEFAULT_PARAMS = REPO_ROOT / "params" / "demo.yaml"


def parse_args(argv):
    from perturbnmf.report import STEPS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("params", nargs="?", default=str(DEFAULT_PARAMS), help="YAML parameter file (default: the demo)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--only", choices=list(STEPS), help="run just this step (earlier outputs must exist)")
    which.add_argument("--from", dest="start", choices=list(STEPS), help="run this step and the ones after it")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_args(argv)


def declared_parameters():
    """{step: {name: Parameter}} from each notebook's parameters cell."""
    from perturbnmf.params import read_parameters_cell
    from perturbnmf.report import STEPS

    return {step: read_parameters_cell(NOTEBOOKS / f"{stem}.ipynb") for step, (stem, _) in STEPS.items()}


def validate(values, declared, source):
    """Merge the steps' declarations (shared names must agree) and validate the YAML against them."""
    from perturbnmf.params import ParameterError, validate as validate_values

    merged = {}
    for step, params in declared.items():
        for name, parameter in params.items():
            if name in merged and (merged[name].annotation, merged[name].default) != (parameter.annotation, parameter.default):
                raise ParameterError(f"notebooks disagree on parameter {name!r} (type or default); fix the notebooks.")
            merged.setdefault(name, parameter)
    return validate_values(values, merged, source=source)


def preflight(values):
    """Cheap checks of input files before any notebook starts."""
    from perturbnmf.params import ParameterError
    from perturbnmf.pipeline import resolve

    missing = []
    if not values["simulate"]:
        files = [("input", values["input"])] + [("gene_sets", p) for p in values["gene_sets"]]
        if values["cell_cycle_genes"]:
            files.append(("cell_cycle_genes", values["cell_cycle_genes"]))
        missing = [f"{key}: {path} (looked for {resolve(path)})" for key, path in files if not resolve(path).is_file()]
    if missing:
        raise ParameterError("Input file(s) not found:\n  - " + "\n  - ".join(missing)
                             + "\nRelative paths are relative to the repository folder " + str(REPO_ROOT) + ".")


def _quiet_papermill():
    """Papermill's own parser cannot read annotations such as ``str | None`` and would warn
    "Passed unknown parameter" for them; the YAML was already checked by :func:`validate`."""
    import logging

    logging.getLogger("papermill").addFilter(
        lambda record: not record.getMessage().startswith("Passed unknown parameter")
    )


def _ipc_kernel_manager():
    """A kernel manager on local UNIX sockets: no TCP port is opened for the kernel."""
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"

    return IPCKernelManager


def run_step(step, values, declared, paths):
    """Execute one notebook with its parameters; render its HTML even when it fails."""
    import papermill as pm

    from perturbnmf.report import render_html

    stem = paths.executed(step)
    parameters = {name: values[name] for name in declared[step]}
    parameters["output_dir"] = str(paths.root)
    paths.notebooks.mkdir(parents=True, exist_ok=True)
    error = None
    try:
        pm.execute_notebook(
            str(NOTEBOOKS / stem.name), str(stem), parameters=parameters, kernel_name="python3",
            language="python", cwd=str(REPO_ROOT), progress_bar=False, log_output=False,
            kernel_manager_class=_ipc_kernel_manager(),
        )
    except pm.PapermillExecutionError as err:
        error = err
    finally:
        if stem.exists():
            render_html(stem, paths.html(step))
    return error


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    from perturbnmf import provenance
    from perturbnmf.params import ParameterError, load_yaml
    from perturbnmf.pipeline import resolve
    from perturbnmf.report import STEPS, run_paths, write_index

    try:
        declared = declared_parameters()
        values = validate(load_yaml(args.params), declared, source=f"parameters in {args.params}")
        preflight(values)
    except ParameterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    _quiet_papermill()
    steps = list(STEPS)
    if args.only:
        steps = [args.only]
    elif args.start:
        steps = steps[steps.index(args.start):]
    paths = run_paths(values["run_name"], values["output_dir"])
    record = json.loads(paths.run_json.read_text()) if paths.run_json.exists() and steps != list(STEPS) else {}
    record.setdefault("steps", {})
    print(f"perturbnmf: run {values['run_name']!r} → {paths.root}")
    failed = None
    for number, step in enumerate(steps, 1):
        print(f"[{number}/{len(steps)}] {STEPS[step][0]} ...", end=" ", flush=True)
        start = time.perf_counter()
        error = run_step(step, values, declared, paths)
        seconds = time.perf_counter() - start
        record["steps"][step] = {"status": "failed" if error else "ok", "seconds": round(seconds, 2)}
        if error:
            print(f"FAILED after {seconds:.1f} s")
            failed = (step, error)
            break
        print(f"done in {seconds:.1f} s")

    record.update(provenance.collect(values, resolve(values["input"])))
    paths.run_json.write_text(json.dumps(record, indent=2, default=str))
    index = write_index(paths, record, fdr=values["fdr"])
    if failed:
        step, error = failed
        print(
            f"\nerror: notebook {STEPS[step][0]}.ipynb failed in cell {error.exec_count} "
            f"(code cell {error.cell_index}): {error.ename}: {error.evalue}\n"
            f"The failed notebook is rendered at {paths.html(step)}",
            file=sys.stderr,
        )
        if args.debug:
            print("\n".join(error.traceback), file=sys.stderr)
        return 1
    print(f"\nReport: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
