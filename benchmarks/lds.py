"""LDS of every attribution method against real retraining, measured in one run.

Two settings: (a) a tabular classification task (teacher-labelled Gaussian features, an MLP
trained by SGD with momentum) and (b) a tiny GPT-2 fine-tuned with AdamW on a generated corpus.
For each: train the model to attribute, score every training example for each target with each
method, retrain on m random half-size subsets over several seeds, and report the LDS (Spearman ρ
between the summed scores of a subset and the negated target loss, averaged over targets), the
seed-noise ceiling and wall time. Prints a table and writes JSON.

    python benchmarks/lds.py                 # both settings, defaults (~15 min on 2 cores)
    python benchmarks/lds.py --quick         # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import headwater as hw
from headwater import (
    EKFAC,
    MAGIC,
    SOURCE,
    TRAK,
    Cosine,
    CurvatureConfig,
    GradientConfig,
    InfluenceConfig,
    LanguageModelTask,
    MagicConfig,
    ModuleTask,
    ProjectionConfig,
    Replay,
    Segment,
    TracIn,
    TracInConfig,
    TrackStar,
    TrackStarConfig,
    TrainConfig,
    TRAKConfig,
)
from headwater.toy import tiny_gpt2, word_tokenizer


@dataclass
class Setting:
    name: str
    task: object
    train: list[dict]
    targets: list[dict]
    init: Callable[[int], torch.nn.Module]  # seed -> model at the start of the attributed training
    run: TrainConfig
    projection: ProjectionConfig  # for the projected methods (TrackStar, TRAK)

    def fit(self, records, seed: int) -> tuple[torch.nn.Module, Replay]:
        model = self.init(seed)
        replay = Replay(model, self.task, records, dataclasses.replace(self.run, data_seed=seed))
        replay.load(replay.train())
        return model, replay

    def target_losses(self, model) -> np.ndarray:
        batch = self.task.collate([self.task.whole(t) for t in self.targets])
        with torch.no_grad():
            return self.task.loss(model, batch).double().numpy()

    protocol: str = "subset"

    def train_and_measure(self, mask, seed: int) -> np.ndarray:
        """`subset`: retrain on the kept examples with the same recipe (epochs, so fewer steps).
        `reweight`: the same run over all examples, each loss weighted 1 if kept else 0 (same
        steps and data order): the counterfactual MAGIC's metagradient linearises."""
        if self.protocol == "reweight":
            model = self.init(seed)
            replay = Replay(model, self.task, self.train, dataclasses.replace(self.run, data_seed=seed))
            replay.load(replay.train(torch.as_tensor(mask, dtype=next(model.parameters()).dtype)))
            return self.target_losses(model)
        model, _ = self.fit([r for r, keep in zip(self.train, mask) if keep], seed)
        return self.target_losses(model)


# ----------------------------------------------------------------------------------- settings


def tabular(args) -> Setting:
    g = torch.Generator().manual_seed(args.seed)
    d, classes = 8, 3
    teacher = torch.randn(d, classes, generator=g)
    n = args.tab_train + args.tab_targets
    x = torch.randn(n, d, generator=g)
    y = torch.multinomial((1.5 * x @ teacher).softmax(1), 1, generator=g).squeeze(1)
    records = [{"x": x[i], "y": int(y[i])} for i in range(n)]

    def init(seed):
        torch.manual_seed(1000 + seed)
        return torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.Tanh(), torch.nn.Linear(32, classes))

    run = TrainConfig("sgd", lr=0.05, epochs=args.tab_epochs, train_batch_size=20, momentum=0.9, weight_decay=1e-3)
    return Setting("tabular MLP", ModuleTask(), records[: args.tab_train], records[args.tab_train :], init, run, ProjectionConfig("none"))


def language_model(args) -> Setting:
    rng = random.Random(args.seed)
    names = ["ana", "ben", "cleo", "dara", "eli", "fay", "gus", "hana", "ivo", "juno", "kai", "lea"]
    places = ["oslo", "lima", "rome", "kyiv", "baku", "doha", "riga", "suva"]
    foods = ["bread", "rice", "soup", "figs", "tea", "plums"]
    templates = ["{n} lives in {p} and eats {f} .", "in {p} , {n} likes {f} .", "{n} went to {p} for {f} .", "{f} is what {n} eats in {p} ."]
    make = lambda: rng.choice(templates).format(n=rng.choice(names), p=rng.choice(places), f=rng.choice(foods))
    train = [{"text": make()} for _ in range(args.lm_train)]
    targets = [{"text": make()} for _ in range(args.lm_targets)]
    base_texts = [make() for _ in range(200)]
    tokenizer = word_tokenizer([t["text"] for t in train + targets] + base_texts, max_length=32)
    task = LanguageModelTask(tokenizer)
    torch.manual_seed(args.seed)
    base = tiny_gpt2(len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=32)
    base.config._attn_implementation = "eager"  # MAGIC differentiates through training twice
    pre = Replay(base, task, [{"text": t} for t in base_texts], TrainConfig("adamw", lr=3e-3, epochs=2, train_batch_size=16, data_seed=args.seed))
    pre.load(pre.train())  # "pretraining": every fine-tune below starts here
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def init(seed):
        model = tiny_gpt2(len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=32)
        model.config._attn_implementation = "eager"
        model.load_state_dict(state)
        return model

    run = TrainConfig("adamw", lr=2e-3, epochs=args.lm_epochs, train_batch_size=8, weight_decay=0.01)
    return Setting("tiny GPT-2 fine-tune", task, train, targets, init, run, ProjectionConfig("factored", 256))


# ------------------------------------------------------------------------------------ methods


def methods(setting: Setting, args) -> dict[str, tuple[hw.Scores, float]]:
    """Every method through the library's one protocol: `Method(...).fit(train).score(targets)`."""
    out = {}
    t0 = time.perf_counter()
    final, replay = setting.fit(setting.train, seed=0)
    train_s = time.perf_counter() - t0
    task, train, targets, proj = setting.task, setting.train, setting.targets, setting.projection

    def timed(name, fn, extra_s=0.0):
        t = time.perf_counter()
        scores = fn()
        out[name] = (scores, time.perf_counter() - t + extra_s)
        print(f"  {setting.name}: {name} done in {out[name][1]:.1f} s", flush=True)

    T = replay.steps
    ckpt_steps = sorted({max(1, round(T * (c + 1) / args.checkpoints)) for c in range(args.checkpoints)})
    states = replay.trajectory(ckpt_steps)

    def checkpoint(step):
        model = setting.init(0)
        Replay(model, task, train, setting.run).load(states[step])
        return model

    checkpoints = [checkpoint(s) for s in ckpt_steps]
    spacing = [b - a for a, b in zip([0] + ckpt_steps[:-1], ckpt_steps)]
    seg_lr = [float(np.mean([replay.lr(t) for t in range(s - k, s)])) for s, k in zip(ckpt_steps, spacing)]
    ensemble = [final] + [setting.fit(train, seed=s)[0] for s in range(1, args.trak_models)]
    curvature = CurvatureConfig(fisher="true", seed=0, batch_size=32)
    influence = InfluenceConfig(curvature=curvature, damping=0.1)
    full = GradientConfig(projection=ProjectionConfig("none"), batch_size=32)
    magic = lambda seeds: MAGIC(setting.init(0), task, MagicConfig(run=setting.run, replay_seeds=seeds)).fit(train).score(targets)

    timed("gradient cosine", lambda: Cosine(final, task, full).fit(train).score(targets))
    timed("TrackStar", lambda: TrackStar(final, task, TrackStarConfig(projection=proj, batch_size=32)).fit(train).score(targets))
    # TracIn weights each checkpoint by its learning rate times the steps it stands for
    tracin_lr = [replay.lr(s - 1) * k for s, k in zip(ckpt_steps, spacing)]
    tracin = TracInConfig(projection=ProjectionConfig("none"), batch_size=32, checkpoint_lr=tracin_lr)
    timed(f"TracIn ({len(ckpt_steps)} ckpts)", lambda: TracIn(checkpoints, task, tracin).fit(train).score(targets))
    trak = TRAKConfig(projection=proj, batch_size=32)
    timed("TRAK (1 model)", lambda: TRAK([final], task, trak).fit(train).score(targets, hw.Loss()))
    timed(
        f"TRAK ({args.trak_models} models)", lambda: TRAK(ensemble, task, trak).fit(train).score(targets, hw.Loss()), train_s * (args.trak_models - 1)
    )
    timed("EK-FAC influence", lambda: EKFAC(final, task, influence).fit(train).score(targets))
    cg = dataclasses.replace(influence, cg_steps=args.cg_steps)
    timed(f"EK-FAC + CG ({args.cg_steps} steps)", lambda: EKFAC(final, task, cg).fit(train).score(targets))
    segments = [Segment([m], lr=lr, steps=k) for m, lr, k in zip(checkpoints, seg_lr, spacing)]
    source = hw.SourceConfig(curvature=curvature, momentum=setting.run.momentum if setting.run.optimizer == "sgd" else 0.0, batch_size=32)
    timed(f"SOURCE ({len(ckpt_steps)} segments)", lambda: SOURCE(segments, task, source, final_model=final).fit(train).score(targets))
    timed("MAGIC (1 run)", lambda: magic([0]))
    timed(f"MAGIC ({args.seeds}-seed ensemble)", lambda: magic(list(range(args.seeds))))
    return out


# ----------------------------------------------------------------------------------- driver


def evaluate(setting: Setting, args) -> dict:
    print(f"\n== {setting.name}: {len(setting.train)} training examples, {len(setting.targets)} targets", flush=True)
    scores = methods(setting, args)
    t = time.perf_counter()
    masks = hw.subset_masks(len(setting.train), args.subsets, 0.5, seed=args.seed)
    losses = hw.retrain_outcomes(setting.train_and_measure, masks, seeds=list(range(args.seeds)), progress=True)
    retrain_s = time.perf_counter() - t
    ceiling = hw.seed_ceiling(losses)
    result = {
        "setting": setting.name,
        "protocol": setting.protocol,
        "train": len(setting.train),
        "targets": len(setting.targets),
        "subsets": args.subsets,
        "seeds": args.seeds,
        "seed_ceiling": ceiling,
        "retraining_seconds": retrain_s,
        "methods": {},
    }
    for name, (s, secs) in scores.items():
        value, per_target = hw.lds(s, masks, losses.mean(0))
        result["methods"][name] = {"lds": value, "of_ceiling": value / ceiling, "seconds": secs}
    return result


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines += [
            f"\n{r['setting']} ({r['protocol']} retraining) — {r['train']} training examples, {r['targets']} targets, "
            f"{r['subsets']} subsets × {r['seeds']} seeds (α = 0.5); seed ceiling {r['seed_ceiling']:.3f}",
            "",
            "| method | LDS | LDS / ceiling | seconds |",
            "|---|---|---|---|",
        ]
        for name, m in r["methods"].items():
            lines.append(f"| {name} | {m['lds']:.3f} | {m['of_ceiling']:.2f} | {m['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--only", choices=["tabular", "lm"], help="run one setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subsets", type=int, default=64)
    p.add_argument("--seeds", type=int, default=4, help="retraining seeds per subset (≥ 2 for the ceiling)")
    p.add_argument("--checkpoints", type=int, default=4, help="checkpoints for TracIn / segments for SOURCE")
    p.add_argument("--trak-models", type=int, default=5)
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--tab-train", type=int, default=200)
    p.add_argument("--tab-targets", type=int, default=20)
    p.add_argument("--tab-epochs", type=int, default=10)
    p.add_argument("--lm-train", type=int, default=96)
    p.add_argument("--lm-targets", type=int, default=10)
    p.add_argument("--lm-epochs", type=int, default=3)
    p.add_argument(
        "--protocol",
        choices=["subset", "reweight"],
        default="subset",
        help="retrain on each subset (same epochs) or reweight losses 0/1 in the full run (same steps)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lds.json")
    args = p.parse_args()
    if args.quick:
        args.subsets, args.seeds, args.tab_train, args.tab_targets, args.lm_train, args.lm_targets = 12, 2, 60, 5, 24, 3
        args.trak_models, args.tab_epochs, args.lm_epochs = 2, 3, 1
    torch.set_num_threads(args.threads)
    settings = {"tabular": tabular, "lm": language_model}
    results = [evaluate(dataclasses.replace(settings[k](args), protocol=args.protocol), args) for k in settings if args.only in (None, k)]
    text = table(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
