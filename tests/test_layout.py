"""The code's architecture, checked: import direction, no cycles, short functions, a thin runner,
each parameter declared once (README, "How the code is laid out")."""

import ast
from pathlib import Path

import pytest

from perturbnmf.report import params

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "lib" / "perturbnmf"
#: The compute layers, top to bottom: a module may import its own layer and the layers below it.
LAYERS = [
    {"perturbnmf.report"},
    {"perturbnmf.tl", "perturbnmf.pp", "perturbnmf.pl", "perturbnmf.evaluation", "perturbnmf.datasets"},
    {"perturbnmf.decomposition"},
    {"perturbnmf.errors", "perturbnmf._checks"},
]
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every perturbnmf module ``path`` imports (at any depth of the file), as absolute names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("perturbnmf"):
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("perturbnmf"))
    return found


def _layer(module: str) -> int | None:
    for depth, layer in enumerate(LAYERS):
        if any(module == top or module.startswith(top + ".") for top in layer):
            return depth
    return None


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_layers(path):
    """report → tl / pp / pl / evaluation / datasets → decomposition → errors: never upwards."""
    own = _layer(_module_name(path))
    if own is None:  # the package's __init__ re-exports the compute layers
        assert not any(_layer(m) == 0 for m in _imports(path)), "perturbnmf/__init__ must not import report"
        return
    upward = sorted(m for m in _imports(path) if (_layer(m) is not None and _layer(m) < own))
    assert not upward, f"{_module_name(path)} imports a layer above it: {upward}"


def test_no_import_cycle_between_modules():
    graph = {}
    modules = {_module_name(p) for p in SOURCES}
    for path in SOURCES:
        name = _module_name(path)
        graph[name] = {m for m in _imports(path) if m in modules and m != name and not name.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                if not node.startswith(nxt) and not nxt.startswith(node):  # a package and its own submodule
                    raise AssertionError("import cycle: " + " → ".join(trail + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def _code_lines(node) -> int:
    lines = node.end_lineno - node.lineno + 1
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        lines -= body[0].end_lineno - body[0].lineno + 1
    return lines


def test_functions_are_short_or_say_why():
    long = []
    for path in [*SOURCES, REPO_ROOT / "run_all.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_FUNCTION_LINES:
                if "Long because" not in (ast.get_docstring(node) or ""):
                    long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({_code_lines(node)} lines)")
    assert not long, "functions over 80 code lines without 'Long because' in the docstring:\n" + "\n".join(long)


def test_run_all_is_only_argument_parsing():
    source = (REPO_ROOT / "run_all.py").read_text()
    assert len(source.splitlines()) <= 100
    tree = ast.parse(source)
    assert [n.name for n in tree.body if isinstance(n, ast.FunctionDef)] == ["parse_args", "main"]


def test_the_repository_root_is_computed_once():
    places = [f"{p.relative_to(PACKAGE)}" for p in SOURCES if "parents[" in p.read_text()]
    assert places == ["report/runfolder.py"], places


def test_notebooks_and_readme_follow_the_parameter_schema():
    """Each parameter is declared once (report/params.py); the notebooks' parameters cells and the
    README's table are generated from it (python -m perturbnmf.report params --write)."""
    assert params.drift() == []
    for step in params.ALL_STEPS:
        assert params.parameters_cell(step).count("\n") + 1 == len(params.declared(step))


def test_notebooks_check_their_parameters_with_one_call():
    import json

    for path in sorted((REPO_ROOT / "notebooks").glob("*.ipynb")):
        code = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        assert code.count("check_step(") == 1, path.name
