"""Building an index: records → per-example compressed gradients → shards, on one or many ranks.

Ranks take contiguous blocks of records (rank r gets records [r·n/W, (r+1)·n/W)), so the rows of
a W-rank index come out in the same order as a 1-rank build. Launch several ranks with
`torchrun --nproc_per_node N -m headwater build …` (gloo on CPU, nccl on GPUs); rank 0 prepares
the directory and writes the manifest after every rank has finished.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .collect import GradientCollector, model_fingerprint, record_rows, tracked_modules
from .config import BuildConfig
from .data import fingerprint_records, load_records
from .errors import UserError
from .index import Index
from .models import load_model
from .normalizer import V_FLOOR, load_optimizer_state, module_scales, optimizer_state_file
from .store import DTYPES, BuildLock, ShardWriter, prepare_directory, read_json, sha256_file, write_json, write_manifest
from .task import LanguageModelTask, Task, warn_encoding_problems

SHARD_BYTES = 1 << 27


def absolute_paths(config: BuildConfig) -> BuildConfig:
    """Local model/data/optimizer paths made absolute, so a saved config.json works from anywhere."""
    local = {k: str(Path(v).resolve()) for k in ("model", "data", "optimizer_state") if isinstance(v := getattr(config, k), str) and Path(v).exists()}
    return dataclasses.replace(config, **local)


def distributed() -> tuple[int, int]:
    """(rank, world size), initialising the process group when launched by torchrun."""
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _broadcast_error(message: str | None, world: int) -> None:
    """Make every rank fail with rank 0's error (or none), so no rank waits forever."""
    if world > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise UserError(message)


def index_header(config: BuildConfig, collector: GradientCollector, model, task: Task, records, world: int) -> dict:
    """What identifies an index: compared on resume and on every query."""
    normalizer = None
    if config.optimizer_state:
        state_file = optimizer_state_file(config.optimizer_state)  # a checkpoint folder's optimizer.pt
        normalizer = {"path": str(config.optimizer_state), "sha256": sha256_file(state_file), "floor": V_FLOOR}
    return {
        "model": {"name": config.model, "fingerprint": model_fingerprint(model)},
        "modules": collector.describe()["modules"],
        "projection": collector.projection.to_dict(),
        "normalizer": normalizer,
        "task": task.describe(),
        "data": {"source": config.data, "fingerprint": fingerprint_records(records), "records": len(records)},
        "segments": [{"name": n, "start": a, "stop": b} for n, (a, b) in collector.segments.items()],
        "dim": collector.dim,
        "dtype": config.row_dtype,
        "world_size": world,
    }


def build_index(
    path: str | Path,
    model: torch.nn.Module | None = None,
    data=None,
    task: Task | None = None,
    config: BuildConfig | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
):
    """Collect compressed per-example gradients of `data` under `model` into an index at `path`.

    `model`/`data` default to loading `config.model` (a causal LM path or hub id) and
    `config.data` (a file, saved data set or hub name). `task` defaults to a
    `LanguageModelTask` with the model's tokenizer. Returns the opened `Index`.
    """
    config = absolute_paths(config or BuildConfig())
    path = Path(path)
    rank, world = distributed()
    tokenizer = None
    if model is None:
        if not config.model:
            raise UserError("no model given: pass a model or set --model")
        model, tokenizer = load_model(config.model, config.device, config.model_dtype)
    model = model.to(config.device).eval()
    records = load_records(data if data is not None else _required(config.data, "data"))
    if task is None:
        if tokenizer is None:
            raise UserError("pass a task (or a model path whose tokenizer can be loaded)")
        task = LanguageModelTask(tokenizer, config.max_length, config.format, config.unit)
    task.encode(records[0])  # fail on a bad first record before anything is written
    scales = None
    if config.optimizer_state:
        tracked = tracked_modules(model, config.modules)
        scales = module_scales(model, tracked, load_optimizer_state(config.optimizer_state), materialise=config.projection.kind != "factored")
    collector = GradientCollector(model, task, config.projection, config.modules, scales)
    header = index_header(config, collector, model, task, records, world)

    error, complete, created = None, False, not path.exists()
    if rank == 0:
        try:
            complete = prepare_directory(path, resume, overwrite)
            created = created or not (path / "header.json").exists()
            path.mkdir(parents=True, exist_ok=True)
            if (path / "header.json").exists():
                _check_same_build(path, header, complete)
                _record_moved_sources(path, config)
            else:  # config.json first marks the directory as an index, header.json last as set up
                write_json(path / "config.json", config.to_dict())
                if config.data is None or not isinstance(data, (str, os.PathLike)) and data is not None:
                    shutil.rmtree(path / "records", ignore_errors=True)  # a torn copy from a killed setup
                    records.save_to_disk(str(path / "records"))  # in-memory data: keep it for result texts
                write_json(path / "header.json", header)
        except UserError as exc:
            error = str(exc)
    _broadcast_error(error, world)
    if complete:
        return Index(path)

    lo, hi = rank * len(records) // world, (rank + 1) * len(records) // world
    shard_rows = config.shard_rows or max(1, SHARD_BYTES // (collector.dim * np.dtype(DTYPES[config.row_dtype][1]).itemsize))
    try:
        with BuildLock(path / "locks" / f"r{rank:03d}.lock"), ShardWriter(path, rank, collector.dim, config.row_dtype, shard_rows, resume) as writer:
            start = writer.next_record if writer.next_record is not None else lo
            problems, examples = _collect_range(collector, task, records, start, hi, config.batch_size, writer, progress and rank == 0)
    except UserError:
        if created and rank == 0 and world == 1:  # bad input in a fresh build: leave nothing behind
            shutil.rmtree(path, ignore_errors=True)
        raise
    warn_encoding_problems(task, problems, examples)
    _barrier(world)
    if rank == 0:
        write_manifest(path, header, world)
        shutil.rmtree(path / "locks", ignore_errors=True)
    _barrier(world)
    return Index(path)


def _required(value, name: str):
    if value is None:
        raise UserError(f"no {name} given")
    return value


def _identity(key: str, value, complete: bool):
    """What a resumed build must share with the interrupted one: the model's, data's and optimizer
    state's contents, not the paths they were read from (a moved folder resumes). A complete index
    built before the second-moment floor stays usable (its queries use the floor it was built
    with); an unfinished one must not be continued with another floor."""
    if value and key == "model":
        return value["fingerprint"]
    if value and key == "data":
        return value["fingerprint"], value["records"]
    if value and key == "normalizer":
        return value["sha256"] if complete else (value["sha256"], value.get("floor"))
    return value


def _record_moved_sources(path: Path, config: BuildConfig) -> None:
    """config.json keeps where the model, data and optimizer state now are (the same contents,
    checked), so the index loads them from there; in-memory ones (None) leave the old entries."""
    saved = read_json(path / "config.json")
    moved = {k: v for k, v in config.to_dict().items() if k in ("model", "data", "optimizer_state") and v is not None}
    if any(saved.get(k) != v for k, v in moved.items()):
        write_json(path / "config.json", {**saved, **moved})


def _check_same_build(path: Path, header: dict, complete: bool = False) -> None:
    old = read_json(path / "header.json")
    for key in ("model", "modules", "projection", "normalizer", "task", "data", "dim", "dtype", "world_size"):
        if _identity(key, old.get(key), complete) != _identity(key, header.get(key), complete):
            raise UserError(f"cannot resume {path}: its {key} differs from this build's ({old.get(key)} vs {header.get(key)})")


def _collect_range(collector, task, records, start: int, stop: int, batch_size: int, writer: ShardWriter, progress: bool) -> tuple[Counter, int]:
    """Rows of records [start, stop) appended to `writer`; returns the encoding problems seen
    (`task.check` counts) and the number of examples."""
    bar = tqdm(total=stop - start, desc="build", unit="doc", disable=not progress)
    problems: Counter = Counter()
    seen = start
    for rows, ids, done in record_rows(collector, task, records, start, stop, batch_size, problems):
        writer.add(rows, ids, done)
        bar.update(done - seen)
        seen = done
    writer.close(stop)
    bar.close()
    return problems, problems.pop("examples", 0)
