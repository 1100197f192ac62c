// The V4-Flash layer shapes (V4_SPEC.md, DeepSeek-V4-Flash column) as an
// io::V4Config with `layers` layers alternating CSA (m = 4) and HCA
// (m' = 128), starting with CSA, and a small vocabulary: the GPU benchmarks
// time the layer stack, not the embedding and LM head.
#ifndef RETORT_BENCH_COMMON_V4_FLASH_CONFIG_H_
#define RETORT_BENCH_COMMON_V4_FLASH_CONFIG_H_

#include "model/io/v4_config.h"

namespace retort::bench {

inline io::V4Config V4FlashLayers(int layers, int64_t vocab = 1024) {
  io::V4Config c;
  c.vocab_size = vocab;
  c.hidden_size = 4096;
  c.num_layers = layers;
  c.num_heads = 64;
  c.head_dim = 512;
  c.rope_dim = 64;
  c.q_lora_rank = 1024;
  c.o_groups = 8;
  c.o_lora_rank = 1024;
  c.n_routed_experts = 256;
  c.n_shared_experts = 1;
  c.experts_per_token = 6;
  c.moe_intermediate = 2048;
  c.routed_scaling_factor = 1.5;
  c.swiglu_limit = 10.0;
  c.sliding_window = 128;
  c.index_n_heads = 64;
  c.index_head_dim = 128;
  c.index_topk = 512;
  c.hc_mult = 4;
  c.hc_sinkhorn_iters = 20;
  c.main_rope.theta = 10000;
  c.compress_rope.theta = 160000;
  c.compress_rope.yarn = true;
  c.compress_rope.factor = 16;
  c.compress_rope.original_max_position = 65536;
  for (int l = 0; l < layers; ++l) {
    const bool csa = l % 2 == 0;
    c.attention.push_back(csa ? io::AttentionKind::kCsa : io::AttentionKind::kHca);
    c.compress_ratio.push_back(csa ? 4 : 128);
    c.hash_routed.push_back(false);
  }
  c.max_position_embeddings = 1 << 20;
  return c;
}

}  // namespace retort::bench

#endif  // RETORT_BENCH_COMMON_V4_FLASH_CONFIG_H_
