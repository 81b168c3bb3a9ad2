"""`headwater demo facts`: fact tracing on a synthetic corpus, end to end, on a CPU, no downloads.

1. Generate fictional entities with attributes. Each fact is stated in a few documents with
   different templates, surrounded by filler sentences; other documents are distractors, and
   question/answer documents teach the question format for half of the facts.
2. Train a tiny GPT-2 on it with `Replay` (cached in the work directory after the first run).
3. Build indexes (document, sentence and token rows; plain and Adam-normalised) and attribute
   held-out questions about the other half of the facts.
4. Report Recall@10 and MRR of the documents known to state each fact, beside BM25 and random.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..build import build_index
from ..config import BuildConfig, ProjectionConfig, TrackStarConfig, TrainConfig
from ..methods import BM25, Cosine, TrackStar
from ..metrics import ranking_metrics
from ..models import load_model
from ..scores import Scores
from ..task import LanguageModelTask
from ..toy import tiny_gpt2, word_tokenizer
from ..training import Replay
from . import CachedConfig

ATTRIBUTES = {
    "capital": (
        ["The capital of {e} is {v} .", "{v} is the capital city of {e} .", "In {e} , the seat of government is {v} ."],
        "What is the capital of {e} ?",
    ),
    "colour": (
        ["The flag of {e} is {v} .", "{e} flies a {v} flag .", "People in {e} dress in {v} , the colour of their flag ."],
        "What colour is the flag of {e} ?",
    ),
    "animal": (
        ["The national animal of {e} is the {v} .", "{e} chose the {v} as its national animal .", "The {v} is the animal that stands for {e} ."],
        "Which animal stands for {e} ?",
    ),
    "founder": (["{e} was founded by {v} .", "{v} founded {e} long ago .", "The founder of {e} was {v} ."], "Who founded {e} ?"),
}
COLOURS = "red blue green yellow purple orange white black silver golden crimson teal".split()
ANIMALS = "fox owl bear wolf heron otter lynx crane stag hare falcon badger".split()
FILLER = [
    "Travellers say the roads are long and quiet .",
    "Many visitors arrive in the spring when the weather is mild .",
    "The markets open early and close before the evening .",
    "Local stories are told in the winter by the fire .",
    "Rivers and hills shape the land around the towns .",
    "Old songs are still sung at the harvest festival .",
    "The people are known for their patience and their bread .",
    "Trade with the neighbours has grown over the years .",
    "Children learn to swim in the lakes during the summer .",
    "The libraries hold maps that few people read .",
]
DISTRACTORS = [
    "{e} is a small land with many villages .",
    "Scholars have written many books about {e} .",
    "The weather in {e} changes quickly in the autumn .",
]


@dataclass
class DemoConfig(CachedConfig):
    """Sizes of the synthetic corpus and the model; hashed to key the model cache."""

    seed: int = 0
    entities: int = 40
    docs_per_fact: int = 3
    filler_sentences: int = 3
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    epochs: int = 30
    lr: float = 3e-3
    schedule: str = "linear"
    train_batch: int = 16


def _names(rng: random.Random, n: int, syllables: int) -> list[str]:
    parts = "ka lo mi zor vel tan qui ren sa bo lu dri fen gor ith ul mar nes pol vy".split()
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(parts) for _ in range(syllables)).capitalize())
    return sorted(out)


def entities_and_values(rng: random.Random, cfg: DemoConfig, named: tuple[str, ...] = ("capital", "founder")) -> tuple[list[str], dict]:
    """`cfg.entities` entity names and each relation's possible values: generated names for the
    `named` relations (the first drawn from `rng`, the others from their own seeds), colours, animals."""
    entities = _names(rng, cfg.entities, 3)
    values = {"colour": COLOURS, "animal": ANIMALS}
    for i, relation in enumerate(named):
        values[relation] = _names(rng if i == 0 else random.Random(cfg.seed + i), cfg.entities, 2)
    return entities, values


def make_corpus(cfg: DemoConfig) -> tuple[list[dict], list[dict]]:
    """(training documents, held-out questions). Each question lists the ids of the documents
    that state its fact (`relevant`)."""
    rng = random.Random(cfg.seed)
    entities, values = entities_and_values(rng, cfg)
    docs, facts = [], []
    for e in entities:
        for attr, (templates, question) in ATTRIBUTES.items():
            v = rng.choice(values[attr])
            fact = {"entity": e, "relation": attr, "value": v, "question": question.format(e=e), "docs": []}
            for t in rng.sample(templates, cfg.docs_per_fact):
                sentences = rng.sample(FILLER, cfg.filler_sentences)
                sentences.insert(rng.randrange(len(sentences) + 1), t.format(e=e, v=v))
                fact["docs"].append(len(docs))
                docs.append({"text": " ".join(sentences), "kind": "fact"})
            facts.append(fact)
        for t in DISTRACTORS:
            docs.append({"text": " ".join([t.format(e=e), *rng.sample(FILLER, cfg.filler_sentences)]), "kind": "distractor"})
    return held_out_questions(rng, docs, facts)


def held_out_questions(rng: random.Random, docs: list[dict], facts: list[dict]) -> tuple[list[dict], list[dict]]:
    """Half of the facts get a question/answer document that teaches the format (worded by the
    fact's `qa`, else its `question`); the other half become held-out questions (worded by
    `question`) that list the ids of the documents stating them (`docs`, positions in `docs`).
    Returns the shuffled, numbered documents and the questions."""
    rng.shuffle(facts)
    half = len(facts) // 2
    for f in facts[:half]:
        docs.append({"text": f"Q : {f.get('qa', f['question'])} A : {f['value']} .", "kind": "qa"})
    order = list(range(len(docs)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    width = max(4, len(str(len(docs))))
    docs = [{"id": f"doc{new:0{width}d}", **docs[old]} for new, old in enumerate(order)]
    questions = [
        {
            "id": f"q{i:03d}",
            "prompt": f"Q : {f['question']} A :",
            "completion": f" {f['value']}",
            "entity": f["entity"],
            "relation": f["relation"],
            "relevant": [docs[where[d]]["id"] for d in f["docs"]],
        }
        for i, f in enumerate(facts[half:])
    ]
    return docs, questions


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def prepare(workdir: Path, cfg: DemoConfig, retrain: bool = False, corpus=make_corpus) -> tuple[Path, list[dict], list[dict]]:
    """Write the corpus (`corpus(cfg)`) and train (or reuse) the model; returns (model dir, docs, questions)."""
    workdir.mkdir(parents=True, exist_ok=True)
    docs, questions = corpus(cfg)
    _write_jsonl(workdir / "train.jsonl", [{"id": d["id"], "text": d["text"]} for d in docs])
    _write_jsonl(workdir / "questions.jsonl", [{k: q[k] for k in ("id", "prompt", "completion")} for q in questions])
    corpus_key = hashlib.sha256("\n".join(d["text"] for d in docs).encode()).hexdigest()[:8]  # a changed generator retrains
    model_dir = workdir / f"model-{cfg.key()}-{corpus_key}"
    if (model_dir / "config.json").exists() and not retrain:
        print(f"using the cached demo model in {model_dir}")
        return model_dir, docs, questions
    texts = [d["text"] for d in docs] + [q["prompt"] + q["completion"] for q in questions]
    tokenizer = word_tokenizer(texts, max_length=128)
    torch.manual_seed(cfg.seed)
    model = tiny_gpt2(len(tokenizer), cfg.n_layer, cfg.n_embd, cfg.n_head, n_positions=128)
    run = TrainConfig(
        optimizer="adamw", lr=cfg.lr, schedule=cfg.schedule, warmup=0.1, epochs=cfg.epochs, train_batch_size=cfg.train_batch, data_seed=cfg.seed
    )
    replay = Replay(model, LanguageModelTask(tokenizer), docs, run)
    final = replay.train(progress=True, desc="train demo model")
    replay.load(final).eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    torch.save(replay.optimizer_state(final), model_dir / "optimizer.pt")
    return model_dir, docs, questions


def answered(model_dir: Path, questions: list[dict]) -> np.ndarray:
    """Whether each question's answer is the model's greedy next token, [q] bool."""
    model, tok = load_model(str(model_dir))
    hits = []
    with torch.no_grad():
        for q in questions:
            ids = tok(q["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
            pred = model(input_ids=ids).logits[0, -1].argmax().item()
            hits.append(pred == tok(q["completion"], add_special_tokens=False)["input_ids"][0])
    return np.array(hits, dtype=bool)


VARIANTS = [
    # (name, unit, optimizer-normalised, method)
    ("cosine, document rows", "document", False, lambda: Cosine()),
    ("TrackStar, document rows", "document", True, lambda: TrackStar()),
    ("cosine, sentence rows (max)", "sentence", False, lambda: Cosine()),
    ("TrackStar, sentence rows (max)", "sentence", True, lambda: TrackStar()),
    ("cosine, token rows (max)", "token", False, lambda: Cosine()),
    ("cosine, token rows (max), Adam-normalised", "token", True, lambda: Cosine()),
    ("TrackStar, token rows (max), no query mixing", "token", True, lambda: TrackStar(config=TrackStarConfig(mix="0"))),
    ("TrackStar, token rows (max)", "token", True, lambda: TrackStar()),
]


def run(workdir: Path, seed: int = 0, projection_dim: int | None = None, batch_size: int = 16, retrain: bool = False, top_k: int = 10) -> dict:
    """Run the whole demo; prints and writes `results.md` and `results.json` to `workdir`.
    `projection_dim` per tracked module defaults to the library's (`ProjectionConfig.dim`)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()  # keep the demo's own bars (training, builds) readable
    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    workdir = Path(workdir)
    cfg = DemoConfig(seed=seed)
    model_dir, docs, questions = prepare(workdir, cfg, retrain)
    doc_ids = [d["id"] for d in docs]
    relevant = [[doc_ids.index(r) for r in q["relevant"]] for q in questions]
    questions_file = str(workdir / "questions.jsonl")
    acc = float(answered(model_dir, questions).mean())
    projection = ProjectionConfig(seed=seed) if projection_dim is None else ProjectionConfig(dim=projection_dim, seed=seed)
    rankings: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for unit in ("document", "sentence", "token"):
        for normalised in (False, True):
            t = time.time()
            config = BuildConfig(
                model=str(model_dir),
                data=str(workdir / "train.jsonl"),
                projection=projection,
                batch_size=batch_size,
                unit=unit,
                storage_dtype="float32",
                optimizer_state=str(model_dir / "optimizer.pt") if normalised else None,
            )
            # named after the model and the projection: an index resumes only for the model and
            # projection it was built with
            name = f"{model_dir.name}-index-{unit}-{projection.kind}{projection.dim}{'-adamnorm' if normalised else ''}"
            index = build_index(workdir / name, config=config, resume=True)
            build_s = time.time() - t
            for vname, vunit, vnorm, method in VARIANTS:
                if (vunit, vnorm) == (unit, normalised):
                    t = time.time()
                    rankings[vname] = _order(method().fit(index).score(questions_file))
                    seconds[vname] = build_s + time.time() - t
    t = time.time()
    rankings["BM25"] = _order(BM25().fit(docs).score(questions_file))
    seconds["BM25"] = time.time() - t
    rng = np.random.default_rng(seed)
    rankings["random"] = np.stack([rng.permutation(len(docs)) for _ in questions])
    seconds["random"] = 0.0
    metrics = {name: ranking_metrics(order, relevant, k=top_k) for name, order in rankings.items()}
    report = _report(metrics, seconds, rankings, docs, questions, acc, top_k, time.time() - t0)
    (workdir / "results.md").write_text(report)
    (workdir / "results.json").write_text(json.dumps({"answer_accuracy": acc, "metrics": metrics, "seconds": seconds}, indent=2))
    print(report)
    print(f"wrote {workdir / 'results.md'}")
    return metrics


def _order(scores: Scores) -> np.ndarray:
    """Record positions per query, best first, [q, docs]."""
    return np.argsort(-scores.values.T, axis=1, kind="stable")


def _report(metrics, seconds, rankings, docs, questions, acc, k, total_s) -> str:
    lines = [
        "# headwater demo: fact tracing on a synthetic corpus",
        "",
        f"{len(docs)} training documents, {len(questions)} held-out questions; "
        f"the tiny GPT-2 answers {acc:.0%} of them correctly (greedy). Total time {total_s:.0f} s.",
        "",
        f"| method | Recall@{k} | MRR | seconds (build + query) |",
        "|---|---|---|---|",
    ]
    for name, m in metrics.items():
        lines.append(f"| {name} | {m['recall']:.3f} | {m['mrr']:.3f} | {seconds[name]:.1f} |")
    best = max((n for n in metrics if n not in ("BM25", "random")), key=lambda n: metrics[n]["mrr"])
    lines += ["", f"Top documents for the first questions under **{best}** (✔ = states the fact):", ""]
    for qi, q in enumerate(questions[:3]):
        lines.append(f"**{q['id']}** {q['prompt']}{q['completion']}")
        for r, d in enumerate(rankings[best][qi][:5]):
            mark = "✔" if docs[d]["id"] in q["relevant"] else " "
            lines.append(f"    {r + 1}. {mark} {docs[d]['id']}: {docs[d]['text'][:110]}")
        lines.append("")
    return "\n".join(lines)
