"""`headwater attribute` (TRAK, SOURCE, MAGIC from model paths) equals the Python methods."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from headwater.methods.magic import TrainingRun, magic_scores
from headwater.methods.source import Segment, source_scores
from headwater.methods.trak import trak_scores
from headwater.projection import ProjectionConfig
from headwater.task import LanguageModelTask
from headwater.toy import tiny_gpt2, word_tokenizer

TRAIN = [{"text": t} for t in ["ana lives in oslo .", "ben lives in lima .", "cleo eats figs in rome .", "dara eats rice in oslo .", "eli went to lima ."]]
QUERIES = [{"prompt": "ana lives in", "completion": " oslo"}, {"prompt": "ben lives in", "completion": " lima"}]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("attribute")
    tok = word_tokenizer([r["text"] for r in TRAIN] + ["ana lives in oslo ben lima"], max_length=32)
    for i, name in enumerate(["model", "other", "checkpoint-2", "checkpoint-5"]):
        torch.manual_seed(i)
        m = tiny_gpt2(len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=32)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    (root / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QUERIES))
    state = {"log_history": [{"step": s, "learning_rate": lr} for s, lr in [(1, 1e-2), (2, 1e-2), (3, 5e-3), (4, 5e-3), (5, 5e-3)]]}
    (root / "trainer_state.json").write_text(json.dumps(state))
    return root


def cli(ws, *args):
    r = subprocess.run([sys.executable, "-m", "headwater", "attribute", *map(str, args)], cwd=ws, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def load(path):
    from headwater.build import load_model

    return load_model(str(path))


def test_trak_ensemble(ws):
    cli(ws, "--method", "trak", "--model", "model", "--ensemble", "other", "--data", "train.jsonl", "--queries", "q.jsonl",
        "--projection-dim", "64", "--out", "trak.npy", "--top-k", "2")
    (m, tok), (o, _) = load(ws / "model"), load(ws / "other")
    want = trak_scores([m, o], LanguageModelTask(tok), TRAIN, QUERIES, ProjectionConfig("factored", 64, 0))
    np.testing.assert_allclose(np.load(ws / "trak.npy"), want, rtol=1e-5, atol=1e-8)
    top = pd.read_csv(ws / "trak.csv")
    assert len(top) == 2 * len(QUERIES) and set(top["query_id"]) == {0, 1}


def test_source_from_trainer_state(ws):
    cli(ws, "--method", "source", "--model", "checkpoint-5", "--checkpoint", "checkpoint-2", "--checkpoint", "checkpoint-5",
        "--trainer-state", "trainer_state.json", "--data", "train.jsonl", "--queries", "q.jsonl", "--out", "source.npy")
    (final, tok), (c2, _) = load(ws / "checkpoint-5"), load(ws / "checkpoint-2")
    segments = [Segment([c2], 1e-2, 2), Segment([final], 5e-3, 3)]
    want = source_scores(final, LanguageModelTask(tok), TRAIN, QUERIES, segments)
    np.testing.assert_allclose(np.load(ws / "source.npy"), want, rtol=1e-5, atol=1e-8)


def test_magic_replays_the_recipe(ws):
    cli(ws, "--method", "magic", "--model", "model", "--lr", "0.01", "--epochs", "2", "--batch-size", "2", "--optimizer", "adamw",
        "--data", "train.jsonl", "--queries", "q.jsonl", "--out", "magic.npy", "--mean-query")
    m, tok = load(ws / "model")
    task = LanguageModelTask(tok)
    batches = [task.collate(task.encode(q)) for q in QUERIES]
    mean_loss = lambda mod: sum(task.per_example_loss(mod, b).sum() for b in batches) / len(batches)
    with pytest.warns(UserWarning, match="eager"):
        want = magic_scores(m, task, TRAIN, TrainingRun("adamw", 0.01, 2, 2), mean_loss)
    got = np.load(ws / "magic.npy")
    assert got.shape == (len(TRAIN), 1)
    np.testing.assert_allclose(got[:, 0], want, rtol=1e-5, atol=1e-8)


def test_bad_input_is_one_line(ws):
    r = subprocess.run([sys.executable, "-m", "headwater", "attribute", "--method", "source", "--model", "model", "--data", "train.jsonl",
                        "--queries", "q.jsonl", "--out", "x.npy"], cwd=ws, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "checkpoints" in r.stderr.strip().splitlines()[-1]


def test_evaluate_lds_with_the_builtin_trainer(ws):
    """`evaluate lds --train builtin` retrains the LM recipe on each subset; equal to the Python path."""
    from headwater.evaluate import RetrainLM, lds, retrain_losses, subset_masks

    cli(ws, "--method", "magic", "--model", "model", "--lr", "0.01", "--epochs", "1", "--batch-size", "2",
        "--data", "train.jsonl", "--queries", "q.jsonl", "--out", "m.npy")
    r = subprocess.run([sys.executable, "-m", "headwater", "evaluate", "lds", "--scores", "m.npy", "--train", "builtin",
                        "--model", "model", "--data", "train.jsonl", "--targets", "q.jsonl", "--lr", "0.01", "--epochs", "1",
                        "--batch-size", "2", "--subsets", "6", "--seeds", "2", "--out", "lds.json"],
                       cwd=ws, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads((ws / "lds.json").read_text())
    masks = subset_masks(len(TRAIN), 6, 0.5, 0)
    fn = RetrainLM(str(ws / "model"), str(ws / "train.jsonl"), str(ws / "q.jsonl"), TrainingRun("adamw", 0.01, 1, 2))
    losses = retrain_losses(fn, masks, [0, 1], progress=False)
    assert got["methods"]["m"] == pytest.approx(lds(np.load(ws / "m.npy"), masks, losses.mean(0))[0])


def test_evaluate_leave_k_out_and_tail_patch(ws):
    from headwater.build import load_model
    from headwater.evaluate import leave_k_out, tail_patch

    cli(ws, "--method", "trak", "--model", "model", "--data", "train.jsonl", "--queries", "q.jsonl", "--projection-dim", "64", "--out", "t.npy")
    scores = np.load(ws / "t.npy")
    # leave-k-out with a user function: an exactly linear datamodel over the 5 training examples
    tau = np.array([0.5, -0.2, 0.3, 0.0, -0.4])
    np.save(ws / "tau.npy", tau)
    (ws / "kout.py").write_text(f"import numpy as np\nTAU = np.load({str(ws / 'tau.npy')!r})\n"
                                "def train(mask, seed):\n    return np.array([-(mask * TAU).sum()])\n")
    r = subprocess.run([sys.executable, "-m", "headwater", "evaluate", "leave-k-out", "--scores", "t.npy", "--k", "2", "--train", "kout:train"],
                       cwd=ws, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    fn = lambda mask, seed: np.array([-(mask * tau).sum()])
    want = leave_k_out(scores.mean(1), 2, fn, [0, 1], 0)
    assert f"removing the top 2: {want['top_k_removed']:+.4f}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "headwater", "evaluate", "tail-patch", "--scores", "t.npy", "--model", "model", "--data", "train.jsonl",
                        "--queries", "q.jsonl", "--k", "2", "--lr", "0.01"], cwd=ws, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m, tok = load_model(str(ws / "model"))
    want = tail_patch(m, LanguageModelTask(tok), TRAIN, QUERIES, scores, 2, 0.01, 0)
    assert f"top 2 {want['top_k']:+.5f}, random {want['random']:+.5f}" in r.stdout
