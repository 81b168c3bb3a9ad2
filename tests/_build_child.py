"""A deterministic tiny build, importable by tests and runnable as a child process.

    python tests/_build_child.py OUT [--resume] [--sleep SECONDS] [--dtype float32]
    torchrun --nproc_per_node 2 tests/_build_child.py OUT

Every process (test, child, each torchrun rank) builds the same model, tokenizer, corpus and
config from fixed seeds, so their indexes can be compared row for row. `--sleep` slows each
batch (inside the child's own task) so that a test can kill the build at a chosen point.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import dataclasses
import random
import sys
import time

import torch

torch.set_num_threads(1)

from headwater import BuildConfig, LanguageModelTask, ProjectionConfig, build_index  # noqa: E402
from headwater.toy import tiny_gpt2, word_tokenizer  # noqa: E402

VOCAB = (
    "the a of is in and to was by from with capital colour city river mountain zorblat quenti "
    "mirel vask orin tela sunny blue red green famous old new large small north south"
).split()
N_DOCS = 60
SHARD_ROWS = 4
BATCH_SIZE = 2


def corpus(n: int = N_DOCS, seed: int = 1234) -> list[dict]:
    """`n` distinct short documents of 3–12 words (distinct, so no two rows tie exactly)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    docs = []
    while len(docs) < n:
        text = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(3, 12)))
        if text not in seen:
            seen.add(text)
            docs.append({"text": text})
    return docs


QUERIES = [
    {"prompt": "the capital of zorblat is", "completion": " quenti"},
    {"text": "mirel is a large old city in the north"},
    {"prompt": "the famous river of vask", "completion": " is blue and green"},
]


def tokenizer():
    return word_tokenizer([" ".join(VOCAB)])


def model(vocab_size: int):
    torch.manual_seed(0)
    return tiny_gpt2(vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=2, n_positions=64).eval()


def config(dtype: str = "float32") -> BuildConfig:
    return BuildConfig(projection=ProjectionConfig(dim=64, seed=0), shard_rows=SHARD_ROWS, storage_dtype=dtype, batch_size=BATCH_SIZE)


def setup():
    """(model, task, records): identical in every process."""
    tok = tokenizer()
    return model(len(tok)), LanguageModelTask(tok), corpus()


@dataclasses.dataclass(frozen=True)
class SlowTask(LanguageModelTask):
    """The same task (same `describe()`), but each batch sleeps first."""

    sleep: float = 0.0

    def loss(self, model, batch, sample=None):
        time.sleep(self.sleep)
        return super().loss(model, batch, sample)


def build(path, resume: bool = False, overwrite: bool = False, dtype: str = "float32", sleep: float = 0.0):
    m, task, records = setup()
    if sleep:
        task = SlowTask(task.tokenizer, sleep=sleep)
    return build_index(path, m, records, task=task, config=config(dtype), resume=resume, overwrite=overwrite, progress=False)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    build(args.out, resume=args.resume, dtype=args.dtype, sleep=args.sleep)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
