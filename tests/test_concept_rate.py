"""The concept's rate on the model's own samples: its per-sample measurement, averaged over the
model's distribution of responses, has exactly the gradient of the rate itself (the
score-function identity), checked by enumerating every one-token response; and the sampled
responses come from the model."""

import torch

import headwater as hw
from headwater.architecture import layer_site
from headwater.concepts import concept_rate, sampled_responses
from headwater.task import collated_batches, whole_examples
from headwater.toy import tiny_gpt2, word_tokenizer

WORDS = "red blue green sunny river city mountain old".split()
PROMPT = "the river of vask is"


def setup():
    tok = word_tokenizer([PROMPT + " " + " ".join(WORDS)])
    torch.manual_seed(0)
    model = tiny_gpt2(len(tok), n_layer=2, n_embd=16, n_head=2, n_positions=32).eval().double()
    v = torch.randn(16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    concept = hw.ConceptVector(v, layer_site(model, 0), bias=0.3, name="c").measurement()
    return model, tok, hw.LanguageModelTask(tok), concept


def test_the_rate_measurements_gradient_is_the_rates_gradient():
    model, tok, task, concept = setup()
    responses = [{"prompt": PROMPT, "completion": " " + w} for w in WORDS]  # every one-token response in WORDS
    batch = next(collated_batches(task, whole_examples(task, responses), len(responses)))
    params = [p for p in model.parameters() if p.requires_grad]
    # The rate over these responses, exactly: Σ_y p(y|x) σ(c(x, y)).
    log_p = -task.loss(model, batch)
    exact = (log_p.exp() * torch.sigmoid(concept(task, model, batch))).sum()
    want = torch.autograd.grad(exact, params)
    # The measurement on each response, weighted by its (fixed) probability as sampling would.
    rate = concept_rate(model, task, concept, responses, baseline=0.0)
    got = torch.autograd.grad((log_p.detach().exp() * rate(task, model, batch)).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert max(float(w.abs().max()) for w in want) > 1e-6
    # Teacher-forced, the concept alone misses the second term: its gradient is not the rate's.
    forced = torch.autograd.grad((log_p.detach().exp() * torch.sigmoid(concept(task, model, batch))).sum(), params, allow_unused=True)
    forced = [torch.zeros_like(w) if f is None else f for f, w in zip(forced, want)]  # layers above the concept: no gradient
    assert max(float((f - w).abs().max()) for f, w in zip(forced, want)) > 1e-3 * max(float(w.abs().max()) for w in want)


def test_sampled_responses_are_the_models_samples():
    model, tok, task, _ = setup()
    samples = sampled_responses(model, tok, [{"prompt": PROMPT}], n=400, seed=0, max_new_tokens=1)
    assert len(samples) == 400 and {s["prompt"] for s in samples} == {PROMPT}
    with torch.no_grad():
        ids = tok(PROMPT, return_tensors="pt").input_ids
        p = model(ids).logits[0, -1].softmax(-1)
    top = int(p.argmax())
    share = sum(s["completion"].strip() == tok.decode([top]).strip() for s in samples) / len(samples)
    assert abs(share - float(p[top])) < 4 * (float(p[top]) * (1 - float(p[top])) / 400) ** 0.5 + 0.01
