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
#include <cstring>
#include <vector>

#include "activations.h"
#include "avx512_bf16.h"
#include "gemm_panels.h"
#include "host_alloc.h"
#include "onednn_brgemm.h"
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
  const auto gu_ranges = [&](int64_t e, int64_t p) {
    if (w.packed) return range(w.gate_up + (e * P1 + p) * blk1, blk1);
    const int64_t cols = std::min<int64_t>(kPanel, I - p * kPanel);
    PrefetchRanges r = range(w.gate_up + e * 2 * I * H + p * kPanel * H, cols * H);      // gate rows
    r.p[1] = w.gate_up + e * 2 * I * H + (I + p * kPanel) * H, r.bytes[1] = r.bytes[0];  // up rows
    return r;
  };
  const auto down_ranges = [&](int64_t e, int64_t u) {
    if (w.packed) return range(w.down + (e * U2 + u) * blk2, blk2);
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
    const uint16_t* wb = w.gate_up + (t.e * P1 + p) * blk1;
    if (!w.packed) {  // gate rows p*16.. and up rows I + p*16.. interleaved row by row
      if (!buf.holds(call, t.e, p)) {
        buf.data.resize(static_cast<size_t>(blk1));
        const PrefetchRanges src = gu_ranges(t.e, p);
        pack_panels_vnni(static_cast<const uint16_t*>(src.p[0]), cols, H, H, buf.data.data(), 0, 2 * kVnniBlock);
        pack_panels_vnni(static_cast<const uint16_t*>(src.p[1]), cols, H, H, buf.data.data() + 2 * kPanel, 0,
                         2 * kVnniBlock);
        buf.set(call, t.e, p);
      }
      wb = buf.data.data();
    }
    c.resize(static_cast<size_t>(rows * 2 * kPanel));
    const uint16_t* a = A1 + t.m0 * Hp;
    if (brg) {  // bitwise the panel kernel's result without AMX
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
          pack_panels_vnni(w.down + (t.e * H + u * kVnniBlock) * I, cols, I, I, d, 2 * kPanel, 2 * kVnniBlock);
          if (cols <= kPanel)  // the second panel: no columns (the packing zero-fills it too)
            for (int64_t q = 0; q < Iv / 2; ++q) std::memset(d + q * 2 * kVnniBlock + 2 * kPanel, 0, 64);
          buf.set(call, t.e, u);
        }
        wb = buf.data.data();
      }
      if (brg) brgemm_bf16(rows, kVnniBlock, Iv, a2, Iv, wb, kVnniBlock, c.data() + j * kVnniBlock, ldc);
      else
        gemm_panels_vnni(a2, Iv, wb, 2 * kPanel, 2 * kVnniBlock, Iv / 2, 2, c.data() + j * kVnniBlock, ldc, rows,
                         pf ? &next : nullptr);
    }
    if (brg) brgemm_done();
    const int64_t c0 = t.n0 * kVnniBlock, cols = std::min<int64_t>(ldc, H - c0);
    for (int64_t i = 0; i < rows; ++i) round_rows(c.data() + i * ldc, Y + (t.m0 + i) * H + c0, cols, dt);
  });
}

}  // namespace moe_cpu
