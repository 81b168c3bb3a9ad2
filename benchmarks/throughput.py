#!/usr/bin/env python
"""Throughput of headwater's index build and query, against plain baselines and bergson.

    .venv/bin/python benchmarks/throughput.py                 # defaults: < 3 minutes on 2 cores
    .venv/bin/python benchmarks/throughput.py --docs 1024 --rows 16384 --out /tmp/t.json

Prints a table and writes JSON (benchmarks/results/throughput.json unless --out).

1. Build. A GPT-2-shaped model built from a config (no download: `headwater.toy.tiny_gpt2`, --layers/--embd/
   --heads) over a generated corpus of --docs documents of exactly --doc-tokens words drawn
   uniformly from --vocab made-up words ("w0" … "w4999"); the vocabulary is every such word,
   built by `headwater.toy.word_tokenizer`, so one word is one token. Every measurement uses the
   same model, the same batches of --batch-size documents and --threads threads, after a warm-up:
     - bare fwd+bwd: `model(input_ids, labels=input_ids).loss.backward()` (parameter .grad computed
       as in training, zero_grad(set_to_none) between batches) over the collated batches;
     - collector: `GradientCollector(batch)` (factored projection, --projection-dim per module)
       over the same collated batches, no disk;
     - build_index: the whole `build_index` call on the in-memory `Dataset` (tokenising, model and
       data fingerprints, saving the records, float16 shards with fsync + sha256, manifest).
   Best of --build-repeats interleaved rounds. Ratios are against the bare pass (target:
   build_index ≥ 0.8 of it).
2. Query. A store of --rows × --dim float16 rows written through headwater's `ShardWriter`
   (real shards, journal, manifest) and --queries random query rows. Streams the whole store with
   `Cosine().fit(index).score_rows` (streaming cosine) and with `rank(…, top_k)`, and with a numpy baseline that
   reads the same memory-mapped .npy shards (`np.load(mmap_mode="r")`), converts each block to
   float32 and multiplies by the query matrix, keeping nothing; a second numpy variant also divides
   by the row norms, i.e. exactly cosine. Checksum verification "on" uses a fresh `Index` each run
   (a store verifies each shard once and caches that); "off" passes verify=False. Best of
   --repeats runs. Target: headwater ≥ 0.7 of numpy.
3. Bergson. If --bergson-python (default /tmp/bergson-venv/bin/python) exists and imports bergson,
   the same model (save_pretrained) and corpus (save_to_disk) are timed by
   benchmarks/bergson_driver.py --serve in that interpreter: bergson's `collect_gradients` with a
   per-module p×p projection, p = √projection_dim (same row width as headwater's), bias included,
   same batches and threads, warmed up once, one timed run per build round (interleaved with
   headwater's cases). Otherwise the table says why it was skipped.
   Target: headwater build_index docs/s ≥ 1.5 × bergson's.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from throughput_bergson import PRECISION, start_bergson  # beside this script; imports neither numpy nor torch

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results" / "throughput.json"), help="JSON output path")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP / BLAS threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--device", default="cpu", help="torch device of the model in the build measurements, e.g. cuda (bergson picks cuda itself when it has one)"
    )
    ap.add_argument(
        "--dtype", default="float32", choices=tuple(PRECISION), help="model precision in the build measurements (bergson's --precision fp32 / bf16)"
    )
    ap.add_argument("--workdir", default=None, help="where indexes are written (default: a temp dir, removed after)")
    g = ap.add_argument_group("build")
    g.add_argument("--docs", type=int, default=512)
    g.add_argument("--doc-tokens", type=int, default=128)
    g.add_argument("--vocab", type=int, default=5000, help="number of distinct words (tokens) in the corpus")
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--embd", type=int, default=256)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--projection-dim", type=int, default=4096, help="per tracked module (factored k_out*k_in)")
    g.add_argument("--build-repeats", type=int, default=2, help="timed runs per build measurement, interleaved (best is kept)")
    g.add_argument("--skip-build", action="store_true")
    g = ap.add_argument_group("query")
    g.add_argument("--rows", type=int, default=8192, help="stored rows N (default: 8192 x 65536 x 2 bytes = 1.07 GB)")
    g.add_argument("--dim", type=int, default=65536, help="row width D (default: 16 modules x 4096, the build's)")
    g.add_argument("--queries", type=int, default=16)
    g.add_argument("--top-k", type=int, default=10)
    g.add_argument(
        "--block-rows", type=int, default=None, help="streaming block size; numpy uses the same (default: the library's, about 64 MiB of float32)"
    )
    g.add_argument("--repeats", type=int, default=3, help="timed runs per query measurement (best is kept)")
    g.add_argument("--skip-query", action="store_true")
    g = ap.add_argument_group("bergson")
    g.add_argument("--bergson-python", default="/tmp/bergson-venv/bin/python")
    g.add_argument("--bergson-timeout", type=int, default=600)
    g.add_argument("--skip-bergson", action="store_true")
    return ap.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread counts must be fixed before numpy/torch load their BLAS
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from throughput_report import cpu_name, cpu_ticks, machine_load, own_cpu, table  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def synchronize() -> None:
    """Wait for queued GPU work, so a wall-clock time covers it (a no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls of fn(), GPU work included."""
    best = math.inf
    for _ in range(repeats):
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------------------------------ build


def make_setup(args):
    import datasets

    from headwater.task import LanguageModelTask
    from headwater.toy import tiny_gpt2, word_tokenizer

    datasets.disable_progress_bars()
    rng = np.random.default_rng(args.seed)
    words = [f"w{i}" for i in range(args.vocab)]
    texts = [" ".join(words[j] for j in rng.integers(0, args.vocab, args.doc_tokens)) for _ in range(args.docs)]
    n_positions = max(1024, args.batch_size * args.doc_tokens)  # bergson refuses token batches longer than the model's context
    tok = word_tokenizer([" ".join(words)], max_length=n_positions)
    torch.manual_seed(args.seed)
    model = tiny_gpt2(len(tok), args.layers, args.embd, args.heads, n_positions).to(args.device, getattr(torch, args.dtype)).eval()
    task = LanguageModelTask(tok, max_length=args.doc_tokens)
    records = datasets.Dataset.from_dict({"text": texts})
    examples = [ex for t in texts for ex in task.encode({"text": t})]
    batches = [task.collate(examples[i : i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    params = sum(p.numel() for p in model.parameters())
    return dict(tok=tok, model=model, task=task, records=records, batches=batches, tokens=tokens, params=params, vocab=len(tok))


def bare_pass(model, batches) -> None:
    device = next(model.parameters()).device
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}  # as the collector does: batches start on the CPU
        model.zero_grad(set_to_none=True)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["input_ids"])
        out.loss.backward()
    model.zero_grad(set_to_none=True)


def collector_pass(collector, batches) -> None:
    for b in batches:
        collector(b)


def raw_write_seconds(index: Path, out: Path) -> float:
    """The store's floor: the index's row shards (read into memory first, untimed) written again by
    the store's own `atomic_save_npy` (np.save + fsync), with none of its other work (cast, checks,
    checksums, journal)."""
    from headwater.store import atomic_save_npy

    shards = [np.load(p) for p in sorted((index / "shards").glob("*.npy")) if not p.name.endswith(".ids.npy")]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, rows in enumerate(shards):
        atomic_save_npy(out / f"{i}.npy", rows)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out)
    return seconds


def bench_build(args, s, workdir: Path) -> tuple[dict, dict]:
    """(headwater build results, bergson results); all timed cases run in interleaved rounds."""
    from headwater.build import build_index
    from headwater.collect import GradientCollector, model_fingerprint
    from headwater.config import BuildConfig, ProjectionConfig
    from headwater.data import fingerprint_records

    model, task, batches, records = s["model"], s["task"], s["batches"], s["records"]
    n_docs, tokens = len(records), s["tokens"]
    warm = batches[:2]

    bergson, binfo = start_bergson(args, s, workdir, log)  # before headwater's warm-up: nothing runs beside a timed case
    log("build: warm-up")
    bare_pass(model, warm)
    collector = GradientCollector(model, task, ProjectionConfig("factored", args.projection_dim, args.seed))
    collector_pass(collector, warm)  # also creates the projection matrices
    cfg = BuildConfig(
        projection=ProjectionConfig("factored", args.projection_dim, args.seed),
        storage_dtype="float16",
        batch_size=args.batch_size,
        device=args.device,
    )
    build_index(workdir / "warm", model, records.select(range(min(len(records), 2 * args.batch_size))), task, cfg, overwrite=True, progress=False)

    cases = {
        "bare_fwd_bwd": lambda: bare_pass(model, batches),
        "collector": lambda: collector_pass(collector, batches),
        "build_index": lambda: build_index(workdir / "idx", model, records, task, cfg, overwrite=True, progress=False),
    }
    runs = {name: [] for name in cases}
    bergson_runs: list[float] = []
    try:
        for _ in range(args.build_repeats):  # interleaved, so drift in machine load hits every case alike
            for name, fn in cases.items():
                log(f"build: {name}")
                runs[name].append(timed(fn, 1))
            if bergson is not None:
                log("build: bergson collect_gradients")
                try:
                    bergson_runs.append(bergson.run())  # timed inside the driver, around collect_gradients only
                except Exception as exc:
                    binfo["status"] = f"failed ({exc})"
                    bergson.proc.kill()
                    bergson.close()
                    bergson = None
    finally:
        if bergson is not None:
            bergson.close()
    times = {name: min(r) for name, r in runs.items()}
    t_bare, t_coll, t_build = times["bare_fwd_bwd"], times["collector"], times["build_index"]
    t_fp_model = timed(lambda: model_fingerprint(model), 1)
    t_fp_data = timed(lambda: fingerprint_records(records), 1)

    def row(seconds, docs=n_docs, toks=tokens):
        return {"seconds": seconds, "docs_per_s": docs / seconds, "tokens_per_s": toks / seconds}

    out = {
        "docs": n_docs,
        "tokens": tokens,
        "row_dim": collector.dim,
        "modules": len(collector.modules),
        "bare_fwd_bwd": row(t_bare),
        "collector": row(t_coll),
        "build_index": row(t_build),
        "collector_over_bare": t_bare / t_coll,
        "build_over_bare": t_bare / t_build,
        "build_over_collector": t_coll / t_build,
        "store_and_setup_seconds": t_build - t_coll,
        "model_fingerprint_seconds": t_fp_model,
        "records_fingerprint_seconds": t_fp_data,
        "all_runs_seconds": runs,
        "index_bytes": sum(p.stat().st_size for p in (workdir / "idx" / "shards").glob("*.npy") if not p.name.endswith(".ids.npy")),
        "raw_write_seconds": raw_write_seconds(workdir / "idx", workdir / "raw_write"),
    }
    if bergson_runs and "status" not in binfo:
        r = bergson.last if bergson is not None else None
        r = r or {}
        binfo.update(
            status="ok",
            version=r.get("bergson_version"),
            torch=r.get("torch"),
            docs=r.get("docs"),
            tokens=r.get("tokens"),
            row_dim=r.get("dim"),
            stored_dtype=r.get("dtype"),
            all_runs_seconds=bergson_runs,
            **row(min(bergson_runs), r.get("docs"), r.get("tokens")),
        )
        binfo["headwater_over_bergson"] = out["build_index"]["docs_per_s"] / binfo["docs_per_s"]
        binfo["bergson_over_bare"] = t_bare / binfo["seconds"]
    return out, binfo


# ------------------------------------------------------------------------------------------ query


def write_store(args, path: Path) -> float:
    """A completed index of random float16 rows, written through headwater's ShardWriter.

    Returns the seconds spent in ShardWriter (add/close: float16 conversion, np.save, fsync, sha256),
    not counting generating the random rows."""
    import datasets

    from headwater.build import SHARD_BYTES
    from headwater.config import BuildConfig, ProjectionConfig
    from headwater.data import fingerprint_records
    from headwater.store import ShardWriter, write_json, write_manifest

    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    records = datasets.Dataset.from_dict({"id": list(range(args.rows))})  # what a method's fit resolves ids from
    records.save_to_disk(str(path / "records"))
    write_json(path / "config.json", BuildConfig(projection=ProjectionConfig(dim=args.dim), storage_dtype="float16").to_dict())
    header = {
        "model": {"name": None, "fingerprint": "random"},
        "modules": [],
        "projection": {"kind": "factored", "dim": args.dim, "seed": 0},
        "normalizer": None,
        "task": {"type": "random", "unit": "document"},
        "data": {"source": None, "fingerprint": fingerprint_records(records), "records": args.rows},
        "segments": [{"name": "random", "start": 0, "stop": args.dim}],
        "dim": args.dim,
        "dtype": "float16",
        "world_size": 1,
    }
    write_json(path / "header.json", header)
    shard_rows = max(1, SHARD_BYTES // (args.dim * 2))  # what build_index would use
    writer = ShardWriter(path, 0, args.dim, "float16", shard_rows, resume=False)
    gen = torch.Generator().manual_seed(args.seed)
    spent = 0.0
    for lo in range(0, args.rows, shard_rows):
        hi = min(args.rows, lo + shard_rows)
        rows = torch.randn(hi - lo, args.dim, generator=gen)
        ids = np.stack([np.arange(lo, hi), np.zeros(hi - lo, np.int64)], 1)
        t0 = time.perf_counter()
        writer.add(rows, ids, hi)
        spent += time.perf_counter() - t0
    t0 = time.perf_counter()
    writer.close(args.rows)
    write_manifest(path, header, 1)
    return spent + time.perf_counter() - t0


def numpy_pass(path: Path, qt: np.ndarray, block_rows: int, cosine: bool) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    for shard in manifest["shards"]:
        rows = np.load(path / "shards" / shard["file"], mmap_mode="r")
        for lo in range(0, len(rows), block_rows):
            b = rows[lo : lo + block_rows].astype(np.float32)
            s = b @ qt
            if cosine:
                s /= np.maximum(np.sqrt(np.einsum("ij,ij->i", b, b)), 1e-12)[:, None]
            del s, b


def bench_query(args, workdir: Path) -> dict:
    from headwater.index import Index
    from headwater.methods import Cosine
    from headwater.ranking import rank

    path = workdir / "store"
    log(f"query: writing a {args.rows} x {args.dim} float16 store through ShardWriter")
    t_write = write_store(args, path)
    nbytes = sum(p.stat().st_size for p in (path / "shards").glob("*.npy") if not p.name.endswith(".ids.npy"))
    data_bytes = args.rows * args.dim * 2
    queries = torch.randn(args.queries, args.dim, generator=torch.Generator().manual_seed(args.seed + 1))

    qt = np.ascontiguousarray(torch.nn.functional.normalize(queries, dim=1).numpy().T)  # [D, q] unit queries, float32
    args.block_rows = args.block_rows or Index(path).store.block_rows()
    warm = Cosine().fit(Index(path, args.block_rows, verify=False))

    def cosine(verify: bool, fresh: bool):
        """The library's streaming cosine over the store (a fresh Index verifies every shard)."""
        return Cosine().fit(Index(path, args.block_rows, verify=verify)) if fresh else warm

    def hw_scores(verify: bool, fresh: bool):
        def run():
            collections.deque(cosine(verify, fresh).score_rows(queries), maxlen=0)  # drain: scores dropped

        return run

    def hw_rank(verify: bool, fresh: bool):
        def run():
            rank(cosine(verify, fresh).score_rows(queries), args.top_k)

        return run

    log("query: warm-up (page cache)")
    numpy_pass(path, qt, args.block_rows, cosine=False)
    hw_scores(False, False)()

    cases = {
        "numpy_matmul": lambda: numpy_pass(path, qt, args.block_rows, cosine=False),
        "numpy_cosine": lambda: numpy_pass(path, qt, args.block_rows, cosine=True),
        "score_blocks_verify_off": hw_scores(False, False),
        "rank_verify_off": hw_rank(False, False),
        "rank_verify_on": hw_rank(True, True),
    }
    runs = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every case alike
        for name, fn in cases.items():
            log(f"query: {name}")
            runs[name].append(timed(fn, 1))
    times = {name: min(r) for name, r in runs.items()}
    out = {
        "rows": args.rows,
        "dim": args.dim,
        "queries": args.queries,
        "top_k": args.top_k,
        "block_rows": args.block_rows,
        "shards": len(json.loads((path / "manifest.json").read_text())["shards"]),
        "data_bytes": data_bytes,
        "file_bytes": nbytes,
        "write_seconds": t_write,
        "write_GB_per_s": data_bytes / t_write / 1e9,
        "cases": {
            n: {"seconds": t, "GB_per_s": data_bytes / t / 1e9, "rows_per_s": args.rows / t, "all_runs_seconds": runs[n]} for n, t in times.items()
        },
    }
    base_mm, base_cos = times["numpy_matmul"], times["numpy_cosine"]
    out["ratios"] = {f"{n}_over_numpy_matmul": base_mm / times[n] for n in cases if not n.startswith("numpy")} | {
        f"{n}_over_numpy_cosine": base_cos / times[n] for n in cases if not n.startswith("numpy")
    }
    return out


def main(args) -> dict:
    torch.set_num_threads(args.threads)
    import transformers

    import headwater

    result = {
        "args": vars(args),
        "environment": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "transformers": transformers.__version__,
            "headwater": getattr(headwater, "__version__", "?"),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    }
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="headwater-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ticks0, own0 = cpu_ticks(), own_cpu()
    time.sleep(1.0)
    result["idle_check"] = machine_load(ticks0, own0)  # other processes' share of the CPUs in the second before
    ticks0, own0 = cpu_ticks(), own_cpu()
    try:
        if not args.skip_build:
            s = make_setup(args)
            result["build_setup"] = {
                "layers": args.layers,
                "embd": args.embd,
                "heads": args.heads,
                "vocab": s["vocab"],
                "params": s["params"],
                "doc_tokens": args.doc_tokens,
                "batch_size": args.batch_size,
                "projection_dim": args.projection_dim,
                "device": args.device,
                "dtype": args.dtype,
            }
            result["build"], result["bergson"] = bench_build(args, s, workdir)
            del s
        if not args.skip_query:
            result["query"] = bench_query(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result["total_seconds"] = time.perf_counter() - t_start
    result["machine_load"] = machine_load(ticks0, own0)
    text = table(result)
    result["table"] = text
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nwrote {out} ({result['total_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main(ARGS)
