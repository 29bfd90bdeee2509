"""The backends a test runs on:

    DEVICES                               ["cpu"] + ["cuda"] when available
    backends_for(op, device)              available backends for op/device, minus "reference"
    unsupported_reason(backend, op, dtype, device)  why a backend skips a dtype for an op, or
                                          None. A backend declares this in the module that
                                          registers it (or ``moe_ops.<name>_kernels``) with a
                                          module-level ``UNSUPPORTED_DTYPES = {(op, dtype):
                                          "reason"}`` or a ``supported(op, dtype, device_type)``
                                          function; tests also read ``UNSUPPORTED`` below, keyed
                                          ``(backend, op, dtype)``.
"""
from __future__ import annotations

import sys
from typing import Dict, Optional, Tuple

import torch

import moe_ops
from moe_ops import backend as _backend

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Test-side declarations (backend, op, dtype) -> reason; backends should prefer their own
# module-level UNSUPPORTED_DTYPES (see module docstring).
UNSUPPORTED: Dict[Tuple[str, str, torch.dtype], str] = {}


def backends_for(op: str, device: str) -> list:
    """Backends (other than the oracle) that implement ``op`` for ``device`` tensors here."""
    return [b for b in moe_ops.available_backends(op, device) if b != "reference"]


def unsupported_reason(backend: str, op: str, dtype: torch.dtype, device: str = "cpu") -> Optional[str]:
    """Why ``backend`` does not support ``dtype`` for ``op`` on ``device`` (None if it does).

    Looked up, in order: ``UNSUPPORTED[(backend, op, dtype)]`` (test side); then in the module
    that registers the backend (``moe_ops.backend._LOADERS[backend]``) and in
    ``moe_ops.<backend>_kernels`` (e.g. ``moe_ops.triton_kernels``), whichever are imported:
    a dict/set ``UNSUPPORTED_DTYPES`` of ``(op, dtype)`` (dict values are the reason), or a
    function ``supported(op, dtype, device_type) -> bool``."""
    if (backend, op, dtype) in UNSUPPORTED:
        return UNSUPPORTED[(backend, op, dtype)]
    if _backend._load(backend) is None:
        return None
    for name in (_backend._LOADERS.get(backend), f"moe_ops.{backend}_kernels"):
        module = sys.modules.get(name) if name else None
        if module is None:
            continue
        declared = getattr(module, "UNSUPPORTED_DTYPES", None)
        if declared and (op, dtype) in declared:
            return declared[(op, dtype)] if isinstance(declared, dict) else f"declared by {name}"
        supported = getattr(module, "supported", None)
        if callable(supported) and not supported(op, dtype, device):
            return f"{name}.supported() says no"
    return None
