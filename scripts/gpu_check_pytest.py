"""pytest plugin of scripts/gpu_check.py (``-p gpu_check_pytest``, scripts/ on PYTHONPATH).

It picks the tests, keeps to the time budget and records every outcome as it happens, so that
a run cut short (budget spent, or the process killed) still says what passed, what failed and
what did not run. Settings come from the environment (the driver sets them):

    GPU_CHECK_RESULTS   file this process appends JSON lines to: one ``{"selected": [...]}``,
                        then ``{"id", "start"}`` before and ``{"id", "outcome", "s", "why"}``
                        after each test
    GPU_CHECK_SAMPLE    how many tests *not* marked ``gpu`` (tests/conftest.py) to keep, spread
                        over the test files; every ``gpu`` test is kept
    GPU_CHECK_SHARD     ``i/n``: keep every n-th selected test from the i-th (parallel runs)
    GPU_CHECK_DEADLINE  a ``time.time()`` after which no further test starts (it is "not run")
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict

import pytest

# Left out of the sample: long runs, and the builds the sanitizer tests make.
SAMPLE_EXCLUDE_MARKS = ("slow", "sanitizer")


def _round_robin(items, key):
    """Items interleaved across ``key`` groups (order kept inside a group), so that a run cut
    short has covered every group a little rather than the first groups fully."""
    groups = OrderedDict()
    for it in items:
        groups.setdefault(key(it), []).append(it)
    out, queues = [], [list(g) for g in groups.values()]
    while queues:
        queues = [q for q in queues if q]
        for q in queues:
            out.append(q.pop(0))
    return out


def spread_sample(items, n, key):
    """About ``n`` items (at least one per ``key`` group), shared out evenly over the groups,
    the larger groups taking what the smaller cannot; each group's share evenly spaced through
    it (deterministic: the same collection gives the same sample)."""
    if n <= 0 or not items:
        return []
    groups = OrderedDict()
    for it in items:
        groups.setdefault(key(it), []).append(it)
    quota = {k: 1 for k in groups}
    left = n - len(groups)
    while left > 0:
        open_ = [k for k, g in groups.items() if quota[k] < len(g)]
        if not open_:
            break
        for k in sorted(open_, key=lambda k: quota[k] / len(groups[k]))[:left]:
            quota[k] += 1
            left -= 1
    out = []
    for k, g in groups.items():
        out += [g[(i * len(g)) // quota[k]] for i in range(quota[k])]
    return out


def select(items, sample: int, shard=(0, 1)):
    """(every ``gpu`` test, round-robin over test functions) + a spread sample of the rest,
    then this shard's share."""
    def module(it):
        return it.nodeid.split("::", 1)[0]

    def function(it):
        return (module(it), getattr(it, "originalname", None) or it.name)

    gpu = [it for it in items if it.get_closest_marker("gpu") is not None]
    rest = [it for it in items if it.get_closest_marker("gpu") is None
            and not any(it.get_closest_marker(m) is not None for m in SAMPLE_EXCLUDE_MARKS)]
    chosen = _round_robin(gpu, function) + _round_robin(spread_sample(rest, sample, module), module)
    i, n = shard
    return chosen[i::n]


class _Recorder:
    def __init__(self, path: str):
        self.path = path
        self.state = {}

    def write(self, **rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


_REC = None


def _envs():
    """The settings table; imported late so loading this plugin imports nothing of moe_ops."""
    from moe_ops import envs
    return envs


def pytest_configure(config):
    global _REC
    path = _envs().raw("GPU_CHECK_RESULTS")
    _REC = _Recorder(path) if path else None


@pytest.hookimpl(trylast=True)  # after tests/conftest.py has marked the gpu tests
def pytest_collection_modifyitems(session, config, items):
    if _REC is None:
        return
    i, n = (int(v) for v in _envs().get("GPU_CHECK_SHARD").split("/"))
    keep = select(items, int(_envs().get("GPU_CHECK_SAMPLE")), (i, n))
    kept = set(id(it) for it in keep)
    config.hook.pytest_deselected(items=[it for it in items if id(it) not in kept])
    items[:] = keep
    _REC.write(selected=[it.nodeid for it in keep], gpu=[it.nodeid for it in keep
                                                          if it.get_closest_marker("gpu") is not None])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    if _REC is None:
        return None
    deadline = float(_envs().get("GPU_CHECK_DEADLINE"))
    if time.time() > deadline:
        return True  # not started: the driver reports it as not run
    _REC.write(id=item.nodeid, start=time.time())
    return None


def pytest_runtest_logreport(report):
    if _REC is None:
        return
    st = _REC.state.setdefault(report.nodeid, {"outcome": "passed", "s": 0.0, "why": ""})
    st["s"] += report.duration
    if report.failed:
        if st["outcome"] != "failed":
            st["outcome"] = "failed" if report.when == "call" else "error"
            st["why"] = _why(report)
    elif report.skipped and st["outcome"] == "passed":
        st["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        st["why"] = _why(report)
    if report.when == "teardown":
        _REC.write(id=report.nodeid, **_REC.state.pop(report.nodeid))


def _why(report) -> str:
    """One line: a skip's reason, or a failure's first ``E`` line (the exception), else its last."""
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:  # skip: (file, line, reason)
        return str(lr[2])[:300]
    text = getattr(report, "longreprtext", "") or str(lr or "")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    first_e = next((ln[1:].strip() for ln in lines if ln.startswith("E ")), None)
    return (first_e or (lines[-1] if lines else ""))[:300]
