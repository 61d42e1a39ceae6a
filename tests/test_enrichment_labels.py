"""Tests of program labels (program_labels, tidy_term) and library loading (load_library); offline."""

import re
import socket
import sys
import time

import numpy as np
import pandas as pd
import pytest

from perturbnmf.tl import (
    LABEL_COLUMNS,
    LibraryUnavailableError,
    load_library,
    over_representation,
    program_labels,
    tidy_term,
    top_genes,
)

# --------------------------------------------------------------------------- #
# tidy_term
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "raw, tidy",
    [
        ("HALLMARK_INTERFERON_GAMMA_RESPONSE", "interferon gamma response"),
        ("HALLMARK_TNFA_SIGNALING_VIA_NFKB", "TNFA signaling via NFKB"),
        ("HALLMARK_E2F_TARGETS", "E2F targets"),
        ("HALLMARK_UV_RESPONSE_DN", "UV response down"),
        ("HALLMARK_MYC_TARGETS_V1", "MYC targets V1"),
        ("response to interferon-gamma (GO:0034341)", "response to interferon-gamma"),
        ("T cell activation (GO:0042110)", "T cell activation"),
        ("Interferon Signaling R-HSA-913531", "Interferon Signaling"),
        ("KEGG_RIBOSOME", "ribosome"),
        ("my_custom_set", "my custom set"),
    ],
)
def test_tidy_term(raw, tidy):
    assert tidy_term(raw) == tidy


def test_tidy_term_truncates_at_a_word_with_an_ellipsis():
    raw = "positive regulation of transcription by RNA polymerase II (GO:0045944)"
    out = tidy_term(raw, max_chars=40)
    assert len(out) <= 40 and out.endswith("\u2026")
    assert out == "positive regulation of transcription\u2026"
    assert tidy_term(raw, max_chars=None) == "positive regulation of transcription by RNA polymerase II"
    with pytest.raises(ValueError, match="max_chars must be an integer >= 2"):
        tidy_term(raw, max_chars=0)


# --------------------------------------------------------------------------- #
# program_labels
# --------------------------------------------------------------------------- #
BACKGROUND = [f"G{i:02d}" for i in range(60)]
LIBRARIES = {
    "hallmark": {
        "HALLMARK_INTERFERON_GAMMA_RESPONSE": BACKGROUND[0:8],
        "HALLMARK_MYC_TARGETS_V1": BACKGROUND[20:28],
        "HALLMARK_NOISE": BACKGROUND[40:48],
    },
    "go": {
        "response to interferon-gamma (GO:0034341)": BACKGROUND[0:6] + BACKGROUND[50:56],
        "positive regulation of transcription by RNA polymerase II (GO:0045944)": BACKGROUND[20:28],
    },
}


def _loadings():
    """P01 +IFN genes; P02 -MYC genes (GO: -transcription as well); P03 noise; P04 only negative loadings."""
    rng = np.random.default_rng(0)
    L = pd.DataFrame(rng.normal(0, 0.1, size=(60, 4)), index=BACKGROUND, columns=["P01", "P02", "P03", "P04"])
    L.iloc[0:8, 0] += 3.0
    L.iloc[20:28, 1] -= 3.0
    L.iloc[:, 3] = -np.abs(L.iloc[:, 3]) - 0.01
    L.iloc[30:33, 3] = [-5.0, -4.0, -3.0]
    return L


def _enrichment(loadings):
    tg = top_genes(loadings, n_top=8)
    lists = {(p, s): list(g["gene"]) for (p, s), g in tg.groupby(["program", "side"])}
    return over_representation(lists, LIBRARIES, BACKGROUND), tg


def test_program_labels_terms_and_gene_fallback():
    loadings = _loadings()
    enr, tg = _enrichment(loadings)
    out = program_labels(enr, tg, programs=list(loadings.columns) + ["P05"])
    assert list(out.columns) == LABEL_COLUMNS
    assert list(out["program"]) == ["P01", "P02", "P03", "P04", "P05"]
    assert out["label"].is_unique
    o = out.set_index("program")
    # P01: best term over both libraries (the Hallmark set: overlap 8/8 beats GO's 6/12)
    assert o.loc["P01", "label"] == "P01 \u2191 interferon gamma response"
    assert (o.loc["P01", "term"], o.loc["P01", "library"], o.loc["P01", "side"]) == (
        "HALLMARK_INTERFERON_GAMMA_RESPONSE", "hallmark", "positive")
    assert o.loc["P01", "source"] == "term" and o.loc["P01", "qvalue"] < 0.05
    # P02: a negative-side term gets the down arrow
    assert o.loc["P02", "side"] == "negative" and o.loc["P02", "label"].startswith("P02 \u2193 ")
    # P03: nothing significant -> its top 3 positive genes
    top3 = list(loadings["P03"].sort_values(ascending=False).index[:3])
    assert o.loc["P03", "label"] == "P03: " + ", ".join(top3)
    assert o.loc["P03", "source"] == "genes" and np.isnan(o.loc["P03", "qvalue"]) and o.loc["P03", "term"] is None
    # P04: no positive loadings -> top negative genes, marked
    assert o.loc["P04", "label"] == "P04: \u2193 G30, G31, G32" and o.loc["P04", "side"] == "negative"
    # P05: unknown everywhere -> its id
    assert o.loc["P05", "label"] == "P05" and o.loc["P05", "source"] == "none"
    assert out["qvalue"].dtype == float


def test_program_labels_from_loadings_lengths_and_both_sides():
    loadings = _loadings()
    enr, _ = _enrichment(loadings)
    # the loadings themselves give the fallback genes and every program
    out = program_labels(enr, loadings, max_chars=20)
    assert list(out["program"]) == list(loadings.columns)
    for label, program in zip(out["label"], out["program"]):
        body = re.sub(rf"^{program}(: | \u2191 | \u2193 )", "", label)
        assert body != label and len(body) <= 20, label
    assert out.set_index("program").loc["P02", "label"].endswith("\u2026")
    # without top genes every program of the table is labelled, the others fall back to the id
    plain = program_labels(enr)
    assert set(plain["program"]) == set(enr["program"])
    # both sides: a program with significant terms on both sides names both
    both = enr.copy()
    extra = both[both["program"] == "P01"].iloc[[0]].assign(side="negative", term="HALLMARK_MYC_TARGETS_V1",
                                                          qvalue=0.01, pvalue=0.001)
    both = pd.concat([both, extra], ignore_index=True)
    lab = program_labels(both, both_sides=True, programs=["P01"]).loc[0, "label"]
    assert lab == "P01 \u2191 interferon gamma response / \u2193 MYC targets V1"


def test_program_labels_fdr_threshold_and_prerank_input():
    loadings = _loadings()
    enr, tg = _enrichment(loadings)
    # a threshold below every q-value: all gene fallbacks
    strict = program_labels(enr, tg, fdr=1e-300, programs=loadings.columns)
    assert (strict["source"] == "genes").all()
    # prerank-style table: side from the sign of the NES, strength |NES|
    pr = pd.DataFrame({
        "program": ["P01", "P01", "P02"],
        "library": ["h", "h", "h"],
        "term": ["HALLMARK_HYPOXIA", "HALLMARK_APOPTOSIS", "HALLMARK_HEME_METABOLISM"],
        "nes": [2.0, -3.0, -2.5],
        "pvalue": [1e-4, 1e-4, 1e-3],
        "qvalue": [1e-3, 1e-3, 0.01],
    })
    out = program_labels(pr, programs=["P01", "P02"], prefer_positive=False).set_index("program")
    assert out.loc["P01", "label"] == "P01 \u2193 apoptosis" and out.loc["P01", "side"] == "negative"
    # by default a significant positive-side term wins over a stronger negative one
    preferred = program_labels(pr, programs=["P01", "P02"]).set_index("program")
    assert preferred.loc["P01", "label"] == "P01 \u2191 hypoxia"
    assert preferred.loc["P02", "side"] == "negative"  # no positive term: the negative side
    assert out.loc["P02", "label"] == "P02 \u2193 heme metabolism"


def test_program_labels_are_unique_and_arguments_checked():
    enr = pd.DataFrame({"program": ["A"], "side": ["positive"], "term": ["X"], "qvalue": [0.01], "pvalue": [0.001]})
    # an odd program id equal to another program's label
    out = program_labels(enr, programs=["A", "A \u2191 X"])
    assert out["label"].is_unique
    with pytest.raises(ValueError, match="programs has duplicates"):
        program_labels(enr, programs=["A", "A"])
    with pytest.raises(ValueError, match="lacks column"):
        program_labels(enr.drop(columns="qvalue"))
    with pytest.raises(ValueError, match="fdr must be in"):
        program_labels(enr, fdr=0)
    with pytest.raises(ValueError, match="'side' column"):
        program_labels(enr.drop(columns="side"))


# --------------------------------------------------------------------------- #
# load_library
# --------------------------------------------------------------------------- #
GMT = "SET_A\t\tG1\tG2\tG3\nSET_B\tdesc\tG3\tG4\n"


@pytest.fixture
def enrichr_module(monkeypatch, tmp_path):
    """gseapy's Enrichr module with an empty cache directory and a fetch that must not happen."""
    pytest.importorskip("gseapy")
    import gseapy.enrichr  # noqa: F401

    mod = sys.modules["gseapy.enrichr"]
    monkeypatch.setattr(mod, "DEFAULT_CACHE_PATH", str(tmp_path / "cache"))

    def must_not_fetch(self, libname):
        raise AssertionError(f"network fetch of {libname!r} attempted")

    monkeypatch.setattr(mod.EnrichrAPI, "download_libraries", must_not_fetch)
    return mod


def test_load_library_reads_gmt_paths_locally(enrichr_module, tmp_path, monkeypatch):
    path = tmp_path / "h.gmt"
    path.write_text(GMT)
    expected = {"SET_A": ["G1", "G2", "G3"], "SET_B": ["G3", "G4"]}
    assert load_library(path) == expected
    assert load_library(str(path)) == expected
    # a file named like an Enrichr library is read locally, not fetched
    named = tmp_path / "GO_Biological_Process_2023"
    named.write_text(GMT)
    monkeypatch.chdir(tmp_path)
    assert load_library("GO_Biological_Process_2023") == expected
    # a mapping passes through, cleaned
    assert load_library({"S": ["A", "A", " B "], "EMPTY": []}) == {"S": ["A", "B"]}
    with pytest.raises(FileNotFoundError, match="missing.gmt"):
        load_library(tmp_path / "missing.gmt")
    with pytest.raises(FileNotFoundError, match="nope.gmt"):
        load_library("nope.gmt")


def test_load_library_uses_gseapys_download_cache(enrichr_module, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "Enrichr.MyLib_2024.gmt").write_text(GMT)
    assert load_library("MyLib_2024") == {"SET_A": ["G1", "G2", "G3"], "SET_B": ["G3", "G4"]}
    with pytest.raises(AssertionError, match="network fetch"):
        load_library("MyLib_2024", use_cache=False)


@pytest.mark.parametrize("error", ["requests", "builtin", "timeout"])
def test_load_library_offline_gives_a_clear_error(enrichr_module, monkeypatch, error):
    import requests

    exc = {
        "requests": requests.exceptions.ConnectionError("Max retries exceeded: Name or service not known"),
        "builtin": ConnectionError("Network is unreachable"),
        "timeout": requests.exceptions.ConnectTimeout("connect timed out"),
    }[error]

    def offline(self, libname):
        raise exc

    monkeypatch.setattr(enrichr_module.EnrichrAPI, "download_libraries", offline)
    with pytest.raises(LibraryUnavailableError) as info:
        load_library("GO_Biological_Process_2023", timeout=2)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'GO_Biological_Process_2023'" in msg
    assert "Enrichr is unreachable" in msg
    assert "GMT file" in msg and "pass its path" in msg
    assert "\n" not in msg  # one paragraph


def test_load_library_offline_through_gseapy_without_network(enrichr_module, monkeypatch):
    """The real gseapy download path with name resolution blocked: fails at once, no retries."""
    monkeypatch.undo()  # keep the real download_libraries ...
    mod = sys.modules["gseapy.enrichr"]

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (blocked in tests)")

    def refuse(*args, **kwargs):
        raise ConnectionRefusedError("network blocked in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    import tempfile

    monkeypatch.setattr(mod, "DEFAULT_CACHE_PATH", tempfile.mkdtemp())  # ... but an empty cache
    t0 = time.perf_counter()
    with pytest.raises(LibraryUnavailableError, match="'KEGG_2021_Human'.*Enrichr is unreachable"):
        load_library("KEGG_2021_Human", timeout=1)
    assert time.perf_counter() - t0 < 5


def test_load_library_unknown_name_and_bad_arguments(enrichr_module, monkeypatch):
    monkeypatch.setattr(enrichr_module.EnrichrAPI, "download_libraries", lambda self, name: {})
    with pytest.raises(ValueError, match="no gene sets for 'Not_A_Library'") as info:
        load_library("Not_A_Library")
    assert not isinstance(info.value, LibraryUnavailableError)

    def http_error(self, name):
        raise Exception("Error fetching gene set library.")

    monkeypatch.setattr(enrichr_module.EnrichrAPI, "download_libraries", http_error)
    with pytest.raises(ValueError, match="did not return a gene-set library named 'Not_A_Library'"):
        load_library("Not_A_Library")
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        load_library("X", timeout=0)
    with pytest.raises(ValueError, match="spec must be"):
        load_library(42)
    with pytest.raises(ValueError, match="Invalid organism"):
        load_library("X", organism="martian")
