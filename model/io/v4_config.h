// DeepSeek-V4 model configuration, parsed from a checkpoint's config.json in
// either layout:
//   HF (transformers): layer_types, compress_rates, mlp_layer_types,
//     partial_rotary_factor, nested rope_parameters {main, compress};
//   released (DeepSeek's repositories): compress_ratios (one per layer plus
//     one for the MTP block; 0 sliding, 4 CSA, other m' HCA), num_hash_layers,
//     qk_rope_head_dim, rope_scaling, quantization_config, expert_dtype.
// Parsing validates every size against the others once; a config that
// contradicts itself is an InvalidArgument naming the field. Immutable after
// parsing; safe to share between threads.
#ifndef RETORT_MODEL_IO_V4_CONFIG_H_
#define RETORT_MODEL_IO_V4_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace retort::io {

enum class AttentionKind : uint8_t { kSliding, kCsa, kHca };
std::string AttentionKindName(AttentionKind k);  // "sliding", "csa", "hca"

enum class CheckpointLayout : uint8_t { kHf, kReleased };

struct RopeConfig {
  double theta = 10000.0;
  bool yarn = false;
  double factor = 1.0;
  double original_max_position = 0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
};

struct V4Config {
  CheckpointLayout layout = CheckpointLayout::kHf;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;          // d
  int num_layers = 0;
  int num_heads = 0;                // n_h
  int64_t head_dim = 0;             // c (nope + rope)
  int64_t rope_dim = 0;             // trailing rotary dims of each head
  int64_t q_lora_rank = 0;          // d_c
  int o_groups = 0;                 // g
  int64_t o_lora_rank = 0;          // d_g
  int n_routed_experts = 0;
  int n_shared_experts = 0;
  int experts_per_token = 0;
  int64_t moe_intermediate = 0;
  double routed_scaling_factor = 1.0;
  double swiglu_limit = 0;          // 0: no clamp
  int64_t sliding_window = 0;       // n_win keys per query, itself included
  int index_n_heads = 0;
  int64_t index_head_dim = 0;
  int index_topk = 0;
  int hc_mult = 4;
  int hc_sinkhorn_iters = 20;
  double hc_eps = 1e-6;
  double rms_norm_eps = 1e-6;
  RopeConfig main_rope;             // sliding-only layers
  RopeConfig compress_rope;         // CSA / HCA layers
  std::vector<AttentionKind> attention;  // per layer
  std::vector<int> compress_ratio;       // per layer: 0, m (CSA) or m' (HCA)
  std::vector<bool> hash_routed;         // per layer: tid2eid routing
  int64_t max_position_embeddings = 0;
  int num_mtp_layers = 0;
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 1;
  bool tie_word_embeddings = false;
  bool fp8_weights = false;          // released layout with quantization_config fp8
  std::string expert_dtype = "fp32"; // fp32 | bf16 | fp8 | fp4

  int CsaRatio() const;  // m of the CSA layers (4), or 0 when there are none
  int64_t NopeDim() const { return head_dim - rope_dim; }
};

// Parses and validates `dir`/config.json.
[[nodiscard]] absl::StatusOr<V4Config> LoadV4Config(const std::string& dir);
// Parses JSON text (`source` names it in errors).
[[nodiscard]] absl::StatusOr<V4Config> ParseV4Config(const std::string& json_text, const std::string& source);

}  // namespace retort::io

#endif  // RETORT_MODEL_IO_V4_CONFIG_H_
