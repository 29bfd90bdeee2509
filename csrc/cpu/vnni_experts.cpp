// The bf16 VNNI expert stages (see vnni_experts.h).
//
// Dataflow: gather the routed rows as bf16 rows of H padded to pairs (A1) -> GEMM1 tiles =
// (expert, 16-column panel p of I, rows): the 32-column block (16 gate | 16 up columns,
// interleaved row by row) from the packing or repacked, one GEMM, the gated activation in the
// epilogue, written as bf16 into A2 -> GEMM2 tiles = (expert, 32-column blocks of H, rows) ->
// y rows (float32, rounded through bf16).
#include "vnni_experts.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "activations.h"
#include "env.h"
#include "avx512_bf16.h"
#include "gemm_panels.h"
#include "host_alloc.h"
#include "onednn_brgemm.h"
#include "quant_gemv.h"
#include "row_io.h"
#include "tile_schedule.h"

namespace moe_cpu {
namespace {

// One thread's repacked block (weights as stored). An expert with more rows than a tile's row
// chunk has several tiles on the same block, usually consecutive on one thread: they reuse it.
// The key includes this call's number, so a block is never reused across calls (the weights
// may have changed in between).
struct RepackedBlock {
  uint64_t call = 0;
  int64_t e = -1, b = -1;
  std::vector<uint16_t> data;
  bool holds(uint64_t c, int64_t ex, int64_t blk) const { return call == c && e == ex && b == blk; }
  void set(uint64_t c, int64_t ex, int64_t blk) { call = c, e = ex, b = blk; }
};
std::atomic<uint64_t> call_counter{0};

// A float that is a bf16 value (low 16 bits zero) as bf16 bits: exact by construction here.
inline uint16_t exact_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

// mxfp4: per e8m0 scale s, the 16 e2m1 values times 2^(s-127) as bf16 bits, built once, as
// std::ldexp gives them (= torch.ldexp: 2^128 overflows codes >= 1 to inf and keeps zeros, 2^-127
// stays a subnormal). All exact in bf16. (int8 and fp8: avx512_bf16.h pack_panels_vnni_q.)
struct DequantTables {
  uint16_t mx[256][16];
  DequantTables() {
    constexpr float kE2M1[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                 -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
    for (int b = 0; b < 256; ++b)
      for (int c = 0; c < 16; ++c) mx[b][c] = exact_bf16(std::ldexp(kE2M1[c], b - 127));
  }
};
const DequantTables& dequant_tables() {
  static const DequantTables t;
  return t;
}

// Rows [n0, n0 + cols) of expert e's quantized [N, K] weight, exactly as bf16, repacked into VNNI
// panels at dst (pack_panels_vnni's pstride; rows of 2 * kVnniBlock). int8 / fp8: converted in
// registers by the repack itself (pack_panels_vnni_q; mxfp4: pack_panels_vnni_mx, through the tables).
void repack_quant(const VnniQuant& q, bool gate_up, int64_t e, int64_t N, int64_t K, int64_t n0, int64_t cols,
                  uint16_t* dst, int64_t pstride) {
  const uint8_t* base = gate_up ? q.gate_up : q.down;
  if (q.fmt != QuantFmt::kMxfp4) {
    pack_panels_vnni_q(base + (e * N + n0) * K, q.fmt == QuantFmt::kFp8 ? 2 : 1, cols, K, K, dst, pstride,
                       2 * kVnniBlock);
    return;
  }
  const uint8_t* sc = static_cast<const uint8_t*>(gate_up ? q.gate_up_scale : q.down_scale);
  pack_panels_vnni_mx(base + (e * N + n0) * (K / 2), sc + (e * N + n0) * (K / 32), &dequant_tables().mx[0][0], cols, K,
                      dst, pstride, 2 * kVnniBlock);
}

// The scale of output column n (row n of the [N, K] weight) for k block kb (fp8) or all of K (int8).
inline const float& quant_scale(const VnniQuant& q, bool gate_up, int64_t e, int64_t N, int64_t K, int64_t n,
                                int64_t kb) {
  const float* s = static_cast<const float*>(gate_up ? q.gate_up_scale : q.down_scale);
  if (q.fmt == QuantFmt::kInt8) return s[e * N + n];
  const int64_t nbn = (N + q.bn - 1) / q.bn, nbk = (K + q.bk - 1) / q.bk;
  return s[(e * nbn + n / q.bn) * nbk + kb];
}

// One 32-column block's GEMM C[rows, 32] (ldc) = A[rows, 2*K2] x block, with the quantized
// format's non-power-of-two scales applied; col_n(j) = the weight row of column j (< 0: none).
template <class ColN>
void block_gemm(const VnniQuant& q, bool gate_up, int64_t e, int64_t N, int64_t K, ColN col_n, const uint16_t* a,
                int64_t lda, const uint16_t* wb, int64_t K2, float* c, int64_t ldc, int64_t rows,
                const PrefetchRanges* next) {
  constexpr int64_t prow = 2 * kVnniBlock;
  if (q.fmt != QuantFmt::kFp8) {
    gemm_panels_vnni(a, lda, wb, 2 * kPanel, prow, K2, 2, c, ldc, rows, next);
    if (q.fmt == QuantFmt::kInt8) {
      float sc[kVnniBlock];
      for (int64_t j = 0; j < kVnniBlock; ++j) {
        const int64_t n = col_n(j);
        sc[j] = n < 0 ? 1.0f : quant_scale(q, gate_up, e, N, K, n, 0);
      }
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < kVnniBlock; ++j) c[i * ldc + j] *= sc[j];
    }
    return;
  }
  // fp8: one GEMM per bk-deep k block, scaled per column and summed in k-block order. Each
  // column's row of k-block scales is found once: quant_scale's divisions for every (column, k
  // block) cost as much as a 16-row block's GEMM.
  thread_local std::vector<float> part;
  part.resize(static_cast<size_t>(rows * kVnniBlock));
  const int64_t kbp = q.bk / 2, nkb = (K2 + kbp - 1) / kbp;
  const float* srow[kVnniBlock];
  for (int64_t j = 0; j < kVnniBlock; ++j) {
    const int64_t n = col_n(j);
    srow[j] = n < 0 ? nullptr : &quant_scale(q, gate_up, e, N, K, n, 0);
  }
  // Each panel's columns in one n block (their scale rows are one): the kernel scales each k block's
  // sums itself (gemm_panels_vnni_ks, the same bits), with no GEMM call, store and reload per k block.
  const float* ks[2] = {nullptr, nullptr};
  bool uniform = true;
  for (int pn = 0; pn < 2; ++pn) {
    const float* first = nullptr;
    const float* last = nullptr;
    for (int64_t j = pn * kPanel; j < (pn + 1) * kPanel; ++j)
      if (srow[j]) {
        if (!first) first = srow[j];
        last = srow[j];
      }
    uniform = uniform && first == last;
    ks[pn] = first;
  }
  if (uniform && (ks[0] || ks[1])) {
    if (!ks[0]) ks[0] = ks[1];  // a panel without columns: zero weights, any scale
    if (!ks[1]) ks[1] = ks[0];
    gemm_panels_vnni_ks(a, lda, wb, 2 * kPanel, prow, K2, ks, kbp, c, ldc, rows, next);
    return;
  }
  for (int64_t i = 0; i < rows; ++i) std::memset(c + i * ldc, 0, kVnniBlock * sizeof(float));
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int64_t p0 = kb * kbp, np2 = std::min(kbp, K2 - p0);
    // Each k block's GEMM prefetches its share of the next block's bytes, so the prefetch is spread
    // over the whole block as in the unsplit GEMM (all of it in the last k block came in a burst).
    PrefetchRanges share;
    if (next)
      for (int r = 0; r < 2; ++r) {
        const int64_t b0 = next->bytes[r] * kb / nkb, b1 = next->bytes[r] * (kb + 1) / nkb;
        share.p[r] = next->p[r] ? static_cast<const char*>(next->p[r]) + b0 : nullptr;
        share.bytes[r] = b1 - b0;
      }
    gemm_panels_vnni(a + 2 * p0, lda, wb + p0 * prow, 2 * kPanel, prow, np2, 2, part.data(), kVnniBlock, rows,
                     next ? &share : nullptr);
    float sc[kVnniBlock];
    for (int64_t j = 0; j < kVnniBlock; ++j) sc[j] = srow[j] ? srow[j][kb] : 0.0f;  // a column past N: unused
    for (int64_t i = 0; i < rows; ++i) {
      float* ci = c + i * ldc;
      const float* pi = part.data() + i * kVnniBlock;
      for (int64_t j = 0; j < kVnniBlock; ++j) ci[j] += sc[j] * pi[j];
    }
  }
}

// Bytes of rows [n0, n0 + cols) of a quantized [N, K] weight, for the next-block prefetch.
inline PrefetchRanges quant_range(const VnniQuant& q, bool gate_up, int64_t e, int64_t N, int64_t K, int64_t n0,
                                  int64_t cols) {
  const int64_t row_bytes = q.fmt == QuantFmt::kMxfp4 ? K / 2 : K;
  PrefetchRanges r;
  r.p[0] = (gate_up ? q.gate_up : q.down) + (e * N + n0) * row_bytes;
  r.bytes[0] = cols * row_bytes;
  return r;
}

// Tiles of at most this many rows take the decode GEMV on the quantized rows as stored
// (gemv_quant) instead of a repack and the panel GEMM: measured in docs/cpu.md ("Quantized
// experts"). MOE_OPS_CPU_GEMV_ROWS overrides it (0: never), read at every call.
int64_t gemv_max_rows() {
  const char* v = moe_ops::env::get("CPU_GEMV_ROWS");
  return v ? std::max<int64_t>(0, std::atoll(v)) : 4;
}

// The GEMV job of a block's columns: col_n(j) = the weight row of column j (< 0: none).
template <class ColN>
GemvQuantJob gemv_job(const VnniQuant& q, bool gate_up, int64_t e, int64_t N, int64_t K, int ncols, ColN col_n) {
  GemvQuantJob job;
  job.fmt = static_cast<int>(q.fmt);
  job.K = K, job.bk = q.bk, job.n = ncols;
  job.mx = q.fmt == QuantFmt::kMxfp4 ? &dequant_tables().mx[0][0] : nullptr;
  const uint8_t* base = gate_up ? q.gate_up : q.down;
  const int64_t row_bytes = q.fmt == QuantFmt::kMxfp4 ? K / 2 : K;
  for (int j = 0; j < ncols; ++j) {
    const int64_t n = col_n(j);
    job.w[j] = n < 0 ? nullptr : base + (e * N + n) * row_bytes;
    job.s[j] = nullptr;
    if (n < 0) continue;
    if (q.fmt != QuantFmt::kMxfp4) job.s[j] = &quant_scale(q, gate_up, e, N, K, n, 0);  // int8's, fp8's k-block row
    else job.s[j] = static_cast<const uint8_t*>(gate_up ? q.gate_up_scale : q.down_scale) + (e * N + n) * (K / 32);
  }
  return job;
}

// next's first rows as job's lookahead (GemvQuantJob::n_next): its last groups prefetch them. next
// is built with only its first kLookahead columns (gemv_job(..., kLookahead, ...)).
constexpr int kLookahead = 8;
inline GemvQuantJob& with_lookahead(GemvQuantJob& job, const GemvQuantJob& next) {
  job.n_next = 0;
  for (int j = 0; j < next.n && job.n_next < kLookahead; ++j)
    if (next.w[j]) {
      job.w[job.n + job.n_next] = next.w[j];
      job.s[job.n + job.n_next] = next.s[j];
      ++job.n_next;
    }
  return job;
}

}  // namespace

void vnni_experts(const at::Tensor& x, const Placement& pl, int64_t k, int64_t I, const VnniWeights& w, bool swiglu,
                  at::Tensor& ybuf) {
  const DType dt = DType::BF16;
  const std::vector<int64_t>& offs = pl.offs;
  const int64_t H = x.size(1), Sv = pl.rows();
  const int64_t Hp = 2 * vnni_pairs(H), Iv = 2 * vnni_pairs(I);  // A1, A2 row lengths (pairs)
  const int64_t P1 = num_panels(I), U2 = (H + kVnniBlock - 1) / kVnniBlock;
  // The blocks are oneDNN brgemm operands as they are (onednn_brgemm.h). Where brgemm is chosen
  // (AMX CPUs, or MOE_OPS_CPU_BRGEMM=1) it runs every tile, whatever its rows, so a row's result
  // never depends on how many rows share its expert; elsewhere the own kernel, which also
  // prefetches the next block while it computes (brgemm cannot): measured faster without AMX
  // (docs/cpu.md, "Weights as stored at packed speed").
  const bool brg = brgemm_chosen();
  // Which tiles' GEMMs prefetch the next block (into L2, spread over the GEMM's steps). Packed:
  // tiles of >= 12 rows -- a thinner one computes for less time than its block takes to arrive,
  // and the hardware prefetcher alone streams the contiguous blocks faster. As stored: every tile
  // -- the next repack reads 16-32 rows 2-4 KiB apart, which the hardware prefetcher follows
  // poorly. Both measured (docs/cpu.md, "Weights as stored at packed speed").
  const int64_t pf_min_rows = w.packed ? 12 : 0;
  const uint64_t call = ++call_counter;
  const int64_t gemv_rows = w.q.avx2                                        ? std::numeric_limits<int64_t>::max()
                            : w.q.fmt != QuantFmt::kNone && gemv_takes(w.q) ? gemv_max_rows()
                                                                            : 0;
  const auto gemv = [&](GemvQuantJob job, const uint16_t* a, int64_t lda, int64_t rows, float* c, int64_t ldc) {
    if (w.q.avx2) return gemv_quant_avx2(job, a, lda, rows, c, ldc);
    thread_local std::vector<uint16_t> xbuf;  // the activation rows, permuted by the kernel
    xbuf.resize(static_cast<size_t>(rows * gemv_xbuf_elems(job.K)));
    job.xbuf = xbuf.data();
    gemv_quant(job, a, lda, rows, c, ldc);
  };

  // 2. the routed rows, padded to pairs: the pads meet zero weights, so they must be finite.
  // Scratch comes from the host cache (host_alloc.h): no page faults at steady state.
  at::Tensor a1 = empty_cached({Sv, Hp}, x.options());
  at::Tensor a2 = empty_cached({Sv, Iv}, x.options());
  uint16_t* A1 = static_cast<uint16_t*>(a1.data_ptr());
  uint16_t* A2 = static_cast<uint16_t*>(a2.data_ptr());
  const uint16_t* xp = static_cast<const uint16_t*>(x.const_data_ptr());
  at::parallel_for(0, Sv, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      std::memcpy(A1 + r * Hp, xp + (pl.row_slot[r] / k) * H, H * 2);
      if (Hp > H) A1[r * Hp + H] = 0;
      if (Iv > I) A2[r * Iv + I] = 0;  // as stored, odd I: no GEMM1 column writes the pad
    }
  });

  // Where each 32-column weight block is, packed or as stored (the rows a repack reads).
  const int64_t blk1 = Hp * kVnniBlock, blk2 = Iv * kVnniBlock;  // elements of one block
  const auto range = [](const uint16_t* p, int64_t elems) {
    PrefetchRanges r;
    r.p[0] = p, r.bytes[0] = elems * 2;
    return r;
  };
  const VnniQuant& q = w.q;
  const bool quant = q.fmt != QuantFmt::kNone;
  const auto gu_ranges = [&](int64_t e, int64_t p) {
    if (w.packed) return range(w.gate_up + (e * P1 + p) * blk1, blk1);
    const int64_t cols = std::min<int64_t>(kPanel, I - p * kPanel);
    if (quant) {
      PrefetchRanges r = quant_range(q, true, e, 2 * I, H, p * kPanel, cols);
      const PrefetchRanges up = quant_range(q, true, e, 2 * I, H, I + p * kPanel, cols);
      r.p[1] = up.p[0], r.bytes[1] = up.bytes[0];
      return r;
    }
    PrefetchRanges r = range(w.gate_up + e * 2 * I * H + p * kPanel * H, cols * H);      // gate rows
    r.p[1] = w.gate_up + e * 2 * I * H + (I + p * kPanel) * H, r.bytes[1] = r.bytes[0];  // up rows
    return r;
  };
  const auto down_ranges = [&](int64_t e, int64_t u) {
    if (w.packed) return range(w.down + (e * U2 + u) * blk2, blk2);
    if (quant) return quant_range(q, false, e, H, I, u * kVnniBlock, std::min<int64_t>(kVnniBlock, H - u * kVnniBlock));
    return range(w.down + (e * H + u * kVnniBlock) * I, std::min<int64_t>(kVnniBlock, H - u * kVnniBlock) * I);
  };

  // 3. GEMM1 + gated activation: tile = (expert, panel p, rows); one 32-column block holds the
  // gate and up columns of p, so one call computes both ([rows, 32] scratch: 16 gate | 16 up).
  run_tiles(make_tiles(offs, P1, blk1, 1, 256, 4.0), [&](const Tile& t, const Tile* nx) {
    thread_local std::vector<float> c, h;
    thread_local RepackedBlock buf;
    const int64_t rows = t.m1 - t.m0, p = t.n0;
    const int64_t cols = std::min<int64_t>(kPanel, I - p * kPanel);
    const bool other = nx && (nx->e != t.e || nx->n0 != t.n0);  // the next tile has other weights
    const PrefetchRanges next = other ? gu_ranges(nx->e, nx->n0) : PrefetchRanges{};
    const bool pf = other && rows >= pf_min_rows;
    c.resize(static_cast<size_t>(rows * 2 * kPanel));
    const uint16_t* a = A1 + t.m0 * Hp;
    // columns 0..15: gate rows pp*16 + j, 16..31: up rows I + pp*16 + j - 16 (panel pp)
    const auto panel_cols = [&](int64_t pp) {
      const int64_t pc = std::min<int64_t>(kPanel, I - pp * kPanel);
      return [pp, pc, I](int64_t j) {
        const int64_t jj = j % kPanel;
        return jj < pc ? (j < kPanel ? pp * kPanel + jj : I + pp * kPanel + jj) : -1;
      };
    };
    const auto col_n = panel_cols(p);
    const bool by_gemv = rows <= gemv_rows;  // the quantized rows as stored, no repack
    const uint16_t* wb = w.gate_up + (t.e * P1 + p) * blk1;
    if (!w.packed && !by_gemv) {  // gate rows p*16.. and up rows I + p*16.. interleaved row by row
      if (!buf.holds(call, t.e, p)) {
        buf.data.resize(static_cast<size_t>(blk1));
        if (quant) {  // the gate and the up half, dequantized exactly on the way
          repack_quant(q, true, t.e, 2 * I, H, p * kPanel, cols, buf.data.data(), 0);
          repack_quant(q, true, t.e, 2 * I, H, I + p * kPanel, cols, buf.data.data() + 2 * kPanel, 0);
        } else {
          const PrefetchRanges src = gu_ranges(t.e, p);
          pack_panels_vnni(static_cast<const uint16_t*>(src.p[0]), cols, H, H, buf.data.data(), 0, 2 * kVnniBlock);
          pack_panels_vnni(static_cast<const uint16_t*>(src.p[1]), cols, H, H, buf.data.data() + 2 * kPanel, 0,
                           2 * kVnniBlock);
        }
        buf.set(call, t.e, p);
      }
      wb = buf.data.data();
    }
    if (by_gemv) {
      GemvQuantJob job = gemv_job(q, true, t.e, 2 * I, H, 2 * kPanel, col_n);
      if (other && nx->m1 - nx->m0 <= gemv_rows)
        with_lookahead(job, gemv_job(q, true, nx->e, 2 * I, H, kLookahead, panel_cols(nx->n0)));
      gemv(job, a, Hp, rows, c.data(), 2 * kPanel);
    } else if (quant) {
      block_gemm(q, true, t.e, 2 * I, H, col_n, a, Hp, wb, Hp / 2, c.data(), 2 * kPanel, rows, pf ? &next : nullptr);
    } else if (brg) {  // bitwise the panel kernel's result without AMX
      brgemm_bf16(rows, kVnniBlock, Hp, a, Hp, wb, kVnniBlock, c.data(), 2 * kPanel);
      brgemm_done();
    } else {
      gemm_panels_vnni(a, Hp, wb, 2 * kPanel, 2 * kVnniBlock, Hp / 2, 2, c.data(), 2 * kPanel, rows,
                       pf ? &next : nullptr);
    }
    // h is rounded to bf16 by the activation, so the conversion to GEMM2's bf16 A is exact.
    h.resize(static_cast<size_t>(rows * kPanel));
    gated_act_block(c.data(), c.data() + kPanel, 2 * kPanel, h.data(), kPanel, rows, cols, dt, swiglu);
    for (int64_t i = 0; i < rows; ++i) row_from_f32(h.data() + i * kPanel, A2 + (t.m0 + i) * Iv + p * kPanel, dt, cols);
  });

  // 4. GEMM2: each slot's expert output, rounded through bf16, kept as float32. Tiles of nu
  // 32-column blocks.
  float* Y = ybuf.data_ptr<float>();
  const int64_t nu2 = nt_col_block(offs, U2, blk2, 2, 1);
  run_tiles(make_tiles(offs, U2, blk2, nu2, 256, 2.0), [&](const Tile& t, const Tile* nx) {
    thread_local std::vector<float> c;
    thread_local RepackedBlock buf;
    const int64_t rows = t.m1 - t.m0, nu = t.n1 - t.n0, ldc = nu * kVnniBlock;
    c.resize(static_cast<size_t>(rows * ldc));
    const uint16_t* a2 = A2 + t.m0 * Iv;
    for (int64_t j = 0; j < nu; ++j) {
      const int64_t u = t.n0 + j;
      const bool last = j + 1 == nu, other = !last || (nx && (nx->e != t.e || nx->n0 != t.n0));
      if (rows <= gemv_rows) {  // the quantized rows as stored (the GEMV prefetches its own)
        const auto block_cols = [&](int64_t uu) {
          const int64_t bc = std::min<int64_t>(kVnniBlock, H - uu * kVnniBlock);
          return [uu, bc](int64_t jc) { return jc < bc ? uu * kVnniBlock + jc : -1; };
        };
        GemvQuantJob job = gemv_job(q, false, t.e, H, I, kVnniBlock, block_cols(u));
        if (!last) with_lookahead(job, gemv_job(q, false, t.e, H, I, kLookahead, block_cols(u + 1)));
        else if (other && nx->m1 - nx->m0 <= gemv_rows)
          with_lookahead(job, gemv_job(q, false, nx->e, H, I, kLookahead, block_cols(nx->n0)));
        gemv(job, a2, Iv, rows, c.data() + j * kVnniBlock, ldc);
        continue;
      }
      const PrefetchRanges next = !last   ? down_ranges(t.e, u + 1)
                                  : other ? down_ranges(nx->e, nx->n0)
                                          : PrefetchRanges{};
      const bool pf = other && rows >= pf_min_rows;
      const uint16_t* wb = w.down + (t.e * U2 + u) * blk2;
      if (!w.packed) {
        if (!buf.holds(call, t.e, u)) {
          buf.data.resize(static_cast<size_t>(blk2));
          uint16_t* d = buf.data.data();
          const int64_t cols = std::min<int64_t>(kVnniBlock, H - u * kVnniBlock);
          if (quant) repack_quant(q, false, t.e, H, I, u * kVnniBlock, cols, d, 2 * kPanel);
          else pack_panels_vnni(w.down + (t.e * H + u * kVnniBlock) * I, cols, I, I, d, 2 * kPanel, 2 * kVnniBlock);
          if (cols <= kPanel)  // the second panel: no columns (the packing zero-fills it too)
            for (int64_t kk = 0; kk < Iv / 2; ++kk) std::memset(d + kk * 2 * kVnniBlock + 2 * kPanel, 0, 64);
          buf.set(call, t.e, u);
        }
        wb = buf.data.data();
      }
      if (quant) {
        const int64_t cols = std::min<int64_t>(kVnniBlock, H - u * kVnniBlock);
        const auto col_n = [&](int64_t jc) { return jc < cols ? u * kVnniBlock + jc : -1; };
        block_gemm(q, false, t.e, H, I, col_n, a2, Iv, wb, Iv / 2, c.data() + j * kVnniBlock, ldc, rows,
                   pf ? &next : nullptr);
      } else if (brg) brgemm_bf16(rows, kVnniBlock, Iv, a2, Iv, wb, kVnniBlock, c.data() + j * kVnniBlock, ldc);
      else
        gemm_panels_vnni(a2, Iv, wb, 2 * kPanel, 2 * kVnniBlock, Iv / 2, 2, c.data() + j * kVnniBlock, ldc, rows,
                         pf ? &next : nullptr);
    }
    if (brg && !quant) brgemm_done();
    const int64_t c0 = t.n0 * kVnniBlock, cols = std::min<int64_t>(ldc, H - c0);
    for (int64_t i = 0; i < rows; ++i) round_rows(c.data() + i * ldc, Y + (t.m0 + i) * H + c0, cols, dt);
  });
}

}  // namespace moe_cpu
