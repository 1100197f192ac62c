// bench/cpu_train_step: one training step of the V4 CPU trainer (forward +
// backward + clipped Muon/AdamW update) on a random ~34M-parameter config
// with every component on (sliding, CSA + indexer, HCA, hash and learned
// routing, shared expert, mHC), in tokens/s and GFLOP/s beside the sgemm
// ceiling of the same machine. The update is timed on its own as well.
//
// GFLOP/s counts 6 x activated parameters (embedding excluded) per token:
// 2 for the forward, 4 for the backward's two matmuls per weight.
//
// usage: cpu_train_step_bench [--quick]
#include <cblas.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "bench/common/random_v4_checkpoint.h"
#include "learner/trainer/trainer.h"
#include "model/io/safetensors.h"
#include "nlohmann/json.hpp"

namespace retort {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

double SgemmCeilingGflops() {
  const int n = 1024;
  std::vector<float> a(n * n, 1.0f), b(n * n, 0.5f), c(n * n);
  double best = 0;
  for (int rep = 0; rep < 4; ++rep) {
    auto t = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a.data(), n, b.data(), n,
                0.0f, c.data(), n);
    best = std::max(best, 2.0 * n * n * n / Since(t) / 1e9);
  }
  return best;
}

nlohmann::json BenchConfig() {
  return {{"model_type", "deepseek_v4"},
          {"vocab_size", 8192},
          {"hidden_size", 384},
          {"num_hidden_layers", 6},
          {"num_attention_heads", 8},
          {"num_key_value_heads", 1},
          {"head_dim", 128},
          {"qk_rope_head_dim", 32},
          {"q_lora_rank", 192},
          {"o_groups", 4},
          {"o_lora_rank", 128},
          {"n_routed_experts", 8},
          {"n_shared_experts", 1},
          {"num_experts_per_tok", 2},
          {"moe_intermediate_size", 384},
          {"routed_scaling_factor", 1.5},
          {"scoring_func", "sqrtsoftplus"},
          {"num_hash_layers", 2},
          {"swiglu_limit", 10.0},
          {"sliding_window", 64},
          {"index_n_heads", 8},
          {"index_head_dim", 64},
          {"index_topk", 16},
          {"hc_mult", 4},
          {"hc_sinkhorn_iters", 20},
          {"hc_eps", 1e-6},
          {"rms_norm_eps", 1e-6},
          {"rope_theta", 10000.0},
          {"compress_rope_theta", 160000.0},
          {"compress_ratios", {0, 4, 128, 4, 128, 0, 0}},
          {"rope_scaling",
           {{"type", "yarn"},
            {"factor", 16.0},
            {"original_max_position_embeddings", 65536},
            {"beta_fast", 32.0},
            {"beta_slow", 1.0}}},
          {"max_position_embeddings", 1048576},
          {"num_nextn_predict_layers", 0},
          {"bos_token_id", 0},
          {"eos_token_id", 1}};
}

}  // namespace
}  // namespace retort

int main(int argc, char** argv) {
  using namespace retort;
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const double ceiling = SgemmCeilingGflops();
  std::printf("machine: %ld cores; OpenBLAS sgemm 1024^3 ceiling: %.1f GFLOP/s\n",
              sysconf(_SC_NPROCESSORS_ONLN), ceiling);
  const std::string dir =
      std::filesystem::temp_directory_path() / ("retort_train_bench_" + std::to_string(getpid()));
  if (absl::Status s = bench::WriteRandomV4Checkpoint(dir, BenchConfig(), bench::RandomWeights::kTrainable); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  trainer::TrainerOptions options;
  options.optimizer.schedule.peak_lr = 1e-3;
  auto t = trainer::Trainer::FromModelDir(dir, options);
  std::filesystem::remove_all(dir);
  if (!t.ok()) {
    std::fprintf(stderr, "%s\n", t.status().ToString().c_str());
    return 1;
  }
  const v4::Model& m = (*t)->model();
  const auto& c = m.config();
  const double activated =
      m.ActivatedParameterCount() - static_cast<double>(c.vocab_size) * c.hidden_size;
  std::printf("model: %.1fM parameters (%.1fM activated per token, embedding excluded)\n\n",
              m.ParameterCount() / 1e6, activated / 1e6);
  std::printf("| %6s | %5s | %10s | %9s | %12s | %10s | %12s |\n", "B x T", "steps", "step s",
              "tokens/s", "GFLOP/s", "% ceiling", "update s");
  std::printf("|%s|\n", std::string(84, '-').c_str());
  std::mt19937_64 rng(3);
  std::uniform_int_distribution<int64_t> tok(2, c.vocab_size - 1);
  for (auto [B, T] : {std::pair<int64_t, int64_t>{1, 128}, {2, 256}}) {
    if (quick && B > 1) break;
    std::vector<int64_t> tokens(B * T), targets(B * T, -1);
    std::vector<float> weights(B * T, 0.0f);
    for (auto& x : tokens) x = tok(rng);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i + 1 < T; ++i) {
        targets[b * T + i] = tokens[b * T + i + 1];
        weights[b * T + i] = 1.0f / static_cast<float>(B * (T - 1));
      }
    const v4::TokenBatch batch{tokens, targets, weights, B, T, {}, 0.0f, {}};
    if (auto r = (*t)->Step(batch); !r.ok()) {  // warm-up
      std::fprintf(stderr, "%s\n", r.status().ToString().c_str());
      return 1;
    }
    const int steps = quick ? 1 : 3;
    double fwd_bwd = 0, total = 0;
    for (int s = 0; s < steps; ++s) {
      auto t0 = Clock::now();
      auto eval =
          v4::WeightedTokenLossAndGradients(m, batch, nullptr);  // forward + backward, no update
      fwd_bwd += Since(t0);
      auto t1 = Clock::now();
      auto r = (*t)->Step(batch);
      total += Since(t1);
      if (!eval.ok() || !r.ok()) return 1;
    }
    const double step_s = total / steps, update_s = (total - fwd_bwd) / steps;
    const double tps = B * T / step_s, gflops = tps * 6.0 * activated / 1e9;
    std::printf("| %2lldx%-3lld | %5d | %10.3f | %9.1f | %12.2f | %9.1f%% | %12.3f |\n",
                static_cast<long long>(B), static_cast<long long>(T), steps, step_s, tps, gflops,
                100 * gflops / ceiling, update_s);
  }
  std::printf(
      "\nstep s: Trainer::Step (forward + backward + update); update s: step minus a separately "
      "timed\n"
      "forward + backward of the same batch (the Muon/AdamW update and gradient copies).\n");
  return 0;
}
