"""perturbnmf: gene programs in Perturb-seq screens.

Consensus NMF programs (``X ≈ W H``, usage ``W ≥ 0``; semi-NMF with signed loadings ``H`` as
the original analysis's option), which perturbations shift them against non-targeting
controls, and which gene sets describe them.

Layers, scanpy's split: ``pp`` (read, check, QC, normalise, select genes), ``tl`` (factorize,
statistics, enrichment), ``pl`` (figures), on top of ``decomposition`` (the estimators
``NMF`` / ``SemiNMF`` and the consensus k sweep); ``datasets`` simulates screens with known
truth and ``evaluation`` scores results against it. The report layer (``perturbnmf.report``:
run folders, parameters, the four steps' report sections, the runner) builds on these and is
imported on its own; nothing here imports it.
"""

from importlib.metadata import PackageNotFoundError, version

from . import datasets, decomposition, errors, evaluation, pl, pp, tl
from .decomposition import NMF, SemiNMF

try:
    __version__ = version("perturbnmf")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = ["NMF", "SemiNMF", "pp", "tl", "pl", "decomposition", "datasets", "evaluation", "errors", "__version__"]
