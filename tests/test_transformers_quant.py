"""Quantized transformers models on moe_ops (issue 17): tiny random models quantized here (no
downloads) -- an FP8 DeepSeek-V3 built the way transformers' FP8 loader builds it
(``replace_with_fp8_linear``: ``FP8Linear`` layers + ``FP8Experts``), an FP8 Qwen3-MoE (experts
only, :func:`quantize_experts_`) and an MXFP4 GPT-OSS checkpoint saved in the released layout.

Each runs on moe_ops and is compared with the same model holding the dequantized weights, run by
transformers' eager code: scale-invariant error ``rms(out - ref) / rms(ref)`` <= 1e-5 for float32
models, and for bf16 the expert layers against a float64 oracle <= 5e-3 (the issue's target) plus
logits within bf16 noise. The tests also check that moe_ops received the stored quantized tensors
and that no float copy of the experts is kept.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import moe_ops

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.finegrained_fp8")

from moe_ops.integrations import transformers as moe_hf  # noqa: E402
from moe_ops.integrations import transformers_quant as moe_q  # noqa: E402

V, L = 128, 2
FP8_BLOCK = (64, 64)


def rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def _spread(model, seed):
    """Well-spread random weights (HF's 0.02 init makes routes near-tied)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)
    return model


def _stock(cls, cfg, dtype, seed=0):
    cfg.pad_token_id = 0
    torch.manual_seed(seed)
    model = _spread(cls(cfg).eval(), seed + 1).to(dtype)
    model.set_experts_implementation("eager")
    return model


def deepseek_v3(dtype=torch.float32, moe_intermediate_size=96):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    # I = 96 with 64-wide blocks: partial blocks in the down projection's K
    return _stock(DeepseekV3ForCausalLM, DeepseekV3Config(
        vocab_size=V, hidden_size=128, intermediate_size=192, moe_intermediate_size=moe_intermediate_size,
        num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=0, norm_topk_prob=True,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, rope_scaling=None), dtype)


def qwen3_moe(dtype=torch.bfloat16):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    return _stock(Qwen3MoeForCausalLM, Qwen3MoeConfig(
        vocab_size=V, hidden_size=128, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=L,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True), dtype)


def gpt_oss(dtype=torch.float32):
    from transformers import GptOssConfig, GptOssForCausalLM
    return _stock(GptOssForCausalLM, GptOssConfig(
        vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"]), dtype)


def _ids(batch=2, seq=7, seed=3):
    return torch.randint(1, V, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _fp8_experts(model):
    from transformers.integrations.finegrained_fp8 import FP8Experts
    return [m for m in model.modules() if isinstance(m, FP8Experts)]


def fp8_like_the_loader(stock, block=FP8_BLOCK):
    """FP8 copy of ``stock`` built by transformers' ``replace_with_fp8_linear`` (what its FP8 loader
    runs), every converted weight quantized with moe_ops.quantize_experts."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear
    q = copy.deepcopy(stock)
    replace_with_fp8_linear(q, modules_to_not_convert=["lm_head"], pre_quantized=True,
                            quantization_config=FineGrainedFP8Config(weight_block_size=block))
    with torch.no_grad():
        for name, m in q.named_modules():
            for wname, sname in _fp8_projections(q, m):
                wq, s = moe_ops.quantize_experts(getattr(stock.get_submodule(name), wname), "fp8_e4m3", block_size=block)
                assert getattr(m, sname).shape == s.shape, (name, wname)
                setattr(m, wname, torch.nn.Parameter(wq, requires_grad=False))
                setattr(m, sname, torch.nn.Parameter(s, requires_grad=False))
    assert not any(p.is_meta for p in q.parameters())
    return q


def _fp8_projections(q, m):
    if m in _fp8_experts(q):
        return [("gate_up_proj", "gate_up_proj_scale_inv"), ("down_proj", "down_proj_scale_inv")]
    return [("weight", "weight_scale_inv")] if type(m).__name__ == "FP8Linear" else []


def dequantized_references(q, stock):
    """``(ref, ref32)``: ``stock`` holding ``q``'s dequantized FP8 weights, in ``stock``'s dtype and
    in float32 (the oracle: bf16 runs are judged by their distance to it)."""
    ref, ref32 = copy.deepcopy(stock), copy.deepcopy(stock).float()
    converted = 0
    with torch.no_grad():
        for name, m in q.named_modules():
            for wname, sname in _fp8_projections(q, m):
                w, s = getattr(m, wname), getattr(m, sname)
                deq = moe_ops.dequantize_experts(w, s, "fp8_e4m3", block_size=moe_q.fp8_block(w, s, m.block_size))
                for r in (ref, ref32):
                    getattr(r.get_submodule(name), wname).copy_(deq)
                converted += 1
    assert converted >= 2 * L
    return ref, ref32


class Spy:
    """Records what the quantized expert stage received, and calls of the fused CPU op."""

    def __init__(self, monkeypatch):
        self.stage, self.fused = [], 0
        real_run, real_native = moe_q.run_quantized_experts, moe_q._backend.native_op

        def run(*a, **kw):
            self.stage.append(kw)
            return real_run(*a, **kw)

        def native(name):
            op = real_native(name)
            if name != "fused_experts_quantized" or op is None:
                return op

            def counted(*a):
                self.fused += 1
                return op(*a)
            return counted
        monkeypatch.setattr(moe_q, "run_quantized_experts", run)
        monkeypatch.setattr(moe_q._backend, "native_op", native)

    def received_stored(self, modules, w1="gate_up_proj", w2="down_proj"):
        """Every layer's call got the module's own quantized tensors (same storage, no copy)."""
        assert len(self.stage) == len(modules)
        for kw, m in zip(self.stage, modules):
            assert kw["w_gate_up"].data_ptr() == getattr(m, w1).data_ptr()
            assert kw["w_down"].data_ptr() == getattr(m, w2).data_ptr()
            assert kw["w_gate_up"].element_size() == 1 and kw["w_down"].element_size() == 1


def _fused_kernels() -> bool:
    return bool(moe_ops.ops._cpu_quantized_kernels()) and moe_ops.backend.native_op("fused_experts_quantized") is not None


def _layerwise_vs_oracle(model, ids, dequantized):
    """Each experts module's bf16 output against the float64 layer on its dequantized weights."""
    mods = [m for m in model.modules() if isinstance(m, moe_q.PackedMxfp4Experts) or m in _fp8_experts(model)]
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp, out))) for m in mods]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == L
    for mod, (x, top, w), out in seen:
        w1, w2, gate, b1, b2 = dequantized(mod)
        x64 = x.double()
        want = torch.zeros_like(x64)
        for t in range(x.shape[0]):
            for j in range(top.shape[1]):
                e = int(top[t, j])
                h = w1[e] @ x64[t] + (0 if b1 is None else b1[e].double())
                y = w2[e] @ gate(h) + (0 if b2 is None else b2[e].double())
                want[t] += w[t, j].double() * y
        assert out.dtype == x.dtype
        assert rel_rms(out, want) <= 5e-3, rel_rms(out, want)


def _silu_gate(h):
    g, u = h.chunk(2)
    return torch.nn.functional.silu(g) * u


def _fp8_dequantized(mod):
    blk = moe_q.fp8_block(mod.gate_up_proj, mod.gate_up_proj_scale_inv, mod.block_size)
    deq = [moe_ops.dequantize_experts(getattr(mod, p), getattr(mod, p + "_scale_inv"), "fp8_e4m3",
                                      block_size=blk).double() for p in ("gate_up_proj", "down_proj")]
    return deq[0], deq[1], _silu_gate, None, None


# ------------------------------------------------------------------------------------ FP8

def test_fp8_registered():
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
    assert ALL_FP8_EXPERTS_FUNCTIONS["moe_ops"] is moe_hf.moe_ops_fp8_experts_forward


def test_fp8_deepseek_v3_float32(monkeypatch):
    """A whole-FP8 DeepSeek-V3 (attention, shared experts and experts in FP8, 64x64 blocks with
    partial ones) runs on CPU after apply_moe_ops, equal to the dequantized model's eager run."""
    stock = deepseek_v3()
    q = fp8_like_the_loader(stock)
    ref, _ = dequantized_references(q, stock)
    ids = _ids()
    try:
        import kernels  # noqa: F401
    except ImportError:  # transformers' own FP8 layers need the hub kernels: what apply_moe_ops makes unnecessary
        with torch.no_grad(), pytest.raises(Exception):  # ImportError in 5.24; kept loose across versions
            q(ids)
    moe_hf.apply_moe_ops(q)
    assert q.config._experts_implementation == "moe_ops"
    spy = Spy(monkeypatch)
    with torch.no_grad():
        a, b = ref(ids).logits, q(ids).logits
    spy.received_stored(_fp8_experts(q))
    assert rel_rms(b, a) <= 1e-5, rel_rms(b, a)
    with torch.no_grad():
        ga = ref.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        gb = q.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ga, gb)
    for m in _fp8_experts(q):  # still the stored fp8 tensors, nothing else kept
        assert m.gate_up_proj.dtype == m.down_proj.dtype == torch.float8_e4m3fn
        held = [t for t in list(m._parameters.values()) + list(m._buffers.values()) + list(vars(m).values())
                if isinstance(t, torch.Tensor)]
        assert all(t.element_size() == 1 or t.numel() < m.down_proj.numel() // 8 for t in held)


def _save_fp8_checkpoint(q, path):
    """``q`` saved as DeepSeek-V3's FP8 release stores it: per-expert ``gate_proj`` / ``up_proj`` /
    ``down_proj`` ``weight`` + ``weight_scale_inv``, every other FP8 linear likewise, quant_method fp8."""
    from safetensors.torch import save_file
    from transformers import FineGrainedFP8Config
    sd = {}
    for key, v in q.state_dict().items():
        stem, sep, proj = key.partition(".experts.")
        if not sep:
            sd[key] = v.contiguous()
            continue
        suffix = ".weight_scale_inv" if proj.endswith("_scale_inv") else ".weight"
        for e in range(v.shape[0]):
            if proj.startswith("gate_up_proj"):
                half = v.shape[1] // 2
                sd[f"{stem}.experts.{e}.gate_proj{suffix}"] = v[e, :half].contiguous()
                sd[f"{stem}.experts.{e}.up_proj{suffix}"] = v[e, half:].contiguous()
            else:
                sd[f"{stem}.experts.{e}.down_proj{suffix}"] = v[e].contiguous()
    cfg = copy.deepcopy(q.config)
    cfg.quantization_config = FineGrainedFP8Config(weight_block_size=FP8_BLOCK, modules_to_not_convert=["lm_head"])
    cfg.save_pretrained(path)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_fp8_deepseek_v3_checkpoint_on_cpu(tmp_path):
    """An FP8 DeepSeek-V3 checkpoint in the released layout, loaded by from_pretrained_fp8 on CPU:
    transformers' loader builds and fills the FP8 modules (where on its own it would dequantize
    to bf16, or refuse without accelerate), the tensors stay fp8, and the logits match the
    dequantized model's eager run."""
    stock = deepseek_v3(moe_intermediate_size=128)  # whole blocks: the per-expert halves split cleanly
    q = fp8_like_the_loader(stock)
    ref, _ = dequantized_references(q, stock)
    _save_fp8_checkpoint(q, tmp_path)
    model = moe_hf.from_pretrained_fp8(tmp_path, dtype=torch.float32)
    assert model.config._experts_implementation == "moe_ops"
    experts = _fp8_experts(model)
    assert len(experts) == L and all(m.gate_up_proj.dtype == torch.float8_e4m3fn for m in experts)
    linears = [m for m in model.modules() if type(m).__name__.endswith("FP8Linear")]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    for mq, ml in zip(_fp8_experts(q), experts):  # merged back to what was saved
        assert torch.equal(ml.gate_up_proj_scale_inv, mq.gate_up_proj_scale_inv)
        assert torch.equal(ml.down_proj.view(torch.uint8), mq.down_proj.view(torch.uint8))
    ids = _ids()
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert rel_rms(b, a) <= 1e-5, rel_rms(b, a)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_fp8_bf16_fused(family, monkeypatch):
    """bf16 FP8 models (DeepSeek-V3 all FP8 as its loader builds it; Qwen3-MoE with FP8 experts by
    quantize_experts_): on AVX512-BF16 CPUs the experts run the fused quantized op on the stored
    weights. Every expert layer within 5e-3 of the float64 oracle; the logits' distance to the
    float32 dequantized model at most 1.25x (+0.01) that of transformers' eager bf16 run of the
    dequantized model (bf16 alone moves these tiny models' logits by several percent)."""
    stock = (deepseek_v3 if family == "deepseek_v3" else qwen3_moe)(torch.bfloat16)
    if family == "deepseek_v3":
        q = fp8_like_the_loader(stock)
    else:
        q = moe_hf.quantize_experts_(copy.deepcopy(stock), "fp8_e4m3", block_size=FP8_BLOCK)
    ref, ref32 = dequantized_references(q, stock)
    moe_hf.apply_moe_ops(q)
    spy = Spy(monkeypatch)
    ids = _ids()
    with torch.no_grad():
        a, b, want = ref(ids).logits, q(ids).logits, ref32(ids).logits
    spy.received_stored(_fp8_experts(q))
    assert spy.fused == (L if _fused_kernels() else 0)
    assert rel_rms(b, want) <= 1.25 * rel_rms(a, want) + 1e-2, (rel_rms(b, want), rel_rms(a, want))
    _layerwise_vs_oracle(q, ids, _fp8_dequantized)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_expert_parallel_sentinels_and_chunks(dtype, monkeypatch):
    """Ids >= E are dropped on both paths; dequantizing one expert at a time gives the same bits."""
    q = moe_hf.apply_moe_ops(moe_hf.quantize_experts_(qwen3_moe(dtype), "fp8_e4m3", block_size=FP8_BLOCK))
    ex = _fp8_experts(q)[0]
    E, H = ex.num_experts, ex.hidden_dim
    g = torch.Generator().manual_seed(7)
    T, k = 9, 2
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[0, 1] = E
    ids[4, 0] = E + 3
    w = torch.rand(T, k, generator=g)
    with torch.no_grad():
        got = moe_q.fp8_experts_forward(ex, x, ids, w)
    w1, w2, *_ = _fp8_dequantized(ex)
    want = moe_ops.ops.experts_forward(x.double(), torch.where(ids >= E, 0.0, w).double(), ids.clamp(max=E - 1).int(),
                                       w1, w2, backend="reference")
    assert rel_rms(got, want) <= (5e-3 if dtype == torch.bfloat16 else 1e-6)
    if dtype == torch.float32:  # the dequantizing path: chunk of one expert at a time
        monkeypatch.setattr(moe_q, "DEQUANT_CHUNK_BYTES", 1)
        with torch.no_grad():
            assert torch.equal(moe_q.fp8_experts_forward(ex, x, ids, w), got)


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="torch without float8_e8m0fnu")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_ue8m0_scales(dtype):
    """ue8m0 scale grids (``float8_e8m0fnu``, scale_fmt="ue8m0" checkpoints) give the same bits as
    the same powers of two in float32."""
    q = moe_hf.apply_moe_ops(moe_hf.quantize_experts_(qwen3_moe(dtype), "fp8_e4m3", block_size=FP8_BLOCK))
    ex = _fp8_experts(q)[0]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, ex.hidden_dim, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(ex.num_experts, generator=g)[:2] for _ in range(6)])
    w = torch.rand(6, 2, generator=g)
    with torch.no_grad():
        for p in ("gate_up_proj_scale_inv", "down_proj_scale_inv"):
            pow2 = torch.exp2(torch.round(torch.log2(getattr(ex, p))))
            setattr(ex, p, torch.nn.Parameter(pow2, requires_grad=False))
        want = moe_q.fp8_experts_forward(ex, x, ids, w)
        for p in ("gate_up_proj_scale_inv", "down_proj_scale_inv"):
            e8 = getattr(ex, p).to(torch.float8_e8m0fnu)
            assert torch.equal(e8.float(), getattr(ex, p))
            setattr(ex, p, torch.nn.Parameter(e8, requires_grad=False))
        assert torch.equal(moe_q.fp8_experts_forward(ex, x, ids, w), want)


# ------------------------------------------------------------------------------------ MXFP4 (GPT-OSS)

def _save_mxfp4_checkpoint(stock, path):
    """A GPT-OSS checkpoint as released: experts as *_blocks / *_scales, quant_method mxfp4."""
    from safetensors.torch import save_file
    q = moe_hf.quantize_experts_(copy.deepcopy(stock), "mxfp4")
    q.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in q.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})


def _mxfp4_bytes(m):
    E, H, I = m.num_experts, m.hidden_size, m.intermediate_size
    return E * (2 * I * H // 2 + 2 * I * H // 32 + H * I // 2 + H * I // 32)


def test_mxfp4_gpt_oss_checkpoint(tmp_path, monkeypatch):
    """The checkpoint loads packed (from_pretrained_mxfp4) and runs on moe_ops; transformers, on CPU
    without its hub kernels, loads the same checkpoint dequantized (convert_moe_packed_tensors): the
    logits agree and greedy generation is the same."""
    from transformers import GptOssForCausalLM, Mxfp4Config
    _save_mxfp4_checkpoint(gpt_oss(), tmp_path)
    ref = GptOssForCausalLM.from_pretrained(tmp_path, quantization_config=Mxfp4Config(dequantize=True),
                                            dtype=torch.float32)
    ref.set_experts_implementation("eager")
    assert ref.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32  # transformers dequantized at load
    model = moe_hf.from_pretrained_mxfp4(tmp_path, dtype=torch.float32)
    experts = [m for m in model.modules() if isinstance(m, moe_q.PackedMxfp4Experts)]
    assert len(experts) == L
    for m in experts:  # packed: the checkpoint's bytes, no float weights
        assert {p.dtype for n, p in m.named_parameters() if "bias" not in n} == {torch.uint8}
        packed = sum(p.numel() for n, p in m.named_parameters() if "bias" not in n)
        assert packed == _mxfp4_bytes(m)
        held = [t for t in vars(m).values() if isinstance(t, torch.Tensor)]
        assert not held
    spy = Spy(monkeypatch)
    ids = _ids()
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    spy.received_stored(experts, "gate_up_proj_blocks", "down_proj_blocks")
    assert rel_rms(b, a) <= 1e-5, rel_rms(b, a)
    with torch.no_grad():
        ga = ref.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        gb = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ga, gb)


def test_mxfp4_gpt_oss_bf16_layerwise():
    """bf16 GPT-OSS quantized in memory: every expert layer (biases, interleaved clamped SwiGLU)
    within 5e-3 of the float64 oracle built on transformers' own dequantizer."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    q = moe_hf.apply_moe_ops(moe_hf.quantize_experts_(gpt_oss(torch.bfloat16), "mxfp4"))

    def dequantized(mod):
        # convert_moe_packed_tensors returns GPT-OSS's [E, K, N]; the oracle multiplies W[e] @ x
        w1, w2 = (convert_moe_packed_tensors(getattr(mod, p + "_blocks"), getattr(mod, p + "_scales"),
                                             dtype=torch.float32).transpose(1, 2).double()
                  for p in ("gate_up_proj", "down_proj"))

        def gate(h):
            g, u = h[::2].clamp(max=mod.limit), h[1::2].clamp(-mod.limit, mod.limit)
            return (u + 1) * g * torch.sigmoid(g * mod.alpha)
        return w1, w2, gate, mod.gate_up_proj_bias, mod.down_proj_bias
    _layerwise_vs_oracle(q, _ids(), dequantized)


def test_mxfp4_gradient_wrt_activations():
    """Adapters train through quantized experts: the dequantizing path is differentiable in the
    activations (and router weights); output and gradients equal transformers' eager GPT-OSS experts
    holding the weights transformers' convert_moe_packed_tensors dequantizes."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    stock = gpt_oss()
    q = moe_hf.quantize_experts_(copy.deepcopy(stock), "mxfp4")
    mq = next(m for m in q.modules() if isinstance(m, moe_q.PackedMxfp4Experts))
    ms = stock.model.layers[0].mlp.experts
    with torch.no_grad():
        for p in ("gate_up_proj", "down_proj"):  # GPT-OSS's own [E, K, N] layout
            getattr(ms, p).copy_(convert_moe_packed_tensors(getattr(mq, p + "_blocks"), getattr(mq, p + "_scales"),
                                                            dtype=torch.float32))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(5, ms.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(ms.num_experts, generator=g)[:2] for _ in range(5)])
    w = torch.rand(5, 2, generator=g)
    grads = []
    for mod in (mq, ms):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = mod(xi, ids, wi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append((out.detach(), xi.grad, wi.grad))
    for got, want in zip(*grads):
        assert rel_rms(got, want) <= 1e-5, rel_rms(got, want)
