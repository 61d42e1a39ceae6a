"""Memory checks before a large dense array is made.

Sparse count matrices stay sparse through the pipeline; where a step must make a dense
copy (for example the scaled copy that cell-cycle scoring needs), it first calls
:func:`check_dense_fits`, which estimates the array's size and refuses, naming the
parameter to change, when it would not fit in the memory available now.

The memory available is the smallest of: the operating system's estimate
(``psutil.virtual_memory().available`` when psutil is installed, else ``MemAvailable`` in
``/proc/meminfo``), the room left under a cgroup (container) memory limit, and the
environment variable ``PERTURBNMF_MAX_MEMORY`` (bytes, or with a suffix: ``512M``, ``8G``),
which caps what the pipeline may assume on a shared machine.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

__all__ = ["InsufficientMemoryError", "available_memory", "dense_bytes", "check_dense_fits", "format_bytes",
           "MAX_MEMORY_ENV"]

#: Environment variable capping the memory the pipeline assumes it may use.
MAX_MEMORY_ENV = "PERTURBNMF_MAX_MEMORY"

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class InsufficientMemoryError(MemoryError):
    """A dense array would not fit in the available memory; the message names the parameter to change."""


def format_bytes(n: float) -> str:
    """``1.5 GiB``-style size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"{MAX_MEMORY_ENV}={text!r} is not a size such as 2000000000, 512M or 8G.")
    return int(float(match[1]) * _UNITS[match[2]])


def _system_available() -> int | None:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_room() -> int | None:
    """Bytes left under the cgroup v2 (or v1) memory limit of this process, if there is one."""
    candidates = [
        (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
        (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes")),
    ]
    for limit_file, usage_file in candidates:
        try:
            limit_text = limit_file.read_text().strip()
            if limit_text == "max":
                return None
            limit, usage = int(limit_text), int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # cgroup v1 reports "unlimited" as a huge number
            return None
        return max(limit - usage, 0)
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate, as far as can be told; ``None`` when unknown."""
    sizes = [size for size in (_system_available(), _cgroup_room()) if size is not None]
    cap = os.environ.get(MAX_MEMORY_ENV)
    if cap:
        sizes.append(_parse_size(cap))
    return min(sizes) if sizes else None


def dense_bytes(n_rows: int, n_cols: int, dtype, copies: int = 1) -> int:
    """Bytes of ``copies`` dense ``n_rows × n_cols`` arrays of ``dtype``."""
    return int(n_rows) * int(n_cols) * np.dtype(dtype).itemsize * int(copies)


def check_dense_fits(n_rows: int, n_cols: int, dtype, what: str, parameter_hint: str, copies: int = 1) -> int:
    """Refuse to densify when the result would not fit in the available memory.

    Parameters
    ----------
    n_rows, n_cols, dtype
        Shape and type of the dense array about to be made.
    what
        What the array is for, e.g. ``"cell-cycle scoring (a scaled dense copy of the data)"``.
    parameter_hint
        The parameter(s) to change, e.g. ``"set cell_cycle_genes: null to skip scoring"``.
    copies
        How many arrays of that size exist at the peak (the copy and its temporaries).

    Returns
    -------
    int
        The estimated bytes.

    Raises
    ------
    InsufficientMemoryError
        When the estimate exceeds :func:`available_memory`.
    """
    need = dense_bytes(n_rows, n_cols, dtype, copies)
    available = available_memory()
    if available is not None and need > available:
        cap = os.environ.get(MAX_MEMORY_ENV)
        capped = f" (capped by {MAX_MEMORY_ENV}={cap})" if cap else ""
        raise InsufficientMemoryError(
            f"Not enough memory for {what}: it needs a dense {n_rows:,} × {n_cols:,} {np.dtype(dtype).name} array"
            + (f" ({copies} copies at the peak)" if copies > 1 else "")
            + f", about {format_bytes(need)}, but only {format_bytes(available)} is available{capped}. "
            f"To fix it: {parameter_hint}."
        )
    return need
