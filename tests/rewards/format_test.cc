// Format (V4 reasoning/answer structure) and length (DAPO overlong) rewards.
#include "rewards/format.h"

#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace retort::rewards {
namespace {

double FormatScore(const std::string& completion, bool thinking, bool require_reasoning = true) {
  auto reward =
      FormatReward::Create({{"thinking", thinking}, {"require_reasoning", require_reasoning}});
  EXPECT_TRUE(reward.ok()) << reward.status();
  auto r = (*reward)->Score(nlohmann::json::object(), completion, nlohmann::json::object());
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->score : -99;
}

TEST(FormatRewardTest, ThinkingTurn) {
  const std::string eos(kEndOfSentence);
  EXPECT_EQ(FormatScore("Let me think.</think>The answer is 4.", true), 1.0);
  EXPECT_EQ(FormatScore("Let me think.</think>The answer is 4." + eos, true), 1.0);
  EXPECT_EQ(FormatScore("Let me think. The answer is 4.", true), 0.0);  // never closed
  EXPECT_EQ(FormatScore("a</think>b</think>c", true), 0.0);             // two closes
  EXPECT_EQ(FormatScore("<think>a</think>b", true), 0.0);               // re-opened
  EXPECT_EQ(FormatScore("Let me think.</think>  \n", true), 0.0);       // empty answer
  EXPECT_EQ(FormatScore("Let me think.</think>" + eos, true), 0.0);     // only EOS
  EXPECT_EQ(FormatScore("  </think>answer", true), 0.0);                // empty reasoning
  EXPECT_EQ(FormatScore("  </think>answer", true, /*require_reasoning=*/false), 1.0);
}

TEST(FormatRewardTest, NonThinkTurn) {
  EXPECT_EQ(FormatScore("The answer is 4.", false), 1.0);
  EXPECT_EQ(FormatScore("hidden</think>The answer is 4.", false), 0.0);
  EXPECT_EQ(FormatScore("<think>x</think>The answer is 4.", false), 0.0);
  EXPECT_EQ(FormatScore("   ", false), 0.0);
}

TEST(FormatRewardTest, ThinkingModeFromMetadataOrRecord) {
  auto reward = FormatReward::Create(nlohmann::json::object());
  ASSERT_TRUE(reward.ok());
  const std::string completion = "reasoning</think>answer";
  auto from_record = (*reward)->Score({{"thinking", true}}, completion, {});
  ASSERT_TRUE(from_record.ok());
  EXPECT_EQ(from_record->score, 1.0);
  // Metadata overrides the record.
  auto from_metadata = (*reward)->Score({{"thinking", true}}, completion, {{"thinking", false}});
  ASSERT_TRUE(from_metadata.ok());
  EXPECT_EQ(from_metadata->score, 0.0);
  EXPECT_EQ(from_metadata->diagnostics["thinking_from"], "metadata");
  EXPECT_FALSE((*reward)->Score({{"thinking", "yes"}}, completion, {}).ok());
}

TEST(LengthRewardTest, OverlongPenaltyShape) {
  // L_max = 100, L_cache = 20: flat to 80, linear to -1 at 100, -1 beyond.
  EXPECT_EQ(OverlongPenalty(0, 100, 20), 0.0);
  EXPECT_EQ(OverlongPenalty(80, 100, 20), 0.0);
  EXPECT_DOUBLE_EQ(OverlongPenalty(81, 100, 20), -0.05);
  EXPECT_DOUBLE_EQ(OverlongPenalty(90, 100, 20), -0.5);
  EXPECT_DOUBLE_EQ(OverlongPenalty(100, 100, 20), -1.0);
  EXPECT_EQ(OverlongPenalty(101, 100, 20), -1.0);
  EXPECT_EQ(OverlongPenalty(1e9, 100, 20), -1.0);
}

TEST(LengthRewardTest, TokensFromMetadataOrChars) {
  auto tokens = LengthReward::Create({{"max_length", 100}, {"cache_length", 20}});
  ASSERT_TRUE(tokens.ok()) << tokens.status();
  auto r = (*tokens)->Score({}, "ignored", {{"completion_tokens", 90}});
  ASSERT_TRUE(r.ok());
  EXPECT_DOUBLE_EQ(r->score, -0.5);
  EXPECT_EQ((*tokens)->Score({}, "x", {}).status().code(), absl::StatusCode::kInvalidArgument);
  auto chars = LengthReward::Create({{"max_length", 4}, {"cache_length", 2}, {"unit", "chars"}});
  ASSERT_TRUE(chars.ok());
  // Three code points (one of them two bytes) -> 3 - 2 = 1 into a 2-wide window.
  r = (*chars)->Score({}, "a\xC3\xA9z", {});
  ASSERT_TRUE(r.ok());
  EXPECT_DOUBLE_EQ(r->score, -0.5);
  EXPECT_FALSE(LengthReward::Create({{"max_length", 10}, {"cache_length", 20}}).ok());
  EXPECT_FALSE(LengthReward::Create({{"max_length", 10}, {"cache_length", 0}}).ok());
  EXPECT_FALSE(LengthReward::Create({{"max_length", 10}}).ok());
  EXPECT_FALSE(
      LengthReward::Create({{"max_length", 10}, {"cache_length", 5}, {"unit", "words"}}).ok());
}

TEST(SplitCompletionTest, ReasoningAndAnswer) {
  const CompletionParts p = SplitCompletion("r1</think>a1" + std::string(kEndOfSentence) + "\n");
  EXPECT_TRUE(p.has_think_close);
  EXPECT_EQ(p.think_close_count, 1);
  EXPECT_EQ(p.reasoning, "r1");
  EXPECT_EQ(p.answer, "a1");
  const CompletionParts q = SplitCompletion("plain answer");
  EXPECT_FALSE(q.has_think_close);
  EXPECT_EQ(q.answer, "plain answer");
}

}  // namespace
}  // namespace retort::rewards
