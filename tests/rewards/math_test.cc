// The math grader: a table of (answer, reference, verdict) pairs covering
// numbers, structures, algebra and the false-positive traps of the issue,
// plus extraction and the reward's JSON surface.
#include "rewards/math.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace retort::rewards {
namespace {

struct Pair {
  const char* answer;
  const char* reference;
  bool correct;
};

// Each row is one judgement a contest grader would make.
const Pair kPairs[] = {
    // Integers, exactly, at any size.
    {"42", "42", true},
    {"042", "42", true},
    {"-7", "-7", true},
    {"7", "-7", false},
    {"123456789012345678901234567890", "123456789012345678901234567890", true},
    {"123456789012345678901234567891", "123456789012345678901234567890", false},
    {"3.0", "3", true},
    {"2.9999999", "3", false},
    // Decimals and fractions by value.
    {"0.5", "\\frac{1}{2}", true},
    {"\\frac12", "0.5", true},
    {"\\dfrac{1}{2}", "\\frac{1}{2}", true},
    {"\\tfrac{3}{4}", "0.75", true},
    {"1/2", "\\frac{1}{2}", true},
    {"\\frac{2}{4}", "\\frac{1}{2}", true},
    {"-\\frac{1}{2}", "\\frac{-1}{2}", true},
    {"0.333", "\\frac{1}{3}", false},
    {"0.5", "50", false},  // trap
    {"50\\%", "50", true},
    {".5", "0.5", true},
    // Scientific notation.
    {"1.5e3", "1500", true},
    {"1.5\\times10^{3}", "1500", true},
    {"1.5 \\cdot 10^3", "1500", true},
    {"10^{-3}", "0.001", true},
    {"1.5e3", "150", false},
    // Thousands separators, units, degrees, trailing periods.
    {"1,000,000", "1000000", true},
    {"1{,}000", "1000", true},
    {"5\\text{ cm}", "5", true},
    {"12\\text{ cm}^2", "12", true},
    {"12 square units", "12", true},
    {"30^\\circ", "30", true},
    {"30^{\\circ}", "30", true},
    {"17.", "17", true},
    {"\\$25", "25", true},
    {"\\left(\\frac{1}{2}\\right)", "\\frac12", true},
    // Unevaluated arithmetic is not the number.
    {"1+2", "3", false},  // trap
    {"2\\cdot3", "6", false},
    {"\\sqrt{4}", "2", false},
    {"\\frac{6}{2}", "3", true},  // a fraction literal of the right value
    // Non-literal references compare by value.
    {"\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", true},
    {"\\sqrt{8}", "2\\sqrt{2}", true},
    {"\\sqrt{8}", "3\\sqrt{2}", false},
    {"2\\pi", "\\pi \\cdot 2", true},
    {"\\frac{\\pi}{2}", "\\frac{\\pi}{3}", false},
    {"1024", "2^{10}", true},
    {"\\log_2 8", "3", false},  // unevaluated
    {"e^{2}", "e^2", true},
    // Tuples ordered; intervals with their ends; sets unordered.
    {"(1, 2)", "(1,2)", true},
    {"(2, 1)", "(1,2)", false},
    {"(0,9)", "[0,9)", false},  // trap
    {"[0,9)", "[0,9)", true},
    {"[0, 9]", "[0,9)", false},
    {"(-\\infty, 3]", "(-\\infty,3]", true},
    {"(-\\infty, 3)", "(-\\infty,3]", false},
    {"x \\in [0, 1]", "[0,1]", true},
    {"(-\\infty,1)\\cup(2,\\infty)", "(2,\\infty)\\cup(-\\infty,1)", true},
    {"(-\\infty,1)\\cup(2,\\infty)", "(-\\infty,1]\\cup(2,\\infty)", false},
    {"\\{3, 1, 2\\}", "\\{1,2,3\\}", true},
    {"\\{1, 2\\}", "\\{1,2,3\\}", false},
    {"(\\frac{1}{2}, 0.25)", "(0.5, \\frac14)", true},
    // Multiple answers.
    {"2, -3", "-3, 2", true},
    {"x=2 \\text{ or } x=-3", "-3, 2", true},
    {"2", "2, -3", false},
    {"2, 3", "2, -3", false},
    // Matrices.
    {"\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}",
     true},
    {"\\begin{pmatrix} 1 & 2 \\\\ 4 & 3 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
     false},
    {"\\begin{pmatrix} 1 & 2 & 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}",
     false},
    // Relations.
    {"x>5", "x<5", false},  // trap
    {"x > 5", "x>5", true},
    {"5 < x", "x > 5", true},
    {"x \\geq 5", "x>=5", true},
    {"x \\ge 5", "x > 5", false},
    {"x = 5", "5", true},
    {"y = 2x + 1", "y=1+2x", true},
    {"y = 2x + 2", "y=1+2x", false},
    {"1 < x \\le 4", "1<x\\leq4", true},
    // Algebraic equivalence.
    {"x^2 + 2x + 1", "(x+1)^2", true},
    {"x^2 + 2x - 1", "(x+1)^2", false},
    {"\\frac{x^2-1}{x-1}", "x+1", true},
    {"2ab", "2ba", true},
    {"2ab", "2a", false},
    {"\\sin^2 x + \\cos^2 x", "1", false},  // unevaluated for a literal reference
    {"\\frac{1}{x} + \\frac{1}{y}", "\\frac{x+y}{xy}", true},
    {"\\sqrt{x^2}", "x", false},
    {"\\sqrt{x^2}", "|x|", true},
    {"3x", "3y", false},
    {"e^{x}e^{x}", "e^{2x}", true},
    {"\\frac{\\sqrt{3}}{2}x", "\\frac{x\\sqrt3}{2}", true},
    // Text answers.
    {"\\text{Monday}", "Monday", true},
    {"monday", "Monday", true},
    {"yadnoM", "Monday", false},
    {"\\text{(A)}", "A", true},
    {"B", "A", false},
};

TEST(MathGraderTest, TableOfAnswerPairs) {
  MathOptions options;
  int checked = 0;
  for (const Pair& p : kPairs) {
    const MathVerdict v = GradeMathAnswer(p.answer, p.reference, options, /*seed=*/1234);
    EXPECT_EQ(v.correct, p.correct)
        << "answer '" << p.answer << "' vs reference '" << p.reference << "' (seed 1234): method "
        << v.method << ", reason '" << v.reason << "', normalised '" << v.normalized_answer
        << "' vs '" << v.normalized_reference << "'";
    ++checked;
  }
  EXPECT_GE(checked, 60);
}

TEST(MathGraderTest, VerdictsDoNotDependOnTheSeedForTheTable) {
  MathOptions options;
  for (uint64_t seed : {0ull, 1ull, 99ull, 0xdeadbeefull}) {
    for (const Pair& p : kPairs) {
      EXPECT_EQ(GradeMathAnswer(p.answer, p.reference, options, seed).correct, p.correct)
          << "answer '" << p.answer << "' vs '" << p.reference << "' seed " << seed;
    }
  }
}

TEST(MathGraderTest, AllowUnevaluatedAcceptsArithmetic) {
  MathOptions options;
  options.allow_unevaluated = true;
  EXPECT_TRUE(GradeMathAnswer("1+2", "3", options, 0).correct);
  EXPECT_TRUE(GradeMathAnswer("\\sqrt{4}", "2", options, 0).correct);
  EXPECT_FALSE(GradeMathAnswer("1+3", "3", options, 0).correct);
}

TEST(MathGraderTest, NormalisationSteps) {
  EXPECT_EQ(NormalizeMathAnswer("\\dfrac{1}{2}."), "\\frac{1}{2}");
  EXPECT_EQ(NormalizeMathAnswer("1,234,567"), "1234567");
  EXPECT_EQ(NormalizeMathAnswer("\\left( 1, 2 \\right)"), "( 1, 2 )");
  EXPECT_EQ(NormalizeMathAnswer("90^\\circ"), "90");
  EXPECT_EQ(NormalizeMathAnswer("5\\text{ meters}"), "5");
  EXPECT_EQ(NormalizeMathAnswer("$\\frac{3}{4}$"), "\\frac{3}{4}");
  // A tuple's comma is not a thousands separator.
  EXPECT_EQ(NormalizeMathAnswer("(1,234)"), "(1,234)");
}

TEST(MathGraderTest, HostileAnswersAreJudgedNotCrashed) {
  MathOptions options;
  const std::string deep = std::string(3000, '(') + "1" + std::string(3000, ')');
  EXPECT_FALSE(GradeMathAnswer(deep, "1", options, 0).correct);
  const std::string nested_frac = [] {
    std::string s = "1";
    for (int k = 0; k < 1000; ++k) s = "\\frac{" + s + "}{1}";
    return s;
  }();
  EXPECT_FALSE(GradeMathAnswer(nested_frac, "2", options, 0).correct);
  EXPECT_FALSE(GradeMathAnswer(std::string(100000, '-') + "1", "-1", options, 0).correct);
  EXPECT_FALSE(GradeMathAnswer("2^{2^{2^{2^{2^{2}}}}}", "4", options, 0).correct);
  EXPECT_FALSE(GradeMathAnswer("x^{1000000}", "x", options, 0).correct);
}

TEST(MathExtractTest, LastBoxedWithBalancedBraces) {
  EXPECT_EQ(ExtractBoxed("so \\boxed{1} no wait \\boxed{\\frac{1}{2}}."), "\\frac{1}{2}");
  EXPECT_EQ(ExtractBoxed("\\boxed{\\{1, 2\\}}"), "\\{1, 2\\}");
  EXPECT_EQ(ExtractBoxed("answer \\boxed 5$"), "5");
  EXPECT_EQ(ExtractBoxed("\\fbox{7}"), "7");
  EXPECT_FALSE(ExtractBoxed("\\boxed{\\frac{1}{2}").has_value());  // unclosed
  EXPECT_FALSE(ExtractBoxed("no answer here").has_value());
}

TEST(MathRewardTest, ScoresTheAnswerAfterThinking) {
  auto reward = MathReward::Create(nlohmann::json::object());
  ASSERT_TRUE(reward.ok()) << reward.status();
  const nlohmann::json record = {{"domain", "math"}, {"answer", "\\frac{1}{2}"}};
  // The reasoning's \boxed{} is a draft; the answer after </think> counts.
  auto r = (*reward)->Score(record, "try \\boxed{1/2}</think>The answer is \\boxed{0.5}.", {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->score, 1.0) << r->diagnostics.dump();
  EXPECT_EQ(r->diagnostics["extracted"], "0.5");
  r = (*reward)->Score(record, "try \\boxed{1/2}</think>The answer is 1/3.", {});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->score, 0.0);
  EXPECT_TRUE(r->diagnostics.contains("reason"));
  // A thinking turn that never closed its reasoning has no answer.
  r = (*reward)->Score(record, "reasoning... \\boxed{0.5}", {{"thinking", true}});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->score, 0.0);
  // Numbers in the record work too.
  r = (*reward)->Score({{"answer", 12}}, "\\boxed{12}", {});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->score, 1.0);
}

TEST(MathRewardTest, AnswerPatternWhenNoBoxed) {
  auto reward = MathReward::Create({{"answer_pattern", "(?i)answer:\\s*([^\\n]+)"}});
  ASSERT_TRUE(reward.ok()) << reward.status();
  auto r = (*reward)->Score({{"answer", "7"}}, "Work.\nAnswer: 3\nAnswer: 7", {});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->score, 1.0) << r->diagnostics.dump();
  // Without a pattern the same text has no answer.
  auto plain = MathReward::Create(nlohmann::json::object());
  ASSERT_TRUE(plain.ok());
  r = (*plain)->Score({{"answer", "7"}}, "Answer: 7", {});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->score, 0.0);
}

TEST(MathRewardTest, BadInputIsAnError) {
  EXPECT_FALSE(MathReward::Create({{"answer_pattern", "("}}).ok());
  EXPECT_FALSE(MathReward::Create({{"no_such_option", 1}}).ok());
  EXPECT_FALSE(MathReward::Create({{"rel_tol", "small"}}).ok());
  auto reward = MathReward::Create(nlohmann::json::object());
  ASSERT_TRUE(reward.ok());
  EXPECT_EQ((*reward)->Score({{"domain", "math"}}, "\\boxed{1}", {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*reward)->Score({{"answer", "1"}}, "\\boxed{1}", {{"seed", -1}}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retort::rewards
