"""The corpus-map report: figures of a synthetic map with planted bins, and one self-contained HTML
page (inlined figures, no external references, escaped user text) with the planted bins in its
top-bins tables, the contrasts and an unlearning result; also a map with a single label column."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_corpus import Given, planted

from headwater.corpus import BinsConfig, contrast, corpus_map
from headwater.corpus.contrast import save_contrast
from headwater.corpus.report import write_figures, write_report

SCRIPT = "<script>alert('x')</script> & more"

UNLEARN = {
    "config": {"forget": 32, "seeds": [0, 1, 2]},
    "bin": "topic=law",
    "benchmark": "A",
    "control_benchmark": "B",
    "bin_size": 574,
    "forget": 32,
    "tokens": {"top": 9000, "random": [9010, 8990, 9001]},
    "before": {"aligned": {"accuracy": 0.6, "logprob": -1.2}, "control": {"accuracy": 0.5, "logprob": -1.5}, "retain_ppl": 12.0},
    "runs": [
        {
            "arm": arm,
            "seed": seed,
            "aligned": {"accuracy": 0.5 if arm == "top" else 0.58, "logprob": -1.6 if arm == "top" else -1.3},
            "control": {"accuracy": 0.49, "logprob": -1.52},
            "retain_ppl": 12.5,
        }
        for seed in range(3)
        for arm in ("top", "random")
    ],
    "effect": {
        "logprob": {"top": -0.38, "random": -0.08, "did": -0.3, "lo": -0.45, "hi": -0.15},
        "accuracy": {"top": -0.09, "random": -0.07, "did": -0.08, "lo": -0.12, "hi": -0.03},
    },
    "aligned_drop": {"logprob": {"top": -0.4, "random": -0.1, "diff": -0.3, "lo": -0.44, "hi": -0.16}},
    "notes": ["forgetting the top records lowered the aligned gold log-prob <more> than random ones"],
}


@pytest.fixture(scope="module")
def two_columns(tmp_path_factory):
    """A topic × format map saved with an A − B contrast, a record text holding a script tag, and
    two unlearning results (a full one and one with most keys missing)."""
    root = tmp_path_factory.mktemp("report")
    scores, labels, benches = planted()
    cmap = corpus_map(Given(scores).fit(None), benches, labels, BinsConfig(by=["topic", "format"], bootstrap=50))
    cmap.info["examples"]["topic"]["law"]["A"][0]["text"] = SCRIPT
    cmap.save(root / "map")
    save_contrast(root / "map", *contrast(cmap, "A", "B"))
    (root / "unlearn").mkdir()
    (root / "unlearn" / "unlearn.json").write_text(json.dumps(UNLEARN))
    (root / "sparse").mkdir()
    (root / "sparse" / "unlearn.json").write_text(json.dumps({"effect": {"logprob": {"did": 0.1}}, "notes": ["only an effect"]}))
    page = write_report(root / "map", root / "out" / "report.html", [root / "unlearn", root / "sparse"], title="Planted <map>")
    return root, cmap, page


def _pngs_ok(paths):
    for p in paths:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            w, h = im.size
            assert im.format == "PNG" and 300 <= w <= 4000 and 150 <= h <= 4000, (p, im.size)
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something was drawn


def test_the_page_is_self_contained_and_inlines_every_figure(two_columns):
    root, cmap, page = two_columns
    text = page.read_text()
    assert page == root / "out" / "report.html"
    # no external references: nothing fetched over the network, no stylesheets, scripts or fonts
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text)
    assert not re.search(r"<link|<script|@import|url\(", text)
    files = sorted((root / "out" / "report_files").glob("*.png"))
    names = {p.name for p in files}
    assert {"joint-A.png", "joint-B.png", "marginal-topic-A.png", "marginal-format-B.png", "contrast-A-vs-B.png", "unlearn-0.png"} <= names
    assert text.count("data:image/png;base64,") == len(files)
    for p in files:
        assert base64.b64encode(p.read_bytes()).decode() in text
    _pngs_ok(files)


def test_the_page_has_every_section_and_escapes_user_text(two_columns):
    root, cmap, page = two_columns
    text = page.read_text()
    for section in ("summary", "heatmaps", "marginals", "top-bins", "contrasts", "unlearning"):
        assert f"id='{section}'" in text
    for bench in cmap.benchmarks:
        assert f"<h3>{bench}</h3>" in text
    assert "Planted &lt;map&gt;" in text and "Planted <map>" not in text
    assert "<script>" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in text
    assert "&lt;more&gt;" in text  # an unlearning note
    # the planted bins lead their benchmark's top-bins table, marked significant
    tables = text[text.index("id='top-bins'") : text.index("id='contrasts'")]
    a, b = tables.split("<h3>A</h3>")[1].split("<h3>B</h3>")
    assert re.search(r"<tbody><tr class='sig'><td>topic</td><td>law</td>", a)
    assert re.search(r"<tbody><tr class='sig'><td>format</td><td>forum</td>", b)
    # the contrast table lists bins whose interval excludes 0; the unlearning table the DiD
    contrasts = text[text.index("id='contrasts'") : text.index("id='unlearning'")]
    assert "<td>law × news</td>" in contrasts and "corr(A, B)" in contrasts
    assert "-0.3 [-0.45, -0.15]" in text and "only an effect" in text


def test_the_csv_tables_beside_the_page(two_columns):
    root, cmap, page = two_columns
    top = pd.read_csv(root / "out" / "report-top-bins.csv")
    assert set(top["benchmark"]) == {"A", "B"} and not top["z"].isna().any()
    for bench, view, name in (("A", "topic", "law"), ("B", "format", "forum")):
        first = top[top["benchmark"] == bench].iloc[0]
        assert (first["view"], first["bin"], bool(first["significant"])) == (view, name, True)
        assert top[top["benchmark"] == bench]["z"].is_monotonic_decreasing
    unl = pd.read_csv(root / "out" / "report-unlearning.csv")
    full = unl[unl["result"].str.contains("unlearn/")].set_index("metric")
    np.testing.assert_allclose(full.loc["logprob", ["top aligned", "random aligned", "did", "lo", "hi"]], [-0.4, -0.1, -0.3, -0.45, -0.15])
    np.testing.assert_allclose(full.loc["logprob", "top retain_ppl"], 0.5)


def test_a_single_label_column_and_a_two_by_two_contrast(tmp_path):
    """Without a joint view the bar charts are the main figures; label values are escaped; the
    2×2 contrast draws A − B beside the interaction."""
    scores, labels, benches = planted()
    labels.table["topic"] = labels.table["topic"].replace("sport", "sport & <games>")
    benches = {**benches, "C": [{"id": i} for i in range(4)], "D": [{"id": 8 + i} for i in range(4)]}
    cmap = corpus_map(Given(scores).fit(None), benches, labels, BinsConfig(by=["topic"], bootstrap=50))
    cmap.save(tmp_path / "map")
    save_contrast(tmp_path / "map", *contrast(cmap, "A", "B", "C", "D"))
    figures = write_figures(cmap, tmp_path / "figs", [contrast(cmap, "A", "B", "C", "D")])
    assert sorted(figures) == sorted([f"marginal-topic-{b}" for b in "ABCD"] + ["contrast-(A − B) − (C − D)"])
    _pngs_ok(figures.values())
    with Image.open(figures["contrast-(A − B) − (C − D)"]) as im:
        assert im.size[0] > 1.5 * im.size[1]  # two panels side by side
    text = write_report(tmp_path / "map", tmp_path / "report.html").read_text()
    assert "id='heatmaps'" not in text and "id='bin-means'" in text and "id='unlearning'" not in text
    assert text.count("data:image/png;base64,") == 5
    assert "sport &amp; &lt;games&gt;" in text and "<games>" not in text
    assert "<tbody><tr class='sig'><td>topic</td><td>law</td>" in text.split("<h3>A</h3>")[1]
    assert "corr(C, D) − corr(A, B)" in text
