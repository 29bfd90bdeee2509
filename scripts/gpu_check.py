"""``make gpu-check``: the one-command check of moe-ops on a GPU machine, offline.

    make gpu-check PYTHON=python3 OUT=/some/dir     # == python3 scripts/gpu_check.py --out /some/dir

Uses the interpreter it runs under as it is: no venv, no downloads, no pip. Steps, each with a
time cap inside one overall budget (8 minutes on one H100/H200 with 16 cores, from a bare
checkout):

1. env      versions (python, torch, CUDA, triton, transformers, numpy), the GPU, the build tools
2. build    ``setup.py build_ext --inplace`` with ``MOE_OPS_CUDA=1``, ``TORCH_CUDA_ARCH_LIST`` for
            the GPU present only (sm_90 -> "9.0a"), ``MAX_JOBS`` = cores, ``MOE_OPS_SIM=0`` (the
            SIMT emulator serves CPU-only tests)
3. load     ``cuda`` and ``triton`` load and run a small layer against the reference (a backend
            that fails to load is a failure); prints ``build_info()`` and ``load_errors()``
4. tests    every test that runs on the GPU (``gpu`` marker, tests/conftest.py) plus a sample of
            the rest, in parallel pytest processes, under a per-test and an overall time limit;
            what did not run is listed
5. bench    ``python -m bench --preset gpu``: the layer and grouped GEMM against torch._grouped_mm,
            cuBLAS at equal FLOPs, permute/unpermute against the device copy (E 8/64/256, T 64/512/4096)
            From the bench rows it also writes ``auto_backend.json``: moe_ops/auto_backend.json with
            this GPU arch's entry measured (per op, cuda or triton, whichever has the lower
            geometric-mean time over the points both ran) -- commit it to make the choice stick.
6. profile  a torch.profiler Chrome trace of one moe_forward

Where no GPU exists it rehearses the same steps on CPU, reduced (CI runs this): the build as
configured (incremental when one exists), ``cpu`` (and ``triton`` under TRITON_INTERPRET=1 if
triton is installed) must load, a small test sample, two points of the bench preset, the trace.

Writes at most 8 files into OUT (:data:`OUT_FILES`), prints a one-screen summary and exits 1 on
any failure (a failed step, test, backend or moe_ops bench row), 0 otherwise.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
TAG = "GPU_CHECK_JSON "


def _load_settings():
    """moe_ops/envs.py (the table of every environment variable), loaded by path: the check runs
    before the package is built, with whatever interpreter it is given."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("moe_ops_envs", os.path.join(ROOT, "moe_ops", "envs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


envs = _load_settings()

# Everything the check writes into OUT.
OUT_FILES = OrderedDict([
    ("log", "gpu-check.log"),    # every step's full output
    ("summary", "summary.txt"),  # the summary printed at the end
    ("info", "info.json"),       # versions, build_info, load errors, counts, step times, failures
    ("tests", "tests.txt"),      # one line per selected test: outcome, seconds, group, id, reason
    ("csv", "results.csv"),      # the benchmark rows (bench/report.py columns)
    ("md", "latest.md"),         # the benchmark tables
    ("trace", "trace.json"),     # Chrome trace of one moe_forward (Perfetto / chrome://tracing)
    ("auto", "auto_backend.json"),  # GPU only: the measured per-arch backend table (commit to moe_ops/)
])
MAX_OUT_FILES = 8

# Per step: (cap on a GPU, cap on the CPU rehearsal, least time worth starting it), seconds.
STEPS = OrderedDict([
    ("env", (60, 60, 5)),
    ("build", (240, 1500, 30)),   # CPU: incremental after `make test` (CI); from scratch on 2 cores, ~15 min
    ("load", (60, 90, 10)),
    ("tests", (150, 100, 30)),
    ("bench", (150, 75, 30)),
    ("profile", (45, 60, 15)),
])
# The whole run; a step killed at its limit takes up to 20 s more (SIGTERM, then SIGKILL).
BUDGET_S = {"cuda": 450, "cpu": 1800}
TEST_SAMPLE = {"cuda": 60, "cpu": 24}      # tests not marked gpu, spread over the files
OP_TEST_FILES = ("tests/test_topk_gating.py", "tests/test_permute.py", "tests/test_capacity.py",
                 "tests/test_grouped_gemm.py")  # the per-op backend matrix (tests/op_matrix.py)
TEST_TIMEOUT_S = 120                       # one test (pytest-timeout)
# The rehearsal's bench points (the preset's CPU tokens x these E).
CPU_BENCH_ARGS = ["--device", "cpu", "--experts", "8,64"]


def arch_list_for(capability) -> str:
    """TORCH_CUDA_ARCH_LIST building for exactly this GPU. Hopper and newer get their
    arch-specific variant (sm_90a: wgmma/TMA; "9.0a" is also in the default list)."""
    major, minor = (int(v) for v in capability)
    return f"{major}.{minor}" + ("a" if major >= 9 else "")


def step_timeout(step: str, device: str, remaining: float) -> float:
    """Seconds ``step`` may take: its cap, less what the steps after it need at least."""
    names = list(STEPS)
    later = sum(STEPS[n][2] for n in names[names.index(step) + 1:])
    cap = STEPS[step][0 if device == "cuda" else 1]
    return min(cap, remaining - later)


def check_out_files(out: str, before=()) -> list:
    """Problems with what the run left in OUT: a file that is not one of OUT_FILES (and was not
    there before the run), or more files than the limit."""
    ours = set(OUT_FILES.values())
    present = sorted(os.listdir(out))
    problems = [f"unexpected file in OUT: {n}" for n in present if n not in ours and n not in before]
    if len([n for n in present if n in ours]) > MAX_OUT_FILES:
        problems.append(f"more than {MAX_OUT_FILES} files in OUT")
    return problems


# ------------------------------------------------------------------------------------ running

class Log:
    """The log file every child process writes into (appended), and the console lines."""

    def __init__(self, path: str):
        self.path = path
        open(path, "w").close()

    def write(self, text: str) -> None:
        with open(self.path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def say(self, text: str) -> None:
        print(f"[gpu-check] {text}", flush=True)
        self.write(f"[gpu-check] {text}")


def _kill(proc) -> None:
    """Stop a child and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def start(cmd, env, sink):
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def run(cmd, env, log: Log, timeout: float):
    """Run ``cmd`` with its output appended to the log; (returncode or None on timeout, output)."""
    log.write(f"$ {' '.join(cmd)}   (timeout {timeout:.0f} s)")
    with open(log.path, "ab") as sink:
        offset = sink.tell()
        proc = start(cmd, env, sink)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = None
        except BaseException:
            _kill(proc)
            raise
    with open(log.path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    if rc is None:
        log.write(f"[gpu-check] killed after {timeout:.0f} s")
    return rc, text


def parse_json(text: str):
    for line in reversed(text.splitlines()):
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    return None


def child_env(**extra) -> dict:
    """This environment, the checkout first on PYTHONPATH, and ``extra`` (None: unset)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SCRIPTS, ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


# ---------------------------------------------------------------------------------- the steps

class Check:
    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.out_before = set(os.listdir(self.out)) - set(OUT_FILES.values())
        for name in OUT_FILES.values():  # a fresh CSV, not rows appended to an old run's
            if os.path.exists(os.path.join(self.out, name)):
                os.remove(os.path.join(self.out, name))
        self.log = Log(self.path("log"))
        self.tmp = tempfile.mkdtemp(prefix="gpu-check-")
        self.device = "cpu"
        self.budget = args.budget
        self.info = OrderedDict(steps=OrderedDict(), failures=[], warnings=[])
        self.py = sys.executable
        self.skipped = None  # why the running step did nothing

    def path(self, key: str) -> str:
        return os.path.join(self.out, OUT_FILES[key])

    def remaining(self) -> float:
        budget = self.budget if self.budget is not None else min(BUDGET_S.values())  # device not known yet
        return budget - (time.monotonic() - self.t0)

    def env_for(self, **extra) -> dict:
        """child_env for this device: on a GPU Triton compiles for it (an inherited
        TRITON_INTERPRET=1 would route it through the CPU interpreter)."""
        if self.device == "cuda":
            extra["TRITON_INTERPRET"] = None
        return child_env(**extra)

    def fail(self, msg: str) -> None:
        self.info["failures"].append(msg)
        self.log.say(f"FAIL: {msg}")

    def warn(self, msg: str) -> None:
        self.info["warnings"].append(msg)
        self.log.say(f"warning: {msg}")

    def step(self, name: str, fn) -> None:
        timeout = step_timeout(name, self.device, self.remaining())
        if timeout < STEPS[name][2]:
            self.info["steps"][name] = dict(status="not run", s=0)
            self.fail(f"step {name} not run: {max(self.remaining(), 0):.0f} s of the budget left")
            return
        self.log.write(f"\n===== {name} (at most {timeout:.0f} s) =====")
        t = time.monotonic()
        before = len(self.info["failures"])
        self.skipped = None
        try:
            fn(timeout)
        except Exception as err:  # a bug here must still end in a summary
            self.fail(f"step {name} crashed: {type(err).__name__}: {err}")
        s = time.monotonic() - t
        status = "ok" if len(self.info["failures"]) == before else "failed"
        status = f"skipped ({self.skipped})" if self.skipped and status == "ok" else status
        self.info["steps"][name] = dict(status=status, s=round(s, 1))
        self.log.say(f"{name}: {status} ({s:.0f} s)")

    # 1 ------------------------------------------------------------------------------------ env
    def env(self, timeout):
        rc, text = run([self.py, os.path.join(SCRIPTS, "gpu_check_probe.py"), "env"], child_env(), self.log, timeout)
        e = parse_json(text)
        if rc != 0 or e is None:
            self.fail(f"cannot import torch with {self.py} (see the log)")
            return
        self.info["env"] = e
        want = self.args.device
        self.device = "cuda" if (want == "cuda" or (want == "auto" and e["cuda_available"])) else "cpu"
        if self.device == "cuda" and not e["cuda_available"]:
            self.fail("--device cuda: torch sees no GPU")
        if self.budget is None:
            self.budget = BUDGET_S[self.device]
        needs = [("setuptools", e["setuptools"]), ("Python.h (python3-dev)", e["python_h"]),
                 ("cmake", e["cmake"]), ("pytest", e["pytest"])]
        if self.device == "cuda":
            needs += [("nvcc", e["nvcc"]), ("a CUDA build of torch", e["torch_cuda"])]
        for what, have in needs:
            if not have or str(have).startswith("broken"):
                self.fail(f"{what} missing for {self.py}")
        if not e["pytest_timeout"]:
            self.warn("pytest-timeout missing: no per-test time limit (the overall one still holds)")

    # 2 ---------------------------------------------------------------------------------- build
    def build(self, timeout):
        if self.args.no_build:
            self.skipped = "--no-build"
            return
        cores = self.info.get("env", {}).get("cores") or os.cpu_count()
        extra = dict(MAX_JOBS=envs.raw("MAX_JOBS") or str(cores))
        if self.device == "cuda":
            cap = self.info["env"]["capability"]
            extra.update(MOE_OPS_CUDA="1", MOE_OPS_SIM="0",
                         TORCH_CUDA_ARCH_LIST=self.args.arch or arch_list_for(cap))
        # On CPU the build keeps the configuration `make build`/`make test` gave it (env as is),
        # so an existing build is reused incrementally.
        self.info["build_env"] = extra
        self.log.write("build env: " + " ".join(f"{k}={v}" for k, v in extra.items()))
        rc, _ = run([self.py, "setup.py", "build_ext", "--inplace"], self.env_for(**extra), self.log, timeout)
        if rc != 0:
            self.fail("build " + ("timed out" if rc is None else f"failed (exit {rc}); see the log"))

    # 3 ----------------------------------------------------------------------------------- load
    def load(self, timeout):
        extra = {"TRITON_INTERPRET": "1"} if self.device == "cpu" else {}
        rc, text = run([self.py, os.path.join(SCRIPTS, "gpu_check_probe.py"), "load", self.device],
                       self.env_for(**extra), self.log, timeout)
        r = parse_json(text)
        if r is None:
            self.fail("loading moe_ops " + ("timed out" if rc is None else f"crashed (exit {rc}); see the log"))
            return
        self.info["load"] = r
        for f in r["failures"]:
            self.fail(f)

    # 4 ---------------------------------------------------------------------------------- tests
    def tests(self, timeout):
        cores = int(self.info.get("env", {}).get("cores") or os.cpu_count() or 1)
        # GPU: Triton compiles (one core each) in parallel; CPU: 2, so CI runs the same sharded path
        shards = self.args.shards or (min(4, max(1, cores // 4)) if self.device == "cuda" else 2)
        sample = TEST_SAMPLE[self.device] if self.args.sample is None else self.args.sample
        grace = 30 if self.device == "cuda" else 20   # collection, then the last test finishing
        deadline = time.time() + timeout - grace
        cmd = [self.py, "-m", "pytest", "-p", "gpu_check_pytest", "-p", "no:cacheprovider", "-q", "tests"]
        if self.info.get("env", {}).get("pytest_timeout"):
            cmd.insert(-1, f"--timeout={TEST_TIMEOUT_S}")
        # CPU tests: the cores shared out over the shards; on the CPU rehearsal 1 (tests/conftest.py)
        threads = envs.raw("MOE_OPS_TEST_THREADS") or (max(1, cores // shards) if self.device == "cuda" else 1)
        procs = []
        self.log.write(f"$ {' '.join(cmd)}   ({shards} shard(s), sample {sample}, timeout {timeout:.0f} s)")
        for i in range(shards):
            results = os.path.join(self.tmp, f"tests.{i}.jsonl")
            out = open(os.path.join(self.tmp, f"pytest.{i}.log"), "wb")
            env = self.env_for(GPU_CHECK_RESULTS=results, GPU_CHECK_SAMPLE=sample, GPU_CHECK_SHARD=f"{i}/{shards}",
                            GPU_CHECK_DEADLINE=deadline, MOE_OPS_TEST_THREADS=threads,
                            TRITON_INTERPRET="1" if self.device == "cpu" else None)
            procs.append((start(cmd, env, out), out, results))
        end = time.monotonic() + timeout
        rcs = []
        try:
            for proc, out, _ in procs:
                try:
                    rcs.append(proc.wait(max(1.0, end - time.monotonic())))
                except subprocess.TimeoutExpired:
                    _kill(proc)
                    rcs.append(None)
                out.close()
        except BaseException:
            for proc, _, _ in procs:
                _kill(proc)
            raise
        for i, (_, out, _) in enumerate(procs):
            with open(out.name, "rb") as f:
                self.log.write(f"----- pytest shard {i}/{shards} (exit {rcs[i]}) -----\n"
                               + f.read().decode(errors="replace"))
        res = collect_test_results([r for _, _, r in procs], stopped=time.time())
        res.update(shards=shards, sample=sample, exit_codes=rcs)
        self.info["tests"] = res
        write_tests_txt(self.path("tests"), res)
        c = res["counts"]
        for i, rc in enumerate(rcs):
            if rc is None and not res["shards_selected"][i]:
                self.fail(f"pytest shard {i} killed at the time limit ({timeout:.0f} s) before it selected tests")
            elif rc is None:
                self.warn(f"pytest shard {i} stopped at the time limit ({timeout:.0f} s)")
            elif rc not in (0, 1, 5):  # 5: this shard got no test (reported below if none did)
                self.fail(f"pytest shard {i} exited {rc} (collection or internal error; see the log)")
        if not res["tests"]:
            self.fail("no test selected (see the log)")
        bad = c["all"].get("failed", 0) + c["all"].get("error", 0) + c["all"].get("killed", 0)
        if bad:
            self.fail(f"{bad} test(s) failed: " + "; ".join(res["failed"][:3]) + (" ..." if bad > 3 else ""))
        if self.device == "cuda":
            per_file = Counter(t.split("::")[0] for t in res["gpu"])
            for op_tests in OP_TEST_FILES:
                if not per_file.get(op_tests):
                    self.fail(f"no GPU test selected in {op_tests} (the gpu marker selects nothing?)")
            for triton_tests in ("tests/test_triton.py", "tests/test_triton_quant.py"):
                if not per_file.get(triton_tests):
                    self.fail(f"no GPU test selected in {triton_tests}")
        short = c["all"].get("not run", 0) + c["all"].get("cut", 0)
        if short:
            self.warn(f"{short} selected test(s) not run or cut short by the time budget; listed in {OUT_FILES['tests']}")

    # 5 ---------------------------------------------------------------------------------- bench
    def bench(self, timeout):
        # the bench's own limit counts from its start: it stops starting points, then writes tables
        limit = max(10, timeout - (30 if self.device == "cuda" else 20))
        cmd = [self.py, "-m", "bench", "--preset", "gpu", "--out-dir", self.out, "--time-limit", f"{limit:.0f}"]
        if self.device == "cpu":
            cmd += CPU_BENCH_ARGS
        rc, text = run(cmd, self.env_for(), self.log, timeout)
        rows = []
        if os.path.exists(self.path("csv")):
            with open(self.path("csv"), newline="") as f:
                rows = list(csv.DictReader(f))
        m = re.search(r"(\d+) points not run", text)
        self.info["bench"] = dict(rows=len(rows), points_not_run=int(m.group(1)) if m else 0,
                                  table=bench_table(rows))
        if rc != 0:
            self.fail("bench " + ("timed out" if rc is None else f"failed (exit {rc}); see the log"))
        if not rows:
            self.fail("bench wrote no rows")
        for r in rows:
            what = f"bench {r['op']} {r['backend']} E={r['E']} T={r['T']}"
            problem = r["status"] if r["status"].startswith("error") else \
                r["check"] if r["check"].startswith("mismatch") else ""
            if problem and r["kind"] == "backend":
                self.fail(f"{what}: {problem[:200]}")
            elif problem:
                self.warn(f"{what} (baseline): {problem[:200]}")
        if m:
            self.warn(f"bench: {m.group(1)} point(s) not run (time/memory limit)")
        if self.device == "cuda" and rows:
            import torch
            arch = "sm_{}{}".format(*torch.cuda.get_device_capability())
            entry = measured_auto_backend(rows, arch, f"measured {time.strftime('%Y-%m-%d')} "
                                          f"{torch.cuda.get_device_name()} (make gpu-check)")
            with open(os.path.join(ROOT, "moe_ops", "auto_backend.json")) as f:
                table = json.load(f)
            table.setdefault("cuda", {}).update(entry)
            with open(self.path("auto"), "w") as f:
                json.dump(table, f, indent=2)
            shares = cuda_gemm_of_dense(rows)
            self.info["bench"].update(auto_backend=entry, cuda_gemm_of_dense=shares)

    # 6 -------------------------------------------------------------------------------- profile
    def profile(self, timeout):
        cmd = [self.py, os.path.join(SCRIPTS, "gpu_check_probe.py"), "profile", self.device, self.path("trace")]
        rc, text = run(cmd, self.env_for(), self.log, timeout)
        p = parse_json(text)
        if rc != 0 or p is None:
            self.fail("profile " + ("timed out" if rc is None else f"failed (exit {rc}); see the log"))
            return
        self.info["profile"] = p
        if self.device == "cuda" and not p["kernels"]:
            self.warn("the trace holds no GPU kernels (CUPTI unavailable?)")

    # ---------------------------------------------------------------------------------- main
    def main(self) -> int:
        self.log.say(f"{self.py} in {ROOT}; writing to {self.out}")
        try:
            self.step("env", self.env)
            if self.device == "cpu":
                self.log.say("no GPU: rehearsing the steps on CPU (reduced)")
            for name in ("build", "load", "tests", "bench", "profile"):
                if name == "build" and "env" not in self.info:
                    break  # no usable torch: nothing to build or run
                self.step(name, getattr(self, name))
                if name == "build" and self.info["steps"]["build"]["status"] == "failed":
                    break  # stale libraries from an earlier build would be checked instead
        finally:
            for name in STEPS:
                self.info["steps"].setdefault(name, dict(status="not run", s=0))
            shutil.rmtree(self.tmp, ignore_errors=True)
            for problem in check_out_files(self.out, self.out_before):
                self.fail(problem)
            self.info["total_s"] = round(time.monotonic() - self.t0, 1)
            text = summary(self.info, self.device, self.out)
            with open(self.path("summary"), "w") as f:
                f.write(text + "\n")
            self.log.write(text)
            with open(self.path("info"), "w") as f:
                json.dump(self.info, f, indent=1, default=str)
            print(text, flush=True)
        return 1 if self.info["failures"] else 0


# ---------------------------------------------------------------------------- test results

def collect_test_results(paths, stopped=None):
    """Outcomes from the plugin's JSON lines (scripts/gpu_check_pytest.py), one file per shard:
    per test its outcome; selected but never started = "not run"; started without an outcome
    (its process was stopped at ``stopped``, a time.time()) = "cut" if it had run less than a
    test may (TEST_TIMEOUT_S; the budget ended), else "killed" (hung past pytest-timeout)."""
    selected, gpu, started, done, shards_selected = [], set(), {}, {}, []
    for p in paths:
        shards_selected.append(False)
        if not os.path.exists(p):
            continue
        with open(p) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if "selected" in rec:
                    selected += rec["selected"]
                    gpu.update(rec["gpu"])
                    shards_selected[-1] = True
                elif "outcome" in rec:
                    done[rec["id"]] = rec
                elif "start" in rec:
                    started[rec["id"]] = rec["start"]
    tests = []
    for tid in selected:
        rec = done.get(tid)
        if rec is None and tid in started:
            ran = (stopped or time.time()) - started[tid]
            rec = dict(id=tid, outcome="cut" if ran < TEST_TIMEOUT_S else "killed", s=ran,
                       why=f"stopped after {ran:.0f} s")
        elif rec is None:
            rec = dict(id=tid, outcome="not run", s=0.0, why="")
        tests.append(dict(rec, group="gpu" if tid in gpu else "sample"))
    counts = {"gpu": Counter(), "sample": Counter(), "all": Counter()}
    for t in tests:
        counts[t["group"]][t["outcome"]] += 1
        counts["all"][t["outcome"]] += 1
    failed = [f"{t['id']}: {t['why']}" for t in tests if t["outcome"] in ("failed", "error", "killed")]
    skips = Counter(t["why"] for t in tests if t["outcome"] == "skipped" and t["group"] == "gpu")
    return dict(tests=tests, gpu=sorted(gpu), counts={k: dict(v) for k, v in counts.items()}, failed=failed,
                gpu_skip_reasons=skips.most_common(5), shards_selected=shards_selected)


def write_tests_txt(path, res) -> None:
    order = {"failed": 0, "error": 0, "killed": 0, "cut": 1, "not run": 1}
    with open(path, "w") as f:
        f.write(f"# {len(res['tests'])} selected tests; counts {json.dumps(res['counts'])}\n")
        f.write("# outcome\tseconds\tgroup\ttest\treason\n")
        for t in sorted(res["tests"], key=lambda t: order.get(t["outcome"], 2)):
            f.write(f"{t['outcome']}\t{t['s']:.2f}\t{t['group']}\t{t['id']}\t{t['why']}\n")


# ------------------------------------------------------------------------------------- summary

def _f(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def bench_table(rows) -> list:
    """Per point: the layer's best moe_ops backend and its time against transformers'
    grouped_mm path (torch._grouped_mm) and the roofline floor; the grouped GEMM against
    torch._grouped_mm and cuBLAS at equal FLOPs; permute/unpermute as a share of the copy."""
    pts = OrderedDict()
    for r in rows:
        if r["status"] != "ok":
            continue
        key = (r["model"], int(r["E"]), int(r["T"]))
        pts.setdefault(key, {}).setdefault(r["op"], {})[r["backend"]] = r

    def best(by):
        cand = [r for b, r in by.items() if r["kind"] == "backend" and b != "reference"] or \
            [r for b, r in by.items() if b == "reference"]
        return min(cand, key=lambda r: float(r["median_ms"])) if cand else None

    def ratio(by, base, r, invert=False):
        t = _f(by.get(base, {}).get("median_ms"))
        if t is None or r is None:
            return None
        return float(r["median_ms"]) / t if invert else t / float(r["median_ms"])

    out = []
    for (model, E, T), ops in pts.items():
        lay, gg = ops.get("moe_forward", {}), ops.get("grouped_gemm", {})
        bl, bg = best(lay), best(gg)
        row = dict(model=model, E=E, T=T,
                   layer_backend=bl and bl["backend"], layer_ms=bl and float(bl["median_ms"]),
                   layer_x_hf_grouped_mm=ratio(lay, "hf_grouped_mm", bl),
                   layer_over_floor=ratio(lay, "floor", bl, True),
                   gemm_backend=bg and bg["backend"], gemm_ms=bg and float(bg["median_ms"]),
                   gemm_x_torch_grouped_mm=ratio(gg, "torch_grouped_mm", bg), gemm_x_dense=ratio(gg, "dense", bg))
        for op in ("permute", "unpermute"):
            row[f"{op}_of_copy"] = ratio(ops.get(op, {}), "copy", best(ops.get(op, {})))
        out.append(row)
    return out


AUTO_OPS = ("grouped_gemm", "grouped_gemm_wgrad", "moe_forward")


def measured_auto_backend(rows, arch: str, source: str) -> dict:
    """The ``auto_backend.json`` entry for ``arch`` from bench rows: per op in :data:`AUTO_OPS`,
    ``cuda`` or ``triton``, whichever has the lower geometric-mean median time over the points
    both ran ok (ties: cuda). Ops without such a point are left out (the design default stays)."""
    import math
    points = {}
    for r in rows:
        if r["kind"] != "backend" or r["status"] != "ok" or r["op"] not in AUTO_OPS \
                or r["backend"] not in ("cuda", "triton") or not r["check"].startswith("ok"):
            continue
        key = (r["model"], r["E"], r["k"], r["T"], r["dtype"])
        points.setdefault(r["op"], {}).setdefault(key, {})[r["backend"]] = float(r["median_ms"])
    entry = {"source": source}
    for op in AUTO_OPS:
        both = [p for p in points.get(op, {}).values() if len(p) == 2]
        if both:
            score = {b: sum(math.log(p[b]) for p in both) for b in ("cuda", "triton")}
            entry[op] = "cuda" if score["cuda"] <= score["triton"] else "triton"
    return {arch: entry}


def cuda_gemm_of_dense(rows, min_rows_per_expert: int = 512) -> list:
    """cuda grouped GEMM time as a share of cuBLAS dense at equal FLOPs (speedup_vs_dense) at the
    points with at least ``min_rows_per_expert`` rows per expert: issue 16's design target."""
    out = []
    for r in rows:
        if r["op"] == "grouped_gemm" and r["backend"] == "cuda" and r["status"] == "ok" \
                and int(r["T"]) * int(r["k"]) >= min_rows_per_expert * int(r["E"]) and _f(r["speedup_vs_dense"]):
            out.append(float(r["speedup_vs_dense"]))
    return out


def _x(v, fmt="{:.2f}x"):
    return "-" if v is None else fmt.format(v)


def summary(info, device, out) -> str:
    e = info.get("env", {})
    fails = info["failures"]
    head = "PASS" if not fails else "FAIL"
    lines = [f"== moe-ops gpu-check: {head} in {info.get('total_s', 0):.0f} s"
             + ("" if device == "cuda" else " (no GPU: CPU rehearsal)") + " =="]
    if e:
        gpu = f"{e.get('gpu')} sm_{''.join(map(str, e.get('capability', [])))} x{e.get('gpu_count')} " \
              f"({e.get('gpu_memory_gib')} GiB)" if device == "cuda" else "no GPU"
        smi = (e.get("nvidia_smi") or "").split(": ", 1)[-1]
        nvcc = re.search(r"release ([\d.]+)", e.get("nvcc") or "")
        lines.append(f"machine: {gpu}, {e.get('cores')} cores | nvcc {nvcc.group(1) if nvcc else 'none'}"
                     + (f" | nvidia-smi: {smi}" if smi else ""))
        lines.append(f"python {e.get('python')} | torch {e.get('torch')} (CUDA {e.get('torch_cuda')}) | triton "
                     f"{e.get('triton')} | transformers {e.get('transformers')} | numpy {e.get('numpy')}")
    lines.append("steps: " + ", ".join(f"{n} {s['status']} {s['s']:.0f}s" for n, s in info["steps"].items()))
    if "build_env" in info:
        lines.append("build: " + " ".join(f"{k}={v}" for k, v in info["build_env"].items()))
    ld = info.get("load")
    if ld:
        lines.append(f"backends on {device}: {', '.join(ld['backends'])} | needed: "
                     + ", ".join(f"{b} {ld.get('smoke', {}).get(b, 'missing')}" for b in ld["required"]))
        bi = ld["build_info"]
        cpu = bi.get("cpu") or {}
        isa = "AVX512-BF16" if cpu.get("avx512_bf16") else "AVX2" if cpu.get("avx2") else "portable"
        lines.append(f"build_info: cuda={bi.get('cuda')} {bi.get('cuda_version') or ''} archs={bi.get('cuda_archs')} "
                     f"cpu kernels={isa} | load_errors: "
                     + ("; ".join(f"{b}: {m[:70]}" for b, m in ld["load_errors"].items()) or "none"))
    t = info.get("tests")
    if t:
        def cnt(g):
            c = t["counts"].get(g, {})
            return ", ".join(f"{v} {k}" for k, v in sorted(c.items())) or "none"
        lines.append(f"tests ({t['shards']} process(es)): gpu-marked: {cnt('gpu')} | "
                     f"sample of the rest: {cnt('sample')}")
        if t["gpu_skip_reasons"]:
            lines.append("  gpu skips: " + "; ".join(f"{n}x {why[:70]}" for why, n in t["gpu_skip_reasons"][:3]))
        for f in t["failed"][:5]:
            lines.append(f"  FAILED {f[:150]}")
    b = info.get("bench")
    if b:
        lines.append(f"bench --preset gpu: {b['rows']} rows, {b['points_not_run']} points not run; "
                     "best moe_ops backend, median ms, speedup (>1 = moe_ops faster):")
        lines.append(f"  {'E':>4} {'T':>5} | {'layer':>14} {'x hf_gmm':>8} {'/floor':>7} | {'grouped GEMM':>19} "
                     f"{'x torch_gmm':>11} {'x dense':>7} | {'perm/copy':>9} {'unperm/copy':>11}")
        for r in b["table"]:
            lines.append(f"  {r['E']:>4} {r['T']:>5} | {str(r['layer_backend'])[:7]:>7} "
                         f"{_x(r['layer_ms'], '{:.3f}'):>6} "
                         f"{_x(r['layer_x_hf_grouped_mm']):>8} {_x(r['layer_over_floor']):>7} | "
                         f"{str(r['gemm_backend'])[:7]:>7} {_x(r['gemm_ms'], '{:.3f}'):>11} "
                         f"{_x(r['gemm_x_torch_grouped_mm']):>11} {_x(r['gemm_x_dense']):>7} | "
                         f"{_x(r['permute_of_copy']):>9} {_x(r['unpermute_of_copy']):>11}")
    if b and b.get("auto_backend"):
        (arch, picks), = b["auto_backend"].items()
        sh = b.get("cuda_gemm_of_dense") or []
        lines.append(f"auto backend measured for {arch}: " + ", ".join(f"{k}={v}" for k, v in picks.items()
                                                                    if k != "source")
                     + f" (written to {OUT_FILES['auto']}) | cuda grouped GEMM / cuBLAS dense at >= 512 rows per "
                     + "expert: " + (f"{min(sh):.0%}..{max(sh):.0%} over {len(sh)} points" if sh else "no point"))
    p = info.get("profile")
    if p:
        shape = " ".join(f"{k}={v}" for k, v in p["shape"].items())
        lines.append(f"profile: moe_forward {shape}: {p['kernels']} GPU kernels, {p['events']} events; "
                     f"moe_ops ranges: {', '.join(p['moe_ops_ranges']) or 'none'}")
        lines.append("  top: " + "; ".join(p["top"][:3]))
    for w in info["warnings"][:4]:
        lines.append(f"warning: {w[:160]}")
    for f in fails[:6]:
        lines.append(f"FAIL: {f[:160]}")
    if len(fails) > 6:
        lines.append(f"... {len(fails) - 6} more failures in {OUT_FILES['info']}")
    lines.append(f"files in {out}: " + ", ".join(n for n in OUT_FILES.values() if os.path.exists(os.path.join(out, n))
                                                  or n in (OUT_FILES["summary"], OUT_FILES["info"])))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=envs.raw("OUT") or os.path.join(ROOT, "gpu-check-out"),
                   help="folder for the files (default: $OUT, else gpu-check-out/)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: the GPU when torch sees one, else the CPU rehearsal")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole run (default {BUDGET_S['cuda']} on a GPU, {BUDGET_S['cpu']} on CPU)")
    p.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST to build for (default: the GPU present's)")
    p.add_argument("--shards", type=int, help="parallel pytest processes (default: cores/4 up to 4 on a GPU, 2 on CPU)")
    p.add_argument("--sample", type=int, help="tests not marked gpu to run (default: "
                   f"{TEST_SAMPLE['cuda']} on a GPU, {TEST_SAMPLE['cpu']} on CPU)")
    p.add_argument("--no-build", action="store_true", help="use the extension already built in place")
    return p.parse_args(argv)


if __name__ == "__main__":
    _args = parse_args()
    if _args.budget is not None and _args.budget < sum(s[2] for s in STEPS.values()):
        sys.exit(f"--budget {_args.budget:g}: the steps need at least {sum(s[2] for s in STEPS.values())} s")
    sys.exit(Check(_args).main())
