"""The settings table (moe_ops/envs.py) is the whole list of environment variables moe-ops reads,
and the README shows it as it is."""
import os
import re

from moe_ops import envs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a read: getenv("X"), os.environ.get("X") / ["X"], envs.get/raw/flag("X")
_READ = re.compile(r"""(?:getenv|environ\.get|envs\.get|envs\.raw|envs\.flag)\(\s*["']([A-Z][A-Z0-9_]+)["']"""
                   r"""|environ\[\s*["']([A-Z][A-Z0-9_]+)["']""")
# a C++ read through csrc/env.h: env::get("CPU_CACHE_MB") / env::flag(...) reads MOE_OPS_CPU_CACHE_MB
_CPP_READ = re.compile(r'env::(?:get|flag)\(\s*"([A-Z][A-Z0-9_]+)"')


def _sources():
    for folder in ("moe_ops", "triton_kernels", "csrc", "tests", "bench", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith((".py", ".cpp", ".h", ".cu", ".cuh", ".sh")):
                    yield os.path.join(dirpath, f)


def test_every_variable_read_is_in_the_table():
    read = {}
    for path in _sources():
        text = open(path, errors="replace").read()
        for groups in _READ.findall(text):
            name = groups[0] or groups[1]
            if name.startswith(("MOE_", "TRITON_INTERPRET")):
                read.setdefault(name, os.path.relpath(path, ROOT))
        for name in _CPP_READ.findall(text):
            read.setdefault("MOE_OPS_" + name, os.path.relpath(path, ROOT))
    assert {"MOE_OPS_CPU_CACHE_MB", "MOE_OPS_SIM_DEADLOCK_SECONDS", "MOE_OPS_VALUE_CHECKS"} <= set(read)  # the scan works
    missing = {n: p for n, p in read.items() if n not in envs.SETTINGS}
    assert not missing, f"environment variables read but not in moe_ops/envs.py: {missing}"


def test_python_package_reads_only_through_the_table():
    for folder in ("moe_ops", "triton_kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                path = os.path.join(dirpath, f)
                if f.endswith(".py") and not path.endswith(os.path.join("moe_ops", "envs.py")):
                    text = open(path).read()
                    assert "os.environ" not in text and "getenv" not in text, path


# What is not a read: handing this environment to a child (dict(os.environ, ...), .items()), or
# setting a variable for a child (os.environ["X"] = ..., setdefault).
_NOT_A_READ = re.compile(r"dict\(os\.environ|os\.environ\.items\(\)|os\.environ\[[^\]]+\]\s*=(?!=)|"
                         r"os\.environ\.setdefault|os\.environ\.pop")


def test_every_read_goes_through_the_table_or_env_h():
    """No variable is read past the registry: Python reads use moe_ops.envs (setup.py and the GPU
    check load it by path), C++ reads use csrc/env.h."""
    offenders = []
    for path in _sources():
        rel = os.path.relpath(path, ROOT)
        if rel in (os.path.join("moe_ops", "envs.py"), os.path.join("csrc", "env.h"), os.path.join("tests", "test_envs.py")):
            continue
        for n, line in enumerate(open(path, errors="replace"), 1):
            code = _NOT_A_READ.sub("", line)
            if re.search(r"os\.environ|getenv\(|os\.getenv", code):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    setup = open(os.path.join(ROOT, "setup.py")).read()
    offenders += [f"setup.py: {m}" for m in re.findall(r"os\.environ[^\n]*", _NOT_A_READ.sub("", setup))]
    assert not offenders, "environment read past moe_ops/envs.py / csrc/env.h:\n" + "\n".join(offenders)


def test_readme_lists_the_table():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert envs.markdown_table() in readme, "README's settings table is out of date: paste envs.markdown_table()"


def test_get_default_and_empty(monkeypatch):
    monkeypatch.delenv("MOE_OPS_VALUE_CHECKS", raising=False)
    assert envs.get("MOE_OPS_VALUE_CHECKS") == "auto"
    monkeypatch.setenv("MOE_OPS_VALUE_CHECKS", "")
    assert envs.get("MOE_OPS_VALUE_CHECKS") == "auto"
    monkeypatch.setenv("MOE_OPS_VALUE_CHECKS", "0")
    assert envs.get("MOE_OPS_VALUE_CHECKS") == "0"
