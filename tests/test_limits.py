"""The argument limits are one set of values: csrc/arg_limits.h (exported by build_info()) and the
user-facing checks in moe_ops/ops.py must agree, and the errors must come from ops.py."""
import pytest
import torch

import moe_ops
from moe_ops import ops

_C = pytest.importorskip("moe_ops._C")


def test_python_and_cpp_limits_agree():
    limits = _C.build_info()["limits"]
    assert limits == {"max_k": ops.MAX_K, "max_experts": ops.MAX_EXPERTS, "int32_max": ops.INT32_MAX}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_k_limit_is_raised_by_ops_py(backend):
    E = ops.MAX_K + 8
    logits = torch.randn(4, E)
    w, ids = moe_ops.topk_gating(logits, ops.MAX_K, backend=backend)  # the limit itself is valid
    assert ids.shape == (4, ops.MAX_K)
    with pytest.raises(ValueError, match=rf"k must be <= {ops.MAX_K}\b"):
        moe_ops.topk_gating(logits, ops.MAX_K + 1, backend=backend)
    with pytest.raises(ValueError, match=r"k must be <= 3\b"):
        moe_ops.topk_gating(torch.randn(4, 3), 4, backend=backend)
