// `retort reward --name math|code|ifeval|format|length --completion-file F
// [--reference-file R] [--reward-options JSON] [--thinking] [--seed N]`:
// scores one completion and prints one JSON line {"score": x, ...diagnostics}.
// The reference file holds the answer (math), the test cases as JSON (code),
// or the constraint list as JSON (ifeval); format and length need none.
// Exits 0 with a score, 1 when scoring failed (bad input, sandbox failure),
// 2 on bad usage. The code reward runs in the sandbox and refuses to start
// without cgroup limits unless --sandbox-allow-weaker.
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "controller/command.h"
#include "controller/flags.h"
#include "nlohmann/json.hpp"
#include "rewards/rewards.h"
#include "sandbox/sandbox.h"

ABSL_FLAG(std::string, name, "", "reward: math | code | ifeval | format | length");
ABSL_FLAG(std::string, completion_file, "", "reward: file holding the completion text");
ABSL_FLAG(std::string, reference_file, "",
          "reward: the answer (math), test cases JSON (code) or constraint list JSON (ifeval)");
ABSL_FLAG(std::string, reward_options, "{}", "reward: the reward's options as a JSON object");
ABSL_FLAG(bool, thinking, false,
          "reward: the completion is a thinking-mode turn (reasoning</think>answer)");
ABSL_FLAG(int64_t, completion_tokens, -1,
          "reward (length, unit tokens): the completion's length in tokens");
// Defined by controller/sandbox_command.cc; the code reward honours it too.
ABSL_DECLARE_FLAG(bool, sandbox_allow_weaker);

namespace {

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return true;
}

int Fail(const std::string& message, int code) {
  std::fprintf(stderr, "retort reward: %s\n", message.c_str());
  return code;
}

int RunReward(const std::vector<std::string>& args) {
  const std::string name = absl::GetFlag(FLAGS_name);
  if (!args.empty() || name.empty() || absl::GetFlag(FLAGS_completion_file).empty())
    return Fail(
        "usage: retort reward --name math|code|ifeval|format|length --completion-file F "
        "[--reference-file R] [--reward-options JSON] [--thinking] [--seed N]",
        2);
  std::string completion;
  if (!ReadFile(absl::GetFlag(FLAGS_completion_file), &completion))
    return Fail("cannot read --completion-file " + absl::GetFlag(FLAGS_completion_file), 1);
  nlohmann::json options =
      nlohmann::json::parse(absl::GetFlag(FLAGS_reward_options), nullptr, false);
  if (options.is_discarded() || !options.is_object())
    return Fail("--reward-options is not a JSON object", 2);

  nlohmann::json record = {{"domain", name}, {"thinking", absl::GetFlag(FLAGS_thinking)}};
  const std::string reference_file = absl::GetFlag(FLAGS_reference_file);
  const bool needs_reference = name == "math" || name == "code" || name == "ifeval";
  if (needs_reference && reference_file.empty())
    return Fail("--name " + name + " needs --reference-file", 2);
  if (!reference_file.empty()) {
    std::string reference;
    if (!ReadFile(reference_file, &reference))
      return Fail("cannot read --reference-file " + reference_file, 1);
    if (name == "math") {
      const size_t end = reference.find_last_not_of(" \t\r\n");
      record["answer"] = end == std::string::npos ? "" : reference.substr(0, end + 1);
    } else if (name == "code" || name == "ifeval") {
      nlohmann::json parsed = nlohmann::json::parse(reference, nullptr, false);
      if (parsed.is_discarded())
        return Fail("--reference-file " + reference_file + " is not valid JSON", 1);
      record[name == "code" ? "tests" : "constraints"] = parsed;
    }
  }
  nlohmann::json metadata = {{"seed", absl::GetFlag(FLAGS_seed)},
                             {"thinking", absl::GetFlag(FLAGS_thinking)}};
  if (absl::GetFlag(FLAGS_completion_tokens) >= 0)
    metadata["completion_tokens"] = absl::GetFlag(FLAGS_completion_tokens);

  std::unique_ptr<retort::sandbox::Sandbox> sandbox;
  retort::rewards::RewardContext context;
  if (name == "code") {
    retort::sandbox::SandboxOptions sandbox_options;
    if (absl::GetFlag(FLAGS_sandbox_allow_weaker))
      sandbox_options.degraded = retort::sandbox::DegradedPolicy::kAllowWeaker;
    auto created = retort::sandbox::Sandbox::Create(sandbox_options);
    if (!created.ok()) return Fail(created.status().ToString(), 1);
    sandbox = std::move(created).value();
    context.sandbox = sandbox.get();
  }
  auto reward = retort::rewards::CreateReward({{"name", name}, {"options", options}}, context);
  if (!reward.ok()) return Fail(reward.status().ToString(), 2);
  auto result = (*reward)->Score(record, completion, metadata);
  if (!result.ok()) return Fail(result.status().ToString(), 1);
  nlohmann::json line = {{"score", result->score}};
  for (const auto& [key, value] : result->diagnostics.items()) line[key] = value;
  std::printf("%s\n", line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  return 0;
}

}  // namespace

RETORT_COMMAND("reward",
               "score one completion (--name math|code|ifeval|format|length --completion-file F "
               "--reference-file R)",
               RunReward);
