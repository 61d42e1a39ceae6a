"""Pipeline parameters: read them from the notebooks, check them before anything runs.

The single source of truth for *which* parameters exist, their types and defaults is
each notebook's cell tagged ``parameters``.  Every line there is an annotated literal::

    k_values: list[int] = [5, 10, 15]  # numbers of programs to fit

:func:`read_parameters_cell` parses that cell with :mod:`ast` (papermill's own parser
drops annotations such as ``str | None``), and :func:`validate` checks a YAML mapping
against it: unknown keys, wrong types and out-of-range values are errors that name
the key, never papermill warnings.  Value ranges live in :data:`RULES` below, so the
same check runs in the driver (before any notebook starts) and inside each notebook
(when it is run by hand or by ``papermill`` directly).
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

__all__ = [
    "ParameterError",
    "Parameter",
    "read_parameters_cell",
    "validate",
    "check",
    "load_yaml",
    "RULES",
]


class ParameterError(ValueError):
    """A parameter value or parameter file that cannot be used, with the fix in the message."""


@dataclass(frozen=True)
class Parameter:
    """One declared notebook parameter."""

    name: str
    annotation: str  # e.g. "int", "str | None", "list[str]"
    default: Any
    help: str


_PARAMETER_LINE = re.compile(r"^(?P<name>[A-Za-z_]\w*)\s*:.*?(#\s*(?P<help>.*))?$")


def read_parameters_cell(notebook: str | Path) -> dict[str, Parameter]:
    """Declared parameters of a notebook, in order.

    Parameters
    ----------
    notebook
        Path to an ``.ipynb`` file with exactly one cell tagged ``parameters``.

    Returns
    -------
    dict
        ``{name: Parameter}``. Every statement of the cell must be ``name: type = literal``.
    """
    notebook = Path(notebook)
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(f"{notebook}: expected exactly one cell tagged 'parameters', found {len(cells)}.")
    source = "".join(cells[0]["source"])
    helps = {}
    for line in source.splitlines():
        match = _PARAMETER_LINE.match(line)
        if match:
            helps[match["name"]] = (match["help"] or "").strip()
    declared: dict[str, Parameter] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None):
            raise ParameterError(
                f"{notebook}: parameters cell line {node.lineno} is not of the form 'name: type = literal'."
            )
        name = node.target.id
        declared[name] = Parameter(
            name=name,
            annotation=ast.unparse(node.annotation),
            default=ast.literal_eval(node.value),
            help=helps.get(name, ""),
        )
    return declared


# --- type checking of annotations ------------------------------------------------------

_SCALARS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    # An integer is an acceptable float (YAML writes 3 for 3.0).
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "None": lambda v: v is None,
}


def _matches(value: Any, annotation: ast.expr) -> bool:
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return _matches(value, annotation.left) or _matches(value, annotation.right)
    if isinstance(annotation, ast.Constant) and annotation.value is None:
        return value is None
    if isinstance(annotation, ast.Name):
        if annotation.id == "list":
            return isinstance(value, list)
        return _SCALARS[annotation.id](value)
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", None) == "list":
        return isinstance(value, list) and all(_matches(v, annotation.slice) for v in value)
    raise ParameterError(f"unsupported parameter annotation {ast.unparse(annotation)!r}")


def _type_ok(value: Any, annotation: str) -> bool:
    return _matches(value, ast.parse(annotation, mode="eval").body)


# --- value rules (ranges, choices) -------------------------------------------------------


def _positive_int(v):
    return None if v >= 1 else "must be an integer >= 1"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _probability(v):
    return None if 0 < v < 1 else "must lie strictly between 0 and 1"


def _positive_float(v):
    return None if (math.isfinite(v) and v > 0) else "must be a finite number > 0"


def _k_values(v):
    if not v:
        return "must list at least one number of programs, e.g. [5, 10, 15]"
    if any(k < 1 for k in v):
        return "every k must be >= 1"
    if len(set(v)) != len(v):
        return "contains duplicates"
    return None


def _run_name(v):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v) or ".." in v:
        return "must be a plain folder name (letters, digits, '.', '_', '-'; no '/' or '..')"
    return None


#: The repository (outputs inside it belong under reports/).
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _finite(v):
    return None if math.isfinite(v) else "must be a finite number"


def _output_dir(v):
    """An output folder may not climb ('..'), and inside the repository it must lie under reports/."""
    if not v.strip():
        return "must not be empty"
    if v.startswith("~"):
        return "must be a full path ('~' is not expanded); or leave it out to write into reports/<run_name>/"
    if ".." in Path(v).parts:
        return "must not contain '..' (give the folder's full path, or leave it out to write into reports/<run_name>/)"
    repo = _REPO_ROOT.resolve()
    reports = repo / "reports"
    root = (Path(v) if Path(v).is_absolute() else repo / v).resolve()
    if root == repo or repo.is_relative_to(root):
        return "must not be the repository or a folder above it; leave it out to write into reports/<run_name>/"
    if root.is_relative_to(repo) and not (root.is_relative_to(reports) and root != reports):
        return "inside the repository must be a folder under reports/ (e.g. reports/my_run), so no source file is overwritten"
    if root.is_file():
        return "is an existing file, not a folder"
    return None


def _choice(*options):
    def rule(v):
        return None if v in options else f"must be one of {', '.join(map(repr, options))}"

    return rule


def _non_empty(v):
    return None if v.strip() else "must not be empty"


#: name -> rule(value) returning None when fine or a short reason. Every declared
#: notebook parameter has a rule (a test enforces it); ``None`` values skip the rule.
RULES: dict[str, Callable[[Any], str | None]] = {
    "run_name": _run_name,
    "output_dir": _output_dir,
    "input": _non_empty,
    "simulate": lambda v: None,
    "simulate_n_cells": _positive_int,
    "simulate_n_genes": _positive_int,
    "seed": _non_negative,
    "perturbation_key": _non_empty,
    "control_label": _non_empty,
    "batch_key": _non_empty,
    "guide_key": _non_empty,
    "keep_cells_key": _non_empty,
    "mito_prefix": _non_empty,
    "min_counts_per_cell": _non_negative,
    "min_genes_per_cell": _non_negative,
    "max_pct_mito": lambda v: None if 0 < v <= 100 else "must be a percentage in (0, 100]",
    "min_cells_per_gene": _non_negative,
    "min_cells_per_group": _positive_int,
    "cell_cycle_genes": _non_empty,
    "hvg_min_mean": _finite,
    "hvg_max_mean": _finite,
    "hvg_min_disp": _finite,
    "hvg_n_top_genes": _positive_int,
    "hvg_use_all_genes": lambda v: None,
    "gene_sets": lambda v: None if v and all(s.strip() for s in v) else "must list at least one gene-set library (GMT file or Enrichr name)",
    "k_values": _k_values,
    "k": _positive_int,
    "model": _choice("nmf", "seminmf"),
    "solver": _choice("hals", "mu"),
    "density_threshold": lambda v: None if 0 < v <= 2 else "must lie in (0, 2] (a distance between unit vectors; 2 keeps every restart program)",
    "n_restarts": _positive_int,
    "holdout_fraction": lambda v: None if 0 <= v <= 0.5 else "must lie in [0, 0.5]",
    "n_jobs": _positive_int,
    "split_half": lambda v: None,
    "max_iter": _positive_int,
    "tol": _positive_float,
    "test": _choice("auto", "welch", "ols_batch", "mannwhitney"),
    "fdr": _probability,
    "n_top_programs": _positive_int,
    "n_top_genes": _positive_int,
    "min_set_size": _positive_int,
    "max_set_size": _positive_int,
    "n_top_terms": _positive_int,
    "prerank": lambda v: None,
    "prerank_min_set_size": _positive_int,
}


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_hint(value: Any, annotation: str) -> str:
    """A sentence on how to write ``value`` so that it has type ``annotation`` (or '')."""
    numeric = "int" in annotation or "float" in annotation
    if value is None:
        return " Remove the key to use the default, or give a value."
    if annotation.startswith("list") and not isinstance(value, list):
        return f" Write a list, e.g. [{_describe(value)}] or one '- item' line per entry."
    if isinstance(value, (list, dict)) and not annotation.startswith("list"):
        return " Give a single value, not a list or mapping."
    if isinstance(value, str) and numeric:
        try:
            float(value)
        except ValueError:
            return " Give a number."
        if "e" in value.lower() and "." not in value:
            return " YAML reads a number like 1e-4 as text: write 1.0e-4 or 0.0001."
        return " Write the number without quotes."
    if isinstance(value, str) and "bool" in annotation and value.lower() in ("true", "false", "yes", "no"):
        return " Write true or false without quotes."
    if isinstance(value, float) and "int" in annotation and value.is_integer():
        return f" Write {int(value)} (a whole number, no decimal point)."
    return ""


def validate(values: dict[str, Any], declared: dict[str, Parameter], source: str = "parameters") -> dict[str, Any]:
    """Check ``values`` against ``declared`` parameters; return defaults updated by values.

    Raises
    ------
    ParameterError
        Listing every unknown key (with the closest declared name), every value of the
        wrong type and every value out of range, each naming the key and the fix.
    """
    problems = []
    for key in values:
        if key not in declared:
            close = _closest(str(key), declared)
            hint = f" Did you mean {close!r}?" if close else ""
            problems.append(f"unknown key {key!r}.{hint} Known keys: {', '.join(declared)}.")
    merged = {name: p.default for name, p in declared.items()}
    for key, value in values.items():
        if key not in declared:
            continue
        p = declared[key]
        if not _type_ok(value, p.annotation):
            problems.append(f"{key!r} must be of type {p.annotation}, got {_describe(value)} ({type(value).__name__})."
                            + _type_hint(value, p.annotation))
            continue
        merged[key] = value
    for key, value in merged.items():
        if value is None or key not in RULES:
            continue
        if key in values and not _type_ok(value, declared[key].annotation):
            continue
        reason = RULES[key](value)
        if reason:
            problems.append(f"{key!r} {reason}; got {_describe(value)}.")
    if merged.get("k") is not None and merged.get("k_values") and merged["k"] not in merged["k_values"]:
        problems.append(
            f"'k' ({merged['k']}) must be one of 'k_values' {merged['k_values']}: add it to the sweep or pick one of them."
        )
    if merged.get("model") == "nmf" and merged.get("solver") == "mu":
        problems.append("'solver' 'mu' is the multiplicative rule of semi-NMF; with 'model' 'nmf' use 'solver: hals', "
                        "or set 'model: seminmf'.")
    if merged.get("hvg_min_mean") is not None and merged.get("hvg_max_mean") is not None:
        if merged["hvg_min_mean"] >= merged["hvg_max_mean"]:
            problems.append("'hvg_min_mean' must be smaller than 'hvg_max_mean'.")
    if merged.get("min_set_size") and merged.get("max_set_size") and merged["min_set_size"] > merged["max_set_size"]:
        problems.append("'min_set_size' must not exceed 'max_set_size'.")
    if problems:
        raise ParameterError(f"Invalid {source}:\n  - " + "\n  - ".join(problems))
    return merged


def check(**values: Any) -> dict[str, Any]:
    """Apply :data:`RULES` to the values a notebook was given (by hand or by papermill).

    Types are checked by :func:`validate` in the driver; here each value is checked
    for its range, so a notebook run directly fails early with the same message.
    """
    problems = []
    for key, value in values.items():
        if value is None or key not in RULES:
            continue
        try:
            reason = RULES[key](value)
        except TypeError:
            reason = f"has the wrong type ({type(value).__name__})"
        if reason:
            problems.append(f"{key!r} {reason}; got {_describe(value)}.")
    if problems:
        raise ParameterError("Invalid parameters:\n  - " + "\n  - ".join(problems))
    return dict(values)


def _closest(key: str, declared: dict[str, Parameter]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, list(declared), n=1, cutoff=0.6)
    return matches[0] if matches else None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first, second):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (values, never code) that refuses a key given twice in one mapping."""


def _construct_unique_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise _DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
        except TypeError:  # an unhashable key: let SafeLoader report it
            pass
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a parameters YAML file safely (a ``yaml.SafeLoader``: values, never code; no key twice)."""
    path = Path(path)
    if not path.is_file():
        raise ParameterError(f"Parameters file {str(path)!r} does not exist. Copy params/papalexi2021.yaml and edit it.")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except _DuplicateKey as err:
        raise ParameterError(f"Parameters file {str(path)!r} sets {err.key!r} twice (lines {err.first} and "
                             f"{err.second}); keep one of them.") from None
    except UnicodeDecodeError:
        raise ParameterError(f"Parameters file {str(path)!r} is not UTF-8 text; save it as UTF-8.") from None
    except yaml.YAMLError as err:
        raise ParameterError(f"Parameters file {str(path)!r} is not valid YAML: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ParameterError(f"Parameters file {str(path)!r} must be a mapping of key: value lines, got {type(values).__name__}.")
    return values
