"""`headwater demo`: fact tracing on a synthetic corpus, end to end, on a CPU, with no downloads.

1. Generate fictional entities with attributes. Each fact is stated in a few documents with
   different templates, surrounded by filler sentences; other documents are distractors, and
   question/answer documents teach the question format for half of the facts.
2. Train a tiny GPT-2 on it (cached in the work directory after the first run).
3. Build indexes (document rows and sentence rows) and attribute held-out questions about the
   other half of the facts.
4. Report Recall@10 and MRR of the documents known to state each fact, beside BM25 and random.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .build import BuildConfig, build_index, load_model
from .evaluate import bm25_scores, fact_tracing_metrics
from .task import LanguageModelTask, encode_records
from .toy import tiny_gpt2, word_tokenizer

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
    "founder": (
        ["{e} was founded by {v} .", "{v} founded {e} long ago .", "The founder of {e} was {v} ."],
        "Who founded {e} ?",
    ),
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
class DemoConfig:
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
    train_batch: int = 16

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def _names(rng: random.Random, n: int, syllables: int) -> list[str]:
    parts = "ka lo mi zor vel tan qui ren sa bo lu dri fen gor ith ul mar nes pol vy".split()
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(parts) for _ in range(syllables)).capitalize())
    return sorted(out)


def make_corpus(cfg: DemoConfig) -> tuple[list[dict], list[dict]]:
    """(training documents, held-out questions). Each question lists the ids of the documents
    that state its fact (`relevant`)."""
    rng = random.Random(cfg.seed)
    entities = _names(rng, cfg.entities, 3)
    values = {
        "capital": _names(rng, cfg.entities, 2),
        "founder": _names(random.Random(cfg.seed + 1), cfg.entities, 2),
        "colour": COLOURS,
        "animal": ANIMALS,
    }
    docs, facts = [], []
    for e in entities:
        for attr, (templates, question) in ATTRIBUTES.items():
            v = rng.choice(values[attr])
            fact = {"entity": e, "attribute": attr, "value": v, "question": question.format(e=e), "docs": []}
            for t in rng.sample(templates, cfg.docs_per_fact):
                sentences = rng.sample(FILLER, cfg.filler_sentences)
                sentences.insert(rng.randrange(len(sentences) + 1), t.format(e=e, v=v))
                fact["docs"].append(len(docs))
                docs.append({"text": " ".join(sentences), "kind": "fact"})
            facts.append(fact)
        for t in DISTRACTORS:
            docs.append({"text": " ".join([t.format(e=e), *rng.sample(FILLER, cfg.filler_sentences)]), "kind": "distractor"})
    rng.shuffle(facts)
    half = len(facts) // 2
    for f in facts[:half]:  # QA documents teach the question format, for the facts not asked about
        docs.append({"text": f"Q : {f['question']} A : {f['value']} .", "kind": "qa"})
    order = list(range(len(docs)))
    rng.shuffle(order)
    where = {old: new for new, old in enumerate(order)}
    docs = [{"id": f"doc{new:04d}", **docs[old]} for new, old in enumerate(order)]
    questions = [
        {"id": f"q{i:03d}", "prompt": f"Q : {f['question']} A :", "completion": f" {f['value']}",
         "relevant": [docs[where[d]]["id"] for d in f["docs"]]}
        for i, f in enumerate(facts[half:])
    ]
    return docs, questions


def train_lm(model, task: LanguageModelTask, records: list[dict], epochs: int, lr: float, batch_size: int, seed: int) -> torch.optim.Optimizer:
    """Plain AdamW training on the records' summed token loss (mean per token); returns the optimizer."""
    g = torch.Generator().manual_seed(seed)
    examples = encode_records(task, records)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    steps = epochs * ((len(examples) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc="train demo model", unit="step")
    for _ in range(epochs):
        for i in torch.randperm(len(examples), generator=g).split(batch_size):
            batch = task.collate([examples[j] for j in i])
            loss = task.per_example_loss(model, batch).sum() / batch["target_mask"][:, 1:].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return opt


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def prepare(workdir: Path, cfg: DemoConfig, retrain: bool = False) -> tuple[Path, list[dict], list[dict]]:
    """Write the corpus and train (or reuse) the model; returns (model dir, docs, questions)."""
    workdir.mkdir(parents=True, exist_ok=True)
    docs, questions = make_corpus(cfg)
    _write_jsonl(workdir / "train.jsonl", [{"id": d["id"], "text": d["text"]} for d in docs])
    _write_jsonl(workdir / "questions.jsonl", [{k: q[k] for k in ("id", "prompt", "completion")} for q in questions])
    model_dir = workdir / f"model-{cfg.key()}"
    if (model_dir / "config.json").exists() and not retrain:
        print(f"using the cached demo model in {model_dir}")
        return model_dir, docs, questions
    texts = [d["text"] for d in docs] + [q["prompt"] + q["completion"] for q in questions]
    tokenizer = word_tokenizer(texts, max_length=128)
    torch.manual_seed(cfg.seed)
    model = tiny_gpt2(len(tokenizer), cfg.n_layer, cfg.n_embd, cfg.n_head, n_positions=128)
    opt = train_lm(model, LanguageModelTask(tokenizer), docs, cfg.epochs, cfg.lr, cfg.train_batch, cfg.seed)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    torch.save(opt.state_dict(), model_dir / "optimizer.pt")
    return model_dir, docs, questions


def answer_accuracy(model_dir: Path, questions: list[dict]) -> float:
    """Fraction of held-out questions whose answer is the model's greedy next token."""
    model, tok = load_model(str(model_dir))
    hits = 0
    with torch.no_grad():
        for q in questions:
            ids = tok(q["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
            pred = model(input_ids=ids).logits[0, -1].argmax().item()
            hits += pred == tok(q["completion"], add_special_tokens=False)["input_ids"][0]
    return hits / len(questions)


VARIANTS = [
    # (name, unit, method, optimizer-normalised, scorer options)
    ("cosine, document rows", "document", "cosine", False, {}),
    ("TrackStar, document rows", "document", "trackstar", True, {}),
    ("cosine, sentence rows (max)", "sentence", "cosine", False, {}),
    ("TrackStar, sentence rows (max)", "sentence", "trackstar", True, {}),
    ("cosine, token rows (max)", "token", "cosine", False, {}),
    ("TrackStar, token rows (max), no query mixing", "token", "trackstar", True, {"mix": 0.0}),
    ("TrackStar, token rows (max)", "token", "trackstar", True, {}),
]


def run_demo(workdir: Path, seed: int = 0, projection_dim: int = 256, batch_size: int = 16, retrain: bool = False, top_k: int = 10) -> dict:
    """Run the whole demo; prints and writes `results.md` and `results.json` to `workdir`."""
    import datasets
    import transformers

    datasets.disable_progress_bars()  # keep the demo's own bars (training, builds) readable
    transformers.utils.logging.disable_progress_bar()
    t0 = time.time()
    workdir = Path(workdir)
    cfg = DemoConfig(seed=seed)
    model_dir, docs, questions = prepare(workdir, cfg, retrain)
    doc_ids = [d["id"] for d in docs]
    relevant = [q["relevant"] for q in questions]
    acc = answer_accuracy(model_dir, questions)
    rankings: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for unit in ("document", "sentence", "token"):
        for normalised in (False, True):
            t = time.time()
            config = BuildConfig(
                model=str(model_dir), data=str(workdir / "train.jsonl"), projection_dim=projection_dim, seed=seed,
                batch_size=batch_size, unit=unit, dtype="float32",
                optimizer_state=str(model_dir / "optimizer.pt") if normalised else None,
            )
            name = f"index-{unit}{'-adamnorm' if normalised else ''}"
            index = build_index(workdir / name, config=config, resume=True)
            build_s = time.time() - t
            for vname, vunit, method, vnorm, options in VARIANTS:
                if (vunit, vnorm) == (unit, normalised):
                    t = time.time()
                    frame = index.query(str(workdir / "questions.jsonl"), method=method, top_k=len(docs), **options)
                    rankings[vname] = _order(frame, questions, doc_ids)
                    seconds[vname] = build_s + time.time() - t
    t = time.time()
    rankings["BM25"] = np.argsort(-bm25_scores([d["text"] for d in docs], [q["prompt"] + q["completion"] for q in questions]), axis=1, kind="stable")
    seconds["BM25"] = time.time() - t
    rng = np.random.default_rng(seed)
    rankings["random"] = np.stack([rng.permutation(len(docs)) for _ in questions])
    seconds["random"] = 0.0
    metrics = {name: fact_tracing_metrics(order, [[doc_ids.index(r) for r in rel] for rel in relevant], k=top_k) for name, order in rankings.items()}
    report = _report(metrics, seconds, rankings, docs, questions, acc, top_k, time.time() - t0)
    (workdir / "results.md").write_text(report)
    (workdir / "results.json").write_text(json.dumps({"answer_accuracy": acc, "metrics": metrics, "seconds": seconds}, indent=2))
    print(report)
    print(f"wrote {workdir / 'results.md'}")
    return metrics


def _order(frame, questions, doc_ids) -> np.ndarray:
    """Rank matrix [q, docs] of document positions from a query result frame."""
    pos = {d: i for i, d in enumerate(doc_ids)}
    top = frame[frame["side"] == "top"].sort_values(["query_id", "rank"])
    return np.stack([[pos[t] for t in top[top["query_id"] == q["id"]]["train_id"]] for q in questions])


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
