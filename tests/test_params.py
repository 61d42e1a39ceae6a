"""Parameter files are checked against the notebooks' parameters cells before anything runs."""

import pytest

from perturbnmf.report import STEPS
from perturbnmf.report.params import RULES, ParameterError, check, load_yaml, read_parameters_cell, validate
from perturbnmf.report.params import declared as declared_in_schema

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def declared():
    """What each notebook's parameters cell declares."""
    return {step: read_parameters_cell(REPO_ROOT / "notebooks" / f"{stem}.ipynb") for step, (stem, _) in STEPS.items()}


@pytest.fixture(scope="module")
def merged():
    """The parameter schema: every parameter with its value rule."""
    return declared_in_schema()


def test_shared_parameters_agree_across_notebooks(declared):
    seen = {}
    for step, params in declared.items():
        for name, p in params.items():
            if name in seen:
                assert (p.annotation, p.default) == seen[name], f"{name} differs in {step}"
            seen[name] = (p.annotation, p.default)


def test_every_parameter_has_a_rule_help_and_a_valid_default(declared, merged):
    for name, p in merged.items():
        assert name in RULES, f"no value rule for {name}"
        assert p.help, f"parameter {name} has no help comment"
    validate({}, merged)  # the defaults themselves pass


@pytest.mark.parametrize("yaml_file", sorted((REPO_ROOT / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_parameter_files_validate(yaml_file, merged):
    values = validate(load_yaml(yaml_file), merged)
    assert values["run_name"] == yaml_file.stem


@pytest.mark.parametrize(
    "values, culprit",
    [
        ({"k_valus": [5]}, "k_valus"),  # typo: an error, not a papermill warning
        ({"k": "10"}, "'k' must be of type int"),
        ({"k_values": 10}, "'k_values' must be of type list[int]"),
        ({"k_values": [5, "x"]}, "'k_values' must be of type list[int]"),
        ({"fdr": 1.5}, "'fdr' must lie strictly between 0 and 1"),
        ({"k_values": [0, 5], "k": 5}, "'k_values' every k must be >= 1"),
        ({"k": 7}, "'k' (7) must be one of 'k_values'"),
        ({"tol": 0.0}, "'tol' must be a finite number > 0"),
        ({"run_name": "../escape"}, "'run_name' must be a plain folder name"),
        ({"run_name": "/abs"}, "'run_name' must be a plain folder name"),
        ({"batch_key": ["a", "b"]}, "'batch_key' must be of type str | None"),
        ({"simulate": "yes"}, "'simulate' must be of type bool"),
        ({"solver": "als"}, "'solver' must be one of 'hals', 'mu'"),
        ({"solver": "mu"}, "with 'model' 'nmf' use 'solver: hals'"),
        ({"model": "pca"}, "'model' must be one of 'nmf', 'seminmf'"),
        ({"density_threshold": 3.0}, "'density_threshold' must lie in"),
        ({"holdout_fraction": 0.9}, "'holdout_fraction' must lie in [0, 0.5]"),
        ({"n_restarts": 0}, "'n_restarts' must be an integer >= 1"),
    ],
)
def test_bad_values_are_refused_naming_the_key(values, culprit, merged):
    with pytest.raises(ParameterError) as err:
        validate(values, merged)
    assert culprit in str(err.value)


def test_typo_suggests_the_right_key(merged):
    with pytest.raises(ParameterError, match="Did you mean 'control_label'"):
        validate({"control_lable": "NT"}, merged)


def test_int_is_accepted_for_float_and_none_for_optional(merged):
    values = validate({"max_pct_mito": 20, "batch_key": None, "hvg_n_top_genes": 500}, merged)
    assert values["max_pct_mito"] == 20 and values["batch_key"] is None


def test_check_applies_rules_inside_notebooks():
    assert check(fdr=0.1, k=3)["k"] == 3
    with pytest.raises(ParameterError, match="'fdr'"):
        check(fdr=0)
    with pytest.raises(ParameterError, match="'k'"):
        check(k="3")


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("run_name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ParameterError, match="not valid YAML"):
        load_yaml(evil)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ParameterError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")
    with pytest.raises(ParameterError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_parameters_cell_must_be_annotated_literals(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("k = compute()\n")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    path = tmp_path / "bad.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(ParameterError, match="name: type = literal"):
        read_parameters_cell(path)


def test_readme_documents_every_parameter(merged):
    readme = (REPO_ROOT / "README.md").read_text()
    for name in merged:
        assert f"| `{name}` |" in readme, f"README's parameter table lacks {name}"
