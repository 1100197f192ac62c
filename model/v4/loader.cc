// Model::Load: config.json + safetensors (HF or released layout) -> Weights.
//
// Every weight is looked up under its released name (DeepSeek's repositories),
// the same with the "model." prefix (what transformers' save_pretrained
// writes), and its transformers module name (V4_SPEC.md's table). FP8 e4m3
// matrices with 128x128 E8M0 (or fp32) block scales and BF16 tensors become
// f32 at load; MXFP4 experts stay packed (zero-copy views of the mapping).
#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/base/status_macros.h"
#include "model/io/safetensors.h"
#include "model/kernels/cpu/cpu_kernels.h"
#include "model/v4/model.h"

namespace retort::v4 {
namespace {

using io::AttentionKind;
using io::Checkpoint;
using io::TensorSource;
using io::V4Config;

class WeightLoader {
 public:
  WeightLoader(const TensorSource& ckpt, const V4Config& cfg) : ckpt_(ckpt), cfg_(cfg) {}

  // The first candidate name the checkpoint has.
  absl::StatusOr<std::string> Resolve(const std::vector<std::string>& names) const {
    for (const auto& n : names)
      if (ckpt_.Has(n)) return n;
    return absl::NotFoundError(absl::StrCat(ckpt_.Describe(), ": missing tensor '", names[0], "' (also looked for: ",
                                            absl::StrJoin(names.begin() + 1, names.end(), ", "), ")"));
  }

  std::string FileOf(const std::string& name) const { return ckpt_.FileOf(name); }

  static std::vector<std::string> Names(const std::string& released, const std::string& hf,
                                        std::vector<std::string> aliases = {}) {
    std::vector<std::string> v = {released, "model." + released, hf};
    for (auto& a : aliases) v.push_back(std::move(a));
    return v;
  }

  absl::Status CheckShape(const std::string& name, const Shape& got, const Shape& want) const {
    if (got == want) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(ckpt_.FileOf(name), ": tensor '", name, "' has shape ",
                                                   ShapeString(got), ", expected ", ShapeString(want)));
  }

  // A tensor converted to f32 (zero-copy when already f32). FP8 needs `<base>.scale`.
  absl::StatusOr<Tensor> F32(const std::vector<std::string>& names, const Shape& shape) {
    ASSIGN_OR_RETURN(std::string name, Resolve(names));
    ASSIGN_OR_RETURN(Tensor t, ckpt_.Get(name));
    used_.insert(name);
    RETURN_IF_ERROR(CheckShape(name, t.shape(), shape));
    switch (t.dtype()) {
      case DType::kF32: return t;
      case DType::kBF16:
      case DType::kF16: return t.ToF32();
      case DType::kF8E4M3: return DequantFp8(name, t);
      default:
        return absl::InvalidArgumentError(absl::StrCat(ckpt_.FileOf(name), ": tensor '", name, "' has dtype ",
                                                       std::string(DTypeName(t.dtype())),
                                                       ", expected f32, bf16, f16 or f8_e4m3"));
    }
  }

  absl::StatusOr<Linear> Dense(const std::vector<std::string>& names, int64_t out, int64_t in) {
    Linear l;
    l.out = out;
    l.in = in;
    ASSIGN_OR_RETURN(std::string name, Resolve(names));
    ASSIGN_OR_RETURN(io::TensorEntry e, ckpt_.Entry(name));
    l.fp8 = e.dtype == DType::kF8E4M3;
    ASSIGN_OR_RETURN(l.weight, F32(names, {out, in}));
    return l;
  }

  // An expert matrix: MXFP4 (I8/U8 codes + E8M0 scales) kept packed, else dense.
  absl::StatusOr<Linear> ExpertMatrix(const std::vector<std::string>& names, int64_t out, int64_t in) {
    ASSIGN_OR_RETURN(std::string name, Resolve(names));
    ASSIGN_OR_RETURN(io::TensorEntry e, ckpt_.Entry(name));
    if (e.dtype != DType::kI8 && e.dtype != DType::kU8) return Dense(names, out, in);
    used_.insert(name);
    Linear l;
    l.out = out;
    l.in = in;
    l.mxfp4 = true;
    if (in % 32)
      return absl::InvalidArgumentError(absl::StrCat(ckpt_.FileOf(name), ": MXFP4 tensor '", name,
                                                     "' needs an input width divisible by 32, got ", in));
    RETURN_IF_ERROR(CheckShape(name, e.shape, {out, in / 2}));
    ASSIGN_OR_RETURN(Tensor codes, ckpt_.Get(name));
    l.weight = codes;
    const std::string scale_name = ScaleName(name);
    ASSIGN_OR_RETURN(Tensor s, ckpt_.Get(scale_name));
    used_.insert(scale_name);
    RETURN_IF_ERROR(CheckShape(scale_name, s.shape(), {out, in / 32}));
    if (s.dtype() != DType::kE8M0)
      return absl::InvalidArgumentError(absl::StrCat(ckpt_.FileOf(scale_name), ": MXFP4 scale '", scale_name,
                                                     "' must be F8_E8M0, got ", std::string(DTypeName(s.dtype()))));
    l.scales = s;
    return l;
  }

  absl::StatusOr<Tensor> I64(const std::vector<std::string>& names, const Shape& shape) {
    ASSIGN_OR_RETURN(std::string name, Resolve(names));
    ASSIGN_OR_RETURN(Tensor t, ckpt_.Get(name));
    used_.insert(name);
    RETURN_IF_ERROR(CheckShape(name, t.shape(), shape));
    if (t.dtype() == DType::kI64) return t;
    if (t.dtype() == DType::kI32) {
      Tensor o = Tensor::Zeros(DType::kI64, shape);
      for (int64_t i = 0; i < t.numel(); ++i) o.mutable_data<int64_t>()[i] = t.data<int32_t>()[i];
      return o;
    }
    return absl::InvalidArgumentError(absl::StrCat(ckpt_.FileOf(name), ": tensor '", name, "' must be I64"));
  }

  // Fails on any checkpoint tensor nothing consumed (MTP weights are skipped:
  // retort does not run the MTP block yet).
  absl::Status CheckAllUsed() const {
    for (const auto& n : ckpt_.TensorNames()) {
      if (used_.count(n) || n.rfind("mtp.", 0) == 0 || n.rfind("model.mtp.", 0) == 0) continue;
      return absl::InvalidArgumentError(absl::StrCat(ckpt_.FileOf(n), ": unexpected tensor '", n,
                                                     "' (not part of this config's model)"));
    }
    return absl::OkStatus();
  }

 private:
  static std::string ScaleName(const std::string& weight_name) {
    const std::string suffix = ".weight";
    if (weight_name.size() > suffix.size() &&
        weight_name.compare(weight_name.size() - suffix.size(), suffix.size(), suffix) == 0)
      return weight_name.substr(0, weight_name.size() - suffix.size()) + ".scale";
    return weight_name + ".scale";
  }

  absl::StatusOr<Tensor> DequantFp8(const std::string& name, const Tensor& t) {
    if (t.rank() != 2)
      return absl::InvalidArgumentError(absl::StrCat(ckpt_.FileOf(name), ": FP8 tensor '", name, "' must be 2-D"));
    const std::string sname = ScaleName(name);
    if (!ckpt_.Has(sname))
      return absl::NotFoundError(absl::StrCat(ckpt_.FileOf(name), ": FP8 tensor '", name, "' has no scale '", sname, "'"));
    ASSIGN_OR_RETURN(Tensor s, ckpt_.Get(sname));
    used_.insert(sname);
    const int64_t rows = t.dim(0), cols = t.dim(1);
    RETURN_IF_ERROR(CheckShape(sname, s.shape(), {(rows + 127) / 128, (cols + 127) / 128}));
    Tensor out = Tensor::Zeros(DType::kF32, {rows, cols});
    if (s.dtype() == DType::kE8M0) {
      cpu::DequantizeFp8Blocks(t.raw(), s.raw(), rows, cols, out.mutable_data<float>());
    } else if (s.dtype() == DType::kF32) {  // Base checkpoints: fp32 block scales
      const int64_t sc = (cols + 127) / 128;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          out.mutable_data<float>()[r * cols + c] = E4M3ToF32(t.raw()[r * cols + c]) * s.data<float>()[(r / 128) * sc + c / 128];
    } else {
      return absl::InvalidArgumentError(absl::StrCat(ckpt_.FileOf(sname), ": FP8 scale '", sname,
                                                     "' must be F8_E8M0 or F32"));
    }
    const int64_t n = out.numel();
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(out.data<float>()[i]))
        return absl::DataLossError(absl::StrCat(ckpt_.FileOf(name), ": FP8 tensor '", name,
                                                "' decodes to a non-finite value (NaN code or scale)"));
    return out;
  }

  const TensorSource& ckpt_;
  const V4Config& cfg_;
  std::set<std::string> used_;
};

absl::StatusOr<HyperConnection> LoadHc(WeightLoader& L, const std::string& rel_prefix, const std::string& hf_prefix,
                                       int64_t mix, int64_t width, int64_t nscale, bool head) {
  HyperConnection h;
  const std::string fn = head ? "hc_fn" : "fn", base = head ? "hc_base" : "base", scale = head ? "hc_scale" : "scale";
  ASSIGN_OR_RETURN(h.fn, L.F32(WeightLoader::Names(rel_prefix + "fn", hf_prefix + fn), {mix, width}));
  ASSIGN_OR_RETURN(h.base, L.F32(WeightLoader::Names(rel_prefix + "base", hf_prefix + base), {mix}));
  ASSIGN_OR_RETURN(h.scale, L.F32(WeightLoader::Names(rel_prefix + "scale", hf_prefix + scale), {nscale}));
  return h;
}

absl::StatusOr<Compressor> LoadCompressor(WeightLoader& L, const V4Config& c, const std::string& rel,
                                          const std::string& hf, int ratio, int64_t dim, bool overlap) {
  Compressor k;
  k.ratio = ratio;
  k.dim = dim;
  k.overlap = overlap;
  const int64_t w = (overlap ? 2 : 1) * dim;
  ASSIGN_OR_RETURN(k.wkv, L.Dense(WeightLoader::Names(rel + "wkv.weight", hf + "kv_proj.weight"), w, c.hidden_size));
  ASSIGN_OR_RETURN(k.wgate, L.Dense(WeightLoader::Names(rel + "wgate.weight", hf + "gate_proj.weight"), w, c.hidden_size));
  ASSIGN_OR_RETURN(k.ape, L.F32(WeightLoader::Names(rel + "ape", hf + "position_bias"), {ratio, w}));
  ASSIGN_OR_RETURN(k.norm, L.F32(WeightLoader::Names(rel + "norm.weight", hf + "kv_norm.weight"), {dim}));
  return k;
}

absl::StatusOr<Layer> LoadLayer(WeightLoader& L, const V4Config& c, int l) {
  Layer layer;
  const std::string r = absl::StrCat("layers.", l, ".");
  const std::string h = absl::StrCat("model.layers.", l, ".");
  const int64_t d = c.hidden_size, D = c.head_dim, H = c.num_heads, hc = c.hc_mult;
  ASSIGN_OR_RETURN(layer.attn_hc, LoadHc(L, r + "hc_attn_", h + "attn_hc.", (2 + hc) * hc, hc * d, 3, false));
  ASSIGN_OR_RETURN(layer.ffn_hc, LoadHc(L, r + "hc_ffn_", h + "ffn_hc.", (2 + hc) * hc, hc * d, 3, false));
  ASSIGN_OR_RETURN(layer.attn_norm, L.F32(WeightLoader::Names(r + "attn_norm.weight", h + "input_layernorm.weight"), {d}));
  ASSIGN_OR_RETURN(layer.ffn_norm,
                   L.F32(WeightLoader::Names(r + "ffn_norm.weight", h + "post_attention_layernorm.weight"), {d}));

  Attention& a = layer.attn;
  a.kind = c.attention[l];
  const std::string ra = r + "attn.", ha = h + "self_attn.";
  ASSIGN_OR_RETURN(a.wq_a, L.Dense(WeightLoader::Names(ra + "wq_a.weight", ha + "q_a_proj.weight"), c.q_lora_rank, d));
  ASSIGN_OR_RETURN(a.q_norm, L.F32(WeightLoader::Names(ra + "q_norm.weight", ha + "q_a_norm.weight"), {c.q_lora_rank}));
  ASSIGN_OR_RETURN(a.wq_b, L.Dense(WeightLoader::Names(ra + "wq_b.weight", ha + "q_b_proj.weight"), H * D, c.q_lora_rank));
  ASSIGN_OR_RETURN(a.wkv, L.Dense(WeightLoader::Names(ra + "wkv.weight", ha + "kv_proj.weight"), D, d));
  // transformers 5.17's save_pretrained writes the KV norm as "attn.norm".
  ASSIGN_OR_RETURN(a.kv_norm, L.F32(WeightLoader::Names(ra + "kv_norm.weight", ha + "kv_norm.weight",
                                                        {h + "attn.norm.weight"}),
                                    {D}));
  const int64_t per_group = H * D / c.o_groups;
  ASSIGN_OR_RETURN(a.wo_a, L.Dense(WeightLoader::Names(ra + "wo_a.weight", ha + "o_a_proj.weight"),
                                   c.o_groups * c.o_lora_rank, per_group));
  ASSIGN_OR_RETURN(a.wo_b, L.Dense(WeightLoader::Names(ra + "wo_b.weight", ha + "o_b_proj.weight"), d,
                                   c.o_groups * c.o_lora_rank));
  ASSIGN_OR_RETURN(a.sinks, L.F32(WeightLoader::Names(ra + "attn_sink", ha + "sinks"), {H}));
  if (a.kind != AttentionKind::kSliding) {
    const bool csa = a.kind == AttentionKind::kCsa;
    ASSIGN_OR_RETURN(a.compressor, LoadCompressor(L, c, ra + "compressor.", ha + "compressor.", c.compress_ratio[l], D, csa));
    if (csa) {
      const std::string ri = ra + "indexer.", hi = ha + "compressor.indexer.";
      ASSIGN_OR_RETURN(a.indexer.wq_b, L.Dense(WeightLoader::Names(ri + "wq_b.weight", hi + "q_b_proj.weight"),
                                               c.index_n_heads * c.index_head_dim, c.q_lora_rank));
      ASSIGN_OR_RETURN(a.indexer.weights_proj,
                       L.Dense(WeightLoader::Names(ri + "weights_proj.weight", hi + "scorer.weights_proj.weight"),
                               c.index_n_heads, d));
      ASSIGN_OR_RETURN(a.indexer.compressor, LoadCompressor(L, c, ri + "compressor.", hi, c.compress_ratio[l],
                                                            c.index_head_dim, true));
    }
  }

  Moe& m = layer.moe;
  m.hash_routed = c.hash_routed[l];
  const std::string rf = r + "ffn.", hm = h + "mlp.";
  const int64_t E = c.n_routed_experts, I = c.moe_intermediate;
  ASSIGN_OR_RETURN(m.gate, L.F32(WeightLoader::Names(rf + "gate.weight", hm + "gate.weight"), {E, d}));
  if (m.hash_routed) {
    ASSIGN_OR_RETURN(const std::string tid2eid,
                     L.Resolve(WeightLoader::Names(rf + "gate.tid2eid", hm + "gate.tid2eid")));
    ASSIGN_OR_RETURN(m.tid2eid, L.I64({tid2eid}, {c.vocab_size, c.experts_per_token}));
    const int64_t n = m.tid2eid.numel();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t e = m.tid2eid.data<int64_t>()[i];
      if (e < 0 || e >= E)
        return absl::InvalidArgumentError(absl::StrCat(L.FileOf(tid2eid), ": tensor '", tid2eid, "' entry ", i,
                                                       " names expert ", e, ", outside 0..", E - 1));
    }
  } else {
    ASSIGN_OR_RETURN(m.bias, L.F32(WeightLoader::Names(rf + "gate.bias", hm + "gate.e_score_correction_bias"), {E}));
  }
  const std::string fused_gu = hm + "experts.gate_up_proj", fused_down = hm + "experts.down_proj";
  Tensor gate_up, down;
  bool fused = false;
  {
    auto name = L.Resolve({fused_gu});
    if (name.ok()) {
      fused = true;
      ASSIGN_OR_RETURN(gate_up, L.F32({fused_gu}, {E, 2 * I, d}));
      ASSIGN_OR_RETURN(down, L.F32({fused_down}, {E, d, I}));
    }
  }
  m.experts.resize(E);
  for (int64_t e = 0; e < E; ++e) {
    Expert& x = m.experts[e];
    if (fused) {
      auto view = [](const Tensor& t, int64_t begin, int64_t rows, int64_t cols) {
        Linear lin;
        lin.out = rows;
        lin.in = cols;
        lin.weight = t.Reshape({t.numel() / cols, cols}).Slice(begin, begin + rows);
        return lin;
      };
      x.w1 = view(gate_up, e * 2 * I, I, d);
      x.w3 = view(gate_up, e * 2 * I + I, I, d);
      x.w2 = view(down, e * d, d, I);
      continue;
    }
    const std::string re = absl::StrCat(rf, "experts.", e, ".");
    ASSIGN_OR_RETURN(x.w1, L.ExpertMatrix({re + "w1.weight", "model." + re + "w1.weight"}, I, d));
    ASSIGN_OR_RETURN(x.w3, L.ExpertMatrix({re + "w3.weight", "model." + re + "w3.weight"}, I, d));
    ASSIGN_OR_RETURN(x.w2, L.ExpertMatrix({re + "w2.weight", "model." + re + "w2.weight"}, d, I));
  }
  m.has_shared = c.n_shared_experts > 0;
  if (m.has_shared) {
    const std::string rs = rf + "shared_experts.", hs = hm + "shared_experts.";
    ASSIGN_OR_RETURN(m.shared.w1, L.Dense(WeightLoader::Names(rs + "w1.weight", hs + "gate_proj.weight"), I, d));
    ASSIGN_OR_RETURN(m.shared.w3, L.Dense(WeightLoader::Names(rs + "w3.weight", hs + "up_proj.weight"), I, d));
    ASSIGN_OR_RETURN(m.shared.w2, L.Dense(WeightLoader::Names(rs + "w2.weight", hs + "down_proj.weight"), d, I));
  }
  return layer;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir, Numerics numerics) {
  ASSIGN_OR_RETURN(io::V4Config cfg, io::LoadV4Config(dir));
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> ckpt, Checkpoint::Open(dir));
  return FromTensors(cfg, *ckpt, numerics);
}

absl::StatusOr<std::unique_ptr<Model>> Model::FromTensors(const io::V4Config& cfg, const io::TensorSource& source,
                                                          Numerics numerics) {
  if (numerics == Numerics::kDeployment)
    return absl::UnimplementedError("deployment numerics run on the CUDA backend; the CPU model computes exact numerics");
  std::unique_ptr<Model> model(new Model());
  model->config_ = cfg;
  model->numerics_ = numerics;
  WeightLoader L(source, cfg);
  Weights& w = model->weights_;
  const int64_t d = cfg.hidden_size, hc = cfg.hc_mult;
  ASSIGN_OR_RETURN(w.embed, L.F32(WeightLoader::Names("embed.weight", "model.embed_tokens.weight"), {cfg.vocab_size, d}));
  for (int l = 0; l < cfg.num_layers; ++l) {
    auto layer = LoadLayer(L, cfg, l);
    if (!layer.ok()) return Annotate(layer.status(), absl::StrCat("loading layer ", l));
    w.layers.push_back(std::move(layer).value());
  }
  ASSIGN_OR_RETURN(w.hc_head, LoadHc(L, "hc_head_", "model.hc_head.", hc, hc * d, 1, true));
  ASSIGN_OR_RETURN(w.norm, L.F32(WeightLoader::Names("norm.weight", "model.norm.weight"), {d}));
  if (cfg.tie_word_embeddings && !L.Resolve({"head.weight", "lm_head.weight"}).ok()) {
    w.head.out = cfg.vocab_size;
    w.head.in = d;
    w.head.weight = w.embed;
  } else {
    ASSIGN_OR_RETURN(w.head, L.Dense({"head.weight", "lm_head.weight", "model.head.weight"}, cfg.vocab_size, d));
  }
  RETURN_IF_ERROR(L.CheckAllUsed());
  model->inv_freq_[0] = RopeInverseFrequencies(cfg.main_rope, cfg.rope_dim);
  model->inv_freq_[1] = RopeInverseFrequencies(cfg.compress_rope, cfg.rope_dim);
  return model;
}

std::vector<float> RopeInverseFrequencies(const io::RopeConfig& rope, int64_t rope_dim) {
  const int64_t half = rope_dim / 2;
  std::vector<float> f(half);
  for (int64_t i = 0; i < half; ++i) {
    // As the reference: base ** (2i/dim) in fp32, then its reciprocal.
    const float pos_freq = std::pow(static_cast<float>(rope.theta), static_cast<float>(2 * i) / static_cast<float>(rope_dim));
    f[i] = 1.0f / pos_freq;
  }
  if (!rope.yarn) return f;
  auto corr = [&](double rot) {
    return rope_dim * std::log(rope.original_max_position / (rot * 2 * M_PI)) / (2 * std::log(rope.theta));
  };
  double lo = std::max(std::floor(corr(rope.beta_fast)), 0.0);
  double hi = std::min(std::ceil(corr(rope.beta_slow)), static_cast<double>(rope_dim - 1));
  if (lo == hi) hi += 0.001;
  for (int64_t i = 0; i < half; ++i) {
    const float ramp = std::clamp(static_cast<float>((i - lo) / (hi - lo)), 0.0f, 1.0f);
    const float pos_freq = 1.0f / f[i];
    const float extrap = 1.0f / pos_freq;
    const float interp = 1.0f / (static_cast<float>(rope.factor) * pos_freq);
    // inv_freq = interp * (1 - extrapolation_factor) + extrap * extrapolation_factor,
    // extrapolation_factor = 1 - ramp.
    f[i] = interp * ramp + extrap * (1.0f - ramp);
  }
  return f;
}

}  // namespace retort::v4
