"""Shared fixtures. Real-data tests need ../shared/data: skipped with a reason when it is absent,
except under CI (PERTURBNMF_REQUIRE_SHARED=1, set by .ci/run), where the absence is a failure."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
PAPALEXI = SHARED_DATA / "papalexi2021_thp1_lowmoi" / "papalexi2021_thp1_lowmoi.h5ad"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not PAPALEXI.is_file():
        reason = f"real data not found at {SHARED_DATA} (clone the repository next to the shared/ folder)"
        if os.environ.get("PERTURBNMF_REQUIRE_SHARED") == "1":
            pytest.fail(f"{reason}; CI requires it (PERTURBNMF_REQUIRE_SHARED=1)")
        pytest.skip(reason)
    return SHARED_DATA


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a name fails: the code under test must work offline."""
    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# --- a tiny run of the whole pipeline, as a user runs it (shared by the pipeline and cluster tests) ---

def run_pipeline(tmp_path, **params):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, "run_all.py", str(path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=900)


def tiny_params(tmp_path, **overrides):
    inputs = tmp_path / "inputs"
    params = {
        "run_name": "tiny", "output_dir": str(tmp_path / "run"), "simulate": True,
        "simulate_n_cells": 900, "simulate_n_genes": 400,
        "input": str(inputs / "screen.h5ad"), "gene_sets": [str(inputs / "sets.gmt")],
        "cell_cycle_genes": str(inputs / "cell_cycle.tsv"), "hvg_n_top_genes": 150,
        "k_values": [3, 6, 9], "k": 9, "max_iter": 200, "n_top_genes": 20, "prerank": True,
        # the k sweep on a subsample, the kept programs then fitted on all cells (chunk by chunk on a cluster)
        "sweep_max_cells": 600,
    }
    params.update(overrides)
    return params


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny pipeline run in this process's way (no cluster): its folder and run_all.py's result."""
    tmp_path = tmp_path_factory.mktemp("tiny")
    result = run_pipeline(tmp_path, **tiny_params(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp_path / "run", result
