"""Expert parallelism (moe_ops.parallel) against the single-process layer, on real Gloo groups.

The multi-process part spawns one process group per world size (2 and 4 processes on
127.0.0.1, ``moe_ops.parallel.launch.run_local``: every collective and the join are bounded by a
timeout) and runs every scenario in it; each rank returns its output and gradients. The pytest
process then runs the single-process oracle (``moe_ops.moe_forward`` on each rank's tokens with
the full expert weights) and compares: outputs, d x, d router logits, and each rank's local
expert-weight gradients against the matching slice of the full weights' gradient (which sums the
contributions of every rank's tokens). Scenarios cover dropless (ragged T per rank, a rank with
T = 0), capacity with and without drops, allgather dispatch, DeepSeek group-limited sigmoid
routing, bf16, and routing where every token goes to rank 0's experts, so other ranks receive
nothing.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

import moe_ops
from moe_ops.parallel import apply_row_map, chunk_row_map, expert_major_order, sort_chunks_by_index

# --------------------------------------------------------------------- sort_chunks (no group)


def _sort_chunks_loop(x, sizes, order):
    chunks = list(torch.split(x[: sum(sizes)], sizes))
    return torch.cat([chunks[i] for i in order] + [x[sum(sizes):]])


@pytest.mark.parametrize("sizes,tail", [([2, 0, 3, 1, 4], 0), ([0, 0, 0], 0), ([5], 2), ([1, 0, 0, 7, 2, 0], 3),
                                        ([], 4)])
def test_sort_chunks_by_index_matches_loop_and_inverts(sizes, tail):
    g = torch.Generator().manual_seed(len(sizes) * 31 + tail)
    n = sum(sizes) + tail
    x = torch.randn(n, 3, generator=g, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(len(sizes), generator=g)
    y, row_map = sort_chunks_by_index(x, torch.tensor(sizes, dtype=torch.int32), order)
    assert torch.equal(y, _sort_chunks_loop(x.detach(), sizes, order.tolist()))
    assert torch.equal(apply_row_map(y, row_map, inverse=True), x)
    gy = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y.backward(gy)
    assert torch.equal(x.grad, apply_row_map(gy, row_map, inverse=True))
    assert torch.autograd.gradcheck(lambda t: apply_row_map(t, row_map), (x.detach().requires_grad_(),))


def test_expert_major_order_and_row_map_validation():
    assert expert_major_order(2, 3).tolist() == [0, 3, 1, 4, 2, 5]
    with pytest.raises(ValueError, match="sorted_index"):
        chunk_row_map(torch.tensor([1, 2]), torch.tensor([0]), 3)
    rm = chunk_row_map(torch.tensor([1, 2]), torch.tensor([1, 0]), 3)
    with pytest.raises(ValueError, match="row map"):
        apply_row_map(torch.zeros(4, 1), rm)


# ------------------------------------------------- a one-process group in the pytest process


@pytest.fixture
def group1():
    """A world-size-1 Gloo group in this process (no spawn): argument checks and the trivial
    sharding. Torn down afterwards so other tests see no default group."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_argument_checks(group1):
    from moe_ops.parallel import all_to_all, exchange_counts, expert_parallel_forward

    x, logits = torch.randn(4, 8), torch.randn(4, 4)
    a, b = torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    with pytest.raises(ValueError, match="both output_splits and input_splits"):
        all_to_all(x, [4], None)
    with pytest.raises(ValueError, match="1 entries"):
        all_to_all(x, [2, 2], [2, 2])
    with pytest.raises(ValueError, match="sum to 3"):
        all_to_all(x, [4], [3])
    with pytest.raises(ValueError, match="dispatch must be one of"):
        expert_parallel_forward(x, logits, a, b, 2, dispatch="ring")
    with pytest.raises(ValueError, match="router has 5 experts"):
        expert_parallel_forward(x, torch.randn(4, 5), a, b, 2)
    with pytest.raises(ValueError, match="local experts must be"):
        expert_parallel_forward(x, logits, a, b[:, :, :5], 2)
    with pytest.raises(ValueError, match="router_logits"):
        expert_parallel_forward(x, logits[:3], a, b, 2)
    with pytest.raises(TypeError, match="share a dtype"):
        expert_parallel_forward(x.double(), logits, a, b, 2)
    with pytest.raises(ValueError, match="is dropless"):
        expert_parallel_forward(x, logits, a, b, 2, dispatch="allgather", capacity_factor=1.0)
    splits = exchange_counts(torch.tensor([3, 0, 2, 1]))
    assert splits.send_splits == [6] and splits.recv_splits == [6]
    assert splits.recv_counts.tolist() == [[3, 0, 2, 1]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kwargs", [dict(), dict(capacity_factor=0.75), dict(dispatch="allgather")],
                         ids=["dropless", "capacity", "allgather"])
def test_world_of_one_equals_moe_forward(group1, kwargs):
    from moe_ops.parallel import expert_parallel_forward

    g = torch.Generator().manual_seed(5)
    x, logits = torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)
    a, b = torch.randn(4, 12, 8, generator=g), torch.randn(4, 8, 6, generator=g)
    out = expert_parallel_forward(x, logits, a, b, 2, **kwargs)
    ref = moe_ops.moe_forward(x, logits, a, b, 2, capacity_factor=kwargs.get("capacity_factor"))
    _close(out, ref, "world 1")


# ------------------------------------------------------------------------ multi-process runs

H, I, E, K = 16, 12, 8, 2
SEED = 1234
# name -> (kwargs of expert_parallel_forward, dtype, routing, tokens per rank for world 2 / 4)
SCENARIOS = {
    "dropless": (dict(), torch.float32, "random", ([9, 4], [9, 4, 0, 6])),
    "dropless_one_rank": (dict(), torch.float32, "rank0", ([6, 5], [6, 5, 3, 4])),
    "dropless_deepseek": (dict(scoring="sigmoid", n_group=4, topk_group=2, renormalize=True, scaling_factor=2.5,
                               correction_bias=True), torch.float32, "random", ([7, 5], [7, 5, 3, 2])),
    "dropless_bf16": (dict(), torch.bfloat16, "random", ([8, 6], [8, 6, 5, 1])),
    "capacity": (dict(capacity_factor=1.25), torch.float32, "random", ([8, 8], [8, 8, 8, 8])),
    "capacity_drops": (dict(capacity_factor=0.5, priority="token_major"), torch.float32, "random",
                       ([10, 10], [10, 10, 10, 10])),
    "capacity_one_rank": (dict(capacity_factor=1.0, min_capacity=2), torch.float32, "rank0", ([6, 6], [6, 6, 6, 6])),
    "allgather": (dict(dispatch="allgather"), torch.float32, "random", ([5, 5], [5, 5, 5, 5])),
    "allgather_one_rank": (dict(dispatch="allgather"), torch.float32, "rank0", ([4, 4], [4, 4, 4, 4])),
}


def _inputs(name, world):
    """Every rank's tokens, logits and upstream gradient, and the full expert weights (float32
    masters, cast to the scenario dtype)."""
    kwargs, dtype, routing, tokens = SCENARIOS[name]
    g = torch.Generator().manual_seed(SEED + world * 100 + sorted(SCENARIOS).index(name))
    ranks = []
    for T in tokens[0 if world == 2 else 1]:
        logits = torch.randn(T, E, generator=g)
        if routing == "rank0":  # experts 0..K-1 all live on rank 0 for world 2 and 4
            logits[:, :K] += 20.0
        ranks.append(dict(x=torch.randn(T, H, generator=g).to(dtype), logits=logits,
                          dout=torch.randn(T, H, generator=g).to(dtype)))
    w_gate_up = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dtype)
    w_down = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dtype)
    kwargs = dict(kwargs)
    if kwargs.pop("correction_bias", False):
        kwargs["correction_bias"] = torch.randn(E, generator=g) * 0.1
    return ranks, w_gate_up, w_down, kwargs


def _ep_worker(rank, world, names, group=None):
    """Runs in each spawned process: the expert-parallel layer on this rank's share (``rank`` and
    ``world`` within ``group``)."""
    from moe_ops.parallel import expert_parallel_forward

    results = {}
    for name in names:
        ranks, w_gate_up, w_down, kwargs = _inputs(name, world)
        mine, E_l = ranks[rank], E // world
        x = mine["x"].clone().requires_grad_()
        logits = mine["logits"].clone().requires_grad_()
        a = w_gate_up[rank * E_l:(rank + 1) * E_l].clone().requires_grad_()
        b = w_down[rank * E_l:(rank + 1) * E_l].clone().requires_grad_()
        stats = {}
        out = expert_parallel_forward(x, logits, a, b, K, group=group, stats=stats, **kwargs)
        out.backward(mine["dout"])
        results[name] = dict(out=out.detach(), dx=x.grad, dlogits=logits.grad, dw_gate_up=a.grad,
                             dw_down=b.grad, stats=stats)
        if name == "dropless":  # control: the next rank's experts must give a different answer
            other = (rank + 1) % world
            with torch.no_grad():
                results[name]["control"] = expert_parallel_forward(
                    mine["x"], mine["logits"], w_gate_up[other * E_l:(other + 1) * E_l],
                    w_down[other * E_l:(other + 1) * E_l], K, group=group, **kwargs)
    return results


def _single_process(name, world):
    """The oracle: moe_forward on each rank's tokens, full weights, summed weight gradients."""
    ranks, w_gate_up, w_down, kwargs = _inputs(name, world)
    kwargs = {k: v for k, v in kwargs.items() if k != "dispatch"}
    a = w_gate_up.clone().requires_grad_()
    b = w_down.clone().requires_grad_()
    per_rank = []
    for r in ranks:
        x = r["x"].clone().requires_grad_()
        logits = r["logits"].clone().requires_grad_()
        out = moe_ops.moe_forward(x, logits, a, b, K, **kwargs)
        out.backward(r["dout"])
        per_rank.append(dict(out=out.detach(), dx=x.grad, dlogits=logits.grad))
    return per_rank, a.grad, b.grad


def _close(actual, expected, what, equal_nan=False):
    if expected.dtype == torch.bfloat16:
        scale = expected.float().abs().max().item() if expected.numel() else 0.0
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2 * max(scale, 1.0),
                                   msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, equal_nan=equal_nan,
                                   msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------- the nn.Module

HAVE_LAYER = importlib.util.find_spec("moe_ops.layer") is not None
needs_layer = pytest.mark.skipif(not HAVE_LAYER, reason="moe_ops.layer (moe_ops.MoE) not in this tree yet")

# name -> (MoE kwargs, ExpertParallelMoE dispatch, token shape per rank for world 2 / 4)
LAYER_SCENARIOS = {
    "layer_dropless_shared_aux": (dict(shared_intermediate_size=8, shared_expert_gate=True, z_loss_coef=1e-3),
                                  "alltoall", ([(2, 5, H), (3, H)], [(2, 5, H), (3, H), (0, H), (7, H)])),
    "layer_capacity_deepseek": (dict(scoring="sigmoid", n_group=4, topk_group=2, correction_bias=True,
                                     routed_scaling_factor=2.0, capacity_factor=1.0, min_capacity=1),
                                "alltoall", ([(2, 4, H), (8, H)], [(8, H)] * 4)),
    "layer_allgather": (dict(shared_intermediate_size=4), "allgather", ([(6, H)] * 2, [(6, H)] * 4)),
}


def _layer_inputs(name, world):
    from moe_ops.layer import MoE

    cfg, dispatch, shapes = LAYER_SCENARIOS[name]
    g = torch.Generator().manual_seed(SEED + 7 * world + sorted(LAYER_SCENARIOS).index(name))
    torch.manual_seed(SEED + sorted(LAYER_SCENARIOS).index(name))
    moe = MoE(H, I, E, K, **cfg)
    if moe.e_score_correction_bias is not None:
        moe.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.1)
    xs = [torch.randn(sh, generator=g) for sh in shapes[0 if world == 2 else 1]]
    douts = [torch.randn(sh, generator=g) for sh in shapes[0 if world == 2 else 1]]
    return moe, dispatch, xs, douts


def _layer_worker(rank, world, names):
    from moe_ops.parallel import ExpertParallelMoE

    results = {}
    for name in names:
        moe, dispatch, xs, douts = _layer_inputs(name, world)
        ep = ExpertParallelMoE.from_moe(moe, dispatch=dispatch)
        x = xs[rank].clone().requires_grad_()
        out, aux = ep(x, return_aux=True)
        ((out * douts[rank]).sum() + aux.loss).backward()
        ep.all_reduce_replicated_grads()
        results[name] = dict(out=out.detach(), dx=x.grad, lb=aux.load_balancing_loss.detach(),
                             z=aux.z_loss.detach(), counts=aux.tokens_per_expert,
                             grads={n: p.grad for n, p in ep.named_parameters()})
    # Fresh construction: replicated parameters broadcast from rank 0, experts sharded.
    torch.manual_seed(rank)
    ep = ExpertParallelMoE(H, I, E, K, shared_intermediate_size=4, correction_bias=True)
    results["fresh"] = {n: t.detach() for n, t in ep.state_dict().items()}
    return results


SUBGROUP_SCENARIOS = ("capacity", "dropless", "dropless_one_rank")


def _subgroup_worker(rank, world):
    """World 4 as two expert-parallel groups {0, 1} and {2, 3}: each pair runs the world-2
    scenarios on its own; the fresh layer broadcasts within its group only."""
    import torch.distributed as dist

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates both, in order
    group = groups[rank // 2]
    out = {"sub/" + n: r for n, r in _ep_worker(rank % 2, 2, SUBGROUP_SCENARIOS, group=group).items()}
    if HAVE_LAYER:
        from moe_ops.parallel import ExpertParallelMoE

        torch.manual_seed(rank)
        ep = ExpertParallelMoE(H, I, E, K, group=group)
        out["sub/fresh"] = {n: t.detach() for n, t in ep.state_dict().items()}
        out["sub/expert_range"] = ep.expert_range
    return out


def _worker(rank, world, names, layer_names):
    out = _ep_worker(rank, world, names)
    if layer_names:
        out.update(_layer_worker(rank, world, layer_names))
    if world == 4:
        out.update(_subgroup_worker(rank, world))
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def ep_run(request):
    from moe_ops.parallel.launch import run_local

    world = request.param
    return world, run_local(_worker, world, (sorted(SCENARIOS), sorted(LAYER_SCENARIOS) if HAVE_LAYER else []),
                            timeout=240)


@needs_layer
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(LAYER_SCENARIOS))
def test_expert_parallel_moe_equals_moe(ep_run, name):
    """ExpertParallelMoE.from_moe(moe) on each rank == moe on that rank's tokens: output, aux
    losses, d x, and parameter gradients (experts: the rank's slice; replicated: all-reduced)."""
    world, results = ep_run
    moe, _, xs, douts = _layer_inputs(name, world)
    E_l = E // world
    for rank in range(world):
        got = results[rank][name]
        x = xs[rank].clone().requires_grad_()
        out, aux = moe(x, return_aux=True)
        ((out * douts[rank]).sum() + aux.loss).backward()
        _close(got["out"], out.detach(), f"{name} rank {rank} out")
        _close(got["dx"], x.grad, f"{name} rank {rank} dx")
        # A rank with no tokens gets MoE's own empty-batch losses (NaN: means over zero tokens).
        empty = x.numel() == 0
        _close(got["lb"], aux.load_balancing_loss.detach(), f"{name} rank {rank} load_balancing_loss", empty)
        _close(got["z"], aux.z_loss.detach(), f"{name} rank {rank} z_loss", empty)
        assert torch.equal(got["counts"], aux.tokens_per_expert), f"{name} rank {rank} tokens_per_expert"
    for n, p in moe.named_parameters():  # moe's grads now sum every rank's loss
        for rank in range(world):
            want = p.grad[rank * E_l:(rank + 1) * E_l] if n in ("w_gate_up", "w_down") else p.grad
            _close(results[rank][name]["grads"][n], want, f"{name} rank {rank} grad {n}")


@needs_layer
@pytest.mark.timeout(300)
def test_expert_parallel_moe_construction(ep_run):
    """Fresh ExpertParallelMoE: replicated tensors equal on every rank, experts [E/world, ...]."""
    world, results = ep_run
    states = [r["fresh"] for r in results]
    for n, t in states[0].items():
        if n in ("w_gate_up", "w_down"):
            assert t.shape[0] == E // world, n
            assert not torch.equal(t, states[1][n]), f"{n}: ranks hold different experts"
        else:
            for r in range(1, world):
                assert torch.equal(t, states[r][n]), f"{n} differs between rank 0 and rank {r}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_expert_parallel_equals_single_process(ep_run, name):
    world, results = ep_run
    ref, dw_gate_up, dw_down = _single_process(name, world)
    E_l = E // world
    for rank in range(world):
        got = results[rank][name]
        for key in ("out", "dx", "dlogits"):
            assert not torch.isnan(got[key]).any(), f"{name} rank {rank}: NaN in {key}"
            _close(got[key], ref[rank][key], f"{name} rank {rank} {key}")
        _close(got["dw_gate_up"], dw_gate_up[rank * E_l:(rank + 1) * E_l], f"{name} rank {rank} dw_gate_up")
        _close(got["dw_down"], dw_down[rank * E_l:(rank + 1) * E_l], f"{name} rank {rank} dw_down")
        if "control" in got and got["out"].numel():
            with pytest.raises(AssertionError):
                _close(got["control"], ref[rank]["out"], "control")


@pytest.mark.timeout(300)
def test_exchange_volume_accounting(ep_run):
    """Rows each rank sends are rows some other rank receives; routing everything to rank 0's
    experts leaves every other rank with nothing to receive (dropless)."""
    world, results = ep_run
    for name in SCENARIOS:
        sent = [r[name]["stats"]["rows_sent"] for r in results]
        recv = [r[name]["stats"]["rows_recv"] for r in results]
        assert sum(sent) == sum(recv), name
    for name in ("capacity_drops", "capacity_one_rank"):  # these must exercise dropping
        assert sum(int(r[name]["stats"]["dropped_slots"]) for r in results) > 0, name
    tokens = SCENARIOS["dropless_one_rank"][3][0 if world == 2 else 1]
    for rank in range(world):
        st = results[rank]["dropless_one_rank"]["stats"]
        assert st["recv_splits"] == ([t * K for t in tokens] if rank == 0 else [0] * world)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", SUBGROUP_SCENARIOS)
def test_expert_parallel_subgroups(ep_run, name):
    """Two independent expert-parallel groups inside one world of 4 (``group=`` argument): each
    pair equals the single-process layer on the world-2 inputs."""
    world, results = ep_run
    if world != 4:
        pytest.skip("subgroups are run in the 4-process world")
    ref, dw_gate_up, dw_down = _single_process(name, 2)
    for rank in range(4):
        got, sub = results[rank]["sub/" + name], rank % 2
        for key in ("out", "dx", "dlogits"):
            _close(got[key], ref[sub][key], f"subgroup {name} rank {rank} {key}")
        _close(got["dw_gate_up"], dw_gate_up[sub * E // 2:(sub + 1) * E // 2], f"subgroup {name} rank {rank} dw")
        _close(got["dw_down"], dw_down[sub * E // 2:(sub + 1) * E // 2], f"subgroup {name} rank {rank} dw_down")


@needs_layer
@pytest.mark.timeout(300)
def test_expert_parallel_moe_subgroup_broadcast(ep_run):
    """The fresh layer's replicated tensors come from the group's own rank 0 (global 0 or 2)."""
    world, results = ep_run
    if world != 4:
        pytest.skip("subgroups are run in the 4-process world")
    st = [r["sub/fresh"] for r in results]
    assert [r["sub/expert_range"] for r in results] == [(0, 4), (4, 4), (0, 4), (4, 4)]
    gate = "gate.weight"
    assert torch.equal(st[0][gate], st[1][gate]) and torch.equal(st[2][gate], st[3][gate])
    assert not torch.equal(st[0][gate], st[2][gate]), "groups must not share the broadcast"
