"""Expert-parallel exchange benchmark: volume (bytes) and time per dispatch mode.

Runs ``moe_ops.parallel.expert_parallel_forward`` on ``--world`` local processes joined by a
process group (Gloo on CPU by default; ``--backend nccl --device cuda`` under a GPU box, one GPU
per rank), for a few shapes and routings, and prints one row per (shape, routing, mode):

* ``MB sent/rank``: remote bytes one rank sends in a forward (dispatch + combine; the backward
  moves the same again), mean over ranks; from the layer's own accounting (``stats``);
* ``max MB recv``: the busiest expert host: bytes of the rows it receives in the dispatch and
  returns in the combine (load imbalance: with skewed routing dropless mode delivers every row
  to the hot rank, capacity mode drops instead and stays fixed);
* ``exchange ms``: the collectives alone (the same all-to-alls / all-gather + reduce-scatter
  with the sizes that forward used), median over ranks' medians;
* ``fwd ms`` / ``fwd+bwd ms``: the whole layer (router top-k, dispatch, grouped GEMMs, combine).

Standalone: ``python bench/parallel_exchange.py [--world 2] [--shapes 256x256 ...] [--json out]``.
Numbers are for docs/parallel.md, never asserted on.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_ops.parallel import expert_parallel_forward  # noqa: E402
from moe_ops.parallel.functional import _all_gather, _reduce_scatter  # noqa: E402
from moe_ops.parallel.launch import run_local  # noqa: E402

MODES = {
    "dropless": dict(),
    "capacity cf=1.25": dict(capacity_factor=1.25),
    "allgather": dict(dispatch="allgather"),
}
ROUTINGS = ("uniform", "skewed")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, reps, group=None):
    """Median wall time (ms) of ``fn`` over ``reps`` runs, ranks started together by a barrier."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        dist.barrier(group)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _exchange_only(mode_kwargs, stats, x, E, k, device):
    """The collectives of one forward, replayed with the sizes the forward used."""
    world, H = dist.get_world_size(), x.shape[1]
    if mode_kwargs.get("dispatch") == "allgather":
        T = x.shape[0]
        gx = x.new_empty(world * T, H)
        part = x.new_empty(world * T, H)
        meta = torch.empty(world * T, 2 * k, dtype=torch.float32, device=device)

        def run():
            _all_gather(gx, x)
            _all_gather(meta, torch.empty(T, 2 * k, device=device))
            _reduce_scatter(x.new_empty(T, H), part)
        return run
    if "capacity" in stats:
        rows = (stats["rows_sent"] // (world - 1)) * world  # E*C rows, equal splits
        buf = x.new_empty(rows, H)

        def run():
            for _ in range(2):
                dist.all_to_all_single(torch.empty_like(buf), buf)
        return run
    send, recv = stats["send_splits"], stats["recv_splits"]
    a, b = x.new_empty(sum(send), H), x.new_empty(sum(recv), H)

    def run():
        c = torch.zeros(E, dtype=torch.int64, device=device)
        dist.all_to_all_single(torch.empty_like(c), c)   # the count exchange
        c.tolist()
        dist.all_to_all_single(b, a, recv, send)
        dist.all_to_all_single(a, b, send, recv)
    return run


def _worker(rank, world, cfg):
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device("cpu")
    if cfg["device"] == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dtype = getattr(torch, cfg["dtype"])
    rows = []
    for shape in cfg["shapes"]:
        T, H = (int(v) for v in shape.split("x"))
        E, k, I = cfg["experts"], cfg["top_k"], cfg["intermediate"] or max(1, H // 2)
        E_l = E // world
        for routing in ROUTINGS:
            g = torch.Generator().manual_seed(1000 * rank + T)
            x = torch.randn(T, H, generator=g).to(device, dtype)
            logits = torch.randn(T, E, generator=g)
            if routing == "skewed":  # 3/4 of every rank's tokens pick expert 0 (rank 0's) first
                logits[: 3 * T // 4, 0] += 10.0
            logits = logits.to(device)
            wg = torch.Generator().manual_seed(7 + rank)
            w_gate_up = (torch.randn(E_l, 2 * I, H, generator=wg) / H ** 0.5).to(device, dtype)
            w_down = (torch.randn(E_l, H, I, generator=wg) / I ** 0.5).to(device, dtype)
            for mode, kw in MODES.items():
                stats = {}
                expert_parallel_forward(x, logits, w_gate_up, w_down, k, stats=stats, **kw)
                fwd = train = float("nan")
                if cfg["layer"]:
                    fwd = _time(lambda: expert_parallel_forward(x, logits, w_gate_up, w_down, k, **kw),
                                device, cfg["reps"])
                    xg = x.clone().requires_grad_()
                    a, b = w_gate_up.clone().requires_grad_(), w_down.clone().requires_grad_()

                    def fwd_bwd():
                        expert_parallel_forward(xg, logits, a, b, k, **kw).sum().backward()
                    train = _time(fwd_bwd, device, cfg["reps"])
                exch = _time(_exchange_only(kw, stats, x, E, k, device), device, cfg["reps"])
                rows.append(dict(shape=shape, E=E, k=k, routing=routing, mode=mode, bytes_sent=stats["bytes_sent"],
                                 bytes_recv=stats["bytes_recv"],
                                 rows_sent=stats["rows_sent"], exchange_ms=exch, fwd_ms=fwd, fwd_bwd_ms=train))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--backend", default="gloo", help="torch.distributed backend (gloo, nccl)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--shapes", nargs="+", default=["256x256", "2048x256", "512x1024"],
                   help="TOKENSxHIDDEN per rank")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=0, help="expert width I (default H/2)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--exchange-only", action="store_true", help="skip the whole-layer fwd / fwd+bwd timings")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    cfg = dict(device=args.device, dtype=args.dtype, shapes=args.shapes, experts=args.experts, top_k=args.top_k,
               intermediate=args.intermediate, reps=args.reps, layer=not args.exchange_only)
    per_rank = run_local(_worker, args.world, (cfg,), backend=args.backend, timeout=580)
    rows = []
    for i, row in enumerate(per_rank[0]):
        mine = [r[i] for r in per_rank]
        rows.append(dict(row, bytes_sent=statistics.mean(r["bytes_sent"] for r in mine),
                         max_bytes_recv=max(r["bytes_recv"] for r in mine),
                         exchange_ms=statistics.median(r["exchange_ms"] for r in mine),
                         fwd_ms=statistics.median(r["fwd_ms"] for r in mine),
                         fwd_bwd_ms=statistics.median(r["fwd_bwd_ms"] for r in mine)))
    from moe_ops.backend import resolved_name
    gemm = resolved_name("grouped_gemm", args.device, None, strict=False)
    print(f"world={args.world} dist={args.backend} device={args.device} dtype={args.dtype} "
          f"E={args.experts} k={args.top_k} I={args.intermediate or 'H/2'} grouped_gemm backend={gemm}")
    layer = not args.exchange_only
    head = "| T/rank x H | routing | mode | MB sent/rank | max MB recv | exchange ms |"
    print(head + (" fwd ms | fwd+bwd ms |" if layer else ""))
    print("|---|---|---|---:|---:|---:|" + ("---:|---:|" if layer else ""))
    for r in rows:
        line = (f"| {r['shape']} | {r['routing']} | {r['mode']} | {r['bytes_sent'] / 1e6:.3f} | "
                f"{r['max_bytes_recv'] / 1e6:.3f} | {r['exchange_ms']:.2f} |")
        print(line + (f" {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} |" if layer else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
