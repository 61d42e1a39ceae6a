#!/usr/bin/env python
"""Run the four perturbnmf notebooks with one YAML of parameters and render the reports.

    python run_all.py [PARAMS.yaml] [--only STEP] [--from STEP] [--debug]

Without PARAMS.yaml the demo (params/demo.yaml: a simulated screen with known truth) runs.
The YAML is checked against the notebooks' parameters cells before anything runs: unknown
keys, wrong types and out-of-range values are errors. Relative paths in it are relative to
this repository. Outputs: reports/<run_name>/index.html, one HTML per step, data/.

A run is written to a temporary folder next to the report (.<run_name>.running-<pid>) and
replaces reports/<run_name>/ only when every step succeeded. A failed or interrupted run
leaves the previous report untouched and is kept as <run_name>.failed-<timestamp>/ with
ERROR.txt. --from and --only start from a copy of the previous complete run, after
checking that its parameters and input files match the current ones.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
NOTEBOOKS = REPO_ROOT / "notebooks"
DEFAULT_PARAMS = REPO_ROOT / "params" / "demo.yaml"

#: Parameters that do not change the outputs of a step although its notebook declares them
#: (step 1 only checks that the gene-set files are readable; step 4 uses them).
NOT_AFFECTING = {"preprocess": {"gene_sets"}}
#: Parameters that never make saved outputs stale: they name the run, not what it computes.
RUN_LOCATION = {"run_name", "output_dir"}
#: Parameters naming input files, and the step whose outputs depend on the file's contents.
INPUT_FILES = {"input": "preprocess", "cell_cycle_genes": "preprocess", "gene_sets": "enrichment"}
#: Exit statuses: a step failed; the parameters or the saved run cannot be used; interrupted.
EXIT_FAILED, EXIT_REFUSED = 1, 2


class RunError(Exception):
    """The run cannot start as asked; the message says why and what to do."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived (BaseException, so that no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def parse_args(argv):
    from perturbnmf.report import STEPS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("params", nargs="?", default=str(DEFAULT_PARAMS), help="YAML parameter file (default: the demo)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--only", choices=list(STEPS),
                       help="run just this step, on the saved outputs of the earlier steps of the complete run")
    which.add_argument("--from", dest="start", choices=list(STEPS),
                       help="run this step and the ones after it, on the saved outputs of the earlier steps")
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


def _is_enrichr_name(spec: str) -> bool:
    """A gene-set library given by name (fetched from Enrichr in step 1) rather than as a file."""
    from perturbnmf.pipeline import resolve

    return not (spec.endswith(".gmt") or "/" in spec or resolve(spec).exists())


def preflight(values):
    """Cheap checks of input files before any notebook starts."""
    from perturbnmf.params import ParameterError
    from perturbnmf.pipeline import resolve

    problems = []
    if not values["simulate"]:
        files = [("input", values["input"])]
        files += [("gene_sets", p) for p in values["gene_sets"] if not _is_enrichr_name(p)]
        if values["cell_cycle_genes"]:
            files.append(("cell_cycle_genes", values["cell_cycle_genes"]))
        for key, path in files:
            if resolve(path).is_dir():
                problems.append(f"{key}: {path} is a folder, not a file (looked at {resolve(path)})")
            elif not resolve(path).is_file():
                problems.append(f"{key}: {path} not found (looked for {resolve(path)})")
    if problems:
        raise ParameterError("Input file(s) missing:\n  - " + "\n  - ".join(problems)
                             + "\nRelative paths are relative to the repository folder " + str(REPO_ROOT) + ".")


def _quiet_papermill():
    """Papermill's own parser cannot read annotations such as ``str | None`` and would warn
    "Passed unknown parameter" for them; the YAML was already checked by :func:`validate`."""
    import logging

    logging.getLogger("papermill").addFilter(
        lambda record: not record.getMessage().startswith("Passed unknown parameter")
    )


# --- kernels -----------------------------------------------------------------------------

#: Kernels started by this process: {pid: subprocess.Popen}.
_KERNELS: dict[int, object] = {}


def _ipc_kernel_manager(ipc_dir: Path, pid_file: Path):
    """A kernel manager on UNIX sockets in a private folder: no TCP port is opened, and runs
    started at the same time from the same folder cannot pick each other's sockets."""
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.transport = "ipc"
            self.ip = str(ipc_dir / "kernel")

        async def start_kernel(self, **kw):
            await super().start_kernel(**kw)
            process = getattr(self.provisioner, "process", None)
            if process is not None:
                _KERNELS[process.pid] = process
                with open(pid_file, "a") as handle:  # lets a later run wait for it and tidy up after a SIGKILL
                    handle.write(f"{process.pid} {ipc_dir}\n")

    return IPCKernelManager


def _kill_kernels(grace: float = 3.0, signals=(signal.SIGTERM, signal.SIGKILL)) -> None:
    """Stop this run's kernels that still run, with the processes they started (their process group)."""
    for pid, process in list(_KERNELS.items()):
        for signum in signals:
            if process.poll() is not None:
                break
            try:
                os.killpg(pid, signum)  # the kernel leads its own session (jupyter_client starts it so)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.05)
        _KERNELS.pop(pid, None)


def _alive(pid: int) -> bool:
    """Whether a process (not necessarily ours) still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class StepFailure:
    """Why a step did not finish."""

    step: str
    message: str
    traceback: str = ""
    status: str = "failed"
    signum: int | None = None
    refused: bool = False  # the step refused its input or parameters (exit 2), as opposed to failing


#: Exceptions with which a step refuses bad input: their message is the whole story (no traceback).
REFUSALS = {"InputError", "ParameterError", "LibraryUnavailableError", "InsufficientMemoryError"}


def run_step(step, values, declared, paths, final_root):
    """Execute one notebook into ``paths`` (the staging folder); render its HTML even when it fails.

    The notebook is told the run's final folder (``output_dir``); the environment variables
    set by :func:`main` make its ``run_paths`` write to the staging folder. Returns ``None`` or
    a :class:`StepFailure`.
    """
    import papermill as pm

    from perturbnmf.report import STEPS, render_html

    stem = paths.executed(step)
    parameters = {name: values[name] for name in declared[step]}
    parameters["output_dir"] = str(final_root)
    paths.notebooks.mkdir(parents=True, exist_ok=True)
    ipc_dir = Path(tempfile.mkdtemp(prefix="perturbnmf-kernel-"))  # mode 0700: nobody else can connect
    failure = None
    try:
        pm.execute_notebook(
            str(NOTEBOOKS / stem.name), str(stem), parameters=parameters, kernel_name="python3",
            language="python", cwd=str(REPO_ROOT), progress_bar=False, log_output=False,
            kernel_manager_class=_ipc_kernel_manager(ipc_dir, paths.root / ".kernel-pids"),
        )
        _name_final_folder(stem, final_root)
    except pm.PapermillExecutionError as err:
        if err.ename in REFUSALS:
            failure = StepFailure(step, f"step {step} ({STEPS[step][0]}.ipynb) refused the input: {err.evalue}",
                                  "\n".join(err.traceback), refused=True)
        else:
            failure = StepFailure(step, f"notebook {STEPS[step][0]}.ipynb failed in cell {err.exec_count} "
                                        f"(code cell {err.cell_index}): {err.ename}: {err.evalue}",
                                  "\n".join(err.traceback))
    except Exception as err:  # the kernel died (out of memory?), timed out, could not start ...
        hint = (" The kernel process died: was it out of memory? See Troubleshooting in README.md."
                if type(err).__name__ == "DeadKernelError" else "")
        failure = StepFailure(step, f"notebook {STEPS[step][0]}.ipynb stopped: {type(err).__name__}: {err}.{hint}",
                              traceback.format_exc())
    finally:
        _kill_kernels()
        shutil.rmtree(ipc_dir, ignore_errors=True)
        if stem.exists():
            try:
                render_html(stem, paths.html(step))
            except Exception:  # a half-written notebook of an interrupted run: keep the .ipynb
                pass
    return failure


def _name_final_folder(notebook: Path, final_root: Path) -> None:
    """Papermill records where it wrote the notebook: name the run folder, not the staging one."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    papermill = nb.metadata.get("papermill", {})
    if "output_path" in papermill:
        papermill["output_path"] = str(final_root / "notebooks" / notebook.name)
        nbformat.write(nb, str(notebook))


# --- the run folder: lock, staging, publish, failed runs ---------------------------------

def _timestamp(seconds: float | None = None) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(seconds))


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")


class RunFolder:
    """A report folder and its siblings: ``.<name>.lock``, ``.<name>.running-<pid>`` (the run in
    progress), ``.<name>.previous-<pid>`` (the old report during the swap) and
    ``<name>.failed-<timestamp>`` (failed or interrupted runs)."""

    def __init__(self, root: Path):
        from perturbnmf.report import STEPS

        self.root = root
        self.parent, self.name = root.parent, root.name
        self.staging = self.parent / f".{self.name}.running-{os.getpid()}"
        self.report_entries = ({"index.html", "notebooks", "data"} | {f"{stem}.html" for stem, _ in STEPS.values()}
                               | {".DS_Store", "Thumbs.db", ".ipynb_checkpoints"})  # a file browser's or Jupyter's
        self._lock = None

    # locking: one run per report folder at a time
    def lock(self) -> None:
        path = self.parent / f".{self.name}.lock"
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")
        except OSError as err:
            raise RunError(f"cannot write next to the run folder {self.root}: {err}") from None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            self._lock = handle
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunError(f"another run is writing {self.root} right now ({holder}). Wait for it to finish, "
                           "or give this run another run_name or output_dir.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"run_all.py process {os.getpid()}, started {_now()}\n")
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # what a previous run left behind
    def recover(self) -> list[str]:
        """Finish an interrupted swap and keep leftovers of killed runs as failed runs; return notes."""
        notes = []
        previous = sorted(self.parent.glob(f".{glob.escape(self.name)}.previous-*"), key=lambda p: p.stat().st_mtime)
        if previous and not self.root.exists():
            previous[-1].rename(self.root)
            notes.append(f"restored the report {self.root} that an interrupted run had moved to {previous[-1].name}")
            previous = previous[:-1]
        for old in previous:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in sorted(self.parent.glob(f".{glob.escape(self.name)}.running-*")):
            if leftover == self.staging:
                continue
            pid = leftover.name.rsplit("-", 1)[-1]
            self._wait_for_kernels(leftover)
            failed = self._failed_path(leftover.stat().st_mtime)
            leftover.rename(failed)
            (failed / "ERROR.txt").write_text(
                f"This run was interrupted: run_all.py (process {pid}) stopped without finishing and without "
                "cleaning up (killed with SIGKILL, out of memory, or the machine stopped).\n"
                f"It was found and renamed from {leftover.name} by the run started {_now()}.\n"
                f"These are its partial outputs. The report in {self.root} was not changed by it.\n",
                encoding="utf-8")
            notes.append(f"kept the partial outputs of an interrupted run (process {pid}) in {failed}")
        return notes

    @staticmethod
    def _wait_for_kernels(folder: Path, timeout: float = 10.0) -> None:
        """A kernel outlives a SIGKILLed run_all.py by about a second: let it finish writing, then
        remove its socket folder."""
        try:
            kernels = [line.split(" ", 1) for line in (folder / ".kernel-pids").read_text().splitlines() if line]
            pids = [int(pid) for pid, _ in kernels]
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
        for _, ipc_dir in kernels:
            if Path(ipc_dir).name.startswith("perturbnmf-kernel-"):
                shutil.rmtree(ipc_dir, ignore_errors=True)
        (folder / ".kernel-pids").unlink(missing_ok=True)

    def _failed_path(self, when: float | None = None) -> Path:
        path = self.parent / f"{self.name}.failed-{_timestamp(when)}"
        if path.exists():
            path = path.with_name(f"{path.name}-{os.getpid()}")
        return path

    def check_replaceable(self) -> None:
        """Refuse to replace a folder that holds anything a run did not write."""
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise RunError(f"{self.root} exists and is not a folder; choose another output_dir.")
        extra = sorted(set(os.listdir(self.root)) - self.report_entries)
        if extra:
            raise RunError(
                f"{self.root} exists and holds files that are not part of a perturbnmf report "
                f"({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}). A run replaces the whole folder, so "
                "choose a new or empty output_dir, or move those files away."
            )

    def start(self):
        from perturbnmf.report import RunPaths

        self.staging.mkdir()
        paths = RunPaths(self.staging)
        paths.data.mkdir()
        paths.notebooks.mkdir()
        return paths

    def publish(self) -> None:
        """Put the staging folder in place of the report: rename the old away, the new in, delete the old."""
        (self.staging / ".kernel-pids").unlink(missing_ok=True)
        if self.root.exists():
            old = self.parent / f".{self.name}.previous-{os.getpid()}"
            os.rename(self.root, old)
            os.rename(self.staging, self.root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.staging, self.root)

    def fail(self, text: str) -> Path:
        """Keep the staging folder as ``<name>.failed-<timestamp>`` with ``ERROR.txt``; return it."""
        failed = self._failed_path()
        os.rename(self.staging, failed)
        (failed / ".kernel-pids").unlink(missing_ok=True)
        (failed / "ERROR.txt").write_text(text, encoding="utf-8")
        return failed


# --- saved runs: what --from and --only start from ----------------------------------------

def input_files(values) -> dict[str, list[dict[str, str]]]:
    """``{parameter: [{path, sha256}]}`` of the input files that exist now."""
    from perturbnmf import provenance
    from perturbnmf.pipeline import resolve

    found = {}
    for name in INPUT_FILES:
        given = values.get(name)
        if not given:
            continue
        found[name] = [{"path": str(path), "sha256": provenance.sha256(resolve(path)) if resolve(path).is_file()
                        else "missing"} for path in (given if isinstance(given, list) else [given])]
    return found


def data_state(data: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(data)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(data.rglob("*"))
            if p.is_file()}


def load_saved(folder: RunFolder, flag: str) -> dict:
    run_json = folder.root / "data" / "run.json"
    if not run_json.is_file():
        raise RunError(f"{flag} starts from the saved outputs of a complete run in {folder.root}, but there is "
                       "none (no data/run.json). Run the whole pipeline first (without --from/--only).")
    saved = json.loads(run_json.read_text())
    if saved.get("status", "complete") != "complete":
        raise RunError(f"the run in {folder.root} is not complete ({saved.get('status')}); run the whole pipeline.")
    return saved


def resume_problems(saved: dict, values: dict, declared: dict, reused: list[str], root: Path) -> list[str]:
    """Every reason why the saved outputs of steps ``reused`` cannot be used with ``values``."""
    from perturbnmf import provenance

    problems = []
    for step in reused:
        status = saved.get("steps", {}).get(step, {}).get("status", "not run")
        if status != "ok":
            problems.append(f"step {step} is {status!r} in the saved run")
        elif "outputs" not in saved["steps"][step]:
            problems.append(f"the saved run does not record which files step {step} wrote (it was made by an "
                            "older run_all.py)")
        elif any(Path(name).is_absolute() or ".." in Path(name).parts for name in saved["steps"][step]["outputs"]):
            problems.append(f"the saved run.json lists files of step {step} outside data/: it was edited by hand")
    used_by: dict[str, list[str]] = {}
    for step in reused:
        for name in declared[step]:
            if name not in RUN_LOCATION and name not in NOT_AFFECTING.get(step, ()):
                used_by.setdefault(name, []).append(step)
    old_parameters = saved.get("parameters", {})
    changed = set()
    for name, steps in used_by.items():
        old = old_parameters.get(name, "<not set>")
        if old != values[name]:
            changed.add(name)
            problems.append(f"parameter {name!r} (used by step {', '.join(steps)}) was {old!r} in the saved run "
                            f"and is {values[name]!r} now")
    now = input_files(values)
    old_files = saved.get("input_files", {})
    for name, step in INPUT_FILES.items():
        if step in reused and name in now and name not in changed:  # a changed path is reported above
            for current, before in zip(now[name], old_files.get(name, [{}] * len(now[name]))):
                if current["sha256"] != "missing" and current["sha256"] != before.get("sha256"):
                    problems.append(
                        f"input file {current['path']} (parameter {name!r}, used by step {step}) has changed since "
                        f"the saved run (sha256 {str(before.get('sha256', 'not recorded'))[:12]}… then, "
                        f"{current['sha256'][:12]}… now)")
    if not any(p.startswith(("step ", "the saved run")) for p in problems):
        expected = {}
        for step in saved.get("steps", {}):  # the last step that wrote a file has its current checksum
            expected.update(saved["steps"][step].get("outputs", {}))
        for step in reused:
            for name in saved["steps"][step]["outputs"]:
                path = root / "data" / name
                if not path.is_file():
                    problems.append(f"data/{name} (written by step {step}) is missing from {root}")
                elif provenance.sha256(path) != expected[name]:
                    problems.append(f"data/{name} (written by step {step}) was changed after the saved run wrote it")
    return problems


def copy_step_outputs(saved: dict, steps: list[str], source: Path, paths) -> None:
    """Copy the data files, executed notebooks and HTML of ``steps`` from the saved run."""
    from perturbnmf.report import RunPaths

    old = RunPaths(source)
    for step in steps:
        for name in saved["steps"][step]["outputs"]:
            target = paths.data / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(old.data / name, target)
        for src, dst in ((old.executed(step), paths.executed(step)), (old.html(step), paths.html(step))):
            if src.exists():
                shutil.copy2(src, dst)


def write_params_yaml(path: Path, values: dict) -> None:
    import yaml

    path.write_text("# The parameters of this run, as validated (defaults filled in).\n"
                    "# Rerun it with: python run_all.py <this file>\n"
                    + yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")


# --- main --------------------------------------------------------------------------------

def _on_signal(signum, frame):
    raise Interrupted(signum)


def main(argv=None):
    argv = list(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    from perturbnmf import provenance
    from perturbnmf.params import ParameterError, load_yaml
    from perturbnmf.report import STEPS, final_root

    try:
        declared = declared_parameters()
        values = validate(load_yaml(args.params), declared, source=f"parameters in {args.params}")
        preflight(values)
    except ParameterError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED

    _quiet_papermill()
    all_steps = list(STEPS)
    first = args.only or args.start or all_steps[0]
    steps = [args.only] if args.only else all_steps[all_steps.index(first):]
    reused = all_steps[:all_steps.index(first)]
    later = all_steps[all_steps.index(args.only) + 1:] if args.only else []
    flag = f"--only {args.only}" if args.only else f"--from {args.start}"
    folder = RunFolder(final_root(values["run_name"], values["output_dir"]))

    try:
        folder.lock()
        for note in folder.recover():
            print(f"note: {note}")
        folder.check_replaceable()
        saved = None
        if reused or later:
            saved = load_saved(folder, flag)
            problems = resume_problems(saved, values, declared, reused, folder.root)
            if problems:
                raise RunError(
                    f"cannot use {flag}: the saved outputs of step {', '.join(reused)} in {folder.root} do not "
                    "match the current parameters and input:\n  - " + "\n  - ".join(problems)
                    + "\nRun the whole pipeline (without --from/--only), or go back to the saved values.")
            if saved.get("git_commit") != provenance.git_commit():
                print(f"note: the saved steps ({', '.join(reused)}) were made by code {saved.get('git_commit')}; "
                      f"the code now is {provenance.git_commit()}.")
    except RunError as err:
        folder.unlock()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except BaseException:
        folder.unlock()
        raise

    handlers = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(args, argv, values, declared, folder, steps, reused, later, saved)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        folder.unlock()


def _run(args, argv, values, declared, folder, steps, reused, later, saved):
    """Run ``steps`` in the staging folder; publish it, or keep it as a failed run."""
    from perturbnmf import provenance
    from perturbnmf.pipeline import resolve
    from perturbnmf.report import RUN_DIR_ENV, STAGING_DIR_ENV, STEPS, write_index

    print(f"perturbnmf: run {values['run_name']!r} → {folder.root}")
    started = _now()
    record = {"status": "running", "steps": {}}
    failure = current = paths = None
    try:
        paths = folder.start()
        os.environ[RUN_DIR_ENV], os.environ[STAGING_DIR_ENV] = str(folder.root), str(folder.staging)
        if reused:
            copy_step_outputs(saved, reused, folder.root, paths)
            for step in reused:
                record["steps"][step] = dict(saved["steps"][step], reused=True)
        for number, step in enumerate(steps, 1):
            print(f"[{number}/{len(steps)}] {STEPS[step][0]} ...", end=" ", flush=True)
            current = step
            before = data_state(paths.data)
            start = time.perf_counter()
            failure = run_step(step, values, declared, paths, folder.root)
            seconds = time.perf_counter() - start
            record["steps"][step] = {"status": "failed" if failure else "ok", "seconds": round(seconds, 2)}
            if failure:
                print(f"FAILED after {seconds:.1f} s")
                break
            after = data_state(paths.data)
            record["steps"][step]["outputs"] = {name: provenance.sha256(paths.data / name)
                                                for name, state in after.items() if before.get(name) != state}
            print(f"done in {seconds:.1f} s")
        current = None
        if later and not failure:
            rerun = record["steps"][args.only]["outputs"]
            if rerun == saved["steps"][args.only]["outputs"] and not resume_problems(saved, values, declared, later,
                                                                                      folder.root):
                copy_step_outputs(saved, later, folder.root, paths)
                for step in later:
                    record["steps"][step] = dict(saved["steps"][step], reused=True)
            else:
                print(f"note: the saved steps {', '.join(later)} no longer match (step {args.only} wrote different "
                      "outputs, or their parameters changed), so they are left out of the report; add them with "
                      f"--from {later[0]}.")
    except (Interrupted, KeyboardInterrupt) as err:
        signum = err.signum if isinstance(err, Interrupted) else int(signal.SIGINT)
        _kill_kernels(signals=(signal.SIGKILL,))  # the run is abandoned: no need for the kernel to tidy up
        if current:
            record["steps"][current] = {"status": "interrupted"}
        failure = StepFailure(current or "", f"interrupted by {signal.Signals(signum).name}"
                              + (f" during step {current}" if current else ""), status="interrupted", signum=signum)
        print(f"INTERRUPTED ({signal.Signals(signum).name})")
    except Exception as err:  # a bug of run_all.py or a full disk: still never touch the previous report
        failure = StepFailure("", f"run_all.py stopped: {type(err).__name__}: {err}", traceback.format_exc())

    record["status"] = failure.status if failure else "complete"
    files = input_files(values)
    record.update(provenance.collect(values, resolve(values["input"]), input_sha256=files["input"][0]["sha256"]))
    record.update(
        command=[Path(sys.argv[0]).name, *argv], started=started, finished=_now(), input_files=files,
        rerun=f"python run_all.py {folder.root / 'data' / 'params.yaml'}",
    )
    if reused:
        record["resumed"] = {"reused_steps": reused, "saved_git_commit": saved.get("git_commit"),
                             "saved_finished": saved.get("finished")}
    try:
        if paths is None:
            raise RuntimeError("the staging folder could not be made")
        write_params_yaml(paths.data / "params.yaml", values)
        paths.run_json.write_text(json.dumps(record, indent=2, default=str))
        index = write_index(paths, record, fdr=values["fdr"])
        if not failure:
            folder.publish()
    except Exception as err:
        if not failure:
            failure = StepFailure("", f"run_all.py could not finish the report: {type(err).__name__}: {err}",
                                  traceback.format_exc())
    finally:
        for name in (RUN_DIR_ENV, STAGING_DIR_ENV):
            os.environ.pop(name, None)

    if not failure:
        print(f"\nReport: {folder.root / index.relative_to(folder.staging)}")
        return 0

    previous = (f"The previous complete report in {folder.root} is unchanged." if folder.root.exists() else
                f"No report was written to {folder.root} (there was none before).")
    text = (f"perturbnmf run {values['run_name']!r}: {failure.status.upper()}\n{failure.message}\n\n"
            f"Started {started}, stopped {_now()}; command: {' '.join(record['command'])}\n"
            f"These are the partial outputs of that run. {previous}\n"
            + (f"\n{_plain(failure.traceback)}\n" if failure.traceback else ""))
    failed = None
    if folder.staging.exists():
        try:
            failed = folder.fail(text)
        except OSError:
            failed = None
    where = (f"The partial run is kept in {failed} (see ERROR.txt"
             + (f" and {Path(STEPS[failure.step][0]).name}.html" if failure.step in STEPS else "") + ").")
    print(f"\nerror: {failure.message}\n" + (f"{where}\n" if failed else "") + previous, file=sys.stderr)
    if args.debug and failure.traceback:
        print(_plain(failure.traceback), file=sys.stderr)
    elif failure.traceback:
        print("(run with --debug to see the traceback)", file=sys.stderr)
    if failure.signum:
        return 128 + failure.signum
    return EXIT_REFUSED if failure.refused else EXIT_FAILED


def _plain(text: str) -> str:
    """A traceback without the terminal colour codes of IPython's."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


if __name__ == "__main__":
    sys.exit(main())
