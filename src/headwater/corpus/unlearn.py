"""Causal validation of a corpus bin's attribution by targeted unlearning.

If an attribution says which records of a bin (say topic=Literature) support a benchmark, forgetting
the bin's top records should hurt that benchmark more than forgetting as many random records of the
same bin (matched in tokens, same optimisation budget), beyond what either does to a control benchmark:

    result = unlearning_experiment(model, tokenizer, records, members, scores, aligned, control)
    result["effect"]["logprob"]   # {"top", "random", "did", "lo", "hi"}: hi < 0 is evidence of causality
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import H_BATCH, H_BOOTSTRAP, H_BOOTSTRAP_SEED, H_CONFIDENCE, Config, option
from ..errors import UserError
from ..task import LanguageModelTask, TokenExample, at_least_float32, batch_to, collated_batches

ARMS = ("top", "random")
METRICS = ("logprob", "accuracy")
BENCHMARKS = ("aligned", "control")


@dataclass
class UnlearnConfig(Config):
    """Targeted unlearning of a bin's top-scored records against random records of the same bin."""

    forget: int = option(32, "Records to forget: the bin's top-N by score, and as many random records of the same bin.")
    objective: str = option(
        "ascent",
        "ascent (gradient ascent on the forget set plus a retain term) or npo (negative preference optimisation against the starting model).",
        choices=("ascent", "npo"),
    )
    optimizer: str = option(
        "adamw",
        "adamw (per-coordinate normalised steps: a steady pace, but over a few steps they follow the gradient's direction "
        "only loosely) or sgd (plain gradient steps, what the attribution scores measure; ascent speeds up as the loss rises, "
        "so the useful learning rates span a narrow range).",
        choices=("adamw", "sgd"),
        flag="--unlearn-optimizer",
    )
    steps: int = option(20, "Optimizer steps of each unlearning run (the same for every arm and seed).", flag="--unlearn-steps")
    lr: float = option(1e-5, "Constant learning rate of each unlearning run (calibrate it by the retain perplexity reported).", flag="--unlearn-lr")
    train_batch_size: int = option(8, "Examples per optimizer step of the training run.")
    retain_weight: float = option(1.0, "Weight of the retain set's mean loss in the unlearning objective (0: forget term alone).")
    retain: int = option(256, "Records outside the bin used as the retain set (sampled).")
    npo_beta: float = option(0.1, "NPO's inverse temperature beta.")
    seeds: list[int] = option([0, 1, 2], "Seeds of the unlearning runs (repeatable): each draws a random forget set and the batch order.")
    bootstrap: int = option(2000, H_BOOTSTRAP)
    confidence: float = option(0.95, H_CONFIDENCE)
    bootstrap_seed: int = option(0, H_BOOTSTRAP_SEED)
    batch_size: int = option(16, H_BATCH)

    def __post_init__(self):
        super().__post_init__()
        if self.forget < 1:
            raise UserError(f"--forget must be at least 1, got {self.forget}")
        if min(self.steps, self.lr, self.retain, self.retain_weight) < 0:
            raise UserError("--unlearn-steps, --unlearn-lr, --retain and --retain-weight must not be negative")
        if min(self.train_batch_size, self.batch_size, self.bootstrap, len(self.seeds)) < 1:
            raise UserError("--train-batch-size, --batch-size, --bootstrap and --seeds must be at least 1 (one seed)")
        if not 0 < self.confidence < 1 or self.npo_beta <= 0:
            raise UserError(f"--confidence must be in (0, 1) and --npo-beta positive, got {self.confidence} and {self.npo_beta}")


# ----------------------------------------------------------------------------------- forget sets


def checked_members(n_records: int, members, scores, forget: int) -> tuple[np.ndarray, np.ndarray]:
    """The bin's record indices (sorted, unique) [M] and the scores as float64 [n_records]."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != n_records:
        raise UserError(f"scores has {len(scores)} values for {n_records} records (one score per training record is needed)")
    members = np.asarray(members)
    if members.dtype == bool:
        if len(members) != n_records:
            raise UserError(f"the members mask has {len(members)} entries for {n_records} records")
        members = np.flatnonzero(members)
    members = np.unique(members.astype(np.int64))
    if members.size and (members[0] < 0 or members[-1] >= n_records):
        raise UserError(f"members must be record indices in [0, {n_records})")
    if members.size < forget:
        raise UserError(f"the bin has {members.size} records, fewer than the {forget} to forget (--forget)")
    return members, scores


def top_set(members: np.ndarray, scores: np.ndarray, n: int) -> np.ndarray:
    """The n members with the highest scores [n], best first (ties: lower index first)."""
    return members[np.argsort(-scores[members], kind="stable")[:n]]


def matched_random_set(pool: np.ndarray, tokens: np.ndarray, target: int, n: int, seed: int) -> np.ndarray:
    """A random n-subset of `pool` [n] whose total of `tokens` (indexed by record) is near `target`.

    A uniform draw, then greedy swaps with the rest of the pool, each the one that best closes the
    token gap, until no swap helps: attribution scores often favour long records, and a random set
    with fewer tokens would be forgotten less for that reason alone.
    """
    rng = np.random.default_rng([seed, 0])
    chosen = rng.choice(pool, n, replace=False)
    rest = np.setdiff1d(pool, chosen)
    for _ in range(n):
        gap = int(tokens[chosen].sum()) - target
        if gap == 0 or rest.size == 0:
            break
        order = np.argsort(tokens[rest], kind="stable")
        sorted_tokens = tokens[rest][order]
        want = tokens[chosen] - gap  # swapping i out for j in moves the gap by t_j − t_i
        pos = np.searchsorted(sorted_tokens, want)
        near = np.stack([np.clip(pos - 1, 0, rest.size - 1), np.clip(pos, 0, rest.size - 1)])  # [2, n]
        new_gap = np.abs(gap - tokens[chosen][None] + sorted_tokens[near])
        k, i = np.unravel_index(np.argmin(new_gap), new_gap.shape)
        if new_gap[k, i] >= abs(gap):
            break
        j = order[near[k, i]]
        chosen[i], rest[j] = rest[j], chosen[i]
    return chosen


def retain_sample(n_records: int, members: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Up to `size` record indices outside the bin [≤ size], one set shared by every run so retain perplexities compare."""
    outside = np.setdiff1d(np.arange(n_records), members)
    return np.sort(np.random.default_rng([seed, 1]).choice(outside, min(size, outside.size), replace=False))


# ------------------------------------------------------------------------------------ evaluation


@dataclass
class Benchmark:
    """Benchmark items as examples: one per choice (multiple choice) or one per item (completion)."""

    examples: list[TokenExample]
    starts: np.ndarray  # [n+1]: item k's examples are examples[starts[k]:starts[k+1]]
    answer: np.ndarray  # [n]: the gold example's offset within its item's examples
    multiple: np.ndarray  # [n] bool: multiple choice


def benchmark(task: LanguageModelTask, items, name: str) -> Benchmark:
    """The items ({"prompt", "completion"} or {"prompt", "choices", "answer"}) encoded, checked one by one."""
    if items is None or len(items) == 0:
        raise UserError(f"the {name} benchmark is empty")
    examples, starts, answers, multiple = [], [0], [], []
    for k in range(len(items)):
        item = items[k]
        choices = item.get("choices")
        completions = list(choices) if choices else [item.get("completion")]
        answer = item.get("answer") if choices else 0
        if "prompt" not in item or any(c is None for c in completions):
            raise UserError(f"{name} item {k} needs a prompt and a completion (or choices with an answer); it has {sorted(item)}")
        if isinstance(answer, bool) or not isinstance(answer, (int, np.integer)) or not 0 <= answer < len(completions):
            raise UserError(f"{name} item {k}: answer must index its {len(completions)} choices, got {answer!r}")
        examples += [task.whole({"prompt": item["prompt"], "completion": c}) for c in completions]
        starts.append(len(examples))
        answers.append(int(answer))
        multiple.append(bool(choices))
    return Benchmark(examples, np.array(starts), np.array(answers), np.array(multiple))


def sequence_scores(model: torch.nn.Module, task: LanguageModelTask, examples: list, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-prob of each example's target tokens [E], and whether each target token is the
    argmax under teacher forcing [E] (all of them)."""
    device = next(model.parameters()).device
    logprob, exact = [], []
    with torch.no_grad():
        for batch in collated_batches(task, examples, batch_size):
            batch = batch_to(batch, device)
            logits = at_least_float32(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1])  # [B, T-1, V]
            targets, mask = batch["input_ids"][:, 1:], batch["target_mask"][:, 1:]
            token = logits.gather(-1, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)  # no second [B, T-1, V] array
            logprob.append(torch.where(mask, token, 0.0).sum(1).double().cpu())
            exact.append(((logits.argmax(-1) == targets) | ~mask).all(1).cpu())
    return torch.cat(logprob).numpy(), torch.cat(exact).numpy()


def item_scores(model: torch.nn.Module, task: LanguageModelTask, bench: Benchmark, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Gold log-prob [n] and correctness in {0, 1} [n] of each item: multiple choice, whether the
    gold choice has the highest summed log-prob (first on ties); otherwise greedy exactness."""
    logprob, exact = sequence_scores(model, task, bench.examples, batch_size)
    gold = bench.starts[:-1] + bench.answer
    picked = [int(np.argmax(logprob[s:e])) for s, e in zip(bench.starts[:-1], bench.starts[1:])]
    correct = np.where(bench.multiple, np.array(picked) == bench.answer, exact[gold])
    return logprob[gold], correct.astype(np.float64)


def perplexity(model: torch.nn.Module, task: LanguageModelTask, examples: list, batch_size: int) -> float | None:
    """exp of the mean target-token NLL over `examples` (None without any)."""
    if not examples:
        return None
    logprob, _ = sequence_scores(model, task, examples, batch_size)
    tokens = sum(sum(e.target_mask[1:]) for e in examples)
    return float(np.exp(-logprob.sum() / max(tokens, 1)))


def evaluation(model, task, benches: dict[str, Benchmark], retain: list, batch_size: int) -> dict:
    """Per-item arrays {"aligned"|"control": {"logprob" [n], "accuracy" [n]}} and "retain_ppl"."""
    out = {name: dict(zip(METRICS, item_scores(model, task, bench, batch_size))) for name, bench in benches.items()}
    return {**out, "retain_ppl": perplexity(model, task, retain, batch_size)}


# ------------------------------------------------------------------------------------ unlearning


def batch_order(n: int, size: int, steps: int, seed: int) -> list[list[int]]:
    """Indices into an n-record set for each step [steps][min(size, n)]: consecutive permutations.

    Both arms of a seed have n = --forget records, so they get the same positions in the same order."""
    g, size = torch.Generator().manual_seed(seed), min(size, n)
    stream = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-steps * size // n))]) if steps and n else torch.zeros(0)
    return [stream[t * size : (t + 1) * size].tolist() for t in range(steps)]


def forget_loss(model, task: LanguageModelTask, batch, ref: torch.Tensor, config: UnlearnConfig) -> torch.Tensor:
    """The forget term: −mean sequence loss (ascent), or NPO's (2/β)·mean log(1 + exp(β(log p_θ − log p_ref))), ref [B]."""
    nll = task.loss(model, batch)  # [B]
    if config.objective == "ascent":
        return -nll.mean()
    return 2 / config.npo_beta * F.softplus(config.npo_beta * (-nll - ref)).mean()


def unlearned(model, task: LanguageModelTask, forget: list, retain: list, config: UnlearnConfig, seed: int) -> torch.nn.Module:
    """A copy of `model` after `config.steps` optimizer steps on the unlearning objective (the model is untouched)."""
    device = next(model.parameters()).device
    npo = config.objective == "npo"
    ref = torch.from_numpy(sequence_scores(model, task, forget, config.batch_size)[0] if npo else np.zeros(len(forget))).float().to(device)
    work = copy.deepcopy(model).eval()  # dropout off: the forget set is the only thing that differs between arms
    params = [p for p in work.parameters() if p.requires_grad]
    # no decay: lr = 0 leaves the model exactly as it was
    opt = torch.optim.SGD(params, lr=config.lr) if config.optimizer == "sgd" else torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    forget_order = batch_order(len(forget), config.train_batch_size, config.steps, seed)
    retain_order = batch_order(len(retain), config.train_batch_size, config.steps, seed)
    use_retain = bool(retain) and config.retain_weight > 0
    with torch.enable_grad():
        for t, idx in enumerate(forget_order):
            loss = forget_loss(work, task, batch_to(task.collate([forget[i] for i in idx]), device), ref[idx], config)
            if use_retain:
                batch = batch_to(task.collate([retain[i] for i in retain_order[t]]), device)
                loss = loss + config.retain_weight * task.loss(work, batch).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return work


# ------------------------------------------------------------------------------------ statistics


def resampled_means(x: np.ndarray, seed_counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Means of x [S, n] under resampled seeds (counts [D, S]) and freshly resampled items [D]:
    cᵀ·x·d / (S·n), so no [D, S, n] array is formed."""
    S, n = x.shape
    out = np.empty(len(seed_counts))
    step = max(1, 2**22 // max(n, 1))  # item counts [chunk, n] stay a few tens of MB
    for i in range(0, len(seed_counts), step):
        c = seed_counts[i : i + step]
        d = rng.multinomial(n, np.full(n, 1 / n), size=len(c))
        out[i : i + step] = ((c @ x) * d).sum(1) / (S * n)
    return out


def paired_bootstrap(
    aligned: np.ndarray, control: np.ndarray | None = None, draws: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of mean(aligned) − mean(control) (control optional).

    aligned [S, n_a], control [S, n_c]: per-seed, per-item paired differences (top minus random
    change). Seeds are resampled once for both (seed s of each benchmark is the same run pair), items
    independently per benchmark.
    """
    rng = np.random.default_rng(seed)
    S = aligned.shape[0]
    seed_counts = rng.multinomial(S, np.full(S, 1 / S), size=draws)  # [D, S]
    stat = resampled_means(aligned, seed_counts, rng)
    if control is not None:
        stat = stat - resampled_means(control, seed_counts, rng)
    lo, hi = np.quantile(stat, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def changes(before: dict, runs: list[dict], arm: str, bench: str, metric: str) -> np.ndarray:
    """After − before of each seed's run and item [S, n]."""
    return np.stack([r[bench][metric] for r in runs if r["arm"] == arm]) - before[bench][metric]


def effects(before: dict, runs: list[dict], config: UnlearnConfig) -> dict:
    """The difference-in-differences per metric, each benchmark's top-minus-random change (with CIs),
    and each arm's mean retain-perplexity change."""
    after = {arm: [r["retain_ppl"] for r in runs if r["arm"] == arm] for arm in ARMS}
    ppl = {arm: None if before["retain_ppl"] is None else float(np.mean(v) - before["retain_ppl"]) for arm, v in after.items()}
    out = {"effect": {}, "aligned_drop": {}, "control_drop": {}, "retain_ppl_change": ppl}
    ci = dict(draws=config.bootstrap, confidence=config.confidence, seed=config.bootstrap_seed)
    for metric in METRICS:
        d = {(arm, b): changes(before, runs, arm, b, metric) for arm in ARMS for b in BENCHMARKS}
        diff = {b: d["top", b] - d["random", b] for b in BENCHMARKS}  # [S, n]: seed s of top paired with seed s of random
        for b in BENCHMARKS:
            lo, hi = paired_bootstrap(diff[b], **ci)
            top, rand = float(d["top", b].mean()), float(d["random", b].mean())
            out[f"{b}_drop"][metric] = {"top": top, "random": rand, "diff": top - rand, "lo": lo, "hi": hi}
        top = float(d["top", "aligned"].mean() - d["top", "control"].mean())
        rand = float(d["random", "aligned"].mean() - d["random", "control"].mean())
        lo, hi = paired_bootstrap(diff["aligned"], diff["control"], **ci)
        out["effect"][metric] = {"top": top, "random": rand, "did": top - rand, "lo": lo, "hi": hi}
    return out


def means(evaluated: dict) -> dict:
    """Per-item arrays reduced to their means (JSON-able)."""
    return {**{b: {m: float(evaluated[b][m].mean()) for m in METRICS} for b in BENCHMARKS}, "retain_ppl": evaluated["retain_ppl"]}


def verdict(out: dict, confidence: float) -> str:
    """One line reading the log-prob results from their intervals: the aligned benchmark's
    top-vs-random difference first, then whether the difference-in-differences owes its sign to
    the control benchmark (random records can hurt the control more than the top ones do)."""
    aligned, did, level = out["aligned_drop"]["logprob"], out["effect"]["logprob"], f"{confidence:.0%} CI"
    if aligned["hi"] < 0:
        line = f"forgetting the top records lowered the aligned gold log-prob more than random records of the bin ({level} below 0)"
    elif aligned["lo"] > 0:
        line = f"forgetting the top records lowered the aligned gold log-prob less than random records of the bin ({level} above 0)"
    else:
        line = f"the aligned gold log-prob fell about as much for the top as for random records of the bin ({level} includes 0)"
    if did["hi"] < 0:
        line += "; the difference-in-differences is below 0" + ("" if aligned["hi"] < 0 else ", carried by the control benchmark")
    elif did["lo"] > 0:
        line += "; the difference-in-differences is above 0"
    return line


# ------------------------------------------------------------------------------------ experiment


def unlearning_experiment(model, tokenizer, records, members, scores, aligned, control, config: UnlearnConfig | None = None, progress=False) -> dict:
    """Forget a bin's top-scored records vs. as many token-matched random records of the bin, per seed.

    `members`: record indices of the bin [M] (or a bool mask [len(records)]); `scores`: each
    record's attribution score for the aligned benchmark [len(records)], higher = more supportive.
    `aligned`, `control`: items {"prompt", "completion"} or {"prompt", "choices", "answer"}.
    Returns a JSON-able dict; `model` is left as it was.
    """
    config = config or UnlearnConfig()
    task = LanguageModelTask(tokenizer)
    members, scores = checked_members(len(records), members, scores, config.forget)
    benches = {"aligned": benchmark(task, aligned, "aligned"), "control": benchmark(task, control, "control")}
    n, notes = config.forget, []
    examples = {int(i): task.whole(records[int(i)]) for i in members}
    tokens = np.zeros(len(records), dtype=np.int64)
    tokens[members] = [len(examples[int(i)].input_ids) for i in members]
    top = top_set(members, scores, n)
    pool = members if members.size < 2 * n else np.setdiff1d(members, top)
    if members.size < 2 * n:
        notes.append(f"the bin has {members.size} records, fewer than 2 x {n}: random sets are drawn from all of it and overlap the top set")
    randoms = [matched_random_set(pool, tokens, int(tokens[top].sum()), n, s) for s in config.seeds]
    worst = max(abs(int(tokens[r].sum()) - int(tokens[top].sum())) for r in randoms) / max(int(tokens[top].sum()), 1)
    if worst > 0.05:
        notes.append(f"the random sets' token counts differ from the top set's by up to {worst:.0%} (the bin has too few records of matching length)")
    retain_idx = retain_sample(len(records), members, config.retain, config.seeds[0])
    retain = [task.whole(records[int(i)]) for i in retain_idx]
    if not retain or config.retain_weight == 0:
        notes.append("no retain term (no records outside the bin, --retain 0 or --retain-weight 0)")
    if len(config.seeds) < 3:
        notes.append(f"only {len(config.seeds)} seed(s): the seed-level variation is barely sampled (use at least 3)")

    was_training, runs = model.training, []
    model.eval()
    try:
        before = evaluation(model, task, benches, retain, config.batch_size)
        bar = tqdm(total=2 * len(config.seeds), desc="unlearn", disable=not progress)
        for seed, rand in zip(config.seeds, randoms):
            for arm, chosen in zip(ARMS, (top, rand)):
                work = unlearned(model, task, [examples[int(i)] for i in chosen], retain, config, seed)
                runs.append({"arm": arm, "seed": int(seed), **evaluation(work, task, benches, retain, config.batch_size)})
                del work
                bar.update()
        bar.close()
    finally:
        model.train(was_training)

    out = effects(before, runs, config)
    notes.append(verdict(out, config.confidence))
    return {
        "config": config.to_dict(),
        "bin_size": int(members.size),
        "forget": n,
        "tokens": {"top": int(tokens[top].sum()), "random": [int(tokens[r].sum()) for r in randoms]},
        "sets": {"top": top.tolist(), "random": [r.tolist() for r in randoms], "retain": retain_idx.tolist()},
        "before": means(before),
        "runs": [{"arm": r["arm"], "seed": r["seed"], **means(r)} for r in runs],
        **out,
        "notes": notes,
    }
