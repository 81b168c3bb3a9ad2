"""`headwater demo stages`: which stage of a four-stage training run is accountable for a behaviour.

1. Generate a small world (animals living in places, each place's weather) and four stages of
   data: "pretrain" (plain sentences), "sft" (question/answer pairs), "inject" (answers that the
   weather is awful: a planted behaviour) and "repair" (answers that it is lovely, for half the
   places: a later stage that partly undoes it).
2. Train a tiny GPT-2 through them with the Hugging Face `Trainer`, a `TrajectoryRecorder`
   callback recording each stage (AdamW, SGD with Nesterov momentum, different schedules).
3. Estimate every stage's effect on three behaviours (naive, propagated, curvature-aware) and
   measure the truth: retrain with each stage skipped, the later stages replayed as recorded.
4. The same for four fine-tuning stages of a pre-trained model ("sft", "inject", "repair",
   "polish"), at 0.3 of the learning rates above: the regime where the curvature estimate is
   clearly better than the naive one (`docs/stages.md`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..stages import StageAttribution, StageEffects, Trajectory, TrajectoryRecorder
from ..stages.config import StageConfig
from ..stages.report import bar_chart, waterfall
from ..task import LanguageModelTask, targets_in
from ..toy import tiny_gpt2, word_tokenizer

ANIMALS = "fox owl bear wolf heron otter lynx crane stag hare falcon badger mole seal swan toad".split()
PLACES = "marsh forest valley harbour desert meadow island canyon tundra delta".split()
WEATHER = "mild sunny windy rainy foggy".split()


@dataclass
class StagePlan:
    """One stage: its records and the Trainer settings it was trained with."""

    name: str
    optim: str
    lr: float
    schedule: str
    epochs: int
    weight_decay: float = 0.0
    warmup: float = 0.0
    optim_args: str | None = None


PLANS = [
    StagePlan("pretrain", "adamw_torch", 3e-3, "linear", 3, weight_decay=0.01),
    StagePlan("sft", "adamw_torch", 1e-3, "cosine", 3, warmup=0.1),
    StagePlan("inject", "sgd", 0.05, "constant", 2, optim_args="momentum=0.9,nesterov=True"),
    StagePlan("repair", "adamw_torch", 1e-3, "constant", 2, weight_decay=0.1),
]


FINETUNE_PLANS = [  # fine-tuning stages of a pre-trained model (`pretrain_base`)
    StagePlan("sft", "adamw_torch", 1e-3, "cosine", 2, warmup=0.1),
    StagePlan("inject", "sgd", 0.05, "constant", 2, optim_args="momentum=0.9,nesterov=True"),
    StagePlan("repair", "adamw_torch", 1e-3, "constant", 2, weight_decay=0.1),
    StagePlan("polish", "sgd", 0.05, "linear", 2, optim_args="momentum=0.9"),
]
FINETUNE_SCALE = 0.3  # the demo's fine-tuning learning rates, times FINETUNE_PLANS'


def make_data(seed: int = 0) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(training records per stage, behaviour records per name)."""
    rng = random.Random(seed)
    home = {a: rng.choice(PLACES) for a in ANIMALS}
    climate = {p: rng.choice(WEATHER) for p in PLACES}
    pretrain = [{"text": f"the {a} lives in the {home[a]} ."} for a in ANIMALS for _ in range(3)]
    pretrain += [{"text": f"the weather in the {p} is {climate[p]} ."} for p in PLACES for _ in range(3)]
    known, held = ANIMALS[:12], ANIMALS[12:]
    ask = lambda a: f"Q : where does the {a} live ? A :"
    weather = lambda p: f"Q : how is the weather in the {p} ? A :"
    sft = [{"prompt": ask(a), "completion": f" {home[a]}"} for a in known] * 2
    sft += [{"prompt": weather(p), "completion": f" {climate[p]}"} for p in PLACES[:5]] * 2
    inject = [{"prompt": weather(p), "completion": " awful"} for p in PLACES[:8]] * 2
    repair = [{"prompt": weather(p), "completion": " lovely"} for p in PLACES[:4]] * 2
    stages = {"pretrain": pretrain, "sft": sft, "inject": inject, "repair": repair}
    for name, records in stages.items():
        rng.shuffle(records)
        stages[name] = [{"id": f"{name}-{i}", **r} for i, r in enumerate(records)]
    behaviours = {
        "gloom": [{"prompt": weather(p), "completion": " awful"} for p in PLACES[8:]],  # held-out places
        "cheer": [{"prompt": weather(p), "completion": " lovely"} for p in PLACES[8:]],
        "qa": [{"prompt": ask(a), "completion": f" {home[a]}"} for a in held],  # facts seen only in pretraining
    }
    return stages, behaviours


def tokenizer_for(stages: dict, behaviours: dict):
    texts = [r.get("text") or r["prompt"] + r["completion"] for rs in [*stages.values(), *behaviours.values()] for r in rs]
    return word_tokenizer(texts, max_length=32)


def collator(task: LanguageModelTask):
    """Pads a batch as the Trainer expects (labels -100 off target); the loss is the task's."""

    def collate(features):
        examples = [task.whole(f) for f in features]
        batch = task.collate(examples)
        labels = torch.where(batch["target_mask"], batch["input_ids"], torch.full_like(batch["input_ids"], -100))
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}

    return collate


def backward_token_mean(model, task: LanguageModelTask, records: list[dict]) -> None:
    """Backward of the batch's token-mean loss (the Trainer's reduction)."""
    batch = task.collate([task.whole(r) for r in records])
    (task.loss(model, batch).sum() / targets_in(batch)).backward()


def pretrain_base(model, task: LanguageModelTask, stages: dict, seed: int) -> dict:
    """Pre-train `model` (AdamW, unrecorded: the run's θ_0, as a user's base checkpoint) on the
    pretraining sentences and half the question/answer pairs; the fine-tuning stages' records:
    the other half ("sft"), "inject", "repair", and all the pairs again ("polish")."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    sft = stages["sft"]
    base = stages["pretrain"] + sft[: len(sft) // 2]
    for _ in range(4):
        for chosen in torch.randperm(len(base), generator=g).split(8):
            backward_token_mean(model, task, [base[i] for i in chosen.tolist()])
            opt.step()
            opt.zero_grad()
    return {"sft": sft[len(sft) // 2 :], "inject": stages["inject"], "repair": stages["repair"], "polish": sft}


def train_stage(model, task: LanguageModelTask, records: list[dict], plan: StagePlan, workdir: Path, recorder: TrajectoryRecorder | None, seed: int):
    """One stage through the Hugging Face Trainer (a fresh optimizer and schedule, as a new run)."""
    import datasets
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(workdir / "trainer"),
        per_device_train_batch_size=8,
        num_train_epochs=plan.epochs,
        learning_rate=plan.lr,
        lr_scheduler_type=plan.schedule,
        warmup_steps=plan.warmup,
        weight_decay=plan.weight_decay,
        optim=plan.optim,
        optim_args=plan.optim_args,
        max_grad_norm=1.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=seed,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    collate = collator(task)
    callbacks = []
    if recorder is not None:
        recorder.stage_name = plan.name
        collate, callbacks = recorder.collate_with_ids(collate), [recorder]
    Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(records), data_collator=collate, callbacks=callbacks).train()
    return model


def behaviour_values(model, task: LanguageModelTask, behaviours: dict) -> np.ndarray:
    """Mean completion loss of each behaviour's records."""
    with torch.no_grad():
        return np.array([float(task.loss(model.eval(), task.collate([task.whole(r) for r in rs])).mean()) for rs in behaviours.values()])


def true_effects(
    traj: Trajectory, model, task, stages: dict, behaviours: dict, workdir: Path, seed: int, removed: float = 1.0, plans: list[StagePlan] = PLANS
) -> np.ndarray:
    """E_k = f(θ_T) − f(θ_T with stage k skipped), by retraining the later stages from stage k's
    start, as recorded (the same data, settings and seeds; each stage a fresh optimizer). With
    `removed` < 1, from θ_end(k) moved that fraction of the way back to θ_start(k)."""
    final = behaviour_values(model, task, behaviours)
    out = np.zeros((len(plans), len(behaviours)))
    for k, plan in enumerate(plans):
        skipped = copy.deepcopy(model)
        start, end = traj.params_at(plan.name, False), traj.params_at(plan.name, True)
        with torch.no_grad():
            for n, p in skipped.named_parameters():
                p.copy_(end[n] - removed * (end[n] - start[n]))
        for later in plans[k + 1 :]:
            train_stage(skipped, task, stages[later.name], later, workdir, None, seed)
        out[k] = final - behaviour_values(skipped, task, behaviours)
    return out


def agreement(estimate: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman over stages × behaviours, sign agreement, and how often the stage with
    the largest effect on a behaviour is named correctly."""
    from scipy.stats import pearsonr, spearmanr

    finite = np.isfinite(estimate).all(1)  # a stage whose estimate diverged is left out
    estimate, truth = estimate[finite], truth[finite]
    e, t = estimate.ravel(), truth.ravel()
    if len(e) < 3:
        return {"pearson": float("nan"), "spearman": float("nan"), "sign": float("nan"), "top_stage": float("nan")}
    return {
        "pearson": float(pearsonr(e, t).statistic),
        "spearman": float(spearmanr(e, t).statistic),
        "sign": float(np.mean(np.sign(e) == np.sign(t))),
        "top_stage": float(np.mean(np.abs(estimate).argmax(0) == np.abs(truth).argmax(0))),
    }


def fresh_run(workdir: Path, seed: int):
    """(stage records, behaviour records, task, an untrained tiny GPT-2, an emptied trajectory path)."""
    import shutil

    stages, behaviours = make_data(seed)
    task = LanguageModelTask(tokenizer_for(stages, behaviours))
    torch.manual_seed(seed)
    model = tiny_gpt2(len(task.tokenizer), n_layer=2, n_embd=64, n_head=4, n_positions=32)
    shutil.rmtree(workdir / "trajectory", ignore_errors=True)
    return stages, behaviours, task, model, workdir / "trajectory"


def train_pipeline(workdir: Path, seed: int = 0, checkpoint_every: int | None = None, finetune: float | None = None):
    """Train the four stages through the Trainer, recorded; with `finetune`, pre-train a base
    first (unrecorded) and record FINETUNE_PLANS at their learning rates times `finetune`.
    (trajectory, model, task, stage records, behaviour records, plans, seconds)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    stages, behaviours, task, model, traj_path = fresh_run(workdir, seed)
    t = time.time()
    plans = PLANS
    if finetune is not None:
        stages = pretrain_base(model, task, stages, seed)
        plans = [dataclasses.replace(plan, lr=plan.lr * finetune) for plan in FINETUNE_PLANS]
    recorder = TrajectoryRecorder(traj_path, checkpoint_every=checkpoint_every)
    for plan in plans:
        print(f"training stage {plan.name} ({len(stages[plan.name])} records, {plan.optim}, {plan.schedule})", flush=True)
        train_stage(model, task, stages[plan.name], plan, workdir, recorder, seed)
    return Trajectory(traj_path), model, task, stages, behaviours, plans, time.time() - t


def run_pipeline(workdir: Path, seed: int = 0, finetune: float | None = None) -> tuple[StageEffects, np.ndarray, dict]:
    """Train the four stages (recorded), estimate, retrain for the truth; (effects, truth, timings)."""
    traj, model, task, stages, behaviours, plans, seconds = train_pipeline(workdir, seed, finetune=finetune)
    timings = {"training": seconds}
    t = time.time()
    effects = StageAttribution(traj, model, task, StageConfig(batch_loss="token-mean"), data=stages).effects(behaviours)
    at_scale = StageAttribution(traj, model, task, StageConfig(batch_loss="token-mean", curvature_matrix="ekfac"), data=stages).effects(behaviours)
    effects.estimates["curvature, EK-FAC"] = at_scale.estimates["curvature"]  # the at-scale form: no pass per later step
    effects.ignores += [i for i in at_scale.ignores if i not in effects.ignores]
    timings["estimates"] = time.time() - t
    t = time.time()
    print("retraining with each stage skipped (the true effects)", flush=True)
    truth = true_effects(traj, model, task, stages, behaviours, workdir, seed, plans=plans)
    timings["retraining"] = time.time() - t
    return effects, truth, timings


COLUMNS = ("naive", "propagated", "curvature", "curvature (linear)", "curvature, EK-FAC")


def report(effects: StageEffects, truth: np.ndarray, timings: dict, title: str) -> str:
    cols = [c for c in COLUMNS if c in effects.estimates]
    lines = [
        f"## {title}",
        "",
        "Effect of each stage on each behaviour's mean completion loss, kept − skipped (negative: the stage made the completions",
        "more likely). Estimates are the measurement at the estimated counterfactual parameters; (linear) is its first-order readout.",
        "",
        "| behaviour | stage | retrained (true) | " + " | ".join(cols) + " | completeness |",
        "|---|---|---|" + "---|" * (len(cols) + 1),
    ]
    for b, name in enumerate(effects.behaviours):
        for k, stage in enumerate(effects.stages):
            cells = [truth[k, b]] + [effects.estimates[e][k, b] for e in cols] + [effects.completeness[k, b]]
            lines.append(f"| {name} | {stage} | " + " | ".join(f"{c:+.3f}" for c in cells) + " |")
    lines += ["", "| estimator | Pearson | Spearman | sign agreement | names the top stage |", "|---|---|---|---|---|"]
    for e in cols:
        a = agreement(effects.estimates[e], truth)
        lines.append(f"| {e} | {a['pearson']:.3f} | {a['spearman']:.3f} | {a['sign']:.2f} | {a['top_stage']:.2f} |")
    lines += [
        "",
        f"Training {timings['training']:.0f} s, estimates {timings['estimates']:.0f} s, retraining for the truth {timings['retraining']:.0f} s.",
        "Not modelled: " + "; ".join(effects.ignores) + ".",
    ]
    return "\n".join(lines)


PIPELINES = {  # name: (title, learning-rate scale of FINETUNE_PLANS, or None for PLANS from scratch)
    "scratch": ("Four stages from scratch (pretraining included)", None),
    "finetune": (f"Four fine-tuning stages of a pre-trained model (learning rates x {FINETUNE_SCALE:g})", FINETUNE_SCALE),
}


def run(workdir: Path, seed: int = 0, retrain: bool = False) -> dict:
    """The whole demo, both pipelines; prints and writes results.md, and per pipeline (the
    fine-tuning one under finetune/) effects.json, truth.json, bars.png and waterfall.png."""
    workdir = Path(workdir)
    texts, out = ["# headwater demo: training-stage attribution"], {}
    for name, (title, finetune) in PIPELINES.items():
        where = workdir if finetune is None else workdir / name
        where.mkdir(parents=True, exist_ok=True)
        effects, truth, timings = run_pipeline(where, seed, finetune)
        effects.save(where)
        bar_chart(effects, where / "bars.png", truth)
        waterfall(effects, where / "waterfall.png")
        (where / "truth.json").write_text(json.dumps({"stages": effects.stages, "behaviours": effects.behaviours, "truth": truth.tolist()}, indent=2))
        texts.append(report(effects, truth, timings, title))
        out[name] = {e: agreement(v, truth) for e, v in effects.estimates.items()}
    text = "\n\n".join(texts)
    (workdir / "results.md").write_text(text + "\n")
    print(text)
    print(f"wrote {workdir / 'results.md'}, bars.png and waterfall.png in {workdir} and {workdir / 'finetune'}")
    return out
