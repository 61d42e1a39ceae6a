"""The report layer: runs of the four notebooks, their folders, parameters and reports.

Built on the compute layers (``pp``, ``tl``, ``pl``, ``decomposition``), never imported by them:

- :mod:`~perturbnmf.report.runfolder`: the repository root, the steps, a run's paths, staging
  and publishing;
- :mod:`~perturbnmf.report.params`: the parameter schema (one declaration per parameter) and
  its checks;
- :mod:`~perturbnmf.report.inputs`: the input files a run names (screen, gene-set libraries);
- :mod:`~perturbnmf.report.engine`: where a run computes (parameter ``cluster``: this process or Dask)
  and the progress the steps show on run_all.py's console;
- :mod:`~perturbnmf.report.artifacts`: every file a step writes into ``data/``;
- :mod:`~perturbnmf.report.sections`: what each step's report shows (one module per step);
- :mod:`~perturbnmf.report.html`, :mod:`~perturbnmf.report.index`,
  :mod:`~perturbnmf.report.provenance`: report pieces, the index page, where results came from;
- :mod:`~perturbnmf.report.runner`: run the steps with papermill, resume, signals, exit codes
  (imported by ``run_all.py`` only).
"""

from . import artifacts, engine, html, index, inputs, params, provenance, runfolder, sections
from .params import check_step
from .runfolder import STEPS, RunPaths, resolve, run_paths

__all__ = ["artifacts", "engine", "html", "index", "inputs", "params", "provenance", "runfolder", "sections", "check_step",
           "STEPS", "RunPaths", "resolve", "run_paths"]
