// The KV compressor's incremental emission during decode (V4_SPEC.md §2.3,
// §3), matching ModelRunner::Compress: one new token per sequence per call.
// Per-sequence state lives on the device in fixed-stride arrays:
//   pending_kv, pending_score [B, m, w]  (w = coff*c; score has ape added)
//   prev_kv, prev_score       [B, m, c]  (CSA: the last closed window's first half)
//   entries                   [B, cap, c]
// For token at position pos (slot = pos % m) the kernel stores the raw kv row
// and score + ape[slot] in pending row `slot`; when slot == m-1 it emits entry
// i = pos / m: per channel a softmax over the m rows (HCA) or the 2m rows of
// prev ("b") and current ("a", channels c..2c) windows (CSA; prev only for
// i >= 1), then weighted RMSNorm over c and RoPE on the last rope_dim dims at
// position i*m, and (CSA) copies the current window's channels 0..c into prev.
// Invariant (caller): positions advance by one per call per sequence, and
// pos / m < cap. c <= 1024.
#ifndef RETORT_MODEL_KERNELS_CUDA_COMPRESSOR_CUH_
#define RETORT_MODEL_KERNELS_CUDA_COMPRESSOR_CUH_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace retort::cuda {

struct CompressorShape {
  int m = 4;            // ratio
  int64_t c = 512;      // entry width
  bool overlap = true;  // CSA
  int64_t rope_dim = 64;
  int64_t cap = 0;      // entries capacity per sequence
  float rms_eps = 1e-6f;
};

struct CompressorStateView {
  float* pending_kv;
  float* pending_score;
  float* prev_kv;     // CSA only (may be null for HCA)
  float* prev_score;  // CSA only
  float* entries;
};

// kv, score: this step's projections [B, w]; ape [m, w]; norm [c];
// inv_freq [rope_dim/2]; positions i64 [B].
[[nodiscard]] absl::Status CompressorDecodeStep(const CompressorShape& s, int64_t B, const float* kv,
                                                const float* score, const float* ape, const float* norm,
                                                const float* inv_freq, const int64_t* positions,
                                                CompressorStateView state, cudaStream_t stream);

// The compressor over a step of the whole model (prefill chunks and decode
// alike), matching ModelRunner::Compress for every chunk: chunk s (S of them)
// appends rows seq_row0[s] .. +seq_T[s] of kv/score (positions seq_p0[s]..)
// to the state of slot seq_slot[s], emitting every entry whose window closes
// inside the chunk. State arrays are pools indexed by slot ([slots, m, w],
// [slots, m, c], [slots, cap, c]). `max_emit` bounds the entries any chunk
// emits (a host-side bound, e.g. max_T / m + 1; blocks beyond a chunk's
// count exit) and `max_T` the rows of any chunk. Three launches: emission,
// then the CSA prev-window rows, then the open window's pending rows.
struct CompressorChunks {
  int S = 0;
  const int32_t* seq_slot = nullptr;  // [S]
  const int64_t* seq_p0 = nullptr;    // [S]
  const int32_t* seq_row0 = nullptr;  // [S]
  const int32_t* seq_T = nullptr;     // [S]
  int64_t max_T = 0;
  int64_t max_emit = 0;
};

[[nodiscard]] absl::Status CompressorStep(const CompressorShape& s, const CompressorChunks& chunks, const float* kv,
                                          const float* score, const float* ape, const float* norm,
                                          const float* inv_freq, CompressorStateView state, cudaStream_t stream);

}  // namespace retort::cuda

#endif  // RETORT_MODEL_KERNELS_CUDA_COMPRESSOR_CUH_
