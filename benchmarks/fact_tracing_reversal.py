"""Do documents that name the value before the entity support the model's answer? Retraining says.

On `benchmarks/fact_tracing.py`'s corpus, gradient methods miss the documents that state a fact
value first ("Tanka is the capital city of Oro .") and BM25 finds them. This script asks whether
those documents matter to the model at all. Among the held-out facts stated by one value-first
and two entity-first documents, it trains the model twice more from the same initialisation and
seed: once without each such fact's value-first document, once without one of its entity-first
documents instead (as many documents dropped each time). It reports each fact's change in the log
probability of its answer to the held-out question against the full model, with bootstrap
intervals, beside the same changes for the facts left alone (the noise of retraining on other data).

    python benchmarks/fact_tracing_reversal.py      # ~7 min on 2 cores (two trainings; cached after)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import fact_tracing
import numpy as np
import torch

from headwater.config import TrainConfig
from headwater.models import load_model
from headwater.task import LanguageModelTask
from headwater.toy import tiny_gpt2
from headwater.training import Replay


def dropped_documents(docs: list[dict], questions: list[dict]) -> tuple[set[int], set[int], list[int]]:
    """(value-first documents to drop, as many entity-first ones of the same facts, the facts' question indices)."""
    ids, texts = {d["id"]: i for i, d in enumerate(docs)}, [d["text"] for d in docs]
    value_first, entity_first, facts = set(), set(), []
    for j, q in enumerate(questions):
        relevant = [ids[r] for r in q["relevant"]]
        vf = [i for i in relevant if texts[i].index(q["completion"].strip()) < texts[i].index(q["entity"])]
        ef = [i for i in relevant if i not in vf]
        if len(vf) == 1 and len(ef) == 2:
            value_first.add(vf[0])
            entity_first.add(random.Random(j).choice(ef))
            facts.append(j)
    return value_first, entity_first, facts


def trained_without(drop: set[int], docs, tokenizer, cfg, out: Path):
    """The model trained as the benchmark's, on every document but `drop` (cached in `out`)."""
    if (out / "config.json").exists():
        return load_model(str(out))[0]
    torch.manual_seed(cfg.seed)
    model = tiny_gpt2(len(tokenizer), cfg.n_layer, cfg.n_embd, cfg.n_head, n_positions=128)
    run = TrainConfig(
        optimizer="adamw", lr=cfg.lr, schedule=cfg.schedule, warmup=0.1, epochs=cfg.epochs, train_batch_size=cfg.train_batch, data_seed=cfg.seed
    )
    replay = Replay(model, LanguageModelTask(tokenizer), [d for i, d in enumerate(docs) if i not in drop], run)
    replay.load(replay.train(progress=True, desc=f"train without {len(drop)} documents")).eval()
    model.save_pretrained(out)
    return model


def answer_logprobs(model, tokenizer, questions: list[dict]) -> np.ndarray:
    """log p(answer | held-out question) per question [q]."""
    task = LanguageModelTask(tokenizer)
    with torch.no_grad():
        return np.array(
            [
                -float(task.loss(model.eval(), task.collate([task.whole({"prompt": q["prompt"], "completion": q["completion"]})])).sum())
                for q in questions
            ]
        )


def interval(x: np.ndarray, rng: np.random.Generator) -> dict:
    boot = [rng.choice(x, len(x)).mean() for _ in range(2000)]
    return {"mean": float(x.mean()), "lo": float(np.percentile(boot, 2.5)), "hi": float(np.percentile(boot, 97.5))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/headwater-fact-tracing"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fact_tracing_reversal.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    cfg = fact_tracing.HardConfig(seed=args.seed)
    model_dir, docs, questions = fact_tracing.prepare(args.workdir, cfg, corpus=fact_tracing.hard_corpus)
    full, tokenizer = load_model(str(model_dir))  # every arm shares the full corpus's vocabulary
    value_first, entity_first, facts = dropped_documents(docs, questions)
    arms = {
        "without the value-first document": trained_without(value_first, docs, tokenizer, cfg, args.workdir / f"reversal-{args.seed}-value-first"),
        "without an entity-first document": trained_without(entity_first, docs, tokenizer, cfg, args.workdir / f"reversal-{args.seed}-entity-first"),
    }
    base = answer_logprobs(full, tokenizer, questions)
    changes = {name: answer_logprobs(m, tokenizer, questions) - base for name, m in arms.items()}
    changes["value-first dropped − entity-first dropped"] = changes["without the value-first document"] - changes["without an entity-first document"]
    touched = np.zeros(len(questions), bool)
    touched[facts] = True
    rng = np.random.default_rng(args.seed)
    results = {name: {"facts changed": interval(c[touched], rng), "facts left alone": interval(c[~touched], rng)} for name, c in changes.items()}
    lines = [
        f"{len(facts)} of {len(questions)} held-out facts stated by one value-first and two entity-first documents; "
        f"change in log p(answer | held-out question) against the full model (95% bootstrap intervals over facts)",
        "",
        "| arm | facts whose document was dropped | facts left alone (retraining noise) |",
        "|---|---|---|",
    ]
    fmt = lambda r: f"{r['mean']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]"
    lines += [f"| {name} | {fmt(r['facts changed'])} | {fmt(r['facts left alone'])} |" for name, r in results.items()]
    text = "\n".join(lines)
    print(text)
    print(f"\ntotal {time.time() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "facts": len(facts), "results": results, "table": text}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
