"""The by-value kernel parameter structs of csrc/kernels, mirrored in ctypes (how :mod:`.driver`
passes them to cuLaunchKernel), and the C++ ``static_assert``s that prove the mirror: NVRTC
compiles :func:`layout_check_source` in tests/test_nvrtc_compile.py, so a field added to a
kernel struct without its mirror here fails CI, not a GPU run."""
from __future__ import annotations

import ctypes
from typing import Dict, Type


class GatingParams(ctypes.Structure):  # topk_gating.cuh
    _fields_ = [("logits", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("weights", ctypes.c_void_p),
                ("ids", ctypes.c_void_p), ("T", ctypes.c_longlong), ("E", ctypes.c_int), ("k", ctypes.c_int),
                ("scoring", ctypes.c_int), ("renormalize", ctypes.c_int), ("n_group", ctypes.c_int),
                ("topk_group", ctypes.c_int), ("scaling", ctypes.c_float)]


class RankSeq(ctypes.Structure):  # expert_rank.cuh
    _fields_ = [("ids", ctypes.c_void_p), ("T", ctypes.c_longlong), ("k", ctypes.c_int), ("kmajor", ctypes.c_int)]


class CombineSource(ctypes.Structure):  # row_combine.cuh
    _fields_ = [("slot_rows", ctypes.c_void_p), ("ids", ctypes.c_void_p), ("slot_pos", ctypes.c_void_p),
                ("E", ctypes.c_int), ("C", ctypes.c_int), ("nrows", ctypes.c_longlong), ("slot_order", ctypes.c_bool)]


class GroupedGemmParams(ctypes.Structure):  # grouped_gemm.cuh
    _fields_ = [("a", ctypes.c_void_p), ("lda", ctypes.c_longlong), ("a_rows", ctypes.c_void_p),
                ("a_row_div", ctypes.c_int), ("b", ctypes.c_void_p), ("b_expert", ctypes.c_longlong),
                ("b_sk", ctypes.c_longlong), ("b_sn", ctypes.c_longlong), ("c", ctypes.c_void_p),
                ("ldc", ctypes.c_longlong), ("c_rows", ctypes.c_void_p), ("row_scale", ctypes.c_void_p),
                ("offs", ctypes.c_void_p), ("tiles", ctypes.c_void_p), ("E", ctypes.c_int), ("M", ctypes.c_longlong),
                ("N", ctypes.c_longlong), ("K", ctypes.c_longlong), ("act", ctypes.c_int)]


STRUCTS: Dict[str, Type[ctypes.Structure]] = {
    c.__name__: c for c in (GatingParams, RankSeq, CombineSource, GroupedGemmParams)}
# the header that defines each struct (its unit is where the layout is checked)
STRUCT_HEADERS = {"GatingParams": "topk_gating.cuh", "RankSeq": "expert_rank.cuh", "CombineSource": "row_combine.cuh",
                  "GroupedGemmParams": "grouped_gemm.cuh"}

SCALARS = {"i32": ctypes.c_int, "i64": ctypes.c_longlong, "f32": ctypes.c_float, "ptr": ctypes.c_void_p}


_CTYPE_NAMES = {ctypes.c_int: "int", ctypes.c_longlong: "long long", ctypes.c_float: "float", ctypes.c_bool: "bool"}

# NVRTC has no offsetof; the layout is pinned instead by each field's exact type, the order of the
# fields (a constexpr aggregate initialised in the mirror's order must read back field by field)
# and the total size -- with natural alignment on both sides, that fixes every offset.
_CHECK_PRELUDE = """namespace moe_ops_abi_check {
template <class A, class B> struct same { static constexpr bool value = false; };
template <class A> struct same<A, A> { static constexpr bool value = true; };
template <class A> struct is_ptr { static constexpr bool value = false; };
template <class A> struct is_ptr<A*> { static constexpr bool value = true; };
}
"""


def layout_check_source(name: str, corrupt: bool = False) -> str:
    """C++ that fails to compile unless kernel struct ``name`` matches its ctypes mirror: field
    types, field order, size (``corrupt``: the last field's probe value is off, which must fail
    -- the check of the check)."""
    cls = STRUCTS[name]
    full = f"moe_ops::kern::{name}"
    inits, checks = [], []
    for i, (field, ctype) in enumerate(cls._fields_):
        where = f"{name}.{field} differs from moe_ops/nvrtc/abi.py"
        if ctype is ctypes.c_void_p:
            inits.append("nullptr")
            checks.append(f"static_assert(is_ptr<decltype({full}::{field})>::value, \"{where} (not a pointer)\");")
        else:
            cname = _CTYPE_NAMES[ctype]
            off = corrupt and i == len(cls._fields_) - 1
            if ctype is ctypes.c_bool:
                inits.append("true")
                expect = "false" if off else "true"
            else:
                inits.append(f"({cname})({i + 1})")
                expect = i + 1 + (100 if off else 0)
            checks.append(f"static_assert(same<decltype({full}::{field}), {cname}>::value, \"{where} (type)\");")
            checks.append(f"static_assert(probe_{name}.{field} == ({cname})({expect}), \"{where} (order)\");")
    lines = [_CHECK_PRELUDE, "namespace moe_ops_abi_check {",
             f"constexpr {full} probe_{name}{{{', '.join(inits)}}};",
             f"static_assert(sizeof({full}) == {ctypes.sizeof(cls)}, \"{name} size differs from moe_ops/nvrtc/abi.py\");"]
    return "\n".join(lines + checks + ["}"]) + "\n"
