"""Corpus maps on synthetic score matrices with planted bins, against dense numpy references and
simulation: recovery of planted bins, the permutation null, unbiased corpus totals, bootstrap
coverage, the false discovery rate, contrasts; label tables and their storage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

import headwater as hw
from headwater import UserError
from headwater.config import GradientConfig
from headwater.corpus import BinsConfig, CorpusMap, Labels, contrast, corpus_map, profile_correlations
from headwater.corpus.labels import attach_labels, classify_records, labels_from_columns, labels_from_file, load_labels
from headwater.corpus.stats import bh_qvalues, permutation_z, poisson_weights
from headwater.methods.base import Method, TrainingData

TOPICS, FORMATS = ["art", "law", "sci", "sport"], ["news", "essay", "forum"]


class Given(Method):
    """A method whose scores are given: rows [r, Q] with their record of each row (token units
    when a record has several rows), streamed in blocks of `block` rows."""

    name = "given"
    config_class = GradientConfig

    def __init__(self, rows: np.ndarray, records: np.ndarray | None = None, block: int = 97, pool: str = "max"):
        self.rows, self.block = np.asarray(rows, dtype=np.float64), block
        self.records = np.arange(len(rows)) if records is None else np.asarray(records)
        self.config = GradientConfig(pool=pool)

    def fit(self, train):
        n = int(self.records.max()) + 1
        self.data = TrainingData([{"text": f"doc {i}"} for i in range(n)], [f"d{i}" for i in range(n)], [])
        return self

    def score_blocks(self, queries, measurement, by=None):
        for lo in range(0, len(self.rows), self.block):
            rec = self.records[lo : lo + self.block]
            ids = np.stack([rec, np.arange(len(rec))], 1)
            yield lo, ids, torch.from_numpy(self.rows[lo : lo + self.block, [int(q["id"]) for q in queries]])


def planted(n=3000, seed=0, effect=0.5, queries=(8, 8)):
    """Labels with bins of very different sizes, and scores [n, Q]: noise, plus `effect` for
    benchmark A on topic `law` and for benchmark B on format `forum`."""
    rng = np.random.default_rng(seed)
    topic = rng.choice(TOPICS, n, p=[0.5, 0.2, 0.25, 0.05])
    fmt = rng.choice(FORMATS, n, p=[0.6, 0.3, 0.1])
    qa, qb = queries
    scores = rng.normal(size=(n, qa + qb)) + rng.normal(size=(n, 1))  # a document effect shared by queries
    scores[topic == "law", :qa] += effect
    scores[fmt == "forum", qa:] += effect
    labels = Labels(pd.DataFrame({"id": [f"d{i}" for i in range(n)], "topic": topic, "format": fmt}))
    benches = {"A": [{"id": i} for i in range(qa)], "B": [{"id": qa + i} for i in range(qb)]}
    return scores, labels, benches


def test_planted_bins_are_recovered_and_nothing_else():
    scores, labels, benches = planted()
    cmap = corpus_map(Given(scores).fit(None), benches, labels, BinsConfig(by=["topic", "format"], bootstrap=100))
    sig = cmap.table[cmap.table["significant"]]
    found = {(r.view, r.bin, r.benchmark) for r in sig.itertuples() if r.view in ("topic", "format")}
    # A's law bin stands out above the mean; the other topics are then below it (A's mean shifts).
    assert ("topic", "law", "A") in found and ("format", "forum", "B") in found
    assert not any(v == "format" and b == "A" for v, _, b in found) and not any(v == "topic" and b == "B" for v, _, b in found)
    a = cmap.bins("topic", "A").set_index("bin")
    assert a.loc["law", "z"] > 5 and a.loc["law", "enrichment"] > 0.3 and a["enrichment"].idxmax() == "law"
    assert a.loc["law", "lo"] > a.drop("law")["hi"].max()
    assert a.loc["law", "excess_lo"] > 0 and (a.drop("law")["excess_hi"] < a.loc["law", "excess_lo"]).all()
    joint = cmap.bins("topic × format", "B").set_index("bin")
    assert joint.filter(like="forum", axis=0)["mean"].min() > joint.drop(joint.filter(like="forum", axis=0).index)["mean"].max()


@pytest.mark.parametrize("rows_per_record", [1, 3])
def test_streamed_statistics_equal_dense_numpy(rows_per_record):
    """Per-bin means, per-query means, counts, totals and the top-k equal a dense reference, with
    records cut across blocks (token units pooled by max)."""
    scores, labels, benches = planted(n=400, seed=1)
    rng = np.random.default_rng(2)
    rows = np.repeat(scores, rows_per_record, 0) + (rng.normal(size=(400 * rows_per_record, scores.shape[1])) if rows_per_record > 1 else 0)
    records = np.repeat(np.arange(400), rows_per_record)
    cmap = corpus_map(
        Given(rows, records, block=7).fit(None), benches, labels, BinsConfig(by=["topic"], bootstrap=20, min_bin_size=1, enrichment_k=30)
    )
    pooled = np.stack([rows[records == r].max(0) for r in range(400)])
    x = np.stack([pooled[:, :8].mean(1), pooled[:, 8:].mean(1)], 1)
    topic = labels.table["topic"].to_numpy()
    for i, b in enumerate("AB"):
        t = cmap.bins("topic", b).set_index("bin")
        for name in TOPICS:
            sel = topic == name
            assert t.loc[name, "n"] == sel.sum()
            np.testing.assert_allclose(t.loc[name, "mean"], x[sel, i].mean(), rtol=1e-12)
            np.testing.assert_allclose(t.loc[name, "total"], x[sel, i].sum(), rtol=1e-12)
        top = np.argsort(-x[:, i], kind="stable")[:30]
        assert [r for r, _ in cmap.info["top"][b]] == [f"d{j}" for j in top]
        cols = pooled[:, :8] if b == "A" else pooled[:, 8:]
        item_tops = np.concatenate([np.lexsort((np.arange(400), -cols[:, j]))[:30] for j in range(8)])  # each item's own top 30
        np.testing.assert_allclose(t.loc[TOPICS, "top_k"], [np.sum(topic[item_tops] == name) for name in TOPICS])
    np.testing.assert_allclose(cmap.record_scores, x, rtol=1e-6)
    S = cmap.arrays["topic/S"]
    np.testing.assert_allclose(S[cmap.info["views"]["topic"]["bins"].index("law")], pooled[topic == "law"].sum(0), rtol=1e-12)


def test_permutation_z_matches_shuffled_labels():
    """The closed-form null mean and variance of a bin's mean equal those of actual shuffles."""
    rng = np.random.default_rng(3)
    x = rng.standard_t(4, size=500)
    m = 37
    means = np.array([rng.permutation(x)[:m].mean() for _ in range(20000)])
    z_obs = permutation_z(np.array([0.3]), np.array([m]), np.array(x.sum()), np.array((x**2).sum()), len(x))
    z_emp = (0.3 - means.mean()) / means.std()
    np.testing.assert_allclose(z_obs[0], z_emp, rtol=0.03)


def test_corpus_totals_from_a_stratified_sample_are_unbiased(tmp_path):
    """Records are a stratified sample of a larger corpus; scaled by the corpus bin sizes, the
    bins' totals average to the corpus totals over repeated samples."""
    rng = np.random.default_rng(4)
    sizes = {"art": 5000, "law": 300, "sci": 2000}
    population = {t: rng.gamma(2.0, 1.0 + i, size=s) for i, (t, s) in enumerate(sizes.items())}
    take = {"art": 40, "law": 30, "sci": 20}  # sampling rates differ by bin
    pd.DataFrame({"topic": list(sizes), "size": list(sizes.values())}).to_csv(tmp_path / "sizes.csv", index=False)
    estimates = []
    for _ in range(300):
        topic = np.concatenate([[t] * k for t, k in take.items()])
        x = np.concatenate([rng.choice(population[t], k, replace=False) for t, k in take.items()])
        labels = Labels(pd.DataFrame({"id": [f"d{i}" for i in range(len(x))], "topic": topic}))
        cfg = BinsConfig(by=["topic"], bootstrap=10, min_bin_size=1, corpus_sizes=str(tmp_path / "sizes.csv"), examples=0)
        t = corpus_map(Given(x[:, None]).fit(None), {"A": [{"id": 0}]}, labels, cfg).bins("topic", "A").set_index("bin")
        estimates.append(t.loc[list(sizes), "total"].to_numpy())
    estimates = np.array(estimates)
    truth = np.array([population[t].sum() for t in sizes])
    se = estimates.std(0) / np.sqrt(len(estimates))
    assert np.all(np.abs(estimates.mean(0) - truth) < 3.5 * se)
    naive = np.array([population[t].mean() * take[t] for t in sizes])  # the unscaled sums are not corpus totals
    assert np.all(np.abs(naive - truth) > 10 * se)


def test_bootstrap_intervals_reach_their_coverage():
    """Over repeated draws of documents and benchmark items, the 95% interval of a bin's mean
    covers the population value 90-97% of the time (both sources of noise present)."""
    rng = np.random.default_rng(5)
    covered = []
    for _ in range(150):
        n, q = 240, 12
        topic = np.array(["art"] * 120 + ["law"] * 120)
        doc = rng.normal(size=(n, 1))
        item = rng.normal(scale=0.5, size=(1, q))  # benchmark items differ in difficulty
        x = 1.0 + doc + item + rng.normal(scale=0.5, size=(n, q))
        labels = Labels(pd.DataFrame({"id": [f"d{i}" for i in range(n)], "topic": topic}))
        cfg = BinsConfig(by=["topic"], bootstrap=300, bootstrap_seed=int(rng.integers(1 << 30)), examples=0)
        t = corpus_map(Given(x).fit(None), {"A": [{"id": i} for i in range(q)]}, labels, cfg).bins("topic", "A").set_index("bin")
        covered.append(t.loc["law", "lo"] <= 1.0 <= t.loc["law", "hi"])
    assert 0.88 <= np.mean(covered) <= 0.98


def test_benjamini_hochberg_keeps_the_false_discovery_rate():
    rng = np.random.default_rng(6)
    fdr = []
    for _ in range(2000):
        null = rng.uniform(size=40)
        alt = 2 * (1 - scipy.stats.norm.cdf(rng.normal(3.0, 1.0, size=10)))
        q = bh_qvalues(np.concatenate([null, alt]))
        rejected = q < 0.05
        fdr.append(rejected[:40].sum() / max(rejected.sum(), 1))
    assert np.mean(fdr) <= 0.05
    # Against scipy's implementation, with NaNs kept out of the family.
    p = np.concatenate([rng.uniform(size=30), [np.nan]])
    np.testing.assert_allclose(bh_qvalues(p)[:30], scipy.stats.false_discovery_control(p[:30]), rtol=1e-12)
    assert np.isnan(bh_qvalues(p)[30])


def test_no_bin_is_significant_under_the_null_more_often_than_alpha():
    rng = np.random.default_rng(7)
    any_sig, excess_covers = [], []
    for s in range(60):
        scores = rng.normal(size=(600, 4)) + rng.normal(size=(600, 1))
        labels = Labels(pd.DataFrame({"id": [f"d{i}" for i in range(600)], "topic": rng.choice(TOPICS + FORMATS, 600)}))
        cmap = corpus_map(
            Given(scores).fit(None), {"A": [{"id": i} for i in range(4)]}, labels, BinsConfig(bootstrap=100, examples=0, bootstrap_seed=s)
        )
        any_sig.append(cmap.table["significant"].any())
        excess_covers.append(((cmap.table["excess_lo"] <= 0) & (cmap.table["excess_hi"] >= 0)).mean())
    assert np.mean(any_sig) <= 0.1  # family-wise rate under the complete null; BH controls it at 0.05
    assert np.mean(excess_covers) >= 0.9  # the bins' excess intervals cover 0 at about their level


def test_poisson_weights_depend_only_on_record_and_replicate():
    w = poisson_weights(np.arange(2000), 50, seed=3)
    np.testing.assert_array_equal(poisson_weights(np.arange(1000, 1500), 50, seed=3), w[:, 1000:1500])
    assert abs(w.mean() - 1) < 0.01 and abs(w.var() - 1) < 0.02
    assert not np.array_equal(poisson_weights(np.arange(10), 5, seed=4), w[:5, :10])


def test_contrasts_separate_the_planted_capabilities_and_pair_the_bootstrap(tmp_path):
    scores, labels, benches = planted(n=3000, seed=8, effect=0.4)
    cmap = corpus_map(Given(scores).fit(None), benches, labels, BinsConfig(by=["topic", "format"], bootstrap=200))
    cmap.save(tmp_path / "map")
    cmap = CorpusMap.load(tmp_path / "map")
    frame, summary = contrast(cmap, "A", "B", view="topic")
    t = frame.set_index("bin")
    assert t.loc["law", "ab"] > 0 and t.loc["law", "ab_lo"] > 0
    f, _ = contrast(cmap, "A", "B", view="format")
    assert f.set_index("bin").loc["forum", "ab_hi"] < 0
    # A benchmark against itself: zero contrast with a zero-width interval (the pairing).
    same, s2 = contrast(cmap, "A", "A", view="topic")
    np.testing.assert_allclose(same[["ab", "ab_lo", "ab_hi"]].to_numpy(dtype=float), 0, atol=1e-12)
    assert s2["views"]["topic"]["corr_ab"]["value"] == pytest.approx(1.0)
    corr = profile_correlations(cmap, "topic")
    assert corr.loc[0, "value"] < 0.5
    with pytest.raises(UserError, match="both --c and --d"):
        contrast(cmap, "A", "B", c="A")


def test_a_two_by_two_interaction_finds_the_sharper_contrast():
    """A vs B draw on different topics; C vs D on the same ones: the A/B contrast is sharper."""
    rng = np.random.default_rng(9)
    n = 3000
    topic = rng.choice(TOPICS, n)
    base = rng.normal(size=(n, 1))
    cols = []
    for bump in ({"law": 0.6}, {"sci": 0.6}, {"art": 0.5}, {"art": 0.5, "sci": 0.05}):
        s = base + rng.normal(size=(n, 6))
        for t, e in bump.items():
            s[topic == t] += e
        cols.append(s)
    scores = np.concatenate(cols, 1)
    labels = Labels(pd.DataFrame({"id": [f"d{i}" for i in range(n)], "topic": topic}))
    benches = {name: [{"id": 6 * i + j} for j in range(6)] for i, name in enumerate("ABCD")}
    cmap = corpus_map(Given(scores).fit(None), benches, labels, BinsConfig(bootstrap=200))
    frame, summary = contrast(cmap, "A", "B", "C", "D")
    s = summary["views"]["topic"]
    assert s["sharper_ab_than_cd"]["lo"] > 0 and s["corr_cd"]["value"] > s["corr_ab"]["value"]
    assert frame.set_index("bin").loc["law", "interaction_lo"] > 0


# ------------------------------------------------------------------ labels


def test_labels_from_a_file_join_by_id_and_respect_confidence(tmp_path):
    pd.DataFrame({"id": ["b", "a", "zzz"], "topic": ["law", "art", "sci"], "topic_confidence": [0.9, 0.2, 1.0]}).to_parquet(tmp_path / "l.parquet")
    labels = labels_from_file(tmp_path / "l.parquet", ["a", "b", "c"])
    assert list(labels.values("topic")) == ["art", "law", "(unlabelled)"]
    assert list(labels.values("topic", min_confidence=0.5)) == ["(unlabelled)", "law", "(unlabelled)"]
    assert labels.source["matched"] == 2 and labels.source["unknown_ids"] == 1
    pd.DataFrame({"id": [1, 2], "topic": ["x", "y"]}).to_csv(tmp_path / "n.csv", index=False)
    assert list(labels_from_file(tmp_path / "n.csv", [2, 1]).values("topic")) == ["y", "x"]  # ids as read from CSV vs the index
    for frame, match in (
        (pd.DataFrame({"doc": ["a"], "topic": ["x"]}), "no 'id' column"),
        (pd.DataFrame({"id": ["q"], "topic": ["x"]}), "none of the 1 ids"),
        (pd.DataFrame({"id": ["a", "a"], "topic": ["x", "y"]}), "more than once"),
    ):
        frame.to_csv(tmp_path / "bad.csv", index=False)
        with pytest.raises(UserError, match=match):
            labels_from_file(tmp_path / "bad.csv", ["a", "b"])


def test_labels_attach_to_an_index_and_are_checked(tmp_path):
    from _build_child import build, corpus

    from headwater.index import Index

    build(tmp_path / "idx")
    index = Index(tmp_path / "idx")
    records = [dict(r, topic=TOPICS[i % 4]) for i, r in enumerate(corpus())]
    labels = labels_from_columns(records, ["topic"])
    attach_labels(index, labels)
    again = load_labels(Index(tmp_path / "idx"))
    assert list(again.values("topic")) == [TOPICS[i % 4] for i in range(len(records))]
    assert Index(tmp_path / "idx").manifest["labels"]["columns"] == ["topic"]
    table = pd.read_parquet(tmp_path / "idx" / "labels.parquet")
    table.loc[0, "topic"] = "tampered"
    table.to_parquet(tmp_path / "idx" / "labels.parquet")
    with pytest.raises(UserError, match="changed since"):
        load_labels(Index(tmp_path / "idx"))


def test_a_sequence_classifier_labels_records(tmp_path):
    """The classifier adapter on a tiny local model: its labels and confidences equal the model's
    own softmax arg-max, record by record."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from headwater.toy import word_tokenizer

    texts = ["the court ruled today", "paint the wall red", "a new law passed", "the red painting sold"]
    tok = word_tokenizer(texts)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, num_labels=3, id2label={0: "law", 1: "art", 2: "sci"})
    model = GPT2ForSequenceClassification(cfg).eval()
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    labels = classify_records([{"id": i, "text": t} for i, t in enumerate(texts)], str(tmp_path / "clf"), column="topic", batch_size=3)
    for i, t in enumerate(texts):
        with torch.no_grad():
            p = model(**tok(t, return_tensors="pt")).logits.softmax(-1)[0]
        assert labels.table.loc[i, "topic"] == cfg.id2label[int(p.argmax())]
        assert labels.table.loc[i, "topic_confidence"] == pytest.approx(float(p.max()), rel=1e-5)
    with pytest.raises(UserError, match="cannot load the classifier"):
        classify_records([{"text": "x"}], str(tmp_path / "missing"))


def test_a_gradient_space_contrast_is_the_difference_of_mean_dot_products():
    """Dot products are linear in the query gradient, so scoring with mean(A) − mean(B) gradients
    gives each record exactly its A score minus its B score."""
    import _build_child as child

    from headwater import Dot

    model, task, records = child.setup()
    labels = Labels(pd.DataFrame({"id": list(range(len(records))), "topic": [TOPICS[i % 4] for i in range(len(records))]}))
    benches = {"A": child.QUERIES[:2], "B": child.QUERIES[2:]}
    cmap = corpus_map(Dot(model, task).fit(records), benches, labels, BinsConfig(bootstrap=10, min_bin_size=1), gradient_contrasts=[("A", "B")])
    assert cmap.benchmarks == ["A", "B", "A−B"]
    x = cmap.record_scores.astype(np.float64)
    np.testing.assert_allclose(x[:, 2], x[:, 0] - x[:, 1], rtol=1e-4, atol=1e-6 * np.abs(x).max())
    with pytest.raises(UserError, match="not one of"):
        corpus_map(Dot(model, task).fit(records), benches, labels, BinsConfig(bootstrap=10), gradient_contrasts=[("A", "C")])
    with pytest.raises(UserError, match="given twice"):
        corpus_map(Dot(model, task).fit(records), benches, labels, BinsConfig(bootstrap=10), gradient_contrasts=[("A", "B"), ("A", "B")])
    # TrackStar mixes the queries into its preconditioner: the contrast row must not change A's and B's scores.
    plain = corpus_map(hw.TrackStar(model, task).fit(records), benches, labels, BinsConfig(bootstrap=10, min_bin_size=1))
    mixed = corpus_map(
        hw.TrackStar(model, task).fit(records), benches, labels, BinsConfig(bootstrap=10, min_bin_size=1), gradient_contrasts=[("A", "B")]
    )
    scale = np.abs(plain.record_scores).max()  # float32 matmuls of 4 vs 5 query rows round differently
    np.testing.assert_allclose(mixed.record_scores[:, :2], plain.record_scores, rtol=0, atol=2e-4 * scale)


def test_corpus_totals_are_post_stratified_over_the_manifests_strata(tmp_path):
    """Strata sampled at different rates: a topic's corpus total is the sum over its strata of
    stratum size × stratum mean, not the topic's size × its pooled sample mean."""
    n = 100
    labels = Labels(pd.DataFrame({"id": np.arange(n), "topic": ["a"] * n, "format": ["x"] * 50 + ["y"] * 50}))
    x = np.r_[np.zeros(50), np.full(50, 10.0)]  # 50 sampled of 9000 (x) and of 1000 (y)
    pd.DataFrame({"topic": ["a", "a"], "format": ["x", "y"], "size": [9000, 1000]}).to_csv(tmp_path / "m.csv", index=False)
    cfg = BinsConfig(by=["topic", "format"], bootstrap=10, min_bin_size=1, corpus_sizes=str(tmp_path / "m.csv"), examples=0)
    t = corpus_map(Given(x[:, None]).fit(None), {"A": [{"id": 0}]}, labels, cfg).table.set_index(["view", "bin"])
    assert t.loc[("topic", "a"), "total"] == pytest.approx(9000 * 0 + 1000 * 10)
    assert t.loc[("format", "y"), "total"] == pytest.approx(10000)
    # A manifest of the topic alone cannot split it: the format and joint views get no total.
    pd.DataFrame({"topic": ["a"], "size": [10000]}).to_csv(tmp_path / "t.csv", index=False)
    t = corpus_map(Given(x[:, None]).fit(None), {"A": [{"id": 0}]}, labels, BinsConfig(**{**cfg.to_dict(), "corpus_sizes": str(tmp_path / "t.csv")}))
    t = t.table.set_index(["view", "bin"])
    assert t.loc[("topic", "a"), "total"] == pytest.approx(10000 * 5.0) and np.isnan(t.loc[("format", "x"), "total"])


def test_numeric_labels_and_the_joint_separator():
    labels = Labels(pd.DataFrame({"id": [0, 1, 2], "level": [3.0, np.nan, 5.0], "topic": ["a × b", "c", "c"]}))
    assert list(labels.values("level")) == ["3", "(unlabelled)", "5"]  # an integer column with a gap reads as floats
    with pytest.raises(UserError, match="names joint bins"):
        labels.values("topic")


def test_sharded_stores_split_their_blocks_between_ranks(tmp_path):
    """Each rank of a distributed corpus map reads only its blocks: together exactly all rows."""
    from _build_child import build

    from headwater import GradientStore

    build(tmp_path / "idx")
    store = GradientStore(tmp_path / "idx", block_rows=5)
    every = np.concatenate([b.ids for b in store.blocks()])
    parts = []
    for rank in range(3):
        store.shard = (rank, 3)
        parts.append(np.concatenate([b.ids for b in store.blocks()]))
    store.shard = None
    assert sum(len(p) for p in parts) == len(every) and all(len(p) < len(every) for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)[:, 0]), np.sort(every[:, 0]))


def test_label_ids_are_read_as_text_and_bad_settings_are_refused(tmp_path):
    pd.DataFrame({"id": ["01", "02", "10"], "topic": ["a", "b", "c"]}).to_csv(tmp_path / "z.csv", index=False)
    assert list(labels_from_file(tmp_path / "z.csv", ["01", "02", "10"]).values("topic")) == ["a", "b", "c"]  # "01" is not 1
    pd.DataFrame({"doc": ["a", "b"], "id": [1, 2], "topic": ["x", "y"]}).to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(UserError, match="besides --id-column"):
        labels_from_file(tmp_path / "two.csv", ["a", "b"], id_column="doc")
    for kwargs, flag in (
        ({"bootstrap": 0}, "--bootstrap"),
        ({"enrichment_k": -3}, "--enrichment-k"),
        ({"fdr": 5}, "--fdr"),
        ({"by": ["t", "t"]}, "twice"),
    ):
        with pytest.raises(UserError, match=flag):
            BinsConfig(**kwargs)
