// The registry, the weighted sum, the per-domain selector, determinism and
// thread-safety of the rewards.
#include "rewards/rewards.h"

#include <algorithm>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace retort::rewards {
namespace {

TEST(RewardRegistryTest, BuiltInsAndErrors) {
  const std::vector<std::string> names = RewardRegistry::Global().Names();
  for (const char* n : {"math", "code", "ifeval", "format", "length", "weighted", "by_domain"})
    EXPECT_NE(std::find(names.begin(), names.end(), n), names.end()) << n;
  auto unknown = CreateReward({{"name", "nope"}});
  ASSERT_FALSE(unknown.ok());
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(unknown.status().message().find("math"), std::string::npos);  // lists known names
  EXPECT_EQ(CreateReward({{"options", {}}}).status().code(), absl::StatusCode::kInvalidArgument);
  // The code reward needs a sandbox in the context.
  EXPECT_EQ(CreateReward({{"name", "code"}}).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(RewardRegistry::Global()
                .Register("math",
                          [](const nlohmann::json&, const RewardContext&)
                              -> absl::StatusOr<std::unique_ptr<Reward>> { return nullptr; })
                .code(),
            absl::StatusCode::kAlreadyExists);
}

TEST(WeightedRewardTest, SumsTermsWithWeights) {
  auto reward = CreateReward(nlohmann::json::parse(R"({
      "name": "weighted",
      "options": {"terms": [
        {"name": "math", "weight": 1.0},
        {"name": "format", "weight": 0.2, "options": {"thinking": true}},
        {"name": "length", "weight": 0.5, "options": {"max_length": 100, "cache_length": 20}}]}})"));
  ASSERT_TRUE(reward.ok()) << reward.status();
  const nlohmann::json record = {{"domain", "math"}, {"answer", "4"}};
  auto r = (*reward)->Score(record, "2+2</think>\\boxed{4}", {{"completion_tokens", 90}});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_DOUBLE_EQ(r->score, 1.0 + 0.2 * 1.0 + 0.5 * -0.5) << r->diagnostics.dump();
  ASSERT_EQ(r->diagnostics["terms"].size(), 3u);
  EXPECT_EQ(r->diagnostics["terms"][1]["name"], "format");
  // A term's error is the sum's error, naming the term.
  auto bad = (*reward)->Score(record, "x</think>\\boxed{4}", {});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("length"), std::string::npos) << bad.status();
  EXPECT_FALSE(
      CreateReward({{"name", "weighted"}, {"options", {{"terms", nlohmann::json::array()}}}}).ok());
  EXPECT_FALSE(CreateReward({{"name", "weighted"},
                             {"options", {{"terms", {{{"name", "math"}, {"weight", "heavy"}}}}}}})
                   .ok());
}

TEST(DomainRewardTest, SelectsByDomain) {
  auto reward = CreateReward(nlohmann::json::parse(R"({
      "name": "by_domain",
      "options": {"domains": {
          "math": {"name": "math"},
          "if": {"name": "ifeval", "options": {"mode": "loose"}}}}})"));
  ASSERT_TRUE(reward.ok()) << reward.status();
  auto m = (*reward)->Score({{"domain", "math"}, {"answer", "2"}}, "\\boxed{2}", {});
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->score, 1.0);
  EXPECT_EQ(m->diagnostics["domain"], "math");
  auto i = (*reward)->Score(
      {{"domain", "if"},
       {"constraints", nlohmann::json::parse(R"([{"id": "punctuation:no_comma"}])")}},
      "no commas", {});
  ASSERT_TRUE(i.ok()) << i.status();
  EXPECT_EQ(i->score, 1.0);
  EXPECT_EQ((*reward)->Score({{"domain", "poetry"}}, "x", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto bad = CreateReward(nlohmann::json::parse(
      R"({"name": "by_domain", "options": {"domains": {"math": {"name": "math", "options": {"bogus": 1}}}}})"));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("domains.math"), std::string::npos) << bad.status();
}

TEST(RewardPurityTest, DeterministicAndThreadSafe) {
  auto reward = CreateReward({{"name", "math"}});
  ASSERT_TRUE(reward.ok());
  const Reward& math = **reward;
  const std::vector<std::pair<std::string, std::string>> cases = {{"(x+1)^2", "\\boxed{x^2+2x+1}"},
                                                                  {"(x+1)^2", "\\boxed{x^2+2x}"},
                                                                  {"[0,1)", "\\boxed{[0,1)}"},
                                                                  {"\\frac{1}{2}", "\\boxed{0.5}"},
                                                                  {"3", "\\boxed{1+2}"}};
  std::vector<double> expected;
  for (const auto& [ref, completion] : cases) {
    auto r = math.Score({{"answer", ref}}, completion, {{"seed", 7}});
    ASSERT_TRUE(r.ok());
    expected.push_back(r->score);
  }
  EXPECT_EQ(expected, (std::vector<double>{1, 0, 1, 1, 0}));
  // Many threads scoring with one instance agree with the serial results.
  std::vector<std::thread> threads;
  std::vector<int> mismatches(8, 0);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 50; ++rep) {
        for (size_t k = 0; k < cases.size(); ++k) {
          auto r = math.Score({{"answer", cases[k].first}}, cases[k].second, {{"seed", 7}});
          if (!r.ok() || r->score != expected[k]) ++mismatches[t];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 8; ++t) EXPECT_EQ(mismatches[t], 0) << "thread " << t;
}

}  // namespace
}  // namespace retort::rewards
