"""``python -m bench --profile DIR``: a ``torch.profiler`` trace of the moe_ops cases the matrix
times, and a table of where their time goes.

After a point is timed, each of its moe_ops implementations (the ``backend`` rows, not the
baselines) runs once more to warm up, then ``REPS`` times under ``torch.profiler`` (CPU
activity, plus CUDA on a GPU). Per case this writes ``DIR/<op>__<model>__E<E>_k<k>_T<T>__<backend>.json``
(a Chrome trace: chrome://tracing or https://ui.perfetto.dev), until ``--profile-max`` traces
exist, and ``DIR/top_kernels.md`` gets the case's moe_ops ranges (the op, moe_forward's
stages) and its top ``--profile-top`` entries by self device time on a GPU (the kernels), by
self CPU time on a CPU. Profiling runs after the timing, so the timed numbers are unaffected.
"""
from __future__ import annotations

import os
import re
from typing import Callable, List, Optional

import torch

REPS = 3


def add_arguments(p) -> None:
    p.add_argument("--profile", metavar="DIR",
                   help="also write a torch.profiler Chrome trace per moe_ops case and DIR/top_kernels.md")
    p.add_argument("--profile-max", type=int, default=4, metavar="N",
                   help="profile at most N cases, in the matrix's order (default 4)")
    p.add_argument("--profile-top", type=int, default=15, metavar="N",
                   help="rows of each case's top-kernels table (default 15)")


def trace_name(op: str, pt, backend: str) -> str:
    name = f"{op}__{pt.shape.name}__E{pt.E}_k{pt.k}_T{pt.T}__{backend}.json"
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", name)


class Profiler:
    """Collects traces and table sections over the run; :meth:`finish` writes the table."""

    def __init__(self, out_dir: str, device: str, backends: Callable[[str], List[str]], reference_max_gflop: float,
                 max_traces: int = 4, top: int = 15, header: str = "", seed: int = 0):
        self.out_dir, self.device, self.backends = out_dir, device, backends
        self.reference_max_gflop, self.max_traces, self.top, self.seed = reference_max_gflop, max_traces, top, seed
        self.sections: List[str] = [header]
        self.traces: List[str] = []
        os.makedirs(out_dir, exist_ok=True)

    @classmethod
    def from_args(cls, args, cfg: dict, device: str, meta: dict, backends_for) -> Optional["Profiler"]:
        """None without ``--profile``; ``backends_for`` is bench.run's (op, device, only, interpreted)."""
        if not args.profile:
            return None
        only = [b for b in args.backends.split(",") if b.strip()] if args.backends else None
        ref = args.reference_max_gflop if args.reference_max_gflop is not None else cfg["reference_max_gflop"][device]
        header = (f"# moe_ops profile: top kernels\n\n{meta['device_name']} ({device}), torch {meta['torch']}, "
                  f"commit {meta['commit']}, {meta['timestamp']}. {REPS} calls per case after one warmup; "
                  f"times are totals over the {REPS} calls. Ranges `moe_ops.*` are moe_ops' own "
                  "(docs/profiling.md); `moe_ops::*` are its ops as the dispatcher records them.\n")
        return cls(args.profile, device, lambda op: backends_for(op, device, only, args.include_interpreted), ref,
                   max(args.profile_max, 0), args.profile_top, header, args.seed)

    def full(self) -> bool:
        return len(self.traces) >= self.max_traces

    def point(self, pt, ops: List[str]) -> None:
        """Profile the moe_ops cases of ``ops`` at ``pt`` while fewer than ``max_traces`` exist."""
        from .cases import OPS, Inputs, op_cases
        if self.full():
            return
        inp = Inputs(pt, seed=self.seed)
        # the matrix's order (the layer, the GEMM, the rest), the reference (the oracle, not a
        # performance path) after every kernel backend
        todo = []
        for op in sorted(ops, key=lambda o: (o != "moe_forward", o != "grouped_gemm", OPS.index(o))):
            ob = op_cases(op, inp, self.backends(op), baselines=[], check=False,
                          reference_max_gflop=self.reference_max_gflop)
            todo += [(op, c) for c in ob.cases if c.kind == "backend" and not c.skip]
        for op, case in sorted(todo, key=lambda oc: oc[1].impl == "reference"):
            if self.full():
                return
            try:
                self._profile(op, pt, case)
            except Exception as err:  # a failing kernel is the timing rows' business
                self.sections.append(f"\n## {op} · {case.impl}: not profiled ({type(err).__name__}: {err})\n")

    def _profile(self, op: str, pt, case) -> None:
        cuda = self.device == "cuda"
        case.fn()  # lazy init, autotuning, allocator: not in the trace
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            torch.cuda.synchronize()
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(REPS):
                case.fn()
            if cuda:
                torch.cuda.synchronize()
        name = trace_name(op, pt, case.impl)
        prof.export_chrome_trace(os.path.join(self.out_dir, name))
        self.traces.append(name)
        title = (f"\n## {op} · {pt.shape.name} E={pt.E} k={pt.k} T={pt.T} H={pt.H} I={pt.I} "
                 f"{str(pt.dtype).replace('torch.', '')} · {case.impl}\n\ntrace: `{name}`\n")
        self.sections.append(title + _tables(prof.key_averages(), cuda, self.top))

    def finish(self) -> str:
        """Write ``top_kernels.md``; returns a line saying what was written."""
        path = os.path.join(self.out_dir, "top_kernels.md")
        if not self.traces:
            self.sections.append("\nNo case was profiled (no moe_ops backend ran, or --profile-max 0).\n")
        with open(path, "w") as f:
            f.write("".join(self.sections))
        return f"profile: {len(self.traces)} traces and {path}"


def _ms(us: float) -> str:
    return f"{us / 1e3:.3f}"


def _cell(name: str, width: int = 90) -> str:
    name = name.replace("|", "\\|").replace("\n", " ")
    return f"`{name if len(name) <= width else name[:width - 3] + '...'}`"


def _tables(averages, cuda: bool, top: int) -> str:
    """The moe_ops ranges (op, stages) and the top ``top`` entries by self device / CPU time."""
    out = ["\n| moe_ops range | calls | CPU total ms |" + (" device total ms |" if cuda else ""),
           "\n| --- | ---: | ---: |" + (" ---: |" if cuda else "")]
    ranges = sorted((a for a in averages if a.key.startswith("moe_ops.")), key=lambda a: -a.cpu_time_total)
    for a in ranges:
        out.append(f"\n| {_cell(a.key)} | {a.count} | {_ms(a.cpu_time_total)} |"
                   + (f" {_ms(a.device_time_total)} |" if cuda else ""))
    # the same table on either device: self device time of kernels on GPU, self CPU time on CPU
    attr, what, label = (("self_device_time_total", "kernel / op", "self device") if cuda
                         else ("self_cpu_time_total", "op / range", "self CPU"))
    rows = sorted((a for a in averages if not cuda or getattr(a, attr) > 0), key=lambda a: -getattr(a, attr))
    total = sum(getattr(a, attr) for a in rows) or 1.0
    out.append(f"\n\nTop {top} by {label} time:\n\n| {what} | calls | {label} ms | share |"
               "\n| --- | ---: | ---: | ---: |")
    for a in rows[:top]:
        out.append(f"\n| {_cell(a.key)} | {a.count} | {_ms(getattr(a, attr))} | {100 * getattr(a, attr) / total:.1f}% |")
    return "".join(out) + "\n"
