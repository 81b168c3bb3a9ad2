"""Times bergson's gradient collection; run by throughput.py with the *bergson* virtualenv's python.

    python bergson_driver.py MODEL_DIR DATA_DIR RUN_DIR --projection-dim 64 --batch-size 8 \
        --doc-tokens 128 --threads 2 --warmup-docs 32 [--precision bf16]

It mirrors `bergson.build.build_worker` (load model, create the processor, allocate batches,
`collect_gradients`), but tokenizes and loads once, warms up on the first `--warmup-docs`
documents, and times only `collect_gradients` over the whole corpus: the forward/backward passes
with bergson's hooks, the projection, and writing `gradients.bin` (+ its `data.hf` copy).
Prints one JSON line: {"docs": .., "tokens": .., "seconds": .., "dim": .., "dtype": ..}. With --serve it
prints {"ready": true} after the warm-up and then one such line per line read from stdin, so
throughput.py can interleave bergson's runs with headwater's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("run")
    ap.add_argument("--projection-dim", type=int, required=True, help="bergson's per-side p (p*p values per module)")
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--doc-tokens", type=int, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bergson's model precision")
    ap.add_argument("--warmup-docs", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--serve", action="store_true", help="after the warm-up, time one run per line read from stdin")
    args = ap.parse_args()

    # bergson's loggers write to stdout: keep the real stdout for our JSON lines, send the rest to stderr
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import torch

    torch.set_num_threads(args.threads)
    import bergson
    from bergson.collection import collect_gradients
    from bergson.config.config import DataConfig, IndexConfig
    from bergson.data import allocate_batches
    from bergson.utils.worker_utils import create_processor, setup_data_pipeline, setup_model_and_peft

    def config(run: str) -> IndexConfig:
        return IndexConfig(
            run_path=run,
            model=args.model,
            precision=args.precision,
            data=DataConfig(dataset=args.data),
            projection_dim=args.projection_dim,
            include_bias=True,  # headwater's rows include the bias column
            token_batch_size=args.batch_size * args.doc_tokens,
            max_batch_size=args.batch_size,
            overwrite=True,
        )

    cfg = config(os.path.join(args.run, "idx"))
    ds, _ = setup_data_pipeline(cfg)
    model, target_modules = setup_model_and_peft(cfg)
    model.eval()

    def collect(run: str, n_docs: int) -> float:
        c = config(run)
        shutil.rmtree(c.partial_run_path, ignore_errors=True)
        c.partial_run_path.mkdir(parents=True, exist_ok=True)
        sub = ds.select(range(n_docs))
        processor = create_processor(model, c, target_modules)
        batches = allocate_batches(sub["length"][:], c.token_batch_size, max_batch_size=c.max_batch_size)
        t0 = time.perf_counter()
        collect_gradients(model=model, data=sub, processor=processor, cfg=c, batches=batches, target_modules=target_modules)
        if torch.cuda.is_available():  # bergson runs on the GPU whenever there is one
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    collect(os.path.join(args.run, "warmup"), min(args.warmup_docs, len(ds)))
    tokens = int(sum(ds["length"]))

    def report(seconds: list[float]) -> None:
        info = json.load(open(os.path.join(cfg.partial_run_path, "info.json")))
        print(
            json.dumps(
                {
                    "bergson_version": bergson.__version__,
                    "torch": torch.__version__,
                    "docs": len(ds),
                    "tokens": tokens,
                    "seconds": min(seconds),
                    "runs": seconds,
                    "dim": int(sum(info["grad_sizes"].values())),
                    "dtype": info.get("base_dtype"),
                    "modules": len(info["grad_sizes"]),
                }
            ),
            file=out,
            flush=True,
        )

    if args.serve:  # one timed run per line on stdin, so the caller can interleave it with its own
        print(json.dumps({"ready": True}), file=out, flush=True)
        for _ in sys.stdin:
            report([collect(cfg.run_path, len(ds))])
        return
    report([collect(cfg.run_path, len(ds)) for _ in range(args.repeats)])


if __name__ == "__main__":
    main()
