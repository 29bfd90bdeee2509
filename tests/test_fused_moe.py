"""``moe_forward``'s fused whole-layer path (``backend.register_fused_moe``) on every backend that has
one, against the layer composed of reference ops.

The fused paths (``triton``: triton_kernels/fused_moe.py; ``cpu``: ``moe_ops::fused_experts``)
keep the unfused pipeline's rounding points, so they are judged like every kernel: error vs the
float64 reference at most twice the reference's own error in that dtype. float32 runs twice and
must give the same bits. The Triton layer's launch count (independent of E) is checked here too.
"""
from __future__ import annotations

import pytest
import torch

import moe_ops
from moe_ops import backend as _backend
from tests.backends import DEVICES
from tests.compare import assert_bitwise_equal, assert_close_to_reference, reference_layer
from tests.inputs import make_layer, seed_for

LAYER = [
    # (T, H, I, E, k, extra kwargs)
    (13, 32, 16, 8, 2, {}),
    (1, 16, 32, 4, 1, {"activation": "geglu"}),                       # T=1, k=1: direct scatter
    (9, 16, 16, 64, 8, {"scoring": "sigmoid", "renormalize": True, "n_group": 8, "topk_group": 4}),
    (40, 16, 16, 5, 2, {"renormalize": True}),                        # segments straddle 16-row tiles
    (0, 16, 16, 4, 2, {}),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def fused_backends(device):
    """Backends whose fused layer runs ``device`` tensors here."""
    return [name for name in moe_ops.available_backends(device=device)
            if _backend.resolve_fused_moe(device, name) is not None]


PARAMS = [pytest.param(device, name, id=f"{device}-{name}") for device in DEVICES for name in fused_backends(device)]


@pytest.mark.parametrize("case", LAYER, ids=lambda c: f"T{c[0]}-E{c[3]}-k{c[4]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("device,name", PARAMS)
def test_fused_moe_forward(device, name, dtype, case):
    reason = _backend.unsupported_reason(name, "moe_forward", dtype, device)
    if reason:
        pytest.skip(f"{name} does not support moe_forward in {dtype}: {reason}")
    T, H, I, E, k, kw = case
    x, logits, w1, w2 = make_layer(T, H, I, E, seed=seed_for("layer", case, str(dtype)), dtype=dtype, device=device)
    with torch.no_grad():
        got = moe_ops.moe_forward(x, logits, w1, w2, k, backend=name, **kw)
        if name == "triton":
            from moe_ops.triton_kernels import last_launch_count
            assert last_launch_count() == (0 if T == 0 else (6 if k == 1 else 7))
        if dtype == torch.float32:
            assert_bitwise_equal(got, moe_ops.moe_forward(x, logits, w1, w2, k, backend=name, **kw),
                                 f"fused moe_forward[{name}] (determinism)")
    lowp, hi = reference_layer(x, logits, w1, w2, k, **kw)
    assert_close_to_reference(got, lowp, hi, name=f"fused moe_forward[{name}]")
