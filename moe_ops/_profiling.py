"""Profiler ranges: ``moe_ops.<op>`` around every public op, ``moe_ops.<stage>`` around
``moe_forward``'s stages (router, dispatch, experts, combine). docs/profiling.md has the how-to.

A range is a ``torch.profiler.record_function`` (seen by ``torch.profiler`` on CPU and GPU, and
as an NVTX range under ``torch.autograd.profiler.emit_nvtx``), opened only while a profiler runs:
``record_function`` costs microseconds per range even with no profiler (docs/profiling.md has the
figures), so the check is torch's own Python-side flag ``torch.autograd.profiler._is_profiler_enabled``
(set by ``torch.profiler.profile``, ``torch.autograd.profiler.profile``, ``emit_nvtx`` and
``emit_itt`` in torch 2.11 through 2.14; the flag torch._dynamo reads for the same purpose), a
plain attribute read. ``torch.compiler.is_dynamo_compiling()`` (``return False`` in eager) is asked
first: dynamo folds it to True, so it never reads (and guards on) the profiler flag, and starting a
profiler does not recompile a compiled model.

``MOE_OPS_NVTX=1`` (or :func:`set_nvtx`) additionally pushes plain NVTX ranges by the same names
when CUDA is available, so ``nsys profile -t cuda,nvtx`` shows them without ``emit_nvtx`` (which
also makes a range of every aten op). Under ``emit_nvtx`` the NVTX ranges come from
``record_function`` alone, never twice.

Under ``torch.compile`` the range is a ``record_function``, which dynamo treats as a no-op (or
keeps in the graph with ``torch._dynamo.config.capture_profiler_record_function = True``); no
NVTX call is traced, so ``fullgraph=True`` holds. All of it is host-side: CUDA graph capture is
unaffected (a replay shows the graph launch, not the ranges).
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
from torch.autograd import profiler as _autograd_profiler

from . import envs

STAGES = ("router", "dispatch", "experts", "combine")

_NULL = contextlib.nullcontext()
_is_compiling = torch.compiler.is_dynamo_compiling


def _cuda_nvtx_usable() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # a broken driver: no NVTX, never an import error
        return False


def set_nvtx(enabled: bool) -> bool:
    """Push NVTX ranges (``torch.cuda.nvtx``) for moe_ops' ranges even when no torch profiler
    runs; a no-op where CUDA is not available. Returns whether NVTX ranges are now on."""
    global _NVTX
    on = bool(enabled) and _cuda_nvtx_usable()
    if enabled and not on:
        warnings.warn("moe_ops: NVTX ranges need CUDA (torch.cuda.is_available() is False); left off")
    _NVTX = on
    return on


_NVTX = False
if envs.flag("MOE_OPS_NVTX"):
    set_nvtx(True)


def nvtx_enabled() -> bool:
    return _NVTX


class _NvtxRange:
    """An NVTX range, wrapped around the record_function when a torch profiler runs too."""
    __slots__ = ("_name", "_rf")

    def __init__(self, name: str, rf):
        self._name, self._rf = name, rf

    def __enter__(self):
        torch.cuda.nvtx.range_push(self._name)
        if self._rf is not None:
            self._rf.__enter__()

    def __exit__(self, *exc):
        if self._rf is not None:
            self._rf.__exit__(*exc)
        torch.cuda.nvtx.range_pop()
        return False


def _open(name: str):
    """The range for ``name``, once the caller saw a reason to open one: under dynamo (where
    the range is a no-op unless ``capture_profiler_record_function``), a profiler or NVTX on."""
    if _is_compiling():  # dynamo would drop the range anyway, logging a warning for each
        if torch._dynamo.config.capture_profiler_record_function:
            return torch.autograd.profiler.record_function(name)
        return _NULL
    profiler_on = _autograd_profiler._is_profiler_enabled
    rf = torch.autograd.profiler.record_function(name) if profiler_on else None
    if _NVTX and not (profiler_on and torch._C._autograd._profiler_type()
                      == torch._C._profiler.ActiveProfilerType.NVTX):
        return _NvtxRange(name, rf)
    return rf if rf is not None else _NULL


def profile_range(name: str):
    """Context manager: a range called ``name`` while a profiler (or NVTX) is on, else nothing."""
    if _is_compiling() or _autograd_profiler._is_profiler_enabled or _NVTX:
        return _open(name)
    return _NULL


def stage(name: str):
    """The range of one of ``moe_forward``'s stages: ``moe_ops.<name>``, ``name`` in :data:`STAGES`."""
    if _is_compiling() or _autograd_profiler._is_profiler_enabled or _NVTX:
        if name not in STAGES:
            raise ValueError(f"moe_ops: unknown stage {name!r}; stages are {STAGES}")
        return _open("moe_ops." + name)
    return _NULL


def profiled(fn):
    """Decorator: run ``fn`` inside the range ``moe_ops.<fn.__name__>`` while a profiler (or NVTX)
    is on. Off, the added cost is one call frame and three flag tests (measured in docs/profiling.md)."""
    name = "moe_ops." + fn.__name__

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not (_is_compiling() or _autograd_profiler._is_profiler_enabled or _NVTX):
            return fn(*args, **kwargs)
        with _open(name):
            return fn(*args, **kwargs)
    return wrapper
