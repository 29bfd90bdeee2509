"""The pieces of ``make gpu-check`` (scripts/gpu_check.py), cheaply; CI runs the whole check's
CPU rehearsal after the suite (.ci/run).

* the build targets exactly the GPU present (TORCH_CUDA_ARCH_LIST from its capability);
* the step budget fits the 8 minutes and leaves every later step its minimum;
* the check writes at most 8 files and flags any other file in OUT;
* the ``gpu`` marker (tests/conftest.py) selects tests of the real suite on a GPU machine (a
  collection with ``torch.cuda.is_available`` faked to True), and none without a GPU;
* the pytest plugin keeps every gpu test, a spread sample of the rest, splits them into
  disjoint shards; the driver turns its records into passed / failed / killed / not run;
* the bench preset ``gpu`` and the summary's ratios.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_check as G  # noqa: E402
import gpu_check_pytest as P  # noqa: E402
from tests.conftest import runs_on_gpu  # noqa: E402


def test_arch_list_is_the_gpu_present_only():
    assert G.arch_list_for((9, 0)) == "9.0a"    # H100 / H200: the wgmma variant
    assert G.arch_list_for((8, 0)) == "8.0"
    assert G.arch_list_for((8, 9)) == "8.9"
    assert G.arch_list_for((10, 0)) == "10.0a"
    assert ";" not in G.arch_list_for((12, 0))


def test_budget_fits_and_leaves_later_steps_their_minimum():
    assert G.BUDGET_S["cuda"] <= 8 * 60
    names = list(G.STEPS)
    for i, name in enumerate(names):
        later = sum(G.STEPS[n][2] for n in names[i + 1:])
        assert G.step_timeout(name, "cuda", 1000) == G.STEPS[name][0]        # plenty left: the cap
        assert G.step_timeout(name, "cuda", later + 7) == 7                  # else what later steps spare
    # from a bare checkout every step gets at least its minimum if the build stays under its cap
    left = G.BUDGET_S["cuda"] - G.STEPS["env"][0] - G.STEPS["build"][0]
    assert G.step_timeout("load", "cuda", left) >= G.STEPS["load"][2]


def test_out_files_within_limit(tmp_path):
    assert len(G.OUT_FILES) <= G.MAX_OUT_FILES == 8
    # the bench writes these two names into its --out-dir (bench/run.py)
    assert {"results.csv", "latest.md"} <= set(G.OUT_FILES.values())
    for name in G.OUT_FILES.values():
        (tmp_path / name).write_text("x")
    assert G.check_out_files(str(tmp_path)) == []
    (tmp_path / "results.old-1.csv").write_text("x")
    assert G.check_out_files(str(tmp_path)) == ["unexpected file in OUT: results.old-1.csv"]
    assert G.check_out_files(str(tmp_path), before={"results.old-1.csv"}) == []  # not ours


# ------------------------------------------------------------------------------ selection

class _Item:
    """What the marker and the plugin read from a pytest item."""

    def __init__(self, nodeid, params=None, marks=(), module=None):
        self.nodeid = nodeid
        self.name = nodeid.split("::")[-1]
        self.originalname = self.name.split("[")[0]
        self.module = module
        self._marks = set(marks)
        if params is not None:
            self.callspec = type("CallSpec", (), {"params": params})()

    def get_closest_marker(self, name):
        return name if name in self._marks else None


def test_runs_on_gpu():
    mod_gpu = type("M", (), {"DEVICE": "cuda"})
    mod_cpu = type("M", (), {"DEVICE": "cpu"})
    assert runs_on_gpu(_Item("t.py::a[x]", {"op": "permute", "device": "cuda"}))
    assert runs_on_gpu(_Item("t.py::a[x]", {"dev": torch.device("cuda", 1)}))
    assert runs_on_gpu(_Item("t.py::a[x]", {"backend": "cuda"}))
    assert runs_on_gpu(_Item("t.py::a", module=mod_gpu))
    assert runs_on_gpu(_Item("t.py::a", marks=["gpu"]))
    assert not runs_on_gpu(_Item("t.py::a[x]", {"device": "cpu", "backend": "cuda_sim"}, module=mod_cpu))
    assert not runs_on_gpu(_Item("t.py::a[x]", {"dev": torch.device("cpu")}))
    assert not runs_on_gpu(_Item("t.py::a"))


FAKE_GPU = "import torch\ntorch.cuda.is_available = lambda: True\n"


@pytest.mark.slow
def test_gpu_marker_selects_the_suites_gpu_tests(tmp_path):
    """Collect with torch believing in a GPU: the op tests and test_reference parametrize on the
    cuda device and test_triton runs on it, so ``-m gpu`` must select tests in each."""
    (tmp_path / "fake_gpu.py").write_text(FAKE_GPU)
    files = ["tests/test_topk_gating.py", "tests/test_permute.py", "tests/test_capacity.py", "tests/test_grouped_gemm.py",
             "tests/test_reference.py", "tests/test_triton.py", "tests/test_triton_quant.py"]

    def collect(*plugin):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT, env.get("PYTHONPATH", "")])
        r = subprocess.run([sys.executable, "-m", "pytest", *plugin, "-p", "no:cacheprovider", "--collect-only", "-q",
                            "-m", "gpu", *files], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode in (0, 5), r.stdout[-3000:] + r.stderr[-3000:]
        return [ln.split("::")[0] for ln in r.stdout.splitlines() if "::" in ln]

    on_gpu = collect("-p", "fake_gpu")
    for f in files:
        if f in ("tests/test_triton.py", "tests/test_triton_quant.py") and not _has_triton():
            continue
        assert on_gpu.count(f) > 0, f"no gpu-marked test in {f}"
    if not torch.cuda.is_available():
        assert collect() == []


def _has_triton():
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def _suite():
    items = [_Item(f"tests/test_a.py::f[{i}-cuda]", marks=["gpu"]) for i in range(5)]
    items += [_Item(f"tests/test_a.py::g[{i}]") for i in range(40)]
    items += [_Item(f"tests/test_b.py::h[{i}]") for i in range(3)]
    items += [_Item("tests/test_b.py::slow_one", marks=["slow"]), _Item("tests/test_c.py::k[cuda]", marks=["gpu"])]
    items += [_Item(f"tests/test_d.py::m[{i}]") for i in range(10)]
    return items


def test_select_keeps_gpu_tests_first_and_samples_every_file():
    items = _suite()
    chosen = P.select(items, sample=10)
    ids = [it.nodeid for it in chosen]
    gpu = [it.nodeid for it in items if "gpu" in it._marks]
    assert sorted(ids[:len(gpu)]) == sorted(gpu)
    assert ids[:2] == ["tests/test_a.py::f[0-cuda]", "tests/test_c.py::k[cuda]"]  # round robin
    rest = ids[len(gpu):]
    assert len(rest) == 10 and len(set(rest)) == 10
    assert {i.split("::")[0] for i in rest} == {"tests/test_a.py", "tests/test_b.py", "tests/test_d.py"}
    assert "tests/test_b.py::slow_one" not in ids
    assert P.select(items, sample=10) == chosen  # deterministic
    assert P.select(items, sample=0) == chosen[:len(gpu)]
    shards = [P.select(items, 10, (i, 3)) for i in range(3)]
    assert sorted(it.nodeid for s in shards for it in s) == sorted(ids)


def test_results_say_what_did_not_run(tmp_path):
    stop = 1000.0
    recs = [dict(selected=["a", "b", "c", "d", "e", "f"], gpu=["a", "b", "c", "f"]),
            dict(id="a", start=1.0), dict(id="a", outcome="passed", s=0.5, why=""),
            dict(id="b", start=2.0), dict(id="b", outcome="failed", s=0.1, why="AssertionError: no"),
            dict(id="c", start=stop - G.TEST_TIMEOUT_S - 1),   # running past the per-test limit: hung
            dict(id="d", start=4.0), dict(id="d", outcome="skipped", s=0.0, why="no bf16")]
    shard2 = [dict(selected=[], gpu=[]), dict(id="f", start=stop - 5)]   # stopped by the budget
    path, path2 = tmp_path / "r.jsonl", tmp_path / "r2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"id": "e", "sta')  # cut by a kill
    path2.write_text("".join(json.dumps(r) + "\n" for r in shard2))
    res = G.collect_test_results([str(path), str(tmp_path / "missing.jsonl"), str(path2)], stopped=stop)
    assert res["counts"]["gpu"] == {"passed": 1, "failed": 1, "killed": 1, "cut": 1}
    assert res["counts"]["sample"] == {"skipped": 1, "not run": 1}
    assert [f.split(":")[0] for f in res["failed"]] == ["b", "c"]
    assert res["shards_selected"] == [True, False, True]
    G.write_tests_txt(str(tmp_path / "tests.txt"), res)
    lines = (tmp_path / "tests.txt").read_text().splitlines()
    assert [ln.split("\t")[0] for ln in lines[2:]] == ["failed", "killed", "not run", "cut", "passed", "skipped"]


# ----------------------------------------------------------------------------------- bench

def test_gpu_preset_is_the_issue_matrix():
    from bench.cases import BASELINES, OPS
    from bench.run import PRESETS
    cfg = PRESETS["gpu"]
    assert cfg["experts"] == [8, 64, 256] and cfg["tokens"]["cuda"] == [64, 512, 4096]
    assert set(cfg["ops"]) <= set(OPS) and {"moe_forward", "grouped_gemm", "permute", "unpermute"} <= set(cfg["ops"])
    assert set(cfg["baselines"]) <= set(BASELINES)
    assert {"torch_grouped_mm", "dense", "copy", "floor"} <= set(cfg["baselines"])


def _row(op, backend, ms, kind="baseline", E=8, T=64):
    return dict(model="m", E=str(E), T=str(T), op=op, backend=backend, kind=kind, status="ok", median_ms=str(ms))


def test_bench_table_ratios():
    rows = [_row("moe_forward", "cuda", 2.0, "backend"), _row("moe_forward", "triton", 1.0, "backend"),
            _row("moe_forward", "reference", 0.5, "backend"), _row("moe_forward", "hf_grouped_mm", 3.0),
            _row("moe_forward", "floor", 0.8), _row("grouped_gemm", "triton", 0.4, "backend"),
            _row("grouped_gemm", "torch_grouped_mm", 0.5), _row("grouped_gemm", "dense", 0.3),
            _row("permute", "triton", 0.02, "backend"), _row("permute", "copy", 0.01),
            dict(_row("unpermute", "cuda", 0.01, "backend"), status="error: boom")]
    (r,) = G.bench_table(rows)
    assert r["layer_backend"] == "triton" and r["layer_ms"] == 1.0   # the reference is not a contender
    assert r["layer_x_hf_grouped_mm"] == 3.0 and r["layer_over_floor"] == pytest.approx(1.25)
    assert r["gemm_x_torch_grouped_mm"] == pytest.approx(1.25) and r["gemm_x_dense"] == pytest.approx(0.75)
    assert r["permute_of_copy"] == 0.5 and r["unpermute_of_copy"] is None
    text = G.summary(dict(steps={}, failures=[], warnings=[], bench=dict(rows=11, points_not_run=0, table=[r])),
                     "cuda", "/out")
    assert "PASS" in text and "1.25x" in text


def test_measured_auto_backend_picks_the_faster_and_reports_gemm_share():
    def row(op, backend, T, ms, E="8", status="ok", check="ok", dense=None):
        return dict(op=op, backend=backend, kind="backend", status=status, check=check, model="m", E=E, k="2",
                    T=str(T), dtype="bfloat16", median_ms=str(ms), speedup_vs_dense=str(dense) if dense else "")
    rows = [row("grouped_gemm", "cuda", 64, 1.0), row("grouped_gemm", "triton", 64, 2.0),
            row("grouped_gemm", "cuda", 4096, 4.0, dense=0.7), row("grouped_gemm", "triton", 4096, 3.0),
            row("moe_forward", "cuda", 64, 5.0), row("moe_forward", "triton", 64, 1.0),
            row("moe_forward", "cuda", 512, 9.0, status="error: x"),  # not both ok: ignored
            row("grouped_gemm_wgrad", "cuda", 64, 1.0)]                # no triton row: left out
    got = G.measured_auto_backend(rows, "sm_90", "measured today")
    assert got == {"sm_90": {"source": "measured today", "grouped_gemm": "cuda", "moe_forward": "triton"}}
    assert G.cuda_gemm_of_dense(rows) == [0.7]  # only T*k >= 512*E
    table = json.load(open(os.path.join(G.ROOT, "moe_ops", "auto_backend.json")))
    table["cuda"].update(got)  # what the check writes: still a table backend.auto_order reads
    from moe_ops import backend
    assert got["sm_90"]["grouped_gemm"] in backend.auto_order("grouped_gemm", "cuda", arch="sm_90")
