// A fixed-size thread pool for CPU kernels, and ParallelFor over an index range.
//
// ParallelFor(n, grain, fn) splits [0, n) into contiguous chunks of at least
// `grain` indices and calls fn(begin, end) on each, the caller's thread
// included; it returns when every chunk is done. Chunks are deterministic for a
// given (n, grain, thread count), so results that depend only on the chunk's
// own indices are bitwise reproducible. Thread-safe; nested calls run inline.
#ifndef RETORT_MODEL_BASE_THREAD_POOL_H_
#define RETORT_MODEL_BASE_THREAD_POOL_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace retort {

class ThreadPool {
 public:
  // `num_threads` workers besides the calling thread (0: run everything inline).
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

  // The process-wide pool: RETORT_NUM_THREADS, else hardware_concurrency().
  static ThreadPool& Default();

 private:
  void WorkerLoop();

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  // The job being run: chunks handed out by next_chunk_.
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_n_ = 0;
  int64_t chunk_size_ = 0;
  int64_t num_chunks_ = 0;
  int64_t next_chunk_ = 0;
  int64_t chunks_done_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::mutex run_mu_;  // one ParallelFor at a time; others run inline
};

inline void ParallelFor(int64_t n, int64_t grain,
                        const std::function<void(int64_t, int64_t)>& fn) {
  ThreadPool::Default().ParallelFor(n, grain, fn);
}

}  // namespace retort

#endif  // RETORT_MODEL_BASE_THREAD_POOL_H_
