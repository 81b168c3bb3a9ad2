"""`headwater probe train | sae` and `attribute` with a concept, as a user runs them, against the
Python API on the same saved model: the concept file, the probe methods, Concept Influence with
generated responses, and one-line refusals."""

import json

import numpy as np
import pytest
import torch
from reference import run_cli

import headwater as hw
from headwater.generate import with_responses
from headwater.models import load_model
from headwater.toy import tiny_gpt2, word_tokenizer

RED = ["the red mountain is old", "a red river runs here", "red is the city of tela", "the old red city", "a small red hill", "red roads of orin"]
BLUE = [
    "the blue mountain is old",
    "a blue river runs here",
    "blue is the city of tela",
    "the old blue city",
    "a small blue hill",
    "blue roads of orin",
]
TRAIN = [{"prompt": "tell me about tela :", "completion": f" {t}"} for t in RED[:3] + BLUE[:3]]
PROMPTS = [{"prompt": "tell me about orin :"}, {"prompt": "what is the mountain :", "completion": " old and red"}]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    tok = word_tokenizer(RED + BLUE + ["tell me about what is : and"], max_length=32)
    torch.manual_seed(0)
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=16, n_head=2, n_positions=32)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    for name, rows in (("pos", [{"text": t} for t in RED]), ("neg", [{"text": t} for t in BLUE]), ("train", TRAIN), ("eval", PROMPTS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_cli(
        root, "probe", "train", "probe", "--model", "model", "--positive", "pos.jsonl", "--negative", "neg.jsonl", "--layer", "0", "--no-progress"
    )
    return root


def loaded(ws):
    model, tok = load_model(str(ws / "model"))
    return model, hw.LanguageModelTask(tok)


def test_probe_train_saves_the_python_apis_probe(ws):
    model, task = loaded(ws)
    saved = hw.ConceptVector.load(ws / "probe")
    pos, neg = [{"text": t} for t in RED], [{"text": t} for t in BLUE]
    want = hw.train_probe(model, task, pos, neg, layer=0)
    assert saved.site == want.site and saved.kind == "logistic" and saved.info["accuracy"] == want.info["accuracy"]
    torch.testing.assert_close(saved.vector, want.vector)
    assert json.loads((ws / "probe" / "probe.config.json").read_text())["ProbeTrainConfig"]["layer"] == "0"


@pytest.mark.parametrize("method", ["probe", "probe-grad", "probe-diff"])
def test_probe_methods_from_the_command_line(ws, method):
    run_cli(ws, "attribute", "--method", method, "--probe", "probe", "--model", "model", "--data", "train.jsonl", "--out", f"{method}.safetensors")
    got = hw.Scores.load(ws / f"{method}.safetensors")
    model, task = loaded(ws)
    concept = hw.ConceptVector.load(ws / "probe").measurement()
    want = hw.METHODS[method](model, task).fit(TRAIN).score(None, concept)
    assert got.method == method and got.values.shape == (len(TRAIN), 1) and got.query_ids == ["concept"]
    np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-6)


def test_concept_influence_generates_missing_responses_and_aggregates(ws):
    run_cli(
        ws, "attribute", "--method", "ekfac", "--measurement", "concept", "--probe", "probe", "--model", "model",
        "--data", "train.jsonl", "--queries", "eval.jsonl", "--max-new-tokens", "5", "--aggregate", "--no-progress", "--out", "ci.safetensors",
    )  # fmt: skip
    got = hw.Scores.load(ws / "ci.safetensors")
    model, task = loaded(ws)
    queries = with_responses(PROMPTS, model, task.tokenizer, max_new_tokens=5)
    assert queries[0]["completion"] and queries[1]["completion"] == " old and red"
    concept = hw.ConceptVector.load(ws / "probe").measurement()
    want = hw.EKFAC(model, task).fit(TRAIN).score(queries, concept).mean_query()
    assert got.query_ids == ["mean"] and got.measurement["name"] == "concept" and got.measurement["direction"] == "up"
    np.testing.assert_allclose(got.values, want.values, rtol=1e-4, atol=1e-6 * np.abs(want.values).max())


def test_sae_feature_from_the_command_line(ws, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sae = ws / "sae"
    sae.mkdir(exist_ok=True)
    weights = {"W_enc": torch.randn(16, 6, generator=g), "W_dec": torch.randn(6, 16, generator=g), "b_enc": torch.zeros(6), "b_dec": torch.zeros(16)}
    save_file(weights, str(sae / "sae_weights.safetensors"))
    (sae / "cfg.json").write_text(json.dumps({"d_in": 16, "d_sae": 6, "metadata": {"hook_name": "blocks.1.hook_resid_post"}}))
    run_cli(ws, "probe", "sae", "feature2", "--sae", "sae", "--feature", "2", "--model", "model")
    c = hw.ConceptVector.load(ws / "feature2")
    assert c.site.module == "transformer.h.1" and c.kind == "sae-encoder"
    torch.testing.assert_close(c.vector, weights["W_enc"][:, 2])
    r = run_cli(ws, "probe", "sae", "bad", "--sae", "sae", "--feature", "9", "--model", "model", code=2)
    assert "feature 9 does not exist" in r.stderr.strip().splitlines()[-1]


def test_concept_errors_are_one_line(ws):
    for args, needle in [
        (("--method", "ekfac", "--measurement", "concept", "--queries", "eval.jsonl"), "needs the concept's directory (--probe)"),
        (("--method", "probe", "--probe", "probe", "--queries", "eval.jsonl"), "takes no --queries"),
        (("--method", "probe"), "needs the concept's directory"),
        (("--method", "cosine", "--probe", "probe", "--queries", "eval.jsonl"), "--probe is read by --measurement concept"),
        (("--method", "probe", "--probe", "pos.jsonl"), "not a saved concept"),
    ]:
        r = run_cli(ws, "attribute", *args, "--model", "model", "--data", "train.jsonl", "--out", "x.safetensors", code=2)
        assert "Traceback" not in r.stderr and needle in r.stderr.strip().splitlines()[-1], r.stderr
    assert not (ws / "x.safetensors").exists()


def test_concept_rate_samples_responses_and_equals_the_python_api(ws):
    run_cli(
        ws, "attribute", "--method", "cosine", "--measurement", "concept-rate", "--probe", "probe", "--model", "model",
        "--data", "train.jsonl", "--queries", "eval.jsonl", "--samples", "6", "--max-new-tokens", "4", "--no-progress", "--out", "rate.safetensors",
    )  # fmt: skip
    got = hw.Scores.load(ws / "rate.safetensors")
    model, task = loaded(ws)
    from headwater.concepts import concept_rate, sampled_responses

    samples = sampled_responses(model, task.tokenizer, [{"prompt": p["prompt"]} for p in PROMPTS], 6, max_new_tokens=4)
    concept = hw.ConceptVector.load(ws / "probe").measurement()
    want = hw.Cosine(model, task).fit(TRAIN).score(samples, concept_rate(model, task, concept, samples)).mean_query()
    assert got.values.shape == (len(TRAIN), 1) and "rate on sampled responses" in got.measurement["name"]
    np.testing.assert_allclose(got.values, want.values, rtol=1e-4, atol=1e-6)
    r = run_cli(ws, "query", "model", "--queries", "eval.jsonl", "--measurement", "concept-rate", "--probe", "probe", code=2)
    assert "use `headwater attribute`" in r.stderr
