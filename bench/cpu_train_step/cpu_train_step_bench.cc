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

// A random released-layout checkpoint with f32 weights (training needs fp32 masters).
void WriteRandomCheckpoint(const std::string& dir, const nlohmann::json& cfg) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json") << cfg.dump(1);
  std::mt19937_64 rng(42);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<std::pair<std::string, Tensor>> ts;
  auto f32 = [&](const std::string& n, Shape shape, float mean, float sd) {
    Tensor t = Tensor::Zeros(DType::kF32, shape);
    for (int64_t k = 0; k < t.numel(); ++k) t.mutable_data<float>()[k] = mean + sd * nd(rng);
    ts.emplace_back(n, t);
  };
  auto mat = [&](const std::string& n, int64_t o, int64_t i) {
    f32(n, {o, i}, 0, 1.0f / std::sqrt(float(i)));
  };
  const int64_t d = cfg["hidden_size"], V = cfg["vocab_size"], H = cfg["num_attention_heads"],
                D = cfg["head_dim"];
  const int64_t dc = cfg["q_lora_rank"], G = cfg["o_groups"], dg = cfg["o_lora_rank"],
                E = cfg["n_routed_experts"];
  const int64_t I = cfg["moe_intermediate_size"], Hi = cfg["index_n_heads"],
                Di = cfg["index_head_dim"];
  const int64_t K = cfg["num_experts_per_tok"], nhash = cfg["num_hash_layers"];
  const auto ratios = cfg["compress_ratios"];
  const int L = cfg["num_hidden_layers"];
  mat("embed.weight", V, d);
  mat("head.weight", V, d);
  f32("norm.weight", {d}, 1, 0.1f);
  f32("hc_head_fn", {4, 4 * d}, 0, 0.02f);
  f32("hc_head_base", {4}, 0, 0.5f);
  f32("hc_head_scale", {1}, 1, 0.1f);
  for (int l = 0; l < L; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    for (std::string hc : {"hc_attn_", "hc_ffn_"}) {
      f32(p + hc + "fn", {24, 4 * d}, 0, 0.02f);
      f32(p + hc + "base", {24}, 0, 0.5f);
      f32(p + hc + "scale", {3}, 1, 0.1f);
    }
    f32(p + "attn_norm.weight", {d}, 1, 0.1f);
    f32(p + "ffn_norm.weight", {d}, 1, 0.1f);
    mat(p + "attn.wq_a.weight", dc, d);
    f32(p + "attn.q_norm.weight", {dc}, 1, 0.1f);
    mat(p + "attn.wq_b.weight", H * D, dc);
    mat(p + "attn.wkv.weight", D, d);
    f32(p + "attn.kv_norm.weight", {D}, 1, 0.1f);
    mat(p + "attn.wo_a.weight", G * dg, H * D / G);
    mat(p + "attn.wo_b.weight", d, G * dg);
    f32(p + "attn.attn_sink", {H}, 0, 0.5f);
    const int m = ratios[l];
    if (m) {
      const int64_t coff = m == 4 ? 2 : 1;
      mat(p + "attn.compressor.wkv.weight", coff * D, d);
      mat(p + "attn.compressor.wgate.weight", coff * D, d);
      f32(p + "attn.compressor.ape", {m, coff * D}, 0, 0.5f);
      f32(p + "attn.compressor.norm.weight", {D}, 1, 0.1f);
      if (m == 4) {
        mat(p + "attn.indexer.wq_b.weight", Hi * Di, dc);
        mat(p + "attn.indexer.weights_proj.weight", Hi, d);
        mat(p + "attn.indexer.compressor.wkv.weight", 2 * Di, d);
        mat(p + "attn.indexer.compressor.wgate.weight", 2 * Di, d);
        f32(p + "attn.indexer.compressor.ape", {m, 2 * Di}, 0, 0.5f);
        f32(p + "attn.indexer.compressor.norm.weight", {Di}, 1, 0.1f);
      }
    }
    mat(p + "ffn.gate.weight", E, d);
    if (l < nhash) {
      Tensor t = Tensor::Zeros(DType::kI64, {V, K});
      for (int64_t v = 0; v < V; ++v)
        for (int64_t k = 0; k < K; ++k) t.mutable_data<int64_t>()[v * K + k] = (v * 7 + k * 3) % E;
      ts.emplace_back(p + "ffn.gate.tid2eid", t);
    } else {
      f32(p + "ffn.gate.bias", {E}, 0, 0.1f);
    }
    for (int64_t e = 0; e < E; ++e) {
      const std::string x = p + "ffn.experts." + std::to_string(e) + ".";
      mat(x + "w1.weight", I, d);
      mat(x + "w3.weight", I, d);
      mat(x + "w2.weight", d, I);
    }
    mat(p + "ffn.shared_experts.w1.weight", I, d);
    mat(p + "ffn.shared_experts.w3.weight", I, d);
    mat(p + "ffn.shared_experts.w2.weight", d, I);
  }
  auto s = io::WriteSafetensors(dir + "/model.safetensors", ts);
  if (!s.ok()) std::fprintf(stderr, "%s\n", s.ToString().c_str());
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
  WriteRandomCheckpoint(dir, BenchConfig());
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
    const v4::TokenBatch batch{tokens, targets, weights, B, T, {}, 0.0f};
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
