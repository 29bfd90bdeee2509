"""KTransformers' ``kt-kernel`` as a benchmark peer (optional: never a dependency of moe-ops).

    pip install --no-deps kt-kernel==0.7.2     # the version the CPU issue (15) compares against

kt-kernel's bf16 MoE (``AMXBF16_MOE``: AMX tiles where the CPU has them, AVX512-BF16 otherwise)
runs the experts half of a layer (given routing: ids, weights) on its own worker pool. We drive
its extension module directly, the way its ``NativeMoEWrapper`` (method ``"BF16"``) does for
per-expert bf16 weights, because the package's ``__init__`` imports its GGUF / safetensors
loaders, whose dependencies (``gguf``, ...) ``--no-deps`` leaves out; the kernel needs none of them.

Layout: its gate / up / down projections per expert are ``[I, H]`` / ``[I, H]`` / ``[H, I]``
row-major bf16, i.e. exactly ``w_gate_up[e, :I]``, ``w_gate_up[e, I:]`` and ``w_down[e]`` of
moe-ops' layout; the pointers are handed over as they are (kt-kernel copies them into its own
layout at load, as ``pack_experts`` does).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
from typing import Optional, Tuple

import torch

_EXT = None          # the loaded extension module (or None before the first call)
_ERROR = ""          # why it is unavailable
_POOLS = {}          # threads -> CPUInfer: one worker pool per thread count for the process
# Its two workers keep spinning after a call and after a load (measured: 15-60 ms of process CPU
# time in a 100 ms sleep right after one, none in the next): benchmarks pause this long, untimed,
# before timing anything else.
SETTLE_S = 0.1
# kt-kernel keeps its copy of a layer's weights until the process ends (measured: RSS grows by the
# weights' size per KTExperts, del or not), so a sweep reuses one instance per weight set
# (:func:`shared`), sized for this many tokens.
SHARED_MAX_TOKENS = 512
_SHARED: dict = {}


def _find():
    """The installed package's spec, found without running its ``__init__`` (None: not installed)."""
    return importlib.util.find_spec("kt_kernel")


def load() -> Tuple[Optional[object], str]:
    """``(extension module, "")`` or ``(None, why)``; imports at most once per process."""
    global _EXT, _ERROR
    if _EXT is not None or _ERROR:
        return _EXT, _ERROR
    spec = _find()
    if spec is None or not spec.origin:
        _ERROR = "kt-kernel not installed (pip install --no-deps kt-kernel==0.7.2)"
        return None, _ERROR
    try:
        path = os.path.join(os.path.dirname(spec.origin), "_cpu_detect.py")
        dspec = importlib.util.spec_from_file_location("_moe_ops_bench_kt_cpu_detect", path)
        detect = importlib.util.module_from_spec(dspec)
        dspec.loader.exec_module(detect)
        ext, variant = detect.initialize()  # picks the .so variant for this CPU (amx / avx512_bf16 / avx2 ...)
        if getattr(ext.moe, "AMXBF16_MOE", None) is None and getattr(ext.moe, "AVX2BF16_MOE", None) is None:
            raise RuntimeError(f"kt-kernel variant {variant!r} has no bf16 MoE")
        ext._moe_ops_variant = getattr(ext, "__cpu_variant__", variant)
        _EXT = ext
    except Exception as err:  # a broken install must not stop the other implementations
        _ERROR = f"kt-kernel not loadable: {type(err).__name__}: {err}"
    return _EXT, _ERROR


def available() -> bool:
    return load()[0] is not None


def variant() -> str:
    ext, why = load()
    return ext._moe_ops_variant if ext is not None else why


@contextlib.contextmanager
def _quiet_stdout():
    """kt-kernel's C++ side prints a few lines per pool and layer to fd 1: keep them out of the
    benchmark's own output (markdown on stdout)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1: nothing to protect
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _pool(ext, threads: int):
    if threads not in _POOLS:
        cfg = ext.WorkerPoolConfig()
        cfg.subpool_count = 1
        cfg.subpool_numa_map = [0]
        cfg.subpool_thread_count = [threads]
        _POOLS[threads] = ext.CPUInfer(cfg)
    return _POOLS[threads]


class KTExperts:
    """kt-kernel's bf16 experts over moe-ops' weights (``w_gate_up[E, 2I, H]``, ``w_down[E, H, I]``,
    SwiGLU). ``__call__(x, ids, weights)`` = ``moe_ops::fused_experts(x, ids, weights, ...)``:
    ``x[T, H]`` bf16, ``ids[T, k]`` (any int dtype), ``weights[T, k]`` -> ``out[T, H]`` bf16.
    ``max_tokens`` sizes kt-kernel's buffers (it writes past them for more tokens, so we check)."""

    def __init__(self, w_gate_up: torch.Tensor, w_down: torch.Tensor, k: int, max_tokens: int,
                 threads: Optional[int] = None):
        ext, why = load()
        if ext is None:
            raise RuntimeError(why)
        if w_gate_up.dtype != torch.bfloat16 or w_down.dtype != torch.bfloat16:
            raise ValueError(f"kt-kernel bf16 MoE needs bfloat16 weights, got {w_gate_up.dtype} / {w_down.dtype}")
        E, two_i, H = w_gate_up.shape
        I = two_i // 2  # noqa: E741
        if tuple(w_down.shape) != (E, H, I):
            raise ValueError(f"w_down shape {tuple(w_down.shape)} != {(E, H, I)}")
        self.E, self.H, self.I, self.k, self.max_tokens = E, H, I, k, max_tokens
        self.threads = threads or torch.get_num_threads()
        with _quiet_stdout():
            self._load(ext, w_gate_up, w_down, k, max_tokens)
        time.sleep(SETTLE_S)  # its workers spin on after the load: not into the next timing
        self._out = torch.empty(max_tokens, H, dtype=torch.bfloat16)
        self._bsz = torch.zeros(1, dtype=torch.int32)

    def _load(self, ext, w_gate_up, w_down, k, max_tokens):
        E, H, I = self.E, self.H, self.I  # noqa: E741
        self.cpu_infer = _pool(ext, self.threads)
        wgu, wd = w_gate_up.contiguous(), w_down.contiguous()
        self._keep = (wgu, wd)  # its load reads through these pointers
        self._gpu_mask = torch.zeros(E, dtype=torch.bool)  # every expert on the CPU
        cfg = ext.moe.MOEConfig(E, k, H, I, self._gpu_mask.data_ptr())
        cfg.layer_idx = 0
        cfg.pool = self.cpu_infer.backend_
        cfg.max_len = max_tokens
        cfg.gate_projs = [[wgu[e, :I].data_ptr() for e in range(E)]]
        cfg.up_projs = [[wgu[e, I:].data_ptr() for e in range(E)]]
        cfg.down_projs = [[wd[e].data_ptr() for e in range(E)]]
        cfg.gate_scales = cfg.up_scales = cfg.down_scales = [[0] * E]  # bf16: no scales
        cls = getattr(ext.moe, "AMXBF16_MOE", None) or ext.moe.AVX2BF16_MOE
        self.kernel = cls.__name__
        self.moe = cls(cfg)
        self._cfg = cfg
        identity = torch.arange(E, dtype=torch.int64)  # physical expert e is logical expert e
        self.cpu_infer.submit(self.moe.load_weights_task(identity.data_ptr()))
        self.cpu_infer.sync()

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        if T > self.max_tokens:
            raise ValueError(f"T={T} > max_tokens={self.max_tokens} (kt-kernel's output buffer)")
        if x.dtype != torch.bfloat16 or tuple(x.shape) != (T, self.H) or tuple(ids.shape) != (T, self.k):
            raise ValueError(f"x must be bf16 [{T}, {self.H}] and ids [{T}, {self.k}]")
        x = x.contiguous()
        ids64 = ids.to(torch.int64).contiguous()
        w32 = weights.to(torch.float32).contiguous()
        self._bsz[0] = T
        self.cpu_infer.submit(self.moe.forward_task(self._bsz.data_ptr(), self.k, ids64.data_ptr(), w32.data_ptr(),
                                                    x.data_ptr(), self._out.data_ptr(), False))
        self.cpu_infer.sync()
        return self._out[:T]


def _fingerprint(t: torch.Tensor) -> tuple:
    """Shape, dtype and a strided sample of the values: equal for the same seeded weights."""
    flat = t.reshape(-1)
    sample = flat[:: max(1, flat.numel() // 4096)].float()
    return tuple(t.shape), t.dtype, float(sample.sum()), float(sample.abs().sum())


def shared(w_gate_up: torch.Tensor, w_down: torch.Tensor, k: int, max_tokens: int,
           threads: Optional[int] = None) -> KTExperts:
    """The last :class:`KTExperts` made here if it holds weights with the same values (a
    fingerprint; the benchmark's checks against the reference would catch a wrong reuse) and
    enough tokens, else a new one that replaces it."""
    threads = threads or torch.get_num_threads()
    key = (_fingerprint(w_gate_up), _fingerprint(w_down), k, threads)
    got = _SHARED.get("last")
    if got is not None and got[0] == key and got[1].max_tokens >= max_tokens:
        return got[1]
    ex = KTExperts(w_gate_up, w_down, k, max_tokens, threads)
    _SHARED["last"] = (key, ex)
    return ex
