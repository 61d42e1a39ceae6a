"""Where a run's files live: the repository root, the steps, the run folder and its staging.

A run writes ``reports/<run_name>/`` (or ``output_dir``)::

    index.html                 key results, links, parameters, provenance
    01_preprocess.html ...     one self-contained report per step
    notebooks/*.ipynb          the executed notebooks
    data/                      h5ad, CSV, xlsx and run.json (the contract later steps use)

The runner writes a run into a temporary sibling folder ``.<run_name>.running-<pid>`` and puts
it in place only when every step succeeded; a failed or interrupted run is kept as
``<run_name>.failed-<timestamp>/`` (with ``ERROR.txt``) and the previous report stays as it was.
"""

from __future__ import annotations

import glob
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["REPO_ROOT", "STEPS", "RunPaths", "RunFolder", "RunError", "resolve", "run_paths", "final_root",
           "staging_root", "public_path", "RUN_DIR_ENV", "STAGING_DIR_ENV"]

#: The repository: relative paths in parameters are relative to it.
REPO_ROOT = Path(__file__).resolve().parents[3]

#: step name -> (notebook file stem, title)
STEPS = {
    "preprocess": ("01_preprocess", "1 · Preprocess: QC, normalisation, cell cycle, gene selection"),
    "factorize": ("02_factorize", "2 · Factorise: gene programs (consensus NMF or semi-NMF)"),
    "stats": ("03_stats", "3 · Statistics: which perturbations shift which programs"),
    "enrichment": ("04_enrichment", "4 · Enrichment: what each program is"),
}

#: Set by the runner while a run is in progress: the run folder (``RUN_DIR_ENV``) whose files
#: are written to a temporary staging folder (``STAGING_DIR_ENV``) until every step succeeded.
RUN_DIR_ENV = "PERTURBNMF_RUN_DIR"
STAGING_DIR_ENV = "PERTURBNMF_STAGING_DIR"


class RunError(Exception):
    """The run cannot start as asked (its folder is locked, foreign or inconsistent); the message says why."""


def resolve(path: str | Path) -> Path:
    """A parameter path: absolute as given, relative ones against the repository root."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


@dataclass(frozen=True)
class RunPaths:
    """Every file of a run, by name (make one with :meth:`at`)."""

    root: Path
    data: Path
    notebooks: Path
    preprocessed: Path
    genes: Path
    factorized: Path
    k_sweep: Path
    k_selection_json: Path
    program_anova: Path
    program_contrasts: Path
    perturbation_summary: Path
    guide_effects: Path
    split_half: Path
    calibration_null: Path
    calibration_json: Path
    recovery_json: Path
    top_genes: Path
    enrichment: Path
    program_labels: Path
    top_terms: Path
    prerank: Path
    perturbation_hits: Path
    summary_xlsx: Path
    run_json: Path
    params_yaml: Path

    @classmethod
    def at(cls, root: str | Path) -> RunPaths:
        root = Path(root)
        data = root / "data"
        return cls(
            root=root, data=data, notebooks=root / "notebooks",
            preprocessed=data / "preprocessed.h5ad", genes=data / "genes.csv", factorized=data / "factorized.h5ad",
            k_sweep=data / "k_sweep.csv", k_selection_json=data / "k_selection.json",
            program_anova=data / "program_anova.csv", program_contrasts=data / "program_contrasts.csv",
            perturbation_summary=data / "perturbation_summary.csv",
            guide_effects=data / "guide_effects.csv", split_half=data / "split_half.csv",
            calibration_null=data / "calibration_null.csv", calibration_json=data / "calibration.json",
            recovery_json=data / "demo_recovery.json", top_genes=data / "top_genes.csv",
            enrichment=data / "enrichment.csv", program_labels=data / "program_labels.csv",
            top_terms=data / "top_terms.csv", prerank=data / "prerank.csv",
            perturbation_hits=data / "perturbation_hits.csv", summary_xlsx=data / "summary.xlsx",
            run_json=data / "run.json", params_yaml=data / "params.yaml",
        )

    def html(self, step: str) -> Path:
        return self.root / f"{STEPS[step][0]}.html"

    def executed(self, step: str) -> Path:
        return self.notebooks / f"{STEPS[step][0]}.ipynb"


def final_root(run_name: str, output_dir: str | None = None) -> Path:
    """Where the complete report of a run lives: ``output_dir`` if given, else ``reports/<run_name>``."""
    root = Path(output_dir) if output_dir else REPO_ROOT / "reports" / run_name
    if not root.is_absolute():  # as every path parameter: relative to the repository
        root = REPO_ROOT / root
    return root.resolve()


def staging_root(root: Path) -> Path | None:
    """The staging folder that stands in for run folder ``root`` while the runner runs, if any."""
    run_dir, staging = os.environ.get(RUN_DIR_ENV), os.environ.get(STAGING_DIR_ENV)
    if run_dir and staging and Path(run_dir).resolve() == Path(root).resolve():
        return Path(staging).resolve()
    return None


def public_path(path: str | Path) -> str:
    """``path`` as it will be once the run in progress is complete (a staging path mapped to the run folder)."""
    run_dir, staging = os.environ.get(RUN_DIR_ENV), os.environ.get(STAGING_DIR_ENV)
    if run_dir and staging:
        try:
            return str(Path(run_dir) / Path(path).resolve().relative_to(Path(staging).resolve()))
        except ValueError:
            pass
    return str(path)


def run_paths(run_name: str, output_dir: str | None = None, create: bool = True) -> RunPaths:
    """Folder of a run: ``output_dir`` if given, else ``reports/<run_name>`` under the repository.

    While the runner runs, the folder's files go to a temporary staging folder next to it
    (``.<name>.running-<pid>``), which replaces the run folder only when every step succeeded;
    the notebooks still name the run folder in their parameters and provenance.
    """
    root = final_root(run_name, output_dir)
    paths = RunPaths.at(staging_root(root) or root)
    if create:
        paths.data.mkdir(parents=True, exist_ok=True)
    return paths


def _timestamp(seconds: float | None = None) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(seconds))


def now() -> str:
    """The local time, as the run's records write it."""
    return time.strftime("%Y-%m-%d %H:%M:%S %z")


def alive(pid: int) -> bool:
    """Whether a process (not necessarily ours) still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """A report folder and its siblings: ``.<name>.lock``, ``.<name>.running-<pid>`` (the run in
    progress), ``.<name>.previous-<pid>`` (the old report during the swap) and
    ``<name>.failed-<timestamp>`` (failed or interrupted runs)."""

    def __init__(self, root: Path):
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
        handle.write(f"run_all.py process {os.getpid()}, started {now()}\n")
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
            if leftover != self.staging:
                notes.append(self._keep_interrupted(leftover))
        return notes

    def _keep_interrupted(self, leftover: Path) -> str:
        pid = leftover.name.rsplit("-", 1)[-1]
        self._wait_for_kernels(leftover)
        failed = self._failed_path(leftover.stat().st_mtime)
        leftover.rename(failed)
        (failed / "ERROR.txt").write_text(
            f"This run was interrupted: run_all.py (process {pid}) stopped without finishing and without "
            "cleaning up (killed with SIGKILL, out of memory, or the machine stopped).\n"
            f"It was found and renamed from {leftover.name} by the run started {now()}.\n"
            f"These are its partial outputs. The report in {self.root} was not changed by it.\n",
            encoding="utf-8")
        return f"kept the partial outputs of an interrupted run (process {pid}) in {failed}"

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
        while time.monotonic() < deadline and any(alive(pid) for pid in pids):
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

    def start(self) -> RunPaths:
        self.staging.mkdir()
        paths = RunPaths.at(self.staging)
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
