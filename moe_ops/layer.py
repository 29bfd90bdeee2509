"""``moe_ops.MoE``: a drop-in Mixture-of-Experts feed-forward layer built on the moe_ops ops.

Dataflow of :meth:`MoE.forward` (``x[..., H]`` flattened to ``[T, H]``)::

    logits = gate(x)                                   [T, E]   (router, nn.Linear without bias)
    weights, ids = topk_gating(logits, k, ...)         [T, k]   (softmax or DeepSeek sigmoid-group)
    dropless:  permute -> grouped_gemm(w_gate_up) -> SwiGLU/GeGLU -> grouped_gemm(w_down) -> unpermute
    capacity:  capacity_dispatch -> same GEMMs over [E, C] -> capacity_combine
    out += shared experts(x) (optionally gated by sigmoid(shared_gate(x)))

Expert weights are stored like Hugging Face's fused experts: ``w_gate_up[E, 2I, H]`` (rows
``[gate; up]``) and ``w_down[E, H, I]``; both GEMMs run with ``trans_b``. Without auxiliary
losses the routed part is one :func:`moe_ops.moe_forward` call (so a backend's fused path is
used); with them the router runs once and its ids feed the losses and the experts.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from . import backend as _backend
from . import ops
from .ops import experts_forward, gated_activation  # noqa: F401  (part of this module's API)

Tensor = torch.Tensor


class MoEAux(NamedTuple):
    """Auxiliary outputs of :meth:`MoE.forward` with ``return_aux=True``."""
    loss: Tensor                 # aux_loss_coef * load_balancing_loss + z_loss_coef * z_loss
    load_balancing_loss: Tensor  # Switch/HF: E * sum_e (count_e / T) * mean_t p[t, e]  (= k when balanced)
    z_loss: Tensor               # ST-MoE: mean_t logsumexp(logits[t])^2
    tokens_per_expert: Tensor    # [E] float32 routed slot counts (no gradient)
    router_logits: Tensor        # [T, E]


def load_balancing_loss(router_logits: Tensor, ids: Tensor, num_experts: int, scoring: str = "softmax") -> Tensor:
    """Switch Transformer load-balancing loss as transformers computes it for top-k routers:
    ``E * sum_e f_e * P_e`` with ``f_e`` = slots routed to e per token and ``P_e`` the mean router
    probability (sigmoid scores are normalised per token first). Differentiable through ``P``."""
    T = router_logits.shape[0]
    x = router_logits.float()
    if scoring == "softmax":
        probs = torch.softmax(x, dim=-1)
    else:
        s = torch.sigmoid(x)
        probs = s / (s.sum(-1, keepdim=True) + 1e-20)
    valid = (ids >= 0) & (ids < num_experts)
    onehot = nn.functional.one_hot(torch.where(valid, ids.long(), num_experts), num_experts + 1)[..., :num_experts]
    f = onehot.float().sum(dim=(0, 1)) / T
    return num_experts * (f * probs.mean(0)).sum()


def z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: ``mean_t logsumexp(logits[t])^2``."""
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()


class GatedMLP(nn.Module):
    """A dense SwiGLU/GeGLU MLP (the shared experts): ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "swiglu",
                 device=None, dtype=None):
        super().__init__()
        self.activation = activation
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(gated_activation(self.gate_up_proj(x), self.activation))


class MoE(nn.Module):
    """Mixture-of-Experts feed-forward layer (dropless or GShard capacity), differentiable,
    ``torch.compile(fullgraph=True)`` clean.

    Args:
        hidden_size, intermediate_size: H and the per-expert I.
        num_experts, top_k: E and k.
        scoring: ``"softmax"`` (Mixtral/Qwen) or ``"sigmoid"`` (DeepSeek-V3).
        renormalize: divide the k weights by their sum (default: True for sigmoid, False for softmax).
        n_group, topk_group: DeepSeek group-limited routing.
        correction_bias: keep a selection-only bias buffer ``e_score_correction_bias[E]``
            (DeepSeek-V3 aux-loss-free balancing; see :meth:`update_correction_bias`).
        routed_scaling_factor: multiplies the routed weights.
        shared_intermediate_size: width of the always-on shared experts (0: none).
        shared_expert_gate: scale the shared output by ``sigmoid(shared_gate(x))`` (Qwen2-MoE).
        capacity_factor: None for dropless; else C = max(min_capacity, ceil(cf * k * T / E)) slots
            per expert, overflow dropped in ``priority`` order (``"kmajor"`` or ``"token_major"``).
        activation: ``"swiglu"`` or ``"geglu"``.
        router_dtype: dtype of the router GEMM (default float32: routing decisions in full precision).
        aux_loss_coef, z_loss_coef: weights of the two losses in ``MoEAux.loss``.
        backend: moe_ops backend name (None: ``MOE_OPS_BACKEND`` or automatic).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
                 scoring: str = "softmax", renormalize: Optional[bool] = None,
                 n_group: Optional[int] = None, topk_group: Optional[int] = None,
                 correction_bias: bool = False, routed_scaling_factor: float = 1.0,
                 shared_intermediate_size: int = 0, shared_expert_gate: bool = False,
                 capacity_factor: Optional[float] = None, min_capacity: int = 0, priority: str = "kmajor",
                 activation: str = "swiglu", router_dtype: Optional[torch.dtype] = torch.float32,
                 aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        if scoring not in ops.SCORINGS:
            raise ValueError(f"moe_ops.MoE: scoring must be one of {ops.SCORINGS}, got {scoring!r}")
        if activation not in ops.ACTIVATIONS:
            raise ValueError(f"moe_ops.MoE: activation must be one of {ops.ACTIVATIONS}, got {activation!r}")
        if priority not in ops.PRIORITIES:
            raise ValueError(f"moe_ops.MoE: priority must be one of {ops.PRIORITIES}, got {priority!r}")
        if not 1 <= top_k <= min(num_experts, ops.MAX_K):
            raise ValueError(f"moe_ops.MoE: top_k must be in [1, {min(num_experts, ops.MAX_K)}], got {top_k}")
        if capacity_factor is not None and not capacity_factor >= 0:
            raise ValueError(f"moe_ops.MoE: capacity_factor must be >= 0 or None, got {capacity_factor}")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.scoring = scoring
        self.renormalize = (scoring == "sigmoid") if renormalize is None else bool(renormalize)
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.capacity_factor, self.min_capacity, self.priority = capacity_factor, min_capacity, priority
        self.activation = activation
        self.router_dtype = router_dtype
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.backend = backend

        fk = dict(device=device, dtype=dtype)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, device=device,
                              dtype=router_dtype if router_dtype is not None else dtype)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **fk))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **fk))
        if correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, device=device,
                                                                         dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.shared_experts = (GatedMLP(hidden_size, shared_intermediate_size, activation, **fk)
                               if shared_intermediate_size else None)
        self.shared_gate = (nn.Linear(hidden_size, 1, bias=False, **fk)
                            if shared_intermediate_size and shared_expert_gate else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert (fan-in H for w_gate_up, I for w_down)."""
        with torch.no_grad():
            b1, b2 = 1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.intermediate_size)
            self.w_gate_up.uniform_(-b1, b1)
            self.w_down.uniform_(-b2, b2)

    def extra_repr(self) -> str:
        cap = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return (f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, experts={self.num_experts}, "
                f"top_k={self.top_k}, scoring={self.scoring}, {cap}")

    def router_logits(self, x: Tensor) -> Tensor:
        """``[T, E]`` router logits for flattened ``x[T, H]``."""
        w = self.gate.weight
        return nn.functional.linear(x.to(w.dtype), w)

    def route(self, logits: Tensor) -> Tuple[Tensor, Tensor]:
        """``(weights[T, k] float32, ids[T, k] int32)`` from router logits."""
        return ops.topk_gating(logits, self.top_k, scoring=self.scoring, renormalize=self.renormalize,
                               n_group=self.n_group, topk_group=self.topk_group,
                               correction_bias=self.e_score_correction_bias,
                               scaling_factor=self.routed_scaling_factor,
                               backend=_backend.resolved_name("topk_gating", logits.device.type, self.backend,
                                                              strict=False))

    def forward(self, x: Tensor, return_aux: bool = False):
        """``x[..., H]`` -> ``out[..., H]`` (x's dtype), or ``(out, MoEAux)`` with ``return_aux``."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"moe_ops.MoE: expected hidden size {self.hidden_size}, got input {tuple(x.shape)}")
        shape = x.shape
        h = x.reshape(-1, self.hidden_size)
        logits = self.router_logits(h)
        w_gate_up, w_down = self.w_gate_up, self.w_down
        fmt = getattr(self, "weight_format", None)
        quantized = {} if fmt is None else dict(weight_format=fmt, w_gate_up_scale=self.w_gate_up_scale,
                                                 w_down_scale=self.w_down_scale, block_size=self.block_size)
        if not return_aux:
            out = ops.moe_forward(h, logits, w_gate_up, w_down, self.top_k, activation=self.activation,
                                  scoring=self.scoring, renormalize=self.renormalize, n_group=self.n_group,
                                  topk_group=self.topk_group, correction_bias=self.e_score_correction_bias,
                                  scaling_factor=self.routed_scaling_factor, capacity_factor=self.capacity_factor,
                                  min_capacity=self.min_capacity, priority=self.priority, backend=self.backend,
                                  packed=None if quantized else self._current_packing(), **quantized)
            aux = None
        else:
            if quantized:  # the experts on float32 copies, as moe_forward's fallback (x upcast)
                w_gate_up, w_down = ops._dequantized_weights(w_gate_up, w_down, fmt, self.w_gate_up_scale,
                                                             self.w_down_scale, self.block_size)
            weights, ids = self.route(logits)
            out = experts_forward(h.to(w_gate_up.dtype) if quantized else h, weights, ids, w_gate_up, w_down,
                                  activation=self.activation, capacity_factor=self.capacity_factor,
                                  min_capacity=self.min_capacity, priority=self.priority,
                                  backend=self.backend).to(h.dtype)
            aux = self.aux_losses(logits, ids)
        out = self.add_shared_experts(h, out).reshape(shape)
        return (out, aux) if return_aux else out

    @torch.no_grad()
    def quantize_experts_(self, weight_format: str, *, block_size: Optional[Tuple[int, int]] = None) -> "MoE":
        """Replace the expert weights by weight-only quantized copies for inference
        (:func:`moe_ops.quantize_experts`: ``fp8_e4m3`` with ``block_size``, ``mxfp4``, ``int8``):
        ``w_gate_up`` / ``w_down`` become buffers in the format (with ``w_gate_up_scale`` /
        ``w_down_scale``), so ``state_dict`` holds the quantized checkpoint tensors; ``forward``
        passes them to :func:`moe_ops.moe_forward` (docs/quantization.md says which kernel runs).
        The experts get no gradient after this (the router and shared experts still do).
        Returns ``self``."""
        from . import quant
        q1, s1 = quant.quantize_experts(self.w_gate_up, weight_format, block_size=block_size)
        q2, s2 = quant.quantize_experts(self.w_down, weight_format, block_size=block_size)
        del self.w_gate_up, self.w_down
        for name, t in (("w_gate_up", q1), ("w_gate_up_scale", s1), ("w_down", q2), ("w_down_scale", s2)):
            self.register_buffer(name, t)
        self.weight_format, self.block_size = weight_format, block_size
        self._packed, self._pack = None, False
        return self

    def pack_for_cpu(self, enable: bool = True) -> "MoE":
        """Keep a :func:`moe_ops.pack_experts` copy of the expert weights for the ``cpu``
        backend's panel GEMM (inference: used when no gradient is needed; re-packed automatically
        when the weights change). Costs one more copy of the expert weights. ``enable=False``
        drops it. Returns ``self``."""
        self._packed = None
        self._pack = enable
        return self

    def _current_packing(self):
        if not getattr(self, "_pack", False) or self.w_gate_up.device.type != "cpu":
            return None
        if self.w_gate_up.dtype == torch.float64:
            return None
        self._packed = ops.repack_if_stale(getattr(self, "_packed", None), self.w_gate_up, self.w_down)
        return self._packed

    def aux_losses(self, logits: Tensor, ids: Tensor) -> MoEAux:
        """Switch load-balancing loss, router z-loss and tokens per expert for one routing."""
        lb = load_balancing_loss(logits, ids, self.num_experts, self.scoring)
        zl = z_loss(logits)
        with torch.no_grad():
            counts = nn.functional.one_hot(ids.long(), self.num_experts).float().sum(dim=(0, 1))
        return MoEAux(self.aux_loss_coef * lb + self.z_loss_coef * zl, lb, zl, counts, logits)

    def add_shared_experts(self, h: Tensor, out: Tensor) -> Tensor:
        """``out`` plus the (optionally sigmoid-gated) shared experts' output on ``h``."""
        if self.shared_experts is None:
            return out
        s = self.shared_experts(h)
        if self.shared_gate is not None:
            s = torch.sigmoid(self.shared_gate(h)) * s
        return out + s

    @torch.no_grad()
    def update_correction_bias(self, tokens_per_expert: Tensor, rate: float = 1e-3) -> None:
        """DeepSeek-V3 aux-loss-free balancing: raise the selection bias of under-loaded experts
        and lower it for over-loaded ones by ``rate`` (sign of the deviation from the mean load)."""
        if self.e_score_correction_bias is None:
            raise RuntimeError("moe_ops.MoE: built without correction_bias=True")
        load = tokens_per_expert.float()
        self.e_score_correction_bias += rate * torch.sign(load.mean() - load)
