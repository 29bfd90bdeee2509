"""The backends a test runs on:

    DEVICES                               ["cpu"] + ["cuda"] when available
    backends_for(op, device)              available backends for op/device, minus "reference"

Whether a backend can compute an (op, dtype) on a device is the backend's own declaration:
``moe_ops.backend.unsupported_reason(backend, op, dtype, device)`` (None = it runs).
"""
from __future__ import annotations

import torch

import moe_ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(op: str, device: str) -> list:
    """Backends (other than the oracle) that implement ``op`` for ``device`` tensors here."""
    return [b for b in moe_ops.available_backends(op, device) if b != "reference"]
