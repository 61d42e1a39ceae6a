#!/usr/bin/env python
"""Steps 3 and 4 on a genome-wide screen: time per cell, HTML size, rows per table, figures.

    .venv/bin/python benchmarks/bench_reports.py [FOLDER] [--targets 10000] [--cells 200000] [--screenshots]

Builds what the two steps read (``tests/test_many_perturbations.write_factorized_screen``: obs, usage,
split-half usage, gene scores, truth; no steps 1-2) in FOLDER (default /tmp/perturbnmf-bench-reports),
runs the notebooks as run_all.py does, writes index.html and prints, per step, the wall time, each code
cell's time and figures, the HTML size and the rows of every HTML table. With ``--screenshots`` it also
renders each page with headless Chromium (``chromium`` on the PATH) to FOLDER/screenshots/*.png.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_many_perturbations import STEP_NOTEBOOKS, run_report_steps, write_factorized_screen  # noqa: E402


def describe(folder: Path, step: str, seconds: float) -> None:
    import nbformat

    stem = STEP_NOTEBOOKS[step]
    page = (folder / f"{stem}.html").read_text()
    print(f"== {stem}: {seconds:.1f} s, HTML {len(page.encode()) / 1e6:.2f} MB")
    nb = nbformat.read(str(folder / "notebooks" / f"{stem}.ipynb"), as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        duration = cell.metadata.get("papermill", {}).get("duration") or 0.0
        images = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        stderr = [o for o in cell.get("outputs", []) if o.get("name") == "stderr" or o["output_type"] == "error"]
        first = cell.source.splitlines()[0][:60] if cell.source else ""
        print(f"  [{i:2d}] {duration:7.1f} s  {len(images)} figure(s) "
              f"{sum(len(o['data']['image/png']) for o in images) / 1e6:.2f} MB{'  STDERR' if stderr else ''}  {first}")
    rows = [table.count("<tr") for table in re.findall(r"<table.*?</table>", page, flags=re.S)]
    print(f"  rows per HTML table (header included): {rows}")


def screenshots(folder: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("no chromium on the PATH: no screenshots")
        return
    (folder / "screenshots").mkdir(exist_ok=True)
    for page in ("03_stats", "04_enrichment", "index"):
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1200,16000", f"--screenshot={folder / 'screenshots' / page}.png",
                        (folder / f"{page}.html").as_uri()], capture_output=True, timeout=180)
    print(f"screenshots in {folder / 'screenshots'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="/tmp/perturbnmf-bench-reports")
    parser.add_argument("--targets", type=int, default=10_000)
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--screenshots", action="store_true")
    args = parser.parse_args()
    folder = Path(args.folder)
    if folder.exists():
        shutil.rmtree(folder)
    write_factorized_screen(folder, n_targets=args.targets, n_cells=args.cells)
    seconds = run_report_steps(folder)
    for step, s in seconds.items():
        describe(folder, step, s)
    from perturbnmf.report.index import write_index
    from perturbnmf.report.runfolder import RunPaths

    record = {"parameters": {"run_name": "scale"},
              "steps": {step: {"status": "complete", "seconds": s} for step, s in seconds.items()}}
    index = write_index(RunPaths.at(folder), record)
    print(f"== index.html: {index.stat().st_size / 1e3:.1f} kB")
    if args.screenshots:
        screenshots(folder)


if __name__ == "__main__":
    main()
