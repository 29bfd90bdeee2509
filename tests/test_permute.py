"""``permute`` and ``unpermute`` (the dropless dispatch and combine) on every backend.

Every available backend but the reference, on fresh random inputs, against ``moe_ops.reference``:
the shared per-op backend matrix of tests/op_matrix.py.
"""
from tests.op_matrix import matrix_test

test_op_matches_reference = matrix_test(("permute", "unpermute"))
