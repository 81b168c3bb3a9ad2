"""The on-disk gradient store: fixed-size shards of rows, a journal while building, a manifest when done.

Layout of an index directory:

    config.json                 how it was built (replayable; written before any shard)
    manifest.json               written last, by rank 0: its presence means the build completed
    shards/r{rank}-s{seq}.npy   rows [n, dim] (float16/float32, or bfloat16 bits stored as uint16)
    shards/r{rank}-s{seq}.ids.npy  int64 [n, 2]: (record index, unit index) of each row
    journal/r{rank}.jsonl       one fsynced line per shard, appended after the shard's rename
    locks/r{rank}.lock          pid/host of the running build

Crash safety: a shard is written under a temporary name, fsynced, renamed, and only then recorded
in the journal. On `resume`, a rank keeps exactly the journaled shards (a torn last journal line is
dropped), deletes anything else it wrote, and continues from the first record after them; shards
cover whole records, so no row is lost or duplicated.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import socket
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import UserError

DTYPES = {"float16": (torch.float16, np.float16), "float32": (torch.float32, np.float32), "bfloat16": (torch.bfloat16, np.uint16)}
FORMAT_VERSION = 1
BLOCK_BYTES = 1 << 26


class ChecksumError(UserError):
    """A shard's bytes do not match the checksum recorded when it was written."""


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_save_rows(path: Path, parts: list[np.ndarray]) -> str:
    """Save the concatenation of `parts` (arrays [n_i, ...] of one dtype) as `atomic_save_npy`
    would, byte for byte, without building it; returns the file's sha256, hashed from memory
    rather than read back (a shard is hundreds of MB: the copy and the re-read cost more than the write)."""
    header = io.BytesIO()
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(parts[0].dtype), "fortran_order": False, "shape": shape})
    digest = hashlib.sha256(header.getvalue())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(header.getvalue())
        for part in parts:
            data = memoryview(np.ascontiguousarray(part)).cast("B")
            digest.update(data)
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return digest.hexdigest()


def write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def to_numpy_rows(rows: torch.Tensor, dtype: str) -> np.ndarray:
    t = rows.detach().to(DTYPES[dtype][0]).to("cpu").contiguous()  # cast where the rows are: half the bytes to copy off a GPU
    return t.view(torch.uint16).numpy() if dtype == "bfloat16" else t.numpy()


def check_storable(rows: torch.Tensor, dtype: str, ids: np.ndarray) -> None:
    """Refuse rows that would be stored as inf/NaN, at the first batch rather than at query time."""
    if not rows.numel():
        return
    low, high = torch.aminmax(rows.detach())  # one pass, NaN propagating: the per-row check only when it fails
    peak = float(torch.maximum(-low, high))
    if not math.isfinite(peak):
        finite = torch.isfinite(rows).all(1)
        first = int(np.asarray(ids).reshape(-1, 2)[int((~finite).nonzero()[0, 0]), 0])
        raise UserError(
            f"gradient rows of {int((~finite).sum())} examples hold inf or NaN (first: record {first}): the loss or the model is not finite there"
        )
    limit = float(torch.finfo(DTYPES[dtype][0]).max)
    if peak > limit:
        raise UserError(f"gradient rows reach |x| = {peak:.3g}, beyond {dtype}'s range ({limit:.0f}): build with --storage-dtype bfloat16 or float32")


def rows_to_float32(block: np.ndarray, dtype: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 copy of stored rows (memory-mapped blocks are read-only, so never alias them);
    written into `out[:n]` when given, which saves allocating (and page-faulting) a block each time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only source: we copy below
        t = torch.from_numpy(np.ascontiguousarray(block))
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    if out is not None:
        return out[: len(t)].copy_(t)
    return t.float() if dtype != "float32" else t.clone()


# ----------------------------------------------------------------------------------------- writing


class BuildLock:
    """An exclusive lock file per rank; a lock left by a dead process on this host is taken over,
    a lock from another host is never taken (on a shared filesystem its build may still run)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    other = {}
                if other.get("host") not in (None, me["host"]):  # cannot tell if it is alive: never steal it
                    raise UserError(
                        f"a build on host {other['host']} (pid {other.get('pid')}) holds {self.path}; "
                        "if that build is dead, delete the lock file and resume"
                    ) from None
                if other.get("pid") and _alive(other["pid"]):
                    raise UserError(f"another build (pid {other['pid']}) is writing {self.path.parent.parent}") from None
                self.path.unlink(missing_ok=True)  # stale: its process on this host is gone
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            return self
        raise UserError(f"could not take the build lock {self.path}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ShardWriter:
    """Buffers rows of one rank and writes them as shards of whole records.

    `add(rows, ids, done)` takes rows [b, dim] with ids [b, 2] (global record index, unit index)
    and `done`, the global record index before which every record is complete; a shard is written
    once at least `shard_rows` rows are buffered, cut at a record boundary, by a background thread
    while the caller computes the next rows. `close(done)` writes the rest and waits; as a context
    manager it also waits when the caller fails, so no write outlives it. `next_record` is where a
    resumed build continues (None when nothing was written yet).
    """

    def __init__(self, root: Path, rank: int, dim: int, dtype: str, shard_rows: int, resume: bool):
        self.root, self.rank, self.dim, self.dtype, self.shard_rows = root, rank, dim, dtype, shard_rows
        self.shard_dir, self.journal = root / "shards", root / "journal" / f"r{rank:03d}.jsonl"
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self.entries = self._recover() if resume else []
        if not resume:
            self.journal.unlink(missing_ok=True)
            self._remove_strays(keep=set())
        self.next_record: int | None = self.entries[-1]["next_record"] if self.entries else None
        self._rows: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headwater-shards")
        self._pending: Future | None = None

    def _recover(self) -> list[dict]:
        entries, good_bytes = [], 0
        if self.journal.exists():
            raw = self.journal.read_bytes()
            for line in raw.splitlines(keepends=True):
                try:
                    entry = json.loads(line)
                except ValueError:
                    break  # torn final line from a kill mid-append
                if not line.endswith(b"\n"):
                    break
                if not self._shard_ok(entry):
                    break
                entries.append(entry)
                good_bytes += len(line)
            if good_bytes != len(raw):
                with open(self.journal, "r+b") as fh:
                    fh.truncate(good_bytes)
                    os.fsync(fh.fileno())
        self._remove_strays(keep={e["file"] for e in entries} | {e["ids"] for e in entries})
        return entries

    def _shard_ok(self, entry: dict) -> bool:
        path, ids = self.shard_dir / entry["file"], self.shard_dir / entry["ids"]
        return path.exists() and ids.exists() and sha256_file(path) == entry["sha256"] and sha256_file(ids) == entry["ids_sha256"]

    def _remove_strays(self, keep: set[str]) -> None:
        for p in self.shard_dir.iterdir():
            mine = p.name.startswith(f"r{self.rank:03d}-") or p.name.startswith(f".r{self.rank:03d}-")
            if mine and p.name not in keep:
                p.unlink()

    @property
    def rows_written(self) -> int:
        return sum(e["rows"] for e in self.entries)

    def add(self, rows: torch.Tensor, ids: np.ndarray, done: int) -> None:
        check_storable(rows, self.dtype, ids)
        self._rows.append(to_numpy_rows(rows, self.dtype))
        self._ids.append(np.asarray(ids, dtype=np.int64).reshape(-1, 2))
        if sum(len(r) for r in self._rows) >= self.shard_rows:
            self._flush(done)

    def close(self, done: int) -> None:
        """Write what is buffered and wait until every shard is on disk and journaled."""
        self._flush(done)
        self.wait()

    def wait(self) -> None:
        """Wait for the shard being written; re-raises its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is None:
            self.wait()
        elif self._pending is not None:  # leave no write running behind the caller's error (which wins)
            with contextlib.suppress(Exception):
                self.wait()
        self._pool.shutdown()

    def _flush(self, done: int) -> None:
        """Write the buffered rows of records before `done` as one shard, in the background: the
        model computes the next rows meanwhile (on a GPU, writing is otherwise half the build)."""
        if not self._rows:
            return
        ids = np.concatenate(self._ids)
        complete = ids[:, 0] < done
        if not complete.any():
            return
        n = int(np.argmin(complete)) if not complete.all() else len(ids)
        parts, rest, taken = [], [], 0  # the rows split at row n without copying them
        for r in self._rows:
            cut = min(len(r), max(0, n - taken))
            parts += [r[:cut]] if cut else []
            rest += [r[cut:]] if cut < len(r) else []
            taken += len(r)
        self._rows, self._ids = rest, [ids[n:]] if n < len(ids) else []
        self.wait()  # one shard in flight: memory stays at two shards, and the journal in order
        self._pending = self._pool.submit(self._write, parts, ids[:n], done)

    def _write(self, parts: list[np.ndarray], ids: np.ndarray, done: int) -> None:
        seq = len(self.entries)
        name = f"r{self.rank:03d}-s{seq:06d}"
        data, ids_path = self.shard_dir / f"{name}.npy", self.shard_dir / f"{name}.ids.npy"
        atomic_save_npy(ids_path, ids)
        rows_sha256 = atomic_save_rows(data, parts)
        _fsync_dir(self.shard_dir)
        entry = {
            "file": data.name,
            "ids": ids_path.name,
            "rows": len(ids),
            "sha256": rows_sha256,
            "ids_sha256": sha256_file(ids_path),
            "next_record": done,
        }
        with open(self.journal, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.entries.append(entry)


def prepare_directory(path: Path, resume: bool, overwrite: bool, dry_run: bool = False) -> bool:
    """Check what is at `path` before a build; returns True when a completed index is already there.

    Refuses to write into an existing index unless `resume` or `overwrite` is set, and refuses to
    delete a non-empty directory that is not a headwater index. `dry_run` only checks (deletes nothing).
    """
    if resume and overwrite:
        raise UserError("choose one of --resume and --overwrite")
    if not path.exists() or not any(path.iterdir()):
        return False
    is_index = (path / "config.json").exists() or (path / "manifest.json").exists() or (path / "journal").exists()
    if overwrite:
        if not is_index:
            raise UserError(f"{path} is not empty and is not a headwater index; refusing to overwrite it")
        if not dry_run:
            shutil.rmtree(path)
        return False
    if not is_index:
        raise UserError(f"{path} is not empty and is not a headwater index; choose another directory")
    if resume:
        return (path / "manifest.json").exists()
    if (path / "manifest.json").exists():
        raise UserError(f"an index already exists at {path}; pass --overwrite to replace it or --resume to reuse it")
    raise UserError(f"{path} holds an interrupted build; pass --resume to continue it or --overwrite to start again")


def write_manifest(path: Path, header: dict, world_size: int) -> dict:
    """Combine every rank's journal into `manifest.json` (rank 0, after all ranks finished)."""
    shards = []
    for rank in range(world_size):
        journal = path / "journal" / f"r{rank:03d}.jsonl"
        if journal.exists():
            shards += [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    manifest = {**header, "format_version": FORMAT_VERSION, "rows": sum(s["rows"] for s in shards), "shards": shards}
    write_json(path / "manifest.json", manifest)
    return manifest


# ----------------------------------------------------------------------------------------- reading


@dataclass
class Block:
    """A block of stored rows: `rows` float32 [b, dim], `ids` int64 [b, 2], global row offset `start`."""

    start: int
    ids: np.ndarray
    rows: torch.Tensor


class GradientStore:
    """Read access to a completed index's rows, streamed in blocks of bounded size."""

    def __init__(self, path: str | Path, block_rows: int | None = None, verify: bool = True):
        """`block_rows` and `verify` are the defaults of `blocks()` (and so of every method reading
        this store): rows per streamed block (default about 64 MiB of float32) and whether each
        shard is checksummed before its first use."""
        self.path = Path(path)
        self.default_block_rows, self.default_verify = block_rows, verify
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            if (self.path / "journal").exists():
                raise UserError(f"{self.path} is an unfinished build (no manifest.json); resume it with --resume")
            raise UserError(f"{self.path} is not a headwater index (no manifest.json)")
        self.manifest = read_json(manifest)
        self.dim: int = self.manifest["dim"]
        self.dtype: str = self.manifest["dtype"]
        self.rows: int = self.manifest["rows"]
        self.segments: list[tuple[str, int, int]] = [(s["name"], s["start"], s["stop"]) for s in self.manifest["segments"]]
        self._verified: set[tuple] = set()
        self.shard: tuple[int, int] | None = None  # (rank, world): `blocks` yields every world-th block only

    def _open_shard(self, shard: dict, verify: bool) -> tuple[np.ndarray, np.ndarray]:
        data, ids = self.path / "shards" / shard["file"], self.path / "shards" / shard["ids"]
        for p in (data, ids):
            if not p.exists():
                raise ChecksumError(f"shard {p.name} listed in the manifest is missing")
        key = (shard["file"], data.stat().st_size, data.stat().st_mtime_ns)
        if verify and key not in self._verified:
            if sha256_file(data) != shard["sha256"] or sha256_file(ids) != shard["ids_sha256"]:
                raise ChecksumError(f"shard {shard['file']} is corrupt or truncated (checksum mismatch); rebuild the index")
            self._verified.add(key)
        try:
            rows = np.load(data, mmap_mode="r", allow_pickle=False)
            row_ids = np.load(ids, allow_pickle=False)
        except ValueError as exc:
            raise ChecksumError(f"shard {shard['file']} is unreadable ({exc}); rebuild the index") from exc
        if rows.shape != (shard["rows"], self.dim) or row_ids.shape != (shard["rows"], 2):
            raise ChecksumError(f"shard {shard['file']} has shape {rows.shape}, expected ({shard['rows']}, {self.dim})")
        return rows, row_ids

    def block_rows(self, block_bytes: int = BLOCK_BYTES) -> int:
        """Rows per block so that a float32 block takes about `block_bytes`."""
        return max(1, block_bytes // (4 * self.dim))

    def blocks(self, block_rows: int | None = None, verify: bool | None = None, reuse: bool = False) -> Iterator[Block]:
        """Yield consecutive blocks of at most `block_rows` rows (default: about 64 MiB of float32);
        each shard is checksummed before use. With `reuse`, every block's rows live in one buffer
        that the next block overwrites (for consumers that do not keep them)."""
        block_rows = block_rows or self.default_block_rows or self.block_rows()
        verify = self.default_verify if verify is None else verify
        buffer = torch.empty(min(block_rows, max(self.rows, 1)), self.dim) if reuse else None
        start, number = 0, 0
        rank, world = self.shard or (0, 1)
        for shard in self.manifest["shards"]:
            mine = [lo for k, lo in enumerate(range(0, shard["rows"], block_rows)) if (number + k) % world == rank]
            number += -(-shard["rows"] // block_rows)
            if mine:  # a rank opens (and checksums) only the shards it has blocks of
                rows, ids = self._open_shard(shard, verify)
                for lo in mine:
                    hi = min(len(rows), lo + block_rows)
                    yield Block(start + lo, ids[lo:hi], rows_to_float32(rows[lo:hi], self.dtype, buffer))
            start += shard["rows"]

    def verify(self) -> None:
        """Checksum every shard now (raises `ChecksumError` on the first bad one)."""
        for shard in self.manifest["shards"]:
            self._open_shard(shard, verify=True)

    def ids(self) -> np.ndarray:
        """(record index, unit index) of every row, int64 [rows, 2]."""
        return (
            np.concatenate([np.load(self.path / "shards" / s["ids"]) for s in self.manifest["shards"]]) if self.rows else np.zeros((0, 2), np.int64)
        )

    def sample(self, n: int, seed: int = 0, verify: bool | None = None) -> torch.Tensor:
        """`n` rows drawn uniformly without replacement (all rows if fewer), float32 [n, dim]."""
        verify = self.default_verify if verify is None else verify
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(self.rows, size=min(n, self.rows), replace=False))
        out, start = [], 0
        shards = self.manifest["shards"]
        for shard in tqdm(shards, desc="sample rows", unit="shard", leave=False, disable=len(shards) < 8):
            rows, _ = self._open_shard(shard, verify)
            local = take[(take >= start) & (take < start + len(rows))] - start
            if len(local):
                out.append(rows_to_float32(rows[local], self.dtype))
            start += len(rows)
        return torch.cat(out) if out else torch.zeros(0, self.dim)


class MemoryStore:
    """Rows held in memory with the read interface of `GradientStore` (methods run on small data
    without an index): `rows` [n, dim], `ids` [n, 2] (record, unit), `segments` per module."""

    dtype = "float32"
    shard: tuple[int, int] | None = None

    def __init__(self, rows: torch.Tensor, ids: np.ndarray, segments: list[tuple[str, int, int]]):
        self.data, self._ids, self.segments = rows, np.asarray(ids, dtype=np.int64).reshape(-1, 2), segments
        self.rows, self.dim = rows.shape

    def blocks(self, block_rows: int | None = None, verify: bool = True, reuse: bool = False) -> Iterator[Block]:
        step = block_rows or max(1, BLOCK_BYTES // (4 * max(self.dim, 1)))
        rank, world = self.shard or (0, 1)
        for k, lo in enumerate(range(0, self.rows, step)):
            if k % world == rank:
                yield Block(lo, self._ids[lo : lo + step], self.data[lo : lo + step])

    def ids(self) -> np.ndarray:
        return self._ids

    def sample(self, n: int, seed: int = 0, verify: bool = True) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(self.rows, size=min(n, self.rows), replace=False))
        return self.data[torch.from_numpy(take)]
