"""Where independent fits run: in this process, in loky worker processes, or on a Dask cluster.

:func:`executor` picks the backend: the active ``dask.distributed`` client when there is one
(restarts become cluster tasks; each large array is scattered to the workers once), else
``n_jobs`` loky processes, else this process. Large arrays reach loky workers through
:meth:`Executor.share`: they are written once to a temporary folder on disk and memory-mapped
by every worker, so the workers share one page-cached copy. (joblib's own automatic memmapping
would put them in ``/dev/shm`` — memory, not disk — and its resource tracker prints ``KeyError``
tracebacks when it races to unlink them.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp

__all__ = ["Executor", "executor", "active_client", "available_cores", "resolve"]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def active_client():
    """The current ``dask.distributed`` client, or None (distributed is not even imported without one)."""
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


class Mapped:
    """A handle to an array (ndarray or CSR matrix) saved on disk, memory-mapped where it is resolved."""

    def __init__(self, folder: Path, value):
        self.path = folder / f"{uuid.uuid4().hex}.npz"
        self.sparse = sp.issparse(value)
        self.shape = value.shape
        parts = {"data": value.data, "indices": value.indices, "indptr": value.indptr} if self.sparse else {"x": value}
        self.names = {}
        for name, part in parts.items():
            path = self.path.with_suffix(f".{name}.npy")
            np.save(path, np.ascontiguousarray(part))
            self.names[name] = path

    def load(self):
        """The array, its buffers memory-mapped read-only (nothing is copied into the process)."""
        parts = {name: np.load(path, mmap_mode="r") for name, path in self.names.items()}
        if not self.sparse:
            return parts["x"]
        return sp.csr_matrix((parts["data"], parts["indices"], parts["indptr"]), shape=self.shape, copy=False)


def resolve(value):
    """What a task receives: the array behind a :class:`Mapped` handle, anything else as it is."""
    return value.load() if isinstance(value, Mapped) else value


class Executor:
    """Runs ``function(*args)`` calls, lazily and in order: ``run(calls)``; ``share(array)`` hands an array on once."""

    def __init__(self, kind: str, n_jobs: int, folder: Path | None = None, client=None):
        self.kind, self.n_jobs, self.folder, self.client = kind, n_jobs, folder, client

    def share(self, value):
        if value is None or self.kind == "serial":
            return value
        if self.kind == "dask":
            return self.client.scatter(value, broadcast=True, hash=False)
        return Mapped(self.folder, value)

    def run(self, calls: Iterable) -> Iterator:
        if self.kind == "serial":
            return (function(*args) for function, args in calls)
        if self.kind == "dask":
            futures = [self.client.submit(function, *args, pure=False) for function, args in calls]
            return (future.result() for future in futures)
        from joblib import Parallel, delayed

        parallel = Parallel(n_jobs=self.n_jobs, backend="loky", return_as="generator", max_nbytes=None)
        return parallel(delayed(function)(*args) for function, args in calls)


def cluster_threads(client) -> int:
    """Threads of all the cluster's workers (at least 1)."""
    return max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info().get("workers", {}).values()))


@contextlib.contextmanager
def executor(n_jobs: int) -> Iterator[Executor]:
    """The Dask client's executor when one is active, else loky with ``n_jobs`` > 1 processes, else serial.

    The temporary folder of shared arrays is removed on exit.
    """
    client = active_client()
    if client is not None:
        yield Executor("dask", cluster_threads(client), client=client)
    elif n_jobs == 1:
        yield Executor("serial", 1)
    else:
        folder = Path(tempfile.mkdtemp(prefix="perturbnmf-shared-"))
        try:
            yield Executor("loky", n_jobs, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
