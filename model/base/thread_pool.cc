#include "model/base/thread_pool.h"

#include <algorithm>
#include <cstdlib>

namespace retort {
namespace {
thread_local bool t_inside_pool = false;
}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 0; i < num_threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

ThreadPool& ThreadPool::Default() {
  static ThreadPool* pool = [] {
    int n = static_cast<int>(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("RETORT_NUM_THREADS")) n = std::atoi(env);
    return new ThreadPool(std::max(0, n - 1));
  }();
  return *pool;
}

void ThreadPool::WorkerLoop() {
  t_inside_pool = true;
  uint64_t seen = 0;
  for (;;) {
    std::unique_lock<std::mutex> lock(mu_);
    work_cv_.wait(lock, [&] { return stop_ || (generation_ != seen && next_chunk_ < num_chunks_); });
    if (stop_) return;
    while (next_chunk_ < num_chunks_) {
      int64_t c = next_chunk_++;
      const auto* job = job_;
      int64_t b = c * chunk_size_, e = std::min(job_n_, b + chunk_size_);
      lock.unlock();
      (*job)(b, e);
      lock.lock();
      if (++chunks_done_ == num_chunks_) done_cv_.notify_all();
    }
    seen = generation_;
  }
}

void ThreadPool::ParallelFor(int64_t n, int64_t grain,
                             const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  int64_t max_chunks = (n + grain - 1) / grain;
  int64_t chunks = std::min<int64_t>(max_chunks, num_threads());
  if (chunks <= 1 || workers_.empty() || t_inside_pool) {
    fn(0, n);
    return;
  }
  std::unique_lock<std::mutex> run_lock(run_mu_, std::try_to_lock);
  if (!run_lock.owns_lock()) {  // another thread is using the pool: do it inline
    fn(0, n);
    return;
  }
  std::unique_lock<std::mutex> lock(mu_);
  job_ = &fn;
  job_n_ = n;
  chunk_size_ = (n + chunks - 1) / chunks;
  num_chunks_ = (n + chunk_size_ - 1) / chunk_size_;
  next_chunk_ = 0;
  chunks_done_ = 0;
  ++generation_;
  work_cv_.notify_all();
  t_inside_pool = true;
  while (next_chunk_ < num_chunks_) {
    int64_t c = next_chunk_++;
    int64_t b = c * chunk_size_, e = std::min(n, b + chunk_size_);
    lock.unlock();
    fn(b, e);
    lock.lock();
    ++chunks_done_;
  }
  done_cv_.wait(lock, [&] { return chunks_done_ == num_chunks_; });
  t_inside_pool = false;
  job_ = nullptr;
}

}  // namespace retort
