"""A 2-rank build under torchrun (gloo on CPU) against the same build on one process."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import _build_child as child
import numpy as np
import pytest
import torch

from headwater import METHODS, GradientStore, Index, UserError, query

CHILD = Path(child.__file__).resolve()
WORLD = 2
PER_RANK = child.N_DOCS // WORLD
SHARDS_PER_RANK = -(-PER_RANK // child.SHARD_ROWS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(path: Path, *args: str) -> None:
    log = path.parent / f"torchrun-{path.name}.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(CHILD),
        str(path),
        *args,
    ]
    with open(log, "wb") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=300).returncode
    assert rc == 0, f"torchrun failed ({rc}):\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def setup():
    return child.setup()


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("one") / "idx"
    child.build(path)
    return path


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("two") / "idx"
    torchrun(path)
    return path


def test_each_rank_wrote_its_contiguous_half(two_ranks):
    manifest = GradientStore(two_ranks).manifest
    assert manifest["world_size"] == WORLD and manifest["rows"] == child.N_DOCS
    for rank in range(WORLD):
        entries = [json.loads(line) for line in (two_ranks / "journal" / f"r{rank:03d}.jsonl").read_text().splitlines()]
        assert len(entries) == SHARDS_PER_RANK
        assert all(e["file"].startswith(f"r{rank:03d}-") for e in entries)
        assert sum(e["rows"] for e in entries) == PER_RANK
        assert entries[-1]["next_record"] == (rank + 1) * PER_RANK
        ids = np.concatenate([np.load(two_ranks / "shards" / e["ids"]) for e in entries])
        np.testing.assert_array_equal(ids[:, 0], np.arange(rank * PER_RANK, (rank + 1) * PER_RANK))
    assert [s["file"][:4] for s in manifest["shards"]] == ["r000"] * SHARDS_PER_RANK + ["r001"] * SHARDS_PER_RANK
    assert not (two_ranks / "locks").exists()


def test_two_ranks_equal_one_rank(one_rank, two_ranks):
    one, two = GradientStore(one_rank), GradientStore(two_ranks)
    np.testing.assert_array_equal(two.ids(), one.ids())
    rows1 = torch.cat([b.rows for b in one.blocks()])
    rows2 = torch.cat([b.rows for b in two.blocks()])
    torch.testing.assert_close(rows2, rows1, rtol=0, atol=1e-6)
    assert rows1.abs().max() > 1e-3  # not all zeros
    # Everything that identifies the index matches except the world size (and the shard names).
    differ = {k for k in one.manifest if one.manifest[k] != two.manifest.get(k)}
    assert differ == {"world_size", "shards"}


@pytest.mark.parametrize("method", ["cosine", "trackstar"])
def test_two_rank_scores_equal_one_rank(one_rank, two_ranks, setup, method):
    model, task, _ = setup
    s1 = METHODS[method](model, task).fit(Index(one_rank)).score(child.QUERIES).values
    s2 = METHODS[method](model, task).fit(Index(two_ranks)).score(child.QUERIES).values
    assert s1.shape == (child.N_DOCS, len(child.QUERIES))
    np.testing.assert_allclose(s2, s1, rtol=1e-6, atol=1e-6)
    q1 = query(Index(one_rank), child.QUERIES, method, top_k=5, bottom_k=3, model=model, task=task)
    q2 = query(Index(two_ranks, block_rows=3), child.QUERIES, method, top_k=5, bottom_k=3, model=model, task=task)
    assert q2[["query_id", "side", "rank", "record"]].equals(q1[["query_id", "side", "rank", "record"]])


def test_two_rank_resume_recovers_each_rank(one_rank, two_ranks, tmp_path):
    """Both ranks killed at different points (one with a torn journal line): resume matches."""
    path = tmp_path / "idx"
    shutil.copytree(two_ranks, path)
    (path / "manifest.json").unlink()
    for rank, keep in ((0, 5), (1, 2)):
        journal = path / "journal" / f"r{rank:03d}.jsonl"
        lines = journal.read_text().splitlines(keepends=True)
        journal.write_text("".join(lines[:keep]) + lines[keep][:30])  # shard `keep` renamed, not journaled
    original = {p.name: p.read_bytes() for p in (two_ranks / "shards").iterdir()}
    for name in list(original):
        if name.startswith("r001-") and int(name[6:12]) >= 4:
            (path / "shards" / name).unlink()  # rank 1 never got this far

    with pytest.raises(UserError, match="world_size"):  # a different world size cannot resume it
        child.build(path, resume=True)
    torchrun(path, "--resume")

    assert GradientStore(path).manifest == GradientStore(two_ranks).manifest
    assert {p.name: p.read_bytes() for p in (path / "shards").iterdir()} == original
    np.testing.assert_array_equal(GradientStore(path).ids(), GradientStore(one_rank).ids())


def test_curvature_all_reduced_over_two_ranks_equals_one_process(tmp_path):
    """Each rank fits on its half of the records; the all-reduced factors equal a one-process fit."""
    import _curvature_child as cchild

    from headwater.curvature import Curvature, fit_curvature

    out = tmp_path / "curvature.safetensors"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(Path(cchild.__file__).resolve()),
        str(out),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = Curvature.load(out)
    model, task, records = cchild.setup()
    one = fit_curvature(model, task, records, config=cchild.CONFIG, progress=False)
    assert two.examples == one.examples == len(records)
    for name, m in one.modules.items():
        t = two.modules[name]
        torch.testing.assert_close(t.q_a @ torch.diag(t.lam_a) @ t.q_a.T, m.q_a @ torch.diag(m.lam_a) @ m.q_a.T, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(t.q_s @ torch.diag(t.lam_s) @ t.q_s.T, m.q_s @ torch.diag(m.lam_s) @ m.q_s.T, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(t.corrected, m.corrected, rtol=1e-10, atol=1e-14)


def _labelled(index: Path, tmp_path: Path) -> Path:
    """A copy of `index` with topic and format labels attached (the fixtures stay untouched)."""
    from headwater.corpus import attach_labels, labels_from_columns

    path = tmp_path / index.parent.name
    shutil.copytree(index, path)
    records = [dict(r, id=i, topic=["a", "b", "c"][i % 3], format=["x", "y"][(i // 3) % 2]) for i, r in enumerate(child.corpus())]
    attach_labels(Index(path), labels_from_columns(records, ["topic", "format"]))
    return path


def test_two_rank_build_gives_the_one_rank_corpus_map(one_rank, two_ranks, tmp_path):
    import _bins_child as bchild

    one = bchild.bins_table(_labelled(one_rank, tmp_path)).table
    two = bchild.bins_table(_labelled(two_ranks, tmp_path)).table
    assert len(one) == 2 * (3 + 2 + 6) and one["n"].sum() == 2 * 3 * child.N_DOCS
    numeric = one.select_dtypes("number").columns
    np.testing.assert_allclose(two[numeric].to_numpy(float), one[numeric].to_numpy(float), rtol=1e-5, atol=1e-7)
    assert (two["significant"] == one["significant"]).all()


def test_corpus_map_over_two_ranks_equals_one_process(one_rank, tmp_path):
    """Each rank scores half of the store's blocks; the all-reduced map equals one process's."""
    import _bins_child as bchild

    path = _labelled(one_rank, tmp_path)
    out = tmp_path / "two.parquet"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    r = subprocess.run([*cmd, str(Path(bchild.__file__).resolve()), str(path), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import pandas as pd

    one = bchild.bins_table(path, block_rows=5).table
    two = pd.read_parquet(out)
    numeric = one.select_dtypes("number").columns
    np.testing.assert_allclose(two[numeric].to_numpy(float), one[numeric].to_numpy(float), rtol=1e-5, atol=1e-7)
