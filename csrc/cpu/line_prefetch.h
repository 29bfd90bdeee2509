// Software prefetch of PrefetchRanges (avx512_bf16_isa.h) spread over a kernel's loop: the
// AVX512-BF16 kernels (gemm_vnni_avx512.cpp, pack_vnni_avx512.cpp) ask for the next call's
// weights a few lines per step, so they arrive in L2 while this call computes. Include after
// avx512_intrinsics.h, inside the build's namespace (anonymous: one copy per instruction set).
#pragma once

namespace {

struct LineStream {
  const char* cur[2] = {nullptr, nullptr};
  const char* end[2] = {nullptr, nullptr};
  int64_t per_step = 0;

  // The lines of r, `steps` steps to hand them out in (nullptr r or steps <= 0: none).
  LineStream(const PrefetchRanges* r, int64_t steps) {
    if (!r || steps <= 0) return;
    int64_t lines = 0;
    for (int i = 0; i < 2; ++i) {
      cur[i] = static_cast<const char*>(r->p[i]);
      end[i] = cur[i] + (r->p[i] ? r->bytes[i] : 0);
      lines += (r->p[i] ? r->bytes[i] : 0) / 64;
    }
    per_step = (lines + steps - 1) / steps;
  }
  bool active() const { return per_step > 0; }
  void step() {
    for (int64_t l = 0; l < per_step; ++l) {
      const int r = cur[0] < end[0] ? 0 : 1;
      if (cur[r] >= end[r]) return;
      _mm_prefetch(cur[r], _MM_HINT_T1);  // into L2: a block (64-128 KiB) exceeds L1
      cur[r] += 64;
    }
  }
};

}  // namespace
