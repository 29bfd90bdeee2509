// Scratch micro-benchmark of issue 15 (not part of the library): oneDNN's micro-GEMM as ATen
// exposes it (at::native::cpublas::brgemm) against moe_ops' AVX512-BF16 kernels on one
// expert's GEMM shapes. Built by bench/cpu_brgemm_micro.py with torch's cpp_extension.
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>

#include <chrono>
#include <vector>

#include "avx512_bf16_isa.h"

namespace {

using clk = std::chrono::steady_clock;
using bf16 = at::BFloat16;

// A[M,K] bf16, Bv[R, N/nb, K/2, nb, 2] bf16 (oneDNN's VNNI B: per column block [K/2][ldb=nb][2]),
// C[M,N] f32: one brgemm per column block; R weight copies rotated (cold weights).
double run_brgemm(const at::Tensor& A, const at::Tensor& Bv, at::Tensor& C, int64_t nb, int64_t reps) {
  const int64_t M = A.size(0), K = A.size(1), R = Bv.size(0), N = C.size(1);
  const bf16* a = A.const_data_ptr<bf16>();
  float* c = C.data_ptr<float>();
  const int64_t per = N * K;
  auto one = [&](int64_t r) {
    const bf16* b = Bv.const_data_ptr<bf16>() + r * per;
    for (int64_t j = 0; j < N / nb; ++j)
      at::native::cpublas::brgemm(M, nb, K, K, nb, N, false, a, b + j * nb * K, c + j * nb, true);
  };
  one(0);
  const auto t0 = clk::now();
  for (int64_t i = 0; i < reps; ++i) one((i + 1) % R);
  const double s = std::chrono::duration<double>(clk::now() - t0).count() / reps;
  at::native::cpublas::brgemm_release(true);
  return s;
}

// moe_ops' vnni panel kernel on P[R, N/16, K/2, 16, 2].
double run_panels(const at::Tensor& A, const at::Tensor& P, at::Tensor& C, int64_t reps) {
  const int64_t M = A.size(0), K = A.size(1), R = P.size(0), N = C.size(1);
  auto one = [&](int64_t r) {
    moe_cpu::avx512_native::gemm_panels_vnni(static_cast<const uint16_t*>(A.const_data_ptr()), K,
                                             static_cast<const uint16_t*>(P.const_data_ptr()) + r * N * K, K * 16, 32,
                                             K / 2, N / 16, C.data_ptr<float>(), N, M, nullptr);
  };
  one(0);
  const auto t0 = clk::now();
  for (int64_t i = 0; i < reps; ++i) one((i + 1) % R);
  return std::chrono::duration<double>(clk::now() - t0).count() / reps;
}

// Weights as stored W[R, N, K], as fused_experts runs them: per 32-column block, the VNNI
// repack into a cache-resident buffer, then the vnni kernel, prefetching the next block's rows.
double run_repack(const at::Tensor& A, const at::Tensor& W, at::Tensor& C, int64_t reps) {
  const int64_t M = A.size(0), K = A.size(1), R = W.size(0), N = C.size(1);
  std::vector<uint16_t> buf(static_cast<size_t>(K * 32));
  auto one = [&](int64_t r) {
    const uint16_t* w = static_cast<const uint16_t*>(W.const_data_ptr()) + r * N * K;
    for (int64_t j = 0; j < N; j += 32) {
      moe_cpu::PrefetchRanges next;
      next.p[0] = w + (j + 32) * K;
      next.bytes[0] = j + 32 < N ? 32 * K * 2 : 0;
      moe_cpu::avx512_native::pack_panels_vnni(w + j * K, 32, K, K, buf.data(), 32, 64);
      moe_cpu::avx512_native::gemm_panels_vnni(static_cast<const uint16_t*>(A.const_data_ptr()), K, buf.data(), 32, 64,
                                               K / 2, 2, C.data_ptr<float>() + j, N, M, &next);
    }
  };
  one(0);
  const auto t0 = clk::now();
  for (int64_t i = 0; i < reps; ++i) one((i + 1) % R);
  return std::chrono::duration<double>(clk::now() - t0).count() / reps;
}

bool could_pack() { return at::native::cpublas::could_pack(at::kBFloat16); }

// cpublas::pack of one [K, N] (row-major, N contiguous) bf16 matrix into oneDNN's B layout.
at::Tensor onednn_pack(const at::Tensor& B) {
  const int64_t K = B.size(0), N = B.size(1);
  at::Tensor out = at::empty({(K + 1) / 2 * 2 * N}, B.options());
  at::native::cpublas::pack(K, N, N, N, at::kBFloat16, at::kBFloat16, B.const_data_ptr(), out.data_ptr());
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run_brgemm", &run_brgemm);
  m.def("run_panels", &run_panels);
  m.def("run_repack", &run_repack);
  m.def("could_pack", &could_pack);
  m.def("onednn_pack", &onednn_pack);
}
