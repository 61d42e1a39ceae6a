"""Dask as the engine: restarts as cluster tasks, the `cluster` parameter, and the run's cluster.

A two-worker ``LocalCluster`` (processes, one thread each) stands in for a user's cluster.
"""

import json
import logging
import os
import re
import subprocess
import sys
import time

import pytest
from numpy.testing import assert_array_equal

from perturbnmf.decomposition import consensus_sweep
from perturbnmf.decomposition._parallel import Mapped, active_client, executor
from perturbnmf.errors import ParameterError
from perturbnmf.report import engine
from conftest import run_pipeline, tiny_params
from test_consensus import planted_screen

distributed = pytest.importorskip("distributed")


def local_client():
    """A client of a two-worker LocalCluster, Dask's default scheduler while it is open."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                       silence_logs=logging.ERROR)
    return cluster, distributed.Client(cluster)


def _same_sweep(a, b):
    assert a.suggested_k == b.suggested_k
    for k in a.components:
        assert_array_equal(a.components[k], b.components[k])
        assert_array_equal(a.restart_components[k][0], b.restart_components[k][0])
    columns = ["relative_error", "holdout_relative_error", "stability", "median_n_iter"]
    assert_array_equal(a.table[columns].to_numpy(), b.table[columns].to_numpy())


def test_restarts_on_a_cluster_give_the_serial_sweep():
    X, _, _ = planted_screen(n=400, m=60)
    serial = consensus_sweep(X, [3, 4], model="seminmf", n_restarts=3, random_state=5, n_jobs=1, max_iter=100)
    cluster, client = local_client()
    with cluster, client:
        assert active_client() is client
        on_cluster = consensus_sweep(X, [3, 4], model="seminmf", n_restarts=3, random_state=5, max_iter=100)
    assert active_client() is None
    assert on_cluster.table.attrs["n_jobs"] == 2  # the cluster's two worker threads ran the restarts
    _same_sweep(on_cluster, serial)


def test_loky_workers_read_shared_arrays_from_disk_not_shared_memory(tmp_path):
    X, _, _ = planted_screen(n=300, m=40)
    with executor(2) as pool:
        handle = pool.share(X)
        assert isinstance(handle, Mapped) and all(str(p).startswith(str(pool.folder)) for p in handle.names.values())
        assert not str(pool.folder).startswith("/dev/shm")
        loaded = handle.load()
        assert not loaded.data.flags.writeable  # a read-only view of the mapped file, not a copy
        assert_array_equal(loaded.toarray(), X.toarray())
        folder = pool.folder
    assert not folder.exists()  # removed with the executor


def test_an_address_without_a_scheduler_is_refused_naming_the_parameter(monkeypatch):
    monkeypatch.setattr(engine, "CONNECT_TIMEOUT_S", 1)
    with pytest.raises(ParameterError, match="parameter 'cluster'"):
        engine.check_reachable("tcp://127.0.0.1:9")


def test_the_runs_local_cluster_is_exported_then_closed():
    with engine.cluster_for_run("local") as address:
        assert os.environ[engine.SCHEDULER_ENV] == address
        with distributed.Client(address) as c:
            assert len(c.scheduler_info()["workers"]) == engine.available_cores()
    assert engine.SCHEDULER_ENV not in os.environ
    with pytest.raises(OSError):
        with distributed.Client(address, timeout=1):
            pass


# --- the whole pipeline on a cluster -----------------------------------------------------------

def _hits(run_root):
    import pandas as pd

    return pd.read_csv(run_root / "data" / "perturbation_hits.csv").sort_values(["perturbation", "program"])


@pytest.mark.slow
def test_the_pipeline_runs_against_a_scheduler_and_workers_started_apart(tmp_path, tiny_run):
    """`dask scheduler` and `dask worker` as separate processes, as on a user's cluster: the restarts run as
    its tasks and X stays on disk, factorised chunk by chunk by the workers (out of core), with the in-process
    run's hits. (A run's own LocalCluster, `cluster: local`, is `engine.cluster_for_run` above plus this.)"""
    in_process_run = tiny_run[0]
    scheduler_file = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    scheduler = subprocess.Popen(dask + ["--scheduler-file", str(scheduler_file), "--port", "0",
                                         "--dashboard-address", ":0"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for _ in range(2):
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                 "--nworkers", "1", "--memory-limit", "2GiB"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | {"NUMBA_NUM_THREADS": "1"}))
        with distributed.Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        result = run_pipeline(tmp_path, **tiny_params(tmp_path, cluster=address))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr and "ERROR" not in result.stderr  # a clean console
        assert "restart 1 of" in result.stdout  # progress of the restarts, echoed from the kernel
        assert re.search(r"all \d+ cells, iteration 1:", result.stdout)  # the fit on all cells, by the workers
        import pandas as pd

        pd.testing.assert_frame_equal(_hits(tmp_path / "run"), _hits(in_process_run))
        table = pd.read_csv(tmp_path / "run" / "data" / "k_sweep.csv")
        assert len(table) == 3
    finally:
        for process in workers + [scheduler]:
            process.terminate()
        for process in workers + [scheduler]:
            process.wait(timeout=30)
