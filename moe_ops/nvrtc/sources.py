"""The translation units NVRTC compiles: one per kernel header of csrc/kernels.

A unit is ``#include "<header>"``. Its project includes (``#include "x.cuh"`` naming a file of
the kernel folder) are resolved here and handed to NVRTC as *named headers*, so what is compiled
is exactly what was hashed for the cache key (no file is read twice). The kernels name a few
system headers (stdint.h, math.h, string.h, and portable.cuh's cuda_runtime.h) that NVRTC does
not ship; they get the small shims below, so the kernel sources compile unchanged under nvcc,
the SIMT emulator and NVRTC. cuda_fp16.h / cuda_bf16.h come from the CUDA headers found at run
time (the ``nvidia`` pip wheels torch depends on, else a toolkit): NVRTC 13.0 has no built-in copy.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
from typing import Dict, List, Optional

_PKG = os.path.dirname(os.path.abspath(__file__))
# An installed package may carry a copy of csrc/kernels here; a source checkout has it beside the package.
_KERNEL_DIRS = (os.path.join(_PKG, "kernels"),
                os.path.join(os.path.dirname(os.path.dirname(_PKG)), "csrc", "kernels"))

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.M)

# Headers that hold host code only (the launch wrapper uses <<<>>>, std::runtime_error): an NVRTC
# unit must never include them (tests/test_nvrtc_compile.py checks every unit's include set).
HOST_ONLY_HEADERS = ("launch.cuh",)

# NVRTC has none of these. The kernels need only the fixed-width integer types and INFINITY
# (device code); string.h serves the emulator's memcpy branches, cuda_runtime.h nvcc's host API.
SHIMS: Dict[str, str] = {
    "stdint.h": (
        "#pragma once\n// moe_ops NVRTC shim: the fixed-width integer types (LP64 / LLP64)\n"
        "typedef signed char int8_t; typedef unsigned char uint8_t;\n"
        "typedef short int16_t; typedef unsigned short uint16_t;\n"
        "typedef int int32_t; typedef unsigned int uint32_t;\n"
        "#if defined(__LP64__)\n"
        "typedef long int64_t; typedef unsigned long uint64_t;\n"
        "typedef long intptr_t; typedef unsigned long uintptr_t;\n"
        "#else\n"
        "typedef long long int64_t; typedef unsigned long long uint64_t;\n"
        "typedef long long intptr_t; typedef unsigned long long uintptr_t;\n"
        "#endif\n"),
    "math.h": (
        "#pragma once\n// moe_ops NVRTC shim: the math functions are NVRTC built-ins; the macros are not\n"
        "#define INFINITY __int_as_float(0x7f800000)\n"
        "#define NAN __int_as_float(0x7fffffff)\n"),
    "string.h": "#pragma once\n// moe_ops NVRTC shim: only the emulator branches call memcpy\n",
    "cuda_runtime.h": "#pragma once\n// moe_ops NVRTC shim: the device vocabulary is built into NVRTC\n",
}

# CUDA headers whose contents go into the cache key (the ones the kernels include).
TOOLKIT_HEADERS = ("cuda_fp16.h", "cuda_fp16.hpp", "cuda_bf16.h", "cuda_bf16.hpp")


def kernel_dir() -> str:
    """The folder of the kernel headers (csrc/kernels)."""
    for d in _KERNEL_DIRS:
        if os.path.isfile(os.path.join(d, "portable.cuh")):
            return d
    raise FileNotFoundError("moe_ops: the CUDA kernel sources (csrc/kernels/*.cuh) are not installed with this "
                            f"package; looked in {list(_KERNEL_DIRS)}")


def kernel_headers(kdir: Optional[str] = None) -> List[str]:
    """Every header of the kernel folder (file names)."""
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(kdir or kernel_dir(), "*.cuh")))


def include_closure(header: str, kdir: Optional[str] = None) -> Dict[str, str]:
    """``header`` and every kernel-folder header it includes, transitively: name -> text.

    Only includes naming a file of the kernel folder are followed; any other quoted include
    (``"../sim/sim.h"``) sits in a branch NVRTC does not take (portable.cuh's emulator branch),
    and if it were taken NVRTC would fail on it, loudly."""
    kdir = kdir or kernel_dir()
    out: Dict[str, str] = {}
    todo = [header]
    while todo:
        name = todo.pop()
        if name in out:
            continue
        with open(os.path.join(kdir, name), encoding="utf-8") as f:
            out[name] = f.read()
        todo += [inc for inc in _INCLUDE.findall(out[name])
                 if "/" not in inc and os.path.isfile(os.path.join(kdir, inc))]
    return dict(sorted(out.items()))


def unit_source(header: str) -> str:
    """The program text of the unit of ``header``."""
    return f'// moe_ops NVRTC unit of csrc/kernels/{header}\n#include "{header}"\n'


def _nvidia_wheel_include_dirs() -> List[str]:
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    out = []
    for r in roots:
        # CUDA 13 wheels: nvidia/cu13/include; CUDA 12 wheels: nvidia/cuda_runtime/include
        out += [os.path.join(r, "cu13", "include"), os.path.join(r, "cuda_runtime", "include")]
    return out


def toolkit_include_dir() -> str:
    """A folder holding cuda_fp16.h and cuda_bf16.h for NVRTC: the ``nvidia`` pip wheels'
    (what torch installs), as cuda.pathfinder (CuPy's dependency) finds them, else a toolkit."""
    candidates: List[str] = []
    try:
        from cuda import pathfinder  # comes with CuPy 14; optional
        found = pathfinder.find_nvidia_header_directory("cudart")
        if found:
            candidates.append(found)
    except Exception:  # an old or missing pathfinder: the search below
        pass
    candidates += _nvidia_wheel_include_dirs()
    candidates += ["/usr/local/cuda/include"] + sorted(glob.glob("/usr/local/cuda-*/include"), reverse=True)
    for d in candidates:
        if all(os.path.isfile(os.path.join(d, h)) for h in ("cuda_fp16.h", "cuda_bf16.h")):
            return d
    raise FileNotFoundError("moe_ops: NVRTC needs cuda_fp16.h / cuda_bf16.h (the nvidia-cuda-runtime wheel, "
                            f"or a CUDA toolkit); none found in {candidates}")


def toolkit_digest(inc_dir: str) -> str:
    """sha256 over the CUDA headers the kernels include, so a changed toolkit misses the cache."""
    h = hashlib.sha256()
    for name in TOOLKIT_HEADERS:
        p = os.path.join(inc_dir, name)
        h.update(name.encode() + b"\0")
        if os.path.isfile(p):
            with open(p, "rb") as f:
                h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()
