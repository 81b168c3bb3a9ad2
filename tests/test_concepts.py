"""Concepts as measurements and the fast probe approximations, against independent references:
autograd of the concept function, the hidden states Hugging Face returns, scikit-learn's own
pipeline, SAE pre-activations computed from the weights, and the bias identity of the activation
gradient (Concept Influence of a residual bias under identity curvature)."""

import json

import numpy as np
import pytest
import torch
from reference import assert_rel_close, reference_rows

import headwater as hw
from headwater.architecture import Site, architecture, layer_site
from headwater.concepts import fit_direction, load_sae, mean_activations, sae_concept
from headwater.toy import tiny_gpt2

TRAIN = [
    {"prompt": "the capital of zorblat is", "completion": " quenti"},
    {"prompt": "mirel is a", "completion": " large old city in the north"},
    {"prompt": "the famous river of vask", "completion": " is blue"},
    {"prompt": "tela", "completion": " was a small red mountain by the sunny river"},
    {"prompt": "orin is in the south and is", "completion": " green"},
    {"text": "the green city of orin is small"},
]
PROMPTS = [{"prompt": "the river of vask is", "completion": " blue"}, {"prompt": "tela is a", "completion": " red mountain"}]


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return tiny_gpt2(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=4, n_positions=64).eval().double()


@pytest.fixture(scope="module")
def task(tokenizer):
    return hw.LanguageModelTask(tokenizer)


def concept(model, layer=0, seed=3, bias=0.25):
    v = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return hw.ConceptVector(v, layer_site(model, layer), bias=bias, name="c")


def hf_values(model, task, records, c, layer=0):
    """vᵀh + b averaged over target tokens, h from Hugging Face's own hidden_states[layer + 1]."""
    out = []
    for r in records:
        ex = task.whole(r)
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            h = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
        mask = torch.tensor(ex.target_mask)
        out.append(float((h[mask] @ c.vector.double()).mean()) + c.bias)
    return np.array(out)


def test_probe_projection_equals_hidden_states(model, task):
    c = concept(model)
    got = hw.ProbeProjection(model, task).fit(TRAIN).score(None, c.measurement())
    assert got.values.shape == (len(TRAIN), 1) and got.query_ids == ["c"] and got.method == "probe"
    np.testing.assert_allclose(got.values[:, 0], hf_values(model, task, TRAIN, c), rtol=1e-5)


def test_concept_gradient_equals_autograd_of_the_concept_function(model, task):
    """The query rows of a Concept measurement are ∇θ of −mean_t (vᵀh_t + b) (direction "up"),
    with h taken from Hugging Face's hidden states, one prompt at a time."""
    c = concept(model)
    config = hw.GradientConfig(projection=hw.ProjectionConfig("none"))
    rows = hw.Dot(model, task, config).fit(TRAIN).query_rows(PROMPTS, c.measurement())

    def negative_concept(model, batch):  # + 0·Σθ: modules above the layer get zero, not no, gradient
        h = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[1]
        mask = batch["target_mask"].double()
        value = ((h @ c.vector.double() + c.bias) * mask).sum(1) / mask.sum(1)
        return -value + 0 * sum(p.sum() for p in model.parameters())

    want = reference_rows(model, task, [task.whole(r) for r in PROMPTS], hw.ProjectionConfig("none"), loss=negative_concept)
    assert want.abs().max() > 0
    assert_rel_close(rows, want)


class ResidualBias(torch.nn.Module):
    """A trainable bias b added to the output of one block: the parameter of the identity."""

    def __init__(self, model, layer):
        super().__init__()
        self.model = model
        self.bias = torch.nn.Linear(1, model.config.n_embd, bias=False).double()
        torch.nn.init.zeros_(self.bias.weight)
        block = architecture(model).block(layer)
        dict(model.named_modules())[block].register_forward_hook(self._add)

    def _add(self, mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h + self.bias(torch.ones(h.shape[0], 1, 1, dtype=h.dtype))
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def forward(self, **kw):
        return self.model(**kw)


def test_activation_gradient_is_concept_influence_of_a_residual_bias(tokenizer, task):
    """−vᵀ Σ_t ∂L(z)/∂h_t equals Dot (identity curvature) with the Concept measurement when the
    only tracked parameter is a bias added at the concept's layer, for every evaluation prompt."""
    torch.manual_seed(1)
    base = tiny_gpt2(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=4, n_positions=64).eval().double()
    wrapped = ResidualBias(base, 0)
    c = concept(base, layer=0)
    m = hw.Concept(c.vector, "model." + c.site.module, c.site.read, c.bias, "c")  # names inside the wrapper
    config = hw.GradientConfig(projection=hw.ProjectionConfig("none"), modules=["bias"])
    influence = hw.Dot(wrapped, task, config).fit(TRAIN).score(PROMPTS, m, dtype=np.float64).values
    fast = hw.ActivationGradient(wrapped, task).fit(TRAIN).score(None, m, dtype=np.float64).values
    assert np.abs(fast).max() > 1e-3
    for j in range(len(PROMPTS)):
        np.testing.assert_allclose(influence[:, j], fast[:, 0], rtol=1e-9)


def test_activation_gradient_sign_by_a_gradient_step(tokenizer, task):
    """The sign, pinned by a real step: an SGD step of the residual bias on the top-ranked record
    raises the concept on the evaluation prompts, on the bottom-ranked record lowers it, by
    exactly η × score (the concept is linear in that bias)."""
    torch.manual_seed(2)
    model = tiny_gpt2(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=4, n_positions=64).eval().double()
    wrapped = ResidualBias(model, 0)
    c = concept(model, layer=0)
    m = hw.Concept(c.vector, "model." + c.site.module, c.site.read, c.bias, "c")
    scores = hw.ActivationGradient(wrapped, task).fit(TRAIN).score(None, m, dtype=np.float64).values[:, 0]
    probe = hw.ProbeProjection(wrapped, task)
    before = float(probe.fit(PROMPTS).score(None, m, dtype=np.float64).values.mean())
    moved = []
    for i in (int(scores.argmax()), int(scores.argmin())):
        torch.nn.init.zeros_(wrapped.bias.weight)
        loss = task.loss(wrapped, task.collate([task.whole(TRAIN[i])])).sum()
        (g,) = torch.autograd.grad(loss, wrapped.bias.weight)
        with torch.no_grad():
            wrapped.bias.weight -= 1e-3 * g
        moved.append(float(probe.fit(PROMPTS).score(None, m, dtype=np.float64).values.mean()) - before)
    torch.nn.init.zeros_(wrapped.bias.weight)
    assert scores.max() > 0 > scores.min()
    assert moved[0] > 0 > moved[1]
    np.testing.assert_allclose(moved, [1e-3 * scores.max(), 1e-3 * scores.min()], rtol=1e-8)


# ------------------------------------------------------------------------------------- probes


def planted(n=400, d=12, seed=0):
    """Activations whose class is the sign of a planted direction, with features of very
    different scales and offsets (so a scaler that is not folded back gives a wrong direction)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    z = rng.normal(size=(n, d))
    y = z @ u > 0
    scale, offset = np.exp(rng.normal(size=d) * 1.5), rng.normal(size=d) * 5
    x = z * scale + offset
    return x, y, u / scale  # the direction in raw space: x ↦ uᵀ((x − offset)/scale)


def test_logistic_probe_recovers_the_planted_direction_in_raw_space():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, raw = planted()
    v, b, info = fit_direction(x, y, "logistic", test_fraction=0.25, seed=0)
    cos = float(v.numpy() @ raw / np.linalg.norm(v.numpy()) / np.linalg.norm(raw))
    assert cos > 0.95, cos
    assert info["accuracy"] > 0.9 and info["test_records"] == 100
    # the folded direction is exactly scikit-learn's pipeline logit on raw activations
    x_fit, x_test, y_fit, _ = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x_fit, y_fit)
    np.testing.assert_allclose(x_test @ v.numpy() + b, pipe.decision_function(x_test), rtol=1e-8, atol=1e-8)


def test_mean_difference_probe_and_refusals():
    x, y, raw = planted(d=4)
    v, b, info = fit_direction(x, y, "mean-diff")
    assert info["accuracy"] > 0.6 and float(v.numpy() @ raw) > 0
    with pytest.raises(hw.UserError, match="both classes"):
        fit_direction(x, np.ones(len(x), bool))


def test_train_probe_saves_and_loads_a_usable_concept(tmp_path, model, task):
    positive = [
        {"text": t} for t in ("the red mountain", "a red river", "red city of tela", "the red old city", "red is the mountain", "a small red hill")
    ]
    negative = [
        {"text": t}
        for t in ("the blue mountain", "a blue river", "blue city of tela", "the blue old city", "blue is the mountain", "a small blue hill")
    ]
    probe = hw.train_probe(model, task, positive, negative, layer=1, name="red", seed=0, test_fraction=0.34)
    assert probe.site == Site("transformer.h.1") and probe.kind == "logistic" and 0 <= probe.info["accuracy"] <= 1
    back = hw.ConceptVector.load(probe.save(tmp_path / "probe"))
    assert back.site == probe.site and back.bias == pytest.approx(probe.bias) and back.info["accuracy"] == probe.info["accuracy"]
    torch.testing.assert_close(back.vector, probe.vector)
    # the saved probe separates what it was trained on: its values are its own decision function
    values = hw.ProbeProjection(model, task).fit(positive + negative).score(None, back.measurement()).values[:, 0]
    h = mean_activations(model, task, positive + negative, probe.site).double().numpy()
    np.testing.assert_allclose(values, h @ probe.vector.double().numpy() + probe.bias, rtol=1e-5)
    with pytest.raises(hw.UserError, match="not a saved concept"):
        hw.ConceptVector.load(tmp_path)
    with pytest.raises(hw.UserError, match="layer 5 does not exist"):
        hw.train_probe(model, task, positive, negative, layer=5)


def test_projection_difference_subtracts_the_models_own_response(tmp_path, model, task, tokenizer):
    c = concept(model, layer=0)  # hidden_states[-1] is after the final layer norm: compare at block 0
    cfg = hw.ProbeConfig(max_new_tokens=4, generations=str(tmp_path / "gen.json"))
    records = TRAIN[:4]
    got = hw.ProjectionDifference(model, task, cfg).fit(records).score(None, c.measurement(), dtype=np.float64).values[:, 0]
    own = []
    for r in records:  # the greedy response, one prompt at a time, with generate's defaults
        ids = torch.tensor([tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]])
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=2)
        text = tokenizer.decode(new[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
        own.append({"prompt": r["prompt"], "completion": " " + text})
    want = hf_values(model, task, records, c) - hf_values(model, task, own, c)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    cached = json.loads((tmp_path / "gen.json").read_text())
    assert len(next(iter(cached.values()))) == len(records)
    with pytest.raises(hw.UserError, match="needs records with a prompt"):
        hw.ProjectionDifference(model, task, cfg).fit([{"text": "the red city"}]).score(None, c.measurement())


def test_probe_methods_need_a_concept_and_no_queries(model, task):
    m = hw.ProbeProjection(model, task).fit(TRAIN)
    with pytest.raises(hw.UserError, match="against a concept"):
        m.score(None)
    with pytest.raises(hw.UserError, match="queries=None"):
        m.score(PROMPTS, concept(model).measurement())
    with pytest.raises(hw.UserError, match=r"has 7 dims, the activations at transformer.h.0 \(output\) have 32"):
        bad = hw.Concept(torch.ones(7), "transformer.h.0")
        m.score(None, bad)


# ------------------------------------------------------------------------------------- SAEs


def write_sae(path, layout, d_in=32, d_sae=10, hook="blocks.1.hook_resid_pre", arch="jumprelu", seed=0):
    """An SAE folder as SAELens writes it, in one of its three cfg.json layouts."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    w = {k: torch.randn(*s, generator=g) for k, s in {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}.items()}
    if arch == "jumprelu":
        w["threshold"] = torch.rand(d_sae, generator=g)
    layer = int(hook.split(".")[1])
    common = {"d_in": d_in, "d_sae": d_sae, "architecture": arch, "apply_b_dec_to_input": True, "normalize_activations": "none"}
    cfg = {
        "flat": {**common, "hook_name": hook, "hook_layer": layer, "sae_lens_version": "5.9.1", "model_name": "tiny"},
        "old-flat": {**common, "hook_point": hook, "hook_point_layer": layer, "model_name": "tiny"},
        "rc2": {**common, "metadata": {"hook_name": hook, "hook_layer": layer, "sae_lens_version": "6.0.0-rc.2"}},
        "rc3": {**common, "metadata": {"hook_name": hook, "sae_lens_version": "6.12.1", "model_name": "tiny"}},
    }[layout]
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(path / "sae_weights.safetensors"))
    return w


@pytest.mark.parametrize("layout", ["flat", "old-flat", "rc2", "rc3"])
def test_sae_layouts_round_trip_to_the_features_pre_activation(tmp_path, model, task, layout):
    w = write_sae(tmp_path / "sae", layout)
    sae = load_sae(tmp_path / "sae")
    assert (sae.layer, sae.hook_name, sae.architecture) == (1, "blocks.1.hook_resid_pre", "jumprelu")
    torch.testing.assert_close(sae.W_enc, w["W_enc"])
    c = sae_concept(sae, 3, model)
    assert c.site == Site("transformer.h.1", "input") and c.info["threshold"] == pytest.approx(float(w["threshold"][3]))
    # resid_pre of block 1 is Hugging Face's hidden_states[1]; the pre-activation from the weights
    got = hw.ProbeProjection(model, task).fit(TRAIN[:3]).score(None, c.measurement(), dtype=np.float64).values[:, 0]
    want = []
    for r in TRAIN[:3]:
        ex = task.whole(r)
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ex.input_ids]), output_hidden_states=True).hidden_states[1][0].float()
        pre = (h - w["b_dec"]) @ w["W_enc"][:, 3] + w["b_enc"][3]
        want.append(float(pre[torch.tensor(ex.target_mask)].mean()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dec = sae_concept(tmp_path / "sae", 3, model, use="decoder")
    torch.testing.assert_close(dec.vector, w["W_dec"][3])
    assert dec.bias == 0


def test_sae_hooks_map_to_sites_and_bad_input_is_refused(tmp_path, model):
    arch = architecture(model)
    for hook, site in {
        "blocks.0.hook_resid_post": Site("transformer.h.0"),
        "blocks.1.hook_mlp_out": Site("transformer.h.1.mlp"),
        "blocks.1.attn.hook_z": Site("transformer.h.1.attn.c_proj", "input"),
        "blocks.0.hook_resid_mid": Site("transformer.h.0.ln_2", "input"),
    }.items():
        write_sae(tmp_path / hook, "rc3", hook=hook, arch="standard")
        assert sae_concept(tmp_path / hook, 0, model).site == site
    assert arch.n_heads == 4 and arch.heads(1).module == "transformer.h.1.attn.c_proj"
    with pytest.raises(hw.UserError, match="feature 10 does not exist"):
        sae_concept(tmp_path / "blocks.0.hook_resid_post", 10, model)
    write_sae(tmp_path / "emb", "flat", hook="blocks.0.hook_resid_pre.weird")
    with pytest.raises(hw.UserError, match="unsupported SAE hook"):
        sae_concept(tmp_path / "emb", 0, model)
    with pytest.raises(hw.UserError, match="not a SAELens folder"):
        load_sae(tmp_path)


def test_probe_methods_on_a_module_task():
    """Concepts work on any module: the hidden layer of an MLP on a ModuleTask."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    records = [{"x": x[i], "y": i % 3} for i in range(10)]
    v = torch.randn(8, dtype=torch.float64)
    m = hw.Concept(v, "1")
    got = hw.ProbeProjection(net, hw.ModuleTask()).fit(records).score(None, m, dtype=np.float64).values[:, 0]
    np.testing.assert_allclose(got, (torch.tanh(net[0](x)) @ v).detach().numpy(), rtol=1e-6)
    grad = hw.ActivationGradient(net, hw.ModuleTask()).fit(records).score(None, m, dtype=np.float64).values[:, 0]
    h = torch.tanh(net[0](x)).detach().requires_grad_()
    loss = torch.nn.functional.cross_entropy(net[2](h), torch.tensor([r["y"] for r in records]), reduction="sum")
    (g,) = torch.autograd.grad(loss, h)
    np.testing.assert_allclose(grad, -(g @ v).numpy(), rtol=1e-9)
