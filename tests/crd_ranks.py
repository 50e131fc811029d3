"""Two real gloo ranks updating crd's memory banks, for tests/test_methods_crd.py (kept apart so that
the spawned processes import torch and kd_ray.methods only, not Ray)."""
import datetime
import os

import torch
import torch.distributed as dist

from kd_ray.methods.crd import gather_rows, update_bank


def rank_data(rank):
    """Rank 0 holds 3 images (positions 0, 2, 5), rank 1 two (1, 5): 5 also on rank 1, as DDP's
    padding repeats an image; the sizes differ, as a last batch may."""
    g = torch.Generator().manual_seed(10 + rank)
    index = torch.tensor([[0, 2, 5], [1, 5]][rank])
    return index, torch.randn(len(index), 4, generator=g)


def initial_bank():
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(0))


def run_rank(rank, init_method, out):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    bank = initial_bank()
    index, rows = rank_data(rank)
    all_index, all_rows = gather_rows(index, rows)
    update_bank(bank, all_index, all_rows, 0.5)
    torch.save({"bank": bank, "index": all_index}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()
