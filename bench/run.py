"""The benchmark matrix: ``python -m bench`` (== ``python bench/run.py``).

Sweeps named model shapes (bench/shapes.py) x E x top-k x tokens for every op and the whole
layer, on every moe_ops backend available for the device (``moe_ops.available_backends``; the
``cuda_sim`` emulator and interpreter-run Triton are not performance paths and are left out)
plus baselines measured in the same run (bench/cases.py). Appends one row per measurement to
``<out-dir>/results.csv``, writes ``<out-dir>/latest.md`` and prints it. Plots: bench/plot.py.

An implementation that raises becomes an ``error`` row; the run goes on.
"""
from __future__ import annotations

import time

_T_START = time.perf_counter()  # the quick preset's time limit counts imports too

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

if __package__ in (None, ""):  # run as a script: python bench/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import moe_ops  # noqa: E402
from bench import profiling as bench_profiling  # noqa: E402
from bench import report  # noqa: E402
from bench.cases import BASELINES, OPS, Inputs, Point, op_cases  # noqa: E402
from bench import decode as bench_decode  # noqa: E402
from bench import kt_peer  # noqa: E402
from bench.shapes import EXTRA, MODELS  # noqa: E402
from bench.timing import measure  # noqa: E402

EXPERTS = (8, 16, 32, 64, 128, 256)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_TIMED = {"cuda_sim"}  # an emulator, not a performance path

# Per preset: models, experts, tokens (per device type), top-k ("native" or "sweep"), default
# H/I scale per device type, timing settings, and a wall-clock limit (s, since process start);
# optionally its own ops and baselines (default: all; --ops/--baselines override).
PRESETS: Dict[str, dict] = {
    "smoke": dict(models=["tiny"], experts=[8], tokens={"cpu": [16], "cuda": [16]}, topk="native",
                  scale={"cpu": 1, "cuda": 1}, warmup=2, reps=3, budget_s=0.05, time_limit=None,
                  reference_max_gflop={"cpu": 100.0, "cuda": 5000.0}),
    "quick": dict(models=list(MODELS), experts=[8, 64], tokens={"cpu": [64], "cuda": [64, 512]}, topk="native",
                  scale={"cpu": 8, "cuda": 1}, warmup=1, reps=10, budget_s=0.25, time_limit=270,
                  reference_max_gflop={"cpu": 8.0, "cuda": 2000.0}),
    # The CPU backend's matrix (issues: CPU backend, 15): four model families scaled to a 2-core CPU,
    # T x E as below, the cpu backend (as stored and packed) beside transformers, kt-kernel (when
    # installed) and dense bf16 at equal FLOPs; run it with --dtype bf16. Its own ops, backends, baselines.
    "cpu": dict(models=["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "gpt-oss-20b"], experts=[8, 64, 128],
                tokens={"cpu": [1, 4, 16, 64, 128, 512], "cuda": [1, 4, 16, 64, 128, 512]}, topk="native",
                scale={"cpu": 8, "cuda": 1}, warmup=1, reps=5, budget_s=0.3, time_limit=None,
                reference_max_gflop={"cpu": 2.0, "cuda": 2000.0}, ops=["moe_forward", "permute", "unpermute"],
                backends=["cpu"], baselines=["hf_eager", "hf_grouped_mm", "kt_kernel", "dense", "dense_fp32",
                                             "weight_read", "floor", "copy"]),
    # Cold-weight decode (bench/decode.py): the layer with routing that changes every call, beside
    # kt-kernel, in GB/s and % of the stream read bandwidth measured in the same run. T x E x model
    # as below (the weights must be far larger than the last-level cache); no per-op matrix.
    "cpu_decode": dict(models=["cpu-layer"], experts=[64], tokens={"cpu": [1, 2, 4, 8], "cuda": [1, 2, 4, 8]},
                       topk="native", scale={"cpu": 1, "cuda": 1}, warmup=1, reps=15, budget_s=0.0, time_limit=None,
                       reference_max_gflop={"cpu": 2.0, "cuda": 2000.0}, decode=True),
    "full": dict(models=list(MODELS), experts=list(EXPERTS), tokens={"cpu": [1, 8, 64, 512],
                 "cuda": [1, 8, 64, 512, 4096]}, topk="sweep", scale={"cpu": 8, "cuda": 1},
                 warmup=3, reps=30, budget_s=0.5, time_limit=None,
                 reference_max_gflop={"cpu": 100.0, "cuda": 5000.0}),
    # `make gpu-check` (scripts/gpu_check.py), ~2 min on one H100/H200: the layer and the grouped GEMM
    # against torch._grouped_mm (hf_grouped_mm is transformers' default path, built on it) and cuBLAS
    # at equal FLOPs, permute/unpermute against the device copy. Its own ops and baselines.
    "gpu": dict(models=["qwen3-30b-a3b"], experts=[8, 64, 256], tokens={"cpu": [64], "cuda": [64, 512, 4096]},
                topk="native", scale={"cpu": 16, "cuda": 1}, warmup=2, reps=20, budget_s=0.1, time_limit=150,
                reference_max_gflop={"cpu": 2.0, "cuda": 2000.0},
                ops=["moe_forward", "grouped_gemm", "permute", "unpermute"],
                baselines=["hf_eager", "hf_grouped_mm", "torch_grouped_mm", "dense", "weight_read", "floor", "copy"]),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _csv_list(s: Optional[str], conv=str):
    if s is None:
        return None
    return [conv(v) for v in s.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto",
                   help="auto: bf16 on CUDA and on CPUs with native bf16 matmul (oneDNN), else fp32")
    p.add_argument("--scale", type=float, default=None,
                   help="divide H and I by this (default: the preset's; 8 on CPU, 1 on CUDA)")
    p.add_argument("--models", help=f"comma list of {sorted(MODELS)} (or {sorted(EXTRA)}: never scaled)")
    p.add_argument("--hidden", type=int, help="use this H for every model (exact; replaces the scaled H)")
    p.add_argument("--intermediate", type=int, help="use this I for every model (exact; replaces the scaled I)")
    p.add_argument("--experts", help="comma list of E values (default: the preset's)")
    p.add_argument("--tokens", help="comma list of T values")
    p.add_argument("--topk", help="comma list of k values (default: the model's k; full: also 2 and 8)")
    p.add_argument("--ops", help=f"comma list of {list(OPS)}")
    p.add_argument("--backends", help="comma list of moe_ops backends to time (default: all available)")
    p.add_argument("--baselines", help=f"comma list of {[b for b in BASELINES if b != 'reference']}, or 'none' "
                   "(default: all; the reference backend is chosen with --backends)")
    p.add_argument("--include-interpreted", action="store_true",
                   help="also time triton on CPU under TRITON_INTERPRET=1 (not a performance path)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all usable cores)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--budget-s", type=float, help="max seconds of timed calls per measurement")
    p.add_argument("--time-limit", type=float, help="stop starting new points after this many seconds")
    p.add_argument("--max-gb", type=float, help="skip points needing more memory (default: a share of the device's)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against reference")
    p.add_argument("--reference-max-gflop", type=float,
                   help="do not time the reference GEMM ops (a full-M matmul per expert) above this much work "
                        "(default: the preset's); it still checks the others up to 10x that")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    bench_profiling.add_arguments(p)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------- environment

def _git(*args) -> str:
    try:
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def commit_hash() -> str:
    h = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        h += "-dirty"
    return h


def cpu_kernel_isa() -> str:
    """Which of the cpu backend's kernel sets runs here (csrc/cpu: AVX512-BF16 / AVX2 / portable)."""
    cpu = moe_ops.build_info().get("cpu", {})
    return "AVX512-BF16" if cpu.get("avx512_bf16") else "AVX2" if cpu.get("avx2") else "portable"


def device_name(device: str) -> str:
    """GPU name, or the CPU model with the moe_ops kernel set it runs (numbers from different
    kernel sets must not be compared as one device)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} [{cpu_kernel_isa()} kernels]"


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):
        return ""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device == "cuda":
        return torch.bfloat16
    try:  # CPUs without AVX512-BF16/AMX run bf16 matmul 10-100x slower than fp32
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except Exception:
        native = False
    return torch.bfloat16 if native else torch.float32


def default_max_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory * 0.6)
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
        return int(min(info.get("MemAvailable", 8 << 30) * 0.4, 16 << 30))
    except OSError:
        return 4 << 30


def backends_for(op: str, device: str, only: Optional[List[str]], include_interpreted: bool) -> List[str]:
    names = moe_ops.available_backends(None if op == "moe_forward" else op, device)
    out = []
    for b in names:
        if b in NOT_TIMED or (only is not None and b not in only):
            continue
        if b == "triton" and device == "cpu" and not include_interpreted:
            continue
        out.append(b)
    return out


# -------------------------------------------------------------------------------------- points

def build_points(cfg: dict, args, device: str, dtype: torch.dtype):
    names = _csv_list(args.models) or cfg["models"]
    experts = _csv_list(args.experts, int) or cfg["experts"]
    tokens = _csv_list(args.tokens, int) or cfg["tokens"][device]
    scale = args.scale if args.scale is not None else cfg["scale"][device]
    points, notes = [], []
    for name in names:
        if name in EXTRA:
            shape = EXTRA[name]
        elif name in MODELS:
            shape = MODELS[name].scaled(scale)
        else:
            raise SystemExit(f"unknown model {name!r}; known: {sorted(MODELS)} and {sorted(EXTRA)}")
        if args.hidden or args.intermediate:
            shape = dataclasses.replace(shape, hidden=args.hidden or shape.hidden,
                                        intermediate=args.intermediate or shape.intermediate)
        for E in experts:
            if args.topk:
                ks = _csv_list(args.topk, int)
            elif cfg["topk"] == "sweep":
                ks = sorted({shape.top_k, 2, 8})
            else:
                ks = [shape.top_k]
            for k in ks:
                if k > E or k > 32:
                    notes.append(f"{name} E={E} k={k}: k > E")
                    continue
                n_group, topk_group = shape.routing_for(E, k)
                if n_group == "invalid":
                    notes.append(f"{name} E={E} k={k}: k exceeds the experts in the kept groups")
                    continue
                for T in tokens:
                    points.append(Point(shape, E, k, T, dtype, device, n_group, topk_group))
    return points, notes


# ------------------------------------------------------------------------------------------ run

def _status(err: BaseException) -> str:
    msg = f"{type(err).__name__}: {err}".replace("\n", " ").replace(",", ";")
    return "error: " + msg[:300]


def run_point(pt: Point, ops: List[str], args, cfg, meta: dict, only_backends, baselines,
              deadline: Optional[float] = None) -> List[dict]:
    """Rows for every op x implementation at one point; cases not started by ``deadline``
    (a perf_counter value) become ``skip`` rows."""
    base = dict(meta, model=pt.shape.name, E=pt.E, k=pt.k, T=pt.T, H=pt.H, I=pt.I,
                dtype=str(pt.dtype).replace("torch.", ""))
    rows: List[dict] = []

    def row(op, impl, kind, status, **kw):
        r = dict(base, op=op, backend=impl, kind=kind, status=status, check=kw.pop("check", "") or "")
        r.update(kw)
        rows.append(r)
        return r

    try:
        inp = Inputs(pt, seed=args.seed)
    except Exception as err:
        for op in ops:
            row(op, "(setup)", "setup", _status(err))
        return rows
    ref_limit = args.reference_max_gflop
    if ref_limit is None:
        ref_limit = cfg["reference_max_gflop"][pt.device]
    timing = dict(warmup=args.warmup if args.warmup is not None else cfg["warmup"],
                  reps=args.reps if args.reps is not None else cfg["reps"],
                  budget_s=args.budget_s if args.budget_s is not None else cfg["budget_s"])
    # The layer first, then the GEMM: under a time limit the headline comparisons survive.
    for op in sorted(ops, key=lambda o: (o != "moe_forward", o != "grouped_gemm", OPS.index(o))):
        group: List[dict] = []
        try:
            ob = op_cases(op, inp, backends_for(op, pt.device, only_backends, args.include_interpreted),
                          baselines, check=not args.no_check, reference_max_gflop=ref_limit)
        except Exception as err:
            row(op, "(setup)", "setup", _status(err))
            continue
        for case in ob.cases:
            r = dict(base, op=op, backend=case.impl, kind=case.kind, C=ob.C, bytes=ob.bytes or "",
                     flops=ob.flops or "", note=case.note, check="")
            if case.skip or (deadline is not None and time.perf_counter() > deadline):
                r["status"] = "skip: " + (case.skip or "time limit")
                group.append(r)
                continue
            try:
                warm = case.check is not None
                if warm:  # the checked call doubles as the first warmup
                    r["check"] = case.check(case.fn())
                t = measure(case.fn, pt.device, warm=warm, **timing)
                if case.settle_s:
                    time.sleep(case.settle_s)
                r.update(status="ok", median_ms=t.median_ms, min_ms=t.min_ms, reps=t.reps)
                if ob.flops:
                    r["tflops"] = ob.flops / (t.median_ms * 1e-3) / 1e12
                if ob.bytes:
                    r["gbps"] = ob.bytes / (t.median_ms * 1e-3) / 1e9
            except Exception as err:
                r["status"] = _status(err)
                if pt.device == "cuda":
                    try:
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                    except Exception:  # a sticky CUDA error: later rows will say so too
                        pass
            group.append(r)
        if ob.derived_floor:
            fl = report.floor_ms({r["backend"]: r.get("median_ms") for r in group if r["status"] == "ok"})
            if fl is not None:
                group.append(dict(base, op=op, backend="floor", kind="derived", C=ob.C, status="ok", median_ms=fl,
                                  min_ms=fl, reps=0, check="", flops=ob.flops or "", bytes=ob.bytes or "",
                                  tflops=ob.flops / (fl * 1e-3) / 1e12 if ob.flops else None,
                                  note=report.FLOOR_DEFINITION))
        report.add_ratios(group)
        rows.extend(group)
    del inp
    if pt.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = PRESETS[args.preset]
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype = pick_dtype(args.dtype, device)
    threads = args.threads or usable_cores()
    old_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads)
    try:
        import transformers
        tf_version = transformers.__version__
    except Exception:
        tf_version = "missing"
    now = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}"
    meta = dict(run_id=run_id, timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                commit=commit_hash(), device=device, device_name=device_name(device), torch=torch.__version__,
                transformers=tf_version, moe_ops=moe_ops.__version__, threads=threads if device == "cpu" else "",
                preset=args.preset, load=_loadavg())
    ops = _csv_list(args.ops) or cfg.get("ops") or list(OPS)
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise SystemExit(f"unknown ops {bad}; known: {list(OPS)}")
    baselines = cfg.get("baselines")
    if args.baselines is not None:
        baselines = [] if args.baselines == "none" else _csv_list(args.baselines)
    only_backends = _csv_list(args.backends) or cfg.get("backends")
    max_bytes = int(args.max_gb * (1 << 30)) if args.max_gb else default_max_bytes(device)
    time_limit = args.time_limit if args.time_limit is not None else cfg["time_limit"]

    points, notes = build_points(cfg, args, device, dtype)
    os.makedirs(args.out_dir, exist_ok=True)
    csv_path = os.path.join(args.out_dir, "results.csv")
    report.prepare_csv(csv_path)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    log(f"[bench] {args.preset}: {len(points)} points x {len(ops)} ops on {meta['device_name']} ({device}, "
        f"{str(dtype).replace('torch.', '')}, threads={threads}); backends: "
        f"{ {op: backends_for(op, device, only_backends, args.include_interpreted) for op in ops} }")
    for b, why in moe_ops.load_errors().items():  # a backend missing from the rows says why here
        log(f"[bench] backend {b} not loaded: {why}")
    for n in notes:
        log(f"[bench] skipped {n}")
    if device == "cpu" and (baselines is None or "kt_kernel" in baselines) and not kt_peer.available():
        notes.append(f"baseline kt_kernel: {kt_peer.load()[1]}")  # an optional peer: a note, not an error row
        log(f"[bench] skipped {notes[-1]}")
    if cfg.get("decode"):
        return _main_decode(args, cfg, points, notes, meta, dtype, csv_path, old_threads, log)
    rows: List[dict] = []
    skipped = 0
    prof = bench_profiling.Profiler.from_args(args, cfg, device, meta, backends_for)
    with torch.inference_mode():
        for i, pt in enumerate(points):
            elapsed = time.perf_counter() - _T_START
            if time_limit is not None and elapsed > time_limit:
                skipped = len(points) - i
                log(f"[bench] time limit {time_limit:.0f}s reached: {skipped} points not run")
                break
            if pt.memory_estimate() > max_bytes:
                log(f"[bench] skip {pt.shape.name} E={pt.E} k={pt.k} T={pt.T}: needs "
                    f"~{pt.memory_estimate() / 2**30:.1f} GiB > --max-gb {max_bytes / 2**30:.1f}")
                skipped += 1
                continue
            t0 = time.perf_counter()
            deadline = None if time_limit is None else _T_START + time_limit
            prow = run_point(pt, ops, args, cfg, meta, only_backends, baselines, deadline)
            report.append_csv(csv_path, prow)
            rows.extend(prow)
            if prof is not None:  # after the timing: the traces never perturb it
                prof.point(pt, ops)
            log(f"[bench] {i + 1}/{len(points)} {pt.shape.name} E={pt.E} k={pt.k} T={pt.T} H={pt.H} I={pt.I}: "
                f"{len(prow)} rows in {time.perf_counter() - t0:.1f}s (total {time.perf_counter() - _T_START:.0f}s)")
    if device == "cpu":
        torch.set_num_threads(old_threads)
    md = report.markdown(rows, dict(meta, dtype=str(dtype).replace("torch.", ""), cores=usable_cores()))
    md += "".join(f"\nNote: {n}\n" for n in notes if n.startswith("baseline"))
    summary = report.hf_summary(rows)
    tail = f"\n{len(rows)} rows appended to {csv_path}"
    if skipped:
        tail += f"; {skipped} points not run (time/memory limit)"
    if prof is not None:
        tail += "\n" + prof.finish()
    text = md + ("\n" + summary if summary else "") + tail + "\n"
    with open(os.path.join(args.out_dir, "latest.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


def _main_decode(args, cfg, points, notes, meta, dtype, csv_path, old_threads, log) -> int:
    """The ``decode`` presets: bench/decode.py once per (model, E, k) with all its T values."""
    if meta["device"] != "cpu":
        raise SystemExit("the cold-weight decode rows are a CPU benchmark (--device cpu)")
    groups: Dict[tuple, List[int]] = {}
    for pt in points:
        groups.setdefault((pt.shape, pt.E, pt.k), []).append(pt.T)
    impls = bench_decode.optional_impls(args.backends)
    reps = args.reps if args.reps is not None else cfg["reps"]
    dt = str(dtype).replace("torch.", "")
    rows: List[dict] = []
    md = [f"# moe-ops cold-weight decode ({args.preset})", "",
          f"device: **{meta['device_name']}** (cpu, {meta['threads']} threads) · load avg {meta['load']} · "
          f"torch {meta['torch']} · commit {meta['commit']} · {meta['timestamp']} · dtype {dt} · LLC "
          f"{bench_decode.llc_bytes() >> 20} MiB · kt-kernel {kt_peer.variant()}", ""]
    with torch.inference_mode():
        for (shape, E, k), tokens in groups.items():
            t0 = time.perf_counter()
            raw = bench_decode.run(E, shape.hidden, shape.intermediate, k, tokens, dtype=dtype, impls=impls,
                                   reps=reps, seed=args.seed, log=log)
            md.append(bench_decode.table(raw, f"## {shape.name} E={E} k={k} H={shape.hidden} I={shape.intermediate}"))
            for T in tokens:
                group = [dict(meta, model=shape.name, op=bench_decode.OP, backend=r["impl"], kind=r["kind"], E=E, k=k,
                              T=T, H=shape.hidden, I=shape.intermediate, dtype=dt, status=r["status"],
                              median_ms=r.get("median_ms"), min_ms=r.get("min_ms"), reps=r.get("reps"),
                              gbps=r.get("gbps"), bytes=r.get("bytes", ""), check=r.get("check", ""),
                              note=r.get("note", "")) for r in raw if r["T"] == T]
                report.add_ratios(group)
                report.append_csv(csv_path, group)
                rows.extend(group)
            log(f"[bench] decode {shape.name} E={E} k={k} T={tokens}: {time.perf_counter() - t0:.1f}s")
    torch.set_num_threads(old_threads)
    md += [f"Note: {n}" for n in notes]
    text = "\n".join(md) + f"\n{len(rows)} rows appended to {csv_path}\n"
    with open(os.path.join(args.out_dir, "latest.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
