// HfTensors: a Model's weights under the transformers names (see train.h).
// The names mirror what loader.cc resolves as the HF candidate of each weight
// and what train.cc keys gradients by, so Load(save(HfTensors(m))) == m.
// ReleasedTensors: the same weights under DeepSeek's released names and
// formats (FP8 / MXFP4 / BF16 / F32, V4_SPEC.md §4), which loader.cc reads too.
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "model/base/logging.h"
#include "model/base/status_macros.h"
#include "model/kernels/cpu/cpu_kernels.h"
#include "model/v4/train.h"

namespace retort::v4 {
namespace {

class Exporter {
 public:
  explicit Exporter(std::vector<NamedTensor>* out) : out_(out) {}
  void Add(const std::string& name, const Tensor& t, bool trainable = true) {
    out_->push_back({name, t.Clone(), trainable});
  }
  void Add(const std::string& name, const Linear& l, bool trainable = true) {
    out_->push_back({name, l.weight.Reshape({l.out, l.in}).Clone(), trainable});
  }
  void Hc(const std::string& prefix, const HyperConnection& h, bool head) {
    Add(prefix + (head ? "hc_fn" : "fn"), h.fn);
    Add(prefix + (head ? "hc_base" : "base"), h.base);
    Add(prefix + (head ? "hc_scale" : "scale"), h.scale);
  }
  void Comp(const std::string& prefix, const Compressor& k, bool trainable) {
    Add(prefix + "kv_proj.weight", k.wkv, trainable);
    Add(prefix + "gate_proj.weight", k.wgate, trainable);
    Add(prefix + "position_bias", k.ape, trainable);
    Add(prefix + "kv_norm.weight", k.norm, trainable);
  }

 private:
  std::vector<NamedTensor>* out_;
};

}  // namespace

absl::StatusOr<std::vector<NamedTensor>> HfTensors(const Model& model) {
  const auto& c = model.config();
  const Weights& W = model.weights();
  std::vector<NamedTensor> out;
  Exporter x(&out);
  x.Add("model.embed_tokens.weight", W.embed);
  for (int l = 0; l < c.num_layers; ++l) {
    const Layer& L = W.layers[l];
    const std::string h = absl::StrCat("model.layers.", l, ".");
    x.Hc(h + "attn_hc.", L.attn_hc, false);
    x.Hc(h + "ffn_hc.", L.ffn_hc, false);
    x.Add(h + "input_layernorm.weight", L.attn_norm);
    x.Add(h + "post_attention_layernorm.weight", L.ffn_norm);
    const Attention& a = L.attn;
    const std::string ha = h + "self_attn.";
    x.Add(ha + "q_a_proj.weight", a.wq_a);
    x.Add(ha + "q_a_norm.weight", a.q_norm);
    x.Add(ha + "q_b_proj.weight", a.wq_b);
    x.Add(ha + "kv_proj.weight", a.wkv);
    x.Add(ha + "kv_norm.weight", a.kv_norm);
    x.Add(ha + "o_a_proj.weight", a.wo_a);
    x.Add(ha + "o_b_proj.weight", a.wo_b);
    x.Add(ha + "sinks", a.sinks);
    if (a.kind != io::AttentionKind::kSliding) {
      x.Comp(ha + "compressor.", a.compressor, true);
      if (a.kind == io::AttentionKind::kCsa) {
        // The lightning indexer's top-k passes no gradient: kept, not trained.
        const std::string hi = ha + "compressor.indexer.";
        x.Add(hi + "q_b_proj.weight", a.indexer.wq_b, false);
        x.Add(hi + "scorer.weights_proj.weight", a.indexer.weights_proj, false);
        x.Comp(hi, a.indexer.compressor, false);
      }
    }
    const Moe& m = L.moe;
    const std::string hm = h + "mlp.";
    x.Add(hm + "gate.weight", m.gate);
    if (m.hash_routed)
      x.Add(hm + "gate.tid2eid", m.tid2eid, false);
    else
      x.Add(hm + "gate.e_score_correction_bias", m.bias, false);
    const int64_t E = c.n_routed_experts, I = c.moe_intermediate, d = c.hidden_size;
    Tensor gu = Tensor::Zeros(DType::kF32, {E, 2 * I, d}),
           down = Tensor::Zeros(DType::kF32, {E, d, I});
    // MXFP4-packed experts (released FP4 checkpoints) decode exactly to fp32:
    // they become the masters QAT trains.
    auto put = [](const Linear& lin, float* dst) {
      if (lin.mxfp4)
        cpu::DequantizeMxFp4(lin.weight.raw(), lin.scales.raw(), lin.out, lin.in, dst);
      else
        std::memcpy(dst, lin.weight.data<float>(), lin.out * lin.in * sizeof(float));
    };
    for (int64_t e = 0; e < E; ++e) {
      const Expert& ex = m.experts[e];
      put(ex.w1, gu.mutable_data<float>() + e * 2 * I * d);
      put(ex.w3, gu.mutable_data<float>() + (e * 2 * I + I) * d);
      put(ex.w2, down.mutable_data<float>() + e * d * I);
    }
    out.push_back({hm + "experts.gate_up_proj", gu, true});
    out.push_back({hm + "experts.down_proj", down, true});
    if (m.has_shared) {
      x.Add(hm + "shared_experts.gate_proj.weight", m.shared.w1);
      x.Add(hm + "shared_experts.up_proj.weight", m.shared.w3);
      x.Add(hm + "shared_experts.down_proj.weight", m.shared.w2);
    }
  }
  x.Hc("model.hc_head.", W.hc_head, true);
  x.Add("model.norm.weight", W.norm);
  // A tied head is the embedding: it has no tensor of its own.
  if (!c.tie_word_embeddings || W.head.weight.raw() != W.embed.raw())
    x.Add("lm_head.weight", W.head);
  return out;
}

}  // namespace retort::v4

namespace retort::v4 {

absl::StatusOr<std::vector<std::pair<std::string, Tensor>>> LossAndGradientTensors(
    const Model& model, const Tensor& input_ids) {
  if ((input_ids.dtype() != DType::kI64 && input_ids.dtype() != DType::kI32) ||
      input_ids.rank() != 2)
    return absl::InvalidArgumentError(
        absl::StrCat("input_ids must be int64 [B, T], got ", input_ids.DebugString()));
  const int64_t B = input_ids.dim(0), T = input_ids.dim(1);
  std::vector<int64_t> tokens(B * T);
  for (int64_t i = 0; i < B * T; ++i)
    tokens[i] = input_ids.dtype() == DType::kI64 ? input_ids.data<int64_t>()[i]
                                                 : input_ids.data<int32_t>()[i];
  ASSIGN_OR_RETURN(std::vector<NamedTensor> params, HfTensors(model));
  Gradients grads;
  ASSIGN_OR_RETURN(float loss, NextTokenLossAndGradients(model, tokens, B, T, &grads));
  std::vector<std::pair<std::string, Tensor>> out;
  out.emplace_back("loss", Tensor::FromF32({loss}, {}));
  for (const NamedTensor& p : params) {
    if (!p.trainable) continue;
    Tensor g = Tensor::Zeros(DType::kF32, p.value.shape());
    auto it = grads.by_name.find(p.name);
    if (it != grads.by_name.end()) {
      CHECK_EQ(static_cast<int64_t>(it->second.size()), g.numel()) << p.name;
      std::memcpy(g.mutable_data<float>(), it->second.data(), it->second.size() * sizeof(float));
    }
    out.emplace_back("grad." + p.name, std::move(g));
  }
  // A tied head's gradient belongs to the embedding.
  if (auto it = grads.by_name.find("lm_head.weight");
      it != grads.by_name.end() && model.config().tie_word_embeddings) {
    for (auto& [name, g] : out)
      if (name == "grad.model.embed_tokens.weight" &&
          g.numel() == static_cast<int64_t>(it->second.size()))
        for (int64_t i = 0; i < g.numel(); ++i) g.mutable_data<float>()[i] += it->second[i];
  }
  return out;
}

}  // namespace retort::v4

namespace retort::v4 {
namespace {

enum class ReleasedFormat : uint8_t { kF32, kBf16, kFp8, kI64 };

struct ReleasedSpelling {
  const char* name;
  ReleasedFormat format;
};

// HF name (without "model." / "model.layers.N.") -> released name and format,
// per V4_SPEC.md §4: FP8 for the attention and shared-expert matrices and the
// indexer's wq_b; BF16 for embed, head, norms, compressors, weights_proj and
// the router; F32 for sinks, mHC, ape and the router bias; I64 for tid2eid.
const std::map<std::string, ReleasedSpelling>& LayerSpellings() {
  using F = ReleasedFormat;
  static const auto* kMap = new std::map<std::string, ReleasedSpelling>{
      {"attn_hc.fn", {"hc_attn_fn", F::kF32}},
      {"attn_hc.base", {"hc_attn_base", F::kF32}},
      {"attn_hc.scale", {"hc_attn_scale", F::kF32}},
      {"ffn_hc.fn", {"hc_ffn_fn", F::kF32}},
      {"ffn_hc.base", {"hc_ffn_base", F::kF32}},
      {"ffn_hc.scale", {"hc_ffn_scale", F::kF32}},
      {"input_layernorm.weight", {"attn_norm.weight", F::kBf16}},
      {"post_attention_layernorm.weight", {"ffn_norm.weight", F::kBf16}},
      {"self_attn.q_a_proj.weight", {"attn.wq_a.weight", F::kFp8}},
      {"self_attn.q_a_norm.weight", {"attn.q_norm.weight", F::kBf16}},
      {"self_attn.q_b_proj.weight", {"attn.wq_b.weight", F::kFp8}},
      {"self_attn.kv_proj.weight", {"attn.wkv.weight", F::kFp8}},
      {"self_attn.kv_norm.weight", {"attn.kv_norm.weight", F::kBf16}},
      {"self_attn.o_a_proj.weight", {"attn.wo_a.weight", F::kFp8}},
      {"self_attn.o_b_proj.weight", {"attn.wo_b.weight", F::kFp8}},
      {"self_attn.sinks", {"attn.attn_sink", F::kF32}},
      {"self_attn.compressor.kv_proj.weight", {"attn.compressor.wkv.weight", F::kBf16}},
      {"self_attn.compressor.gate_proj.weight", {"attn.compressor.wgate.weight", F::kBf16}},
      {"self_attn.compressor.position_bias", {"attn.compressor.ape", F::kF32}},
      {"self_attn.compressor.kv_norm.weight", {"attn.compressor.norm.weight", F::kBf16}},
      {"self_attn.compressor.indexer.kv_proj.weight",
       {"attn.indexer.compressor.wkv.weight", F::kBf16}},
      {"self_attn.compressor.indexer.gate_proj.weight",
       {"attn.indexer.compressor.wgate.weight", F::kBf16}},
      {"self_attn.compressor.indexer.position_bias", {"attn.indexer.compressor.ape", F::kF32}},
      {"self_attn.compressor.indexer.kv_norm.weight",
       {"attn.indexer.compressor.norm.weight", F::kBf16}},
      {"self_attn.compressor.indexer.q_b_proj.weight", {"attn.indexer.wq_b.weight", F::kFp8}},
      {"self_attn.compressor.indexer.scorer.weights_proj.weight",
       {"attn.indexer.weights_proj.weight", F::kBf16}},
      {"mlp.gate.weight", {"ffn.gate.weight", F::kBf16}},
      {"mlp.gate.e_score_correction_bias", {"ffn.gate.bias", F::kF32}},
      {"mlp.gate.tid2eid", {"ffn.gate.tid2eid", F::kI64}},
      {"mlp.shared_experts.gate_proj.weight", {"ffn.shared_experts.w1.weight", F::kFp8}},
      {"mlp.shared_experts.up_proj.weight", {"ffn.shared_experts.w3.weight", F::kFp8}},
      {"mlp.shared_experts.down_proj.weight", {"ffn.shared_experts.w2.weight", F::kFp8}},
  };
  return *kMap;
}

const std::map<std::string, ReleasedSpelling>& TopSpellings() {
  using F = ReleasedFormat;
  static const auto* kMap = new std::map<std::string, ReleasedSpelling>{
      {"model.embed_tokens.weight", {"embed.weight", F::kBf16}},
      {"lm_head.weight", {"head.weight", F::kBf16}},
      {"model.norm.weight", {"norm.weight", F::kBf16}},
      {"model.hc_head.hc_fn", {"hc_head_fn", F::kF32}},
      {"model.hc_head.hc_base", {"hc_head_base", F::kF32}},
      {"model.hc_head.hc_scale", {"hc_head_scale", F::kF32}},
  };
  return *kMap;
}

// "layers.3.attn.wq_a.weight" -> "layers.3.attn.wq_a.scale" (the loader's ScaleName).
std::string ScaleNameOf(const std::string& weight) {
  const std::string suffix = ".weight";
  if (weight.size() > suffix.size() && weight.ends_with(suffix))
    return weight.substr(0, weight.size() - suffix.size()) + ".scale";
  return weight + ".scale";
}

using Out = std::vector<std::pair<std::string, Tensor>>;

absl::Status Emit(const std::string& hf, const std::string& name, ReleasedFormat format,
                  const Tensor& t, Out& out) {
  switch (format) {
    case ReleasedFormat::kI64:
      if (t.dtype() != DType::kI64)
        return absl::InvalidArgumentError(
            absl::StrCat("'", hf, "' must be i64, got ", t.DebugString()));
      out.emplace_back(name, t);
      return absl::OkStatus();
    case ReleasedFormat::kF32:
    case ReleasedFormat::kBf16:
    case ReleasedFormat::kFp8:
      break;
  }
  if (t.dtype() != DType::kF32)
    return absl::InvalidArgumentError(
        absl::StrCat("'", hf, "' must be f32 (the trainer's parameters), got ", t.DebugString()));
  const int64_t n = t.numel();
  const float* x = t.data<float>();
  switch (format) {
    case ReleasedFormat::kF32:
      out.emplace_back(name, t);
      break;
    case ReleasedFormat::kBf16: {
      Tensor b = Tensor::Zeros(DType::kBF16, t.shape());
      for (int64_t i = 0; i < n; ++i) b.mutable_data<uint16_t>()[i] = F32ToBf16(x[i]);
      out.emplace_back(name, std::move(b));
      break;
    }
    case ReleasedFormat::kFp8: {
      if (t.rank() != 2)
        return absl::InvalidArgumentError(
            absl::StrCat("'", hf, "' must be 2-D for FP8, got ", t.DebugString()));
      const int64_t rows = t.dim(0), cols = t.dim(1);
      Tensor codes = Tensor::Zeros(DType::kF8E4M3, {rows, cols});
      Tensor scales = Tensor::Zeros(DType::kE8M0, {(rows + 127) / 128, (cols + 127) / 128});
      cpu::QuantizeFp8Blocks(x, rows, cols, codes.mutable_raw(), scales.mutable_raw());
      out.emplace_back(name, std::move(codes));
      out.emplace_back(ScaleNameOf(name), std::move(scales));
      break;
    }
    case ReleasedFormat::kI64:
      break;  // returned above
  }
  return absl::OkStatus();
}

// One expert matrix [out, in] (a view into the fused tensor) -> MXFP4 codes + scales.
absl::Status EmitMxFp4(const std::string& hf, const std::string& name, const float* w, int64_t rows,
                       int64_t cols, Out& out) {
  if (cols % 32 != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("'", hf, "': MXFP4 needs rows of a multiple of 32 values, ", name, " has ",
                     cols, " (the released layout cannot hold this model's experts)"));
  Tensor codes = Tensor::Zeros(DType::kI8, {rows, cols / 2});
  Tensor scales = Tensor::Zeros(DType::kE8M0, {rows, cols / 32});
  cpu::QuantizeMxFp4(w, rows, cols, codes.mutable_raw(), scales.mutable_raw());
  out.emplace_back(name, std::move(codes));
  out.emplace_back(ScaleNameOf(name), std::move(scales));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<std::pair<std::string, Tensor>>> ReleasedTensors(
    absl::Span<const std::pair<std::string, Tensor>> hf) {
  Out out;
  for (const auto& [name, t] : hf) {
    if (auto it = TopSpellings().find(name); it != TopSpellings().end()) {
      RETURN_IF_ERROR(Emit(name, it->second.name, it->second.format, t, out));
      continue;
    }
    // model.layers.<N>.<rest>
    const std::string prefix = "model.layers.";
    const size_t dot = name.find('.', prefix.size());
    if (!name.starts_with(prefix) || dot == std::string::npos)
      return absl::InvalidArgumentError(
          absl::StrCat("'", name, "' has no released-layout spelling"));
    const std::string layer = name.substr(prefix.size(), dot - prefix.size());
    const std::string rest = name.substr(dot + 1), rel = absl::StrCat("layers.", layer, ".");
    if (rest == "mlp.experts.gate_up_proj" || rest == "mlp.experts.down_proj") {
      if (t.dtype() != DType::kF32 || t.rank() != 3)
        return absl::InvalidArgumentError(
            absl::StrCat("'", name, "' must be f32 [E, rows, cols], got ", t.DebugString()));
      const int64_t E = t.dim(0), rows = t.dim(1), cols = t.dim(2);
      for (int64_t e = 0; e < E; ++e) {
        const float* w = t.data<float>() + e * rows * cols;
        const std::string ex = absl::StrCat(rel, "ffn.experts.", e, ".");
        if (rest == "mlp.experts.down_proj") {
          RETURN_IF_ERROR(EmitMxFp4(name, ex + "w2.weight", w, rows, cols, out));
        } else {  // [2I, d]: gate (w1) rows first, then up (w3)
          RETURN_IF_ERROR(EmitMxFp4(name, ex + "w1.weight", w, rows / 2, cols, out));
          RETURN_IF_ERROR(
              EmitMxFp4(name, ex + "w3.weight", w + (rows / 2) * cols, rows / 2, cols, out));
        }
      }
      continue;
    }
    auto it = LayerSpellings().find(rest);
    if (it == LayerSpellings().end())
      return absl::InvalidArgumentError(
          absl::StrCat("'", name, "' has no released-layout spelling"));
    RETURN_IF_ERROR(Emit(name, rel + it->second.name, it->second.format, t, out));
  }
  return out;
}

}  // namespace retort::v4
