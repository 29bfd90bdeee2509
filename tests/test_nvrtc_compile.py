"""Every kernel of csrc/kernels compiled by NVRTC (CuPy's binding, no GPU) for sm_80 and sm_90a:
no spills, every manifest instantiation in the cubin, parameter types as the launch side packs
them, the by-value structs laid out as their ctypes mirrors. Each unit compiles once per arch
for the whole session (the module fixture); ~15 s on one core."""
import ctypes
import os
import shutil
import subprocess
import sys

import pytest

from moe_ops.nvrtc import abi, cache, compile as nvcompile, manifest
from tests.nvrtc_support import ARCHS, KERNEL_DIR, ROOT, require_nvrtc


@pytest.fixture(scope="module")
def units(tmp_path_factory):
    require_nvrtc()
    folder = str(tmp_path_factory.mktemp("nvrtc-cache"))
    return {(h, a): cache.get_unit(h, a, folder=folder, kdir=KERNEL_DIR) for h in manifest.KERNELS for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("header", sorted(manifest.KERNELS))
def test_unit_compiles_without_spills(units, header, arch):
    unit = units[(header, arch)]
    assert unit.arch == arch and unit.cubin[:4] == b"\x7fELF"
    assert set(unit.lowered) == set(manifest.KERNELS[header])
    for inst, sym in unit.lowered.items():
        assert sym.startswith("_Z") and sym.encode() + b"\0" in unit.cubin, (inst, sym)
        res = unit.resources.get(sym)
        assert res is not None, f"no ptxas report for {inst} ({sym}) in the NVRTC log:\n{unit.log}"
        assert 0 < res.registers <= 255
    assert not unit.spills(), f"{header} sm_{arch}: kernels spill or use a stack frame: {unit.spills()}"


def test_the_block_gating_kernel_keeps_its_launch_bound(units):
    # __launch_bounds__(1024): a 1024-thread block must fit 64K registers (docs/cuda.md)
    for arch in ARCHS:
        u = units[("topk_gating.cuh", arch)]
        for inst, sym in u.lowered.items():
            if inst.startswith("topk_gating_block_kernel"):
                assert u.resources[sym].registers <= 64, (arch, inst, u.resources[sym])


def _params(demangled: str) -> list:
    """Parameter types of 'void ns::f<...>(a, b<c, d>, e)'."""
    depth, start = 0, None
    for i, ch in enumerate(demangled):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            start = i
            break
    inner, parts, cur, depth = demangled[start + 1:demangled.rindex(")")], [], "", 0
    for ch in inner:
        depth += ch in "<(" and 1 or (ch in ">)" and -1 or 0)
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + ([cur.strip()] if cur.strip() else [])


def _kind(t: str) -> str:
    if "*" in t:
        return "ptr"
    if t.startswith(manifest.NAMESPACE):
        return t[len(manifest.NAMESPACE):]
    return {"int": "i32", "long long": "i64", "float": "f32"}.get(t, t)


@pytest.mark.skipif(shutil.which("c++filt") is None, reason="c++filt (binutils) not found")
def test_signatures_match_the_mangled_names(units):
    lowered = {inst: sym for (h, a), u in units.items() if a == ARCHS[0] for inst, sym in u.lowered.items()}
    insts = sorted(lowered)
    out = subprocess.run(["c++filt"], input="\n".join(lowered[i] for i in insts), capture_output=True,
                         text=True, check=True).stdout.splitlines()
    for inst, dem in zip(insts, out):
        got = tuple(_kind(t) for t in _params(dem))
        assert got == manifest.SIGNATURES[manifest.base_name(inst)], (inst, dem)


@pytest.mark.parametrize("struct", sorted(abi.STRUCTS))
def test_ctypes_mirrors_match_the_kernel_structs(struct):
    require_nvrtc()
    header = abi.STRUCT_HEADERS[struct]
    ok = nvcompile.unit_inputs(header, "80", kdir=KERNEL_DIR, names=(), extra_source=abi.layout_check_source(struct))
    nvcompile.compile_unit(ok)
    bad = nvcompile.unit_inputs(header, "80", kdir=KERNEL_DIR, names=(),
                                extra_source=abi.layout_check_source(struct, corrupt=True))
    with pytest.raises(nvcompile.NVRTCCompileError, match="differs from moe_ops/nvrtc/abi.py"):
        nvcompile.compile_unit(bad)
    assert ctypes.sizeof(abi.STRUCTS[struct]) % 8 == 0


def test_a_compile_error_carries_the_program_log():
    require_nvrtc()
    broken = nvcompile.unit_inputs("expert_rank.cuh", "80", kdir=KERNEL_DIR, names=(), extra_source="int x = ;\n")
    with pytest.raises(nvcompile.NVRTCCompileError, match=r"expert_rank.cuh for sm_80[\s\S]*error"):
        nvcompile.compile_unit(broken)


def test_parse_ptxas_reads_spills():
    log = ("ptxas info    : Compiling entry function '_Z1kv' for 'sm_80'\n"
           "ptxas info    : Function properties for _Z1kv\n"
           "ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 768 bytes smem, 424 bytes cmem[0]\n")
    r = nvcompile.parse_ptxas(log)["_Z1kv"]
    assert (r.registers, r.spill_stores, r.spill_loads, r.stack, r.smem) == (255, 4, 12, 8, 768)
    u = nvcompile.Unit("x.cuh", "80", b"", {"k": "_Z1kv"}, log, nvcompile.parse_ptxas(log))
    assert list(u.spills()) == ["_Z1kv"]


def test_arch_names():
    assert nvcompile.normalize_arch("sm_90a") == "90a"
    assert nvcompile.normalize_arch((8, 6)) == "86"
    assert nvcompile.normalize_arch(80) == "80"
    with pytest.raises(ValueError):
        nvcompile.normalize_arch("compute_80")


def test_a_fresh_process_with_a_bare_environment_compiles(tmp_path):
    # CuPy must find libnvrtc and the CUDA headers by itself (no LD_LIBRARY_PATH, CUDA_HOME, preload)
    require_nvrtc()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MOE_OPS_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([p for p in sys.path if "noeditable" in p] + [ROOT])}
    code = ("from moe_ops.nvrtc import cache\n"
            "u = cache.get_unit('row_gather.cuh', '90a')\n"
            "print(cache.compile_count, len(u.lowered), u.cubin[:4] == b'\\x7fELF')")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["1", "5", "True"]
    assert len(list((tmp_path / "cache" / "nvrtc").glob("row_gather.sm_90a.*.cubin"))) == 1
