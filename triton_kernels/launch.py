"""Shared plumbing for the Triton kernels: the launch helper (every launch goes through it, so
the fused layer can report how many kernels it ran), interpreter detection and the persistent
grid size.

Launches use ``torch.library.wrap_triton`` so ``torch.compile`` sees the kernels inside the
``triton_op`` bodies; in eager mode that is a plain launch on the current stream. Under
``TRITON_INTERPRET=1`` kernels are launched directly (eager only).
"""
from __future__ import annotations

import functools
import threading
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import envs

_LAUNCHES = [0]
_INTERPRETER_LOCK = threading.RLock()


def interpreted() -> bool:
    """Whether Triton runs through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return envs.get("TRITON_INTERPRET") == "1"


def launch_count() -> int:
    """Kernels launched so far by this package (eager calls only; fake/meta calls launch nothing)."""
    return _LAUNCHES[0]


def _is_fake(t) -> bool:
    return isinstance(t, torch.Tensor) and (isinstance(t, torch._subclasses.FakeTensor) or t.is_meta)


def launch(kernel, grid, *args, **meta):
    """Launch ``kernel[grid](*args, **meta)`` through ``wrap_triton`` and count it.

    On fake/meta tensors (the op body run as its own shape function) nothing is launched: only
    the output shapes matter there. Under torch.compile's decomposition the arguments are
    functional wrappers, so the launch is traced as a triton_kernel_wrapper HOP as usual.
    """
    if any(_is_fake(a) for a in args):
        return
    if interpreted() and any(isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter)
                             and type(a) is not torch.Tensor for a in args):
        # wrap_triton hands interpreted kernels back unwrapped: nothing can trace them.
        raise RuntimeError("moe_ops.triton_kernels: tracing Triton kernels (torch.compile / AOT "
                           "dispatch, functional tensors) is not supported under TRITON_INTERPRET=1; "
                           "call the ops eagerly, or trace on a GPU")
    if interpreted():
        # The interpreter's kernels are not JITFunctions: torch 2.11's wrap_triton rejects them
        # (later versions hand them back unwrapped), and nothing can trace them anyway (above).
        # It also patches triton.language module-wide while a kernel runs, so two threads
        # interpreting at once break each other ("Did you forget @triton.jit"): one at a time.
        with _INTERPRETER_LOCK:
            _LAUNCHES[0] += 1
            kernel[grid](*args, **meta)
        return
    _LAUNCHES[0] += 1
    wrap_triton(kernel)[grid](*args, **meta)


@triton.jit
def _runtime_loop_probe(out_ptr, n):
    acc = 0
    for _ in range(n):
        acc += 1
    tl.store(out_ptr, acc)


def interpreter_defect() -> Optional[str]:
    """Why Triton's interpreter cannot run these kernels here, or None (also None on a GPU).

    triton 3.6's interpreter takes a runtime loop bound with ``int()`` of a 1-element array,
    which numpy >= 2.4 refuses (triton-lang/triton#9171; 3.8 is fixed). Every kernel with a
    runtime-bounded loop then fails, so probe one such loop once instead of guessing versions.
    """
    if not interpreted():
        return None
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _runtime_loop_probe[(1,)](out, 3)
    except Exception as e:  # the interpreter wraps the TypeError in its own error type
        if "0-dimensional" in str(e):
            import numpy
            return (f"triton {triton.__version__}'s interpreter cannot run loops with runtime bounds under "
                    f"numpy {numpy.__version__} ({type(e).__name__}: {e}); use numpy<2.4 with this triton "
                    "(requirements-torch211.txt) or triton >= 3.8")
        return (f"the Triton interpreter cannot run a probe kernel ({type(e).__name__}: {e}); "
                "TRITON_INTERPRET=1 must be set before triton is first imported")
    return None if int(out[0]) == 3 else f"triton interpreter probe loop ran {int(out[0])} times, not 3"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs(device: torch.device) -> int:
    """Static persistent grid: one program per SM on a GPU, a small fixed count otherwise
    (the interpreter runs programs one after another, so more would only cost time)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)



def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied in full IEEE fp32 (no TF32): the contract is float32 math."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
