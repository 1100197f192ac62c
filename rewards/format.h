// Format and length rewards for the V4 chat format.
//
// "format": the structure of one assistant completion. The prompt of a
// thinking-mode turn ends in "<think>", so its completion must be
// `reasoning</think>answer`: exactly one "</think>", no further "<think>",
// non-empty reasoning (unless require_reasoning is false) and a non-empty
// answer. A non-think completion (the prompt ended in "</think>") must hold
// no "<think>"/"</think>" at all and a non-empty answer. A trailing
// end-of-sentence token is ignored. Score 1 or 0; diagnostics say which rule
// failed. Options: "thinking" (bool; default: metadata.thinking, else
// record.thinking, else false), "require_reasoning" (default true).
//
// "length": DAPO's overlong reward shaping with a soft window. With L the
// completion length, L_max = max_length and L_cache = cache_length:
//   0                              for L <= L_max - L_cache
//   (L_max - L_cache - L) / L_cache  for L_max - L_cache < L <= L_max (0 .. -1)
//   -1                             for L > L_max
// Options: "max_length", "cache_length" (required; 0 < cache_length <=
// max_length), "unit": "tokens" (default; metadata.completion_tokens) or
// "chars" (Unicode code points of the completion).
//
// Combine them with verifiers through the "weighted" reward (rewards.h).
// Thread-safety: immutable after Create.
#ifndef RETORT_REWARDS_FORMAT_H_
#define RETORT_REWARDS_FORMAT_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "rewards/rewards.h"

namespace retort::rewards {

class FormatReward final : public Reward {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<FormatReward>> Create(
      const nlohmann::json& options);
  absl::StatusOr<RewardResult> Score(const nlohmann::json& record, const std::string& completion,
                                     const nlohmann::json& metadata) const override;

 private:
  FormatReward(std::optional<bool> thinking, bool require_reasoning)
      : thinking_(thinking), require_reasoning_(require_reasoning) {}
  std::optional<bool> thinking_;
  bool require_reasoning_;
};

// The DAPO soft overlong penalty (see above), in [-1, 0].
double OverlongPenalty(double length, double max_length, double cache_length);

class LengthReward final : public Reward {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<LengthReward>> Create(
      const nlohmann::json& options);
  absl::StatusOr<RewardResult> Score(const nlohmann::json& record, const std::string& completion,
                                     const nlohmann::json& metadata) const override;

 private:
  LengthReward(double max_length, double cache_length, bool tokens)
      : max_length_(max_length), cache_length_(cache_length), tokens_(tokens) {}
  double max_length_;
  double cache_length_;
  bool tokens_;
};

}  // namespace retort::rewards

#endif  // RETORT_REWARDS_FORMAT_H_
