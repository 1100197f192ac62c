// The "math" reward: extracts the final answer of a completion and judges it
// against the record's reference answer like a careful human grader.
//
// Pipeline (Note [Math grading] in math.cc has the reasons):
//  1. Extraction: the last \boxed{...} (balanced braces; also \fbox) of the
//     answer part (after "</think>"); if there is none and an answer pattern
//     is configured, the pattern's last match (group 1, else the match).
//  2. Normalisation of both sides: \dfrac/\tfrac, \left/\right, spacing
//     commands, $ and \%, thousands separators, \text{} units, degrees,
//     trailing periods, "x =" / "x \in" prefixes.
//  3. Comparison: numbers (integers exactly at any size, decimals and
//     fractions by exact rational value, scientific notation); structures
//     (tuples and intervals ordered with their bracket kinds, sets and
//     multiple answers unordered, unions of intervals, matrices by shape and
//     entries, relations by operator and sides); then algebraic equivalence
//     of expressions by evaluation at seeded random points, exactly with
//     rationals where possible.
//  A reference that is a number literal accepts only number literals: "1+2"
//  is not "3" unless allow_unevaluated.
//
// Options (JSON): "answer_pattern" (PCRE2; default none), "allow_unevaluated"
// (default false), "rel_tol" (relative tolerance for values that are not
// exact rationals, e.g. with pi; default 1e-9), "num_points" (evaluation
// points for algebraic equivalence; default 8). Record: "answer" (string or
// number; a \boxed{} inside it is extracted). Score 1 or 0.
//
// Thread-safety: pure functions; the reward is immutable.
#ifndef RETORT_REWARDS_MATH_H_
#define RETORT_REWARDS_MATH_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "rewards/rewards.h"

namespace retort::rewards {

struct MathOptions {
  std::string answer_pattern;      // PCRE2, used when there is no \boxed{}. Default "" (none).
  bool allow_unevaluated = false;  // accept "1+2" for "3". Default false.
  double rel_tol = 1e-9;           // for inexact values. Default 1e-9.
  int num_points = 8;              // random points for algebraic equivalence. Default 8.
};

struct MathVerdict {
  bool correct = false;
  std::string method;  // "string" | "number" | "structure" | "algebraic" | "text" | "none"
  std::string reason;  // why it is not correct (empty when correct)
  std::string normalized_answer;
  std::string normalized_reference;
};

// The content of the last \boxed{...} / \fbox{...} in `text`, braces balanced
// (escaped \{ \} do not count); nullopt when there is none or it is unclosed.
std::optional<std::string> ExtractBoxed(const std::string& text);

// The normalised form of an answer (before structural parsing).
std::string NormalizeMathAnswer(const std::string& answer);

// Judges an extracted `answer` against `reference`. Deterministic in `seed`.
MathVerdict GradeMathAnswer(const std::string& answer, const std::string& reference,
                            const MathOptions& options, uint64_t seed);

class MathReward final : public Reward {
 public:
  // InvalidArgument for unknown keys, wrong types or a bad answer_pattern.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<MathReward>> Create(
      const nlohmann::json& options);
  absl::StatusOr<RewardResult> Score(const nlohmann::json& record, const std::string& completion,
                                     const nlohmann::json& metadata) const override;
  // The final answer of `completion` (step 1); nullopt when none was found.
  std::optional<std::string> ExtractAnswer(const std::string& completion) const;

 private:
  struct Impl;
  explicit MathReward(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

}  // namespace retort::rewards

#endif  // RETORT_REWARDS_MATH_H_
