"""``ExpertParallelMoE``: :class:`moe_ops.MoE` with its experts sharded over a process group.

Same constructor, parameter names, forward signature and auxiliary outputs as ``moe_ops.MoE``,
plus ``group`` and ``dispatch``. Rank r of a group of ``world`` holds experts
``[r*E_l, (r+1)*E_l)`` as ``w_gate_up[E_l, 2I, H]`` / ``w_down[E_l, H, I]``; the router
(``gate``), the correction bias and the shared experts are replicated (same values on every
rank: broadcast from the group's rank 0 at construction). Forward per rank::

    logits = gate(x); weights, ids = route(logits)           (local tokens, all E experts)
    out = expert_parallel_experts(x, weights, ids, ...)      (exchange -> local experts -> back)
    aux losses from the local logits/ids; + shared experts

so each rank's output equals ``moe_ops.MoE`` (same weights) applied to that rank's tokens.
Gradients: local expert weights get the contributions of every rank's tokens (through the
reverse exchange); replicated parameters only see local tokens, so sum them over the group
(:meth:`all_reduce_replicated_grads`, or the data-parallel all-reduce that normally covers them).
"""
from __future__ import annotations

from typing import Dict, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..layer import MoE
from . import exchange as _x
from .functional import DISPATCHES, expert_parallel_experts

Tensor = torch.Tensor
EXPERT_PARAMS = ("w_gate_up", "w_down")


def _expert_slice(num_experts: int, rank: int, world: int) -> slice:
    if num_experts % world:
        raise ValueError(f"moe_ops.parallel: {num_experts} experts do not split evenly over {world} ranks")
    e_l = num_experts // world
    return slice(rank * e_l, (rank + 1) * e_l)


def shard_state_dict(state_dict: Dict[str, Tensor], rank: int, world: int, prefix: str = "") -> Dict[str, Tensor]:
    """A ``moe_ops.MoE`` state dict -> rank ``rank``'s ``ExpertParallelMoE`` state dict: expert
    weights sliced to the rank's experts, everything else as is (views, no copies)."""
    out = dict(state_dict)
    for name in EXPERT_PARAMS:
        key = prefix + name
        if key in out:
            out[key] = out[key][_expert_slice(out[key].shape[0], rank, world)]
    return out


class ExpertParallelMoE(MoE):
    """``moe_ops.MoE`` over a process group (expert parallelism). See the module docstring.

    Extra args:
        group: the process group whose ranks share the experts (default: the world group).
            ``num_experts`` must be divisible by its size.
        dispatch: ``"alltoall"`` (default; dropless = variable splits with one host sync, or
            capacity = fixed buffers and none) or ``"allgather"`` (dropless, static shapes,
            world x the traffic; small batches).
        broadcast_replicated: broadcast the router / shared experts / correction bias from the
            group's rank 0 after initialisation, so every rank starts with the same values.

    ``last_exchange`` holds the rows and bytes this rank moved in the last forward.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
                 group=None, dispatch: str = "alltoall", broadcast_replicated: bool = True,
                 device=None, dtype=None, **kwargs):
        if dispatch not in DISPATCHES:
            raise ValueError(f"moe_ops.parallel: dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        world, rank = _x.group_size(group), _x.group_rank(group)
        sl = _expert_slice(num_experts, rank, world)
        # Build on the meta device so the full [E, ...] expert tensors are never allocated, then
        # swap in the local shards and materialise.
        super().__init__(hidden_size, intermediate_size, num_experts, top_k, device="meta", dtype=dtype, **kwargs)
        if dispatch == "allgather" and self.capacity_factor is not None:
            raise ValueError("moe_ops.parallel: dispatch='allgather' is dropless (capacity_factor=None)")
        self.group, self.dispatch = group, dispatch
        self.world_size, self.rank = world, rank
        self.expert_range = (sl.start, sl.stop - sl.start)
        self.num_local_experts = sl.stop - sl.start
        self.w_gate_up = nn.Parameter(self.w_gate_up[sl])
        self.w_down = nn.Parameter(self.w_down[sl])
        self.to_empty(device=device if device is not None else torch.get_default_device())
        with torch.no_grad():
            for m in self.modules():
                if m is not self and callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
            self.reset_parameters()
            if self.e_score_correction_bias is not None:
                self.e_score_correction_bias.zero_()
        if broadcast_replicated:
            self.broadcast_replicated()
        self.last_exchange: dict = {}

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", local_experts={self.expert_range[0]}..{sum(self.expert_range) - 1}"
                f" of world {self.world_size}, dispatch={self.dispatch}")

    # ------------------------------------------------------------------- parameters and sync

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """This rank's shard (not to be all-reduced over the expert-parallel group)."""
        yield self.w_gate_up
        yield self.w_down

    def replicated_parameters(self) -> Iterator[nn.Parameter]:
        """Router and shared experts: the same on every rank; their gradients need a sum over ranks."""
        for name, p in self.named_parameters():
            if name not in EXPERT_PARAMS:
                yield p

    def _replicated_tensors(self):
        yield from self.replicated_parameters()
        if self.e_score_correction_bias is not None:
            yield self.e_score_correction_bias

    @torch.no_grad()
    def broadcast_replicated(self) -> None:
        """Copy the replicated parameters and buffers from the group's rank 0 to every rank."""
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        for t in self._replicated_tensors():
            dist.broadcast(t.data, src=src, group=self.group)

    @torch.no_grad()
    def all_reduce_replicated_grads(self, average: bool = False) -> None:
        """Sum (or average) the replicated parameters' gradients over the group: afterwards they
        equal the single-process layer's gradients for the union of all ranks' tokens."""
        for p in self.replicated_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.group)
            if average:
                p.grad /= self.world_size

    # ------------------------------------------------------------------ conversion helpers

    @staticmethod
    def config_of(moe: MoE) -> dict:
        """Constructor arguments that rebuild ``moe``'s configuration."""
        shared = moe.shared_experts
        return dict(hidden_size=moe.hidden_size, intermediate_size=moe.intermediate_size,
                    num_experts=moe.num_experts, top_k=moe.top_k, scoring=moe.scoring,
                    renormalize=moe.renormalize, n_group=moe.n_group, topk_group=moe.topk_group,
                    correction_bias=moe.e_score_correction_bias is not None,
                    routed_scaling_factor=moe.routed_scaling_factor,
                    shared_intermediate_size=0 if shared is None else shared.down_proj.in_features,
                    shared_expert_gate=moe.shared_gate is not None, capacity_factor=moe.capacity_factor,
                    min_capacity=moe.min_capacity, priority=moe.priority, activation=moe.activation,
                    router_dtype=moe.router_dtype, aux_loss_coef=moe.aux_loss_coef, z_loss_coef=moe.z_loss_coef,
                    backend=moe.backend, dtype=moe.w_gate_up.dtype)

    @classmethod
    def from_moe(cls, moe: MoE, group=None, *, dispatch: str = "alltoall", device=None) -> "ExpertParallelMoE":
        """The sharded layer holding ``moe``'s weights: this rank's experts, the rest replicated.
        Every rank passes the same ``moe`` (e.g. built from one seed or one checkpoint)."""
        cfg = cls.config_of(moe)
        dev = device if device is not None else moe.w_gate_up.device
        ep = cls(group=group, dispatch=dispatch, broadcast_replicated=False, device=dev, **cfg)
        sd = shard_state_dict(moe.state_dict(), ep.rank, ep.world_size)
        ep.load_state_dict(sd)
        return ep

    # ---------------------------------------------------------------------------- forward

    def forward(self, x: Tensor, return_aux: bool = False):
        """``x[..., H]`` (this rank's tokens) -> ``out[..., H]``, or ``(out, MoEAux)`` with
        ``return_aux`` (losses and ``tokens_per_expert`` over this rank's tokens)."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"moe_ops.MoE: expected hidden size {self.hidden_size}, got input {tuple(x.shape)}")
        shape = x.shape
        h = x.reshape(-1, self.hidden_size)
        logits = self.router_logits(h)
        weights, ids = self.route(logits)
        stats: dict = {}
        out = expert_parallel_experts(h, weights, ids, self.w_gate_up, self.w_down, group=self.group,
                                      dispatch=self.dispatch, activation=self.activation,
                                      capacity_factor=self.capacity_factor, min_capacity=self.min_capacity,
                                      priority=self.priority, backend=self.backend, stats=stats)
        self.last_exchange = stats
        aux = self.aux_losses(logits, ids) if return_aux else None
        out = self.add_shared_experts(h, out).reshape(shape)
        return (out, aux) if return_aux else out
