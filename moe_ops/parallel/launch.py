"""Run a function on N local processes joined in a real process group (tests, benchmarks).

``run_local(fn, world)`` spawns ``world`` processes (``torch.multiprocessing``, spawn start
method), joins them in a ``torch.distributed`` group over TCP on 127.0.0.1 at a free port
(Gloo by default), calls ``fn(rank, world, *args)`` in each and returns the ``world`` return
values (saved with ``torch.save``, so tensors are fine). Bounded: collectives time out after
``timeout`` seconds inside the group, and the parent kills its children if they have not all
finished by then, so a bug can fail a test but never hang it. ``fn`` must be importable by name
(a module-level function).
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from typing import Any, Callable, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, backend: str, timeout: float, threads: int,
           outdir: str, args: Sequence[Any]) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable, world: int, args: Sequence[Any] = (), *, backend: str = "gloo",
              timeout: float = 120.0, threads: int = 1) -> List[Any]:
    """``[fn(0, world, *args), ..., fn(world-1, world, *args)]``, each run in its own process of
    one process group. Raises the first child's exception (with its traceback), or
    ``TimeoutError`` after ``timeout`` seconds (the children are killed)."""
    with tempfile.TemporaryDirectory(prefix="moe_ops_dist_") as outdir:
        ctx = mp.start_processes(_entry, args=(fn, world, free_port(), backend, timeout, threads, outdir,
                                               tuple(args)),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moe_ops.parallel.run_local: {world} processes still running after "
                                       f"{timeout:.0f} s")
        finally:
            for p in ctx.processes:  # only our own children, by handle
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
