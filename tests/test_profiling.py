"""Profiler ranges (moe_ops/_profiling.py, docs/profiling.md).

* every public op runs inside ``moe_ops.<op>`` in a ``torch.profiler`` trace on CPU, around its
  kernel, and returns the same values as without a profiler;
* ``moe_forward`` shows ``moe_ops.moe_forward`` and, inside it and in pipeline order, the four
  stages ``moe_ops.router/dispatch/experts/combine`` on every path: the cpu backend's fused
  op (plain and packed weights), the unfused autograd fallback, capacity mode, the reference,
  the Triton fused layer (interpreter);
* with no profiler no ``record_function`` is made at all (the cost model in docs/profiling.md);
* ``torch.compile(fullgraph=True)`` still traces with the ranges, without a recompile when a
  profiler starts, and keeps them with ``capture_profiler_record_function``;
* the NVTX switch pushes balanced ranges by the same names, and never twice under ``emit_nvtx``.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import profiler as autograd_profiler

import moe_ops
from moe_ops import _profiling
from tests.inputs import make_ids, make_logits, make_offsets, make_x, seed_for

STAGES = [f"moe_ops.{s}" for s in _profiling.STAGES]
T, H, I, E, K = 12, 32, 24, 8, 2


def _trace(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, list(prof.events())


def _named(events, name):
    return [e for e in events if e.name == name]


def _inside(inner, outer) -> bool:
    return outer.time_range.start <= inner.time_range.start and inner.time_range.end <= outer.time_range.end


def _same(a, b):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(x, y)


def _cpu_backends():
    return [b for b in ("reference", "cpu") if b in moe_ops.available_backends(device="cpu")]


def _layer(seed, dtype=torch.float32):
    x = make_x(T, H, seed=seed, dtype=dtype)
    logits = make_logits(T, E, seed=seed + 1)
    wgu = make_x(E * 2 * I, H, seed=seed + 2, dtype=dtype, scale=H ** -0.5).reshape(E, 2 * I, H)
    wd = make_x(E * H, I, seed=seed + 3, dtype=dtype, scale=I ** -0.5).reshape(E, H, I)
    return x, logits, wgu, wd


def _op_calls(backend):
    """(op, call) for every public op, on fresh random inputs."""
    s = seed_for("profiling-ops", backend)
    x = make_x(T, H, seed=s)
    ids = make_ids(T, K, E, seed=s + 1)
    w = torch.rand(T, K, generator=torch.Generator().manual_seed(s + 2))
    logits = make_logits(T, E, seed=s + 3)
    M = T * K
    a = make_x(M, H, seed=s + 4)
    b = make_x(E * H, 2 * I, seed=s + 5).reshape(E, H, 2 * I)
    dc = make_x(M, 2 * I, seed=s + 6)
    offs = make_offsets(M, E, seed=s + 7)
    y_sorted = make_x(M, H, seed=s + 8)
    slot_rows = torch.randperm(M, generator=torch.Generator().manual_seed(s + 9)).to(torch.int32)
    C = 3
    buf_out = make_x(E * C, H, seed=s + 10).reshape(E, C, H)
    slot_pos = moe_ops.capacity_dispatch(x, ids, E, C, backend="reference").slot_pos
    lx, llog, wgu, wd = _layer(s + 11)
    calls = [
        ("topk_gating", lambda: moe_ops.topk_gating(logits, K, backend=backend)),
        ("permute", lambda: tuple(moe_ops.permute(x, ids, E, backend=backend))),
        ("unpermute", lambda: moe_ops.unpermute(y_sorted, slot_rows, w, backend=backend)),
        ("capacity_dispatch", lambda: tuple(moe_ops.capacity_dispatch(x, ids, E, C, backend=backend))),
        ("capacity_combine", lambda: moe_ops.capacity_combine(buf_out, ids, slot_pos, w, backend=backend)),
        ("grouped_gemm", lambda: moe_ops.grouped_gemm(a, b, offs, backend=backend)),
        ("grouped_gemm_wgrad", lambda: moe_ops.grouped_gemm_wgrad(a, dc, offs, E, backend=backend)),
        ("experts_forward", lambda: moe_ops.ops.experts_forward(x, w, ids, wgu, wd, backend=backend)),
        ("moe_forward", lambda: moe_ops.moe_forward(lx, llog, wgu, wd, K, backend=backend)),
    ]
    if backend == "cpu":
        calls.append(("pack_experts", lambda: (lambda p: (p.w_gate_up, p.w_down))(moe_ops.pack_experts(wgu, wd))))
    return calls


@pytest.mark.parametrize("backend", _cpu_backends())
def test_each_public_op_runs_in_its_range(backend):
    for op, call in _op_calls(backend):
        want = call()
        got, events = _trace(call)
        _same(got, want)
        ranges = _named(events, f"moe_ops.{op}")
        assert len(ranges) == 1, (op, sorted({e.name for e in events}))
        if backend == "cpu" and op not in ("experts_forward", "moe_forward"):
            kernels = _named(events, f"moe_ops::{op}")  # the dispatcher's record of the op itself
            assert kernels and all(_inside(k, ranges[0]) for k in kernels), op


def _layer_paths():
    paths = ["reference", "reference_capacity"]
    if "cpu" in moe_ops.available_backends(device="cpu"):
        paths += ["cpu_fused", "cpu_capacity", "cpu_autograd"]
        if hasattr(torch.ops.moe_ops, "fused_experts_packed"):
            paths.append("cpu_packed")
    if "triton" in moe_ops.available_backends("permute", "cpu"):
        paths += ["triton_fused", "triton_autograd"]
    return paths


@pytest.mark.parametrize("path", _layer_paths())
def test_moe_forward_stage_ranges(path):
    backend = path.split("_")[0]
    x, logits, wgu, wd = _layer(seed_for("profiling-stages", path))
    kw = dict(backend=backend)
    if path.endswith("capacity"):
        kw["capacity_factor"] = 1.0
    if path == "cpu_packed":
        kw["packed"] = moe_ops.pack_experts(wgu, wd)
    if path.endswith("autograd"):  # needs a gradient: the unfused differentiable ops
        x = x.requires_grad_()
    want = moe_ops.moe_forward(x, logits, wgu, wd, K, **kw)
    got, events = _trace(lambda: moe_ops.moe_forward(x, logits, wgu, wd, K, **kw))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (layer,) = _named(events, "moe_ops.moe_forward")
    starts = []
    for name in STAGES:
        found = _named(events, name)
        assert found, (name, sorted({e.name for e in events if e.name.startswith("moe_ops")}))
        assert all(_inside(e, layer) for e in found), name
        starts.append(min(e.time_range.start for e in found))
    assert starts == sorted(starts), "stages out of pipeline order"
    fused_op = {"cpu_fused": "moe_ops::fused_experts", "cpu_packed": "moe_ops::fused_experts_packed"}.get(path)
    if fused_op:  # the fused op carries all three stages it fuses
        (kernel,) = _named(events, fused_op)
        for name in STAGES[1:]:
            assert _inside(kernel, _named(events, name)[0]), name


def test_no_record_function_without_profiler(monkeypatch):
    """The ranges cost nothing but two flag tests when no profiler runs: not one
    ``record_function`` (~15 us each even with no profiler) is made."""
    made = []

    class Counting(torch.autograd.profiler.record_function):
        def __init__(self, name, args=None):
            made.append(name)
            super().__init__(name, args)
    monkeypatch.setattr(torch.autograd.profiler, "record_function", Counting)
    backend = _cpu_backends()[-1]
    for _, call in _op_calls(backend):
        call()
    assert made == []
    # the same calls with the flag a profiler sets: the counting class is the one used
    monkeypatch.setattr(autograd_profiler, "_is_profiler_enabled", True)
    for _, call in _op_calls(backend):
        call()
    assert "moe_ops.moe_forward" in made and "moe_ops.router" in made


def _counting_aot_eager(graphs):
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)
    return backend


@pytest.mark.parametrize("capture", [False, True], ids=["default", "capture_record_function"])
@pytest.mark.parametrize("capacity", [None, 1.0], ids=["dropless", "capacity"])
@pytest.mark.parametrize("backend", _cpu_backends())
def test_compile_fullgraph_with_ranges(backend, capacity, capture):
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_profiler_record_function=capture):
        _compile_and_profile(backend, capacity, capture)
    torch._dynamo.reset()


def _compile_and_profile(backend, capacity, capture):
    x, logits, wgu, wd = _layer(seed_for("profiling-compile", backend, capacity))
    graphs = []
    fn = torch.compile(lambda x, lg: moe_ops.moe_forward(x, lg, wgu, wd, K, backend=backend,
                                                         capacity_factor=capacity),
                       fullgraph=True, backend=_counting_aot_eager(graphs))
    want = moe_ops.moe_forward(x, logits, wgu, wd, K, backend=backend, capacity_factor=capacity)
    torch.testing.assert_close(fn(x, logits), want, atol=1e-6, rtol=1e-6)
    got, events = _trace(lambda: fn(x, logits))  # a profiler starting is no reason to recompile
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert len(graphs) == 1
    names = {e.name for e in events}
    if capture:
        assert {"moe_ops.moe_forward", *STAGES} <= names, sorted(names)
    else:
        assert not any(n.startswith("moe_ops.") for n in names), sorted(names)


@pytest.fixture
def fake_nvtx(monkeypatch):
    """NVTX on, with torch.cuda.nvtx's push/pop recorded (no GPU needed)."""
    log = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: log.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: log.append(("pop", None)))
    monkeypatch.setattr(_profiling, "_NVTX", True)
    return log


def _balanced_names(log):
    depth, names = 0, []
    for kind, name in log:
        depth += 1 if kind == "push" else -1
        assert depth >= 0
        if kind == "push":
            names.append(name)
    assert depth == 0
    return names


def test_nvtx_switch_pushes_the_same_ranges(fake_nvtx):
    backend = _cpu_backends()[-1]
    x, logits, wgu, wd = _layer(seed_for("profiling-nvtx"))
    out = moe_ops.moe_forward(x, logits, wgu, wd, K, backend=backend)
    names = _balanced_names(fake_nvtx)
    assert names[0] == "moe_ops.moe_forward" and [n for n in names if n in STAGES] == STAGES, names
    # with torch.profiler running too: the NVTX ranges and the profiler's by the same names
    fake_nvtx.clear()
    got, events = _trace(lambda: moe_ops.moe_forward(x, logits, wgu, wd, K, backend=backend))
    _same(got, out)
    assert _balanced_names(fake_nvtx) == names
    assert {"moe_ops.moe_forward", *STAGES} <= {e.name for e in events}


def test_nvtx_not_doubled_under_emit_nvtx(fake_nvtx, monkeypatch):
    """emit_nvtx turns every record_function into an NVTX range: no second push of our own."""
    monkeypatch.setattr(autograd_profiler, "_is_profiler_enabled", True)
    monkeypatch.setattr(torch._C._autograd, "_profiler_type", lambda: torch._C._profiler.ActiveProfilerType.NVTX)
    rng = _profiling.profile_range("moe_ops.test")
    assert isinstance(rng, torch.autograd.profiler.record_function)
    monkeypatch.setattr(torch._C._autograd, "_profiler_type", lambda: torch._C._profiler.ActiveProfilerType.KINETO)
    with _profiling.profile_range("moe_ops.test"):
        pass
    assert fake_nvtx == [("push", "moe_ops.test"), ("pop", None)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_nvtx_switch_needs_cuda():
    with pytest.warns(UserWarning, match="NVTX ranges need CUDA"):
        assert _profiling.set_nvtx(True) is False
    assert not _profiling.nvtx_enabled()


def test_unknown_stage_is_an_error(monkeypatch):
    monkeypatch.setattr(autograd_profiler, "_is_profiler_enabled", True)
    with pytest.raises(ValueError, match="unknown stage"):
        _profiling.stage("gating")


# ------------------------------------------------------------------------------ GPU (skipped on CPU)

def _cuda_layer(seed, dtype=torch.bfloat16):
    return [t.to("cuda", dtype if t.is_floating_point() and i != 1 else t.dtype)
            for i, t in enumerate(_layer(seed))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("capacity", [None, 1.0], ids=["dropless", "capacity"])
def test_gpu_trace_holds_stages_and_their_kernels(capacity):
    x, logits, wgu, wd = _cuda_layer(seed_for("profiling-gpu", capacity))
    call = lambda: moe_ops.moe_forward(x, logits, wgu, wd, K, capacity_factor=capacity)  # noqa: E731
    want = call()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        got = call()
        torch.cuda.synchronize()
    assert torch.equal(got, want)
    ranges = {a.key: a for a in prof.key_averages() if a.key.startswith("moe_ops.")}
    assert {"moe_ops.moe_forward", *STAGES} <= set(ranges), sorted(ranges)
    for name in ["moe_ops.moe_forward", "moe_ops.experts"]:  # the GEMM kernels are attributed to them
        assert ranges[name].device_time_total > 0, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("ranges", ["record_function", "nvtx"])
@pytest.mark.parametrize("capacity", [None, 1.0], ids=["dropless", "capacity"])
def test_cuda_graph_capture_with_ranges_open(ranges, capacity, monkeypatch):
    """The ranges are host-side: a moe_forward captured while they are open replays the same result."""
    if ranges == "nvtx":
        monkeypatch.setattr(_profiling, "_NVTX", _profiling._NVTX)  # restored after the test
        assert _profiling.set_nvtx(True)
    else:
        monkeypatch.setattr(autograd_profiler, "_is_profiler_enabled", True)
    x, logits, wgu, wd = _cuda_layer(seed_for("profiling-graph", ranges, capacity))
    call = lambda: moe_ops.moe_forward(x, logits, wgu, wd, K, capacity_factor=capacity)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (lazy init, configs) off the capture
        want = call()
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@pytest.mark.parametrize("fused", [True, False], ids=["cpu_fused", "op_by_op"])
def test_patched_transformers_model_shows_the_stages(fused, monkeypatch):
    """A model patched by apply_moe_ops: each MoE layer's router and expert stages are ranges."""
    transformers = pytest.importorskip("transformers")
    from moe_ops.integrations import transformers as moe_hf
    if not fused:
        monkeypatch.setattr(moe_hf, "_cpu_fused_ok", lambda *a: False)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    model = moe_hf.apply_moe_ops(transformers.MixtralForCausalLM(cfg).eval())
    with torch.no_grad():
        _, events = _trace(lambda: model(torch.randint(1, 64, (2, 5))))
    for name in STAGES:
        assert len(_named(events, name)) == 2, (name, [e.name for e in events if e.name.startswith("moe_ops")])
    for gate in _named(events, "moe_ops.topk_gating"):
        assert any(_inside(gate, r) for r in _named(events, "moe_ops.router"))
