// Rewards for GRPO specialists: pure functions of (prompt record, completion
// text, metadata) -> a score and diagnostics, a registry that builds them by
// name from JSON options, and two combinators: a weighted sum of rewards and
// a per-domain selector that picks a reward by the record's "domain".
//
// Built-in rewards (their headers list the options and record fields):
//   "math"     math.h    final answer vs reference, numbers / structures / algebra
//   "code"     code.h    last fenced code block against test cases, in the sandbox
//   "ifeval"   ifeval.h  IFEval verifiable instructions, strict or loose
//   "format"   format.h  V4 chat-format structure (reasoning</think>answer)
//   "length"   format.h  DAPO overlong shaping with a soft window
//   "weighted" this file {"terms": [{"name", "weight", "options"}, ...]}
//   "by_domain" this file {"domains": {"<domain>": {"name", "options"}, ...},
//                          "default": {"name", "options"} (optional)}
//
// The prompt record is a JSON object: "domain", "prompt" or "messages", and
// per reward "answer" (math), "tests" (code), "constraints" (ifeval),
// "thinking" (format). `metadata` is a JSON object (possibly null): "seed"
// (uint64, randomised checks; default 0), "completion_tokens" (length),
// "thinking" (format; overrides the record).
//
// Contract: Score is deterministic given (record, completion, metadata) --
// randomness only from metadata "seed" -- and a Reward is immutable after it
// is built, so one instance may score from many threads at once. Bad input
// (a record missing the field a reward needs, malformed tests or
// constraints) is InvalidArgument naming the field; a failure of the
// machinery (the sandbox) is Unavailable/Internal, never a score of 0. A
// completion that is simply wrong scores 0 with diagnostics saying why.
#ifndef RETORT_REWARDS_REWARDS_H_
#define RETORT_REWARDS_REWARDS_H_

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace retort::sandbox {
class Sandbox;
class SandboxPool;
}  // namespace retort::sandbox

namespace retort::rewards {

struct RewardResult {
  double score = 0.0;  // [0,1] for verifiers; a scalar for shaping terms (length: [-1,0])
  nlohmann::json diagnostics = nlohmann::json::object();
};

class Reward {
 public:
  virtual ~Reward() = default;
  [[nodiscard]] virtual absl::StatusOr<RewardResult> Score(
      const nlohmann::json& record, const std::string& completion,
      const nlohmann::json& metadata) const = 0;
};

// What a reward may need from its surroundings. Not owned; must outlive the
// rewards built with it. Only "code" needs the sandbox.
struct RewardContext {
  const sandbox::Sandbox* sandbox = nullptr;
  sandbox::SandboxPool* pool = nullptr;  // optional: stdin/stdout cases run concurrently on it
};

using RewardFactory = std::function<absl::StatusOr<std::unique_ptr<Reward>>(
    const nlohmann::json& options, const RewardContext& context)>;

// Name -> factory. Thread-safe. Global() holds the built-ins above.
class RewardRegistry {
 public:
  static RewardRegistry& Global();

  // AlreadyExists when `name` is taken.
  [[nodiscard]] absl::Status Register(const std::string& name, RewardFactory factory);
  // NotFound (listing the known names) for an unknown name; the factory's
  // InvalidArgument for bad options.
  [[nodiscard]] absl::StatusOr<std::unique_ptr<Reward>> Create(const std::string& name,
                                                               const nlohmann::json& options,
                                                               const RewardContext& context) const;
  std::vector<std::string> Names() const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, RewardFactory> factories_;
};

// Builds a reward from a spec {"name": "...", "options": {...}} ("options"
// optional) with the global registry.
[[nodiscard]] absl::StatusOr<std::unique_ptr<Reward>> CreateReward(
    const nlohmann::json& spec, const RewardContext& context = {});

// One term of a weighted sum.
struct WeightedTerm {
  std::string name;  // for diagnostics
  double weight = 1.0;
  std::unique_ptr<Reward> reward;
};

// score = sum_i weight_i * score_i; diagnostics {"terms": [{"name", "weight",
// "score", "diagnostics"}]}. An error of any term is the error of the sum.
class WeightedReward final : public Reward {
 public:
  explicit WeightedReward(std::vector<WeightedTerm> terms) : terms_(std::move(terms)) {}
  absl::StatusOr<RewardResult> Score(const nlohmann::json& record, const std::string& completion,
                                     const nlohmann::json& metadata) const override;

 private:
  std::vector<WeightedTerm> terms_;
};

// Scores with the reward configured for record["domain"] (or the default);
// InvalidArgument when the record has no domain or no reward serves it.
class DomainReward final : public Reward {
 public:
  DomainReward(std::map<std::string, std::unique_ptr<Reward>> by_domain,
               std::unique_ptr<Reward> fallback)
      : by_domain_(std::move(by_domain)), fallback_(std::move(fallback)) {}
  absl::StatusOr<RewardResult> Score(const nlohmann::json& record, const std::string& completion,
                                     const nlohmann::json& metadata) const override;

 private:
  std::map<std::string, std::unique_ptr<Reward>> by_domain_;
  std::unique_ptr<Reward> fallback_;  // may be null
};

// ---- Helpers shared by the rewards -----------------------------------------

// A completion of the V4 chat format split at its reasoning boundary. The
// prompt of a thinking-mode turn ends in "<think>", so the completion is
// `reasoning</think>answer`; a non-think completion is just the answer.
struct CompletionParts {
  bool has_think_close = false;  // a "</think>" was present
  int think_close_count = 0;
  std::string reasoning;  // text before the first "</think>" ("" when none)
  std::string answer;     // text after the last "</think>" (the whole completion when none),
                          // without a trailing end-of-sentence token
};
CompletionParts SplitCompletion(const std::string& completion);

// The V4 end-of-sentence token's text, stripped from a completion's end.
inline constexpr absl::string_view kEndOfSentence =
    "<\xEF\xBD\x9C"
    "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>";

// JSON option readers: the default when absent; InvalidArgument naming
// `what.key` when present with the wrong type.
absl::StatusOr<double> GetNumber(const nlohmann::json& obj, const std::string& key, double def,
                                 const std::string& what);
absl::StatusOr<bool> GetBool(const nlohmann::json& obj, const std::string& key, bool def,
                             const std::string& what);
absl::StatusOr<std::string> GetString(const nlohmann::json& obj, const std::string& key,
                                      const std::string& def, const std::string& what);
// Fails when `options` is not an object (or null) or holds a key outside `known`.
absl::Status CheckKnownKeys(const nlohmann::json& options, const std::vector<std::string>& known,
                            const std::string& what);
// metadata["seed"] as uint64 (0 when absent).
absl::StatusOr<uint64_t> SeedOf(const nlohmann::json& metadata);

}  // namespace retort::rewards

#endif  // RETORT_REWARDS_REWARDS_H_
