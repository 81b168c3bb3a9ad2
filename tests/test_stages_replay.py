"""MAGIC on a recorded stage: `StageReplay` reproduces what torch.optim did (float64, to 1e-10),
its metagradient matches finite differences through the same replay, and what it cannot replay is
refused in one line."""

import json

import numpy as np
import pytest
import torch
from stage_runs import make_optimizer, problem, run_stage

import headwater as hw
from headwater.stages.replay import StageReplay


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Four stages of least squares: AdamW (per-group decay, clipped, warm-up + cosine), SGD with
    momentum, the same SGD continued (its buffer inherited, a step schedule), SGD with Nesterov
    momentum (clipped); the trajectory, the model at the end, the task and the records."""
    path = tmp_path_factory.mktemp("replay") / "traj"
    model, task, records = problem()
    recorder = hw.TrajectoryRecorder(path, model)
    run_stage(recorder, model, task, records, make_optimizer("adamw", model), 6, "adamw", clip=0.5, sched="cosine")
    sgd = make_optimizer("momentum", model, lr=0.05)
    run_stage(recorder, model, task, records, sgd, 5, "momentum", seed=1)
    run_stage(recorder, model, task, records, sgd, 5, "continued", sched="step", seed=2)
    run_stage(recorder, model, task, records, make_optimizer("nesterov", model, lr=0.05), 4, "nesterov", clip=0.3, seed=3)
    recorder.close()
    return hw.Trajectory(path), model, task, records


@pytest.mark.parametrize("stage", ["adamw", "momentum", "continued", "nesterov"])
def test_a_stage_replays_as_torch_optim_ran_it(recorded, stage):
    traj, model, task, records = recorded
    assert traj.stage("continued").recreated is False and traj.stage("nesterov").recreated is True
    replay = StageReplay(traj, stage, model, task, records, batch_loss="example-mean")
    got = replay.train()
    for name, want in traj.params_at(stage, True).items():
        torch.testing.assert_close(got[f"p.{name}"], want, rtol=0, atol=1e-10)


def test_magic_on_a_recorded_stage_matches_finite_differences(recorded):
    """−score of a record = d f / d w_record at w = 1, f the query's loss after the replayed stage."""
    traj, model, task, records = recorded
    query = [{"x": torch.ones(4, dtype=torch.float64), "y": torch.tensor(0.5, dtype=torch.float64)}]
    config = hw.MagicConfig(smoothness_check=0, batch_loss="example-mean")
    scores = hw.MAGIC(model, task, config, trajectory=traj, stage="continued").fit(records).score(query)
    replay = StageReplay(traj, "continued", model, task, records, batch_loss="example-mean")
    batch = task.collate([task.whole(query[0])])

    def f(weights):
        return float(task.loss(replay.bind(replay.train(weights)), batch).sum())

    picked = sorted({i for step in replay.schedule for i in step})
    unpicked = sorted(set(range(len(records))) - set(picked))
    eps = 1e-5
    for i in picked[:4]:
        e = torch.zeros(len(records), dtype=torch.float64)
        e[i] = eps
        fd = (f(replay.ones() + e) - f(replay.ones() - e)) / (2 * eps)
        assert -scores.values[i, 0] == pytest.approx(fd, rel=1e-5, abs=1e-9)
    assert unpicked and np.all(scores.values[unpicked] == 0)  # records the stage never saw
    assert abs(scores.values[picked, 0]).max() > 1e-4


def test_what_cannot_be_replayed_is_refused_in_one_line(tmp_path):
    model, task, records = problem()
    recorder = hw.TrajectoryRecorder(tmp_path / "traj", model)
    run_stage(recorder, model, task, records, make_optimizer("adam", model), 3, "adam-l2")
    run_stage(recorder, model, task, records, make_optimizer("sgdw", model), 3, "sgdw")
    run_stage(recorder, model, task, records, make_optimizer("sgd", model), 3, "sgd")
    opt = make_optimizer("sgd", model)
    recorder.begin_stage("no-ids", opt)
    task.loss(model, task.collate([task.whole(records[0])])).mean().backward()
    opt.step()
    recorder.step(opt)
    recorder.close()
    traj = hw.Trajectory(tmp_path / "traj")
    for stage, message in [
        ("adam-l2", "Adam with coupled"),
        ("sgdw", "SGD with decoupled"),
        ("no-ids", "without its batches"),
        ("nowhere", "no stage"),
    ]:
        with pytest.raises(hw.UserError, match=message) as e:
            StageReplay(traj, stage, model, task, records)
        assert "\n" not in str(e.value)
    with pytest.raises(hw.UserError, match="not among the 2 records"):
        StageReplay(traj, "sgd", model, task, records[:2])
    with pytest.raises(hw.UserError, match="replay_seeds"):
        hw.MAGIC(model, task, hw.MagicConfig(replay_seeds=[0, 1]), trajectory=traj, stage="sgd").fit(records)


def test_magic_replays_a_recorded_stage_from_the_command_line(tmp_path, tokenizer):
    """`headwater attribute --method magic --trajectory T --stage S`: the stage's records scored
    as MAGIC in Python scores them; --stage without a trajectory is refused before any work."""
    from typer.testing import CliRunner

    from headwater.cli import app
    from headwater.toy import tiny_gpt2

    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=16).double()
    task = hw.LanguageModelTask(tokenizer)
    data = [{"id": f"b{i}", "text": t} for i, t in enumerate(["tela was a small red mountain", "orin is in the south", "vask is a river"])]
    recorder = hw.TrajectoryRecorder(tmp_path / "traj", model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    recorder.begin_stage("b", opt)
    for pair in ([0, 1], [2, 0], [1, 2]):  # token-mean batches, as the Hugging Face Trainer reduces them
        batch = task.collate([task.whole(data[i]) for i in pair])
        (task.loss(model, batch).sum() / batch["target_mask"][:, 1:].sum()).backward()
        opt.step()
        recorder.step(opt, ids=[data[i]["id"] for i in pair])
        opt.zero_grad()
    recorder.close()
    model.save_pretrained(tmp_path / "final")
    tokenizer.save_pretrained(tmp_path / "final")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    query = {"prompt": "the river of vask is", "completion": " blue"}
    (tmp_path / "q.jsonl").write_text(json.dumps(query) + "\n")
    common = ["attribute", "--method", "magic", "--model", str(tmp_path / "final"), "--data", str(tmp_path / "b.jsonl")]
    common += ["--queries", str(tmp_path / "q.jsonl"), "--smoothness-check", "0", "--no-progress", "--out", str(tmp_path / "s.safetensors")]
    r = CliRunner().invoke(app, [*common, "--trajectory", str(tmp_path / "traj"), "--stage", "b"])
    assert r.exit_code == 0, r.output
    want = hw.MAGIC(model, task, hw.MagicConfig(smoothness_check=0), trajectory=tmp_path / "traj", stage="b").fit(data).score([query])
    np.testing.assert_allclose(hw.Scores.load(tmp_path / "s.safetensors").values, want.values, rtol=1e-6)
    assert np.abs(want.values).min() > 0
    r = CliRunner().invoke(app, [*common, "--stage", "b"])
    assert r.exit_code != 0 and "--stage names the recorded stage" in r.output


def test_the_replayed_path_says_which_stages_it_could_not_replay(recorded):
    """Least squares: its curvature does not depend on the parameters, so the replayed path gives
    the interpolated estimates; a stage without its records stays interpolated, and says so."""
    traj, model, task, records = recorded
    data = {name: records for name in ("adamw", "continued", "nesterov")}
    behaviour = {"probe": [{"x": torch.ones(4, dtype=torch.float64), "y": torch.tensor(0.5, dtype=torch.float64)}]}
    effects = {
        path: hw.StageAttribution(traj, model, task, hw.StageConfig(batch_loss="example-mean", curvature_path=path), data=data).effects(behaviour)
        for path in ("interpolated", "replayed")
    }
    notes = [n for n in effects["replayed"].ignores if "replayed path" in n]
    assert len(notes) == 1 and "momentum (its records were not given)" in notes[0] and "continued" not in notes[0]
    np.testing.assert_allclose(effects["replayed"].estimates["curvature"], effects["interpolated"].estimates["curvature"], rtol=1e-9, atol=1e-12)


def test_plain_adam_without_decay_and_a_record_twice_in_a_batch(tmp_path):
    """torch.optim.Adam with no weight decay is AdamW: it replays; a record drawn twice into one
    batch (sampling with replacement) counts twice in MAGIC's score, as finite differences say."""
    model, task, records = problem()
    recorder = hw.TrajectoryRecorder(tmp_path / "traj", model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    recorder.begin_stage("adam", opt)
    for chosen in ([0, 0, 1, 2], [3, 0, 4, 4], [1, 2, 0, 5]):
        task.loss(model, task.collate([task.whole(records[i]) for i in chosen])).mean().backward()
        opt.step()
        recorder.step(opt, ids=[records[i]["id"] for i in chosen])
        opt.zero_grad()
    recorder.close()
    traj = hw.Trajectory(tmp_path / "traj")
    replay = StageReplay(traj, "adam", model, task, records, batch_loss="example-mean")
    got = replay.train()
    for name, want in traj.params_at("adam", True).items():
        torch.testing.assert_close(got[f"p.{name}"], want, rtol=0, atol=1e-10)
    query = [{"x": torch.ones(4, dtype=torch.float64), "y": torch.tensor(0.5, dtype=torch.float64)}]
    config = hw.MagicConfig(smoothness_check=0, batch_loss="example-mean")
    scores = hw.MAGIC(model, task, config, trajectory=traj).fit(records).score(query)
    batch = task.collate([task.whole(query[0])])
    f = lambda w: float(task.loss(replay.bind(replay.train(w)), batch).sum())  # noqa: E731
    for i in (0, 4):  # drawn three times (twice in one batch) and twice in one batch
        e = torch.zeros(len(records), dtype=torch.float64)
        e[i] = 1e-5
        fd = (f(replay.ones() + e) - f(replay.ones() - e)) / 2e-5
        assert -scores.values[i, 0] == pytest.approx(fd, rel=1e-5)
    with pytest.raises(hw.UserError, match="a recorded stage"):
        hw.MAGIC(model, task, hw.MagicConfig(batch_loss="token-mean")).fit(records)
    with pytest.raises(hw.UserError, match="--nesterov needs SGD with momentum"):
        hw.TrainConfig("adamw", nesterov=True)
