"""The benchmark harness runs end to end on a tiny preset and writes its CSV and markdown.

No timing is judged here (numbers belong in docs/benchmarks.md); this checks the plumbing:
every op x available backend x baseline produces a row, the reference-checked rows agree with
the reference, a raising implementation becomes an error row instead of a crash, and the
plotting script reads what the harness wrote.
"""
import csv
import os

import pytest
import torch

pytest.importorskip("transformers")

from bench import run as bench_run  # noqa: E402
from bench.cases import OPS  # noqa: E402
from bench.report import FIELDS, FLOOR_DEFINITION, floor_ms  # noqa: E402


def _rows(out_dir):
    with open(os.path.join(out_dir, "results.csv"), newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == FIELDS
        return list(reader)


def test_smoke_preset_writes_csv_and_markdown(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert bench_run.main(["--preset", "smoke", "--device", "cpu", "--out-dir", str(tmp_path), "--quiet",
                           "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads  # restored
    rows = _rows(tmp_path)
    assert {r["op"] for r in rows} == set(OPS)
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(float(r["median_ms"]) > 0 for r in ok)
    # kernels' own failures are the op tests' business; the harness and its baselines must be clean
    mine = [r for r in rows if r["kind"] != "backend" or r["backend"] == "reference"]
    errors = [(r["op"], r["backend"], r["status"]) for r in mine if r["status"] != "ok"]
    assert not errors, errors
    # every op ran on the reference backend, checked against itself, and against baselines
    for op in OPS:
        ref = [r for r in rows if r["op"] == op and r["backend"] == "reference"]
        assert len(ref) == 1 and ref[0]["check"] == "ok", (op, ref)
    mism = [(r["op"], r["backend"], r["check"]) for r in mine if r["check"].startswith("mismatch")]
    assert not mism, mism
    layer = {r["backend"]: r for r in rows if r["op"] == "moe_forward"}
    assert {"hf_eager", "hf_grouped_mm", "dense", "weight_read", "floor"} <= set(layer)
    assert layer["hf_eager"]["check"] == "ok"  # the HF baseline computes the same layer
    assert float(layer["reference"]["speedup_vs_hf_eager"]) > 0
    # the floor is bench.report's one definition of the timed baselines; which dense GEMM (bf16 or
    # fp32) is faster depends on the CPU, so nothing here may assume an order between timings
    timed = {n: float(layer[n]["median_ms"]) for n in ("dense", "dense_fp32", "weight_read") if n in layer}
    assert layer["floor"]["note"] == FLOOR_DEFINITION
    assert float(layer["floor"]["median_ms"]) == floor_ms(timed)
    assert floor_ms({"dense": 2.0, "dense_fp32": 1.0, "weight_read": 0.5}) == 1.0
    assert floor_ms({"dense": 1.0, "dense_fp32": 2.0, "weight_read": 0.5}) == 1.0
    assert floor_ms({"dense": 1.0, "weight_read": 3.0}) == 3.0
    assert floor_ms({"dense": 1.0}) is None
    gg = {r["backend"] for r in rows if r["op"] == "grouped_gemm"}
    assert {"reference", "hf_mm_loop", "dense"} <= gg
    assert all(r["gbps"] for r in ok if r["op"] in ("permute", "unpermute", "capacity_dispatch")
               and r["backend"] != "dense")
    md = open(os.path.join(tmp_path, "latest.md")).read()
    assert "## moe_forward vs transformers' eager experts loop" in md
    for op in OPS:
        assert f"## {op}" in md
    assert "moe_forward vs transformers" in capsys.readouterr().out
    # a second run appends to the same CSV
    bench_run.main(["--preset", "smoke", "--device", "cpu", "--out-dir", str(tmp_path), "--quiet", "--threads", "1",
                    "--ops", "permute", "--baselines", "none"])
    new = _rows(tmp_path)[len(rows):]
    assert new and {(r["op"], r["kind"]) for r in new} == {("permute", "backend")}
    assert "reference" in {r["backend"] for r in new} and len({r["run_id"] for r in new}) == 1
    assert new[0]["run_id"] != rows[0]["run_id"]


def test_raising_backend_is_an_error_row(tmp_path, monkeypatch):
    from moe_ops import backend

    def boom(*args):
        raise RuntimeError("kernel exploded")
    backend._load("reference")
    monkeypatch.setitem(backend._BACKENDS["reference"].ops, "unpermute", boom)
    bench_run.main(["--preset", "smoke", "--device", "cpu", "--out-dir", str(tmp_path), "--quiet", "--threads", "1",
                    "--ops", "unpermute,permute", "--no-check"])
    rows = {(r["op"], r["backend"]): r for r in _rows(tmp_path)}
    assert rows[("unpermute", "reference")]["status"].startswith("error: RuntimeError: kernel exploded")
    assert rows[("unpermute", "hf_combine")]["status"] == "ok"
    assert rows[("permute", "reference")]["status"] == "ok"


def test_plot_script_draws_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from bench import plot
    bench_run.main(["--preset", "smoke", "--device", "cpu", "--out-dir", str(tmp_path), "--quiet", "--threads", "1",
                    "--ops", "grouped_gemm", "--experts", "4,8", "--baselines", "dense"])
    assert plot.main(["--csv", str(tmp_path / "results.csv"), "--out-dir", str(tmp_path / "plots")]) == 0
    pngs = os.listdir(tmp_path / "plots")
    assert len(pngs) == 1 and pngs[0].startswith("grouped_gemm__tiny") and pngs[0].endswith(".png")
    assert (tmp_path / "plots" / pngs[0]).stat().st_size > 1000
