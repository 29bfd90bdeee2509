"""Whole-model benchmark: a Hugging Face MoE model's forward pass, stock vs patched by moe-ops.

Builds randomly initialised Mixtral- and Qwen3-MoE-architecture models (no downloads; sizes
scaled for the device) and times one forward pass over a batch of tokens with
  * transformers' ``eager`` experts (the per-expert Python loop),
  * transformers' default experts implementation (``grouped_mm``),
  * ``moe_ops.integrations.transformers.apply_moe_ops(model)`` (fused routers + moe_ops experts),
  * on CPU also with ``pack_cpu=True`` (expert weights packed once, at the first forward, untimed),
  * with ``--fp8``, the experts quantized to FP8 (``quantize_experts_``: transformers' ``FP8Experts``,
    128x128 blocks) on moe_ops: the fused quantized CPU op for bf16 on AVX512-BF16 CPUs, else the
    dequantizing path (docs/transformers-quantized.md; its logit error includes the quantization's),
all measured in this one run on the same weights and inputs. The patched model's logits are
checked against the eager ones before timing.

    python bench/hf_model.py [--tokens 512] [--dtype float32] [--repeats 5] [--fp8]

Prints a markdown table and writes it to bench/results/hf_model.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def models(device):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    big = device == "cuda"
    H, I, L = (2048, 1024, 4) if big else (512, 1024, 2)
    yield "Mixtral-arch (E=8, k=2)", MixtralForCausalLM, MixtralConfig(
        vocab_size=1024, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
    yield "Qwen3-MoE-arch (E=64, k=8)", Qwen3MoeForCausalLM, Qwen3MoeConfig(
        vocab_size=1024, hidden_size=H, intermediate_size=I, moe_intermediate_size=I // 4, num_hidden_layers=L,
        num_attention_heads=8, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[])


def timed(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fp8", action="store_true", help="also time the model with FP8 experts on moe_ops")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "hf_model.md"))
    args = p.parse_args(argv)

    from moe_ops.integrations.transformers import apply_moe_ops, quantize_experts_

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = []
    for name, cls, cfg in models(args.device):
        model = cls(cfg).to(args.device, dtype).eval()
        ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), device=args.device)

        def fwd():
            with torch.no_grad():
                return model(ids).logits

        res = {}
        for impl in ("eager", "grouped_mm"):
            model.set_experts_implementation(impl)
            res[impl] = timed(fwd, args.repeats, args.device)
        model.set_experts_implementation("eager")
        ref = fwd().float()
        apply_moe_ops(model)
        err = (fwd().float() - ref).abs().max().item()
        res["moe_ops"] = timed(fwd, args.repeats, args.device)
        if args.device == "cpu":  # the same patched model on packed expert weights
            for m in model.modules():
                if hasattr(m, "_moe_ops_pack_cpu"):
                    m._moe_ops_pack_cpu = True
            err = max(err, (fwd().float() - ref).abs().max().item())  # also packs (untimed)
            res["moe_ops_packed"] = timed(fwd, args.repeats, args.device)
        if args.fp8:
            model = apply_moe_ops(quantize_experts_(model, "fp8_e4m3"))
            out = fwd().float()
            res["fp8_rel_rms"] = float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
            res["moe_ops_fp8"] = timed(fwd, args.repeats, args.device)
        rows.append((name, res, err))

    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    lines = [f"HF model forward, {args.tokens} tokens, {args.dtype}, {dev}, torch {torch.__version__}, "
             f"median of {args.repeats}",
             "",
             "| model | HF eager (ms) | HF grouped_mm (ms) | moe_ops (ms) | moe_ops, packed (ms) | best vs eager | "
             "best vs grouped_mm | max abs logit diff |" + (" moe_ops, fp8 experts (ms) | fp8 logits rel. RMS diff |"
                                                           if args.fp8 else ""),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if args.fp8 else "")]
    for name, r, err in rows:
        best = min(r["moe_ops"], r.get("moe_ops_packed", float("inf")))
        packed = f"{r['moe_ops_packed']:.1f}" if "moe_ops_packed" in r else "-"
        lines.append(f"| {name} | {r['eager']:.1f} | {r['grouped_mm']:.1f} | {r['moe_ops']:.1f} | {packed} | "
                     f"{r['eager'] / best:.2f}x | {r['grouped_mm'] / best:.2f}x | {err:.1e} |"
                     + (f" {r['moe_ops_fp8']:.1f} | {r['fp8_rel_rms']:.1e} |" if args.fp8 else ""))
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
