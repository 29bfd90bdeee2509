"""``moe_ops.moe_forward`` against Hugging Face transformers' sparse MoE blocks.

Tiny randomly initialised Mixtral and Qwen3-MoE blocks are built directly from
``transformers.models.{mixtral,qwen3_moe}`` (no downloads) with the eager experts loop
(``experts_implementation="eager"``). Their layout is ours: ``experts.gate_up_proj[E, 2I, H]``
(rows ``[gate; up]``), ``experts.down_proj[E, H, I]``, router ``gate.weight[E, H]`` with
``router_logits = x @ gate.weight.T``, softmax in float32 then top-k; Mixtral always
renormalises the top-k weights, Qwen3 when ``norm_topk_prob``.

float32 must agree tightly. In bfloat16 HF rounds in more places than we do (expert
activations, Qwen3's weights cast to bf16, bf16 ``index_add_``), so both are judged against the
block run in float64: our error may be at most twice HF's own bf16 error plus a small floor.
"""
from __future__ import annotations

import pytest
import torch

import moe_ops
from moe_ops.backend import unsupported_reason

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.configuration_mixtral import MixtralConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

H = 32


def _mixtral(E, k):
    cfg = MixtralConfig(hidden_size=H, intermediate_size=48, num_local_experts=E, num_experts_per_tok=k,
                        hidden_act="silu", router_jitter_noise=0.0, experts_implementation="eager")
    return MixtralSparseMoeBlock(cfg), True


def _qwen3(E, k, norm):
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=24, num_experts=E, num_experts_per_tok=k,
                         norm_topk_prob=norm, hidden_act="silu", experts_implementation="eager")
    return Qwen3MoeSparseMoeBlock(cfg), norm


MODELS = {
    "mixtral-E8-k2": lambda: _mixtral(8, 2),
    "qwen3-E16-k4-norm": lambda: _qwen3(16, 4, True),
    "qwen3-E12-k3-nonorm": lambda: _qwen3(12, 3, False),
}


def _init(block, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (1.0 / p.shape[-1]) ** 0.5)
    return block.eval()


def _ours(block, x, renormalize, backend):
    x2 = x.reshape(-1, x.shape[-1])
    logits = torch.nn.functional.linear(x2, block.gate.weight)  # exactly what the HF router computes
    out = moe_ops.moe_forward(x2, logits, block.experts.gate_up_proj, block.experts.down_proj,
                              block.gate.top_k, renormalize=renormalize, backend=backend)
    return out.reshape(x.shape)


def _backends():
    names = ["reference"] + [b for b in moe_ops.available_backends(device="cpu") if b != "reference"]
    return names


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("model", list(MODELS))
def test_float32_matches_hf(model, backend):
    block, renorm = MODELS[model]()
    _init(block, seed=1)
    x = torch.randn(3, 11, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = block(x)
        got = _ours(block, x, renorm, backend)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("model", list(MODELS))
def test_bfloat16_close_to_hf(model, backend):
    if unsupported_reason(backend, "grouped_gemm", torch.bfloat16) or \
            unsupported_reason(backend, "moe_forward", torch.bfloat16):
        pytest.skip(f"{backend}: no bf16 grouped_gemm here")
    block, renorm = MODELS[model]()
    _init(block, seed=3)
    x = torch.randn(4, 16, H, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        blk16 = block.to(torch.bfloat16)
        x16 = x.to(torch.bfloat16)
        hf16 = blk16(x16)
        got = _ours(blk16, x16, renorm, backend)
        # float64 ground truth from the same bf16 weights/inputs and the same (bf16) routing
        logits = torch.nn.functional.linear(x16.reshape(-1, H), blk16.gate.weight)
        w, ids = moe_ops.topk_gating(logits, blk16.gate.top_k, renormalize=renorm, backend="reference")
        hf_ids = blk16.gate(x16.reshape(-1, H))[2]
        # same expert sets (bf16 logits tie exactly at times; torch.topk orders ties arbitrarily)
        assert torch.equal(ids.long().sort(1).values, hf_ids.sort(1).values), "bf16 routing differs from HF"
        x64 = x16.double().reshape(-1, H)
        gu, dn = blk16.experts.gate_up_proj.double(), blk16.experts.down_proj.double()
        want = torch.zeros_like(x64)
        for j in range(ids.shape[1]):
            e = ids[:, j].long()
            h = torch.einsum("th,tih->ti", x64, gu[e])
            gate, up = h.chunk(2, dim=-1)
            want += w[:, j:j + 1].double() * torch.einsum("ti,thi->th", torch.nn.functional.silu(gate) * up, dn[e])
    assert got.dtype == torch.bfloat16 and got.shape == hf16.shape
    got64, hf64 = got.double().reshape(-1, H), hf16.double().reshape(-1, H)
    err_ours = (got64 - want).abs().max().item()
    err_hf = (hf64 - want).abs().max().item()
    floor = 2 ** -8 * want.abs().max().item()
    print(f"{model}: bf16 max error vs float64: ours {err_ours:.3g}, HF eager {err_hf:.3g}")
    assert err_ours <= 2 * err_hf + floor, f"ours {err_ours:.3g} vs HF's own bf16 error {err_hf:.3g}"
    torch.testing.assert_close(got, hf16, rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_qwen3_routing_semantics_match():
    """Same experts and weights as HF's router, in its column order."""
    block, _ = _qwen3(16, 4, True)
    _init(block, seed=5)
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits, hf_w, hf_ids = block.gate(x)
        w, ids = moe_ops.topk_gating(logits, 4, renormalize=True, backend="reference")
    assert torch.equal(ids.long(), hf_ids)
    torch.testing.assert_close(w, hf_w, rtol=1e-6, atol=1e-7)
