// The "ifeval" reward: verifiable instructions in the IFEval families
// (Zhou et al. 2023, google-research/instruction_following_eval), checked on
// the answer part of a completion (after "</think>") with the same rules as
// the reference implementation.
//
// Supported instruction ids (and their kwargs, as in IFEval):
//   keywords:existence {keywords}  keywords:frequency {keyword, frequency, relation}
//   keywords:forbidden_words {forbidden_words}
//   keywords:letter_frequency {letter, let_frequency, let_relation}
//   length_constraints:number_words {num_words, relation}
//   length_constraints:number_sentences {num_sentences, relation}
//   length_constraints:number_paragraphs {num_paragraphs}          ("***" separated)
//   length_constraints:nth_paragraph_first_word {num_paragraphs, nth_paragraph, first_word}
//   detectable_content:number_placeholders {num_placeholders}      ([name])
//   detectable_content:postscript {postscript_marker}
//   detectable_format:number_bullet_lists {num_bullets}
//   detectable_format:constrained_response   detectable_format:json_format
//   detectable_format:number_highlighted_sections {num_highlights}
//   detectable_format:multiple_sections {section_spliter, num_sections}
//   detectable_format:title                  (<<title>>)
//   combination:two_responses   combination:repeat_prompt {prompt_to_repeat}
//   startend:end_checker {end_phrase}   startend:quotation
//   change_case:capital_word_frequency {capital_frequency, capital_relation}
//   change_case:english_capital   change_case:english_lowercase
//   punctuation:no_comma
// relation: "less than" | "at least". language:response_language needs a
// language detector and is refused (InvalidArgument) rather than guessed.
//
// Constraint list (record.constraints, or the CLI's reference file): an
// array of {"id": "<instruction id>", <kwargs...>} (or {"id", "kwargs": {}}),
// or IFEval's own {"instruction_id_list": [...], "kwargs": [...]}.
//
// Strict: the response as is. Loose (IFEval's): an instruction counts as
// followed when any of 8 variants follows it -- the response, without its
// first line, without its last line, without both, each also with every '*'
// removed.
//
// Options: "mode": "strict" (default) | "loose"; "aggregate": "all"
// (default; 1 if every instruction is followed, IFEval's prompt-level) |
// "fraction" (instruction-level fraction).
//
// Thread-safety: pure; the reward is immutable.
#ifndef RETORT_REWARDS_IFEVAL_H_
#define RETORT_REWARDS_IFEVAL_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "rewards/rewards.h"

namespace retort::rewards {

struct IfEvalInstruction {
  std::string id;         // e.g. "punctuation:no_comma"
  nlohmann::json kwargs;  // object
};

// Reads either constraint-list form; InvalidArgument naming the entry for an
// unknown id, a missing or mistyped kwarg.
absl::StatusOr<std::vector<IfEvalInstruction>> ParseIfEvalConstraints(const nlohmann::json& list);

// Whether `response` follows `instruction` (strict). InvalidArgument for an
// instruction that did not come from ParseIfEvalConstraints and is malformed.
absl::StatusOr<bool> CheckInstruction(const IfEvalInstruction& instruction,
                                      const std::string& response);
// IFEval's loose check (any of the 8 variants).
absl::StatusOr<bool> CheckInstructionLoose(const IfEvalInstruction& instruction,
                                           const std::string& response);

class IfEvalReward final : public Reward {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<IfEvalReward>> Create(
      const nlohmann::json& options);
  absl::StatusOr<RewardResult> Score(const nlohmann::json& record, const std::string& completion,
                                     const nlohmann::json& metadata) const override;

 private:
  IfEvalReward(bool loose, bool all) : loose_(loose), all_(all) {}
  bool loose_;
  bool all_;
};

}  // namespace retort::rewards

#endif  // RETORT_REWARDS_IFEVAL_H_
