"""Result rows -> the appended CSV and the markdown tables (``latest.md`` and stdout).

One row per (point, op, implementation). ``speedup_vs_<baseline>`` = the baseline's median
time / this row's median time at the same point and op (> 1: this row is faster).
"""
from __future__ import annotations

import csv
import os
import time
from collections import OrderedDict
from typing import Dict, Iterable, List

from .cases import BASELINES, OPS

FIELDS = [
    "run_id", "timestamp", "commit", "device", "device_name", "torch", "transformers", "moe_ops", "threads", "load",
    "preset", "model", "op", "backend", "kind", "E", "k", "T", "H", "I", "C", "dtype", "status", "median_ms",
    "min_ms", "reps", "gbps", "tflops", "bytes", "flops", "check", "note",
] + [f"speedup_vs_{b}" for b in BASELINES]

GROUP_KEY = ("model", "op", "E", "k", "T", "H", "I", "dtype")

# The roofline floor of a layer / grouped GEMM point, derived (never timed) from baselines timed in
# the same run: the faster of the two dense GEMMs with the same FLOPs (bf16/fp16 ``dense`` and, on
# CPU, ``dense_fp32``: without native low-precision GEMM the float32 sgemm is the real compute
# ceiling, with it the bf16 one is), or the time to read the weights once, whichever is larger.
# The harness (bench/run.py), bench/cpu_layer.py, the report and tests/test_bench_smoke.py all use
# :func:`floor_ms`, so which dense GEMM wins on a given CPU never changes the definition.
FLOOR_DEFINITION = "max(min(dense, dense_fp32), weight_read)"


def floor_ms(times: Dict[str, float]):
    """:data:`FLOOR_DEFINITION` from ``{baseline: median ms}`` (missing or ``None`` entries are
    absent); ``None`` when no dense GEMM or no weight read was timed."""
    dense = [times[n] for n in ("dense", "dense_fp32") if times.get(n) is not None]
    if not dense or times.get("weight_read") is None:
        return None
    return max(min(dense), times["weight_read"])


def add_ratios(rows: List[dict]) -> None:
    """Fill ``speedup_vs_*`` within each (point, op) group, for every row with a time."""
    by = {r["backend"]: r["median_ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        for b in BASELINES:
            t = by.get(b)
            if t is not None and r["median_ms"] > 0:
                r[f"speedup_vs_{b}"] = round(t / r["median_ms"], 4)


def prepare_csv(path: str) -> None:
    """Make sure ``path`` has our header; an older file with other columns is moved aside."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header == FIELDS:
            return
        os.replace(path, path[:-4] + f".old-{time.strftime('%Y%m%d%H%M%S')}.csv")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.DictWriter(f, FIELDS).writeheader()


def append_csv(path: str, rows: Iterable[dict]) -> None:
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        for r in rows:
            w.writerow({k: _fmt_csv(r.get(k)) for k in FIELDS})


def _fmt_csv(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# ----------------------------------------------------------------------------------- markdown

def _ms(v) -> str:
    if v is None or v == "":
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _x(v) -> str:
    return "-" if v in (None, "") else f"{v:.2f}x"


def _rate(r) -> str:
    if r.get("tflops"):
        return f"{r['tflops'] * 1e3:.3g} GFLOP/s" if r["tflops"] < 1 else f"{r['tflops']:.3g} TFLOP/s"
    if r.get("gbps"):
        return f"{r['gbps']:.3g} GB/s"
    return "-"


# The baseline each op's summary judges the best backend against (first present wins).
HEADLINE = {
    "topk_gating": ("hf_router", "reference"),
    "permute": ("copy", "hf_sort_gather", "reference"),
    "unpermute": ("copy", "hf_combine", "reference"),
    "capacity_dispatch": ("copy", "reference"),
    "capacity_combine": ("copy", "reference"),
    "grouped_gemm": ("floor", "torch_grouped_mm", "hf_mm_loop", "reference"),
    "moe_forward": ("hf_eager", "hf_grouped_mm", "floor", "reference"),
}


def _load_warning(meta) -> List[str]:
    """A line (and a blank) when the CPU was busier than its cores: timings are then noisy."""
    try:
        load, cores = float(meta.get("load") or 0), int(meta.get("cores") or 0)
    except ValueError:
        return []
    if meta.get("device") == "cpu" and cores and load > cores:
        return [f"**Noisy:** load average {load:.1f} on {cores} usable cores when the run started "
                "(other processes compete; OpenMP threads stall when descheduled).", ""]
    return []


def markdown(rows: List[dict], meta: Dict[str, str]) -> str:
    """One pivot table per op: median ms of every implementation at each point, then the best
    moe_ops backend (excluding ``reference``) with its throughput and speedups."""
    out = [f"# moe-ops benchmark matrix ({meta['preset']})", "",
           f"device: **{meta['device_name']}** ({meta['device']}, {meta['threads']} threads) · "
           f"load avg {meta['load']} · torch {meta['torch']} · transformers {meta['transformers']} · commit {meta['commit']} · "
           f"{meta['timestamp']} · dtype {meta['dtype']}", "",
           *_load_warning(meta),
           "Cells: median ms. `best` = fastest moe_ops backend other than `reference`; "
           "`x<baseline>` = that baseline's time / best's time (> 1 = moe_ops faster).", ""]
    for op in OPS:
        op_rows = [r for r in rows if r["op"] == op]
        if not op_rows:
            continue
        impls = list(OrderedDict.fromkeys(
            [r["backend"] for r in op_rows if r["kind"] == "backend"]
            + [r["backend"] for r in op_rows if r["kind"] != "backend"]))
        groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
        for r in op_rows:
            groups.setdefault(tuple(r[k] for k in GROUP_KEY), []).append(r)
        heads = [h for h in HEADLINE[op] if h in impls]
        cols = ["model", "E", "k", "T", "HxI"] + impls + ["best", "rate"] + [f"x{h}" for h in heads]
        out += [f"## {op}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for key, rs in groups.items():
            g = dict(zip(GROUP_KEY, key))
            by = {r["backend"]: r for r in rs}
            cells = [g["model"], str(g["E"]), str(g["k"]), str(g["T"]), f"{g['H']}x{g['I']}"]
            for i in impls:
                r = by.get(i)
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append("err" if r["status"].startswith("error") else "skip")
                else:
                    bad = r.get("check", "").startswith("mismatch")
                    cells.append(_ms(r["median_ms"]) + (" (!)" if bad else ""))
            cand = [r for r in rs if r["kind"] == "backend" and r["backend"] != "reference" and r["status"] == "ok"]
            best = min(cand, key=lambda r: r["median_ms"]) if cand else None
            if best is None:
                ref = by.get("reference")
                best = ref if ref is not None and ref["status"] == "ok" else None
            cells += [best["backend"] if best else "-", _rate(best) if best else "-"]
            cells += [_x(best.get(f"speedup_vs_{h}")) if best else "-" for h in heads]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    errs = [r for r in rows if r["status"].startswith("error")]
    mism = [r for r in rows if str(r.get("check", "")).startswith("mismatch")]
    if errs or mism:
        out += ["## errors and mismatches", ""]
        for r in errs + mism:
            out.append(f"- {r['op']} {r['backend']} {r['model']} E={r['E']} k={r['k']} T={r['T']}: "
                       f"{r['status'] if r in errs else r['check']}")
        out.append("")
    return "\n".join(out)


def hf_summary(rows: List[dict]) -> str:
    """The layer against transformers' experts loop: the table the quick preset ends with."""
    layer = [r for r in rows if r["op"] == "moe_forward"]
    if not layer:
        return ""
    backends = list(OrderedDict.fromkeys(r["backend"] for r in layer if r["kind"] == "backend"))
    base = [b for b in ("hf_eager", "hf_grouped_mm", "floor") if any(r["backend"] == b for r in layer)]
    cols = ["model", "E", "k", "T"] + [f"{b} ms" for b in base] + [f"{b} ms" for b in backends] + \
        [f"{b} vs hf_eager" for b in backends]
    out = ["## moe_forward vs transformers' eager experts loop", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for r in layer:
        groups.setdefault(tuple(r[k] for k in GROUP_KEY), {})[r["backend"]] = r
    for key, by in groups.items():
        g = dict(zip(GROUP_KEY, key))
        cells = [g["model"], str(g["E"]), str(g["k"]), str(g["T"])]
        for b in base + backends:
            r = by.get(b)
            cells.append(_ms(r["median_ms"]) if r and r["status"] == "ok" else "-")
        for b in backends:
            r = by.get(b)
            cells.append(_x(r.get("speedup_vs_hf_eager")) if r and r["status"] == "ok" else "-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
