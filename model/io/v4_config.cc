#include "model/io/v4_config.h"

#include <cmath>
#include <cstdint>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "model/base/status_macros.h"
#include "nlohmann/json.hpp"

namespace retort::io {
namespace {

using json = nlohmann::json;

// Values are read through const references, never copied or dump()ed whole:
// nlohmann copies and serialises recursively, so a hostile config nesting
// arrays a million deep would overflow the stack (parsing is iterative).
const json& NullJson() {
  static const json* const kNull = new json();
  return *kNull;
}
const json& Field(const json& j, const char* k) { return j.contains(k) ? j[k] : NullJson(); }

// A value for an error message: scalars as JSON (long strings cut short),
// arrays and objects by type only.
std::string Describe(const json& v) {
  if (v.is_string()) {
    const std::string& s = v.get_ref<const std::string&>();
    return s.size() <= 64 ? json(s).dump() : json(s.substr(0, 64)).dump() + "...";
  }
  if (v.is_primitive()) return v.dump();
  return absl::StrCat("(", v.type_name(), ")");
}

class Reader {
 public:
  Reader(const json& j, std::string source) : j_(j), source_(std::move(source)) {}

  absl::Status Error(const std::string& field, const std::string& why) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": field '", field, "' ", why));
  }
  bool Has(const char* k) const { return j_.contains(k) && !j_[k].is_null(); }

  // Integers must fit in int32: V4Config narrows most of them to int, and a
  // wrapped value would pass validation as a different size.
  absl::StatusOr<int64_t> Int(const char* k) const {
    if (!Has(k)) return Error(k, "is missing");
    const json& v = j_[k];
    if (!v.is_number_integer()) return Error(k, absl::StrCat("must be an integer, got ", Describe(v)));
    if (v.is_number_unsigned() ? v.get<uint64_t>() > INT32_MAX
                               : v.get<int64_t>() < INT32_MIN || v.get<int64_t>() > INT32_MAX)
      return Error(k, absl::StrCat("is out of range: ", v.dump()));
    return v.get<int64_t>();
  }
  absl::StatusOr<int64_t> Int(const char* k, int64_t def) const { return Has(k) ? Int(k) : def; }
  absl::StatusOr<double> Num(const char* k) const {
    if (!Has(k)) return Error(k, "is missing");
    if (!j_[k].is_number()) return Error(k, absl::StrCat("must be a number, got ", Describe(j_[k])));
    return j_[k].get<double>();
  }
  absl::StatusOr<double> Num(const char* k, double def) const { return Has(k) ? Num(k) : def; }

 private:
  const json& j_;
  std::string source_;
};

absl::StatusOr<RopeConfig> ParseRope(const json& r, double theta, const std::string& where,
                                     const std::string& source) {
  RopeConfig rc;
  rc.theta = theta;
  if (r.is_null()) return rc;
  if (!r.is_object()) return absl::InvalidArgumentError(absl::StrCat(source, ": '", where, "' must be an object"));
  Reader rd(r, absl::StrCat(source, " ", where));
  std::string type = "default";
  if (r.contains("rope_type") && r["rope_type"].is_string()) type = r["rope_type"].get<std::string>();
  else if (r.contains("type") && r["type"].is_string()) type = r["type"].get<std::string>();
  if (r.contains("rope_theta")) {
    ASSIGN_OR_RETURN(rc.theta, rd.Num("rope_theta"));
  }
  if (type == "default") return rc;
  if (type != "yarn")
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", where, " rope type '", type,
                                                   "' is not supported (default or yarn)"));
  rc.yarn = true;
  ASSIGN_OR_RETURN(rc.factor, rd.Num("factor"));
  ASSIGN_OR_RETURN(rc.original_max_position, rd.Num("original_max_position_embeddings"));
  ASSIGN_OR_RETURN(rc.beta_fast, rd.Num("beta_fast", 32.0));
  ASSIGN_OR_RETURN(rc.beta_slow, rd.Num("beta_slow", 1.0));
  if (r.contains("attention_factor") && r["attention_factor"].is_number() &&
      r["attention_factor"].get<double>() != 1.0)
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", where,
                                                   " attention_factor != 1 is not V4 (its YaRN has no mscale)"));
  if (rc.factor <= 0 || rc.original_max_position <= 0)
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", where, " yarn factor and original length must be > 0"));
  return rc;
}

absl::Status Validate(const V4Config& c, const std::string& src) {
  auto bad = [&](const std::string& why) { return absl::InvalidArgumentError(absl::StrCat(src, ": ", why)); };
  if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.num_layers <= 0 || c.num_heads <= 0 || c.head_dim <= 0)
    return bad("vocab_size, hidden_size, num_hidden_layers, num_attention_heads and head_dim must be positive");
  if (c.rope_dim <= 0 || c.rope_dim > c.head_dim || c.rope_dim % 2)
    return bad(absl::StrCat("rope dims (", c.rope_dim, ") must be even and within head_dim (", c.head_dim, ")"));
  if (c.q_lora_rank <= 0 || c.o_lora_rank <= 0 || c.o_groups <= 0)
    return bad("q_lora_rank, o_lora_rank and o_groups must be positive");
  if (c.num_heads % c.o_groups)
    return bad(absl::StrCat("num_attention_heads (", c.num_heads, ") is not a multiple of o_groups (", c.o_groups, ")"));
  if (c.n_routed_experts <= 0 || c.experts_per_token <= 0 || c.experts_per_token > c.n_routed_experts)
    return bad(absl::StrCat("num_experts_per_tok (", c.experts_per_token, ") must be in 1..n_routed_experts (",
                            c.n_routed_experts, ")"));
  if (c.n_shared_experts < 0 || c.n_shared_experts > 1) return bad("n_shared_experts must be 0 or 1");
  if (c.moe_intermediate <= 0) return bad("moe_intermediate_size must be positive");
  if (c.sliding_window <= 0) return bad("sliding_window must be positive");
  if (c.hc_mult <= 0 || c.hc_sinkhorn_iters <= 0) return bad("hc_mult and hc_sinkhorn_iters must be positive");
  if (static_cast<int>(c.attention.size()) != c.num_layers)
    return bad(absl::StrCat("layer types list has ", c.attention.size(), " entries for ", c.num_layers, " layers"));
  if (static_cast<int>(c.hash_routed.size()) != c.num_layers)
    return bad(absl::StrCat("mlp layer types list has ", c.hash_routed.size(), " entries for ", c.num_layers,
                            " layers"));
  bool any_csa = false;
  for (int l = 0; l < c.num_layers; ++l) {
    if (c.attention[l] != AttentionKind::kSliding && c.compress_ratio[l] <= 0)
      return bad(absl::StrCat("layer ", l, " is compressed but its compress ratio is ", c.compress_ratio[l]));
    any_csa |= c.attention[l] == AttentionKind::kCsa;
  }
  if (any_csa) {
    if (c.index_n_heads <= 0 || c.index_head_dim <= 0 || c.index_topk <= 0)
      return bad("CSA layers need index_n_heads, index_head_dim and index_topk > 0");
    if (c.rope_dim > c.index_head_dim)
      return bad(absl::StrCat("rope dims (", c.rope_dim, ") exceed index_head_dim (", c.index_head_dim, ")"));
  }
  if (c.expert_dtype == "fp4" && c.hidden_size % 32)
    return bad("MXFP4 experts need hidden_size to be a multiple of 32");
  if (c.expert_dtype == "fp4" && c.moe_intermediate % 32)
    return bad("MXFP4 experts need moe_intermediate_size to be a multiple of 32");
  return absl::OkStatus();
}

}  // namespace

std::string AttentionKindName(AttentionKind k) {
  switch (k) {
    case AttentionKind::kSliding: return "sliding";
    case AttentionKind::kCsa: return "csa";
    case AttentionKind::kHca: return "hca";
  }
  return "?";
}

int V4Config::CsaRatio() const {
  for (int l = 0; l < num_layers; ++l)
    if (attention[l] == AttentionKind::kCsa) return compress_ratio[l];
  return 0;
}

absl::StatusOr<V4Config> ParseV4Config(const std::string& text, const std::string& src) {
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(src, ": not valid JSON"));
  if (!j.is_object()) return absl::InvalidArgumentError(absl::StrCat(src, ": not a JSON object"));
  if (j.contains("model_type") && j["model_type"] != "deepseek_v4")
    return absl::InvalidArgumentError(absl::StrCat(src, ": model_type is ", Describe(j["model_type"]),
                                                   ", expected \"deepseek_v4\""));
  Reader r(j, src);
  V4Config c;
  c.layout = j.contains("compress_ratios") ? CheckpointLayout::kReleased : CheckpointLayout::kHf;
  ASSIGN_OR_RETURN(c.vocab_size, r.Int("vocab_size"));
  ASSIGN_OR_RETURN(c.hidden_size, r.Int("hidden_size"));
  ASSIGN_OR_RETURN(int64_t layers, r.Int("num_hidden_layers"));
  c.num_layers = static_cast<int>(layers);
  ASSIGN_OR_RETURN(int64_t heads, r.Int("num_attention_heads"));
  c.num_heads = static_cast<int>(heads);
  ASSIGN_OR_RETURN(int64_t kv_heads, r.Int("num_key_value_heads", 1));
  if (kv_heads != 1) return r.Error("num_key_value_heads", "must be 1 (V4 shares one K=V head)");
  ASSIGN_OR_RETURN(c.head_dim, r.Int("head_dim"));
  ASSIGN_OR_RETURN(c.q_lora_rank, r.Int("q_lora_rank"));
  ASSIGN_OR_RETURN(int64_t og, r.Int("o_groups"));
  c.o_groups = static_cast<int>(og);
  ASSIGN_OR_RETURN(c.o_lora_rank, r.Int("o_lora_rank"));
  ASSIGN_OR_RETURN(int64_t ne, r.Int("n_routed_experts"));
  c.n_routed_experts = static_cast<int>(ne);
  ASSIGN_OR_RETURN(int64_t ns, r.Int("n_shared_experts", 1));
  c.n_shared_experts = static_cast<int>(ns);
  ASSIGN_OR_RETURN(int64_t k, r.Int("num_experts_per_tok"));
  c.experts_per_token = static_cast<int>(k);
  ASSIGN_OR_RETURN(c.moe_intermediate, r.Int("moe_intermediate_size"));
  ASSIGN_OR_RETURN(c.routed_scaling_factor, r.Num("routed_scaling_factor", 1.0));
  ASSIGN_OR_RETURN(c.swiglu_limit, r.Num("swiglu_limit", 0.0));
  ASSIGN_OR_RETURN(c.sliding_window, r.Int("sliding_window"));
  ASSIGN_OR_RETURN(int64_t ih, r.Int("index_n_heads", 0));
  c.index_n_heads = static_cast<int>(ih);
  ASSIGN_OR_RETURN(c.index_head_dim, r.Int("index_head_dim", 0));
  ASSIGN_OR_RETURN(int64_t itk, r.Int("index_topk", 0));
  c.index_topk = static_cast<int>(itk);
  ASSIGN_OR_RETURN(int64_t hm, r.Int("hc_mult", 4));
  c.hc_mult = static_cast<int>(hm);
  ASSIGN_OR_RETURN(int64_t hi, r.Int("hc_sinkhorn_iters", 20));
  c.hc_sinkhorn_iters = static_cast<int>(hi);
  ASSIGN_OR_RETURN(c.hc_eps, r.Num("hc_eps", 1e-6));
  ASSIGN_OR_RETURN(c.rms_norm_eps, r.Num("rms_norm_eps", 1e-6));
  ASSIGN_OR_RETURN(c.max_position_embeddings, r.Int("max_position_embeddings", 0));
  ASSIGN_OR_RETURN(int64_t mtp, r.Int("num_nextn_predict_layers", 0));
  c.num_mtp_layers = static_cast<int>(mtp);
  ASSIGN_OR_RETURN(c.bos_token_id, r.Int("bos_token_id", 0));
  ASSIGN_OR_RETURN(c.eos_token_id, r.Int("eos_token_id", 1));
  if (j.contains("tie_word_embeddings") && j["tie_word_embeddings"].is_boolean())
    c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
  if (j.contains("scoring_func") && j["scoring_func"] != "sqrtsoftplus")
    return r.Error("scoring_func", "must be \"sqrtsoftplus\"");
  ASSIGN_OR_RETURN(double rope_theta, r.Num("rope_theta", 10000.0));
  ASSIGN_OR_RETURN(double compress_theta, r.Num("compress_rope_theta", 160000.0));
  if (c.num_layers <= 0 || c.num_layers > 4096) return r.Error("num_hidden_layers", "must be in 1..4096");

  if (c.layout == CheckpointLayout::kReleased) {
    ASSIGN_OR_RETURN(c.rope_dim, r.Int("qk_rope_head_dim"));
    const json& cr = j["compress_ratios"];
    if (!cr.is_array()) return r.Error("compress_ratios", "must be an array");
    if (static_cast<int>(cr.size()) != c.num_layers && static_cast<int>(cr.size()) != c.num_layers + 1)
      return r.Error("compress_ratios", absl::StrCat("has ", cr.size(), " entries; expected ", c.num_layers,
                                                     " layers (+1 for the MTP block)"));
    for (int l = 0; l < c.num_layers; ++l) {
      if (!cr[l].is_number_integer() || cr[l].get<int64_t>() < 0 || cr[l].get<int64_t>() > INT32_MAX)
        return r.Error("compress_ratios", absl::StrCat("entries must be non-negative integers, entry ", l, " is ",
                                                       Describe(cr[l])));
      const int m = static_cast<int>(cr[l].get<int64_t>());
      c.compress_ratio.push_back(m);
      c.attention.push_back(m == 0 ? AttentionKind::kSliding : m == 4 ? AttentionKind::kCsa : AttentionKind::kHca);
    }
    ASSIGN_OR_RETURN(int64_t n_hash, r.Int("num_hash_layers", 0));
    if (n_hash < 0 || n_hash > c.num_layers) return r.Error("num_hash_layers", "must be in 0..num_hidden_layers");
    for (int l = 0; l < c.num_layers; ++l) c.hash_routed.push_back(l < n_hash);
    c.main_rope.theta = rope_theta;
    ASSIGN_OR_RETURN(c.compress_rope,
                     ParseRope(Field(j, "rope_scaling"), compress_theta, "rope_scaling", src));
    c.compress_rope.theta = compress_theta;
    if (j.contains("quantization_config") && j["quantization_config"].is_object()) {
      const json& q = j["quantization_config"];
      if (q.contains("quant_method") && q["quant_method"] == "fp8") {
        c.fp8_weights = true;
        if (q.contains("weight_block_size") && q["weight_block_size"] != json::array({128, 128}))
          return r.Error("quantization_config.weight_block_size", "must be [128, 128]");
      }
    }
    c.expert_dtype = j.contains("expert_dtype") && j["expert_dtype"].is_string() ? j["expert_dtype"].get<std::string>()
                                                                                 : (c.fp8_weights ? "fp8" : "bf16");
    if (c.expert_dtype != "fp4" && c.expert_dtype != "fp8" && c.expert_dtype != "bf16")
      return r.Error("expert_dtype", "must be fp4, fp8 or bf16");
  } else {
    double prf = 0;
    if (r.Has("partial_rotary_factor")) {
      ASSIGN_OR_RETURN(prf, r.Num("partial_rotary_factor"));
      if (!(prf > 0 && prf <= 1)) return r.Error("partial_rotary_factor", "must be in (0, 1]");
    }
    if (r.Has("qk_rope_head_dim")) {
      ASSIGN_OR_RETURN(c.rope_dim, r.Int("qk_rope_head_dim"));
      if (prf > 0 && static_cast<int64_t>(c.head_dim * prf) != c.rope_dim)
        return r.Error("qk_rope_head_dim", absl::StrCat("(", c.rope_dim, ") contradicts partial_rotary_factor ", prf,
                                                        " x head_dim ", c.head_dim));
    } else {
      c.rope_dim = static_cast<int64_t>(c.head_dim * (prf > 0 ? prf : 0.125));
    }
    if (!j.contains("layer_types") || !j["layer_types"].is_array()) return r.Error("layer_types", "must be an array");
    int csa_m = 4, hca_m = 128;
    if (j.contains("compress_rates")) {
      const json& rates = j["compress_rates"];
      if (!rates.is_object()) return r.Error("compress_rates", "must be an object");
      const Reader rr(rates, absl::StrCat(src, " compress_rates"));
      ASSIGN_OR_RETURN(int64_t csa, rr.Int("compressed_sparse_attention", csa_m));
      ASSIGN_OR_RETURN(int64_t hca, rr.Int("heavily_compressed_attention", hca_m));
      csa_m = static_cast<int>(csa);
      hca_m = static_cast<int>(hca);
    }
    for (const auto& t : j["layer_types"]) {
      const std::string s = t.is_string() ? t.get<std::string>() : "";
      if (s == "sliding_attention") {
        c.attention.push_back(AttentionKind::kSliding);
        c.compress_ratio.push_back(0);
      } else if (s == "compressed_sparse_attention") {
        c.attention.push_back(AttentionKind::kCsa);
        c.compress_ratio.push_back(csa_m);
      } else if (s == "heavily_compressed_attention") {
        c.attention.push_back(AttentionKind::kHca);
        c.compress_ratio.push_back(hca_m);
      } else {
        return r.Error("layer_types", absl::StrCat("has unknown entry ", Describe(t)));
      }
    }
    if (j.contains("mlp_layer_types")) {
      if (!j["mlp_layer_types"].is_array()) return r.Error("mlp_layer_types", "must be an array");
      for (const auto& t : j["mlp_layer_types"]) {
        if (t == "hash_moe") c.hash_routed.push_back(true);
        else if (t == "moe") c.hash_routed.push_back(false);
        else return r.Error("mlp_layer_types", absl::StrCat("has unknown entry ", Describe(t)));
      }
    } else {
      ASSIGN_OR_RETURN(int64_t n_hash, r.Int("num_hash_layers", 3));
      for (int l = 0; l < c.num_layers; ++l) c.hash_routed.push_back(l < n_hash);
    }
    // rope_parameters: nested {main, compress} or flat (applies to compress).
    const json& rp = Field(j, "rope_parameters");
    if (rp.is_object() && rp.contains("main") && rp["main"].is_object()) {
      ASSIGN_OR_RETURN(c.main_rope, ParseRope(rp["main"], rope_theta, "rope_parameters.main", src));
      ASSIGN_OR_RETURN(c.compress_rope,
                       ParseRope(Field(rp, "compress"), compress_theta,
                                 "rope_parameters.compress", src));
    } else {
      c.main_rope.theta = rope_theta;
      ASSIGN_OR_RETURN(c.compress_rope, ParseRope(rp, compress_theta, "rope_parameters", src));
      c.compress_rope.theta = compress_theta;
    }
    c.expert_dtype = "fp32";
  }
  RETURN_IF_ERROR(Validate(c, src));
  return c;
}

absl::StatusOr<V4Config> LoadV4Config(const std::string& dir) {
  const std::string path = dir + "/config.json";
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseV4Config(ss.str(), path);
}

}  // namespace retort::io
