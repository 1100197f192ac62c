// MoE routing on the device (V4_SPEC.md §2.6), matching ModelRunner::MoeBlock:
// scores s = sqrt(softplus(logits)); selection = top-k of s + bias (ties to
// the lower expert id; hash layers: tid2eid[token]); weights = s[idx] /
// (sum s[idx] + 1e-20) * scaling. One block per token row.
#ifndef RETORT_MODEL_KERNELS_CUDA_MOE_ROUTER_CUH_
#define RETORT_MODEL_KERNELS_CUDA_MOE_ROUTER_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace retort::cuda {

// logits [rows, E] (x gate^T); bias [E] or nullptr; tid2eid i64 [vocab, k] with
// tokens i64 [rows] for hash routing (then bias is ignored), else nullptr.
// Outputs idx i32 [rows, k] in selection order and weights f32 [rows, k].
// E <= 4096, 1 <= k <= 16.
[[nodiscard]] absl::Status MoeRoute(const float* logits, int64_t rows, int E, int k, const float* bias,
                                    const int64_t* tid2eid, const int64_t* tokens, float scaling, int32_t* idx,
                                    float* weights, cudaStream_t stream);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_MOE_ROUTER_CUH_
