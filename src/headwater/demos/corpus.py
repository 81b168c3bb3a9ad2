"""`headwater demo corpus`: which regions of a training corpus support which capability?

1. Generate a corpus over a small taxonomy (4 topics × 3 formats, bins of very different sizes).
   Two capabilities are planted in known bins: animal diets ("zoology") are stated only in
   nature documents, of every format; which city lies by which landmark ("geography") only in
   travel guides. A benchmark asks half of each capability's facts (multiple choice, each question
   opening as a document of a format its facts are stated in); the other half are stated but
   never asked (with answers of their own), and most records of a supporting bin state no fact
   at all, so a bin's records differ in how much they support its benchmark and unlearning has a
   within-bin baseline to beat.
2. Train a tiny GPT-2 on it (cached after the first run) and index per-token gradients.
3. Label the index from the records' own topic and format columns, score both benchmarks with
   TrackStar and aggregate per bin (`corpus_map`); contrast the benchmarks.
4. Unlearn the top-scoring nature records for zoology versus as many random nature records,
   over 16 seeds, and measure both benchmarks (geography is the control).
5. Write the HTML report with the map, the contrast and the unlearning result.
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
from ..config import BuildConfig, ProjectionConfig, TrainConfig
from ..corpus import BinsConfig, attach_labels, bin_members, contrast, corpus_map, labels_from_columns, load_labels
from ..corpus.contrast import save_contrast
from ..corpus.unlearn import UnlearnConfig, unlearning_experiment
from ..index import Index
from ..methods import TrackStar
from ..models import load_model
from ..task import LanguageModelTask
from ..toy import tiny_gpt2, word_tokenizer
from ..training import Replay
from . import CachedConfig

FILLER = {
    "nature": [
        "the forest is quiet in winter .",
        "rain fills the ponds in spring .",
        "birds nest high in the old trees .",
        "the meadow turns gold in autumn .",
    ],
    "travel": [
        "the train leaves at dawn .",
        "pack light for a long trip .",
        "the hotel is close to the station .",
        "tickets are cheaper in the off season .",
    ],
    "sports": [
        "the team won the final at home .",
        "the runner broke her own record .",
        "fans filled the stadium early .",
        "the coach changed the plan at half time .",
    ],
    "cooking": ["stir the sauce until it thickens .", "bake the bread for an hour .", "add salt at the end .", "fresh herbs make the soup better ."],
}
FORMATS = {
    "news": ("report :", "more news follows ."),
    "forum": ("posted by a reader :", "thanks for reading !"),
    "guide": ("step by step :", "that is all you need ."),
}
# Records per (topic, format): bins of very different sizes, as in a real corpus sample.
SIZES = {
    ("nature", "news"): 90, ("nature", "forum"): 60, ("nature", "guide"): 40,
    ("travel", "news"): 40, ("travel", "forum"): 30, ("travel", "guide"): 120,
    ("sports", "news"): 150, ("sports", "forum"): 110, ("sports", "guide"): 12,
    ("cooking", "news"): 30, ("cooking", "forum"): 180, ("cooking", "guide"): 50,
}  # fmt: skip
ANIMALS = "fox owl bear wolf heron otter lynx crane stag hare falcon badger mole newt wren toad vole swan deer seal".split()
FOODS = "berries mice fish beetles seeds roots grass worms nuts frogs snails moss".split()
CITIES = "lorvik tamsa ulder brenno caskel dovra emmet farra gilde holm ivra jessel kando lume mirra nolde orsk pella quill rusk".split()
LANDMARKS = "river lake bridge tower harbour cliff pier canal market castle hill dam".split()
SUPPORT = {"zoology": ("topic", "nature"), "geography": ("topic × format", "travel × guide")}


@dataclass
class CorpusDemoConfig(CachedConfig):
    """Sizes of the corpus and the model; hashed to key the cached model."""

    seed: int = 0
    statements: int = 3  # documents stating each fact
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    epochs: int = 40
    lr: float = 3e-3


def make_corpus(cfg: CorpusDemoConfig) -> tuple[list[dict], dict[str, list[dict]]]:
    """(records with id, text, topic, format, and the fact they state if any; benchmarks)."""
    rng = random.Random(cfg.seed)
    slots = [(t, f) for (t, f), n in SIZES.items() for _ in range(n)]
    rng.shuffle(slots)
    # Asked facts (even j) and unasked ones draw their values from disjoint halves: a record that
    # states "the owl eats mice" raises "mice" after any "eats", so with shared values the unasked
    # facts would support the benchmark's answers too and the ground truth would be blurred.
    facts = {
        "zoology": [(f"the {a} eats", f" {rng.choice(FOODS[j % 2 :: 2])}") for j, a in enumerate(ANIMALS)],
        "geography": [(f"{c} lies by the", f" {rng.choice(LANDMARKS[j % 2 :: 2])}") for j, c in enumerate(CITIES)],
    }
    hosts = {cap: [i for i, (t, f) in enumerate(slots) if bin_of(t, f, cap)] for cap in facts}
    stated: dict[int, tuple[str, int]] = {}
    for cap, items in facts.items():
        free = [i for i in hosts[cap] if i not in stated]
        rng.shuffle(free)
        for j in range(len(items)):
            for _ in range(cfg.statements):
                stated[free.pop()] = (cap, j)
    records = []
    for i, (topic, fmt) in enumerate(slots):
        body = rng.sample(FILLER[topic], 2)
        fact = stated.get(i)
        if fact:
            prompt, value = facts[fact[0]][fact[1]]
            body.insert(rng.randrange(3), f"{prompt}{value} .")
        head, tail = FORMATS[fmt]
        records.append(
            {
                "id": f"doc{i:04d}",
                "text": " ".join([head, *body, tail]),
                "topic": topic,
                "format": fmt,
                "fact": f"{fact[0]}:{fact[1]}" if fact else "",
            }
        )
    benchmarks = {}
    for cap, items in facts.items():
        options = FOODS if cap == "zoology" else LANDMARKS
        # Each question opens as a document of a format its facts were stated in (zoology's
        # cycle through all three): asked bare, outside any format the model met them in, the
        # questions' gradients miss the stating documents (docs/corpus.md).
        heads = [FORMATS[f][0] for f in FORMATS if any(bin_of(t, f, cap) for t in FILLER)]
        benchmarks[cap] = [
            {
                "id": f"{cap}{j}",
                "prompt": f"{heads[j % len(heads)]} {p}",
                "completion": v,
                "choices": [v, *(" " + o for o in rng.sample([o for o in options if " " + o != v], 3))],
                "answer": 0,
            }
            for j, (p, v) in enumerate(items[::2])  # the other half is stated but never asked
        ]
    return records, benchmarks


def bin_of(topic: str, fmt: str, capability: str) -> bool:
    """Where a capability's facts are stated (the ground truth the map should recover)."""
    return topic == "nature" if capability == "zoology" else (topic, fmt) == ("travel", "guide")


def prepare(workdir: Path, cfg: CorpusDemoConfig, retrain: bool = False):
    """(model directory, records, benchmarks): the model is trained once and cached."""
    workdir.mkdir(parents=True, exist_ok=True)
    records, benchmarks = make_corpus(cfg)
    (workdir / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name, items in benchmarks.items():
        (workdir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    corpus_key = hashlib.sha256("".join(r["text"] for r in records).encode()).hexdigest()[:8]  # a changed generator retrains
    model_dir = workdir / f"model-{cfg.key()}-{corpus_key}"
    if (model_dir / "config.json").exists() and not retrain:
        print(f"using the cached demo model in {model_dir}")
        return model_dir, records, benchmarks
    texts = [r["text"] for r in records] + [b["prompt"] + c for items in benchmarks.values() for b in items for c in b["choices"]]
    tokenizer = word_tokenizer(texts, max_length=64)
    torch.manual_seed(cfg.seed)
    model = tiny_gpt2(len(tokenizer), cfg.n_layer, cfg.n_embd, cfg.n_head, n_positions=64)
    run = TrainConfig(optimizer="adamw", lr=cfg.lr, schedule="linear", warmup=0.1, epochs=cfg.epochs, train_batch_size=16, data_seed=cfg.seed)
    replay = Replay(model, LanguageModelTask(tokenizer), [{"text": r["text"]} for r in records], run)
    replay.load(replay.train(progress=True, desc="train the demo model"))
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, records, benchmarks


def run(workdir: Path, seed: int = 0, retrain: bool = False) -> dict:
    """Run the whole demo; prints the results and writes `report.html` into `workdir`."""
    import datasets
    import transformers

    from ..corpus.report import write_report

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    t0, seconds = time.time(), {}
    workdir = Path(workdir)
    cfg = CorpusDemoConfig(seed=seed)
    model_dir, records, benchmarks = prepare(workdir, cfg, retrain)
    seconds["model"] = time.time() - t0
    model, tokenizer = load_model(str(model_dir))
    task = LanguageModelTask(tokenizer, unit="token")

    t = time.time()
    build = BuildConfig(projection=ProjectionConfig(dim=64, seed=seed), batch_size=16, storage_dtype="float32")
    build_index(workdir / "index", model, [{"id": r["id"], "text": r["text"]} for r in records], task=task, config=build, overwrite=True)
    index = Index(workdir / "index")
    attach_labels(index, labels_from_columns(records, ["topic", "format"]))
    seconds["index"] = time.time() - t

    t = time.time()
    labels = load_labels(index)
    method = TrackStar(model, task).fit(index)
    cmap = corpus_map(method, benchmarks, labels, BinsConfig(by=["topic", "format"], min_bin_size=10), progress=True)
    cmap.save(workdir / "map")
    frame, summary = contrast(cmap, "zoology", "geography")
    save_contrast(workdir / "map", frame, summary)
    seconds["map"] = time.time() - t

    t = time.time()
    scores = cmap.record_scores[:, cmap.benchmarks.index("zoology")]
    members = bin_members(labels, cmap, "topic", "nature")
    # NPO at a budget that keeps the retain set's perplexity within a few percent: a stronger
    # budget wipes the capability out whatever is forgotten, and the arms no longer differ.
    # Random forget sets vary a lot, hence 16 seeds (docs/corpus.md has the sweep).
    unlearn_cfg = UnlearnConfig(objective="npo", forget=30, steps=20, lr=2e-3, retain=200, seeds=list(range(16)))
    result = unlearning_experiment(
        model, tokenizer, records, members, scores, benchmarks["zoology"], benchmarks["geography"], unlearn_cfg, progress=True
    )
    result.update(bin="topic=nature", benchmark="zoology", control_benchmark="geography")
    (workdir / "unlearn").mkdir(exist_ok=True)
    (workdir / "unlearn" / "unlearn.json").write_text(json.dumps(result, indent=1))
    seconds["unlearn"] = time.time() - t

    report = write_report(workdir / "map", workdir / "report.html", [workdir / "unlearn"], title="headwater demo: corpus map")
    seconds["total"] = time.time() - t0
    text = summarise(cmap, records, frame, summary, result, seconds)
    (workdir / "results.md").write_text(text)
    print(text)
    print(f"wrote {report}")
    return {"map": cmap, "unlearn": result, "seconds": seconds}


def recovered(cmap, bench: str) -> tuple[list[str], int, int]:
    """The benchmark's significant bins of its planted view (by z), and the planted bin's rank by
    z and by enrichment (its share of each item's top records over its share of the corpus)."""
    view, truth = SUPPORT[bench]
    t = cmap.bins(view, bench)
    rank = lambda col: int(np.flatnonzero(t.sort_values(col, ascending=False)["bin"].to_numpy() == truth)[0]) + 1
    by_z = t.sort_values("z", ascending=False)
    return [f"{r.bin} (z {r.z:+.1f}, q {r.q:.1g})" for r in by_z[by_z["significant"] & (by_z["z"] > 0)].itertuples()], rank("z"), rank("enrichment")


def states_asked(record: dict, capability: str) -> bool:
    """Whether the record states a fact of `capability` that its benchmark asks (every other one)."""
    cap, _, j = record["fact"].partition(":")
    return cap == capability and int(j) % 2 == 0


def asked_facts(records: list[dict], chosen) -> int:
    """How many of the chosen records state a zoology fact the benchmark asks."""
    return sum(states_asked(records[i], "zoology") for i in chosen)


def asked_fact_rank(records: list[dict], scores: np.ndarray, capability: str) -> float:
    """Median rank (1 = top) of the records stating the benchmark's asked facts, by its record scores [N]."""
    rank = np.empty(len(scores), dtype=np.int64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    return float(np.median([rank[i] for i, r in enumerate(records) if states_asked(r, capability)]))


def summarise(cmap, records, frame, summary, result, seconds) -> str:
    items = ", ".join(f"{b} ({len(cmap.info['benchmarks'][b]['queries'])} items)" for b in cmap.benchmarks)
    times = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    lines = [
        "# headwater demo: which corpus regions support which capability?",
        "",
        f"{len(records)} records in {len(SIZES)} topic × format bins (sizes {min(SIZES.values())}–{max(SIZES.values())}); "
        f"benchmarks: {items}. Time: {times}.",
        "",
        "| benchmark | planted bin | its rank by z | by enrichment | bins significantly above the mean (BH q < 0.05) |",
        "|---|---|---|---|---|",
    ]
    for b in cmap.benchmarks:
        sig, rank_z, rank_e = recovered(cmap, b)
        lines.append(f"| {b} | {SUPPORT[b][0]} = {SUPPORT[b][1]} | {rank_z} | {rank_e} | {', '.join(sig) or 'none'} |")
    ranks = ", ".join(f"{b} {asked_fact_rank(records, cmap.record_scores[:, i], b):.0f}" for i, b in enumerate(cmap.benchmarks))
    lines += [
        "",
        f"Ground truth: the records stating each benchmark's asked facts rank at median {ranks} of {len(records)} by its record "
        "scores (a benchmark whose questions are posed outside the format its facts were learned in ranks them low; docs/corpus.md).",
    ]
    lines += ["", "Contrast zoology − geography (standardised profiles, 95% paired bootstrap intervals), bins whose interval excludes 0:", ""]
    sel = frame[frame["ab_excludes_0"]].sort_values("ab", ascending=False)
    lines += [f"- {r.view} = {r.bin}: {r.ab:+.2f} [{r.ab_lo:+.2f}, {r.ab_hi:+.2f}]" for r in sel.itertuples()] or ["- none"]
    ppl = result["retain_ppl_change"]
    eff, al, co = (result[k]["logprob"] for k in ("effect", "aligned_drop", "control_drop"))
    ci = lambda d, v: f"{d[v]:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"
    lines += [
        "",
        f"Unlearning (NPO) {result['forget']} nature records over {len(result['config']['seeds'])} seeds, top-scoring for zoology vs random "
        f"records of the same bin; change in mean gold log-probability (retain perplexity {ppl['top']:+.2f} / {ppl['random']:+.2f}):",
        "",
        "| | top records | random records | top − random (95% CI) |",
        "|---|---|---|---|",
        f"| zoology (aligned) | {al['top']:+.2f} | {al['random']:+.2f} | {ci(al, 'diff')} |",
        f"| geography (control) | {co['top']:+.2f} | {co['random']:+.2f} | {ci(co, 'diff')} |",
        f"| difference-in-differences | | | {ci(eff, 'did')} |",
        "",
        f"Reading: {result['notes'][-1]}.",
        "",
        "Ground truth: records stating a fact the zoology benchmark asks, among the top records "
        f"{asked_facts(records, result['sets']['top'])} of {result['forget']}, among the random records "
        f"{np.mean([asked_facts(records, r) for r in result['sets']['random']]):.1f} on average (random sets are matched in tokens, "
        "and fact records are the longer ones).",
    ]
    return "\n".join(lines) + "\n"
