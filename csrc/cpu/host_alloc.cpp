// Caching host allocator for the CPU ops' large outputs (see host_alloc.h for the rationale and
// the policy). Also registers introspection ops in the `moe_cpu_cache` namespace (tests, benches;
// deliberately not a `moe_ops*` namespace, which would make them package ops for opcheck/fakes):
//   torch.ops.moe_cpu_cache.stats() -> [cached_bytes, cap_bytes, min_bytes, hits, misses,
//                                         live_bytes, cached_blocks]
//   torch.ops.moe_cpu_cache.configure(cap_bytes, min_bytes) -> previous [cap, min]
//       (a negative argument leaves that setting unchanged; lowering the cap trims the cache)
//   torch.ops.moe_cpu_cache.clear() -> () frees every cached (unused) block
//   torch.ops.moe_cpu_cache.poison_free() -> () NaN-fills (0xFF bytes) every cached block (tests)
#include "host_alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "env.h"

namespace moe_cpu {
namespace {

constexpr size_t kHuge = size_t(2) << 20;   // 2 MiB: granularity and alignment of large blocks
constexpr size_t kLarge = size_t(1) << 20;  // blocks from this size on are mmapped

size_t round_size(size_t n) {
  if (n >= kLarge) return (n + kHuge - 1) / kHuge * kHuge;
  return (n + 63) / 64 * 64;
}

// Raw blocks. Large: an anonymous mapping trimmed to 2 MiB alignment, MADV_HUGEPAGE.
void* raw_alloc(size_t size) {
#if defined(__linux__)
  if (size >= kLarge) {
    const size_t len = size + kHuge;
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    const uintptr_t base = reinterpret_cast<uintptr_t>(p);
    const uintptr_t aligned = (base + kHuge - 1) & ~uintptr_t(kHuge - 1);
    if (aligned > base) munmap(p, aligned - base);
    const uintptr_t end = base + len, used_end = aligned + size;
    if (end > used_end) munmap(reinterpret_cast<void*>(used_end), end - used_end);
#ifdef MADV_HUGEPAGE
    madvise(reinterpret_cast<void*>(aligned), size, MADV_HUGEPAGE);
#endif
    return reinterpret_cast<void*>(aligned);
  }
#endif
  return std::aligned_alloc(64, size);
}

void raw_free(void* p, size_t size) {
  if (!p) return;
#if defined(__linux__)
  if (size >= kLarge) {
    munmap(p, size);
    return;
  }
#endif
  std::free(p);
}

int64_t env_cap_bytes() {
  const char* s = moe_ops::env::get("CPU_CACHE_MB");
  if (!s) return int64_t(512) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(s, &end, 10);
  if (end == s || mb < 0) return int64_t(512) << 20;
  return static_cast<int64_t>(mb) << 20;
}

class CachingHostAllocator final : public c10::Allocator {
 public:
  CachingHostAllocator() : cap_(env_cap_bytes()) {}

  c10::DataPtr allocate(size_t n) override {
    const c10::Device dev(c10::DeviceType::CPU);
    if (n == 0) return {nullptr, nullptr, &deleter, dev};
    const size_t size = round_size(n);
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->second >= size && it->second <= size + size / 4 && (best == free_.end() || it->second < best->second))
          best = it;
      if (best != free_.end()) {
        p = best->first;
        cached_ -= best->second;
        live_[p] = best->second;
        live_bytes_ += best->second;
        free_.erase(best);
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (!p) {
      p = raw_alloc(size);
      if (!p) {  // out of memory: drop the cache and try once more
        clear();
        p = raw_alloc(size);
      }
      TORCH_CHECK(p, "moe_ops (cpu): out of memory allocating ", n, " bytes");
      std::lock_guard<std::mutex> g(mu_);
      live_[p] = size;
      live_bytes_ += size;
    }
    return {p, p, &deleter, dev};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &deleter; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  void release(void* p) {
    if (!p) return;
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = live_.find(p);
      TORCH_INTERNAL_ASSERT(it != live_.end(), "moe_ops host cache: unknown block");
      const size_t size = it->second;
      live_.erase(it);
      live_bytes_ -= size;
      if (static_cast<int64_t>(size) > cap_) {
        drop.emplace_back(p, size);
      } else {
        evict_to(cap_ - static_cast<int64_t>(size), drop);
        free_.emplace_back(p, size);
        cached_ += size;
      }
    }
    for (auto& b : drop) raw_free(b.first, b.second);
  }

  void clear() {
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      evict_to(-1, drop);
    }
    for (auto& b : drop) raw_free(b.first, b.second);
  }

  std::vector<int64_t> configure(int64_t cap, int64_t min_bytes) {
    std::vector<int64_t> old;
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      old = {cap_, min_bytes_};
      if (cap >= 0) cap_ = cap;
      if (min_bytes >= 0) min_bytes_ = min_bytes;
      evict_to(cap_, drop);
    }
    for (auto& b : drop) raw_free(b.first, b.second);
    return old;
  }

  // Whether a request of nbytes goes through the cache (caching enabled and large enough).
  bool use_cache(int64_t nbytes) {
    std::lock_guard<std::mutex> g(mu_);
    return cap_ > 0 && nbytes >= min_bytes_;
  }

  // Fills every cached (free) block with 0xFF bytes -- NaN in float32/float16/bfloat16 -- so a
  // test can prove an op writes every element of the outputs and scratch it takes from the cache.
  void poison_free() {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& b : free_) std::memset(b.first, 0xFF, b.second);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {cached_, cap_, min_bytes_, hits_, misses_, live_bytes_, static_cast<int64_t>(free_.size())};
  }

 private:
  static void deleter(void* p);

  // Unlinks the least recently freed blocks until the cached bytes are <= budget (mu_ held);
  // the caller frees `drop` after unlocking.
  void evict_to(int64_t budget, std::vector<std::pair<void*, size_t>>& drop) {
    while (cached_ > budget && !free_.empty()) {
      drop.push_back(free_.front());
      cached_ -= static_cast<int64_t>(free_.front().second);
      free_.pop_front();
    }
  }

  std::mutex mu_;
  std::list<std::pair<void*, size_t>> free_;  // least recently freed first
  std::unordered_map<void*, size_t> live_;
  int64_t cached_ = 0, live_bytes_ = 0, hits_ = 0, misses_ = 0;
  int64_t cap_;
  int64_t min_bytes_ = int64_t(kLarge);
};

// Leaked on purpose: tensors may be freed during static destruction at exit.
CachingHostAllocator& cache() {
  static CachingHostAllocator* a = new CachingHostAllocator();
  return *a;
}

void CachingHostAllocator::deleter(void* p) { cache().release(p); }

std::vector<int64_t> stats_op() { return cache().stats(); }
std::vector<int64_t> configure_op(int64_t cap, int64_t min_bytes) { return cache().configure(cap, min_bytes); }
void clear_op() { cache().clear(); }
void poison_free_op() { cache().poison_free(); }

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  const int64_t nbytes = n * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (nbytes == 0 || !cache().use_cache(nbytes)) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
}

}  // namespace moe_cpu

TORCH_LIBRARY(moe_cpu_cache, m) {
  m.def("stats() -> int[]", &moe_cpu::stats_op);
  m.def("configure(int cap_bytes, int min_bytes) -> int[]", &moe_cpu::configure_op);
  m.def("clear() -> ()", &moe_cpu::clear_op);
  m.def("poison_free() -> ()", &moe_cpu::poison_free_op);
}
