"""perturbnmf: gene programs in Perturb-seq screens.

Semi-NMF programs (``X ≈ W H``, usage ``W ≥ 0``, signed loadings ``H``), which perturbations
shift them against non-targeting controls, and which gene sets describe them — as four
parameterised notebooks rendered to HTML reports.

Modules follow scanpy's split: ``pp`` (preprocess), ``pl`` (plotting); the tools are
``factorize``, ``stats`` and ``enrichment``; ``SemiNMF`` is a scikit-learn estimator.
"""

from importlib.metadata import PackageNotFoundError, version

from . import enrichment, evaluation, factorize, params, pipeline, plotting, preprocess, provenance, report, simulate, stats
from ._seminmf import NMF, SemiNMF

pp = preprocess
pl = plotting

try:
    __version__ = version("perturbnmf")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = ["NMF", "SemiNMF", "pp", "pl", "preprocess", "factorize", "stats", "enrichment", "evaluation", "simulate",
           "plotting", "params", "pipeline", "provenance", "report", "__version__"]
