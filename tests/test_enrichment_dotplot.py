"""Tests of perturbnmf.pl.enrichment_dotplot with many programs and terms."""

import matplotlib

matplotlib.use("Agg", force=False)  # no display needed; keeps a notebook backend if one is active

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from perturbnmf.pl import enrichment_dotplot  # noqa: E402

LONG = "positive regulation of nuclear-transcribed mRNA catabolic process, deadenylation-dependent decay"


def _table(n_programs, n_terms, seed=0):
    """Each program and side gets 3 of the terms; every term is used at least once."""
    rng = np.random.default_rng(seed)
    terms = [f"term number {t} " + ("with a rather long descriptive name " if t % 3 == 0 else "") + f"(GO:{t:07d})"
             for t in range(n_terms)]
    terms[0] = LONG + " (GO:0000289)"
    rows, pool = [], list(terms)
    for p in range(1, n_programs + 1):
        for side in ("positive", "negative"):
            chosen = [pool.pop() for _ in range(min(3, len(pool)))]
            chosen += list(rng.choice(terms, 3 - len(chosen), replace=False))
            for t in chosen:
                q = 10 ** -rng.uniform(1.4, 12)
                rows.append(dict(program=f"P{p:02d}", side=side, library="GO_BP", term=t, pvalue=q / 10,
                                 qvalue=q, combined_score=10 ** rng.uniform(0, 3)))
    return pd.DataFrame(rows)


def _boxes(fig, artists):
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists if a.get_visible() and a.get_text()]


def _overlap(a, b, tol=0.5):
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > tol) and (min(a.y1, b.y1) - max(a.y0, b.y0) > tol)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_dotplot_40_programs_60_terms_is_readable():
    top = _table(40, 60)
    assert top["term"].nunique() == 60
    labels = {f"P{p:02d}": f"P{p:02d} \u2191 a fairly long program label number {p}" for p in range(1, 41)}
    fig = enrichment_dotplot(top, labels=labels)
    fig.canvas.draw()
    ax, cax = fig.axes[0], fig.axes[1]
    width, height = fig.get_size_inches()

    # one tick label per term and per program x side, programs shown by their label
    yt = [t.get_text() for t in ax.get_yticklabels()]
    xt = [t.get_text() for t in ax.get_xticklabels()]
    assert len(yt) == 60 and len(xt) == 80
    assert xt[0] == labels["P01"] + " (+)" and xt[1] == labels["P01"] + " (\u2212)"
    # long names: cut with an ellipsis and wrapped onto at most two lines
    assert all(t.count("\n") <= 1 for t in yt)
    assert all(len(t.replace("\n", " ")) <= 60 for t in yt)
    long_label = yt[[i for i, t in enumerate(yt) if t.startswith("positive regulation")][0]]
    assert long_label.endswith("\u2026") and "\n" in long_label

    # the dot grid has room: >= 0.2 in per term and per column
    ax_box = ax.get_position()
    assert ax_box.height * height / 60 >= 0.2
    assert ax_box.width * width / 80 >= 0.25
    assert height / 60 >= 0.2

    # nothing overlaps: tick labels among themselves, legend and colour bar with the dots and each other
    yb = sorted(_boxes(fig, ax.get_yticklabels()), key=lambda b: b.y0)
    assert all(lo.y1 <= hi.y0 + 0.5 for lo, hi in zip(yb, yb[1:])), "term labels overlap"
    xb = sorted(_boxes(fig, ax.get_xticklabels()), key=lambda b: b.x0)
    assert all(le.x1 <= ri.x0 + 0.5 for le, ri in zip(xb, xb[1:])), "program labels overlap"
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    axes_box = ax.get_window_extent(renderer)
    cbar_box = cax.get_tightbbox(renderer)
    assert not _overlap(legend, axes_box) and not _overlap(legend, cbar_box) and not _overlap(cbar_box, axes_box)
    for b in xb + yb:
        assert not _overlap(b, legend) and not _overlap(b, cbar_box)
    # ... and everything lies inside the figure (nothing cut off)
    tight = fig.get_tightbbox(renderer)  # inches
    assert tight.x0 >= -0.02 and tight.y0 >= -0.02
    assert tight.x1 <= width + 0.02 and tight.y1 <= height + 0.02


def test_dotplot_size_grows_with_programs_and_terms():
    small_t, wide_t, tall_t = _table(5, 15), _table(40, 15), _table(10, 60)
    assert (small_t["term"].nunique(), wide_t["term"].nunique(), tall_t["term"].nunique()) == (15, 15, 60)
    w_s, h_s = enrichment_dotplot(small_t).get_size_inches()
    w_w, h_w = enrichment_dotplot(wide_t).get_size_inches()
    w_t, h_t = enrichment_dotplot(tall_t).get_size_inches()
    assert w_w > w_s + 0.25 * 70  # 70 more columns
    assert h_w == pytest.approx(h_s, abs=1.0)  # same terms: same height
    assert h_t > h_s + 0.2 * 45  # 45 more terms


def test_dotplot_program_labels_table_prerank_input_and_errors():
    from perturbnmf.tl import tidy_term

    top = _table(3, 9)
    labels = pd.DataFrame({"program": ["P01", "P02"], "label": ["P01 \u2191 interferon", "P02: A, B, C"]})
    fig = enrichment_dotplot(top, labels=labels, tidy_terms=True)
    ax = fig.axes[0]
    xt = [t.get_text() for t in ax.get_xticklabels()]
    assert xt[:2] == ["P01 \u2191 interferon (+)", "P01 \u2191 interferon (\u2212)"]
    assert xt[4] == "P03 (+)"  # not in labels: the id
    yt = [t.get_text().replace("\n", " ") for t in ax.get_yticklabels()]
    assert not any("(GO:" in t for t in yt)
    assert tidy_term(top["term"].iloc[0], max_chars=None) in set(top["term"].map(
        lambda t: tidy_term(t, max_chars=None)))
    # the same term name in two libraries stays two rows
    two = pd.concat([top.iloc[:1], top.iloc[:1].assign(library="other", program="P02")], ignore_index=True)
    assert len(enrichment_dotplot(two).axes[0].get_yticklabels()) == 2
    # prerank output: no side, colour = NES
    pr = pd.DataFrame({"program": ["P01", "P02", "P02"], "library": "h", "term": ["A", "B", "A"],
                       "nes": [2.1, -1.8, 1.5], "pvalue": [1e-4, 1e-3, 1e-2], "qvalue": [1e-3, 1e-2, 0.04]})
    fig = enrichment_dotplot(pr)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["P01", "P02"]
    assert fig.axes[1].get_ylabel() == "NES"
    with pytest.raises(ValueError, match="top is empty"):
        enrichment_dotplot(top.iloc[:0])
    with pytest.raises(ValueError, match="lacks column"):
        enrichment_dotplot(top.drop(columns="qvalue"))
    with pytest.raises(ValueError, match="labels must be a mapping"):
        enrichment_dotplot(top, labels=["P01"])
