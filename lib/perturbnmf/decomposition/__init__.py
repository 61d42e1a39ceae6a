"""Matrix factorisation: the estimators and the consensus k sweep.

``NMF`` and ``SemiNMF`` are scikit-learn estimators (``fit_transform``, ``components_``,
``n_iter_``, ``reconstruction_err_``) driven by one fit loop over a solver registry
(``_seminmf.py``, with the numba kernels in ``_kernels.py``); :func:`consensus_sweep`
(``_consensus.py``) fits restarts for every k, clusters them into consensus programs and
suggests k. Nothing here knows about AnnData, perturbations or reports.
"""

from ._consensus import (
    MODELS,
    ConsensusSweep,
    consensus_sweep,
    holdout_error,
    refit_usage,
    relative_error,
    suggest_k,
    with_covariates,
)
from ._chunked import (ChunkedFit, cross_products, fit_chunked, polish_chunked, relative_error_chunked,
                       transform_chunked)
from ._seminmf import NMF, SemiNMF

__all__ = ["NMF", "SemiNMF", "MODELS", "ConsensusSweep", "consensus_sweep", "holdout_error", "refit_usage",
           "relative_error", "suggest_k", "with_covariates", "ChunkedFit", "fit_chunked",
           "transform_chunked", "polish_chunked", "cross_products", "relative_error_chunked"]
