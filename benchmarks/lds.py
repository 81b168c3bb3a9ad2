"""LDS of every attribution method against real retraining, beside the peer libraries, in one run.

Six settings: a tabular classifier (teacher-labelled Gaussian features, an MLP), an image-like
MLP and a small CNN (noisy shifted smooth class prototypes, 10% flipped labels), two CNNs added
after every default was chosen (`gratings`: coloured oriented gratings; `motifs`: a class motif
stamped at a random place, three convolutions), all trained by SGD with momentum and weight decay
(or AdamW, `--adamw`), and a tiny GPT-2 fine-tuned with AdamW on a generated corpus.
For each: train the model to attribute, score every training example for each target with each
method, retrain on m random half-size subsets over several seeds, and report the LDS (Spearman ρ
between the summed scores of a subset and the negated target loss, averaged over targets), the
seed-noise ceiling and wall time. Kronfluence, traker and dattri score the same trained models
with their documented defaults in their own virtualenv (`lds_peers.py`, `peers_driver.py`; set
up as in benchmarks/README.md). Prints a table and writes JSON.

    python benchmarks/lds.py                           # every setting (~40 min on 2 cores)
    python benchmarks/lds.py --only image cnn --no-magic
    python benchmarks/lds.py --quick                   # small sizes, a smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lds_models  # noqa: E402  (beside this script; the peers' drivers import it too)
import lds_peers  # noqa: E402
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
from headwater.methods.source import adam_scale_of
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
    spec: dict | None = None  # the lds_models spec of a classifier (for the peers' drivers)

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


def classification(name: str, spec: dict, records: list[dict], n_train: int, epochs: int, adamw_lr: float | None = None) -> Setting:
    """A classifier from `lds_models` trained by SGD with momentum and weight decay or, given
    `adamw_lr`, by AdamW (the setting's name then says so)."""
    run = TrainConfig("sgd", lr=0.05, epochs=epochs, train_batch_size=20, momentum=0.9, weight_decay=1e-3)
    if adamw_lr is not None:
        name, run = f"{name} (AdamW)", TrainConfig("adamw", lr=adamw_lr, epochs=epochs, train_batch_size=20, weight_decay=0.01)
    init = lambda seed: lds_models.seeded(spec, 1000 + seed)  # noqa: E731
    return Setting(name, ModuleTask(), records[:n_train], records[n_train:], init, run, ProjectionConfig("none"), spec=spec)


def tabular(args) -> Setting:
    g = torch.Generator().manual_seed(args.seed)
    d, classes = 8, 3
    teacher = torch.randn(d, classes, generator=g)
    n = args.tab_train + args.tab_targets
    x = torch.randn(n, d, generator=g)
    y = torch.multinomial((1.5 * x @ teacher).softmax(1), 1, generator=g).squeeze(1)
    records = [{"x": x[i], "y": int(y[i])} for i in range(n)]
    spec = {"name": "mlp", "d_in": d, "hidden": 32, "classes": classes}
    return classification("tabular MLP", spec, records, args.tab_train, args.tab_epochs, 1e-2 if args.adamw else None)


def images(args, side: int, classes: int = 4) -> list[dict]:
    """Noisy, shifted copies of smooth class prototypes, 10% of labels flipped: [1, side, side] images."""
    g = torch.Generator().manual_seed(args.seed + 1)
    smooth = torch.full((1, 1, 3, 3), 1 / 9)
    protos = torch.nn.functional.conv2d(torch.randn(classes, 1, side, side, generator=g), smooth, padding=1)
    protos = protos / protos.std()
    n = args.image_train + args.tab_targets
    y = torch.randint(classes, (n,), generator=g)
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    x = torch.stack([torch.roll(protos[y[i]], tuple(shifts[i].tolist()), (1, 2)) for i in range(n)])
    x = 0.7 * x + torch.randn(x.shape, generator=g)
    flip = torch.rand(n, generator=g) < 0.1
    y = torch.where(flip, torch.randint(classes, (n,), generator=g), y)
    return [{"x": x[i], "y": int(y[i])} for i in range(n)]


def gratings(args, side: int = 12, classes: int = 4, channels: int = 3) -> list[dict]:
    """Oriented sinusoidal gratings in a random colour, the class their orientation (jittered),
    random frequency and phase, noise, 10% of labels flipped: [3, side, side] images."""
    g = torch.Generator().manual_seed(args.seed + 7)
    n = args.image_train + args.tab_targets
    y = torch.randint(classes, (n,), generator=g)
    angle = y.double() * torch.pi / classes + 0.15 * torch.randn(n, generator=g, dtype=torch.float64)
    freq = 0.9 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
    phase = 2 * torch.pi * torch.rand(n, generator=g, dtype=torch.float64)
    i, j = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij")
    waves = torch.sin(freq[:, None, None] * (angle.cos()[:, None, None] * i + angle.sin()[:, None, None] * j) + phase[:, None, None])
    colour = torch.rand(n, channels, generator=g, dtype=torch.float64)
    x = (colour[:, :, None, None] * waves[:, None]).float() + 0.8 * torch.randn(n, channels, side, side, generator=g)
    flip = torch.rand(n, generator=g) < 0.1
    y = torch.where(flip, torch.randint(classes, (n,), generator=g), y)
    return [{"x": x[k], "y": int(y[k])} for k in range(n)]


def motifs(args, side: int = 12, classes: int = 6) -> list[dict]:
    """A random ±1 4×4 motif per class stamped at a random place, a fainter motif of a random class
    elsewhere, noise, 10% of labels flipped: [1, side, side] images."""
    g = torch.Generator().manual_seed(args.seed + 8)
    n = args.image_train + args.tab_targets
    patterns = (torch.rand(classes, 4, 4, generator=g) < 0.5).float() * 2 - 1
    y = torch.randint(classes, (n,), generator=g)
    x = 0.6 * torch.randn(n, 1, side, side, generator=g)
    for k in range(n):
        for label, weight in ((int(y[k]), 1.0), (int(torch.randint(classes, (1,), generator=g)), 0.5)):
            a, b = torch.randint(0, side - 3, (2,), generator=g).tolist()
            x[k, 0, a : a + 4, b : b + 4] += weight * patterns[label]
    flip = torch.rand(n, generator=g) < 0.1
    y = torch.where(flip, torch.randint(classes, (n,), generator=g), y)
    return [{"x": x[k], "y": int(y[k])} for k in range(n)]


def image_mlp(args) -> Setting:
    spec = {"name": "image_mlp", "side": 8, "channels": 1, "hidden": 32, "classes": 4}
    return classification("image MLP", spec, images(args, 8), args.image_train, args.image_epochs, 3e-3 if args.adamw else None)


def small_cnn(args) -> Setting:
    spec = {"name": "cnn", "side": 10, "channels": 1, "classes": 4, "width": 8}
    return classification("small CNN", spec, images(args, 10), args.image_train, args.image_epochs, 3e-3 if args.adamw else None)


def gratings_cnn(args) -> Setting:
    spec = {"name": "cnn", "side": 12, "channels": 3, "classes": 4, "width": 8}
    return classification("gratings CNN", spec, gratings(args), args.image_train, args.image_epochs, 3e-3 if args.adamw else None)


def motif_cnn(args) -> Setting:
    spec = {"name": "cnn3", "side": 12, "channels": 1, "classes": 6, "width": 6}
    return classification("motif CNN", spec, motifs(args), args.image_train, args.image_epochs, 3e-3 if args.adamw else None)


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
    curvature = CurvatureConfig(seed=0, batch_size=32)  # the default Fisher: sampled labels; exact for CG on a classifier
    influence = InfluenceConfig(curvature=curvature)  # the default damping
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
    timed("KFAC influence", lambda: hw.KFAC(final, task, influence).fit(train).score(targets))
    cg = dataclasses.replace(influence, cg_steps=args.cg_steps)
    timed(f"EK-FAC + CG ({args.cg_steps} steps)", lambda: EKFAC(final, task, cg).fit(train).score(targets))
    run = setting.run
    adam = lambda s: adam_scale_of({n[2:]: v for n, v in states[s].items() if n.startswith("v.")}, s, run.beta2, run.adam_eps)  # noqa: E731
    scales = [adam(s) if run.optimizer == "adamw" else None for s in ckpt_steps]  # AdamW: SOURCE with the recorded second moments
    segments = [Segment([m], lr=lr, steps=k, adam_scale=p) for m, lr, k, p in zip(checkpoints, seg_lr, spacing, scales)]
    source = hw.SourceConfig(curvature=curvature, momentum=setting.run.momentum if setting.run.optimizer == "sgd" else 0.0, batch_size=32)
    timed(f"SOURCE ({len(ckpt_steps)} segments)", lambda: SOURCE(segments, task, source, final_model=final).fit(train).score(targets))
    if not args.no_magic:
        timed("MAGIC (1 run)", lambda: magic([0]))
        timed(f"MAGIC ({args.seeds}-seed ensemble)", lambda: magic(list(range(args.seeds))))
    if args.peers_python and Path(args.peers_python).exists():
        tracin_steps = list(zip(checkpoints, [replay.lr(s - 1) for s in ckpt_steps], spacing))
        workdir = args.peers_workdir / setting.name.replace(" ", "-")
        out.update(lds_peers.run(setting, ensemble, tracin_steps, workdir, args.peers_python, train_s))
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
        result["methods"][name] = {
            "lds": value,
            "interval_95": hw.query_interval(per_target),
            "per_target": per_target.tolist(),
            "of_ceiling": value / ceiling,
            "seconds": secs,
            **({"diagnostics": s.diagnostics} if s.diagnostics else {}),
        }
    return result


# Each peer row against the headwater default it competes with (its "best peer" cell in the docs),
# as a pattern over headwater's row names (which carry the run's counts).
COUNTERPART = {
    "Kronfluence EK-FAC": r"EK-FAC influence",
    "dattri EK-FAC": r"EK-FAC influence",
    "Kronfluence KFAC": r"KFAC influence",
    "traker TRAK (1 model)": r"TRAK \(1 model\)",
    "dattri TRAK (1 model)": r"TRAK \(1 model\)",
    "traker TRAK (ensemble)": r"TRAK \(\d+ models\)",
    "dattri TRAK (ensemble)": r"TRAK \(\d+ models\)",
    "dattri gradient cosine": r"gradient cosine",
    "dattri TracIn": r"TracIn \(\d+ ckpts\)",
    "dattri IF + CG": r"EK-FAC \+ CG \(\d+ steps\)",
}


def paired_differences(result: dict) -> list[tuple[str, str, float, tuple[float, float]]]:
    """(headwater method, peer, LDS difference, its paired 95% interval over the targets) for every
    peer row (defaults and suggested settings) whose headwater counterpart ran on the same targets."""
    methods = result["methods"]
    out = []
    for peer, pattern in [(p + suffix, c) for p, c in COUNTERPART.items() for suffix in ("", " (suggested)")]:
        mine = next((k for k in methods if re.fullmatch(pattern, k)), None)
        if peer not in methods or mine is None:
            continue
        diff = np.asarray(methods[mine]["per_target"]) - np.asarray(methods[peer]["per_target"])
        out.append((mine, peer, float(np.nanmean(diff)), hw.query_interval(diff)))
    return out


def table(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines += [
            f"\n{r['setting']} ({r['protocol']} retraining) — {r['train']} training examples, {r['targets']} targets, "
            f"{r['subsets']} subsets × {r['seeds']} seeds (α = 0.5); seed ceiling {r['seed_ceiling']:.3f}",
            "",
            "| method | LDS | 95% interval over targets | LDS / ceiling | seconds |",
            "|---|---|---|---|---|",
        ]
        for name, m in r["methods"].items():
            check = m.get("diagnostics", {}).get("smoothness")
            note = f" (smoothness check {check['relative_error']:.0%} apart)" if check and check["relative_error"] > 0.1 else ""
            lo, hi = m["interval_95"]
            lines.append(f"| {name}{note} | {m['lds']:.3f} | [{lo:.3f}, {hi:.3f}] | {m['of_ceiling']:.2f} | {m['seconds']:.1f} |")
        pairs = paired_differences(r)
        if pairs:
            lines += ["", "| headwater default − peer | difference | paired 95% interval |", "|---|---|---|"]
            lines += [f"| {mine} − {peer} | {d:+.3f} | [{lo:+.3f}, {hi:+.3f}] |" for mine, peer, d, (lo, hi) in pairs]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line, whose defaults are also the settings `damping.py` and `cg.py` rebuild."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--only", choices=["tabular", "image", "cnn", "gratings", "motifs", "lm"], nargs="+", help="run these settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subsets", type=int, default=64)
    p.add_argument("--seeds", type=int, default=4, help="retraining seeds per subset (≥ 2 for the ceiling)")
    p.add_argument("--checkpoints", type=int, default=4, help="checkpoints for TracIn / segments for SOURCE")
    p.add_argument("--trak-models", type=int, default=5)
    p.add_argument("--cg-steps", type=int, default=5)
    p.add_argument("--tab-train", type=int, default=200)
    p.add_argument("--tab-targets", type=int, default=20)
    p.add_argument("--tab-epochs", type=int, default=10)
    p.add_argument("--image-train", type=int, default=300)
    p.add_argument("--image-epochs", type=int, default=30)
    p.add_argument("--lm-train", type=int, default=96)
    p.add_argument("--lm-targets", type=int, default=10)
    p.add_argument("--lm-epochs", type=int, default=3)
    p.add_argument(
        "--protocol",
        choices=["subset", "reweight"],
        default="subset",
        help="retrain on each subset (same epochs) or reweight losses 0/1 in the full run (same steps)",
    )
    p.add_argument(
        "--adamw",
        action="store_true",
        help="train the classifiers with AdamW (lr 1e-2 tabular, 3e-3 image MLP and CNN, weight decay 0.01) instead of SGD with momentum",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-magic", action="store_true", help="skip MAGIC (the slowest method)")
    p.add_argument(
        "--peers-python",
        default="/work/peers-venv/bin/python",
        help="a virtualenv's python with kronfluence, traker and dattri (peers_driver.py runs there); skipped when absent",
    )
    p.add_argument("--peers-workdir", type=Path, default=Path("/tmp/headwater-lds-peers"))
    p.add_argument("--out", type=Path, help="the JSON written (default results/lds.json, results/lds_adamw.json with --adamw)")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        args.subsets, args.seeds, args.tab_train, args.tab_targets, args.lm_train, args.lm_targets = 12, 2, 60, 5, 24, 3
        args.trak_models, args.tab_epochs, args.lm_epochs, args.image_train, args.image_epochs = 2, 3, 1, 60, 3
    args.out = args.out or Path(__file__).parent / "results" / ("lds_adamw.json" if args.adamw else "lds.json")
    torch.set_num_threads(args.threads)
    settings = {"tabular": tabular, "image": image_mlp, "cnn": small_cnn, "gratings": gratings_cnn, "motifs": motif_cnn, "lm": language_model}
    results = [
        evaluate(dataclasses.replace(settings[k](args), protocol=args.protocol), args) for k in settings if args.only is None or k in args.only
    ]
    text = table(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
