// Token sampling on the device, the twin of rollout::Sampler (sampler.h):
// per row, temperature 0 is greedy (ties to the lower id); otherwise the
// candidates sorted by logit (ties: lower id first), truncated to top_k then
// to the smallest prefix whose mass reaches top_p, sampled with the uniform
// number `canonical` in [0, 1) the host drew from the row's seeded RNG
// (std::generate_canonical, exactly what the CPU sampler draws), so the same
// seed gives the same token as the CPU path up to summation order. Returns the
// token, its log-prob under the sampling distribution and under the raw
// softmax (model_logprob). Sums of probabilities are in double.
#ifndef RETORT_MODEL_KERNELS_CUDA_SAMPLING_CUH_
#define RETORT_MODEL_KERNELS_CUDA_SAMPLING_CUH_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace retort::cuda {

struct SamplingRow {
  float temperature = 1.0f;  // 0: greedy
  int32_t top_k = 0;         // 0: off
  float top_p = 1.0f;        // 1: off
  double canonical = 0.0;    // uniform in [0, 1), unused when greedy
};

// Device scratch SampleRows needs for B rows of V logits.
size_t SamplingScratchBytes(int64_t B, int64_t V);

// logits [B, V] f32, rows [B] (device); outputs token i64 [B], logprob and
// model_logprob f32 [B] (device). scratch: SamplingScratchBytes(B, V) bytes.
[[nodiscard]] absl::Status SampleRows(const float* logits, int64_t B, int64_t V, const SamplingRow* rows,
                                      void* scratch, int64_t* token, float* logprob, float* model_logprob,
                                      cudaStream_t stream);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_SAMPLING_CUH_
