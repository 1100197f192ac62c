#include "model/kernels/cuda/attention.cuh"

#include <cuda_runtime.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/device_utils.cuh"

namespace retort::cuda {
namespace {

constexpr int kHeadsPerBlock = 8;  // one warp per head
constexpr int kKeyTile = 16;      // a multiple of kHeadsPerBlock
constexpr int kMaxPerLane = 16;    // D <= 512
constexpr int kMaxSplits = 64;     // StepAttentionSplits' cap

// Where query row `row` finds its keys: the window keys first (positions
// first..first+nwin-1), then `ncomp` compressed entries.
struct DecodeKeys {
  const DecodeAttentionArgs* a;
  int64_t b, p, nwin, first, ncomp;
  __device__ DecodeKeys(const DecodeAttentionArgs& args, int64_t row) : a(&args), b(row) {
    p = args.positions[row];
    nwin = p + 1 < args.win ? p + 1 : args.win;
    first = p - nwin + 1;
    ncomp = args.count ? args.count[row] : 0;
  }
  __device__ const float* Key(int64_t j) const {
    if (j < nwin) return a->window + (b * a->win + (first + j) % a->win) * a->D;
    const int64_t c = j - nwin;
    const int64_t ent = a->selected ? a->selected[b * a->sel_stride + c] : c;
    return a->entries + (b * a->cap + ent) * a->D;
  }
};

struct StepKeys {
  const StepAttentionArgs* a;
  int64_t r, p, nwin, first, ncomp, slot, p0, row0;
  __device__ StepKeys(const StepAttentionArgs& args, int64_t row) : a(&args), r(row) {
    const int s = args.row_seq[row];
    slot = args.seq_slot[s], p0 = args.seq_p0[s], row0 = args.seq_row0[s];
    p = args.positions[row];
    nwin = p + 1 < args.win ? p + 1 : args.win;
    first = p - nwin + 1;
    ncomp = args.count ? args.count[row] : 0;
  }
  __device__ const float* Key(int64_t j) const {
    if (j < nwin) {
      const int64_t pos = first + j;
      return pos < p0 ? a->ring + (slot * a->win + pos % a->win) * a->D : a->kv + (row0 + pos - p0) * a->D;
    }
    const int64_t c = j - nwin;
    const int64_t ent = a->selected ? a->selected[r * a->sel_stride + c] : c;
    return a->entries + (slot * a->cap + ent) * a->D;
  }
};

// Note [Sparse MQA attention]: one warp per head, kHeadsPerBlock heads per
// block share each tile of kKeyTile keys staged in shared memory (MQA: one
// key set for all heads); online softmax whose running max starts at the
// sink, so the denominator is exp(sink - m) + sum exp(z - m), fp32 throughout.
// Lane l holds dims l, l+32, ... of q and of the output accumulator.
//
// Split-KV (flash decoding): with kSplit the block covers keys [k_begin,
// k_end) only and writes its unnormalised partial (running max m without the
// sink, denominator l, accumulator) to `partial`; StepAttentionCombine merges
// the splits with the sink. Decode steps have few query rows, so splitting
// the keys is what fills the GPU.
template <bool kSplit, typename Keys, typename Args>
__device__ __forceinline__ void AttendRow(const Args& a, const Keys& keys, int64_t row, int64_t head_block,
                                          int64_t k_begin, int64_t k_end, float* ktile, float* partial) {
  const int64_t D = a.D;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t h = head_block * kHeadsPerBlock + warp;
  const bool active = h < a.H;
  const int per = static_cast<int>(D / 32);
  const float scale = 1.0f / sqrtf(static_cast<float>(D));

  float q[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    q[i] = (active && i < per) ? a.q[(row * a.H + h) * D + lane + 32 * i] : 0.0f;
    acc[i] = 0.0f;
  }
  float run_max = kSplit ? -INFINITY : (active ? a.sinks[h] : 0.0f);
  float denom = kSplit ? 0.0f : 1.0f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kKeyTile) {
    const int nt = static_cast<int>(k_end - k0 < kKeyTile ? k_end - k0 : kKeyTile);
    __syncthreads();  // previous tile consumed
    // Stage the tile: warp w copies keys w, w + 8, ... with float4 loads, the
    // key's address resolved once (ring / this step's rows / selected entry).
    // (Holding both keys' loads in registers first spilled and ran 1.8x
    // slower on an H200.)
    for (int j = warp; j < nt; j += kHeadsPerBlock) {
      const float4* src = reinterpret_cast<const float4*>(keys.Key(k0 + j));
      float4* dst = reinterpret_cast<float4*>(ktile + j * D);
#pragma unroll 4
      for (int e = lane; e < per * 8; e += 32) dst[e] = __ldg(src + e);
    }
    __syncthreads();
    if (!active) continue;
    float z[kKeyTile];
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kKeyTile; ++j) {
      float dot = 0.0f;
      if (j < nt) {
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i)
          if (i < per) dot += q[i] * ktile[j * D + lane + 32 * i];
      }
      dot = internal::WarpSum(dot);
      z[j] = j < nt ? dot * scale : -INFINITY;
      tile_max = fmaxf(tile_max, z[j]);
    }
    const float new_max = fmaxf(run_max, tile_max);
    const float f = run_max == -INFINITY ? 0.0f : expf(run_max - new_max);
    denom *= f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) acc[i] *= f;
    run_max = new_max;
#pragma unroll
    for (int j = 0; j < kKeyTile; ++j) {
      if (j < nt) {
        const float pj = expf(z[j] - run_max);
        denom += pj;
#pragma unroll
        for (int i = 0; i < kMaxPerLane; ++i)
          if (i < per) acc[i] += pj * ktile[j * D + lane + 32 * i];
      }
    }
  }
  if (!active) return;
  if constexpr (kSplit) {
    // partial layout per (row, head, split): [m, l, acc[D]].
    float* pp = partial + ((row * a.H + h) * gridDim.z + blockIdx.z) * (D + 2);
    if (lane == 0) pp[0] = run_max, pp[1] = denom;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i)
      if (i < per) pp[2 + lane + 32 * i] = acc[i];
  } else {
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i)
      if (i < per) a.out[(row * a.H + h) * D + lane + 32 * i] = acc[i] / denom;
  }
}

// grid (B, ceil(H / 8)); dynamic smem: kKeyTile * D floats.
__global__ void __launch_bounds__(kHeadsPerBlock * 32) DecodeAttentionKernel(DecodeAttentionArgs a) {
  extern __shared__ float ktile[];
  const DecodeKeys keys(a, blockIdx.x);
  AttendRow<false>(a, keys, blockIdx.x, blockIdx.y, 0, keys.nwin + keys.ncomp, ktile, nullptr);
}

// grid (N, ceil(H / 8), splits): split z covers keys [z * chunk, (z + 1) * chunk).
template <bool kSplit>
__global__ void __launch_bounds__(kHeadsPerBlock * 32) StepAttentionKernel(StepAttentionArgs a, int64_t chunk) {
  extern __shared__ float ktile[];
  const StepKeys keys(a, blockIdx.x);
  const int64_t nk = keys.nwin + keys.ncomp;
  const int64_t b0 = kSplit ? blockIdx.z * chunk : 0;
  const int64_t b1 = kSplit ? (b0 + chunk < nk ? b0 + chunk : nk) : nk;
  AttendRow<kSplit>(a, keys, blockIdx.x, blockIdx.y, b0, b1 > b0 ? b1 : b0, ktile, a.partial);
}

// grid (N, H), D threads: merges the splits of one (row, head) with the sink.
// The splits' weights exp(m_z - M) are computed once, in shared memory.
// (inv_denom holds the denominator itself.)
__global__ void StepAttentionCombineKernel(StepAttentionArgs a, int splits) {
  __shared__ float weight[kMaxSplits];
  __shared__ float inv_denom;
  const int64_t row = blockIdx.x, h = blockIdx.y, D = a.D;
  const float* pp = a.partial + (row * a.H + h) * splits * (D + 2);
  if (threadIdx.x < 32) {  // lane z (and z + 32) reads split z's (m, l) at once; fixed-order warp reductions
    const int lane = threadIdx.x;
    const float sink = a.sinks[h];
    constexpr int kPer = kMaxSplits / 32;
    float mz[kPer], lz[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int z = lane + 32 * u;
      lz[u] = z < splits ? pp[z * (D + 2) + 1] : 0.0f;
      mz[u] = z < splits ? pp[z * (D + 2)] : -INFINITY;
    }
    float M = sink;
#pragma unroll
    for (int u = 0; u < kPer; ++u)
      if (lz[u] > 0.0f) M = fmaxf(M, mz[u]);
    M = internal::WarpMax(M);
    float part = 0.0f;
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int z = lane + 32 * u;
      const float wz = lz[u] > 0.0f ? expf(mz[u] - M) : 0.0f;
      if (z < splits) weight[z] = wz;
      part += lz[u] * wz;
    }
    const float denom = internal::WarpSum(part) + expf(sink - M);
    if (lane == 0) inv_denom = denom;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < D; e += blockDim.x) {
    float acc = 0.0f;
#pragma unroll 8
    for (int z = 0; z < splits; ++z)
      if (weight[z] != 0.0f) acc += pp[z * (D + 2) + 2 + e] * weight[z];
    a.out[(row * a.H + h) * D + e] = acc / inv_denom;
  }
}

// grid (S, win): block (s, i) copies the chunk's i-th of its last min(T, win) rows.
__global__ void WriteWindowRingKernel(const float* __restrict__ kv, int64_t D, float* __restrict__ ring, int64_t win,
                                      const int32_t* __restrict__ seq_slot, const int64_t* __restrict__ seq_p0,
                                      const int32_t* __restrict__ seq_row0, const int32_t* __restrict__ seq_T) {
  const int s = blockIdx.x;
  const int64_t T = seq_T[s], n = T < win ? T : win, i = blockIdx.y;
  if (i >= n) return;
  const int64_t t = T - n + i, pos = seq_p0[s] + t;
  const float* src = kv + (seq_row0[s] + t) * D;
  float* dst = ring + (seq_slot[s] * win + pos % win) * D;
  for (int64_t e = threadIdx.x; e < D; e += blockDim.x) dst[e] = src[e];
}

absl::Status CheckHeadDim(const char* what, int64_t D, int64_t win) {
  if (D % 32 != 0 || D > 32 * kMaxPerLane || D <= 0)
    return absl::InvalidArgumentError(absl::StrCat(what, ": D must be a multiple of 32 in [32, 512], got ", D));
  if (win < 1) return absl::InvalidArgumentError(absl::StrCat(what, ": window must be >= 1"));
  return absl::OkStatus();
}

template <typename Kernel>
absl::Status SetSmem(Kernel k, size_t smem) {
  if (smem > 48 * 1024)
    RETORT_CUDA_RETURN(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  return absl::OkStatus();
}

}  // namespace

absl::Status DecodeAttention(const DecodeAttentionArgs& a, cudaStream_t stream) {
  absl::Status st = CheckHeadDim("DecodeAttention", a.D, a.win);
  if (!st.ok()) return st;
  if (a.count && !a.entries) return absl::InvalidArgumentError("DecodeAttention: count given without entries");
  if (a.B == 0 || a.H == 0) return absl::OkStatus();
  const size_t smem = sizeof(float) * kKeyTile * a.D;
  if (absl::Status sm = SetSmem(DecodeAttentionKernel, smem); !sm.ok()) return sm;
  const dim3 grid(static_cast<unsigned>(a.B), static_cast<unsigned>((a.H + kHeadsPerBlock - 1) / kHeadsPerBlock));
  DecodeAttentionKernel<<<grid, kHeadsPerBlock * 32, smem, stream>>>(a);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status StepAttention(const StepAttentionArgs& a, cudaStream_t stream) {
  absl::Status st = CheckHeadDim("StepAttention", a.D, a.win);
  if (!st.ok()) return st;
  if (a.count && !a.entries) return absl::InvalidArgumentError("StepAttention: count given without entries");
  if (a.N == 0 || a.H == 0) return absl::OkStatus();
  const size_t smem = sizeof(float) * kKeyTile * a.D;
  const int64_t head_blocks = (a.H + kHeadsPerBlock - 1) / kHeadsPerBlock;
  const int splits = a.partial ? StepAttentionSplits(a.N, a.H, a.max_keys) : 1;
  if (splits == 1) {
    if (absl::Status sm = SetSmem(StepAttentionKernel<false>, smem); !sm.ok()) return sm;
    const dim3 grid(static_cast<unsigned>(a.N), static_cast<unsigned>(head_blocks));
    StepAttentionKernel<false><<<grid, kHeadsPerBlock * 32, smem, stream>>>(a, 0);
    RETORT_CUDA_LAUNCH_CHECK();
    return absl::OkStatus();
  }
  if (absl::Status sm = SetSmem(StepAttentionKernel<true>, smem); !sm.ok()) return sm;
  const int64_t chunk = (a.max_keys + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>(a.N), static_cast<unsigned>(head_blocks), static_cast<unsigned>(splits));
  StepAttentionKernel<true><<<grid, kHeadsPerBlock * 32, smem, stream>>>(a, chunk);
  RETORT_CUDA_LAUNCH_CHECK();
  StepAttentionCombineKernel<<<dim3(static_cast<unsigned>(a.N), static_cast<unsigned>(a.H)),
                               static_cast<unsigned>(a.D < 256 ? a.D : 256), 0, stream>>>(a, splits);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

int StepAttentionSplits(int64_t N, int64_t H, int64_t max_keys) {
  // Aim for ~2 waves of 132 SMs' worth of blocks, at least 32 keys per split.
  const int64_t blocks = N * ((H + kHeadsPerBlock - 1) / kHeadsPerBlock);
  int64_t splits = (264 + blocks - 1) / blocks;
  splits = std::min<int64_t>(splits, (max_keys + 31) / 32);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(splits, 64)));
}

int64_t StepAttentionScratchFloats(int64_t N, int64_t H, int64_t D, int64_t max_keys) {
  const int splits = StepAttentionSplits(N, H, max_keys);
  return splits > 1 ? N * H * splits * (D + 2) : 0;
}

absl::Status WriteWindowRing(const float* kv, int64_t D, float* ring, int64_t win, int S, const int32_t* seq_slot,
                             const int64_t* seq_p0, const int32_t* seq_row0, const int32_t* seq_T,
                             cudaStream_t stream) {
  if (S == 0 || win == 0) return absl::OkStatus();
  if (win > 65535) return absl::InvalidArgumentError(absl::StrCat("WriteWindowRing: window ", win, " > 65535"));
  WriteWindowRingKernel<<<dim3(static_cast<unsigned>(S), static_cast<unsigned>(win)), 128, 0, stream>>>(
      kv, D, ring, win, seq_slot, seq_p0, seq_row0, seq_T);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

}  // namespace retort::cuda
