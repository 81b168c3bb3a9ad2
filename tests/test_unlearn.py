"""Targeted unlearning as a causal check of a bin's attribution, on a tiny GPT-2 that learned two bins of facts."""

import json

import numpy as np
import pytest
import torch

from headwater.config import TrainConfig
from headwater.corpus.unlearn import UnlearnConfig, benchmark, item_scores, matched_random_set, paired_bootstrap, top_set, unlearning_experiment
from headwater.errors import UserError
from headwater.task import LanguageModelTask
from headwater.toy import tiny_gpt2, word_tokenizer
from headwater.training import Replay

N_ANIMALS, N_ROBOTS, ASKED = 32, 32, 8
TAILS = ["", " it is big .", " it is small and very old .", " it is fast and green and sleeps all day ."]


def animal_record(i: int) -> dict:
    return {"text": f"the beast{i} eats food{i} ." + TAILS[i % len(TAILS)]}


def robot_record(i: int) -> dict:  # the same template outside the bin: the retain term keeps it, so forgetting is specific
    return {"text": f"the robot{i} eats fuel{i} ." + TAILS[(i + 1) % len(TAILS)]}


@pytest.fixture(scope="module")
def world():
    """A model that has learned both bins: animals (records 0..31) and robots (32..63)."""
    records = [animal_record(i) for i in range(N_ANIMALS)] + [robot_record(i) for i in range(N_ROBOTS)]
    tokenizer = word_tokenizer([r["text"] for r in records])
    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer), n_layer=1, n_embd=64, n_head=2, n_positions=32).eval()
    run = TrainConfig(optimizer="adamw", lr=1e-2, epochs=120, train_batch_size=16, data_seed=0)
    replay = Replay(model, LanguageModelTask(tokenizer), records, run)
    replay.load(replay.train())
    return model, tokenizer, records


def aligned_items(asked):
    return [{"prompt": f"the beast{i} eats", "completion": f" food{i}"} for i in asked]


def control_items():
    return [{"prompt": f"the robot{i} eats", "completion": f" fuel{i}"} for i in range(N_ROBOTS)]


def reference_item(model, tokenizer, item):
    """(gold log-prob, correct) of one item, by hand from the logits of each prompt + completion."""

    def score(completion):
        p = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        positions = range(len(p), len(p) + len(c))
        total = sum(float(logp[t - 1, ids[0, t]]) for t in positions)
        return total, all(int(logp[t - 1].argmax()) == int(ids[0, t]) for t in positions)

    if "choices" not in item:
        return score(item["completion"])
    sums = [score(c)[0] for c in item["choices"]]
    return sums[item["answer"]], int(np.argmax(sums)) == item["answer"]


def test_item_scores_are_the_hand_computed_gold_logprobs_and_accuracy(world):
    model, tokenizer, _ = world
    items = aligned_items(range(6)) + [
        {"prompt": f"the beast{i} eats", "choices": [f" food{(i + k) % N_ANIMALS}" for k in range(4)], "answer": a}
        for i, a in [(0, 0), (1, 2), (5, 1), (9, 0), (20, 3)]
    ]
    items.append({"prompt": "the robot3 eats", "completion": " fuel3 . it is fast and green"})  # several tokens, probably not all greedy
    logprob, correct = item_scores(model, LanguageModelTask(tokenizer), benchmark(LanguageModelTask(tokenizer), items, "x"), batch_size=4)
    ref = [reference_item(model, tokenizer, item) for item in items]
    np.testing.assert_allclose(logprob, [r[0] for r in ref], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, [float(r[1]) for r in ref])
    assert 0 < correct.sum() < len(items)  # both outcomes are exercised


@pytest.mark.parametrize("objective,optimizer,lr", [("ascent", "adamw", 3e-3), ("npo", "adamw", 3e-3), ("npo", "sgd", 1e-2)])
def test_forgetting_the_top_records_hurts_the_aligned_benchmark_more_than_random_ones(world, objective, optimizer, lr):
    model, tokenizer, records = world
    before = {k: v.clone() for k, v in model.state_dict().items()}
    asked = [1, 4, 6, 9, 14, 19, 23, 30]  # what the aligned benchmark asks about: the planted top records
    scores = np.random.default_rng(0).normal(size=len(records))
    scores[asked] += 10
    members = np.arange(N_ANIMALS)
    config = UnlearnConfig(
        forget=ASKED, steps=16, lr=lr, train_batch_size=8, retain=32, seeds=[0, 1, 2], bootstrap=1000, objective=objective, optimizer=optimizer
    )
    result = unlearning_experiment(model, tokenizer, records, members, scores, aligned_items(asked), control_items(), config)

    json.dumps(result)  # JSON-able as promised
    assert sorted(result["sets"]["top"]) == asked
    effect = result["effect"]["logprob"]
    assert effect["did"] < 0 and effect["hi"] < 0, effect
    assert effect["lo"] <= effect["did"] <= effect["hi"]
    drop = result["aligned_drop"]["logprob"]
    assert drop["top"] < drop["random"] and drop["hi"] < 0
    assert result["before"]["aligned"]["accuracy"] == 1.0  # the base model knew every asked fact
    top_runs = [r for r in result["runs"] if r["arm"] == "top"]
    assert len(top_runs) == 3 and all(r["aligned"]["logprob"] < result["before"]["aligned"]["logprob"] for r in top_runs)
    # the difference-in-differences is the mean changes' arithmetic
    d = lambda arm, b: np.mean([r[b]["logprob"] for r in result["runs"] if r["arm"] == arm]) - result["before"][b]["logprob"]
    did = (d("top", "aligned") - d("random", "aligned")) - (d("top", "control") - d("random", "control"))
    assert effect["did"] == pytest.approx(did, abs=1e-9)

    # random sets: inside the bin, disjoint from the top set (the bin has 32 >= 2 x 8), token-matched
    top = set(result["sets"]["top"])
    for r in result["sets"]["random"]:
        assert len(set(r)) == ASKED and set(r) <= set(members) and not set(r) & top
    assert len({tuple(sorted(r)) for r in result["sets"]["random"]}) == 3  # each seed draws its own
    for tokens in result["tokens"]["random"]:
        assert abs(tokens - result["tokens"]["top"]) <= 2
    assert not set(result["sets"]["retain"]) & set(members)

    # the model passed in is untouched
    after = model.state_dict()
    assert not model.training
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("zero", [{"lr": 0.0}, {"steps": 0}])
def test_without_optimisation_nothing_changes(world, zero):
    model, tokenizer, records = world
    scores = np.arange(len(records), dtype=float)
    config = UnlearnConfig(forget=4, train_batch_size=4, retain=8, seeds=[0, 1], bootstrap=50, objective="npo", **{"steps": 2, **zero})
    control = [{"prompt": f"the robot{i} eats", "choices": [" fuel1", " fuel2"], "answer": i - 1} for i in (1, 2)]  # multiple choice
    model.train()  # and the mode it came in is the mode it leaves in
    try:
        result = unlearning_experiment(model, tokenizer, records, np.arange(N_ANIMALS), scores, aligned_items(range(3)), control, config)
        assert model.training
    finally:
        model.eval()
    assert result["before"]["control"]["accuracy"] == 1.0
    for run in result["runs"]:
        assert {k: run[k] for k in result["before"]} == result["before"]
    for table in ("effect", "aligned_drop", "control_drop"):
        for metric in ("logprob", "accuracy"):
            assert set(result[table][metric].values()) == {0.0}
    assert result["retain_ppl_change"] == {"top": 0.0, "random": 0.0}
    assert any("2 seed" in note for note in result["notes"])


def test_random_sets_match_the_top_sets_tokens_even_when_the_top_records_are_long():
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 400, size=500)
    members = np.arange(100, 400)
    scores = tokens + rng.normal(0, 150, size=500)  # the attribution favours long records
    top = top_set(members, scores, 20)
    assert set(top) == set(members[np.argsort(-scores[members])[:20]])
    pool = np.setdiff1d(members, top)
    for seed in range(5):
        chosen = matched_random_set(pool, tokens, int(tokens[top].sum()), 20, seed)
        assert len(set(chosen)) == 20 and set(chosen) <= set(pool)
        assert abs(tokens[chosen].sum() - tokens[top].sum()) <= 0.01 * tokens[top].sum()
    unmatched = [tokens[np.random.default_rng(s).choice(pool, 20, replace=False)].sum() for s in range(5)]
    assert np.mean(unmatched) < 0.85 * tokens[top].sum()  # a plain draw would be far shorter


def test_a_small_bin_samples_from_all_of_it_and_says_so(world):
    model, tokenizer, records = world
    config = UnlearnConfig(forget=3, steps=1, lr=0.0, train_batch_size=3, retain=4, seeds=[0], bootstrap=20)
    result = unlearning_experiment(
        model, tokenizer, records, [0, 1, 2, 3, 4], np.zeros(len(records)), aligned_items([0]), control_items()[:1], config
    )
    assert all(set(r) <= {0, 1, 2, 3, 4} for r in result["sets"]["random"])
    assert any("overlap the top set" in note for note in result["notes"])


def test_bad_inputs_are_one_line_user_errors(world):
    model, tokenizer, records = world

    def run(members=None, scores=None, aligned=None):
        members = np.arange(N_ANIMALS) if members is None else members
        scores = np.zeros(len(records)) if scores is None else scores
        aligned = aligned_items([0]) if aligned is None else aligned
        unlearning_experiment(model, tokenizer, records, members, scores, aligned, control_items()[:2], UnlearnConfig(forget=4))

    cases = [
        (lambda: run(members=np.array([0, 1, 2])), "the bin has 3 records, fewer than the 4 to forget"),
        (lambda: run(aligned=[]), "the aligned benchmark is empty"),
        (lambda: UnlearnConfig(forget=0), "--forget must be at least 1, got 0"),
        (lambda: run(scores=np.zeros(10)), "scores has 10 values for 64 records"),
        (lambda: run(aligned=[{"prompt": "the beast0 eats", "choices": [" food0", " food1"], "answer": 2}]), "answer must index its 2 choices"),
        (lambda: run(aligned=[{"prompt": "the beast0 eats"}]), "aligned item 0 needs a prompt and a completion"),
        (lambda: run(aligned=[{"prompt": "the beast0 eats", "choices": [" food0", " food1"]}]), "answer must index its 2 choices, got None"),
        (lambda: run(members=np.array([0, 1, 2, 3, 99])), r"members must be record indices in \[0, 64\)"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_paired_bootstrap_interval_covers_the_true_difference():
    """Per-item effects shared by the seeds plus small run noise: the interval covers the truth ~95% of the time."""
    rng = np.random.default_rng(0)
    S, n_a, n_c, truth_a, truth_c = 3, 60, 40, -0.5, 0.2
    hits = 0
    for rep in range(200):
        aligned = truth_a + rng.normal(size=n_a)[None] + 0.1 * rng.normal(size=(S, n_a))
        control = truth_c + rng.normal(size=n_c)[None] + 0.1 * rng.normal(size=(S, n_c))
        lo, hi = paired_bootstrap(aligned, control, draws=500, confidence=0.95, seed=rep)
        hits += lo <= truth_a - truth_c <= hi
    assert 0.88 <= hits / 200 <= 0.99
    same = np.full((3, 10), 0.25)  # no variation: a degenerate interval at the value
    assert paired_bootstrap(same, draws=50) == pytest.approx((0.25, 0.25))
