// Tile construction of the CPU GEMMs (see tile_schedule.h).
#include "tile_schedule.h"

namespace moe_cpu {

// Tiles over experts [0, E) with row ranges offs, columns [0, N) in blocks of nb, rows in chunks
// of at most mt. `wcost` weights a weight element relative to one multiply-add row.
std::vector<Tile> make_tiles(const std::vector<int64_t>& offs, int64_t N, int64_t K, int64_t nb, int64_t mt,
                             double wcost) {
  std::vector<Tile> tiles;
  const int64_t E = static_cast<int64_t>(offs.size()) - 1;
  for (int64_t e = 0; e < E; ++e) {
    if (offs[e + 1] <= offs[e]) continue;
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
      const int64_t n1 = std::min(N, n0 + nb);
      for (int64_t m0 = offs[e]; m0 < offs[e + 1]; m0 += mt) {
        const int64_t m1 = std::min(offs[e + 1], m0 + mt);
        tiles.push_back({e, m0, m1, n0, n1, double(n1 - n0) * K * (double(m1 - m0) + wcost)});
      }
    }
  }
  return tiles;
}

// Column block (in multiples of `mult` columns of K values): weight block in L2, but small
// enough that there are a few tiles per thread even for a single token.
int64_t nt_col_block(const std::vector<int64_t>& offs, int64_t N, int64_t K, int64_t es, int64_t mult) {
  int64_t nb = weight_col_block(K, es, N, mult);
  int64_t active = 0;
  for (size_t e = 0; e + 1 < offs.size(); ++e) active += offs[e + 1] > offs[e];
  const int64_t want = 4 * at::get_num_threads();
  while (nb > mult && active * ((N + nb - 1) / nb) < want) nb = std::max<int64_t>(mult, nb / 2 / mult * mult);
  return nb;
}

}  // namespace moe_cpu
