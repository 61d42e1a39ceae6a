"""Shared fixtures. Real-data tests need ../shared/data: skipped with a reason when it is absent,
except under CI (PERTURBNMF_REQUIRE_SHARED=1, set by .ci/run), where the absence is a failure."""

import os
import socket
from pathlib import Path

import pytest

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
