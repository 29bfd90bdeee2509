"""PNG plots from the benchmark CSV: median time vs number of experts E, one line per backend
or baseline, one figure per (op, model, k, T, dtype, device); with ``--vs-floor``, time / floor
vs tokens T instead, one line per implementation, one figure per (op, model, E, k, dtype, device)
(the ops with a derived ``floor`` row: moe_forward, grouped_gemm, the cold-weight decode rows).

    python bench/plot.py                       # the latest run in bench/results/results.csv
    python bench/plot.py --run all --ops moe_forward --models mixtral-8x7b
    python bench/plot.py --vs-floor --ops moe_forward,moe_decode_cold   # after --preset cpu / cpu_decode

Reads only the CSV that ``python -m bench`` appends to (bench/report.py's columns), so it can
run on another machine than the benchmark. Uses matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys
from collections import OrderedDict, defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Fixed colours/styles so an implementation looks the same in every figure.
STYLE = {
    "cuda": ("tab:green", "-", "o"), "triton": ("tab:purple", "-", "s"), "cpu": ("tab:blue", "-", "o"),
    "reference": ("black", "--", "x"), "hf_eager": ("tab:red", "-.", "v"), "hf_grouped_mm": ("tab:orange", "-.", "^"),
    "torch_grouped_mm": ("tab:orange", ":", "^"), "hf_mm_loop": ("tab:red", ":", "v"),
    "hf_router": ("tab:red", ":", "v"), "hf_sort_gather": ("tab:red", ":", "v"), "hf_combine": ("tab:red", ":", "v"),
    "dense": ("tab:gray", ":", "."), "copy": ("tab:gray", ":", "."), "weight_read": ("tab:brown", ":", "."),
    "floor": ("tab:gray", "-", ""), "cpu_packed": ("tab:cyan", "-", "D"), "kt_kernel": ("tab:pink", "-.", "P"),
    "dense_fp32": ("tab:olive", ":", "."), "stream_read": ("tab:brown", "--", "."),
}
NOT_AN_IMPL = {"floor", "copy", "stream_read"}  # left out of the time / floor figures


def load(path: str, run: str):
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status") == "ok" and r.get("median_ms")]
    if not rows:
        return []
    if run == "latest":
        run = max(r["run_id"] for r in rows)
    if run != "all":
        rows = [r for r in rows if r["run_id"] == run]
    return rows


def _file_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) + ".png"


def _draw(lines, xticks, xlabel, ylabel, title, path, hline=None) -> str:
    """One log-log figure: a line per implementation ({impl: {x: y}}), saved to path."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl, pts in lines.items():
        xs = sorted(pts)
        color, ls, marker = STYLE.get(impl, (None, "-", "o"))
        ax.plot(xs, [pts[x] for x in xs], linestyle=ls, marker=marker, color=color, label=impl)
    if hline is not None:
        ax.axhline(hline, color="tab:gray", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xticks)
    ax.set_xticklabels([str(x) for x in xticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _groups(rows, per, out_dir, ops=None, models=None):
    """The rows by (op, model, *per, dtype, device, H, I), one figure each, in sorted order."""
    groups = defaultdict(list)
    for r in rows:
        if (ops and r["op"] not in ops) or (models and r["model"] not in models):
            continue
        groups[(r["op"], r["model"], *(r[c] for c in per), r["dtype"], r["device_name"], r["H"], r["I"])].append(r)
    os.makedirs(out_dir, exist_ok=True)
    return sorted(groups.items())


def plot(rows, out_dir: str, ops=None, models=None) -> list:
    written = []
    for (op, model, k, T, dtype, dev, H, I), rs in _groups(rows, ("k", "T"), out_dir, ops, models):
        lines = OrderedDict()
        for r in sorted(rs, key=lambda r: (r["kind"] != "backend", r["backend"])):
            lines.setdefault(r["backend"], {})
            # several runs at one E (--run all): keep the fastest median
            e = int(r["E"])
            t = float(r["median_ms"])
            lines[r["backend"]][e] = min(t, lines[r["backend"]].get(e, t))
        es = sorted({e for pts in lines.values() for e in pts})
        written.append(_draw(lines, es, "experts E", "median time (ms, log)",
                             f"{op} · {model} (H={H}, I={I}) · k={k} T={T} · {dtype}\n{dev}",
                             os.path.join(out_dir, _file_name(f"{op}__{model}__k{k}_T{T}_{dtype}_{dev}"))))
    return written


def plot_vs_floor(rows, out_dir: str, ops=None, models=None) -> list:
    """time / floor vs T, one line per implementation, per (op, model, E, k, dtype, device, H, I)."""
    written = []
    for (op, model, E, k, dtype, dev, H, I), rs in _groups(rows, ("E", "k"), out_dir, ops, models):
        floor = {}
        for r in rs:
            if r["backend"] == "floor":
                t = int(r["T"])
                floor[t] = min(float(r["median_ms"]), floor.get(t, float("inf")))
        if not floor:
            continue
        lines = OrderedDict()
        for r in sorted(rs, key=lambda r: (r["kind"] != "backend", r["backend"])):
            t = int(r["T"])
            if r["backend"] in NOT_AN_IMPL or t not in floor:
                continue
            pts = lines.setdefault(r["backend"], {})
            v = float(r["median_ms"]) / floor[t]
            pts[t] = min(v, pts.get(t, v))  # several runs (--run all): the fastest
        written.append(_draw(lines, sorted(floor), "tokens T", "median time / floor (log; 1 = floor)",
                             f"{op} · {model} (H={H}, I={I}) · E={E} k={k} · {dtype}\n{dev}",
                             os.path.join(out_dir, _file_name(f"{op}__{model}__E{E}_k{k}_{dtype}_{dev}__vs_floor")),
                             hline=1.0))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", default=os.path.join(HERE, "results", "results.csv"))
    p.add_argument("--out-dir", default=os.path.join(HERE, "results", "plots"))
    p.add_argument("--run", default="latest", help="run_id to plot, 'latest' (default) or 'all'")
    p.add_argument("--ops", help="comma list of ops")
    p.add_argument("--models", help="comma list of models")
    p.add_argument("--vs-floor", action="store_true", help="time / floor vs T per implementation instead")
    a = p.parse_args(argv)
    if not os.path.exists(a.csv):
        print(f"no results at {a.csv}: run `python -m bench` first", file=sys.stderr)
        return 1
    rows = load(a.csv, a.run)
    draw = plot_vs_floor if a.vs_floor else plot
    written = draw(rows, a.out_dir, a.ops.split(",") if a.ops else None, a.models.split(",") if a.models else None)
    print(f"{len(written)} plots written to {a.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
