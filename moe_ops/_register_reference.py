"""Registers the pure-PyTorch reference (``moe_ops.reference``) as backend ``reference``."""
from . import backend, reference

backend.register("reference", ("cpu", "cuda"), {op: getattr(reference, op) for op in backend.OP_NAMES})
