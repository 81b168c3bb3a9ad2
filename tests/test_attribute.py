"""`headwater attribute` runs every method from model paths or indexes and writes Scores equal to
the Python API's; its saved config replays it; `evaluate` reads Scores files end to end."""

import json
import os
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from reference import run_cli

import headwater as hw
from headwater.cli import main
from headwater.models import load_model
from headwater.toy import tiny_gpt2, word_tokenizer

TRAIN = [
    {"text": t} for t in ["ana lives in oslo .", "ben lives in lima .", "cleo eats figs in rome .", "dara eats rice in oslo .", "eli went to lima ."]
]
QUERIES = [{"prompt": "ana lives in", "completion": " oslo"}, {"prompt": "ben lives in", "completion": " lima"}]


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


def run(ws, *args, code=0):
    return run_cli(ws, *args, code=code)


def load(ws, name):
    model, tok = load_model(str(ws / name))
    return model, hw.LanguageModelTask(tok)


COMMON = ("--data", "train.jsonl", "--queries", "q.jsonl", "--no-progress")


def check(ws, out, want: hw.Scores, method):
    got = hw.Scores.load(ws / out)
    assert got.method == method and got.train_ids == list(range(len(TRAIN))) and got.query_ids == [0, 1]
    np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-7 * np.abs(want.values).max())
    return got


@pytest.mark.parametrize("method", ["dot", "cosine", "trackstar", "ekfac", "kfac"])
def test_gradient_and_influence_methods(ws, method):
    run(ws, "attribute", "--method", method, "--model", "model", *COMMON, "--projection-dim", "16", "--out", f"{method}.safetensors")
    model, task = load(ws, "model")
    cls = hw.METHODS[method]
    config = cls.config_class()
    if hasattr(config, "projection"):
        config.projection = hw.ProjectionConfig(dim=16)
    check(ws, f"{method}.safetensors", cls(model, task, config).fit(TRAIN).score(QUERIES), method)


def test_trak_ensemble_with_top_k_and_replay(ws):
    run(
        ws,
        "attribute",
        "--method",
        "trak",
        "--model",
        "model",
        "--ensemble",
        "other",
        *COMMON,
        "--projection-dim",
        "64",
        "--out",
        "trak.safetensors",
        "--top-k",
        "2",
    )
    (m, task), (o, _) = load(ws, "model"), load(ws, "other")
    want = hw.TRAK([m, o], task, hw.TRAKConfig(projection=hw.ProjectionConfig(dim=64))).fit(TRAIN).score(QUERIES)
    got = check(ws, "trak.safetensors", want, "trak")
    assert got.measurement["name"] == "log-odds" and got.config["projection"]["dim"] == 64
    top = pd.read_csv(ws / "trak.csv")
    assert len(top) == 2 * len(QUERIES) and set(top["query_id"]) == {0, 1}
    saved = json.loads((ws / "trak.safetensors.config.json").read_text())
    assert saved["AttributeConfig"]["ensemble"] == ["other"] and saved["TRAKConfig"]["projection"]["dim"] == 64
    run(ws, "attribute", "--config", "trak.safetensors.config.json", "--out", "again.safetensors", "--no-progress")  # replays it
    np.testing.assert_array_equal(hw.Scores.load(ws / "again.safetensors").values, got.values)


def test_tracin_over_checkpoints(ws):
    run(
        ws,
        "attribute",
        "--method",
        "tracin",
        "--checkpoint",
        "checkpoint-2",
        "--checkpoint",
        "checkpoint-5",
        "--checkpoint-lr",
        "0.01",
        "--checkpoint-lr",
        "0.005",
        *COMMON,
        "--projection",
        "none",
        "--out",
        "tracin.safetensors",
    )
    (c2, task), (c5, _) = load(ws, "checkpoint-2"), load(ws, "checkpoint-5")
    config = hw.TracInConfig(projection=hw.ProjectionConfig("none"), checkpoint_lr=[0.01, 0.005])
    check(ws, "tracin.safetensors", hw.TracIn([c2, c5], task, config).fit(TRAIN).score(QUERIES), "tracin")


def test_source_from_trainer_state(ws):
    run(
        ws,
        "attribute",
        "--method",
        "source",
        "--model",
        "checkpoint-5",
        "--checkpoint",
        "checkpoint-2",
        "--checkpoint",
        "checkpoint-5",
        "--trainer-state",
        "trainer_state.json",
        *COMMON,
        "--out",
        "source.safetensors",
    )
    (final, task), (c2, _) = load(ws, "checkpoint-5"), load(ws, "checkpoint-2")
    segments = [hw.Segment([c2], 1e-2, 2), hw.Segment([final], 5e-3, 3)]
    check(ws, "source.safetensors", hw.SOURCE(segments, task, final_model=final).fit(TRAIN).score(QUERIES), "source")


def test_source_reads_adam_second_moments_saved_in_checkpoints(ws, tmp_path):
    """A Trainer checkpoint folder's optimizer.pt (torch AdamW's own state after real steps) gives
    SOURCE Adam's step scale 1/(√(v/(1−β2ᵗ)) + ε) per parameter, in step order."""
    import shutil

    want_scales = {}
    for name, steps in (("checkpoint-5", 3), ("checkpoint-2", 2)):  # given out of step order
        shutil.copytree(ws / name, tmp_path / name)
        model, task = load(ws, name)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
        for _ in range(steps):
            opt.zero_grad()
            task.loss(model, task.collate([task.whole(r) for r in TRAIN])).sum().backward()
            opt.step()
        torch.save(opt.state_dict(), tmp_path / name / "optimizer.pt")
        state = {n: opt.state[p]["exp_avg_sq"] for n, p in model.named_parameters()}
        v_hat = {n: v.double() / (1 - 0.95**steps) for n, v in state.items()}
        want_scales[name] = {n: 1 / (v.clamp_min(1e-3 * v.mean()).sqrt() + 1e-6) for n, v in v_hat.items()}  # floored at 1e-3 of the mean
    for f in ("train.jsonl", "q.jsonl", "trainer_state.json"):
        shutil.copy(ws / f, tmp_path / f)
    args = ("--checkpoint", "checkpoint-5", "--checkpoint", "checkpoint-2", "--trainer-state", "trainer_state.json", *COMMON)
    run(tmp_path, "attribute", "--method", "source", "--model", "checkpoint-5", *args, "--out", "source.safetensors")
    (final, task), (c2, _) = load(ws, "checkpoint-5"), load(ws, "checkpoint-2")
    segments = [
        hw.Segment([c2], 1e-2, 2, adam_scale=want_scales["checkpoint-2"]),
        hw.Segment([final], 5e-3, 3, adam_scale=want_scales["checkpoint-5"]),
    ]
    got = check(tmp_path, "source.safetensors", hw.SOURCE(segments, task, final_model=final).fit(TRAIN).score(QUERIES), "source")
    plain = hw.SOURCE([hw.Segment([c2], 1e-2, 2), hw.Segment([final], 5e-3, 3)], task, final_model=final).fit(TRAIN).score(QUERIES)
    assert not np.allclose(got.values, plain.values, rtol=1e-2)  # the second moments changed the propagation


def test_magic_replays_the_recipe_and_keeps_its_smoothness_check(ws, capsys, monkeypatch):
    """Through `main()`, as `python -m headwater` runs it: warnings are one line each, and the
    saved scores keep MAGIC's smoothness check."""
    args = ["attribute", "--method", "magic", "--init-model", "model", "--lr", "0.01", "--epochs", "2", "--train-batch-size", "2"]
    monkeypatch.setattr(sys, "argv", ["headwater", *args, *COMMON, "--out", "magic.safetensors"])
    monkeypatch.chdir(ws)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # main() sets its own; restored after
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exited:
        warnings.simplefilter("always")
        # printed as outside pytest (which records warnings instead), through the formatter main() installs
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line)
        )
        main()
    assert exited.value.code == 0
    m, task = load(ws, "model")
    config = hw.MagicConfig(run=hw.TrainConfig("adamw", lr=0.01, epochs=2, train_batch_size=2))
    with pytest.warns(UserWarning, match="eager"):
        want = hw.MAGIC(m, task, config).fit(TRAIN).score(QUERIES)
    got = check(ws, "magic.safetensors", want, "magic")
    assert got.diagnostics["smoothness"] == pytest.approx(want.diagnostics["smoothness"], rel=1e-4)
    captured = capsys.readouterr()
    assert f"smoothness check passed: metagradient {want.diagnostics['smoothness']['predicted']:.4g}" in captured.out, captured.out
    err = captured.err.splitlines()
    ours = [line for line in err if line.startswith("headwater: warning: ")]
    expected = 1 + (want.diagnostics["smoothness"]["relative_error"] > 0.1)  # attention switched to eager; the check
    assert len(ours) == expected, err
    assert not [line for line in err if f"{os.sep}headwater{os.sep}" in line], err  # no file:line, no source line


def test_bm25(ws):
    run(ws, "attribute", "--method", "bm25", *COMMON, "--out", "bm25.safetensors")
    got = check(ws, "bm25.safetensors", hw.BM25().fit(TRAIN).score(QUERIES), "bm25")
    assert got.values[0, 0] > 0 and got.values[2, 0] == 0  # "ana lives in oslo" shares words with query 0


def test_bad_input_is_one_line(ws):
    for args, needle in [
        (("--method", "source", "--model", "model"), "checkpoints"),
        (("--method", "magic"), "--init-model"),
        (("--method", "cosine", "--model", "model", "--measurement", "loss", "--projection-dim", "-3"), "projection-dim"),
    ]:
        r = run(ws, "attribute", *args, *COMMON, "--out", "x.safetensors", code=2)
        assert "Traceback" not in r.stderr and needle in r.stderr.strip().splitlines()[-1], r.stderr
    assert not (ws / "x.safetensors").exists()


def test_token_index_scores_are_per_record_and_evaluate_end_to_end(ws):
    """A token-unit index: attribute pools its rows to records, so `evaluate lds --train builtin`
    (which retrains on records) gets record-level scores, equal to the Python path."""
    run(ws, "build", "tokidx", "--model", "model", "--data", "train.jsonl", "--unit", "token", "--projection-dim", "16", "--no-progress")
    run(ws, "attribute", "--method", "cosine", "--index", "tokidx", "--queries", "q.jsonl", "--no-progress", "--out", "tok.safetensors")
    scores = hw.Scores.load(ws / "tok.safetensors")
    assert scores.values.shape == (len(TRAIN), len(QUERIES))
    assert hw.Index(ws / "tokidx").store.rows > 2 * len(TRAIN)  # many rows per record, pooled
    lds = ("evaluate", "lds", "--train", "builtin", "--init-model", "model", "--data", "train.jsonl", "--queries", "q.jsonl")
    r = run(
        ws,
        *lds,
        "--scores",
        "tok.safetensors",
        "--lr",
        "0.01",
        "--train-batch-size",
        "2",
        "--subsets",
        "6",
        "--retrain-seeds",
        "2",
        "--out",
        "lds.json",
    )
    got = json.loads((ws / "lds.json").read_text())
    masks = hw.subset_masks(len(TRAIN), 6, 0.5, 0)
    fn = hw.RetrainLM(str(ws / "model"), str(ws / "train.jsonl"), str(ws / "q.jsonl"), hw.TrainConfig(lr=0.01, train_batch_size=2))
    outcomes = hw.retrain_outcomes(fn, masks, [0, 1], progress=False)
    assert got["methods"]["tok"] == pytest.approx(hw.lds(scores, masks, outcomes.mean(0))[0])
    assert "seed ceiling" in r.stdout
    # a per-row matrix of another size is refused before any retraining
    rows = hw.Scores(np.zeros((7, 2), np.float32), list(range(7)), [0, 1])
    rows.save(ws / "rows.safetensors")
    r = run(ws, *lds, "--scores", "rows.safetensors", code=2)
    assert "pooled to records" in r.stderr


def test_evaluate_leave_k_out_and_tail_patch(ws):
    run(ws, "attribute", "--method", "dot", "--model", "model", *COMMON, "--projection", "none", "--out", "t.safetensors")
    scores = hw.Scores.load(ws / "t.safetensors")
    # leave-k-out with a user function: an exactly linear datamodel over the 5 training records
    tau = np.array([0.5, -0.2, 0.3, 0.0, -0.4])
    np.save(ws / "tau.npy", tau)
    (ws / "kout.py").write_text(
        f"import numpy as np\nTAU = np.load({str(ws / 'tau.npy')!r})\ndef train(mask, seed):\n    return np.array([-(mask * TAU).sum()] * 2)\n"
    )
    r = run(ws, "evaluate", "leave-k-out", "--scores", "t.safetensors", "--k", "2", "--train", "kout:train")
    fn = lambda mask, seed: np.array([-(mask * tau).sum()] * 2)
    want = hw.leave_k_out(scores, 2, fn, [0, 1], 0)
    assert f"removing the top 2: {want['top_k_removed']:+.4f}" in r.stdout
    r = run(
        ws,
        "evaluate",
        "tail-patch",
        "--scores",
        "t.safetensors",
        "--model",
        "model",
        "--data",
        "train.jsonl",
        "--queries",
        "q.jsonl",
        "--k",
        "2",
        "--patch-lr",
        "0.01",
    )
    m, task = load(ws, "model")
    want = hw.tail_patch(m, task, TRAIN, QUERIES, scores, 2, 0.01, 0)
    assert f"top 2 {want['top_k']:+.5f}, random {want['random']:+.5f}" in r.stdout
