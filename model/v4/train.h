// Backward through the whole V4 model on CPU (exact numerics): the training
// forward saves each layer's activations, then gradients flow back through
// the LM head, final norm, hc_head and every block — mHC (pre/post/comb maps
// and all Sinkhorn iterations, unrolled), attention (q/kv paths, RoPE and its
// inverse, sinks, sliding window, CSA/HCA compressed entries including the
// compressor softmax and position bias; the indexer's top-k passes no
// gradient), the grouped output projection, MoE (router scores through
// sqrt-softplus for the selected experts, SwiGLU clamps, shared expert) and
// the embedding.
//
// Gradients are keyed by transformers parameter names (model.layers.N.…), the
// names the HF reference reports, so they compare 1:1 with the fixtures.
// Thread-safety: pure function of the model and the batch.
#ifndef RETORT_MODEL_V4_TRAIN_H_
#define RETORT_MODEL_V4_TRAIN_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/tensor/tensor.h"
#include "model/v4/model.h"

namespace retort::v4 {

struct Gradients {
  // HF parameter name -> gradient, same shape as the parameter, row-major f32.
  std::map<std::string, std::vector<float>> by_name;
};

// A batch for per-token weighted training, all [B, T] row-major: position t of
// sequence b reads tokens[..t] and is scored on targets[b,t] (-1: masked, no
// loss term) with weight weights[b,t]. SFT masks prompt positions and puts
// 1/(completion tokens) on the rest; GRPO's weighted log-prob puts
// -advantage/normaliser on each sampled token (a negative weight is allowed).
struct TokenBatch {
  absl::Span<const int64_t> tokens;
  absl::Span<const int64_t> targets;
  absl::Span<const float> weights;
  int64_t B = 0;
  int64_t T = 0;
  // Routing replay: [num_layers, B, T, experts_per_token] expert ids recorded
  // when the tokens were sampled (StepOutputs::routes, sequence by sequence),
  // used in place of every layer's own selection; the mixing weights are still
  // the current router's scores of those experts. Empty: route normally.
  absl::Span<const int32_t> replay_routes;
  // Weight alpha of DeepSeek-V3's sequence-wise balance loss, added per row
  // and learned-routing layer: alpha * sum_e f_e P_e (f: the row's routed
  // fraction of expert e times E/K, P: its mean normalised score). Its
  // gradient reaches the router weights. 0: off (the spec trains with 1e-4).
  float balance_loss_weight = 0.0f;
  // Packed documents: [B, T] document id of each position, or empty (each
  // row is one sequence). Each run of equal non-negative ids within a row is
  // run as a sequence of its own: positions restart at 0 and nothing —
  // attention, the compressors' windows and state, the balance loss — crosses
  // into the next run. Negative ids mark padding: not run, no loss, no expert
  // load (its targets must be -1). Losses, weights and logprobs stay per row.
  absl::Span<const int32_t> documents;
};

// The sequences a batch runs as: (offset into the [B, T] arrays, length),
// row by row, runs of equal non-negative documents ids (a whole row each when
// `documents` is empty).
std::vector<std::pair<int64_t, int64_t>> SequencesOf(const TokenBatch& batch);

struct WeightedLoss {
  // sum over unmasked positions of weight * -log p(target); the caller's
  // weights carry any normalisation.
  double loss = 0.0;
  // [B, T]: log p(target) at each unmasked position, 0 where masked.
  std::vector<float> logprobs;
  // expert_load[l][e]: tokens layer l routed to expert e in this batch (all
  // positions, masked ones too, padding not); the input of the aux-loss-free
  // bias update.
  std::vector<std::vector<int64_t>> expert_load;
  // The balance loss (0 when off). Not part of `loss`; its gradient is in the
  // gradients too, so the optimised objective is loss + balance_loss.
  double balance_loss = 0.0;
};

// Forward + backward of WeightedLoss::loss. Fills `grads` (when non-null) with
// d(loss)/d(param), accumulating into entries already present. Bad batches
// (sizes != B*T, ids outside the vocabulary, targets < -1, non-finite weights,
// replayed routes of the wrong size, outside 0..E-1 or repeating an expert,
// documents of the wrong size or padding with a target) are InvalidArgument
// naming the field and position.
[[nodiscard]] absl::StatusOr<WeightedLoss> WeightedTokenLossAndGradients(const Model& model,
                                                                         const TokenBatch& batch,
                                                                         Gradients* grads);

// Mean next-token cross-entropy over a batch of B sequences of T tokens
// (`tokens` is [B, T] row-major): position t predicts token t+1, averaged over
// B*(T-1) predictions. Fills `grads` (when non-null) with d(loss)/d(param).
// MXFP4-packed experts have no trainable master weights here (QAT keeps fp32
// masters): such models are rejected with Unimplemented.
[[nodiscard]] absl::StatusOr<float> NextTokenLossAndGradients(const Model& model,
                                                              absl::Span<const int64_t> tokens,
                                                              int64_t B, int64_t T,
                                                              Gradients* grads);

// One model tensor under its transformers name (the names gradients use and
// the loader reads), as a fresh contiguous copy the caller owns. `trainable`
// is false for buffers (tid2eid, the router's e_score_correction_bias) and for
// the lightning indexer, which the top-k passes no gradient.
struct NamedTensor {
  std::string name;
  Tensor value;
  bool trainable = true;
};

// Every tensor of `model` (experts fused as [E, 2I, d] gate_up_proj and
// [E, d, I] down_proj, as transformers stores them). A TensorMap of the result
// loads back with Model::FromTensors, sharing these tensors' storage (f32 is
// zero-copy), so writing them in place updates that model. MXFP4-packed
// experts are decoded exactly to f32 (a dense-expert model reloads from them).
[[nodiscard]] absl::StatusOr<std::vector<NamedTensor>> HfTensors(const Model& model);

// The released layout of HF-named f32 tensors (what HfTensors names; a tied
// head simply absent), as DeepSeek's checkpoints keep them (V4_SPEC.md §4) and
// Model::Load reads them: names without the "model." prefix; attention,
// indexer wq_b and shared-expert matrices FP8 e4m3 with "<name>.scale" E8M0
// per 128x128 block (cpu::QuantizeFp8Blocks); routed experts split per expert
// into w1/w3/w2 MXFP4 (I8 codes [out, in/2] + E8M0 scales [out, in/32],
// cpu::QuantizeMxFp4, the QAT quantizer); embed, head, norms, compressor
// projections, weights_proj and the router weight BF16 (round to nearest
// even); mHC, sinks, ape and the router bias F32; tid2eid I64. Lossy: the
// result is for serving, not for resuming training. A name without a released
// spelling, a non-f32 parameter, or expert rows whose width is not a multiple
// of 32 are InvalidArgument naming the tensor.
[[nodiscard]] absl::StatusOr<std::vector<std::pair<std::string, Tensor>>> ReleasedTensors(
    absl::Span<const std::pair<std::string, Tensor>> hf);

// What `retort grad` writes: "loss" (f32 scalar, NextTokenLossAndGradients on
// `input_ids`, i64 [B, T] with T >= 2) and "grad.<name>" (f32, the
// parameter's shape) for every trainable tensor HfTensors names — the
// indexer and buffers get none, as in the transformers reference.
[[nodiscard]] absl::StatusOr<std::vector<std::pair<std::string, Tensor>>> LossAndGradientTensors(
    const Model& model, const Tensor& input_ids);

}  // namespace retort::v4

#endif  // RETORT_MODEL_V4_TRAIN_H_
