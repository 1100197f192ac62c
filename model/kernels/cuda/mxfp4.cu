#include "model/kernels/cuda/mxfp4.cuh"

#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/device_utils.cuh"

namespace retort::cuda {
namespace {

constexpr int kWarps = 8;        // warps per CTA
constexpr int kRowsPerWarp = 2;  // output rows per warp (each x value feeds both)
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;
constexpr int kTokenTile = 8;    // rows of x consumed per decoded weight word
constexpr int kChunkBlocks = 32; // MX blocks per staged k-chunk: one per lane
constexpr int kPad = 36;         // floats per staged block: 32 + 4 of skew

// Note [MXFP4 GEMV layout]: lane l of every warp owns MX block c0 + l of the
// current k-chunk, so the 16-byte code loads of a warp are one coalesced
// 512-byte read. x for the chunk is staged once per CTA in shared memory with
// a 36-float stride per 32-value block: a quarter-warp's 128-bit reads of
// eight lanes' blocks then hit eight distinct 4-bank groups (a 32-float
// stride would put all lanes on the same banks — the old kernel's reads of x
// straight from global memory at that stride touched 32 cache lines per
// instruction and capped it at ~2 TFLOP/s). Each decoded weight word (8
// values) is used by kRowsPerWarp rows x kTokenTile tokens of FMAs.
//
// grid: (ceil(out / kRowsPerCta), groups). Warp w of CTA (bx, g) computes
// output columns bx * kRowsPerCta + w * kRowsPerWarp + r for every row of
// group g, kTokenTile rows at a time.
__global__ void __launch_bounds__(kWarps * 32) MxFp4GroupedKernel(
    const float* __restrict__ x, int64_t in, const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
    int64_t out, const int32_t* __restrict__ group_offsets, const int32_t* __restrict__ group_expert,
    const int32_t* __restrict__ row_index, int64_t single_rows, float* __restrict__ y) {
  __shared__ __align__(16) float xs[kTokenTile][kChunkBlocks * kPad];
  __shared__ float lut[16];  // e2m1 code -> value
  if (threadIdx.x < 16) lut[threadIdx.x] = internal::E2M1(threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + warp * kRowsPerWarp;
  const int g = blockIdx.y;
  const int64_t m0 = group_offsets ? group_offsets[g] : 0;
  const int64_t m1 = group_offsets ? group_offsets[g + 1] : single_rows;
  const int64_t e = group_expert ? group_expert[g] : 0;
  const int64_t blocks = in / 32;
  const uint8_t* crow[kRowsPerWarp];
  const uint8_t* srow[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t o = o0 + r < out ? o0 + r : out - 1;  // clamped; stores are guarded
    crow[r] = codes + (e * out + o) * (in / 2);
    srow[r] = scales + (e * out + o) * blocks;
  }
  for (int64_t t0 = m0; t0 < m1; t0 += kTokenTile) {
    const int nt = static_cast<int>(m1 - t0 < kTokenTile ? m1 - t0 : kTokenTile);
    float acc[kRowsPerWarp][kTokenTile];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int t = 0; t < kTokenTile; ++t) acc[r][t] = 0.0f;
    // Codes and scales of the next chunk are loaded one chunk ahead, so the
    // HBM reads overlap the staging of x and the FMAs of the current chunk.
    uint4 q_next[kRowsPerWarp];
    uint8_t s_next[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) q_next[r] = make_uint4(0, 0, 0, 0), s_next[r] = 127;
    auto load_chunk = [&](int64_t c0) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (c0 + lane < blocks) {
          q_next[r] = __ldg(reinterpret_cast<const uint4*>(crow[r] + (c0 + lane) * 16));
          s_next[r] = __ldg(srow[r] + c0 + lane);
        }
      }
    };
    load_chunk(0);
    for (int64_t c0 = 0; c0 < blocks; c0 += kChunkBlocks) {
      const int nb = static_cast<int>(blocks - c0 < kChunkBlocks ? blocks - c0 : kChunkBlocks);
      uint4 q[kRowsPerWarp];
      float sc[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        q[r] = q_next[r];
        sc[r] = internal::E8M0(s_next[r]);
      }
      if (c0 + kChunkBlocks < blocks) load_chunk(c0 + kChunkBlocks);
      __syncthreads();  // the previous chunk is consumed
      // Only the nt live rows are staged (decode: nt = 1).
      for (int idx = threadIdx.x; idx < nt * kChunkBlocks * 8; idx += kWarps * 32) {
        const int t = idx / (kChunkBlocks * 8);
        const int b = (idx / 8) % kChunkBlocks;
        const int k = idx % 8;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (b < nb) {
          const int64_t m = t0 + t;
          const float* xr = x + (row_index ? static_cast<int64_t>(row_index[m]) : m) * in;
          v = __ldg(reinterpret_cast<const float4*>(xr + (c0 + b) * 32) + k);
        }
        *reinterpret_cast<float4*>(&xs[t][b * kPad + 4 * k]) = v;
      }
      __syncthreads();
      if (lane < nb) {
        // The block's E8M0 scale is a power of two, so it is applied once to
        // the block's partial dot product: sc * sum(e2m1 * x) equals
        // sum((e2m1 * sc) * x) in fp32 (no rounding moves) outside the
        // subnormal range; e2m1 values come from a 16-entry table.
        float part[kRowsPerWarp][kTokenTile];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
          for (int t = 0; t < kTokenTile; ++t) part[r][t] = 0.0f;
#pragma unroll
        for (int word = 0; word < 4; ++word) {
          float w[kRowsPerWarp][8];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            const uint32_t bits = word == 0 ? q[r].x : word == 1 ? q[r].y : word == 2 ? q[r].z : q[r].w;
#pragma unroll
            for (int k = 0; k < 8; ++k) w[r][k] = lut[(bits >> (4 * k)) & 0xfu];
          }
#pragma unroll
          for (int t = 0; t < kTokenTile; ++t) {
            if (t < nt) {
              const float4 a = *reinterpret_cast<const float4*>(&xs[t][lane * kPad + 8 * word]);
              const float4 c = *reinterpret_cast<const float4*>(&xs[t][lane * kPad + 8 * word + 4]);
#pragma unroll
              for (int r = 0; r < kRowsPerWarp; ++r)
                part[r][t] += w[r][0] * a.x + w[r][1] * a.y + w[r][2] * a.z + w[r][3] * a.w + w[r][4] * c.x +
                              w[r][5] * c.y + w[r][6] * c.z + w[r][7] * c.w;
            }
          }
        }
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
          for (int t = 0; t < kTokenTile; ++t)
            if (t < nt) acc[r][t] += sc[r] * part[r][t];
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int t = 0; t < kTokenTile; ++t) {
        const float s = internal::WarpSum(acc[r][t]);
        if (lane == 0 && t < nt && o0 + r < out) y[(t0 + t) * out + o0 + r] = s;
      }
  }
}

// ---------------------------------------------------------------------------
// Tensor-core path (prefill-sized M). See Note [MXFP4 MMA layout].
//
// Note [MXFP4 MMA layout]: y = x W^T with mma.sync.m16n8k16 bf16 -> f32; the
// A operand is x (16 token rows), B is W (8 output rows, "col" = W's own
// row-major [out, in] layout). A k-permutation inside every 32-wide MX block
// makes both operands one contiguous shared-memory read per thread: the
// fragment position (k16 step t, half h, lane quad kq, element j) stands for
// physical k = 8*kq + 2*t + h + 4*j. So lane (g, kq) reads
//   - W: ONE 32-bit word = code bytes 4*kq..4*kq+3 of its output row, i.e.
//     nibbles q = 0..7 at physical k = 8*kq + q; register m = 2*t + h takes
//     nibbles m (low half) and m + 4 (high half), so a decode is two shifts
//     and two masks on the word (no byte shuffling), and
//   - x: ONE 16-byte read = x[row][8*kq .. 8*kq+7]; register m is
//     (e_m, e_{m+4}), one PRMT of that vector.
// The sum over k is order-free, so the product is unchanged.
//
// Decode (exact): an e2m1 code s|e1 e0|m placed as bf16 bits s<<15 | em<<6
// reads as value * 2^-126 (code 0b001 becomes the bf16 subnormal 2^-127,
// which is 0.5 * 2^-126, as required); one mul.bf16x2 by 2^(E - 1) (E the
// E8M0 byte) then gives value * 2^(E-127) exactly. 2^(E-1) is a bf16 only for
// E <= 128; a warp whose 32-block scales of the stage include a byte > 128
// takes a two-multiply path (2^(min(E,128)-1) then 2^(E-128), or NaN for
// 0xff) — chosen warp-uniformly per stage, so real checkpoints (scales far
// below 2^1) pay one multiply.
//
// Shared memory per stage (kBk = 128 k): x tile [BM][256 B] with 16-byte
// chunk c of row r stored at c ^ ((r & 1) << 2) (rows g and g+1 read by one
// quarter-warp then hit disjoint banks); codes [BN][64 B] with chunk b of row
// n at b ^ ((n >> 1) & 3) (8 rows x 16 B per warp read, conflict-free); E8M0
// scales [BN][4 B] (the four 32-blocks of the stage). cp.async, kStages deep.
//
// Grid (ceil(out / BN), ty, groups): CTA (bx, by, g) computes the M tiles
// by, by + ty, ... of group g, so any ty >= 1 is correct; the launcher sizes
// ty from the mean rows per group.
constexpr int kBk = 128;              // k per pipeline stage (4 MX blocks)
constexpr int kXRowBytes = kBk * 2;   // bf16
constexpr int kCodeRowBytes = kBk / 2;
constexpr int kScaleRowBytes = kBk / 32;

// kMinBlocks: CTAs per SM the register budget is capped for (launch bounds);
// kHoldX: keep both k16 steps' x fragments of a 32-block in registers (else
// re-read x per step); kUnrollB: unroll the 4-block loop of a stage.
template <int kMTiles, int kNTiles, int kWarpsM, int kWarpsN, int kStages, int kMinBlocks, bool kHoldX,
          bool kUnrollB, bool kSmemBDecode = false>
struct MmaConfig {
  static constexpr int kM = kMTiles, kN = kNTiles, kWM = kWarpsM, kS = kStages, kMinB = kMinBlocks;
  static constexpr bool kHold = kHoldX, kUnroll = kUnrollB, kSmemB = kSmemBDecode;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kBm = 16 * kMTiles * kWarpsM;  // token rows per CTA
  static constexpr int kBn = 8 * kNTiles * kWarpsN;   // output rows per CTA
  static constexpr int kXBytes = kBm * kXRowBytes;
  static constexpr int kCodeBytes = kBn * kCodeRowBytes;
  static constexpr int kStageBytes = kXBytes + kCodeBytes + kBn * kScaleRowBytes;
  // kSmemB: two buffers of one decoded 32-k block, [kBn][32] bf16 (64 B rows).
  static constexpr int kDecBytes = kSmemBDecode ? 2 * kBn * 64 : 0;
  static constexpr int kSmemBytes = kStages * kStageBytes + kDecBytes + kBm * 4;  // + source row ids
};
// 128 x 256, 8 warps of 64 x 64, one CTA per SM (register-bound: 2 warps per scheduler).
using MmaLarge = MmaConfig<4, 8, 2, 4, 4, 1, false, false>;
// 64 x 256, 8 warps of 64 x 32 capped at 128 registers: two CTAs (16 warps) per SM.
using MmaWide = MmaConfig<4, 4, 1, 8, 3, 2, false, false>;
// 64 x 128, 4 warps of 32 x 64.
using MmaSmall = MmaConfig<2, 8, 2, 2, 4, 2, false, false>;
// 64 x 64, 4 warps of 32 x 32, three CTAs per SM: small groups / small M.
using MmaTiny = MmaConfig<2, 4, 2, 2, 3, 3, true, true>;
// 128 x 256 with W decoded once per CTA into shared memory (Note [MXFP4 MMA
// smem decode]), 3 stages.
using MmaLargeSmem = MmaConfig<4, 8, 2, 4, 3, 1, false, false, true>;

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte async copy; src_bytes = 0 zero-fills (the source is not read).
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}
__device__ __forceinline__ uint32_t MulBf16x2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
__device__ __forceinline__ void MmaBf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                        uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Register m (0..3) of a code word: nibbles m and m+4 as bf16 bits times 2^-126.
template <int m>
__device__ __forceinline__ uint32_t E2M1PairBits(uint32_t w) {
  constexpr int kSign = 12 - 4 * m, kMag = 6 - 4 * m;  // left shifts (negative: right)
  const uint32_t sign = kSign >= 0 ? (w << kSign) : (w >> -kSign);
  const uint32_t mag = kMag >= 0 ? (w << kMag) : (w >> -kMag);
  return (sign & 0x80008000u) | (mag & 0x01C001C0u);
}

// One pipeline stage of MMAs for one warp. xs/cs/ss: this stage's x tile,
// code tile, scale words; x_row0 / n_row0: the warp's first x row / output
// row inside the CTA tile.
template <class Cfg, bool kWide>
__device__ __forceinline__ void MmaStage(const uint8_t* xs, const uint8_t* cs, const uint32_t* ss, int x_row0,
                                         int n_row0, int lane, float (&acc)[Cfg::kM][Cfg::kN][4]) {
  const int g = lane >> 2, kq = lane & 3;
  const uint8_t* sb = reinterpret_cast<const uint8_t*>(ss);
  // The Large tile's block loop is not unrolled and it re-reads x per k16
  // step t (the 16-byte read holds both steps' values): hoisting or holding
  // them would need more registers than its 64 x 64 warp tile leaves (ptxas
  // spilled). Smaller warp tiles hold and unroll (kHold, kUnroll).
#pragma unroll(Cfg::kUnroll ? 4 : 1)
  for (int b = 0; b < 4; ++b) {
    const int xchunk = ((b ^ (g & 1)) << 2) + kq;  // 16-byte chunk b*4+kq, swizzled by row parity
    const int cchunk = b ^ ((g >> 1) & 3);
    // a0..a3 of step t = {row g reg 2t, row g+8 reg 2t, row g reg 2t+1, row g+8 reg 2t+1},
    // reg m = (e_m, e_{m+4}) of the row's 8 values: 2t from (.x,.z) / (.y,.w) low halves, 2t+1 high.
    uint32_t a[Cfg::kM][Cfg::kHold ? 8 : 4];
    auto load_x = [&](int t) {
#pragma unroll
      for (int i = 0; i < Cfg::kM; ++i) {
        const int r = x_row0 + i * 16 + g;
        const uint4 lo = *reinterpret_cast<const uint4*>(xs + r * kXRowBytes + xchunk * 16);
        const uint4 hi = *reinterpret_cast<const uint4*>(xs + (r + 8) * kXRowBytes + xchunk * 16);
#pragma unroll
        for (int tt = 0; tt < 2; ++tt) {
          if (!Cfg::kHold && tt != t) continue;
          const int o = Cfg::kHold ? 4 * tt : 0;
          const uint32_t l0 = tt == 0 ? lo.x : lo.y, l1 = tt == 0 ? lo.z : lo.w;
          const uint32_t h0 = tt == 0 ? hi.x : hi.y, h1 = tt == 0 ? hi.z : hi.w;
          a[i][o + 0] = __byte_perm(l0, l1, 0x5410);
          a[i][o + 1] = __byte_perm(h0, h1, 0x5410);
          a[i][o + 2] = __byte_perm(l0, l1, 0x7632);
          a[i][o + 3] = __byte_perm(h0, h1, 0x7632);
        }
      }
    };
    if (Cfg::kHold) load_x(-1);
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      if (!Cfg::kHold) load_x(t);
      const int o = Cfg::kHold ? 4 * t : 0;
#pragma unroll
      for (int j = 0; j < Cfg::kN; ++j) {
        const int n = n_row0 + j * 8 + g;
        const uint32_t w = *reinterpret_cast<const uint32_t*>(cs + n * kCodeRowBytes + cchunk * 16 + kq * 4);
        const uint32_t e = sb[n * kScaleRowBytes + b];
        uint32_t b0 = t == 0 ? E2M1PairBits<0>(w) : E2M1PairBits<2>(w);
        uint32_t b1 = t == 0 ? E2M1PairBits<1>(w) : E2M1PairBits<3>(w);
        if constexpr (!kWide) {
          const uint32_t mult = (e + 126u) * 0x00800080u;  // bf16x2 2^(e-1), e <= 128
          b0 = MulBf16x2(b0, mult);
          b1 = MulBf16x2(b1, mult);
        } else {
          const uint32_t m1 = ((e < 128u ? e : 128u) + 126u) * 0x00800080u;
          const uint32_t m2 = e <= 128u ? 0x3F803F80u : e == 255u ? 0x7FC07FC0u : (e - 1u) * 0x00800080u;
          b0 = MulBf16x2(MulBf16x2(b0, m1), m2);
          b1 = MulBf16x2(MulBf16x2(b1, m1), m2);
        }
#pragma unroll
        for (int i = 0; i < Cfg::kM; ++i)
          MmaBf16(acc[i][j], a[i][o + 0], a[i][o + 1], a[i][o + 2], a[i][o + 3], b0, b1);
      }
    }
  }
}

// Note [MXFP4 MMA smem decode]: the kSmemB tiles decode each 32-k block of
// the W tile ONCE per CTA (thread n of the CTA: output row n, 16 code bytes
// -> 32 bf16 in natural k order) into a double-buffered [kBn][32] bf16 tile,
// and both operands then go through ldmatrix in natural k order (no
// permutation, no PRMT on x). Per HMMA that is ~1.5 decode instructions
// instead of ~3 when every warp decodes its own fragments (the W columns of
// a 128-row CTA are shared by its two warp rows). Decoded rows: chunk q of
// row n at q ^ ((n >> 1) & 3); x rows: chunk c of row r at c ^ (r & 7) (the
// 8 rows of one 8x8 ldmatrix then hit 8 distinct bank groups).
__device__ __forceinline__ void LdMatrixX4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// Thread n decodes block b of output row n (n < kBn) into dec.
template <class Cfg>
__device__ __forceinline__ void DecodeBlockToSmem(const uint8_t* cs, const uint8_t* sb, int b, uint8_t* dec, int n) {
  const uint4 q = *reinterpret_cast<const uint4*>(cs + n * kCodeRowBytes + ((b ^ ((n >> 1) & 3)) * 16));
  const uint32_t e = sb[n * kScaleRowBytes + b];
  uint32_t m1, m2 = 0x3F803F80u;
  if (e <= 128u) {
    m1 = (e + 126u) * 0x00800080u;
  } else {
    m1 = 254u * 0x00800080u;
    m2 = e == 255u ? 0x7FC07FC0u : (e - 1u) * 0x00800080u;
  }
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  auto decode = [&](auto wide) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const uint32_t w = words[c];
      uint32_t r[4] = {E2M1PairBits<0>(w), E2M1PairBits<1>(w), E2M1PairBits<2>(w), E2M1PairBits<3>(w)};
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        r[m] = MulBf16x2(r[m], m1);
        if constexpr (decltype(wide)::value) r[m] = MulBf16x2(r[m], m2);
      }
      // r[m] = (k m, k m+4) of this word's 8 values; natural pairs (k 2p, 2p+1):
      const uint4 v = make_uint4(__byte_perm(r[0], r[1], 0x5410), __byte_perm(r[2], r[3], 0x5410),
                                 __byte_perm(r[0], r[1], 0x7632), __byte_perm(r[2], r[3], 0x7632));
      *reinterpret_cast<uint4*>(dec + n * 64 + ((c ^ ((n >> 1) & 3)) * 16)) = v;
    }
  };
  // Warp-uniform choice: scale bytes > 128 need the second multiply.
  if (__any_sync(0xffffffffu, e > 128u))
    decode(std::true_type{});
  else
    decode(std::false_type{});
}

// MMAs of one decoded 32-k block b for one warp (ldmatrix for x and W).
template <class Cfg>
__device__ __forceinline__ void MmaBlockFromSmem(const uint8_t* xs, const uint8_t* dec, int b, int x_row0, int n_row0,
                                                 int lane, float (&acc)[Cfg::kM][Cfg::kN][4]) {
  uint32_t bw[Cfg::kN][4];
#pragma unroll
  for (int j = 0; j < Cfg::kN; ++j) {
    const int n = n_row0 + j * 8 + (lane & 7), q = lane >> 3;
    LdMatrixX4(SmemAddr(dec + n * 64 + ((q ^ ((n >> 1) & 3)) * 16)), bw[j][0], bw[j][1], bw[j][2], bw[j][3]);
  }
#pragma unroll
  for (int t = 0; t < 2; ++t) {
#pragma unroll
    for (int i = 0; i < Cfg::kM; ++i) {
      const int r = x_row0 + i * 16 + (lane & 15);
      const int c = 4 * b + 2 * t + (lane >> 4);
      uint32_t a0, a1, a2, a3;
      LdMatrixX4(SmemAddr(xs + r * kXRowBytes + ((c ^ (r & 7)) * 16)), a0, a1, a2, a3);
#pragma unroll
      for (int j = 0; j < Cfg::kN; ++j) MmaBf16(acc[i][j], a0, a1, a2, a3, bw[j][2 * t], bw[j][2 * t + 1]);
    }
  }
}

// True when some E8M0 byte of the word exceeds 128 (needs the two-multiply decode).
__device__ __forceinline__ uint32_t WideScaleBytes(uint32_t v) {
  return (v & 0x80808080u) & ((v & 0x7f7f7f7fu) + 0x7f7f7f7fu);
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinB) MxFp4MmaKernel(
    const uint16_t* __restrict__ x, int64_t in, const uint8_t* __restrict__ codes, const uint8_t* __restrict__ scales,
    int64_t out, const int32_t* __restrict__ group_offsets, const int32_t* __restrict__ group_expert,
    const int32_t* __restrict__ row_index, int64_t single_rows, float* __restrict__ y) {
  static_assert(!Cfg::kSmemB || (!Cfg::kHold && !Cfg::kUnroll && Cfg::kBn <= Cfg::kThreads),
                "the smem-decode path has its own block loop and one decoding thread per output row");
  extern __shared__ __align__(128) uint8_t smem[];
  int32_t* row_src = reinterpret_cast<int32_t*>(smem + Cfg::kS * Cfg::kStageBytes + Cfg::kDecBytes);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp % Cfg::kWM, warp_n = warp / Cfg::kWM;
  const int g = blockIdx.z;
  const int64_t m_begin = group_offsets ? group_offsets[g] : 0;
  const int64_t m_end = group_offsets ? group_offsets[g + 1] : single_rows;
  const int64_t e = group_expert ? group_expert[g] : 0;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * Cfg::kBn;
  const uint8_t* codes_e = codes + e * out * (in / 2);
  const uint8_t* scales_e = scales + e * out * (in / 32);
  const int k_tiles = static_cast<int>(in / kBk);

  for (int64_t m0 = m_begin + static_cast<int64_t>(blockIdx.y) * Cfg::kBm; m0 < m_end;
       m0 += static_cast<int64_t>(gridDim.y) * Cfg::kBm) {
    __syncthreads();  // the previous tile is done with row_src and every stage
    for (int r = tid; r < Cfg::kBm; r += Cfg::kThreads)
      row_src[r] = m0 + r < m_end ? (row_index ? row_index[m0 + r] : static_cast<int32_t>(m0 + r)) : -1;
    __syncthreads();

    auto load_stage = [&](int kt, int stage) {
      uint8_t* xs = smem + stage * Cfg::kStageBytes;
      uint8_t* cs = xs + Cfg::kXBytes;
      uint8_t* ss = cs + Cfg::kCodeBytes;
      const int64_t k0 = static_cast<int64_t>(kt) * kBk;
#pragma unroll 1
      for (int i = tid; i < Cfg::kBm * 16; i += Cfg::kThreads) {
        const int r = i >> 4, c = i & 15;
        const int32_t src = row_src[r];
        const uint16_t* p = x + (src >= 0 ? static_cast<int64_t>(src) * in + k0 + c * 8 : 0);
        const int pc = Cfg::kSmemB ? (c ^ (r & 7)) : (c ^ ((r & 1) << 2));
        CpAsync16(SmemAddr(xs + r * kXRowBytes + pc * 16), p, src >= 0);
      }
#pragma unroll 1
      for (int i = tid; i < Cfg::kBn * 4; i += Cfg::kThreads) {
        const int n = i >> 2, c = i & 3;
        const bool ok = n0 + n < out;
        const uint8_t* p = codes_e + (ok ? (n0 + n) * (in / 2) + k0 / 2 + c * 16 : 0);
        CpAsync16(SmemAddr(cs + n * kCodeRowBytes + ((c ^ ((n >> 1) & 3)) * 16)), p, ok);
      }
      for (int n = tid; n < Cfg::kBn; n += Cfg::kThreads) {
        const bool ok = n0 + n < out;
        const uint8_t* p = scales_e + (ok ? (n0 + n) * (in / 32) + k0 / 32 : 0);
        CpAsync4(SmemAddr(ss + n * kScaleRowBytes), p, ok);
      }
    };

    float acc[Cfg::kM][Cfg::kN][4];
#pragma unroll
    for (int i = 0; i < Cfg::kM; ++i)
#pragma unroll
      for (int j = 0; j < Cfg::kN; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

#pragma unroll
    for (int s = 0; s < Cfg::kS - 1; ++s) {
      if (s < k_tiles) load_stage(s, s);
      CpAsyncCommit();
    }
    const int x_row0 = warp_m * Cfg::kM * 16, n_row0 = warp_n * Cfg::kN * 8;
    for (int kt = 0; kt < k_tiles; ++kt) {
      CpAsyncWait<Cfg::kS - 2>();
      __syncthreads();  // stage kt landed for all threads; stage kt-1 is free
      if (kt + Cfg::kS - 1 < k_tiles) load_stage(kt + Cfg::kS - 1, (kt + Cfg::kS - 1) % Cfg::kS);
      CpAsyncCommit();
      const uint8_t* xs = smem + (kt % Cfg::kS) * Cfg::kStageBytes;
      const uint8_t* cs = xs + Cfg::kXBytes;
      const uint32_t* ss = reinterpret_cast<const uint32_t*>(cs + Cfg::kCodeBytes);
      if constexpr (Cfg::kSmemB) {
        // [decode 0] sync [decode 1 | mma 0] sync [decode 2 | mma 1] sync [decode 3 | mma 2] sync [mma 3];
        // the next stage's decode 0 (buffer 0) follows the sync after mma 2.
        uint8_t* dec = smem + Cfg::kS * Cfg::kStageBytes;
        const uint8_t* sb = reinterpret_cast<const uint8_t*>(ss);
        if (tid < Cfg::kBn) DecodeBlockToSmem<Cfg>(cs, sb, 0, dec, tid);
        __syncthreads();
#pragma unroll 1
        for (int b = 0; b < 4; ++b) {
          if (b < 3 && tid < Cfg::kBn) DecodeBlockToSmem<Cfg>(cs, sb, b + 1, dec + ((b + 1) & 1) * Cfg::kBn * 64, tid);
          MmaBlockFromSmem<Cfg>(xs, dec + (b & 1) * Cfg::kBn * 64, b, x_row0, n_row0, lane, acc);
          if (b < 3) __syncthreads();
        }
      } else {
        uint32_t wide = 0;
#pragma unroll
        for (int j = 0; j < Cfg::kN; ++j) wide |= WideScaleBytes(ss[n_row0 + j * 8 + (lane >> 2)]);
        if (__any_sync(0xffffffffu, wide != 0))
          MmaStage<Cfg, true>(xs, cs, ss, x_row0, n_row0, lane, acc);
        else
          MmaStage<Cfg, false>(xs, cs, ss, x_row0, n_row0, lane, acc);
      }
    }
    CpAsyncWait<0>();

    // Epilogue: c0,c1 = (row g, cols 2kq, 2kq+1), c2,c3 = row g+8.
    const int gq = lane >> 2, kq = lane & 3;
    const bool pairs = (out % 2) == 0;
#pragma unroll
    for (int i = 0; i < Cfg::kM; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + x_row0 + i * 16 + gq + 8 * h;
        if (m >= m_end) continue;
        float* yr = y + m * out;
#pragma unroll
        for (int j = 0; j < Cfg::kN; ++j) {
          const int64_t n = n0 + n_row0 + j * 8 + 2 * kq;
          if (pairs && n + 1 < out) {
            *reinterpret_cast<float2*>(yr + n) = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
          } else {
            if (n < out) yr[n] = acc[i][j][2 * h];
            if (n + 1 < out) yr[n + 1] = acc[i][j][2 * h + 1];
          }
        }
      }
  }
}

absl::Status CheckMmaShapes(int64_t in, int64_t out, const uint16_t* x, const uint8_t* codes, const uint8_t* scales,
                            const float* y) {
  if (in <= 0 || in % kBk != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("MXFP4 tensor-core GEMM: in = ", in, " must be a positive multiple of ", kBk));
  if (out <= 0) return absl::InvalidArgumentError(absl::StrCat("MXFP4 tensor-core GEMM: out = ", out));
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(codes) % 16 != 0)
    return absl::InvalidArgumentError("MXFP4 tensor-core GEMM: x and codes must be 16-byte aligned");
  if (reinterpret_cast<uintptr_t>(scales) % 4 != 0)
    return absl::InvalidArgumentError("MXFP4 tensor-core GEMM: scales must be 4-byte aligned");
  if (reinterpret_cast<uintptr_t>(y) % 8 != 0)
    return absl::InvalidArgumentError("MXFP4 tensor-core GEMM: y must be 8-byte aligned");
  return absl::OkStatus();
}

int SmCount() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 132;
  return sms;
}

template <class Cfg>
absl::Status LaunchMma(const uint16_t* x, int64_t in, const uint8_t* codes, const uint8_t* scales, int64_t out,
                       int groups, int64_t rows_per_group, const int32_t* group_offsets, const int32_t* group_expert,
                       const int32_t* row_index, int64_t single_rows, float* y, cudaStream_t stream) {
  RETORT_CUDA_RETURN(
      cudaFuncSetAttribute(MxFp4MmaKernel<Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  const int64_t ty = std::min<int64_t>(std::max<int64_t>((rows_per_group + Cfg::kBm - 1) / Cfg::kBm, 1), 65535);
  const dim3 grid(static_cast<unsigned>((out + Cfg::kBn - 1) / Cfg::kBn), static_cast<unsigned>(ty),
                  static_cast<unsigned>(groups));
  MxFp4MmaKernel<Cfg><<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(x, in, codes, scales, out, group_offsets,
                                                                        group_expert, row_index, single_rows, y);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status DispatchMma(MxFp4MmaTile tile, const uint16_t* x, int64_t in, const uint8_t* codes, const uint8_t* scales,
                         int64_t out, int groups, int64_t rows_per_group, const int32_t* group_offsets,
                         const int32_t* group_expert, const int32_t* row_index, int64_t single_rows, float* y,
                         cudaStream_t stream) {
  if (tile == MxFp4MmaTile::kAuto) {
    // Measured on an H200 (bench/mxfp4_gemm, V4 expert shapes; see the rule
    // in mxfp4.cuh): the smem-decode 128 x 256 tile wins once its grid fills
    // ~all SMs and groups are >= 128 rows; else 64 x 256 once its grid fills
    // ~all SMs; else 64 x 64 (more CTAs for a small grid).
    auto ctas = [&](int64_t bm, int64_t bn) { return groups * ((rows_per_group + bm - 1) / bm) * ((out + bn - 1) / bn); };
    const int64_t full = SmCount() * 9 / 10;
    if (rows_per_group >= 128 && ctas(MmaLargeSmem::kBm, MmaLargeSmem::kBn) >= full)
      tile = MxFp4MmaTile::k128x256SmemDecode;
    else if (ctas(MmaWide::kBm, MmaWide::kBn) >= full)
      tile = MxFp4MmaTile::k64x256;
    else
      tile = MxFp4MmaTile::k64x64;
  }
  switch (tile) {
    case MxFp4MmaTile::k128x256SmemDecode:
      return LaunchMma<MmaLargeSmem>(x, in, codes, scales, out, groups, rows_per_group, group_offsets, group_expert,
                                     row_index, single_rows, y, stream);
    case MxFp4MmaTile::k64x256:
      return LaunchMma<MmaWide>(x, in, codes, scales, out, groups, rows_per_group, group_offsets, group_expert,
                                row_index, single_rows, y, stream);
    case MxFp4MmaTile::k64x64:
      return LaunchMma<MmaTiny>(x, in, codes, scales, out, groups, rows_per_group, group_offsets, group_expert,
                                row_index, single_rows, y, stream);
    case MxFp4MmaTile::k128x256:
      return LaunchMma<MmaLarge>(x, in, codes, scales, out, groups, rows_per_group, group_offsets, group_expert,
                                 row_index, single_rows, y, stream);
    case MxFp4MmaTile::k64x128:
      return LaunchMma<MmaSmall>(x, in, codes, scales, out, groups, rows_per_group, group_offsets, group_expert,
                                 row_index, single_rows, y, stream);
    case MxFp4MmaTile::kAuto:
      break;
  }
  return absl::InternalError("MXFP4 tensor-core GEMM: unresolved tile");
}

// ---------------------------------------------------------------------------
// Decode path on the tensor cores with exact f32 x (1..16 rows per expert).
// See Note [MXFP4 decode MMA].
//
// Note [MXFP4 decode MMA]: y = x W^T for the few rows of x a decode step
// routes to each expert, bound by the HBM read of W. CUDA-core FMAs cannot
// keep up with that read past ~2 rows (each 16-byte code load carries 32
// weights; 8 rows of f32 FMAs on them plus their decode exceed the SM's issue
// rate), so the products run on mma.sync m16n8k16 bf16 -> f32 with W as the
// A operand (16 weight rows) and x as B (8 columns):
//  - x is split exactly into three bf16 terms, x = hi + mid + lo (truncation
//    keeps 8 significant bits per term, 24 in all), so every product of a
//    decoded weight (e2m1 x 2^k) with a term is exact in fp32: the result
//    equals cpu::MxFp4MatMul up to fp32 summation order. B column n holds
//    term n % 3 of pass row n / 3; a pass of T <= 8 rows uses ceil(3T / 8)
//    n-tiles (1 for T <= 2), and the three column sums add in the fixed order
//    (hi + mid) + lo.
//  - Lane (g, c) of a warp owns, per 512-k chunk, MX blocks 4c..4c+3 of its
//    two A rows: four 16-byte code loads (64 contiguous bytes) and one 32-bit
//    word of E8M0 scales per row. In round r the lane's block 4c + r feeds 8
//    k16 steps; the k order inside the mma is free, so step s takes code word
//    s / 2, nibbles (m, m + 4) for m = 2 (s % 2) + {0, 1} (E2M1Pair04/15, one
//    multiply each), times 2^(E-1) (the Note [MXFP4 MMA layout] decode).
//  - x is staged per chunk by the whole CTA (every warp reads the same x),
//    already split and laid out in fragment order: column n, lane quad c,
//    round r, step s is one 8-byte B fragment at 8-byte slot (8r + s) ^ (c +
//    4 (n & 3)) of a 256-byte run — conflict-free for the half-warps of an
//    LDS.64. Two buffers alternate; x (f32) for chunk ch+1 is copied by
//    cp.async into a raw area before chunk ch's MMAs and split into its
//    buffer after them, so its latency is hidden and costs no registers.
//  - The codes of chunk ch+1 are loaded round by round as chunk ch consumes
//    them (8 x 16 B in flight per lane), with L1::no_allocate (read once).
// A warp owns 16 A rows: 8 output columns of W1 (rows 0..7) and the same 8 of
// W3 (rows 8..15) for the gate/up kernel, so SwiGLU is applied in the
// epilogue; or 16 rows of one W for the plain product. The CTA (4 warps)
// owns 32 (gate/up) or 64 output columns of one group; groups of more than 8
// rows run in passes of 8 (W is read once per pass). No atomics: each output
// is written once, and its value depends only on its x row and W (not on the
// other rows or groups), so results are bitwise reproducible.
enum class DecodeMode { kGateUp, kMatMul };

constexpr int kDecWarps = 4;
constexpr int kDecThreads = kDecWarps * 32;
constexpr int kDecPassRows = 8;
constexpr int kDecTerms = 3;                     // bf16 terms per f32 x value
constexpr int kDecChunkBlocks = 16;              // MX blocks (of 32 k) per chunk
constexpr int kDecColBytes = 4 * 4 * 8 * 8;      // one B column of a chunk: quads x rounds x steps x 8 B
constexpr int kDecBufBytes = kDecPassRows * kDecTerms * kDecColBytes;
constexpr int kDecOutStride = kDecPassRows * kDecTerms + 1;  // floats per row of the epilogue scratch
constexpr int kDecRawBytes = kDecPassRows * 64 * 32;  // f32 x of the next chunk, one 32-byte slot per item
constexpr int kDecEpiBytes = kDecWarps * 16 * kDecOutStride * 4;
constexpr int kDecSmemBytes = 2 * kDecBufBytes + kDecRawBytes + kDecEpiBytes;
// x staging items (8 floats each) per thread for a pass of up to
// kDecPassRows rows with kNt n-tiles: 64 items per row.
template <int kNt>
constexpr int kDecXItems = ((8 * kNt / kDecTerms) * 64 + kDecThreads - 1) / kDecThreads;

__device__ __forceinline__ uint4 LdgStream(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}
// Nibbles 0 and 4 (resp. 1 and 5) of w as bf16x2 bits times 2^-126, equal to
// E2M1PairBits<0> (<1>): the multiply puts the nibble at bits 6..9 and a copy
// at 12..15 of each half (no carries: the masked nibbles are 16 bits apart),
// the mask keeps the magnitude at 6..8 and the sign at 15.
__device__ __forceinline__ uint32_t E2M1Pair04(uint32_t w) { return ((w & 0x000F000Fu) * 0x1040u) & 0x81C081C0u; }
__device__ __forceinline__ uint32_t E2M1Pair15(uint32_t w) { return ((w & 0x00F000F0u) * 0x104u) & 0x81C081C0u; }

// Per-thread state of the decode kernel for one group.
struct DecodeLane {
  const float* x;
  const int32_t* row_index;
  int64_t in;
  int blocks, chunks;
  const uint8_t* code[2];   // the lane's A rows g and g + 8: codes
  const uint8_t* scale[2];  //   and E8M0 scales
  bool scale_words;         // scale rows are 4-byte aligned: one 32-bit load per chunk
  uint8_t* smem;
  int tid, g, c;
};

__device__ __forceinline__ uint4 CodeBlock(const DecodeLane& L, int row, int kb) {
  return kb < L.blocks ? LdgStream(L.code[row] + static_cast<int64_t>(kb) * 16) : make_uint4(0, 0, 0, 0);
}
// Scale bytes of blocks kb..kb+3 (127 past the end: their codes are zero).
__device__ __forceinline__ uint32_t ScaleWord(const DecodeLane& L, int row, int kb) {
  if (L.scale_words) return kb < L.blocks ? __ldg(reinterpret_cast<const uint32_t*>(L.scale[row] + kb)) : 0x7f7f7f7fu;
  uint32_t v = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) v |= (kb + i < L.blocks ? static_cast<uint32_t>(__ldg(L.scale[row] + kb + i)) : 0x7fu) << (8 * i);
  return v;
}

// x staging item it (< 64 T): pass row t, lane quad c, round r, code word q:
// the 8 x values k = 32 (16 ch + 4c + r) + 8q .. +7 (zero past in), copied
// by cp.async into the item's 32-byte slot of the raw area (thread-private:
// the thread that copies an item also splits it, after cp.async.wait).
template <int kItems>
__device__ __forceinline__ void LoadXItems(const DecodeLane& L, int64_t p0, int T, int ch) {
  uint8_t* raw = L.smem + 2 * kDecBufBytes;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int it = L.tid + i * kDecThreads;
    if (it < 64 * T) {
      const int t = it >> 6, rest = it & 63;
      const int kb = ch * kDecChunkBlocks + (rest >> 2);  // (rest >> 4) * 4 + ((rest >> 2) & 3)
      const bool ok = kb < L.blocks;
      const float* p = L.x;
      if (ok) {
        const int64_t row = L.row_index ? static_cast<int64_t>(__ldg(L.row_index + p0 + t)) : p0 + t;
        p = L.x + row * L.in + static_cast<int64_t>(kb) * 32 + 8 * (rest & 3);
      }
      CpAsync16(SmemAddr(raw + it * 32), p, ok);
      CpAsync16(SmemAddr(raw + it * 32 + 16), p + 4, ok);
    }
  }
  CpAsyncCommit();
}

// f32 pair (a, b) -> its three bf16x2 terms (exact: a = hi.x + mid.x + lo.x).
__device__ __forceinline__ void SplitPair(float a, float b, uint32_t (&term)[kDecTerms]) {
  uint32_t ua = __float_as_uint(a), ub = __float_as_uint(b);
#pragma unroll
  for (int p = 0; p < kDecTerms; ++p) {
    term[p] = __byte_perm(ua, ub, 0x7632);
    if (p + 1 < kDecTerms) {
      ua = __float_as_uint(__uint_as_float(ua) - __uint_as_float(ua & 0xffff0000u));
      ub = __float_as_uint(__uint_as_float(ub) - __uint_as_float(ub & 0xffff0000u));
    }
  }
}

// Splits the thread's staged items (LoadXItems, after its cp.async landed)
// into the B-fragment layout of buffer buf.
template <int kItems>
__device__ __forceinline__ void StoreXItems(const DecodeLane& L, int T, uint8_t* buf) {
  const uint8_t* raw = L.smem + 2 * kDecBufBytes;
  CpAsyncWait<0>();
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int it = L.tid + i * kDecThreads;
    if (it >= 64 * T) continue;
    const int t = it >> 6, rest = it & 63, c = rest >> 4, r = (rest >> 2) & 3, q = rest & 3;
    const float4 lo4 = *reinterpret_cast<const float4*>(raw + it * 32);
    const float4 hi4 = *reinterpret_cast<const float4*>(raw + it * 32 + 16);
    const float v[8] = {lo4.x, lo4.y, lo4.z, lo4.w, hi4.x, hi4.y, hi4.z, hi4.w};
    uint32_t pr[4][kDecTerms];  // pair m = (x[8q+m], x[8q+m+4])
#pragma unroll
    for (int m = 0; m < 4; ++m) SplitPair(v[m], v[m + 4], pr[m]);
#pragma unroll
    for (int p = 0; p < kDecTerms; ++p) {
      const int n = t * kDecTerms + p, f = c + 4 * (n & 3);
      uint8_t* col = buf + (n * 4 + c) * 256;
      *reinterpret_cast<uint2*>(col + 8 * ((8 * r + 2 * q) ^ f)) = make_uint2(pr[0][p], pr[1][p]);
      *reinterpret_cast<uint2*>(col + 8 * ((8 * r + 2 * q + 1) ^ f)) = make_uint2(pr[2][p], pr[3][p]);
    }
  }
}

// Round r of a chunk: the lane's block 4c + r of both A rows (codes qa, qb,
// scale bytes ea, eb) times the staged x columns, 8 k16 steps.
template <int kNt, bool kWide>
__device__ __forceinline__ void DecodeRound(const DecodeLane& L, const uint8_t* cbuf, int ncols, int r, uint4 qa,
                                            uint4 qb, uint32_t ea, uint32_t eb, float (&acc)[kNt][4]) {
  uint32_t ma1, mb1, ma2 = 0, mb2 = 0;
  if constexpr (!kWide) {
    ma1 = (ea + 126u) * 0x00800080u;  // bf16x2 2^(e-1), e <= 128
    mb1 = (eb + 126u) * 0x00800080u;
  } else {
    ma1 = ((ea < 128u ? ea : 128u) + 126u) * 0x00800080u;
    mb1 = ((eb < 128u ? eb : 128u) + 126u) * 0x00800080u;
    ma2 = ea <= 128u ? 0x3F803F80u : ea == 255u ? 0x7FC07FC0u : (ea - 1u) * 0x00800080u;
    mb2 = eb <= 128u ? 0x3F803F80u : eb == 255u ? 0x7FC07FC0u : (eb - 1u) * 0x00800080u;
  }
  const int f = L.c + 4 * (L.g & 3);
#pragma unroll
  for (int s = 0; s < 8; ++s) {
    const int word = s >> 1;
    uint32_t wa = word == 0 ? qa.x : word == 1 ? qa.y : word == 2 ? qa.z : qa.w;
    uint32_t wb = word == 0 ? qb.x : word == 1 ? qb.y : word == 2 ? qb.z : qb.w;
    if (s & 1) wa >>= 8, wb >>= 8;  // nibbles 2, 3, 6, 7
    uint32_t a0 = MulBf16x2(E2M1Pair04(wa), ma1), a2 = MulBf16x2(E2M1Pair04(wb), mb1);
    uint32_t a4 = MulBf16x2(E2M1Pair15(wa), ma1), a6 = MulBf16x2(E2M1Pair15(wb), mb1);
    if constexpr (kWide) {
      a0 = MulBf16x2(a0, ma2), a2 = MulBf16x2(a2, mb2);
      a4 = MulBf16x2(a4, ma2), a6 = MulBf16x2(a6, mb2);
    }
    const int slot = 8 * ((8 * r + s) ^ f);
#pragma unroll
    for (int j = 0; j < kNt; ++j) {
      const int n = 8 * j + L.g;
      uint2 b = make_uint2(0, 0);
      if (n < ncols) b = *reinterpret_cast<const uint2*>(cbuf + (n * 4 + L.c) * 256 + slot);
      MmaBf16(acc[j], a0, a2, a4, a6, b.x, b.y);
    }
  }
}

// One chunk: four rounds; round r's codes of the next chunk are requested as
// soon as this chunk's are in use.
template <int kNt, bool kWide>
__device__ __forceinline__ void DecodeChunk(const DecodeLane& L, const uint8_t* cbuf, int ncols, int next_kb,
                                            bool more, uint4 (&ra)[4], uint4 (&rb)[4], uint32_t ea, uint32_t eb,
                                            float (&acc)[kNt][4]) {
  // Not unrolled (register pressure): the ring rotates, ra[0] is this round's.
#pragma unroll 1
  for (int r = 0; r < 4; ++r) {
    const uint4 qa = ra[0], qb = rb[0];
    ra[0] = ra[1], ra[1] = ra[2], ra[2] = ra[3];
    rb[0] = rb[1], rb[1] = rb[2], rb[2] = rb[3];
    if (more) {
      ra[3] = CodeBlock(L, 0, next_kb + r);
      rb[3] = CodeBlock(L, 1, next_kb + r);
    }
    DecodeRound<kNt, kWide>(L, cbuf, ncols, r, qa, qb, (ea >> (8 * r)) & 0xffu, (eb >> (8 * r)) & 0xffu, acc);
  }
}

// One pass over W for pass rows p0 .. p0 + T - 1 (T <= 8, kNt = ceil(3T / 8)),
// then the epilogue: y (or SwiGLU into h) for the warp's 8 / 16 columns from
// col0. CTA-uniform (all threads take the same passes).
template <DecodeMode kMode, int kNt>
__device__ __forceinline__ void DecodePass(const DecodeLane& lane_state, int64_t p0, int T, float* epi, int lane, int64_t col0,
                                           int64_t out, float limit, float* y) {
  const DecodeLane L = lane_state;  // in registers (the reference is to local memory)
  const int ncols = T * kDecTerms;
  float acc[kNt][4];
#pragma unroll
  for (int j = 0; j < kNt; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
  const int kb0 = 4 * L.c;
  __syncthreads();  // the previous pass is done with both x buffers
  uint4 ra[4], rb[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) ra[r] = CodeBlock(L, 0, kb0 + r), rb[r] = CodeBlock(L, 1, kb0 + r);
  uint32_t ea = ScaleWord(L, 0, kb0), eb = ScaleWord(L, 1, kb0);
  LoadXItems<kDecXItems<kNt>>(L, p0, T, 0);
  StoreXItems<kDecXItems<kNt>>(L, T, L.smem);
  for (int ch = 0; ch < L.chunks; ++ch) {
    __syncthreads();  // chunk ch's x is staged; the other buffer is free
    const bool more = ch + 1 < L.chunks;
    const int next_kb = (ch + 1) * kDecChunkBlocks + kb0;
    if (more) LoadXItems<kDecXItems<kNt>>(L, p0, T, ch + 1);
    const uint32_t ea_next = more ? ScaleWord(L, 0, next_kb) : 0u, eb_next = more ? ScaleWord(L, 1, next_kb) : 0u;
    const uint8_t* cbuf = L.smem + (ch & 1) * kDecBufBytes;
    if (__any_sync(0xffffffffu, (WideScaleBytes(ea) | WideScaleBytes(eb)) != 0))
      DecodeChunk<kNt, true>(L, cbuf, ncols, next_kb, more, ra, rb, ea, eb, acc);
    else
      DecodeChunk<kNt, false>(L, cbuf, ncols, next_kb, more, ra, rb, ea, eb, acc);
    if (more) StoreXItems<kDecXItems<kNt>>(L, T, L.smem + ((ch + 1) & 1) * kDecBufBytes);
    ea = ea_next, eb = eb_next;
  }
  // Epilogue: D rows (A rows) x columns to the warp's scratch, then one lane
  // per output sums the three terms in order.
#pragma unroll
  for (int j = 0; j < kNt; ++j) {
    float* e0 = epi + L.g * kDecOutStride + 8 * j + 2 * L.c;
    float* e1 = e0 + 8 * kDecOutStride;
    e0[0] = acc[j][0], e0[1] = acc[j][1], e1[0] = acc[j][2], e1[1] = acc[j][3];
  }
  __syncwarp();
  auto column_sum = [&](int row, int t) {
    const float* e = epi + row * kDecOutStride + kDecTerms * t;
    return (e[0] + e[1]) + e[2];
  };
  if constexpr (kMode == DecodeMode::kGateUp) {
    for (int idx = lane; idx < 8 * T; idx += 32) {
      const int col = idx & 7, t = idx >> 3;
      float gate = column_sum(col, t), up = column_sum(col + 8, t);
      if (limit > 0.0f) {
        gate = fminf(gate, limit);
        up = fminf(fmaxf(up, -limit), limit);
      }
      if (col0 + col < out) y[(p0 + t) * out + col0 + col] = gate / (1.0f + expf(-gate)) * up;
    }
  } else {
    for (int idx = lane; idx < 16 * T; idx += 32) {
      const int row = idx & 15, t = idx >> 4;
      if (col0 + row < out) y[(p0 + t) * out + col0 + row] = column_sum(row, t);
    }
  }
  __syncwarp();  // the scratch is read before the next pass writes it
}

// grid (ceil(out / columns per CTA), groups), kDecThreads threads,
// kDecSmemBytes of dynamic shared memory. codes_b / scales_b: W3 (gate/up).
template <DecodeMode kMode>
__global__ void __launch_bounds__(kDecThreads, 3) MxFp4DecodeMmaKernel(
    const float* __restrict__ x, int64_t in, const uint8_t* __restrict__ codes_a, const uint8_t* __restrict__ scales_a,
    const uint8_t* __restrict__ codes_b, const uint8_t* __restrict__ scales_b, int64_t out, float limit,
    const int32_t* __restrict__ group_offsets, const int32_t* __restrict__ group_expert,
    const int32_t* __restrict__ row_index, bool scale_words, float* __restrict__ y) {
  extern __shared__ __align__(16) uint8_t dec_smem[];
  const int gi = blockIdx.y;
  const int64_t m0 = group_offsets[gi], m1 = group_offsets[gi + 1];
  if (m1 <= m0) return;
  const int64_t e = group_expert[gi];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  DecodeLane L;
  L.x = x;
  L.row_index = row_index;
  L.in = in;
  L.blocks = static_cast<int>(in / 32);
  L.chunks = (L.blocks + kDecChunkBlocks - 1) / kDecChunkBlocks;
  L.scale_words = scale_words;
  L.smem = dec_smem;
  L.tid = threadIdx.x;
  L.g = lane >> 2;
  L.c = lane & 3;
  constexpr int kCols = kMode == DecodeMode::kGateUp ? 8 : 16;  // output columns per warp
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kDecWarps * kCols + warp * kCols;
  const int64_t row_a = col0 + L.g, row_b = kMode == DecodeMode::kGateUp ? col0 + L.g : col0 + 8 + L.g;
  const uint8_t* cb = kMode == DecodeMode::kGateUp ? codes_b : codes_a;
  const uint8_t* sb = kMode == DecodeMode::kGateUp ? scales_b : scales_a;
  // Rows past `out` are clamped to the last one (read, never stored).
  const int64_t ra = (e * out + (row_a < out ? row_a : out - 1)), rb = (e * out + (row_b < out ? row_b : out - 1));
  L.code[0] = codes_a + ra * (in / 2);
  L.code[1] = cb + rb * (in / 2);
  L.scale[0] = scales_a + ra * L.blocks;
  L.scale[1] = sb + rb * L.blocks;
  float* epi = reinterpret_cast<float*>(dec_smem + 2 * kDecBufBytes + kDecRawBytes) + warp * 16 * kDecOutStride;
  for (int64_t p0 = m0; p0 < m1; p0 += kDecPassRows) {
    const int T = static_cast<int>(m1 - p0 < kDecPassRows ? m1 - p0 : kDecPassRows);
    if (T <= 2)
      DecodePass<kMode, 1>(L, p0, T, epi, lane, col0, out, limit, y);
    else if (T <= 5)
      DecodePass<kMode, 2>(L, p0, T, epi, lane, col0, out, limit, y);
    else
      DecodePass<kMode, 3>(L, p0, T, epi, lane, col0, out, limit, y);
  }
}

absl::Status LaunchDecodeMma(DecodeMode mode, const float* x, int64_t in, const uint8_t* codes_a,
                             const uint8_t* scales_a, const uint8_t* codes_b, const uint8_t* scales_b, int64_t out,
                             float limit, int groups, const int32_t* group_offsets, const int32_t* group_expert,
                             const int32_t* row_index, float* y, cudaStream_t stream) {
  const char* what = mode == DecodeMode::kGateUp ? "MxFp4GroupedGateUp" : "MxFp4GroupedMatMulDecode";
  if (in <= 0 || in % 32 != 0)
    return absl::InvalidArgumentError(absl::StrCat(what, ": in = ", in, " must be a positive multiple of 32"));
  if (in / 32 > (int64_t{1} << 30)) return absl::InvalidArgumentError(absl::StrCat(what, ": in = ", in, " is too large"));
  if (out < 0) return absl::InvalidArgumentError(absl::StrCat(what, ": out = ", out));
  if (groups < 0 || groups > 65535) return absl::InvalidArgumentError(absl::StrCat(what, ": groups = ", groups));
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(codes_a) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(codes_b) % 16 != 0)
    return absl::InvalidArgumentError(absl::StrCat(what, ": x and codes must be 16-byte aligned"));
  if (groups == 0 || out == 0) return absl::OkStatus();
  if (group_offsets == nullptr || group_expert == nullptr)
    return absl::InvalidArgumentError(absl::StrCat(what, ": group_offsets and group_expert are required"));
  const bool scale_words = (in / 32) % 4 == 0 && reinterpret_cast<uintptr_t>(scales_a) % 4 == 0 &&
                           reinterpret_cast<uintptr_t>(scales_b) % 4 == 0;
  const int64_t cols_per_cta = kDecWarps * (mode == DecodeMode::kGateUp ? 8 : 16);
  const dim3 grid(static_cast<unsigned>((out + cols_per_cta - 1) / cols_per_cta), static_cast<unsigned>(groups));
  auto kernel = mode == DecodeMode::kGateUp ? MxFp4DecodeMmaKernel<DecodeMode::kGateUp>
                                            : MxFp4DecodeMmaKernel<DecodeMode::kMatMul>;
  RETORT_CUDA_RETURN(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kDecSmemBytes));
  kernel<<<grid, kDecThreads, kDecSmemBytes, stream>>>(x, in, codes_a, scales_a, codes_b, scales_b, out, limit,
                                                        group_offsets, group_expert, row_index, scale_words, y);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status CheckShapes(int64_t in, const float* x, const uint8_t* codes) {
  if (in % 32 != 0) return absl::InvalidArgumentError(absl::StrCat("MXFP4: in = ", in, " is not a multiple of 32"));
  if (reinterpret_cast<uintptr_t>(codes) % 16 != 0)
    return absl::InvalidArgumentError("MXFP4: codes must be 16-byte aligned");
  if (reinterpret_cast<uintptr_t>(x) % 16 != 0) return absl::InvalidArgumentError("MXFP4: x must be 16-byte aligned");
  return absl::OkStatus();
}

}  // namespace

absl::Status MxFp4MatMul(const float* x, int64_t T, int64_t in, const uint8_t* codes, const uint8_t* scales,
                         int64_t out, float* y, cudaStream_t stream) {
  if (absl::Status s = CheckShapes(in, x, codes); !s.ok()) return s;
  if (T == 0 || out == 0) return absl::OkStatus();
  const dim3 grid(static_cast<unsigned>((out + kRowsPerCta - 1) / kRowsPerCta), 1);
  MxFp4GroupedKernel<<<grid, kWarps * 32, 0, stream>>>(x, in, codes, scales, out, nullptr, nullptr, nullptr, T, y);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status MxFp4GroupedMatMul(const float* x, int64_t in, const uint8_t* codes, const uint8_t* scales, int64_t out,
                                int groups, const int32_t* group_offsets, const int32_t* group_expert,
                                const int32_t* row_index, float* y, cudaStream_t stream) {
  if (absl::Status s = CheckShapes(in, x, codes); !s.ok()) return s;
  if (groups < 0 || groups > 65535) return absl::InvalidArgumentError(absl::StrCat("MXFP4: groups = ", groups));
  if (groups == 0 || out == 0) return absl::OkStatus();
  const dim3 grid(static_cast<unsigned>((out + kRowsPerCta - 1) / kRowsPerCta), static_cast<unsigned>(groups));
  MxFp4GroupedKernel<<<grid, kWarps * 32, 0, stream>>>(x, in, codes, scales, out, group_offsets, group_expert,
                                                       row_index, 0, y);
  RETORT_CUDA_LAUNCH_CHECK();
  return absl::OkStatus();
}

absl::Status MxFp4GroupedGateUp(const float* x, int64_t in, const uint8_t* w1_codes, const uint8_t* w1_scales,
                                const uint8_t* w3_codes, const uint8_t* w3_scales, int64_t inter, float limit,
                                int groups, const int32_t* group_offsets, const int32_t* group_expert,
                                const int32_t* row_index, float* h, cudaStream_t stream) {
  return LaunchDecodeMma(DecodeMode::kGateUp, x, in, w1_codes, w1_scales, w3_codes, w3_scales, inter, limit, groups,
                         group_offsets, group_expert, row_index, h, stream);
}

absl::Status MxFp4GroupedMatMulDecode(const float* x, int64_t in, const uint8_t* codes, const uint8_t* scales,
                                      int64_t out, int groups, const int32_t* group_offsets,
                                      const int32_t* group_expert, const int32_t* row_index, float* y,
                                      cudaStream_t stream) {
  return LaunchDecodeMma(DecodeMode::kMatMul, x, in, codes, scales, codes, scales, out, 0.0f, groups, group_offsets,
                         group_expert, row_index, y, stream);
}

absl::Status MxFp4MatMulTensorCore(const uint16_t* x_bf16, int64_t T, int64_t in, const uint8_t* codes,
                                   const uint8_t* scales, int64_t out, float* y, cudaStream_t stream,
                                   MxFp4MmaTile tile) {
  if (T < 0) return absl::InvalidArgumentError(absl::StrCat("MXFP4 tensor-core GEMM: T = ", T));
  if (absl::Status s = CheckMmaShapes(in, out, x_bf16, codes, scales, y); !s.ok()) return s;
  if (T == 0) return absl::OkStatus();
  return DispatchMma(tile, x_bf16, in, codes, scales, out, 1, T, nullptr, nullptr, nullptr, T, y, stream);
}

absl::Status MxFp4GroupedMatMulTensorCore(const uint16_t* x_bf16, int64_t in, const uint8_t* codes,
                                          const uint8_t* scales, int64_t out, int groups, int64_t rows,
                                          const int32_t* group_offsets, const int32_t* group_expert,
                                          const int32_t* row_index, float* y, cudaStream_t stream, MxFp4MmaTile tile) {
  if (absl::Status s = CheckMmaShapes(in, out, x_bf16, codes, scales, y); !s.ok()) return s;
  if (groups < 0 || groups > 65535)
    return absl::InvalidArgumentError(absl::StrCat("MXFP4 tensor-core GEMM: groups = ", groups));
  if (rows < 0) return absl::InvalidArgumentError(absl::StrCat("MXFP4 tensor-core GEMM: rows = ", rows));
  if (groups == 0 || rows == 0) return absl::OkStatus();
  if (group_offsets == nullptr || group_expert == nullptr)
    return absl::InvalidArgumentError("MXFP4 tensor-core GEMM: group_offsets and group_expert are required");
  return DispatchMma(tile, x_bf16, in, codes, scales, out, groups, (rows + groups - 1) / groups, group_offsets,
                     group_expert, row_index, 0, y, stream);
}

}  // namespace retort::cuda
