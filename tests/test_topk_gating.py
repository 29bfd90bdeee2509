"""``topk_gating`` (the router) on every backend against the reference.

Beyond the matrix: ``topk_gating`` on +-inf / NaN logits in every routing mode
(softmax/sigmoid x bias x groups x renormalize), with exact cases where only the magnitude
separates two keys (0 against a denormal).

``test_op_matches_reference``: every available backend but the reference, on fresh random inputs,
against ``moe_ops.reference`` (the shared per-op backend matrix of tests/op_matrix.py).
"""
from __future__ import annotations

import pytest
import torch

import moe_ops
from moe_ops import reference as R
from moe_ops.backend import unsupported_reason
from tests.backends import DEVICES, backends_for
from tests.compare import assert_gating_equal
from tests.inputs import make_logits, seed_for
from tests.op_matrix import matrix_test


test_op_matches_reference = matrix_test(("topk_gating",))


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
    r = rnd()
    r[: E // 2] = -inf  # the first groups entirely masked
    rows.append(r)
    r = rnd()
    r[2 * G: 3 * G] = -inf  # one group at -inf
    rows.append(r)
    r = rnd()
    r[0], r[1] = inf, -inf  # group 0's top-2 are +inf, -inf
    r[2:G] = -inf
    rows.append(r)
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
