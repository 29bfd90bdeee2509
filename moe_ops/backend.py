"""The one backend switch.

A *backend* is a named set of op implementations for some device types:

=============  ===========  ===============================================================
name           devices      where the implementations come from
=============  ===========  ===============================================================
``reference``  cpu, cuda    ``moe_ops.reference`` (pure PyTorch, the correctness oracle)
``cpu``        cpu          C++ kernels, ``torch.ops.moe_ops.*`` dispatched on CPU tensors
``cuda``       cuda         CUDA kernels, ``torch.ops.moe_ops.*`` dispatched on CUDA tensors
``cuda_sim``   cpu          the *same* CUDA kernel sources run by the SIMT host emulator
                            (``torch.ops.moe_ops_sim.*``, test build)
``triton``     cuda, cpu*   Triton kernels (``torch.ops.moe_ops_triton.*``); cpu only under
                            ``TRITON_INTERPRET=1``
=============  ===========  ===============================================================

Choice: the ``backend=`` argument > env ``MOE_OPS_BACKEND`` > automatic by device
(:data:`AUTO_ORDER`; on CUDA tensors reordered per GPU arch and op by ``auto_backend.json``, see
:func:`auto_order`). An explicitly chosen backend that lacks an op is an error for a direct op
call; composite functions (``moe_forward``) ask with ``strict=False`` and fall back along the
automatic order for the ops that backend does not have.

Backends register lazily: a *loader* imports whatever module provides them and calls
:func:`register`. Loaders that fail (extension not built, triton not installed) leave the
backend unavailable; :func:`load_errors` says why. A backend that cannot compute some (op, dtype)
on a device declares it when it registers; :func:`unsupported_reason` answers for any backend.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from . import envs

OP_NAMES = (
    "topk_gating",
    "permute",
    "unpermute",
    "capacity_dispatch",
    "capacity_combine",
    "grouped_gemm",
    "grouped_gemm_wgrad",
)

# Automatic preference per device type. The first available backend that implements the op wins.
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}


_AUTO_TABLE = os.path.join(os.path.dirname(__file__), "auto_backend.json")


@functools.lru_cache(maxsize=None)
def _auto_table() -> Dict[str, Any]:
    with open(_AUTO_TABLE) as f:
        return json.load(f)


def _cuda_arch() -> Optional[str]:
    """``sm_XY`` of the current CUDA device, or None without one."""
    import torch
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def auto_order(op: str, device_type: str, arch: Optional[str] = None) -> Tuple[str, ...]:
    """The automatic backend order for ``op`` (or ``"moe_forward"``, the fused layer) on
    ``device_type`` tensors: :data:`AUTO_ORDER`, with the backend that ``auto_backend.json`` names
    for this GPU arch (``arch``, default the current device's) and op moved first. The table holds
    the design defaults until the GPU check's measurements replace them."""
    order = AUTO_ORDER.get(device_type, ("reference",))
    if device_type != "cuda":
        return order
    pick = _auto_table().get("cuda", {}).get(arch or _cuda_arch() or "", {}).get(op)
    if pick not in order:
        return order
    return (pick,) + tuple(n for n in order if n != pick)


@dataclass
class Backend:
    name: str
    devices: frozenset
    ops: Dict[str, Callable] = field(default_factory=dict)
    fused_moe: Optional[Callable] = None  # a whole-layer path with moe_forward's signature
    # (op, dtype, device type) -> why this backend cannot compute it there ("moe_forward" = its fused layer)
    unsupported: Dict[Tuple[str, Any, str], str] = field(default_factory=dict)


_BACKENDS: Dict[str, Backend] = {}
_LOAD_ERRORS: Dict[str, str] = {}

# name -> module that registers it on import (its import calls `register`).
_LOADERS = {
    "reference": "moe_ops._register_reference",
    "cpu": "moe_ops._register_native",
    "cuda": "moe_ops._register_native",
    "cuda_sim": "moe_ops._register_sim",
    "triton": "moe_ops._register_triton",
}
_LOADED: set = set()


def register(name: str, devices: Iterable[str], ops: Dict[str, Callable], *,
             unsupported: Optional[Dict[Tuple[str, Any, str], str]] = None) -> None:
    """Register (or extend) backend ``name`` with op implementations.

    Each callable takes the op's schema arguments positionally, in schema order
    (see ``csrc/schemas.h``), and returns what the schema returns. ``unsupported`` maps
    ``(op, dtype, device_type)`` to the reason the backend cannot compute that op in that dtype
    there (``op`` may be ``"moe_forward"``, the backend's fused layer); :func:`unsupported_reason`
    reports it.
    """
    unknown = set(ops) - set(OP_NAMES)
    if unknown:
        raise ValueError(f"moe_ops: unknown op names {sorted(unknown)} for backend {name!r}")
    b = _BACKENDS.get(name)
    if b is None:
        b = _BACKENDS[name] = Backend(name, frozenset(devices))
    else:
        b.devices = b.devices | frozenset(devices)
    b.ops.update(ops)
    b.unsupported.update(unsupported or {})


def register_fused_moe(name: str, fn: Callable) -> None:
    """Give backend ``name`` a fused whole-layer path, used by ``moe_forward`` (dropless)."""
    if name not in _BACKENDS:
        raise ValueError(f"moe_ops: register backend {name!r} before its fused path")
    _BACKENDS[name].fused_moe = fn


def resolve_fused_moe(device_type: str, backend: Optional[str] = None) -> Optional[Callable]:
    """The fused layer path of the chosen backend, or of the first automatic one that has one."""
    name = backend if backend is not None else envs.get("MOE_OPS_BACKEND")
    names = (name,) if name is not None else auto_order("moe_forward", device_type)
    for n in names:
        b = _load(n) if n in _LOADERS else None
        if b is not None and b.fused_moe is not None and device_type in b.devices:
            return b.fused_moe
    return None


def _load(name: str) -> Optional[Backend]:
    if name not in _LOADED:
        _LOADED.add(name)
        module = _LOADERS.get(name)
        if module is not None:
            try:
                importlib.import_module(module)
            except Exception as e:  # an unbuilt extension or missing triton is not fatal
                _LOAD_ERRORS[name] = f"{type(e).__name__}: {e}"
            # (each loader gives the op namespaces it defines their fakes and autograd formulas
            # itself, so this module imports nothing else of the package: no import cycle)
    return _BACKENDS.get(name)


def native_op(name: str) -> Optional[Callable]:
    """``torch.ops.moe_ops.<name>`` from the compiled extension, loading it first (its ops exist
    only once ``moe_ops._C`` is imported, which happens lazily), or None when the extension was
    not built or lacks the op (:func:`load_errors` says why). For the native-only ops
    (``fused_experts``, ``pack_experts``, ...) that live outside the backend table."""
    _load("cpu")
    import torch
    return getattr(torch.ops.moe_ops, name, None)  # an op namespace without the op: AttributeError


def load_errors() -> Dict[str, str]:
    """Why each unavailable backend failed to load (name -> message)."""
    for name in _LOADERS:
        _load(name)
    return dict(_LOAD_ERRORS)


def unsupported_reason(backend: str, op: str, dtype: Any, device: Any = "cpu") -> Optional[str]:
    """Why backend ``backend`` cannot compute ``op`` on ``dtype`` tensors on ``device`` (a device
    type such as ``"cpu"``, or a ``torch.device``), or None when nothing stops it.

    The reason is the backend's own declaration (e.g. the Triton interpreter's bfloat16
    ``tl.dot``), or that the backend is not available here. Whether the backend has a kernel for
    ``op`` at all is :func:`available_backends`'s question (``moe_forward`` falls back to other
    backends for ops one lacks)."""
    if backend not in _LOADERS and backend not in _BACKENDS:
        return f"no backend named {backend!r}; known: {sorted(_LOADERS)}"
    b = _load(backend) if backend in _LOADERS else _BACKENDS.get(backend)
    if b is None:
        return f"backend {backend!r} is not available here: {_LOAD_ERRORS.get(backend, 'not registered')}"
    return b.unsupported.get((op, dtype, getattr(device, "type", device)))


def available_backends(op: Optional[str] = None, device: Optional[str] = None) -> List[str]:
    """Names of the backends that can run here, optionally restricted to those that implement
    ``op`` for tensors on device type ``device`` ("cpu" / "cuda")."""
    out = []
    for name in _LOADERS:
        b = _load(name)
        if b is None or not b.ops:
            continue
        if op is not None and op not in b.ops:
            continue
        if device is not None and device not in b.devices:
            continue
        out.append(name)
    return out


def resolve(op: str, device_type: str, backend: Optional[str] = None, *, strict: bool = True) -> Callable:
    """The implementation of ``op`` to run for tensors on ``device_type``."""
    if op not in OP_NAMES:
        raise ValueError(f"moe_ops: unknown op {op!r}")
    name = backend if backend is not None else envs.get("MOE_OPS_BACKEND")
    if name is not None:
        if name not in _LOADERS:
            raise ValueError(f"moe_ops: unknown backend {name!r}; known: {sorted(_LOADERS)}")
        b = _load(name)
        if b is None:
            raise RuntimeError(f"moe_ops: backend {name!r} is not available here: "
                               f"{_LOAD_ERRORS.get(name, 'not registered')}")
        if device_type not in b.devices:
            raise ValueError(f"moe_ops: backend {name!r} runs on {sorted(b.devices)} tensors, "
                             f"got {device_type} tensors")
        if op in b.ops:
            return b.ops[op]
        if strict:
            raise NotImplementedError(f"moe_ops: backend {name!r} has no {op!r} kernel; "
                                      f"backends with one: {available_backends(op, device_type)}")
    for auto in auto_order(op, device_type):
        b = _load(auto)
        if b is not None and op in b.ops and device_type in b.devices:
            return b.ops[op]
    raise NotImplementedError(f"moe_ops: no backend implements {op!r} for {device_type} tensors")


def resolved_name(op: str, device_type: str, backend: Optional[str] = None, *, strict: bool = True) -> str:
    """Name of the backend :func:`resolve` picks (for logs and benchmarks)."""
    fn = resolve(op, device_type, backend, strict=strict)
    for name, b in _BACKENDS.items():
        if b.ops.get(op) is fn and device_type in b.devices:
            return name
    return "?"
