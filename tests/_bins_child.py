"""A corpus map computed by every rank of a torchrun group over one index (gloo on CPU): each
rank scores its share of the store's blocks and the sums are all-reduced.

    torchrun --nproc_per_node 2 tests/_bins_child.py INDEX OUT.parquet
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)

import _build_child as child  # noqa: E402

from headwater import Index, TrackStar  # noqa: E402
from headwater.corpus import BinsConfig, corpus_map, load_labels  # noqa: E402

BENCHMARKS = {"capital": child.QUERIES[:1], "places": child.QUERIES[1:]}
CONFIG = BinsConfig(by=["topic", "format"], bootstrap=30, min_bin_size=2, enrichment_k=10)


def bins_table(index_path, block_rows: int | None = None):
    model, task, _ = child.setup()
    index = Index(index_path, block_rows=block_rows)
    return corpus_map(TrackStar(model, task).fit(index), BENCHMARKS, load_labels(index), CONFIG)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    cmap = bins_table(sys.argv[1], block_rows=5)  # many small blocks, so both ranks get several
    if dist.get_rank() == 0:
        cmap.table.to_parquet(sys.argv[2])
    dist.destroy_process_group()
