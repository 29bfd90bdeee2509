"""Builds moe_ops by driving CMake (CMakeLists.txt is the single build definition).

    pip install --no-build-isolation -e .          # editable, uses the torch already installed
    python setup.py build_ext --inplace            # in-place build (what `make build` runs)

Environment:
    MOE_OPS_CUDA=auto|0|1    compile the CUDA kernels (auto: when nvcc and a CUDA build of torch exist)
    TORCH_CUDA_ARCH_LIST     e.g. "8.0;9.0a" (default) — "+PTX" on an entry also embeds its PTX
    CUDA_HOME / CUDA_PATH    the CUDA toolkit root; else found from the nvcc on PATH (see find_cuda_home)
    MOE_OPS_SIM=0|1          also build the SIMT emulator library _C_sim (default 1: tests use it)
    MAX_JOBS                 parallel compile jobs (default: CPU count)
    MOE_OPS_BUILD_DIR        CMake build folder (default build/)
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_settings():
    """moe_ops/envs.py (the table of every environment variable), loaded by path: the package
    cannot be imported before it is built."""
    spec = importlib.util.spec_from_file_location("moe_ops_envs", ROOT / "moe_ops" / "envs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


envs = _load_settings()
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "moe_ops" / "__init__.py").read_text()).group(1)


def find_cuda_home():
    """The real CUDA toolkit root, or None.

    The nvcc on PATH may be a wrapper script that execs the real compiler elsewhere, so a root
    derived from `which nvcc` can be wrong (no libcudart next to it). Ask nvcc itself: its
    --dryrun output names its TOP folder.
    """
    def ok(root):
        return root and (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "include" / "cuda_runtime.h").exists()

    for root in (envs.raw("CUDA_HOME"), envs.raw("CUDA_PATH")):
        if ok(root):
            return str(Path(root).resolve())
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                m = re.match(r"#\$ TOP=(.*)$", line.strip())
                if m and ok(Path(m.group(1)).resolve()):
                    return str(Path(m.group(1)).resolve())
        except (OSError, subprocess.SubprocessError):
            pass
        parent = Path(nvcc).resolve().parent.parent
        if ok(parent):
            return str(parent)
    for guess in ("/usr/local/cuda",):
        if ok(guess):
            return str(Path(guess).resolve())
    return None


def pip_cuda_include_dirs():
    """Headers that torch's CUDA headers need (cublas_v2.h, cusparse.h, ...) ship in the pip
    `nvidia` packages, not necessarily in the toolkit."""
    dirs = []
    try:
        import nvidia  # namespace package from nvidia-* wheels
        for base in nvidia.__path__:
            for sub in sorted(Path(base).glob("*/include")):
                dirs.append(str(sub))
    except ImportError:
        pass
    return dirs


def arch_list():
    archs = envs.get("TORCH_CUDA_ARCH_LIST")
    out = []
    for a in re.split(r"[;\s,]+", archs.strip()):
        if not a:
            continue
        ptx = a.endswith("+PTX")
        num = a.replace("+PTX", "").replace(".", "")
        out.append(num if ptx else f"{num}-real")
    return out


class CMakeExtension(Extension):
    def __init__(self, name, optional=False):
        super().__init__(name, sources=[], optional=optional)


class CMakeBuild(build_ext):
    """One CMake configure+build produces every library; setuptools then copies each
    extension's file into the package (in-place and editable builds) as usual."""

    def build_extension(self, ext):
        if ext.name != "moe_ops._C":
            return  # built by the same CMake run as moe_ops._C
        import torch
        import torch.utils.cpp_extension as cpp

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(envs.raw("MOE_OPS_BUILD_DIR") or ROOT / "build").resolve()
        build_dir.mkdir(parents=True, exist_ok=True)

        want = envs.get("MOE_OPS_CUDA").lower()
        cuda_home = find_cuda_home() if want != "0" else None
        use_cuda = want != "0" and cuda_home is not None and torch.version.cuda is not None
        if want == "1" and not use_cuda:
            raise RuntimeError(f"MOE_OPS_CUDA=1 but no CUDA toolkit (found {cuda_home!r}) or torch "
                               f"{torch.__version__} is not a CUDA build")

        archs = arch_list() if use_cuda else []
        cmake = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake") or "cmake"
        ninja = shutil.which("ninja", path=str(Path(sys.executable).parent)) or shutil.which("ninja")
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DMOE_OPS_OUTPUT_DIR={out_dir}",
            # both, every time: a cached sim output dir from an earlier (pip, temporary) build
            # would leave a stale _C_sim next to a fresh _C
            f"-DMOE_OPS_SIM_OUTPUT_DIR={out_dir}",
            f"-DMOE_OPS_VERSION={VERSION}",
            f"-DMOE_OPS_TORCH_VERSION={torch.__version__}",
            f"-DMOE_OPS_TORCH_INCLUDE_DIRS={';'.join(cpp.include_paths())}",
            f"-DMOE_OPS_TORCH_LIBRARY_DIR={cpp.library_paths()[0]}",
            f"-DMOE_OPS_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DMOE_OPS_CUDA={'ON' if use_cuda else 'OFF'}",
            f"-DMOE_OPS_SIM={'OFF' if envs.get('MOE_OPS_SIM') == '0' else 'ON'}",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if use_cuda:
            args += [
                f"-DMOE_OPS_CUDA_HOME={cuda_home}",
                f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc",
                f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}",
                f"-DMOE_OPS_CUDA_EXTRA_INCLUDES={';'.join(pip_cuda_include_dirs())}",
                f"-DMOE_OPS_CUDA_VERSION={torch.version.cuda}",
            ]
        elif cuda_home:
            args.append(f"-DMOE_OPS_CUDA_HOME={cuda_home}")  # the emulator takes cuda_fp16.h from it
        print("moe_ops: cmake", " ".join(args[1:]), flush=True)
        subprocess.check_call(args)
        jobs = envs.raw("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", jobs])


class BuildPyWithKernels(build_py):
    """Installs a copy of the CUDA kernel headers (csrc/kernels/*.cuh) as moe_ops/nvrtc/kernels/,
    where the NVRTC path (moe_ops/nvrtc/sources.py) finds them in a non-editable install; a
    source checkout (editable install) reads csrc/kernels directly."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "moe_ops" / "nvrtc" / "kernels"
        dst.mkdir(parents=True, exist_ok=True)
        for header in sorted((ROOT / "csrc" / "kernels").glob("*.cuh")):
            shutil.copy2(header, dst / header.name)


setup(
    name="moe-ops",
    version=VERSION,
    description="Fast Mixture-of-Experts kernels (CUDA, Triton, CPU) for PyTorch",
    # triton_kernels/ installs inside the package so it never clashes with another project's
    # top-level `triton_kernels` (OpenAI's, for one).
    packages=find_packages(include=["moe_ops", "moe_ops.*"])
    + (["moe_ops.triton_kernels"] if (ROOT / "triton_kernels" / "__init__.py").exists() else []),
    package_dir={"moe_ops.triton_kernels": "triton_kernels"},
    package_data={"moe_ops": ["auto_backend.json"], "moe_ops.triton_kernels": ["configs/*.json"]},
    ext_modules=[CMakeExtension("moe_ops._C")]
    + ([CMakeExtension("moe_ops._C_sim", optional=True)] if envs.get("MOE_OPS_SIM") != "0" else []),
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithKernels},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={"test": ["pytest", "pytest-timeout", "transformers>=5"], "bench": ["matplotlib", "pytest-benchmark"]},
)
