// bench/fp8_gemm: y = dequant(x) dequant(W)^T with V4's FP8 dense weights
// (e4m3, f32 scale per 128 x 128 block) and activations quantized per 1 x 128
// (Fp8QuantizeActivationsBf16 from bf16 x), through cuBLASLt's block-scaled
// FP8 GEMM, at prefill M = 512..8192.
//
// Columns: the quantizer's time; the GEMM's time, its TFLOP/s and GB/s (fp8 x
// and W, their scales, y); quantizer + GEMM TFLOP/s; cuBLAS bf16 on the
// dequantized weights (bf16 x) with the speed ratio (quantizer + GEMM against
// it); max |diff| / max |y| between the two (~1e-2 expected: the FP8 path
// rounds x to e4m3). Weights rotate over copies > 256 MB, so every launch
// reads them from HBM.
//
// Then the decode shapes (T = 1, 4, 8 rows) through the few-row kernel
// (Fp8MatMulRows), with 2 and 4 rows a warp, as % of the HBM bandwidth.
//
// usage: fp8_gemm_bench [--quick]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "bench/common/bench_util.h"
#include "bench/common/cuda_timing.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/dense_gemm.cuh"
#include "model/kernels/cuda/fp8_gemm.cuh"
#include "model/tensor/dtype.h"

namespace retort {
namespace {

using bench::TimeMs;
using bench::Value;

constexpr size_t kRotateBytes = size_t{256} << 20;

void Run(bool quick) {
  cuda::Stream stream = Value(cuda::Stream::Create());
  cuda::Blas blas = Value(cuda::Blas::Create());
  std::printf("device: %s\n\n", Value(cuda::DeviceDescription(0)).c_str());
  std::mt19937 rng(11);
  struct Shape {
    const char* name;
    int64_t out, in;
  };
  const Shape shapes[] = {{"wq_a 1024x4096", 1024, 4096}, {"4096x4096", 4096, 4096}, {"4096x2048", 4096, 2048}};
  std::vector<int64_t> ms = {512, 1024, 2048, 4096, 8192};
  if (quick) ms = {512, 8192};
  std::printf("%-15s %5s %4s | %8s | %8s %8s %7s | %8s | %8s %8s | %7s | %8s\n", "matrix", "M", "out", "quant us",
              "gemm us", "TFLOP/s", "GB/s", "q+g TF/s", "bf16 us", "TFLOP/s", "speedup", "rel diff");
  for (const Shape& sh : shapes) {
    const int64_t ob = (sh.out + 127) / 128, kb = sh.in / 128;
    std::vector<uint8_t> wq(sh.out * sh.in);
    for (auto& b : wq) {
      do b = static_cast<uint8_t>(rng() & 0xff);
      while ((b & 0x7f) == 0x7f);
    }
    std::vector<float> wsc(ob * kb);
    std::uniform_real_distribution<float> u(1e-3f, 1e-2f);
    for (auto& v : wsc) v = u(rng);
    std::vector<uint16_t> wbf(sh.out * sh.in);
    for (int64_t o = 0; o < sh.out; ++o)
      for (int64_t i = 0; i < sh.in; ++i)
        wbf[o * sh.in + i] = F32ToBf16(E4M3ToF32(wq[o * sh.in + i]) * wsc[(o / 128) * kb + i / 128]);
    const int copies8 = static_cast<int>(kRotateBytes / wq.size()) + 1;
    const int copiesb = static_cast<int>(kRotateBytes / (2 * wbf.size())) + 1;
    std::vector<cuda::DeviceBuffer> dwq, dwb;
    for (int i = 0; i < copies8; ++i) dwq.push_back(Value(cuda::Upload(wq)));
    for (int i = 0; i < copiesb; ++i) dwb.push_back(Value(cuda::Upload(wbf)));
    cuda::DeviceBuffer dws = Value(cuda::Upload(wsc));
    int turn8 = 0, turnb = 0;
    for (int64_t M : ms) {
      std::vector<uint16_t> xbf(M * sh.in);
      std::normal_distribution<float> n01;
      for (auto& v : xbf) v = F32ToBf16(n01(rng));
      cuda::DeviceBuffer dx = Value(cuda::Upload(xbf));
      cuda::DeviceBuffer dxq = Value(cuda::DeviceBuffer::Allocate(M * sh.in));
      cuda::DeviceBuffer dxs = Value(cuda::DeviceBuffer::Allocate(cuda::Fp8ActScaleStride(M) * kb * 4));
      // f32 output when this cuBLASLt offers it, else bf16.
      cuda::Fp8GemmOutput output = cuda::Fp8GemmOutput::kF32;
      absl::StatusOr<cuda::Fp8BlockGemm> gemm = cuda::Fp8BlockGemm::Create(M, sh.in, sh.out, output);
      if (!gemm.ok()) {
        output = cuda::Fp8GemmOutput::kBf16;
        gemm = cuda::Fp8BlockGemm::Create(M, sh.in, sh.out, output);
      }
      if (!gemm.ok()) {
        std::printf("%-15s %5lld: %s\n", sh.name, static_cast<long long>(M), gemm.status().ToString().c_str());
        continue;
      }
      cuda::DeviceBuffer dy = Value(cuda::DeviceBuffer::Allocate(M * sh.out * 4));
      cuda::DeviceBuffer dyref = Value(cuda::DeviceBuffer::Allocate(M * sh.out * 4));
      const int reps = M >= 2048 ? 10 : 50;
      const double tq = TimeMs(stream.get(), reps, [&] {
        BENCH_CHECK(cuda::Fp8QuantizeActivationsBf16(dx.as<uint16_t>(), M, sh.in, cuda::Fp8ScaleRule::kAmax,
                                                     dxq.as<uint8_t>(), dxs.as<float>(), stream.get()));
      });
      const double tg = TimeMs(stream.get(), reps, [&] {
        BENCH_CHECK(gemm->Run(dxq.as<uint8_t>(), dxs.as<float>(), dwq[turn8++ % copies8].as<uint8_t>(),
                              dws.as<float>(), dy.get(), stream.get()));
      });
      const double tb = TimeMs(stream.get(), reps, [&] {
        BENCH_CHECK(cuda::MatMulBf16(blas, dx.as<uint16_t>(), M, sh.in, dwb[turnb++ % copiesb].as<uint16_t>(), sh.out,
                                     dyref.as<float>(), stream.get()));
      });
      BENCH_CHECK(stream.Synchronize());
      std::vector<float> a(M * sh.out);
      if (output == cuda::Fp8GemmOutput::kF32) {
        a = Value(cuda::Download<float>(dy.get(), M * sh.out));
      } else {
        std::vector<uint16_t> ab = Value(cuda::Download<uint16_t>(dy.get(), M * sh.out));
        for (size_t i = 0; i < a.size(); ++i) a[i] = Bf16ToF32(ab[i]);
      }
      std::vector<float> b = Value(cuda::Download<float>(dyref.get(), M * sh.out));
      double maxdiff = 0, maxabs = 0;
      for (size_t i = 0; i < a.size(); ++i) {
        maxdiff = std::max(maxdiff, static_cast<double>(std::fabs(a[i] - b[i])));
        maxabs = std::max(maxabs, static_cast<double>(std::fabs(b[i])));
      }
      const double flops = 2.0 * M * sh.in * sh.out;
      const double ybytes = output == cuda::Fp8GemmOutput::kF32 ? 4.0 : 2.0;
      const double bytes = 1.0 * sh.out * sh.in + 4.0 * ob * kb + 1.0 * M * sh.in + 4.0 * M * kb + ybytes * M * sh.out;
      std::printf("%-15s %5lld %4s | %8.1f | %8.1f %8.1f %7.0f | %8.1f | %8.1f %8.1f | %6.2fx | %8.1e\n", sh.name,
                  static_cast<long long>(M), output == cuda::Fp8GemmOutput::kF32 ? "f32" : "bf16", tq * 1e3, tg * 1e3,
                  flops / (tg * 1e-3) / 1e12, bytes / (tg * 1e-3) / 1e9, flops / ((tq + tg) * 1e-3) / 1e12, tb * 1e3,
                  flops / (tb * 1e-3) / 1e12, tb / (tq + tg), maxdiff / std::max(maxabs, 1e-30));
    }
  }
  std::printf("\nspeedup = cuBLAS bf16 time / (quantizer + FP8 GEMM time).\n");
}

// Decode shapes: the few-row kernel (Fp8MatMulRows) on quant-dequantized x,
// with 2 and 4 rows a warp, against the HBM bandwidth measured by a device
// copy; weights rotate over copies > 256 MB as above.
void RunFewRow() {
  cuda::Stream stream = Value(cuda::Stream::Create());
  const double bw = bench::MeasureCopyBandwidthGBs(stream.get());
  std::printf("\nfew-row FP8 GEMM (decode), HBM copy bandwidth %.0f GB/s\n", bw);
  std::printf("%-22s %3s | %9s %7s %5s | %9s %7s %5s\n", "matrix out x in", "T", "R=2 us", "GB/s", "%bw", "R=4 us",
              "GB/s", "%bw");
  struct Shape {
    const char* name;
    int64_t out, in, groups;
  };
  const Shape shapes[] = {{"wq_b 32768x1024", 32768, 1024, 1},  {"wo_a 8x1024x4096", 8192, 4096, 8},
                          {"wo_b 4096x8192", 4096, 8192, 1},    {"wq_a 1024x4096", 1024, 4096, 1},
                          {"wkv 512x4096", 512, 4096, 1},       {"shared w1 2048x4096", 2048, 4096, 1}};
  std::mt19937 rng(5);
  for (const Shape& sh : shapes) {
    const int64_t ob = (sh.out + 127) / 128, kb = (sh.in + 127) / 128;
    std::vector<uint8_t> wq(sh.out * sh.in);
    for (auto& b : wq) {
      do b = static_cast<uint8_t>(rng() & 0xff);
      while ((b & 0x7f) == 0x7f);
    }
    std::vector<float> wsc(ob * kb, 1e-2f);
    const int copies = static_cast<int>(kRotateBytes / wq.size()) + 1;
    std::vector<cuda::DeviceBuffer> dw;
    for (int i = 0; i < copies; ++i) dw.push_back(Value(cuda::Upload(wq)));
    cuda::DeviceBuffer ds = Value(cuda::Upload(wsc));
    for (int64_t T : {1, 4, 8}) {
      const int64_t ldx = sh.groups * sh.in;
      std::vector<uint16_t> x(T * ldx, F32ToBf16(0.5f));
      cuda::DeviceBuffer dx = Value(cuda::Upload(x));
      cuda::DeviceBuffer dy = Value(cuda::DeviceBuffer::Allocate(4 * T * sh.out));
      double us[2];
      for (int k = 0; k < 2; ++k) {
        int turn = 0;
        const int R = k == 0 ? 2 : 4;
        us[k] = 1e3 * TimeMs(stream.get(), 50, [&] {
                  BENCH_CHECK(cuda::Fp8MatMulRows(dx.as<uint16_t>(), T, ldx, dw[turn++ % copies].as<uint8_t>(),
                                                  ds.as<float>(), sh.out, sh.in, sh.out / sh.groups, dy.as<float>(),
                                                  stream.get(), R));
                });
      }
      const double bytes = static_cast<double>(sh.out) * sh.in + 4.0 * ob * kb;
      std::printf("%-22s %3lld | %9.2f %7.0f %4.0f%% | %9.2f %7.0f %4.0f%%\n", sh.name, static_cast<long long>(T), us[0],
                  bytes / us[0] / 1e3, 100.0 * bytes / us[0] / 1e3 / bw, us[1], bytes / us[1] / 1e3,
                  100.0 * bytes / us[1] / 1e3 / bw);
    }
  }
}

}  // namespace
}  // namespace retort

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  if (retort::cuda::DeviceCount() == 0) {
    std::printf("fp8_gemm_bench: no CUDA device; nothing to measure\n");
    return 0;
  }
  retort::Run(quick);
  retort::RunFewRow();
  return 0;
}
