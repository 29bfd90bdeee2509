"""NVRTC compilation of one unit (a kernel header) for one real GPU arch, to a cubin, with
ptxas's resource report parsed from the program log.

CuPy is imported here lazily, and only its low-level NVRTC binding
(``cupy_backends.cuda.libs.nvrtc``): that works without a GPU or a driver, so CI compiles every
kernel on a CPU-only machine. CuPy finds libnvrtc itself (``cuda.pathfinder``: the ``nvidia``
wheels torch installs, then the system), so nothing is preloaded here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import manifest, sources

CXX_STD = "c++17"
# No fast math (as csrc/cuda/cuda.cmake): the router's accurate expf keeps the CUDA results on the
# float64 reference. -lineinfo as scripts/ptxas_report.sh (profilers map SASS to the sources).
# -default-device: NVRTC rejects unannotated (host) functions, and the kernel headers hold a few
# torch-free helpers the launchers share (make_rank_plan); as device functions they are unused.
BASE_OPTIONS = ("-std=" + CXX_STD, "-lineinfo", "-default-device", "--ptxas-options=-v", "--ptxas-options=-warn-spills")


class NVRTCUnavailable(ImportError):
    """CuPy (or its NVRTC library) is missing: the NVRTC path cannot compile."""


class NVRTCCompileError(RuntimeError):
    """NVRTC rejected a unit; the message carries the program log."""


def nvrtc():
    """``cupy_backends.cuda.libs.nvrtc``, or :class:`NVRTCUnavailable` with what to install."""
    try:
        from cupy_backends.cuda.libs import nvrtc as mod
        mod.getVersion()  # loads libnvrtc: a CuPy without it fails here, not at the first compile
    except Exception as e:  # ImportError, or the library's own load error
        raise NVRTCUnavailable("moe_ops: compiling the CUDA kernels without nvcc needs CuPy with NVRTC "
                               f"(pip install cupy-cuda13x, or cupy-cuda12x for CUDA 12): {type(e).__name__}: {e}") from e
    return mod


def nvrtc_version() -> Tuple[int, int]:
    return tuple(nvrtc().getVersion())


def normalize_arch(arch) -> str:
    """"80", "sm_80", 80, (8, 0) -> "80"; "90a" / "sm_90a" -> "90a"."""
    if isinstance(arch, tuple):
        return f"{arch[0]}{arch[1]}"
    a = str(arch).lower()
    a = a[3:] if a.startswith("sm_") else a
    if not re.fullmatch(r"\d{2,3}[af]?", a):
        raise ValueError(f"moe_ops: not a GPU arch: {arch!r} (expected e.g. '80', 'sm_90a')")
    return a


@dataclass(frozen=True)
class UnitInputs:
    """Everything a compile reads -- what the cache key is made of."""
    header: str
    arch: str
    source: str
    headers: Dict[str, str]          # named headers: the include closure and the shims
    names: Tuple[str, ...]           # instantiations (manifest), in name-expression order
    options: Tuple[str, ...]
    toolkit_digest: str

    def name_expressions(self) -> List[str]:
        return [manifest.name_expression(n) for n in self.names]


def unit_inputs(header: str, arch, *, kdir: Optional[str] = None, extra_source: str = "",
                names: Optional[Tuple[str, ...]] = None) -> UnitInputs:
    """The inputs of ``header``'s unit for ``arch`` (``names``: default, the manifest's entries)."""
    arch = normalize_arch(arch)
    inc = sources.toolkit_include_dir()
    closure = sources.include_closure(header, kdir)
    headers = dict(closure)
    headers.update(sources.SHIMS)
    opts = BASE_OPTIONS + (f"--gpu-architecture=sm_{arch}", "-I" + inc)
    return UnitInputs(header=header, arch=arch, source=sources.unit_source(header) + extra_source,
                      headers=headers,
                      names=tuple(manifest.KERNELS.get(header, ()) if names is None else names),
                      options=opts, toolkit_digest=sources.toolkit_digest(inc))


@dataclass(frozen=True)
class KernelResources:
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int


@dataclass
class Unit:
    """A compiled unit: the cubin and the mangled name of every instantiation."""
    header: str
    arch: str
    cubin: bytes
    lowered: Dict[str, str]                  # instantiation -> mangled symbol in the cubin
    log: str = ""
    resources: Dict[str, KernelResources] = field(default_factory=dict)  # mangled -> ptxas report

    def spills(self) -> Dict[str, KernelResources]:
        return {s: r for s, r in self.resources.items() if r.spill_stores or r.spill_loads or r.stack}


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> Dict[str, KernelResources]:
    """ptxas -v lines (the format scripts/ptxas_report.sh parses) -> resources per entry symbol."""
    out: Dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), {"registers": -1, "spill_stores": 0, "spill_loads": 0,
                                              "stack": 0, "smem": 0})
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = _REGS.search(line)
        if m:
            cur["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            cur["smem"] = int(s.group(1)) if s else 0
    return {k: KernelResources(**v) for k, v in out.items()}


def compile_unit(inputs: UnitInputs) -> Unit:
    """Compile one unit with NVRTC (no cache: :func:`moe_ops.nvrtc.cache.get_unit` wraps this)."""
    nv = nvrtc()
    hnames = list(inputs.headers)
    prog = nv.createProgram(inputs.source, f"moe_ops_{inputs.header}.cu",
                            [inputs.headers[n].encode() for n in hnames], [n.encode() for n in hnames])
    try:
        exprs = inputs.name_expressions()
        for e in exprs:
            nv.addNameExpression(prog, e)
        try:
            nv.compileProgram(prog, list(inputs.options))
        except nv.NVRTCError as e:
            raise NVRTCCompileError(f"moe_ops: NVRTC failed on csrc/kernels/{inputs.header} for sm_{inputs.arch} "
                                    f"({e}):\n{nv.getProgramLog(prog)}") from None
        log = nv.getProgramLog(prog)
        lowered = {n: nv.getLoweredName(prog, e) for n, e in zip(inputs.names, exprs)}
        cubin = bytes(nv.getCUBIN(prog))
    finally:
        nv.destroyProgram(prog)
    return Unit(inputs.header, inputs.arch, cubin, lowered, log, parse_ptxas(log))
