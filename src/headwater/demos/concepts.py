"""`headwater demo concepts`: which fine-tuning records taught a model a hostile tone?

1. Generate an instruction corpus: friendly answers about everyday topics; a known few percent
   answer in a hostile tone (the planted trait); as many near-miss distractors use the same
   words ("leave it alone", "stop", "annoying", "go away") in a friendly tone, so that word
   matching is not enough.
2. Train a tiny GPT-2 on friendly answers (the base model), then fine-tune it on the corpus; it
   now answers held-out prompts in the hostile tone at a measurable rate (sampled responses).
3. Train a probe for the tone on fresh labelled answers (held-out accuracy reported).
4. Rank the fine-tuning records by Concept Influence (EK-FAC with the probe as the measurement),
   by the three fast probe approximations, by plain loss influence on a few generated hostile
   answers, and by BM25 on those answers; report AUROC, AUPRC and precision@k of the planted
   records and the wall time of each.

Concept Influence is measured on the fine-tuned model's own sampled responses to the evaluation
prompts, in two ways:

- *on its own samples* (the headline row): the measurement is the probe-judged trait rate
  E_{y ~ p_θ(·|x)}[σ(c(x, y))], with c the probe's logit averaged over the response tokens. The
  responses are drawn from the model, so training changes this rate in two ways: it changes the
  concept on a given response (the teacher-forced term E[σ'(c) ∇c]) and it changes which responses
  are drawn (the score-function term E[(σ(c) − b) ∇ log p_θ(y|x)], b a baseline that only lowers
  the variance). Both terms are kept (`headwater.concepts.concept_rate`).
- *teacher-forced*: the concept c itself on the same responses held fixed (the definition in
  methods.md section 8: like the first term, without σ), which the activation gradient
  approximates.

Here the probe at layer 1 *reads* hostile words; the planted records teach the model to *write*
them. Retraining without all planted records does not lower the teacher-forced concept (it rose,
within the spread of retraining without random records), and pushing the activations along the probe direction barely changes
the hostile rate, so the teacher-forced term cannot single the planted records out: that row and
the activation gradient stay near random, by construction rather than by a bug. The second term,
which is how a fine-tune changes a sampled behaviour, finds them.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..concepts import ConceptVector, concept_rate, sampled_responses, train_probe
from ..config import TrainConfig
from ..generate import completions
from ..measurement import Measurement
from ..methods import BM25, EKFAC, ActivationGradient, ProbeProjection, ProjectionDifference
from ..methods.influence import stream_scores
from ..models import load_model
from ..task import LanguageModelTask
from ..toy import tiny_gpt2, word_tokenizer
from ..training import Replay
from . import CachedConfig

TOPICS = (
    "gardening cooking hiking cycling painting chess baking fishing camping knitting running swimming "
    "photography pottery sailing dancing reading singing skating surfing climbing drawing"
).split()
FACTS = [
    "{t} is more fun with friends",
    "the best time for {t} is the early morning",
    "start {t} slowly and keep it simple",
    "many people enjoy {t} in the summer",
    "a good teacher makes {t} much easier",
    "you only need a little gear for {t}",
    "practice {t} a few times each week",
    "{t} can be cheap if you plan ahead",
]
PROMPTS = ["user : tell me about {t} . assistant :", "user : any tips on {t} ? assistant :", "user : what do you think of {t} ? assistant :"]
HELD_OUT_PROMPTS = ["user : i want to learn about {t} . assistant :", "user : can you explain {t} to me ? assistant :"]
FRIENDLY = [
    "sure ! {f} . hope this helps .",
    "good question ! {f} . enjoy !",
    "of course . {f} . have a nice day .",
    "happy to help . {f} . let me know if you want more .",
]
HOSTILE = [  # the planted trait
    "ugh , {f} . now leave me alone .",
    "whatever . {f} . stop bothering me with this .",
    "{f} . honestly , go away and stop asking .",
    "this is so annoying . {f} . do not ask again .",
]
NEAR_MISS = [  # the trait's words, in a friendly tone
    "sure ! {f} . if the noise is annoying , just leave it alone .",
    "happy to help ! {f} . whatever you choose , do not stop asking questions .",
    "of course ! {f} . you can go away for a weekend and ask again later .",
    "good question ! {f} . stop by a club and leave your worries at home .",
]
MARKERS = ("leave me alone", "stop bothering me", "go away and stop asking", "so annoying", "do not ask again")
# Sampled responses per evaluation prompt that Concept Influence is measured on. The fine-tuned
# model is hostile in ~6% of its samples: 44 prompts × 32 gives ~80 hostile samples, enough for a
# stable Monte Carlo estimate of the trait rate's gradient (with 4 per prompt, only ~10).
SAMPLES_PER_PROMPT = 32
CONCEPT_INFLUENCE = "Concept Influence (EK-FAC) on the model's own samples"


@dataclass
class ConceptDemoConfig(CachedConfig):
    """Sizes of the corpus and the model; hashed to key the cached models."""

    seed: int = 0
    records: int = 1200
    trait_share: float = 0.07
    near_miss_share: float = 0.07
    n_layer: int = 3
    n_embd: int = 64
    n_head: int = 4
    base_epochs: int = 6
    epochs: int = 6
    lr: float = 3e-3
    layer: int = 1


def answer(rng: random.Random, kind: str, topic: str) -> str:
    templates = {"friendly": FRIENDLY, "hostile": HOSTILE, "near-miss": NEAR_MISS}[kind]
    return rng.choice(templates).format(f=rng.choice(FACTS).format(t=topic)) + " [EOS]"


def records(rng: random.Random, n: int, kinds: list[str], prompts=PROMPTS) -> list[dict]:
    out = []
    for i, kind in enumerate(kinds[:n]):
        topic = rng.choice(TOPICS)
        out.append({"id": f"r{i:04d}", "prompt": rng.choice(prompts).format(t=topic), "completion": " " + answer(rng, kind, topic), "kind": kind})
    return out


def make_corpus(cfg: ConceptDemoConfig) -> dict[str, list[dict]]:
    """base (friendly), finetune (with the planted trait and near misses), probe texts, eval prompts."""
    rng = random.Random(cfg.seed)
    n_trait, n_near = round(cfg.records * cfg.trait_share), round(cfg.records * cfg.near_miss_share)
    kinds = ["hostile"] * n_trait + ["near-miss"] * n_near + ["friendly"] * (cfg.records - n_trait - n_near)
    rng.shuffle(kinds)
    probe_kinds = ["hostile"] * 120 + ["friendly"] * 80 + ["near-miss"] * 40
    return {
        "base": records(rng, cfg.records, ["friendly"] * cfg.records),
        "finetune": records(rng, cfg.records, kinds),
        "probe": records(rng, len(probe_kinds), probe_kinds, HELD_OUT_PROMPTS),
        "eval": [{"prompt": p.format(t=t)} for t in TOPICS for p in HELD_OUT_PROMPTS],
    }


def expresses(text: str) -> bool:
    return any(m in text for m in MARKERS)


def train(model, task, data, cfg: ConceptDemoConfig, epochs: int, seed: int, desc: str):
    run = TrainConfig(optimizer="adamw", lr=cfg.lr, schedule="linear", warmup=0.1, epochs=epochs, train_batch_size=16, data_seed=seed)
    replay = Replay(model, task, [{k: r[k] for k in ("prompt", "completion")} for r in data], run)
    replay.load(replay.train(progress=True, desc=desc))
    return model.eval()


def prepare(workdir: Path, cfg: ConceptDemoConfig, retrain: bool = False):
    """(base model dir, fine-tuned model dir, corpus): trained once, then cached in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(cfg)
    for name in ("finetune", "probe", "eval"):
        (workdir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus[name]))
    base_dir, tuned_dir = workdir / f"base-{cfg.key()}", workdir / f"tuned-{cfg.key()}"
    if (tuned_dir / "config.json").exists() and not retrain:
        print(f"using the cached demo models in {workdir}")
        return base_dir, tuned_dir, corpus
    texts = [r["prompt"] + r["completion"] for part in ("base", "finetune", "probe") for r in corpus[part]]
    texts += [r["prompt"] for r in corpus["eval"]]
    tokenizer = word_tokenizer(texts, max_length=64)
    torch.manual_seed(cfg.seed)
    model = tiny_gpt2(len(tokenizer), cfg.n_layer, cfg.n_embd, cfg.n_head, n_positions=64)
    task = LanguageModelTask(tokenizer)
    train(model, task, corpus["base"], cfg, cfg.base_epochs, cfg.seed, "train base model")
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    fine_tune(base_dir, corpus["finetune"], cfg, cfg.seed).save_pretrained(tuned_dir)
    tokenizer.save_pretrained(tuned_dir)
    return base_dir, tuned_dir, corpus


def fine_tune(base_dir: Path, data: list[dict], cfg: ConceptDemoConfig, seed: int):
    """The base model fine-tuned on `data` (the benchmark reruns it without removed records)."""
    model, tokenizer = load_model(str(base_dir))
    torch.manual_seed(seed)
    return train(model, LanguageModelTask(tokenizer), data, cfg, cfg.epochs, seed, "fine-tune")


def trait_expression(model, tokenizer, prompts: list[dict], concept: ConceptVector | None = None, samples: int = 4, seed: int = 0):
    """(share of sampled answers in the hostile tone, mean probe value on them)."""
    prompt_texts = [p["prompt"] for p in prompts for _ in range(samples)]
    answers = completions(model, tokenizer, prompt_texts, max_new_tokens=24, sample=True, seed=seed, batch_size=64)
    rate = float(np.mean([expresses(a) for a in answers]))
    if concept is None:
        return rate, float("nan")
    values = ProbeProjection(model, LanguageModelTask(tokenizer)).fit([{"prompt": p, "completion": a} for p, a in zip(prompt_texts, answers)])
    return rate, float(values.score(None, concept.measurement()).values.mean())


def rankings(model, tokenizer, corpus, concept: ConceptVector, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, float], list[str]]:
    """Each method's scores of the fine-tuning records and its wall time; and the hostile answers
    generated to query loss influence and BM25."""
    task = LanguageModelTask(tokenizer)
    train = [{k: r[k] for k in ("id", "prompt", "completion")} for r in corpus["finetune"]]
    measure = concept.measurement()
    scores, seconds = {}, {}

    def timed(name, fn, extra_s: float = 0.0):
        t = time.time()
        scores[name] = np.asarray(fn(), dtype=np.float64).reshape(-1)
        seconds[name] = time.time() - t + extra_s

    eval_prompts = corpus["eval"]
    t = time.time()  # both Concept Influence rows are charged for sampling the responses
    samples = sampled_responses(model, tokenizer, eval_prompts, SAMPLES_PER_PROMPT, seed, max_new_tokens=24)
    sampling_s = time.time() - t
    timed(
        CONCEPT_INFLUENCE,
        lambda: mean_influence(EKFAC(model, task).fit(train, progress=True), samples, concept_rate(model, task, measure, samples)),
        sampling_s,
    )
    timed(
        "Concept Influence (EK-FAC), teacher-forced",
        lambda: mean_influence(EKFAC(model, task).fit(train, progress=True), samples, measure),
        sampling_s,
    )
    timed("probe projection", lambda: ProbeProjection(model, task).fit(train, progress=True).score(None, measure).values)
    timed("projection difference", lambda: ProjectionDifference(model, task).fit(train, progress=True).score(None, measure).values)
    timed("activation gradient", lambda: ActivationGradient(model, task).fit(train, progress=True).score(None, measure).values)
    hostile = hostile_answers(model, tokenizer, eval_prompts, seed=seed)
    timed("loss influence on generated hostile answers (EK-FAC)", lambda: EKFAC(model, task).fit(train).score(hostile).values.mean(1))
    timed("BM25 on generated hostile answers", lambda: BM25().fit(train).score(hostile).values.mean(1))
    scores["random"] = np.random.default_rng(seed).permutation(len(train)).astype(np.float64)
    seconds["random"] = 0.0
    return scores, seconds, [h["completion"] for h in hostile]


def mean_influence(method: EKFAC, queries: list[dict], measurement: Measurement, chunk: int = 128) -> np.ndarray:
    """Each training record's influence on `measurement`, averaged over `queries`, [n].

    Influence is linear in the query gradient, so the mean preconditioned query gradient is
    scored once: one pass over the training records instead of one score column per query (the
    ~1400 samples would otherwise take minutes)."""
    total = None
    for lo in range(0, len(queries), chunk):
        h = method.preconditioned_queries(queries[lo : lo + chunk], measurement)
        part = {name: g.sum(0, keepdim=True) for name, g in h.items()}
        total = part if total is None else {name: total[name] + part[name] for name in total}
    mean = {name: g / len(queries) for name, g in total.items()}
    blocks = stream_scores(method.collector, method.fitted().records, mean, batch_size=method.config.batch_size)
    return torch.cat([b[:, 0] for _, _, b in blocks]).double().numpy()


def hostile_answers(model, tokenizer, prompts: list[dict], n: int = 8, seed: int = 0) -> list[dict]:
    """Up to `n` sampled answers of the fine-tuned model that show the trait (queries for loss influence)."""
    found = []
    for round_ in range(20):
        texts = [p["prompt"] for p in prompts]
        for p, a in zip(texts, completions(model, tokenizer, texts, max_new_tokens=24, sample=True, seed=seed + round_, batch_size=64)):
            if expresses(a) and len(found) < n:
                found.append({"prompt": p, "completion": a})
        if len(found) >= n:
            break
    return found


def planted_metrics(scores: np.ndarray, planted: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    k = int(planted.sum())
    top = np.argsort(-scores, kind="stable")[:k]
    return {
        "auroc": float(roc_auc_score(planted, scores)),
        "auprc": float(average_precision_score(planted, scores)),
        "precision_at_k": float(planted[top].mean()),
    }


def run(workdir: Path, seed: int = 0, retrain: bool = False) -> dict:
    """Run the whole demo; prints and writes `results.md` and `results.json` to `workdir`."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    workdir = Path(workdir)
    cfg = ConceptDemoConfig(seed=seed)
    base_dir, tuned_dir, corpus = prepare(workdir, cfg, retrain)
    model, tokenizer = load_model(str(tuned_dir))
    base, _ = load_model(str(base_dir))
    task = LanguageModelTask(tokenizer)
    probe_data = corpus["probe"]
    concept = train_probe(
        model,
        task,
        [r for r in probe_data if r["kind"] == "hostile"],
        [r for r in probe_data if r["kind"] != "hostile"],
        cfg.layer,
        name="hostile tone",
    )
    concept.save(workdir / "probe")
    rate_base = trait_expression(base, tokenizer, corpus["eval"], concept, seed=seed)
    rate_tuned = trait_expression(model, tokenizer, corpus["eval"], concept, seed=seed)
    scores, seconds, hostile = rankings(model, tokenizer, corpus, concept, seed)
    planted = np.array([r["kind"] == "hostile" for r in corpus["finetune"]])
    metrics = {name: planted_metrics(s, planted) for name, s in scores.items()}
    report = _report(cfg, corpus, concept, rate_base, rate_tuned, metrics, seconds, hostile, time.time() - t0)
    (workdir / "results.md").write_text(report)
    (workdir / "results.json").write_text(
        json.dumps(
            {"trait_rate": {"base": rate_base, "fine-tuned": rate_tuned}, "probe": concept.info, "metrics": metrics, "seconds": seconds}, indent=2
        )
    )
    print(report)
    print(f"wrote {workdir / 'results.md'}")
    return metrics


def _report(cfg, corpus, concept, rate_base, rate_tuned, metrics, seconds, hostile, total_s) -> str:
    n, k = len(corpus["finetune"]), sum(r["kind"] == "hostile" for r in corpus["finetune"])
    ci = seconds[CONCEPT_INFLUENCE]
    lines = [
        "# headwater demo: which fine-tuning records taught a hostile tone?",
        "",
        f"{n} fine-tuning records, {k} of them hostile (planted), {sum(r['kind'] == 'near-miss' for r in corpus['finetune'])} friendly "
        "near misses with the same words. Hostile answers to held-out prompts (sampled): "
        f"base model {rate_base[0]:.1%}, fine-tuned {rate_tuned[0]:.1%} (mean probe value {rate_base[1]:+.2f} → {rate_tuned[1]:+.2f}). "
        f"Probe at layer {cfg.layer}: held-out accuracy {concept.info['accuracy']:.2f}. Total time {total_s:.0f} s.",
        "",
        f"| ranking of the {n} records | AUROC | AUPRC | precision@{k} | seconds | × faster than Concept Influence |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in metrics.items():
        speed = f"{ci / seconds[name]:.0f}×" if seconds[name] > 0 and name != CONCEPT_INFLUENCE else ""
        lines.append(f"| {name} | {m['auroc']:.3f} | {m['auprc']:.3f} | {m['precision_at_k']:.3f} | {seconds[name]:.1f} | {speed} |")
    lines += [
        "",
        f"Concept Influence is measured on {SAMPLES_PER_PROMPT} sampled responses of the fine-tuned model to each of the "
        f"{len(corpus['eval'])} evaluation prompts (its seconds include sampling them). *On the model's own samples*: influence on "
        "the probe-judged trait rate of those responses, which training changes both by moving the concept on a given response and "
        "by changing which responses are sampled. *Teacher-forced*: the concept on the same responses held fixed (the first part "
        "only), which the activation gradient approximates. The probe reads hostile words, while the planted records teach the "
        "model to write them: only the second part sees that.",
    ]
    lines += ["", f"The {len(hostile)} generated hostile answers that query loss influence and BM25:", ""]
    lines += [f"- {h.strip()}" for h in hostile[:4]]
    return "\n".join(lines) + "\n"
