#include "model/kernels/cuda/sampling.cuh"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"

namespace retort::cuda {
namespace {

constexpr int kThreads = 1024;

struct MaxIdx {
  float v;
  int64_t i;
};
struct MaxIdxOp {
  __device__ MaxIdx operator()(const MaxIdx& a, const MaxIdx& b) const {
    return (a.v > b.v || (a.v == b.v && a.i < b.i)) ? a : b;  // the first maximum, as std::max_element
  }
};

// Scratch layout: ids_in [B*V] i32, keys_out [B*V] f32, ids_out [B*V] i32,
// offsets [B+1] i32, row max [B] f32, then cub temp storage.
struct Layout {
  size_t ids_in, keys_out, ids_out, offsets, rmax, temp, temp_bytes, total;
};
Layout MakeLayout(int64_t B, int64_t V, size_t temp_bytes) {
  auto up = [](size_t x) { return (x + 255) / 256 * 256; };
  Layout l;
  size_t at = 0;
  l.ids_in = at, at += up(4 * B * V);
  l.keys_out = at, at += up(4 * B * V);
  l.ids_out = at, at += up(4 * B * V);
  l.offsets = at, at += up(4 * (B + 1));
  l.rmax = at, at += up(4 * B);
  l.temp = at, l.temp_bytes = temp_bytes, at += up(temp_bytes);
  l.total = at;
  return l;
}
size_t SortTempBytes(int64_t B, int64_t V) {
  size_t bytes = 0;
  cub::DeviceSegmentedRadixSort::SortPairsDescending(nullptr, bytes, static_cast<const float*>(nullptr),
                                                     static_cast<float*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                     static_cast<int32_t*>(nullptr), static_cast<int>(B * V),
                                                     static_cast<int>(B), static_cast<const int32_t*>(nullptr),
                                                     static_cast<const int32_t*>(nullptr));
  return bytes;
}

__global__ void InitIdsKernel(int64_t B, int64_t V, int32_t* ids, int32_t* offsets) {
  const int64_t n = B * V;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    ids[i] = static_cast<int32_t>(i % V);
  if (blockIdx.x == 0)
    for (int64_t b = threadIdx.x; b <= B; b += blockDim.x) offsets[b] = static_cast<int32_t>(b * V);
}

// grid (B): row max (first index), log Z, greedy pick and model log-prob.
__global__ void __launch_bounds__(kThreads) RowStatsKernel(const float* __restrict__ logits, int64_t V,
                                                           const SamplingRow* __restrict__ rows,
                                                           float* __restrict__ rmax, int64_t* __restrict__ token,
                                                           float* __restrict__ logprob,
                                                           float* __restrict__ model_logprob) {
  using RedMax = cub::BlockReduce<MaxIdx, kThreads>;
  using RedSum = cub::BlockReduce<double, kThreads>;
  __shared__ typename RedMax::TempStorage tmax;
  __shared__ typename RedSum::TempStorage tsum;
  __shared__ MaxIdx best_s;
  const int64_t b = blockIdx.x;
  const float* l = logits + b * V;
  MaxIdx m{-INFINITY, V};
  for (int64_t i = threadIdx.x; i < V; i += kThreads) m = MaxIdxOp()(m, MaxIdx{l[i], i});
  m = RedMax(tmax).Reduce(m, MaxIdxOp());
  if (threadIdx.x == 0) best_s = m;
  __syncthreads();
  const float mx = best_s.v;
  double z = 0.0;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) z += exp(static_cast<double>(l[i] - mx));
  z = RedSum(tsum).Sum(z);
  if (threadIdx.x == 0) {
    rmax[b] = mx;
    const double log_z = mx + log(z);
    if (rows[b].temperature == 0.0f) {
      token[b] = best_s.i;
      logprob[b] = 0.0f;
      model_logprob[b] = static_cast<float>(l[best_s.i] - log_z);
    } else {
      model_logprob[b] = static_cast<float>(log_z);  // finished by PickKernel
    }
  }
}

// grid (B): over the sorted candidates, the top-k / top-p cut and the pick
// with prefix sums in double (block scans over chunks, carried across).
__global__ void __launch_bounds__(kThreads) PickKernel(const float* __restrict__ logits,
                                                       const float* __restrict__ sorted_keys,
                                                       const int32_t* __restrict__ sorted_ids, int64_t V,
                                                       const SamplingRow* __restrict__ rows,
                                                       const float* __restrict__ rmax, int64_t* __restrict__ token,
                                                       float* __restrict__ logprob,
                                                       float* __restrict__ model_logprob) {
  using Scan = cub::BlockScan<double, kThreads>;
  using RedSum = cub::BlockReduce<double, kThreads>;
  __shared__ typename Scan::TempStorage tscan;
  __shared__ typename RedSum::TempStorage tsum;
  __shared__ double carry_s, sum_s;
  __shared__ int64_t found_s;
  const int64_t b = blockIdx.x;
  const SamplingRow p = rows[b];
  if (p.temperature == 0.0f) return;
  const float mx = rmax[b];
  const float* keys = sorted_keys + b * V;
  const int32_t* ids = sorted_ids + b * V;
  int64_t keep = p.top_k > 0 && p.top_k < V ? p.top_k : V;
  auto prob = [&](int64_t i) { return exp(static_cast<double>(keys[i] - mx) / p.temperature); };
  // Mass of the top-k candidates.
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < keep; i += kThreads) s += prob(i);
  s = RedSum(tsum).Sum(s);
  if (threadIdx.x == 0) sum_s = s, found_s = -1;
  __syncthreads();
  // First index whose prefix sum reaches `target` (prefix > target when strict).
  auto first_prefix = [&](double target, bool strict) -> int64_t {
    if (threadIdx.x == 0) carry_s = 0.0, found_s = -1;
    __syncthreads();
    for (int64_t c0 = 0; c0 < keep; c0 += kThreads) {
      const int64_t i = c0 + threadIdx.x;
      const double v = i < keep ? prob(i) : 0.0;
      double incl, total;
      Scan(tscan).InclusiveSum(v, incl, total);
      incl += carry_s;
      const bool hit = i < keep && (strict ? target < incl : incl >= target);
      __syncthreads();
      if (hit) atomicMin(reinterpret_cast<unsigned long long*>(&found_s), static_cast<unsigned long long>(i));
      __syncthreads();
      if (found_s >= 0) break;  // uniform: read after the barrier
      if (threadIdx.x == 0) carry_s += total;
      __syncthreads();
    }
    __syncthreads();
    return found_s;
  };
  double sum = sum_s;
  if (p.top_p < 1.0f) {
    const int64_t cut = first_prefix(static_cast<double>(p.top_p) * sum, false);
    if (cut >= 0) keep = cut + 1;
    double s2 = 0.0;
    for (int64_t i = threadIdx.x; i < keep; i += kThreads) s2 += prob(i);
    s2 = RedSum(tsum).Sum(s2);
    if (threadIdx.x == 0) sum_s = s2;
    __syncthreads();
    sum = sum_s;
  }
  int64_t pick = first_prefix(p.canonical * sum, true);
  if (pick < 0 || pick >= keep) pick = keep - 1;
  if (threadIdx.x == 0) {
    const int32_t id = ids[pick];
    token[b] = id;
    logprob[b] = static_cast<float>(log(prob(pick) / sum));
    model_logprob[b] = static_cast<float>(logits[b * V + id] - static_cast<double>(model_logprob[b]));
  }
}

}  // namespace

size_t SamplingScratchBytes(int64_t B, int64_t V) { return MakeLayout(B, V, SortTempBytes(B, V)).total; }

absl::Status SampleRows(const float* logits, int64_t B, int64_t V, const SamplingRow* rows, void* scratch,
                        int64_t* token, float* logprob, float* model_logprob, cudaStream_t stream) {
  if (B == 0) return absl::OkStatus();
  if (V < 1 || B * V > INT32_MAX)
    return absl::InvalidArgumentError(absl::StrCat("SampleRows: ", B, " rows of ", V, " logits"));
  const Layout l = MakeLayout(B, V, SortTempBytes(B, V));
  auto* base = static_cast<uint8_t*>(scratch);
  auto* ids_in = reinterpret_cast<int32_t*>(base + l.ids_in);
  auto* keys_out = reinterpret_cast<float*>(base + l.keys_out);
  auto* ids_out = reinterpret_cast<int32_t*>(base + l.ids_out);
  auto* offsets = reinterpret_cast<int32_t*>(base + l.offsets);
  auto* rmax = reinterpret_cast<float*>(base + l.rmax);
  RowStatsKernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(logits, V, rows, rmax, token, logprob,
                                                                     model_logprob);
  RETORT_CUDA_LAUNCH_CHECK();
  InitIdsKernel<<<256, 256, 0, stream>>>(B, V, ids_in, offsets);
  RETORT_CUDA_LAUNCH_CHECK();
  size_t temp_bytes = l.temp_bytes;
  // Stable: equal logits keep ascending ids, the CPU sampler's tie order.
  RETORT_CUDA_RETURN(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      base + l.temp, temp_bytes, logits, keys_out, ids_in, ids_out, static_cast<int>(B * V), static_cast<int>(B),
      offsets, offsets + 1, 0, 32, stream));
  PickKernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(logits, keys_out, ids_out, V, rows, rmax, token,
                                                                 logprob, model_logprob);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

}  // namespace retort::cuda
