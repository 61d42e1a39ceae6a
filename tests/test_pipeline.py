"""The whole pipeline through run_all.py, as a user runs it, on a tiny simulated screen
and on the real Papalexi 2021 screen."""

import json
import re

import anndata as ad
import nbformat
import pandas as pd
import pytest
import yaml

from conftest import REPO_ROOT, run_pipeline, tiny_params

pytestmark = pytest.mark.slow

STEMS = ["01_preprocess", "02_factorize", "03_stats", "04_enrichment"]
DATA_FILES = ["preprocessed.h5ad", "factorized.h5ad", "program_anova.csv", "program_contrasts.csv",
              "enrichment.csv", "top_genes.csv", "summary.xlsx", "run.json", "k_sweep.csv", "k_selection.json",
              "calibration_null.csv", "calibration.json", "guide_effects.csv", "split_half.csv",
              "program_labels.csv", "perturbation_hits.csv", "prerank.csv"]


def test_every_output_file_is_written(tiny_run):
    root, result = tiny_run
    for stem in STEMS:
        assert (root / f"{stem}.html").is_file()
        assert (root / "notebooks" / f"{stem}.ipynb").is_file()
    for name in DATA_FILES:
        assert (root / "data" / name).is_file(), name
    assert str(root / "index.html") in result.stdout


@pytest.mark.parametrize("stem", STEMS)
def test_every_notebook_has_figures_and_no_errors(tiny_run, stem):
    nb = nbformat.read(tiny_run[0] / "notebooks" / f"{stem}.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, f"warnings leak into the report: {stderr}"
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 1, "no figure: is MPLBACKEND=Agg set?"


@pytest.mark.parametrize("page", [*STEMS, "index"])
def test_reports_are_self_contained(tiny_run, page):
    text = (tiny_run[0] / f"{page}.html").read_text()
    assert not re.search(r"<script[^>]+src=", text), "scripts must not be fetched"
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "nothing may be fetched from the network"
    assert not re.search(r"@import\s+url\(\s*['\"]?https?:", text)
    if page != "index":
        assert "data:image/png;base64" in text
        assert "Provenance" in text and "git commit" in text


def test_anndata_outputs_follow_the_scverse_layout(tiny_run):
    pre = ad.read_h5ad(tiny_run[0] / "data" / "preprocessed.h5ad")
    assert not pre.layers and pre.n_vars == 150  # the selected genes only; the counts stay in the input
    assert (tiny_run[0] / "data" / "genes.csv").is_file()  # every gene that passed QC, with its statistics
    assert {"total_counts", "pct_counts_mito", "S_score", "G2M_score", "phase", "batch_batch_1"} <= set(pre.obs)
    assert pre.var["highly_variable"].sum() == 150
    fac = ad.read_h5ad(tiny_run[0] / "data" / "factorized.h5ad")
    k = fac.uns["snmf"]["k"]
    assert k == 9
    assert fac.obsm["X_snmf"].shape == (fac.n_obs, k) and (fac.obsm["X_snmf"] >= 0).all()
    assert fac.varm["snmf_loadings"].shape == (fac.n_vars, k)
    assert (fac.varm["snmf_loadings"][~fac.var["snmf_used"].to_numpy()] == 0).all()
    assert (fac.varm["snmf_loadings"] >= 0).all()  # the default model is NMF
    scores = fac.varm["snmf_gene_scores"]
    assert scores.shape == (fac.n_vars, k) and (scores < 0).any() and (scores > 0).any()
    info = fac.uns["snmf"]
    assert info["model"] == "nmf" and info["params"]["density_threshold"] == 0.5
    assert {"solver", "seed", "n_iter", "objective", "sweep", "program_names"} <= set(info)
    assert list(info["sweep"]["k"]) == [3, 6, 9]
    assert len(info["objective"]) == info["n_iter"]


def test_tables_are_well_formed(tiny_run):
    data = tiny_run[0] / "data"
    anova = pd.read_csv(data / "program_anova.csv")
    assert list(anova.columns[:4]) == ["program", "F", "pvalue", "qvalue"] and len(anova) == 9
    contrasts = pd.read_csv(data / "program_contrasts.csv")
    assert {"program", "perturbation", "n_cells", "effect", "statistic", "pvalue", "qvalue"} <= set(contrasts.columns)
    assert "non-targeting" not in set(contrasts["perturbation"])
    hits = contrasts[contrasts["qvalue"] < 0.05]
    assert set(hits["role"]) <= {"primary", "secondary"} and contrasts.loc[contrasts["qvalue"] >= 0.05, "role"].isna().all()
    assert (hits.groupby("perturbation")["role"].apply(lambda r: (r == "primary").any())).all()
    assert contrasts["qvalue"].between(0, 1).all()
    top = pd.read_csv(data / "top_genes.csv")
    assert set(top["side"]) == {"positive", "negative"} and top.groupby(["program", "side"]).size().max() <= 20
    sheets = pd.read_excel(data / "summary.xlsx", sheet_name=None)
    assert {"W_ANOVA", "Significant Factors", "Pathway Enrichment", "Top Pathways"} <= set(sheets)
    run = json.loads((data / "run.json").read_text())
    assert len(run["input_sha256"]) == 64 and run["git_commit"] and run["versions"]["scanpy"]
    assert {s: v["status"] for s, v in run["steps"].items()} == dict.fromkeys(
        ["preprocess", "factorize", "stats", "enrichment"], "ok")
    assert run["parameters"]["k"] == 9


def test_calibration_null_uses_the_control_guides(tiny_run):
    null = pd.read_csv(tiny_run[0] / "data" / "calibration_null.csv")
    assert set(null["null_split"]) == {"control guide"}
    assert null["perturbation"].str.startswith("null:NTg").all()
    assert null["pvalue"].between(0, 1).all()
    assert "Calibration: the same test on control cells only" in (tiny_run[0] / "03_stats.html").read_text()


def test_effects_carry_consistency_split_half_and_labels(tiny_run):
    data = tiny_run[0] / "data"
    contrasts = pd.read_csv(data / "program_contrasts.csv")
    assert {"n_guides", "n_guides_same_sign", "guide_heterogeneity_pvalue", "n_batches", "consistency",
            "effect_split", "qvalue_split", "split_program_cosine"} <= set(contrasts.columns)
    assert (contrasts["n_guides_same_sign"] <= contrasts["n_guides"]).all()
    fac = ad.read_h5ad(data / "factorized.h5ad")
    test = (fac.obs["snmf_half"] == "test").to_numpy()
    assert pd.isna(fac.obsm["X_snmf_split"][~test]).all() and not pd.isna(fac.obsm["X_snmf_split"][test]).any()
    labels = pd.read_csv(data / "program_labels.csv")
    assert labels["program"].tolist() == list(fac.uns["snmf"]["program_names"]) and labels["label"].is_unique
    hits = pd.read_csv(data / "perturbation_hits.csv")
    assert (hits["qvalue"] < 0.05).all() and len(hits) == (contrasts["qvalue"] < 0.05).sum()
    assert hits["label"].tolist() == hits["program"].map(dict(zip(labels["program"], labels["label"]))).tolist()
    index = (tiny_run[0] / "index.html").read_text()
    assert index.index("Perturbation → program effects") < index.index("Key results") < index.index("Every perturbation")
    if len(hits):
        assert hits["label"].iloc[0] in index
    guides = pd.read_csv(data / "guide_effects.csv")
    assert not guides["guide"].str.startswith("NT").any()


def test_demo_truth_is_checked_in_the_report(tiny_run):
    recovery = json.loads((tiny_run[0] / "data" / "demo_recovery.json").read_text())
    assert 0 <= recovery["sensitivity"] <= 1 and recovery["n_planted"] > 0
    assert "planted programs recovered" in (tiny_run[0] / "index.html").read_text()


def test_invalid_yaml_fails_before_running_and_names_the_key(tmp_path):
    result = run_pipeline(tmp_path, **tiny_params(tmp_path, k_valuez=[3]))
    assert result.returncode == 2
    assert "k_valuez" in result.stderr and "Did you mean 'k_values'" in result.stderr
    assert not (tmp_path / "run").exists(), "nothing may be written before the parameters are valid"


def test_missing_input_fails_before_running(tmp_path):
    result = run_pipeline(tmp_path, **tiny_params(tmp_path, simulate=False))
    assert result.returncode == 2
    assert "input:" in result.stderr and "not found" in result.stderr


def test_failed_notebook_is_named_and_still_rendered(tmp_path):
    # 400 programs cannot be fitted on 150 genes: step 2 must refuse with a clear message (exit 2, bad input).
    result = run_pipeline(tmp_path, **tiny_params(tmp_path, k_values=[3, 400], k=3))
    assert result.returncode == 2
    assert "step factorize (02_factorize.ipynb) refused the input" in result.stderr
    assert "Traceback" not in result.stderr
    assert "k_values [400] are impossible" in result.stderr
    assert not (tmp_path / "run").exists(), "a failed run never becomes the report"
    [failed] = tmp_path.glob("run.failed-*")
    assert str(failed) in result.stderr
    assert (failed / "02_factorize.html").is_file() and (failed / "ERROR.txt").is_file()
    run = json.loads((failed / "data" / "run.json").read_text())
    assert run["steps"]["factorize"]["status"] == "failed"


def test_papalexi_screen_runs_end_to_end(shared_data, tmp_path):
    params = yaml.safe_load((REPO_ROOT / "params" / "papalexi2021.yaml").read_text())
    # The full sweep is the report's job; two k values keep the test short.
    params.update(output_dir=str(tmp_path / "run"), k_values=[5, 10], k=10)
    result = run_pipeline(tmp_path, **params)
    assert result.returncode == 0, result.stdout + result.stderr
    data = tmp_path / "run" / "data"
    anova = pd.read_csv(data / "program_anova.csv")
    assert len(anova) == 10 and anova["pvalue"].between(0, 1).all()
    assert (anova["qvalue"] < 0.05).any(), "the screen's perturbations must move some program"
    contrasts = pd.read_csv(data / "program_contrasts.csv")
    assert contrasts["perturbation"].nunique() == 25 and contrasts["n_cells"].min() >= 10
    fac = ad.read_h5ad(data / "factorized.h5ad")
    assert fac.n_obs == 16783  # cells with a single guide
    enrichment = pd.read_csv(data / "enrichment.csv")
    assert set(enrichment["library"]) <= {"GO_Biological_Process_2021", "h.all.v7.0.symbols"}
    # the IFN-gamma pathway knockouts are the screen's known strongest hits (Papalexi et al. 2021)
    hits = pd.read_csv(data / "perturbation_hits.csv")
    assert {"JAK2", "IFNGR1", "IFNGR2", "STAT1"} <= set(hits["perturbation"])
    assert hits["label"].notna().all() and (hits["consistency"].str.len() > 0).all()
    assert json.loads((data / "calibration.json").read_text())["n_null_hits"] == 0
    pre = ad.read_h5ad(data / "preprocessed.h5ad")
    missing = pre.uns["perturbnmf"]["preprocess"]["cell_cycle"]
    assert len(missing["s_markers_used"]) + len(missing["s_markers_missing"]) == 43


def test_the_console_stays_clean(tiny_run):
    """Nothing on stderr: the kernels' own output (e.g. their log when jupyter_client interrupts them at
    shutdown, asyncio or zmq messages) goes to a file in the step's private folder, not the console."""
    _, result = tiny_run
    assert result.stderr == "", result.stderr
