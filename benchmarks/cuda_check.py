#!/usr/bin/env python
"""Does headwater compute the same rows on a GPU as on the CPU? Run on a CUDA machine:

    python benchmarks/cuda_check.py [--device cuda]

Builds a small GPT-2 (no download) and a word corpus, and compares on `--device` against the CPU
(float64 there, the reference): GradientCollector's document rows and token rows, and the scores
of `build_index` + TrackStar. Prints ‖got − ref‖ / ‖ref‖ per case; float32 arithmetic lands near
1e-6 (TF32 off, torch's default), bfloat16 near 1e-2. Exits 1 if a case exceeds its bound.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import datasets
import numpy as np
import torch

from headwater import TrackStar, build_index
from headwater.collect import GradientCollector
from headwater.config import BuildConfig, ProjectionConfig
from headwater.task import LanguageModelTask
from headwater.toy import tiny_gpt2, word_tokenizer

BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def rel(got: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    got, ref = torch.as_tensor(got).double().cpu(), torch.as_tensor(ref).double().cpu()
    return float((got - ref).norm() / ref.norm())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    datasets.disable_progress_bars()
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(words, 40)) for _ in range(24)]
    tok = word_tokenizer(texts)
    task = LanguageModelTask(tok, max_length=64)
    batch = task.collate([ex for t in texts[:6] for ex in task.encode({"text": t})])
    torch.manual_seed(0)
    ref_model = tiny_gpt2(len(tok), 2, 64, 4).double().eval()
    proj = ProjectionConfig("factored", 256, 0)
    ref_rows = GradientCollector(ref_model, task, proj)(batch)
    ref_tokens = GradientCollector(ref_model, task, proj).token_rows(task.collate(task.encode({"text": texts[0]})))
    failed = False
    print(f"{'case':50}{'rel. error':>12}{'bound':>10}")
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_gpt2(len(tok), 2, 64, 4).eval()
        model.load_state_dict(ref_model.state_dict())
        model = model.to(args.device, dtype)
        cases = {
            "document rows": (GradientCollector(model, task, proj)(batch), ref_rows),
            "token rows": (GradientCollector(model, task, proj).token_rows(task.collate(task.encode({"text": texts[0]}))), ref_tokens),
        }
        with tempfile.TemporaryDirectory() as tmp:
            records = datasets.Dataset.from_dict({"text": texts})
            scores = {}
            for name, m, device in (("got", model, args.device), ("ref", ref_model, "cpu")):
                cfg = BuildConfig(projection=proj, storage_dtype="float32", device=device)
                index = build_index(Path(tmp) / name, m, records, task, cfg, progress=False)
                scores[name] = TrackStar(m, task).fit(index).score([{"text": t} for t in texts[:4]]).values
            cases["build_index + TrackStar scores"] = (scores["got"], scores["ref"])
        for name, (got, ref) in cases.items():
            err = rel(got, ref)
            bad = not err <= BOUNDS[dtype]  # NaN fails too
            failed |= bad
            print(f"{f'{name}, {str(dtype)[6:]} on {args.device}':50}{err:12.2e}{BOUNDS[dtype]:10.0e}{'  FAIL' if bad else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
