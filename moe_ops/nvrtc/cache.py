"""The on-disk cache of compiled units: one file per (unit, arch, inputs), written atomically.

Key: sha256 over a format tag, the unit's program text, every named header (the include closure
of csrc/kernels and the shims, name and bytes), the name expressions, the NVRTC options (arch,
include folder), the NVRTC version and the contents of the CUDA headers the kernels include. The
file stores its own key and the cubin's sha256: a file that is truncated, corrupted or stored
under another key is not used -- the unit is recompiled and the file replaced.

Folder: ``MOE_OPS_CACHE_DIR`` (then ``<it>/nvrtc``), default ``~/.cache/moe_ops/nvrtc``.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
from typing import Dict, Optional, Tuple

from .. import envs
from . import compile as nvcompile

FORMAT = "moe_ops-nvrtc-1"
_MAGIC = b"MOENVRTC"

_lock = threading.Lock()
_memo: Dict[str, nvcompile.Unit] = {}   # key -> unit, for this process
compile_count = 0                       # compiles this process ran (tests count them)


def cache_dir() -> str:
    root = envs.raw("MOE_OPS_CACHE_DIR")
    if root is None:
        return os.path.join(os.path.expanduser("~"), ".cache", "moe_ops", "nvrtc")
    return os.path.join(root, "nvrtc")


def key(inputs: nvcompile.UnitInputs, nvrtc_version: Tuple[int, int]) -> str:
    h = hashlib.sha256()

    def put(*parts):
        for p in parts:
            b = p if isinstance(p, bytes) else str(p).encode()
            h.update(struct.pack("<Q", len(b)) + b)  # length-prefixed: no two inputs hash alike

    put(FORMAT, inputs.header, inputs.arch, inputs.source)
    for name in sorted(inputs.headers):
        put(name, inputs.headers[name])
    put(len(inputs.names), *inputs.names)
    put(len(inputs.options), *inputs.options)
    put("nvrtc", *nvrtc_version, "toolkit", inputs.toolkit_digest)
    return h.hexdigest()


def _path(k: str, inputs: nvcompile.UnitInputs, folder: str) -> str:
    stem = inputs.header.rsplit(".", 1)[0]
    return os.path.join(folder, f"{stem}.sm_{inputs.arch}.{k[:32]}.cubin")


def _encode(k: str, unit: nvcompile.Unit) -> bytes:
    meta = {"key": k, "header": unit.header, "arch": unit.arch, "lowered": unit.lowered, "log": unit.log,
            "cubin_sha256": hashlib.sha256(unit.cubin).hexdigest(), "cubin_bytes": len(unit.cubin)}
    m = json.dumps(meta, sort_keys=True).encode()
    return _MAGIC + struct.pack("<Q", len(m)) + m + unit.cubin


def _decode(k: str, blob: bytes) -> Optional[nvcompile.Unit]:
    """The unit stored in ``blob`` if it is whole and was stored under key ``k``; else None."""
    try:
        if blob[:8] != _MAGIC:
            return None
        (n,) = struct.unpack("<Q", blob[8:16])
        meta = json.loads(blob[16:16 + n].decode())
        cubin = blob[16 + n:]
        if (meta.get("key") != k or len(cubin) != meta.get("cubin_bytes")
                or hashlib.sha256(cubin).hexdigest() != meta.get("cubin_sha256")):
            return None
        return nvcompile.Unit(meta["header"], meta["arch"], cubin, dict(meta["lowered"]), meta.get("log", ""),
                              nvcompile.parse_ptxas(meta.get("log", "")))
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError):
        return None


def _write_atomic(path: str, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: a reader sees the old file or the
    whole new one, never a partial write (two processes compiling at once both succeed)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def get_unit(header: str, arch, *, folder: Optional[str] = None, kdir: Optional[str] = None,
             use_memo: bool = True) -> nvcompile.Unit:
    """The compiled unit of ``header`` for ``arch``: from this process, else the disk cache, else
    NVRTC (then stored). A cache folder that cannot be written only costs the recompile next time."""
    global compile_count
    inputs = nvcompile.unit_inputs(header, arch, kdir=kdir)
    k = key(inputs, nvcompile.nvrtc_version())
    with _lock:
        if use_memo and k in _memo:
            return _memo[k]
        folder = folder or cache_dir()
        path = _path(k, inputs, folder)
        unit = None
        try:
            with open(path, "rb") as f:
                unit = _decode(k, f.read())
        except OSError:
            pass
        if unit is None:
            unit = nvcompile.compile_unit(inputs)
            compile_count += 1
            try:
                _write_atomic(path, _encode(k, unit))
            except OSError:
                pass
        _memo[k] = unit
        return unit


def clear_memo() -> None:
    with _lock:
        _memo.clear()
