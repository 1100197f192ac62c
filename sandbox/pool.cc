// SandboxPool: a fixed set of worker threads draining a bounded queue of runs.
#include <utility>

#include "absl/strings/str_cat.h"
#include "model/base/logging.h"
#include "sandbox/sandbox.h"

namespace retort::sandbox {

SandboxPool::SandboxPool(const Sandbox* sandbox, int num_workers, int queue_capacity)
    : sandbox_(sandbox), queue_capacity_(queue_capacity) {
  CHECK(sandbox != nullptr);
  CHECK_GT(num_workers, 0);
  CHECK_GT(queue_capacity, 0);
  workers_.reserve(num_workers);
  for (int i = 0; i < num_workers; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

SandboxPool::~SandboxPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  not_empty_.notify_all();
  not_full_.notify_all();
  for (std::thread& t : workers_) t.join();
}

absl::StatusOr<std::future<absl::StatusOr<RunResult>>> SandboxPool::TrySubmit(RunRequest request) {
  std::unique_lock<std::mutex> lock(mu_);
  if (static_cast<int>(queue_.size()) >= queue_capacity_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("sandbox pool queue is full (", queue_capacity_, " waiting)"));
  }
  const Sandbox* sandbox = sandbox_;
  queue_.push_back(Job{[sandbox, r = std::move(request)] { return sandbox->Run(r); }, {}});
  auto future = queue_.back().promise.get_future();
  lock.unlock();
  not_empty_.notify_one();
  return future;
}

std::future<absl::StatusOr<RunResult>> SandboxPool::Submit(RunRequest request) {
  const Sandbox* sandbox = sandbox_;
  return SubmitTask([sandbox, r = std::move(request)] { return sandbox->Run(r); });
}

std::future<absl::StatusOr<RunResult>> SandboxPool::SubmitTask(Task task) {
  std::unique_lock<std::mutex> lock(mu_);
  not_full_.wait(lock, [&] { return static_cast<int>(queue_.size()) < queue_capacity_; });
  queue_.push_back(Job{std::move(task), {}});
  auto future = queue_.back().promise.get_future();
  lock.unlock();
  not_empty_.notify_one();
  return future;
}

absl::StatusOr<RunResult> SandboxPool::Run(RunRequest request) {
  return Submit(std::move(request)).get();
}

void SandboxPool::WorkerLoop() {
  for (;;) {
    std::unique_lock<std::mutex> lock(mu_);
    not_empty_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_ and nothing left
    Job job = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    not_full_.notify_one();
    job.promise.set_value(job.task());
  }
}

}  // namespace retort::sandbox
