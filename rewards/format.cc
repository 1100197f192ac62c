// Format (V4 reasoning/answer structure) and length (DAPO overlong shaping)
// rewards (see format.h).
#include "rewards/format.h"

#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "model/base/status_macros.h"

namespace retort::rewards {
namespace {

bool Blank(const std::string& s) { return absl::StripAsciiWhitespace(s).empty(); }

}  // namespace

absl::StatusOr<std::unique_ptr<FormatReward>> FormatReward::Create(const nlohmann::json& options) {
  RETURN_IF_ERROR(CheckKnownKeys(options, {"thinking", "require_reasoning"}, "format options"));
  std::optional<bool> thinking;
  if (options.is_object() && options.contains("thinking")) {
    ASSIGN_OR_RETURN(const bool t, GetBool(options, "thinking", false, "format options"));
    thinking = t;
  }
  ASSIGN_OR_RETURN(const bool require_reasoning,
                   GetBool(options, "require_reasoning", true, "format options"));
  return std::unique_ptr<FormatReward>(new FormatReward(thinking, require_reasoning));
}

absl::StatusOr<RewardResult> FormatReward::Score(const nlohmann::json& record,
                                                 const std::string& completion,
                                                 const nlohmann::json& metadata) const {
  bool thinking = false;
  std::string source = "default";
  if (thinking_.has_value()) {
    thinking = *thinking_;
    source = "options";
  } else if (metadata.is_object() && metadata.contains("thinking")) {
    ASSIGN_OR_RETURN(thinking, GetBool(metadata, "thinking", false, "metadata"));
    source = "metadata";
  } else if (record.is_object() && record.contains("thinking")) {
    ASSIGN_OR_RETURN(thinking, GetBool(record, "thinking", false, "record"));
    source = "record";
  }
  const CompletionParts parts = SplitCompletion(completion);
  RewardResult r;
  r.diagnostics["thinking"] = thinking;
  r.diagnostics["thinking_from"] = source;
  auto fail = [&](const std::string& why) {
    r.score = 0.0;
    r.diagnostics["reason"] = why;
    return r;
  };
  const bool has_open = completion.find("<think>") != std::string::npos;
  if (thinking) {
    if (parts.think_close_count == 0)
      return fail("thinking turn without </think> (reasoning never ended)");
    if (parts.think_close_count > 1)
      return fail(absl::StrCat(parts.think_close_count, " </think> tags; exactly one expected"));
    if (has_open) return fail("<think> inside the completion (the prompt already opened it)");
    if (require_reasoning_ && Blank(parts.reasoning))
      return fail("empty reasoning before </think>");
  } else {
    if (parts.has_think_close || has_open)
      return fail("non-think turn holds a <think>/</think> reasoning block");
  }
  if (Blank(parts.answer)) return fail("empty answer");
  r.score = 1.0;
  r.diagnostics["reasoning_chars"] = parts.reasoning.size();
  r.diagnostics["answer_chars"] = parts.answer.size();
  return r;
}

double OverlongPenalty(double length, double max_length, double cache_length) {
  const double soft_start = max_length - cache_length;
  if (length <= soft_start) return 0.0;
  if (length > max_length) return -1.0;
  return (soft_start - length) / cache_length;
}

absl::StatusOr<std::unique_ptr<LengthReward>> LengthReward::Create(const nlohmann::json& options) {
  RETURN_IF_ERROR(
      CheckKnownKeys(options, {"max_length", "cache_length", "unit"}, "length options"));
  if (!options.is_object() || !options.contains("max_length") || !options.contains("cache_length"))
    return absl::InvalidArgumentError("length options need max_length and cache_length");
  ASSIGN_OR_RETURN(const double max_length, GetNumber(options, "max_length", 0, "length options"));
  ASSIGN_OR_RETURN(const double cache_length,
                   GetNumber(options, "cache_length", 0, "length options"));
  if (!(cache_length > 0) || !(cache_length <= max_length) || !std::isfinite(max_length))
    return absl::InvalidArgumentError(absl::StrCat(
        "length options: need 0 < cache_length <= max_length, got cache_length=", cache_length,
        " max_length=", max_length));
  ASSIGN_OR_RETURN(const std::string unit, GetString(options, "unit", "tokens", "length options"));
  if (unit != "tokens" && unit != "chars")
    return absl::InvalidArgumentError(
        "length options.unit must be \"tokens\" or \"chars\", got \"" + unit + "\"");
  return std::unique_ptr<LengthReward>(
      new LengthReward(max_length, cache_length, unit == "tokens"));
}

absl::StatusOr<RewardResult> LengthReward::Score(const nlohmann::json& record,
                                                 const std::string& completion,
                                                 const nlohmann::json& metadata) const {
  double length = 0;
  if (tokens_) {
    if (!metadata.is_object() || !metadata.contains("completion_tokens") ||
        !metadata["completion_tokens"].is_number())
      return absl::InvalidArgumentError(
          "length reward (unit tokens): metadata.completion_tokens is missing or not a number");
    length = metadata["completion_tokens"].get<double>();
  } else {
    for (unsigned char c : completion) length += (c & 0xC0) != 0x80;  // UTF-8 lead bytes
  }
  RewardResult r;
  r.score = OverlongPenalty(length, max_length_, cache_length_);
  r.diagnostics["length"] = length;
  r.diagnostics["unit"] = tokens_ ? "tokens" : "chars";
  r.diagnostics["soft_start"] = max_length_ - cache_length_;
  r.diagnostics["max_length"] = max_length_;
  return r;
}

}  // namespace retort::rewards
