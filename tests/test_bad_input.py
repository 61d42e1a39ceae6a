"""Bad input: every case gets a one-paragraph error that names the culprit (file, parameter or
column) and the fix, raised before any heavy computation.

Two levels. Table-driven library tests (fast) call the function that must refuse the input:
``pp.read_screen`` and the other preprocess steps raise ``InputError``, ``params.validate`` /
``params.load_yaml`` raise ``ParameterError``, the GMT readers raise as they do today. A few
representative cases then go through ``run_all.py`` as a user runs it: non-zero exit, the
message on stderr without a Python traceback (``--debug`` adds it), and the run stopped in
step 1, before the factorisation.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import yaml

from perturbnmf import pp
from perturbnmf.report import inputs as run_inputs
from perturbnmf.report.params import ParameterError, declared as declared_parameters, load_yaml, validate
from perturbnmf.tl import factorize, read_gmt

from conftest import REPO_ROOT

CONTROL = "non-targeting"
GROUPS = [CONTROL, "TGT1", "TGT2", "TGT3"]


# --- a small valid screen and ways to break it ----------------------------------------------

def make_screen(n_per_group: int = 20, n_genes: int = 60, seed: int = 0) -> ad.AnnData:
    """A valid screen: raw integer counts (CSR), perturbation / batch / guide / single_guide columns."""
    rng = np.random.default_rng(seed)
    n = n_per_group * len(GROUPS)
    mean = rng.gamma(1.0, 2.0, size=n_genes) * rng.gamma(5.0, 0.2, size=(n, 1))
    counts = rng.poisson(mean).astype(np.int32)
    perturbation = np.repeat(GROUPS, n_per_group)
    obs = pd.DataFrame({
        "perturbation": perturbation,
        "batch": np.tile(["b1", "b2"], n // 2),
        "guide": [f"{p}_g{i % 2}" for i, p in enumerate(perturbation)],
        "single_guide": True,
    }, index=[f"cell{i:04d}" for i in range(n)])
    var = pd.DataFrame(index=[f"GENE{j}" for j in range(n_genes - 2)] + ["MT-CO1", "MT-ND1"])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)


def _dense(a):
    a.X = a.X.toarray().astype(np.float64)
    return a


def _set(a, row, col, value):
    a = _dense(a)
    a.X[row, col] = value
    return a


def _logged(a, keep_uns=True):
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    if not keep_uns:
        del a.uns["log1p"]
    return a


def _normalised(a):
    sc.pp.normalize_total(a, target_sum=1e4)
    return a


def _scaled(a):
    a = _dense(_logged(a, keep_uns=False))
    sc.pp.scale(a)
    return a


def _with_counts_layer(a):
    a.layers["counts"] = a.X.copy()
    return _logged(a, keep_uns=False)


def _rename_obs(a, old, new):
    a.obs = a.obs.rename(columns={old: new})
    return a


def _drop_obs(a, column):
    del a.obs[column]
    return a


def _nan_label(a):
    a.obs["perturbation"] = a.obs["perturbation"].astype(object)
    a.obs.iloc[3, a.obs.columns.get_loc("perturbation")] = np.nan
    return a


def _dup_cells(a):
    a.obs_names = ["cell0000"] + list(a.obs_names[1:-1]) + ["cell0000"]
    return a


def _dup_genes(a):
    a.var_names = ["GENE1"] + list(a.var_names[1:])
    return a


def _one_group(a):
    a.obs["perturbation"] = CONTROL
    return a


def _zeros(a):
    a.X = sp.csr_matrix(a.shape, dtype=np.int32)
    return a


def _no_x(a):
    b = ad.AnnData(obs=a.obs, var=a.var)
    b.layers["raw"] = a.X
    return b


def _keep_strings(a):
    a.obs["single_guide"] = "True"
    return a


def _keep_none(a):
    a.obs["single_guide"] = False
    return a


def _keep(a):
    return a


# (id, how to break the screen, read_screen keyword overrides, substrings the message must contain)
READ_CASES = [
    ("empty_no_genes", lambda a: a[:, :0].copy(), {}, ["empty matrix", "0 genes", "'input'"]),
    ("empty_no_cells", lambda a: a[:0].copy(), {}, ["empty matrix", "0 cells"]),
    ("no_X", _no_x, {}, ["no X matrix", "layers['raw']"]),
    ("missing_perturbation_key", lambda a: _drop_obs(a, "perturbation"), {},
     ["Column 'perturbation'", "parameter 'perturbation_key'", "Available columns: batch"]),
    ("misspelt_perturbation_key", lambda a: _rename_obs(a, "perturbation", "Perturbation"), {},
     ["'perturbation_key'", "Did you mean 'Perturbation'?"]),
    ("missing_batch_key", lambda a: _drop_obs(a, "batch"), {}, ["Column 'batch'", "'batch_key'", "batch_key: null"]),
    ("missing_guide_key", lambda a: _drop_obs(a, "guide"), {}, ["Column 'guide'", "'guide_key'", "guide_key: null"]),
    ("missing_keep_cells_key", _keep, {"keep_cells_key": "singlet"}, ["Column 'singlet'", "'keep_cells_key'"]),
    ("keep_cells_not_boolean", _keep_strings, {"keep_cells_key": "single_guide"},
     ["'single_guide'", "'keep_cells_key'", "must be boolean"]),
    ("keep_cells_keeps_none", _keep_none, {"keep_cells_key": "single_guide"},
     ["'single_guide'", "False for every cell"]),
    ("control_label_absent", _keep, {"control_label": "NTC"},
     ["Control label 'NTC'", "parameter 'control_label'", "non-targeting (20)"]),
    ("control_label_wrong_case", _keep, {"control_label": "Non-Targeting"},
     ["'control_label'", "Did you mean 'non-targeting'?"]),
    ("single_group", _one_group, {}, ["'perturbation'", "single group"]),
    ("unlabelled_cells", _nan_label, {}, ["Column 'perturbation'", "1 missing values"]),
    ("duplicate_cell_names", _dup_cells, {}, ["duplicate cell names", "cell0000", "obs_names_make_unique"]),
    ("duplicate_gene_names", _dup_genes, {}, ["duplicate gene names", "GENE1", "var_names_make_unique"]),
    ("negative_counts", lambda a: _set(a, 0, 0, -1), {}, ["negative values", "raw UMI counts"]),
    ("scaled_matrix", _scaled, {}, ["negative values", "scaled"]),
    ("non_integer_counts", lambda a: _set(a, 0, 0, 2.5), {}, ["non-integer values", "2.5", "round them"]),
    ("nan_counts", lambda a: _set(a, 1, 1, np.nan), {}, ["1 NaN or infinite"]),
    ("infinite_counts", lambda a: _set(a, 1, 1, np.inf), {}, ["NaN or infinite"]),
    ("log_transformed_by_scanpy", _logged, {}, ["already log-transformed", "uns['log1p']"]),
    ("log_transformed_detected", lambda a: _logged(a, keep_uns=False), {},
     ["looks already log-transformed", "largest value"]),
    ("normalised_not_logged", _normalised, {}, ["already normalised", "sums to 10000"]),
    ("raw_counts_in_a_layer", _with_counts_layer, {}, ["log-transformed", "adata.X = adata.layers['counts']"]),
    ("all_zero_counts", _zeros, {}, ["no non-zero entries"]),
]


@pytest.mark.filterwarnings("ignore:(Observation|Variable) names are not unique:UserWarning")
@pytest.mark.parametrize("break_screen, overrides, expected", [c[1:] for c in READ_CASES],
                         ids=[c[0] for c in READ_CASES])
def test_read_screen_refuses_bad_data(tmp_path, break_screen, overrides, expected):
    path = tmp_path / "screen.h5ad"
    break_screen(make_screen()).write_h5ad(path)
    keys = dict(perturbation_key="perturbation", control_label=CONTROL, batch_key="batch", guide_key="guide")
    keys.update(overrides)
    with pytest.raises(pp.InputError) as err:
        pp.read_screen(path, **keys)
    message = str(err.value)
    for part in expected:
        assert part in message, f"{part!r} not in: {message}"
    assert "\n" not in message, "one paragraph"


def _write_text(name, text):
    def write(tmp_path):
        path = tmp_path / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return path
    return write


def _write_truncated(tmp_path):
    whole = tmp_path / "whole.h5ad"
    make_screen().write_h5ad(whole)
    path = tmp_path / "truncated.h5ad"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return path


def _folder(tmp_path):
    (tmp_path / "screen.h5ad").mkdir()
    return tmp_path / "screen.h5ad"


FILE_CASES = [
    ("missing_file", lambda tmp: tmp / "nope.h5ad", ["'input'", "nope.h5ad", "does not exist"]),
    ("folder", _folder, ["'input'", "is a folder"]),
    ("csv_not_h5ad", _write_text("screen.csv", "cell,GENE1\nc1,3\n"), ["screen.csv", "not an .h5ad", "sc.read_csv"]),
    ("10x_h5_not_h5ad", _write_text("screen.h5", b"\x89HDF\r\n"), ["not an .h5ad", "sc.read_10x_h5"]),
    ("garbage_h5ad", _write_text("screen.h5ad", b"this is not HDF5 at all\n"),
     ["screen.h5ad", "could not be read as h5ad", "write_h5ad"]),
    ("truncated_h5ad", _write_truncated, ["truncated.h5ad", "could not be read as h5ad", "interrupted"]),
]


@pytest.mark.parametrize("make_file, expected", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_read_screen_refuses_bad_files(tmp_path, make_file, expected):
    with pytest.raises(pp.InputError) as err:
        pp.read_screen(make_file(tmp_path), "perturbation", CONTROL)
    for part in expected:
        assert part in str(err.value), f"{part!r} not in: {err.value}"


def test_a_valid_screen_passes_every_check(tmp_path):
    path = tmp_path / "screen.h5ad"
    make_screen().write_h5ad(path)
    adata = pp.read_screen(path, "perturbation", CONTROL, batch_key="batch", guide_key="guide",
                           keep_cells_key="single_guide")
    adata = pp.filter_cells_and_genes(adata)
    adata = pp.drop_small_groups(adata, "perturbation", CONTROL, 10)
    pp.normalize(adata)
    n_mito = int(adata.var["mito"].sum())
    assert n_mito == 2 and pp.select_genes(adata, use_all_genes=True) == adata.n_vars - n_mito


def test_dense_float_counts_are_accepted():
    pp.check_counts(_dense(make_screen()))


def test_count_check_works_in_blocks(monkeypatch):
    monkeypatch.setattr(pp, "_BLOCK", 7)  # many blocks; the bad value sits in the last one
    sparse = make_screen()
    sparse.X = sparse.X.astype(np.float64)
    for adata in (sparse, _dense(make_screen())):
        pp.check_counts(adata)
        adata.X[-1, -1] = 0.5
        with pytest.raises(pp.InputError, match="non-integer"):
            pp.check_counts(adata)


# --- after reading: QC, group sizes, gene selection, k ------------------------------------

def _qc_screen():
    adata = make_screen()
    pp.check_counts(adata)
    for key in ("perturbation", "batch", "guide"):
        adata.obs[key] = adata.obs[key].astype("category")
    return adata


def _small_groups(sizes):
    """A screen whose groups have the given numbers of cells (control first)."""
    adata = _qc_screen()
    keep = np.concatenate([np.where(adata.obs["perturbation"] == g)[0][:n] for g, n in zip(GROUPS, sizes)])
    return adata[np.sort(keep)].copy()


STEP_CASES = [
    ("no_cell_passes_qc", lambda: pp.filter_cells_and_genes(_qc_screen(), min_counts_per_cell=10**9),
     ["No cell passes QC", "min_counts_per_cell=1000000000", "relax"]),
    ("no_gene_passes_filter", lambda: pp.filter_cells_and_genes(_qc_screen(), min_cells_per_gene=10**6),
     ["No gene", "'min_cells_per_gene'"]),
    ("control_too_small", lambda: pp.drop_small_groups(_small_groups([5, 20, 20, 20]), "perturbation", CONTROL, 10),
     ["control group 'non-targeting'", "'control_label'", "5 cells", "min_cells_per_group=10"]),
    ("too_few_groups_after_dropping", lambda: pp.drop_small_groups(_small_groups([20, 4, 3, 0]), "perturbation", CONTROL, 10),
     ["Only the control group", "'min_cells_per_group'", "TGT1 (4), TGT2 (3)"]),
    ("gene_selection_keeps_too_few", lambda: _select(min_disp=1e6),
     ["Gene selection", "kept 0 genes", "'hvg_min_disp'", "hvg_use_all_genes: true"]),
    ("largest_k_exceeds_genes", lambda: _factorize_check([3, 100]),
     ["k_values [100] are impossible", "min(cells, genes)", "'hvg_n_top_genes'"]),
    ("k_exceeds_cells", lambda: _factorize_check([3, 70], n_cells=60),
     ["k_values [70] are impossible", "min(60, "]),
]


def _preprocessed(n_cells=None):
    adata = _qc_screen()
    if n_cells:
        adata = adata[:n_cells].copy()
    adata = pp.filter_cells_and_genes(adata)
    pp.normalize(adata)
    return adata


def _select(**kwargs):
    return pp.select_genes(_preprocessed(), **kwargs)


def _factorize_check(k_values, n_cells=None):
    adata = _preprocessed(n_cells)
    pp.select_genes(adata, use_all_genes=True)
    return factorize(adata, k_values, n_restarts=1, max_iter=5)


@pytest.mark.parametrize("step, expected", [c[1:] for c in STEP_CASES], ids=[c[0] for c in STEP_CASES])
def test_preprocessing_steps_refuse_impossible_data(step, expected):
    with pytest.raises(ValueError) as err:  # InputError is a ValueError; factorize raises ValueError
        step()
    for part in expected:
        assert part in str(err.value), f"{part!r} not in: {err.value}"


def test_small_groups_are_dropped_and_listed():
    adata = pp.drop_small_groups(_small_groups([20, 20, 4, 3]), "perturbation", CONTROL, 10)
    assert set(adata.obs["perturbation"].cat.categories) == {CONTROL, "TGT1"}
    assert adata.uns["perturbnmf"]["preprocess"]["dropped_small_groups"] == {"TGT2": 4, "TGT3": 3}


def test_genes_without_variance_after_filtering_are_not_factorised():
    adata = pp.filter_cells_and_genes(_qc_screen_without_cell_of_gene0(), min_counts_per_cell=60)
    assert "cell0000" not in adata.obs_names
    assert "GENE0" not in adata.var_names, "a gene seen only in cells that fail QC has zero variance: dropped"
    assert adata.var["n_cells_by_counts"].min() >= 3, "genes are counted on the cells that pass QC"
    # a gene with the same value in every cell after normalisation is not selected
    adata = _preprocessed()
    adata.X = adata.X.toarray()
    adata.X[:, 5] = 1.0
    pp.select_genes(adata, use_all_genes=True)
    assert not adata.var["highly_variable"].iloc[5]
    assert adata.uns["perturbnmf"]["preprocess"]["n_genes_zero_variance"] == 1


def _qc_screen_without_cell_of_gene0():
    """GENE0 is detected only in cell0000, which has too few counts to pass min_counts_per_cell=60."""
    adata = _qc_screen()
    X = adata.X.toarray()
    X[:, 0] = 0
    X[0] = 0
    X[0, 0] = 5
    X[1:, 1:] += 2  # every other cell passes
    adata.X = sp.csr_matrix(X)
    return adata


def test_cell_cycle_marker_file_must_be_readable(tmp_path):
    bad = tmp_path / "markers.txt"
    bad.write_text("MCM5\nPCNA\n")
    with pytest.raises(pp.InputError, match="'cell_cycle_genes'.*neither the 97-line Tirosh list"):
        pp.read_cell_cycle_genes(bad)
    with pytest.raises(pp.InputError, match="'cell_cycle_genes'.*does not exist"):
        pp.read_cell_cycle_genes(tmp_path / "none.txt")


# --- parameters ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def declared():
    return {name: p for params in [declared_parameters()] for name, p in params.items()}


PARAM_CASES = [
    ("k_below_1", "k: 0\nk_values: [0, 5]\n", ["'k' must be an integer >= 1", "'k_values' every k must be >= 1"]),
    ("k_not_in_k_values", "k: 7\n", ["'k' (7) must be one of 'k_values'"]),
    ("quoted_number", "k: '10'\nk_values: [10]\n", ["'k' must be of type int | None", "without quotes"]),
    ("yaml_exponent_read_as_text", "tol: 1e-4\n", ["'tol' must be of type float", "write 1.0e-4"]),
    ("word_for_a_number", "fdr: five\n", ["'fdr' must be of type float", "Give a number"]),
    ("float_for_int", "n_restarts: 5.0\n", ["'n_restarts' must be of type int", "Write 5"]),
    ("list_for_scalar", "batch_key: [lane, donor]\n", ["'batch_key' must be of type str | None", "single value"]),
    ("scalar_for_list", "gene_sets: sets.gmt\n", ["'gene_sets' must be of type list[str]", "Write a list"]),
    ("number_in_list", "k_values: [5, ten]\n", ["'k_values' must be of type list[int]"]),
    ("quoted_bool", "simulate: 'true'\n", ["'simulate' must be of type bool", "true or false without quotes"]),
    ("null_for_required", "k_values: null\n", ["'k_values' must be of type list[int]", "Remove the key"]),
    ("unknown_key", "k_valus: [5]\n", ["unknown key 'k_valus'", "Did you mean 'k_values'?"]),
    ("non_string_key", "5: x\n", ["unknown key 5"]),
    ("nan_float", "hvg_min_disp: .nan\nfdr: .nan\n", ["'hvg_min_disp' must be a finite number", "'fdr' must lie"]),
    ("infinite_float", "max_pct_mito: .inf\n", ["'max_pct_mito' must be a percentage"]),
    ("run_name_escapes", "run_name: ../x\n", ["'run_name' must be a plain folder name"]),
    ("run_name_absolute", "run_name: /tmp/x\n", ["'run_name' must be a plain folder name"]),
    ("output_dir_climbs", "output_dir: ../x\n", ["'output_dir' must not contain '..'"]),
    ("output_dir_climbs_from_absolute", "output_dir: /tmp/a/../../etc\n", ["'output_dir' must not contain '..'"]),
    ("output_dir_home", "output_dir: ~/out\n", ["'output_dir' must be a full path"]),
    ("output_dir_is_repository", f"output_dir: {REPO_ROOT}\n", ["'output_dir' must not be the repository"]),
    ("output_dir_above_repository", "output_dir: /\n", ["'output_dir' must not be the repository or a folder above"]),
    ("output_dir_in_sources", "output_dir: notebooks\n", ["'output_dir' inside the repository must be a folder under reports/"]),
    ("output_dir_is_reports", "output_dir: reports\n", ["under reports/"]),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in PARAM_CASES], ids=[c[0] for c in PARAM_CASES])
def test_bad_parameters_are_refused_naming_the_key(tmp_path, declared, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParameterError) as err:
        validate(load_yaml(path), declared)
    for part in expected:
        assert part in str(err.value), f"{part!r} not in: {err.value}"


def test_output_dir_outside_the_repository_or_under_reports_is_accepted(tmp_path, declared):
    (tmp_path / "notes.txt").write_text("...")
    with pytest.raises(ParameterError, match="'output_dir' is an existing file"):
        validate({"output_dir": str(tmp_path / "notes.txt")}, declared)
    # (run_all.py itself refuses to replace a folder that holds files a run did not write)
    for folder in (str(tmp_path / "new"), "reports/my_run", str(REPO_ROOT / "reports" / "my_run")):
        validate({"output_dir": folder}, declared)


def test_yaml_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("k_values: [5]\nk: 5\nk: 10\n")
    with pytest.raises(ParameterError, match=r"sets 'k' twice \(lines 2 and 3\)"):
        load_yaml(path)


def test_yaml_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("control_label: ctrl\xe9\n".encode("latin-1"))
    with pytest.raises(ParameterError, match="not UTF-8"):
        load_yaml(path)


# --- gene-set libraries (enrichment.read_gmt, run_inputs.check_gene_sets, as they are) -------

GENES = pd.Index([f"GENE{i}" for i in range(10)] + ["TP53", "BRCA1"])

GMT_CASES = [
    ("space_separated", "SET1 desc GENE1 GENE2\n", ["line 1", "is the file tab-separated?"]),
    ("too_few_fields", "SET1\tdesc\n", ["line 1", "at least 3 tab-separated fields"]),
    ("empty_file", "\n\n", ["no gene sets found"]),
    ("duplicate_set_name", "S\td\tGENE1\nS\td\tGENE2\n", ["line 2", "duplicate gene-set name 'S'"]),
    ("empty_set_name", "\td\tGENE1\n", ["line 1", "empty gene-set name"]),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in GMT_CASES], ids=[c[0] for c in GMT_CASES])
def test_malformed_gmt_is_refused_naming_file_and_line(tmp_path, text, expected):
    path = tmp_path / "library.gmt"
    path.write_text(text)
    for call in (lambda: read_gmt(path), lambda: run_inputs.check_gene_sets([str(path)], GENES)):
        with pytest.raises(ValueError) as err:
            call()
        assert str(path) in str(err.value)
        for part in expected:
            assert part in str(err.value), f"{part!r} not in: {err.value}"


@pytest.mark.parametrize("members, genes, diagnosis", [
    (["ENSG00000141510", "ENSG00000012048"], GENES, "library uses Ensembl IDs"),  # Ensembl library, symbol data
    (["TP53", "BRCA1"], pd.Index(["ENSG00000141510", "ENSG00000012048"]), "data uses Ensembl IDs"),
    (["Tp53", "Brca1"], GENES, "mouse-style"),                                    # mouse case vs human case
], ids=["ensembl_library", "ensembl_data", "mouse_case"])
def test_gmt_sharing_no_gene_is_refused(tmp_path, members, genes, diagnosis):
    path = tmp_path / "library.gmt"
    path.write_text("SET\tdesc\t" + "\t".join(members) + "\n")
    with pytest.raises(pp.InputError) as err:
        run_inputs.check_gene_sets([str(path)], genes)
    message = str(err.value)
    assert str(path) in message and "shares no gene with the data" in message and diagnosis in message


def test_gmt_ensembl_mismatch_is_detected(tmp_path):
    path = tmp_path / "library.gmt"
    path.write_text("SET\tdesc\tENSG00000141510\tENSG00000012048\n")
    with pytest.raises(pp.InputError, match="library uses Ensembl IDs"):
        run_inputs.check_gene_sets([str(path)], GENES)


def test_gmt_mouse_symbols_against_human_symbols_are_named(tmp_path):
    path = tmp_path / "library.gmt"
    path.write_text("SET\tdesc\tTp53\tBrca1\tStat1\n")
    with pytest.raises(pp.InputError, match="library uses capitalised \\(mouse-style\\) symbols"):
        run_inputs.check_gene_sets([str(path)], pd.Index(["TP53X", "GENE1", "STAT9"]))


def test_gmt_that_is_not_text_is_refused_naming_file_and_parameter(tmp_path):
    path = tmp_path / "library.gmt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(pp.InputError) as err:
        run_inputs.check_gene_sets([str(path)], GENES)
    assert "library.gmt" in str(err.value) and "'gene_sets'" in str(err.value)


def test_malformed_gmt_names_the_parameter(tmp_path):
    path = tmp_path / "library.gmt"
    path.write_text("SET1 desc GENE1\n")
    with pytest.raises(pp.InputError, match="'gene_sets'.*line 1"):
        run_inputs.check_gene_sets([str(path)], GENES)


# --- through run_all.py, as a user runs it (a few representative cases) ------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Valid tiny inputs and broken variants, shared by the run_all cases."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    make_screen().write_h5ad(folder / "screen.h5ad")
    _drop_obs(make_screen(), "batch").write_h5ad(folder / "no_batch.h5ad")
    _logged(make_screen(), keep_uns=False).write_h5ad(folder / "logged.h5ad")
    _small_groups([20, 4, 3, 2]).write_h5ad(folder / "small_groups.h5ad")
    genes = list(make_screen().var_names[:20])
    (folder / "sets.gmt").write_text(f"SET_A\t\t{chr(9).join(genes[:10])}\nSET_B\t\t{chr(9).join(genes[10:])}\n")
    (folder / "ensembl.gmt").write_text("SET_A\t\tENSG00000141510\tENSG00000012048\tENSG00000146648\n")
    return folder


def run(tmp_path, inputs, *flags, **overrides):
    params = {
        "run_name": "bad", "output_dir": str(tmp_path / "run"), "input": str(inputs / "screen.h5ad"),
        "gene_sets": [str(inputs / "sets.gmt")], "cell_cycle_genes": None, "hvg_use_all_genes": True,
        "k_values": [2, 3], "k": 3, "n_restarts": 1, "max_iter": 20, "n_top_genes": 5,
    }
    params.update(overrides)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, "run_all.py", str(path), *flags], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


def assert_stopped_in_preprocess(tmp_path, result):
    """Non-zero exit, step 1 failed, no later step started, nothing of step 1 or 2 written."""
    assert result.returncode != 0
    assert re.search(r"\[1/4\] 01_preprocess \.\.\.\s+(.*\n\s+)*FAILED", result.stdout) and "[2/4]" not in result.stdout
    assert not list(tmp_path.rglob("preprocessed.h5ad")) and not list(tmp_path.rglob("factorized.h5ad"))
    records = list(tmp_path.rglob("run.json"))  # the failed run is kept (where is run_all.py's business)
    assert records
    for record in records:
        steps = json.loads(record.read_text())["steps"]
        assert list(steps) == ["preprocess"] and steps["preprocess"]["status"] == "failed"


RUN_CASES = [
    ("missing_batch_column", {"input": "no_batch.h5ad"}, ["Column 'batch'", "'batch_key'"]),
    ("log_transformed", {"input": "logged.h5ad"}, ["logged.h5ad", "looks already log-transformed"]),
    ("too_few_groups", {"input": "small_groups.h5ad"}, ["Only the control group", "'min_cells_per_group'"]),
    ("gmt_ensembl_ids", {"gene_sets": ["ensembl.gmt"]}, ["ensembl.gmt", "shares no gene with the data", "Ensembl"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, expected", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_run_all_stops_in_step_1_with_the_message(tmp_path, inputs, overrides, expected):
    overrides = {key: [str(inputs / v) for v in value] if isinstance(value, list) else str(inputs / value)
                 for key, value in overrides.items()}
    result = run(tmp_path, inputs, **overrides)
    assert_stopped_in_preprocess(tmp_path, result)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    error = result.stderr[result.stderr.index("error:"):]
    for part in expected:
        assert part in error, f"{part!r} not in: {result.stderr}"


@pytest.mark.slow
def test_run_all_debug_adds_the_traceback(tmp_path, inputs):
    result = run(tmp_path, inputs, "--debug", input=str(inputs / "no_batch.h5ad"))
    assert_stopped_in_preprocess(tmp_path, result)
    assert "Column 'batch'" in result.stderr
    assert "Traceback" in result.stderr and "read_screen" in result.stderr


@pytest.mark.parametrize("overrides, expected", [
    ({"run_name": "../escape", "output_dir": None}, "'run_name' must be a plain folder name"),
    ({"output_dir": "../escape"}, "'output_dir' must not contain '..'"),
    ({"k": "3"}, "Write the number without quotes"),
], ids=["run_name_escapes", "output_dir_escapes", "string_for_number"])
def test_run_all_refuses_bad_parameters_before_any_notebook(tmp_path, inputs, overrides, expected):
    result = run(tmp_path, inputs, **overrides)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists() and not (REPO_ROOT.parent / "escape").exists()


def test_enrichr_library_name_while_offline_names_the_parameter(tmp_path, monkeypatch):
    """A library given by its Enrichr name, with Enrichr unreachable: refused in step 1's check, saying to pass a GMT."""
    import gseapy.enrichr  # noqa: F401

    module = sys.modules["gseapy.enrichr"]
    monkeypatch.setattr(module, "DEFAULT_CACHE_PATH", str(tmp_path / "cache"))

    def offline(self, libname):
        raise ConnectionError("Network is unreachable")

    monkeypatch.setattr(module.EnrichrAPI, "download_libraries", offline)
    with pytest.raises(pp.InputError) as err:
        run_inputs.check_gene_sets(["GO_Biological_Process_2023"], GENES)
    message = str(err.value)
    assert "'gene_sets'" in message and "GO_Biological_Process_2023" in message
    assert "Enrichr is unreachable" in message and "pass its path" in message
