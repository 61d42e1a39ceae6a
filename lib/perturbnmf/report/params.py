"""The pipeline's parameters: one declaration each, checked before anything runs.

:data:`SCHEMA` declares every parameter once — name, type, default, meaning, the steps that
take it and the check of its value. Everything else is derived from it:

- each notebook's cell tagged ``parameters`` (papermill's injection point) is
  :func:`parameters_cell` of its step; a test fails when a notebook drifts from the schema,
  and ``python -m perturbnmf.report params --write`` rewrites the cells and README's table;
- :func:`validate` checks a YAML mapping before any kernel starts (unknown keys with the
  closest name, wrong types, out-of-range values, and the rules that tie two keys together);
- :func:`check_step` runs the same check inside a notebook on the values papermill (or a
  user editing the parameters cell) gave it;
- :func:`readme_table` is the README's parameter table.

To add a parameter: one :class:`Parameter` line here, then ``--write``; use it in the
notebook of each step named in ``steps``.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import InputError, ParameterError
from .runfolder import REPO_ROOT, STEPS

__all__ = ["Parameter", "SCHEMA", "PARAMETERS", "RULES", "ParameterError", "declared", "validate", "check",
           "check_step", "load_yaml", "read_parameters_cell", "parameters_cell", "readme_table", "contrast_method"]


# --- value rules (ranges, choices): each returns None when fine, else a short reason -------------

def _any(v):
    return None


def _positive_int(v):
    return None if v >= 1 else "must be an integer >= 1"


def _umap_cells(v):
    return None if v >= 100 else "must be at least 100 (a neighbours graph needs cells), or None for all cells"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _probability(v):
    return None if 0 < v < 1 else "must lie strictly between 0 and 1"


def _positive_float(v):
    return None if (math.isfinite(v) and v > 0) else "must be a finite number > 0"


def _finite(v):
    return None if math.isfinite(v) else "must be a finite number"


def _non_empty(v):
    return None if v.strip() else "must not be empty"


def _between(low, high, closed_low=True, note=""):
    def rule(v):
        inside = (low <= v if closed_low else low < v) and v <= high
        return None if inside else f"must lie in {'[' if closed_low else '('}{low}, {high}]{note}"

    return rule


def _choice(*options):
    def rule(v):
        return None if v in options else f"must be one of {', '.join(map(repr, options))}"

    return rule


def _k_values(v):
    if not v:
        return "must list at least one number of programs, e.g. [5, 10, 15]"
    if any(k < 1 for k in v):
        return "every k must be >= 1"
    if len(set(v)) != len(v):
        return "contains duplicates"
    return None


def _gene_sets(v):
    return None if v and all(s.strip() for s in v) else "must list at least one gene-set library (GMT file or Enrichr name)"


def _covariate_keys(v):
    if any(not k.strip() for k in v):
        return "must list obs column names (no empty ones), e.g. [log1p_total_counts, pct_counts_mito]"
    return "contains duplicates" if len(set(v)) != len(v) else None


def _run_name(v):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v) or ".." in v:
        return "must be a plain folder name (letters, digits, '.', '_', '-'; no '/' or '..')"
    return None


def _output_dir(v):
    """An output folder may not climb ('..'), and inside the repository it must lie under reports/."""
    if not v.strip():
        return "must not be empty"
    if v.startswith("~"):
        return "must be a full path ('~' is not expanded); or leave it out to write into reports/<run_name>/"
    if ".." in Path(v).parts:
        return "must not contain '..' (give the folder's full path, or leave it out to write into reports/<run_name>/)"
    repo = REPO_ROOT.resolve()
    reports = repo / "reports"
    root = (Path(v) if Path(v).is_absolute() else repo / v).resolve()
    if root == repo or repo.is_relative_to(root):
        return "must not be the repository or a folder above it; leave it out to write into reports/<run_name>/"
    if root.is_relative_to(repo) and not (root.is_relative_to(reports) and root != reports):
        return "inside the repository must be a folder under reports/ (e.g. reports/my_run), so no source file is overwritten"
    if root.is_file():
        return "is an existing file, not a folder"
    return None


def _cluster(v):
    """None, "local", or a Dask scheduler address."""
    if v == "local" or "://" in v and v.split("://", 1)[1].strip():
        return None
    return ('must be "local" (a Dask cluster on this machine) or a scheduler address such as "tcp://host:8786"; '
            "leave it out (None) to run in this process")


# --- the schema --------------------------------------------------------------------------------

ALL_STEPS = tuple(STEPS)


@dataclass(frozen=True)
class Parameter:
    """One parameter of the pipeline.

    ``steps``: the notebooks that take it. ``affects``: the steps whose outputs change with it
    (default: ``steps``; a resumed run re-runs them when it changed). ``input_file``: it names
    input files, whose contents also make the first step of ``affects`` stale.
    """

    name: str
    annotation: str  # e.g. "int", "str | None", "list[str]"
    default: Any
    help: str
    steps: tuple[str, ...]
    rule: Callable[[Any], str | None] = _any
    affects: tuple[str, ...] | None = None
    input_file: bool = False

    @property
    def affected_steps(self) -> tuple[str, ...]:
        return self.steps if self.affects is None else self.affects


P = Parameter
_PRE, _FAC, _STA, _ENR = ALL_STEPS

#: Every parameter, in the order of the notebooks' parameters cells.
SCHEMA: tuple[Parameter, ...] = (
    P("run_name", "str", "demo", "name of the run; outputs go to reports/<run_name>/", ALL_STEPS, _run_name, affects=()),
    P("output_dir", "str | None", None, "write outputs here instead of reports/<run_name>/ (set by run_all.py)",
      ALL_STEPS, _output_dir, affects=()),
    P("cluster", "str | None", None, 'where the work runs: None (this process), "local" (a Dask LocalCluster on this '
      'machine, sized to its cores and memory, spilling to disk) or the address of a running Dask scheduler '
      '("tcp://host:8786")', ALL_STEPS, _cluster, affects=()),
    P("input", "str", "reports/demo_inputs/simulated_screen.h5ad", ".h5ad with raw UMI counts in X (cells x genes)",
      (_PRE,), _non_empty, input_file=True),
    P("simulate", "bool", False, "first write a simulated screen with known truth to `input` (the demo)", (_PRE,)),
    P("simulate_n_cells", "int", 4000, "cells of the simulated screen", (_PRE,), _positive_int),
    P("simulate_n_genes", "int", 2000, "genes of the simulated screen", (_PRE,), _positive_int),
    P("seed", "int", 0, "random seed (simulation, cell-cycle scoring, factorisation)", (_PRE, _FAC), _non_negative),
    P("perturbation_key", "str", "perturbation", "obs column with each cell's target", ALL_STEPS, _non_empty),
    P("control_label", "str", "non-targeting", "value of perturbation_key for control cells", ALL_STEPS, _non_empty),
    P("batch_key", "str | None", "batch", "obs column with the batch; None when there is one batch",
      (_PRE, _FAC, _STA), _non_empty),
    P("guide_key", "str | None", "guide", "obs column with the guide id; None when unknown", (_PRE, _STA), _non_empty),
    P("keep_cells_key", "str | None", None, "boolean obs column; only True cells are analysed (e.g. single_guide)",
      (_PRE,), _non_empty),
    P("min_cells_per_group", "int", 10, "perturbation groups with fewer cells are dropped and listed", (_PRE,),
      _positive_int),
    P("mito_prefix", "str", "MT-", "mitochondrial genes start with this (case-insensitive)", (_PRE,), _non_empty),
    P("min_counts_per_cell", "int", 0, "QC: drop cells with fewer UMIs", (_PRE,), _non_negative),
    P("min_genes_per_cell", "int", 0, "QC: drop cells with fewer detected genes", (_PRE,), _non_negative),
    P("max_pct_mito", "float", 100.0, "QC: drop cells with a larger mitochondrial share (%)", (_PRE,),
      lambda v: None if 0 < v <= 100 else "must be a percentage in (0, 100]"),
    P("min_cells_per_gene", "int", 3, "drop genes detected in fewer cells", (_PRE,), _non_negative),
    P("cell_cycle_genes", "str | None", "reports/demo_inputs/simulated_cell_cycle_genes.tsv",
      "S/G2M marker file; None skips scoring", (_PRE,), _non_empty, input_file=True),
    P("hvg_min_mean", "float", 0.0125, "gene selection: minimum mean (log-normalised)", (_PRE,), _finite),
    P("hvg_max_mean", "float", 3.0, "gene selection: maximum mean", (_PRE,), _finite),
    P("hvg_min_disp", "float", 0.5, "gene selection: minimum normalised dispersion", (_PRE,), _finite),
    P("hvg_n_top_genes", "int | None", None, "select this many most dispersed genes instead of the cutoffs", (_PRE,),
      _positive_int),
    P("hvg_use_all_genes", "bool", False, "factorise all genes that pass QC", (_PRE,)),
    # step 1 only checks that the libraries are readable and share genes with the data; step 4 uses them
    P("gene_sets", "list[str]", ["reports/demo_inputs/simulated_gene_sets.gmt"],
      "gene-set libraries: GMT files, or Enrichr names (online only)", (_PRE, _ENR), _gene_sets, affects=(_ENR,),
      input_file=True),
    P("k_values", "list[int]", [5, 10, 15, 20, 25, 30, 35, 40, 45], "numbers of programs to fit", (_FAC,), _k_values),
    P("k", "int | None", None, "programs kept for steps 3 and 4 (one of k_values); None: the suggested k", (_FAC,),
      _positive_int),
    P("model", "str", "nmf", '"nmf" (non-negative loadings: identifiable programs, the default) or "seminmf" '
      "(signed loadings, the original analysis)", (_FAC,), _choice("nmf", "seminmf")),
    P("n_restarts", "int", 5, "fits per k from different random starts (consensus and stability)", (_FAC,),
      _positive_int),
    P("solver", "str", "hals", '"hals" (block coordinate descent, fast) or "mu" (Ding-Li-Jordan rule of the original '
      "analysis; seminmf only)", (_FAC,), _choice("hals", "mu")),
    P("density_threshold", "float | None", 0.5, "restart programs farther than this from their nearest programs of "
      "other restarts are outliers, left out of the consensus (cNMF's filter); None keeps all", (_FAC,),
      _between(0, 2, closed_low=False, note=" (a distance between unit vectors; 2 keeps every restart program)")),
    P("max_iter", "int", 500, "maximum iterations per fit", (_FAC,), _positive_int),
    P("tol", "float", 1e-05, "a restart stops when an iteration lowers the objective by less than this (relative; "
      "over 10 iterations for solver mu)", (_FAC,),
      _positive_float),
    P("sweep_max_cells", "int | None", 50000, "the k sweep learns from a random subsample of at most this many cells "
      "(the kept k's programs are then fitted on all cells); None: all cells", (_FAC,), _positive_int),
    P("covariate_keys", "list[str] | None", ["log1p_total_counts", "pct_counts_mito"], "numeric obs columns of "
      "technical variation fitted as known covariates beside the batch baselines (model nmf), each gene following its "
      "own piecewise-linear curve through knots at the covariate's quantiles (`tl.COVARIATE_KNOTS`): sequencing depth "
      "and the mitochondrial share then get loadings of their own instead of taking a program; [] or None: batches only",
      (_FAC,), _covariate_keys),
    P("holdout_fraction", "float", 0.1, "share of cells held out to measure the error on cells the programs never saw",
      (_FAC,), _between(0, 0.5)),
    P("n_jobs", "int | None", None, "parallel worker processes for the restarts; None: all cores", (_FAC,),
      _positive_int),
    P("split_half", "bool", True, "also learn the programs on half of each group's cells, so step 3 can test on the "
      "other half", (_FAC,)),
    P("umap_max_cells", "int | None", 50000, "cells embedded in the UMAP of program usage: above this many, a "
      "subsample in which every perturbation keeps its share of the cells; None: all cells", (_FAC,), _umap_cells),
    P("test", "str", "auto", 'perturbation vs control test: "auto" (the Mann-Whitney rank test, stratified by batch), '
      '"mannwhitney", "welch", "ols_batch"', (_STA,), _choice("auto", "welch", "ols_batch", "mannwhitney")),
    P("fdr", "float", 0.05, "false discovery rate for calling programs and effects significant", (_STA, _ENR),
      _probability),
    P("n_top_programs", "int", 6, "programs shown as boxplots", (_STA, _ENR), _positive_int),
    P("n_top_targets", "int", 11, "perturbations with the most hits shown as program profiles and on the UMAP of the "
      "cells", (_STA,), _positive_int),
    P("n_top_genes", "int", 100, "genes per program and side (positive / negative gene scores)", (_ENR,),
      _positive_int),
    P("min_set_size", "int", 3, "gene sets with fewer genes among the analysed genes are not tested", (_ENR,),
      _positive_int),
    P("max_set_size", "int", 2000, "gene sets with more genes among the analysed genes are not tested", (_ENR,),
      _positive_int),
    P("n_top_terms", "int", 3, "terms per program in the dot plot", (_ENR,), _positive_int),
    P("prerank", "bool", False, "also run a rank-based test (GSEA prerank) on every program's whole signed "
      "gene-score vector", (_ENR,)),
    P("prerank_min_set_size", "int", 15, "prerank: gene sets with fewer genes among the analysed genes are not "
      "tested", (_ENR,), _positive_int),
)
del P

#: name -> Parameter
PARAMETERS: dict[str, Parameter] = {p.name: p for p in SCHEMA}
#: name -> value rule (derived from :data:`SCHEMA`)
RULES: dict[str, Callable[[Any], str | None]] = {p.name: p.rule for p in SCHEMA}


def _k_in_sweep(v):
    if v.get("k") is not None and v.get("k_values") and v["k"] not in v["k_values"]:
        return f"'k' ({v['k']}) must be one of 'k_values' {v['k_values']}: add it to the sweep or pick one of them."
    return None


def _solver_fits_model(v):
    if v.get("model") == "nmf" and v.get("solver") == "mu":
        return ("'solver' 'mu' is the multiplicative rule of semi-NMF; with 'model' 'nmf' use 'solver: hals', "
                "or set 'model: seminmf'.")
    return None


def _hvg_range(v):
    if v.get("hvg_min_mean") is not None and v.get("hvg_max_mean") is not None:
        if v["hvg_min_mean"] >= v["hvg_max_mean"]:
            return "'hvg_min_mean' must be smaller than 'hvg_max_mean'."
    return None


def _set_size_range(v):
    if v.get("min_set_size") and v.get("max_set_size") and v["min_set_size"] > v["max_set_size"]:
        return "'min_set_size' must not exceed 'max_set_size'."
    return None


#: Rules that tie two parameters together: each takes the merged values, returns None or the problem.
CROSS_RULES = (_k_in_sweep, _solver_fits_model, _hvg_range, _set_size_range)


def declared(step: str | None = None) -> dict[str, Parameter]:
    """``{name: Parameter}`` of one step (in its parameters cell's order), or of every step."""
    return {p.name: p for p in SCHEMA if step is None or step in p.steps}


def contrast_method(test: str, batch_key: str | None) -> str:
    """The contrast test of parameter ``test``.

    ``auto`` is the rank test (van Elteren's, stratified by batch, when there are batches): on
    zero-inflated usage the t-tests give about twice too many p-values in the far tail where
    Benjamini–Hochberg makes its first calls (tests/test_stats_power.py), the rank tests do not.
    """
    if test == "auto":
        return "mannwhitney"
    if test == "ols_batch" and not batch_key:
        raise InputError("Parameter 'test' is 'ols_batch' but 'batch_key' is not set: the batch-adjusted test "
                         "needs batches. Set 'batch_key', or use test 'welch', 'mannwhitney' or 'auto'.")
    return test


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


# --- checking values ---------------------------------------------------------------------------

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


def _value_problems(values: dict[str, Any], declared: dict[str, Parameter]) -> list[str]:
    """The wrong type or out-of-range value of every key of ``values`` (keys must be declared)."""
    problems = []
    for key, value in values.items():
        parameter = declared[key]
        if not _type_ok(value, parameter.annotation):
            problems.append(f"{key!r} must be of type {parameter.annotation}, got {_describe(value)} "
                            f"({type(value).__name__})." + _type_hint(value, parameter.annotation))
        elif value is not None:
            reason = parameter.rule(value)
            if reason:
                problems.append(f"{key!r} {reason}; got {_describe(value)}.")
    return problems


def validate(values: dict[str, Any], declared: dict[str, Parameter] = PARAMETERS,
             source: str = "parameters") -> dict[str, Any]:
    """Check ``values`` against ``declared`` parameters; return the defaults updated by values.

    Raises
    ------
    ParameterError
        Listing every unknown key (with the closest declared name), every value of the
        wrong type, every value out of range and every broken rule between two keys,
        each naming the key and the fix.
    """
    problems = []
    for key in values:
        if key not in declared:
            close = _closest(str(key), declared)
            hint = f" Did you mean {close!r}?" if close else ""
            problems.append(f"unknown key {key!r}.{hint} Known keys: {', '.join(declared)}.")
    known = {key: value for key, value in values.items() if key in declared}
    problems += _value_problems({name: known.get(name, p.default) for name, p in declared.items()}, declared)
    merged = {name: p.default for name, p in declared.items()}
    merged.update({key: value for key, value in known.items() if _type_ok(value, declared[key].annotation)})
    problems += [problem for rule in CROSS_RULES if (problem := rule(merged))]
    if problems:
        raise ParameterError(f"Invalid {source}:\n  - " + "\n  - ".join(problems))
    return merged


def check(**values: Any) -> dict[str, Any]:
    """Check the type and range of each given value (keys from :data:`SCHEMA`); return them."""
    unknown = [key for key in values if key not in PARAMETERS]
    if unknown:
        raise ParameterError(f"Unknown parameter(s) {', '.join(map(repr, unknown))}.")
    problems = _value_problems(values, PARAMETERS)
    if problems:
        raise ParameterError("Invalid parameters:\n  - " + "\n  - ".join(problems))
    return dict(values)


def check_step(step: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """The parameters of ``step`` from a notebook's ``namespace`` (``globals()``), checked.

    Papermill (or a user editing the parameters cell) sets them; this applies the same checks
    as the runner, so a notebook run by hand fails early with the same message. Returns
    ``{name: value}`` in the schema's order.
    """
    names = declared(step)
    missing = [name for name in names if name not in namespace]
    if missing:
        raise ParameterError(f"The parameters cell of step {step} lacks {', '.join(missing)}: regenerate it with "
                             "`python -m perturbnmf.report params --write`.")
    return validate({name: namespace[name] for name in names}, names, source=f"parameters of step {step}")


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


# --- the notebooks' parameters cells and the README table, derived from the schema ------------------

_PARAMETER_LINE = re.compile(r"^(?P<name>[A-Za-z_]\w*)\s*:.*?(#\s*(?P<help>.*))?$")


def _parameters_cell(nb, notebook: Path):
    """The one cell tagged ``parameters`` of notebook ``nb`` (read from ``notebook``)."""
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(f"{notebook}: expected exactly one cell tagged 'parameters', found {len(cells)}.")
    return cells[0]


def _read_notebook(notebook: Path):
    import nbformat

    return nbformat.read(str(notebook), as_version=4)


def read_parameters_cell(notebook: str | Path) -> dict[str, Parameter]:
    """The parameters a notebook's cell tagged ``parameters`` declares, in order.

    Every statement of the cell must be ``name: type = literal  # meaning``. Used to check that
    the notebooks match :data:`SCHEMA` (the declared ``steps`` and ``rule`` are not part of a cell).
    """
    notebook = Path(notebook)
    source = _parameters_cell(_read_notebook(notebook), notebook).source
    helps = {m["name"]: (m["help"] or "").strip() for line in source.splitlines()
             if (m := _PARAMETER_LINE.match(line))}
    found: dict[str, Parameter] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None):
            raise ParameterError(
                f"{notebook}: parameters cell line {node.lineno} is not of the form 'name: type = literal'."
            )
        name = node.target.id
        found[name] = Parameter(name, ast.unparse(node.annotation), ast.literal_eval(node.value), helps.get(name, ""),
                                steps=())
    return found


def _literal(value: Any) -> str:
    """``value`` as Python source, strings in double quotes."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(map(_literal, value)) + "]"
    return repr(value)


def parameters_cell(step: str) -> str:
    """The source of ``step``'s parameters cell: one ``name: type = default  # meaning`` line each."""
    return "\n".join(f"{p.name}: {p.annotation} = {_literal(p.default)}  # {p.help}" for p in declared(step).values())


def readme_table() -> str:
    """The README's parameter tables: one per step, each parameter under the first step that takes it."""
    parts, seen = [], set()
    for step in STEPS:
        rows = [p for p in declared(step).values() if p.name not in seen]
        seen.update(p.name for p in rows)
        parts.append(f"*{step}*\n\n| key | type | default | meaning |\n|---|---|---|---|\n" + "\n".join(
            f"| `{p.name}` | {p.annotation.replace(' | ', ' or ')} | `{p.default!r}` | {p.help} |" for p in rows))
    return "\n\n".join(parts)


_README = REPO_ROOT / "README.md"
_TABLE_START, _TABLE_END = "<!-- parameters: generated by python -m perturbnmf.report params --write -->", \
    "<!-- parameters: end -->"


def drift() -> list[str]:
    """Where the notebooks' parameters cells or README's table differ from :data:`SCHEMA`."""
    problems = []
    for step, (stem, _) in STEPS.items():
        path = _notebook(stem)
        if _parameters_cell(_read_notebook(path), path).source != parameters_cell(step):
            problems.append(f"notebooks/{stem}.ipynb: the parameters cell differs from the schema")
    readme = _README.read_text(encoding="utf-8")
    if f"{_TABLE_START}\n{readme_table()}\n{_TABLE_END}" not in readme:
        problems.append("README.md: the parameter table differs from the schema")
    return problems


def _notebook(stem: str) -> Path:
    return REPO_ROOT / "notebooks" / f"{stem}.ipynb"


def write_derived() -> None:
    """Rewrite the notebooks' parameters cells and README's table from :data:`SCHEMA`."""
    import nbformat

    for step, (stem, _) in STEPS.items():
        path = _notebook(stem)
        nb = _read_notebook(path)
        _parameters_cell(nb, path).source = parameters_cell(step)
        nbformat.write(nb, str(path))
    readme = _README.read_text(encoding="utf-8")
    start, end = readme.index(_TABLE_START), readme.index(_TABLE_END) + len(_TABLE_END)
    _README.write_text(readme[:start] + f"{_TABLE_START}\n{readme_table()}\n{_TABLE_END}" + readme[end:],
                       encoding="utf-8")


def main(argv: list[str]) -> int:
    """``python -m perturbnmf.report params [--write]``: report (or fix) drift from the schema."""
    if argv == ["--write"]:
        write_derived()
    found = drift()
    print("\n".join(found) or "notebooks and README match the parameter schema")
    return 1 if found else 0
