"""The Python launchers (moe_ops/nvrtc/launchers.py) plan exactly what the C++ launchers do.

The C++ launchers of the NVRTC binding's ops (csrc/cuda/*.cu of CU_FILES) are compiled here as
host C++ in the emulator's vocabulary (-DMOE_OPS_SIM, one translation unit) and linked with the
emulator runtime whose ``moe_sim::run_grid`` is replaced by a *recording* one: every launch
prints its kernel (looked up among the NVRTC manifest's instantiations by address -- a kernel
the manifest lacks prints as UNKNOWN), grid, block and dynamic shared memory, and never runs.
The same calls through the Python launchers must print the same lines; the workspace sizes and
``topk_gating_supported`` are compared too. Needs g++ and the CUDA host headers (as the emulator
build does); ~20 s of compiling, once per session."""
import glob
import os
import re
import shutil
import subprocess

import pytest

from moe_ops import envs
from moe_ops.nvrtc import driver, launchers, manifest, sources
from tests.nvrtc_support import ROOT

CU_FILES = ("topk_gating.cu", "permute.cu", "capacity.cu", "grouped_gemm.cu")  # what moe_ops/nvrtc/ops.py implements
DTYPES = {"float": "kFloat32", "__half": "kFloat16", "__nv_bfloat16": "kBFloat16", "double": "kFloat64"}
X, OUT, IDS, WS, AUX = 0x100000, 0x2000000, 0x3000000, 0x4000000, 0x5000000  # fake, 256-aligned pointers

# (op, args) in the Python launchers' order; pointers are ints (the C++ side casts them)
CASES = []
for elem in manifest.GATING_TYPES:
    for E, ng, tg in [(8, 0, 0), (256, 0, 0), (257, 0, 0), (512, 0, 0), (513, 0, 0), (1000, 0, 0), (16384, 0, 0),
                      (256, 8, 4), (1024, 16, 2), (600, 3, 1)]:
        CASES.append(("topk_gating", (X, elem, AUX, 37, E, 4, 1, True, ng, tg, 1.0, OUT, IDS)))
CASES.append(("topk_gating", (X, "float", 0, 0, 8, 2, 0, False, 0, 0, 1.0, OUT, IDS)))  # T = 0
# refused by both (std::invalid_argument / ValueError): k > E, group keys over 48 KiB, E too large
CASES += [("topk_gating", (X, "float", 0, 5, 4, 5, 0, False, 0, 0, 1.0, OUT, IDS)),
          ("topk_gating", (X, "float", 0, 5, 16384, 2, 1, False, 2, 1, 1.0, OUT, IDS)),
          ("topk_gating", (X, "float", 0, 5, 16385, 2, 1, False, 0, 0, 1.0, OUT, IDS))]
for T, k, E, H, eb, bm, x in [(300, 2, 8, 64, 4, 16, X), (0, 2, 4, 8, 2, 1, X), (5, 1, 1, 3, 1, 1, X),
                              (100000, 8, 256, 16, 2, 128, X), (2 ** 18, 8, 4096, 8, 4, 1, X + 8),
                              (7, 3, 5, 6, 2, 4, X + 2)]:
    CASES.append(("permute", (x, eb, T, H, IDS, k, E, bm, OUT, AUX, AUX + 0x10000, AUX + 0x20000, WS)))
    for C, km in [(0, True), (3, False), (T * k, True)]:
        CASES.append(("capacity_dispatch", (x, eb, T, H, IDS, k, E, C, km, OUT, AUX, AUX + 0x10000, AUX + 0x20000,
                                            WS)))
for elem in manifest.DATA_TYPES:
    for H, y in [(64, X), (6, X), (64, X + 4), (0, X)]:
        CASES.append(("unpermute", (y, elem, 1000, H, IDS, AUX, 33, 2, OUT)))
        CASES.append(("capacity_combine", (y, elem, 4, 9, H, IDS, AUX, 0, 33, 1024, OUT)))
for elem in manifest.DATA_TYPES:
    for M, K, E, N, tb, a in [(300, 64, 8, 96, False, X), (300, 64, 8, 96, True, X), (0, 8, 2, 8, False, X),
                              (5, 3, 7, 0, True, X), (100000, 4096, 256, 7168, True, X), (33, 5, 1, 1, False, X),
                              (300, 64, 8, 96, True, X + 2), (300, 64, 8, 12, False, X), (300, 64, 8, 12, True, X)]:
        CASES.append(("grouped_gemm", (a, elem, M, K, AUX, E, N, tb, IDS, OUT, WS)))
        CASES.append(("grouped_gemm_wgrad", (a, AUX, elem, M, K, N, IDS, E, OUT, WS)))
    for T, k, E, H, I, act in [(100, 2, 8, 64, 32, 1), (3, 8, 64, 7168, 2048, 2), (0, 2, 4, 8, 8, 1), (5, 1, 1, 0, 4, 1),
                               (6, 2, 4, 16, 0, 2), (6, 2, 4, 16, 8, 3)]:
        CASES.append(("fused_experts", (X, elem, T, H, IDS, k, AUX, X + 0x10000, X + 0x20000, E, I, act, OUT, WS)))
WORKSPACES = [(T, k, E, C) for T in (0, 1, 300, 100000) for k in (1, 8) for E in (1, 8, 4096) for C in (0, 17)]
FUSED_WS = [(T, k, E, H, I, elem) for T in (0, 7, 4096) for k in (1, 8) for E in (1, 256) for H, I in [(64, 32), (7168, 2048)]
            for elem in ("__half", "double")]
SUPPORTED = [(E, ng) for E in (0, 1, 8, 512, 513, 4096, 16384, 16385) for ng in (0, 1, 2, 8, 64)]


def _cpp_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f"DType::{DTYPES[v]}"
    if isinstance(v, float):
        return f"{v}f"
    return f"{v}ll"


_POINTER_PARAMS = {  # which positional parameters of each launcher are pointers (launcher_api.h)
    "topk_gating": {0, 2, 11, 12}, "permute": {0, 4, 8, 9, 10, 11, 12}, "unpermute": {0, 4, 5, 8},
    "capacity_dispatch": {0, 4, 9, 10, 11, 12, 13}, "capacity_combine": {0, 5, 6, 7, 10},
    "grouped_gemm": {0, 4, 8, 9, 10}, "grouped_gemm_wgrad": {0, 1, 6, 8, 9},
    "fused_experts": {0, 4, 6, 7, 8, 12, 13},
}


def _cpp_call(op, args):
    vals = []
    for i, v in enumerate(args):
        vals.append(f"P{{{v}ull}}" if i in _POINTER_PARAMS[op] else _cpp_value(v))
    if op in ("permute", "capacity_dispatch"):
        vals[1] = f"(size_t){args[1]}"
    return f"launchers::{op}({', '.join(vals)}, nullptr);"


def _driver_source() -> str:
    kernels = "\n".join(f'  {{reinterpret_cast<const void*>(&moe_ops::kern::{inst}), "{inst}"}},'
                        for insts in manifest.KERNELS.values() for inst in insts)
    body = []
    for i, (op, args) in enumerate(CASES):
        body.append(f'  std::printf("CASE {i}\\n"); try {{ {_cpp_call(op, args)} }} '
                    f'catch (const std::exception& e) {{ std::printf("ERROR\\n"); }}')
    for T, k, E, C in WORKSPACES:
        body.append(f'  std::printf("WS %zu %zu\\n", launchers::permute_workspace_bytes({T}, {k}, {E}), '
                    f'launchers::capacity_workspace_bytes({T}, {k}, {E}, {C}));')
    for E, ng in SUPPORTED:
        body.append(f'  std::printf("SUP %d\\n", (int)launchers::topk_gating_supported({E}, {ng}));')
    for E in (1, 8, 4096, 100000):
        body.append(f'  std::printf("GWS %zu\\n", launchers::grouped_gemm_workspace_bytes({E}));')
    for T, k, E, H, I, elem in FUSED_WS:
        body.append(f'  std::printf("FWS %zu\\n", launchers::fused_experts_workspace_bytes({T}, {k}, {E}, {H}, {I}, '
                    f'DType::{DTYPES[elem]}));')
    includes = "\n".join(f'#include "cuda/{f}"' for f in CU_FILES)
    return f"""// generated by tests/test_nvrtc_launch_parity.py
{includes}
#include <cstdio>
#include <map>
#include <string>

using namespace moe_ops;
using launchers::DType;
struct P {{  // a fake device pointer, of whatever pointer type the parameter has
  unsigned long long v;
  template <class T>
  operator T*() const {{ return reinterpret_cast<T*>(v); }}
}};

static const std::map<const void*, std::string> kKernels = {{
{kernels}
}};

namespace moe_sim {{
void run_grid(dim3 g, dim3 b, size_t smem, const void* kernel, void (*)(void*), void*) {{
  auto it = kKernels.find(kernel);
  std::printf("L %s %u %u %u %u %u %u %zu\\n", it == kKernels.end() ? "UNKNOWN" : it->second.c_str(), g.x, g.y, g.z,
              b.x, b.y, b.z, smem);
}}
// every other entry point comes from the emulator runtime itself (csrc/sim/runtime.cpp, whose
// own run_grid is renamed away when it is compiled here); none is reached, no kernel body runs
}}  // namespace moe_sim

int main() {{
{chr(10).join(body)}
  return 0;
}}
"""


def _cuda_host_includes():
    """The CUDA host headers (cuda_fp16.h and the CCCL <nv/target> it includes), as the emulator build finds them."""
    roots = [os.path.join(r, "include") for r in (envs.raw("CUDA_HOME"), envs.raw("CUDA_PATH")) if r]
    try:
        roots.append(sources.toolkit_include_dir())
    except FileNotFoundError:
        pass
    for root in roots + ["/usr/local/cuda/include"]:
        if not os.path.isfile(os.path.join(root, "cuda_fp16.h")):
            continue
        for cccl in (root, os.path.join(root, "cccl")):
            if os.path.isfile(os.path.join(cccl, "nv", "target")):
                return [root] + ([cccl] if cccl != root else [])
    return None


@pytest.fixture(scope="module")
def cpp_driver(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    incs = _cuda_host_includes()
    if cxx is None or incs is None:
        pytest.skip("needs g++ and the CUDA host headers ($CUDA_HOME/include, /usr/local/cuda/include), as the "
                    "emulator build")
    d = tmp_path_factory.mktemp("launch_parity")
    src, exe = d / "driver.cpp", d / "driver"
    src.write_text(_driver_source())
    cmd = [cxx, "-std=c++20", "-O0", "-w", "-DMOE_OPS_SIM", "-I", os.path.join(ROOT, "csrc")]
    for i in incs:
        cmd += ["-isystem", i]
    objs = []
    for unit in sorted(glob.glob(os.path.join(ROOT, "csrc", "sim", "*.cpp"))):
        if re.search(r"#include <(torch|ATen)/", open(unit).read()):  # ops_sim.cpp: the torch binding
            continue
        objs.append(str(d / (os.path.basename(unit) + ".o")))
        subprocess.run(cmd + ["-Drun_grid=emulator_run_grid_unused", "-c", unit, "-o", objs[-1]], check=True,
                       capture_output=True, timeout=600)
    subprocess.run(cmd + [str(src)] + objs + ["-o", str(exe), "-pthread", "-ldl"], check=True, capture_output=True,
                   timeout=600)
    return str(exe)


def _python_lines():
    out = []
    for i, (op, args) in enumerate(CASES):
        out.append(f"CASE {i}")
        rec = driver.Recorder()
        try:
            getattr(launchers, op)(rec, *args)
        except ValueError:
            out += [f"L {c[0]} {' '.join(map(str, c[1]))} {' '.join(map(str, c[2]))} {c[3]}" for c in rec.calls]
            out.append("ERROR")
            continue
        out += [f"L {c[0]} {' '.join(map(str, c[1]))} {' '.join(map(str, c[2]))} {c[3]}" for c in rec.calls]
    for T, k, E, C in WORKSPACES:
        out.append(f"WS {launchers.permute_workspace_bytes(T, k, E)} {launchers.capacity_workspace_bytes(T, k, E, C)}")
    for E, ng in SUPPORTED:
        out.append(f"SUP {int(launchers.topk_gating_supported(E, ng))}")
    for E in (1, 8, 4096, 100000):
        out.append(f"GWS {launchers.grouped_gemm_workspace_bytes(E)}")
    for T, k, E, H, I, elem in FUSED_WS:
        out.append(f"FWS {launchers.fused_experts_workspace_bytes(T, k, E, H, I, elem)}")
    return out


@pytest.mark.parametrize("gemm", [None, "simt"])  # MOE_OPS_CUDA_GEMM: both read it (tensor cores or not)
def test_python_launchers_plan_what_the_cpp_launchers_launch(cpp_driver, monkeypatch, gemm):
    env = {k: v for k, v in os.environ.items() if k != "MOE_OPS_CUDA_GEMM"}
    monkeypatch.delenv("MOE_OPS_CUDA_GEMM", raising=False)
    if gemm is not None:
        env["MOE_OPS_CUDA_GEMM"] = gemm
        monkeypatch.setenv("MOE_OPS_CUDA_GEMM", gemm)
    cpp_lines = subprocess.run([cpp_driver], check=True, capture_output=True, text=True, timeout=120,
                               env=env).stdout.splitlines()
    assert not [ln for ln in cpp_lines if "UNKNOWN" in ln], "the C++ launchers launch a kernel the NVRTC manifest lacks"
    py = _python_lines()
    assert len([ln for ln in cpp_lines if ln.startswith("L ")]) > 100  # the cases did launch
    assert cpp_lines.count("ERROR") == 3 + len(manifest.DATA_TYPES)  # + act 3 per dtype
    mma = [ln for ln in cpp_lines if "_mma_kernel" in ln]
    assert (len(mma) > 20) if gemm is None else not mma
    diff = [(i, a, b) for i, (a, b) in enumerate(zip(cpp_lines, py)) if a != b]
    assert not diff and len(cpp_lines) == len(py), f"first differences (line, C++, Python): {diff[:5]}"
