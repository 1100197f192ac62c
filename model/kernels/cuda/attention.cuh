// Decode attention (V4_SPEC.md §2.2), matching the CPU attention for one query
// per sequence: shared-KV MQA (K = V = the D-dim entry) over the sliding
// window plus compressed entries (all visible ones for HCA, the indexer's
// selection for CSA), one softmax per head with exp(sink_h) in the
// denominator only, logits scaled by D^-1/2. The inverse RoPE of the output
// is a separate RopeAtPositions(sign = -1) call.
//
// Window keys for the query at position p are positions max(0, p-win+1)..p
// read from the ring at slot j % win (the caller writes the current token's
// kv into the ring first). Blocks of 8 heads share each key tile in shared
// memory; online softmax with fp32 accumulation. D % 32 == 0, D <= 512.
#ifndef RETORT_MODEL_KERNELS_CUDA_ATTENTION_CUH_
#define RETORT_MODEL_KERNELS_CUDA_ATTENTION_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace retort::cuda {

struct DecodeAttentionArgs {
  int64_t B = 0, H = 0, D = 0;
  const float* q = nullptr;          // [B, H, D]
  const float* window = nullptr;     // [B, win, D] rings
  int64_t win = 0;
  const int64_t* positions = nullptr;  // [B]
  const float* entries = nullptr;    // [B, cap, D] compressed entries (or null)
  int64_t cap = 0;
  const int32_t* selected = nullptr;   // [B, sel_stride] entry ids (CSA) or null: entries 0..count-1 (HCA)
  int64_t sel_stride = 0;
  const int32_t* count = nullptr;      // [B] compressed keys to use (null: none)
  const float* sinks = nullptr;      // [H]
  float* out = nullptr;              // [B, H, D]
};

[[nodiscard]] absl::Status DecodeAttention(const DecodeAttentionArgs& a, cudaStream_t stream);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_ATTENTION_CUH_
