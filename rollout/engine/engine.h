// The rollout engine: continuous batching of many generation requests over
// one V4 model.
//
// A request is a group: one prompt and n samples (GRPO). The engine admits
// queued groups while the state-memory budget allows (each group reserves
// Model::StateBytes(prompt + max_new_tokens) per sample), prefills each prompt
// once in chunks, forks the prefilled DecodeState for the n samples (prefix
// sharing), then runs one model Step per iteration that carries one decode
// token for every running sequence plus prefill chunks up to a token budget.
// Finished sequences (EOS, a stop id, max_new_tokens, the context limit, or an
// abort) retire at once and their memory is released.
//
// Determinism: sample i of a request draws from its own RNG seeded with
// seed + i * 0x9E3779B97F4A7C15 (see SampleSeed), so the same request, seed
// and weights give the same tokens however requests are batched — up to the
// last-ulp differences of batched vs single-row matmuls, which only matter when
// a uniform draw lands on a CDF boundary. ReferenceGenerate() is the simple
// one-sequence path that the batched engine is tested against.
//
// Resume: a request may carry tokens recovered from the write-ahead log per
// sample. The engine re-prefills the prompt, feeds those tokens back one per
// step as the first run did (so the decode state is bit-for-bit the one the
// first run built), replays the sampler over their logits (so the RNG is where
// it was), keeps the logged tokens, log-probs and weight versions, and
// continues sampling after them: with unchanged weights the continuation is
// the uninterrupted run's.
//
// Weight updates: SwapModel() installs a new model between two steps; tokens
// record the version they were sampled under. Decode states built under the
// old weights are kept (the usual in-flight update; each token's version says
// which policy produced it).
//
// Thread-safety: all public methods are thread-safe. Callbacks (completion
// sinks and the token observer) run on the engine thread, one at a time, and
// must not call back into the engine's blocking methods (Abort is fine).
#ifndef RETORT_ROLLOUT_ENGINE_ENGINE_H_
#define RETORT_ROLLOUT_ENGINE_ENGINE_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "model/v4/model.h"
#include "retort/v1/rollout.pb.h"
#include "rollout/engine/sampler.h"

namespace retort::rollout {

struct EngineOptions {
  int64_t max_step_tokens = 512;           // tokens per model Step (decode rows + prefill chunks). Default: 512.
  int64_t prefill_chunk = 256;             // prompt tokens per sequence per Step. Default: 256.
  int64_t state_bytes_budget = 4LL << 30;  // bytes of decode state reserved by admitted groups. Default: 4 GiB.
  int32_t max_running_sequences = 256;     // Default: 256.
  int32_t max_new_tokens_limit = 32768;    // requests asking for more are InvalidArgument. Default: 32768.
  int32_t max_samples = 64;                // n at most. Default: 64.
  bool share_prefix = true;                // prefill a group's prompt once and fork it. Default: true.
};

// What the engine generates for: a prompt already in token ids.
struct GenerationRequest {
  std::string request_id;
  std::string group_id;
  std::vector<int64_t> prompt;
  SamplingParams sampling;
  int32_t max_new_tokens = 0;
  std::vector<int64_t> stop_token_ids;
  int32_t n = 1;
  bool ignore_eos = false;
  bool capture_routes = false;
  // Resume: sample -> tokens logged before a restart (token_ids, logprobs,
  // model_logprobs, weight_versions; routes are recomputed). Samples listed in
  // `skip` are already finished and are not generated again.
  std::map<int32_t, retort::v1::Completion> resume;
  std::vector<int32_t> skip;
};

// Seed of sample i of a group whose request seed is `seed`.
inline uint64_t SampleSeed(uint64_t seed, int32_t sample) {
  return seed + static_cast<uint64_t>(sample) * 0x9E3779B97F4A7C15ull;
}

struct GeneratedToken {
  const std::string* request_id;  // valid during the callback only
  int32_t sample;
  int32_t index;  // position in the completion
  int64_t token;
  float logprob;
  float model_logprob;
  int64_t weight_version;
};

struct EngineStatus {
  uint64_t weight_version = 0;
  int32_t queued_groups = 0;
  int32_t running_sequences = 0;
  double tokens_per_second = 0.0;
  int64_t state_bytes = 0;      // exact bytes of live decode states (as of the last step)
  int64_t reserved_bytes = 0;   // reserved by admitted groups
  int64_t state_bytes_budget = 0;
  int64_t generated_tokens = 0;
  int64_t steps = 0;
  int64_t replay_mismatches = 0;  // resumed tokens the replayed sampler would have drawn differently
  bool paused = false;
};

class Engine {
 public:
  using CompletionSink = std::function<void(retort::v1::Completion)>;
  // Called once per step with every token the step produced, before any
  // completion of that step is delivered (the write-ahead log hook).
  using TokenObserver = std::function<void(const std::vector<GeneratedToken>&)>;

  // `version` is the weight version of `model`. Does not start a thread:
  // call Start() for a background loop, or drive it with RunUntilIdle().
  Engine(std::shared_ptr<const v4::Model> model, uint64_t version, EngineOptions options = {},
         TokenObserver observer = nullptr);
  ~Engine();  // stops the loop; unfinished requests are dropped without callbacks.

  void Start();
  // Stops the background loop after the current step. Unfinished requests stay
  // unfinished (their tokens are in the observer's log); no callbacks follow.
  void Stop();

  // InvalidArgument naming the field for: empty prompt, token ids outside the
  // vocabulary, n outside [1, max_samples], max_new_tokens outside
  // [1, max_new_tokens_limit], prompt + max_new_tokens beyond the context,
  // bad sampling params, a group that could never fit the memory budget.
  [[nodiscard]] absl::Status Validate(const GenerationRequest& request) const;
  // Validates and queues. AlreadyExists if the id is queued or running.
  // `sink` receives each sample's Completion once (n calls, any order).
  [[nodiscard]] absl::Status Submit(GenerationRequest request, CompletionSink sink);
  // Aborts queued or running requests: their unfinished samples complete with
  // FINISH_REASON_ABORTED and the tokens so far. Returns how many ids matched.
  int Abort(const std::vector<std::string>& request_ids);
  bool IsActive(const std::string& request_id) const;

  void Pause();
  void Resume();
  // Installs `model` (same architecture) with `version` between two steps.
  // FailedPrecondition if version is not above the current one.
  [[nodiscard]] absl::Status SwapModel(std::shared_ptr<const v4::Model> model, uint64_t version);
  uint64_t weight_version() const;
  std::shared_ptr<const v4::Model> model() const;

  EngineStatus Status() const;

  // Runs steps on the calling thread until nothing is queued or running
  // (only when Start() was not called).
  void RunUntilIdle();

 private:
  struct Group;
  struct Sequence;
  bool StepOnce();  // false when there was nothing to do
  void Loop();

  const EngineOptions options_;
  const TokenObserver observer_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<const v4::Model> model_;  // guarded by mu_; the step thread holds its own reference
  uint64_t version_ = 0;
  std::shared_ptr<const v4::Model> pending_model_;
  uint64_t pending_version_ = 0;
  std::deque<std::unique_ptr<Group>> queue_;
  std::vector<std::string> aborts_;
  bool paused_ = false;
  bool stop_ = false;
  std::thread thread_;
  // Published by the step thread under mu_.
  int32_t running_sequences_ = 0;
  int64_t state_bytes_ = 0;
  int64_t reserved_bytes_ = 0;
  int64_t generated_tokens_ = 0;
  int64_t steps_ = 0;
  int64_t replay_mismatches_ = 0;
  std::deque<std::pair<double, int64_t>> rate_window_;  // (seconds, tokens) of recent steps
  std::vector<std::string> active_ids_;                 // running group ids (for IsActive/Abort)

  // Step-thread only.
  std::vector<std::unique_ptr<Group>> running_;
  int64_t decode_cursor_ = 0;  // round-robin start when decodes exceed the token budget
};

// The simple path: one sequence, prefill the prompt, then one token per Step. Sample `sample` of `request` as the engine would
// produce it with an unchanging model of weight version `version`.
[[nodiscard]] absl::StatusOr<retort::v1::Completion> ReferenceGenerate(const v4::Model& model,
                                                                       const GenerationRequest& request,
                                                                       int32_t sample, uint64_t version = 0);

const char* FinishReasonName(retort::v1::FinishReason reason);

}  // namespace retort::rollout

#endif  // RETORT_ROLLOUT_ENGINE_ENGINE_H_
