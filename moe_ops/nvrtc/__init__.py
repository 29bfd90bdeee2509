"""CUDA kernels without nvcc: the kernel sources of csrc/kernels compiled at first use by NVRTC.

When the extension was built without CUDA kernels (no nvcc at install time) but a GPU and CuPy
are present, the same ``csrc/kernels/*.cuh`` sources are compiled by NVRTC (through CuPy's
low-level bindings ``cupy_backends.cuda.libs.nvrtc``), cached on disk, loaded with the CUDA
driver and registered as the CUDA implementations of the ``moe_ops`` ops -- so they are the
``cuda`` backend, with the fakes and autograd formulas every ``moe_ops`` op has.

One role per file:

* :mod:`.sources`  -- the translation units: a kernel header, its project includes (resolved
  here, passed to NVRTC as named headers) and shims for the few system headers the kernels name
* :mod:`.manifest` -- every ``__global__`` instantiation the launchers launch, grouped by header,
  with its parameter types
* :mod:`.abi`      -- ctypes mirrors of the by-value kernel parameter structs (proven by NVRTC)
* :mod:`.compile`  -- NVRTC options, compilation to a cubin, the ptxas resource report
* :mod:`.cache`    -- the on-disk cubin cache (key: sources, options, arch, NVRTC version)
* :mod:`.driver`   -- loading cubins and launching on torch's current stream (GPU only)
* :mod:`.launchers` -- the host side of csrc/cuda/*.cu in Python (grid, block, smem, workspace)
* :mod:`.ops`      -- the torch binding of csrc/cuda/ops_binding.h in Python (checks, outputs)
* :mod:`.select`   -- where the CUDA kernels come from (nvcc / nvrtc / none) and the registration

CuPy is optional: nothing here imports it at package import time (docs/cuda.md, "CUDA without nvcc").
"""
