// A small, bounded, thread-safe cache of large host buffers for the CPU ops' outputs.
//
// Why: glibc serves allocations above its mmap threshold (<= 32 MiB, dynamic) with a fresh mmap
// and returns them with munmap, so every call of an op with a large output (permute's x_sorted
// at prefill sizes) pays one page fault per 4 KiB page, which costs more than the copy itself
// (measured: docs/cpu.md, "Design notes and measured history"). In an MoE forward, layer i's permute output is freed
// before layer i+1's permute runs, so at steady state the same sizes are requested again and again: like PyTorch's CUDA
// caching allocator on GPU, we keep freed blocks and hand them out again, so the pages stay mapped (and populated).
// Fresh blocks are 2 MiB aligned and madvise(MADV_HUGEPAGE)d, so even the first touch costs one fault per 2 MiB where
// transparent huge pages are available.
//
// Policy: requests >= min_bytes (default 1 MiB) go through the cache, rounded up to 2 MiB (64
// bytes below 1 MiB). A request takes the smallest free block whose size is in [size, size*5/4].
// A freed block is kept while the cached (free) bytes stay <= cap, evicting the least recently
// freed blocks to make room; a block larger than the cap is simply freed. The cap is
// MOE_OPS_CPU_CACHE_MB (default 512; 0 disables caching: every block is freed on release).
//
// The tensors are ordinary CPU tensors: their storage's allocator is the caching allocator, so
// views, autograd, clone(), pickling and resize_() all work (a resize beyond the capacity
// allocates a new block through the same allocator and returns the old one to the cache).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace moe_cpu {

// at::empty(sizes, options) for a CPU tensor, served from the cache when large enough.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace moe_cpu
