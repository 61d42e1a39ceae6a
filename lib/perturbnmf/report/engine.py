"""Where a run computes: this process, a Dask cluster on this machine, or a Dask cluster users already have.

The parameter ``cluster`` chooses:

- ``None``: everything runs in the notebook's kernel (Dask's threads where a step uses Dask);
- ``"local"``: a :class:`dask.distributed.LocalCluster` on this machine — one single-threaded
  worker process per core, the memory available divided among them, spilling to disk beyond it;
- an address (``"tcp://host:8786"``): the scheduler of a running cluster (``dask scheduler`` with
  ``dask worker`` processes, dask-jobqueue on SLURM/PBS, Kubernetes, ...).

``run_all.py`` starts the local cluster once for the four steps (:func:`cluster_for_run`) and
tells the notebooks its address through the environment; a notebook run on its own in Jupyter
starts its own (:func:`start_step`). While a step runs, run_all.py echoes the progress its kernel
logs (logger ``perturbnmf``: per k, per restart, per chunk) on the console (:func:`echo_progress`).
The compute layers never create clients: they use Dask
arrays and whichever scheduler is active.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import ParameterError
from ..decomposition._parallel import available_cores
from ..pp import available_memory

__all__ = ["SCHEDULER_ENV", "PROGRESS_ENV", "local_cluster", "check_reachable", "cluster_for_run", "start_step",
           "echo_progress"]

#: The address of the cluster run_all.py started for this run (read by the notebooks' kernels).
SCHEDULER_ENV = "PERTURBNMF_DASK_SCHEDULER"
#: The file in which a step's kernel logs its progress; run_all.py echoes it on the console.
PROGRESS_ENV = "PERTURBNMF_PROGRESS"
#: Share of the available memory the local workers may hold before they pause (Dask then spills to disk).
LOCAL_MEMORY_SHARE = 0.8
#: Seconds to wait for the scheduler at a given address.
CONNECT_TIMEOUT_S = 15


def local_cluster(spill_dir: str | None = None):
    """A LocalCluster sized to this machine: one single-threaded worker process per core.

    Each worker may hold ``LOCAL_MEMORY_SHARE`` × the available memory / workers, and spills to
    ``spill_dir`` (a temporary folder by default) beyond Dask's thresholds. Numba and BLAS run one
    thread per worker, so workers do not oversubscribe the cores.
    """
    from distributed import LocalCluster

    n_workers = available_cores()
    room = available_memory()
    limit = int(room * LOCAL_MEMORY_SHARE / n_workers) if room else "auto"
    threads = {name: "1" for name in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                      "MKL_NUM_THREADS")}
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, memory_limit=limit,
                        local_directory=spill_dir, dashboard_address=":0", silence_logs=logging.ERROR, env=threads)


def check_reachable(address: str) -> None:
    """Refuse, naming the parameter, when no scheduler answers at ``address`` (run_all.py's preflight)."""
    from distributed import Client

    try:
        with Client(address, timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, TimeoutError, ValueError) as err:
        raise ParameterError(
            f"No Dask scheduler answered at cluster={address!r} (parameter 'cluster') within {CONNECT_TIMEOUT_S} s "
            f"({type(err).__name__}). Start one there (`dask scheduler`, then `dask worker {address}` on each "
            "machine), correct the address, or use cluster: \"local\" for a cluster on this machine."
        ) from None


@contextlib.contextmanager
def cluster_for_run(cluster: str | None) -> Iterator[str | None]:
    """For run_all.py: the scheduler address the steps use (exported in ``SCHEDULER_ENV``), or None.

    ``"local"`` starts a :func:`local_cluster` for the whole run and closes it afterwards (its
    spill folder too); an address is passed on (the preflight checked that it answers).
    """
    if cluster is None:
        yield None
        return
    spill = None
    stack = contextlib.ExitStack()
    try:
        if cluster == "local":
            spill = tempfile.mkdtemp(prefix="perturbnmf-dask-")
            address = stack.enter_context(local_cluster(spill)).scheduler_address
        else:
            address = cluster
        os.environ[SCHEDULER_ENV] = address
        yield address
    finally:
        os.environ.pop(SCHEDULER_ENV, None)
        stack.close()
        if spill:
            shutil.rmtree(spill, ignore_errors=True)


def _log_progress_to_file() -> None:
    """Send the library's progress records (logger ``perturbnmf``, INFO) to the file run_all.py reads."""
    path = os.environ.get(PROGRESS_ENV)
    logger = logging.getLogger("perturbnmf")
    if not path or any(getattr(h, "baseFilename", None) == os.path.abspath(path) for h in logger.handlers):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def start_step(cluster: str | None):
    """In a notebook: log progress for run_all.py's console, and return the step's Dask client (None: this process).

    Connects to the cluster run_all.py started (``SCHEDULER_ENV``) when there is one; otherwise
    ``"local"`` starts a :func:`local_cluster` for this kernel, and an address is connected to.
    The client becomes Dask's default scheduler for the rest of the notebook.
    """
    _log_progress_to_file()
    if cluster is None:
        return None
    from distributed import Client

    address = os.environ.get(SCHEDULER_ENV)
    if address:
        return Client(address, timeout=CONNECT_TIMEOUT_S)
    if cluster == "local":
        return Client(local_cluster())
    check_reachable(cluster)
    return Client(cluster, timeout=CONNECT_TIMEOUT_S)


@contextlib.contextmanager
def echo_progress(path: Path, prefix: str = "      ") -> Iterator[None]:
    """For run_all.py: while a step runs, print the lines its kernel logs to ``path`` (exported in ``PROGRESS_ENV``)."""
    path.touch()
    os.environ[PROGRESS_ENV] = str(path)
    stop, echoed = threading.Event(), threading.Event()

    def follow():
        with open(path) as handle:
            while True:
                line = handle.readline()
                if line:
                    print(f"\n{prefix}{line.rstrip()}", end="", flush=True)
                    echoed.set()
                elif stop.wait(0.5):
                    break

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        os.environ.pop(PROGRESS_ENV, None)
        if echoed.is_set():  # what the runner prints next starts on a line of its own
            print(f"\n{prefix}", end="", flush=True)
