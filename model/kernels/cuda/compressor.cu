#include "model/kernels/cuda/compressor.cuh"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/device_utils.cuh"

namespace retort::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxC = 1024;

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
  const bool has_prev = s.overlap && i_entry >= 1;
  const float* prv_kv = s.overlap ? st.prev_kv + b * m * c : nullptr;
  const float* prv_sc = s.overlap ? st.prev_score + b * m * c : nullptr;
  const int64_t cur_off = s.overlap ? c : 0;
  float ss = 0.0f;
  for (int64_t ch = threadIdx.x; ch < c; ch += kThreads) {
    float mx = -INFINITY;
    if (has_prev)
      for (int j = 0; j < m; ++j) mx = fmaxf(mx, prv_sc[j * c + ch]);
    for (int j = 0; j < m; ++j) mx = fmaxf(mx, psc[j * w + cur_off + ch]);
    float denom = 0.0f, acc = 0.0f;
    if (has_prev)
      for (int j = 0; j < m; ++j) {
        const float e = expf(prv_sc[j * c + ch] - mx);
        denom += e;
        acc += e * prv_kv[j * c + ch];
      }
    for (int j = 0; j < m; ++j) {
      const float e = expf(psc[j * w + cur_off + ch] - mx);
      denom += e;
      acc += e * pkv[j * w + cur_off + ch];
    }
    const float v = acc / denom;
    entry[ch] = v;
    ss += v * v;
  }
  ss = internal::BlockSum(ss, scratch);  // syncs: entry[] complete
  const float r = 1.0f / sqrtf(ss / static_cast<float>(c) + s.rms_eps);
  for (int64_t ch = threadIdx.x; ch < c; ch += kThreads) entry[ch] = norm[ch] * (entry[ch] * r);
  __syncthreads();
  const float rpos = static_cast<float>(pos + 1 - m);
  float* out = st.entries + (b * s.cap + i_entry) * c;
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
  if (s.overlap) {  // this window's first-half rows become "prev" for the next entry
    __syncthreads();  // all reads of prev above are done
    for (int64_t i = threadIdx.x; i < m * c; i += kThreads) {
      const int64_t j = i / c, ch = i % c;
      st.prev_kv[b * m * c + i] = pkv[j * w + ch];
      st.prev_score[b * m * c + i] = psc[j * w + ch];
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

}  // namespace retort::cuda
