"""The data-filtering check of a corpus map: train again without a bin's records and measure.

    result = filtering_experiment(init_model, tokenizer, records, drop, TrainConfig(...),
                                  aligned, control, seeds=[0, 1, 2])

Each seed replays the training recipe (`Replay`) three times from the same initial model and data
order: on every record ("full"), with the `drop` records' losses zeroed ("filtered"), and with as
many random records of the rest zeroed ("random"). Zeroing keeps the run's steps and batches, so
the arms differ only in what the records teach. The aligned and control benchmarks' gold
log-probability and accuracy are measured after each run; the result reports each arm's change
from "full" and the filtered − random difference with paired bootstrap intervals (items
resampled per benchmark, seeds paired), as `unlearn.py` does for unlearning.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..errors import UserError
from ..task import LanguageModelTask
from ..training import Replay
from .unlearn import METRICS, benchmark, item_scores, paired_bootstrap

ARMS = ("full", "filtered", "random")


def random_drop(n_records: int, drop: np.ndarray, seed: int) -> np.ndarray:
    """As many records as `drop`, drawn from the others (seeded)."""
    rest = np.setdiff1d(np.arange(n_records), drop)
    if len(rest) < len(drop):
        raise UserError(f"cannot draw {len(drop)} random records from the {len(rest)} outside the filtered set")
    return np.sort(np.random.default_rng([seed, 17]).choice(rest, size=len(drop), replace=False))


def trained(init_model: torch.nn.Module, task: LanguageModelTask, records, config: TrainConfig, zeroed: np.ndarray, seed: int):
    """A copy of `init_model` trained by the recipe with data order `seed` and the `zeroed`
    records' losses set to 0."""
    model = copy.deepcopy(init_model)
    run = Replay(model, task, records, TrainConfig(**{**config.to_dict(), "data_seed": int(seed)}))
    weights = torch.ones(len(records), dtype=run.dtype())
    weights[torch.as_tensor(zeroed, dtype=torch.long)] = 0.0
    return run.load(run.train(weights)).eval()


def filtering_experiment(
    init_model: torch.nn.Module,
    tokenizer,
    records,
    drop,
    config: TrainConfig,
    aligned,
    control,
    seeds=(0, 1, 2),
    batch_size: int = 16,
    draws: int = 2000,
    confidence: float = 0.95,
    progress: bool = False,
) -> dict:
    """Train without `drop` (record indices) vs without as many random records vs on all of them;
    JSON-able result with each arm's benchmark means and the changes with intervals."""
    drop = np.unique(np.asarray(drop, dtype=np.int64))
    if drop.size == 0 or drop.min() < 0 or drop.max() >= len(records):
        raise UserError(
            f"the records to filter must be indices of the {len(records)} training records, got {drop.size} (range {drop.min(initial=0)}…)"
        )
    task = LanguageModelTask(tokenizer)
    train = [{k: v for k, v in dict(records[i]).items() if k in ("text", "prompt", "completion", "messages")} for i in range(len(records))]
    benches = {"aligned": benchmark(task, aligned, "aligned"), "control": benchmark(task, control, "control")}
    scores = {arm: {b: {m: [] for m in METRICS} for b in benches} for arm in ARMS}
    bar = tqdm(total=len(seeds) * len(ARMS), desc="filter and train", disable=not progress)
    for seed in seeds:
        zeroed = {"full": np.zeros(0, np.int64), "filtered": drop, "random": random_drop(len(records), drop, seed)}
        for arm in ARMS:
            model = trained(init_model, task, train, config, zeroed[arm], seed)
            for b, bench in benches.items():
                for m, values in zip(METRICS, item_scores(model, task, bench, batch_size)):
                    scores[arm][b][m].append(values)
            bar.update()
    bar.close()
    arr = {arm: {b: {m: np.stack(v) for m, v in d.items()} for b, d in per.items()} for arm, per in scores.items()}  # [S, n]
    out = {"dropped": int(drop.size), "seeds": [int(s) for s in seeds], "config": config.to_dict(), "means": {}, "change": {}}
    for arm in ARMS:
        out["means"][arm] = {b: {m: float(arr[arm][b][m].mean()) for m in METRICS} for b in benches}
    for b in benches:
        out["change"][b] = {}
        for m in METRICS:
            filtered, rand = arr["filtered"][b][m] - arr["full"][b][m], arr["random"][b][m] - arr["full"][b][m]
            lo, hi = paired_bootstrap(filtered - rand, None, draws, confidence)
            out["change"][b][m] = {
                "filtered": float(filtered.mean()),
                "random": float(rand.mean()),
                "diff": float((filtered - rand).mean()),
                "lo": lo,
                "hi": hi,
            }
    return out
