"""Weight-only quantized experts as released checkpoints store them (issue 17).

    format      weight                              scale                               w = ...
    fp8_e4m3    float8_e4m3fn [E, N, K]             float32 [E, ceil(N/bn), ceil(K/bk)]  q * scale_inv (per block)
    mxfp4       uint8 [E, N, K/32, 16] (2 codes a   uint8 e8m0 [E, N, K/32]             e2m1(code) * 2^(s - 127)
                byte, low nibble first)
    int8        int8 [E, N, K]                      float32 [E, N] (or [E, N, 1])        q * scale (per row)

fp8 is DeepSeek-V3 / Qwen3-FP8's ``weight_scale_inv`` layout (block (128, 128) by default, partial
edge blocks allowed, e.g. K = 2880); mxfp4 is GPT-OSS's ``*_blocks`` / ``*_scales`` (the same
values as ``transformers.integrations.mxfp4.convert_moe_packed_tensors``, which returns them
transposed, ``[E, K, N]``); int8 is symmetric W8A16. The 2-D form of each (one expert) works too.

:func:`dequantize_experts` is the public face of the oracle (``moe_ops.reference``);
:func:`quantize_experts` builds such tensors from float weights (tests, tiny models, users
converting their own checkpoints).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import reference as R

FORMATS = ("fp8_e4m3", "mxfp4", "int8")
FP8_MAX = 448.0        # largest finite float8_e4m3fn
MX_BLOCK = 32          # elements per e8m0 scale
E2M1_MAX = 6.0


def _block(block_size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    bs = (128, 128) if block_size is None else tuple(block_size)
    if len(bs) != 2 or not all(isinstance(v, int) and v >= 1 for v in bs):
        raise ValueError(f"moe_ops: block_size must be two positive ints (rows, columns), got {block_size!r}")
    return bs


def check_quantized(weight: torch.Tensor, scale: torch.Tensor, format: str,
                    block_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """Validates a quantized weight and its scale; returns the dequantized ``(N, K)``. Raises a
    ``TypeError``/``ValueError`` naming what is wrong, before anything runs."""
    if format not in FORMATS:
        raise ValueError(f"moe_ops: weight format must be one of {FORMATS}, got {format!r}")
    if not isinstance(weight, torch.Tensor) or not isinstance(scale, torch.Tensor):
        raise TypeError("moe_ops: quantized weight and scale must be tensors")
    if weight.device != scale.device:
        raise ValueError(f"moe_ops: weight is on {weight.device} but its scale on {scale.device}")
    lead = weight.shape[:-3] if format == "mxfp4" else weight.shape[:-2]
    if format == "fp8_e4m3":
        if weight.dtype != torch.float8_e4m3fn:
            raise TypeError(f"moe_ops: fp8_e4m3 weights must be torch.float8_e4m3fn, got {weight.dtype}")
        if weight.dim() not in (2, 3):
            raise ValueError(f"moe_ops: fp8_e4m3 weight must be [E, N, K] or [N, K], got {tuple(weight.shape)}")
        bn, bk = _block(block_size)
        N, K = weight.shape[-2:]
        want = (*lead, -(-N // bn), -(-K // bk))
        if not scale.is_floating_point() or tuple(scale.shape) != want:
            raise ValueError(f"moe_ops: fp8_e4m3 weight {tuple(weight.shape)} with block {(bn, bk)} needs a float "
                             f"scale_inv of shape {want}, got {tuple(scale.shape)} {scale.dtype}")
        return N, K
    if block_size is not None:
        raise ValueError(f"moe_ops: block_size applies to fp8_e4m3 only ({format} has a fixed layout)")
    if format == "mxfp4":
        if weight.dtype != torch.uint8 or scale.dtype != torch.uint8:
            raise TypeError(f"moe_ops: mxfp4 blocks and scales must be uint8, got {weight.dtype} and {scale.dtype}")
        if weight.dim() not in (3, 4) or weight.shape[-1] != MX_BLOCK // 2:
            raise ValueError(f"moe_ops: mxfp4 blocks must be [E, N, K/32, 16] or [N, K/32, 16], got {tuple(weight.shape)}")
        if tuple(scale.shape) != tuple(weight.shape[:-1]):
            raise ValueError(f"moe_ops: mxfp4 scales must be {tuple(weight.shape[:-1])} (the blocks' shape without "
                             f"the last dim), got {tuple(scale.shape)}")
        return weight.shape[-3], weight.shape[-2] * MX_BLOCK
    if weight.dtype != torch.int8:
        raise TypeError(f"moe_ops: int8 weights must be torch.int8, got {weight.dtype}")
    if weight.dim() not in (2, 3):
        raise ValueError(f"moe_ops: int8 weight must be [E, N, K] or [N, K], got {tuple(weight.shape)}")
    N, K = weight.shape[-2:]
    if not scale.is_floating_point() or tuple(scale.shape) not in ((*lead, N), (*lead, N, 1)):
        raise ValueError(f"moe_ops: int8 weight {tuple(weight.shape)} needs a float per-row scale of shape "
                         f"{(*lead, N)}, got {tuple(scale.shape)} {scale.dtype}")
    return N, K


def dequantize_experts(weight: torch.Tensor, scale: torch.Tensor, format: str, *,
                       block_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """float32 ``[E, N, K]`` (``[N, K]`` for one expert) of quantized experts; see the module
    docstring for the formats. The oracle every quantized kernel is tested against."""
    check_quantized(weight, scale, format, block_size)
    return R.dequantize_experts(weight, scale, format, _block(block_size) if format == "fp8_e4m3" else (0, 0))


def _e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code of each value already scaled into [-6, 6] (ties to the even code)."""
    mags = torch.tensor(R.E2M1_VALUES[:8], dtype=torch.float32, device=v.device)
    a = v.abs().clamp(max=E2M1_MAX).unsqueeze(-1)
    d = (a - mags).abs()
    best = d.min(dim=-1, keepdim=True).values
    # among equally near magnitudes take the even code (the lower mantissa bit 0)
    cand = torch.where(d == best, torch.arange(8, device=v.device), 99)
    even = torch.where(cand % 2 == 0, cand, 99).min(dim=-1).values
    code = torch.where(even < 99, even, cand.min(dim=-1).values)
    return code | torch.where(torch.signbit(v), 8, 0)


def quantize_experts(w: torch.Tensor, format: str, *,
                     block_size: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(weight, scale)`` of float weights ``w[E, N, K]`` (or ``[N, K]``) in ``format``:
    fp8_e4m3 with ``scale_inv = amax / 448`` per block (DeepSeek's recipe), mxfp4 with the OCP MX
    shared exponent ``floor(log2(amax)) - 2`` per 32 values (K must be a multiple of 32), int8
    with ``scale = amax / 127`` per row. All-zero blocks get scale 1 (fp8, int8) / 2^-127 (mxfp4)."""
    if format not in FORMATS:
        raise ValueError(f"moe_ops: weight format must be one of {FORMATS}, got {format!r}")
    if not w.is_floating_point() or w.dim() not in (2, 3):
        raise ValueError(f"moe_ops: quantize_experts takes float [E, N, K] or [N, K], got {tuple(w.shape)} {w.dtype}")
    if w.dim() == 3:  # one expert at a time (the temporaries are tens of bytes a weight); E = 0 too
        parts = [quantize_experts(w[e], format, block_size=block_size) for e in range(w.shape[0])]
        if not parts:
            empty = quantize_experts(w.new_zeros(w.shape[1:]), format, block_size=block_size)
            return tuple(t.new_empty((0, *t.shape)) for t in empty)
        return torch.stack([q for q, _ in parts]), torch.stack([sc for _, sc in parts])
    w = w.detach().to(torch.float32)
    N, K = w.shape[-2:]
    if format == "fp8_e4m3":
        bn, bk = _block(block_size)
        nb, kb = -(-N // bn), -(-K // bk)
        pad = torch.nn.functional.pad(w.abs(), (0, kb * bk - K, 0, nb * bn - N))
        amax = pad.unflatten(-1, (kb, bk)).unflatten(-3, (nb, bn)).amax(dim=(-3, -1))
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        full = scale.repeat_interleave(bn, dim=-2)[..., :N, :].repeat_interleave(bk, dim=-1)[..., :K]
        return (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
    if block_size is not None:
        raise ValueError(f"moe_ops: block_size applies to fp8_e4m3 only, not {format}")
    if format == "int8":
        amax = w.abs().amax(dim=-1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        return torch.round(w / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), scale
    if K % MX_BLOCK:
        raise ValueError(f"moe_ops: mxfp4 needs K divisible by {MX_BLOCK}, got K={K}")
    g = w.unflatten(-1, (K // MX_BLOCK, MX_BLOCK))
    amax = g.abs().amax(dim=-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0 ** -126))) - 2, torch.full_like(amax, -127))
    exp = exp.clamp(-127, 127)
    codes = _e2m1_codes(g / torch.exp2(exp).unsqueeze(-1))
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exp + 127).to(torch.uint8)
