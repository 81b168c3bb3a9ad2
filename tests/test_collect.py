"""Per-example projected gradients against autograd run one example at a time (float64)."""

import pytest
import torch
import torch.nn.functional as F
from reference import assert_rel_close, ce, cnn, image_records, mlp, mlp_records, prefix_examples, reference_rows, untied

from headwater.collect import GradientCollector, model_fingerprint, tracked_modules
from headwater.config import ProjectionConfig
from headwater.task import LanguageModelTask, ModuleTask


@pytest.mark.parametrize("kind", ["factored", "dense", "none"])
def test_gpt2_prompt_completion_padded(gpt2, tokenizer, lm_records, kind):
    gpt2 = gpt2.double()
    task = LanguageModelTask(tokenizer)
    examples = [e for r in lm_records for e in task.encode(r)]
    assert len({len(e.input_ids) for e in examples}) > 1  # the batch really is padded
    cfg = ProjectionConfig(kind, dim=64 if kind != "dense" else 48, seed=3)
    got = GradientCollector(gpt2, task, cfg)(task.collate(examples))
    assert_rel_close(got, reference_rows(gpt2, task, examples, cfg))


def test_completion_mask_excludes_prompt(gpt2, tokenizer):
    task = LanguageModelTask(tokenizer)
    a = task.encode({"prompt": "the capital of zorblat is", "completion": " quenti"})[0]
    b = task.encode({"prompt": "the capital of zorblat is", "completion": " mirel"})[0]
    assert sum(a.target_mask) == 1 and a.target_mask[-1]
    # Same prompt, different completion: gradients differ; loss is on one token each.
    col = GradientCollector(gpt2, task, ProjectionConfig("none"))
    rows = col(task.collate([a, b]))
    assert not torch.allclose(rows[0], rows[1])


@pytest.mark.parametrize("kind", ["factored", "dense", "none"])
@pytest.mark.parametrize("loss", ["builtin", "user"])
def test_mlp_losses(kind, loss):
    model = mlp()
    task = ModuleTask("cross_entropy" if loss == "builtin" else ce)
    records = mlp_records(7)
    cfg = ProjectionConfig(kind, dim=36, seed=0)
    got = GradientCollector(model, task, cfg)(task.collate(records))
    assert_rel_close(got, reference_rows(model, task, records, cfg))


@pytest.mark.parametrize("kind", ["factored", "dense", "none"])
def test_convolutions_are_tracked_as_linear_maps_of_their_patches(kind):
    model, task, records = cnn(), ModuleTask("cross_entropy"), image_records(5)
    assert [tm.d_in for tm in tracked_modules(model).values()] == [2 * 9, 4 * 9, 5 * 3, 48]
    cfg = ProjectionConfig(kind, dim=40, seed=1)
    got = GradientCollector(model, task, cfg)(task.collate(records))
    assert_rel_close(got, reference_rows(model, task, records, cfg))


def test_convolutions_unfold_cannot_express_are_not_tracked():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2), torch.nn.Conv2d(4, 4, 2, padding="same"), torch.nn.Conv2d(4, 4, 3))
    assert list(tracked_modules(model)) == ["2"]  # grouped; asymmetric "same" padding


def test_module_called_twice_sums_both_calls():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    torch.manual_seed(0)
    model = Twice().double()
    task = ModuleTask(lambda m, b: m(b["x"]).pow(2).sum(1))
    records = [{"x": torch.randn(4, dtype=torch.float64)} for _ in range(3)]
    cfg = ProjectionConfig("none")
    got = GradientCollector(model, task, cfg)(task.collate(records))
    assert_rel_close(got, reference_rows(model, task, records, cfg))


def test_default_modules_are_every_linear_one_but_shared_and_huge_ones(gpt2, monkeypatch):
    import headwater.collect as collect

    names = list(tracked_modules(gpt2))  # the head shares the token embedding's weight: tracked with its lookup
    assert names[-1] == "lm_head" and all(n.startswith("transformer.h.") for n in names[:-1])
    assert tracked_modules(gpt2)["lm_head"].embedding is gpt2.transformer.wte
    assert list(tracked_modules(gpt2, ["*.mlp.*"])) == [n for n in names if ".mlp." in n]
    free = untied(gpt2)
    assert list(tracked_modules(free)) == names and tracked_modules(free)["lm_head"].embedding is None
    monkeypatch.setattr(collect, "MAX_DEFAULT_SIDE", gpt2.config.vocab_size - 1)  # a head over the limit
    assert "lm_head" not in tracked_modules(free) and "lm_head" in tracked_modules(free, ["lm_head"])
    pair = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    pair[2].weight = pair[0].weight  # two linear uses of one weight: neither one's row is the whole gradient
    assert list(tracked_modules(pair)) == ["4"]


class TiedLM(torch.nn.Module):
    """A token embedding (with a padding row) tied to a biased output head."""

    def __init__(self, vocab=7, d=5, pad=0):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d, padding_idx=pad)
        self.mix = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


@pytest.mark.parametrize("kind", ["none", "factored"])
def test_tied_head_rows_are_the_shared_weights_whole_gradient(kind):
    """Head + lookup of one tied weight (padding row and bias included) equal autograd's gradient
    of the parameter, example by example."""
    torch.manual_seed(0)
    model = TiedLM().double()
    assert list(tracked_modules(model)) == ["mix", "head"]
    task = ModuleTask(lambda m, b: F.cross_entropy(m(b["ids"]).transpose(1, 2), b["y"], reduction="none").sum(1))
    g = torch.Generator().manual_seed(1)
    records = [{"ids": torch.randint(0, 7, (6,), generator=g), "y": torch.randint(0, 7, (6,), generator=g)} for _ in range(4)]
    records[0]["ids"][:3] = 0  # padded positions: the lookup gives the padding row no gradient
    cfg = ProjectionConfig(kind, dim=16, seed=2)
    got = GradientCollector(model, task, cfg)(task.collate(records))
    assert_rel_close(got, reference_rows(model, task, records, cfg))


def test_token_rows_equal_prefix_examples(gpt2, tokenizer, lm_records):
    """The one-forward token path equals collecting every prefix as its own example."""
    gpt2 = gpt2.double()
    cfg = ProjectionConfig("factored", dim=64, seed=1)
    tokens = LanguageModelTask(tokenizer, unit="token")
    for record in lm_records[1:4]:  # completions of several tokens
        (whole,) = tokens.encode(record)
        prefixes = prefix_examples(whole)
        assert len(prefixes) == sum(whole.target_mask[1:]) >= 1
        got = GradientCollector(gpt2, tokens, cfg).token_rows(tokens.collate([whole]), chunk=2)
        assert_rel_close(got, reference_rows(gpt2, tokens, prefixes, cfg))


def test_fingerprint_is_cached_and_follows_in_place_updates(gpt2):
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
