"""moe_ops in Hugging Face transformers 5.x: tiny randomly initialised models of each MoE family
(no downloads), stock (eager experts, stock routers) vs patched by ``apply_moe_ops``.

Per family: logits match, greedy ``generate()`` gives the same tokens, ``aux_loss`` is equal,
and one training step gives matching gradients for every parameter. Plus: the experts
implementation through ``from_pretrained``/``set_experts_implementation``, EP sentinel ids, the
non-gated layout flag, and checkpoint compatibility (state_dict keys unchanged).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import moe_ops

transformers = pytest.importorskip("transformers")

from moe_ops.integrations import transformers as moe_hf  # noqa: E402
from tests.cpu_isa import avx512_emulation_built, rerun_with_emulated_avx512  # noqa: E402

V, H, L = 96, 32, 2


def _cfg_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    return MixtralForCausalLM, MixtralConfig(
        vocab_size=V, hidden_size=H, intermediate_size=48, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.02)


def _cfg_qwen2():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    return Qwen2MoeForCausalLM, Qwen2MoeConfig(
        vocab_size=V, hidden_size=H, intermediate_size=48, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
        num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, output_router_logits=True,
        router_aux_loss_coef=0.02)


def _cfg_qwen3():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    return Qwen3MoeForCausalLM, Qwen3MoeConfig(
        vocab_size=V, hidden_size=H, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=3,
        norm_topk_prob=True, output_router_logits=True, router_aux_loss_coef=0.02)


def _cfg_olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM
    return OlmoeForCausalLM, OlmoeConfig(
        vocab_size=V, hidden_size=H, intermediate_size=24, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        output_router_logits=True, router_aux_loss_coef=0.02)


def _cfg_deepseek(**routing):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    kw = {**dict(num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5), **routing}
    return DeepseekV3ForCausalLM, DeepseekV3Config(
        vocab_size=V, hidden_size=H, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=0, norm_topk_prob=True, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, rope_scaling=None, **kw)


def _cfg_deepseek_hf_tiny():
    """transformers' own DeepSeek-V3 test config routes k=8 of 8 experts with 1 of 2 groups kept:
    more experts than the kept groups hold, which stock top-k fills with masked ones."""
    return _cfg_deepseek(num_experts_per_tok=8, n_group=2, topk_group=1, routed_scaling_factor=1.0)


def _cfg_gpt_oss():
    from transformers import GptOssConfig, GptOssForCausalLM
    return GptOssForCausalLM, GptOssConfig(
        vocab_size=V, hidden_size=H, intermediate_size=24, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], output_router_logits=True,
        router_aux_loss_coef=0.02)


def _cfg_llama4():
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    return Llama4ForCausalLM, Llama4TextConfig(
        vocab_size=V, hidden_size=H, intermediate_size=24, intermediate_size_mlp=48, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        interleave_moe_layer_step=1, attention_chunk_size=16, no_rope_layers=[1, 0])


FAMILIES = {"mixtral": _cfg_mixtral, "qwen2_moe": _cfg_qwen2, "qwen3_moe": _cfg_qwen3, "olmoe": _cfg_olmoe,
            "deepseek_v3": _cfg_deepseek, "deepseek_v3_hf_tiny": _cfg_deepseek_hf_tiny, "gpt_oss": _cfg_gpt_oss, "llama4": _cfg_llama4}


def build(family, seed=0):
    """Stock model (eager experts) with well-spread random weights (HF's 0.02-std init makes
    router logits nearly tied; near-ties would make routing compare tie-break rules, not math)."""
    cls, cfg = FAMILIES[family]()
    cfg.pad_token_id = 0
    cfg.use_cache = True
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    if hasattr(model, "set_experts_implementation") and model._can_set_experts_implementation():
        model.set_experts_implementation("eager")
    return model


def patched(model):
    return moe_hf.apply_moe_ops(copy.deepcopy(model))


def _ids(batch=2, seq=7, seed=3):
    return torch.randint(1, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _assert_patched(model, family):
    names = {type(m).__name__ for m in model.modules()}
    assert any(n.startswith("MoeOps") for n in names), names
    if family != "llama4":
        assert model.config._experts_implementation == "moe_ops"


class _Count:
    """Counts calls of moe_ops' public ops made by the integration module."""

    def __init__(self, monkeypatch):
        self.n = {}
        for name in ("topk_gating", "permute", "grouped_gemm", "unpermute"):
            fn = getattr(moe_hf.ops, name)
            monkeypatch.setattr(moe_hf.ops, name, self._wrap(name, fn))
        # the CPU fused expert path (one call per layer instead of permute/2 GEMMs/unpermute)
        monkeypatch.setattr(moe_hf, "cpu_fused_experts", self._wrap("cpu_fused_experts", moe_hf.cpu_fused_experts))

    def experts_ran(self, layers):
        """Every MoE layer ran moe_ops' experts: op by op, or the CPU fused op."""
        return self.n.get("grouped_gemm", 0) == 2 * layers or self.n.get("cpu_fused_experts", 0) == layers

    def _wrap(self, name, fn):
        def run(*a, **k):
            self.n[name] = self.n.get(name, 0) + 1
            return fn(*a, **k)
        return run


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_generate_aux(family, monkeypatch):
    stock = build(family)
    fast = patched(stock)
    _assert_patched(fast, family)
    ids = _ids()
    count = _Count(monkeypatch)
    with torch.no_grad():
        a = stock(ids)
        assert not count.n, "the stock model must not run moe_ops"
        b = fast(ids)
    # every MoE layer ran the fused router and the moe_ops experts
    assert count.n.get("topk_gating", 0) == L and count.experts_ran(L), count.n
    torch.testing.assert_close(b.logits, a.logits, atol=2e-5, rtol=2e-5)
    if getattr(a, "aux_loss", None) is not None:
        torch.testing.assert_close(b.aux_loss, a.aux_loss, atol=1e-6, rtol=1e-5)
    if getattr(a, "router_logits", None) is not None and a.router_logits:
        for ra, rb in zip(a.router_logits, b.router_logits):
            torch.testing.assert_close(rb, ra)
    with torch.no_grad():
        ids = ids[:1]
        ga = stock.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        gb = fast.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_pack_cpu(family, monkeypatch):
    """apply_moe_ops(pack_cpu=True): SiLU-gated experts run fused_experts_packed on weights packed
    on first use (re-packed after an update); GPT-OSS's custom gate keeps the op-by-op path."""
    stock = build(family)
    fast = moe_hf.apply_moe_ops(copy.deepcopy(stock), pack_cpu=True)
    ids = _ids()
    packs = []
    real_pack = moe_hf.ops.pack_experts
    monkeypatch.setattr(moe_hf.ops, "pack_experts", lambda *a: packs.append(1) or real_pack(*a))
    with torch.no_grad():
        a = stock(ids)
        b = fast(ids)
        torch.testing.assert_close(b.logits, a.logits, atol=5e-5, rtol=5e-5)
        experts = [m for m in fast.modules() if hasattr(m, "_moe_ops_pack_cpu")]
        assert experts and all(m._moe_ops_pack_cpu for m in experts)
        if family == "gpt_oss":
            assert not packs and all(m._moe_ops_packed is None for m in experts)
            return
        assert len(packs) == L and all(m._moe_ops_packed is not None for m in experts)
        fast(ids)
        assert len(packs) == L  # packed once
        for m in experts:
            m.down_proj.mul_(0.5)
        for m in [m for m in stock.modules() if hasattr(m, "down_proj") and hasattr(m, "num_experts")]:
            m.down_proj.mul_(0.5)
        c, d = stock(ids), fast(ids)
        assert len(packs) == 2 * L  # re-packed after the update
        torch.testing.assert_close(d.logits, c.logits, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_step_gradients(family):
    stock = build(family).train()
    fast = patched(stock).train()
    ids = _ids(seed=5)
    la = stock(ids, labels=ids).loss
    lb = fast(ids, labels=ids).loss
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    la.backward()
    lb.backward()
    pa, pb = dict(stock.named_parameters()), dict(fast.named_parameters())
    assert pa.keys() == pb.keys()
    checked = 0
    for name, p in pa.items():
        q = pb[name]
        if p.grad is None:
            assert q.grad is None or not q.grad.abs().any(), name
            continue
        assert q.grad is not None, f"{name}: no gradient through moe_ops"
        scale = max(1e-3, float(p.grad.abs().max()))
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4 * scale, rtol=1e-3, msg=lambda m: f"{name}: {m}")
        checked += 1
    routers = [n for n in pa if ("gate.weight" in n or "router.weight" in n) and "shared" not in n]
    assert routers and all(pb[n].grad is not None and pb[n].grad.abs().any() for n in routers)
    assert checked > 10


def test_bfloat16_logits_close(monkeypatch):
    """bf16 models: same routing/generation within bf16 tolerance (Mixtral and GPT-OSS layouts),
    op by op: the CPU fused path rounds the gate once (float32 SwiGLU) where transformers rounds
    twice, and in bf16 such a difference can flip a near-tied route of a later layer, which an
    end-to-end tolerance cannot absorb -- test_bfloat16_fused_experts_layerwise covers it."""
    monkeypatch.setattr(moe_hf, "_cpu_fused_ok", lambda *a: False)
    for family in ("mixtral", "gpt_oss"):
        stock = build(family).to(torch.bfloat16)
        fast = patched(stock)
        ids = _ids()
        with torch.no_grad():
            a, b = stock(ids).logits.float(), fast(ids).logits.float()
        torch.testing.assert_close(b, a, atol=5e-2 * float(a.abs().max()), rtol=5e-2)


def test_bfloat16_fused_experts_layerwise():
    """The CPU fused experts path against the op-by-op path on the same bf16 inputs, every layer."""
    fast = patched(build("mixtral").to(torch.bfloat16))
    experts = [m for m in fast.modules() if hasattr(m, "gate_up_proj")]
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp, out))) for m in experts]
    try:
        with torch.no_grad():
            fast(_ids())
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == L
    for mod, (x, ids, w), out in seen:
        with torch.no_grad():
            assert moe_hf._cpu_fused_ok(mod, x, mod.gate_up_proj, mod.down_proj, True, False, False, w)
            ref = moe_ops.ops.experts_forward(x.double(), w.double(), ids.int(), mod.gate_up_proj.double(),
                                          mod.down_proj.double(), backend="reference")
            opbyop = moe_ops.ops.experts_forward(x, w.float(), ids.int(), mod.gate_up_proj, mod.down_proj,
                                             backend="reference")
        err, ref_err = (out.double() - ref).abs().max(), (opbyop.double() - ref).abs().max()
        assert err <= 2 * ref_err + 1e-3 * float(ref.abs().max()), (float(err), float(ref_err))


def test_apply_to_a_bare_block():
    """apply_moe_ops on one MixtralSparseMoeBlock (no model around it, so no
    set_experts_implementation): its experts and router run on moe_ops, the output matches the
    unpatched block's, and remove_moe_ops restores the router."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    _, cfg = _cfg_mixtral()
    torch.manual_seed(0)
    blk = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():  # a bare module is not initialised by transformers' _init_weights
        for prm in blk.parameters():
            prm.copy_(torch.randn_like(prm) * 0.1)
    x = torch.randn(2, 5, cfg.hidden_size)
    with torch.no_grad():
        want = blk(x)
        want = want[0] if isinstance(want, tuple) else want
        assert torch.isfinite(want).all()
        moe_hf.apply_moe_ops(blk)
        assert blk.experts.config._experts_implementation == moe_hf.EXPERTS_IMPLEMENTATION
        calls = []
        orig = moe_hf.moe_ops_experts_forward
        try:
            moe_hf.moe_ops_experts_forward = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
            moe_hf.register_experts_implementation()
            got = blk(x)
        finally:
            moe_hf.moe_ops_experts_forward = orig
            moe_hf.register_experts_implementation()
        got = got[0] if isinstance(got, tuple) else got
    assert calls, "the block's experts did not run on moe_ops"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    moe_hf.remove_moe_ops(blk)


@pytest.mark.skipif(not avx512_emulation_built(),
                    reason="no SIMDe build: no emulated AVX-512 kernels")
def test_bfloat16_fused_experts_layerwise_avx512_emulated():
    """The layerwise bf16 check again with the AVX512-BF16 kernels on (emulated here, see
    tests/cpu_isa.rerun_with_emulated_avx512)."""
    rerun_with_emulated_avx512(os.path.abspath(__file__), "test_bfloat16_fused_experts_layerwise and not avx512")


def test_checkpoint_roundtrip_and_from_pretrained(tmp_path):
    """Patched models keep parameter names; ``from_pretrained(..., experts_implementation="moe_ops")``
    and ``set_experts_implementation`` select the registered implementation."""
    stock = build("qwen3_moe")
    fast = patched(stock)
    assert list(fast.state_dict()) == list(stock.state_dict())
    fast.save_pretrained(tmp_path)
    cls = type(stock)
    loaded = cls.from_pretrained(tmp_path, experts_implementation="moe_ops")
    assert loaded.config._experts_implementation == "moe_ops"
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, stock(ids).logits, atol=2e-5, rtol=2e-5)
    loaded.set_experts_implementation("eager")
    assert loaded.config._experts_implementation == "eager"
    loaded.set_experts_implementation("moe_ops")
    assert loaded.config._experts_implementation == "moe_ops"
    moe_hf.remove_moe_ops(fast)
    assert not any(type(m).__name__.startswith("MoeOps") for m in fast.modules())


def _experts_module(family):
    model = build(family)
    return next(m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "num_experts"))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_expert_parallel_sentinels(family):
    """Ids >= num_experts (EP sentinels) are skipped: the result equals the eager loop over the
    valid slots only (the stock Mixtral/GPT-OSS loops skip id == num_experts)."""
    ex = _experts_module(family)
    E = ex.num_experts
    g = torch.Generator().manual_seed(7)
    T, k = 9, 2
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[0, 1] = E
    ids[4, 0] = E
    w = torch.rand(T, k, generator=g)
    w_masked = torch.where(ids >= E, torch.zeros_like(w), w)
    ex._is_expert_parallel = True
    got = moe_hf.moe_ops_experts_forward(ex, x, ids, w)
    # Reference: every slot through the eager forward, sentinel slots re-pointed at expert 0 with
    # weight 0 (the eager GPT-OSS loop cannot take the sentinel itself).
    eager = type(ex).forward.__wrapped__   # the original loop under use_experts_implementation
    want = eager(ex, x, ids.clamp(max=E - 1), w_masked)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_non_gated_layout():
    """``has_gate=False`` (up_proj + act_fn): moe_ops equals transformers' batched_mm."""
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(has_gate=False)
    class PlainExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = 5
            self.up_proj = torch.nn.Parameter(torch.randn(5, 12, H) * 0.2)
            self.down_proj = torch.nn.Parameter(torch.randn(5, H, 12) * 0.2)
            self.act_fn = torch.nn.functional.gelu

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise NotImplementedError

    cfg = transformers.PretrainedConfig()
    ex = PlainExperts(cfg)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(7, H, generator=g)
    ids = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(7)])
    w = torch.rand(7, 2, generator=g)
    from transformers.integrations.moe import batched_mm_experts_forward
    torch.testing.assert_close(moe_hf.moe_ops_experts_forward(ex, x, ids, w),
                               batched_mm_experts_forward(ex, x, ids, w), atol=1e-5, rtol=1e-5)


# transformers' own tiny test configs: its CausalLMModelTester defaults (tests/causal_lm_tester.py),
# mapped onto each config class the way the tester maps them, plus the overrides the family's own
# tester makes where they matter to routing (DeepSeek-V3: 8 experts, 2 groups, 1 kept, top-8).
_HF_TESTER = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=37, hidden_act="gelu", max_position_embeddings=512, initializer_range=0.02,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, moe_intermediate_size=12,
                  shared_expert_intermediate_size=36, num_experts_per_tok=2, num_experts=8, head_dim=16,
                  tie_word_embeddings=False)
_HF_TESTER_FAMILIES = {
    "Mixtral": {}, "Qwen2Moe": {}, "Qwen3Moe": {}, "Olmoe": {}, "GptOss": {},
    "DeepseekV3": dict(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=8, first_k_dense_replace=0),
}


def _hf_tester_config(family):
    import inspect

    import transformers
    cls = getattr(transformers, family + "Config")
    vals = dict(_HF_TESTER, **_HF_TESTER_FAMILIES[family])
    by_attr = {v: k for k, v in getattr(cls, "attribute_map", {}).items()}
    kw = {}
    for name in list(inspect.signature(cls.__init__).parameters) + ["pad_token_id"]:
        if name in vals:
            kw[name] = vals[name]
        elif name in by_attr and by_attr[name] in vals:
            kw[name] = vals[by_attr[name]]
    return getattr(transformers, family + "ForCausalLM"), cls(**kw)


@pytest.mark.parametrize("family", list(_HF_TESTER_FAMILIES))
def test_transformers_own_tiny_configs(family):
    """The stock model as transformers' tests build it (its init, gelu experts, its routing
    config) and the patched one agree: logits and greedy generation."""
    cls, cfg = _hf_tester_config(family)
    torch.manual_seed(0)
    stock = cls(cfg).eval()
    if hasattr(stock, "set_experts_implementation") and stock._can_set_experts_implementation():
        stock.set_experts_implementation("eager")
    fast = patched(stock)
    ids = torch.randint(3, 99, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = stock(ids).logits, fast(ids).logits
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        ga = stock.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        gb = fast.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ga, gb)
