"""The NVRTC cubin cache (moe_ops/nvrtc/cache.py): a hit does not compile, every input byte is in
the key, a damaged or foreign file is recompiled, never used. Compiles expert_rank.cuh (~0.2 s)."""
import glob
import os
import shutil

import pytest

from moe_ops.nvrtc import cache, compile as nvcompile
from tests.nvrtc_support import KERNEL_DIR, require_nvrtc

UNIT = "expert_rank.cuh"


@pytest.fixture
def kdir(tmp_path):
    d = tmp_path / "kernels"
    shutil.copytree(KERNEL_DIR, d)
    return str(d)


def _get(folder, kdir):
    return cache.get_unit(UNIT, "80", folder=str(folder), kdir=kdir, use_memo=False)


def _files(folder):
    return sorted(glob.glob(os.path.join(str(folder), "*.cubin")))


def test_a_hit_does_not_compile(tmp_path, kdir):
    require_nvrtc()
    n0 = cache.compile_count
    first = _get(tmp_path / "c", kdir)
    assert cache.compile_count == n0 + 1 and len(_files(tmp_path / "c")) == 1
    again = _get(tmp_path / "c", kdir)
    assert cache.compile_count == n0 + 1
    assert again.cubin == first.cubin and again.lowered == first.lowered
    assert again.resources == first.resources  # the ptxas report is kept with the cubin
    # the process memo answers without reading the disk at all
    cache.get_unit(UNIT, "80", folder=str(tmp_path / "c"), kdir=kdir)
    shutil.rmtree(tmp_path / "c")
    cache.get_unit(UNIT, "80", folder=str(tmp_path / "c"), kdir=kdir)
    assert cache.compile_count == n0 + 1


def test_an_included_header_byte_changes_the_key(tmp_path, kdir):
    require_nvrtc()
    version = nvcompile.nvrtc_version()
    before = cache.key(nvcompile.unit_inputs(UNIT, "80", kdir=kdir), version)
    path = os.path.join(kdir, "device_math.cuh")  # included by expert_rank.cuh, not the unit's own file
    text = open(path).read()
    open(path, "w").write(text.replace("kWarp = 32", "kWarp = 32 "))
    after = cache.key(nvcompile.unit_inputs(UNIT, "80", kdir=kdir), version)
    assert before != after
    assert cache.key(nvcompile.unit_inputs(UNIT, "90a", kdir=kdir), version) != after
    assert cache.key(nvcompile.unit_inputs(UNIT, "80", kdir=kdir), (version[0], version[1] + 1)) != after
    n0 = cache.compile_count
    _get(tmp_path / "c", kdir)
    open(path, "w").write(text)
    _get(tmp_path / "c", kdir)
    assert cache.compile_count == n0 + 2 and len(_files(tmp_path / "c")) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_cubin_byte", "garbage"])
def test_a_damaged_file_is_recompiled(tmp_path, kdir, damage):
    require_nvrtc()
    good = _get(tmp_path / "c", kdir)
    (path,) = _files(tmp_path / "c")
    blob = open(path, "rb").read()
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip_cubin_byte":
        blob = blob[:-100] + bytes([blob[-100] ^ 1]) + blob[-99:]
    else:
        blob = b"not a cache file"
    open(path, "wb").write(blob)
    n0 = cache.compile_count
    again = _get(tmp_path / "c", kdir)
    # (a recompile is not byte-identical: NVRTC salts internal-linkage symbols per compile)
    assert cache.compile_count == n0 + 1 and again.lowered == good.lowered and len(again.cubin) == len(good.cubin)
    assert open(path, "rb").read() != blob  # replaced by a whole file
    _get(tmp_path / "c", kdir)
    assert cache.compile_count == n0 + 1


def test_a_file_stored_under_another_key_is_not_used(tmp_path, kdir):
    require_nvrtc()
    _get(tmp_path / "c", kdir)
    (path,) = _files(tmp_path / "c")
    other = cache.get_unit("row_gather.cuh", "80", folder=str(tmp_path / "d"), kdir=kdir, use_memo=False)
    (other_path,) = _files(tmp_path / "d")
    shutil.copy(other_path, path)  # a whole, valid file -- of another unit
    n0 = cache.compile_count
    unit = _get(tmp_path / "c", kdir)
    assert cache.compile_count == n0 + 1 and unit.cubin != other.cubin and unit.header == UNIT


def test_no_temporary_files_are_left(tmp_path, kdir):
    require_nvrtc()
    _get(tmp_path / "c", kdir)
    assert [f for f in os.listdir(tmp_path / "c") if f.startswith(".tmp-")] == []


def test_an_unwritable_folder_still_compiles(tmp_path, kdir):
    require_nvrtc()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    unit = cache.get_unit(UNIT, "80", folder=str(blocker / "sub"), kdir=kdir, use_memo=False)
    assert unit.cubin[:4] == b"\x7fELF"


def test_cache_dir_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_OPS_CACHE_DIR", str(tmp_path))
    assert cache.cache_dir() == os.path.join(str(tmp_path), "nvrtc")
    monkeypatch.delenv("MOE_OPS_CACHE_DIR")
    assert cache.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "moe_ops", "nvrtc")
