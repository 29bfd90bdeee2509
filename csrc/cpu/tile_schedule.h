// The tile scheduler of the CPU GEMMs: work is cut into (expert, column block, row chunk) tiles
// whose weight block fits in L2 and which write disjoint outputs; the tiles are split into one
// contiguous, cost-balanced range per thread and run with at::parallel_for. Because every output
// element's arithmetic is fixed by the kernels (gemm_nt.h, gemm_panels.h), the result does not
// depend on the split, i.e. not on the thread count. So a decode step (one row per expert) still
// spreads each expert's weights over all cores and reads them once, and a prefill expert with many
// rows reads each weight block once per row chunk.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace moe_cpu {

struct Tile {
  int64_t e;       // expert
  int64_t m0, m1;  // rows [m0, m1) (absolute rows of the packed operand)
  int64_t n0, n1;  // output columns [n0, n1)
  double cost;
};

// Runs fn(tile, next) for every tile (next: the tile this thread runs after it, or nullptr -- for
// prefetching its weights); each thread gets one contiguous range of roughly equal cost, so
// consecutive tiles (same expert, same weight block) stay on one core's caches.
template <class Fn>
void run_tiles(const std::vector<Tile>& tiles, Fn&& fn) {
  const int64_t n = static_cast<int64_t>(tiles.size());
  if (n == 0) return;
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n);
  if (nt <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) fn(tiles[i], i + 1 < n ? &tiles[i + 1] : nullptr);
    return;
  }
  double total = 0;
  for (const Tile& t : tiles) total += t.cost;
  std::vector<int64_t> split(static_cast<size_t>(nt + 1), n);
  split[0] = 0;
  double run = 0;
  int64_t part = 1;
  for (int64_t i = 0; i < n && part < nt; ++i) {
    run += tiles[i].cost;
    while (part < nt && run >= total * part / nt) split[part++] = i + 1;
  }
  at::parallel_for(0, nt, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t i = split[p]; i < split[p + 1]; ++i) fn(tiles[i], i + 1 < split[p + 1] ? &tiles[i + 1] : nullptr);
  });
}

// Column block so that one block of weights (ncols x K in its dtype) stays in L2 (~96 KiB),
// a multiple of the micro-kernel column groups.
inline int64_t weight_col_block(int64_t K, int64_t elem_size, int64_t N, int64_t mult = 4) {
  int64_t nb = (96 * 1024) / std::max<int64_t>(1, K * elem_size);
  nb = std::max<int64_t>(mult, nb / mult * mult);
  return std::min<int64_t>(nb, std::max<int64_t>(N, 1));
}

// (expert, column-block, row-chunk) tiles in that order over experts [0, E) with row ranges offs,
// columns [0, N) in blocks of nb, rows in chunks of at most mt. `wcost` weights a weight element
// relative to one multiply-add row.
std::vector<Tile> make_tiles(const std::vector<int64_t>& offs, int64_t N, int64_t K, int64_t nb, int64_t mt,
                             double wcost);
// The column block (in multiples of `mult` columns of K values): the weight block in L2, but small
// enough that there are >= 4 tiles per thread when possible (the packed path counts in 16-column
// panels of K*16 values with mult = 1).
int64_t nt_col_block(const std::vector<int64_t>& offs, int64_t N, int64_t K, int64_t es, int64_t mult = 4);

}  // namespace moe_cpu
