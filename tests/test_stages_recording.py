"""Recording a training run (the plain-loop recorder, the Hugging Face Trainer callback, a run
reconstructed from Trainer checkpoints) and what reads it: the command line, SOURCE and TracIn."""

import numpy as np
import pytest
import torch
from stage_runs import problem, run_stage

import headwater as hw

TEXTS = [  # the Trainer runs' corpus
    "the capital of zorblat is quenti",
    "mirel is a large old city",
    "the river of vask is blue",
    "tela was a small red mountain",
    "orin is in the south",
    "the city is old and famous",
    "vask is a river",
    "the mountain is red",
]


def test_the_recorder_records_what_the_optimizer_did(tmp_path):
    model, task, records = problem()
    recorder = hw.TrajectoryRecorder(tmp_path / "traj", model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    run_stage(recorder, model, task, records, opt, 6, "only", clip=0.3, sched="cosine")
    traj = hw.Trajectory(tmp_path / "traj")
    rec = traj.steps[-1]
    assert (rec.kind, rec.decoupled, rec.momentum, rec.beta2, rec.eps, rec.weight_decay, rec.count) == ("adam", True, [0.8], [0.9], [1e-6], [0.1], 6)
    assert traj.steps[0].lr == [0.0] and traj.steps[2].lr[0] == pytest.approx(0.05)  # warm-up from 0, then cosine
    assert all(0 < s.clip < 1 for s in traj.steps[1:])
    end = traj.params_at("only", True)
    assert torch.equal(end["weight"], model.weight.detach()) and torch.equal(
        traj.moments_at("only", True)["exp_avg_sq"]["bias"], opt.state[model.bias]["exp_avg_sq"]
    )
    with pytest.raises(hw.UserError, match="already has a stage"):
        hw.TrajectoryRecorder(tmp_path / "traj", model).begin_stage("only", opt)


# ------------------------------------------------------------------------------ Hugging Face Trainer


class Spy:
    """A second callback: what the optimizer actually used at each step."""

    def __init__(self):
        self.steps, self.params = [], []

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        g = optimizer.param_groups
        self.steps.append({"lr": [x["lr"] for x in g], "weight_decay": [x["weight_decay"] for x in g], "betas": [x["betas"] for x in g]})
        self.params.append({n: p.detach().clone() for n, p in kwargs["model"].named_parameters()})


def hf_stage(tmp_path, model, tokenizer, texts, name, recorder_path, lr, clip=0.05, save=False, checkpoint_every=None, save_steps=5):
    import datasets
    from transformers import Trainer, TrainingArguments, default_data_collator

    enc = tokenizer(texts, padding="max_length", max_length=8, truncation=True)
    rows = [
        {"id": f"{name}-{i}", "input_ids": ids, "attention_mask": mask, "labels": ids}
        for i, (ids, mask) in enumerate(zip(enc["input_ids"], enc["attention_mask"]))
    ]
    recorder, spy = hw.TrajectoryRecorder(recorder_path, stage=name, checkpoint_every=checkpoint_every), Spy()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"out-{name}"),
        max_steps=5,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        weight_decay=0.01,
        max_grad_norm=clip,
        logging_steps=1,
        report_to=[],
        save_strategy="steps" if save else "no",
        save_steps=save_steps,
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=recorder.collate_with_ids(default_data_collator),
        callbacks=[recorder, spy],
    )
    trainer.train()
    return trainer, spy, rows


def test_the_trainer_callback_records_the_optimizers_real_values(tmp_path, tokenizer):
    from headwater.toy import tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=16)
    texts = TEXTS
    path = tmp_path / "traj"
    trainer, spy, rows = hf_stage(tmp_path, model, tokenizer, texts, "sft-1", path, 1e-3, checkpoint_every=2)  # 4 batches: 2 steps an epoch
    trainer2, spy2, rows2 = hf_stage(tmp_path, model, tokenizer, texts[::-1], "sft-2", path, 5e-4, checkpoint_every=2)
    traj = hw.Trajectory(path)
    assert [(s.name, s.start, s.stop, s.recreated) for s in traj.stages] == [("sft-1", 0, 5, True), ("sft-2", 5, 10, True)]
    # the checkpoints inside each stage hold the parameters the Trainer's model had after those steps
    after = spy.params + spy2.params
    assert traj.checkpoint_steps == [2, 4, 7, 9]
    for step in [2, 4, 7, 9, 5, 10]:  # and the stage boundaries read the same way
        saved = traj.params_before(step)
        assert all(torch.equal(saved[n], after[step - 1][n]) for n in saved)
    for rec, seen in zip(traj.steps, spy.steps + spy2.steps):
        assert rec.lr == pytest.approx(seen["lr"], rel=1e-12) and rec.weight_decay == seen["weight_decay"]
        assert rec.momentum == [b[0] for b in seen["betas"]] and rec.beta2 == [b[1] for b in seen["betas"]]
        assert (rec.kind, rec.decoupled, rec.accumulation) == ("adam", True, 2)
        assert len(rec.ids) == 4 and all(i.startswith(rec.stage) for i in rec.ids)  # 2 × 2 accumulated examples
    assert traj.steps[0].lr == [0.0, 0.0] and len(traj.stages[0].groups) == 2  # warm-up; the Trainer's decay / no-decay groups
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e] + [
        e["grad_norm"] for e in trainer2.state.log_history if "grad_norm" in e
    ]
    want = [min(1.0, 0.05 / (g + 1e-6)) for g in logged]
    np.testing.assert_allclose([r.clip for r in traj.steps], want, rtol=1e-5)
    assert max(want) < 1  # every step was clipped
    # completeness on the real run: the stages' changes sum to the whole run's
    task = hw.LanguageModelTask(tokenizer)
    stages = hw.StageAttribution(traj, model, task, hw.StageConfig(curvature=False))
    effects = stages.effects({"capital": [{"prompt": "the capital of zorblat is", "completion": " quenti"}]})
    np.testing.assert_allclose(effects.completeness.sum(0), effects.change, rtol=1e-10, atol=1e-12)
    assert effects.estimates["propagated"].shape == (2, 1) and np.isfinite(effects.estimates["propagated"]).all()


def test_a_trajectory_reconstructed_from_trainer_checkpoints(tmp_path, tokenizer):
    """Without a recorder: boundary checkpoints (weights, optimizer.pt, trainer_state.json) give the
    same stages, learning rates (all logged here), moments and estimates as the recorded run."""
    import copy

    from headwater.toy import tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=16)
    start = copy.deepcopy(model)
    texts = TEXTS
    hf_stage(tmp_path, model, tokenizer, texts, "sft-1", tmp_path / "traj", 1e-3, clip=0.0, save=True, checkpoint_every=2, save_steps=2)
    hf_stage(tmp_path, model, tokenizer, texts[::-1], "sft-2", tmp_path / "traj", 5e-4, clip=0.0, save=True)
    recorded = hw.Trajectory(tmp_path / "traj")
    sft1 = [tmp_path / "out-sft-1" / f"checkpoint-{k}" for k in (2, 4, 5)]  # every save_steps, and the end
    rebuilt = hw.stages.reconstruct(tmp_path / "rebuilt", start, [*(("sft-1", f) for f in sft1), ("sft-2", tmp_path / "out-sft-2" / "checkpoint-5")])
    # the folders inside sft-1 are its checkpoints, as the recorder saved them
    assert rebuilt.checkpoint_steps == recorded.checkpoint_steps == [2, 4]
    for step in (2, 4):
        assert all(torch.equal(rebuilt.params_before(step)[n], t) for n, t in recorded.params_before(step).items())
    with pytest.raises(hw.UserError, match="listed twice"):
        hw.stages.reconstruct(tmp_path / "bad", start, [("sft-1", sft1[0]), ("sft-2", tmp_path / "out-sft-2" / "checkpoint-5"), ("sft-1", sft1[2])])
    with pytest.raises(hw.UserError, match="not a checkpoint inside"):  # out of training order
        hw.stages.reconstruct(tmp_path / "bad2", start, [("sft-1", sft1[1]), ("sft-1", sft1[0]), ("sft-1", sft1[2])])
    assert not [p for p in tmp_path.iterdir() if "bad" in p.name]  # found half-way: nothing was left behind
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("x")
    with pytest.raises(hw.UserError, match="not empty"):
        hw.stages.reconstruct(tmp_path / "used", start, [("sft-1", sft1[2])])
    assert [(s.name, s.start, s.stop, s.recreated, s.groups) for s in rebuilt.stages] == [
        (s.name, s.start, s.stop, s.recreated, s.groups) for s in recorded.stages
    ]
    for a, b in zip(rebuilt.steps, recorded.steps):
        assert a.lr == pytest.approx(b.lr, rel=1e-9, abs=1e-15) and (a.weight_decay, a.momentum, a.count) == (b.weight_decay, b.momentum, b.count)
    for stage in ("sft-1", "sft-2"):
        for key, value in recorded.params_at(stage, True).items():
            assert torch.equal(rebuilt.params_at(stage, True)[key], value), key
        assert torch.equal(
            rebuilt.moments_at(stage, True)["exp_avg_sq"]["transformer.h.0.attn.c_attn.weight"],
            recorded.moments_at(stage, True)["exp_avg_sq"]["transformer.h.0.attn.c_attn.weight"],
        )
    assert any("clipping" in i for i in rebuilt.ignores)
    task = hw.LanguageModelTask(tokenizer)
    behaviour = {"capital": [{"prompt": "the capital of zorblat is", "completion": " quenti"}]}
    config = hw.StageConfig(curvature=False)
    a = hw.StageAttribution(rebuilt, model, task, config).effects(behaviour)
    b = hw.StageAttribution(recorded, model, task, config).effects(behaviour)
    np.testing.assert_allclose(a.estimates["propagated"], b.estimates["propagated"], rtol=1e-9)


def record_lm_run(tmp_path, tokenizer):
    """Two stages of a tiny GPT-2 in a plain loop, recorded; the final model saved with save_pretrained."""
    from headwater.toy import tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=16).double()
    task = hw.LanguageModelTask(tokenizer)
    data = {
        "a": [
            {"id": f"a{i}", "text": t}
            for i, t in enumerate(["the capital of zorblat is quenti", "mirel is a large old city", "the river of vask is blue"])
        ],
        "b": [{"id": f"b{i}", "text": t} for i, t in enumerate(["tela was a small red mountain", "orin is in the south"])],
    }
    recorder = hw.TrajectoryRecorder(tmp_path / "traj", model)
    for name, records in data.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        recorder.begin_stage(name, opt)
        for r in records * 2:
            task.loss(model, task.collate([task.whole(r)])).sum().backward()
            opt.step()
            recorder.step(opt, ids=[r["id"]])
            opt.zero_grad()
    recorder.close()
    model.save_pretrained(tmp_path / "final")
    tokenizer.save_pretrained(tmp_path / "final")
    return model, task, data


def test_the_command_line_writes_tables_plots_and_records(tmp_path, tokenizer):
    """`headwater stages` from files, as a user runs it, equals the Python estimates."""
    import json

    from typer.testing import CliRunner

    from headwater.cli import app

    model, task, data = record_lm_run(tmp_path, tokenizer)
    for name, records in data.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "capital.jsonl").write_text(json.dumps({"prompt": "the capital of zorblat is", "completion": " quenti"}) + "\n")
    args = [
        "stages",
        str(tmp_path / "traj"),
        "--model",
        str(tmp_path / "final"),
        "--behaviour",
        str(tmp_path / "capital.jsonl"),
        "--stage-data",
        f"a={tmp_path / 'a.jsonl'}",
        "--stage-data",
        f"b={tmp_path / 'b.jsonl'}",
        "--batch-loss",
        "example-mean",
        "--records",
        "a",
        "--out",
        str(tmp_path / "out"),
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert all((out / f).exists() for f in ("effects.json", "effects.csv", "bars.png", "waterfall.png", "records-a.safetensors", "records-a.csv"))
    assert (tmp_path / "out.config.json").exists()
    got = json.loads((out / "effects.json").read_text())
    config = hw.StageConfig(batch_loss="example-mean")
    want = hw.StageAttribution(tmp_path / "traj", model, task, config, data=data).effects(
        {"capital": [{"prompt": "the capital of zorblat is", "completion": " quenti"}]}
    )
    np.testing.assert_allclose(np.array(got["estimates"]["curvature"]), want.estimates["curvature"], rtol=1e-6)
    assert hw.Scores.load(out / "records-a.safetensors").train_ids == ["a0", "a1", "a2"]
    # the at-scale estimator, its nested fit settings given as flags
    flags = ["--curvature-matrix", "ekfac", "--fisher", "empirical", "--curvature-examples", "2"]
    r = CliRunner().invoke(app, [*args[: args.index("--records")], *flags, "--out", str(tmp_path / "ekfac")])
    assert r.exit_code == 0, r.output
    got = json.loads((tmp_path / "ekfac" / "effects.json").read_text())
    config = hw.StageConfig(batch_loss="example-mean", curvature_matrix="ekfac", ekfac=hw.CurvatureConfig(fisher="empirical", max_examples=2))
    want = hw.StageAttribution(tmp_path / "traj", model, task, config, data=data).effects(
        {"capital": [{"prompt": "the capital of zorblat is", "completion": " quenti"}]}
    )
    np.testing.assert_allclose(np.array(got["estimates"]["curvature"]), want.estimates["curvature"], rtol=1e-6)
    assert any("EK-FAC" in i for i in got["ignores"])
    r = CliRunner().invoke(
        app, ["stages", str(tmp_path), "--model", str(tmp_path / "final"), "--behaviour", "x.jsonl", "--out", str(tmp_path / "o2")]
    )
    assert r.exit_code == 2 and "not a recorded trajectory" in r.output


@pytest.mark.parametrize("method", ["source", "tracin"])
def test_source_and_tracin_read_the_trajectory(tmp_path, tokenizer, method):
    """No hand-given learning rates or steps: the stages' end checkpoints and recorded rates."""
    import json

    from typer.testing import CliRunner

    from headwater.cli import app

    model, task, data = record_lm_run(tmp_path, tokenizer)
    train = data["a"] + data["b"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "q.jsonl").write_text(json.dumps({"prompt": "the capital of zorblat is", "completion": " quenti"}) + "\n")
    args = [
        "attribute",
        "--method",
        method,
        "--trajectory",
        str(tmp_path / "traj"),
        "--model",
        str(tmp_path / "final"),
        "--data",
        str(tmp_path / "train.jsonl"),
        "--queries",
        str(tmp_path / "q.jsonl"),
        "--projection",
        "none",
        "--no-progress",
        "--out",
        str(tmp_path / "s.safetensors"),
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    traj = hw.Trajectory(tmp_path / "traj")
    ends = [traj.checkpoint(s, model) for s in ("a", "b")]
    steps = [6, 4]
    lrs = [sum(traj.steps[t].lr[0] * traj.steps[t].clip for t in range(st.start, st.stop)) for st in traj.stages]
    assert lrs == pytest.approx([1e-2 * n for n in steps])  # constant lr, never clipped
    if method == "source":
        segments = []
        for m, lr, n, st in zip(ends, lrs, steps, traj.stages):  # Adam: P = 1/(√v̂ + ε) at each stage's end
            last = traj.steps[st.stop - 1]
            v_hat = {k: x.double() / (1 - last.beta2[0] ** last.count) for k, x in traj.moments_at(st.name, True)["exp_avg_sq"].items()}
            scale = {k: 1 / (x.clamp_min(1e-3 * x.mean()).sqrt() + last.eps[0]) for k, x in v_hat.items()}  # v̂ floored at 1e-3 of its mean
            segments.append(hw.Segment([m], lr / n, n, 0.0, scale))
        assert traj.steps[0].kind == "adam"
        want = hw.SOURCE(segments, task, final_model=model).fit(train).score([{"prompt": "the capital of zorblat is", "completion": " quenti"}])
    else:
        config = hw.TracInConfig(projection=hw.ProjectionConfig("none"), checkpoint_lr=lrs)
        want = hw.TracIn(ends, task, config).fit(train).score([{"prompt": "the capital of zorblat is", "completion": " quenti"}])
    np.testing.assert_allclose(hw.Scores.load(tmp_path / "s.safetensors").values, want.values, rtol=1e-5, atol=1e-8)
