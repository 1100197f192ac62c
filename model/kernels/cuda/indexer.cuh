// The lightning indexer for decode (V4_SPEC.md §2.4), matching the CPU
// attention's indexer: for one query per sequence,
//   I[b, s] = sum_h relu(q[b,h] . K[b,s]) * Di^-1/2 * (w[b,h] * Hi^-1/2)
// over the visible entries s < visible[b], then the top-k entries (ties to
// the lower entry index), returned in ascending entry order as the CPU does.
#ifndef RETORT_MODEL_KERNELS_CUDA_INDEXER_CUH_
#define RETORT_MODEL_KERNELS_CUDA_INDEXER_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace retort::cuda {

// q [B, Hi, Di] (RoPE'd), w [B, Hi] (weights_proj output), keys [B, cap, Di],
// visible i32 [B] (<= cap) -> scores [B, cap] (entries >= visible untouched).
// Hi * Di <= 16384, Di <= 512.
[[nodiscard]] absl::Status IndexerScores(const float* q, const float* w, const float* keys, const int32_t* visible,
                                         int64_t B, int Hi, int Di, int64_t cap, float* scores, cudaStream_t stream);

// The same for a step of the whole model: row b reads the keys of state slot
// row_slot[b] (keys is the pool [slots, cap, Di]) and writes scores[b *
// score_stride + s] for s < visible[b].
[[nodiscard]] absl::Status IndexerScoresForRows(const float* q, const float* w, const float* keys, int64_t cap,
                                                const int32_t* row_slot, const int32_t* visible, int64_t B, int Hi,
                                                int Di, float* scores, int64_t score_stride, cudaStream_t stream);

// Per row b: the min(k, n[b]) largest of scores[b, 0..n[b]) (ties to the lower
// index), written ascending to selected i32 [B, k]; count i32 [B].
[[nodiscard]] absl::Status TopKAscending(const float* scores, const int32_t* n, int64_t B, int64_t stride, int k,
                                         int32_t* selected, int32_t* count, cudaStream_t stream);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_INDEXER_CUH_
