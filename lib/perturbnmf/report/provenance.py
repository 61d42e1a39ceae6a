"""Where a result came from: package versions, git commit, input checksum.

Shown at the top of every report (as output, since reports hide code cells) and stored
in ``run.json`` and ``uns['perturbnmf']`` of every written h5ad.
"""

from __future__ import annotations

import hashlib
import html
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from .runfolder import REPO_ROOT, public_path

#: Packages whose versions can change the numbers in a report.
PACKAGES = (
    "perturbnmf", "numpy", "scipy", "pandas", "scikit-learn", "anndata", "scanpy", "statsmodels",
    "gseapy", "matplotlib", "seaborn", "papermill", "nbconvert", "threadpoolctl",
)


def package_versions(packages=PACKAGES) -> dict[str, str]:
    """``{package: version}`` for the installed packages (``"not installed"`` when absent)."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(repo: Path = REPO_ROOT) -> str:
    """Commit hash of the code that ran, with ``-dirty`` when files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + ("-dirty" if dirty else "")


def sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


#: Environment variables that can change the numbers (threads change summation order).
ENVIRONMENT_VARIABLES = (
    "PYTHONHASHSEED", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
    "MPLBACKEND",
)


def environment() -> dict[str, Any]:
    """CPU count and the environment variables of :data:`ENVIRONMENT_VARIABLES` that are set."""
    found: dict[str, Any] = {"cpu_count": os.cpu_count()}
    found.update({name: os.environ[name] for name in ENVIRONMENT_VARIABLES if name in os.environ})
    return found


def seeds(parameters: dict[str, Any]) -> dict[str, Any]:
    """The random seeds among ``parameters`` (every parameter whose name contains ``seed``)."""
    return {name: value for name, value in parameters.items() if "seed" in name}


def collect(parameters: dict[str, Any], input_path: str | Path | None = None,
            input_sha256: str | None = None) -> dict[str, Any]:
    """Everything needed to rerun: parameters, seeds, versions, commit, input checksum, platform.

    ``input_sha256``: the input's checksum when the caller has already computed it (hashing a
    large h5ad twice costs seconds).
    """
    record = {
        "parameters": dict(parameters),
        "seeds": seeds(parameters),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "environment": environment(),
        "command": " ".join(sys.argv[:1]),
    }
    if input_path is not None and Path(input_path).is_file():
        record["input"] = public_path(input_path)
        record["input_sha256"] = input_sha256 or sha256(input_path)
    return record


def to_html(record: dict[str, Any]) -> str:
    """A compact HTML block (two tables) of a :func:`collect` record, for the top of a report."""
    def rows(mapping):
        return "".join(
            f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(_short(v))}</code></td></tr>"
            for k, v in mapping.items()
        )

    run = {"git commit": record.get("git_commit", ""), "platform": record.get("platform", "")}
    if "input_sha256" in record:
        run["input"] = record["input"]
        run["input sha256"] = record["input_sha256"]
    versions = ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items())
    run["versions"] = versions
    return (
        '<div class="pnmf-provenance">'
        "<h4>Parameters</h4>"
        f'<table class="pnmf-table">{rows(record.get("parameters", {}))}</table>'
        "<h4>Provenance</h4>"
        f'<table class="pnmf-table">{rows(run)}</table>'
        "</div>"
    )


def _short(value: Any, limit: int = 600) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
