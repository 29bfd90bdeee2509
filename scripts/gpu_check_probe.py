"""The steps of scripts/gpu_check.py that import torch, each run as its own process:

    python scripts/gpu_check_probe.py env                 versions, the GPU, the build tools
    python scripts/gpu_check_probe.py load DEVICE         moe_ops loads, its backends for DEVICE run
    python scripts/gpu_check_probe.py profile DEVICE OUT  torch.profiler trace of one moe_forward

Each prints what it found as one line ``GPU_CHECK_JSON {...}`` (the rest of its output goes to
the log) and exits non-zero when its check fails. They run in the repository root with it on
``PYTHONPATH``, so ``moe_ops`` is the in-place build of this checkout.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "GPU_CHECK_JSON "

# The layer that the load step runs on every required backend (tiny, fp32: it checks that the
# backend runs and computes the layer; tests/ judge precision).
SMOKE = dict(T=33, H=64, I=96, E=8, k=2)
# The layer the profile step traces: Qwen3-30B-A3B's expert shape (bench/shapes.py) on a GPU,
# a small one on CPU.
PROFILE = {"cuda": dict(T=512, H=2048, I=768, E=64, k=8, dtype="bfloat16"),
           "cpu": dict(T=64, H=256, I=128, E=8, k=2, dtype="float32")}


def emit(obj) -> None:
    print(TAG + json.dumps(obj, default=str), flush=True)


def _version(module: str):
    try:
        return getattr(importlib.import_module(module), "__version__", "present")
    except Exception as err:  # missing, or broken on import: say which
        return None if isinstance(err, ModuleNotFoundError) else f"broken: {type(err).__name__}: {err}"


def _tool(name: str, *args, pick: str = ""):
    """``path: line`` of ``name args``' output: the first line containing ``pick`` (else the
    first line), or None when ``name`` is not found (next to the interpreter first, as setup.py
    looks for cmake and ninja, then on PATH)."""
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if path is None:
        return None
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return f"{path}: {err}"
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    line = next((ln for ln in lines if pick in ln), lines[0] if lines else "?")
    return f"{path}: {line}"


def env() -> int:
    import platform

    import torch

    info = dict(python=sys.version.split()[0], executable=sys.executable, platform=platform.platform(),
                cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                triton=_version("triton"), transformers=_version("transformers"), numpy=_version("numpy"),
                pytest=_version("pytest"), pytest_timeout=_version("pytest_timeout"),
                setuptools=_version("setuptools"), simde_py=_version("simde_py"),
                python_h=os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
                cmake=_tool("cmake", "--version"), ninja=_tool("ninja", "--version"),
                nvcc=_tool("nvcc", "--version", pick="release"),
                nvidia_smi=_tool("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                    gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(p.total_memory / 2**30, 1))
    emit(info)
    return 0


def _layer(T, H, I, E, k, dtype, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    x = torch.randn(T, H, generator=g).to(device, dt)
    logits = torch.randn(T, E, generator=g).to(device)
    w_gate_up = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(device, dt)
    w_down = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(device, dt)
    return x, logits, w_gate_up, w_down, k


def load(device: str) -> int:
    """moe_ops is this checkout's build and the backends the check needs load and run a layer.
    Needed: ``cuda`` and ``triton`` on a GPU; ``cpu``, and ``triton`` (under TRITON_INTERPRET=1)
    where triton is installed, on CPU. A backend that fails to load is a failure, never a skip."""
    import torch

    import moe_ops
    from moe_ops import backend as _backend

    out = dict(moe_ops_file=moe_ops.__file__, build_info=moe_ops.build_info(), load_errors=moe_ops.load_errors(),
               backends=moe_ops.available_backends(device=device), failures=[])
    print("moe_ops.build_info():", json.dumps(out["build_info"], indent=1, default=str))
    print("moe_ops.load_errors():", json.dumps(out["load_errors"], indent=1))
    if not os.path.realpath(moe_ops.__file__).startswith(os.path.realpath(ROOT) + os.sep):
        out["failures"].append(f"imported moe_ops from {moe_ops.__file__}, not from this checkout {ROOT}")
    need = ["cuda", "triton"] if device == "cuda" else ["cpu"] + (["triton"] if _version("triton") else [])
    out["required"] = need
    if device == "cuda":
        bi = out["build_info"]
        major, minor = torch.cuda.get_device_capability(0)
        if not bi.get("cuda"):
            out["failures"].append("the extension was built without CUDA kernels")
        elif not any(a.startswith(f"sm_{major}{minor}") for a in bi.get("cuda_archs", [])):
            out["failures"].append(f"built for {bi.get('cuda_archs')}, not for this GPU's sm_{major}{minor}")
    smoke = {}
    for b in need:
        if b not in out["backends"]:
            why = out["load_errors"].get(b, f"loaded, but registers no kernels for {device} tensors")
            out["failures"].append(f"backend {b!r} is not available on {device}: {why}")
            continue
        try:
            x, logits, wgu, wd, k = _layer(**SMOKE, dtype="float32", device=device)
            ref = moe_ops.moe_forward(x, logits, wgu, wd, k, renormalize=True, backend="reference")
            got = moe_ops.moe_forward(x, logits, wgu, wd, k, renormalize=True, backend=b)
            err = float((got.double() - ref.double()).norm() / ref.double().norm())
            fused = _backend.resolve_fused_moe(device, b) is not None
            # 1e-2: TF32 tensor-core dots are allowed; a wrong layer is off by O(1)
            smoke[b] = f"ok (rel. error {err:.1e}{', fused' if fused else ''})" if err <= 1e-2 else \
                f"wrong: rel. error {err:.2e} vs the reference"
        except Exception as e:  # report every backend, then fail
            smoke[b] = f"error: {type(e).__name__}: {e}"[:400]
        if not smoke[b].startswith("ok"):
            out["failures"].append(f"moe_forward on backend {b!r}: {smoke[b]}")
    out["smoke"] = smoke
    emit(out)
    return 1 if out["failures"] else 0


def profile(device: str, path: str) -> int:
    """One moe_forward (after two warm-up calls: compilation, autotuned configs, allocator) under
    torch.profiler; the Chrome trace goes to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile as _profile

    import moe_ops

    shape = PROFILE[device]
    x, logits, wgu, wd, k = _layer(**shape, device=device)
    with torch.inference_mode():
        for _ in range(2):
            moe_ops.moe_forward(x, logits, wgu, wd, k, renormalize=True)
        if device == "cuda":
            torch.cuda.synchronize()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        t0 = time.perf_counter()
        with _profile(activities=acts) as prof:
            moe_ops.moe_forward(x, logits, wgu, wd, k, renormalize=True)
            if device == "cuda":
                torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    prof.export_chrome_trace(path)
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=20))
    with open(path) as f:
        events = json.load(f).get("traceEvents", [])
    kernels = [e for e in events if e.get("cat") == "kernel"]
    names = {str(e.get("name", "")) for e in events}
    top = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:5]
    emit(dict(shape=shape, device=device, wall_ms=round(wall_ms, 3), events=len(events), kernels=len(kernels),
              moe_ops_ranges=sorted(n for n in names if n.startswith("moe_ops.")),  # record_function ranges
              moe_ops_ops=sorted(n for n in names if n.startswith("moe_ops")  # the custom ops (any namespace)
                                 and "::" in n), trace_bytes=os.path.getsize(path),
              top=[f"{e.key} {getattr(e, key) / 1e3:.3f} ms" for e in top]))
    if device == "cuda" and not kernels:
        print("the trace holds no GPU kernels (CUPTI unavailable?)", file=sys.stderr)
    return 0


def main(argv) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "env":
        return env()
    if cmd == "load":
        return load(argv[1])
    if cmd == "profile":
        return profile(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
