// The VNNI packing (avx512_bf16.h pack_panels_vnni) in AVX-512 intrinsics, compiled once per
// instruction set (avx512_bf16_isa.h). Used by pack_experts and, per tile, by fused_experts on
// bf16 weights as stored (a block repacked into a cache-resident buffer just before its GEMM).
//
// Dataflow: a panel is 16 weight rows (columns of the GEMM) of K bf16, i.e. of ceil(K/2) 32-bit
// (k even, k odd) pairs; the packed panel is that 16 x ceil(K/2) matrix of pairs transposed. Per
// 16 pairs: 16 row loads (masked at the K tail; rows past N read as zero) -> a 16 x 16 transpose
// of 32-bit lanes (unpack 32, unpack 64, two 128-bit lane shuffles: 64 shuffles) -> 16 row
// stores. The bits are moved, never converted: the result equals the scalar packing's.

#include <cstring>

#include "avx512_bf16_isa.h"
#include "avx512_intrinsics.h"
#include "quant_codes_avx512.h"

#ifndef MOE_CPU_AVX512_NS
#error "compiled by cpu.cmake once per instruction set, with -DMOE_CPU_AVX512_NS=avx512_native|avx512_emu"
#endif

namespace moe_cpu::MOE_CPU_AVX512_NS {

namespace {

constexpr int64_t kRows = 16;  // rows of a panel (avx512_bf16.h kPanel)

// r[c] (lane q = pair q of row c) -> r[q] (lane c = pair q of row c).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {  // lane L of 128: rows i, i+1 of pairs 4L, 4L+1 | 4L+2, 4L+3
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  __m512i v[4][4];  // v[g][q], lane L: pair 4L+q of rows 4g..4g+3
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    v[g][0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    v[g][1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    v[g][2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    v[g][3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {  // 4 x 4 transpose of 128-bit lanes
    const __m512i x0 = _mm512_shuffle_i32x4(v[0][q], v[1][q], 0x44), x1 = _mm512_shuffle_i32x4(v[0][q], v[1][q], 0xEE);
    const __m512i y0 = _mm512_shuffle_i32x4(v[2][q], v[3][q], 0x44), y1 = _mm512_shuffle_i32x4(v[2][q], v[3][q], 0xEE);
    r[q] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    r[4 + q] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
    r[8 + q] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    r[12 + q] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
  }
}

// The packing loop: panel p = rows [16p, 16p + 16) (past N: zero), per 16 pairs one
// `load(row, k0, left)` of each row's 32 values from element k0 (`left` of them remain; the rest
// of the vector must be zero), a transpose, 16 row stores.
template <class RowLoad>
void pack_panels(int64_t N, int64_t K, uint16_t* dst, int64_t pstride, int64_t prow, RowLoad load) {
  const int64_t K2 = (K + 1) / 2;
  for (int64_t p = 0; p * kRows < N; ++p) {
    const int64_t rows = N - p * kRows < kRows ? N - p * kRows : kRows;
    uint16_t* d = dst + p * pstride;
    for (int64_t q0 = 0; q0 < K2; q0 += 16) {
      __m512i r[16];
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) r[c] = c < rows ? load(p * kRows + c, 2 * q0, K - 2 * q0) : _mm512_setzero_si512();
      transpose16(r);
      const int64_t nq = K2 - q0 < 16 ? K2 - q0 : 16;
      for (int64_t q = 0; q < nq; ++q) _mm512_storeu_si512(d + (q0 + q) * prow, r[q]);
    }
  }
}

}  // namespace

void pack_panels_vnni(const uint16_t* src, int64_t N, int64_t K, int64_t ld, uint16_t* dst, int64_t pstride,
                      int64_t prow) {
  pack_panels(N, K, dst, pstride, prow, [&](int64_t row, int64_t k0, int64_t left) {
    const __mmask32 m = left >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1ull << left) - 1ull);
    return _mm512_maskz_loadu_epi16(m, src + row * ld + k0);
  });
}

// pack_panels_vnni of quantized rows: each row load is 32 int8/e4m3 codes turned into their exact
// bf16 bits in registers (codes_to_bf16), so a quantized block is read once and never stored as
// bf16 rows.
void pack_panels_vnni_q(const uint8_t* src, int fmt, int64_t N, int64_t K, int64_t ld, uint16_t* dst, int64_t pstride,
                        int64_t prow) {
  pack_panels(N, K, dst, pstride, prow,
              [&](int64_t row, int64_t k0, int64_t left) { return codes_to_bf16(src + row * ld + k0, left, fmt); });
}

// pack_panels_vnni of mxfp4 rows (blocks [N, K/32, 16], e8m0 scales [N, K/32], K a multiple of 32):
// each row load is one 32-element block, dequantized through its scale's row of `table`.
void pack_panels_vnni_mx(const uint8_t* blocks, const uint8_t* scales, const uint16_t* table, int64_t N, int64_t K,
                         uint16_t* dst, int64_t pstride, int64_t prow) {
  pack_panels(N, K, dst, pstride, prow, [&](int64_t row, int64_t k0, int64_t) {
    return mxfp4_block_to_bf16(blocks + row * (K / 2) + k0 / 2, table + 16 * scales[row * (K / 32) + k0 / 32]);
  });
}

}  // namespace moe_cpu::MOE_CPU_AVX512_NS
