// The DeepSeek-V4 model on CPU: weights, per-sequence decode state, forward.
//
// One code path serves full forwards, chunked prefill and decoding: Step()
// takes a batch of (sequence state, new tokens) pairs — sequences of different
// lengths, any number of new tokens each — appends the tokens to each state
// and returns their logits. A full forward is a Step on a fresh state; decode
// is a Step of one token per sequence. Token-wise work (projections, mHC, MoE,
// LM head) runs on all rows of the batch together; attention, compressors and
// the lightning indexer run per sequence against that sequence's state.
//
// Numerics: kExact reproduces the Hugging Face reference in fp32 (weights
// dequantized exactly; MXFP4 experts stay packed and are decoded in registers).
// kDeployment (FP8 activations, FP8-rounded KV, FP4 indexer path) is a seam
// for the CUDA rollout path and is rejected on CPU for now.
//
// Thread-safety: a Model is immutable after Load and may serve many threads;
// a DecodeState belongs to one sequence and must not be shared concurrently.
#ifndef RETORT_MODEL_V4_MODEL_H_
#define RETORT_MODEL_V4_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/io/safetensors.h"
#include "model/io/v4_config.h"
#include "model/tensor/tensor.h"

namespace retort::v4 {

enum class Numerics : uint8_t { kExact, kDeployment };

// y = x W^T for W [out, in]: dense f32 (FP8/BF16 checkpoints are dequantized
// at load) or MXFP4 kept packed (codes u8 [out, in/2], scales e8m0 [out, in/32]).
struct Linear {
  int64_t out = 0;
  int64_t in = 0;
  bool mxfp4 = false;
  // The checkpoint stored it FP8 e4m3 with 128 x 128 block scales (dequantized
  // exactly into `weight`): the CUDA deployment path keeps it FP8.
  bool fp8 = false;
  Tensor weight;  // f32 [out, in] or u8 codes
  Tensor scales;  // e8m0, mxfp4 only
  void Apply(const float* x, int64_t rows, float* y) const;
  int64_t Bytes() const { return static_cast<int64_t>(weight.nbytes() + (scales.defined() ? scales.nbytes() : 0)); }
};

struct HyperConnection {
  Tensor fn;     // f32 [(2+hc)*hc, hc*d]  (hc_head: [hc, hc*d])
  Tensor base;   // f32 [(2+hc)*hc]        (hc_head: [hc])
  Tensor scale;  // f32 [3]                (hc_head: [1])
};

struct Compressor {
  int ratio = 0;        // m
  int64_t dim = 0;      // c: head_dim (main KV) or index_head_dim (indexer keys)
  bool overlap = false; // CSA: two series over 2m tokens with stride m
  Linear wkv, wgate;    // [coff*c, d]
  Tensor ape;           // f32 [m, coff*c]
  Tensor norm;          // f32 [c]
};

struct Indexer {
  Linear wq_b;          // [index_heads*index_dim, q_lora_rank]
  Linear weights_proj;  // [index_heads, d]
  Compressor compressor;
};

struct Attention {
  io::AttentionKind kind = io::AttentionKind::kSliding;
  Linear wq_a, wq_b, wkv, wo_a, wo_b;
  Tensor q_norm, kv_norm, sinks;  // f32
  Compressor compressor;          // CSA / HCA
  Indexer indexer;                // CSA
};

struct Expert {
  Linear w1, w3, w2;  // gate [I, d], up [I, d], down [d, I]
};

struct Moe {
  bool hash_routed = false;
  Tensor gate;     // f32 [E, d]
  Tensor bias;     // f32 [E] (non-hash layers)
  Tensor tid2eid;  // i64 [vocab, k] (hash layers)
  std::vector<Expert> experts;
  bool has_shared = false;
  Expert shared;
};

struct Layer {
  HyperConnection attn_hc, ffn_hc;
  Tensor attn_norm, ffn_norm;
  Attention attn;
  Moe moe;
};

struct Weights {
  Tensor embed;  // f32 [vocab, d]
  std::vector<Layer> layers;
  HyperConnection hc_head;
  Tensor norm;   // f32 [d]
  Linear head;   // [vocab, d]
};

// Per-sequence state of one layer: the sliding-window ring, compressed entries
// and the compressors' pending rows (see V4_SPEC.md §3).
struct CompressorState {
  std::vector<float> entries;     // [n, c] emitted entries (normed, RoPE'd)
  int64_t num_entries = 0;
  std::vector<float> pending_kv;  // [k < m, coff*c] raw rows of the open window
  std::vector<float> pending_score;  // same, with ape added
  int64_t pending = 0;
  std::vector<float> prev_kv;     // CSA: the last closed window's first-half rows [m, c]
  std::vector<float> prev_score;
  bool has_prev = false;
  int64_t Bytes() const;
};

struct LayerState {
  std::vector<float> window;  // ring [n_win, head_dim], slot = pos % n_win
  CompressorState kv;         // CSA / HCA
  CompressorState index;      // CSA indexer keys
};

class DecodeState {
 public:
  int64_t length() const { return length_; }
  // A deep copy: the fork of a prefilled prompt for each sample of a group.
  std::unique_ptr<DecodeState> Clone() const { return std::make_unique<DecodeState>(*this); }
  // Exact bytes held (window rings, compressed entries, compressor rows, indexer keys).
  int64_t Bytes() const;
  // Compressed KV entries (CSA/HCA) and indexer keys (CSA) emitted so far in `layer`.
  int64_t CompressedEntries(int layer) const { return layers_[layer].kv.num_entries; }
  int64_t IndexerKeys(int layer) const { return layers_[layer].index.num_entries; }

 private:
  friend class Model;
  friend class ModelRunner;
  int64_t length_ = 0;
  std::vector<LayerState> layers_;
};

// Optional per-step outputs for tests and tools.
struct StepOutputs {
  // hidden[l]: [rows, hc, d] mHC streams after layer l (when requested).
  std::vector<std::vector<float>> hidden;
  bool capture_hidden = false;
  // routes[l]: [rows, experts_per_token] routed expert ids of layer l (for
  // routing replay in the learner), when requested.
  std::vector<std::vector<int32_t>> routes;
  bool capture_routes = false;
  // selected[l][row]: the compressed entries the lightning indexer chose for
  // that query in CSA layer l (ascending), when requested; empty elsewhere.
  std::vector<std::vector<std::vector<int32_t>>> selected;
  bool capture_selection = false;
};

class Model {
 public:
  // Loads config.json and the weights of `dir` (HF or released layout, one
  // file or shards). Every tensor is checked for presence, dtype and shape;
  // unknown tensors are an error (the MTP block's are skipped).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                                   Numerics numerics = Numerics::kExact);
  // The same from tensors already at hand (a weight push): names and formats
  // as in a checkpoint of either layout. The source must outlive the model
  // only if its tensors are views (a TensorMap's tensors are shared handles).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Model>> FromTensors(const io::V4Config& config,
                                                                          const io::TensorSource& source,
                                                                          Numerics numerics = Numerics::kExact);

  const io::V4Config& config() const { return config_; }
  const Weights& weights() const { return weights_; }
  Numerics numerics() const { return numerics_; }

  std::unique_ptr<DecodeState> NewState() const;

  struct Chunk {
    DecodeState* state;
    absl::Span<const int64_t> tokens;
  };
  // Appends each chunk's tokens to its state; returns logits [sum of tokens, vocab]
  // in chunk order. Token ids outside the vocabulary are InvalidArgument and
  // leave every state unchanged.
  [[nodiscard]] absl::StatusOr<std::vector<float>> Step(absl::Span<const Chunk> chunks,
                                                        StepOutputs* outputs = nullptr) const;

  // Parameter counts: all, and activated per token (routed experts: k of E).
  int64_t ParameterCount() const;
  int64_t ActivatedParameterCount() const;
  // Bytes a DecodeState holds after `length` tokens (what DecodeState::Bytes
  // reports), computed without running the model: window rings, compressed
  // entries, open-window compressor rows and CSA overlap rows, indexer keys.
  int64_t StateBytes(int64_t length) const;

 private:
  Model() = default;
  io::V4Config config_;
  Weights weights_;
  Numerics numerics_ = Numerics::kExact;
  // Per rope kind (0 main, 1 compress): inverse frequencies [rope_dim/2].
  std::vector<float> inv_freq_[2];
  friend class ModelRunner;

 public:
  // Inverse RoPE frequencies: kind 0 = sliding layers, 1 = compressed layers.
  const std::vector<float>& inv_freq(int kind) const { return inv_freq_[kind]; }
};

// Inverse RoPE frequencies of a RopeConfig for `rope_dim` rotary dims (YaRN
// per V4_SPEC.md §2.5 when enabled, with no attention scaling).
std::vector<float> RopeInverseFrequencies(const io::RopeConfig& rope, int64_t rope_dim);

}  // namespace retort::v4

#endif  // RETORT_MODEL_V4_MODEL_H_
