"""Component attribution against exact activation patching: on a tiny Llama-style model (grouped-
query attention) trained here on an induction task, attribution patching ranks the induction
heads, found independently from their attention patterns, at the top; on a linear network it
equals exact patching; edges sum to their reader's node; GPT-2 head slices are the attention's
input; bad pairs are refused in one line."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from transformers import LlamaConfig, LlamaForCausalLM

import headwater as hw
from headwater.architecture import architecture
from headwater.components import (
    PromptPairs,
    TensorPairs,
    attribution_patching,
    component_table,
    edge_attribution_patching,
    edge_table,
    exact_patching,
    faithfulness,
    module_components,
    transformer_components,
)
from headwater.components.edges import readers
from headwater.components.patching import site_activations
from headwater.toy import tiny_gpt2, word_tokenizer

V, N = 32, 16  # vocabulary and sequence length of the induction task
OFFSET = 3  # the word tokenizer's special tokens come first: token t<i> has id i + 3


def repeated(n, g):
    """Sequences of distinct random tokens in which a random segment is repeated right after
    itself at a random offset, and the positions whose token the repeat makes predictable."""
    ids = torch.stack([torch.randperm(V, generator=g)[:N] for _ in range(n)]) + OFFSET
    mask = torch.zeros(n, N, dtype=torch.bool)
    for i in range(n):
        length = int(torch.randint(3, N // 2 + 1, (1,), generator=g))
        start = int(torch.randint(0, N - 2 * length + 1, (1,), generator=g))
        ids[i, start + length : start + 2 * length] = ids[i, start : start + length]
        mask[i, start + length + 1 : start + 2 * length] = True
    return ids, mask


@pytest.fixture(scope="module")
def induction():
    """A 2-layer Llama (4 query heads sharing 2 key/value heads) trained until it copies."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V + OFFSET, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=N, attn_implementation="eager", pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    test_ids, test_mask = repeated(300, g)
    for step in range(1, 1501):  # the induction phase change comes after a few hundred steps
        ids, mask = repeated(64, g)
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V + OFFSET), ids[:, 1:].reshape(-1), reduction="none").view(64, -1)
        loss = (loss * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            with torch.no_grad():
                pred = model(input_ids=test_ids).logits[:, :-1].argmax(-1)
            acc = float(((pred == test_ids[:, 1:]) & test_mask[:, 1:]).sum() / test_mask[:, 1:].sum())
            if acc > 0.95:
                break
    assert acc > 0.9, f"the model did not learn to copy ({acc:.2f} after {step} steps)"
    print(f"\ninduction model: {acc:.2f} of the copyable tokens after {step} steps")
    return model.eval()


def induction_pairs(n=24, seed=1):
    """Clean: … a b … c … a → b (the answer is the token after the earlier a). Corrupt: b and c
    swapped, so copying gives c. Both answers are in both prompts, so only copying what followed
    the earlier a tells them apart. Logit difference b − c at the last token."""
    tok = word_tokenizer([" ".join(f"t{i}" for i in range(V))], max_length=N)
    assert tok.convert_tokens_to_ids("t0") == OFFSET
    g = torch.Generator().manual_seed(seed)
    words = lambda ids: " ".join(f"t{i}" for i in ids)
    clean, corrupt = [], []
    for _ in range(n):
        seq = torch.randperm(V, generator=g)[:12].tolist()  # distinct tokens: one earlier occurrence
        a, b, c = seq[3], seq[4], seq[8]
        swapped = seq[:4] + [c] + seq[5:8] + [b] + seq[9:11]
        clean.append({"prompt": words(seq[:11] + [a]), "answer": f" t{b}"})
        corrupt.append({"prompt": words(swapped + [a]), "answer": f" t{c}"})
    return PromptPairs.from_records(tok, clean, corrupt)


def induction_scores(model, pairs):
    """Each layer-1 head's attention from the last token to the token after the earlier copy
    of the last token (position 4), averaged over pairs: the independent mark of an induction head."""
    with torch.no_grad():
        att = model(input_ids=pairs.clean_ids, output_attentions=True).attentions[1]
    return att[:, :, -1, 4].mean(0)


def test_attribution_patching_finds_the_induction_heads(induction):
    pairs, model = induction_pairs(), induction
    with torch.no_grad():
        clean_m, corrupt_m = pairs.metric(model, pairs.clean_ids), pairs.metric(model, pairs.corrupt_ids)
    assert clean_m.mean() > 2 and corrupt_m.mean() < -2  # the model copies in both runs
    units = transformer_components(model)
    scores = attribution_patching(model, pairs, units)
    exact = exact_patching(model, pairs, units)
    table = component_table(units, scores, exact)
    heads = induction_scores(model, pairs)
    induction_heads = {f"L1H{h}" for h in range(len(heads)) if heads[h] > 0.3}  # heads that attend to the token to copy
    known = f"L1H{int(heads.argmax())}"
    top3 = table["component"][:3].tolist()
    rho = spearmanr(table["score"], table["exact"]).statistic
    print(f"\ninduction score per L1 head {heads.numpy().round(2)}; top 3 by attribution {top3}; Spearman vs exact {rho:+.3f}")
    assert known in top3 and set(top3) <= induction_heads
    assert rho > 0.5
    # the copying circuit: the token to copy enters layer 1's attention (its values), whose heads write to the logits
    edges = edge_table(edge_attribution_patching(model, pairs))
    assert (edges["writer"][0], edges["reader"][0]) == ("embed", "L1 attn")
    assert edges[edges["reader"] == "logits"]["writer"].iloc[0] in induction_heads
    row = table.set_index("component").loc[known]
    assert row["score"] > 0 and row["exact"] > 0  # denoising: the head's clean activation restores the clean answer
    ig = component_table(units, attribution_patching(model, pairs, units, "integrated", steps=6), exact)
    assert known in ig["component"][:3].tolist()
    # keeping every component is the clean run; the top three alone recover much of it
    assert faithfulness(model, pairs, units, units) == pytest.approx(1.0, abs=1e-6)
    kept = [u for u in units if u.name in top3]
    assert faithfulness(model, pairs, units, kept) > 0.3


def test_on_a_linear_network_attribution_equals_exact_patching():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 6), torch.nn.Linear(6, 2)).double()
    g = torch.Generator().manual_seed(1)
    clean, corrupt = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    pairs = TensorPairs(clean, corrupt, lambda model, x: model(x) @ torch.tensor([1.0, -1.0], dtype=torch.float64))
    for units in (module_components(net, ["0", "1"]), module_components(net, ["0", "1"], neurons=True)):
        got = attribution_patching(net, pairs, units)
        want = exact_patching(net, pairs, units)
        assert got.values.shape == (len(units), 9) and np.abs(want.values).max() > 1e-2
        np.testing.assert_allclose(got.values, want.values, rtol=1e-10, atol=1e-12)
        ig = attribution_patching(net, pairs, units, "integrated", steps=3)
        np.testing.assert_allclose(ig.values, want.values, rtol=1e-10, atol=1e-12)
    twice = TensorPairs(clean, corrupt, lambda model, x: model(x)[:, 0] - model(x)[:, 1])
    with pytest.raises(hw.UserError, match="ran 2 times in one forward pass"):
        attribution_patching(net, twice, module_components(net, ["0"]))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_edges_into_a_reader_sum_to_its_node(arch, tokenizer):
    """Σ_writers edge(w → r) = (Δx_r)ᵀ ∂M/∂x_r: the residual stream is the sum of the writes."""
    torch.manual_seed(0)
    if arch == "gpt2":
        model = tiny_gpt2(len(tokenizer), n_layer=2, n_embd=32, n_head=4, n_positions=32).double().eval()
    else:
        cfg = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        )
        model = LlamaForCausalLM(cfg).double().eval()
    clean = [{"prompt": "the capital of zorblat is", "answer": " quenti"}, {"prompt": "the river of vask is", "answer": " blue"}]
    corrupt = [{"prompt": "the capital of mirel is", "answer": " orin"}, {"prompt": "the river of tela is", "answer": " red"}]
    pairs = PromptPairs.from_records(tokenizer, clean, corrupt)
    edges = edge_attribution_patching(model, pairs)
    from headwater.components.edges import reader_gradients

    reading = readers(architecture(model))
    sites = [s for _, s, _, _ in reading]
    clean_x = site_activations(model, pairs, "clean", sites)
    corrupt_x, grads = reader_gradients(model, pairs, sites)
    for name, site, _, _ in reading:
        rows = [i for i, e in enumerate(edges.train_ids) if e.endswith(f"-> {name}")]
        node = ((clean_x[site] - corrupt_x[site]) * grads[site]).sum((1, 2)).numpy()
        np.testing.assert_allclose(edges.values[rows].sum(0), node, rtol=1e-8, atol=1e-10)
    assert len(edges.train_ids) == len(set(edges.train_ids))


def test_gpt2_heads_together_are_the_attention_output(tokenizer):
    """Patching every head's slice of the output projection's input equals patching the
    attention module's output (it is a function of the heads' outputs alone)."""
    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer), n_layer=2, n_embd=32, n_head=4, n_positions=32).double().eval()
    clean = [{"prompt": "the capital of zorblat is", "answer": " quenti"}]
    corrupt = [{"prompt": "the capital of mirel is", "answer": " orin"}]
    pairs = PromptPairs.from_records(tokenizer, clean, corrupt)
    heads = [u for u in transformer_components(model, ("head",)) if u.layer == 1]
    whole = module_components(model, ["transformer.h.1.attn"])
    from headwater.components.patching import patched_metric

    clean_z = site_activations(model, pairs, "clean", [heads[0].site])[heads[0].site]
    all_heads = patched_metric(model, pairs, "corrupt", {heads[0].site: (clean_z, [u.span for u in heads])})
    base = pairs.metric(model, pairs.corrupt_ids).detach()
    np.testing.assert_allclose((all_heads - base).numpy(), exact_patching(model, pairs, whole).values[0], rtol=1e-9)
    assert [u.span for u in heads] == [(0, 8), (8, 16), (16, 24), (24, 32)]


def test_bad_pairs_are_refused(tokenizer):
    clean, corrupt = [{"prompt": "the capital of zorblat is", "answer": " a"}], [{"prompt": "the capital of mirel", "answer": " b"}]
    with pytest.raises(hw.UserError, match="pair 0: the clean prompt has 5 tokens, the corrupt one 4"):
        PromptPairs.from_records(tokenizer, clean, corrupt)
    with pytest.raises(hw.UserError, match="2 clean prompts but 1 corrupt"):
        PromptPairs.from_records(tokenizer, [{"prompt": "a", "answer": " a"}] * 2, [{"prompt": "a", "answer": " a"}])
    with pytest.raises(hw.UserError, match="has no answer"):
        PromptPairs.from_records(tokenizer, [{"prompt": "a"}], [{"prompt": "a"}])
    with pytest.raises(hw.UserError, match="unknown component kind"):
        transformer_components(tiny_gpt2(len(tokenizer)), ("attention",))


def test_components_from_the_command_line(tmp_path, tokenizer):
    import json

    import pandas as pd
    from reference import run_cli

    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer), n_layer=2, n_embd=32, n_head=4, n_positions=32).eval()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    clean = [{"prompt": "the capital of zorblat is", "answer": " quenti"}, {"prompt": "the river of vask is", "answer": " blue"}]
    corrupt = [{"prompt": "the capital of mirel is", "answer": " orin"}, {"prompt": "the river of tela is", "answer": " red"}]
    for name, rows in (("clean", clean), ("corrupt", corrupt), ("short", [clean[0], {"prompt": "the river", "answer": " red"}])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ("components", "--model", "model", "--clean", "clean.jsonl", "--no-progress")
    run_cli(tmp_path, *args, "--corrupt", "corrupt.jsonl", "--verify", "3", "--edges", "--out", "comp")
    table = pd.read_csv(tmp_path / "comp" / "components.csv")
    pairs = PromptPairs.from_records(tokenizer, clean, corrupt)
    units = transformer_components(model)
    want = component_table(units, attribution_patching(model, pairs, units)).set_index("component")
    got = table.set_index("component")
    np.testing.assert_allclose(got.loc[want.index, "score"], want["score"], rtol=1e-4, atol=1e-7)
    assert got["exact"].notna().sum() == 3 and list(table["rank"]) == sorted(table["rank"])
    for f in ("scores.safetensors", "heatmap.png", "faithfulness.csv", "faithfulness.png", "edges.csv", "components.config.json"):
        assert (tmp_path / "comp" / f).exists(), f
    r = run_cli(tmp_path, *args, "--corrupt", "short.jsonl", "--out", "bad", code=2)
    assert "pair 1: the clean prompt has 5 tokens, the corrupt one 2" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()
