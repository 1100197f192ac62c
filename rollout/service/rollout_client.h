// Client library for rollout workers: deadlines on every call, retries on
// UNAVAILABLE to the next worker, round-robin over several workers.
//
// Generate() sends a batch to one worker and streams completions back. When
// the worker is unreachable, draining, or dies mid-stream, the requests still
// missing completions are re-sent with the same ids to the next worker in the
// list (round-robin, with backoff) — a restarted worker on the same data
// directory resumes them from its log; another worker regenerates them with
// the same seeds. The callback sees each (request id, sample) exactly once.
//
// Thread-safety: a RolloutClient is safe to share between threads.
#ifndef RETORT_ROLLOUT_SERVICE_ROLLOUT_CLIENT_H_
#define RETORT_ROLLOUT_SERVICE_ROLLOUT_CLIENT_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "model/io/safetensors.h"
#include "retort/v1/rollout.pb.h"

namespace grpc {
class Channel;
}

namespace retort::rollout {

struct RolloutClientOptions {
  std::vector<std::string> workers;              // "host:port" each; required
  absl::Duration deadline = absl::Minutes(10);   // whole call, retries included. Default: 10 min.
  absl::Duration retry_for = absl::Seconds(60);  // give up retrying UNAVAILABLE after this. Default: 60 s.
  absl::Duration backoff = absl::Milliseconds(50);  // first retry delay, doubling to 1 s. Default: 50 ms.
};

class RolloutClient {
 public:
  explicit RolloutClient(RolloutClientOptions options);
  ~RolloutClient();

  // Fills protocol_version. Errors other than UNAVAILABLE return at once
  // (INVALID_ARGUMENT, FAILED_PRECONDITION... with the worker's message).
  [[nodiscard]] absl::Status Generate(const retort::v1::GenerateBatch& batch,
                                      const std::function<void(const retort::v1::Completion&)>& on_completion);
  [[nodiscard]] absl::StatusOr<std::vector<retort::v1::Completion>> GenerateAll(const retort::v1::GenerateBatch& batch);

  // Single-worker calls (worker: index into options.workers).
  [[nodiscard]] absl::StatusOr<retort::v1::StatusResponse> GetStatus(int worker);
  [[nodiscard]] absl::Status Pause(int worker);
  [[nodiscard]] absl::Status Resume(int worker);
  // Aborts on every worker; returns how many ids matched in total.
  [[nodiscard]] absl::StatusOr<int> Abort(const std::vector<std::string>& request_ids);
  // Streams every tensor of `source` (raw bytes, dtype, shape; 1 MiB chunks).
  [[nodiscard]] absl::StatusOr<retort::v1::UpdateWeightsResponse> PushWeights(int worker, const io::TensorSource& source,
                                                                            uint64_t version);
  // Sends raw chunks as given (tests: malformed streams).
  [[nodiscard]] absl::StatusOr<retort::v1::UpdateWeightsResponse> PushChunks(
      int worker, const std::vector<retort::v1::TensorChunk>& chunks);

 private:
  std::shared_ptr<grpc::Channel> Channel(int worker);
  RolloutClientOptions options_;
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::atomic<uint64_t> next_{0};
};

// One prompt, one worker, sample 0 — what `retort generate --worker` needs.
[[nodiscard]] absl::StatusOr<retort::v1::Completion> RemoteGenerate(const std::string& worker,
                                                                   const std::vector<int64_t>& prompt,
                                                                   const retort::v1::SamplingParams& sampling,
                                                                   absl::Duration deadline = absl::Minutes(10));

}  // namespace retort::rollout

#endif  // RETORT_ROLLOUT_SERVICE_ROLLOUT_CLIENT_H_
