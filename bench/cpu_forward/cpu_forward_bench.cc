// bench/cpu_forward: prefill and decode tokens/s of the V4 CPU model, with the
// achieved GFLOP/s beside an sgemm ceiling measured on the same machine.
//
// Models: the shipped fixture q (released layout, FP8 + MXFP4) and a larger
// random config (~60M parameters, MXFP4 experts) written to a temp dir in the
// released layout and loaded through the normal loader.
//
// usage: cpu_forward_bench [--quick]
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
#include "model/io/safetensors.h"
#include "model/tensor/dtype.h"
#include "model/v4/model.h"
#include "nlohmann/json.hpp"

namespace retort {
namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

double SgemmCeilingGflops() {
  const int n = 1024;
  std::vector<float> a(n * n, 1.0f), b(n * n, 0.5f), c(n * n);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    auto t = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    best = std::max(best, 2.0 * n * n * n / Since(t) / 1e9);
  }
  return best;
}

// FLOPs per token of the matmuls (2 x activated parameters, embedding excluded)
// plus attention over `keys` keys per head (q.k and p.v).
double FlopsPerToken(const v4::Model& m, double keys) {
  const auto& c = m.config();
  const double matmul = 2.0 * (m.ActivatedParameterCount() - static_cast<double>(c.vocab_size) * c.hidden_size);
  return matmul + 4.0 * c.num_heads * c.head_dim * keys * c.num_layers;
}

struct Result {
  double prefill_tps, prefill_gflops, decode_tps[3], decode_gflops[3];
};

Result Measure(const v4::Model& m, int64_t prefill_len, int64_t decode_steps) {
  const auto& c = m.config();
  std::mt19937_64 rng(1);
  std::uniform_int_distribution<int64_t> tok(2, c.vocab_size - 1);
  Result r{};
  {
    std::vector<int64_t> ids(prefill_len);
    for (auto& t : ids) t = tok(rng);
    auto s = m.NewState();
    std::vector<v4::Model::Chunk> ch = {{s.get(), ids}};
    auto t = Clock::now();
    auto out = m.Step(ch);
    const double sec = Since(t);
    if (!out.ok()) std::fprintf(stderr, "%s\n", out.status().ToString().c_str());
    r.prefill_tps = prefill_len / sec;
    const double keys = std::min<double>(c.sliding_window, prefill_len / 2.0);
    r.prefill_gflops = r.prefill_tps * FlopsPerToken(m, keys) / 1e9;
  }
  const int batches[3] = {1, 4, 16};
  for (int bi = 0; bi < 3; ++bi) {
    const int B = batches[bi];
    std::vector<std::unique_ptr<v4::DecodeState>> states;
    std::vector<std::vector<int64_t>> prompts(B, std::vector<int64_t>(64));
    std::vector<v4::Model::Chunk> ch;
    for (int b = 0; b < B; ++b) {
      for (auto& t : prompts[b]) t = tok(rng);
      states.push_back(m.NewState());
      ch.push_back({states.back().get(), prompts[b]});
    }
    (void)m.Step(ch);
    std::vector<int64_t> next(B);
    auto t = Clock::now();
    for (int64_t step = 0; step < decode_steps; ++step) {
      for (int b = 0; b < B; ++b) {
        next[b] = tok(rng);
        ch[b].tokens = absl::MakeConstSpan(&next[b], 1);
      }
      (void)m.Step(ch);
    }
    const double sec = Since(t);
    r.decode_tps[bi] = B * decode_steps / sec;
    r.decode_gflops[bi] = r.decode_tps[bi] * FlopsPerToken(m, std::min<double>(c.sliding_window, 64)) / 1e9;
  }
  return r;
}

nlohmann::json LargeConfig() {
  return {{"model_type", "deepseek_v4"}, {"vocab_size", 8192}, {"hidden_size", 512}, {"num_hidden_layers", 8},
          {"num_attention_heads", 8}, {"num_key_value_heads", 1}, {"head_dim", 128}, {"qk_rope_head_dim", 32},
          {"q_lora_rank", 256}, {"o_groups", 4}, {"o_lora_rank", 128}, {"n_routed_experts", 12},
          {"n_shared_experts", 1}, {"num_experts_per_tok", 4}, {"moe_intermediate_size", 512},
          {"routed_scaling_factor", 1.5}, {"scoring_func", "sqrtsoftplus"}, {"num_hash_layers", 2},
          {"swiglu_limit", 10.0}, {"sliding_window", 128}, {"index_n_heads", 16}, {"index_head_dim", 64},
          {"index_topk", 64}, {"hc_mult", 4}, {"hc_sinkhorn_iters", 20}, {"hc_eps", 1e-6}, {"rms_norm_eps", 1e-6},
          {"rope_theta", 10000.0}, {"compress_rope_theta", 160000.0},
          {"compress_ratios", {0, 0, 4, 128, 4, 128, 4, 128, 0}},
          {"rope_scaling", {{"type", "yarn"}, {"factor", 16.0}, {"original_max_position_embeddings", 65536},
                            {"beta_fast", 32.0}, {"beta_slow", 1.0}}},
          {"max_position_embeddings", 1048576}, {"num_nextn_predict_layers", 0}, {"bos_token_id", 0},
          {"eos_token_id", 1}, {"expert_dtype", "fp4"}};
}

void Row(const char* name, const v4::Model& m, const Result& r, double ceiling) {
  std::printf("| %-22s | %6.1fM | %9.0f | %6.1f (%4.1f%%) |", name, m.ParameterCount() / 1e6, r.prefill_tps,
              r.prefill_gflops, 100 * r.prefill_gflops / ceiling);
  for (int i = 0; i < 3; ++i) std::printf(" %8.1f / %5.1f |", r.decode_tps[i], r.decode_gflops[i]);
  std::printf("\n");
}

}  // namespace
}  // namespace retort

int main(int argc, char** argv) {
  using namespace retort;
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const double ceiling = SgemmCeilingGflops();
  std::printf("machine: %ld cores; OpenBLAS sgemm 1024^3 ceiling: %.1f GFLOP/s\n\n", sysconf(_SC_NPROCESSORS_ONLN),
              ceiling);
  std::printf("| %-22s | %7s | %9s | %15s | %17s | %17s | %17s |\n", "model", "params", "prefill", "prefill GFLOP/s",
              "decode b=1 tok/s", "decode b=4", "decode b=16");
  std::printf("|%s|\n", std::string(131, '-').c_str());
  auto q = v4::Model::Load(std::string(RETORT_SOURCE_DIR) + "/tests/fixtures/v4/q");
  if (!q.ok()) {
    std::fprintf(stderr, "%s\n", q.status().ToString().c_str());
    return 1;
  }
  Row("fixture q (FP8+MXFP4)", **q, Measure(**q, quick ? 128 : 512, quick ? 8 : 32), ceiling);
  const std::string dir = std::filesystem::temp_directory_path() / ("retort_bench_" + std::to_string(getpid()));
  if (absl::Status s = bench::WriteRandomV4Checkpoint(dir, LargeConfig(), bench::RandomWeights::kDeployment); !s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  auto big = v4::Model::Load(dir);
  std::filesystem::remove_all(dir);
  if (!big.ok()) {
    std::fprintf(stderr, "%s\n", big.status().ToString().c_str());
    return 1;
  }
  Row("random d=512 L=8 MXFP4", **big, Measure(**big, quick ? 128 : 512, quick ? 4 : 16), ceiling);
  std::printf("\ndecode cells: tokens/s / GFLOP/s (64-token prompts). GFLOP/s counts 2 x activated parameters\n"
              "(embedding excluded) plus attention over the keys each query sees.\n");
  return 0;
}
