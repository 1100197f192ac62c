// The "code" reward: runs the program in the completion's last fenced code
// block against the record's tests in the sandbox (sandbox/sandbox.h) and
// scores the fraction of tests passed, or 1/0 for all-or-nothing.
//
// record.tests, one of:
//   [{"input": "...", "output": "..."}, ...]        stdin -> expected stdout
//     ("stdin"/"stdout" and "expected_output" are accepted as key names)
//   {"inputs": [...], "outputs": [...]}             the same, APPS/TACO style
//   {"fn_name": "f", "inputs": [[args...], ...], "outputs": [value, ...]}
//   {"fn_name": "f", "cases": [{"args": [...], "expected": value}, ...]}
//                                                   call a Python function
// record.language (optional): "python" | "cpp" | "sh".
//
// The language is options.language if set, else the fence's info string
// (```python, ```cpp, ```c++, ```sh, ```bash), else record.language, else
// Python. A completion without a closed fenced block scores 0.
//
// Options: "aggregate": "fraction" (default) | "all"; "language"; "checker":
// "whitespace" (default) | "exact" | "float"; "abs_tol", "rel_tol" (float
// checker; default 1e-6); "cpu_ms" (default 2000), "wall_ms" (default 5000),
// "memory_mb" (default 256) per test case (a function-call run gets the
// per-case limits times the number of cases, at most 10x).
//
// A sandbox failure is Unavailable (the score would mean nothing), never 0.
// Thread-safety: immutable after Create; the sandbox is thread-safe.
#ifndef RETORT_REWARDS_CODE_H_
#define RETORT_REWARDS_CODE_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "rewards/rewards.h"
#include "sandbox/sandbox.h"

namespace retort::rewards {

struct CodeBlock {
  std::string info;  // the fence's info string, lower-cased ("python", "")
  std::string code;
};

// The last closed ``` (or ~~~) fenced block of `text`; nullopt when none.
std::optional<CodeBlock> ExtractLastCodeBlock(const std::string& text);

class CodeReward final : public Reward {
 public:
  // FailedPrecondition when `context.sandbox` is null; InvalidArgument for
  // bad options.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<CodeReward>> Create(
      const nlohmann::json& options, const RewardContext& context);
  absl::StatusOr<RewardResult> Score(const nlohmann::json& record, const std::string& completion,
                                     const nlohmann::json& metadata) const override;

 private:
  CodeReward() = default;
  const sandbox::Sandbox* sandbox_ = nullptr;
  sandbox::SandboxPool* pool_ = nullptr;
  bool all_or_nothing_ = false;
  std::optional<sandbox::Language> language_;
  sandbox::Checker checker_;
  sandbox::Limits limits_;
};

}  // namespace retort::rewards

#endif  // RETORT_REWARDS_CODE_H_
