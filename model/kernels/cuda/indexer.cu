#include "model/kernels/cuda/indexer.cuh"

#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/device_utils.cuh"

namespace retort::cuda {
namespace {

constexpr int kTopKThreads = 512;

// Note [Indexer scoring layout]: kLanesPerEntry threads per entry, each
// owning a contiguous share of the heads. q[b] (Hi x Di) and w[b] are
// staged in shared memory (a warp's reads of one address broadcast); each
// thread streams its key in 32-value chunks and keeps the dot products of up
// to 16 heads in registers, so the only shuffles are the final two that add
// the quarters. Each head's dot is summed in dimension order as the CPU loop
// does; identical keys give identical scores, so ties stay ties.
constexpr int kHeadGroup = 16;
constexpr int kKeyChunk = 32;

// grid (ceil(cap / kEntriesPerBlock), B), kEntriesPerBlock * kLanesPerEntry
// threads. Few rows (decode at small batch): 32 entries a block for more
// blocks; many: 128, so q is staged once per more entries.
template <int kEntriesPerBlock, int kLanesPerEntry>
__global__ void __launch_bounds__(kEntriesPerBlock * kLanesPerEntry) IndexerScoresKernel(const float* __restrict__ q,
                                                                     const float* __restrict__ w,
                                                                     const float* __restrict__ keys,
                                                                     const int32_t* __restrict__ row_slot,
                                                                     const int32_t* __restrict__ visible, int Hi,
                                                                     int Di, int64_t cap, int64_t score_stride,
                                                                     float* __restrict__ scores) {
  extern __shared__ float qs[];  // [Hi][Di + 1] (padded: lanes on different heads hit different banks), then w [Hi]
  const int Dp = Di + 1;
  const int64_t b = blockIdx.y;
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * kEntriesPerBlock;
  const int64_t vis = visible[b];
  if (s0 >= vis) return;  // uniform across the block
  float* ws = qs + Hi * Dp;
  if (Di % 4 == 0) {  // q rows are 16-byte aligned then
    const float4* q4 = reinterpret_cast<const float4*>(q + b * Hi * Di);
#pragma unroll 8
    for (int i = threadIdx.x; i < Hi * Di / 4; i += blockDim.x) {
      const float4 v = __ldg(q4 + i);
      const int h = 4 * i / Di, e = 4 * i % Di;
      float* d = qs + h * Dp + e;
      d[0] = v.x, d[1] = v.y, d[2] = v.z, d[3] = v.w;
    }
  } else {
    for (int i = threadIdx.x; i < Hi * Di; i += blockDim.x) qs[(i / Di) * Dp + i % Di] = q[b * Hi * Di + i];
  }
  for (int i = threadIdx.x; i < Hi; i += blockDim.x) ws[i] = w[b * Hi + i];
  __syncthreads();
  const int quarter = threadIdx.x % kLanesPerEntry;
  const int64_t s = s0 + threadIdx.x / kLanesPerEntry;
  const bool live = s < vis;
  const int64_t slot = row_slot ? row_slot[b] : b;
  const float* k = keys + (slot * cap + (live ? s : 0)) * Di;
  const float wscale = 1.0f / sqrtf(static_cast<float>(Hi)), sscale = 1.0f / sqrtf(static_cast<float>(Di));
  const int per = (Hi + kLanesPerEntry - 1) / kLanesPerEntry;
  const int h_begin = quarter * per, h_end = h_begin + per < Hi ? h_begin + per : Hi;
  float acc = 0.0f;
  for (int h0 = h_begin; live && h0 < h_end; h0 += kHeadGroup) {
    float dot[kHeadGroup];
#pragma unroll
    for (int h = 0; h < kHeadGroup; ++h) dot[h] = 0.0f;
    for (int e0 = 0; e0 < Di; e0 += kKeyChunk) {
      float kr[kKeyChunk];
#pragma unroll
      for (int e = 0; e < kKeyChunk; ++e) kr[e] = e0 + e < Di ? __ldg(k + e0 + e) : 0.0f;
#pragma unroll
      for (int h = 0; h < kHeadGroup; ++h) {
        if (h0 + h >= h_end) break;
        const float* qh = qs + (h0 + h) * Dp + e0;
#pragma unroll
        for (int e = 0; e < kKeyChunk; ++e)
          if (e0 + e < Di) dot[h] = __fmaf_rn(qh[e], kr[e], dot[h]);
      }
    }
#pragma unroll
    for (int h = 0; h < kHeadGroup; ++h)
      if (h0 + h < h_end)
        acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(fmaxf(dot[h], 0.0f), sscale), __fmul_rn(ws[h0 + h], wscale)));
  }
  // The lanes of one entry are adjacent: a fixed pairwise tree, e.g. with 4
  // lanes (l0 + l1) + (l2 + l3).
#pragma unroll
  for (int o = 1; o < kLanesPerEntry; o <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (live && quarter == 0) scores[b * score_stride + s] = acc;
}

// One block per row: a 4-pass radix select (8 bits each) of the k-th largest
// ordered key, then an ordered compaction (block scans) that keeps every key
// above it and the lowest-index ties at it.
__global__ void __launch_bounds__(kTopKThreads) TopKKernel(const float* __restrict__ scores,
                                                           const int32_t* __restrict__ nrow, int64_t stride, int k,
                                                           int32_t* __restrict__ selected, int32_t* __restrict__ count) {
  using Scan = cub::BlockScan<int, kTopKThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ int hist[256];
  __shared__ uint32_t prefix_s;
  __shared__ int remaining_s;
  __shared__ int base_s, ties_s;
  const int64_t b = blockIdx.x;
  const int n = nrow[b];
  const float* sc = scores + b * stride;
  int32_t* out = selected + b * k;
  if (n <= k) {
    for (int i = threadIdx.x; i < n; i += kTopKThreads) out[i] = i;
    if (threadIdx.x == 0) count[b] = n;
    return;
  }
  if (threadIdx.x == 0) prefix_s = 0, remaining_s = k;
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kTopKThreads) hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = prefix_s;
    for (int i = threadIdx.x; i < n; i += kTopKThreads) {
      const uint32_t key = internal::OrderedKey(sc[i]);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xff], 1);
    }
    __syncthreads();
    // The digit: the highest bin whose suffix count (bins >= it) reaches the
    // keys still wanted; a block scan over the bins in descending order (bin
    // 255 - t on thread t) gives the suffix counts at once.
    const int rem = remaining_s;
    const int bin = 255 - static_cast<int>(threadIdx.x);
    const int h = threadIdx.x < 256 ? hist[bin] : 0;
    int above, total;
    Scan(scan_tmp).ExclusiveSum(h, above, total);
    if (threadIdx.x < 256 && above < rem && (above + h >= rem || bin == 0)) {
      prefix_s = prefix | (static_cast<uint32_t>(bin) << shift);
      remaining_s = rem - above;  // how many keys equal to the final threshold to take (after the last pass)
    }
    mask |= 0xffu << shift;
    __syncthreads();
  }
  const uint32_t thresh = prefix_s;
  const int ties_wanted = remaining_s;
  if (threadIdx.x == 0) base_s = 0, ties_s = 0;
  __syncthreads();
  for (int c0 = 0; c0 < n; c0 += kTopKThreads) {
    const int i = c0 + threadIdx.x;
    const uint32_t key = i < n ? internal::OrderedKey(sc[i]) : 0u;
    const int is_tie = (i < n && key == thresh) ? 1 : 0;
    int tie_rank, tie_total;
    Scan(scan_tmp).ExclusiveSum(is_tie, tie_rank, tie_total);
    __syncthreads();
    const int take = (i < n && (key > thresh || (is_tie && ties_s + tie_rank < ties_wanted))) ? 1 : 0;
    int pos, total;
    Scan(scan_tmp).ExclusiveSum(take, pos, total);
    if (take) out[base_s + pos] = i;
    __syncthreads();
    if (threadIdx.x == 0) base_s += total, ties_s += tie_total;
    __syncthreads();
  }
  if (threadIdx.x == 0) count[b] = base_s;
}

}  // namespace

absl::Status IndexerScoresForRows(const float* q, const float* w, const float* keys, int64_t cap,
                                  const int32_t* row_slot, const int32_t* visible, int64_t B, int Hi, int Di,
                                  float* scores, int64_t score_stride, cudaStream_t stream) {
  if (Di < 1 || Di > 512 || Hi < 1 || static_cast<int64_t>(Hi) * Di > 16384)
    return absl::InvalidArgumentError(absl::StrCat("IndexerScores: need 1 <= Di <= 512, Hi*Di <= 16384; got Hi=",
                                                   Hi, " Di=", Di));
  if (B == 0 || cap == 0) return absl::OkStatus();
  if (B > 65535) return absl::InvalidArgumentError(absl::StrCat("IndexerScores: B ", B, " > 65535"));
  const size_t smem = sizeof(float) * (Hi * (Di + 1) + Hi);
  auto launch = [&](auto kernel, int entries, int lanes) -> absl::Status {
    if (smem > 48 * 1024)
      RETORT_CUDA_RETURN(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    const dim3 grid(static_cast<unsigned>((cap + entries - 1) / entries), static_cast<unsigned>(B));
    kernel<<<grid, entries * lanes, smem, stream>>>(q, w, keys, row_slot, visible, Hi, Di, cap, score_stride,
                                                             scores);
    return absl::OkStatus();
  };
  // Many rows: 128 entries a block, 4 lanes each (q staged once per more
  // entries). Few (decode at small batch): 16 entries a block, 16 lanes
  // each, so a 1K-entry row spreads over 64 blocks.
  const bool many = B * ((cap + 31) / 32) >= 4096;
  absl::Status st = many ? launch(IndexerScoresKernel<128, 4>, 128, 4) : launch(IndexerScoresKernel<16, 16>, 16, 16);
  if (!st.ok()) return st;
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status IndexerScores(const float* q, const float* w, const float* keys, const int32_t* visible, int64_t B,
                           int Hi, int Di, int64_t cap, float* scores, cudaStream_t stream) {
  return IndexerScoresForRows(q, w, keys, cap, nullptr, visible, B, Hi, Di, scores, cap, stream);
}

absl::Status TopKAscending(const float* scores, const int32_t* n, int64_t B, int64_t stride, int k, int32_t* selected,
                           int32_t* count, cudaStream_t stream) {
  if (k < 1) return absl::InvalidArgumentError(absl::StrCat("TopKAscending: k must be >= 1, got ", k));
  if (B == 0) return absl::OkStatus();
  TopKKernel<<<static_cast<unsigned>(B), kTopKThreads, 0, stream>>>(scores, n, stride, k, selected, count);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

}  // namespace retort::cuda
