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

// The same attention for a step of the whole model (prefill chunks and decode
// alike), matching ModelRunner::AttentionBlock: N query rows from S chunks,
// row r belongs to chunk row_seq[r] and sits at positions[r]. A chunk's
// sequence owns state slot seq_slot[s] and held seq_p0[s] tokens before this
// step; its rows start at seq_row0[s]. Window key at position j <= p comes
// from the ring (slot's [win, D], slot j % win) when j < p0, else from this
// step's kv row seq_row0 + (j - p0): the caller writes the chunk's keys into
// the ring only after this call. Compressed keys: entries of the slot
// ([slots, cap, D]), count[r] of them per row, ids from selected[r] (CSA) or
// 0..count-1 (HCA). Grid (N, ceil(H / 8)); same numerics as DecodeAttention.
struct StepAttentionArgs {
  int64_t N = 0, H = 0, D = 0;
  const float* q = nullptr;           // [N, H, D]
  const float* kv = nullptr;          // [N, D] this step's window keys
  const float* ring = nullptr;        // [slots, win, D]
  int64_t win = 0;
  const int32_t* row_seq = nullptr;   // [N]
  const int64_t* positions = nullptr; // [N]
  const int32_t* seq_slot = nullptr;  // [S]
  const int64_t* seq_p0 = nullptr;    // [S]
  const int32_t* seq_row0 = nullptr;  // [S]
  const float* entries = nullptr;     // [slots, cap, D] or null
  int64_t cap = 0;
  const int32_t* selected = nullptr;  // [N, sel_stride] or null
  int64_t sel_stride = 0;
  const int32_t* count = nullptr;     // [N] or null (no compressed keys)
  const float* sinks = nullptr;       // [H]
  float* out = nullptr;               // [N, H, D]
  // Split-KV for few-row (decode) steps: max_keys bounds any row's key count
  // (window + compressed) and partial holds StepAttentionScratchFloats(...)
  // floats; null partial: one block per (row, 8 heads) covers all keys.
  int64_t max_keys = 0;
  float* partial = nullptr;
};

// Splits StepAttention uses for N rows of H heads with up to max_keys keys
// (1: no split), and the scratch floats they need (0 when 1).
int StepAttentionSplits(int64_t N, int64_t H, int64_t max_keys);
int64_t StepAttentionScratchFloats(int64_t N, int64_t H, int64_t D, int64_t max_keys);

[[nodiscard]] absl::Status StepAttention(const StepAttentionArgs& a, cudaStream_t stream);

// After StepAttention: each chunk's last min(T, win) keys enter its slot's
// ring (position p at slot p % win). seq_T [S]; other arrays as above.
[[nodiscard]] absl::Status WriteWindowRing(const float* kv, int64_t D, float* ring, int64_t win, int S,
                                           const int32_t* seq_slot, const int64_t* seq_p0, const int32_t* seq_row0,
                                           const int32_t* seq_T, cudaStream_t stream);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_ATTENTION_CUH_
