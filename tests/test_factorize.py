"""factorize(): the kept model in the scverse layout, and the split-half refit used against double dipping."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbnmf import tl



def separable_screen(seed=3, n=800, m=80, k=4, noise=0.3):
    """Every cell uses exactly one program: semi-NMF's solution is then unique (up to scale and order)."""
    rng = np.random.default_rng(seed)
    W = np.zeros((n, k))
    W[np.arange(n), rng.integers(0, k, n)] = rng.gamma(4.0, 1.0, n)
    return sp.csr_matrix(W @ rng.normal(size=(k, m)) + noise * rng.normal(size=(n, m)))


@pytest.fixture(scope="module")
def adata():
    X = separable_screen()
    obs = pd.DataFrame({"perturbation": np.repeat(["ctrl", "A", "B", "C"], 200)},
                       index=[f"c{i}" for i in range(800)])
    a = ad.AnnData(X=X.toarray(), obs=obs)
    a.layers["normalized"] = X
    a.var["highly_variable"] = True
    tl.factorize(a, [4], n_restarts=3, seed=0, n_jobs=1, max_iter=300, model="seminmf", density_threshold=None,
                 layer="normalized", mask_var="highly_variable")  # split_half then reads the same layer
    match = tl.split_half(a, "perturbation", n_restarts=3, seed=1, n_jobs=1, max_iter=300)
    a.uns["_match"] = match
    return a


def test_every_group_is_split_in_half(adata):
    halves = pd.crosstab(adata.obs["perturbation"], adata.obs["snmf_half"])
    assert (halves["learn"] == 100).all() and (halves["test"] == 100).all()


def test_only_test_cells_get_split_usage(adata):
    W = adata.obsm["X_snmf_split"]
    test = (adata.obs["snmf_half"] == "test").to_numpy()
    assert np.isnan(W[~test]).all()
    assert np.isfinite(W[test]).all() and (W[test] >= 0).all()
    usage = tl.split_usage(adata)
    assert list(usage.index) == list(adata.obs_names[test])
    assert list(usage.columns) == adata.uns["snmf"]["program_names"]


def test_twins_are_the_best_one_to_one_match(adata):
    # semi-NMF is unique only up to non-negative mixing of programs (W → WQ, H → Q⁻¹H with Q ≥ 0), so
    # the halves need not find identical programs; the matching must still pick the best pairing
    import itertools

    match = adata.uns["_match"]
    assert match["program"].tolist() == adata.uns["snmf"]["program_names"]
    assert match["cosine"].between(-1, 1).all()
    test = (adata.obs["snmf_half"] == "test").to_numpy()
    kept, split = adata.obsm["X_snmf"][test], adata.obsm["X_snmf_split"][test]
    corr = np.corrcoef(kept.T, split.T)[:4, 4:]
    best = max(itertools.permutations(range(4)), key=lambda perm: sum(corr[i, perm[i]] for i in range(4)))
    assert best == (0, 1, 2, 3)


def test_learn_half_programs_never_see_the_test_cells(adata):
    # changing the test cells' data must not change the programs learned on the other half
    other = adata.copy()
    test = (other.obs["snmf_half"] == "test").to_numpy()
    dense = other.layers["normalized"].toarray()
    dense[test] = np.random.default_rng(0).normal(size=(test.sum(), dense.shape[1]))
    other.layers["normalized"] = dense
    tl.split_half(other, "perturbation", n_restarts=3, seed=1, n_jobs=1, max_iter=300)
    np.testing.assert_allclose(other.uns["snmf"]["split_half"]["cosine"], adata.uns["snmf"]["split_half"]["cosine"],
                               rtol=1e-6)


def test_regression_scores_are_the_least_squares_coefficients():
    """Gene scores = OLS of each gene on the standardised usage with an intercept (statsmodels-free check)."""
    rng = np.random.default_rng(0)
    W = rng.gamma(2.0, 1.0, (300, 3))
    X = sp.csr_matrix(np.maximum(W @ rng.normal(size=(3, 20)) + rng.normal(size=(300, 20)), 0))
    B = tl.regression_scores(X, W)
    Z = (W - W.mean(0)) / W.std(0)
    design = np.hstack([np.ones((300, 1)), Z])
    expected = np.linalg.lstsq(design, X.toarray(), rcond=None)[0][1:]
    np.testing.assert_allclose(B, expected, atol=1e-8)
    W[:, 1] = 2.0  # a program without variance gets zero scores, the others are unaffected
    assert (tl.regression_scores(X, W)[1] == 0).all()


def test_nmf_shows_lowered_genes_as_negative_scores():
    """A program that raises genes 0-9 and lowers genes 10-19: NMF loadings are >= 0, its gene scores are not."""
    rng = np.random.default_rng(1)
    n = 2000
    usage = rng.gamma(2.0, 1.0, (n, 2))
    base = np.full(40, 2.0)
    X = np.tile(base, (n, 1))
    X[:, :10] += usage[:, [0]]
    X[:, 10:20] = np.maximum(X[:, 10:20] - 0.5 * usage[:, [0]], 0)
    X[:, 20:30] += usage[:, [1]]
    X += 0.1 * rng.random(X.shape)
    a = ad.AnnData(X=X)
    a.layers["normalized"] = sp.csr_matrix(X)
    a.var["highly_variable"] = True
    tl.factorize(a, [2], n_restarts=2, seed=0, n_jobs=1, holdout_fraction=0.0)
    scores = tl.gene_scores(a)
    first = scores.iloc[:10].mean().idxmax()  # the program that raises genes 0-9
    assert (tl.loadings(a).to_numpy() >= 0).all()
    assert (scores[first].iloc[10:20] < 0).all() and (scores[first].iloc[:10] > 0).all()


def test_a_sweep_on_a_subsample_finds_the_programs_of_the_sweep_on_all_cells():
    rng = np.random.default_rng(5)
    n, k = 1600, 4
    W = np.zeros((n, k))
    W[np.arange(n), rng.integers(0, k, n)] = rng.gamma(4.0, 1.0, n)
    H = rng.gamma(1.0, 1.0, (k, 60)) * (rng.random((k, 60)) < 0.5)
    X = sp.csr_matrix(np.maximum(W @ H + 0.3 * rng.normal(size=(n, 60)), 0))
    obs = pd.DataFrame({"perturbation": np.repeat(["ctrl", "A", "B", "C"], 400)}, index=[f"c{i}" for i in range(n)])
    truth = H / np.linalg.norm(H, axis=1, keepdims=True)
    recovered = {}
    for max_cells in (None, 600):
        a = ad.AnnData(X=X, obs=obs)
        tl.factorize(a, [4], n_restarts=2, seed=0, n_jobs=1, max_iter=300, sweep_max_cells=max_cells)
        assert a.uns["snmf"]["params"]["n_sweep_cells"] == (n if max_cells is None else max_cells)
        assert a.obsm["X_snmf"].shape == (n, k)  # usage of every cell
        recovered[max_cells] = (truth @ tl.loadings(a).to_numpy()).max(axis=1)  # best cosine per planted program
    assert recovered[600].min() > 0.97 and recovered[None].min() > 0.97
    np.testing.assert_allclose(recovered[600], recovered[None], atol=0.01)  # as good as the sweep on all cells


def test_a_lazy_matrix_is_factorised_out_of_core_to_the_in_memory_result():
    """A Dask X is never read whole: the sweep's subsample in memory, the fit on all cells, the usage,
    the gene scores and the error chunk by chunk; the result is the in-memory one."""
    import dask.array as da

    rng = np.random.default_rng(5)
    n, k = 1600, 4
    W = np.zeros((n, k))
    W[np.arange(n), rng.integers(0, k, n)] = rng.gamma(4.0, 1.0, n)
    H = rng.gamma(1.0, 1.0, (k, 60)) * (rng.random((k, 60)) < 0.5)
    X = sp.csr_matrix(np.maximum(W @ H + 0.3 * rng.normal(size=(n, 60)), 0).astype(np.float32))
    obs = pd.DataFrame({"perturbation": np.repeat(["ctrl", "A", "B", "C"], 400), "batch": np.tile(["b1", "b2"], 800)},
                       index=[f"c{i}" for i in range(n)])
    runs = {}
    for name, matrix in (("memory", X), ("lazy", da.from_array(X, chunks=(300, -1), asarray=False))):
        a = ad.AnnData(X=matrix, obs=obs)
        tl.factorize(a, [4], n_restarts=2, seed=0, n_jobs=1, max_iter=300, sweep_max_cells=600, batch_key="batch")
        tl.split_half(a, "perturbation", n_restarts=2, seed=1, n_jobs=1, max_iter=300)
        assert isinstance(a.X, da.Array) == (name == "lazy"), "the lazy X stays lazy"
        runs[name] = a
    memory, lazy = runs["memory"], runs["lazy"]
    cosine = np.sum(tl.loadings(memory).to_numpy() * tl.loadings(lazy).to_numpy(), axis=0)
    assert cosine.min() > 0.999, cosine
    np.testing.assert_allclose(lazy.obsm["X_snmf"], memory.obsm["X_snmf"], rtol=0.02, atol=1e-3 * memory.obsm["X_snmf"].max())
    np.testing.assert_allclose(lazy.varm["snmf_gene_scores"], memory.varm["snmf_gene_scores"], rtol=0.02, atol=1e-3)
    assert lazy.uns["snmf"]["relative_error"] == pytest.approx(memory.uns["snmf"]["relative_error"], rel=1e-3)
    test = (lazy.obs["snmf_half"] == "test").to_numpy()
    assert np.isfinite(lazy.obsm["X_snmf_split"][test]).all() and np.isnan(lazy.obsm["X_snmf_split"][~test]).all()
    assert np.min(lazy.uns["snmf"]["split_half"]["cosine"]) > 0.99
    with pytest.raises(ValueError, match="'solver' 'mu' has no out-of-core form.*solver: hals"):
        tl.factorize(ad.AnnData(X=lazy.X, obs=obs), [4], model="seminmf", solver="mu", sweep_max_cells=600)


def _programs_and_depth(seed: int, n: int, m: int = 90, k: int = 3):
    """Three planted programs of 30 genes each (usage W, n × k; unit-norm loadings ``truth``, k × m) and a
    normal 'depth' per cell, for the covariate tests."""
    rng = np.random.default_rng(seed)
    W = rng.gamma(2.0, 0.5, (n, k)) * (rng.random((n, k)) < 0.6)
    H = np.zeros((k, m))
    for p in range(k):
        H[p, p * 30:(p + 1) * 30] = rng.gamma(2.0, 1.0, 30)
    return rng, W @ H, H / np.linalg.norm(H, axis=1, keepdims=True), rng.normal(0.0, 1.0, n)


def test_technical_covariates_keep_depth_from_taking_a_program():
    """Expression that rises with sequencing depth in every gene (as log-normalised data does): an NMF
    without the covariate blends it into its programs; with ``covariate_keys`` the depth gets loadings
    of its own and the planted programs come back."""
    n, m, k = 1000, 90, 3
    rng, programs, truth, depth = _programs_and_depth(11, n)
    X = 1.0 + programs + 2.0 * np.outer(depth - depth.min(), rng.gamma(2.0, 0.5, m)) + 0.1 * rng.random((n, m))
    obs = pd.DataFrame({"log1p_total_counts": depth, "constant": 1.0}, index=[f"c{i}" for i in range(n)])
    best = {}
    for keys in (None, ["log1p_total_counts", "constant"]):
        a = ad.AnnData(X=X, obs=obs)
        tl.factorize(a, [k], n_restarts=2, seed=0, n_jobs=1, max_iter=300, holdout_fraction=0.0, covariate_keys=keys)
        best[keys is None] = (truth @ tl.loadings(a).to_numpy()).max(axis=1)
    assert best[True].min() < 0.8, "without the covariate the programs are blended with depth"
    assert best[False].min() > 0.99
    levels = list(a.uns["snmf"]["baseline"]["levels"])
    n_knots = len(tl.COVARIATE_KNOTS)
    assert levels[0] == "all cells" and len(levels) == 1 + n_knots  # a constant adds nothing
    assert levels[1].startswith("log1p_total_counts = ") and levels[1].endswith("(q0)") and levels[-1].endswith("(q100)")
    assert a.varm["snmf_baseline"].shape == (m, 1 + n_knots)


def test_covariates_are_tent_columns_at_their_quantiles_and_bad_ones_are_named():
    """Each covariate as piecewise-linear tents at its quantile knots: non-negative, one per knot (1 there),
    summing to one per cell, so non-negative loadings give any non-negative piecewise-linear curve."""
    depth = np.array([1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0])
    obs = pd.DataFrame({"batch": list("abababab"), "depth": depth, "text": list("xyzwxyzw")}, index=list("cdefghij"))
    a = ad.AnnData(X=np.ones((8, 2)), obs=obs)
    levels, Z = tl.baseline_design(a, "batch", ["depth"])
    knots = np.quantile(depth, tl.COVARIATE_KNOTS)
    assert levels[:2] == ["a", "b"] and levels[2:] == [f"depth = {v:.4g} (q{100 * q:g})" for v, q in zip(knots, tl.COVARIATE_KNOTS)]
    tents = Z[:, 2:]
    assert (tents >= 0).all() and np.allclose(tents.sum(axis=1), 1.0)
    np.testing.assert_allclose(tents[[0, -1]][:, [0, -1]], np.eye(2))  # min and max sit on the end knots
    curve = 0.5 + np.abs(knots - 10.0)  # any non-negative curve through the knots: a V here
    np.testing.assert_allclose(tents @ curve, np.interp(depth, knots, curve))
    with pytest.raises(ValueError, match="'missing' \\(parameter 'covariate_keys'\\) is not in obs"):
        tl.baseline_design(a, "batch", ["missing"])
    with pytest.raises(ValueError, match="'text' \\(parameter 'covariate_keys'\\) has 8 missing, non-numeric"):
        tl.baseline_design(a, None, ["text"])


def test_a_bent_depth_effect_is_taken_up_by_the_covariate_curves(monkeypatch):
    """Log-normalised expression bends with depth (here: it rises through the shallowest tenth of the cells,
    then stays flat): a straight line in depth leaves the bend to the programs, the knots' curves take it
    up and the planted programs come back."""
    from perturbnmf.tl import _factorize

    n, m, k = 1200, 90, 3
    rng, programs, truth, depth = _programs_and_depth(12, n)
    bend = np.minimum(depth, np.quantile(depth, 0.1)) - depth.min()
    X = 1.0 + programs + 8.0 * np.outer(bend, rng.gamma(2.0, 0.5, m)) + 0.1 * rng.random((n, m))
    obs = pd.DataFrame({"log1p_total_counts": depth}, index=[f"c{i}" for i in range(n)])
    best = {}
    for knots in ((0.0, 1.0), tl.COVARIATE_KNOTS):
        monkeypatch.setattr(_factorize, "COVARIATE_KNOTS", knots)
        a = ad.AnnData(X=X, obs=obs)
        tl.factorize(a, [k], n_restarts=2, seed=0, n_jobs=1, max_iter=300, holdout_fraction=0.0,
                     covariate_keys=["log1p_total_counts"])
        best[len(knots)] = (truth @ tl.loadings(a).to_numpy()).max(axis=1)
    assert best[2].min() < 0.9, "a straight line leaves the bend to a program"
    assert best[len(tl.COVARIATE_KNOTS)].min() > 0.99
