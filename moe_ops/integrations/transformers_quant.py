"""Quantized experts of transformers 5.x models on moe_ops (issue 17): the weights stay as the
checkpoint stores them (no bf16 copy of the experts is kept).

* **FP8** (DeepSeek-V3/R1, Qwen3-FP8): transformers' ``FP8Experts`` (``float8_e4m3fn`` weights,
  ``*_scale_inv`` per block) dispatch through ``ALL_FP8_EXPERTS_FUNCTIONS``, whose entries load
  hub kernels. :func:`fp8_experts_forward` runs them there as ``"moe_ops"`` (registered by
  :mod:`moe_ops.integrations.transformers`), so
  ``set_experts_implementation("moe_ops")`` / ``from_pretrained(..., experts_implementation="moe_ops")``
  run FP8 experts without them. ``FP8Linear`` layers (attention, dense MLPs, shared experts) get
  a forward from :func:`~moe_ops.integrations.transformers.apply_moe_ops` that needs no hub kernel
  on CPU (dequantized per call, one layer at a time); on other devices transformers' kernel runs
  where it loads, else the same dequantized forward.
* **MXFP4** (GPT-OSS): transformers keeps MXFP4 experts only in its hub kernels' swizzled layout
  and dequantizes them to bf16 at load everywhere else (CPU included). :class:`PackedMxfp4Experts`
  (not transformers' ``Mxfp4GptOssExperts``, which holds the hub kernels' swizzled tensors)
  holds the checkpoint tensors themselves (``*_blocks``, ``*_scales``, biases under their checkpoint
  names) and runs them on moe_ops; :func:`load_mxfp4` loads a checkpoint into them,
  :func:`use_mxfp4_experts` puts empty ones in a built model so that ``load_state_dict`` of the
  checkpoint fills them, :func:`quantize_experts_` converts float experts.

What runs where (:func:`run_quantized_experts`): dropless bf16 activations on CPU (moe_ops'
AVX512-BF16 kernels or AVX2), plain SwiGLU, no expert biases, no gradient -> the fused op
``moe_ops::fused_experts_quantized`` reads the quantized weights directly. Everything else (GPT-OSS's
biases and clamped gate, other activations, float32 activations, GPUs, gradients w.r.t. the
activations) runs moe_ops' grouped GEMMs in float32 with the module's own gate: on CUDA the
quantized grouped GEMM (Triton, dequantizing in its mainloop; not yet run on a GPU), elsewhere on
weights dequantized per call a chunk of experts at a time (at most :data:`DEQUANT_CHUNK_BYTES` of
float32 weights alive): the oracle's computation; the output is cast to the activations' dtype.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import backend as _backend
from .. import ops, quant
from .._profiling import stage

# float32 bytes of dequantized expert weights alive at once on the dequantizing path.
DEQUANT_CHUNK_BYTES = 256 << 20


def _row_experts(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """Expert of each row of a permuted buffer (rows past ``offsets[E]`` clamp to E-1; they hold
    no slot, so whatever bias they get never reaches the output)."""
    r = torch.arange(rows, device=offsets.device, dtype=offsets.dtype)
    e = torch.searchsorted(offsets[1:].contiguous(), r, right=True)
    return e.clamp(max=offsets.numel() - 2)


def fp8_block(weight: torch.Tensor, scale: torch.Tensor, block_size) -> Tuple[int, int]:
    """The ``(rows, columns)`` block of an FP8 expert weight ``[E, N, K]``: the module's
    ``block_size`` when its scale grid ``[E, ceil(N/bn), ceil(K/bk)]`` has that shape, else the
    block the grid implies (per-tensor scales, and transformers' gate_up grids that keep one row of
    scales per half when 2I < bn)."""
    N, K = weight.shape[-2:]
    gn, gk = scale.shape[-2:]
    if block_size is not None:
        bn, bk = (int(v) for v in block_size)
        if (-(-N // bn), -(-K // bk)) == (gn, gk):
            return bn, bk
    if N % gn or K % gk:
        raise ValueError(f"moe_ops: cannot tell the FP8 block of a {tuple(weight.shape)} weight with a "
                         f"{tuple(scale.shape)} scale grid and block_size={block_size}")
    return N // gn, K // gk


def _float_scale(scale: torch.Tensor) -> torch.Tensor:
    """float32 scales (ue8m0 ``float8_e8m0fnu`` scales are exact powers of two in float32)."""
    return scale if scale.dtype == torch.float32 else scale.to(torch.float32)


def _chunks(num_experts: int, rows: int, cols: int):
    per = max(1, DEQUANT_CHUNK_BYTES // max(1, rows * cols * 4))
    return [(e, min(e + per, num_experts)) for e in range(0, num_experts, per)]


def _dequantized_gemm(a, w, s, fmt, block, offsets, n, k):
    """``grouped_gemm(a, dequantize(w), offsets, trans_b=True)`` in float32. On CUDA the grouped
    GEMM takes the quantized weights itself (Triton dequantizes in its mainloop: no float copy);
    elsewhere a chunk of experts is dequantized at a time and each chunk's GEMM fills only its
    experts' rows (the others are zero)."""
    if a.device.type == "cuda":
        return ops.grouped_gemm(a, w, offsets, trans_b=True, weight_format=fmt, b_scale=s, block_size=block)
    E = w.shape[0]
    out = None
    for e0, e1 in _chunks(E, n, k):
        wf = quant.dequantize_experts(w[e0:e1], s[e0:e1], fmt, block_size=block)
        part = ops.grouped_gemm(a, wf, offsets[e0:e1 + 1], trans_b=True)
        out = part if out is None else out + part
    return out


def run_quantized_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *,
                          w_gate_up: torch.Tensor, w_gate_up_scale: torch.Tensor, w_down: torch.Tensor,
                          w_down_scale: torch.Tensor, weight_format: str,
                          block_size: Optional[Tuple[int, int]] = None, activation: Optional[str] = None,
                          gate: Optional[Callable] = None, gate_up_bias: Optional[torch.Tensor] = None,
                          down_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The expert stage on quantized weights: ``x[T, H]``, router output ``top_k_index[T, k]`` (ids
    outside ``[0, E)`` are dropped: expert-parallel sentinels), ``top_k_weights[T, k]`` -> ``[T, H]``
    in ``x``'s dtype. ``w_gate_up`` holds ``[E, N1, K1]`` (``N1 = 2I`` gated, or ``I`` with
    ``gate`` the activation alone) and ``w_down`` ``[E, H, I]``, in ``weight_format``.
    ``activation`` (``"swiglu"``) names a plain gate the fused CPU op computes; ``gate`` (a
    function of the float32 ``h[rows, N1]``) is any other, used on the dequantizing path."""
    E = w_gate_up.shape[0]
    fast = (activation == "swiglu" and gate_up_bias is None and down_bias is None
            and ops._quantized_op_takes(x, weight_format, block_size[1] if weight_format == "fp8_e4m3" else 0)
            and not (torch.is_grad_enabled() and (x.requires_grad or top_k_weights.requires_grad)))
    if fast:
        bn, bk = block_size if weight_format == "fp8_e4m3" else (0, 0)
        with stage("dispatch"), stage("experts"), stage("combine"):
            return _backend.native_op("fused_experts_quantized")(
                x.contiguous(), top_k_index.to(torch.int32), top_k_weights, w_gate_up, w_gate_up_scale, w_down,
                w_down_scale, weight_format, bn, bk, activation)
    blk = block_size if weight_format == "fp8_e4m3" else None
    xf = x.to(torch.float32)
    with stage("dispatch"):
        x_sorted, _, offsets, slot_rows = ops.permute(xf, top_k_index, E, allow_invalid_ids=True)
        has_bias = gate_up_bias is not None or down_bias is not None
        row_e = _row_experts(offsets, x_sorted.shape[0]) if has_bias else None
    n1, k1 = quant.check_quantized(w_gate_up[:1], w_gate_up_scale[:1], weight_format, blk)
    n2, k2 = quant.check_quantized(w_down[:1], w_down_scale[:1], weight_format, blk)
    with stage("experts"):
        h = _dequantized_gemm(x_sorted, w_gate_up, w_gate_up_scale, weight_format, blk, offsets, n1, k1)
        if gate_up_bias is not None:
            h = h + gate_up_bias[row_e].to(h.dtype)
        h = gate(h) if gate is not None else ops.gated_activation(h, activation)
        y = _dequantized_gemm(h.to(torch.float32), w_down, w_down_scale, weight_format, blk, offsets, n2, k2)
        if down_bias is not None:
            y = y + down_bias[row_e].to(y.dtype)
    with stage("combine"):
        out = ops.unpermute(y, slot_rows, top_k_weights)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------ FP8

def _plain_swiglu(module: nn.Module) -> bool:
    """Whether the module's gate is ``silu(gate) * up`` (no clamp, softcap or SwiGLU-OAI alpha)."""
    if not getattr(module, "has_gate", True):
        return False
    if any(getattr(module, a, None) is not None for a in ("swiglu_alpha", "limit", "gate_softcap", "up_softcap")):
        return False
    act = getattr(module, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def fp8_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' ``FP8Experts`` on moe_ops, the ``float8_e4m3fn`` weights and ``*_scale_inv``
    grids passed as stored (``fp8_e4m3``). (``ALL_FP8_EXPERTS_FUNCTIONS["moe_ops"]`` is
    ``transformers.moe_ops_fp8_experts_forward``, which sends float weights elsewhere.)"""
    has_gate = getattr(self, "has_gate", True)
    w1 = self.gate_up_proj if has_gate else self.up_proj
    if getattr(self, "activation_scheme", "dynamic") == "static":
        raise NotImplementedError("moe_ops: FP8 experts with activation_scheme='static' quantize the activations; "
                                  "moe_ops runs weight-only quantization (activation_scheme='dynamic' checkpoints)")
    if w1.dtype != torch.float8_e4m3fn:
        raise NotImplementedError(f"moe_ops: FP8 experts with {w1.dtype} weights (FP4-packed experts) are not "
                                  "supported; moe_ops takes float8_e4m3fn experts")
    if getattr(self, "has_bias", False):
        raise NotImplementedError("moe_ops: FP8 experts with biases are not supported")
    s1 = self.gate_up_proj_scale_inv if has_gate else self.up_proj_scale_inv
    w2, s2 = self.down_proj, self.down_proj_scale_inv
    b1 = fp8_block(w1, s1, self.block_size)
    if fp8_block(w2, s2, self.block_size) != b1:
        raise NotImplementedError("moe_ops: FP8 experts whose two projections have different scale blocks")
    plain = _plain_swiglu(self)
    gate = None if plain else (self._apply_gate if has_gate else self.act_fn)
    return run_quantized_experts(hidden_states, top_k_index, top_k_weights, w_gate_up=w1,
                                 w_gate_up_scale=_float_scale(s1), w_down=w2, w_down_scale=_float_scale(s2),
                                 weight_format="fp8_e4m3", block_size=b1, activation="swiglu" if plain else None,
                                 gate=gate)


# Whether transformers' FP8 linear kernel loaded on a non-CPU device (None: not tried yet); a
# failed load is not retried on every call (it may try a hub download).
_hub_fp8_linear: Optional[bool] = None


def fp8_linear_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """``FP8Linear.forward`` that runs without transformers' hub kernel: on CPU, and on other
    devices when that kernel cannot be loaded, the weight is dequantized (moe_ops' oracle) per call,
    one layer at a time, and the product taken in float32. Elsewhere transformers' forward runs."""
    global _hub_fp8_linear
    w = self.weight
    if w.element_size() > 1:
        return super(type(self), self).forward(input)
    if input.device.type != "cpu" and _hub_fp8_linear is not False:
        try:
            out = super(type(self), self).forward(input)
            _hub_fp8_linear = True
            return out
        except ImportError:
            _hub_fp8_linear = False
    if w.dtype != torch.float8_e4m3fn or getattr(self, "activation_scheme", "dynamic") == "static":
        raise NotImplementedError("moe_ops: FP8Linear without the hub kernel takes float8_e4m3fn weights and "
                                  "dynamic activations")
    s = _float_scale(self.weight_scale_inv)
    if s.dim() == 0:
        wf = w.to(torch.float32) * s
    else:
        wf = quant.dequantize_experts(w, s, "fp8_e4m3", block_size=fp8_block(w, s, self.block_size))
    bias = None if self.bias is None else self.bias.to(torch.float32)
    return F.linear(input.to(torch.float32), wf, bias).to(input.dtype)


# ------------------------------------------------------------------------------------ MXFP4 (GPT-OSS)

class PackedMxfp4Experts(nn.Module):
    """GPT-OSS experts kept as the checkpoint stores them: ``gate_up_proj_blocks`` uint8
    ``[E, 2I, H/32, 16]`` + ``gate_up_proj_scales`` e8m0 ``[E, 2I, H/32]`` (gate/up rows
    interleaved), ``down_proj_blocks`` ``[E, H, I/32, 16]`` + ``down_proj_scales``, and the biases
    -- the checkpoint's names, so its tensors load with ``load_state_dict``. The forward is GPT-OSS's
    (``x @ W + b``, ``_apply_gate``: clamped ``gate * sigmoid(1.702 gate) * (up + 1)``) on moe_ops:
    each call dequantizes a chunk of experts at a time to float32 (see the module docstring)."""

    def __init__(self, config, device=None):
        super().__init__()
        self.config = config
        self.num_experts = config.num_local_experts
        self.intermediate_size = config.intermediate_size
        self.hidden_size = config.hidden_size
        self.alpha = getattr(config, "swiglu_alpha", 1.702)
        self.limit = getattr(config, "swiglu_limit", 7.0)
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        if H % quant.MX_BLOCK or I % quant.MX_BLOCK:
            raise ValueError(f"moe_ops: MXFP4 experts need hidden and intermediate sizes divisible by "
                             f"{quant.MX_BLOCK}, got {H} and {I}")

        def u8(*shape):
            return nn.Parameter(torch.zeros(shape, dtype=torch.uint8, device=device), requires_grad=False)

        self.gate_up_proj_blocks = u8(E, 2 * I, H // 32, 16)
        self.gate_up_proj_scales = u8(E, 2 * I, H // 32)
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I, device=device), requires_grad=False)
        self.down_proj_blocks = u8(E, H, I // 32, 16)
        self.down_proj_scales = u8(E, H, I // 32)
        self.down_proj_bias = nn.Parameter(torch.zeros(E, H, device=device), requires_grad=False)

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        # GPT-OSS's own gate, called so its definition is the one in transformers
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
        return GptOssExperts._apply_gate(self, gate_up)

    def forward(self, hidden_states: torch.Tensor, router_indices: torch.Tensor,
                routing_weights: torch.Tensor) -> torch.Tensor:
        return run_quantized_experts(hidden_states, router_indices, routing_weights,
                                     w_gate_up=self.gate_up_proj_blocks, w_gate_up_scale=self.gate_up_proj_scales,
                                     w_down=self.down_proj_blocks, w_down_scale=self.down_proj_scales,
                                     weight_format="mxfp4", gate=self._apply_gate,
                                     gate_up_bias=self.gate_up_proj_bias, down_bias=self.down_proj_bias)


def _gpt_oss_experts(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == "GptOssExperts"]


def use_mxfp4_experts(model: nn.Module) -> nn.Module:
    """Replace every GPT-OSS experts module of a built model by an empty :class:`PackedMxfp4Experts`
    (on the same device; ``meta`` stays ``meta``), so the checkpoint's ``*_blocks`` / ``*_scales``
    load into it as stored: ``model.load_state_dict(checkpoint_tensors, assign=True)``."""
    for name, m in _gpt_oss_experts(model):
        dev = next(m.parameters()).device
        model.set_submodule(name, PackedMxfp4Experts(getattr(m, "config", None) or model.config, device=dev))
    return model


@functools.lru_cache(maxsize=None)
def _fp8_experts_class() -> type:
    """``FP8Experts`` dispatching through ``ALL_FP8_EXPERTS_FUNCTIONS``, as transformers' FP8
    loader builds it (a subclass, so transformers' own class is not modified)."""
    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
    from transformers.integrations.moe import use_experts_implementation
    return use_experts_implementation(experts_class=type("FP8Experts", (FP8Experts,), {"__module__": __name__}),
                                      experts_interface=ALL_FP8_EXPERTS_FUNCTIONS, has_gate=True)


def quantize_experts_(model: nn.Module, weight_format: str, *,
                      block_size: Tuple[int, int] = (128, 128)) -> nn.Module:
    """Quantize a float model's experts in place with :func:`moe_ops.quantize_experts`:
    ``"mxfp4"`` turns GPT-OSS experts into :class:`PackedMxfp4Experts`; ``"fp8_e4m3"`` turns the
    ``[gate; up]`` experts (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, ...) into transformers' own
    ``FP8Experts`` (dispatching through ``ALL_FP8_EXPERTS_FUNCTIONS`` by the model's experts
    implementation, ``"moe_ops"`` after :func:`~moe_ops.integrations.transformers.apply_moe_ops`).
    Other layers stay as they are."""
    if weight_format == "mxfp4":
        for name, m in _gpt_oss_experts(model):
            new = PackedMxfp4Experts(getattr(m, "config", None) or model.config, device=m.gate_up_proj.device)
            with torch.no_grad():
                for proj in ("gate_up_proj", "down_proj"):
                    # GPT-OSS stores x @ W ([E, K, N]); the checkpoint layout is [E, N, K/32, 16]
                    blocks, scales = quant.quantize_experts(getattr(m, proj).transpose(1, 2), "mxfp4")
                    getattr(new, f"{proj}_blocks").copy_(blocks)
                    getattr(new, f"{proj}_scales").copy_(scales)
                    getattr(new, f"{proj}_bias").data = getattr(m, f"{proj}_bias").detach().clone()
            model.set_submodule(name, new)
        return model
    if weight_format != "fp8_e4m3":
        raise ValueError(f"moe_ops: quantize_experts_ takes 'fp8_e4m3' or 'mxfp4', got {weight_format!r}")
    from transformers.integrations.finegrained_fp8 import FP8Experts
    for name, m in list(model.named_modules()):
        if not (hasattr(m, "has_gate") and hasattr(m, "num_experts") and hasattr(m, "down_proj")):
            continue
        if isinstance(m, FP8Experts):
            continue
        if (not m.has_gate or getattr(m, "has_bias", False) or getattr(m, "is_transposed", False)
                or getattr(m, "has_post_expert_norm", False)):
            raise NotImplementedError(f"moe_ops: {type(m).__name__} is not the [gate; up] layout FP8Experts takes")
        new = _fp8_experts_class()(m.config, block_size=tuple(block_size))
        with torch.no_grad():
            for proj in ("gate_up_proj", "down_proj"):
                q, s = quant.quantize_experts(getattr(m, proj), "fp8_e4m3", block_size=tuple(block_size))
                want = getattr(new, f"{proj}_scale_inv").shape
                if tuple(s.shape) != tuple(want):
                    raise NotImplementedError(f"moe_ops: {proj} {tuple(q.shape)} with block {tuple(block_size)} has a "
                                              f"{tuple(s.shape)} scale grid; FP8Experts allocates {tuple(want)}")
                setattr(new, proj, nn.Parameter(q.to(getattr(m, proj).device), requires_grad=False))
                setattr(new, f"{proj}_scale_inv", nn.Parameter(s.to(q.device), requires_grad=False))
        model.set_submodule(name, new)
    return model


@functools.lru_cache(maxsize=None)
def _packed_class(cls: type) -> type:
    """``cls`` whose experts are :class:`PackedMxfp4Experts` from construction on (transformers
    builds the model on the meta device, so no float experts are ever allocated)."""
    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        use_mxfp4_experts(self)
    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


def load_mxfp4(path, *, model_class: Optional[type] = None, **kwargs) -> nn.Module:
    """Load a GPT-OSS MXFP4 checkpoint with its experts packed, as stored, on any device
    (transformers itself keeps them packed only with its hub kernels; without them, and always on
    CPU, it dequantizes them to bf16 at load). The checkpoint's ``quantization_config`` is dropped
    (no transformers quantizer runs: the ``*_blocks`` / ``*_scales`` tensors load by name into
    :class:`PackedMxfp4Experts`); ``kwargs`` go to ``from_pretrained`` (``dtype``, ``device_map``,
    ...). Public as ``moe_ops.integrations.transformers.from_pretrained_mxfp4`` (+ apply_moe_ops)."""
    from transformers import AutoConfig

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:
        qc = config.quantization_config
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if str(getattr(method, "value", method)) != "mxfp4":
            raise ValueError(f"moe_ops: from_pretrained_mxfp4 loads MXFP4 checkpoints, this one is {method!r}")
        del config.quantization_config
    if model_class is None:
        from transformers import GptOssForCausalLM as model_class
    return _packed_class(model_class).from_pretrained(path, config=config, **kwargs)


@contextlib.contextmanager
def fp8_kept_as_stored():
    """transformers' FP8 quantizer dequantizes pre-quantized checkpoints to bf16 at load on
    machines without a GPU (or with one older than sm_89), and wants ``accelerate``: inside this
    context, pre-quantized checkpoints skip that environment check (what moe_ops runs needs neither
    a GPU nor the hub kernels). Process-global while it lasts (a class attribute is swapped)."""
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer
    original = FineGrainedFP8HfQuantizer.validate_environment

    def validate_environment(self, *args, **kwargs):
        if self.pre_quantized:
            return None
        return original(self, *args, **kwargs)
    FineGrainedFP8HfQuantizer.validate_environment = validate_environment
    try:
        yield
    finally:
        FineGrainedFP8HfQuantizer.validate_environment = original
