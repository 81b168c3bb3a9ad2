"""Bad input is refused with a clear UserError and leaves nothing behind; every record source and
record format gives the gradients a hand-written reference gives."""

import json
import warnings

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from reference import STORED_F32, assert_rel_close, module_gradient, reference_rows

from headwater import BuildConfig, GradientCollector, LanguageModelTask, ProjectionConfig, UserError, build_index
from headwater.data import fingerprint_records, load_records
from headwater.toy import tiny_gpt2

CFG = dict(projection=ProjectionConfig("factored", 16), storage_dtype="float32", batch_size=4)


def build(path, model, data, tokenizer, max_length=None, **overrides):
    task = LanguageModelTask(tokenizer, max_length=max_length)
    return build_index(path, model, data, task=task, config=BuildConfig(**{**CFG, **overrides}), progress=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ refused input


def test_empty_jsonl_refused_and_nothing_written(tmp_path, gpt2, tokenizer):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"")
    out = tmp_path / "idx"
    with pytest.raises(UserError, match="empty"):
        build(out, gpt2, str(data), tokenizer)
    assert not out.exists()


def test_missing_text_column_refused_and_nothing_written(tmp_path, gpt2, tokenizer):
    data = write_jsonl(tmp_path / "train.jsonl", [{"id": i, "body": "the city is old"} for i in range(3)])
    out = tmp_path / "idx"
    with pytest.raises(UserError) as err:
        build(out, gpt2, str(data), tokenizer)
    msg = str(err.value)
    assert "'text'" in msg and "'prompt'" in msg and "body" in msg  # names what is wanted and what is there
    assert not out.exists()


def test_prompt_without_completion_refused(tmp_path, gpt2, tokenizer):
    task = LanguageModelTask(tokenizer, format="prompt_completion")
    out = tmp_path / "idx"
    with pytest.raises(UserError, match="'completion'"):
        build_index(out, gpt2, [{"prompt": "the city"}], task=task, config=BuildConfig(**CFG), progress=False)
    assert not out.exists()


def test_record_without_text_midway_refused_and_nothing_written(tmp_path, gpt2, tokenizer):
    # Records 0-3 are fine; record 4 has no text (datasets fills the gap with null), so the failure
    # happens after shards may already have been written: the fresh directory must be removed.
    rows = [{"id": i, "text": "the city is old and the river is blue"} for i in range(4)] + [{"id": 4}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "idx"
    with pytest.raises(UserError, match="'text'"):
        build(out, gpt2, str(data), tokenizer, batch_size=1, shard_rows=1)
    assert not out.exists()


def test_non_utf8_line_named(tmp_path, gpt2, tokenizer):
    data = tmp_path / "train.jsonl"
    good = json.dumps({"text": "the city is old"}).encode() + b"\n"
    data.write_bytes(good + good + b'{"text": "the \xff\xfe city"}\n' + good)
    out = tmp_path / "idx"
    with pytest.raises(UserError) as err:
        build(out, gpt2, str(data), tokenizer)
    msg = str(err.value)
    assert "UTF-8" in msg and f"{data}:3:" in msg
    assert not out.exists()


def _adam_state(model, path, steps=2):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        sum(p.square().sum() for p in model.parameters()).backward()
        opt.step()
    torch.save(opt.state_dict(), path)
    return path


def test_optimizer_state_of_other_model_refused(tmp_path, gpt2, tokenizer, lm_records):
    torch.manual_seed(0)
    other = tiny_gpt2(vocab_size=len(tokenizer), n_layer=2, n_embd=16, n_head=2, n_positions=64)
    state = _adam_state(other, tmp_path / "adam.pt")
    out = tmp_path / "idx"
    with pytest.raises(UserError) as err:
        build(out, gpt2, lm_records, tokenizer, optimizer_state=str(state))
    msg = str(err.value)
    assert "does not match the model" in msg and "transformer.h.0.attn.c_attn.weight" in msg
    assert not out.exists()


def test_optimizer_state_with_fewer_parameters_refused(tmp_path, gpt2, tokenizer, lm_records):
    torch.manual_seed(0)
    other = tiny_gpt2(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_positions=64)
    state = _adam_state(other, tmp_path / "adam.pt")
    out = tmp_path / "idx"
    with pytest.raises(UserError, match="does not match the model"):
        build(out, gpt2, lm_records, tokenizer, optimizer_state=str(state))
    assert not out.exists()


def test_optimizer_state_not_a_state_dict(tmp_path, gpt2, tokenizer, lm_records):
    bad = tmp_path / "weights.pt"
    torch.save(gpt2.state_dict(), bad)  # model weights, not an optimizer state
    out = tmp_path / "idx"
    with pytest.raises(UserError, match="not an optimizer state_dict"):
        build(out, gpt2, lm_records, tokenizer, optimizer_state=str(bad))
    assert not out.exists()


# ------------------------------------------------------------------------------ truncation


def test_truncation_warns_with_count_and_builds(tmp_path, gpt2, tokenizer, lm_records):
    gpt2 = gpt2.double()
    max_length = 6
    # Record 0 is the longest, so it is also the record the build probes before writing anything.
    records = [lm_records[3]] + [r for i, r in enumerate(lm_records) if i != 3]
    lengths = [len(tokenizer(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"]) for r in records]
    n_long = sum(n > max_length for n in lengths)
    assert 0 < n_long < len(records) and lengths[0] > max_length
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = build(tmp_path / "idx", gpt2, records, tokenizer, max_length=max_length)
    msgs = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert msgs == [f"{n_long} of {len(records)} examples were longer than the context ({max_length} tokens) and were truncated"]
    assert index.store.rows == len(records)

    # A truncated record's row is the gradient of its first max_length tokens: for "mirel is a" +
    # " large old city in the north" that is the untruncated record "mirel is a" + " large old city".
    k = next(i for i, r in enumerate(records) if r["prompt"] == "mirel is a")
    task = LanguageModelTask(tokenizer)
    cut = task.encode({"prompt": "mirel is a", "completion": " large old city"})
    cfg = ProjectionConfig(**index.manifest["projection"])
    want = reference_rows(gpt2, task, cut, cfg)
    got = torch.from_numpy(np.concatenate([b.rows.numpy() for b in index.store.blocks()]))[k : k + 1]
    assert_rel_close(got, want, STORED_F32)


# ------------------------------------------------------------------------------ record sources


RECORDS = [
    {"id": 10, "text": "the capital of zorblat is quenti"},
    {"id": 11, "text": "mirel is a large old city in the north"},
    {"id": 12, "text": "the famous river of vask is blue"},
    {"id": 13, "text": "tela was a small red mountain by the sunny river"},
    {"id": 14, "text": "orin is in the south and is green"},
]


def _write_sources(tmp_path):
    frame = pd.DataFrame(RECORDS)
    sources = {"jsonl": write_jsonl(tmp_path / "d.jsonl", RECORDS), "csv": tmp_path / "d.csv", "parquet": tmp_path / "d.parquet"}
    frame.to_csv(sources["csv"], index=False)
    frame.to_parquet(sources["parquet"], index=False)
    sources["saved"] = tmp_path / "saved"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(sources["saved"]))
    return {k: str(v) for k, v in sources.items()}


def test_sources_load_the_same_records(tmp_path):
    sources = _write_sources(tmp_path)
    for name, src in sources.items():
        ds = load_records(src)
        assert [dict(r) for r in ds] == RECORDS, name
    prints = {name: fingerprint_records(load_records(src)) for name, src in sources.items()}
    assert len(set(prints.values())) == 1, prints
    assert prints["jsonl"] == fingerprint_records(load_records(RECORDS))


def test_sources_build_identical_indexes(tmp_path, gpt2, tokenizer):
    gpt2 = gpt2.double()
    sources = _write_sources(tmp_path)
    task = LanguageModelTask(tokenizer)
    cfg = CFG["projection"]
    want = reference_rows(gpt2, task, [task.encode(r)[0] for r in RECORDS], cfg)
    prints = set()
    for name, src in sources.items():
        index = build(tmp_path / f"idx-{name}", gpt2, src, tokenizer)
        prints.add(index.manifest["data"]["fingerprint"])
        rows = torch.cat([b.rows for b in index.store.blocks()])
        assert_rel_close(rows, want, STORED_F32)
        assert index.train_ids == [r["id"] for r in RECORDS], name
        assert index.text(1) == RECORDS[1]["text"]
    assert len(prints) == 1


# ------------------------------------------------------------------------------ chat records


CHAT = {
    "messages": [
        {"role": "system", "content": "the city"},
        {"role": "user", "content": "mirel is"},
        {"role": "assistant", "content": "a large city"},
        {"role": "user", "content": "and vask"},
        {"role": "assistant", "content": "is blue"},
    ]
}


def test_chat_mask_is_exactly_the_assistant_turns(tokenizer):
    task = LanguageModelTask(tokenizer)
    (ex,) = task.encode(CHAT)
    tokens = tokenizer.convert_ids_to_tokens(ex.input_ids)
    # The template renders "role : content [EOS] " per turn; a turn's loss covers its content and its [EOS].
    want = []
    for m in CHAT["messages"]:
        turn = [m["role"], ":"] + m["content"].split() + ["[EOS]"]
        want += [(t, m["role"] == "assistant" and i >= 2) for i, t in enumerate(turn)]
    assert list(zip(tokens, ex.target_mask)) == want


def test_chat_gradient_equals_hand_written_loss(gpt2, tokenizer):
    gpt2 = gpt2.double()
    task = LanguageModelTask(tokenizer)
    other = {"messages": [{"role": "user", "content": "the river"}, {"role": "assistant", "content": "is green and old"}]}
    examples = [task.encode(CHAT)[0], task.encode(other)[0]]
    cfg = ProjectionConfig("none")
    got = GradientCollector(gpt2, task, cfg)(task.collate(examples))  # padded batch of two

    # Reference: the summed next-token loss on the assistant tokens, one conversation at a time.
    conv = [CHAT["messages"], other["messages"]]
    tracked = GradientCollector(gpt2, task, cfg).modules
    for row, messages in zip(got, conv):
        tokens, mask = [], []
        for m in messages:
            turn = [m["role"], ":"] + m["content"].split() + ["[EOS]"]
            tokens += turn
            mask += [m["role"] == "assistant" and i >= 2 for i in range(len(turn))]
        ids = torch.tensor([tokenizer.convert_tokens_to_ids(tokens)])
        gpt2.zero_grad()
        logits = gpt2(input_ids=ids).logits[0]
        loss = sum(F.cross_entropy(logits[t - 1], ids[0, t]) for t in range(1, len(tokens)) if mask[t])
        loss.backward()
        assert_rel_close(row[None], torch.cat([module_gradient(tm).reshape(-1) for tm in tracked.values()])[None])


def test_multi_process_build_fails_in_one_line_before_launching(tmp_path):
    """`build --nproc 2` checks data and directory in the parent: one line, exit 2, no torchrun."""
    import subprocess
    import sys

    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "manifest.json").write_text("{}")
    cases = [("--data", "missing.jsonl", "idx2", "does not exist"), ("--data", "train.jsonl", "idx", "already exists")]
    (tmp_path / "train.jsonl").write_text('{"text": "a b c"}\n')
    for flag, data, index, needle in cases:
        r = subprocess.run(
            [sys.executable, "-m", "headwater", "build", index, "--model", "some/model", flag, data, "--nproc", "2"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 2 and "Traceback" not in r.stderr and "torch.distributed" not in r.stderr, r.stderr
        errors = [line for line in r.stderr.splitlines() if line.startswith("headwater: error:")]
        assert len(errors) == 1 and needle in errors[0] and r.stderr.rstrip().endswith(errors[0]), r.stderr
    assert (tmp_path / "idx" / "manifest.json").read_text() == "{}"  # the existing index is untouched
