"""Optimizer normalisation against per-example autograd gradients divided by √(second moment)
computed here from the optimizer's own in-memory state.

Everything runs in float64: 1/√v ranges over orders of magnitude, so float32 round-off of the
batched and the one-at-a-time gradients (different kernels, ~1e-7 relative) is amplified
unevenly and differs by CPU (5.8e-5 on an AMD EPYC, under 1e-5 on an Intel Xeon). In float64 the
same amplification stays far below TOL."""

import pytest
import torch
import torch.nn.functional as F
from reference import assert_rel_close, ce, cnn, image_records, mlp, mlp_records, per_example_grads

from headwater import BuildConfig, UserError, build_index
from headwater.collect import GradientCollector, tracked_modules
from headwater.config import ProjectionConfig
from headwater.normalizer import load_optimizer_state, module_scales
from headwater.projection import project
from headwater.task import LanguageModelTask, ModuleTask

EPS = 1e-8  # module_scales' default, equal to Adam's default eps
FLOOR = 1e-3  # each parameter's second moment is raised to at least this fraction of its mean
TOL = 1e-9  # float64 round-off (1e-16) amplified by at most the range of 1/√v (< 1e7 here)


def train(model, task, records, opt, steps):
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model, task.collate(records)).mean().backward()
        opt.step()
    model.eval()
    model.zero_grad()


def adam_denominator(opt, p):
    """√(bias-corrected exp_avg_sq, floored) + eps, straight from the optimizer's state."""
    state, group = opt.state[p], next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    v = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** float(state["step"]))
    return torch.maximum(v, FLOOR * v.mean()).sqrt() + EPS


def adafactor_denominator(opt, p):
    """√V + eps with torch Adafactor's variance estimate V = row_var col_var / mean(row_var)."""
    state = opt.state[p]
    if "row_var" in state:
        row, col = state["row_var"].double(), state["col_var"].double()
        v = row @ col / row.mean(dim=-2, keepdim=True)
    else:
        v = state["variance"].double()
    return torch.maximum(v, FLOOR * v.mean()).sqrt() + EPS


def normalised_reference(model, opt, tracked, grads, denominator):
    """Each module's gradient divided elementwise by the denominator of its weight (transposed
    for Conv1D) and of its bias (last column)."""
    out = {}
    for name, tm in tracked.items():
        d_w = denominator(opt, tm.module.weight)
        d = d_w.T if tm.transposed else d_w.reshape(d_w.shape[0], -1)
        if tm.has_bias:
            d = torch.cat([d, denominator(opt, tm.module.bias)[:, None]], 1)
        assert d.shape == grads[name].shape[1:]
        out[name] = grads[name] / d
    return out


def _setup(kind, tokenizer, lm_records):
    if kind == "mlp":
        model, task, records = mlp(classes=8), ModuleTask(ce), mlp_records(classes=8)
        # named parameters: the saved param_groups carry param_names
        opt = torch.optim.Adam(model.named_parameters(), lr=1e-2)
    elif kind == "cnn":
        model, task, records = cnn(), ModuleTask("cross_entropy"), image_records(4)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        from headwater.toy import tiny_gpt2

        torch.manual_seed(0)
        model = tiny_gpt2(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=64).double()
        task = LanguageModelTask(tokenizer)
        records = [e for r in lm_records for e in task.encode(r)]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    return model, task, records, opt


def _index_of_trained_gpt2(tmp_path, tokenizer, lm_records, state_path, steps):
    """A tiny GPT-2 trained `steps` AdamW steps, its optimizer state saved at `state_path` (a file,
    or `optimizer.pt` inside a folder), and an unprojected index built with that state."""
    model, task, _, opt = _setup("gpt2", tokenizer, lm_records)
    model.float()
    train(model, task, [e for r in lm_records for e in task.encode(r)], opt, steps=steps)
    target = state_path / "optimizer.pt" if state_path.suffix == "" else state_path
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(opt.state_dict(), target)
    config = BuildConfig(projection=ProjectionConfig("none"), optimizer_state=str(state_path))
    return model, task, opt, build_index(tmp_path / "idx", model, lm_records, task=task, config=config, progress=False)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "gpt2"])
def test_adam_rows_are_gradients_over_sqrt_second_moment(tmp_path, tokenizer, lm_records, kind):
    model, task, records, opt = _setup(kind, tokenizer, lm_records)
    train(model, task, records, opt, steps=3)
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)

    tracked = tracked_modules(model)
    if kind == "gpt2":
        assert all(tm.transposed for n, tm in tracked.items() if n != "lm_head")  # Conv1D: weight stored [d_in, d_out]
    scales = module_scales(model, tracked, load_optimizer_state(path))
    cfg = ProjectionConfig("none")
    got = GradientCollector(model, task, cfg, scales=scales)(task.collate(records))

    grads = per_example_grads(model, task, records, list(tracked))
    want = normalised_reference(model, opt, tracked, grads, adam_denominator)
    want = torch.cat([want[n].reshape(len(records), -1) for n in tracked], 1)
    assert_rel_close(got, want, TOL)
    # The normalisation really changes the rows (it is not a near-constant rescaling).
    raw = torch.cat([grads[n].reshape(len(records), -1) for n in tracked], 1)
    cos = F.cosine_similarity(got, raw, dim=1)
    assert cos.max() < 0.99


def test_adafactor_factored_fold_is_exact_for_rank_one_second_moment(tmp_path):
    model, task, records = mlp(classes=8), ModuleTask(ce), mlp_records(classes=8)
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    train(model, task, records, opt, steps=4)
    path = tmp_path / "adafactor.pt"
    torch.save(opt.state_dict(), path)

    tracked = tracked_modules(model, ["2"])  # Linear(16, 8, bias=False)
    assert not tracked["2"].has_bias
    scales = module_scales(model, tracked, load_optimizer_state(path))
    grads = per_example_grads(model, task, records, list(tracked))
    exact = normalised_reference(model, opt, tracked, grads, adafactor_denominator)["2"]

    cfg = ProjectionConfig("factored", dim=16, seed=5)
    got = GradientCollector(model, task, cfg, modules=["2"], scales=scales)(task.collate(records))
    want = project(cfg, "2", exact)
    # 1/(√(r_i c_j) + eps) is rank one only up to eps: each entry is off by a factor within eps/√v.
    v_min = adafactor_denominator(opt, model[2].weight).sub(EPS).square().min()
    assert_rel_close(got, want, 2 * EPS / v_min.sqrt().item())
    # ... and differs from the unnormalised projection.
    plain = project(cfg, "2", grads["2"])
    assert F.cosine_similarity(got, plain, dim=1).min() < 0.999


def test_adafactor_materialised_paths_apply_exact_scales(tmp_path):
    # Every module, bias included (torch Adafactor keeps a vector's second moment unfactored).
    model, task, records = mlp(classes=8), ModuleTask(ce), mlp_records(classes=8)
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    train(model, task, records, opt, steps=3)
    path = tmp_path / "adafactor.pt"
    torch.save(opt.state_dict(), path)
    tracked = tracked_modules(model)
    scales = module_scales(model, tracked, load_optimizer_state(path))
    grads = per_example_grads(model, task, records, list(tracked))
    exact = normalised_reference(model, opt, tracked, grads, adafactor_denominator)
    for cfg in (ProjectionConfig("none"), ProjectionConfig("dense", dim=24, seed=2)):
        got = GradientCollector(model, task, cfg, scales=scales)(task.collate(records))
        want = torch.cat([project(cfg, n, exact[n]) for n in tracked], 1)
        assert_rel_close(got, want, TOL)


def _adam_state(model, steps=2):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        sum(p.square().sum() for p in model.parameters()).backward()
        opt.step()
    return opt


def test_mismatched_state_names_parameter(tmp_path):
    path = tmp_path / "opt.pt"
    torch.save(_adam_state(mlp(hidden=10)).state_dict(), path)
    model = mlp(hidden=16)
    with pytest.raises(UserError) as err:
        module_scales(model, tracked_modules(model), load_optimizer_state(path))
    msg = str(err.value)
    assert "'0.weight'" in msg and "(10, 6)" in msg and "(16, 6)" in msg and "does not match the model" in msg


def test_transposed_state_of_equal_size_refused(tmp_path):
    # Same number of entries, different shape: a state for Linear(16→6) is not one for Linear(6→16).
    path = tmp_path / "opt.pt"
    other = torch.nn.Sequential(torch.nn.Linear(16, 6, bias=False), torch.nn.Tanh(), torch.nn.Linear(6, 16, bias=False))
    torch.save(_adam_state(other).state_dict(), path)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16, bias=False), torch.nn.Tanh(), torch.nn.Linear(16, 6, bias=False))
    with pytest.raises(UserError, match=r"'0\.weight'.*does not match the model"):
        module_scales(model, tracked_modules(model), load_optimizer_state(path))


def test_state_without_second_moment_refused(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    ce(model, ModuleTask(ce).collate(mlp_records())).sum().backward()
    opt.step()
    path = tmp_path / "sgd.pt"
    torch.save(opt.state_dict(), path)
    with pytest.raises(UserError, match="no second moment"):
        module_scales(model, tracked_modules(model), load_optimizer_state(path))


def test_missing_state_file_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_optimizer_state(tmp_path / "nope.pt")


def test_safetensors_state_equals_torch_save(tmp_path):
    from safetensors.torch import save_file

    model, task, records = mlp(classes=8), ModuleTask(ce), mlp_records(classes=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # default betas: safetensors keeps no param_groups
    train(model, task, records, opt, steps=3)
    sd = opt.state_dict()
    flat = {f"state.{i}.{k}": torch.as_tensor(v).contiguous() for i, s in sd["state"].items() for k, v in s.items()}
    save_file(flat, str(tmp_path / "opt.safetensors"))
    torch.save(sd, tmp_path / "opt.pt")

    tracked = tracked_modules(model)
    cfg = ProjectionConfig("none")
    rows = {}
    for name in ("opt.safetensors", "opt.pt"):
        scales = module_scales(model, tracked, load_optimizer_state(tmp_path / name))
        rows[name] = GradientCollector(model, task, cfg, scales=scales)(task.collate(records))
    grads = per_example_grads(model, task, records, list(tracked))
    want = normalised_reference(model, opt, tracked, grads, adam_denominator)
    want = torch.cat([want[n].reshape(len(records), -1) for n in tracked], 1)
    assert_rel_close(rows["opt.safetensors"], want, TOL)
    assert torch.equal(rows["opt.safetensors"], rows["opt.pt"])


def test_adam_uses_the_optimizers_own_eps(tmp_path):
    """A large user-set eps changes the scales: it must come from the saved param group."""
    model, task, records = mlp(classes=8), ModuleTask(ce), mlp_records(classes=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-3)
    train(model, task, records, opt, steps=3)
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    tracked = tracked_modules(model)
    scales = module_scales(model, tracked, load_optimizer_state(path))
    got = GradientCollector(model, task, ProjectionConfig("none"), scales=scales)(task.collate(records))
    grads = per_example_grads(model, task, records, list(tracked))
    big_eps = lambda o, p: adam_denominator(o, p) - EPS + 1e-3
    want = normalised_reference(model, opt, tracked, grads, big_eps)
    want = torch.cat([want[n].reshape(len(records), -1) for n in tracked], 1)
    assert_rel_close(got, want, TOL)


# ------------------------------------------------------------------------------ state files users hand us


def _scales_equal(a, b):
    return all(torch.equal(a[n].row, b[n].row) and torch.equal(a[n].col, b[n].col) and torch.equal(a[n].full, b[n].full) for n in a)


def test_states_with_numpy_scalars_checkpoint_folders_and_name_keys_load_the_same(tmp_path):
    """Ordinary training loops save numpy scalars in the state (rejected by plain weights_only
    loading); the HF Trainer saves optimizer.pt in a checkpoint folder; FSDP's full state dict keys
    parameters by name; flattened dicts spell state.<name>.<key>. All give the same scales."""
    import numpy as np

    model, task, records = mlp(classes=8), ModuleTask(ce), mlp_records(classes=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, task, records, opt, steps=3)
    sd = opt.state_dict()
    tracked = tracked_modules(model)
    want = module_scales(model, tracked, sd)
    names = [n for n, _ in model.named_parameters()]

    numpy_steps = {
        "state": {i: {**s, "step": np.float64(float(s["step"]))} for i, s in sd["state"].items()},
        "param_groups": [{**g, "lr": np.float64(g["lr"])} for g in sd["param_groups"]],
    }
    (tmp_path / "checkpoint-30").mkdir()
    torch.save(numpy_steps, tmp_path / "checkpoint-30" / "optimizer.pt")
    by_name = {"state": {names[i]: s for i, s in sd["state"].items()}, "param_groups": [{**sd["param_groups"][0], "params": names}]}
    torch.save(by_name, tmp_path / "fsdp.pt")
    flat = {f"state.{names[i]}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    torch.save(flat, tmp_path / "flat.pt")
    for source in ("checkpoint-30", "fsdp.pt", "flat.pt"):
        assert _scales_equal(module_scales(model, tracked, load_optimizer_state(tmp_path / source)), want), source


class NotData:  # a class an attacker's pickle could name
    def __reduce__(self):
        return (print, ("this would run",))


def test_a_pickle_naming_an_arbitrary_class_is_refused_in_one_line(tmp_path):
    torch.save({"state": {0: {"exp_avg_sq": torch.ones(2), "evil": NotData()}}, "param_groups": [{"params": [0]}]}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="refusing to unpickle") as err:
        load_optimizer_state(tmp_path / "bad.pt")
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no optimizer state"):
        load_optimizer_state(tmp_path / "empty")
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "state": {}}}, tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UserError, match="DeepSpeed ZeRO"):
        load_optimizer_state(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


def test_several_groups_need_names_or_the_trainers_rule(tmp_path):
    """torch numbers a state's parameters group after group: with two groups, positions are not
    model order. Names recorded by torch (named_parameters) map them; an unnamed split that is
    not the Trainer's decay / no-decay rule is refused rather than guessed."""
    from headwater.normalizer import param_states

    model = mlp(classes=8)
    w0, b0, w2 = model[0].weight, model[0].bias, model[2].weight
    named = torch.optim.Adam([{"params": [("2.weight", w2), ("0.bias", b0)]}, {"params": [("0.weight", w0)]}], lr=1e-2)
    train(model, ModuleTask(ce), mlp_records(classes=8), named, steps=1)
    states = param_states(model, named.state_dict())
    assert torch.equal(states["0.bias"][0]["exp_avg_sq"], named.state[b0]["exp_avg_sq"])
    unnamed = torch.optim.Adam([{"params": [w2, b0]}, {"params": [w0]}], lr=1e-2)
    train(model, ModuleTask(ce), mlp_records(classes=8), unnamed, steps=1)
    with pytest.raises(UserError, match="no parameter names"):
        param_states(model, unnamed.state_dict())


def test_attention_key_bias_adam_never_moved_gets_a_bounded_scale(tmp_path, tokenizer, lm_records):
    """GPT-2's key biases get a zero gradient (softmax ignores a shift of every score), so their
    second moment stays ≈ 0 and 1/√V ≈ 1/ε. Floored, the bias column's scale stays within the
    range of the moved coordinates, and so does its rank-one factor (the factored projection's)."""
    model, task, records, opt = _setup("gpt2", tokenizer, lm_records)
    train(model, task, records, opt, steps=3)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    attn = model.transformer.h[0].attn.c_attn
    v = opt.state[attn.bias]["exp_avg_sq"].double()
    d = v.numel() // 3  # query, key, value
    assert v[d : 2 * d].max() < 1e-20 * v[:d].mean()  # the key biases never moved

    tracked = tracked_modules(model)
    scale = module_scales(model, tracked, load_optimizer_state(tmp_path / "opt.pt"))["transformer.h.0.attn.c_attn"]
    v_hat = v / (1 - 0.95**3)
    assert scale.full[d : 2 * d, -1].max() <= 1 / ((FLOOR * v_hat.mean()).sqrt() + EPS) * (1 + 1e-12)
    assert scale.col[-1] < 100 * scale.col[:-1].median()  # ≈ 10⁵ times without the floor


def test_an_index_built_before_the_floor_scales_its_queries_without_it(tmp_path, tokenizer, lm_records):
    """Query rows must be normalised as the stored rows were: an index whose manifest records no
    floor (built by an earlier release) gets the raw 1/√V on the query side too."""
    import json

    from headwater.index import Index

    model, task, _, index = _index_of_trained_gpt2(tmp_path, tokenizer, lm_records, tmp_path / "opt.pt", steps=3)
    assert index.manifest["normalizer"]["floor"] == FLOOR
    state, tracked = load_optimizer_state(tmp_path / "opt.pt"), tracked_modules(model)
    name = "transformer.h.0.attn.c_attn"
    floored = module_scales(model, tracked, state)[name].full
    torch.testing.assert_close(index.collector(model, task).scales[name].full, floored, rtol=0, atol=0)

    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    del manifest["normalizer"]["floor"]
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    raw = module_scales(model, tracked, state, floor=0.0)[name].full
    assert raw.max() > 1e3 * floored.max()  # the key biases: the floor matters here
    torch.testing.assert_close(Index(tmp_path / "idx").collector(model, task).scales[name].full, raw, rtol=0, atol=0)


def test_a_checkpoint_folder_as_optimizer_state_builds(tmp_path, tokenizer, lm_records):
    """`--optimizer-state` takes a Trainer checkpoint folder; the index records its file's hash."""
    import hashlib

    *_, index = _index_of_trained_gpt2(tmp_path, tokenizer, lm_records, tmp_path / "checkpoint-2", steps=2)
    want = hashlib.sha256((tmp_path / "checkpoint-2" / "optimizer.pt").read_bytes()).hexdigest()
    assert index.manifest["normalizer"]["sha256"] == want


def test_floored_adafactor_second_moment_stays_rank_one():
    """Adafactor's factored V = r cᵀ / mean(r): flooring each factor at √floor of its mean keeps
    it rank one (the factored projection's fold stays exact) and V ≥ floor · mean(V)."""
    from headwater.normalizer import _second_moment

    row = torch.tensor([1e-20, 2e-4, 3e-4, 5e-4])
    col = torch.tensor([4e-4, 1e-22, 1e-4])
    v, kind = _second_moment("w", torch.Size([4, 3]), {"row_var": row, "col_var": col}, {}, FLOOR)
    assert kind == "adafactor"
    assert torch.linalg.matrix_rank(v / v.max()).item() == 1
    raw = torch.outer(row.double(), col.double()) / row.double().mean()
    assert v.min() >= FLOOR * raw.mean() * (1 - 1e-12)
    untouched = (row.double()[:, None] >= FLOOR**0.5 * row.double().mean()) & (col.double()[None] >= FLOOR**0.5 * col.double().mean())
    torch.testing.assert_close(v[untouched], raw[untouched], rtol=1e-12, atol=0)


def test_a_changed_optimizer_state_fails_the_query(tmp_path, tokenizer, lm_records):
    model, task, opt, index = _index_of_trained_gpt2(tmp_path, tokenizer, lm_records, tmp_path / "opt.pt", steps=2)
    state = opt.state_dict()
    state["state"][0]["exp_avg_sq"] = state["state"][0]["exp_avg_sq"] * 2
    torch.save(state, tmp_path / "opt.pt")  # overwritten by a later save
    with pytest.raises(UserError, match="changed since the index was built") as err:
        index.collector(model, task)
    assert "\n" not in str(err.value)
