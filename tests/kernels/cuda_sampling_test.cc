// The CUDA sampler against rollout::Sampler (the CPU twin) on random logits at
// odd vocabulary sizes, with ties, greedy and every truncation: same seed ->
// same token, log-probs within a stated bound.
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/kernels/cuda/sampling.cuh"
#include "rollout/engine/sampler.h"
#include "tests/kernels/cuda_test_util.h"

namespace retort {
namespace {

using testing::Down;
using testing::RandomFloats;
using testing::Up;
using testing::Zeros;

TEST(CudaSamplingTest, MatchesCpuSamplerForTheSameSeed) {
  RETORT_SKIP_WITHOUT_CUDA();
  const uint64_t seed = 41;
  std::mt19937_64 rng(seed);
  struct Config {
    float temperature;
    int top_k;
    float top_p;
  };
  const std::vector<Config> configs = {{0.0f, 0, 1.0f}, {1.0f, 0, 1.0f}, {0.7f, 40, 1.0f},
                                       {1.3f, 0, 0.9f}, {1.0f, 5, 0.5f}, {0.9f, 1, 1.0f}};
  int compared = 0;
  for (int64_t V : {int64_t{1}, int64_t{19}, int64_t{989}, int64_t{50000}}) {
    const int64_t B = 7 * static_cast<int64_t>(configs.size());
    auto logits = RandomFloats(rng, B * V, -6.0f, 6.0f);
    // Ties: every third row repeats a value block, so sort order matters.
    for (int64_t b = 0; b < B; b += 3)
      for (int64_t i = 1; i < V; i += 2) logits[b * V + i] = logits[b * V + i - 1];
    std::vector<cuda::SamplingRow> rows(B);
    std::vector<rollout::SampledToken> want(B);
    for (int64_t b = 0; b < B; ++b) {
      const Config& c = configs[b % configs.size()];
      rollout::SamplingParams p;
      p.temperature = c.temperature, p.top_k = c.top_k, p.top_p = c.top_p, p.seed = 1000 + b;
      rollout::Sampler cpu(p), twin(p);
      want[b] = cpu.Sample(absl::MakeConstSpan(logits.data() + b * V, V));
      rows[b] = {c.temperature, c.top_k, c.top_p, twin.NextCanonical()};
    }
    auto dl = Up(logits), drows = Up(rows);
    auto scratch = Zeros(cuda::SamplingScratchBytes(B, V));
    auto dtok = Zeros(8 * B), dlp = Zeros(4 * B), dmlp = Zeros(4 * B);
    ASSERT_TRUE(cuda::SampleRows(dl.as<float>(), B, V, drows.as<cuda::SamplingRow>(), scratch.get(),
                                 dtok.as<int64_t>(), dlp.as<float>(), dmlp.as<float>(), nullptr)
                    .ok());
    auto tok = Down<int64_t>(dtok, B);
    auto lp = Down<float>(dlp, B), mlp = Down<float>(dmlp, B);
    for (int64_t b = 0; b < B; ++b) {
      const std::string tag = "seed " + std::to_string(seed) + " V " + std::to_string(V) + " row " + std::to_string(b);
      EXPECT_EQ(tok[b], want[b].token) << tag;
      // Bound: probabilities summed in double in another order; 1e-5 on log-probs.
      EXPECT_NEAR(lp[b], want[b].logprob, 1e-5) << tag;
      EXPECT_NEAR(mlp[b], want[b].model_logprob, 1e-5) << tag;
      ++compared;
    }
  }
  EXPECT_EQ(compared, 4 * 7 * 6);
}

}  // namespace
}  // namespace retort
