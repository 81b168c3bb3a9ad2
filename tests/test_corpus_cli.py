"""The corpus commands end to end, as a user runs them: build, label, bins, contrast, unlearn,
report; each result against the Python API on the same inputs, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from reference import run_cli

from headwater import Index, TrackStar, TrackStarConfig
from headwater.corpus import BinsConfig, CorpusMap, contrast, corpus_map, load_labels
from headwater.toy import tiny_gpt2, word_tokenizer

TOPICS = ["art", "law", "sci"]
WORDS = "the a of is in and to by with court judge ruled paint canvas colour atom cell energy old new red blue".split()
CAPITAL = [{"prompt": "the court", "completion": " ruled"}, {"prompt": "the judge", "completion": " ruled by the court"}]
SCIENCE = [{"prompt": "the atom", "completion": " is energy"}, {"prompt": "a cell", "completion": " is new"}]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A model directory, training records with topics, benchmark files, an index with labels."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    tok = word_tokenizer([" ".join(WORDS)])
    torch.manual_seed(0)
    tiny_gpt2(len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=32).eval().save_pretrained(root / "m")
    tok.save_pretrained(root / "m")
    topic_words = {"art": "paint canvas colour red blue", "law": "court judge ruled", "sci": "atom cell energy"}
    docs = []
    for i in range(90):
        t = TOPICS[i % 3]
        docs.append({"id": f"d{i}", "text": " ".join(rng.choice((topic_words[t] + " the a of is in").split(), 8))})
    (root / "train.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    pd.DataFrame({"id": [d["id"] for d in docs], "topic": [TOPICS[i % 3] for i in range(90)]}).to_csv(root / "labels.csv", index=False)
    for name, items in (("law", CAPITAL), ("sci", SCIENCE)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in items))
    run_cli(root, "build", "idx", "--model", "m", "--data", "train.jsonl", "--projection-dim", "16", "--no-progress")
    return root


def test_label_bins_contrast_unlearn_report(ws):
    r = run_cli(ws, "label", "idx", "--labels", "labels.csv")
    assert "90 records; topic: 3 values" in r.stdout
    assert Index(ws / "idx").manifest["labels"]["source"]["kind"] == "file"
    bench = ("--benchmark", "law=law.jsonl", "--benchmark", "sci=sci.jsonl")
    r = run_cli(ws, "bins", "idx", *bench, "--by", "topic", "--bootstrap", "50", "--min-bin-size", "5", "--out", "map", "--no-progress")
    assert "corpus map of 90 records × 2 benchmarks" in r.stdout

    # The same map from Python, with the same settings and method.
    index = Index(ws / "idx")
    cfg = BinsConfig(by=["topic"], bootstrap=50, min_bin_size=5)
    want = corpus_map(
        TrackStar(None, None, TrackStarConfig()).fit(index), {"law": ws / "law.jsonl", "sci": ws / "sci.jsonl"}, load_labels(index), cfg
    )
    got = CorpusMap.load(ws / "map")
    numeric = want.table.select_dtypes("number").columns
    np.testing.assert_allclose(got.table[numeric].to_numpy(float), want.table[numeric].to_numpy(float), rtol=1e-6, atol=1e-9)
    assert json.loads((ws / "map" / "bins.config.json").read_text())["BinsConfig"]["bootstrap"] == 50

    r = run_cli(ws, "contrast", "map", "--a", "law", "--b", "sci")
    frame = pd.read_csv(ws / "map" / "contrast-law-vs-sci.csv")
    np.testing.assert_allclose(frame["ab"], contrast(want, "law", "sci")[0]["ab"], rtol=1e-9)

    args = ("--map", "map", "--bin", "topic=law", "--benchmark", "law", "--control", "sci", "--forget", "3", "--unlearn-steps", "2")
    r = run_cli(ws, "unlearn", "idx", *args, "--seeds", "0", "--seeds", "1", "--bootstrap", "100", "--retain", "20", "--out", "unl", "--no-progress")
    result = json.loads((ws / "unl" / "unlearn.json").read_text())
    assert result["bin"] == "topic=law" and result["forget"] == 3 and len(result["runs"]) == 4
    law = np.flatnonzero(np.array([TOPICS[i % 3] for i in range(90)]) == "law")
    top = np.argsort(-got.record_scores[law, 0], kind="stable")[:3]
    assert sorted(result["sets"]["top"]) == sorted(law[top].tolist())
    assert "difference-in-differences" in r.stdout

    args = ("--map", "map", "--bin", "topic=law", "--benchmark", "law", "--control", "sci", "--init-model", "m", "--epochs", "1", "--lr", "1e-2")
    r = run_cli(ws, "filter", "idx", *args, "--filter-seeds", "0", "--out", "filt", "--no-progress")
    result = json.loads((ws / "filt" / "filter.json").read_text())
    assert result["dropped"] == 30 and result["bin"] == "topic=law" and set(result["means"]) == {"full", "filtered", "random"}

    run_cli(ws, "report", "map", "unl", "filt", "--out", "report.html")
    html = (ws / "report.html").read_text()
    assert "law" in html and "data:image/png;base64," in html and "trained again without the bin" in html


def test_corpus_commands_refuse_bad_input_in_one_line(ws):
    for args, message in (
        (("bins", "idx", "--benchmark", "law", "--out", "m2"), "NAME=FILE"),
        (("bins", "idx", "--benchmark", "x=missing.jsonl", "--out", "m2"), "missing.jsonl"),
        (("contrast", "nomap", "--a", "x", "--b", "y"), "not a corpus map"),
        (("label", "idx"), "give the labels"),
        (("bins", "idx", "--benchmark", "law=law.jsonl", "--by", "nosuch", "--out", "m3"), "no label column 'nosuch'"),
        (("bins", "idx", "--benchmark", "law=law.jsonl", "--gradient-contrast", "law,x", "--out", "m3"), "not one of law"),
    ):
        r = run_cli(ws, *args, code=2)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (ws / "m2").exists() and not (ws / "m3").exists()  # nothing half-written
