// bench/cpu_losses: throughput of the fused chunked reverse KL (OPD loss) and
// of token cross-entropy on CPU, beside an sgemm ceiling of the same shape.
//
// usage: cpu_losses_bench [tokens=256] [dim=512] [vocab=32768] [vocab_chunk=4096] [reps=3]
// Executed flops (see losses.h): KL with gradients 12·T·V·D (student and
// teacher dims equal), cross-entropy with gradients 8·T·V·D. "model" GFLOP/s
// counts only the unavoidable 8·T·V·D (KL) / 6·T·V·D (CE): logits once, plus
// the two backward matmuls; the rest is the recomputation that keeps memory at
// one [tokens x chunk] block.
#include <cblas.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "learner/losses/losses.h"
#include "model/base/logging.h"

namespace {

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

int main(int argc, char** argv) {
  using retort::losses::ChunkOptions;
  const int64_t T = argc > 1 ? std::atoll(argv[1]) : 256;
  const int64_t D = argc > 2 ? std::atoll(argv[2]) : 512;
  const int64_t V = argc > 3 ? std::atoll(argv[3]) : 32768;
  const int64_t chunk = argc > 4 ? std::atoll(argv[4]) : 4096;
  const int reps = argc > 5 ? std::atoi(argv[5]) : 3;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto gaussian = [&](int64_t n, float scale) {
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = normal(rng) * scale;
    return v;
  };
  std::vector<float> hs = gaussian(T * D, 1), ws = gaussian(V * D, 0.05f);
  std::vector<float> ht = gaussian(T * D, 1), wt = gaussian(V * D, 0.05f);
  std::vector<float> gh(T * D), gw(V * D), coeff(T, 1.0f / T), mask(T, 1.0f);
  std::vector<int32_t> y(T);
  for (int64_t t = 0; t < T; ++t) y[t] = static_cast<int32_t>((t * 7919) % V);
  const ChunkOptions options{chunk, 256};
  const retort::losses::LmHead student{hs, ws, T, D, V};
  const retort::losses::TeacherHead teacher{ht, wt, D, {}, 1e-6f};
  const double tvd = static_cast<double>(T) * V * D;

  auto time_best = [&](auto&& fn) {
    fn();  // warm-up
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
      auto a = std::chrono::steady_clock::now();
      fn();
      best = std::min(best, Seconds(a, std::chrono::steady_clock::now()));
    }
    return best;
  };

  // Ceiling: the chunk logit sgemm [T, D]·[D, chunk] over the whole vocabulary.
  std::vector<float> z(static_cast<size_t>(std::min<int64_t>(T, 256) * chunk));
  const int64_t rows = std::min<int64_t>(T, 256);
  const double sgemm_s = time_best([&] {
    for (int64_t c0 = 0; c0 < V; c0 += chunk) {
      const int64_t C = std::min(chunk, V - c0);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows),
                  static_cast<int>(C), static_cast<int>(D), 1.0f, hs.data(), static_cast<int>(D),
                  ws.data() + c0 * D, static_cast<int>(D), 0.0f, z.data(), static_cast<int>(C));
    }
  });
  const double sgemm_gflops = 2.0 * rows * V * D / sgemm_s / 1e9;

  const double kl_s = time_best([&] {
    auto r = retort::losses::ReverseKlLoss(student, teacher, coeff,
                                           {absl::MakeSpan(gh), absl::MakeSpan(gw)}, options);
    CHECK(r.ok()) << r.status();
  });
  const double kl_fwd_s = time_best([&] {
    auto r = retort::losses::ReverseKlLoss(student, teacher, coeff, {}, options);
    CHECK(r.ok()) << r.status();
  });
  const double ce_s = time_best([&] {
    auto r = retort::losses::TokenCrossEntropy(student, y, mask,
                                               {absl::MakeSpan(gh), absl::MakeSpan(gw)}, options);
    CHECK(r.ok()) << r.status();
  });

  std::printf(
      "cpu_losses: T=%lld D=%lld V=%lld vocab_chunk=%lld, best of %d, fp32, %d OpenBLAS threads\n",
      static_cast<long long>(T), static_cast<long long>(D), static_cast<long long>(V),
      static_cast<long long>(chunk), reps, openblas_get_num_threads());
  std::printf("%-28s %10s %12s %14s %14s\n", "case", "ms", "tokens/s", "exec GFLOP/s",
              "model GFLOP/s");
  std::printf("%-28s %10.2f %12s %14.1f %14s\n", "sgemm ceiling [T,D]x[D,V]", sgemm_s * 1e3, "-",
              sgemm_gflops, "-");
  std::printf("%-28s %10.2f %12.0f %14.1f %14.1f\n", "reverse KL fwd+bwd", kl_s * 1e3, T / kl_s,
              12 * tvd / kl_s / 1e9, 8 * tvd / kl_s / 1e9);
  std::printf("%-28s %10.2f %12.0f %14.1f %14.1f\n", "reverse KL fwd only", kl_fwd_s * 1e3,
              T / kl_fwd_s, 4 * tvd / kl_fwd_s / 1e9, 4 * tvd / kl_fwd_s / 1e9);
  std::printf("%-28s %10.2f %12.0f %14.1f %14.1f\n", "cross-entropy fwd+bwd", ce_s * 1e3, T / ce_s,
              8 * tvd / ce_s / 1e9, 6 * tvd / ce_s / 1e9);
  return 0;
}
