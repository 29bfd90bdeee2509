// grouped_gemm / grouped_gemm_wgrad on CPU.
//
// Dataflow (grouped_gemm, trans_b -- the layer's layout): pack the routed rows of a once into
// float32 (parallel over rows), cut the work into (expert, column-block, row-chunk) tiles whose
// weight block fits in L2, spread the tiles over the threads by cost (tile_schedule.h run_tiles), and
// per tile run the NT block kernel into a float32 scratch, then round-store into c. So a decode
// step (one row per expert) still splits each expert's weights across all cores and reads them
// exactly once; a prefill expert with many rows reads each weight block once per 256 rows.
// trans_b=False and the weight gradient use the NN kernel the same way. float64 goes through
// per-expert at::mm (the oracle dtype for gradcheck, not a fast path).
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "arg_checks.h"
#include "gemm_nt.h"
#include "gemm_panels.h"
#include "row_io.h"
#include "tile_schedule.h"

namespace moe_cpu {

namespace {

constexpr int64_t kRowChunk = 256;

// Expert row ranges from offsets, clamped to [0, M] and made monotone so bad values can never
// index out of bounds (the Python layer rejects them before we get here).
std::vector<int64_t> read_offsets(const at::Tensor& offsets, int64_t E, int64_t M) {
  std::vector<int64_t> o(static_cast<size_t>(E + 1));
  const int32_t* p = offsets.const_data_ptr<int32_t>();
  int64_t prev = 0;
  for (int64_t e = 0; e <= E; ++e) {
    int64_t v = std::min<int64_t>(std::max<int64_t>(p[e], 0), M);
    if (e > 0) v = std::max(v, prev);
    o[e] = prev = v;
  }
  return o;
}

void check_gemm_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offs, const char* op) {
  check_cpu(a, op, "a");
  check_cpu(b, op, "b");
  check_cpu(offs, op, "expert_offsets");
  check_float(a, op, "a");
  check_int32(offs, op, "expert_offsets");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "moe_ops::", op, " (cpu): operands must share a dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(offs.dim() == 1, "moe_ops::", op, " (cpu): expert_offsets must be 1-D");
}

at::Tensor grouped_gemm_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& offs_in, bool trans_b) {
  const char* op = "grouped_gemm";
  check_gemm_args(a_in, b_in, offs_in, op);
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 3, "moe_ops::grouped_gemm (cpu): need a[M,K], b[E,.,.], got ",
              a_in.sizes(), " and ", b_in.sizes());
  const int64_t E = b_in.size(0), M = a_in.size(0), K = a_in.size(1);
  const int64_t N = trans_b ? b_in.size(1) : b_in.size(2);
  TORCH_CHECK((trans_b ? b_in.size(2) : b_in.size(1)) == K, "moe_ops::grouped_gemm (cpu): a has K=", K, " but b is ",
              b_in.sizes(), trans_b ? " (trans_b)" : "");
  TORCH_CHECK(offs_in.numel() == E + 1, "moe_ops::grouped_gemm (cpu): expert_offsets needs E+1 = ", E + 1, " entries");
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const std::vector<int64_t> offs = read_offsets(offs_in.contiguous(), E, M);
  at::Tensor c = at::empty({M, N}, a.options());
  const int64_t o0 = offs[0], oE = offs[E];
  if (o0 > 0) c.narrow(0, 0, o0).zero_();
  if (oE < M) c.narrow(0, oE, M - oE).zero_();
  if (oE == o0 || N == 0) return c;

  if (a.scalar_type() == at::kDouble) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = offs[e + 1] - offs[e];
      if (n == 0) continue;
      at::Tensor be = trans_b ? b.select(0, e).t() : b.select(0, e);
      c.narrow(0, offs[e], n).copy_(at::mm(a.narrow(0, offs[e], n), be));
    }
    return c;
  }

  const DType dt = to_dtype(a.scalar_type());
  const int64_t es = dtype_size(dt);
  const int64_t Mv = oE - o0;
  const char* ap = static_cast<const char*>(a.const_data_ptr());
  const char* bp = static_cast<const char*>(b.const_data_ptr());
  char* cp = static_cast<char*>(c.data_ptr());

  if (trans_b) {
    // A packed as float32 rows of padded_k(K) (even/odd interleaved for bf16 weights); an
    // fp32 a with K % 8 == 0 is already in that layout.
    const bool direct = dt == DType::F32 && K % 8 == 0;
    const int64_t lda = direct ? K : padded_k(K);
    at::Tensor packed;
    const float* A = nullptr;
    if (direct) {
      A = reinterpret_cast<const float*>(ap) + o0 * K;
    } else {
      packed = at::empty({Mv, lda}, a.options().dtype(at::kFloat));
      float* pk = packed.data_ptr<float>();
      at::parallel_for(0, Mv, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) pack_row_nt(ap + (o0 + r) * K * es, dt, K, dt, pk + r * lda);
      });
      A = pk;
    }
    const int64_t nb = nt_col_block(offs, N, K, es);
    const std::vector<Tile> tiles = make_tiles(offs, N, K, nb, kRowChunk, 4.0 * es);
    run_tiles(tiles, [&](const Tile& t, const Tile* nx) {
      thread_local std::vector<float> scratch;
      const int64_t rows = t.m1 - t.m0, cols = t.n1 - t.n0;
      scratch.resize(static_cast<size_t>(rows * cols));
      const char* be = bp + (t.e * N + t.n0) * K * es;
      const bool pf = nx && (nx->e != t.e || nx->n0 != t.n0);  // next tile needs other weights
      gemm_nt_block(A + (t.m0 - o0) * lda, lda, be, dt, K, K, scratch.data(), cols, rows, cols,
                    pf ? bp + (nx->e * N + nx->n0) * K * es : nullptr);
      for (int64_t i = 0; i < rows; ++i)
        row_from_f32(scratch.data() + i * cols, cp + ((t.m0 + i) * N + t.n0) * es, dt, cols);
    });
    return c;
  }

  // trans_b == false: b[e] is [K, N], rows contiguous along N -> NN kernel.
  at::Tensor af;
  const float* A = nullptr;
  if (dt == DType::F32) {
    A = reinterpret_cast<const float*>(ap) + o0 * K;
  } else {
    af = at::empty({Mv, K}, a.options().dtype(at::kFloat));
    float* p = af.data_ptr<float>();
    at::parallel_for(0, Mv, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row_to_f32(ap + (o0 + r) * K * es, dt, p + r * K, K);
    });
    A = p;
  }
  const int64_t nb = weight_col_block(K, es, N, 16);
  const std::vector<Tile> tiles = make_tiles(offs, N, K, nb, 96, 4.0 * es);
  run_tiles(tiles, [&](const Tile& t, const Tile*) {
    thread_local std::vector<float> scratch;
    const int64_t rows = t.m1 - t.m0, cols = t.n1 - t.n0;
    scratch.resize(static_cast<size_t>(rows * cols));
    const char* be = bp + (t.e * K * N + t.n0) * es;
    gemm_nn_block(A + (t.m0 - o0) * K, K, be, dt, N, K, scratch.data(), cols, rows, cols);
    for (int64_t i = 0; i < rows; ++i)
      row_from_f32(scratch.data() + i * cols, cp + ((t.m0 + i) * N + t.n0) * es, dt, cols);
  });
  return c;
}

at::Tensor grouped_gemm_wgrad_cpu(const at::Tensor& a_in, const at::Tensor& dc_in, const at::Tensor& offs_in,
                                  int64_t E) {
  const char* op = "grouped_gemm_wgrad";
  check_gemm_args(a_in, dc_in, offs_in, op);
  TORCH_CHECK(a_in.dim() == 2 && dc_in.dim() == 2 && a_in.size(0) == dc_in.size(0),
              "moe_ops::grouped_gemm_wgrad (cpu): need a[M,K] and dc[M,N], got ", a_in.sizes(), " and ", dc_in.sizes());
  TORCH_CHECK(E >= 0 && E <= moe_ops::limits::kMaxExperts && offs_in.numel() == E + 1,
              "moe_ops::grouped_gemm_wgrad (cpu): expert_offsets needs E+1 entries");
  const at::Tensor a = a_in.contiguous(), dc = dc_in.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = dc.size(1);
  const std::vector<int64_t> offs = read_offsets(offs_in.contiguous(), E, M);
  at::Tensor db = at::empty({E, K, N}, a.options());
  if (a.scalar_type() == at::kDouble) {
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = offs[e + 1] - offs[e];
      if (n == 0) db.select(0, e).zero_();
      else db.select(0, e).copy_(at::mm(a.narrow(0, offs[e], n).t(), dc.narrow(0, offs[e], n)));
    }
    return db;
  }
  const DType dt = to_dtype(a.scalar_type());
  const int64_t es = dtype_size(dt);
  const int64_t o0 = offs[0], Mv = offs[E] - o0;
  const char* ap = static_cast<const char*>(a.const_data_ptr());
  const char* dp = static_cast<const char*>(dc.const_data_ptr());
  char* out = static_cast<char*>(db.data_ptr());
  for (int64_t e = 0; e < E; ++e)
    if (offs[e + 1] == offs[e]) db.select(0, e).zero_();
  if (Mv == 0 || K == 0 || N == 0) return db;

  // a_e^T as float32 [K, M_e] per expert, stored back to back (expert e at K * (offs[e]-o0)).
  at::Tensor at_ = at::empty({Mv * K}, a.options().dtype(at::kFloat));
  float* At = at_.data_ptr<float>();
  at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
    std::vector<float> row(K);
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t Me = offs[e + 1] - offs[e];
      float* blk = At + K * (offs[e] - o0);
      for (int64_t m = 0; m < Me; ++m) {
        row_to_f32(ap + (offs[e] + m) * K * es, dt, row.data(), K);
        for (int64_t k = 0; k < K; ++k) blk[k * Me + m] = row[k];
      }
    }
  });
  // Tiles over (expert, column block, K-row chunk); "rows" of a tile are rows k of db[e].
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t Me = offs[e + 1] - offs[e];
    if (Me == 0) continue;
    const int64_t nb = weight_col_block(Me, es, N, 16);
    for (int64_t n0 = 0; n0 < N; n0 += nb)
      for (int64_t k0 = 0; k0 < K; k0 += 96)
        tiles.push_back({e, k0, std::min(K, k0 + 96), n0, std::min(N, n0 + nb),
                         double(std::min(N, n0 + nb) - n0) * Me * double(std::min(K, k0 + 96) - k0 + 4)});
  }
  run_tiles(tiles, [&](const Tile& t, const Tile*) {
    thread_local std::vector<float> scratch;
    const int64_t Me = offs[t.e + 1] - offs[t.e];
    const int64_t rows = t.m1 - t.m0, cols = t.n1 - t.n0;
    scratch.resize(static_cast<size_t>(rows * cols));
    const float* Ae = At + K * (offs[t.e] - o0) + t.m0 * Me;
    gemm_nn_block(Ae, Me, dp + (offs[t.e] * N + t.n0) * es, dt, N, Me, scratch.data(), cols, rows, cols);
    for (int64_t i = 0; i < rows; ++i)
      row_from_f32(scratch.data() + i * cols, out + ((t.e * K + t.m0 + i) * N + t.n0) * es, dt, cols);
  });
  return db;
}

}  // namespace
}  // namespace moe_cpu

TORCH_LIBRARY_IMPL(moe_ops, CPU, m) {
  m.impl("grouped_gemm", &moe_cpu::grouped_gemm_cpu);
  m.impl("grouped_gemm_wgrad", &moe_cpu::grouped_gemm_wgrad_cpu);
}
