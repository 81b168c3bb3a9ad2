"""Removal check of concept attribution: does taking out a ranking's top records lower the trait?

`headwater demo concepts` plants a hostile tone in 7% (84) of 1200 fine-tuning records of a tiny
GPT-2 (plus 84 friendly near misses with the same words) and ranks the records by Concept
Influence and its baselines; the demo scores those rankings against the planted labels (AUROC,
precision@k). This script checks them against the model instead: for each ranking it removes the
top x% of the fine-tuning records, re-fine-tunes the *base* model on the rest with the demo's own
recipe (`fine_tune(base_dir, data, cfg, seed)`: AdamW, 6 epochs, batch 16, data order from the
seed) and measures the trait on the 44 held-out evaluation prompts with the demo's measure
(sampled answers; the share that is hostile by the demo's marker phrases, and the mean value of
the demo's probe on them). The reference is the full data fine-tuned with the same seed; every condition uses the same
seeds and, for evaluation, the same sampling seed per training seed, so all comparisons are
paired.

Reported per ranking and fraction: how many planted records the removal took out; the hostile
rate after removal; and the drop vs the reference (mean over seeds and prompts) in three read-outs:
the hostile rate, the mean probe value (trait_expression's second number) and the probe-judged
rate (mean σ(probe value), the quantity Concept Influence on own samples differentiates). Each
drop has a 95% percentile interval from a paired bootstrap that resamples seeds and evaluation
prompts (the same drawn prompts for every drawn seed) over the per-prompt drops. With 2–3 seeds
the seed half of that bootstrap is coarse and tends to understate the seed spread; the JSON also
has each seed's drop and a t interval over seeds (very wide with so few seeds).

Details that matter when reading it:
- Evaluation samples use sampling seed 10000 + training seed, not the seed-0 samples that Concept
  Influence was computed on (same prompts, different draws), so the headline ranking is not
  scored on its own query samples.
- The probe is the demo's (trained on the original fine-tuned model's layer 1) applied unchanged
  to every retrained model. Its raw mean value moves between retrained models by about as much
  as the hostile answers move it (most answers are friendly, at a baseline that each fine-tune
  shifts), so the mean probe value is a poor read-out of the trait across retrained models;
  σ(value) is ~0 on friendly answers whatever that baseline, hence the probe-judged rate.
- "random" is the demo's random ranking (one fixed permutation, seed 0), the same removal for every
  seed; it is the control for "removing any x% of the data changes the rate".
- The seed-0 reference is the demo's cached fine-tuned model (fine_tune is deterministic on CPU:
  retraining it reproduces it bit for bit); runs are cached in the work directory by (removed
  records, seed, evaluation settings), so identical removals are trained once and a rerun with
  more seeds or rankings only trains what is new.

Budget: the rankings take 6–10 min on 2 cores shared with other work (once; cached: 581 s in the
recorded run, at a load average of ~4), one fine-tune + evaluation ~10 s (more while another
process shares the cores). The full grid (8 rankings × 3 fractions × 3 seeds = 72 runs +
references) does not fit in ~15 minutes with the rankings, so the default runs 4 rankings × 3
fractions × 3 seeds (38 runs): Concept Influence on own samples,
probe projection, loss influence on generated hostile answers and random. The other four remove
near-identical kinds of records to one of these (at 1/5/10%, planted records removed:
projection difference 12/60/84 like probe projection and Concept Influence 12/60/83; BM25 9/21/43
like loss influence 1/21/43; teacher-forced Concept Influence 5/12/21 and activation gradient
0/7/15, near random's 2/5/6, the demo's docstring says why), so they add rows, not contrasts.

    python benchmarks/concepts_removal.py                   # default: 4 rankings × 3 fractions × 3 seeds (17 min recorded)
    python benchmarks/concepts_removal.py --rankings all --out benchmarks/results/concepts_removal_all.json  # all 8 (5.5 min more)
    python benchmarks/concepts_removal.py --fractions 5 10 --rankings ci-own probe random --seeds 5

The models, the rankings and every run are cached under --workdir (default
headwater-demo/concepts-removal; the demo's models in headwater-demo/concepts are copied when
their cache key matches). Prints a markdown table and writes benchmarks/results/concepts_removal.json
and .md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from headwater.concepts import ConceptVector, train_probe
from headwater.demos import run_with_portable_kernels
from headwater.demos.concepts import CONCEPT_INFLUENCE, ConceptDemoConfig, expresses, fine_tune, planted_metrics, prepare, rankings, trait_expression
from headwater.generate import completions
from headwater.methods import ProbeProjection
from headwater.models import load_model
from headwater.task import LanguageModelTask

SHORT = {  # --rankings names -> the demo's ranking names
    "ci-own": CONCEPT_INFLUENCE,
    "ci-tf": "Concept Influence (EK-FAC), teacher-forced",
    "probe": "probe projection",
    "projdiff": "projection difference",
    "actgrad": "activation gradient",
    "loss": "loss influence on generated hostile answers (EK-FAC)",
    "bm25": "BM25 on generated hostile answers",
    "random": "random",
}
DEFAULT_RANKINGS = ["ci-own", "probe", "loss", "random"]
METRICS = ("hostile", "probe", "probe_rate")  # hostile rate by marker phrases; mean probe value; mean σ(probe value)
EVAL_SEED_OFFSET = 10_000  # evaluation samples are not the seed-0 samples Concept Influence was computed on
MAX_NEW_TOKENS = 24  # as trait_expression


def setup(workdir: Path, cfg: ConceptDemoConfig, demo_dir: Path):
    """(base dir, tuned dir, corpus, tokenizer, probe), reusing the demo's cached models when the key matches."""
    key = cfg.key()
    for name in (f"base-{key}", f"tuned-{key}"):
        src, dst = demo_dir / name, workdir / name
        if not (dst / "config.json").exists() and (demo_dir / f"tuned-{key}" / "config.json").exists():
            workdir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dst, dirs_exist_ok=True)
            print(f"copied {src} -> {dst}")
    base_dir, tuned_dir, corpus = prepare(workdir, cfg)
    model, tokenizer = load_model(str(tuned_dir))
    probe_dir = workdir / f"probe-{key}"
    if (probe_dir / "concept.json").exists():
        concept = ConceptVector.load(probe_dir)
    else:  # as the demo's run()
        probe = corpus["probe"]
        concept = train_probe(
            model,
            LanguageModelTask(tokenizer),
            [r for r in probe if r["kind"] == "hostile"],
            [r for r in probe if r["kind"] != "hostile"],
            cfg.layer,
            name="hostile tone",
        )
        concept.save(probe_dir)
    return base_dir, tuned_dir, corpus, model, tokenizer, concept


def cached_rankings(workdir: Path, cfg: ConceptDemoConfig, model, tokenizer, corpus, concept) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    path = workdir / f"rankings-{cfg.key()}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        print(f"using the cached rankings in {path}")
        return {k: np.asarray(v) for k, v in saved["scores"].items()}, saved["seconds"]
    t = time.time()
    scores, seconds, _ = rankings(model, tokenizer, corpus, concept, cfg.seed)
    print(f"rankings: {time.time() - t:.0f} s")
    path.write_text(json.dumps({"scores": {k: v.tolist() for k, v in scores.items()}, "seconds": seconds}))
    return scores, seconds


def per_prompt_expression(model, tokenizer, prompts: list[dict], concept: ConceptVector, samples: int, seed: int) -> dict[str, list[float]]:
    """`trait_expression`, kept per evaluation prompt: the share of its `samples` sampled answers
    that are hostile and their mean probe value, [prompts] each (same sampling call and probe
    read-out, so the means over prompts are trait_expression's two numbers); also the mean of the
    probe's probability σ(value), the probe-judged trait rate."""
    texts = [p["prompt"] for p in prompts for _ in range(samples)]
    answers = completions(model, tokenizer, texts, max_new_tokens=MAX_NEW_TOKENS, sample=True, seed=seed, batch_size=64)
    hostile = np.array([expresses(a) for a in answers], dtype=np.float64).reshape(len(prompts), samples)
    probe = ProbeProjection(model, LanguageModelTask(tokenizer)).fit([{"prompt": p, "completion": a} for p, a in zip(texts, answers)])
    values = np.asarray(probe.score(None, concept.measurement()).values, dtype=np.float64).reshape(len(prompts), samples)
    rate = 1 / (1 + np.exp(-values))  # the probe's probability of the trait: the quantity Concept Influence on own samples targets
    return {"hostile": hostile.mean(1).tolist(), "probe": values.mean(1).tolist(), "probe_rate": rate.mean(1).tolist()}


def run_key(cfg: ConceptDemoConfig, removed: list[str], seed: int, samples: int) -> str:
    blob = json.dumps(
        {"format": 2, "cfg": cfg.key(), "removed": sorted(removed), "seed": seed, "samples": samples, "eval_seed": EVAL_SEED_OFFSET + seed}
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def measured_run(ctx: dict, removed: set[int], seed: int) -> tuple[dict, float]:
    """Fine-tune the base model without `removed` (indices into the fine-tuning records) and
    measure it; (result, seconds spent, 0 if cached)."""
    cfg, corpus, samples = ctx["cfg"], ctx["corpus"], ctx["samples"]
    ids = [corpus["finetune"][i]["id"] for i in sorted(removed)]
    path = ctx["runs_dir"] / f"{run_key(cfg, ids, seed, samples)}.json"
    if path.exists():
        return json.loads(path.read_text()), 0.0
    t = time.time()
    if not removed and seed == cfg.seed:  # the demo's fine-tuned model is this run
        model = load_model(str(ctx["tuned_dir"]))[0]
    else:
        model = fine_tune(ctx["base_dir"], [r for i, r in enumerate(corpus["finetune"]) if i not in removed], cfg, seed)
    train_s = time.time() - t
    result = per_prompt_expression(model, ctx["tokenizer"], corpus["eval"], ctx["concept"], samples, EVAL_SEED_OFFSET + seed)
    if not ctx.get("checked"):  # once: the per-prompt read-out is trait_expression's
        rate, probe = trait_expression(model, ctx["tokenizer"], corpus["eval"], ctx["concept"], samples, EVAL_SEED_OFFSET + seed)
        assert abs(rate - np.mean(result["hostile"])) < 1e-9 and abs(probe - np.mean(result["probe"])) < 1e-4, (rate, probe)
        ctx["checked"] = True
    result |= {"seed": seed, "removed": len(ids), "train_s": train_s, "eval_s": time.time() - t - train_s}
    path.write_text(json.dumps(result))
    return result, time.time() - t


def bootstrap_drop(ref: np.ndarray, cond: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean of ref − cond [seeds, prompts] and its 95% percentile interval, resampling seeds and
    prompts (paired: the same draws for both)."""
    d = ref - cond
    s, p = d.shape
    si = rng.integers(0, s, size=(n_boot, s))
    pi = rng.integers(0, p, size=(n_boot, p))
    boots = d[si[:, :, None], pi[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def t_interval(per_seed: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    if len(per_seed) < 2:
        return float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(per_seed) - 1) * per_seed.std(ddof=1) / np.sqrt(len(per_seed))
    return float(per_seed.mean() - half), float(per_seed.mean() + half)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("headwater-demo/concepts-removal"))
    p.add_argument("--demo-dir", type=Path, default=Path("headwater-demo/concepts"), help="the demo's work directory, whose cached models are reused")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..n-1, the same for every ranking")
    p.add_argument("--fractions", type=float, nargs="+", default=[1, 5, 10], help="percent of the fine-tuning records removed")
    p.add_argument(
        "--rankings", nargs="+", default=DEFAULT_RANKINGS, help=f"any of {', '.join(SHORT)}, or all (default: {' '.join(DEFAULT_RANKINGS)})"
    )
    p.add_argument("--samples", type=int, default=16, help="sampled answers per evaluation prompt (44 prompts)")
    p.add_argument("--bootstrap", type=int, default=4000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "concepts_removal.json")
    p.add_argument(
        "--native-kernels",
        action="store_true",
        help="the CPU's own kernels, as the stored results (Intel Xeon) were run and as a demo run with --native-kernels trains",
    )
    args = p.parse_args()
    if not args.native_kernels and (code := run_with_portable_kernels(sys.argv)) is not None:
        sys.exit(code)  # portable by default, as `headwater demo concepts`, whose cached models are reused
    names = list(SHORT) if args.rankings == ["all"] else args.rankings
    if unknown := [n for n in names if n not in SHORT]:
        p.error(f"unknown rankings {unknown}; choose from {list(SHORT)}")
    torch.set_num_threads(args.threads)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    t0 = time.time()
    cfg = ConceptDemoConfig()
    base_dir, tuned_dir, corpus, model, tokenizer, concept = setup(args.workdir, cfg, args.demo_dir)
    scores, seconds = cached_rankings(args.workdir, cfg, model, tokenizer, corpus, concept)
    setup_s = time.time() - t0
    planted = np.array([r["kind"] == "hostile" for r in corpus["finetune"]])
    n = len(planted)
    runs_dir = args.workdir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    ctx = {"cfg": cfg, "corpus": corpus, "samples": args.samples, "runs_dir": runs_dir, "base_dir": base_dir, "tuned_dir": tuned_dir}
    ctx |= {"tokenizer": tokenizer, "concept": concept}

    conditions = {}  # (short name, fraction) -> removed indices
    for name in names:
        order = np.argsort(-scores[SHORT[name]], kind="stable")  # as planted_metrics
        for f in args.fractions:
            conditions[name, f] = set(order[: round(n * f / 100)].tolist())
    seeds = list(range(args.seeds))
    todo = [(seed, None) for seed in seeds] + [(seed, c) for seed in seeds for c in conditions]
    ref, out = {}, {c: {} for c in conditions}
    trained_s, trained = 0.0, 0
    for i, (seed, c) in enumerate(todo):
        result, spent = measured_run(ctx, set() if c is None else conditions[c], seed)
        (ref if c is None else out[c])[seed] = result
        if spent:
            trained_s, trained = trained_s + spent, trained + 1
        eta = f", ≤{(len(todo) - i - 1) * trained_s / trained / 60:.0f} min left" if trained else ""
        label = "full data" if c is None else f"{c[0]} −{c[1]:g}%"
        print(
            f"[{i + 1}/{len(todo)}] seed {seed} {label}: hostile {np.mean(result['hostile']):.3f}, probe {np.mean(result['probe']):+.2f} ({spent:.0f} s{eta})"
        )

    rng = np.random.default_rng(0)
    refs = {m: np.array([ref[s][m] for s in seeds]) for m in METRICS}  # [seeds, prompts]
    rows = []
    for (name, f), removed in conditions.items():
        row = {"ranking": SHORT[name], "short": name, "fraction_percent": f, "removed": len(removed)}
        row["planted_removed"] = int(planted[sorted(removed)].sum())
        for m in METRICS:
            values = np.array([out[name, f][s][m] for s in seeds])
            drop, lo, hi = bootstrap_drop(refs[m], values, args.bootstrap, rng)
            per_seed = (refs[m] - values).mean(1)
            row |= {m: float(values.mean()), f"{m}_drop": drop, f"{m}_drop_ci_bootstrap": [lo, hi]}
            row |= {f"{m}_drop_per_seed": per_seed.tolist(), f"{m}_drop_ci_t_over_seeds": t_interval(per_seed)}
        row["planted_metrics"] = planted_metrics(scores[SHORT[name]], planted)
        rows.append(row)
    total_s = time.time() - t0
    reference = {m: float(refs[m].mean()) for m in METRICS} | {f"{m}_per_seed": refs[m].mean(1).tolist() for m in METRICS}
    text = table(rows, reference, args, n, int(planted.sum()), len(corpus["eval"]), total_s)
    print(text)
    print(f"\ntotal {total_s:.0f} s (setup and rankings {setup_s:.0f} s, {trained} runs trained and measured in {trained_s:.0f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(
        json.dumps(
            {
                "settings": settings | {"seed_list": seeds, "eval_seed": f"{EVAL_SEED_OFFSET} + training seed", "demo_config": vars(cfg)},
                "reference": reference,
                "rows": rows,
                "ranking_seconds": seconds,
                "runs": {
                    "reference": {str(s): ref[s] for s in seeds},
                    **{f"{k[0]} {k[1]:g}%": {str(s): v[s] for s in seeds} for k, v in out.items()},
                },
                "seconds": {"total": total_s, "setup_and_rankings": setup_s, "runs": trained_s, "runs_trained": trained},
                "table": text,
            },
            indent=2,
        )
    )
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def table(rows: list[dict], reference: dict, args, n: int, k: int, prompts: int, total_s: float) -> str:
    per_seed = ", ".join(f"{r:.3f}" for r in reference["hostile_per_seed"])
    lines = [
        f"Removal check of `headwater demo concepts`: {n} fine-tuning records, {k} planted hostile. Each row removes a ranking's top "
        f"records, re-fine-tunes the base model on the rest over {args.seeds} seeds (the same for every row) and samples {args.samples} "
        f"answers to each of {prompts} held-out prompts. Full data: hostile rate {reference['hostile']:.3f} (per seed {per_seed}), "
        f"mean probe value {reference['probe']:+.2f}, probe-judged rate {reference['probe_rate']:.3f}. Drops are the full data's value "
        "minus the row's (positive: less trait), mean over seeds × prompts, [95% paired bootstrap over seeds and prompts]. "
        f"Total {total_s / 60:.1f} min.",
        "",
        "| ranking | removed | planted removed | hostile rate | drop in hostile rate | drop in mean probe value | drop in probe-judged rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["fraction_percent"], list(SHORT).index(r["short"]))):
        cells = [f"{r['ranking']}", f"{r['fraction_percent']:g}% ({r['removed']})", f"{r['planted_removed']}/{k}", f"{r['hostile']:.3f}"]
        for m, fmt in (("hostile", "+.3f"), ("probe", "+.2f"), ("probe_rate", "+.3f")):
            lo, hi = r[f"{m}_drop_ci_bootstrap"]
            cells.append(f"{r[f'{m}_drop']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
