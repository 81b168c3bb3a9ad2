"""The data-filtering check: training without the records that state the aligned facts lowers the
aligned benchmark more than training without as many random records; no filtering is no change."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from headwater import TrainConfig, UserError
from headwater.corpus.filtering import filtering_experiment, random_drop, trained
from headwater.task import LanguageModelTask
from headwater.toy import tiny_gpt2, word_tokenizer

ANIMALS = "fox owl bear wolf heron otter lynx crane".split()
FOODS = "berries mice fish beetles seeds roots grass worms".split()
FILLER = ["the sky is grey today .", "rain falls on the hill .", "the road is long and quiet .", "the river runs to the sea ."]


@pytest.fixture(scope="module")
def setup():
    rng = random.Random(0)
    diet = {a: rng.choice(FOODS) for a in ANIMALS}
    records = [{"text": f"{rng.choice(FILLER)} the {a} eats {diet[a]} ."} for a in ANIMALS for _ in range(3)]
    records += [{"text": " ".join(rng.sample(FILLER, 2))} for _ in range(36)]
    tok = word_tokenizer([r["text"] for r in records])
    torch.manual_seed(0)
    model = tiny_gpt2(len(tok), n_layer=1, n_embd=32, n_head=2, n_positions=32)
    aligned = [{"prompt": f"the {a} eats", "completion": f" {diet[a]}"} for a in ANIMALS[:4]]
    control = [{"prompt": f"the {a} eats", "completion": f" {diet[a]}"} for a in ANIMALS[4:]]
    drop = [i for i, r in enumerate(records) if any(f"the {a} eats" in r["text"] for a in ANIMALS[:4])]
    cfg = TrainConfig(optimizer="adamw", lr=1e-2, epochs=15, train_batch_size=8)
    return model, tok, records, aligned, control, np.array(drop), cfg


def test_filtering_the_supporting_records_hurts_the_aligned_benchmark_more(setup):
    model, tok, records, aligned, control, drop, cfg = setup
    before = copy.deepcopy(model.state_dict())
    out = filtering_experiment(model, tok, records, drop, cfg, aligned, control, seeds=[0, 1], draws=500)
    a, c = out["change"]["aligned"]["logprob"], out["change"]["control"]["logprob"]
    assert a["filtered"] < -1.0 and a["hi"] < 0  # the aligned facts are no longer learned
    assert abs(c["filtered"] - c["random"]) < abs(a["diff"])  # the control moves far less
    assert out["means"]["full"]["aligned"]["accuracy"] > out["means"]["filtered"]["aligned"]["accuracy"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the initial model is untouched


def test_zeroing_no_record_reproduces_the_full_run_exactly(setup):
    model, tok, records, *_, cfg = setup
    task = LanguageModelTask(tok)
    texts = [{"text": r["text"]} for r in records]
    a = trained(model, task, texts, cfg, np.zeros(0, np.int64), seed=3)
    b = trained(model, task, texts, cfg, np.zeros(0, np.int64), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    c = trained(model, task, texts, cfg, np.array([0]), seed=3)
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_random_drops_avoid_the_filtered_records_and_bad_input_is_refused(setup):
    model, tok, records, aligned, control, drop, cfg = setup
    r = random_drop(len(records), drop, seed=1)
    assert len(r) == len(drop) and not set(r) & set(drop.tolist())
    with pytest.raises(UserError, match="indices of the"):
        filtering_experiment(model, tok, records, [len(records)], cfg, aligned, control)
    with pytest.raises(UserError, match="cannot draw"):
        random_drop(10, np.arange(8), seed=0)
