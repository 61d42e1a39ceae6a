"""factorize(): the kept model in the scverse layout, and the split-half refit used against double dipping."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbnmf import factorize as fz



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
    fz.factorize(a, [4], n_restarts=3, seed=0, n_jobs=1, max_iter=300)
    match = fz.split_half(a, "perturbation", n_restarts=3, seed=1, n_jobs=1, max_iter=300)
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
    usage = fz.split_usage(adata)
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
    fz.split_half(other, "perturbation", n_restarts=3, seed=1, n_jobs=1, max_iter=300)
    np.testing.assert_allclose(other.uns["snmf"]["split_half"]["cosine"], adata.uns["snmf"]["split_half"]["cosine"],
                               rtol=1e-6)
