"""The oracle against independent per-token Python loops, plus the semantics corner cases.

The loops below share no code with moe_ops.reference: ranking is Python's ``sorted`` with an
explicit (is-NaN, -value, index) key, positions are counters in dicts, GEMMs are per-expert
float64 slices. Float32 rounding points that the contract fixes (keys, group sums) are
reproduced with ``np.float32``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import moe_ops
from moe_ops import reference as R
from tests.backends import DEVICES
from tests.compare import assert_close_to_reference, assert_exact, reference_hi
from tests.inputs import make_ids, make_logits, make_offsets, make_x, seed_for
from tests.poison import poison


# ---------------------------------------------------------------------------- loop oracles

def _rank(vals):
    """Python ranking rule: descending, NaN last, -0.0 == 0.0, ties to the lower index."""
    return sorted(range(len(vals)), key=lambda i: (math.isnan(vals[i]), -vals[i] if not math.isnan(vals[i]) else 0, i))


def loop_topk_gating(logits, k, scoring="softmax", renormalize=False, n_group=0, topk_group=0,
                     bias=None, scaling=1.0):
    lg = logits.detach().cpu().float()
    T, E = lg.shape
    ids = np.zeros((T, k), dtype=np.int64)
    w = np.zeros((T, k), dtype=np.float64)
    for t in range(T):
        row = lg[t]
        scores = (torch.softmax(row.double(), 0) if scoring == "softmax" else torch.sigmoid(row.double())).tolist()
        if scoring == "softmax" and bias is None:
            keys = [float(v) for v in row.tolist()]
        else:
            s32 = (torch.softmax(row, 0) if scoring == "softmax" else torch.sigmoid(row)).tolist()
            b = [0.0] * E if bias is None else bias.float().tolist()
            keys = [float(np.float32(np.float32(s32[e]) + np.float32(b[e]))) for e in range(E)]
        if n_group:
            G = E // n_group
            gscore = []
            for g in range(n_group):
                grp = keys[g * G:(g + 1) * G]
                top = [grp[i] for i in _rank(grp)[: min(2, G)]]
                gscore.append(float(np.float32(sum(np.float32(v) for v in top))) if len(top) == 2 else top[0])
            kept = set(_rank(gscore)[:topk_group])
            keys = [keys[e] if e // G in kept else -math.inf for e in range(E)]
        chosen = _rank(keys)[:k]
        ids[t] = chosen
        ws = [scores[e] for e in chosen]
        if renormalize:
            s = sum(ws)
            ws = [v / (s + 1e-20) for v in ws]
        w[t] = [v * scaling for v in ws]
    return torch.from_numpy(w), torch.from_numpy(ids)


def loop_permute(x, ids, E, block_m):
    T, k = ids.shape
    idl = ids.tolist()
    rows_of = {e: [] for e in range(E)}
    for t in range(T):
        for j in range(k):
            e = idl[t][j]
            if 0 <= e < E:
                rows_of[e].append(t * k + j)
    P = T * k + E * (block_m - 1)
    x_sorted = torch.zeros(P, x.shape[1], dtype=x.dtype)
    sorted_slots = [-1] * P
    slot_rows = [-1] * (T * k)
    offsets = [0]
    for e in range(E):
        start = offsets[-1]
        for i, s in enumerate(rows_of[e]):
            sorted_slots[start + i] = s
            slot_rows[s] = start + i
            x_sorted[start + i] = x[s // k]
        offsets.append(start + -(-len(rows_of[e]) // block_m) * block_m)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    return x_sorted, i32(sorted_slots), i32(offsets), i32(slot_rows)


def loop_combine(table, rows, weights):
    """rows[t][j] -> index into table or None; float64 sum."""
    T = len(rows)
    out = torch.zeros(T, table.shape[-1], dtype=torch.float64)
    for t in range(T):
        for j, r in enumerate(rows[t]):
            if r is not None:
                w = 1.0 if weights is None else float(weights[t, j])
                out[t] += w * table[r].double()
    return out


def loop_capacity(x, ids, E, C, priority):
    T, k = ids.shape
    idl = ids.tolist()
    order = [(t, j) for j in range(k) for t in range(T)] if priority == "kmajor" else \
            [(t, j) for t in range(T) for j in range(k)]
    count = {e: 0 for e in range(E)}
    slot_pos = [[-1] * k for _ in range(T)]
    buf = torch.zeros(E, C, x.shape[1], dtype=x.dtype)
    for t, j in order:
        e = idl[t][j]
        if not 0 <= e < E:
            continue
        p = count[e]
        count[e] += 1
        if p < C:
            slot_pos[t][j] = p
            buf[e, p] = x[t]
    demand = [count[e] for e in range(E)]
    kept = [min(d, C) for d in demand]

    def i32(v):
        return torch.tensor(v, dtype=torch.int32).reshape(-1) if not v or not isinstance(v[0], list) \
            else torch.tensor(v, dtype=torch.int32)
    return buf, torch.tensor(slot_pos, dtype=torch.int32).reshape(T, k), i32(demand), i32(kept)


def loop_grouped_gemm(a, b, offs, trans_b):
    M = a.shape[0]
    N = b.shape[1] if trans_b else b.shape[2]
    c = torch.zeros(M, N, dtype=torch.float64)
    o = offs.tolist()
    for e in range(b.shape[0]):
        be = b[e].double()
        c[o[e]:o[e + 1]] = a[o[e]:o[e + 1]].double() @ (be.t() if trans_b else be)
    return c


def loop_wgrad(a, dc, offs, E):
    o = offs.tolist()
    return torch.stack([a[o[e]:o[e + 1]].double().t() @ dc[o[e]:o[e + 1]].double() for e in range(E)])


# --------------------------------------------------------------------------------- gating

GATING_CASES = [
    # (T, E, k, scoring, renormalize, n_group, topk_group, bias, scaling, logits kind)
    (17, 8, 2, "softmax", False, 0, 0, False, 1.0, "randn"),
    (9, 8, 2, "softmax", True, 0, 0, False, 1.0, "randn"),
    (13, 64, 8, "softmax", True, 0, 0, False, 2.5, "ties"),
    (7, 7, 7, "softmax", False, 0, 0, False, 1.0, "randn"),       # k = E
    (5, 257, 32, "softmax", False, 0, 0, False, 1.0, "randn"),
    (3, 4096, 32, "softmax", True, 0, 0, False, 1.0, "randn"),
    (6, 1, 1, "softmax", False, 0, 0, False, 1.0, "randn"),       # E = 1
    (1, 16, 4, "softmax", False, 0, 0, False, 1.0, "nan"),        # T = 1, NaN logits
    (8, 16, 4, "sigmoid", True, 0, 0, True, 1.0, "nan"),
    (11, 32, 6, "sigmoid", True, 8, 3, True, 2.5, "randn"),        # DeepSeek-V3 style
    (11, 32, 6, "sigmoid", False, 4, 2, True, 1.0, "ties"),
    (11, 12, 3, "softmax", True, 4, 2, True, 1.0, "randn"),        # softmax + bias + groups
    (5, 16, 4, "sigmoid", True, 16, 4, False, 1.0, "randn"),       # G = 1
    (0, 16, 4, "sigmoid", True, 4, 2, True, 1.0, "randn"),         # T = 0
    (10, 256, 8, "sigmoid", True, 8, 4, True, 2.5, "randn"),
    # +-inf / NaN logits (issue 13): softmax rows with +inf or only -inf are all NaN, so with a
    # bias the keys are NaN and must rank below the -inf of the masked groups; +inf + -inf group
    # scores are NaN; sigmoid(-inf) = 0 below a denormal sigmoid(-88.5)
    (14, 16, 4, "softmax", False, 4, 2, True, 1.0, "special"),
    (14, 16, 4, "sigmoid", True, 4, 2, True, 2.5, "special"),
    (14, 16, 3, "softmax", False, 4, 2, False, 1.0, "special"),
    (14, 16, 4, "softmax", True, 0, 0, True, 1.0, "special"),
    (14, 16, 5, "sigmoid", False, 0, 0, False, 1.0, "special"),
]


def _with_specials(logits, seed):
    """Rows 0-2 all -inf / +inf / NaN; row 3 -inf next to logits with a denormal sigmoid; the
    rest with -inf (often a whole group), +inf and NaN sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    lg = logits.clone()
    inf = float("inf")
    for t, v in enumerate((-inf, inf, float("nan"))):
        lg[t] = v
    lg[3, : 8] = torch.tensor([-inf, -88.5, -1000.0, -88.6, -inf, -87.5, -90.0, -inf])
    u = torch.rand(lg.shape, generator=g).to(lg.device)
    rest = lg[4:]
    rest[u[4:] < 0.35] = -inf
    rest[(u[4:] >= 0.35) & (u[4:] < 0.42)] = inf
    rest[(u[4:] >= 0.42) & (u[4:] < 0.47)] = float("nan")
    lg[5, 4:8] = -inf
    return lg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", GATING_CASES, ids=lambda c: "-".join(map(str, c)))
def test_topk_gating_vs_loop(case, device):
    T, E, k, scoring, renorm, ng, tg, use_bias, scaling, kind = case
    seed = seed_for("gating", case)
    logits = make_logits(T, E, seed=seed, ties=kind == "ties", nan_rows=2 if kind == "nan" else 0, device=device)
    if kind == "special":
        logits = _with_specials(logits, seed)
    bias = make_logits(1, E, seed=seed + 1, scale=0.3, device=device)[0] if use_bias else None
    w, ids = R.topk_gating(logits, k, scoring, renorm, ng, tg, bias, scaling)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == ids.shape == (T, k)
    lw, lids = loop_topk_gating(logits, k, scoring, renorm, ng, tg, bias, scaling)
    assert_exact(ids.cpu().long(), lids, "ids")
    torch.testing.assert_close(w.cpu().double(), lw, rtol=1e-5, atol=1e-6, equal_nan=True)
    # the public function is the same thing
    w2, ids2 = moe_ops.topk_gating(logits, k, scoring=scoring, renormalize=renorm, n_group=ng or None,
                                   topk_group=tg or None, correction_bias=bias, scaling_factor=scaling,
                                   backend="reference")
    assert_exact(ids2, ids)
    assert_exact(w2, w)


def test_gating_ties_lower_index_and_nan_lowest():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0],
                           [nan, -inf, 0.0, -0.0, nan],
                           [nan, nan, nan, nan, -inf],
                           [0.0, 0.0, 0.0, 0.0, 0.0]])
    _, ids = R.topk_gating(logits, 5, "sigmoid", False, 0, 0, None, 1.0)
    assert ids.tolist() == [[1, 2, 4, 0, 3], [2, 3, 1, 0, 4], [4, 0, 1, 2, 3], [0, 1, 2, 3, 4]]
    # softmax: a row with NaN has NaN weights (as torch.softmax) but the ids still follow the logits
    w, ids = R.topk_gating(logits, 2, "softmax", False, 0, 0, None, 1.0)
    assert ids.tolist() == [[1, 2], [2, 3], [4, 0], [0, 1]]
    assert torch.isnan(w[1]).all() and torch.isfinite(w[0]).all()


def test_gating_group_masking_uses_minus_inf():
    # Group 1 (experts 2,3) wins; experts outside it must never beat a negative key inside it.
    logits = torch.tensor([[0.0, 0.0, 5.0, 5.0]])
    bias = torch.tensor([0.0, 0.0, -3.0, -3.0])  # keys ~ [.5, .5, -2.007, -2.007]
    _, ids = R.topk_gating(logits, 2, "sigmoid", False, 2, 1, bias, 1.0)
    assert ids.tolist() == [[0, 1]]
    logits = torch.tensor([[-9.0, -9.0, 9.0, 9.0]])
    bias = torch.tensor([0.0, 0.0, -1.5, -1.2])   # keys [~0, ~0, -.5, -.2]: group 1 sum -.7 < group 0 ~0
    _, ids = R.topk_gating(logits, 2, "sigmoid", False, 2, 1, bias, 1.0)
    assert ids.tolist() == [[0, 1]]
    bias = torch.tensor([0.0, 0.0, -0.6, -0.3])   # group 1: .4+.7 = 1.1 > group 0 ~0
    w, ids = R.topk_gating(logits, 2, "sigmoid", True, 2, 1, bias, 2.0)
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0]]), rtol=1e-6, atol=1e-6)


def test_gating_renormalize_and_scaling():
    logits = make_logits(6, 10, seed=3)
    w, ids = R.topk_gating(logits, 3, "softmax", True, 0, 0, None, 2.5)
    torch.testing.assert_close(w.sum(-1), torch.full((6,), 2.5))
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(w, p.gather(1, ids.long()) / p.gather(1, ids.long()).sum(-1, keepdim=True) * 2.5)


def test_gating_float64_and_lowp_inputs():
    lg = make_logits(5, 12, seed=4, dtype=torch.bfloat16)
    w, ids = R.topk_gating(lg, 3, "softmax", False, 0, 0, None, 1.0)
    assert w.dtype == torch.float32
    lw, lids = loop_topk_gating(lg, 3)
    assert_exact(ids.long(), lids)
    w64, _ = R.topk_gating(lg.double(), 3, "softmax", False, 0, 0, None, 1.0)
    assert w64.dtype == torch.float64


# -------------------------------------------------------------------------------- permute

PERMUTE_CASES = [
    # (T, k, E, block_m, ids mode, empty experts, invalid fraction, H)
    (23, 2, 8, 1, "uniform", 0, 0.0, 5),
    (23, 2, 8, 4, "skew", 2, 0.0, 5),
    (40, 4, 7, 3, "dup", 0, 0.0, 3),
    (31, 8, 64, 16, "skew", 20, 0.0, 4),
    (9, 32, 257, 8, "uniform", 0, 0.0, 2),
    (5, 32, 4096, 2, "skew", 100, 0.0, 2),
    (12, 1, 1, 5, "uniform", 0, 0.0, 3),          # E = 1
    (12, 3, 3, 1, "uniform", 0, 0.0, 3),          # k = E
    (30, 2, 8, 4, "one", 0, 0.0, 3),              # all tokens to one expert
    (30, 3, 8, 4, "uniform", 0, 0.3, 3),          # invalid ids dropped
    (1, 4, 8, 4, "uniform", 0, 0.0, 3),           # T = 1
    (0, 4, 8, 4, "uniform", 0, 0.0, 3),           # T = 0
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", PERMUTE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_permute_unpermute_vs_loop(case, device):
    T, k, E, bm, mode, empty, invalid, H = case
    seed = seed_for("permute", case)
    x = make_x(T, H, seed=seed, device=device)
    ids = make_ids(T, k, E, seed=seed + 1, mode=mode, empty=empty, invalid=invalid, device=device)
    out = R.permute(x, ids, E, bm)
    want = loop_permute(x.cpu(), ids.cpu(), E, bm)
    for name, o, w in zip(("x_sorted", "sorted_slots", "expert_offsets", "slot_rows"), out, want):
        assert_exact(o.cpu(), w, name)
    # unpermute with and without weights; padding rows of y poisoned -- never read
    y = make_x(out[0].shape[0], H, seed=seed + 2, device=device)
    y[out[1] < 0] = float("nan")
    weights = make_logits(T, k, seed=seed + 3, device=device).abs()
    rows = [[r if r >= 0 else None for r in out[3].cpu().reshape(T, k)[t].tolist()] for t in range(T)]
    for wts in (weights, None):
        got = R.unpermute(y, out[3], wts, k)
        assert got.dtype == y.dtype and got.shape == (T, H)
        torch.testing.assert_close(got.cpu().double(), loop_combine(y.cpu(), rows, None if wts is None else wts.cpu()),
                                   rtol=1e-5, atol=1e-5)


def test_permute_block_m_padding_layout():
    ids = torch.tensor([[1, 0], [1, 2], [1, 0]], dtype=torch.int32)
    x = torch.arange(3.0).unsqueeze(1) + 1
    xs, ss, offs, sr = R.permute(x, ids, 4, 4)
    assert offs.tolist() == [0, 4, 8, 12, 12]
    assert xs.shape[0] == 3 * 2 + 4 * 3
    assert ss.tolist()[:12] == [1, 5, -1, -1, 0, 2, 4, -1, 3, -1, -1, -1] and set(ss.tolist()[12:]) == {-1}
    assert sr.tolist() == [4, 0, 5, 8, 6, 1]
    assert xs[:12, 0].tolist() == [1, 3, 0, 0, 1, 2, 3, 0, 2, 0, 0, 0] and (xs[12:] == 0).all()


def test_unpermute_dropped_slot_ignores_nan_weight():
    y = torch.tensor([[1.0], [2.0]])
    out = R.unpermute(y, torch.tensor([1, -1, 0, 1], dtype=torch.int32),
                      torch.tensor([[2.0, float("nan")], [1.0, 0.5]]), 2)
    assert out.tolist() == [[4.0], [2.0]]


# ------------------------------------------------------------------------------ capacity

CAPACITY_CASES = [
    # (T, k, E, C, ids mode, invalid, H)
    (20, 2, 8, 3, "skew", 0.0, 4),
    (20, 2, 8, 0, "uniform", 0.0, 4),      # C = 0: everything dropped
    (33, 4, 7, 100, "uniform", 0.0, 3),    # nothing dropped
    (25, 3, 8, 2, "one", 0.0, 3),          # all to one expert: heavy drops
    (16, 8, 64, 1, "dup", 0.0, 2),
    (6, 32, 257, 1, "skew", 0.0, 2),
    (4, 16, 4096, 2, "uniform", 0.0, 2),
    (10, 1, 1, 4, "uniform", 0.0, 3),
    (10, 3, 8, 2, "uniform", 0.25, 3),     # invalid ids dropped
    (1, 2, 4, 1, "uniform", 0.0, 3),
    (0, 2, 4, 3, "uniform", 0.0, 3),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("priority", ["kmajor", "token_major"])
@pytest.mark.parametrize("case", CAPACITY_CASES, ids=lambda c: "-".join(map(str, c)))
def test_capacity_vs_loop(case, priority, device):
    T, k, E, C, mode, invalid, H = case
    seed = seed_for("capacity", case, priority)
    x = make_x(T, H, seed=seed, device=device)
    ids = make_ids(T, k, E, seed=seed + 1, mode=mode, invalid=invalid, device=device)
    out = R.capacity_dispatch(x, ids, E, C, priority)
    want = loop_capacity(x.cpu(), ids.cpu(), E, C, priority)
    for name, o, w in zip(("buf", "slot_pos", "demand", "kept"), out, want):
        assert_exact(o.cpu(), w, name)
    buf_out = make_x(E * C, H, seed=seed + 2, device=device).reshape(E, C, H)
    kept_rows = torch.zeros(E * C, dtype=torch.bool)
    sp = out[1].cpu()
    ids_c = ids.cpu().long()
    kept_rows[(ids_c * C + sp)[sp >= 0]] = True
    buf_out.view(E * C, H)[~kept_rows.to(device)] = float("nan")  # unused capacity is never read
    weights = make_logits(T, k, seed=seed + 3, device=device)
    rows = [[int(ids_c[t, j]) * C + int(sp[t, j]) if sp[t, j] >= 0 else None for j in range(k)] for t in range(T)]
    for wts in (weights, None):
        got = R.capacity_combine(buf_out, ids, out[1], wts)
        assert got.shape == (T, H) and got.dtype == buf_out.dtype
        torch.testing.assert_close(got.cpu().double(),
                                   loop_combine(buf_out.cpu().reshape(E * C, H), rows, None if wts is None else wts.cpu()),
                                   rtol=1e-5, atol=1e-5)


def test_capacity_priorities_differ():
    # token 0 picks (0, 1); token 1 picks (1, 0); C = 1.
    ids = torch.tensor([[0, 1], [1, 0]], dtype=torch.int32)
    x = torch.tensor([[1.0], [2.0]])
    _, sp_k, demand, kept = R.capacity_dispatch(x, ids, 2, 1, "kmajor")
    _, sp_t, _, _ = R.capacity_dispatch(x, ids, 2, 1, "token_major")
    assert sp_k.tolist() == [[0, -1], [0, -1]]     # both first choices win
    assert sp_t.tolist() == [[0, 0], [-1, -1]]     # token 0 takes both
    assert demand.tolist() == [2, 2] and kept.tolist() == [1, 1]


# ------------------------------------------------------------------------------- experts

GEMM_CASES = [
    # (M, K, N, E, head, tail, empty experts)
    (37, 8, 5, 4, 0, 0, 1),
    (50, 16, 12, 7, 3, 6, 2),
    (9, 4, 3, 1, 0, 0, 0),
    (20, 5, 6, 64, 0, 4, 40),
    (12, 3, 4, 257, 2, 2, 250),
    (0, 4, 3, 3, 0, 0, 0),
    (10, 4, 3, 4, 0, 10, 0),   # every row past offs[E]
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: "-".join(map(str, c)))
def test_grouped_gemm_vs_loop(case, trans_b, dtype, device):
    M, K, N, E, head, tail, empty = case
    seed = seed_for("gemm", case, trans_b, str(dtype))
    a = make_x(M, K, seed=seed, dtype=dtype, device=device)
    b = make_x(E * K, N, seed=seed + 1, dtype=dtype, device=device).reshape(E, K, N)
    if trans_b:
        b = b.transpose(1, 2).contiguous()
    offs = make_offsets(M, E, seed=seed + 2, head=head, tail=tail, empty=min(empty, E - 1), device=device)
    a[: head] = float("nan")
    if tail:
        a[M - tail:] = float("nan")
    c = R.grouped_gemm(a, b, offs, trans_b)
    assert c.dtype == dtype and c.shape == (M, N)
    want = loop_grouped_gemm(a.cpu(), b.cpu(), offs.cpu(), trans_b)
    hi = reference_hi("grouped_gemm", a, b, offs, trans_b)
    torch.testing.assert_close(hi.cpu(), want, rtol=1e-12, atol=1e-12)
    assert_close_to_reference(c, c, want)  # the oracle is within its own rounding...
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(c.cpu().double(), want, rtol=tol, atol=tol * 4)  # ...and close
    dc = make_x(M, N, seed=seed + 3, dtype=dtype, device=device)
    a_clean = torch.nan_to_num(a.cpu().double(), nan=0.0)
    db = R.grouped_gemm_wgrad(a, dc, offs, E)
    assert db.dtype == dtype and db.shape == (E, K, N)
    torch.testing.assert_close(db.cpu().double(), loop_wgrad(a_clean, dc.cpu(), offs.cpu(), E),
                               rtol=tol, atol=tol * 4)


# --------------------------------------------------------------------------- properties

def test_gradcheck_float64():
    torch.manual_seed(0)
    T, E, k, H = 5, 6, 2, 3
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda l: R.topk_gating(l, k, "softmax", True, 0, 0, None, 1.5)[0], (logits,))
    torch.autograd.gradcheck(lambda l: R.topk_gating(l, k, "sigmoid", True, 2, 1, torch.zeros(E, dtype=torch.float64), 1.0)[0], (logits,))
    ids = make_ids(T, k, E, seed=1)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: R.permute(x, ids, E, 2)[0], (x,))
    torch.autograd.gradcheck(lambda x: R.capacity_dispatch(x, ids, E, 1, "kmajor")[0], (x,))
    _, _, offs, rows = R.permute(x.detach(), ids, E, 2)
    y = torch.randn(T * k + E, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda y, w: R.unpermute(y, rows, w, k), (y, w))
    sp = R.capacity_dispatch(x.detach(), ids, E, 1, "kmajor")[1]
    buf = torch.randn(E, 1, H, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda b, w: R.capacity_combine(b, ids, sp, w), (buf, w))
    a = torch.randn(T * k + E, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(E, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b: R.grouped_gemm(a, b, offs, True), (a, b))
    dc = torch.randn(T * k + E, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, dc: R.grouped_gemm_wgrad(a, dc, offs, E), (a, dc))


def test_grouped_gemm_wgrad_is_the_gradient():
    a = make_x(30, 4, seed=1, dtype=torch.float64).requires_grad_()
    b = make_x(3 * 4, 5, seed=2, dtype=torch.float64).reshape(3, 4, 5).requires_grad_()
    offs = make_offsets(30, 3, seed=3, head=2, tail=3)
    dc = make_x(30, 5, seed=4, dtype=torch.float64)
    R.grouped_gemm(a, b, offs, False).backward(dc)
    torch.testing.assert_close(R.grouped_gemm_wgrad(a.detach(), dc, offs, 3), b.grad)


def test_no_host_sync_and_compiles_fullgraph():
    """One fullgraph compile of the dropless pipeline (graph breaks / syncs would raise)."""
    T, E, k, H = 6, 4, 2, 5
    logits, x = make_logits(T, E, seed=1), make_x(T, H, seed=2)
    w1, w2 = make_x(E * H, 6, seed=3).reshape(E, H, 6), make_x(E * 6, H, seed=4).reshape(E, 6, H)

    def layer(logits, x, w1, w2):
        w, ids = R.topk_gating(logits, k, "sigmoid", True, 2, 1, None, 1.0)
        xs, _, offs, rows = R.permute(x, ids, E, 2)
        h = R.grouped_gemm(R.grouped_gemm(xs, w1, offs, False), w2, offs, False)
        buf, sp, _, _ = R.capacity_dispatch(x, ids, E, 2, "kmajor")
        return R.unpermute(h, rows, w, k) + R.capacity_combine(buf, ids, sp, w)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, x, w1, w2), layer(logits, x, w1, w2))


def test_poison_helper():
    t = poison(torch.zeros(3))
    assert torch.isnan(t).all()
    assert (poison(torch.zeros(2, dtype=torch.int32)) == -7).all()


def test_public_api_defaults_to_reference_here():
    if moe_ops.available_backends() != ["reference"]:
        pytest.skip("other backends present")
    x = make_x(4, 3, seed=0)
    ids = make_ids(4, 2, 5, seed=1)
    assert_exact(moe_ops.permute(x, ids, 5).x_sorted, R.permute(x, ids, 5, 1)[0])


def test_expert_range_is_local_ids_then_drop():
    """Expert parallelism: a rank holding experts [start, start+count) sees global ids made
    local (id - start, others -1 and dropped)."""
    T, k, E, H = 17, 3, 12, 4
    x, ids = make_x(T, H, seed=1), make_ids(T, k, E, seed=2)
    start, count = 4, 5
    local = moe_ops.to_local_ids(ids, (start, count))
    want = torch.where((ids >= start) & (ids < start + count), ids - start, torch.full_like(ids, -1))
    assert_exact(local, want)
    got = moe_ops.permute(x, ids, E, block_m=2, expert_range=(start, count), backend="reference")
    ref = loop_permute(x, want, count, 2)
    for name, o, w in zip(("x_sorted", "sorted_slots", "expert_offsets", "slot_rows"), got, ref):
        assert_exact(o, w, name)
    logits = make_logits(T, E, seed=3)
    w, lids = moe_ops.topk_gating(logits, k, expert_range=(start, count), backend="reference")
    w0, gids = moe_ops.topk_gating(logits, k, backend="reference")
    assert_exact(w, w0)
    assert_exact(lids, moe_ops.to_local_ids(gids, (start, count)))


# ----------------------------------------------------------------- the helpers themselves

def test_assert_close_to_reference_judges_against_reference_error():
    from tests.compare import assert_close_to_reference as close
    hi = torch.linspace(-3, 3, 101, dtype=torch.float64)
    lo = hi.to(torch.bfloat16)
    close(lo.clone(), lo, hi)                                    # the oracle passes itself
    close((hi + 1e-3).to(torch.bfloat16), lo, hi)                # within bf16 rounding
    with pytest.raises(AssertionError, match="exceeds"):
        close((hi + 0.05).to(torch.bfloat16), lo, hi)            # a real error
    with pytest.raises(AssertionError, match="non-finite"):
        bad = lo.clone()
        bad[3] = float("nan")
        close(bad, lo, hi)                                       # NaN where the reference has none
    with pytest.raises(AssertionError, match="dtype"):
        close(lo.float(), lo, hi)


def test_assert_gating_equal_near_ties_only():
    from tests.compare import assert_gating_equal
    logits = torch.tensor([[0.0, 1.0, 1.0 + 1e-6, -1.0], [2.0, 2.0, 0.0, 1.0]])
    w, ids = R.topk_gating(logits, 2, "softmax", False, 0, 0, None, 1.0)
    assert_gating_equal(w, ids, logits, 2)
    # row 0: 1.0 vs 1.0+1e-6 is a near-tie, a kernel may order them either way
    swapped = ids.clone()
    swapped[0] = swapped[0].flip(0)
    w_sw = R.gating_weights(R.gating_scores(logits, "softmax"), swapped, False, 1.0)
    assert_gating_equal(w_sw, swapped, logits, 2)
    # row 1: an exact tie must go to the lower index
    swapped = ids.clone()
    swapped[1] = swapped[1].flip(0)
    w_sw = R.gating_weights(R.gating_scores(logits, "softmax"), swapped, False, 1.0)
    with pytest.raises(AssertionError, match="ids differ"):
        assert_gating_equal(w_sw, swapped, logits, 2)
    # wrong weights fail even when ids are right
    with pytest.raises(AssertionError):
        assert_gating_equal(w * 1.001, ids, logits, 2)
