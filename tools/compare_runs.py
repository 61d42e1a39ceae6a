#!/usr/bin/env python
"""Compare two runs' outputs file by file: the data files must be identical, timing aside.

    python tools/compare_runs.py BEFORE_RUN_FOLDER AFTER_RUN_FOLDER [...more pairs]

Used to show that a refactoring changed no result (README, "How the code is laid out"). For
each pair of run folders (reports/<run_name>/) every file under data/ is compared:

- CSV, GMT, TSV, YAML: byte for byte, except the columns named in TIMING_COLUMNS, which are
  dropped before the comparison;
- JSON: as parsed, without the keys in VOLATILE_KEYS (times, commit, command);
- h5ad: every HDF5 dataset and attribute, values and dtypes, exact (a provenance string is parsed
  as JSON and compared without VOLATILE_KEYS, and, after step 1, without the checksum of the
  previous step's h5ad, which embeds that step's commit);
- xlsx: every sheet's cell values, exact (the workbook's own creation time is not a result).

The figures and tables of the HTML reports are compared too: the multiset of images (PNG
bytes) and of table/text outputs of the executed notebooks, without the provenance block.
Exit status 0 when everything matches, 1 otherwise; each difference is printed.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

#: Wall-clock columns of the CSV tables (they change from run to run).
TIMING_COLUMNS = {"seconds", "fit_seconds", "sweep_seconds"}
#: Keys of JSON records that describe when, where and by which code a run ran, not what it found.
VOLATILE_KEYS = {"seconds", "started", "finished", "git_commit", "command", "rerun", "saved_git_commit",
                 "saved_finished", "fit_seconds", "timings"}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _csv(path: Path) -> bytes:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return frame.drop(columns=[c for c in frame.columns if c in TIMING_COLUMNS]).to_csv(index=False).encode()


def _h5_items(path: Path) -> dict[str, object]:
    items: dict[str, object] = {}

    def visit(name, node):
        for key, value in node.attrs.items():
            items[f"{name}@{key}"] = np.asarray(value).tolist()
        if isinstance(node, h5py.Dataset):
            value = node[()]
            if isinstance(value, bytes) and name.endswith("_provenance"):
                value = _strip(json.loads(value))
                if not name.endswith("preprocess_provenance"):
                    # the checksum of the previous step's h5ad, which embeds that step's commit: the h5ad
                    # itself is compared item by item
                    value.pop("input_sha256", None)
            elif isinstance(value, np.ndarray) and value.dtype.kind in "iufb":
                value = (str(value.dtype), value.shape, hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest())
            else:
                value = np.asarray(value).tolist()
            items[name] = value

    with h5py.File(path, "r") as handle:
        handle.visititems(visit)
    return _drop_timing(items)


def _drop_timing(items: dict[str, object]) -> dict[str, object]:
    """Timing columns stored in an h5ad (a k-sweep table in uns) are left out, as in the CSVs."""
    return {k: v for k, v in items.items() if k.split("@")[0].rsplit("/", 1)[-1] not in TIMING_COLUMNS}


def _xlsx(path: Path) -> dict[str, bytes]:
    sheets = pd.read_excel(path, sheet_name=None, dtype=str)
    return {name: frame.drop(columns=[c for c in frame.columns if c in TIMING_COLUMNS]).to_csv(index=False).encode()
            for name, frame in sheets.items()}


def _content(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv(path)
    if suffix == ".json":
        return _strip(json.loads(path.read_text()))
    if suffix == ".h5ad":
        return _h5_items(path)
    if suffix == ".xlsx":
        return _xlsx(path)
    return path.read_bytes()


_PROVENANCE = re.compile(r'<div class="pnmf-provenance">.*?</div>', re.S)


def _without_timing_columns(markup: str) -> str:
    """An HTML table without its timing columns (their cells in every row)."""
    header = re.search(r"<thead>.*?</thead>", markup, re.S)
    if not header:
        return markup
    names = [re.sub(r"<.*?>", "", h).strip() for h in re.findall(r"<th.*?</th>", header.group(0), re.S)]
    drop = {i for i, name in enumerate(names) if name in TIMING_COLUMNS}
    if not drop:
        return markup

    def row(match):
        cells = re.findall(r"<t[hd].*?</t[hd]>", match.group(0), re.S)
        return "<tr>" + "".join(c for i, c in enumerate(cells) if i not in drop) + "</tr>"

    return re.sub(r"<tr.*?</tr>", row, markup, flags=re.S)


def _notebook_outputs(folder: Path) -> Counter:
    """Images and rich/text outputs of the executed notebooks, without the provenance block and timings."""
    found: Counter = Counter()
    for notebook in sorted((folder / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        for cell in cells:
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                if "image/png" in data:
                    found[(notebook.name, "png", hashlib.sha256(data["image/png"].encode()).hexdigest())] += 1
                elif "text/html" in data:
                    text = _without_timing_columns(_PROVENANCE.sub("", "".join(data["text/html"])))
                    found[(notebook.name, "html", text)] += 1
                elif output.get("name") == "stdout":
                    found[(notebook.name, "stdout", "".join(output["text"]))] += 1
    return found


def compare(before: Path, after: Path) -> list[str]:
    """Every difference between the outputs of run folders ``before`` and ``after``."""
    problems = []
    names_before = {p.relative_to(before / "data") for p in (before / "data").rglob("*") if p.is_file()}
    names_after = {p.relative_to(after / "data") for p in (after / "data").rglob("*") if p.is_file()}
    for name in sorted(names_before ^ names_after):
        problems.append(f"data/{name}: only in {'before' if name in names_before else 'after'}")
    for name in sorted(names_before & names_after):
        if name.name in ("run.json", "params.yaml"):
            continue  # where and when the run ran; compared below without those keys
        one, two = _content(before / "data" / name), _content(after / "data" / name)
        if one != two:
            detail = ""
            if isinstance(one, dict) and isinstance(two, dict):
                keys = sorted(k for k in one.keys() | two.keys() if one.get(k) != two.get(k))
                detail = f" ({len(keys)} entries differ, e.g. {keys[:3]})"
            problems.append(f"data/{name}: differs{detail}")
    runs = [_strip(json.loads((folder / "data" / "run.json").read_text())) for folder in (before, after)]
    if runs[0].get("parameters") != runs[1].get("parameters"):
        problems.append("data/run.json: the parameters differ")
    if (before / "data" / "params.yaml").read_bytes() != (after / "data" / "params.yaml").read_bytes():
        problems.append("data/params.yaml differs")
    outputs = [_notebook_outputs(folder) for folder in (before, after)]
    for kind in ("png", "html", "stdout"):
        one = Counter({k: v for k, v in outputs[0].items() if k[1] == kind})
        two = Counter({k: v for k, v in outputs[1].items() if k[1] == kind})
        if one != two:
            missing, extra = one - two, two - one
            example = next(iter(missing or extra))
            problems.append(f"report {kind} outputs differ: {sum(missing.values())} only before, "
                            f"{sum(extra.values())} only after (e.g. in {example[0]}: {str(example[2])[:160]!r})")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    failed = False
    for before, after in zip(argv[::2], argv[1::2]):
        problems = compare(Path(before), Path(after))
        n_files = sum(1 for p in (Path(before) / "data").rglob("*") if p.is_file())
        print(f"{before} vs {after}: {n_files} data files and the reports' figures and tables: "
              + ("identical (timing aside)" if not problems else f"{len(problems)} difference(s)"))
        for problem in problems:
            print(f"  - {problem}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
