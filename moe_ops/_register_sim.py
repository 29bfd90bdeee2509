"""Registers backend ``cuda_sim``: the CUDA kernels run on CPU tensors by the SIMT host emulator.

The emulator is a test build (csrc/sim). Its library is ``MOE_OPS_SIM_LIB`` if set (the
sanitizer builds are selected that way), else the ``_C_sim`` library next to this file.
"""
import glob
import os

import torch

from . import _C  # noqa: F401  (the sim library defines its own namespace, but shares schemas)
from . import autograd, backend, envs
from .ops import cuda_fused_moe

_path = envs.get("MOE_OPS_SIM_LIB")
if not _path:
    found = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "_C_sim*.so")))
    if not found:
        raise ImportError("moe_ops: the SIMT emulator library _C_sim is not built (make sim)")
    _path = found[0]
torch.ops.load_library(_path)

backend.register("cuda_sim", ("cpu",), {
    op: getattr(torch.ops.moe_ops_sim, op) for op in backend.OP_NAMES
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_ops_sim::{op}", "CPU")})
backend.register_fused_moe("cuda_sim", cuda_fused_moe("cuda_sim", torch.ops.moe_ops_sim.fused_experts))
autograd.register_all()  # moe_ops_sim, and moe_ops which importing _C defined
