"""Run the four notebooks of a run: checks first, then each step with papermill, then publish.

:func:`run` is ``run_all.py``'s whole job after parsing its arguments. It validates the YAML
against the parameter schema and checks the input files before any kernel starts, runs each
step's notebook in a private kernel (UNIX sockets in a 0700 folder), renders its HTML even
when it fails, records what each step wrote (``data/run.json``), and publishes the staging
folder only when every step succeeded (:class:`~perturbnmf.report.runfolder.RunFolder`).
``--from`` / ``--only`` reuse the saved outputs of earlier steps after checking that their
parameters, input files and outputs are unchanged.

Exit statuses: 0 complete; 1 a step failed; 2 refused (bad parameters or input, or a run
folder that cannot be used); 128 + N interrupted by signal N.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ParameterError, refusal_names
from . import artifacts, engine, inputs, provenance
from .index import write_index
from .params import PARAMETERS, declared, load_yaml, validate
from .runfolder import (REPO_ROOT, RUN_DIR_ENV, STAGING_DIR_ENV, STEPS, RunError, RunFolder, RunPaths, final_root,
                        now, resolve)

__all__ = ["run", "EXIT_FAILED", "EXIT_REFUSED"]

NOTEBOOKS = REPO_ROOT / "notebooks"
#: Exit statuses: a step failed; the parameters or the saved run cannot be used.
EXIT_FAILED, EXIT_REFUSED = 1, 2
#: Exceptions with which a step refuses bad input: their message is the whole story (no traceback).
REFUSALS = refusal_names()


class Interrupted(BaseException):
    """SIGTERM or SIGHUP arrived (BaseException, so that no ``except Exception`` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class StepFailure:
    """Why a step (or the run) did not finish."""

    step: str
    message: str
    traceback: str = ""
    status: str = "failed"
    signum: int | None = None
    refused: bool = False  # the step refused its input or parameters (exit 2), as opposed to failing


@dataclass
class Plan:
    """Which steps run, which saved ones are reused before (``reused``) or after (``later``, --only)."""

    steps: list[str]
    reused: list[str]
    later: list[str]
    flag: str
    only: str | None

    @classmethod
    def from_args(cls, only: str | None, start: str | None) -> Plan:
        all_steps = list(STEPS)
        first = all_steps.index(only or start or all_steps[0])
        return cls(steps=[only] if only else all_steps[first:], reused=all_steps[:first],
                   later=all_steps[first + 1:] if only else [], flag=f"--only {only}" if only else f"--from {start}",
                   only=only)


@dataclass
class Run:
    """One invocation: its parameters, folder, plan, the saved run it resumes, and its record."""

    values: dict[str, Any]
    folder: RunFolder
    plan: Plan
    argv: list[str]
    saved: dict | None = None
    record: dict[str, Any] = field(default_factory=lambda: {"status": "running", "steps": {}})
    started: str = field(default_factory=now)


# --- before any kernel: parameters and input files --------------------------------------------

def preflight(values: dict[str, Any]) -> None:
    """Cheap checks of the input files, and of the cluster's address, before any notebook starts."""
    if values["cluster"] not in (None, "local"):
        engine.check_reachable(values["cluster"])
    if values["simulate"]:
        return
    files = [("input", values["input"])]
    files += [("gene_sets", p) for p in values["gene_sets"] if not inputs.is_enrichr_name(p)]
    if values["cell_cycle_genes"]:
        files.append(("cell_cycle_genes", values["cell_cycle_genes"]))
    problems = []
    for key, path in files:
        if resolve(path).is_dir():
            problems.append(f"{key}: {path} is a folder, not a file (looked at {resolve(path)})")
        elif not resolve(path).is_file():
            problems.append(f"{key}: {path} not found (looked for {resolve(path)})")
    if problems:
        raise ParameterError("Input file(s) missing:\n  - " + "\n  - ".join(problems)
                             + "\nRelative paths are relative to the repository folder " + str(REPO_ROOT) + ".")


def _quiet_papermill() -> None:
    """Papermill's own parser cannot read annotations such as ``str | None`` and would warn
    "Passed unknown parameter" for them; the YAML was already checked by :func:`validate`."""
    import logging

    logging.getLogger("papermill").addFilter(
        lambda record: not record.getMessage().startswith("Passed unknown parameter")
    )


# --- kernels -----------------------------------------------------------------------------------

#: The kernel process's own output, in its private folder (see :func:`_ipc_kernel_manager`).
KERNEL_LOG = "kernel.log"
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
            # the kernel process's own output (its log, e.g. "KeyboardInterrupt caught in kernel" when
            # jupyter_client interrupts it at shutdown) goes to a file, not the console; cells' output is in
            # the notebook, and the file's tail joins the message when the kernel dies
            # (in the step's private folder, removed after the step; the kernel keeps its own descriptor,
            # so this process closes its handle once the kernel has started)
            with open(ipc_dir / KERNEL_LOG, "ab") as log:
                kw.setdefault("stdout", log)
                kw.setdefault("stderr", log)
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


# --- one step ----------------------------------------------------------------------------------

def _step_failure(step: str, err: BaseException) -> StepFailure:
    """What to tell the user about an exception from papermill running ``step``'s notebook."""
    import papermill as pm

    notebook = f"{STEPS[step][0]}.ipynb"
    if isinstance(err, pm.PapermillExecutionError):
        if err.ename in REFUSALS:
            return StepFailure(step, f"step {step} ({notebook}) refused the input: {err.evalue}",
                               "\n".join(err.traceback), refused=True)
        return StepFailure(step, f"notebook {notebook} failed in cell {err.exec_count} (code cell {err.cell_index}): "
                                 f"{err.ename}: {err.evalue}", "\n".join(err.traceback))
    hint = (" The kernel process died: was it out of memory? See Troubleshooting in README.md."
            if type(err).__name__ == "DeadKernelError" else "")
    return StepFailure(step, f"notebook {notebook} stopped: {type(err).__name__}: {err}.{hint}",
                       "".join(traceback.format_exception(err)))


def run_step(step: str, values: dict[str, Any], paths: RunPaths, final: Path) -> StepFailure | None:
    """Execute one notebook into ``paths`` (the staging folder); render its HTML even when it fails.

    The notebook is told the run's final folder (``output_dir``); the environment variables
    set by :func:`run` make its ``run_paths`` write to the staging folder.
    """
    import papermill as pm

    executed = paths.executed(step)
    parameters = {name: values[name] for name in declared(step)} | {"output_dir": str(final)}
    ipc_dir = Path(tempfile.mkdtemp(prefix="perturbnmf-kernel-"))  # mode 0700: nobody else can connect
    failure = None
    try:
        with engine.echo_progress(ipc_dir / "progress.log"):
            pm.execute_notebook(
                str(NOTEBOOKS / executed.name), str(executed), parameters=parameters, kernel_name="python3",
                language="python", cwd=str(REPO_ROOT), progress_bar=False, log_output=False,
                kernel_manager_class=_ipc_kernel_manager(ipc_dir, paths.root / ".kernel-pids"),
            )
        _name_final_folder(executed, final)
    except Exception as err:  # a failing cell, a dead kernel (out of memory?), a kernel that would not start
        failure = _step_failure(step, err)
        failure.traceback += _tail(ipc_dir / KERNEL_LOG)
    finally:
        _kill_kernels()
        shutil.rmtree(ipc_dir, ignore_errors=True)
        _render(executed, paths.html(step))
    return failure


def _tail(path: Path, n_lines: int = 20) -> str:
    """The last lines of the kernel's own output, for a failure's message ("" when it wrote nothing)."""
    try:
        lines = path.read_text(errors="replace").splitlines()[-n_lines:]
    except OSError:
        return ""
    return "\n\nThe kernel's last output:\n" + "\n".join(lines) if lines else ""


def _render(executed: Path, html_path: Path) -> None:
    from .html import render_html

    if executed.exists():
        try:
            render_html(executed, html_path)
        except Exception:  # a half-written notebook of an interrupted run: keep the .ipynb
            pass


def _name_final_folder(notebook: Path, final: Path) -> None:
    """Papermill records where it wrote the notebook: name the run folder, not the staging one."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    papermill = nb.metadata.get("papermill", {})
    if "output_path" in papermill:
        papermill["output_path"] = str(final / "notebooks" / notebook.name)
        nbformat.write(nb, str(notebook))


# --- saved runs: what --from and --only start from ---------------------------------------------

def input_files(values: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    """``{parameter: [{path, sha256}]}`` of the input files that exist now."""
    found = {}
    for parameter in PARAMETERS.values():
        given = values.get(parameter.name) if parameter.input_file else None
        if given:
            found[parameter.name] = [
                {"path": str(path), "sha256": provenance.sha256(resolve(path)) if resolve(path).is_file() else "missing"}
                for path in (given if isinstance(given, list) else [given])]
    return found


def data_state(data: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(data)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(data.rglob("*"))
            if p.is_file()}


def load_saved(folder: RunFolder, flag: str) -> dict:
    run_json = RunPaths.at(folder.root).run_json
    if not run_json.is_file():
        raise RunError(f"{flag} starts from the saved outputs of a complete run in {folder.root}, but there is "
                       "none (no data/run.json). Run the whole pipeline first (without --from/--only).")
    saved = json.loads(run_json.read_text())
    if saved.get("status", "complete") != "complete":
        raise RunError(f"the run in {folder.root} is not complete ({saved.get('status')}); run the whole pipeline.")
    return saved


def _unusable_steps(saved: dict, reused: list[str]) -> list[str]:
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
    return problems


def _changed_parameters(saved: dict, values: dict, reused: list[str]) -> dict[str, str]:
    """``{name: problem}`` for every parameter that affects a reused step and changed since the saved run."""
    old = saved.get("parameters", {})
    changed = {}
    for parameter in PARAMETERS.values():
        steps = [step for step in reused if step in parameter.affected_steps]
        if steps and old.get(parameter.name, "<not set>") != values[parameter.name]:
            changed[parameter.name] = (
                f"parameter {parameter.name!r} (used by step {', '.join(steps)}) was "
                f"{old.get(parameter.name, '<not set>')!r} in the saved run and is {values[parameter.name]!r} now")
    return changed


def _changed_inputs(saved: dict, values: dict, reused: list[str], changed: set[str]) -> list[str]:
    problems, old_files = [], saved.get("input_files", {})
    for name, now_files in input_files(values).items():
        step = PARAMETERS[name].affected_steps[0]
        if step not in reused or name in changed:  # a changed path is reported with the parameters
            continue
        for current, before in zip(now_files, old_files.get(name, [{}] * len(now_files))):
            if current["sha256"] != "missing" and current["sha256"] != before.get("sha256"):
                problems.append(
                    f"input file {current['path']} (parameter {name!r}, used by step {step}) has changed since the "
                    f"saved run (sha256 {str(before.get('sha256', 'not recorded'))[:12]}… then, "
                    f"{current['sha256'][:12]}… now)")
    return problems


def _changed_outputs(saved: dict, reused: list[str], root: Path) -> list[str]:
    problems, expected = [], {}
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


def resume_problems(saved: dict, values: dict, reused: list[str], root: Path) -> list[str]:
    """Every reason why the saved outputs of steps ``reused`` cannot be used with ``values``."""
    problems = _unusable_steps(saved, reused)
    changed = _changed_parameters(saved, values, reused)
    problems += list(changed.values()) + _changed_inputs(saved, values, reused, set(changed))
    if not any(p.startswith(("step ", "the saved run")) for p in problems):
        problems += _changed_outputs(saved, reused, root)
    return problems


def copy_step_outputs(saved: dict, steps: list[str], source: Path, paths: RunPaths) -> None:
    """Copy the data files, executed notebooks and HTML of ``steps`` from the saved run."""
    old = RunPaths.at(source)
    for step in steps:
        for name in saved["steps"][step]["outputs"]:
            target = paths.data / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(old.data / name, target)
        for src, dst in ((old.executed(step), paths.executed(step)), (old.html(step), paths.html(step))):
            if src.exists():
                shutil.copy2(src, dst)


# --- the run -----------------------------------------------------------------------------------

def _prepare(run: Run) -> None:
    """Lock the folder, tidy what earlier runs left, and check the saved run that --from/--only reuse."""
    folder, plan = run.folder, run.plan
    folder.lock()
    for note in folder.recover():
        print(f"note: {note}")
    folder.check_replaceable()
    if not (plan.reused or plan.later):
        return
    run.saved = load_saved(folder, plan.flag)
    problems = resume_problems(run.saved, run.values, plan.reused, folder.root)
    if problems:
        raise RunError(
            f"cannot use {plan.flag}: the saved outputs of step {', '.join(plan.reused)} in {folder.root} do not "
            "match the current parameters and input:\n  - " + "\n  - ".join(problems)
            + "\nRun the whole pipeline (without --from/--only), or go back to the saved values.")
    if run.saved.get("git_commit") != provenance.git_commit():
        print(f"note: the saved steps ({', '.join(plan.reused)}) were made by code {run.saved.get('git_commit')}; "
              f"the code now is {provenance.git_commit()}.")


def _execute(run: Run, paths: RunPaths) -> StepFailure | None:
    """Run the planned steps in the staging folder; return the failure that stopped them, if any."""
    steps = run.record["steps"]
    for number, step in enumerate(run.plan.steps, 1):
        print(f"[{number}/{len(run.plan.steps)}] {STEPS[step][0]} ...", end=" ", flush=True)
        before = data_state(paths.data)
        start = time.perf_counter()
        try:
            failure = run_step(step, run.values, paths, run.folder.root)
        except (Interrupted, KeyboardInterrupt):
            steps[step] = {"status": "interrupted"}
            raise
        seconds = time.perf_counter() - start
        steps[step] = {"status": "failed" if failure else "ok", "seconds": round(seconds, 2)}
        if failure:
            print(f"FAILED after {seconds:.1f} s")
            return failure
        steps[step]["outputs"] = {name: provenance.sha256(paths.data / name)
                                  for name, state in data_state(paths.data).items() if before.get(name) != state}
        print(f"done in {seconds:.1f} s")
    return None


def _reuse(run: Run, steps: list[str], paths: RunPaths) -> None:
    copy_step_outputs(run.saved, steps, run.folder.root, paths)
    for step in steps:
        run.record["steps"][step] = dict(run.saved["steps"][step], reused=True)


def _reuse_later(run: Run, paths: RunPaths) -> None:
    """--only: keep the saved later steps when the rerun step wrote the same files as before."""
    plan = run.plan
    rerun = run.record["steps"][plan.only]["outputs"]
    if rerun == run.saved["steps"][plan.only]["outputs"] and not resume_problems(run.saved, run.values, plan.later,
                                                                                  run.folder.root):
        _reuse(run, plan.later, paths)
    else:
        print(f"note: the saved steps {', '.join(plan.later)} no longer match (step {plan.only} wrote different "
              f"outputs, or their parameters changed), so they are left out of the report; add them with "
              f"--from {plan.later[0]}.")


def _run_steps(run: Run) -> tuple[RunPaths | None, StepFailure | None]:
    """Stage the run, execute its steps and reuse saved ones; failures and signals become a StepFailure."""
    paths = None
    try:
        paths = run.folder.start()
        os.environ[RUN_DIR_ENV], os.environ[STAGING_DIR_ENV] = str(run.folder.root), str(run.folder.staging)
        if run.plan.reused:
            _reuse(run, run.plan.reused, paths)
        with engine.cluster_for_run(run.values["cluster"]):  # one cluster for all the steps that run
            failure = _execute(run, paths)
        if run.plan.later and not failure:
            _reuse_later(run, paths)
        return paths, failure
    except (Interrupted, KeyboardInterrupt) as err:
        signum = err.signum if isinstance(err, Interrupted) else int(signal.SIGINT)
        _kill_kernels(signals=(signal.SIGKILL,))  # the run is abandoned: no need for the kernel to tidy up
        current = next((s for s, v in run.record["steps"].items() if v.get("status") == "interrupted"), "")
        print(f"INTERRUPTED ({signal.Signals(signum).name})")
        return paths, StepFailure(current, f"interrupted by {signal.Signals(signum).name}"
                                  + (f" during step {current}" if current else ""), status="interrupted", signum=signum)
    except Exception as err:  # a bug of the runner or a full disk: still never touch the previous report
        return paths, StepFailure("", f"run_all.py stopped: {type(err).__name__}: {err}", traceback.format_exc())


def _finish_record(run: Run, failure: StepFailure | None) -> None:
    record, values = run.record, run.values
    record["status"] = failure.status if failure else "complete"
    files = input_files(values)
    record.update(provenance.collect(values, resolve(values["input"]), input_sha256=files["input"][0]["sha256"]))
    record.update(command=[Path(sys.argv[0]).name, *run.argv], started=run.started, finished=now(),
                  input_files=files, rerun=f"python run_all.py {RunPaths.at(run.folder.root).params_yaml}")
    if run.plan.reused:
        record["resumed"] = {"reused_steps": run.plan.reused, "saved_git_commit": run.saved.get("git_commit"),
                             "saved_finished": run.saved.get("finished")}


def _write_and_publish(run: Run, paths: RunPaths | None, failure: StepFailure | None) -> StepFailure | None:
    """run.json, params.yaml and index.html into the staging folder; publish it when nothing failed."""
    try:
        if paths is None:
            raise RuntimeError("the staging folder could not be made")
        artifacts.save_params_yaml(paths.params_yaml, run.values)
        paths.run_json.write_text(json.dumps(run.record, indent=2, default=str))
        write_index(paths, run.record, fdr=run.values["fdr"])
        if not failure:
            run.folder.publish()
    except Exception as err:
        if not failure:
            failure = StepFailure("", f"run_all.py could not finish the report: {type(err).__name__}: {err}",
                                  traceback.format_exc())
    finally:
        for name in (RUN_DIR_ENV, STAGING_DIR_ENV):
            os.environ.pop(name, None)
    return failure


def _report_failure(run: Run, failure: StepFailure, debug: bool) -> int:
    """Keep the partial run with ERROR.txt, tell the user where, return the exit status."""
    folder = run.folder
    previous = (f"The previous complete report in {folder.root} is unchanged." if folder.root.exists() else
                f"No report was written to {folder.root} (there was none before).")
    text = (f"perturbnmf run {run.values['run_name']!r}: {failure.status.upper()}\n{failure.message}\n\n"
            f"Started {run.started}, stopped {now()}; command: {' '.join(run.record['command'])}\n"
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
    if debug and failure.traceback:
        print(_plain(failure.traceback), file=sys.stderr)
    elif failure.traceback:
        print("(run with --debug to see the traceback)", file=sys.stderr)
    if failure.signum:
        return 128 + failure.signum
    return EXIT_REFUSED if failure.refused else EXIT_FAILED


def _plain(text: str) -> str:
    """A traceback without the terminal colour codes of IPython's."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _on_signal(signum, frame):
    raise Interrupted(signum)


def _run(run: Run, debug: bool) -> int:
    print(f"perturbnmf: run {run.values['run_name']!r} → {run.folder.root}")
    paths, failure = _run_steps(run)
    _finish_record(run, failure)
    failure = _write_and_publish(run, paths, failure)
    if not failure:
        print(f"\nReport: {run.folder.root / 'index.html'}")
        return 0
    return _report_failure(run, failure, debug)


def run(params_file: str, only: str | None = None, start: str | None = None, debug: bool = False,
        argv: list[str] | None = None) -> int:
    """Run the pipeline on the parameters in ``params_file``; return the exit status."""
    try:
        values = validate(load_yaml(params_file), source=f"parameters in {params_file}")
        preflight(values)
    except ParameterError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    _quiet_papermill()
    run = Run(values, RunFolder(final_root(values["run_name"], values["output_dir"])), Plan.from_args(only, start),
              list(argv or []))
    try:
        _prepare(run)
    except RunError as err:
        run.folder.unlock()
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except BaseException:
        run.folder.unlock()
        raise
    handlers = {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(run, debug)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        run.folder.unlock()
