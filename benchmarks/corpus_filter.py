"""The data-filtering check of `headwater demo corpus`'s map: train again without the bin the map
ranks first for a benchmark, against without as many random records, and against all of them.

For each benchmark, the bin with the highest z in the view its capability was planted in (topic for
zoology, topic × format for geography) is filtered out of training (the demo's recipe replayed
from the same initialisation: same steps, batches and data order, the filtered records' losses
zeroed). Reports the change of both benchmarks' mean gold log-probability against the full run,
filtered − random with a paired interval over items, and whether the bin filtered was the planted
one. Run `headwater demo corpus --workdir DIR` first (the map and the cached model are read there);
like the demo, this runs with portable kernels (`--native-kernels` for the CPU's own, to match a
demo run with `--native-kernels`).

    python benchmarks/corpus_filter.py --workdir headwater-demo/corpus      # ~7 min on 2 cores per training seed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from headwater.config import TrainConfig
from headwater.corpus import CorpusMap, bin_members, filtering_experiment, load_labels
from headwater.demos import run_with_portable_kernels
from headwater.demos.corpus import SUPPORT, CorpusDemoConfig, make_corpus, prepare
from headwater.index import Index
from headwater.models import load_model
from headwater.toy import tiny_gpt2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("headwater-demo/corpus"))
    p.add_argument("--seed", type=int, default=0, help="the demo's seed (its corpus and model)")
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "corpus_filter.json")
    p.add_argument("--native-kernels", action="store_true", help="the CPU's own kernels (for a demo run with --native-kernels)")
    args = p.parse_args()
    if not args.native_kernels and (code := run_with_portable_kernels(sys.argv)) is not None:
        sys.exit(code)
    torch.set_num_threads(2)
    t0 = time.time()
    cfg = CorpusDemoConfig(seed=args.seed)
    model_dir, records, benchmarks = prepare(args.workdir, cfg)
    _, tokenizer = load_model(str(model_dir))
    torch.manual_seed(cfg.seed)  # the demo model's initialisation
    init = tiny_gpt2(len(tokenizer), cfg.n_layer, cfg.n_embd, cfg.n_head, n_positions=64)
    run = TrainConfig(optimizer="adamw", lr=cfg.lr, schedule="linear", warmup=0.1, epochs=cfg.epochs, train_batch_size=16, data_seed=cfg.seed)
    cmap = CorpusMap.load(args.workdir / "map")
    labels = load_labels(Index(args.workdir / "index"))
    assert [r["text"] for r in records] == [r["text"] for r in make_corpus(cfg)[0]]
    results, lines = {}, []
    for bench, other in (("zoology", "geography"), ("geography", "zoology")):
        view, planted = SUPPORT[bench]
        top = cmap.bins(view, bench).sort_values("z", ascending=False).iloc[0]["bin"]
        drop = bin_members(labels, cmap, view, top)
        r = filtering_experiment(init, tokenizer, records, drop, run, benchmarks[bench], benchmarks[other], seeds=args.train_seeds, progress=True)
        results[bench] = {"bin": f"{view} = {top}", "planted": top == planted, **r}
        for b, name in (("aligned", bench), ("control", other)):
            c = r["change"][b]["logprob"]
            lines.append(
                f"| {bench}: {view} = {top} ({len(drop)} records{', planted' if top == planted else ''}) | {name} | "
                f"{c['filtered']:+.2f} | {c['random']:+.2f} | {c['diff']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}] |"
            )
    text = "\n".join(
        [
            f"demo seed {args.seed}, training seeds {args.train_seeds}; change in mean gold log-prob against training on every record",
            "",
            "| bin filtered (top by z) | benchmark | without the bin | without as many random records | bin − random (95% CI) |",
            "|---|---|---|---|---|",
            *lines,
        ]
    )
    print(text)
    print(f"\ntotal {time.time() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results, "table": text}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
