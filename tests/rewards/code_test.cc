// The code reward: code-block extraction, and scoring through the real
// sandbox (skipped, saying why, where this machine cannot run it).
#include "rewards/code.h"

#include <memory>
#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "sandbox/sandbox.h"

namespace retort::rewards {
namespace {

TEST(CodeBlockTest, LastClosedFence) {
  const std::string text =
      "First:\n```python\nprint(1)\n```\nThen:\n```cpp\nint main() {}\n```\nAnd an open "
      "one:\n```py\nx";
  auto block = ExtractLastCodeBlock(text);
  ASSERT_TRUE(block.has_value());
  EXPECT_EQ(block->info, "cpp");
  EXPECT_EQ(block->code, "int main() {}\n");
  EXPECT_FALSE(ExtractLastCodeBlock("no code here").has_value());
  EXPECT_FALSE(ExtractLastCodeBlock("```python\nprint(1)\n").has_value());  // unclosed
  // A longer fence may hold a shorter one.
  block = ExtractLastCodeBlock("````md\n```\ninner\n```\n````\n");
  ASSERT_TRUE(block.has_value());
  EXPECT_EQ(block->code, "```\ninner\n```\n");
}

class CodeRewardTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    sandbox::SandboxOptions options;
    options.degraded = sandbox::DegradedPolicy::kAllowWeaker;
    auto s = sandbox::Sandbox::Create(options);
    if (s.ok()) {
      sandbox_ = std::move(s).value().release();
    } else {
      skip_reason_ = new std::string(s.status().ToString());
    }
  }
  static void TearDownTestSuite() {
    delete sandbox_;
    sandbox_ = nullptr;
  }
  void SetUp() override {
    if (sandbox_ == nullptr) GTEST_SKIP() << "no sandbox on this machine: " << *skip_reason_;
  }
  std::unique_ptr<Reward> Make(const nlohmann::json& options) {
    RewardContext context;
    context.sandbox = sandbox_;
    auto r = CreateReward({{"name", "code"}, {"options", options}}, context);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? std::move(r).value() : nullptr;
  }
  static sandbox::Sandbox* sandbox_;
  static std::string* skip_reason_;
};
sandbox::Sandbox* CodeRewardTest::sandbox_ = nullptr;
std::string* CodeRewardTest::skip_reason_ = nullptr;

const nlohmann::json kSumTests = nlohmann::json::parse(R"([
    {"input": "1 2\n", "output": "3\n"},
    {"input": "10 -4\n", "output": "6\n"},
    {"input": "0 0\n", "output": "0\n"},
    {"input": "5 5\n", "output": "10\n"}])");

TEST_F(CodeRewardTest, FractionAndAllOrNothing) {
  const nlohmann::json record = {{"domain", "code"}, {"tests", kSumTests}};
  const std::string correct =
      "Here:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```";
  // Wrong whenever a == b (two of four cases).
  const std::string half =
      "```python\na, b = map(int, input().split())\nprint(a + b if a != b else 0 if a == 0 else "
      "-1)\n```";
  auto fraction = Make(nlohmann::json::object());
  auto all = Make({{"aggregate", "all"}});
  ASSERT_TRUE(fraction && all);
  auto r = fraction->Score(record, correct, {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->score, 1.0) << r->diagnostics.dump();
  r = fraction->Score(record, half, {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_DOUBLE_EQ(r->score, 0.75) << r->diagnostics.dump();  // 0 0 -> 0 is right
  r = all->Score(record, half, {});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->score, 0.0);
}

TEST_F(CodeRewardTest, HarnessHacksDoNotPass) {
  const nlohmann::json record = {{"tests", kSumTests}};
  auto reward = Make(nlohmann::json::object());
  ASSERT_TRUE(reward);
  for (const std::string& hack : {std::string("```python\nprint('PASS')\n```"),
                                  std::string("```python\nimport sys\nsys.exit(0)\n```"),
                                  std::string("```sh\nexit 0\n```")}) {
    auto r = reward->Score(record, hack, {});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->score, 0.0) << hack << "\n" << r->diagnostics.dump();
  }
  // No fenced block: nothing runs.
  auto r = reward->Score(record, "a, b = map(int, input().split())\nprint(a + b)", {});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->score, 0.0);
}

TEST_F(CodeRewardTest, CppFromTheFence) {
  const nlohmann::json record = {{"tests", kSumTests}};
  auto reward = Make(nlohmann::json::object());
  ASSERT_TRUE(reward);
  auto r = reward->Score(record,
                         "```cpp\n#include <iostream>\nint main() { long a, b; std::cin >> a >> b; "
                         "std::cout << a + b << \"\\n\"; }\n```",
                         {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->score, 1.0) << r->diagnostics.dump();
  EXPECT_EQ(r->diagnostics["language"], "cpp");
}

TEST_F(CodeRewardTest, FunctionCalls) {
  const nlohmann::json record = {
      {"tests", nlohmann::json::parse(
                    R"({"fn_name": "add", "cases": [{"args": [1, 2], "expected": 3},
                                                    {"args": [[1], [2]], "expected": [1, 2]}]})")}};
  auto reward = Make(nlohmann::json::object());
  ASSERT_TRUE(reward);
  auto r = reward->Score(record, "```python\ndef add(a, b):\n    return a + b\n```", {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->score, 1.0) << r->diagnostics.dump();
  // An object that claims equality with everything is not a value.
  r = reward->Score(record,
                    "```python\nclass Eq:\n    def __eq__(self, o):\n        return True\n"
                    "def add(a, b):\n    return Eq()\n```",
                    {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->score, 0.0) << r->diagnostics.dump();
}

TEST_F(CodeRewardTest, BadOptionsAndTestsAreInvalidArgument) {
  RewardContext context;
  context.sandbox = sandbox_;
  EXPECT_EQ(CodeReward::Create({{"aggregate", "most"}}, context).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CodeReward::Create({{"language", "rust"}}, context).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CodeReward::Create({{"cpu_ms", 0}}, context).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto reward = Make(nlohmann::json::object());
  ASSERT_TRUE(reward);
  const std::string program = "```python\nprint(1)\n```";
  for (const char* tests :
       {R"([])", R"([{"input": "1"}])", R"({"inputs": ["1"], "outputs": []})",
        R"({"fn_name": "f", "cases": [{"args": 1, "expected": 2}]})", R"("x")"}) {
    auto r = reward->Score({{"tests", nlohmann::json::parse(tests)}}, program, {});
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << tests;
  }
  EXPECT_EQ(reward->Score({{"domain", "code"}}, program, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retort::rewards
