"""``python -m bench --profile DIR`` (bench/profiling.py) on the smoke preset: at most
``--profile-max`` Chrome traces named after op/model/E/k/T/backend, each holding moe_ops'
ranges, and ``top_kernels.md`` naming them. No timing is judged."""
import json
import os
import re

import pytest

import moe_ops

pytest.importorskip("transformers")

from bench import run as bench_run  # noqa: E402

STAGES = ["moe_ops.router", "moe_ops.dispatch", "moe_ops.experts", "moe_ops.combine"]


def test_profile_writes_traces_and_top_kernels(tmp_path):
    prof_dir = tmp_path / "prof"
    assert bench_run.main(["--preset", "smoke", "--device", "cpu", "--out-dir", str(tmp_path), "--quiet",
                           "--threads", "1", "--ops", "moe_forward,permute", "--baselines", "none",
                           "--profile", str(prof_dir), "--profile-max", "3"]) == 0
    traces = sorted(f for f in os.listdir(prof_dir) if f.endswith(".json"))
    assert set(os.listdir(prof_dir)) == set(traces) | {"top_kernels.md"}
    assert 1 <= len(traces) <= 3
    for name in traces:
        assert re.fullmatch(r"(moe_forward|permute)__tiny__E8_k\d+_T16__\w+\.json", name), name
    kernel_backends = [b for b in moe_ops.available_backends("permute", "cpu") if b not in ("reference", "cuda_sim",
                                                                                            "triton")]
    if kernel_backends:  # kernel backends before the reference, up to the limit
        assert len(traces) == 3 and not any(t.endswith("__reference.json") for t in traces), traces
    layer = [t for t in traces if t.startswith("moe_forward")]
    assert layer
    for name in layer:
        events = {e.get("name") for e in json.load(open(prof_dir / name))["traceEvents"]}
        assert {"moe_ops.moe_forward", *STAGES} <= events, (name, sorted(n for n in events if "moe_ops" in str(n)))
    md = open(prof_dir / "top_kernels.md").read()
    for name in traces:
        assert f"trace: `{name}`" in md
    for rng in ["moe_ops.moe_forward", *STAGES]:
        assert f"| `{rng}` |" in md
    assert "Top 15 by self CPU time" in md
