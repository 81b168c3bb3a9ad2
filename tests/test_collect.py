"""Per-example projected gradients against autograd run one example at a time."""

import pytest
import torch
import torch.nn.functional as F

from headwater.collect import GradientCollector, tracked_modules
from headwater.projection import ProjectionConfig, project
from headwater.task import LanguageModelTask, ModuleTask


def reference_rows(model, task, examples, cfg, modules=None, scales=None):
    """Autograd on each example alone, then the same projection applied to the full gradient."""
    tracked = tracked_modules(model, modules)
    rows = []
    for ex in examples:
        model.zero_grad()
        task.per_example_loss(model, task.collate([ex])).sum().backward()
        segs = []
        for name, tm in tracked.items():
            gw = tm.module.weight.grad.T if tm.transposed else tm.module.weight.grad
            g = torch.cat([gw, tm.module.bias.grad[:, None]], 1) if tm.has_bias else gw
            if scales is not None:
                g = g * scales[name].full
            segs.append(project(cfg, name, g[None].double().float()))
        rows.append(torch.cat(segs, 1))
    return torch.cat(rows)


def assert_rel_close(got, want, tol=1e-5):
    err = (got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-30)
    assert err.max().item() < tol, err


@pytest.mark.parametrize("kind", ["factored", "dense", "none"])
def test_gpt2_prompt_completion_padded(gpt2, tokenizer, lm_records, kind):
    task = LanguageModelTask(tokenizer)
    examples = [e for r in lm_records for e in task.encode(r)]
    assert len({len(e.input_ids) for e in examples}) > 1  # the batch really is padded
    cfg = ProjectionConfig(kind, dim=64 if kind != "dense" else 48, seed=3)
    got = GradientCollector(gpt2, task, cfg)(task.collate(examples))
    want = reference_rows(gpt2, task, examples, cfg)
    assert_rel_close(got, want)


def test_completion_mask_excludes_prompt(gpt2, tokenizer):
    task = LanguageModelTask(tokenizer)
    a = task.encode({"prompt": "the capital of zorblat is", "completion": " quenti"})[0]
    b = task.encode({"prompt": "the capital of zorblat is", "completion": " mirel"})[0]
    assert sum(a.target_mask) == 1 and a.target_mask[-1]
    # Same prompt, different completion: gradients differ; loss is on one token each.
    col = GradientCollector(gpt2, task, ProjectionConfig("none"))
    rows = col(task.collate([a, b]))
    assert not torch.allclose(rows[0], rows[1])


def mlp():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3, bias=False))


def ce(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


@pytest.mark.parametrize("kind", ["factored", "dense", "none"])
def test_mlp_user_loss(kind):
    model = mlp()
    task = ModuleTask(ce)
    g = torch.Generator().manual_seed(0)
    records = [{"x": torch.randn(6, generator=g), "y": int(i % 3)} for i in range(7)]
    cfg = ProjectionConfig(kind, dim=36, seed=0)
    got = GradientCollector(model, task, cfg)(task.collate(records))
    assert_rel_close(got, reference_rows(model, task, records, cfg))


def test_module_called_twice_sums_both_calls():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    torch.manual_seed(0)
    model = Twice()
    task = ModuleTask(lambda m, b: m(b["x"]).pow(2).sum(1))
    records = [{"x": torch.randn(4)} for _ in range(3)]
    cfg = ProjectionConfig("none")
    got = GradientCollector(model, task, cfg)(task.collate(records))
    assert_rel_close(got, reference_rows(model, task, records, cfg))


def test_default_modules_are_inside_blocks(gpt2):
    names = list(tracked_modules(gpt2))
    assert names and all(n.startswith("transformer.h.") for n in names)
    assert "lm_head" not in names
    assert list(tracked_modules(gpt2, ["*.mlp.*"])) == [n for n in names if ".mlp." in n]


def test_token_rows_equal_prefix_examples(gpt2, tokenizer, lm_records):
    """The one-forward token path equals collecting every prefix as its own example."""
    cfg = ProjectionConfig("factored", dim=64, seed=1)
    tokens = LanguageModelTask(tokenizer, unit="token")
    for record in lm_records[:3]:
        prefixes = tokens.encode(record)
        assert len(prefixes) == sum(tokens.encode_whole(record).target_mask[1:])
        want = GradientCollector(gpt2, tokens, cfg)(tokens.collate(prefixes))
        got = GradientCollector(gpt2, tokens, cfg).token_rows(tokens.collate([tokens.encode_whole(record)]), chunk=2)
        assert_rel_close(got, want)
        assert_rel_close(want, reference_rows(gpt2, tokens, prefixes, cfg))


def test_fingerprint_is_cached_and_follows_in_place_updates(gpt2):
    from headwater.collect import model_fingerprint

    first = model_fingerprint(gpt2)
    assert model_fingerprint(gpt2) == first
    w = gpt2.transformer.h[0].mlp.c_fc.weight
    original = w[0, 0].item()
    with torch.no_grad():
        w[0, 0] += 1.0  # an in-place update bumps the version counter
    assert model_fingerprint(gpt2) != first
    with torch.no_grad():
        w[0, 0] = original
    assert model_fingerprint(gpt2) == first  # same values, same hash
