"""The gradient store: crash safety and resume, directory safety, locks, checksums, dtypes, top-k.

Every build here is the deterministic tiny build of `_build_child.py` (60 one-row documents,
shards of 4 rows, batches of 2), so an uninterrupted build is a byte-exact reference.
"""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import _build_child as child
import numpy as np
import pytest
import torch

from headwater import (
    METHODS,
    ChecksumError,
    Cosine,
    GradientCollector,
    GradientStore,
    Index,
    LanguageModelTask,
    TrackStar,
    UserError,
    build_index,
    query,
)

CHILD = Path(child.__file__).resolve()
N_SHARDS = child.N_DOCS // child.SHARD_ROWS


# ------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """An uninterrupted float32 build: the reference every other build must equal."""
    path = tmp_path_factory.mktemp("baseline") / "idx"
    child.build(path)
    return path


@pytest.fixture(scope="module")
def setup():
    return child.setup()


def copy_of(baseline: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "idx"
    shutil.copytree(baseline, dst)
    return dst


def stored_rows(path) -> torch.Tensor:
    return torch.cat([b.rows for b in GradientStore(path).blocks(block_rows=5)])


def journal(path) -> Path:
    return Path(path) / "journal" / "r000.jsonl"


def journal_lines(path) -> list[str]:
    """Complete (newline-terminated) journal lines."""
    try:
        raw = journal(path).read_text()
    except FileNotFoundError:
        return []
    return [line for line in raw.splitlines(keepends=True) if line.endswith("\n")]


def assert_equals_baseline(path: Path, baseline: Path, setup) -> None:
    """Same manifest shards (names, rows, checksums), ids, rows and scores, bit for bit."""
    got, want = GradientStore(path), GradientStore(baseline)
    assert got.rows == want.rows == child.N_DOCS
    assert got.manifest["shards"] == want.manifest["shards"]
    np.testing.assert_array_equal(got.ids(), want.ids())
    assert torch.equal(stored_rows(path), stored_rows(baseline))
    model, task, _ = setup
    s_got = Cosine(model, task).fit(Index(path)).score(child.QUERIES).values
    s_want = Cosine(model, task).fit(Index(baseline)).score(child.QUERIES).values
    np.testing.assert_array_equal(s_got, s_want)
    # Nothing but the journaled shards is left behind, and the lock is gone.
    assert sorted(p.name for p in (path / "shards").iterdir()) == sorted(p.name for p in (baseline / "shards").iterdir())
    assert journal(path).read_bytes() == journal(baseline).read_bytes()
    assert not (path / "locks").exists()


class Interrupt(Exception):
    """Stands in for a crash inside an in-process build."""


@dataclasses.dataclass(frozen=True)
class CrashingTask(LanguageModelTask):
    """The build's task (same `describe()`), crashing while computing batch `after + 1`."""

    after: int = 0
    calls: list = dataclasses.field(default_factory=list, compare=False)

    def loss(self, model, batch, sample=None):
        self.calls.append(1)
        if len(self.calls) > self.after:
            raise Interrupt
        return super().loss(model, batch, sample)


def interrupted_build(path: Path, batches: int) -> None:
    """Build in-process and crash while computing batch `batches + 1`; no manifest is written."""
    model, task, records = child.setup()
    with pytest.raises(Interrupt):
        build_index(path, model, records, task=CrashingTask(task.tokenizer, after=batches), config=child.config(), progress=False)
    assert not (path / "manifest.json").exists()


def spawn(path: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, str(CHILD), str(path), *args], env=env, stdout=subprocess.DEVNULL, stderr=err)


def kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 120.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (it must still be running then), and reap it."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"child exited ({proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"kill point not reached in {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL  # reaped: its pid is dead, not a zombie


def assert_journal_is_baseline_prefix(path: Path, baseline: Path, at_least: int) -> int:
    """An interrupted build's journal lists exactly the reference's first shards; returns how many."""
    assert not (path / "manifest.json").exists(), "the build finished before it was killed"
    entries = [json.loads(line) for line in journal_lines(path)]
    assert at_least <= len(entries) < N_SHARDS
    assert entries == GradientStore(baseline).manifest["shards"][: len(entries)]
    return len(entries)


# ------------------------------------------------------------------------------ crash safety


def test_sigkill_at_several_points_then_resume_equals_uninterrupted(baseline, setup, tmp_path):
    path, log = tmp_path / "idx", tmp_path / "child.log"
    lock = path / "locks" / "r000.lock"

    # 1. Killed after setup, while the first shard is being computed (lock taken, journal empty).
    proc = spawn(path, log, "--sleep", "0.5")  # a shard per second: ample time to kill before one
    kill_when(proc, lambda: lock.exists() and lock.stat().st_size > 0, log)
    assert (path / "config.json").exists() and (path / "header.json").exists()
    assert lock.exists()  # left behind by the killed process
    n0 = assert_journal_is_baseline_prefix(path, baseline, at_least=0)
    assert n0 <= 1

    # 2. Resumed (over the dead process's lock), killed again after a few shards.
    proc = spawn(path, log, "--resume", "--sleep", "0.1")
    kill_when(proc, lambda: len(journal_lines(path)) >= 3, log)
    assert_journal_is_baseline_prefix(path, baseline, at_least=3)

    # 3. Resumed and killed after more shards.
    proc = spawn(path, log, "--resume", "--sleep", "0.1")
    kill_when(proc, lambda: len(journal_lines(path)) >= 8, log)
    n = assert_journal_is_baseline_prefix(path, baseline, at_least=8)

    # 4. Simulate a kill between the last shard's rename and its journal append (the shard is on
    #    disk but unrecorded), torn mid-append, plus leftovers a killed writer can leave.
    lines = journal_lines(path)
    last = lines[-1]
    journal(path).write_text("".join(lines[:-1]) + last[: len(last) // 2])
    assert (path / "shards" / json.loads(last)["file"]).exists()
    stray = path / "shards" / "r000-s000099.npy"
    np.save(stray, np.ones((4, GradientStore(baseline).dim), np.float32))
    shutil.copy(path / "shards" / json.loads(last)["ids"], path / "shards" / "r000-s000099.ids.npy")
    tmp = path / "shards" / f".r000-s{n:06d}.npy.tmp-999999"
    tmp.write_bytes(b"partial")

    # 5. Resume to completion in-process.
    index = child.build(path, resume=True)
    assert index.store.rows == child.N_DOCS
    assert not stray.exists() and not tmp.exists()
    assert_equals_baseline(path, baseline, setup)


def test_shards_are_written_in_the_background_and_a_failed_write_fails_the_build(baseline, setup, tmp_path, monkeypatch):
    """Shards are written by the writer's thread while the next rows are computed; a write that
    fails (a full disk) fails the build with its own error, the shards before it stay journaled,
    and a resume completes the index to the uninterrupted one."""
    from headwater import store

    threads, real = [], store.atomic_save_rows

    def save(path, parts):
        threads.append(threading.current_thread().name)
        if len(threads) == 6:  # the 6th shard's rows
            raise OSError(28, "No space left on device")
        return real(path, parts)

    monkeypatch.setattr(store, "atomic_save_rows", save)
    path = tmp_path / "idx"
    with pytest.raises(OSError, match="No space left"):
        child.build(path)
    assert len(threads) == 6 and all(name.startswith("headwater-shards") for name in threads)
    assert assert_journal_is_baseline_prefix(path, baseline, at_least=5) == 5
    monkeypatch.setattr(store, "atomic_save_rows", real)
    child.build(path, resume=True)
    assert_equals_baseline(path, baseline, setup)


@pytest.mark.parametrize("dtype", [np.float16, np.uint16, np.float32])
def test_rows_saved_in_parts_are_np_save_of_their_concatenation(tmp_path, dtype):
    from headwater.store import atomic_save_rows, sha256_file

    rng = np.random.default_rng(0)
    parts = [(rng.standard_normal((n, 7)) * 1000).astype(dtype) for n in (3, 1, 5)]
    parts[1] = np.asfortranarray(np.repeat(parts[1], 2, axis=0))[::2]  # a strided view: written as its rows, not its memory
    np.save(tmp_path / "ref.npy", np.concatenate(parts), allow_pickle=False)
    digest = atomic_save_rows(tmp_path / "got.npy", parts)
    assert (tmp_path / "got.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    assert digest == sha256_file(tmp_path / "ref.npy")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rows_holding_nan_or_inf_are_refused_naming_the_first_record(bad):
    from headwater.store import check_storable

    rows, ids = torch.randn(4, 6), np.array([[10, 0], [11, 0], [11, 1], [12, 0]])
    check_storable(rows, "float16", ids)  # finite rows pass
    rows[2, 3] = rows[3, 0] = bad
    with pytest.raises(UserError, match=r"rows of 2 examples hold inf or NaN \(first: record 11\)"):
        check_storable(rows, "float32", ids)
    rows = torch.randn(4, 6)
    rows[1, 1] = -7e4  # finite in float32, inf in float16
    with pytest.raises(UserError, match="7e\\+04, beyond float16's range"):
        check_storable(rows, "float16", ids)
    check_storable(rows, "bfloat16", ids)


def test_resume_drops_a_journaled_shard_that_fails_its_checksum(baseline, setup, tmp_path):
    path = tmp_path / "idx"
    interrupted_build(path, batches=9)  # 4 shards journaled, a 5th batch's rows lost
    assert len(journal_lines(path)) == 4
    shard = path / "shards" / "r000-s000002.npy"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x40
    shard.write_bytes(bytes(data))
    child.build(path, resume=True)
    assert_equals_baseline(path, baseline, setup)


def test_resume_when_killed_after_the_last_shard_before_the_manifest(baseline, setup, tmp_path):
    path = copy_of(baseline, tmp_path)
    (path / "manifest.json").unlink()
    with pytest.raises(UserError, match="--resume"):
        Index(path)
    child.build(path, resume=True)
    assert GradientStore(path).manifest == GradientStore(baseline).manifest
    assert_equals_baseline(path, baseline, setup)


@pytest.mark.parametrize("left", ["config.json", "config.json+records"])
def test_resume_when_killed_while_setting_up_the_directory(baseline, setup, tmp_path, left):
    """Killed after config.json was written but before header.json (and maybe mid-records)."""
    path = tmp_path / "idx"
    path.mkdir()
    shutil.copy(baseline / "config.json", path / "config.json")
    if "records" in left:
        (path / "records").mkdir()
        (path / "records" / "data-00000-of-00001.arrow").write_bytes(b"torn")
    with pytest.raises(UserError, match=r"interrupted build.*--resume"):
        child.build(path)
    child.build(path, resume=True)
    assert_equals_baseline(path, baseline, setup)
    assert Index(path).text(5) == Index(baseline).text(5)  # records saved whole (fingerprint checked)


# --------------------------------------------------------------------- directories and locks


def test_existing_complete_index_needs_resume_or_overwrite(baseline, setup, tmp_path):
    path = copy_of(baseline, tmp_path)
    with pytest.raises(UserError, match=r"index already exists.*--overwrite.*--resume"):
        child.build(path)
    assert_equals_baseline(path, baseline, setup)  # untouched by the refusal
    with pytest.raises(UserError, match="one of --resume and --overwrite"):
        child.build(path, resume=True, overwrite=True)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (path / "shards").iterdir()}
    assert child.build(path, resume=True).store.rows == child.N_DOCS  # resume of a complete index: a no-op
    assert {p.name: p.stat().st_mtime_ns for p in (path / "shards").iterdir()} == mtimes
    (path / "shards" / "r000-s000000.npy").write_bytes(b"junk")  # overwrite must not reuse anything
    child.build(path, overwrite=True)
    assert_equals_baseline(path, baseline, setup)


def test_interrupted_index_needs_resume_or_overwrite(baseline, setup, tmp_path):
    path = tmp_path / "idx"
    interrupted_build(path, batches=5)
    before = journal(path).read_bytes()
    assert before
    with pytest.raises(UserError, match=r"interrupted build.*--resume"):
        child.build(path)
    assert journal(path).read_bytes() == before
    child.build(path, overwrite=True)
    assert_equals_baseline(path, baseline, setup)


def test_overwrite_refuses_a_directory_that_is_not_an_index(tmp_path):
    path = tmp_path / "precious"
    path.mkdir()
    (path / "thesis.txt").write_text("do not delete")
    with pytest.raises(UserError, match="not a headwater index; refusing to overwrite"):
        child.build(path, overwrite=True)
    with pytest.raises(UserError, match="not a headwater index"):
        child.build(path)
    with pytest.raises(UserError, match="not a headwater index"):
        child.build(path, resume=True)
    assert sorted(p.name for p in path.iterdir()) == ["thesis.txt"]
    assert (path / "thesis.txt").read_text() == "do not delete"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_of_a_dead_process_does_not_block_resume(baseline, setup, tmp_path):
    path = tmp_path / "idx"
    interrupted_build(path, batches=7)
    lock = path / "locks" / "r000.lock"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    child.build(path, resume=True)
    assert_equals_baseline(path, baseline, setup)


def test_lock_of_a_live_process_blocks_resume(baseline, tmp_path):
    path = tmp_path / "idx"
    interrupted_build(path, batches=7)
    lock = path / "locks" / "r000.lock"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    before = journal(path).read_bytes()
    with pytest.raises(UserError, match=f"another build \\(pid {os.getpid()}\\)"):
        child.build(path, resume=True)
    assert lock.exists() and journal(path).read_bytes() == before
    assert (path / "config.json").exists()  # a refused resume deletes nothing


# -------------------------------------------------------------------------------- checksums


def data_offset(npy: Path) -> int:
    """Where the array bytes start in an .npy file (after its header)."""
    return npy.stat().st_size - np.load(npy, mmap_mode="r").nbytes


def flip_byte(path: Path, where: str = "middle") -> None:
    start, size = data_offset(path), path.stat().st_size
    pos = start + (size - start) // 2 if where == "middle" else start
    data = bytearray(path.read_bytes())
    data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 17)


CORRUPTIONS = {
    "truncate first shard": ("r000-s000000.npy", truncate),
    "truncate last shard": (f"r000-s{N_SHARDS - 1:06d}.npy", truncate),
    "flip byte in a middle shard's rows": ("r000-s000007.npy", flip_byte),
    "flip byte in a shard's row ids": ("r000-s000004.ids.npy", flip_byte),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_shard_raises_checksum_error(baseline, setup, tmp_path, kind):
    path = copy_of(baseline, tmp_path)
    name, corrupt = CORRUPTIONS[kind]
    corrupt(path / "shards" / name)
    model, task, _ = setup

    with pytest.raises(ChecksumError, match=name.split(".")[0]):
        GradientStore(path).verify()
    with pytest.raises(ChecksumError):
        list(GradientStore(path).blocks())
    with pytest.raises(ChecksumError):
        query(Index(path), child.QUERIES, model=model, task=task, top_k=3)
    with pytest.raises(ChecksumError):
        TrackStar(model, task).fit(Index(path)).score(child.QUERIES)
    if name.startswith("r000-s000000"):  # the first shard is checked before the first block
        with pytest.raises(ChecksumError):
            next(GradientStore(path).blocks())


def test_flipped_byte_is_caught_only_by_the_checksum(baseline, tmp_path):
    """The flipped byte really changes the rows read: without verification they come back wrong."""
    path = copy_of(baseline, tmp_path)
    flip_byte(path / "shards" / "r000-s000007.npy")
    rows = torch.cat([b.rows for b in GradientStore(path).blocks(verify=False)])
    want = stored_rows(baseline)
    assert rows.shape == want.shape
    assert (rows != want).any(dim=1).nonzero().flatten().tolist() in ([28], [29], [30], [31])


def test_corruption_after_a_query_is_caught_by_the_same_index(baseline, setup, tmp_path):
    path = copy_of(baseline, tmp_path)
    model, task, _ = setup
    method = Cosine(model, task).fit(Index(path))
    query(None, child.QUERIES, method, top_k=3)
    time.sleep(0.01)
    flip_byte(path / "shards" / "r000-s000003.npy", where="start")
    with pytest.raises(ChecksumError):
        query(None, child.QUERIES, method, top_k=3)


# ----------------------------------------------------------------------------------- dtypes


@pytest.fixture(scope="module")
def collector_rows(setup) -> torch.Tensor:
    """The collector's float32 rows for the build's batches (pairs of records, in order)."""
    model, task, records = setup
    collector = GradientCollector(model, task, child.config().projection)
    bs = child.BATCH_SIZE
    return torch.cat([collector(task.collate([task.encode(r)[0] for r in records[i : i + bs]])) for i in range(0, len(records), bs)])


@pytest.mark.parametrize(
    "dtype,torch_dtype,disk_dtype",
    [("float16", torch.float16, np.float16), ("bfloat16", torch.bfloat16, np.uint16), ("float32", torch.float32, np.float32)],
)
def test_dtype_round_trip(tmp_path, collector_rows, dtype, torch_dtype, disk_dtype):
    path = tmp_path / "idx"
    child.build(path, dtype=dtype)
    store = GradientStore(path)
    assert store.dtype == dtype
    assert np.load(path / "shards" / "r000-s000000.npy").dtype == disk_dtype
    got = torch.cat([b.rows for b in store.blocks(block_rows=7)])
    assert got.dtype == torch.float32
    want = collector_rows.to(torch_dtype).float()
    assert torch.equal(got, want)
    if dtype != "float32":
        assert not torch.equal(want, collector_rows)  # the cast is lossy: the test sees the dtype
    sample = store.sample(10, seed=3)
    assert all(any(torch.equal(s, r) for r in got) for s in sample)


# ------------------------------------------------------------------------------- streaming top-k


@pytest.mark.parametrize("method", ["cosine", "trackstar", "dot"])
def test_streaming_top_and_bottom_k_equal_dense_argsort(baseline, setup, method):
    model, task, _ = setup
    index = Index(baseline)
    ids = index.store.ids()
    np.testing.assert_array_equal(ids, np.stack([np.arange(child.N_DOCS), np.zeros(child.N_DOCS, int)], 1))
    dense = METHODS[method](model, task).fit(index).score(child.QUERIES).values
    assert dense.shape == (child.N_DOCS, len(child.QUERIES))
    top_k, bottom_k = 7, 5
    # block_rows=3 with 4-row shards: blocks never span shards and the top-k merges 30 blocks.
    frame = query(Index(baseline, block_rows=3), child.QUERIES, method, top_k=top_k, bottom_k=bottom_k, model=model, task=task)
    assert len(frame) == len(child.QUERIES) * (top_k + bottom_k)
    for q in range(len(child.QUERIES)):
        for side, k, order in (("top", top_k, np.argsort(-dense[:, q], kind="stable")), ("bottom", bottom_k, np.argsort(dense[:, q], kind="stable"))):
            got = frame[(frame.query_id == q) & (frame.side == side)].sort_values("rank")
            assert got["rank"].tolist() == list(range(1, k + 1))
            assert got["record"].tolist() == order[:k].tolist(), (method, q, side)
            np.testing.assert_allclose(got["score"].to_numpy(), dense[order[:k], q], rtol=1e-5, atol=1e-6)
            assert got["text"].tolist() == [index.text(r) for r in order[:k]]


def test_query_records_of_mixed_formats(baseline, setup):
    """Queries in different formats in one list each get their own format's gradient."""
    model, task, _ = setup
    index = Index(baseline)
    together = index.query_rows(child.QUERIES, model=model, task=task)
    alone = torch.cat([index.query_rows([q], model=model, task=task) for q in child.QUERIES])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)


def test_lock_from_another_host_is_never_taken(baseline, tmp_path):
    """On a shared filesystem a lock from another host may belong to a live build."""
    path = tmp_path / "idx"
    interrupted_build(path, batches=7)
    lock = path / "locks" / "r000.lock"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname() + "-elsewhere"}))
    before = journal(path).read_bytes()
    with pytest.raises(UserError, match="delete the lock file"):
        child.build(path, resume=True)
    assert lock.exists() and journal(path).read_bytes() == before


def test_resume_compares_contents_not_paths(tmp_path):
    """An interrupted build, moved with its model and data folders, resumes from the new paths
    (and the index then loads them from there); another model, data or optimizer state does not."""
    from headwater.build import _check_same_build

    src, dst = tmp_path / "a", tmp_path / "b"
    tok = child.tokenizer()
    child.model(len(tok)).save_pretrained(src / "model")
    tok.save_pretrained(src / "model")
    (src / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in child.corpus(12)))
    at = lambda root: dataclasses.replace(child.config(), model=str(root / "model"), data=str(root / "train.jsonl"))  # noqa: E731
    whole = build_index(tmp_path / "whole", config=at(src), progress=False)
    build_index(tmp_path / "idx", config=at(src), progress=False)
    (tmp_path / "idx" / "manifest.json").unlink()  # killed before the manifest
    shutil.move(src, dst)
    index = build_index(tmp_path / "idx", config=at(dst), resume=True, progress=False)
    assert index.config.model == str(dst / "model") and index.config.data == str(dst / "train.jsonl")
    np.testing.assert_array_equal(next(index.store.blocks()).rows.numpy(), next(whole.store.blocks()).rows.numpy())

    header = json.loads((tmp_path / "idx" / "header.json").read_text())
    header["normalizer"] = {"path": "/old/optimizer.pt", "sha256": "ssss"}  # built before the floor
    (tmp_path / "idx" / "header.json").write_text(json.dumps(header))
    for key, field, value in (("model", "fingerprint", "bbbb"), ("data", "records", 13), ("normalizer", "sha256", "tttt")):
        other = json.loads(json.dumps(header))
        other[key][field] = value
        with pytest.raises(UserError, match=f"its {key} differs"):
            _check_same_build(tmp_path / "idx", other)
    floored = json.loads(json.dumps(header))
    floored["normalizer"]["floor"] = 1e-3
    _check_same_build(tmp_path / "idx", floored, complete=True)  # a finished index stays usable
    with pytest.raises(UserError, match="its normalizer differs"):  # an unfinished one is not continued
        _check_same_build(tmp_path / "idx", floored)
