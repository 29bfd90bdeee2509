"""Named MoE layer shapes the benchmark matrix sweeps (one MoE layer each; no shared experts).

Every number comes from the model's published ``config.json`` on the Hugging Face Hub (URL in
``source``); where transformers' own config class has a different default it is noted. The
matrix sweeps E over ``bench.run.EXPERTS`` for every model, keeping H, I, k and the routing
rule; a model's native E is in ``experts``.

What is *not* modelled (the timing covers the routed experts only, identically for every
implementation): shared experts (DeepSeek-V3 has 1), GPT-OSS's expert biases, clamped SwiGLU
(alpha=1.702, limit=7) and interleaved gate/up layout (we use plain SwiGLU with [gate; up]
rows, i.e. the Mixtral layout that transformers' experts modules use).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int            # H (config: hidden_size)
    intermediate: int      # I per expert (intermediate_size / moe_intermediate_size)
    experts: int           # native E
    top_k: int             # k (num_experts_per_tok)
    scoring: str = "softmax"          # router score function
    renormalize: bool = False         # divide the k weights by their sum
    n_group: Optional[int] = None     # group-limited routing (DeepSeek-V3)
    topk_group: Optional[int] = None
    scaling_factor: float = 1.0       # routed_scaling_factor
    correction_bias: bool = False     # e_score_correction_bias (selection only)
    source: str = ""

    def scaled(self, scale: float) -> "ModelShape":
        """H and I divided by ``scale`` (rounded to a multiple of 32, at least 64): a CPU-sized
        layer with the model's aspect ratio, E, k and routing."""
        if scale == 1:
            return self
        return replace(self, hidden=_shrink(self.hidden, scale), intermediate=_shrink(self.intermediate, scale))

    def routing_for(self, num_experts: int, k: Optional[int] = None):
        """(n_group, topk_group) for a sweep point with ``num_experts`` experts and top-``k``
        (default: the model's): n_group shrinks to E when E is smaller; ("invalid", None) when
        k exceeds the experts the kept groups hold."""
        k = self.top_k if k is None else k
        if self.n_group is None:
            return None, None
        n_group = min(self.n_group, num_experts)
        if num_experts % n_group:
            return "invalid", None
        topk_group = min(self.topk_group, n_group)
        if k > topk_group * (num_experts // n_group):
            return "invalid", None
        return n_group, topk_group


def _shrink(n: int, scale: float) -> int:
    return max(64, int(round(n / scale / 32)) * 32)


MODELS: Dict[str, ModelShape] = {m.name: m for m in (
    # hidden_size 4096, intermediate_size 14336, num_local_experts 8, num_experts_per_tok 2;
    # MixtralTopKRouter: softmax over all E, top-k, weights divided by their sum.
    ModelShape("mixtral-8x7b", 4096, 14336, 8, 2, "softmax", True,
               source="https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json"),
    # hidden_size 2048, moe_intermediate_size 768, num_experts 128, num_experts_per_tok 8,
    # norm_topk_prob true (transformers' Qwen3MoeConfig defaults norm_topk_prob to False).
    ModelShape("qwen3-30b-a3b", 2048, 768, 128, 8, "softmax", True,
               source="https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json"),
    # hidden_size 7168, moe_intermediate_size 2048, n_routed_experts 256, num_experts_per_tok 8,
    # scoring_func sigmoid, topk_method noaux_tc (e_score_correction_bias), n_group 8,
    # topk_group 4, norm_topk_prob true, routed_scaling_factor 2.5.
    ModelShape("deepseek-v3", 7168, 2048, 256, 8, "sigmoid", True, n_group=8, topk_group=4,
               scaling_factor=2.5, correction_bias=True,
               source="https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json"),
    # hidden_size 2880, intermediate_size 2880, num_local_experts 32, experts_per_token 4;
    # GptOssTopKRouter: top-k on the logits, softmax over the k chosen = renormalised softmax
    # (transformers' GptOssConfig defaults to the 120b's 128 experts).
    ModelShape("gpt-oss-20b", 2880, 2880, 32, 4, "softmax", True,
               source="https://huggingface.co/openai/gpt-oss-20b/blob/main/config.json"),
    # hidden_size 2048, intermediate_size 1024, num_experts 64, num_experts_per_tok 8,
    # norm_topk_prob false (transformers' OlmoeConfig defaults intermediate_size to 2048).
    ModelShape("olmoe-1b-7b", 2048, 1024, 64, 8, "softmax", False,
               source="https://huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json"),
)}

# A tiny layer for the smoke preset and the microbenchmarks (not a real model).
TINY = ModelShape("tiny", 64, 128, 8, 2, "softmax", True, source="synthetic")
# The CPU issue's layer (bench/cpu_layer.py's defaults): E=64, H=1024, I=2048, top-2, plain softmax;
# 805 MB of bf16 experts, far beyond a CPU's last-level cache (the cold-weight decode rows).
CPU_LAYER = ModelShape("cpu-layer", 1024, 2048, 64, 2, "softmax", False, source="synthetic (issue 15)")
# Shapes that are selected by name but never scaled and not part of list(MODELS).
EXTRA = {TINY.name: TINY, CPU_LAYER.name: CPU_LAYER}
