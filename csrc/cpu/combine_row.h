// The k-way row combine kernel, torch-free, under unpermute, capacity_combine and the fused
// experts path (token_combine.h): out[h] = round_odt(sum_j w[j] * src_j[h]).
//
// Register-resident: for each 64-column chunk of the output row the float32 accumulators start at
// +0.0, take `acc = acc + w[j] * y_j[h]` for j = 0..n-1 in order (multiply, then add -- never an
// FMA: the reference's rounding), and are rounded to the output dtype once. Each source row is
// read once and the output written once, so there is no float32 scratch row in memory. The
// partial last chunk (H % 8) goes through zero-filled 8-lane scratch so it rounds exactly like the
// body. AVX512-BF16 (bf16 -> bf16), AVX2+F16C or portable scalar code, chosen at run time
// (cpu_features.h); all give the same bits (and those of the reference).
#pragma once

#include <cstdint>

#include "dtype.h"

namespace moe_cpu {

// out[0..H) (dtype odt) = sum_{j<n} w[j] * src[j][0..H) (dtype sdt); w == nullptr means w = 1
// (a plain sum, no multiply). n == 0 writes +0.0. Sources may alias each other, not `out`.
// next[0..n_next): the next token's source rows (same dtype and H), prefetched while this row is
// combined (a hint only; may be empty).
void combine_row(const void* const* src, const float* w, int n, DType sdt, void* out, DType odt, int64_t H,
                 const void* const* next = nullptr, int n_next = 0);

}  // namespace moe_cpu
