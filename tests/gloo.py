"""Two spawned gloo ranks for the tests that train on real process groups without Ray."""
from pathlib import Path
from uuid import uuid4

import torch.multiprocessing as mp


def spawn_two(fn, folder, *args) -> None:
    """``fn(rank, init_method, *args)`` on two spawned ranks that meet at a FileStore in ``folder``.

    Not a TCP store: a port picked free here could be taken (by one of the many processes Ray
    starts beside these tests) before rank 0 binds it, and rank 0 then aborts.
    """
    store = Path(folder) / f"store-{uuid4().hex}"
    mp.spawn(fn, args=(f"file://{store}", *args), nprocs=2, join=True)
