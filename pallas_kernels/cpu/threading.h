// Parallel loops of the native CPU kernels on XLA's intra-op pool (the FFI's ThreadPool).
// Work items [0, n) are claimed one at a time from an atomic counter by the calling thread
// and by up to num_threads - 1 pool tasks; the caller works too and then waits for the
// items the others claimed. A task that starts late (the pool busy) finds nothing left
// and returns without touching the loop's body, so a busy pool never deadlocks a call.

#ifndef JAXSERVE_PALLAS_KERNELS_CPU_THREADING_H_
#define JAXSERVE_PALLAS_KERNELS_CPU_THREADING_H_

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace jaxserve_cpu {

// The threads a parallel loop can run on, the caller included (at least 1).
inline int64_t NumWorkers(xla::ffi::ThreadPool& pool) {
  return std::max<int64_t>(pool.num_threads(), 1);
}

struct WorkState {
  std::atomic<int64_t> next{0};  // the next item to claim
  std::atomic<int64_t> done{0};  // items finished
  std::atomic<int> workers{0};   // threads that found work: the next worker index
};

// Runs `work` on `tasks` pool threads and on the caller, then waits until `n` items are
// done (the workers count them in state.done), spinning a while before it yields.
template <typename W>
void RunAndWait(xla::ffi::ThreadPool& pool, int64_t tasks, const W& work,
                const WorkState& state, int64_t n) {
  for (int64_t t = 0; t < tasks; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  int spins = 0;
  while (state.done.load(std::memory_order_acquire) < n) {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
    if (++spins > 4096) std::this_thread::yield();
  }
}

// f(i, worker) where f takes a worker index, else f(i).
template <typename F>
inline void CallItem(const F& f, int64_t i, int worker) {
  if constexpr (std::is_invocable_v<const F&, int64_t, int>) {
    f(i, worker);
  } else {
    f(i);
  }
}

// Runs f(i), or f(i, worker), for every i in [0, n) and returns when all are done.
// `worker` is in [0, NumWorkers(pool)) and differs between the threads of one loop (an
// index into per-thread scratch). There is no size threshold: threading pays even for the
// smallest products the kernels see (one row, K = 512, N = 128).
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const F& f) {
  if (n <= 0) return;
  const int64_t threads = NumWorkers(pool);
  if (threads == 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) CallItem(f, i, 0);
    return;
  }
  auto state = std::make_shared<WorkState>();
  const F* fp = &f;
  auto work = [state, fp, n]() {
    const int worker = state->workers.fetch_add(1, std::memory_order_relaxed);
    for (;;) {
      const int64_t i = state->next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;  // a late task finds nothing left and never touches *fp
      CallItem(*fp, i, worker);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  RunAndWait(pool, std::min<int64_t>(threads, n) - 1, work, *state, n);
}

// Like ParallelFor, but each thread claims its next item before working on the current
// one and calls f(item, next) (next = -1 when there is none), so f can prefetch what
// `next` reads while it computes `item`.
template <typename F>
void ParallelForAhead(xla::ffi::ThreadPool& pool, int64_t n, const F& f) {
  if (n <= 0) return;
  const int64_t threads = NumWorkers(pool);
  if (threads == 1 || n == 1) {
    for (int64_t i = 0; i < n; ++i) f(i, i + 1 < n ? i + 1 : -1);
    return;
  }
  auto state = std::make_shared<WorkState>();
  const F* fp = &f;
  auto work = [state, fp, n]() {
    int64_t i = state->next.fetch_add(1, std::memory_order_relaxed);
    while (i < n) {  // a late task finds nothing left and never touches *fp
      const int64_t j = state->next.fetch_add(1, std::memory_order_relaxed);
      (*fp)(i, j < n ? j : -1);
      state->done.fetch_add(1, std::memory_order_release);
      i = j;
    }
  };
  RunAndWait(pool, std::min<int64_t>(threads, n) - 1, work, *state, n);
}

}  // namespace jaxserve_cpu

#endif  // JAXSERVE_PALLAS_KERNELS_CPU_THREADING_H_
