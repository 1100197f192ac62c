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

// Writes a random released-layout checkpoint (bf16 dense weights, MXFP4 experts,
// f32 mHC/sinks/ape) for `config` into `dir`.
void WriteRandomCheckpoint(const std::string& dir, const nlohmann::json& cfg) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/config.json") << cfg.dump(1);
  std::mt19937_64 rng(42);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<std::pair<std::string, Tensor>> ts;
  auto bf16 = [&](const std::string& n, int64_t o, int64_t i) {
    Tensor t = Tensor::Zeros(DType::kBF16, {o, i});
    const float s = 1.0f / std::sqrt(static_cast<float>(i));
    for (int64_t k = 0; k < o * i; ++k) t.mutable_data<uint16_t>()[k] = F32ToBf16(nd(rng) * s);
    ts.emplace_back(n, t);
  };
  auto f32 = [&](const std::string& n, Shape shape, float mean, float sd) {
    Tensor t = Tensor::Zeros(DType::kF32, shape);
    for (int64_t k = 0; k < t.numel(); ++k) t.mutable_data<float>()[k] = mean + sd * nd(rng);
    ts.emplace_back(n, t);
  };
  auto mxfp4 = [&](const std::string& n, int64_t o, int64_t i) {
    Tensor codes = Tensor::Zeros(DType::kI8, {o, i / 2}), sc = Tensor::Zeros(DType::kE8M0, {o, i / 32});
    std::uniform_int_distribution<int> byte(0, 255);
    for (int64_t k = 0; k < codes.numel(); ++k) codes.mutable_raw()[k] = static_cast<uint8_t>(byte(rng));
    const int e = 127 - 2 - static_cast<int>(std::log2(std::sqrt(static_cast<double>(i))));
    for (int64_t k = 0; k < sc.numel(); ++k) sc.mutable_raw()[k] = static_cast<uint8_t>(e);
    ts.emplace_back(n + ".weight", codes);
    ts.emplace_back(n + ".scale", sc);
  };
  const int64_t d = cfg["hidden_size"], V = cfg["vocab_size"], H = cfg["num_attention_heads"], D = cfg["head_dim"];
  const int64_t dc = cfg["q_lora_rank"], G = cfg["o_groups"], dg = cfg["o_lora_rank"], E = cfg["n_routed_experts"];
  const int64_t I = cfg["moe_intermediate_size"], Hi = cfg["index_n_heads"], Di = cfg["index_head_dim"];
  const int64_t K = cfg["num_experts_per_tok"], nhash = cfg["num_hash_layers"];
  const auto ratios = cfg["compress_ratios"];
  const int L = cfg["num_hidden_layers"];
  bf16("embed.weight", V, d);
  bf16("head.weight", V, d);
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
    bf16(p + "attn.wq_a.weight", dc, d);
    f32(p + "attn.q_norm.weight", {dc}, 1, 0.1f);
    bf16(p + "attn.wq_b.weight", H * D, dc);
    bf16(p + "attn.wkv.weight", D, d);
    f32(p + "attn.kv_norm.weight", {D}, 1, 0.1f);
    bf16(p + "attn.wo_a.weight", G * dg, H * D / G);
    bf16(p + "attn.wo_b.weight", d, G * dg);
    f32(p + "attn.attn_sink", {H}, 0, 0.5f);
    const int m = ratios[l];
    if (m) {
      const int64_t coff = m == 4 ? 2 : 1;
      bf16(p + "attn.compressor.wkv.weight", coff * D, d);
      bf16(p + "attn.compressor.wgate.weight", coff * D, d);
      f32(p + "attn.compressor.ape", {m, coff * D}, 0, 0.5f);
      f32(p + "attn.compressor.norm.weight", {D}, 1, 0.1f);
      if (m == 4) {
        bf16(p + "attn.indexer.wq_b.weight", Hi * Di, dc);
        bf16(p + "attn.indexer.weights_proj.weight", Hi, d);
        bf16(p + "attn.indexer.compressor.wkv.weight", 2 * Di, d);
        bf16(p + "attn.indexer.compressor.wgate.weight", 2 * Di, d);
        f32(p + "attn.indexer.compressor.ape", {m, 2 * Di}, 0, 0.5f);
        f32(p + "attn.indexer.compressor.norm.weight", {Di}, 1, 0.1f);
      }
    }
    bf16(p + "ffn.gate.weight", E, d);
    if (l < nhash) {
      Tensor t = Tensor::Zeros(DType::kI64, {V, K});
      for (int64_t v = 0; v < V; ++v)
        for (int64_t k = 0; k < K; ++k) t.mutable_data<int64_t>()[v * K + k] = (v * 7 + k * 13) % E;
      ts.emplace_back(p + "ffn.gate.tid2eid", t);
    } else {
      f32(p + "ffn.gate.bias", {E}, 0, 0.1f);
    }
    for (int64_t e = 0; e < E; ++e) {
      const std::string x = p + "ffn.experts." + std::to_string(e) + ".";
      mxfp4(x + "w1", I, d);
      mxfp4(x + "w3", I, d);
      mxfp4(x + "w2", d, I);
    }
    bf16(p + "ffn.shared_experts.w1.weight", I, d);
    bf16(p + "ffn.shared_experts.w3.weight", I, d);
    bf16(p + "ffn.shared_experts.w2.weight", d, I);
  }
  auto s = io::WriteSafetensors(dir + "/model.safetensors", ts);
  if (!s.ok()) std::fprintf(stderr, "%s\n", s.ToString().c_str());
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
  WriteRandomCheckpoint(dir, LargeConfig());
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
