// SIMT host emulator: the models of ldmatrix, mma.sync m16n8k16 and cp.async (csrc/sim/warp_matrix.h).
//
// Dataflow: a lane calls ldmatrix / mma -> its address or registers go into the warp's payload
// buffer (warp_exchange, csrc/sim/runtime.cpp) -> the last lane to arrive runs the combine below on
// all 32 payloads: it gathers the whole matrices from the PTX fragment layout, computes, and
// scatters every lane's result registers back by the same layout.
// cp.async never meets other threads: each thread keeps its own list of pending copies.
#include "warp_matrix.h"

#include <cuda_fp16.h>

#include <cmath>
#include <cstring>
#include <deque>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace moe_sim {
namespace {

using In = const unsigned char (*)[kWarpPayloadBytes];
using Out = unsigned char (*)[kWarpPayloadBytes];

uint16_t lo16(uint32_t r) { return static_cast<uint16_t>(r & 0xffffu); }
uint16_t hi16(uint32_t r) { return static_cast<uint16_t>(r >> 16); }
uint32_t pack(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }

// ---- ldmatrix -------------------------------------------------------------------------------
// Lane 8*j + r addresses row r of matrix j; the rows are read now, when the whole warp has
// arrived (a GPU reads them at the instruction too). Lane l = 4g + t then receives, per matrix,
// M[g][2t], M[g][2t+1] (or M[2t][g], M[2t+1][g] with .trans) in the low / high half.
template <int kNum, bool kTrans>
void ldmatrix_combine(In in, Out out) {
  uint16_t m[kNum][8][8];
  for (int j = 0; j < kNum; ++j) {
    for (int r = 0; r < 8; ++r) {
      const int lane = 8 * j + r;
      const unsigned char* row;
      std::memcpy(&row, in[lane], sizeof(row));
      if (row == nullptr || reinterpret_cast<uintptr_t>(row) % 16 != 0) {
        std::ostringstream os;
        os << "ldmatrix: lane " << lane << " gives row address " << static_cast<const void*>(row)
           << ", which is not 16-byte aligned (each row of an m8n8 .b16 matrix is 16 aligned bytes)";
        throw std::runtime_error(os.str());
      }
      std::memcpy(m[j][r], row, 16);
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    uint32_t regs[kNum];
    for (int j = 0; j < kNum; ++j)
      regs[j] = kTrans ? pack(m[j][2 * t][g], m[j][2 * t + 1][g]) : pack(m[j][g][2 * t], m[j][g][2 * t + 1]);
    std::memcpy(out[lane], regs, sizeof(regs));
  }
}

constexpr const char* kLdmatrixName[2][3] = {
    {"ldmatrix.x1", "ldmatrix.x2", "ldmatrix.x4"},
    {"ldmatrix.x1.trans", "ldmatrix.x2.trans", "ldmatrix.x4.trans"},
};

// ---- mma.sync.m16n8k16.row.col.f32.{bf16,f16} -----------------------------------------------
struct MmaLane {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};
static_assert(sizeof(MmaLane) <= kWarpPayloadBytes);

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;  // bf16 is the high half of a float
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
float f16_to_float(uint16_t h) {
  __half_raw raw;
  raw.x = h;
  return __half2float(__half(raw));
}

// Gathers A (16x16), B (16x8, k x n) and C (16x8) from the lanes' fragments, computes
// D[i][j] = fma chain over k = 0..15 starting from C[i][j] (each product of two 16-bit values is
// exact in float; one float rounding per step), and scatters D by C's layout. A GPU's internal
// summation order is unspecified; this one is fixed and documented (docs/sim.md).
template <MmaInput kType>
void mma_combine(In in, Out out) {
  auto conv = [](uint16_t h) { return kType == MmaInput::kBF16 ? bf16_to_float(h) : f16_to_float(h); };
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    MmaLane L;
    std::memcpy(&L, in[lane], sizeof(L));
    const int g = lane >> 2, t = lane & 3;
    for (int r = 0; r < 4; ++r) {  // a[r] = elements a_{2r}, a_{2r+1}
      const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
      A[row][col] = conv(lo16(L.a[r]));
      A[row][col + 1] = conv(hi16(L.a[r]));
    }
    for (int r = 0; r < 2; ++r) {  // b[r] = elements b_{2r}, b_{2r+1}
      const int k = 2 * t + 8 * r;
      B[k][g] = conv(lo16(L.b[r]));
      B[k + 1][g] = conv(hi16(L.b[r]));
    }
    for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = L.c[i];
  }
  float D[16][8];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      float acc = C[i][j];
      for (int k = 0; k < 16; ++k) acc = std::fma(A[i][k], B[k][j], acc);
      D[i][j] = acc;
    }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    float d[4];
    for (int i = 0; i < 4; ++i) d[i] = D[g + 8 * (i >> 1)][2 * t + (i & 1)];
    std::memcpy(out[lane], d, sizeof(d));
  }
}

// ---- cp.async -------------------------------------------------------------------------------
struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  int size, src_bytes;
};
// This thread's copies: issued but not committed, and the committed groups, oldest first.
thread_local std::vector<AsyncCopy> t_open;
thread_local std::deque<std::vector<AsyncCopy>> t_groups;

}  // namespace

void ldmatrix(int num, bool trans, uint32_t* regs, const void* smem_row) {
  static constexpr WarpCombine kCombine[2][3] = {
      {ldmatrix_combine<1, false>, ldmatrix_combine<2, false>, ldmatrix_combine<4, false>},
      {ldmatrix_combine<1, true>, ldmatrix_combine<2, true>, ldmatrix_combine<4, true>},
  };
  const int which = num == 1 ? 0 : num == 2 ? 1 : num == 4 ? 2 : -1;
  if (which < 0) throw std::runtime_error("ldmatrix: .num is x1, x2 or x4");
  warp_exchange(kLdmatrixName[trans][which], kCombine[trans][which], &smem_row, sizeof(smem_row), regs,
                sizeof(uint32_t) * num);
}

void mma_m16n8k16(MmaInput type, float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  MmaLane L;
  std::memcpy(L.a, a, sizeof(L.a));
  std::memcpy(L.b, b, sizeof(L.b));
  std::memcpy(L.c, c, sizeof(L.c));
  if (type == MmaInput::kBF16)
    warp_exchange("mma.sync.m16n8k16.bf16", mma_combine<MmaInput::kBF16>, &L, sizeof(L), d, 4 * sizeof(float));
  else warp_exchange("mma.sync.m16n8k16.f16", mma_combine<MmaInput::kF16>, &L, sizeof(L), d, 4 * sizeof(float));
}

void cp_async(void* smem_dst, const void* gmem_src, int cp_size, int src_bytes) {
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) throw std::runtime_error("cp.async: cp-size is 4, 8 or 16");
  if (src_bytes < 0 || src_bytes > cp_size) {
    throw std::runtime_error("cp.async: src-size " + std::to_string(src_bytes) + " outside [0, " +
                             std::to_string(cp_size) + "]");
  }
  const auto d = reinterpret_cast<uintptr_t>(smem_dst), s = reinterpret_cast<uintptr_t>(gmem_src);
  if (d == 0 || d % cp_size != 0 || (src_bytes > 0 && (s == 0 || s % cp_size != 0))) {
    std::ostringstream os;
    os << "cp.async: " << cp_size << "-byte copy " << gmem_src << " -> " << smem_dst << ": both addresses must be "
       << cp_size << "-byte aligned";
    throw std::runtime_error(os.str());
  }
  t_open.push_back(
      {static_cast<unsigned char*>(smem_dst), static_cast<const unsigned char*>(gmem_src), cp_size, src_bytes});
}

void cp_async_commit() {
  t_groups.emplace_back(std::move(t_open));  // an empty group is a group, as in PTX
  t_open.clear();
}

void cp_async_wait(int n) {
  while (static_cast<int>(t_groups.size()) > n) {
    for (const AsyncCopy& c : t_groups.front()) {
      if (c.src_bytes) std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(c.dst + c.src_bytes, 0, c.size - c.src_bytes);
    }
    t_groups.pop_front();
  }
}

void cp_async_reset() {
  t_open.clear();
  t_groups.clear();
}

}  // namespace moe_sim
