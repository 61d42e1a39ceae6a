"""Safe outputs: a run replaces its report only when every step succeeded; a failed, killed or
mismatched run never touches the previous complete report; parameters are values, never code."""

from __future__ import annotations

import ast
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from test_reproducible import complete_run, run_all, snapshot, write_params

pytestmark = pytest.mark.slow

sys.path.insert(0, str(REPO_ROOT))
import run_all as driver  # noqa: E402  (run in-process for the runs that are refused before any notebook)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    return complete_run(tmp_path_factory)


def run_in_process(params: Path, *args: str, capsys) -> tuple[int, str, str]:
    code = driver.main([str(params), *args])
    out, err = capsys.readouterr()
    return code, out, err


def failed_runs(done) -> list[Path]:
    return sorted(done.folder.glob("run.failed-*"))


class Reader(threading.Thread):
    """Collects a process's output as it comes (the progress line has no newline until a step ends)."""

    def __init__(self, process):
        super().__init__(daemon=True)
        self.process, self.text = process, ""

    def run(self):
        while chunk := os.read(self.process.stdout.fileno(), 4096):
            self.text += chunk.decode(errors="replace")

    def wait_for(self, marker: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.text:
            assert self.process.poll() is None, f"run_all.py ended before {marker!r}:\n{self.text}"
            assert time.monotonic() < deadline, f"no {marker!r} after {timeout} s:\n{self.text}"
            time.sleep(0.05)


def start_run(params: Path) -> tuple[subprocess.Popen, Reader]:
    process = subprocess.Popen([sys.executable, "run_all.py", str(params)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    reader = Reader(process)
    reader.start()
    return process, reader


# --- --from: resume only from matching saved intermediates -------------------------------

def test_from_refuses_changed_parameters_of_earlier_steps(done, tmp_path, capsys):
    before = snapshot(done.root)
    params = write_params(done.folder, "changed.yaml", k=3, hvg_n_top_genes=80, fdr=0.1)
    code, _, err = run_in_process(params, "--from", "stats", capsys=capsys)
    assert code == 2
    assert "cannot use --from stats" in err
    assert "parameter 'k' (used by step factorize) was 6 in the saved run and is 3 now" in err
    assert "parameter 'hvg_n_top_genes' (used by step preprocess) was 100 in the saved run and is 80 now" in err
    assert "'fdr'" not in err, "stats and enrichment are rerun: their parameters may change"
    assert snapshot(done.root) == before


def test_from_refuses_a_changed_input_file(done, capsys):
    before = snapshot(done.root)
    screen = done.folder / "inputs" / "screen.h5ad"
    original = screen.read_bytes()
    try:
        screen.write_bytes(original + b"\0")
        code, _, err = run_in_process(done.params, "--from", "stats", capsys=capsys)
    finally:
        screen.write_bytes(original)
    assert code == 2
    assert re.search(r"input file \S*screen\.h5ad \(parameter 'input', used by step preprocess\) has changed since "
                     r"the saved run \(sha256 [0-9a-f]{12}… then, [0-9a-f]{12}… now\)", err), err
    assert snapshot(done.root) == before


def test_from_refuses_a_changed_intermediate(done, capsys):
    before = snapshot(done.root)
    intermediate = done.root / "data" / "factorized.h5ad"
    original = intermediate.read_bytes()
    try:
        intermediate.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        code, _, err = run_in_process(done.params, "--from", "stats", capsys=capsys)
    finally:
        intermediate.write_bytes(original)
    assert code == 2
    assert "data/factorized.h5ad (written by step factorize) was changed after the saved run wrote it" in err
    assert snapshot(done.root) == before


def test_from_without_a_complete_run_is_refused(tmp_path, capsys):
    code, _, err = run_in_process(write_params(tmp_path), "--only", "enrichment", capsys=capsys)
    assert code == 2 and "no data/run.json" in err and "Run the whole pipeline first" in err
    assert not (tmp_path / "run").exists()


def test_from_resumes_from_a_copy_of_matching_intermediates(done):
    """--from enrichment (the quickest step; --from stats takes the same path) with a changed parameter of
    the step that reruns."""
    before = snapshot(done.root)
    params = write_params(done.folder, "later_changed.yaml", n_top_terms=2)
    result = run_all(params, "--from", "enrichment")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[1/1] 04_enrichment" in result.stdout and "01_preprocess" not in result.stdout
    after = snapshot(done.root)
    for name in ("data/preprocessed.h5ad", "data/factorized.h5ad", "data/program_contrasts.csv",
                 "01_preprocess.html", "02_factorize.html", "03_stats.html"):
        assert after[name] == before[name], f"{name} must be the saved one"
    assert after["data/enrichment.csv"] == before["data/enrichment.csv"], "same inputs must give the same table"
    run = json.loads(after["data/run.json"])
    assert run["steps"]["stats"]["reused"] and not run["steps"]["enrichment"].get("reused")
    assert run["resumed"]["reused_steps"] == ["preprocess", "factorize", "stats"]
    assert run["parameters"]["n_top_terms"] == 2
    assert not list(done.folder.glob(".run.*running*")) and not list(done.folder.glob(".run.previous*"))


# --- interrupted and failed runs leave the previous report untouched --------------------

def test_sigterm_during_a_step_keeps_the_previous_report(done):
    before, failed_before = snapshot(done.root), failed_runs(done)
    process, reader = start_run(done.params)
    reader.wait_for("[2/4] 02_factorize")
    time.sleep(1.0)  # inside step 2: its kernel is running
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM, reader.text
    reader.join(timeout=10)
    assert snapshot(done.root) == before, "the previous complete report must be unchanged byte for byte"
    new = sorted(set(failed_runs(done)) - set(failed_before))
    assert len(new) == 1, reader.text
    error = (new[0] / "ERROR.txt").read_text()
    assert "INTERRUPTED" in error and "interrupted by SIGTERM during step factorize" in error
    assert (new[0] / "data" / "preprocessed.h5ad").is_file() and (new[0] / "01_preprocess.html").is_file()
    assert json.loads((new[0] / "data" / "run.json").read_text())["steps"]["factorize"]["status"] == "interrupted"
    assert str(new[0]) in reader.text and "unchanged" in reader.text
    assert not list(done.folder.glob(".run.running-*")), "no temporary folder is left behind"


def test_sigkill_leftover_is_not_a_report_and_is_named_by_the_next_run(done, capsys):
    before, failed_before = snapshot(done.root), failed_runs(done)
    process, reader = start_run(done.params)
    reader.wait_for("[2/4] 02_factorize")
    time.sleep(1.0)
    process.kill()  # SIGKILL: nothing of run_all.py runs any more
    process.wait(timeout=30)
    reader.join(timeout=10)
    assert snapshot(done.root) == before
    leftover = done.folder / f".run.running-{process.pid}"
    assert leftover.is_dir() and (leftover / "data" / "preprocessed.h5ad").is_file()
    assert failed_runs(done) == failed_before
    # The next run (here one that is then refused) names the leftover before anything else.
    changed = write_params(done.folder, "changed.yaml", max_iter=50)
    code, out, err = run_in_process(changed, "--from", "stats", capsys=capsys)
    assert code == 2 and "parameter 'max_iter'" in err
    assert not leftover.exists()
    new = sorted(set(failed_runs(done)) - set(failed_before))
    assert len(new) == 1 and f"process {process.pid}" in out and str(new[0]) in out
    assert "This run was interrupted" in (new[0] / "ERROR.txt").read_text()
    assert snapshot(done.root) == before


def test_failed_step_keeps_the_previous_report_and_names_the_parameter(done):
    """Not enough memory for cell-cycle scoring's dense copy: step 1 refuses and says what to change."""
    before, failed_before = snapshot(done.root), failed_runs(done)
    result = run_all(done.params, env={"PERTURBNMF_MAX_MEMORY": "1M"})
    assert result.returncode == 2, result.stdout + result.stderr  # refused input, like a bad parameter
    assert "step preprocess (01_preprocess.ipynb) refused the input" in result.stderr
    assert "Not enough memory" in result.stderr and "Traceback" not in result.stderr
    assert "cell_cycle_genes: null" in result.stderr
    assert snapshot(done.root) == before
    new = sorted(set(failed_runs(done)) - set(failed_before))
    assert len(new) == 1 and str(new[0]) in result.stderr
    assert (new[0] / "01_preprocess.html").is_file() and "cell_cycle_genes" in (new[0] / "ERROR.txt").read_text()


# --- folders that are not ours, concurrent runs, safe parameters ------------------------

def test_a_folder_with_other_files_is_never_replaced(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    code, _, err = run_in_process(write_params(tmp_path), capsys=capsys)
    assert code == 2 and "notes.txt" in err and "not part of a perturbnmf report" in err
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys):
    with open(tmp_path / ".run.lock", "a+") as lock:
        lock.write("run_all.py process 12345, started earlier\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = run_in_process(write_params(tmp_path), capsys=capsys)
    assert code == 2 and "another run is writing" in err and "process 12345" in err
    assert not (tmp_path / "run").exists()


def test_yaml_tags_that_run_code_are_rejected(tmp_path, capsys):
    marker = tmp_path / "pwned"
    params = tmp_path / "evil.yaml"
    params.write_text(f"run_name: !!python/object/apply:os.system ['touch {marker}']\n")
    code, _, err = run_in_process(params, capsys=capsys)
    assert code == 2 and "not valid YAML" in err
    assert not marker.exists()


def test_parameters_are_never_code(tmp_path, capsys):
    params = write_params(tmp_path, run_name="x; touch pwned", k="__import__('os')")
    code, _, err = run_in_process(params, capsys=capsys)
    assert code == 2 and "'run_name' must be a plain folder name" in err and "'k' must be of type" in err


def _safe_loader_classes(tree) -> set[str]:
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            and any(ast.unparse(base).endswith("SafeLoader") for base in node.bases)}


def test_no_shell_command_is_built_and_yaml_is_loaded_safely():
    sources = [REPO_ROOT / "run_all.py", *sorted((REPO_ROOT / "lib" / "perturbnmf").rglob("*.py"))]
    for path in sources:
        tree = ast.parse(path.read_text())
        safe = _safe_loader_classes(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            assert name not in {"os.system", "os.popen", "eval", "exec", "yaml.unsafe_load", "yaml.full_load"}, \
                f"{path.name}:{node.lineno}: {name}"
            for keyword in node.keywords:
                assert not (keyword.arg == "shell" and ast.unparse(keyword.value) != "False"), \
                    f"{path.name}:{node.lineno}: shell=True"
            if name in {"yaml.load", "yaml.load_all"}:
                loader = next((ast.unparse(k.value) for k in node.keywords if k.arg == "Loader"), None)
                assert loader and (loader.endswith("SafeLoader") or loader in safe), \
                    f"{path.name}:{node.lineno}: yaml.load with Loader={loader}"


# --- the memory guard --------------------------------------------------------------------

def test_memory_guard_refuses_and_names_the_parameter(monkeypatch):
    from perturbnmf.pp import InsufficientMemoryError, available_memory, check_dense_fits

    assert available_memory() > 0
    with pytest.raises(InsufficientMemoryError, match=r"set cell_cycle_genes: null.*") as err:
        check_dense_fits(10**7, 10**6, np.float32, "cell-cycle scoring", "set cell_cycle_genes: null", copies=2)
    assert "10,000,000 × 1,000,000 float32" in str(err.value) and "2 copies" in str(err.value)
    assert check_dense_fits(100, 100, np.float64, "x", "y") == 80_000
    monkeypatch.setenv("PERTURBNMF_MAX_MEMORY", "50K")
    with pytest.raises(InsufficientMemoryError, match="PERTURBNMF_MAX_MEMORY=50K"):
        check_dense_fits(100, 100, np.float64, "x", "y")
    assert available_memory() == 50 * 1024


def test_the_kernel_writes_its_own_output_to_its_log_and_the_runner_keeps_no_handle(tmp_path):
    """The kernel process's stdout/stderr go to kernel.log in the step's private folder (its tail joins a
    dead kernel's message); the runner closes its own handle once the kernel has started."""
    import asyncio

    import psutil

    from perturbnmf.report import runner

    async def start_write_stop():
        manager = runner._ipc_kernel_manager(tmp_path, tmp_path / "pids")(kernel_name="python3")
        await manager.start_kernel()
        client = manager.client()
        client.start_channels()
        await client.wait_for_ready(timeout=60)
        await client.execute_interactive("import os; os.write(2, b'kernel says hello\\n')", timeout=60)
        open_logs = [f.path for f in psutil.Process().open_files() if f.path.endswith(runner.KERNEL_LOG)]
        client.stop_channels()
        await manager.shutdown_kernel(now=True)
        return open_logs

    assert asyncio.run(start_write_stop()) == []
    assert "kernel says hello" in (tmp_path / runner.KERNEL_LOG).read_text()
    runner._kill_kernels()
