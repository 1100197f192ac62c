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

// Token permutation for the grouped expert GEMMs, deterministic (no atomics):
// the rows*k routed (row, slot) pairs of idx [rows, k] sorted stably by
// expert. Outputs: row_index [rows*k] (the x row of each permuted position),
// slot_pos [rows*k] (the permuted position of pair (r, j) at r*k + j), and
// `groups` = min(E, rows*k) groups: the active experts in ascending id order
// with group_expert [groups] and group_offsets [groups+1] into the permuted
// positions; groups past the active ones are empty (offset = rows*k) so a
// grouped GEMM launched over `groups` needs no host round trip.
// scratch: 2*E int32 of device memory.
[[nodiscard]] absl::Status MoePermute(const int32_t* idx, int64_t rows, int k, int E, int groups, int32_t* scratch,
                                      int32_t* row_index, int32_t* slot_pos, int32_t* group_offsets,
                                      int32_t* group_expert, cudaStream_t stream);

// out[r, :] = sum_j weights[r, j] * y[slot_pos[r*k + j], :] in slot order
// (+ shared[r, :] when shared != nullptr), matching ModelRunner::MoeBlock.
[[nodiscard]] absl::Status MoeCombine(const float* y, const int32_t* slot_pos, const float* weights, int64_t rows,
                                      int k, int64_t d, const float* shared, float* out, cudaStream_t stream);

// out[i, :] = x[row_index[i], :] for i < n (rows of width d).
[[nodiscard]] absl::Status GatherRows(const float* x, const int32_t* row_index, int64_t n, int64_t d, float* out,
                                      cudaStream_t stream);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_MOE_ROUTER_CUH_
