"""The automatic backend per (GPU arch, op): ``moe_ops/auto_backend.json`` and
``moe_ops.backend.auto_order``. Until the GPU check measures them, the design defaults hold
(issue 16): Triton's GEMM and fused layer first on Hopper, the CUDA ones on Ampere; every other
op keeps ``AUTO_ORDER``."""
from __future__ import annotations

import json

import pytest

from moe_ops import backend

GEMM_OPS = ("grouped_gemm", "grouped_gemm_wgrad", "moe_forward")


def test_table_names_known_backends_and_ops():
    table = json.load(open(backend._AUTO_TABLE))
    for arch, picks in table["cuda"].items():
        assert arch.startswith("sm_") and arch[3:].isdigit(), arch
        assert picks["source"] == "design" or picks["source"].startswith("measured"), (arch, picks["source"])
        for op, name in picks.items():
            if op == "source":
                continue
            assert op in backend.OP_NAMES or op == "moe_forward", (arch, op)
            assert name in backend.AUTO_ORDER["cuda"], (arch, op, name)


@pytest.mark.parametrize("op", GEMM_OPS)
def test_design_defaults(op):
    assert backend.auto_order(op, "cuda", arch="sm_90")[0] == "triton"
    assert backend.auto_order(op, "cuda", arch="sm_80")[0] == "cuda"
    # the rest of the order is kept, so a missing first choice still falls back
    assert set(backend.auto_order(op, "cuda", arch="sm_90")) == set(backend.AUTO_ORDER["cuda"])


@pytest.mark.parametrize("op", ["topk_gating", "permute", "capacity_dispatch"])
def test_other_ops_keep_the_device_order(op):
    for arch in ("sm_80", "sm_90", "sm_120"):
        assert backend.auto_order(op, "cuda", arch=arch) == backend.AUTO_ORDER["cuda"]


def test_unknown_arch_and_cpu_keep_the_device_order():
    assert backend.auto_order("grouped_gemm", "cuda", arch="sm_999") == backend.AUTO_ORDER["cuda"]
    assert backend.auto_order("grouped_gemm", "cpu", arch="sm_90") == backend.AUTO_ORDER["cpu"]


def test_resolve_follows_the_table(monkeypatch):
    """resolve() on CUDA tensors takes the table's pick when that backend has the op."""
    calls = []
    monkeypatch.setitem(backend._BACKENDS, "triton", backend.Backend("triton", frozenset({"cuda", "cpu"}),
                                                                    {"grouped_gemm": lambda *a: calls.append("t")}))
    monkeypatch.setitem(backend._BACKENDS, "cuda", backend.Backend("cuda", frozenset({"cuda"}),
                                                                  {"grouped_gemm": lambda *a: calls.append("c")}))
    monkeypatch.setattr(backend, "_LOADED", set(backend._LOADERS))
    monkeypatch.setattr(backend, "_cuda_arch", lambda: "sm_90")
    backend.resolve("grouped_gemm", "cuda")()
    monkeypatch.setattr(backend, "_cuda_arch", lambda: "sm_80")
    backend.resolve("grouped_gemm", "cuda")()
    assert calls == ["t", "c"]
