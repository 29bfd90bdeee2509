"""Every op on every available backend against the reference.

For each op and each backend in ``moe_ops.available_backends(op, device)`` except
``"reference"`` (devices: cpu, and cuda when present), the public function is called with
``backend=<name>`` on fresh random inputs and compared with ``moe_ops.reference``:

* integer outputs and pure data movement (``permute``, ``capacity_dispatch``) exactly, every
  element including padding (``sorted_slots == -1``, zero rows) -- the ops allocate their outputs,
  so this is what catches unwritten memory;
* float results with ``assert_close_to_reference`` (error vs the float64 reference at most twice
  the reference's own error in that dtype), NaN exactly where the reference has NaN;
* ``topk_gating`` with ``assert_gating_equal`` (exact ids except genuine near-ties);
* input regions the op must not read are NaN-poisoned (``a`` rows outside the offsets,
  ``y_sorted`` padding rows, unused capacity rows, weights of dropped slots);
* determinism: a second call gives bitwise equal outputs; inputs are not modified.

Shapes: E in {1, 2, 7, 8, 64, 257, 1024, 4096}, k up to 32, T in {0, 1, ~13, ~100}, H in
{8, 64, 200}, dtypes float32/float16/bfloat16. Backends that run emulated here (Triton
interpreter, SIMT emulator: see ``EMULATED``) get the smaller ``EMU_CASES`` matrix unless
``MOE_OPS_TEST_FULL=1``.

A backend that cannot run a dtype for an op declares it in the module that registers it:
``UNSUPPORTED_DTYPES = {(op, dtype): "reason"}`` or ``supported(op, dtype, device_type)``
(e.g. Triton's interpreter and bf16 ``tl.dot``); those combinations are skipped with the reason. ``tests.utils.UNSUPPORTED`` is the
test-side equivalent keyed ``(backend, op, dtype)``.

Probes beyond the random matrix: ``topk_gating`` on +-inf / NaN logits in every routing mode
(softmax/sigmoid x bias x groups x renormalize), with exact cases where only the magnitude
separates two keys (0 against a denormal); every CPU backend in a child forked after it ran.

``test_machinery_catches_broken_backend`` registers deliberately broken backends under a
test-only name and asserts this very comparison fails on each, so the suite provably can fail.
"""
from __future__ import annotations

import os

import pytest
import torch

import moe_ops
from moe_ops import backend as _backend
from moe_ops import reference as R
from tests.utils import (DEVICES, LOWP_DTYPES, assert_bitwise_equal, assert_close_to_reference,
                         assert_exact, assert_gating_equal, backends_for, make_ids, make_logits,
                         make_offsets, make_x, reference_hi, seed_for, unsupported_reason)

OPS = _backend.OP_NAMES

# (E, k, T, H): every E of the brief, k up to 32, T in {0, 1, ~13, ~100}, H in {8, 64, 200}.
CASES = [
    (1, 1, 0, 8), (1, 1, 13, 64),
    (2, 2, 1, 8), (2, 1, 100, 8),
    (7, 3, 13, 200), (7, 7, 5, 8),
    (8, 2, 100, 64), (8, 8, 1, 8),
    (64, 8, 100, 8), (64, 32, 13, 8),
    (257, 32, 13, 8), (257, 4, 100, 8),
    (1024, 16, 13, 8), (1024, 2, 100, 8),
    (4096, 32, 5, 8), (4096, 8, 0, 8),
]

# Backends that run on an emulator on this machine (the Triton interpreter, the SIMT emulator)
# are ~100-1000x slower per launch; they get this smaller matrix unless MOE_OPS_TEST_FULL=1.
# It keeps every E class, T in {0, 1, ~13, 100} and every dtype, with smaller sizes.
EMULATED = {("triton", "cpu"), ("cuda_sim", "cpu")}
EMU_CASES = [
    (1, 1, 0, 8), (2, 2, 1, 8), (7, 3, 13, 64), (8, 2, 100, 8), (64, 8, 5, 8), (257, 4, 3, 8),
    (4096, 4, 1, 8),
]
EMU_SKIP = {("grouped_gemm_wgrad", (4096, 4, 1, 8))}   # db alone is E*K*N; covered at full size
EMU_FP32_ONLY = {(8, 2, 100, 8)}


def _cases_for(op, name, device, dtype):
    if os.environ.get("MOE_OPS_TEST_FULL") == "1" or (name, device) not in EMULATED:
        return list(enumerate(CASES))
    return [(i, c) for i, c in enumerate(EMU_CASES) if (op, c) not in EMU_SKIP
            and (dtype == torch.float32 or c not in EMU_FP32_ONLY)]


GATING_VARIANTS = ["softmax", "softmax_renorm_scaled", "sigmoid_bias", "grouped", "nan", "ties", "grouped_fill"]
IDS_MODES = [("uniform", 0.0), ("skew", 0.0), ("one", 0.0), ("dup", 0.0), ("uniform", 0.2)]


def _case_id(c):
    return "E{}-k{}-T{}-H{}".format(*c)


def _variant(i, options):
    return options[i % len(options)]


# -------------------------------------------------------------------- one op, one backend

def _group_args(E, k):
    """A valid (n_group, topk_group) for E and k: the smallest group count > 1 dividing E, or 1."""
    ng = next((g for g in (8, 4, 2) if E % g == 0 and E // g >= 1), 1)
    G = E // ng
    tg = min(ng, max(1, -(-k // G)) + (1 if ng > 2 else 0))
    return ng, tg


def _inputs(op, case, idx, dtype, device):
    """(public kwargs-call, reference positional args, output kinds) for op on this case."""
    E, k, T, H = case
    s = seed_for(op, case, str(dtype), device)
    mode, invalid = _variant(idx, IDS_MODES)
    if op == "topk_gating":
        v = _variant(idx, GATING_VARIANTS)
        logits = make_logits(T, E, seed=s, dtype=dtype, device=device, ties=v == "ties",
                             nan_rows=2 if v == "nan" else 0)
        kw = dict(scoring="softmax", renormalize=False, n_group=None, topk_group=None,
                  correction_bias=None, scaling_factor=1.0)
        if v == "softmax_renorm_scaled":
            kw.update(renormalize=True, scaling_factor=2.5)
        elif v in ("sigmoid_bias", "nan", "grouped"):
            kw.update(scoring="sigmoid", renormalize=True,
                      correction_bias=make_logits(1, E, seed=s + 1, device=device, scale=0.2)[0])
        if v == "grouped":
            ng, tg = _group_args(E, k)
            kw.update(n_group=ng, topk_group=tg, scaling_factor=2.5)
        elif v == "grouped_fill":  # k beyond the kept groups' experts: masked (-inf) ones fill in
            G = k - 1 if k > 1 and E % (k - 1) == 0 else 1
            kw.update(scoring="sigmoid", renormalize=True, n_group=E // G, topk_group=1,
                      correction_bias=make_logits(1, E, seed=s + 1, device=device, scale=0.2)[0])
        return dict(logits=logits, k=k, kw=kw)
    ids = make_ids(T, k, E, seed=s + 2, mode=mode, invalid=invalid, device=device)
    x = make_x(T, H, seed=s + 3, dtype=dtype, device=device)
    if op == "permute":
        return dict(args=(x, ids, E), kw=dict(block_m=_variant(idx, [1, 4, 16, 3]), allow_invalid_ids=True),
                    ref=(x, ids, E, _variant(idx, [1, 4, 16, 3])))
    if op == "unpermute":
        bm = _variant(idx, [1, 4, 16])
        _, sorted_slots, _, slot_rows = R.permute(x, ids, E, bm)
        y = make_x(sorted_slots.shape[0], H, seed=s + 4, dtype=dtype, device=device)
        y[sorted_slots < 0] = float("nan")                        # padding rows: never read
        w = make_logits(T, k, seed=s + 5, device=device).abs()
        w[slot_rows.reshape(T, k) < 0] = float("nan")              # dropped slots: never read
        w = None if idx % 4 == 3 else w
        return dict(args=(y, slot_rows, w), kw=dict(k=k), ref=(y, slot_rows, w, k))
    if op == "capacity_dispatch":
        C = _variant(idx, [moe_ops.expert_capacity(T, k, E, 1.0), 0, 1, moe_ops.expert_capacity(T, k, E, 2.0, min_capacity=4)])
        prio = _variant(idx, ["kmajor", "token_major", "token_major", "kmajor", "token_major"])
        return dict(args=(x, ids, E, C), kw=dict(priority=prio, allow_invalid_ids=True), ref=(x, ids, E, C, prio))
    if op == "capacity_combine":
        C = _variant(idx, [moe_ops.expert_capacity(T, k, E, 1.25), 1, 3])
        prio = _variant(idx, ["kmajor", "token_major"])
        _, slot_pos, _, _ = R.capacity_dispatch(x, ids, E, C, prio)
        buf = make_x(E * C, H, seed=s + 4, dtype=dtype, device=device)
        used = torch.zeros(E * C + 1, dtype=torch.bool, device=device)
        used[torch.where(slot_pos >= 0, ids.long() * C + slot_pos.long(), E * C).reshape(-1)] = True
        buf[~used[: E * C]] = float("nan")                          # unused capacity: never read
        buf = buf.reshape(E, C, H)
        w = make_logits(T, k, seed=s + 5, device=device)
        w[slot_pos < 0] = float("nan")
        w = None if idx % 4 == 3 else w
        return dict(args=(buf, ids, slot_pos, w), kw={}, ref=(buf, ids, slot_pos, w))
    # grouped GEMMs: M rows like a permuted batch, unused head/tail rows poisoned.
    M = T * k + (idx % 3) * 3
    head, tail = (idx % 2) * min(2, M), ((idx // 2) % 2) * min(3, M)
    head, tail = (head, tail) if head + tail <= M else (0, 0)
    offs = make_offsets(M, E, seed=s + 6, head=head, tail=tail, empty=min(E - 1, E // 3), device=device)
    K, N = H, _variant(idx, [8, 24, 64 if H <= 64 else 8])
    a = make_x(M, K, seed=s + 7, dtype=dtype, device=device)
    outside = torch.ones(M, dtype=torch.bool, device=device)
    outside[head: M - tail] = False
    a[outside] = float("nan")
    if op == "grouped_gemm":
        trans_b = bool(idx % 2)
        b = make_x(E * K, N, seed=s + 8, dtype=dtype, device=device, scale=0.5).reshape(E, K, N)
        if trans_b:
            b = b.transpose(1, 2).contiguous()
        return dict(args=(a, b, offs), kw=dict(trans_b=trans_b), ref=(a, b, offs, trans_b))
    dc = make_x(M, N, seed=s + 8, dtype=dtype, device=device)
    dc[outside] = float("nan")
    return dict(args=(a, dc, offs, E), kw={}, ref=(a, dc, offs, E))


def _snapshot(values):
    return [v.clone() if isinstance(v, torch.Tensor) else v for v in values]


def check_op(op, name, device, dtype, case, idx):
    """Run ``op`` on backend ``name`` and compare with the reference; AssertionError on mismatch."""
    inp = _inputs(op, case, idx, dtype, device)
    fn = getattr(moe_ops, op)
    if op == "topk_gating":
        call = lambda: fn(inp["logits"], inp["k"], backend=name, **inp["kw"])  # noqa: E731
        tensors = [inp["logits"], inp["kw"]["correction_bias"]]
    else:
        call = lambda: fn(*inp["args"], backend=name, **inp["kw"])  # noqa: E731
        tensors = list(inp["args"])
    before = _snapshot(tensors)
    out1 = call()
    out2 = call()
    outs1 = tuple(out1) if isinstance(out1, tuple) else (out1,)
    outs2 = tuple(out2) if isinstance(out2, tuple) else (out2,)
    for o in outs1:
        assert o.device.type == device, f"{op}[{name}]: output on {o.device}, input on {device}"
    for i, (a, b) in enumerate(zip(outs1, outs2)):
        assert_bitwise_equal(a, b, f"{op}[{name}] output {i} (determinism)")
    for i, (t, t0) in enumerate(zip(tensors, before)):
        if isinstance(t, torch.Tensor):
            assert_exact(t, t0, f"{op}[{name}] input {i} was modified")

    if op == "topk_gating":
        kw = inp["kw"]
        assert_gating_equal(outs1[0], outs1[1], inp["logits"], inp["k"], kw["scoring"], kw["renormalize"],
                            kw["n_group"] or 0, kw["topk_group"] or 0, kw["correction_bias"],
                            kw["scaling_factor"])
        return
    ref = getattr(R, op)(*inp["ref"])
    refs = tuple(ref) if isinstance(ref, tuple) else (ref,)
    assert len(outs1) == len(refs), f"{op}[{name}]: {len(outs1)} outputs, reference has {len(refs)}"
    if op in ("permute", "capacity_dispatch"):
        for i, (o, r) in enumerate(zip(outs1, refs)):
            assert_exact(o, r, f"{op}[{name}] output {i}")
        return
    hi = reference_hi(op, *inp["ref"])
    assert_close_to_reference(outs1[0], refs[0], hi, name=f"{op}[{name}]")


# ------------------------------------------------------------------------------- the tests

# MOE_OPS_TEST_SELF=1 runs the whole matrix with the reference registered as an extra backend
# ("reference_copy"): a check of the machinery itself (every case, dtype and tolerance path).
SELF = "reference_copy"
if os.environ.get("MOE_OPS_TEST_SELF") == "1" and SELF not in _backend._LOADERS:
    _backend._LOADERS[SELF] = None
    _backend._LOADED.add(SELF)
    _backend.register(SELF, DEVICES, {op: getattr(R, op) for op in OPS})


def _params():
    out = []
    for op in OPS:
        for device in DEVICES:
            names = backends_for(op, device)
            if not names:  # one visible skip per (op, device) instead of hundreds
                out.append(pytest.param(op, device, None, None, None, 0, id=f"{op}-{device}-none",
                                        marks=pytest.mark.skip(reason=f"no backend other than the "
                                                               f"reference implements {op} on {device}")))
            for name in names:
                for dtype in LOWP_DTYPES:
                    for idx, case in _cases_for(op, name, device, dtype):
                        out.append(pytest.param(op, device, name, dtype, case, idx,
                                                id=f"{op}-{device}-{name}-{str(dtype)[6:]}-{_case_id(case)}"))
    return out


PARAMS = _params()


@pytest.mark.parametrize("op,device,name,dtype,case,idx", PARAMS)
def test_op_matches_reference(op, device, name, dtype, case, idx):
    reason = unsupported_reason(name, op, dtype, device)
    if reason:
        pytest.skip(f"{name} does not support {op} in {dtype}: {reason}")
    # salt the case index with the dtype so each dtype sees a different variant of the case
    check_op(op, name, device, dtype, case, idx + LOWP_DTYPES.index(dtype))


# ------------------------------------------------------------- the suite provably can fail

FAKE = "broken_test_backend"


def _broken_ops(kind):
    def permute_garbage_padding(x, ids, E, bm):
        xs, ss, offs, rows = R.permute(x, ids, E, bm)
        return torch.where((ss < 0).unsqueeze(1), torch.full_like(xs, 1e-3), xs), ss, offs, rows

    def permute_unstable(x, ids, E, bm):
        xs, ss, offs, rows = R.permute(x, ids.flip(1), E, bm)  # wrong slot order within an expert
        return xs, ss, offs, rows

    def gating_ties_high(logits, k, scoring, renorm, ng, tg, bias, scale):  # mirror image: ties go high
        w, ids = R.topk_gating(logits.flip(1), k, scoring, renorm, ng, tg,
                               None if bias is None else bias.flip(0), scale)
        return w, (logits.shape[1] - 1 - ids).to(torch.int32)

    def gemm_lowp(a, b, offs, trans_b):  # accumulates in the input dtype
        out = R.grouped_gemm(a.to(torch.bfloat16), b.to(torch.bfloat16), offs, trans_b)
        return out.to(a.dtype)

    def gemm_nondeterministic(a, b, offs, trans_b):
        c = R.grouped_gemm(a, b, offs, trans_b)
        if c.numel():
            i = int(torch.randint(0, c.numel(), (1,)))
            c.view(-1)[i] = torch.nextafter(c.view(-1)[i], torch.tensor(float("inf"), dtype=c.dtype))
        return c

    def unpermute_reads_padding(y, rows, w, k):
        return R.unpermute(y, torch.where(rows < 0, torch.zeros_like(rows), rows), w, k)

    def combine_renormalizes(buf, ids, pos, w):
        if w is not None:
            w = torch.where(pos >= 0, w, torch.zeros_like(w))
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return R.capacity_combine(buf, ids, pos, w)

    def dispatch_token_major_always(x, ids, E, C, prio):
        return R.capacity_dispatch(x, ids, E, C, "token_major" if prio == "kmajor" else "kmajor")

    def gemm_split_k(a, b, offs, trans_b):  # legitimately different rounding: two K halves
        h = a.shape[1] // 2
        bb = b.transpose(1, 2) if trans_b else b
        lo = R.grouped_gemm(a[:, :h].float(), bb[:, :h].float(), offs, False)
        hi = R.grouped_gemm(a[:, h:].float(), bb[:, h:].float(), offs, False)
        return (lo + hi).to(a.dtype)

    def gating_own_sigmoid(logits, k, scoring, renorm, ng, tg, bias, scale):
        # a kernel-like router: sigmoid as 1/(1+exp(-x)) (other rounding), sum of weights in
        # reverse order -- legitimately different in the last bits
        if scoring != "sigmoid" or ng:
            return R.topk_gating(logits, k, scoring, renorm, ng, tg, bias, scale)
        x = logits.float()
        keys = 1.0 / (1.0 + torch.exp(-x)) + (0.0 if bias is None else bias.float())
        ids = R.rank_order(keys)[:, :k]
        w = (1.0 / (1.0 + torch.exp(-x))).gather(1, ids)
        if renorm:
            w = w / (w.flip(1).cumsum(1)[:, -1:] + 1e-20)
        return w * scale, ids.to(torch.int32)

    table = {
        "correct": ("permute", R.permute, (64, 8, 100, 8), 1),
        "correct_gating_other_rounding": ("topk_gating", gating_own_sigmoid, (257, 32, 13, 8), 2),
        "correct_gemm_split_k": ("grouped_gemm", gemm_split_k, (7, 3, 13, 200), 0),
        "permute_garbage_padding": ("permute", permute_garbage_padding, (8, 2, 100, 64), 1),
        "permute_unstable": ("permute", permute_unstable, (8, 2, 100, 64), 0),
        "gating_ties_to_higher_index": ("topk_gating", gating_ties_high, (64, 8, 100, 8), 5),
        "gemm_bf16_accumulation": ("grouped_gemm", gemm_lowp, (8, 2, 100, 64), 0),
        "gemm_nondeterministic": ("grouped_gemm", gemm_nondeterministic, (8, 2, 100, 64), 0),
        "unpermute_reads_padding": ("unpermute", unpermute_reads_padding, (7, 3, 13, 200), 4),
        "combine_renormalizes": ("capacity_combine", combine_renormalizes, (8, 2, 100, 64), 0),
        "dispatch_wrong_priority": ("capacity_dispatch", dispatch_token_major_always, (8, 2, 100, 64), 0),
    }
    return table[kind]


@pytest.fixture
def fake_backend(monkeypatch):
    """Registers ``FAKE`` for cpu; removed again after the test."""
    monkeypatch.setitem(_backend._LOADERS, FAKE, None)
    monkeypatch.setattr(_backend, "_LOADED", set(_backend._LOADED) | {FAKE})

    def install(op, fn):
        _backend.register(FAKE, ("cpu",), {op: fn})

    yield install
    _backend._BACKENDS.pop(FAKE, None)


@pytest.mark.parametrize("kind", ["correct", "correct_gemm_split_k", "correct_gating_other_rounding", "permute_garbage_padding", "permute_unstable",
                                  "gating_ties_to_higher_index", "gemm_bf16_accumulation",
                                  "gemm_nondeterministic", "unpermute_reads_padding",
                                  "combine_renormalizes", "dispatch_wrong_priority"])
def test_machinery_catches_broken_backend(fake_backend, kind):
    op, fn, case, idx = _broken_ops(kind)
    fake_backend(op, fn)
    assert FAKE in moe_ops.available_backends(op, "cpu")
    if kind.startswith("correct"):  # controls: the machinery passes correct implementations
        for dtype in LOWP_DTYPES:
            for i in range(idx, idx + 4):
                check_op(op, FAKE, "cpu", dtype, case, i)
        return
    with pytest.raises(AssertionError):
        check_op(op, FAKE, "cpu", torch.float32, case, idx)


def test_fake_backend_is_gone():
    assert FAKE not in moe_ops.available_backends()
    assert FAKE not in _backend._LOADERS


# ---------------------------------------- router probes: +-inf / NaN logits in every routing mode

# scoring x correction bias x group-limited x renormalize: every routing mode topk_gating has.
ROUTING_MODES = [(sc, bias, grouped, renorm) for sc in ("softmax", "sigmoid") for bias in (False, True)
                 for grouped in (False, True) for renorm in (False, True)]
PROBE_E, PROBE_K, PROBE_GROUPS, PROBE_TOPK_GROUP = 16, 4, 4, 2


def _mode_id(mode):
    sc, bias, grouped, renorm = mode
    return sc + ("-bias" if bias else "") + ("-grouped" if grouped else "") + ("-renorm" if renorm else "")


def _special_logits(seed, dtype):
    """Rows a router meets when a model masks experts or its logits overflow: whole rows of
    -inf / +inf / NaN, +-inf among finite logits, a whole group at -inf (and so a group score of
    -inf), +inf next to -inf inside one group (a NaN group score when the key is the logit),
    -inf next to logits whose sigmoid is a denormal or underflows to 0, and random rows with
    +-inf/NaN sprinkled in."""
    E, G = PROBE_E, PROBE_E // PROBE_GROUPS
    inf, nan = float("inf"), float("nan")
    g = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(E, generator=g, dtype=torch.float64) * 2  # noqa: E731
    rows = [torch.full((E,), -inf), torch.full((E,), inf), torch.full((E,), nan)]
    for specials in ([inf], [inf, inf], [-inf], [nan], [inf, -inf, nan]):
        r = rnd()
        r[torch.randperm(E, generator=g)[: len(specials)]] = torch.tensor(specials, dtype=torch.float64)
        rows.append(r)
    r = rnd(); r[: E // 2] = -inf; rows.append(r)            # the first groups entirely masked
    r = rnd(); r[2 * G: 3 * G] = -inf; rows.append(r)       # one group at -inf
    r = rnd(); r[0], r[1] = inf, -inf; r[2:G] = -inf; rows.append(r)  # group 0's top-2 are +inf, -inf
    under = torch.tensor([-inf, -1000.0, -88.6, -100.0, -88.5, -90.0, -87.5, -inf])
    rows.append(torch.cat([under, under.flip(0)]).double())   # sigmoid: 0 vs denormals vs 0
    for _ in range(8):
        r = rnd()
        u = torch.rand(E, generator=g)
        r[u < 0.35] = -inf
        r[(u >= 0.35) & (u < 0.42)] = inf
        r[(u >= 0.42) & (u < 0.47)] = nan
        rows.append(r)
    return torch.stack(rows).to(dtype)


def _probe_params():
    out = []
    for device in DEVICES:
        for name in backends_for("topk_gating", device):
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                for mode in ROUTING_MODES:
                    out.append(pytest.param(device, name, dtype, mode,
                                            id=f"{device}-{name}-{str(dtype)[6:]}-{_mode_id(mode)}"))
    return out


def _probe_kwargs(mode, device, seed):
    scoring, bias, grouped, renorm = mode
    return dict(scoring=scoring, renormalize=renorm, scaling_factor=2.5 if renorm else 1.0,
                n_group=PROBE_GROUPS if grouped else None, topk_group=PROBE_TOPK_GROUP if grouped else None,
                correction_bias=make_logits(1, PROBE_E, seed=seed, scale=0.2, device=device)[0] if bias else None)


def _gate_or_skip(name, logits, k, **kw):
    """topk_gating on backend ``name``; a float64 call the backend refuses by name is a skip
    (cuda_sim's kernel computes in float32 and says so)."""
    try:
        return moe_ops.topk_gating(logits, k, backend=name, **kw)
    except RuntimeError as e:
        if logits.dtype == torch.float64 and "float64 logits are not supported" in str(e):
            pytest.skip(str(e))
        raise


@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")  # inf - inf on purpose
@pytest.mark.parametrize("device,name,dtype,mode", _probe_params())
def test_gating_special_logits(device, name, dtype, mode):
    """+-inf / NaN logits in every routing mode: the ranking rule (NaN below -inf, masked groups
    -inf, ties to the lower index) and the scores of torch.softmax / torch.sigmoid on every
    backend, compared as every gating test is (ids exact but for genuine near-ties)."""
    reason = unsupported_reason(name, "topk_gating", dtype, device)
    if reason:
        pytest.skip(f"{name} does not support topk_gating in {dtype}: {reason}")
    seed = seed_for("special_logits", str(dtype), mode)
    logits = _special_logits(seed, dtype).to(device)
    kw = _probe_kwargs(mode, device, seed + 1)
    w, ids = _gate_or_skip(name, logits, PROBE_K, **kw)
    assert_gating_equal(w, ids, logits, PROBE_K, kw["scoring"], kw["renormalize"], kw["n_group"] or 0,
                        kw["topk_group"] or 0, kw["correction_bias"], kw["scaling_factor"])


_inf, _nan = float("inf"), float("nan")
# (logits, k, scoring, n_group, topk_group, correction_bias, expected ids): decisions that are
# not near-ties by the rule, only by magnitude (0 against a denormal), so assert_gating_equal's
# tolerance would let them pass; each must come out exactly.
GATING_EXACT_CASES = {
    # issue 13.6: a masked expert (sigmoid(-inf) = 0) must lose to sigmoid(-88.5) = 3.7e-39
    "sigmoid_masked_vs_denormal": ([[-_inf, -88.5]], 1, "sigmoid", 0, 0, None, [[1]]),
    # torch.sigmoid is 1 / (1 + exp(-x)): in float32 a denormal for x in about [-88.72, -87.34],
    # 0 below (exp(-x) overflows); in float64 0 only below about -709
    "sigmoid_denormal_order": ([[-_inf, -1000.0, -88.6, -100.0, -88.5, -90.0, -87.5]], 7, "sigmoid", 0, 0,
                               None, {"float32": [[6, 4, 2, 0, 1, 3, 5]], "float64": [[6, 4, 2, 5, 3, 0, 1]]}),
    # issue 13.7: all softmax scores NaN; the kept groups' NaN keys rank below the masked -inf ones
    "softmax_bias_groups_all_minus_inf": ([[-_inf] * 16], 4, "softmax", 4, 2, [0.0] * 16, [[8, 9, 10, 11]]),
    "softmax_bias_groups_plus_inf": ([[0.0, _inf] + [1.0] * 14], 4, "softmax", 4, 2, [0.0] * 16, [[8, 9, 10, 11]]),
    # a group whose top-2 keys are +inf and -inf scores NaN and loses to any real group
    "logit_keys_nan_group_score": ([[_inf, -_inf, -5.0, -6.0]], 2, "softmax", 2, 1, None, [[2, 3]]),
    "sigmoid_nan_logit_below_minus_inf": ([[_nan, -_inf, -88.5, _nan]], 4, "sigmoid", 0, 0, None, [[2, 1, 0, 3]]),
    "signed_zeros_tie": ([[-1.0, -0.0, 0.0, -0.0]], 3, "softmax", 0, 0, None, [[1, 2, 3]]),
}


def _exact_params():
    return [pytest.param(device, name, dtype, case, id=f"{device}-{name}-{str(dtype)[6:]}-{case}")
            for device in DEVICES for name in backends_for("topk_gating", device)
            for dtype in (torch.float32, torch.float64) for case in GATING_EXACT_CASES]


@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
@pytest.mark.parametrize("device,name,dtype,case", _exact_params())
def test_gating_special_logits_exact(device, name, dtype, case):
    reason = unsupported_reason(name, "topk_gating", dtype, device)
    if reason:
        pytest.skip(f"{name} does not support topk_gating in {dtype}: {reason}")
    rows, k, scoring, ng, tg, bias, want = GATING_EXACT_CASES[case]
    want = want[str(dtype)[6:]] if isinstance(want, dict) else want
    logits = torch.tensor(rows, dtype=dtype, device=device)
    bias = None if bias is None else torch.tensor(bias, device=device)
    _, ref_ids = R.topk_gating(logits, k, scoring, False, ng, tg, bias, 1.0)
    assert ref_ids.tolist() == want, f"reference: {ref_ids.tolist()}, want {want}"
    w, ids = _gate_or_skip(name, logits, k, scoring=scoring, n_group=ng or None, topk_group=tg or None,
                           correction_bias=bias)
    assert ids.tolist() == want, f"{name}: ids {ids.tolist()}, reference {want}"
    assert_gating_equal(w, ids, logits, k, scoring, False, ng, tg, bias, 1.0)


# ------------------------------------------------------------ fork: a child process gets the answer

FORK_TIMEOUT_S = 120


def _forked_child_check(conn, name):
    """In the forked child: gating and permute on ``name``, compared with the reference."""
    import faulthandler
    import sys

    try:
        # a hang shows where before the parent gives up (fd 2: pytest may have replaced sys.stderr)
        faulthandler.dump_traceback_later(FORK_TIMEOUT_S - 30, exit=True, file=sys.__stderr__)
        # GNU OpenMP's team does not survive a fork either, and that is torch's (a plain
        # torch.softmax hangs in the child once the parent ran a parallel region): one intra-op
        # thread, as DataLoader workers do. What is under test is the backends' own threads.
        torch.set_num_threads(1)
        logits = make_logits(13, 64, seed=7)
        w, ids = moe_ops.topk_gating(logits, 4, backend=name)
        assert_gating_equal(w, ids, logits, 4)
        x, ids2 = make_x(13, 8, seed=8), make_ids(13, 2, 8, seed=9)
        for o, r in zip(moe_ops.permute(x, ids2, 8, block_m=4, backend=name), R.permute(x, ids2, 8, 4)):
            assert_exact(o, r)
        conn.send("ok")
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which fails the test
        conn.send(f"{type(e).__name__}: {e}")


@pytest.mark.skipif("libtsan" in os.environ.get("LD_PRELOAD", ""),
                    reason="TSan does not support threads started after a multi-threaded fork")
@pytest.mark.parametrize("name", backends_for("topk_gating", "cpu"))
def test_backend_works_in_forked_child(name):
    """A process forked after the backend ran (multiprocessing's 'fork' start method, DataLoader
    workers) gets the reference's results, without hanging: thread pools do not survive a fork."""
    import multiprocessing

    logits = make_logits(13, 64, seed=7)
    moe_ops.topk_gating(logits, 4, backend=name)  # the parent has started the backend's threads
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_forked_child_check, args=(send, name))
    child.start()
    send.close()
    child.join(timeout=FORK_TIMEOUT_S)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"{name}: the forked child did not finish in {FORK_TIMEOUT_S} s (hung)")
    try:
        msg = recv.recv()
    except EOFError:  # the child died without a word
        msg = f"no report, exit code {child.exitcode}"
    assert msg == "ok", f"{name} in a forked child: {msg}"
