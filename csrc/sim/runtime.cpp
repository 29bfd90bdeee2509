// SIMT host emulator runtime: runs a __global__ function's grid on OS threads.
//
// Dataflow of one launch (run_grid, serialised by a global mutex):
//   host thread -> validates the configuration -> hands the Launch to blockDim worker threads of
//   a process-wide pool (grown on demand, never shrunk; a forked child starts a new one) -> each
//   worker is one CUDA thread and walks the blocks of the grid in order: run the kernel body,
//   then drop out of the block's barriers, then meet every other thread at the end-of-block
//   barrier, whose last arriver resets the block state (barrier counts, warp membership, poisoned
//   dynamic shared memory) -> host waits for all workers, watching for deadlock, and rethrows the
//   first kernel error.
//
// Every barrier is a std::mutex plus a futex word (std::atomic::wait, see Gate): ThreadSanitizer
// understands both, so the happens-before edges it sees are exactly those a GPU's bar.sync /
// shfl.sync provide.
// A kernel error (exception) sets the launch's abort flag and wakes every waiter; waiters then
// unwind with an internal Aborted exception, so one failing thread never deadlocks the others.
#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "../env.h"
#include "sim.h"
#include "warp_matrix.h"

namespace moe_sim {
namespace {

struct Aborted {};  // unwinds a waiting thread when its launch aborts (never escapes the runtime)

struct Launch;

// Where an emulated thread waits; read by the deadlock report.
enum Site : int { kRunning = 0, kAtSyncthreads, kAtWarp, kAtBlockEnd };

// Per emulated thread state visible to the host (deadlock report).
struct ThreadState {
  std::atomic<int> site{kRunning};
  std::atomic<unsigned> mask{0};
};

struct Launch {
  dim3 grid, block;
  uint64_t nblocks = 0;
  int nthreads = 0, nwarps = 0;
  bool reverse_blocks = false;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::string kernel_name;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;

  std::atomic<bool> abort{false};
  std::mutex err_m;
  std::exception_ptr error;  // the first failure

  // Deadlock detection: threads waiting and not yet released by a completion.
  std::atomic<int> blocked{0};
  std::unique_ptr<ThreadState[]> states;

  std::mutex done_m;
  std::condition_variable done_cv;
  int remaining = 0;

  struct BlockBarrier* bar = nullptr;
  struct WarpBarrier* warps = nullptr;
  struct EndBarrier* end = nullptr;

  void fail(std::exception_ptr e);
};

// The release side of a barrier. Completions happen under the barrier's mutex; waiters sleep on
// a futex word (std::atomic::wait) instead of re-taking the mutex, so a barrier of n threads
// costs n wake-ups, not n serialised mutex hand-offs. `gen` carries the happens-before (release
// by the completer, acquire by each waiter): that is the edge ThreadSanitizer sees.
struct Gate {
  std::atomic<uint32_t> gen{0};  // completions
  std::atomic<uint32_t> seq{0};  // futex word: bumped on every completion and on abort

  // With `lk` held and this thread arrived: completer side.
  void release(Launch& L, int waiters) {
    L.blocked.fetch_sub(waiters);
    gen.fetch_add(1, std::memory_order_release);
    seq.fetch_add(1, std::memory_order_release);
    seq.notify_all();
  }
  void poke() {
    seq.fetch_add(1, std::memory_order_seq_cst);
    seq.notify_all();
  }
  // With `lk` held and this thread arrived: waits (lock released) until a completion after this
  // arrival, or throws Aborted when `abortable` and the launch aborts. Launch::blocked stays exact:
  // the completer decrements it for the waiters it releases.
  void wait(Launch& L, std::unique_lock<std::mutex>& lk, bool abortable) {
    const uint32_t g = gen.load(std::memory_order_relaxed);
    uint32_t s = seq.load(std::memory_order_acquire);
    L.blocked.fetch_add(1);
    lk.unlock();
    for (;;) {
      if (gen.load(std::memory_order_acquire) != g) return;
      if (abortable && L.abort.load()) {
        L.blocked.fetch_sub(1);
        throw Aborted{};
      }
      seq.wait(s, std::memory_order_acquire);
      s = seq.load(std::memory_order_acquire);
    }
  }
};

// __syncthreads: a block barrier that threads leave when they return from the kernel.
struct BlockBarrier {
  std::mutex m;
  Gate gate;
  int expected = 0, arrived = 0, pred_count = 0;
  int result_count = 0;  // valid until this thread's next arrival (which the next gen needs)
  int result_arrivals = 0;

  void complete_locked(Launch& L, int waiters) {
    result_count = pred_count;
    result_arrivals = arrived;
    arrived = pred_count = 0;
    gate.release(L, waiters);
  }
  int arrive(Launch& L, int tid, int pred, int* arrivals) {
    std::unique_lock<std::mutex> lk(m);
    if (L.abort.load()) throw Aborted{};
    ++arrived;
    pred_count += pred != 0;
    if (arrived >= expected) {
      complete_locked(L, arrived - 1);
    } else {
      L.states[tid].site.store(kAtSyncthreads);
      gate.wait(L, lk, true);
      L.states[tid].site.store(kRunning);
    }
    if (arrivals) *arrivals = result_arrivals;
    return result_count;
  }
  void drop(Launch& L) {
    std::lock_guard<std::mutex> lk(m);
    --expected;
    if (arrived > 0 && arrived >= expected) complete_locked(L, arrived);
  }
  void reset(int n) {
    std::lock_guard<std::mutex> lk(m);
    expected = n;
    arrived = pred_count = 0;
  }
  void wake() { gate.poke(); }
};

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kShfl: return "__shfl*_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kMatchAny: return "__match_any_sync";
    default: return "__reduce_*_sync";
  }
}

// A warp_exchange call: the lane's payload and where its result goes.
struct Exchange {
  const char* what;
  WarpCombine combine;
  const void* in;
  size_t in_bytes;
  void* out;
  size_t out_bytes;
};

// One warp's collectives: lanes named in the mask (and still running) meet, each leaves its
// value, and the last arriver computes every lane's result. An exchange (warp_exchange: ldmatrix,
// mma) carries a per-lane payload instead and needs all 32 lanes.
struct WarpBarrier {
  std::mutex m;
  Gate gate;
  unsigned exists = 0;  // lanes of this warp that exist in the block (a partial last warp has fewer)
  unsigned live = 0;    // lanes that have not returned from the kernel in this block
  unsigned arrived = 0, gen_mask = 0;
  WarpOp op = WarpOp::kSync;
  uint64_t val[32];
  int src[32];
  uint64_t result[32];
  std::string error[32];  // a lane's collective went wrong (e.g. read from a lane not taking part)
  // The exchange being met (nullptr: an intrinsic of `op`), its per-lane inputs and results.
  WarpCombine combine = nullptr;
  const char* what = nullptr;
  alignas(16) unsigned char payload_in[32][kWarpPayloadBytes];
  alignas(16) unsigned char payload_out[32][kWarpPayloadBytes];

  const char* name(WarpOp o, const Exchange* x) const { return x ? x->what : op_name(o); }

  // The last arrival of an exchange: every lane must be there (PTX: .aligned instructions are
  // undefined when a thread of the warp has exited); then one combine computes all results.
  void complete_exchange_locked(unsigned members) {
    std::string err;
    if (members != 0xffffffffu) {
      std::ostringstream os;
      os << what << ": all 32 lanes of the warp must execute it, but lanes 0x" << std::hex << (~members)
         << " did not (returned from the kernel)";
      err = os.str();
    } else {
      try {
        combine(payload_in, payload_out);
      } catch (const std::exception& e) { err = e.what(); }
    }
    for (int l = 0; l < 32; ++l)
      if (members >> l & 1u) error[l] = err;
  }

  void complete_locked(Launch& L, int waiters) {
    const unsigned members = arrived;
    if (combine) {
      complete_exchange_locked(members);
      arrived = 0;
      gate.release(L, waiters);
      return;
    }
    uint64_t common = 0;
    switch (op) {
      case WarpOp::kBallot:
      case WarpOp::kAny:
      case WarpOp::kAll: {
        unsigned ballot = 0;
        for (int l = 0; l < 32; ++l)
          if ((members >> l & 1u) && val[l]) ballot |= 1u << l;
        common = op == WarpOp::kBallot ? ballot : op == WarpOp::kAny ? ballot != 0 : ballot == members;
        break;
      }
      case WarpOp::kAddU:
      case WarpOp::kAddI:
      case WarpOp::kAnd:
      case WarpOp::kOr:
      case WarpOp::kXor:
      case WarpOp::kMinU:
      case WarpOp::kMaxU:
      case WarpOp::kMinI:
      case WarpOp::kMaxI: {
        bool first = true;
        uint32_t acc = 0;
        for (int l = 0; l < 32; ++l) {
          if (!(members >> l & 1u)) continue;
          const uint32_t v = static_cast<uint32_t>(val[l]);
          if (first) {
            acc = v;
            first = false;
            continue;
          }
          switch (op) {
            case WarpOp::kAddU:
            case WarpOp::kAddI: acc += v; break;
            case WarpOp::kAnd: acc &= v; break;
            case WarpOp::kOr: acc |= v; break;
            case WarpOp::kXor: acc ^= v; break;
            case WarpOp::kMinU: acc = std::min(acc, v); break;
            case WarpOp::kMaxU: acc = std::max(acc, v); break;
            case WarpOp::kMinI:
              acc = static_cast<uint32_t>(std::min(static_cast<int32_t>(acc), static_cast<int32_t>(v)));
              break;
            case WarpOp::kMaxI:
              acc = static_cast<uint32_t>(std::max(static_cast<int32_t>(acc), static_cast<int32_t>(v)));
              break;
            default: break;
          }
        }
        common = acc;
        break;
      }
      default: break;
    }
    for (int l = 0; l < 32; ++l) {
      if (!(members >> l & 1u)) continue;
      error[l].clear();
      if (op == WarpOp::kShfl) {
        const int s = src[l];
        if (s < 0 || s >= 32 || !(members >> s & 1u)) {
          std::ostringstream os;
          os << "__shfl*_sync: lane " << l << " reads lane " << s << ", which is not taking part (mask 0x" << std::hex
             << gen_mask << ", lanes present 0x" << members << ")";
          error[l] = os.str();
        } else {
          result[l] = val[s];
        }
      } else if (op == WarpOp::kMatchAny) {
        unsigned same = 0;
        for (int o = 0; o < 32; ++o)
          if ((members >> o & 1u) && val[o] == val[l]) same |= 1u << o;
        result[l] = same;
      } else {
        result[l] = common;
      }
    }
    arrived = 0;
    gate.release(L, waiters);
  }

  uint64_t arrive(Launch& L, int tid, int lane, unsigned mask, WarpOp o, uint64_t v, int s,
                  const Exchange* x = nullptr) {
    std::unique_lock<std::mutex> lk(m);
    if (L.abort.load()) throw Aborted{};
    const unsigned bit = 1u << lane;
    if (x && exists != 0xffffffffu) {
      std::ostringstream os;
      os << x->what << ": needs a full warp of 32 threads, this one has " << __builtin_popcount(exists)
         << " (make the block size a multiple of 32)";
      throw std::runtime_error(os.str());
    }
    if (!(mask & bit)) {
      std::ostringstream os;
      os << name(o, x) << ": lane " << lane << " calls it with mask 0x" << std::hex << mask
         << " that does not name the lane";
      throw std::runtime_error(os.str());
    }
    if (mask & ~exists) {
      std::ostringstream os;
      os << name(o, x) << ": mask 0x" << std::hex << mask << " names lanes that do not exist in this warp (0x" << exists
         << ")";
      throw std::runtime_error(os.str());
    }
    const WarpCombine comb = x ? x->combine : nullptr;
    if (arrived != 0 && (mask != gen_mask || o != op || comb != combine)) {
      std::ostringstream os;
      os << "divergent warp collectives: lane " << lane << " calls " << name(o, x) << " with mask 0x" << std::hex
         << mask << " while lanes 0x" << arrived << " wait in " << (combine ? what : op_name(op)) << " with mask 0x"
         << gen_mask << " (the emulator needs the lanes of a mask to meet in the same intrinsic)";
      throw std::runtime_error(os.str());
    }
    if (arrived == 0) {
      gen_mask = mask;
      op = o;
      combine = comb;
      what = x ? x->what : nullptr;
    }
    if (x) std::memcpy(payload_in[lane], x->in, x->in_bytes);
    val[lane] = v;
    src[lane] = s;
    arrived |= bit;
    if (arrived == (gen_mask & live)) {
      complete_locked(L, __builtin_popcount(arrived) - 1);
    } else {
      L.states[tid].site.store(kAtWarp);
      L.states[tid].mask.store(mask);
      gate.wait(L, lk, true);
      L.states[tid].site.store(kRunning);
    }
    if (!error[lane].empty()) throw std::runtime_error(error[lane]);
    // The next completion needs this lane's next arrival: payload_out[lane] is still ours.
    if (x) std::memcpy(x->out, payload_out[lane], x->out_bytes);
    return result[lane];
  }
  void drop(Launch& L, int lane) {
    std::lock_guard<std::mutex> lk(m);
    live &= ~(1u << lane);
    if (arrived != 0 && arrived == (gen_mask & live)) complete_locked(L, __builtin_popcount(arrived));
  }
  void reset() {
    std::lock_guard<std::mutex> lk(m);
    live = exists;
    arrived = 0;
  }
  unsigned live_mask() {
    std::lock_guard<std::mutex> lk(m);
    return live;
  }
  void wake() { gate.poke(); }
};

// The end of a block: every thread of the launch (returned or not) meets here; the last one
// prepares the next block. Not abortable: it is how an aborted block winds down.
struct EndBarrier {
  std::mutex m;
  Gate gate;
  int arrived = 0;
  bool stop = false;

  bool arrive(Launch& L, int tid) {
    std::unique_lock<std::mutex> lk(m);
    if (++arrived == L.nthreads) {
      L.bar->reset(L.nthreads);
      for (int w = 0; w < L.nwarps; ++w) L.warps[w].reset();
      // Shared memory is not zeroed on a GPU: poison it so a read-before-write shows (NaN / -1).
      if (L.smem_bytes) std::memset(L.smem, 0xff, L.smem_bytes);
      stop = L.abort.load();
      arrived = 0;
      gate.release(L, L.nthreads - 1);
    } else {
      L.states[tid].site.store(kAtBlockEnd);
      gate.wait(L, lk, false);
      L.states[tid].site.store(kRunning);
    }
    return stop;
  }
};

void Launch::fail(std::exception_ptr e) {
  {
    std::lock_guard<std::mutex> lk(err_m);
    if (!error) error = e;
  }
  abort.store(true);
  bar->wake();
  for (int w = 0; w < nwarps; ++w) warps[w].wake();
}

// ---- per-thread context -------------------------------------------------------------------
struct ThreadCtx {
  Launch* launch = nullptr;
  int tid = 0, lane = 0, warp = 0;
};
thread_local ThreadCtx tls;

ThreadCtx& ctx_or_die(const char* what) {
  if (!tls.launch) {
    throw std::runtime_error(std::string("moe_ops sim: ") + what + " called outside an emulated kernel");
  }
  return tls;
}

std::string where_prefix() {
  std::ostringstream os;
  os << "moe_ops sim: kernel " << (tls.launch ? tls.launch->kernel_name : "?") << ", block (" << blockIdx.x << ","
     << blockIdx.y << "," << blockIdx.z << "), thread (" << threadIdx.x << "," << threadIdx.y << "," << threadIdx.z
     << "): ";
  return os.str();
}

void run_thread(Launch& L, int tid) {
  tls.launch = &L;
  tls.tid = tid;
  tls.lane = tid % 32;
  tls.warp = tid / 32;
  blockDim = L.block;
  gridDim = L.grid;
  threadIdx = make_uint3(tid % L.block.x, (tid / L.block.x) % L.block.y, tid / (L.block.x * L.block.y));
  bool stop = false;
  for (uint64_t i = 0; i < L.nblocks && !stop; ++i) {
    const uint64_t b = L.reverse_blocks ? L.nblocks - 1 - i : i;
    blockIdx = make_uint3(static_cast<unsigned>(b % L.grid.x), static_cast<unsigned>((b / L.grid.x) % L.grid.y),
                          static_cast<unsigned>(b / (static_cast<uint64_t>(L.grid.x) * L.grid.y)));
    cp_async_reset();  // copies left pending in the previous block died with its shared memory
    if (!L.abort.load()) {
      try {
        L.body(L.ctx);
      } catch (const Aborted&) {
      } catch (const std::exception& e) {
        L.fail(std::make_exception_ptr(std::runtime_error(where_prefix() + e.what())));
      } catch (...) { L.fail(std::make_exception_ptr(std::runtime_error(where_prefix() + "unknown exception"))); }
    }
    // Returned (or unwound): leave this block's barriers so the threads still running can meet.
    L.bar->drop(L);
    L.warps[tls.warp].drop(L, tls.lane);
    stop = L.end->arrive(L, tid);
  }
  cp_async_reset();  // and those of the last block (pool threads serve later launches)
  tls = ThreadCtx{};
  blockDim = dim3(0, 0, 0);
  gridDim = dim3(0, 0, 0);
}

// ---- worker pool --------------------------------------------------------------------------
struct Worker {
  std::mutex m;
  std::condition_variable cv;
  Launch* job = nullptr;
  int id = 0;
};

void* worker_main(void* arg) {
  Worker& w = *static_cast<Worker*>(arg);
  for (;;) {
    Launch* L;
    {
      std::unique_lock<std::mutex> lk(w.m);
      w.cv.wait(lk, [&] { return w.job != nullptr; });
      L = w.job;
      w.job = nullptr;
    }
    run_thread(*L, w.id);
    std::lock_guard<std::mutex> lk(L->done_m);
    if (--L->remaining == 0) L->done_cv.notify_all();
  }
  return nullptr;
}

std::mutex g_launch_mutex;  // one launch at a time (torch may call ops from several threads)
// Workers live for the whole process (leaked on purpose: they are blocked on their cv at exit).
std::vector<Worker*>*& pool_ptr() {
  static auto* p = new std::vector<Worker*>();
  return p;
}
std::vector<Worker*>& pool() { return *pool_ptr(); }

// fork() copies the pool's Worker objects into the child but none of their threads: a launch
// there would hand its job to workers that never run it and wait forever (nothing is blocked at a
// barrier, so the deadlock detector stays silent). So the child starts from an empty pool and
// grows a new one on its first launch. Holding the launch mutex across fork() means no launch is
// in flight: the abandoned Workers are idle and nothing of theirs is needed (or freed: a worker
// of the parent may have held its mutex at that instant). The child's copy of the mutex is the
// one the forking thread locked, so it unlocks it.
void atfork_prepare() { g_launch_mutex.lock(); }
void atfork_parent() { g_launch_mutex.unlock(); }
void atfork_child() {
  pool_ptr() = new std::vector<Worker*>();
  g_launch_mutex.unlock();
}
[[maybe_unused]] const int g_atfork_registered = pthread_atfork(atfork_prepare, atfork_parent, atfork_child);

void grow_pool(int n) {
  auto& p = pool();
  while (static_cast<int>(p.size()) < n) {
    auto* w = new Worker();
    w->id = static_cast<int>(p.size());
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 2u << 20);  // kernels keep little on the stack; 1024 threads
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    const int rc = pthread_create(&t, &attr, worker_main, w);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
      delete w;
      throw std::runtime_error("moe_ops sim: cannot create emulator thread " + std::to_string(p.size()) +
                               " (pthread_create error " + std::to_string(rc) + ")");
    }
    p.push_back(w);
  }
}

std::string kernel_name(const void* kernel) {
  Dl_info info;
  if (kernel && dladdr(kernel, &info) && info.dli_sname) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string s = (status == 0 && d) ? d : info.dli_sname;
    std::free(d);
    return s;
  }
  std::ostringstream os;
  os << kernel;
  return os.str();
}

std::string deadlock_report(Launch& L) {
  int at_sync = 0, at_end = 0, at_warp = 0;
  std::ostringstream warps;
  for (int t = 0; t < L.nthreads; ++t) {
    switch (L.states[t].site.load()) {
      case kAtSyncthreads: ++at_sync; break;
      case kAtBlockEnd: ++at_end; break;
      case kAtWarp:
        if (at_warp++ < 4)
          warps << " thread " << t << " (warp " << t / 32 << ") in a warp intrinsic with mask 0x" << std::hex
                << L.states[t].mask.load() << std::dec << ";";
        break;
      default: break;
    }
  }
  std::ostringstream os;
  os << "moe_ops sim: kernel " << L.kernel_name << " deadlocked: " << at_sync << " threads wait in __syncthreads, "
     << at_warp << " in warp intrinsics, " << at_end
     << " have returned (a __syncthreads or *_sync that not every named thread reaches, or a mask naming lanes "
        "that never arrive)."
     << warps.str();
  return os.str();
}

}  // namespace

// ---- public entry points ----------------------------------------------------------------------
void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const void* kernel, void (*body)(void*), void* ctx) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  if (tls.launch) throw std::runtime_error("moe_ops sim: a kernel launched a kernel (not supported)");
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.y > 65535 ||
      grid.z > 65535 || grid.x > 0x7fffffffu) {
    std::ostringstream os;
    os << "moe_ops sim: invalid launch configuration for " << kernel_name(kernel) << ": grid (" << grid.x << ","
       << grid.y << "," << grid.z << "), block (" << block.x << "," << block.y << "," << block.z
       << ") (CUDA: cudaErrorInvalidConfiguration)";
    throw std::runtime_error(os.str());
  }
  constexpr size_t kMaxSmem = 227 * 1024;  // sm_90 opt-in maximum per block
  if (smem_bytes > kMaxSmem) {
    throw std::runtime_error("moe_ops sim: " + std::to_string(smem_bytes) + " bytes of dynamic shared memory for " +
                             kernel_name(kernel) + " exceed the 227 KiB a block can have");
  }

  std::lock_guard<std::mutex> launch_lock(g_launch_mutex);
  Launch L;
  L.grid = grid;
  L.block = block;
  L.nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  L.nthreads = static_cast<int>(nthreads);
  L.nwarps = (L.nthreads + 31) / 32;
  L.body = body;
  L.ctx = ctx;
  L.kernel_name = kernel_name(kernel);
  const char* order = moe_ops::env::get("SIM_BLOCK_ORDER");
  L.reverse_blocks = order && std::string(order) == "reverse";
  L.states.reset(new ThreadState[L.nthreads]);

  // Exact-size heap buffer: ASan reports an access just past the dynamic shared memory.
  std::unique_ptr<unsigned char, void (*)(unsigned char*)> smem(
      static_cast<unsigned char*>(::operator new(smem_bytes, std::align_val_t(16))),
      [](unsigned char* p) { ::operator delete(p, std::align_val_t(16)); });
  L.smem = smem.get();
  L.smem_bytes = smem_bytes;
  if (smem_bytes) std::memset(L.smem, 0xff, smem_bytes);

  BlockBarrier bar;
  std::unique_ptr<WarpBarrier[]> warps(new WarpBarrier[L.nwarps]);
  EndBarrier end;
  L.bar = &bar;
  L.warps = warps.get();
  L.end = &end;
  bar.reset(L.nthreads);
  for (int w = 0; w < L.nwarps; ++w) {
    const int n = std::min(32, L.nthreads - 32 * w);
    warps[w].exists = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
    warps[w].reset();
  }

  grow_pool(L.nthreads);
  L.remaining = L.nthreads;
  auto& p = pool();
  for (int t = 0; t < L.nthreads; ++t) {
    {
      std::lock_guard<std::mutex> lk(p[t]->m);
      p[t]->job = &L;
    }
    p[t]->cv.notify_one();
  }

  // Wait, and declare a deadlock when every thread waits unreleased on two looks a second apart.
  const char* deadlock_env = moe_ops::env::get("SIM_DEADLOCK_SECONDS");
  const double deadlock_s = deadlock_env ? std::atof(deadlock_env) : 2.0;
  {
    std::unique_lock<std::mutex> lk(L.done_m);
    int stuck_looks = 0;
    while (L.remaining > 0) {
      if (L.done_cv.wait_for(lk, std::chrono::milliseconds(500), [&] { return L.remaining == 0; })) break;
      if (deadlock_s <= 0 || L.abort.load()) continue;
      stuck_looks = L.blocked.load() == L.nthreads ? stuck_looks + 1 : 0;
      if (stuck_looks * 0.5 >= deadlock_s) {
        L.fail(std::make_exception_ptr(std::runtime_error(deadlock_report(L))));
        stuck_looks = 0;
      }
    }
  }
  if (L.error) std::rethrow_exception(L.error);
}

void* dynamic_smem() { return ctx_or_die("dynamic shared memory").launch->smem; }

void syncthreads() {
  ThreadCtx& c = ctx_or_die("__syncthreads");
  c.launch->bar->arrive(*c.launch, c.tid, 0, nullptr);
}
int syncthreads_count(int pred) {
  ThreadCtx& c = ctx_or_die("__syncthreads_count");
  return c.launch->bar->arrive(*c.launch, c.tid, pred, nullptr);
}
bool syncthreads_or(int pred) { return syncthreads_count(pred) != 0; }
bool syncthreads_and(int pred) {
  ThreadCtx& c = ctx_or_die("__syncthreads_and");
  int arrivals = 0;
  const int n = c.launch->bar->arrive(*c.launch, c.tid, pred, &arrivals);
  return n == arrivals;
}

uint64_t warp_collective(unsigned mask, WarpOp op, uint64_t value, int src) {
  ThreadCtx& c = ctx_or_die("a warp intrinsic");
  return c.launch->warps[c.warp].arrive(*c.launch, c.tid, c.lane, mask, op, value, src);
}

void warp_exchange(const char* what, WarpCombine combine, const void* in, size_t in_bytes, void* out,
                   size_t out_bytes) {
  if (in_bytes > kWarpPayloadBytes || out_bytes > kWarpPayloadBytes)
    throw std::runtime_error(std::string("moe_ops sim: ") + what + ": payload over kWarpPayloadBytes");
  ThreadCtx& c = ctx_or_die(what);
  const Exchange x{what, combine, in, in_bytes, out, out_bytes};
  c.launch->warps[c.warp].arrive(*c.launch, c.tid, c.lane, 0xffffffffu, WarpOp::kSync, 0, 0, &x);
}

unsigned activemask() {
  ThreadCtx& c = ctx_or_die("__activemask");
  return c.launch->warps[c.warp].live_mask();
}

unsigned lane_id() { return static_cast<unsigned>(ctx_or_die("a warp intrinsic").lane); }

void trap(const char* what) { throw std::runtime_error(what); }

}  // namespace moe_sim
