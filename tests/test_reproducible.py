"""Reproducibility: the same inputs, parameters and seed give bit-identical tables and the same
figures, and run.json records everything needed to rerun.

The helpers here (a tiny simulated screen run through run_all.py) are shared with
test_safe_outputs.py: the first complete run of the session is made once and reused.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from conftest import REPO_ROOT
from conftest import tiny_params as pipeline_params

pytestmark = pytest.mark.slow

#: Columns that hold wall-clock timings, so legitimately differ between two runs: only these are
#: left out of the bit-for-bit comparison (the rest of their table is still compared exactly).
TIMING_COLUMNS = {"k_sweep.csv": ["seconds"]}


def tiny_params(folder: Path, **overrides) -> dict:
    """tests/test_pipeline.py's tiny simulated screen made smaller (to keep these tests fast), under ``folder``.

    Every step runs as it does for a user, including the parallel restarts (``n_jobs`` all cores)
    and the split-half refit.
    """
    smaller = {"simulate_n_cells": 600, "simulate_n_genes": 300, "hvg_n_top_genes": 100, "k_values": [3, 6],
               "k": 6, "n_restarts": 3, "max_iter": 100, "prerank": False}
    return pipeline_params(folder, **(smaller | overrides))


def write_params(folder: Path, name: str = "params.yaml", **overrides) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(tiny_params(folder, **overrides)))
    return path


def run_all(params: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_all.py", str(params), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def figures(root: Path) -> dict[str, str]:
    """SHA-256 of every PNG figure in the executed notebooks, by notebook and position."""
    found = {}
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        n = 0
        for cell in nb.cells:
            for output in cell.get("outputs", []):
                if "image/png" in output.get("data", {}):
                    n += 1
                    png = base64.b64decode(output["data"]["image/png"])
                    found[f"{path.stem} #{n}"] = hashlib.sha256(png).hexdigest()
    return found


@dataclass
class CompleteRun:
    folder: Path  # holds params.yaml, inputs/ and the report run/
    params: Path
    root: Path
    files: dict[str, bytes]  # the report as the run left it
    figures: dict[str, str]
    stdout: str


_SHARED: dict[str, CompleteRun] = {}


def complete_run(tmp_path_factory) -> CompleteRun:
    """The session's first complete tiny run (made once; later tests may replace its report)."""
    if "run" not in _SHARED:
        folder = tmp_path_factory.mktemp("tiny_complete")
        params = write_params(folder)
        result = run_all(params)
        assert result.returncode == 0, result.stdout + result.stderr
        root = folder / "run"
        _SHARED["run"] = CompleteRun(folder, params, root, snapshot(root), figures(root), result.stdout)
    return _SHARED["run"]


def table_bytes(name: str, content: bytes) -> bytes:
    """A CSV's bytes, without its timing columns (:data:`TIMING_COLUMNS`) when it has any."""
    if name not in TIMING_COLUMNS:
        return content
    frame = pd.read_csv(io.BytesIO(content), dtype=str, keep_default_na=False)
    return frame.drop(columns=TIMING_COLUMNS[name]).to_csv(index=False).encode()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same parameters run twice into the same folder: the second run replaces the first."""
    first = complete_run(tmp_path_factory)
    result = run_all(first.params)
    assert result.returncode == 0, result.stdout + result.stderr
    return first, snapshot(first.root), figures(first.root)


def test_every_table_is_bit_identical(two_runs):
    first, second, _ = two_runs
    tables = sorted(name for name in first.files if name.endswith(".csv"))
    assert len(tables) >= 8, tables
    assert tables == sorted(name for name in second if name.endswith(".csv"))
    differ = [name for name in tables
              if table_bytes(Path(name).name, first.files[name]) != table_bytes(Path(name).name, second[name])]
    assert not differ, f"tables differ between two identical runs: {differ}"
    # The timing columns exist and are the only part left out.
    for name, columns in TIMING_COLUMNS.items():
        assert set(columns) <= set(pd.read_csv(first.root / "data" / name).columns)


def test_figures_are_identical(two_runs):
    first, _, second_figures = two_runs
    assert len(first.figures) >= 8
    assert first.figures == second_figures


def test_run_json_records_everything_needed_to_rerun(two_runs):
    first, second, _ = two_runs
    one, two = (json.loads(files["data/run.json"]) for files in (first.files, second))
    assert one["status"] == "complete"
    assert one["parameters"] == yaml.safe_load(first.params.read_text()) | one["parameters"]
    assert one["parameters"]["seed"] == 0 and one["seeds"] == {"seed": 0}
    assert len(one["input_sha256"]) == 64 and one["input_files"]["input"][0]["sha256"] == one["input_sha256"]
    assert one["git_commit"] and one["versions"]["numpy"] and one["versions"]["scanpy"]
    assert one["environment"]["cpu_count"] >= 1
    assert one["command"][0] == "run_all.py" and one["rerun"].endswith("data/params.yaml")
    assert yaml.safe_load(first.files["data/params.yaml"]) == one["parameters"]
    for key in ("parameters", "seeds", "input_sha256", "input_files", "git_commit", "versions"):
        assert one[key] == two[key], key
    # Every step records the checksum of each file it wrote; the tables' agree between the runs.
    for step in ("preprocess", "factorize", "stats", "enrichment"):
        outputs = {name: sha for name, sha in one["steps"][step]["outputs"].items() if name.endswith(".csv")
                   and name not in TIMING_COLUMNS}
        assert outputs == {name: two["steps"][step]["outputs"][name] for name in outputs}
    assert "program_contrasts.csv" in one["steps"]["stats"]["outputs"]


def test_reports_name_the_run_folder_not_the_temporary_one(two_runs):
    first, second, _ = two_runs
    for name in ("index.html", "02_factorize.html"):
        assert b".running-" not in second[name]
    assert str(first.root).encode() in second["02_factorize.html"]
