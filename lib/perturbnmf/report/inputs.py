"""The inputs a run names by parameter: the screen (or the demo's simulated one), gene-set libraries.

Relative paths are relative to the repository (:func:`perturbnmf.report.runfolder.resolve`).
Problems are refused early with an :class:`~perturbnmf.errors.InputError` that names the parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import pandas as pd

from .. import datasets, tl
from ..errors import InputError
from .artifacts import atomic_write
from .runfolder import resolve

__all__ = ["write_simulated_inputs", "library_name", "is_enrichr_name", "load_libraries", "check_gene_sets"]


def write_simulated_inputs(input_path: str, gene_sets_path: str, cell_cycle_path: str | None, seed: int = 0,
                           n_cells: int = 4000, n_genes: int = 2000) -> None:
    """Write the demo's simulated screen, its gene sets and cell-cycle markers to the given paths.

    Refuses to overwrite an ``input`` file that is not itself a simulated screen.
    """
    target = resolve(input_path)
    if target.exists():
        existing = ad.read_h5ad(target, backed="r")
        is_simulated = "simulation" in existing.uns
        existing.file.close()
        if not is_simulated:
            raise InputError(
                f"'simulate' is true but {input_path!r} (parameter 'input') exists and is not a simulated screen; "
                "set 'simulate: false' to analyse it, or point 'input' at a new file."
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    adata = datasets.simulate_screen(n_cells=n_cells, n_genes=n_genes, seed=seed, **datasets.DEMO_DESIGN)
    atomic_write(target, lambda tmp: adata.write_h5ad(tmp))
    gmt = resolve(gene_sets_path)
    gmt.parent.mkdir(parents=True, exist_ok=True)
    datasets.write_gmt(gmt, datasets.planted_gene_sets(adata, seed=seed))
    if cell_cycle_path:
        markers = resolve(cell_cycle_path)
        markers.parent.mkdir(parents=True, exist_ok=True)
        datasets.write_cell_cycle_genes(markers, adata)


def library_name(spec: str | Path) -> str:
    """Short name of a gene-set library: the GMT file name without ``.gmt``, or the Enrichr name."""
    return Path(spec).name.removesuffix(".gmt")


def is_enrichr_name(spec: str) -> bool:
    """A gene-set library given by its Enrichr name (fetched online) rather than as a file."""
    spec = str(spec)
    return not (spec.endswith(".gmt") or "/" in spec or resolve(spec).exists())


def load_libraries(specs: list[str]) -> dict[str, dict[str, list[str]]]:
    """Every gene-set library of parameter ``gene_sets``: GMT paths read locally, other names from Enrichr."""
    libraries = {}
    for spec in specs:
        try:
            libraries[library_name(spec)] = tl.load_library(spec if is_enrichr_name(spec) else resolve(spec))
        except (OSError, ValueError) as exc:
            raise InputError(f"Gene-set library {spec!r} (parameter 'gene_sets'): {exc}") from None
    return libraries


def _identifier_kind(names) -> str:
    """What a sample of gene identifiers looks like: Ensembl IDs, upper-case (human) or capitalised (mouse) symbols."""
    names = [str(n) for n in names][:2000]
    if not names:
        return "no identifiers"
    if sum(n.upper().startswith("ENS") and any(c.isdigit() for c in n) for n in names) > len(names) / 2:
        return "Ensembl IDs"
    letters = [n for n in names if any(c.isalpha() for c in n)]
    if sum(n[:1].isupper() and n[1:] == n[1:].lower() and n[1:] != n[1:].upper() for n in letters) > len(letters) / 2:
        return "capitalised (mouse-style) symbols"
    if sum(n == n.upper() for n in letters) > len(letters) / 2:
        return "upper-case (human-style) symbols"
    return "other identifiers"


def check_gene_sets(specs: list[str], genes: pd.Index) -> dict[str, dict[str, Any]]:
    """Read each library early and check it shares genes with the data; return a summary per library."""
    summary = {}
    gene_set = set(genes)
    for spec, (name, sets) in zip(specs, load_libraries(specs).items()):
        members = set().union(*sets.values())
        shared = members & gene_set
        if not shared:
            data_kind, library_kind = _identifier_kind(sorted(gene_set)), _identifier_kind(sorted(members))
            diagnosis = (f"The data uses {data_kind}, the library uses {library_kind}: convert one to the other "
                         "(e.g. var names from a gene-symbol column) or use a library with the data's identifiers."
                         if data_kind != library_kind else
                         "Both look like the same kind of identifier; is it a library for another organism?")
            raise InputError(
                f"Gene-set library {spec!r} (parameter 'gene_sets') shares no gene with the data (e.g. data "
                f"{sorted(gene_set)[:3]}, library {sorted(members)[:3]}). {diagnosis}"
            )
        summary[name] = {"path": str(spec), "gene_sets": len(sets), "genes": len(members),
                         "genes_in_data": len(shared)}
    return summary
