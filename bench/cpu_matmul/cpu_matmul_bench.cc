// bench/cpu_matmul: GFLOP/s of the batch-invariant cpu::MatMul (y = x W^T)
// beside OpenBLAS sgemm on the same shapes, for decode-sized and
// prefill-sized T at the V4 models' projection shapes. The two are timed in
// alternation (best of 5 rounds) so load from other processes hits both, with
// a pause after sgemm: OpenBLAS's threads spin for ~0.1 s after a call and
// would otherwise hold cores that the retort pool needs.
//
// OpenBLAS picks its kernel at run time (DYNAMIC_ARCH); the core it picked is
// printed, since an unrecognised CPU falls back to a slow generic kernel
// (OPENBLAS_CORETYPE=Haswell or SkylakeX overrides it).
//
// usage: cpu_matmul_bench [--quick]
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "model/kernels/cpu/cpu_kernels.h"

extern "C" char* openblas_get_corename();

namespace {

using Clock = std::chrono::steady_clock;

struct Shape {
  int T, in, out;
};

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  std::vector<Shape> shapes;
  const std::vector<int> ts = quick ? std::vector<int>{1, 4, 16, 128, 512}
                                    : std::vector<int>{1, 2, 4, 8, 16, 64, 128, 512, 2048};
  for (int T : ts)
    for (auto [in, out] : {std::pair{512, 512}, {512, 2048}, {2048, 512}, {2048, 24}, {4096, 4096}})
      if (static_cast<double>(T) * in * out <= 4.3e9) shapes.push_back({T, in, out});
  std::printf("OpenBLAS core: %s\n\n", openblas_get_corename());
  std::printf("| %5s | %5s | %5s | %13s | %14s | %17s |\n", "T", "in", "out", "sgemm GFLOP/s",
              "MatMul GFLOP/s", "MatMul / sgemm t");
  std::printf("|%s|\n", std::string(77, '-').c_str());
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (const Shape& s : shapes) {
    std::vector<float> x(static_cast<size_t>(s.T) * s.in), w(static_cast<size_t>(s.out) * s.in),
        y(static_cast<size_t>(s.T) * s.out);
    for (auto& v : x) v = normal(rng);
    for (auto& v : w) v = normal(rng);
    const double flops = 2.0 * s.T * s.in * s.out;
    const int reps = std::max(2, static_cast<int>((quick ? 1e8 : 4e8) / flops));
    double t_blas = 1e30, t_ours = 1e30;
    for (int round = 0; round < 5; ++round) {
      auto t = Clock::now();
      for (int r = 0; r < reps; ++r)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, s.T, s.out, s.in, 1.0f, x.data(), s.in,
                    w.data(), s.in, 0.0f, y.data(), s.out);
      t_blas = std::min(t_blas, std::chrono::duration<double>(Clock::now() - t).count() / reps);
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      t = Clock::now();
      for (int r = 0; r < reps; ++r)
        retort::cpu::MatMul(x.data(), s.T, s.in, w.data(), s.out, y.data());
      t_ours = std::min(t_ours, std::chrono::duration<double>(Clock::now() - t).count() / reps);
    }
    std::printf("| %5d | %5d | %5d | %13.1f | %14.1f | %17.2f |\n", s.T, s.in, s.out,
                flops / t_blas / 1e9, flops / t_ours / 1e9, t_ours / t_blas);
  }
  return 0;
}
