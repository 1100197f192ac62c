// Token sampling from logits: temperature, top-k, top-p (nucleus), seeded.
//
// Sample() returns the token and its log-probability under the distribution it
// was drawn from (after temperature and truncation) — what GRPO needs as the
// sampler log-prob — and under the untruncated temperature-1 model. With
// temperature 0 it is greedy (ties to the lower id). The RNG is explicit and
// per sequence, so the same seed and logits give the same tokens on any
// thread. Thread-compatible: one Sampler per sequence.
#ifndef RETORT_ROLLOUT_ENGINE_SAMPLER_H_
#define RETORT_ROLLOUT_ENGINE_SAMPLER_H_

#include <cstdint>
#include <random>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace retort::rollout {

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off; keep the smallest prefix with mass >= top_p
  uint64_t seed = 0;
};

// Rejects temperatures < 0, top_p outside (0, 1], top_k < 0.
[[nodiscard]] absl::Status ValidateSamplingParams(const SamplingParams& p);

struct SampledToken {
  int64_t token = 0;
  float logprob = 0.0f;        // under the sampling distribution (temperature + truncation)
  float model_logprob = 0.0f;  // log softmax of the raw logits at `token`
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}
  SampledToken Sample(absl::Span<const float> logits);

  const SamplingParams& params() const { return params_; }
  // For a sampler running elsewhere (the CUDA twin, cuda/sampling.cuh): the
  // uniform number in [0, 1) Sample() would draw next — 0 without advancing
  // the RNG when greedy, since Sample() draws nothing then.
  double NextCanonical();

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace retort::rollout

#endif  // RETORT_ROLLOUT_ENGINE_SAMPLER_H_
