#include "model/kernels/cuda/compressor.cuh"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/device_utils.cuh"

namespace retort::cuda {
namespace {

constexpr int kThreads = 512;  // one channel a thread for c = 512 (decode emits are latency-bound)
constexpr int kMaxC = 1024;

// One compressor row: kv and score (width w), plus ape to add to the score
// when the row comes straight from the projections (null: already added).
struct Row {
  const float* kv;
  const float* score;
  const float* ape = nullptr;
  __device__ float Score(int64_t i) const { return ape ? score[i] + ape[i] : score[i]; }
};

// Emits entry i_entry into `out` [c] (V4_SPEC.md §2.3): per channel a softmax
// over the window's m rows (HCA) or over the previous window's first-half rows
// and this window's second-half rows (CSA, prev only when has_prev), weighted
// RMSNorm over c and RoPE on the last rope_dim dims at position i_entry * m.
// cur(j) -> {kv row, score row (ape added)} of this window's row j (width w);
// prev(j) -> the same of the previous window's row j (first-half channels at
// offset 0, stride-free). The whole block calls it.
template <typename Cur, typename Prev>
__device__ void EmitEntry(const CompressorShape& s, int64_t i_entry, bool has_prev, Cur cur, Prev prev,
                          const float* __restrict__ norm, const float* __restrict__ inv_freq, float* entry,
                          float* scratch, float* __restrict__ out) {
  const int64_t c = s.c;
  const int m = s.m;
  const int64_t cur_off = s.overlap ? c : 0;
  float ss = 0.0f;
  for (int64_t ch = threadIdx.x; ch < c; ch += kThreads) {
    float mx = -INFINITY;
    if (has_prev) {
#pragma unroll 4
      for (int j = 0; j < m; ++j) mx = fmaxf(mx, prev(j).Score(ch));
    }
#pragma unroll 4
    for (int j = 0; j < m; ++j) mx = fmaxf(mx, cur(j).Score(cur_off + ch));
    float denom = 0.0f, acc = 0.0f;
    if (has_prev) {
#pragma unroll 4
      for (int j = 0; j < m; ++j) {
        const Row r = prev(j);
        const float e = expf(r.Score(ch) - mx);
        denom += e;
        acc += e * r.kv[ch];
      }
    }
#pragma unroll 4
    for (int j = 0; j < m; ++j) {
      const Row r = cur(j);
      const float e = expf(r.Score(cur_off + ch) - mx);
      denom += e;
      acc += e * r.kv[cur_off + ch];
    }
    const float v = acc / denom;
    entry[ch] = v;
    ss += v * v;
  }
  ss = internal::BlockSum(ss, scratch);  // syncs: entry[] complete
  const float rs = 1.0f / sqrtf(ss / static_cast<float>(c) + s.rms_eps);
  for (int64_t ch = threadIdx.x; ch < c; ch += kThreads) entry[ch] = norm[ch] * (entry[ch] * rs);
  __syncthreads();
  const float rpos = static_cast<float>(i_entry * m);
  const int64_t off = c - s.rope_dim;
  for (int64_t ch = threadIdx.x; ch < c; ch += kThreads) {
    float v = entry[ch];
    if (ch >= off) {
      const int64_t i = (ch - off) / 2;
      const float angle = inv_freq[i] * rpos;
      const float cs = cosf(angle), sn = sinf(angle);
      const float a = entry[off + 2 * i], bb = entry[off + 2 * i + 1];
      v = ((ch - off) % 2 == 0) ? a * cs - bb * sn : bb * cs + a * sn;
    }
    out[ch] = v;
  }
  __syncthreads();  // entry[] free for the caller's next use
}

__global__ void __launch_bounds__(kThreads) CompressorStepKernel(CompressorShape s, const float* __restrict__ kv,
                                                                 const float* __restrict__ score,
                                                                 const float* __restrict__ ape,
                                                                 const float* __restrict__ norm,
                                                                 const float* __restrict__ inv_freq,
                                                                 const int64_t* __restrict__ positions,
                                                                 CompressorStateView st) {
  __shared__ float entry[kMaxC];
  __shared__ float scratch[32];
  const int64_t b = blockIdx.x, c = s.c, w = (s.overlap ? 2 : 1) * c;
  const int m = s.m;
  const int64_t pos = positions[b];
  const int slot = static_cast<int>(pos % m);
  float* pkv = st.pending_kv + b * m * w;
  float* psc = st.pending_score + b * m * w;
  for (int64_t i = threadIdx.x; i < w; i += kThreads) {
    pkv[slot * w + i] = kv[b * w + i];
    psc[slot * w + i] = score[b * w + i] + ape[slot * w + i];
  }
  if (slot != m - 1) return;  // uniform across the block
  __syncthreads();
  const int64_t i_entry = pos / m;
  const float* prv_kv = s.overlap ? st.prev_kv + b * m * c : nullptr;
  const float* prv_sc = s.overlap ? st.prev_score + b * m * c : nullptr;
  EmitEntry(
      s, i_entry, s.overlap && i_entry >= 1, [&](int j) { return Row{pkv + j * w, psc + j * w}; },
      [&](int j) { return Row{prv_kv + j * c, prv_sc + j * c}; }, norm, inv_freq, entry, scratch,
      st.entries + (b * s.cap + i_entry) * c);
  if (s.overlap) {  // this window's first-half rows become "prev" for the next entry
    for (int64_t i = threadIdx.x; i < m * c; i += kThreads) {
      const int64_t j = i / c, ch = i % c;
      st.prev_kv[b * m * c + i] = pkv[j * w + ch];
      st.prev_score[b * m * c + i] = psc[j * w + ch];
    }
  }
}

// Note [Compressor over a chunk]: the row of position q of a chunk's
// sequence lives in this step's projections when q >= p0 (its score gets ape
// of slot q % m added on the fly) and, for the window open at p0, in the
// slot's pending rows when q < p0 (ape already added). Entries i in
// [p0 / m, (p0 + T) / m) close inside the chunk; entry i's CSA prev window
// i - 1 is the stored prev when it closed before the chunk (i == p0 / m),
// else rows found the same way. Rows are read in place (HCA windows of 128
// rows x 512 do not fit in shared memory).
struct ChunkRows {
  const float *kv, *score, *ape;  // projections [N, w], ape [m, w]
  const float *pkv, *psc;         // the slot's pending rows [m, w]
  int64_t p0, row0, w;
  int m;
  __device__ Row At(int64_t q) const {
    const int j = static_cast<int>(q % m);
    if (q >= p0) return Row{kv + (row0 + q - p0) * w, score + (row0 + q - p0) * w, ape + j * w};
    return Row{pkv + j * w, psc + j * w};
  }
};

__device__ __forceinline__ ChunkRows LoadChunk(const CompressorShape& s, const CompressorChunks& ch, int i,
                                               const float* kv, const float* score, const float* ape,
                                               const CompressorStateView& st, int64_t& slot, int64_t& T) {
  slot = ch.seq_slot[i], T = ch.seq_T[i];
  const int64_t w = (s.overlap ? 2 : 1) * s.c;
  return ChunkRows{kv, score, ape, st.pending_kv + slot * s.m * w, st.pending_score + slot * s.m * w,
                   ch.seq_p0[i], ch.seq_row0[i], w, s.m};
}

// grid (S, max_emit): block (s, e) emits the chunk's e-th closing entry.
__global__ void __launch_bounds__(kThreads) CompressorEmitKernel(CompressorShape s, CompressorChunks ch,
                                                                 const float* __restrict__ kv,
                                                                 const float* __restrict__ score,
                                                                 const float* __restrict__ ape,
                                                                 const float* __restrict__ norm,
                                                                 const float* __restrict__ inv_freq,
                                                                 CompressorStateView st) {
  __shared__ float entry[kMaxC];
  __shared__ float scratch[32];
  int64_t slot, T;
  const ChunkRows rows = LoadChunk(s, ch, blockIdx.x, kv, score, ape, st, slot, T);
  const int m = s.m;
  const int64_t c = s.c;
  const int64_t first = rows.p0 / m, n_emit = (rows.p0 + T) / m - first;
  if (static_cast<int64_t>(blockIdx.y) >= n_emit) return;
  const int64_t i_entry = first + blockIdx.y;
  const bool has_prev = s.overlap && i_entry >= 1;
  const bool prev_from_state = i_entry == first;  // window i-1 closed before the chunk
  const float* spk = s.overlap ? st.prev_kv + slot * m * c : nullptr;
  const float* sps = s.overlap ? st.prev_score + slot * m * c : nullptr;
  EmitEntry(
      s, i_entry, has_prev, [&](int j) { return rows.At(i_entry * m + j); },
      [&](int j) { return prev_from_state ? Row{spk + j * c, sps + j * c} : rows.At((i_entry - 1) * m + j); },
      norm, inv_freq, entry, scratch, st.entries + (slot * s.cap + i_entry) * c);
}

// grid (S); CSA: the last emitted window's first-half rows become prev.
__global__ void __launch_bounds__(kThreads) CompressorPrevKernel(CompressorShape s, CompressorChunks ch,
                                                                 const float* __restrict__ kv,
                                                                 const float* __restrict__ score,
                                                                 const float* __restrict__ ape,
                                                                 CompressorStateView st) {
  int64_t slot, T;
  const ChunkRows rows = LoadChunk(s, ch, blockIdx.x, kv, score, ape, st, slot, T);
  const int m = s.m;
  const int64_t c = s.c;
  const int64_t last = (rows.p0 + T) / m - 1;
  if (last < rows.p0 / m) return;  // nothing emitted
  for (int j = 0; j < m; ++j) {
    const Row r = rows.At(last * m + j);
#pragma unroll 2
    for (int64_t e = threadIdx.x; e < c; e += kThreads) {
      st.prev_kv[(slot * m + j) * c + e] = r.kv[e];
      st.prev_score[(slot * m + j) * c + e] = r.Score(e);
    }
  }
}

// grid (S): the chunk's rows of the window still open after it go to the
// pending rows (slot q % m); earlier rows of that window are there already.
__global__ void __launch_bounds__(kThreads) CompressorPendingKernel(CompressorShape s, CompressorChunks ch,
                                                                    const float* __restrict__ kv,
                                                                    const float* __restrict__ score,
                                                                    const float* __restrict__ ape,
                                                                    CompressorStateView st) {
  int64_t slot, T;
  const ChunkRows rows = LoadChunk(s, ch, blockIdx.x, kv, score, ape, st, slot, T);
  const int m = s.m;
  const int64_t w = rows.w, p0 = rows.p0;
  const int64_t open = ((p0 + T) / m) * m;
  const int64_t q0 = open > p0 ? open : p0;
  float* pkv = st.pending_kv + slot * m * w;
  float* psc = st.pending_score + slot * m * w;
  for (int64_t q = q0; q < p0 + T; ++q) {
    const int j = static_cast<int>(q % m);
    const Row r = rows.At(q);
    for (int64_t e = threadIdx.x; e < w; e += kThreads) {
      pkv[j * w + e] = r.kv[e];
      psc[j * w + e] = r.Score(e);
    }
  }
}

}  // namespace

absl::Status CompressorDecodeStep(const CompressorShape& s, int64_t B, const float* kv, const float* score,
                                  const float* ape, const float* norm, const float* inv_freq, const int64_t* positions,
                                  CompressorStateView state, cudaStream_t stream) {
  if (s.m < 1 || s.c < 2 || s.c > kMaxC || s.rope_dim % 2 || s.rope_dim > s.c || s.cap < 1)
    return absl::InvalidArgumentError(absl::StrCat("CompressorDecodeStep: bad shape m=", s.m, " c=", s.c,
                                                   " rope_dim=", s.rope_dim, " cap=", s.cap));
  if (s.overlap && (!state.prev_kv || !state.prev_score))
    return absl::InvalidArgumentError("CompressorDecodeStep: overlapping compressor needs prev_kv/prev_score");
  if (B == 0) return absl::OkStatus();
  CompressorStepKernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(s, kv, score, ape, norm, inv_freq,
                                                                          positions, state);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status CompressorStep(const CompressorShape& s, const CompressorChunks& chunks, const float* kv,
                            const float* score, const float* ape, const float* norm, const float* inv_freq,
                            CompressorStateView state, cudaStream_t stream) {
  if (s.m < 1 || s.c < 2 || s.c > kMaxC || s.rope_dim % 2 || s.rope_dim > s.c || s.cap < 1)
    return absl::InvalidArgumentError(absl::StrCat("CompressorStep: bad shape m=", s.m, " c=", s.c,
                                                   " rope_dim=", s.rope_dim, " cap=", s.cap));
  if (s.overlap && (!state.prev_kv || !state.prev_score))
    return absl::InvalidArgumentError("CompressorStep: overlapping compressor needs prev_kv/prev_score");
  if (chunks.S == 0 || chunks.max_T == 0) return absl::OkStatus();
  if (chunks.max_emit > 65535)
    return absl::InvalidArgumentError(absl::StrCat("CompressorStep: ", chunks.max_emit, " entries in one chunk (max 65535)"));
  if (chunks.max_emit > 0) {
    const dim3 grid(static_cast<unsigned>(chunks.S), static_cast<unsigned>(chunks.max_emit));
    CompressorEmitKernel<<<grid, kThreads, 0, stream>>>(s, chunks, kv, score, ape, norm, inv_freq, state);
    RETORT_CUDA_LAUNCH_CHECK();
    if (s.overlap) {
      CompressorPrevKernel<<<static_cast<unsigned>(chunks.S), kThreads, 0, stream>>>(s, chunks, kv, score, ape, state);
      RETORT_CUDA_LAUNCH_CHECK();
    }
  }
  CompressorPendingKernel<<<static_cast<unsigned>(chunks.S), kThreads, 0, stream>>>(s, chunks, kv, score, ape, state);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

}  // namespace retort::cuda
