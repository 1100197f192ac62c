// Vocabulary-chunked losses on an LM head: token cross-entropy (SFT), the
// per-token weighted log-prob objective (GRPO), and the fused exact
// full-vocabulary reverse KL against a teacher head (OPD).
//
// Logits are z = h Wᵀ (h: [tokens, dim] final hidden states after the final
// norm, W: [vocab, dim] LM head). No [tokens x vocab] buffer ever exists: rows
// are processed in blocks of ChunkOptions::token_block and, within a block, the
// vocabulary in chunks of ChunkOptions::vocab_chunk, so the work space is a few
// [token_block x vocab_chunk] f32 buffers. Each loss is two passes over the
// chunks: pass 1 recomputes logits and keeps an online (running-max)
// log-sum-exp per token (and, for the KL, the running Σ p_s (z_s − z_t)); pass 2
// recomputes the logits, forms dL/dz for the chunk in place and accumulates
// dL/dh += dz W_c and dL/dW_c += dzᵀ h with sgemm. Executed flops (logits
// are computed twice rather than stored): 8·T·V·D for the log-prob losses
// (forward only: 2·T·V·D), 4·T·V·(D_s + D_t) + 4·T·V·D_s for the KL.
//
// Numerics: fp32 matmuls (OpenBLAS), per-token sums in double. Gradients are
// ADDED to the caller's buffers (so micro-batches accumulate); pass empty
// grad spans for a forward-only call. Tokens with coefficient 0 contribute
// nothing to the loss or to any gradient.
//
// Ownership: inputs are borrowed for the call; results are returned by value.
// Thread-safety: calls are independent (no shared state); each call uses the
// default retort ThreadPool and OpenBLAS threads internally.
#ifndef RETORT_LEARNER_LOSSES_LOSSES_H_
#define RETORT_LEARNER_LOSSES_LOSSES_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace retort::losses {

// Logits z = hidden · weightᵀ for `tokens` rows.
struct LmHead {
  absl::Span<const float> hidden;  // [tokens, dim], row-major
  absl::Span<const float> weight;  // [vocab, dim], row-major
  int64_t tokens = 0;
  int64_t dim = 0;
  int64_t vocab = 0;
};

// Where gradients go: both empty (forward only) or both sized like the inputs.
struct HeadGrads {
  absl::Span<float> hidden;  // [tokens, dim]   += dL/dh
  absl::Span<float> weight;  // [vocab, dim]    += dL/dW
};

struct ChunkOptions {
  int64_t vocab_chunk = 4096;  // vocabulary columns per chunk (>= 1). Default: 4096
  int64_t token_block = 256;   // rows per block (>= 1). Default: 256
};

struct LogProbResult {
  double loss = 0;
  std::vector<double> logprob;  // [tokens] log π(y_t), for every token (masked ones too)
};

// L = Σ_t coeff_t · log π(y_t). dL/dz_t = coeff_t (onehot(y_t) − p_t). The
// GRPO learner passes coeff_t = −(clipped advantage-weighted ratio terms)/|o|.
// Errors: InvalidArgument naming the field (span sizes, target outside
// [0, vocab), non-finite coefficient, bad chunk options).
[[nodiscard]] absl::StatusOr<LogProbResult> WeightedLogProbLoss(const LmHead& head,
                                                                absl::Span<const int32_t> targets,
                                                                absl::Span<const float> coeff,
                                                                HeadGrads grads,
                                                                const ChunkOptions& options = {});

// Mean token cross-entropy over unmasked tokens:
// L = −Σ_t mask_t log π(y_t) / Σ_t mask_t  (mask 0/1; prompt tokens are 0).
// All-masked input gives L = 0 and no gradient.
[[nodiscard]] absl::StatusOr<LogProbResult> TokenCrossEntropy(const LmHead& head,
                                                              absl::Span<const int32_t> targets,
                                                              absl::Span<const float> mask,
                                                              HeadGrads grads,
                                                              const ChunkOptions& options = {});

// The teacher side of the KL: its last-layer hidden states and LM head. When
// `norm_weight` is non-empty the teacher's final RMSNorm is applied first:
// h <- h / sqrt(mean(h²) + norm_eps) · norm_weight. The teacher is frozen:
// it receives no gradient.
struct TeacherHead {
  absl::Span<const float> hidden;       // [tokens, dim]
  absl::Span<const float> weight;       // [vocab, dim]
  int64_t dim = 0;                      // may differ from the student's dim
  absl::Span<const float> norm_weight;  // [dim] or empty
  float norm_eps = 1e-6f;               // Default: 1e-6 (V4 norm_eps)
};

struct ReverseKlResult {
  double loss = 0;
  std::vector<double> kl;  // [tokens] KL_t for every token (masked ones too)
};

// Exact full-vocabulary reverse KL:
//   KL_t = Σ_v p_s(v)(log p_s(v) − log p_t(v)),  L = Σ_t coeff_t KL_t,
//   dL/dz_s = coeff_t · p_s (log p_s − log p_t − KL_t).
// Gradients go to the student's hidden states and head only.
[[nodiscard]] absl::StatusOr<ReverseKlResult> ReverseKlLoss(const LmHead& student,
                                                            const TeacherHead& teacher,
                                                            absl::Span<const float> coeff,
                                                            HeadGrads grads,
                                                            const ChunkOptions& options = {});

// coeff_t = weight_t · mask_t / Σ mask (the OPD reduction; an empty `weight`
// means 1). All-zero mask gives all-zero coefficients.
std::vector<float> MaskedMeanCoefficients(absl::Span<const float> mask,
                                          absl::Span<const float> weight);

}  // namespace retort::losses

#endif  // RETORT_LEARNER_LOSSES_LOSSES_H_
