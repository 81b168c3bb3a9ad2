"""Fit curvature on this rank's share of the records (launched by torchrun in test_distributed)."""

import sys

import torch
import torch.distributed as dist

from headwater.config import CurvatureConfig
from headwater.curvature import fit_curvature
from headwater.task import ModuleTask


def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=g).double()  # float64: batches differ between the runs
    records = [{"x": x[i], "y": int(i % 3)} for i in range(30)]
    return model, ModuleTask(), records


CONFIG = CurvatureConfig(fisher="empirical", batch_size=4)

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, task, records = setup()
    share = records[rank * len(records) // world : (rank + 1) * len(records) // world]
    curv = fit_curvature(model, task, share, config=CONFIG, progress=False)
    if rank == 0:
        curv.save(sys.argv[1])
    dist.destroy_process_group()
