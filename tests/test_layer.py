"""``moe_ops.MoE``: output vs a per-token float64 loop, aux losses vs their formulas, gradients
of every backend vs the reference, and ``torch.compile(fullgraph=True, dynamic=True)``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_ops
from moe_ops import autograd as moe_autograd
from moe_ops.layer import MoE
from tests import refop_lib

CONFIGS = {
    "softmax": dict(scoring="softmax"),
    "softmax_renorm_shared": dict(scoring="softmax", renormalize=True, shared_intermediate_size=12,
                                  shared_expert_gate=True),
    "deepseek": dict(scoring="sigmoid", n_group=2, topk_group=1, correction_bias=True, routed_scaling_factor=2.5,
                     shared_intermediate_size=8),
    "capacity_kmajor": dict(scoring="softmax", renormalize=True, capacity_factor=0.75),
    "capacity_token_major_geglu": dict(scoring="softmax", capacity_factor=1.0, priority="token_major",
                                       activation="geglu", min_capacity=1),
}
H, I, E, K = 16, 8, 8, 2


def make(cfg, dtype=torch.float32, seed=0, num_experts=E, **kw):
    torch.manual_seed(seed)
    m = MoE(H, I, num_experts, K, dtype=dtype, **CONFIGS[cfg], **kw)
    if m.e_score_correction_bias is not None:
        m.e_score_correction_bias.copy_(torch.randn(num_experts) * 0.05)
    return m


def oracle(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token float64 loop straight from the definition; routing (ids, kept slots) taken from
    the reference ops so near-ties cannot flip, the arithmetic all recomputed here."""
    h = x.reshape(-1, H).double()
    T = h.shape[0]
    logits = F.linear(h.to(m.gate.weight.dtype), m.gate.weight).double()
    bias = m.e_score_correction_bias
    _, ids = moe_ops.topk_gating(logits.float(), K, scoring=m.scoring, renormalize=m.renormalize,
                                 n_group=m.n_group, topk_group=m.topk_group, correction_bias=bias,
                                 scaling_factor=m.routed_scaling_factor, backend="reference")
    ids = ids.long()
    scores = logits.softmax(-1) if m.scoring == "softmax" else logits.sigmoid()
    w = scores.gather(1, ids)
    if m.renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * m.routed_scaling_factor
    kept = torch.ones_like(ids, dtype=torch.bool)
    if m.capacity_factor is not None:
        C = moe_ops.expert_capacity(T, K, E, m.capacity_factor, min_capacity=m.min_capacity)
        d = moe_ops.capacity_dispatch(h, ids, E, C, priority=m.priority, backend="reference")
        kept = d.slot_pos >= 0
    act = F.silu if m.activation == "swiglu" else F.gelu
    out = torch.zeros_like(h)
    for t in range(T):
        for j in range(K):
            if not kept[t, j]:
                continue
            e = int(ids[t, j])
            g, u = (m.w_gate_up[e].double() @ h[t]).chunk(2)
            out[t] += w[t, j] * (m.w_down[e].double() @ (act(g) * u))
    if m.shared_experts is not None:
        se = m.shared_experts
        g, u = F.linear(h, se.gate_up_proj.weight.double()).chunk(2, dim=-1)
        s = F.linear(act(g) * u, se.down_proj.weight.double())
        if m.shared_gate is not None:
            s = torch.sigmoid(F.linear(h, m.shared_gate.weight.double())) * s
        out += s
    return out.reshape(x.shape)


TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_matches_oracle(cfg, dtype):
    m = make(cfg, dtype)
    x = torch.randn(3, 5, H).to(dtype)
    want = oracle(m, x)
    for aux in (False, True):
        got = m(x, return_aux=aux)
        got = got[0] if aux else got
        assert got.dtype == dtype and got.shape == x.shape
        scale = float(want.detach().abs().max())
        torch.testing.assert_close(got.double(), want, atol=TOL[dtype] * scale, rtol=TOL[dtype])


def test_capacity_drops_tokens():
    """The capacity mode really drops: with a tiny capacity it differs from dropless."""
    m = make("capacity_kmajor")
    x = torch.randn(20, H)
    dropless = make("capacity_kmajor")
    dropless.capacity_factor = None
    assert not torch.allclose(m(x), dropless(x))


def test_aux_losses():
    m = make("softmax", z_loss_coef=1e-3)
    x = torch.randn(4, 6, H)
    out, aux = m(x, return_aux=True)
    logits = F.linear(x.reshape(-1, H), m.gate.weight)
    torch.testing.assert_close(aux.router_logits, logits)
    probs = logits.softmax(-1)
    _, sel = torch.topk(logits, K, dim=-1)
    # transformers' load_balancing_loss_func for one layer, no attention mask:
    mask = F.one_hot(sel, E).float()                      # [T, k, E]
    want_lb = E * torch.sum(mask.mean(0) * probs.mean(0).unsqueeze(0))
    torch.testing.assert_close(aux.load_balancing_loss, want_lb)
    torch.testing.assert_close(aux.z_loss, torch.logsumexp(logits, -1).pow(2).mean())
    torch.testing.assert_close(aux.loss, 0.01 * want_lb + 1e-3 * aux.z_loss)
    assert aux.tokens_per_expert.sum() == 24 * K
    # the load-balancing loss trains the router
    aux.loss.backward()
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0


def test_update_correction_bias():
    m = make("deepseek")
    before = m.e_score_correction_bias.clone()
    load = torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 6])
    m.update_correction_bias(load, rate=0.5)
    d = m.e_score_correction_bias - before
    assert d[0] == -0.5 and d[1] == 0.5 and d[7] == -0.5


def test_bad_input():
    m = make("softmax")
    with pytest.raises(ValueError):
        m(torch.randn(4, H + 1))
    with pytest.raises(ValueError):
        MoE(H, I, E, E + 1)


def _layer_backends():
    moe_autograd.register_all()
    return ["reference", "testref"] + [b for b in moe_ops.available_backends("permute", "cpu")
                                       if b != "reference"]


@pytest.mark.parametrize("backend", [b for b in _layer_backends() if b != "reference"])
@pytest.mark.parametrize("cfg", ["softmax_renorm_shared", "deepseek", "capacity_kmajor"])
def test_grads_match_reference(cfg, backend, monkeypatch):
    if backend == "testref":
        refop_lib.register_backend(monkeypatch)
    x = torch.randn(12, H)
    gout = torch.randn(12, H)
    grads = {}
    for b in ("reference", backend):
        m = make(cfg, backend=b)
        xi = x.clone().requires_grad_()
        out, aux = m(xi, return_aux=True)
        ((out * gout).sum() + aux.loss).backward()
        grads[b] = [xi.grad] + [p.grad for p in m.parameters()]
    for g, rg in zip(grads[backend], grads["reference"]):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", _layer_backends())
def test_compile_fullgraph_dynamic(backend, monkeypatch):
    """No graph breaks (fullgraph raises on one), equal output and gradients, two token counts."""
    if backend == "testref":
        refop_lib.register_backend(monkeypatch)
    torch._dynamo.reset()
    m = make("softmax_renorm_shared", backend=backend, num_experts=4)  # small E: the reference unrolls E
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    for T, aux in ((6, False), (11, False), (7, True)):
        x = torch.randn(T, H, requires_grad=True)

        def loss(fn):
            if not aux:
                out = fn(x)
                return out, out.sum()
            out, a = fn(x, return_aux=True)
            return out, out.sum() + a.loss
        want, lw = loss(m)
        (gx_want,) = torch.autograd.grad(lw, x)
        got, lg = loss(compiled)
        (gx,) = torch.autograd.grad(lg, x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, gx_want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in _layer_backends() if b != "testref"])
def test_compile_inductor_aux(backend, monkeypatch):
    """Inductor (the default compile backend), inference graph, with the aux losses (their
    gradients are covered by the aot_eager test above: inductor's C++ codegen is slow on CPU)."""
    if backend == "testref":
        refop_lib.register_backend(monkeypatch)
    torch._dynamo.reset()
    m = make("deepseek", backend=backend, num_experts=4)
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    x = torch.randn(9, H)
    with torch.no_grad():
        out, aux = compiled(x, return_aux=True)
        want, want_aux = m(x, return_aux=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.loss, want_aux.loss, atol=1e-6, rtol=1e-5)
