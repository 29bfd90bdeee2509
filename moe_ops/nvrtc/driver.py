"""Loading the NVRTC cubins and launching their kernels with the CUDA driver (through CuPy's
``cupy_backends.cuda.api.driver``), on the stream the caller gives (torch's current stream).

Arguments are packed with ctypes from the kernel's parameter types in :mod:`.manifest` (structs
by value: :mod:`.abi`), as cuLaunchKernel takes them: an array of pointers to the values. A
module is loaded once per (device, unit) into the device's primary context -- the one torch uses.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Dict, List, Sequence, Tuple

from . import abi, cache, manifest

# moe_ops::launch raises the dynamic shared memory limit above this (launch.cuh)
DEFAULT_SMEM_LIMIT = 48 * 1024
_INT_RANGE = {"i32": (-(1 << 31), (1 << 31) - 1), "i64": (-(1 << 63), (1 << 63) - 1)}


def pack_args(instantiation: str, args: Sequence) -> Tuple[list, ctypes.Array]:
    """ctypes values for ``args`` as the kernel's parameters, and the void*[] cuLaunchKernel
    reads (keep both alive until the launch returns). Wrong count, type or range raises."""
    sig = manifest.SIGNATURES[manifest.base_name(instantiation)]
    if len(sig) != len(args):
        raise TypeError(f"moe_ops: {instantiation} takes {len(sig)} arguments, got {len(args)}")
    values: List = []
    for i, (kind, v) in enumerate(zip(sig, args)):
        if kind in abi.STRUCTS:
            if not isinstance(v, abi.STRUCTS[kind]):
                raise TypeError(f"moe_ops: {instantiation} argument {i} must be {kind}, got {type(v).__name__}")
            values.append(v)
        elif kind == "ptr":
            if v is not None and not isinstance(v, int):
                raise TypeError(f"moe_ops: {instantiation} argument {i} must be a pointer (int), got {type(v).__name__}")
            values.append(ctypes.c_void_p(v or None))
        elif kind == "f32":
            values.append(ctypes.c_float(float(v)))
        else:
            lo, hi = _INT_RANGE[kind]
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"moe_ops: {instantiation} argument {i} ({kind}) out of range: {v!r}")
            values.append(abi.SCALARS[kind](v))
    ptrs = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(v) for v in values])
    return values, ptrs


def _cuda():
    from cupy_backends.cuda.api import driver, runtime  # lazily: CuPy is optional
    return driver, runtime


class Launcher:
    """Launches the manifest's kernels on one device and stream: ``launcher(inst, grid, block,
    smem, *args)`` -- the ``launch`` callable of :mod:`.launchers`."""

    _modules: Dict[Tuple[int, str], int] = {}      # (device, unit header) -> CUmodule
    _functions: Dict[Tuple[int, str], int] = {}    # (device, instantiation) -> CUfunction
    _smem_set: Dict[Tuple[int, str], int] = {}     # the dynamic smem limit raised so far
    _lock = threading.Lock()

    def __init__(self, device_index: int, arch: str, stream: int, sm_count: int, cc_major: int):
        self.device = device_index
        self.arch = arch
        self.stream = stream
        self.sm_count = sm_count  # sizes the persistent GEMM grids (launchers.persistent_blocks)
        self.cc_major = cc_major  # tensor-core GEMM from sm_80 (launchers.mma_allowed)

    def _make_current(self, driver, runtime) -> None:
        # cudaSetDevice makes the device's primary context (torch's) current on this thread; it
        # is needed when this thread has none yet (a fresh thread, e.g. autograd's).
        try:
            if driver.ctxGetCurrent() != 0 and driver.ctxGetDevice() == self.device:
                return
        except Exception:
            pass
        runtime.setDevice(self.device)

    def function(self, instantiation: str) -> int:
        driver, runtime = _cuda()
        fkey = (self.device, instantiation)
        with self._lock:
            if fkey not in self._functions:
                header = manifest.header_of(instantiation)
                unit = cache.get_unit(header, self.arch)
                self._make_current(driver, runtime)
                mkey = (self.device, header)
                if mkey not in self._modules:
                    self._modules[mkey] = driver.moduleLoadData(unit.cubin)
                self._functions[fkey] = driver.moduleGetFunction(self._modules[mkey], unit.lowered[instantiation])
            return self._functions[fkey]

    def __call__(self, instantiation: str, grid, block, smem: int, *args) -> None:
        if min(grid) == 0:
            return  # as moe_ops::launch: an empty grid is a valid no-op (T = 0)
        fn = self.function(instantiation)
        driver, runtime = _cuda()
        self._make_current(driver, runtime)
        if smem > DEFAULT_SMEM_LIMIT:
            with self._lock:
                if self._smem_set.get((self.device, instantiation), 0) < smem:
                    driver.funcSetAttribute(fn, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(smem))
                    self._smem_set[(self.device, instantiation)] = smem
        values, ptrs = pack_args(instantiation, args)
        driver.launchKernel(fn, grid[0], grid[1], grid[2], block[0], block[1], block[2], int(smem), self.stream,
                            ctypes.addressof(ptrs), 0)
        del values  # alive until here: the driver copied the parameters at the launch


class Recorder:
    """A launch callable that records instead of launching (tests; no GPU): every call is checked
    against the manifest (instantiation known, arguments packable) like a real launch."""

    sm_count = None  # persistent grids take the emulator build's cap, as the C++ compiled without nvcc
    cc_major = None  # and no device arch is asked (the emulator build's choice)

    def __init__(self):
        self.calls: List[tuple] = []

    def __call__(self, instantiation: str, grid, block, smem: int, *args) -> None:
        if min(grid) == 0:
            return
        manifest.header_of(instantiation)
        pack_args(instantiation, args)
        self.calls.append((instantiation, tuple(grid), tuple(block), smem, args))

    def kernels(self) -> List[str]:
        return [c[0] for c in self.calls]
