"""The committed notebooks: kernel python3, no outputs, thin (logic lives in the package)."""

import json

import pytest

from perturbnmf.report import STEPS

from conftest import REPO_ROOT

NOTEBOOKS = [REPO_ROOT / "notebooks" / f"{stem}.ipynb" for stem, _ in STEPS.values()]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean_with_kernel_python3(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} has outputs: strip them"
            assert cell["execution_count"] is None
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_thin(path):
    """No function or class definitions, no long cells: the logic belongs in lib/perturbnmf."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code":
            assert "def " not in source and "class " not in source
            assert len(source.splitlines()) <= 35
