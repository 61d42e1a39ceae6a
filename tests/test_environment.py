"""The software is pinned: the lock covers every dependency, environment.yml mirrors it."""

import re
import tomllib
from importlib import metadata

import yaml

from conftest import REPO_ROOT


def lock_pins():
    lines = (REPO_ROOT / "requirements.lock").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_lock_line_is_an_exact_pin():
    for line in lock_pins():
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), line


def test_lock_covers_the_declared_dependencies():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pinned = {normalise(line.split("==")[0]) for line in lock_pins()}
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    for requirement in declared:
        name = normalise(re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0])
        assert name in pinned, f"{name} is declared in pyproject.toml but not pinned in requirements.lock"


def test_environment_yml_mirrors_the_lock():
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == lock_pins()


def test_installed_versions_are_the_pinned_ones():
    """The environment running the tests was built from the lock (what `make test` does)."""
    for line in lock_pins():
        name, version = line.split("==")
        assert metadata.version(name) == version, f"{name} {metadata.version(name)} installed, lock pins {version}"
