// Test-only ops of the emulator build (namespace moe_ops_simtest): the emulator-semantics
// kernels of simtest_kernels.cuh and the planted bugs of planted_bugs.cuh, bound to CPU tensors.
// Used by tests/test_sim_emulator.py and tests/test_sanitizers.py only.
#include <torch/library.h>
#include <ATen/ATen.h>

#include "kernels/launch.cuh"  // csrc/ is on the include path (csrc/sim/CMakeLists.txt)
#include "planted_bugs.cuh"
#include "simtest_kernels.cuh"
#include "simtest_warp_matrix.cuh"

namespace moe_ops {
namespace simtest {
namespace {

void check_cpu(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "moe_ops_simtest: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "moe_ops_simtest: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "moe_ops_simtest: ", name, " must be contiguous");
}

at::Tensor block_sum(const at::Tensor& x, int64_t threads, int64_t blocks) {
  check_cpu(x, at::kFloat, "x");
  auto out = at::empty({blocks}, x.options());
  const dim3 grid(static_cast<unsigned>(blocks));
  switch (threads) {
    case 32:
      launch(block_sum_kernel<32>, grid, dim3(32), 0, nullptr, x.data_ptr<float>(), out.data_ptr<float>(), x.numel());
      break;
    case 256:
      launch(block_sum_kernel<256>, grid, dim3(256), 0, nullptr, x.data_ptr<float>(), out.data_ptr<float>(), x.numel());
      break;
    case 1024:
      launch(block_sum_kernel<1024>, grid, dim3(1024), 0, nullptr, x.data_ptr<float>(), out.data_ptr<float>(),
             x.numel());
      break;
    default: TORCH_CHECK(false, "block_sum: threads must be 32, 256 or 1024");
  }
  return out;
}

at::Tensor warp_ops(const at::Tensor& x, int64_t threads) {
  check_cpu(x, at::kInt, "x");
  TORCH_CHECK(x.numel() % threads == 0 && threads % 32 == 0,
              "warp_ops: numel must be a multiple of threads (a multiple of 32)");
  auto out = at::empty({x.numel(), kWarpOpsCols}, x.options());
  launch(warp_ops_kernel, dim3(static_cast<unsigned>(x.numel() / threads)), dim3(static_cast<unsigned>(threads)), 0,
         nullptr, x.data_ptr<int>(), out.data_ptr<int>());
  return out;
}

std::tuple<at::Tensor, at::Tensor> early_exit(const at::Tensor& x) {
  constexpr int kThreads = 128;
  check_cpu(x, at::kInt, "x");
  TORCH_CHECK(x.numel() % kThreads == 0, "early_exit: numel must be a multiple of 128");
  const int64_t blocks = x.numel() / kThreads;
  auto out = at::full({blocks, 2}, -7, x.options());
  auto out_lane = at::full({x.numel()}, -7, x.options());
  launch(early_exit_kernel<kThreads>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, nullptr,
         x.data_ptr<int>(), out.data_ptr<int>(), out_lane.data_ptr<int>());
  return {out, out_lane};
}

at::Tensor histogram(const at::Tensor& ids, int64_t nbins, int64_t blocks, int64_t threads) {
  check_cpu(ids, at::kInt, "ids");
  auto hist = at::zeros({nbins}, ids.options());
  launch(histogram_kernel, dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(threads)),
         static_cast<size_t>(nbins) * sizeof(int), nullptr, ids.data_ptr<int>(), static_cast<long long>(ids.numel()),
         hist.data_ptr<int>(), static_cast<int>(nbins));
  return hist;
}

at::Tensor block_reverse(const at::Tensor& x, int64_t n_per, int64_t threads) {
  check_cpu(x, at::kFloat, "x");
  TORCH_CHECK(n_per > 0 && x.numel() % n_per == 0, "block_reverse: numel must be a multiple of n_per");
  auto out = at::full_like(x, std::nanf(""));
  launch(block_reverse_kernel, dim3(static_cast<unsigned>(x.numel() / n_per)), dim3(static_cast<unsigned>(threads)),
         static_cast<size_t>(n_per) * sizeof(float), nullptr, x.data_ptr<float>(), out.data_ptr<float>(),
         static_cast<int>(n_per));
  return out;
}

at::Tensor thread_coords(at::IntArrayRef grid, at::IntArrayRef block) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "thread_coords: grid and block are 3 ints");
  const int64_t n = grid[0] * grid[1] * grid[2] * block[0] * block[1] * block[2];
  auto out = at::full({n, 12}, -7, at::TensorOptions().dtype(at::kInt));
  launch(thread_coords_kernel, dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]), 0, nullptr,
         out.data_ptr<int>());
  return out;
}

at::Tensor block_ticket(int64_t blocks) {
  auto counter = at::zeros({1}, at::TensorOptions().dtype(at::kInt));
  auto out = at::full({blocks}, -7, at::TensorOptions().dtype(at::kInt));
  launch(block_ticket_kernel, dim3(static_cast<unsigned>(blocks)), dim3(32), 0, nullptr, counter.data_ptr<int>(),
         out.data_ptr<int>());
  return out;
}

at::Tensor misuse(const std::string& what, int64_t threads) {
  auto out = at::zeros({threads}, at::TensorOptions().dtype(at::kInt));
  const dim3 block(static_cast<unsigned>(threads));
  if (what == "bad_shuffle") launch(bad_shuffle_kernel, dim3(1), block, 0, nullptr, out.data_ptr<int>());
  else if (what == "deadlock") launch(deadlock_kernel, dim3(1), block, 0, nullptr, out.data_ptr<int>());
  else if (what == "trap")
    launch(trap_kernel, dim3(2), block, 0, nullptr, out.data_ptr<int>(), static_cast<int>(threads / 2));
  else if (what == "smem_too_big")
    launch(block_reverse_kernel, dim3(1), block, size_t{1} << 20, nullptr, static_cast<const float*>(nullptr),
           static_cast<float*>(nullptr), 0);
  else if (what == "bad_block") launch(trap_kernel, dim3(1), dim3(2048), 0, nullptr, out.data_ptr<int>(), -1);
  else TORCH_CHECK(false, "misuse: unknown case ", what);
  return out;
}

at::Tensor planted_race(const at::Tensor& x) {
  check_cpu(x, at::kFloat, "x");
  TORCH_CHECK(x.numel() % kRaceThreads == 0, "planted_race: numel must be a multiple of 64");
  auto out = at::empty_like(x);
  launch(planted_race_kernel, dim3(static_cast<unsigned>(x.numel() / kRaceThreads)), dim3(kRaceThreads), 0, nullptr,
         x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

at::Tensor planted_oob(int64_t n) {
  auto out = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  launch(planted_oob_kernel, dim3(static_cast<unsigned>((n + 1 + 63) / 64)), dim3(64), 0, nullptr,
         out.data_ptr<float>(), static_cast<int>(n));
  return out;
}

at::Tensor planted_smem_oob(const at::Tensor& x) {
  check_cpu(x, at::kFloat, "x");
  TORCH_CHECK(x.numel() == 64, "planted_smem_oob: x has 64 elements");
  auto out = at::empty_like(x);
  launch(planted_smem_oob_kernel, dim3(1), dim3(64), 0, nullptr, x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

// ---- warp matrix / async-copy primitives (simtest_warp_matrix.cuh, planted_bugs.cuh) ----------

// src: int16 [num*64] (matrix j row r at (8j + r)*8), slot: int32 [num*8] distinct slots in
// [0, num*8). Returns int32 [32, num]: lane l's registers (bit patterns).
at::Tensor ldmatrix(const at::Tensor& src, const at::Tensor& slot, int64_t num, bool trans) {
  check_cpu(src, at::kShort, "src");
  check_cpu(slot, at::kInt, "slot");
  TORCH_CHECK(num == 1 || num == 2 || num == 4, "ldmatrix: num is 1, 2 or 4");
  TORCH_CHECK(src.numel() == num * 64 && slot.numel() == num * 8, "ldmatrix: src has num*64, slot num*8 elements");
  auto out = at::full({32, num}, -7, slot.options());
  const auto* s = reinterpret_cast<const uint16_t*>(src.data_ptr<int16_t>());
  auto* o = reinterpret_cast<uint32_t*>(out.data_ptr<int>());
  const size_t smem = static_cast<size_t>(num) * 8 * kLdmatrixSlot * sizeof(uint16_t);
  const int* sl = slot.data_ptr<int>();
  if (num == 1)
    launch(trans ? ldmatrix_kernel<1, true> : ldmatrix_kernel<1, false>, dim3(1), dim3(32), smem, nullptr, s, sl, o);
  else if (num == 2)
    launch(trans ? ldmatrix_kernel<2, true> : ldmatrix_kernel<2, false>, dim3(1), dim3(32), smem, nullptr, s, sl, o);
  else launch(trans ? ldmatrix_kernel<4, true> : ldmatrix_kernel<4, false>, dim3(1), dim3(32), smem, nullptr, s, sl, o);
  return out;
}

// a: int32 [n, 32, 4], b: int32 [n, 32, 2], c: float [n, 32, 4] -> d: float [n, 32, 4].
at::Tensor mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const std::string& dtype) {
  check_cpu(a, at::kInt, "a");
  check_cpu(b, at::kInt, "b");
  check_cpu(c, at::kFloat, "c");
  const int64_t n = a.numel() / 128;
  TORCH_CHECK(a.numel() == n * 128 && b.numel() == n * 64 && c.numel() == n * 128,
              "mma: a [n,32,4], b [n,32,2], c [n,32,4]");
  auto d = at::full_like(c, std::nanf(""));
  const auto* pa = reinterpret_cast<const uint32_t*>(a.data_ptr<int>());
  const auto* pb = reinterpret_cast<const uint32_t*>(b.data_ptr<int>());
  const dim3 grid(static_cast<unsigned>(n));
  if (dtype == "bfloat16")
    launch(mma_kernel<__nv_bfloat16>, grid, dim3(32), 0, nullptr, pa, pb, c.data_ptr<float>(), d.data_ptr<float>());
  else if (dtype == "float16")
    launch(mma_kernel<__half>, grid, dim3(32), 0, nullptr, pa, pb, c.data_ptr<float>(), d.data_ptr<float>());
  else TORCH_CHECK(false, "mma: dtype is bfloat16 or float16");
  return d;
}

// src: uint8 [blocks, kCpBlockBytes], sizes: int32 [32] -> uint8 [blocks, 2, kCpBlockBytes].
at::Tensor cp_async(const at::Tensor& src, const at::Tensor& sizes) {
  check_cpu(src, at::kByte, "src");
  check_cpu(sizes, at::kInt, "sizes");
  TORCH_CHECK(src.dim() == 2 && src.size(1) == kCpBlockBytes && sizes.numel() == 32,
              "cp_async: src [blocks, 2560], sizes [32]");
  auto out = at::full({src.size(0), 2, kCpBlockBytes}, 0x5a, src.options());
  launch(cp_async_kernel, dim3(static_cast<unsigned>(src.size(0))), dim3(32), kCpBlockBytes, nullptr,
         src.data_ptr<uint8_t>(), sizes.data_ptr<int>(), out.data_ptr<uint8_t>());
  return out;
}

// src: uint8 [384], sizes8 / sizes4: int32 [32] -> uint8 [384] (the shared memory after the wait).
at::Tensor cp_async_small(const at::Tensor& src, const at::Tensor& sizes8, const at::Tensor& sizes4) {
  check_cpu(src, at::kByte, "src");
  check_cpu(sizes8, at::kInt, "sizes8");
  check_cpu(sizes4, at::kInt, "sizes4");
  TORCH_CHECK(src.numel() == 384 && sizes8.numel() == 32 && sizes4.numel() == 32,
              "cp_async_small: src [384], sizes8 [32], sizes4 [32]");
  auto out = at::full({384}, 0x5a, src.options());
  launch(cp_async_small_kernel, dim3(1), dim3(32), 384, nullptr, src.data_ptr<uint8_t>(), sizes8.data_ptr<int>(),
         sizes4.data_ptr<int>(), out.data_ptr<uint8_t>());
  return out;
}

at::Tensor warp_matrix_misuse(int64_t what, int64_t threads) {
  auto out = at::zeros({threads}, at::TensorOptions().dtype(at::kInt));
  launch(warp_matrix_misuse_kernel, dim3(1), dim3(static_cast<unsigned>(threads)), 0, nullptr, static_cast<int>(what),
         out.data_ptr<int>());
  return out;
}

template <class T, GemmBug kBug>
void launch_gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& c) {
  const int M = static_cast<int>(a.size(0)), K = static_cast<int>(a.size(1)), N = static_cast<int>(b.size(0));
  launch(tiled_gemm_kernel<T, kBug>, dim3(static_cast<unsigned>(N / 16), static_cast<unsigned>(M / 16)), dim3(32),
         kGemmSmemElems * sizeof(T), nullptr, reinterpret_cast<const T*>(a.data_ptr()),
         reinterpret_cast<const T*>(b.data_ptr()), c.data_ptr<float>(), M, N, K);
}

template <class T>
void launch_gemm_bug(const at::Tensor& a, const at::Tensor& b, at::Tensor& c, int64_t bug) {
  switch (static_cast<GemmBug>(bug)) {
    case GemmBug::kNone: launch_gemm<T, GemmBug::kNone>(a, b, c); break;
    case GemmBug::kNoWait: launch_gemm<T, GemmBug::kNoWait>(a, b, c); break;
    case GemmBug::kSwappedFragment: launch_gemm<T, GemmBug::kSwappedFragment>(a, b, c); break;
    default: TORCH_CHECK(false, "tiled_gemm: bug is 0 (none), 1 (no wait) or 2 (swapped fragment)");
  }
}

// a: [M, K], b: [N, K] (bf16 or fp16, multiples of 16) -> a @ b^T in float32.
at::Tensor tiled_gemm(const at::Tensor& a, const at::Tensor& b, int64_t bug) {
  TORCH_CHECK(a.device().is_cpu() && a.is_contiguous() && b.is_contiguous() && a.dim() == 2 && b.dim() == 2 &&
                  a.size(1) == b.size(1) && a.scalar_type() == b.scalar_type(),
              "tiled_gemm: contiguous CPU a [M,K], b [N,K] of one dtype");
  TORCH_CHECK(a.size(0) % 16 == 0 && b.size(0) % 16 == 0 && a.size(1) % 16 == 0, "tiled_gemm: M, N, K multiples of 16");
  auto c = at::full({a.size(0), b.size(0)}, std::nanf(""), a.options().dtype(at::kFloat));
  if (a.scalar_type() == at::kBFloat16) launch_gemm_bug<__nv_bfloat16>(a, b, c, bug);
  else if (a.scalar_type() == at::kHalf) launch_gemm_bug<__half>(a, b, c, bug);
  else TORCH_CHECK(false, "tiled_gemm: bfloat16 or float16");
  return c;
}

}  // namespace
}  // namespace simtest
}  // namespace moe_ops

TORCH_LIBRARY(moe_ops_simtest, m) {
  m.def("block_sum(Tensor x, int threads, int blocks) -> Tensor");
  m.def("warp_ops(Tensor x, int threads) -> Tensor");
  m.def("early_exit(Tensor x) -> (Tensor, Tensor)");
  m.def("histogram(Tensor ids, int nbins, int blocks, int threads) -> Tensor");
  m.def("block_reverse(Tensor x, int n_per, int threads) -> Tensor");
  m.def("thread_coords(int[] grid, int[] block) -> Tensor");
  m.def("block_ticket(int blocks) -> Tensor");
  m.def("misuse(str what, int threads) -> Tensor");
  m.def("planted_race(Tensor x) -> Tensor");
  m.def("planted_oob(int n) -> Tensor");
  m.def("planted_smem_oob(Tensor x) -> Tensor");
  m.def("ldmatrix(Tensor src, Tensor slot, int num, bool trans) -> Tensor");
  m.def("mma(Tensor a, Tensor b, Tensor c, str dtype) -> Tensor");
  m.def("cp_async(Tensor src, Tensor sizes) -> Tensor");
  m.def("cp_async_small(Tensor src, Tensor sizes8, Tensor sizes4) -> Tensor");
  m.def("warp_matrix_misuse(int what, int threads) -> Tensor");
  m.def("tiled_gemm(Tensor a, Tensor b, int bug) -> Tensor");
}

TORCH_LIBRARY_IMPL(moe_ops_simtest, CPU, m) {
  using namespace moe_ops::simtest;
  m.impl("block_sum", &block_sum);
  m.impl("warp_ops", &warp_ops);
  m.impl("early_exit", &early_exit);
  m.impl("histogram", &histogram);
  m.impl("block_reverse", &block_reverse);
  m.impl("planted_race", &planted_race);
  m.impl("planted_smem_oob", &planted_smem_oob);
  m.impl("ldmatrix", &ldmatrix);
  m.impl("mma", &mma);
  m.impl("cp_async", &cp_async);
  m.impl("cp_async_small", &cp_async_small);
  m.impl("tiled_gemm", &tiled_gemm);
}

// Ops without tensor inputs dispatch through CompositeExplicitAutograd (no device to key on).
TORCH_LIBRARY_IMPL(moe_ops_simtest, CompositeExplicitAutograd, m) {
  using namespace moe_ops::simtest;
  m.impl("thread_coords", &thread_coords);
  m.impl("block_ticket", &block_ticket);
  m.impl("misuse", &misuse);
  m.impl("planted_oob", &planted_oob);
  m.impl("warp_matrix_misuse", &warp_matrix_misuse);
}
