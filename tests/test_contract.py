"""The attribution contract: every method is `fit(train)` then `score(queries, measurement)` →
`Scores` [records, queries] with ids, for any `torch.nn.Module` (`ModuleTask`), in one orientation;
one configuration vocabulary behind every command-line flag."""

import dataclasses
import re

import numpy as np
import pytest
import torch

import headwater as hw
from headwater.cli.app import app
from headwater.cli.options import flags_of
from headwater.config import METHOD_NAMES, Config

N, Q = 24, 4


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    train = [{"id": f"r{i}", "x": x[i], "y": int(y[i])} for i in range(N)]
    queries = [{"id": f"q{j}", "x": x[j], "y": int(y[j])} for j in range(Q)]  # copies of the first records
    return train, queries


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


def trained(seed=0):
    """A model trained on the records (so its gradients are the ones of a real fit)."""
    model, (train, _) = mlp(seed), data()
    run = hw.TrainConfig("sgd", lr=0.2, epochs=3, train_batch_size=6, data_seed=seed)
    replay = hw.Replay(model, hw.ModuleTask(), train, run)
    return replay.load(replay.train())


def method(name):
    task = hw.ModuleTask()
    run = hw.TrainConfig("sgd", lr=0.2, epochs=2, train_batch_size=6)
    small = hw.ProjectionConfig("none")
    return {
        "dot": lambda: hw.Dot(trained(), task),
        "cosine": lambda: hw.Cosine(trained(), task, hw.GradientConfig(projection=small)),
        "trackstar": lambda: hw.TrackStar(trained(), task, hw.TrackStarConfig(projection=small)),
        "tracin": lambda: hw.TracIn([trained(0), trained(1)], task, hw.TracInConfig(checkpoint_lr=[0.2, 0.1])),
        "ekfac": lambda: hw.EKFAC(trained(), task),
        "kfac": lambda: hw.KFAC(trained(), task),
        "trak": lambda: hw.TRAK([trained(0), trained(1)], task, hw.TRAKConfig(projection=small)),
        "source": lambda: hw.SOURCE([hw.Segment([trained()], lr=0.2, steps=8)], task),
        "magic": lambda: hw.MAGIC(mlp(), task, hw.MagicConfig(run=run)),
        "bm25": lambda: hw.BM25(),
    }[name]()


QUERY_METHODS = [m.name for m in hw.methods.QUERY_METHODS]


@pytest.mark.parametrize("name", QUERY_METHODS)
def test_every_method_on_a_module_task_returns_scores_of_one_orientation(name):
    """Each query copies a training record: in every method that record scores far above the
    median (positive = helps, whatever the method), and the result is a Scores with ids."""
    assert set(METHOD_NAMES) == set(hw.METHODS)
    train, queries = data()
    scores = method(name).fit(train).score(queries)
    assert isinstance(scores, hw.Scores) and scores.method == name
    assert scores.values.shape == (N, Q) and scores.values.dtype == np.float32
    assert scores.train_ids == [r["id"] for r in train] and scores.query_ids == [q["id"] for q in queries]
    assert np.isfinite(scores.values).all()
    ranks = [(scores.values[:, j] > scores.values[j, j]).sum() for j in range(Q)]  # 0 = the copy ranks first
    assert np.mean(ranks) < N / 4, ranks


@pytest.mark.parametrize("name", [m.name for m in hw.methods.CONCEPT_METHODS if m.name != "probe-diff"])
def test_concept_methods_score_records_against_the_concept(name):
    """The probe methods take the concept as their one query: Scores [records, 1] keyed by the
    records, positive = more of the concept (here: the hidden unit the concept reads)."""
    assert set(METHOD_NAMES) == set(hw.METHODS) and set(QUERY_METHODS).isdisjoint(m.name for m in hw.methods.CONCEPT_METHODS)
    train, _ = data()
    model = trained()
    concept = hw.Concept(torch.eye(8, dtype=torch.float64)[0], "1", name="unit0")
    scores = hw.METHODS[name](model, hw.ModuleTask()).fit(train).score(None, concept)
    assert scores.values.shape == (N, 1) and scores.query_ids == ["unit0"] and scores.train_ids == [r["id"] for r in train]
    assert scores.measurement["direction"] == "up" and np.isfinite(scores.values).all() and scores.values.std() > 0
    if name == "probe":
        h = torch.tanh(model[0](torch.stack([r["x"] for r in train])))[:, 0]
        np.testing.assert_allclose(scores.values[:, 0], h.detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    "name,by", [("dot", "module"), ("cosine", "module"), ("trackstar", "module"), ("ekfac", "module"), ("tracin", "checkpoint"), ("tracin", "module")]
)
def test_breakdowns_are_kept_apart_and_sum_to_the_scores(name, by):
    train, queries = data()
    m = method(name).fit(train)
    parts, total = m.score(queries, by=by, dtype=np.float64), m.score(queries, dtype=np.float64)
    assert parts.axis == by and parts.values.shape == (len(parts.labels), N, Q) and len(parts.labels) > 1
    assert parts.labels == (["0", "2"] if by == "module" else ["checkpoint 0", "checkpoint 1"])
    np.testing.assert_allclose(parts.total().values, total.values, rtol=1e-9, atol=1e-12)
    assert np.abs(parts.values).min(axis=(1, 2)).max() >= 0 and (np.abs(parts.values).max(axis=(1, 2)) > 0).all()


def test_a_breakdown_a_method_cannot_keep_is_refused():
    train, queries = data()
    with pytest.raises(hw.UserError, match="can keep apart nothing"):
        method("bm25").fit(train).score(queries, by="module")


def test_scores_round_trip_and_breakdowns(tmp_path):
    values = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    s = hw.Scores(
        values,
        ["a", 7, "c"],
        ["q0", "q1", "q2", "q3"],
        method="stages",
        axis="stage",
        labels=["pre", "sft"],
        measurement={"name": "loss", "direction": "down"},
        config={"k": 1},
    )
    back = hw.Scores.load(s.save(tmp_path / "s.safetensors"))
    np.testing.assert_array_equal(back.values, values)
    assert (back.train_ids, back.query_ids, back.axis, back.labels, back.config) == (["a", 7, "c"], s.query_ids, "stage", ["pre", "sft"], {"k": 1})
    np.testing.assert_array_equal(back.total().values, values.sum(0))
    np.testing.assert_array_equal(back.part("sft").values, values[1])
    top = back.total().top_k(2, bottom_k=1)
    assert top[top.side == "top"].groupby("query_id")["train_id"].first().tolist() == ["c"] * 4
    with pytest.raises(hw.UserError, match="do not match"):
        hw.Scores(np.zeros((3, 2)), [0, 1], [0, 1])
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(hw.UserError, match="not a headwater scores file"):
        hw.Scores.load(tmp_path / "bad.safetensors")


def test_pooling_rows_into_records():
    rows = np.array([[1.0, -2.0], [3.0, 0.0], [-1.0, 5.0]])
    records = np.array([0, 0, 2])
    got = {pool: hw.Scores.from_rows(rows, records, 3, pool, train_ids=[0, 1, 2], query_ids=[0, 1]).values for pool in ("max", "mean", "sum")}
    np.testing.assert_array_equal(got["max"], [[3, 0], [0, 0], [-1, 5]])
    np.testing.assert_array_equal(got["mean"], [[2, -1], [0, 0], [-1, 5]])
    np.testing.assert_array_equal(got["sum"], [[4, -2], [0, 0], [-1, 5]])


# ------------------------------------------------------------------------------ the vocabulary


def all_configs():
    seen, todo = set(), list(Config.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo += cls.__subclasses__()
    return sorted(seen, key=lambda c: c.__name__)


def commands():
    """(name, click command) of every command, groups included."""
    import typer.main

    root = typer.main.get_command(app)
    out = []

    def walk(cmd, prefix):
        for name, sub in getattr(cmd, "commands", {}).items():
            if getattr(sub, "commands", None):
                walk(sub, f"{prefix}{name} ")
            else:
                out.append((prefix + name, sub))

    walk(root, "")
    return out


def meaning(help_text: str) -> str:
    return re.sub(r"\s*\(default: .*\)\s*$", "", " ".join((help_text or "").split())).removesuffix(" Default: the index's own.")


def test_a_flag_means_one_thing_in_every_command():
    flags_of(*all_configs())  # raises if two config fields share a flag with different help
    helps: dict[str, set[str]] = {}
    for _name, cmd in commands():
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--") and opt != "--help":
                    helps.setdefault(opt, set()).add(meaning(param.help))
    assert len(helps) > 60
    files = {"--out", "--scores"}  # each command's own output / input files: one meaning, "this command's file"
    differing = {flag: h for flag, h in helps.items() if len(h) > 1 and flag not in files}
    assert not differing, differing


def signatures():
    """(command words, signature) of every registered command function."""
    import inspect

    out = [(info.name or info.callback.__name__, inspect.signature(info.callback)) for info in app.registered_commands]
    for group in app.registered_groups:
        out += [(f"{group.name} {info.name}", inspect.signature(info.callback)) for info in group.typer_instance.registered_commands]
    return out


def test_help_lists_every_choice_of_every_flag():
    import typing

    from typer.testing import CliRunner

    checked = 0
    for name, sig in signatures():
        out = CliRunner().invoke(app, [*name.split(), "--help"], env={"COLUMNS": "400", "NO_COLOR": "1"}).stdout
        for param in sig.parameters.values():
            literal = [a for a in (param.annotation, *typing.get_args(param.annotation)) if typing.get_origin(a) is typing.Literal]
            if not literal:
                continue
            flag = param.default.param_decls[0].split("/")[0]
            line = next(line for line in out.splitlines() if re.match(rf"│\s+(\*\s+)?{re.escape(flag)}\s", line))
            for choice in typing.get_args(literal[0]):
                assert str(choice) in line, (name, flag, choice, line)
            checked += 1
    assert checked > 20


def test_cli_defaults_are_the_python_defaults(tmp_path):
    """No flags, no file: every config resolves to its dataclass defaults; a saved file replays."""
    from headwater.cli.options import resolve

    classes = tuple(all_configs())
    flags = flags_of(*classes)
    resolved = resolve(classes, flags, {}, None)
    for cls in classes:
        assert resolved[cls] == cls(), cls
    changed = dataclasses.replace(hw.TrackStarConfig(), damping=0.3, mix="0")
    changed.save(tmp_path / "c.json")
    got = resolve((hw.TrackStarConfig,), flags_of(hw.TrackStarConfig), {"fit_rows": 5}, tmp_path / "c.json")[hw.TrackStarConfig]
    assert (got.damping, got.mix, got.fit_rows) == (0.3, "0", 5)
