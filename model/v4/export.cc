// HfTensors: a Model's weights under the transformers names (see train.h).
// The names mirror what loader.cc resolves as the HF candidate of each weight
// and what train.cc keys gradients by, so Load(save(HfTensors(m))) == m.
#include <cstring>

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
