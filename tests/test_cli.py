"""The command line as a user runs it: `python -m headwater …` in a subprocess, on a tiny GPT-2 and
word tokenizer saved with `save_pretrained` (so `--model PATH` goes through `from_pretrained`) and a
generated .jsonl corpus. Results are checked against the Python API on the same index directories.

Every CLI call pays 2–3 s of imports, so the calls are made by two module fixtures, two at a time
(builds and calls that need no index first, then everything that reads an index); the tests only
inspect the finished processes and files.
"""

import json
import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import LAUNCHER_VARIABLES, WORDS

import headwater
from headwater import Cosine, Dot, GradientStore, Index, Loss, Scores
from headwater.toy import tiny_gpt2, word_tokenizer

N_DOCS = 16
QUERIES = [
    {"id": "q0", "prompt": "the capital of zorblat is", "completion": " quenti"},
    {"id": "q1", "text": "mirel is a large old city in the north"},
    {"id": "q2", "prompt": "the famous river of vask", "completion": " is blue and green"},
]
COLUMNS = ["query_id", "side", "rank", "train_id", "score", "text"]
COMMON = ["--data", "train.jsonl", "--projection-dim", "64", "--batch-size", "4", "--projection-seed", "3"]
LRS = (0.1, 0.2)

ENV = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
ENV.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # no test downloads

PROGRESS = re.compile(r"\r|\d+%\||\bit/s\]|examples/s\]")  # tqdm bars of transformers/datasets loading
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def hw(*args, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "headwater", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def run_all(calls: dict[str, tuple], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run CLI calls two at a time (the machine has two cores); a call is (args…) or (cwd, args…)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {}
        for name, call in calls.items():
            where, args = (call[0], call[1:]) if isinstance(call[0], Path) else (cwd, call)
            futures[name] = pool.submit(hw, *args, cwd=where)
        return {name: f.result() for name, f in futures.items()}


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"{' '.join(r.args[3:])} exited {r.returncode}:\n{r.stderr[-4000:]}"
    return r


def user_error(r: subprocess.CompletedProcess) -> str:
    """The one error line of a user error (status 2, no traceback); transformers'/datasets' own
    loading progress bars may precede it, nothing else may."""
    assert r.returncode == 2, f"exited {r.returncode}, expected 2:\n{r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    lines = [line for line in r.stderr.split("\n") if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n" + "\n".join(lines)
    assert lines[0].startswith("headwater: error: "), lines[0]
    return lines[0]


def corpus(n: int = N_DOCS, seed: int = 0) -> list[dict]:
    """`n` distinct documents of 1–3 sentences (so sentence units give several rows per record)."""
    rng = random.Random(seed)
    docs, seen = [], set()
    while len(docs) < n:
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) for _ in range(rng.randint(1, 3))]
        text = ". ".join(sentences) + "."
        if text not in seen:
            seen.add(text)
            docs.append({"id": f"doc-{len(docs)}", "text": text})
    return docs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(path: Path) -> tuple[np.ndarray, torch.Tensor]:
    store = GradientStore(path)
    return store.ids(), torch.cat([b.rows for b in store.blocks()])


def read_results(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True)
    return pd.read_parquet(path)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Workspace: model_a (tiny GPT-2 + tokenizer), model_b (its perturbed copy), train.jsonl, q.jsonl."""
    root = tmp_path_factory.mktemp("cli")
    tok = word_tokenizer([" ".join(WORDS)])
    torch.manual_seed(0)
    model = tiny_gpt2(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, n_positions=64).eval()
    model.save_pretrained(root / "model_a")
    tok.save_pretrained(root / "model_a")
    model.to(torch.bfloat16).save_pretrained(root / "model_bf16")  # a checkpoint saved in bfloat16, as many are
    tok.save_pretrained(root / "model_bf16")
    model.float()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a later checkpoint: every weight moved a little
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / "model_b")
    tok.save_pretrained(root / "model_b")
    write_jsonl(root / "train.jsonl", corpus())
    write_jsonl(root / "q.jsonl", QUERIES)
    (root / "not_a_model").mkdir()
    (root / "elsewhere").mkdir()
    return root


@pytest.fixture(scope="module")
def first(ws) -> dict[str, subprocess.CompletedProcess]:
    """Builds, and the calls that need no index."""
    quiet = "--no-progress"
    return run_all(
        {
            "nproc": ("build", "idx_n", "--model", "model_a", *COMMON, "--nproc", "2", quiet),  # longest first
            "a": ("build", "idx_a", "--model", "model_a", *COMMON),  # exactly as a user would
            "b": ("build", "idx_b", "--model", "model_b", *COMMON, quiet),
            "sentence": ("build", "idx_s", "--model", "model_a", *COMMON, "--unit", "sentence", quiet),
            "token": ("build", "idx_t", "--model", "model_a", *COMMON, "--unit", "token", quiet),
            "float32": ("build", "idx_f", "--model", "model_bf16", *COMMON, "--model-dtype", "float32", quiet),
            # A bare file name (no directory part) must not be looked up on the hub.
            "err_missing_data": ("build", "x_data", "--model", "model_a", "--data", "missing.jsonl", "--projection-dim", "64"),
            "err_dtype": ("build", "x_dtype", "--model", "model_a", *COMMON, "--storage-dtype", "float8"),
            "err_not_a_model": ("build", "x_model", "--model", "not_a_model", *COMMON),
            "err_not_index": ("query", "model_a", "--queries", "q.jsonl"),
            "help_build": ("build", "--help"),
            "help_query": ("query", "--help"),
        },
        ws,
    )


@pytest.fixture(scope="module")
def second(ws, first) -> dict[str, subprocess.CompletedProcess]:
    """Everything that reads the indexes built by `first`."""
    for name in ("a", "b", "sentence", "token", "float32"):
        ok(first[name])
    lrs = [a for lr in LRS for a in ("--checkpoint-lr", str(lr))]
    return run_all(
        {
            "csv": ("query", "idx_a", "--queries", "q.jsonl", "--top-k", "5", "--out", "top.csv"),
            "jsonl": ("query", "idx_a", "--queries", "q.jsonl", "--top-k", "5", "--bottom-k", "3", "--out", "top.jsonl"),
            "parquet": ("query", "idx_a", "--queries", "q.jsonl", "--top-k", "5", "--method", "dot", "--out", "top.parquet"),
            # Replayed from another working directory: config.json must not depend on where it was written.
            "replay": (ws / "elsewhere", "build", ws / "idx_r", "--config", ws / "idx_a" / "config.json", "--no-progress"),
            "tracin": ("query", "idx_a", "idx_b", "--queries", "q.jsonl", *lrs, "--method", "tracin", "--top-k", N_DOCS, "--out", "tracin.csv"),
            "sentence_q": ("query", "idx_s", "--queries", "q.jsonl", "--top-k", N_DOCS, "--out", "sentence.csv"),
            "token_q": ("query", "idx_t", "--queries", "q.jsonl", "--top-k", N_DOCS, "--out", "token.csv"),
            "float32_q": ("query", "idx_f", "--queries", "q.jsonl", "--top-k", N_DOCS, "--out", "float32.csv"),
            "err_tracin_lrs": ("query", "idx_a", "idx_b", "--queries", "q.jsonl", "--checkpoint-lr", "0.1", "--method", "tracin"),
            "err_exists": ("build", "idx_a", "--model", "model_a", *COMMON),
            "err_mismatch": ("query", "idx_a", "--queries", "q.jsonl", "--model", "model_b"),
            "err_method": ("query", "idx_a", "--queries", "q.jsonl", "--method", "bogus"),
        },
        ws,
    )


@pytest.fixture()
def in_ws(ws, monkeypatch):
    """Python-API calls resolve the index's model/data paths as the CLI did (from the workspace)."""
    monkeypatch.chdir(ws)
    return ws


# ------------------------------------------------------------------------------ build + query


@pytest.mark.parametrize("fmt, method, extra", [("csv", "cosine", {}), ("jsonl", "cosine", {"bottom_k": 3}), ("parquet", "dot", {})])
def test_query_output_matches_python_api(ws, first, second, in_ws, fmt, method, extra):
    assert "built" in ok(first["a"]).stdout
    assert f"wrote {len(QUERIES) * (5 + extra.get('bottom_k', 0))} rows" in ok(second[fmt]).stdout
    got = read_results(ws / f"top.{fmt}")
    assert set(COLUMNS) <= set(got.columns)
    want = headwater.query(Index(ws / "idx_a"), ws / "q.jsonl", method=method, top_k=5, **extra)
    assert list(got.columns) == list(want.columns)

    for qid in ("q0", "q1", "q2"):
        top = got[(got.query_id == qid) & (got.side == "top")]
        assert top["rank"].tolist() == [1, 2, 3, 4, 5]
        assert top["train_id"].is_unique and set(top["train_id"]) <= {f"doc-{i}" for i in range(N_DOCS)}
        assert (np.diff(top["score"].to_numpy()) <= 0).all(), "top scores not sorted descending"
        bottom = got[(got.query_id == qid) & (got.side == "bottom")]
        assert len(bottom) == extra.get("bottom_k", 0)
        assert (np.diff(bottom["score"].to_numpy()) >= 0).all(), "bottom scores not sorted ascending"

    for col in ("query_id", "side", "rank", "train_id", "record", "unit", "text"):
        assert got[col].tolist() == want[col].tolist(), col
    saved = json.loads((ws / f"top.{fmt}.config.json").read_text())  # the resolved settings, replayable with --config
    assert saved["QueryConfig"]["top_k"] == 5 and saved["QueryConfig"]["method"] == method
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_replay_from_config_gives_the_same_rows(ws, first, second):
    ok(second["replay"])
    config = json.loads((ws / "idx_a" / "config.json").read_text())
    assert Path(config["model"]).is_absolute() and Path(config["data"]).is_absolute(), config
    assert json.loads((ws / "idx_r" / "config.json").read_text()) == config
    ids_a, rows_a = rows_of(ws / "idx_a")
    ids_r, rows_r = rows_of(ws / "idx_r")
    assert rows_a.shape == (N_DOCS, GradientStore(ws / "idx_a").dim) and rows_a.abs().max() > 1e-3
    np.testing.assert_array_equal(ids_r, ids_a)
    torch.testing.assert_close(rows_r, rows_a, rtol=0, atol=0)


def test_model_dtype_loads_the_checkpoint_in_that_precision_for_build_and_query(ws, first, second, in_ws):
    """--model-dtype float32 on a bfloat16 checkpoint: the index is built from the float32 upcast
    of its weights, and its queries load the model the same way (else the fingerprint refuses)."""
    from transformers import AutoModelForCausalLM

    from headwater.collect import model_fingerprint
    from headwater.models import load_model

    saved = AutoModelForCausalLM.from_pretrained(ws / "model_bf16", dtype=torch.bfloat16)
    upcast = AutoModelForCausalLM.from_pretrained(ws / "model_bf16", dtype=torch.bfloat16).float()
    assert load_model(str(ws / "model_bf16"))[0].dtype == torch.bfloat16  # auto: the checkpoint's own
    index = Index(ws / "idx_f")
    assert index.manifest["model"]["fingerprint"] == model_fingerprint(upcast) != model_fingerprint(saved)
    assert index.model().dtype == torch.float32
    ok(second["float32_q"])
    got = read_results(ws / "float32.csv")
    want = Cosine(upcast, index.task()).fit(index).score(QUERIES)
    for j, qid in enumerate(want.query_ids):
        row = got[(got.query_id == qid) & (got.side == "top")].set_index("train_id")["score"]
        np.testing.assert_allclose(row[want.train_ids].to_numpy(), want.values[:, j], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ user errors


@pytest.mark.parametrize(
    "case, needle, target",
    [
        ("err_missing_data", "data file missing.jsonl does not exist", "x_data"),
        ("err_dtype", "'float8' is not one of 'auto', 'float16', 'bfloat16', 'float32'", "x_dtype"),
        ("err_not_a_model", "could not load model", "x_model"),
        ("err_not_index", "not a headwater index", None),
    ],
)
def test_user_error_is_one_line(ws, first, case, needle, target):
    assert needle in user_error(first[case])
    if target:
        assert not (ws / target).exists(), "a refused build left a directory behind"


@pytest.mark.parametrize(
    "case, needle",
    [
        ("err_exists", "already exists"),
        ("err_mismatch", "mismatch"),
        ("err_method", "Invalid value for '--method'"),
        ("err_tracin_lrs", "one learning rate per checkpoint"),
    ],
)
def test_user_error_on_an_index_is_one_line(ws, second, case, needle):
    assert needle in user_error(second[case])
    assert GradientStore(ws / "idx_a").rows == N_DOCS  # the refused build left the index alone


def test_help_mentions_every_flag(first):
    build = ANSI.sub("", ok(first["help_build"]).stdout)
    for flag in (
        "--model",
        "--data",
        "--projection-dim",
        "--projection-seed",
        "--batch-size",
        "--device",
        "--storage-dtype",
        "--unit",
        "--config",
        "--nproc",
    ):
        assert flag in build, flag
    query = ANSI.sub("", ok(first["help_query"]).stdout)
    for flag in ("--model", "--batch-size", "--device", "--queries", "--top-k", "--method", "--checkpoint-lr", "--out"):
        assert flag in query, flag


# ------------------------------------------------------------------------------ TracIn, torchrun, units


def test_tracin_over_two_checkpoints(ws, second, in_ws):
    ok(second["tracin"])
    got = pd.read_csv(ws / "tracin.csv")
    assert len(got) == N_DOCS * len(QUERIES)
    dot_a = Dot().fit(Index(ws / "idx_a")).score(ws / "q.jsonl").values
    dot_b = Dot().fit(Index(ws / "idx_b")).score(ws / "q.jsonl").values
    assert dot_a.shape == dot_b.shape == (N_DOCS, len(QUERIES))
    assert np.abs(dot_b - dot_a).max() > 0.1 * np.abs(dot_a).max(), "the two checkpoints barely differ"
    want = LRS[0] * dot_a + LRS[1] * dot_b  # document units: row i is record i
    for qi, qid in enumerate(("q0", "q1", "q2")):
        q = got[got.query_id == qid]
        assert q["rank"].tolist() == list(range(1, N_DOCS + 1))
        assert (np.diff(q["score"].to_numpy()) <= 0).all()
        np.testing.assert_allclose(q["score"].to_numpy(), want[q["record"].to_numpy(), qi], rtol=1e-4, atol=1e-5)
        assert q["train_id"].tolist() == [f"doc-{r}" for r in q["record"]]


def test_nproc_2_equals_one_process(ws, first):
    ok(first["nproc"]), ok(first["a"])
    two, one = GradientStore(ws / "idx_n"), GradientStore(ws / "idx_a")
    assert two.manifest["world_size"] == 2 and {s["file"][:4] for s in two.manifest["shards"]} == {"r000", "r001"}
    ids_2, rows_2 = rows_of(ws / "idx_n")
    ids_1, rows_1 = rows_of(ws / "idx_a")
    np.testing.assert_array_equal(ids_2, ids_1)
    torch.testing.assert_close(rows_2, rows_1, rtol=1e-3, atol=1e-3 * float(rows_1.abs().max()))
    differ = {k for k in one.manifest if one.manifest[k] != two.manifest.get(k)}
    assert differ == {"world_size", "shards"}


@pytest.mark.parametrize("unit", ["sentence", "token"])
def test_span_units_pool_per_record(ws, second, in_ws, unit):
    ok(second[f"{unit}_q"])
    path = ws / f"idx_{unit[0]}"
    index = Index(path)
    assert index.manifest["task"]["unit"] == unit
    assert index.store.rows > N_DOCS + 4, "too few rows per record to test pooling"
    got = pd.read_csv(ws / f"{unit}.csv")
    assert len(got) == N_DOCS * len(QUERIES)
    assert not got.duplicated(["query_id", "train_id"]).any(), "a record appears twice for one query"
    assert (got["unit"] == -1).all()
    # Default pooling is max over the record's rows.
    blocks = list(Cosine().fit(index).score_blocks(ws / "q.jsonl", Loss()))
    scores = torch.cat([b for _, _, b in blocks]).numpy()
    records = np.concatenate([ids[:, 0] for _, ids, _ in blocks])
    for qi, qid in enumerate(("q0", "q1", "q2")):
        q = got[got.query_id == qid]
        assert (np.diff(q["score"].to_numpy()) <= 0).all()
        want = [scores[records == r, qi].max() for r in q["record"]]
        np.testing.assert_allclose(q["score"].to_numpy(), want, rtol=1e-5, atol=1e-6)


def test_influence_methods_and_lds_from_the_command_line(ws, first, in_ws):
    """curvature → attribute/query --method ekfac → evaluate lds, as a user chains them."""
    ok(first["a"])
    ok(hw("curvature", "idx_a", "--batch-size", "4", "--fisher-seed", "1", "--no-progress", cwd=ws))
    assert len(list((ws / "idx_a").glob("curvature-*.safetensors"))) == 1
    ok(
        hw(
            "attribute",
            "--index",
            "idx_a",
            "--method",
            "ekfac",
            "--queries",
            "q.jsonl",
            "--batch-size",
            "4",
            "--fisher-seed",
            "1",
            "--no-progress",
            "--out",
            "ekfac.safetensors",
            cwd=ws,
        )
    )
    assert len(list((ws / "idx_a").glob("curvature-*.safetensors"))) == 1  # the same settings reuse the fitted curvature
    got = Scores.load(ws / "ekfac.safetensors")
    config = headwater.InfluenceConfig(curvature=headwater.CurvatureConfig(batch_size=4, seed=1), batch_size=4)
    want = headwater.EKFAC(config=config).fit(Index(ws / "idx_a")).score(str(ws / "q.jsonl"))
    assert got.train_ids == [f"doc-{i}" for i in range(N_DOCS)] and got.query_ids == ["q0", "q1", "q2"]
    np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-7)
    ok(hw("query", "idx_a", "--queries", "q.jsonl", "--method", "kfac", "--top-k", "3", "--out", "kfac.csv", cwd=ws))
    assert len(read_results(ws / "kfac.csv")) == 3 * len(QUERIES)

    # evaluate lds with a user training function: an exactly linear datamodel, so LDS is ±1.
    tau = np.random.default_rng(0).normal(size=(N_DOCS, 2))
    np.save(ws / "tau.npy", tau)
    for name, values in (("tau", tau), ("minus_tau", -tau)):
        Scores(values, list(range(N_DOCS)), [0, 1]).save(ws / f"{name}.safetensors")
    (ws / "lds_train.py").write_text(
        f"import numpy as np\nTAU = np.load({str(ws / 'tau.npy')!r})\ndef train(mask, seed):\n    return -(mask.astype(float) @ TAU)\n"
    )
    r = ok(
        hw(
            "evaluate",
            "lds",
            "--scores",
            "tau.safetensors",
            "--scores",
            "minus_tau.safetensors",
            "--train",
            "lds_train:train",
            "--subsets",
            "20",
            "--retrain-seeds",
            "2",
            "--out",
            "lds.json",
            cwd=ws,
        )
    )
    result = json.loads((ws / "lds.json").read_text())
    assert result["methods"]["tau"] == pytest.approx(1.0) and result["methods"]["minus_tau"] == pytest.approx(-1.0)
    assert result["seed_ceiling"] == pytest.approx(1.0)
    assert "tau: LDS 1.0000" in r.stdout
    err = hw("evaluate", "lds", "--scores", "tau.safetensors", "--train", "no_such_module:train", cwd=ws)
    assert err.returncode == 2 and "cannot import the training function" in err.stderr
