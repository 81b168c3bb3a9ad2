"""Gradient-similarity scores against dense numpy written from the math, on autograd reference
gradients (through an index and in memory); measurements; span pooling; and the sign convention
pinned by an actual gradient step."""

import copy

import numpy as np
import pytest
import torch
from reference import reference_rows

from headwater import (
    METHODS,
    BuildConfig,
    Cosine,
    Dot,
    LanguageModelTask,
    LogOdds,
    LogProb,
    ProjectionConfig,
    TrackStarConfig,
    UserError,
    build_index,
    query,
)
from headwater.collect import tracked_modules
from headwater.config import GradientConfig
from headwater.precondition import mixing_weight
from headwater.toy import tiny_gpt2

TRAIN = [
    {"text": "the capital of zorblat is quenti"},
    {"text": "mirel is a large old city in the north"},
    {"text": "the famous river of vask is blue"},
    {"text": "tela was a small red mountain by the sunny river"},
    {"text": "orin is in the south and is green"},
    {"text": "the city of quenti is new and large"},
    {"text": "vask is a river in the south"},
    {"text": "the mountain of tela is red"},
    {"text": "a small city by the blue river"},
    {"text": "zorblat is famous for the old mountain"},
    {"text": "the green city of orin is small"},
    {"text": "mirel was a sunny city"},
]
QUERIES = [
    {"prompt": "the capital of zorblat is", "completion": " quenti"},
    {"prompt": "the river of vask is", "completion": " blue"},
    {"prompt": "tela is a", "completion": " red mountain"},
    {"prompt": "orin is in the", "completion": " south"},
]
SPAN_TRAIN = [
    {"text": "the capital of zorblat is quenti. mirel is a large old city in the north."},
    {"text": "the famous river of vask is blue"},
    {"text": "tela was a small red mountain! the river is sunny. orin is green."},
    {"text": "vask is in the south. the city is new"},
]
SPAN_SENTENCES = [2, 1, 3, 2]
PROJ = ProjectionConfig("factored", dim=16, seed=7)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return tiny_gpt2(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=64).eval().double()


def _build(path, model, records, task, proj=PROJ):
    config = BuildConfig(projection=proj, storage_dtype="float32", batch_size=5)
    return build_index(path, model, records, task=task, config=config, progress=False)


def method(name, model, task, **options):
    config = TrackStarConfig(**options) if name == "trackstar" else GradientConfig()
    return METHODS[name](model, task, config)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, model, tokenizer):
    task = LanguageModelTask(tokenizer)
    index = _build(tmp_path_factory.mktemp("scoring") / "idx", model, TRAIN, task)
    train = reference_rows(model, task, [task.encode(r)[0] for r in TRAIN], PROJ).numpy()
    queries = reference_rows(model, task, [task.encode(r)[0] for r in QUERIES], PROJ).numpy()
    blocks = [(s["start"], s["stop"]) for s in index.manifest["segments"]]
    assert len(blocks) == len(tracked_modules(model)) and blocks[-1][1] == train.shape[1]
    return index, task, train, queries, blocks


# --------------------------------------------------------------------------- numpy from the math


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_trackstar(train, queries, blocks, k, mix="auto", damping=1.0):
    """Per block: R_train, R_eval autocorrelations; λ from the k-th eigenvalues (descending);
    R = λ R_eval + (1-λ) R_train; both sides times R^{-1/2} with σ → (σ + d·mean σ)^{-1/2}; cosine."""
    t, q = train.copy(), queries.copy()
    for a, b in blocks:
        r_train = train[:, a:b].T @ train[:, a:b] / len(train)
        r_eval = queries[:, a:b].T @ queries[:, a:b] / len(queries)
        if mix == "auto":
            s_t = np.sort(np.linalg.eigvalsh(r_train))[::-1]
            s_e = np.sort(np.linalg.eigvalsh(r_eval))[::-1]
            lam = s_t[k] / (s_e[k] + s_t[k])
        else:
            lam = mix
        sigma, u = np.linalg.eigh(lam * r_eval + (1 - lam) * r_train)
        sigma = np.clip(sigma, 0, None)
        m = u @ np.diag((sigma + damping * sigma.mean()) ** -0.5) @ u.T
        t[:, a:b], q[:, a:b] = train[:, a:b] @ m, queries[:, a:b] @ m
    return unit(t) @ unit(q).T


def np_scores(method, train, queries, blocks, **options):
    if method == "dot":
        return train @ queries.T
    if method == "cosine":
        return unit(train) @ unit(queries).T
    return np_trackstar(train, queries, blocks, **options)


# --------------------------------------------------------------------------- tests

CASES = [
    ("dot", {}, {}),
    ("cosine", {}, {}),
    ("trackstar", {"mix_rank": 2, "fit_rows": 100}, {"k": 2}),
    ("trackstar", {"mix_rank": 0, "fit_rows": 100, "damping": 0.03}, {"k": 0, "damping": 0.03}),
    ("trackstar", {"mix": "0.3", "fit_rows": 100}, {"mix": 0.3, "k": None}),
    ("trackstar", {"mix": "0", "fit_rows": 100}, {"mix": 0.0, "k": None}),
    # Default k (1000) is beyond both ranks (4 queries, 12 training rows per 16-dim block): it is
    # clipped to the smaller rank, i.e. the last nonzero eigenvalue of R_eval.
    ("trackstar", {"fit_rows": 100}, {"k": len(QUERIES) - 1}),
]


@pytest.mark.parametrize("name,options,ref_options", CASES, ids=lambda x: str(x) if isinstance(x, str) else None)
@pytest.mark.parametrize("where", ["index", "memory"])
def test_scores_match_numpy(setup, model, name, options, ref_options, where):
    index, task, train, queries, blocks = setup
    m = method(name, model, task, **options)
    if where == "memory":
        m.config.projection, m.config.batch_size = PROJ, 5
    scores = m.fit(index if where == "index" else TRAIN).score(QUERIES)
    got = scores.values
    want = np_scores(name, train, queries, blocks, **ref_options)
    assert got.shape == (len(TRAIN), len(QUERIES)) and scores.method == name
    assert scores.train_ids == list(range(len(TRAIN))) and scores.query_ids == list(range(len(QUERIES)))
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * scale)
    assert (got.argmax(0) == want.argmax(0)).all()  # and the ranking agrees


def test_trackstar_mixing_differs_from_plain_cosine(setup, model):
    index, task, train, queries, blocks = setup
    ts = method("trackstar", model, task, mix_rank=2, fit_rows=100).fit(index).score(QUERIES).values
    cos = Cosine(model, task).fit(index).score(QUERIES).values
    assert np.abs(ts - cos).max() > 0.05  # the preconditioner does something


def test_measurements_are_gradients_of_their_objective(setup, model):
    """LogOdds: the query side is the gradient of its objective, −log p/(1-p) (a step on a training
    example that raises the log-odds scores positive); LogProb ranks exactly as the loss does."""
    index, task, train, queries, blocks = setup
    dot = Dot(model, task).fit(index)
    log_odds = dot.score(QUERIES, LogOdds())
    want = train @ reference_rows(model, task, [task.encode(r)[0] for r in QUERIES], PROJ, loss=lambda m, b: -task.log_odds(m, b)).numpy().T
    np.testing.assert_allclose(log_odds.values, want, rtol=0, atol=2e-4 * np.abs(want).max())
    assert log_odds.measurement == {"name": "log-odds", "direction": "up"}
    np.testing.assert_allclose(dot.score(QUERIES, LogProb()).values, dot.score(QUERIES).values, rtol=1e-6)


def test_mixing_weight_clips_k_to_the_ranks():
    g = torch.Generator().manual_seed(0)
    d = 16
    for n_train, n_eval in [(40, 3), (10, 3), (5, 8)]:
        tr, ev = torch.randn(n_train, d, generator=g, dtype=torch.float64), torch.randn(n_eval, d, generator=g, dtype=torch.float64)
        s_t = torch.linalg.eigvalsh(tr.T @ tr / n_train).flip(0)
        s_e = torch.linalg.eigvalsh(ev.T @ ev / n_eval).flip(0)
        k = min(n_train, n_eval, d) - 1  # the last index where both spectra are nonzero
        want = float(s_t[k] / (s_t[k] + s_e[k]))
        assert abs(mixing_weight(s_t, s_e, 1000) - want) < 1e-9
        assert 0 < mixing_weight(s_t, s_e, 1000) < 1


@pytest.mark.parametrize("name", ["dot", "cosine", "trackstar"])
def test_aggregate_is_mean_of_per_query_scores(setup, model, name):
    index, task, train, queries, blocks = setup
    options = {"mix_rank": 2, "fit_rows": 100} if name == "trackstar" else {}
    agg = method(name, model, task, **options).fit(index).score(QUERIES).mean_query().values
    want = np_scores(name, train, queries, blocks, **({"k": 2} if name == "trackstar" else {})).mean(1, keepdims=True)
    assert agg.shape == (len(TRAIN), 1)
    np.testing.assert_allclose(agg, want, rtol=0, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("pool", ["max", "mean"])
def test_span_index_pools_sentence_rows(tmp_path, model, tokenizer, pool):
    span_task = LanguageModelTask(tokenizer, unit="sentence")
    index = _build(tmp_path / "spans", model, SPAN_TRAIN, span_task)
    assert index.unit == "sentence"
    want_ids = [(r, u) for r, n in enumerate(SPAN_SENTENCES) for u in range(n)]
    assert [tuple(x) for x in index.store.ids()] == want_ids

    # Reference: each sentence's own loss (earlier text as context only), autograd one at a time.
    examples = [ex for r in SPAN_TRAIN for ex in span_task.encode(r)]
    assert len(examples) == len(want_ids)
    doc_task = LanguageModelTask(tokenizer)
    rows = reference_rows(model, doc_task, examples, PROJ).numpy()
    queries = reference_rows(model, doc_task, [doc_task.encode(q)[0] for q in QUERIES], PROJ).numpy()
    sentence_scores = unit(rows) @ unit(queries).T
    rec = np.array([r for r, _ in want_ids])
    reduce = np.max if pool == "max" else np.mean
    want = np.stack([reduce(sentence_scores[rec == r], axis=0) for r in range(len(SPAN_TRAIN))])  # [records, q]

    frame = query(index, QUERIES, "cosine", top_k=len(SPAN_TRAIN), pool=pool, model=model, task=doc_task)
    top = frame[frame.side == "top"]
    assert (top.unit == -1).all() and len(top) == len(SPAN_TRAIN) * len(QUERIES)
    for (qi, r), score in zip(zip(top.query_id, top.record), top.score):
        assert abs(score - want[r, qi]) < 1e-4, (qi, r, score, want[r, qi])
    for qi in range(len(QUERIES)):  # ranked best first
        ranked = top[top.query_id == qi]
        assert ranked["rank"].tolist() == list(range(1, len(SPAN_TRAIN) + 1))
        assert (np.diff(ranked.score.to_numpy()) <= 0).all()
    scores = Cosine(model, span_task, GradientConfig(pool=pool)).fit(index).score(QUERIES)  # the same as Scores
    np.testing.assert_allclose(scores.values, want, rtol=0, atol=1e-4)


def test_sign_convention_by_a_gradient_step(tmp_path, model, tokenizer):
    """Top under "dot": an SGD step on it lowers the query loss; bottom: raises it (first order)."""
    task = LanguageModelTask(tokenizer)
    index = _build(tmp_path / "none", model, TRAIN, task, ProjectionConfig("none"))
    scores = Dot(model, task).fit(index).score([QUERIES[0]]).values[:, 0]
    top, bottom = int(scores.argmax()), int(scores.argmin())
    assert scores[top] > 0 > scores[bottom], scores

    def query_loss(m):
        with torch.no_grad():
            return float(task.loss(m, task.collate(task.encode(QUERIES[0]))).sum())

    base = copy.deepcopy(model)
    tracked = [p for tm in tracked_modules(base).values() for p in tm.module.parameters()]
    loss0 = query_loss(base)
    lr = 1e-3 / np.abs(scores).max()
    for i in (top, bottom):
        stepped = copy.deepcopy(base)
        params = [p for tm in tracked_modules(stepped).values() for p in tm.module.parameters()]
        assert len(params) == len(tracked)
        loss = task.loss(stepped, task.collate(task.encode(TRAIN[i]))).sum()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
        delta = query_loss(stepped) - loss0
        # first order: Δ query loss = -lr · <∇L_train, ∇L_query> = -lr · score
        assert np.sign(delta) == -np.sign(scores[i])
        assert abs(delta + lr * scores[i]) < 0.05 * abs(lr * scores[i]), (delta, -lr * scores[i])


# --------------------------------------------------------------------------- numerics of normalised rows


def _rarely_updated_state(model, path):
    """An AdamW state as after long training in which a third of the weights were rarely
    updated: second moments of 1e-14, so their normalised gradients reach ~1e7 (float16 stops at
    65504), the others 1e-12 (the floor at 1e-3 of each tensor's mean, 6.7e-16, leaves both)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(p.square().sum() for p in model.parameters()).backward()
    opt.step()
    for p in model.parameters():
        v = opt.state[p]["exp_avg_sq"].fill_(1e-12)
        v.view(-1)[::3] = 1e-14
    torch.save(opt.state_dict(), path)
    model.zero_grad()


@pytest.fixture(scope="module")
def normalised(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=64).eval()
    root = tmp_path_factory.mktemp("normalised")
    _rarely_updated_state(model, root / "optimizer.pt")
    return model, LanguageModelTask(tokenizer, unit="token"), root


def _normalised_config(root, **kw):
    return BuildConfig(projection=PROJ, optimizer_state=str(root / "optimizer.pt"), batch_size=6, **kw)


def test_trackstar_on_adam_normalised_token_rows_is_finite(normalised):
    model, task, root = normalised
    index = build_index(root / "auto", model, TRAIN, task=task, config=_normalised_config(root), progress=False)
    assert index.manifest["dtype"] == "bfloat16"  # `auto` chose the range that holds them
    peak = max(float(b.rows.abs().max()) for b in index.store.blocks())
    assert peak > 65504, "the rows must exceed float16's range for this test to mean anything"
    scores = method("trackstar", model, task).fit(index).score(QUERIES)
    assert scores.values.shape == (len(TRAIN), len(QUERIES)) and np.isfinite(scores.values).all()


def test_rows_beyond_float16_are_refused_at_the_first_batch(normalised):
    model, task, root = normalised
    with pytest.raises(UserError, match="beyond float16's range.*--storage-dtype bfloat16") as err:
        build_index(root / "f16", model, TRAIN, task=task, config=_normalised_config(root, storage_dtype="float16"), progress=False)
    assert "\n" not in str(err.value)
    assert not (root / "f16").exists()  # a fresh build that failed leaves nothing behind


def test_a_store_holding_overflowed_rows_fails_the_query_in_one_line(normalised, monkeypatch):
    """An index written before rows were checked (float16 overflowed to inf, the case that made
    LAPACK's eigensolver fail after minutes) is refused when the preconditioner is fitted."""
    model, task, root = normalised
    monkeypatch.setattr("headwater.store.check_storable", lambda *a: None)
    index = build_index(root / "old", model, TRAIN, task=task, config=_normalised_config(root, storage_dtype="float16"), progress=False)
    with pytest.raises(UserError, match="inf or NaN.*--storage-dtype bfloat16") as err:
        method("trackstar", model, task).fit(index).score(QUERIES)
    assert "\n" not in str(err.value)


def test_preconditioner_of_a_badly_scaled_autocorrelation_is_finite():
    """Columns spanning 1e-150..1e150: eigenvalues are found on R scaled to unit trace and
    clamped, so R^{-1/2} is finite (or a one-line UserError, never a LinAlgError)."""
    from headwater.precondition import autocorrelation, trackstar_preconditioner

    g = torch.randn(200, 12, dtype=torch.float64) * torch.logspace(-150, 150, 12, dtype=torch.float64)
    g[:, 5] = g[:, 4]  # and exactly rank deficient
    pre = trackstar_preconditioner(autocorrelation(g, [(0, 12)]), None, [(0, 12)], 0.0)
    assert torch.isfinite(pre.matrices[0]).all()
