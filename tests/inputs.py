"""Fresh, seeded test inputs, on any device; built on the CPU generator so every device sees the
same values for a seed:

    seed_for(*parts)                      stable 31-bit seed from a test's parameters
    make_logits(T, E, seed=, ...)         router logits, optional exact ties / NaN rows
    make_ids(T, k, E, seed=, ...)         expert ids (distinct per row like top-k, skewed, empty
                                          experts, all-to-one, invalid ids)
    make_x(T, H, seed=, ...)              activations
    make_offsets(M, E, seed=, ...)        monotone int32 expert_offsets with empty experts and
                                          unused head/tail rows
    make_layer(T, H, I, E, seed=, ...)    x, router logits, w_gate_up, w_down of an MoE layer
"""
from __future__ import annotations

import zlib

import torch


def seed_for(*parts) -> int:
    """A stable seed from a test's parameters (so each parametrization gets fresh values)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_x(T: int, H: int, *, seed: int, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """``x[T, H]`` ~ N(0, scale^2), rounded to ``dtype``."""
    return (torch.randn(T, H, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype).to(device)


def make_logits(T: int, E: int, *, seed: int, dtype=torch.float32, device="cpu", ties: bool = False,
                nan_rows: int = 0, scale: float = 2.0) -> torch.Tensor:
    """Router logits ``[T, E]``. ``ties``: values on a coarse grid so many exact ties occur.
    ``nan_rows``: that many rows get NaN in a few random columns (row 0 first)."""
    g = _gen(seed)
    if ties:
        lg = torch.randint(-3, 4, (T, E), generator=g).double() * 0.5
    else:
        lg = torch.randn(T, E, generator=g, dtype=torch.float64) * scale
    for t in range(min(nan_rows, T)):
        cols = torch.randperm(E, generator=g)[: max(1, E // 4)]
        lg[t, cols] = float("nan")
    return lg.to(dtype).to(device)


def make_ids(T: int, k: int, E: int, *, seed: int, device="cpu", mode: str = "uniform",
             empty: int = 0, invalid: float = 0.0) -> torch.Tensor:
    """Expert ids ``[T, k]`` int32.

    ``mode``: ``"uniform"`` / ``"skew"`` (Zipf-like load) -- ids distinct within a row, like
    top-k; ``"one"`` -- every row's first choice is expert 0; ``"dup"`` -- independent draws,
    repeats allowed within a row. ``empty``: that many experts (a random set) never chosen
    (needs ``k <= E - empty``). ``invalid``: fraction of slots replaced by out-of-range ids
    (-1, E, or large), which every op must drop.
    """
    g = _gen(seed)
    logp = torch.zeros(E, dtype=torch.float64)
    if mode == "skew":
        logp = -1.5 * torch.log(torch.arange(1, E + 1, dtype=torch.float64))[torch.randperm(E, generator=g)]
    if empty:
        assert k <= E - empty, "make_ids: not enough non-empty experts for k"
        logp[torch.randperm(E, generator=g)[:empty]] = float("-inf")
    if mode == "dup":
        probs = torch.softmax(logp, 0).expand(T, E) if T else torch.zeros(0, E, dtype=torch.float64)
        ids = torch.multinomial(probs, k, replacement=True, generator=g) if T else torch.zeros(0, k, dtype=torch.long)
    else:
        gumbel = -torch.log(-torch.log(torch.rand(T, E, generator=g, dtype=torch.float64).clamp_min(1e-300)))
        ids = torch.argsort(logp + gumbel, dim=1, descending=True)[:, :k]
        if mode == "one" and T:
            zero_at = (ids == 0)
            # put expert 0 first; keep the row distinct by moving the old first choice where 0 was
            first = ids[:, :1].clone()
            ids = torch.where(zero_at, first.expand_as(ids), ids)
            ids[:, 0] = 0
    if invalid > 0 and ids.numel():
        bad = torch.rand(ids.shape, generator=g) < invalid
        choices = torch.tensor([-1, E, E + 5, -(2**31), 2**31 - 1])
        repl = choices[torch.randint(0, len(choices), ids.shape, generator=g)]
        ids = torch.where(bad, repl, ids)
    return ids.to(torch.int32).to(device)


def make_offsets(M: int, E: int, *, seed: int, device="cpu", head: int = 0, tail: int = 0,
                 empty: int = 0) -> torch.Tensor:
    """Monotone ``expert_offsets[E+1]`` int32 starting at ``head`` and ending at ``M - tail``;
    ``empty`` experts (random) get no rows, the rest a random split of the used rows."""
    g = _gen(seed)
    used = M - head - tail
    assert used >= 0
    w = torch.rand(E, generator=g, dtype=torch.float64)
    if empty:
        w[torch.randperm(E, generator=g)[:empty]] = 0
    if used and float(w.sum()) == 0:
        w[0] = 1
    cuts = torch.sort(torch.rand(used, generator=g)).values  # a random composition of `used`
    bucket = torch.searchsorted(torch.cumsum(w, 0) / w.sum().clamp_min(1e-300), cuts.double(), right=True)
    counts = torch.zeros(E, dtype=torch.long).scatter_add(0, bucket.clamp(max=E - 1), torch.ones_like(bucket))
    offs = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)]) + head
    return offs.to(torch.int32).to(device)


def make_layer(T: int, H: int, I: int, E: int, *, seed: int, dtype=torch.float32, device="cpu"):
    """``(x[T, H], logits[T, E], w_gate_up[E, 2I, H], w_down[E, H, I])``, the weights scaled by
    fan-in so activations stay O(1)."""
    x = make_x(T, H, seed=seed, dtype=dtype, device=device)
    logits = make_logits(T, E, seed=seed + 1, device=device)
    w1 = make_x(E * 2 * I, H, seed=seed + 2, dtype=dtype, device=device, scale=H ** -0.5).reshape(E, 2 * I, H)
    w2 = make_x(E * H, I, seed=seed + 3, dtype=dtype, device=device, scale=I ** -0.5).reshape(E, H, I)
    return x, logits, w1, w2
