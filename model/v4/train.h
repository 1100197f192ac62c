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
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/v4/model.h"

namespace retort::v4 {

struct Gradients {
  // HF parameter name -> gradient, same shape as the parameter, row-major f32.
  std::map<std::string, std::vector<float>> by_name;
};

// Mean next-token cross-entropy over a batch of B sequences of T tokens
// (`tokens` is [B, T] row-major): position t predicts token t+1, averaged over
// B*(T-1) predictions. Fills `grads` (when non-null) with d(loss)/d(param).
// MXFP4-packed experts have no trainable master weights here (QAT keeps fp32
// masters): such models are rejected with Unimplemented.
[[nodiscard]] absl::StatusOr<float> NextTokenLossAndGradients(const Model& model, absl::Span<const int64_t> tokens,
                                                              int64_t B, int64_t T, Gradients* grads);

}  // namespace retort::v4

#endif  // RETORT_MODEL_V4_TRAIN_H_
