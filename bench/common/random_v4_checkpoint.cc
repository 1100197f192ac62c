// See random_v4_checkpoint.h.
#include "bench/common/random_v4_checkpoint.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "model/io/safetensors.h"
#include "model/tensor/dtype.h"
#include "model/tensor/tensor.h"

namespace retort::bench {

absl::Status WriteRandomV4Checkpoint(const std::string& dir, const nlohmann::json& cfg, RandomWeights kind) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": ", ec.message()));
  std::ofstream(dir + "/config.json") << cfg.dump(1);
  std::mt19937_64 rng(42);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<std::pair<std::string, Tensor>> ts;
  const bool trainable = kind == RandomWeights::kTrainable;
  // Dense matrices: N(0, 1/in), bf16 (deployment) or f32 (trainable).
  auto bf16 = [&](const std::string& n, int64_t o, int64_t i) {
    if (trainable) {
      Tensor t = Tensor::Zeros(DType::kF32, {o, i});
      const float s = 1.0f / std::sqrt(static_cast<float>(i));
      for (int64_t k = 0; k < o * i; ++k) t.mutable_data<float>()[k] = nd(rng) * s;
      ts.emplace_back(n, t);
      return;
    }
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
  // Routed experts: packed MXFP4 (deployment) or f32 masters (trainable).
  auto mxfp4 = [&](const std::string& n, int64_t o, int64_t i) {
    if (trainable) {
      bf16(n + ".weight", o, i);
      return;
    }
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
  return io::WriteSafetensors(dir + "/model.safetensors", ts);
}


}  // namespace retort::bench
