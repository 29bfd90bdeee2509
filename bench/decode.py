"""Cold-weight decode: the layer at T in {1, 2, 4, 8} with the routed experts changing every call.

In a real model each layer holds its own experts and each token picks other ones, so a decode
step reads its experts' weights from memory, not from the last-level cache. A benchmark that
repeats one routing on one layer measures cache-resident weights instead. Here every call, of
every implementation (implementations are timed round-robin), takes the next routing of one
shared stream in which a call's experts are excluded from the following calls until at least
twice the LLC's bytes of other experts have been read (capped so at least half of the experts
stay eligible: then the note says ``partly warm``).

Reported per (T, implementation): median wall time, the bytes of the touched experts' weights
(mean over the timed calls), GB/s = median over calls of touched bytes / time, and that as % of
the machine's stream read bandwidth, measured in the same run (``stream_read``: an ``amax`` over
an int32 view of all the experts' weights, far larger than the LLC, medians of its own reps
interleaved with the calls, pooled over the T values). ``floor`` (derived) = median over the calls of touched bytes /
stream bandwidth.

Used by ``bench/cpu_layer.py --decode`` and the ``cpu_decode`` preset of ``python -m bench``.
"""
from __future__ import annotations

import collections
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

import moe_ops

from . import kt_peer

OP = "moe_decode_cold"
DEFAULT_IMPLS = ("cpu", "cpu_packed", "kt_kernel", "weight_read")
# Weight-only quantized experts (moe_ops.quant) on the cpu backend: name -> format. Their bytes are
# the quantized ones (scales included), so GB/s and % of stream compare with the bf16 rows.
QUANT_IMPLS = {"cpu_int8": "int8", "cpu_fp8": "fp8_e4m3", "cpu_mxfp4": "mxfp4"}
QUANT_BYTES = {"int8": 1 + 4 / 2048, "fp8_e4m3": 1 + 4 / 16384, "mxfp4": 0.5 + 1 / 32}  # per weight, approx. scales


def llc_bytes() -> int:
    """Largest CPU cache (sysfs; 32 MiB when unknown)."""
    best = 0
    try:
        import glob
        for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
            s = open(path).read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


class ColdRouting:
    """One stream of router logits ``[T, E]``; a call's experts are masked out of the next calls
    until ``2 * llc`` bytes of other experts were touched (or half the experts are masked)."""

    def __init__(self, E: int, expert_bytes: int, llc: int, seed: int = 0):
        self.E, self.expert_bytes, self.need = E, expert_bytes, 2 * llc
        self.g = torch.Generator().manual_seed(seed)
        self.recent: "collections.deque[set]" = collections.deque()
        self.partly_warm = False

    def next(self, T: int, k: int) -> torch.Tensor:
        masked, seen = set(), 0
        for s in reversed(self.recent):
            if seen >= self.need:
                break
            if len(masked | s) > self.E // 2:
                self.partly_warm = True
                break
            masked |= s
            seen += len(s) * self.expert_bytes
        logits = torch.randn(T, self.E, generator=self.g)
        if masked:
            logits[:, sorted(masked)] = -1e4  # never selected (softmax weight 0), still finite
        touched = set(torch.topk(logits, k, dim=-1).indices.reshape(-1).tolist())
        self.recent.append(touched)
        while len(self.recent) > self.E:
            self.recent.popleft()
        return logits


def _router(logits: torch.Tensor, k: int):
    w, ids = torch.topk(torch.softmax(logits, dim=-1), k, dim=-1)
    return w, ids


def _check(out: torch.Tensor, ref: torch.Tensor) -> str:
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    return "ok" if err <= 2e-2 else f"mismatch rel_err={err:.2e}"  # bf16 weights, fp32 accumulation


def make_impls(names, wgu: torch.Tensor, wd: torch.Tensor, k: int, max_tokens: int) -> Dict[str, object]:
    """``{name: fn(x, logits) -> out}`` and, for names not runnable here, ``{name: "why"}``."""
    impls: Dict[str, object] = {}
    for n in names:
        if n == "cpu":
            impls[n] = lambda x, lg: moe_ops.moe_forward(x, lg, wgu, wd, k, backend="cpu")
        elif n == "cpu_packed":
            packed = moe_ops.pack_experts(wgu, wd)
            impls[n] = lambda x, lg, p=packed: moe_ops.moe_forward(x, lg, wgu, wd, k, backend="cpu", packed=p)
        elif n in QUANT_IMPLS:
            fmt = QUANT_IMPLS[n]
            if wgu.dtype != torch.bfloat16:
                impls[n] = "the quantized CPU op takes bf16 activations"
                continue
            (q1, s1), (q2, s2) = moe_ops.quantize_experts(wgu, fmt), moe_ops.quantize_experts(wd, fmt)
            kw = dict(weight_format=fmt, w_gate_up_scale=s1, w_down_scale=s2)
            impls[n] = lambda x, lg, q1=q1, q2=q2, kw=kw: moe_ops.moe_forward(x, lg, q1, q2, k, backend="cpu", **kw)
            impls[n].reference = lambda x, lg, q1=q1, q2=q2, kw=kw: moe_ops.moe_forward(
                x, lg, q1, q2, k, backend="reference", **kw)
        elif n == "kt_kernel":
            if not kt_peer.available():
                impls[n] = kt_peer.load()[1]
                continue
            if wgu.dtype != torch.bfloat16:
                impls[n] = "kt-kernel's bf16 MoE needs bf16 weights"
                continue
            kt = kt_peer.KTExperts(wgu, wd, k, max_tokens)

            def kt_layer(x, lg, kt=kt):
                w, ids = _router(lg, k)
                return kt(x, ids, w)
            impls[n] = kt_layer
        elif n == "weight_read":
            views = [(wgu[e].reshape(-1).view(torch.int32), wd[e].reshape(-1).view(torch.int32))
                     for e in range(wgu.shape[0])]

            def read(x, lg):  # the touched experts' weights, read once (no FP work)
                ids = torch.topk(lg, k, dim=-1).indices.reshape(-1).unique().tolist()
                return [torch.amax(v) for e in ids for v in views[e]]
            impls[n] = read
        else:
            impls[n] = f"unknown decode impl {n!r}"
    return impls


def stream_read(tensors: List[torch.Tensor]) -> Callable[[], object]:
    views = [t.reshape(-1).view(torch.int32) for t in tensors]
    return lambda: [torch.amax(v) for v in views]


def run(E: int, H: int, I: int, k: int, tokens, dtype=torch.bfloat16, impls=DEFAULT_IMPLS, reps: int = 15,  # noqa: E741
        seed: int = 0, log: Callable[[str], None] = lambda s: None) -> List[dict]:
    """Rows ``{T, impl, kind, status, median_ms, min_ms, reps, bytes, gbps, pct_stream, ratio_floor, note}``
    (``impl`` also ``stream_read`` and the derived ``floor``) for every T in ``tokens``."""
    g = torch.Generator().manual_seed(seed)
    wgu = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(dtype)
    wd = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(dtype)
    elem = wgu.element_size()
    expert_bytes = 3 * H * I * elem
    llc = llc_bytes()
    total = E * expert_bytes
    fns = make_impls(impls, wgu, wd, k, max(tokens))
    stream = stream_read([wgu, wd])
    rows: List[dict] = []
    cold_note = f"weights {total / 1e6:.0f} MB vs LLC {llc / 1e6:.0f} MB"
    if total < 4 * llc:
        cold_note += " (under 4x the LLC: not cold)"
    for name, fn in fns.items():
        if isinstance(fn, str):
            log(f"[decode] {name} skipped: {fn}")
            rows += [dict(T=T, impl=name, kind="baseline", status=f"skip: {fn}", note=fn) for T in tokens]
    live = {n: f for n, f in fns.items() if not isinstance(f, str)}
    stream_ms: List[float] = []
    with torch.inference_mode():
        stream()
        for T in tokens:
            route = ColdRouting(E, expert_bytes, llc, seed=seed + T)
            x = torch.randn(T, H, generator=g).to(dtype)
            times = {n: [] for n in live}
            nbytes = {n: [] for n in live}      # bytes the impl reads (quantized: fewer)
            bf16_bytes = {n: [] for n in live}  # the touched experts in the model dtype (the floor's)
            check: Dict[str, str] = {}
            for rep in range(reps + 1):  # rep 0: warmup (and the correctness check)
                for n, f in live.items():
                    lg = route.next(T, k)
                    touched = int(torch.topk(lg, k, dim=-1).indices.unique().numel())
                    t0 = time.perf_counter()
                    out = f(x, lg)
                    dt = (time.perf_counter() - t0) * 1e3
                    if n == "kt_kernel":
                        time.sleep(kt_peer.SETTLE_S)
                    if rep == 0:
                        if n != "weight_read":
                            ref = getattr(f, "reference", None)
                            check[n] = _check(out, ref(x, lg) if ref else
                                              moe_ops.moe_forward(x, lg, wgu, wd, k, backend="reference"))
                        continue
                    times[n].append(dt)
                    scale = QUANT_BYTES[QUANT_IMPLS[n]] / elem if n in QUANT_IMPLS else 1.0
                    nbytes[n].append(int(touched * expert_bytes * scale))
                    bf16_bytes[n].append(touched * expert_bytes)
                t0 = time.perf_counter()
                stream()  # the stream bandwidth, interleaved with the calls it judges
                stream_ms.append((time.perf_counter() - t0) * 1e3)
            sbw = total / (statistics.median(stream_ms) * 1e-3) / 1e9
            floor = [b / (sbw * 1e9) * 1e3 for n in live for b in bf16_bytes[n]]
            fl = statistics.median(floor)
            for n in live:
                gbps = statistics.median(b / (t * 1e-3) / 1e9 for b, t in zip(nbytes[n], times[n]))
                med = statistics.median(times[n])
                rows.append(dict(T=T, impl=n, kind="baseline" if n in ("kt_kernel", "weight_read")
                                 else "backend", status="ok", check=check.get(n, ""), median_ms=med, min_ms=min(times[n]), reps=len(times[n]),
                                 bytes=int(statistics.mean(nbytes[n])), gbps=gbps, pct_stream=100 * gbps / sbw,
                                 ratio_floor=med / fl,
                                 note=f"{100 * gbps / sbw:.0f}% of stream read {sbw:.1f} GB/s; {cold_note}"
                                 + ("; partly warm" if route.partly_warm else "")))
            rows.append(dict(T=T, impl="stream_read", kind="baseline", status="ok",
                             median_ms=statistics.median(stream_ms), min_ms=min(stream_ms), reps=len(stream_ms),
                             bytes=total, gbps=sbw, pct_stream=100.0, note="amax over all experts' weights"))
            rows.append(dict(T=T, impl="floor", kind="derived", status="ok", median_ms=fl, min_ms=min(floor), reps=0,
                             bytes=int(statistics.median(b for n in live for b in bf16_bytes[n])), gbps=sbw,
                             pct_stream=100.0, ratio_floor=1.0, note="touched bytes / stream read bandwidth"))
            log(f"[decode] T={T} done ({reps} reps per impl, stream read {sbw:.1f} GB/s; checks {check})")
    return rows


def table(rows: List[dict], header: str = "") -> str:
    """Markdown: one line per (T, impl)."""
    out = ([header, ""] if header else []) + [
        "| T | impl | ms | touched MB | GB/s | % of stream read | / floor | check |",
        "|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['T']} | {r['impl']} | {r['status']} | | | | | |")
            continue
        out.append(f"| {r['T']} | {r['impl']} | {r['median_ms']:.3f} | {r['bytes'] / 1e6:.1f} | {r['gbps']:.1f} | "
                   f"{r['pct_stream']:.0f}% | {_f2(r.get('ratio_floor'))} | {r.get('check', '')} |")
    return "\n".join(out) + "\n"


def _f2(v) -> str:
    return "" if v is None else f"{v:.2f}"


def optional_impls(names: Optional[str]):
    return tuple(n for n in names.split(",") if n) if names else DEFAULT_IMPLS
