"""Block configurations for the grouped GEMM, keyed by (E, N, K, dtype, device) (vLLM style).

Lookup order for a GEMM with ``E`` experts, output width ``N``, reduction ``K``:

1. ``configs/E=<E>,N=<N>,K=<K>,device_name=<device>,dtype=<dtype>.json`` (written by
   ``python -m moe_ops.triton_kernels.autotune``): ``{"<M>": config, ...}``; the entry whose M
   (rows of A, i.e. T*k) is nearest to the call's M wins;
2. ``configs/default.json``: per device class (``interpreter``, ``cuda``) and dtype, a list of
   ``[max_rows_per_expert, config]`` buckets: small average expert segments get a small BLOCK_M;
3. a built-in fallback.

``MOE_OPS_TRITON_CONFIG_DIR`` adds a directory searched before the shipped one.
A config: ``BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages``.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, Optional

import torch

from .. import envs
from .launch import interpreted

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
_FALLBACK = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def device_name(device: torch.device) -> str:
    """The config file's device key: the GPU's name with spaces as underscores (vLLM)."""
    if interpreted() and device.type == "cpu":
        return "interpreter"
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def config_filename(E: int, N: int, K: int, device: str, dtype: torch.dtype, wgrad: bool = False) -> str:
    kind = ",kind=wgrad" if wgrad else ""
    return f"E={E},N={N},K={K},device_name={device},dtype={DTYPE_NAMES[dtype]}{kind}.json"


def _dirs():
    extra = envs.get("MOE_OPS_TRITON_CONFIG_DIR")
    return ([extra] if extra else []) + [CONFIG_DIR]


@functools.lru_cache(maxsize=None)
def _load_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _valid(cfg: dict) -> Dict[str, int]:
    out = dict(_FALLBACK)
    out.update({k: int(cfg[k]) for k in KEYS if k in cfg})
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):   # tl.dot needs >= 16 and powers of two
        v = max(16, out[k])
        out[k] = 1 << (v - 1).bit_length()
    return out


def get_config(E: int, N: int, K: int, dtype: torch.dtype, device: torch.device, M: int,
               wgrad: bool = False) -> Dict[str, int]:
    dev = device_name(device)
    for d in _dirs():
        table = _load_json(os.path.join(d, config_filename(E, N, K, dev, dtype, wgrad)))
        if table:
            best = min(table, key=lambda m: abs(int(m) - M))
            return _valid(table[best])
    defaults = _load_json(os.path.join(CONFIG_DIR, "default.json")) or {}
    cls = "interpreter" if dev == "interpreter" else ("cuda" if device.type == "cuda" else "cpu")
    section = defaults.get(cls, {})
    buckets = section.get(DTYPE_NAMES[dtype]) or section.get("any") or []
    if wgrad and dtype in (torch.float16, torch.bfloat16):
        buckets = section.get("wgrad", buckets)
    per_expert = M / max(E, 1)
    for limit, cfg in buckets:
        if limit is None or per_expert <= limit:
            return _valid(cfg)
    return _valid(_FALLBACK)
