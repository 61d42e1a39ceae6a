"""Searchable, sortable report tables: the markup the reports carry, and the script at work in a real browser.

The browser tests open a page in headless Chromium (``--dump-dom``: the DOM after the page's scripts ran)
with ``?search=…`` in its address, which the tables' script reads like a search typed into the box. They
skip when Chromium is not installed, except under CI (``PERTURBNMF_REQUIRE_BROWSER=1``, set by .ci/run).
"""

import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from perturbnmf import tl
from perturbnmf.report import html as report_html
from perturbnmf.report import provenance
from perturbnmf.report.index import write_index
from perturbnmf.report.runfolder import RunPaths

N_TARGETS = 300
PROGRAMS = [f"P{i + 1:02d}" for i in range(6)]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    reason = "headless Chromium not installed (apt install chromium)"
    if os.environ.get("PERTURBNMF_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}; CI requires it (PERTURBNMF_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def _dom(page, search: str | None = None) -> str:
    """The page's DOM after its scripts ran, opened with ``?search=…`` when given."""
    url = page.resolve().as_uri() + (f"?search={search}" if search else "")
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-extensions",
         "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _tables(dom: str) -> list[dict]:
    """Each interactive table of a DOM: its classes, shown-row count, info line and body rows' cells."""
    found = []
    body_only = dom.split("</head>", 1)[-1]  # not the script's own text
    for match in re.finditer(r'<div class="(pnmf-itable(?: [^"]*)?)"(.*?)</table>', body_only, flags=re.S):
        classes, inner = match.groups()
        shown = re.search(r'data-shown="(\d+)"', match.group(0))
        info = re.search(r'<span class="pnmf-itable-info">(.*?)</span>', inner, flags=re.S)
        body = re.search(r"<tbody>(.*?)</tbody>", inner, flags=re.S)
        rows = [[html.unescape(re.sub(r"<.*?>", "", cell)) for cell in re.findall(r"<td[^>]*>.*?</td>", row, re.S)]
                for row in re.findall(r"<tr>(.*?)</tr>", body.group(1) if body else "", flags=re.S)]
        found.append({"classes": classes, "shown": int(shown.group(1)) if shown else None,
                      "info": html.unescape(info.group(1)) if info else "", "rows": rows})
    return found


@pytest.fixture(scope="module")
def many_target_run(tmp_path_factory):
    """A run folder of a screen with 300 targets × 6 programs (contrasts, hits, per-perturbation summary),
    and its index.html."""
    rng = np.random.default_rng(0)
    paths = RunPaths.at(tmp_path_factory.mktemp("many") / "run")
    paths.data.mkdir(parents=True)
    targets = [f"TGT{i:04d}" for i in range(N_TARGETS)]
    contrasts = pd.DataFrame([(p, t) for t in targets for p in PROGRAMS], columns=["program", "perturbation"])
    contrasts["n_cells"] = 60
    contrasts["effect"] = rng.normal(0, 0.05, len(contrasts))
    contrasts["effect_std"] = contrasts["effect"] * 10
    contrasts["pvalue"] = rng.uniform(0.2, 1, len(contrasts))  # no hit but the planted ones
    strong = contrasts["perturbation"].str[-1].isin(["0", "5"]) & (contrasts["program"] == "P02")  # 60 hits
    contrasts.loc[strong, ["effect_std", "pvalue"]] = [1.5, 1e-9]
    contrasts["qvalue"] = tl.benjamini_hochberg(contrasts["pvalue"].to_numpy())
    contrasts.to_csv(paths.program_contrasts, index=False)
    tl.perturbation_summary(contrasts, 0.05).to_csv(paths.perturbation_summary, index=False)
    pd.DataFrame({"program": PROGRAMS, "label": [f"{p} ↑ planted set {p}" for p in PROGRAMS]}).to_csv(
        paths.program_labels, index=False)  # step 4's labels name the strongest program
    record = provenance.collect({"run_name": "many"})
    return paths, write_index(paths, record, fdr=0.05, page_size=15)


def test_interactive_markup_carries_every_row_and_a_static_first_page():
    frame = pd.DataFrame({"perturbation": [f"T{i}" for i in range(40)], "q": np.linspace(0, 1, 40),
                          "note": ["a</script><b>"] + [""] * 39})
    markup, n_carried = report_html.table_markup(frame, page_size=10)
    payload = re.search(r'<script type="application/json">(.*?)</script>', markup, flags=re.S).group(1)
    data = json.loads(payload.replace("<\\/", "</"))
    assert n_carried == 40 and len(data["rows"]) == 40 and data["numeric"] == [False, True, False]
    assert data["rows"][1][1] == f"{frame['q'][1]:.3g}"  # as the static table formats it
    assert "</script><b>" not in payload  # a cell cannot end the script early
    assert markup.count("<tr") == 1 + 10  # the static table: heading and the first page
    static, n_shown = report_html.table_markup(frame, page_size=10, interactive=False)
    assert "pnmf-itable" not in static and n_shown == 10


def test_interactive_markup_is_bounded(monkeypatch):
    monkeypatch.setattr(report_html, "INTERACTIVE_MAX_ROWS", 100)
    frame = pd.DataFrame({"x": range(1000)})
    markup, n_carried = report_html.table_markup(frame, page_size=10)
    assert n_carried == 100 and '"n_total":1000' in markup


def test_index_of_300_targets_is_small_and_carries_every_perturbation(many_target_run):
    paths, index = many_target_run
    page = index.read_text()
    assert index.stat().st_size < 200_000
    assert page.count('<div class="pnmf-itable"><script') == 2  # the hits and every perturbation
    assert all(f"TGT{i:04d}" in page for i in range(N_TARGETS))


def test_index_tables_search_and_sort_in_a_browser(many_target_run):
    _, index = many_target_run
    hits, summary = _tables(_dom(index))
    for table in (hits, summary):
        assert "pnmf-itable-ready" in table["classes"], "the script did not take the table over"
        assert len(table["rows"]) == 15  # one page
    assert hits["shown"] == 60 and "rows 1–15 of 60" in hits["info"]
    assert summary["shown"] == N_TARGETS and f"of {N_TARGETS}" in summary["info"]

    hits, summary = _tables(_dom(index, search="TGT0125"))
    assert summary["shown"] == 1 and summary["rows"][0][0] == "TGT0125"
    assert summary["rows"][0][3] == "P02 ↑ planted set P02"  # its strongest program, by its label
    assert f"(filtered from {N_TARGETS})" in summary["info"]
    assert hits["shown"] == 1 and hits["rows"][0][:2] == ["TGT0125", "P02"]
    # a target without a hit: found among the perturbations, none among the hits
    hits, summary = _tables(_dom(index, search="TGT0126"))
    assert hits["shown"] == 0 and "no matching rows" in hits["info"]
    assert summary["shown"] == 1 and summary["rows"][0][2] == "0"  # programs shifted: none
    # "quoted" terms match a whole cell; bare terms are substrings (TGT01 → TGT0100 … TGT0199)
    assert _tables(_dom(index, search="TGT01"))[1]["shown"] == 100
    assert _tables(_dom(index, search='"TGT01"'))[1]["shown"] == 0


def test_rendered_step_report_has_working_tables(tiny_run):
    run, _ = tiny_run
    stats = run / "03_stats.html"
    summary = pd.read_csv(run / "data" / "perturbation_summary.csv")
    target = summary["perturbation"].iloc[0]
    tables = _tables(_dom(stats, search=f'"{target}"'))
    assert tables and all("pnmf-itable-ready" in t["classes"] for t in tables)
    by_rows = {len(t["rows"]) for t in tables}
    assert by_rows and all(target in row for t in tables for row in t["rows"]), by_rows
    per_perturbation = [t for t in tables if t["shown"] == 1]
    assert per_perturbation, "the per-perturbation table did not narrow to the one target"
