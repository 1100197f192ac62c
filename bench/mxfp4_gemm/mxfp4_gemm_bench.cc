// bench/mxfp4_gemm: y = x W^T with W an MXFP4-packed V4 expert matrix, at
// decode (M = 1..64 tokens per expert) and prefill (M = 512..8192) shapes.
//
// Each row of the table gives the kernel time, the bytes it must move (packed
// codes + E8M0 scales + x + y) as achieved GB/s and as a fraction of the HBM
// bandwidth measured in the same run by a device-to-device copy (the roofline
// that matters at decode), its TFLOP/s, and cuBLAS bf16 on the dequantized
// weights (what a framework without an FP4 kernel runs) with the speed ratio.
// The two outputs are compared (max |diff| / max |y|) so a fast wrong kernel
// cannot hide.
//
// The tensor-core kernel (bf16 x, MxFp4MatMulTensorCore) gets its own table
// at M >= 64 with the same columns, bytes counting x as bf16 (2 B) and y f32,
// and its grouped form a row per token count in the grouped table.
//
// Shapes: V4-Flash experts, hidden 4096, moe_intermediate 2048: the gate/up
// projection (out 2048, in 4096) and the down projection (out 4096, in 2048).
//
// A last table compares the decode kernels (MxFp4GroupedGateUp,
// MxFp4GroupedMatMulDecode) with the CUDA-core grouped path at 1..256 tokens
// x 6 routed over 256 experts and at 1..64 rows on one expert (RunDecode).
//
// usage: mxfp4_gemm_bench [--quick | --decode]   (--decode: only that table)
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench/common/bench_util.h"
#include "bench/common/cuda_timing.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/dense_gemm.cuh"
#include "model/kernels/cuda/mxfp4.cuh"
#include "model/kernels/cuda/norm_rope.cuh"
#include "model/kernels/cuda/random_fill.cuh"
#include "model/tensor/dtype.h"

namespace retort {
namespace {

using bench::TimeMs;
using bench::Value;

struct Weights {
  int64_t out, in;
  std::vector<uint8_t> codes, scales;
  std::vector<uint16_t> dequant_bf16;  // what cuBLAS multiplies
};

Weights RandomWeights(int64_t out, int64_t in, std::mt19937& rng) {
  Weights w{out, in, std::vector<uint8_t>(out * in / 2), std::vector<uint8_t>(out * in / 32), {}};
  std::uniform_int_distribution<int> byte(0, 255), scale(120, 130);  // 2^-7 .. 2^3
  for (auto& c : w.codes) c = static_cast<uint8_t>(byte(rng));
  for (auto& s : w.scales) s = static_cast<uint8_t>(scale(rng));
  w.dequant_bf16.resize(out * in);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) {
      const uint8_t pair = w.codes[(o * in + i) / 2];
      const uint8_t code = (i % 2 == 0) ? (pair & 0xf) : (pair >> 4);
      const float v = E2M1ToF32(code) * E8M0ToF32(w.scales[(o * in + i) / 32]);
      w.dequant_bf16[o * in + i] = F32ToBf16(v);  // exact: e2m1 x 2^k fits bf16
    }
  return w;
}

constexpr size_t kRotateBytes = size_t{256} << 20;  // > L2 (50 MB on H100/H200)


// The decode kernels (MxFp4GroupedGateUp, MxFp4GroupedMatMulDecode) beside
// the CUDA-core path they replace (2 x MxFp4GroupedMatMul + SwiGlu for gate/
// up; MxFp4GroupedMatMul for down), on a 256-expert V4-Flash stack filled on
// the device. Bytes = packed codes + E8M0 scales of the experts a launch
// touches (W1 + W3, or W2); x / h / y traffic is not counted. Each row cycles
// over 8 routings (or 16 experts for the one-expert rows) so that launches
// read their weights from HBM, not from the L2 the previous launch filled.
void RunDecode(cudaStream_t stream, double bw) {
  const int64_t E = 256, d = 4096, I = 2048;
  const int K = 6;
  const int64_t w13 = E * I * d;  // weights per stack
  cuda::DeviceBuffer c1 = Value(cuda::DeviceBuffer::Allocate(w13 / 2)), s1 = Value(cuda::DeviceBuffer::Allocate(w13 / 32));
  cuda::DeviceBuffer c3 = Value(cuda::DeviceBuffer::Allocate(w13 / 2)), s3 = Value(cuda::DeviceBuffer::Allocate(w13 / 32));
  cuda::DeviceBuffer c2 = Value(cuda::DeviceBuffer::Allocate(w13 / 2)), s2 = Value(cuda::DeviceBuffer::Allocate(w13 / 32));
  BENCH_CHECK(cuda::FillBytes(c1.as<uint8_t>(), w13 / 2, 1, 0, 255, stream));
  BENCH_CHECK(cuda::FillBytes(c3.as<uint8_t>(), w13 / 2, 2, 0, 255, stream));
  BENCH_CHECK(cuda::FillBytes(c2.as<uint8_t>(), w13 / 2, 3, 0, 255, stream));
  BENCH_CHECK(cuda::FillBytes(s1.as<uint8_t>(), w13 / 32, 4, 118, 124, stream));  // ~ checkpoint scales
  BENCH_CHECK(cuda::FillBytes(s3.as<uint8_t>(), w13 / 32, 5, 118, 124, stream));
  BENCH_CHECK(cuda::FillBytes(s2.as<uint8_t>(), w13 / 32, 6, 118, 124, stream));
  const double expert_bytes = I * d / 2.0 + I * d / 32.0;  // one expert matrix (W1, W3 or W2)
  std::mt19937 rng(11);

  struct Routing {
    cuda::DeviceBuffer offsets, experts, rows;
    int groups = 0;
    int active = 0;
  };
  auto print_row = [&](const char* what, long long n, double active, double t_old, double t_new, double bytes,
                       double rel) {
    const double g_old = bytes / (t_old * 1e-3) / 1e9, g_new = bytes / (t_new * 1e-3) / 1e9;
    std::printf("%-8s %6lld %7.1f | %8.1f %7.0f %5.0f%% | %8.1f %7.0f %5.0f%% | %6.2fx | %8.1e\n", what, n, active,
                t_old * 1e3, g_old, 100.0 * g_old / bw, t_new * 1e3, g_new, 100.0 * g_new / bw, t_old / t_new, rel);
  };
  auto rel_diff = [&](const cuda::DeviceBuffer& a, const cuda::DeviceBuffer& b, int64_t n) {
    cudaStreamSynchronize(stream);
    std::vector<float> x = Value(cuda::Download<float>(a.get(), n)), y = Value(cuda::Download<float>(b.get(), n));
    double md = 0, ma = 0;
    for (int64_t i = 0; i < n; ++i) {
      md = std::max(md, static_cast<double>(std::fabs(x[i] - y[i])));
      ma = std::max(ma, static_cast<double>(std::fabs(y[i])));
    }
    return md / std::max(ma, 1e-30);
  };
  std::printf("\ndecode experts: old = CUDA-core MxFp4GroupedMatMul (gate/up: w1 + w3 + SwiGlu), new = "
              "MxFp4GroupedGateUp / MxFp4GroupedMatMulDecode\n");
  std::printf("%-8s %6s %7s | %8s %7s %6s | %8s %7s %6s | %7s | %8s\n", "kernel", "tokens", "experts", "old us", "GB/s",
              "%HBM", "new us", "GB/s", "%HBM", "speedup", "rel diff");
  for (int64_t tokens : {1, 8, 64, 256}) {
    const int64_t NK = tokens * K;
    const int groups = static_cast<int>(std::min<int64_t>(E, NK));
    std::vector<Routing> routes(8);
    double active = 0;
    for (Routing& r : routes) {
      std::vector<std::vector<int32_t>> by_expert(E);
      std::vector<int32_t> ids(E);
      for (int64_t t = 0; t < tokens; ++t) {
        for (int32_t i = 0; i < E; ++i) ids[i] = i;
        std::shuffle(ids.begin(), ids.end(), rng);
        for (int k = 0; k < K; ++k) by_expert[ids[k]].push_back(static_cast<int32_t>(t));
      }
      std::vector<int32_t> offsets = {0}, experts, rows;
      for (int32_t e = 0; e < E; ++e) {
        if (by_expert[e].empty()) continue;
        experts.push_back(e);
        rows.insert(rows.end(), by_expert[e].begin(), by_expert[e].end());
        offsets.push_back(static_cast<int32_t>(rows.size()));
      }
      r.active = static_cast<int>(experts.size());
      while (static_cast<int>(experts.size()) < groups) experts.push_back(0), offsets.push_back(static_cast<int32_t>(NK));
      r.groups = groups;
      r.offsets = Value(cuda::Upload(offsets));
      r.experts = Value(cuda::Upload(experts));
      r.rows = Value(cuda::Upload(rows));
      active += r.active / 8.0;
    }
    std::vector<float> xh(tokens * d);
    std::normal_distribution<float> n01;
    for (auto& v : xh) v = n01(rng);
    cuda::DeviceBuffer x = Value(cuda::Upload(xh));
    cuda::DeviceBuffer g = Value(cuda::DeviceBuffer::Allocate(NK * I * 4)), u = Value(cuda::DeviceBuffer::Allocate(NK * I * 4));
    cuda::DeviceBuffer h = Value(cuda::DeviceBuffer::Allocate(NK * I * 4));
    cuda::DeviceBuffer y_old = Value(cuda::DeviceBuffer::Allocate(NK * d * 4)), y_new = Value(cuda::DeviceBuffer::Allocate(NK * d * 4));
    const float limit = 7.0f;
    int turn = 0;
    const int reps = tokens >= 64 ? 20 : 100;
    // Each path once, for the timed loops (routings rotate) and the comparison (routing 0).
    auto old_gate_up = [&](const Routing& r) {
      BENCH_CHECK(cuda::MxFp4GroupedMatMul(x.as<float>(), d, c1.as<uint8_t>(), s1.as<uint8_t>(), I, r.groups,
                                           r.offsets.as<int32_t>(), r.experts.as<int32_t>(), r.rows.as<int32_t>(),
                                           g.as<float>(), stream));
      BENCH_CHECK(cuda::MxFp4GroupedMatMul(x.as<float>(), d, c3.as<uint8_t>(), s3.as<uint8_t>(), I, r.groups,
                                           r.offsets.as<int32_t>(), r.experts.as<int32_t>(), r.rows.as<int32_t>(),
                                           u.as<float>(), stream));
      BENCH_CHECK(cuda::SwiGlu(g.as<float>(), u.as<float>(), NK * I, limit, g.as<float>(), stream));
    };
    auto new_gate_up = [&](const Routing& r) {
      BENCH_CHECK(cuda::MxFp4GroupedGateUp(x.as<float>(), d, c1.as<uint8_t>(), s1.as<uint8_t>(), c3.as<uint8_t>(),
                                           s3.as<uint8_t>(), I, limit, r.groups, r.offsets.as<int32_t>(),
                                           r.experts.as<int32_t>(), r.rows.as<int32_t>(), h.as<float>(), stream));
    };
    auto old_down = [&](const Routing& r) {
      BENCH_CHECK(cuda::MxFp4GroupedMatMul(h.as<float>(), I, c2.as<uint8_t>(), s2.as<uint8_t>(), d, r.groups,
                                           r.offsets.as<int32_t>(), r.experts.as<int32_t>(), nullptr, y_old.as<float>(),
                                           stream));
    };
    auto new_down = [&](const Routing& r) {
      BENCH_CHECK(cuda::MxFp4GroupedMatMulDecode(h.as<float>(), I, c2.as<uint8_t>(), s2.as<uint8_t>(), d, r.groups,
                                                 r.offsets.as<int32_t>(), r.experts.as<int32_t>(), nullptr,
                                                 y_new.as<float>(), stream));
    };
    const double t_old_gu = TimeMs(stream, reps, [&] { old_gate_up(routes[turn++ % 8]); });
    const double t_new_gu = TimeMs(stream, reps, [&] { new_gate_up(routes[turn++ % 8]); });
    turn = 0;
    old_gate_up(routes[0]);
    new_gate_up(routes[0]);
    print_row("gate/up", tokens, active, t_old_gu, t_new_gu, 2 * active * expert_bytes, rel_diff(h, g, NK * I));
    const double t_old_dn = TimeMs(stream, reps, [&] { old_down(routes[turn++ % 8]); });
    const double t_new_dn = TimeMs(stream, reps, [&] { new_down(routes[turn++ % 8]); });
    old_down(routes[0]);
    new_down(routes[0]);
    print_row("down", tokens, active, t_old_dn, t_new_dn, active * expert_bytes, rel_diff(y_new, y_old, NK * d));
  }
  // One expert, 1..64 rows (a dense-ish decode of a hot expert): 16 experts cycle.
  std::printf("\none expert, M rows (experts column: 1)\n");
  std::vector<cuda::DeviceBuffer> exps;
  for (int32_t e = 0; e < 16; ++e) exps.push_back(Value(cuda::Upload(std::vector<int32_t>{e * 16})));
  for (int64_t M : {1, 2, 4, 8, 16, 32, 64}) {
    cuda::DeviceBuffer off = Value(cuda::Upload(std::vector<int32_t>{0, static_cast<int32_t>(M)}));
    std::vector<float> xh(M * d);
    std::normal_distribution<float> n01;
    for (auto& v : xh) v = n01(rng);
    cuda::DeviceBuffer x = Value(cuda::Upload(xh));
    cuda::DeviceBuffer g = Value(cuda::DeviceBuffer::Allocate(M * I * 4)), u = Value(cuda::DeviceBuffer::Allocate(M * I * 4));
    cuda::DeviceBuffer h = Value(cuda::DeviceBuffer::Allocate(M * I * 4)), y = Value(cuda::DeviceBuffer::Allocate(M * d * 4));
    int turn = 0;
    const double t_old_gu = TimeMs(stream, 50, [&] {
      const cuda::DeviceBuffer& ex = exps[turn++ % 16];
      BENCH_CHECK(cuda::MxFp4GroupedMatMul(x.as<float>(), d, c1.as<uint8_t>(), s1.as<uint8_t>(), I, 1, off.as<int32_t>(),
                                           ex.as<int32_t>(), nullptr, g.as<float>(), stream));
      BENCH_CHECK(cuda::MxFp4GroupedMatMul(x.as<float>(), d, c3.as<uint8_t>(), s3.as<uint8_t>(), I, 1, off.as<int32_t>(),
                                           ex.as<int32_t>(), nullptr, u.as<float>(), stream));
      BENCH_CHECK(cuda::SwiGlu(g.as<float>(), u.as<float>(), M * I, 7.0f, g.as<float>(), stream));
    });
    const double t_new_gu = TimeMs(stream, 50, [&] {
      const cuda::DeviceBuffer& ex = exps[turn++ % 16];
      BENCH_CHECK(cuda::MxFp4GroupedGateUp(x.as<float>(), d, c1.as<uint8_t>(), s1.as<uint8_t>(), c3.as<uint8_t>(),
                                           s3.as<uint8_t>(), I, 7.0f, 1, off.as<int32_t>(), ex.as<int32_t>(), nullptr,
                                           h.as<float>(), stream));
    });
    print_row("gate/up", M, 1, t_old_gu, t_new_gu, 2 * expert_bytes, 0.0);
    const double t_old_dn = TimeMs(stream, 50, [&] {
      const cuda::DeviceBuffer& ex = exps[turn++ % 16];
      BENCH_CHECK(cuda::MxFp4GroupedMatMul(h.as<float>(), I, c2.as<uint8_t>(), s2.as<uint8_t>(), d, 1, off.as<int32_t>(),
                                           ex.as<int32_t>(), nullptr, y.as<float>(), stream));
    });
    const double t_new_dn = TimeMs(stream, 50, [&] {
      const cuda::DeviceBuffer& ex = exps[turn++ % 16];
      BENCH_CHECK(cuda::MxFp4GroupedMatMulDecode(h.as<float>(), I, c2.as<uint8_t>(), s2.as<uint8_t>(), d, 1,
                                                 off.as<int32_t>(), ex.as<int32_t>(), nullptr, y.as<float>(), stream));
    });
    print_row("down", M, 1, t_old_dn, t_new_dn, expert_bytes, 0.0);
  }
  std::printf("rel diff = max |new - old| / max |old| on the same routing (rows 1..64: not compared).\n");
}

void Run(bool quick) {
  cuda::Stream stream = Value(cuda::Stream::Create());
  cuda::Blas blas = Value(cuda::Blas::Create());
  std::printf("device: %s\n", Value(cuda::DeviceDescription(0)).c_str());
  const double bw = bench::MeasureCopyBandwidthGBs(stream.get());
  std::printf("HBM bandwidth (device copy): %.0f GB/s\n\n", bw);

  std::mt19937 rng(7);
  struct Shape {
    const char* name;
    int64_t out, in;
  };
  const Shape shapes[] = {{"w1/w3 gate,up", 2048, 4096}, {"w2 down", 4096, 2048}};
  std::vector<int64_t> ms = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192};
  if (quick) ms = {1, 8, 64, 512, 8192};

  std::vector<std::string> tc_rows;
  std::printf("%-14s %6s | %9s %8s %6s %8s | %9s %8s | %7s | %9s\n", "matrix", "M", "mxfp4 us", "GB/s", "%HBM",
              "TFLOP/s", "bf16 us", "TFLOP/s", "speedup", "rel diff");
  for (const Shape& sh : shapes) {
    Weights w = RandomWeights(sh.out, sh.in, rng);
    // Copies of the weights rotate so that every launch reads them from HBM,
    // not from the 50 MB L2 the previous launch left them in.
    const size_t packed = w.codes.size() + w.scales.size(), dense = 2 * w.dequant_bf16.size();
    const int copies4 = static_cast<int>(kRotateBytes / packed) + 1, copiesb = static_cast<int>(kRotateBytes / dense) + 1;
    std::vector<cuda::DeviceBuffer> codes, scales, wbf;
    for (int i = 0; i < copies4; ++i) {
      codes.push_back(Value(cuda::Upload(w.codes)));
      scales.push_back(Value(cuda::Upload(w.scales)));
    }
    for (int i = 0; i < copiesb; ++i) wbf.push_back(Value(cuda::Upload(w.dequant_bf16)));
    int turn4 = 0, turnb = 0;
    for (int64_t M : ms) {
      std::vector<float> x(M * sh.in);
      std::normal_distribution<float> n01;
      for (auto& v : x) v = n01(rng);
      std::vector<uint16_t> xbf(x.size());
      for (size_t i = 0; i < x.size(); ++i) {
        xbf[i] = F32ToBf16(x[i]);
        x[i] = Bf16ToF32(xbf[i]);  // both kernels see the same inputs
      }
      cuda::DeviceBuffer dx = Value(cuda::Upload(x));
      cuda::DeviceBuffer dxbf = Value(cuda::Upload(xbf));
      cuda::DeviceBuffer y = Value(cuda::DeviceBuffer::Allocate(M * sh.out * sizeof(float)));
      cuda::DeviceBuffer yref = Value(cuda::DeviceBuffer::Allocate(M * sh.out * sizeof(float)));
      const int reps = M >= 2048 ? 5 : 100;
      const double t4 = TimeMs(stream.get(), reps, [&] {
        const int c = turn4++ % copies4;
        BENCH_CHECK(cuda::MxFp4MatMul(dx.as<float>(), M, sh.in, codes[c].as<uint8_t>(), scales[c].as<uint8_t>(),
                                      sh.out, y.as<float>(), stream.get()));
      });
      const double tb = TimeMs(stream.get(), reps, [&] {
        BENCH_CHECK(cuda::MatMulBf16(blas, dxbf.as<uint16_t>(), M, sh.in, wbf[turnb++ % copiesb].as<uint16_t>(),
                                     sh.out, yref.as<float>(), stream.get()));
      });
      BENCH_CHECK(stream.Synchronize());
      std::vector<float> a = Value(cuda::Download<float>(y.get(), M * sh.out));
      std::vector<float> b = Value(cuda::Download<float>(yref.get(), M * sh.out));
      double maxdiff = 0, maxabs = 0;
      for (size_t i = 0; i < a.size(); ++i) {
        maxdiff = std::max(maxdiff, static_cast<double>(std::fabs(a[i] - b[i])));
        maxabs = std::max(maxabs, static_cast<double>(std::fabs(b[i])));
      }
      const double bytes = sh.out * sh.in / 2.0 + sh.out * sh.in / 32.0 + 4.0 * M * (sh.in + sh.out);
      const double flops = 2.0 * M * sh.in * sh.out;
      const double gbs = bytes / (t4 * 1e-3) / 1e9;
      std::printf("%-14s %6lld | %9.1f %8.0f %5.0f%% %8.2f | %9.1f %8.2f | %6.2fx | %9.1e\n", sh.name,
                  static_cast<long long>(M), t4 * 1e3, gbs, 100.0 * gbs / bw, flops / (t4 * 1e-3) / 1e12, tb * 1e3,
                  flops / (tb * 1e-3) / 1e12, tb / t4, maxdiff / std::max(maxabs, 1e-30));
      if (M < 64) continue;
      // Tensor-core kernel on the same (bf16) x.
      const double ttc = TimeMs(stream.get(), reps, [&] {
        const int c = turn4++ % copies4;
        BENCH_CHECK(cuda::MxFp4MatMulTensorCore(dxbf.as<uint16_t>(), M, sh.in, codes[c].as<uint8_t>(),
                                                scales[c].as<uint8_t>(), sh.out, y.as<float>(), stream.get()));
      });
      BENCH_CHECK(stream.Synchronize());
      a = Value(cuda::Download<float>(y.get(), M * sh.out));
      maxdiff = 0;
      for (size_t i = 0; i < a.size(); ++i) maxdiff = std::max(maxdiff, static_cast<double>(std::fabs(a[i] - b[i])));
      const double tc_bytes = sh.out * sh.in / 2.0 + sh.out * sh.in / 32.0 + 2.0 * M * sh.in + 4.0 * M * sh.out;
      const double tc_gbs = tc_bytes / (ttc * 1e-3) / 1e9;
      char line[256];
      std::snprintf(line, sizeof(line), "%-14s %6lld | %9.1f %8.0f %5.0f%% %8.2f | %9.1f %8.2f | %6.2fx | %9.1e",
                    sh.name, static_cast<long long>(M), ttc * 1e3, tc_gbs, 100.0 * tc_gbs / bw,
                    flops / (ttc * 1e-3) / 1e12, tb * 1e3, flops / (tb * 1e-3) / 1e12, tb / ttc,
                    maxdiff / std::max(maxabs, 1e-30));
      tc_rows.push_back(line);
      // Each explicit tile at this M (TFLOP/s), to check the auto rule.
      std::string per_tile = "    tiles TFLOP/s:";
      const std::pair<const char*, cuda::MxFp4MmaTile> tiles[] = {{"128x256", cuda::MxFp4MmaTile::k128x256},
                                                                 {"64x256", cuda::MxFp4MmaTile::k64x256},
                                                                 {"64x128", cuda::MxFp4MmaTile::k64x128},
                                                                 {"64x64", cuda::MxFp4MmaTile::k64x64},
                                                                 {"128x256smem", cuda::MxFp4MmaTile::k128x256SmemDecode}};
      for (const auto& [tname, tile] : tiles) {
        const double tt = TimeMs(stream.get(), reps, [&] {
          const int c = turn4++ % copies4;
          BENCH_CHECK(cuda::MxFp4MatMulTensorCore(dxbf.as<uint16_t>(), M, sh.in, codes[c].as<uint8_t>(),
                                                  scales[c].as<uint8_t>(), sh.out, y.as<float>(), stream.get(), tile));
        });
        char cell[64];
        std::snprintf(cell, sizeof(cell), "  %s %.1f", tname, flops / (tt * 1e-3) / 1e12);
        per_tile += cell;
      }
      tc_rows.push_back(per_tile);
    }
  }
  std::printf("\ntensor-core kernel (MxFp4MatMulTensorCore, bf16 x, auto tile)\n");
  std::printf("%-14s %6s | %9s %8s %6s %8s | %9s %8s | %7s | %9s\n", "matrix", "M", "mma us", "GB/s", "%HBM",
              "TFLOP/s", "bf16 us", "TFLOP/s", "speedup", "rel diff");
  for (const std::string& r : tc_rows) std::printf("%s\n", r.c_str());

  // Grouped over experts as a decode step runs it: 256 stacked experts (gate/up
  // shape), tokens routed to 6 distinct experts each; bytes count only the
  // experts the step touches.
  std::printf("\ngrouped gate/up over 256 experts, 6 routed per token\n");
  std::printf("%-8s %7s | %9s %8s %6s %8s\n", "tokens", "experts", "us", "GB/s", "%HBM", "TFLOP/s");
  {
    const int64_t E = 256, out = 2048, in = 4096;
    std::vector<uint8_t> codes(E * out * in / 2), scales(E * out * in / 32);
    std::uniform_int_distribution<int> byte(0, 255), scale(120, 130);
    for (auto& c : codes) c = static_cast<uint8_t>(byte(rng));
    for (auto& v : scales) v = static_cast<uint8_t>(scale(rng));
    cuda::DeviceBuffer dcodes = Value(cuda::Upload(codes));
    cuda::DeviceBuffer dscales = Value(cuda::Upload(scales));
    for (int64_t tokens : {1, 8, 64, 256, 512, 2048, 8192}) {
      if (quick && tokens > 512) break;
      // Route: 6 distinct experts per token, then group the (token, expert) pairs by expert.
      std::vector<std::vector<int32_t>> by_expert(E);
      for (int64_t t = 0; t < tokens; ++t) {
        std::vector<int32_t> ids(E);
        for (int32_t i = 0; i < E; ++i) ids[i] = i;
        std::shuffle(ids.begin(), ids.end(), rng);
        for (int k = 0; k < 6; ++k) by_expert[ids[k]].push_back(static_cast<int32_t>(t));
      }
      std::vector<int32_t> offsets = {0}, experts, rows;
      for (int32_t e = 0; e < E; ++e) {
        if (by_expert[e].empty()) continue;
        experts.push_back(e);
        rows.insert(rows.end(), by_expert[e].begin(), by_expert[e].end());
        offsets.push_back(static_cast<int32_t>(rows.size()));
      }
      std::vector<float> x(tokens * in);
      std::normal_distribution<float> n01;
      for (auto& v : x) v = n01(rng);
      cuda::DeviceBuffer dx = Value(cuda::Upload(x));
      cuda::DeviceBuffer doff = Value(cuda::Upload(offsets));
      cuda::DeviceBuffer dexp = Value(cuda::Upload(experts));
      cuda::DeviceBuffer drows = Value(cuda::Upload(rows));
      cuda::DeviceBuffer dy = Value(cuda::DeviceBuffer::Allocate(rows.size() * out * sizeof(float)));
      const int groups = static_cast<int>(experts.size());
      const double bytes_w = groups * (out * in / 2.0 + out * in / 32.0);
      if (tokens >= 512) {
        // Prefill: the tensor-core kernel on bf16 x (the CUDA-core one would take seconds here).
        std::vector<uint16_t> xbf(x.size());
        for (size_t i = 0; i < x.size(); ++i) xbf[i] = F32ToBf16(x[i]);
        cuda::DeviceBuffer dxbf = Value(cuda::Upload(xbf));
        const double t = TimeMs(stream.get(), 5, [&] {
          BENCH_CHECK(cuda::MxFp4GroupedMatMulTensorCore(
              dxbf.as<uint16_t>(), in, dcodes.as<uint8_t>(), dscales.as<uint8_t>(), out, groups,
              static_cast<int64_t>(rows.size()), doff.as<int32_t>(), dexp.as<int32_t>(), drows.as<int32_t>(),
              dy.as<float>(), stream.get()));
        });
        const double bytes = bytes_w + rows.size() * (2.0 * in + 4.0 * out);
        const double gbs = bytes / (t * 1e-3) / 1e9;
        std::printf("%-8lld %7d | %9.1f %8.0f %5.0f%% %8.2f  (tensor cores, %lld rows)", static_cast<long long>(tokens),
                    groups, t * 1e3, gbs, 100.0 * gbs / bw, 2.0 * rows.size() * in * out / (t * 1e-3) / 1e12,
                    static_cast<long long>(rows.size()));
        for (cuda::MxFp4MmaTile tile : {cuda::MxFp4MmaTile::k128x256, cuda::MxFp4MmaTile::k64x256,
                                        cuda::MxFp4MmaTile::k64x128, cuda::MxFp4MmaTile::k64x64,
                                        cuda::MxFp4MmaTile::k128x256SmemDecode}) {
          const double tt = TimeMs(stream.get(), 3, [&] {
            BENCH_CHECK(cuda::MxFp4GroupedMatMulTensorCore(
                dxbf.as<uint16_t>(), in, dcodes.as<uint8_t>(), dscales.as<uint8_t>(), out, groups,
                static_cast<int64_t>(rows.size()), doff.as<int32_t>(), dexp.as<int32_t>(), drows.as<int32_t>(),
                dy.as<float>(), stream.get(), tile));
          });
          std::printf(" %.0fus", tt * 1e3);
        }
        std::printf("  [128x256 64x256 64x128 64x64 128x256smem]\n");
        continue;
      }
      const double t = TimeMs(stream.get(), 100, [&] {
        BENCH_CHECK(cuda::MxFp4GroupedMatMul(dx.as<float>(), in, dcodes.as<uint8_t>(), dscales.as<uint8_t>(), out,
                                             groups, doff.as<int32_t>(), dexp.as<int32_t>(), drows.as<int32_t>(),
                                             dy.as<float>(), stream.get()));
      });
      const double bytes = bytes_w + 4.0 * rows.size() * (in + out);
      const double gbs = bytes / (t * 1e-3) / 1e9;
      std::printf("%-8lld %7d | %9.1f %8.0f %5.0f%% %8.2f\n", static_cast<long long>(tokens), groups, t * 1e3, gbs,
                  100.0 * gbs / bw, 2.0 * rows.size() * in * out / (t * 1e-3) / 1e12);
    }
  }
  std::printf("\nbytes = packed codes + E8M0 scales + f32 x and y; %%HBM = achieved GB/s over the copy bandwidth.\n");
  std::printf("weights rotate over copies totalling > 256 MB, so every launch reads them from HBM (the grouped\n"
              "rows use one 2.1 GB expert stack, also beyond L2).\n");
  std::printf("bf16 = cuBLAS on weights dequantized to bf16 (2 B/weight, 3.8x the packed bytes), f32 output.\n");
  RunDecode(stream.get(), bw);
}

}  // namespace
}  // namespace retort

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const bool decode_only = argc > 1 && std::strcmp(argv[1], "--decode") == 0;
  if (retort::cuda::DeviceCount() == 0) {
    std::printf("mxfp4_gemm_bench: no CUDA device; nothing to measure\n");
    return 0;
  }
  if (decode_only) {
    retort::cuda::Stream stream = retort::bench::Value(retort::cuda::Stream::Create());
    std::printf("device: %s\n", retort::bench::Value(retort::cuda::DeviceDescription(0)).c_str());
    const double bw = retort::bench::MeasureCopyBandwidthGBs(stream.get());
    std::printf("HBM bandwidth (device copy): %.0f GB/s\n", bw);
    retort::RunDecode(stream.get(), bw);
    return 0;
  }
  retort::Run(quick);
  return 0;
}
