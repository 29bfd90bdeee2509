"""``grouped_gemm`` and ``grouped_gemm_wgrad`` on every backend against the reference.

``test_op_matches_reference`` runs the shared per-op backend matrix (tests/op_matrix.py) for
``grouped_gemm``, ``grouped_gemm_wgrad``: every available backend but the reference, on fresh random inputs
compared with ``moe_ops.reference``.
"""
from __future__ import annotations

import pytest

from tests.op_matrix import params, run_case


@pytest.mark.parametrize("op,device,name,dtype,case,idx", params(("grouped_gemm", "grouped_gemm_wgrad")))
def test_op_matches_reference(op, device, name, dtype, case, idx):
    run_case(op, device, name, dtype, case, idx)
