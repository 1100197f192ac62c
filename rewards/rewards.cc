// The reward registry, the weighted-sum and per-domain combinators, and the
// helpers shared by the built-in rewards (see rewards.h).
#include "rewards/rewards.h"

#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/base/status_macros.h"
#include "rewards/code.h"
#include "rewards/format.h"
#include "rewards/ifeval.h"
#include "rewards/math.h"

namespace retort::rewards {
namespace {

absl::StatusOr<std::unique_ptr<Reward>> MakeWeighted(const nlohmann::json& options,
                                                     const RewardContext& context) {
  RETURN_IF_ERROR(CheckKnownKeys(options, {"terms"}, "weighted options"));
  if (!options.is_object() || !options.contains("terms") || !options["terms"].is_array() ||
      options["terms"].empty())
    return absl::InvalidArgumentError("weighted options.terms must be a non-empty array");
  std::vector<WeightedTerm> terms;
  for (size_t k = 0; k < options["terms"].size(); ++k) {
    const nlohmann::json& t = options["terms"][k];
    const std::string what = absl::StrCat("weighted options.terms[", k, "]");
    RETURN_IF_ERROR(CheckKnownKeys(t, {"name", "weight", "options"}, what));
    WeightedTerm term;
    ASSIGN_OR_RETURN(term.name, GetString(t, "name", "", what));
    ASSIGN_OR_RETURN(term.weight, GetNumber(t, "weight", 1.0, what));
    if (!std::isfinite(term.weight))
      return absl::InvalidArgumentError(what + ".weight is not finite");
    ASSIGN_OR_RETURN(term.reward, CreateReward(t, context));
    terms.push_back(std::move(term));
  }
  return std::unique_ptr<Reward>(new WeightedReward(std::move(terms)));
}

absl::StatusOr<std::unique_ptr<Reward>> MakeByDomain(const nlohmann::json& options,
                                                     const RewardContext& context) {
  RETURN_IF_ERROR(CheckKnownKeys(options, {"domains", "default"}, "by_domain options"));
  if (!options.is_object() || !options.contains("domains") || !options["domains"].is_object())
    return absl::InvalidArgumentError("by_domain options.domains must be an object");
  std::map<std::string, std::unique_ptr<Reward>> by_domain;
  for (const auto& [domain, spec] : options["domains"].items()) {
    auto reward = CreateReward(spec, context);
    if (!reward.ok()) return Annotate(reward.status(), "by_domain options.domains." + domain);
    by_domain[domain] = *std::move(reward);
  }
  std::unique_ptr<Reward> fallback;
  if (options.contains("default")) {
    auto reward = CreateReward(options["default"], context);
    if (!reward.ok()) return Annotate(reward.status(), "by_domain options.default");
    fallback = *std::move(reward);
  }
  return std::unique_ptr<Reward>(new DomainReward(std::move(by_domain), std::move(fallback)));
}

template <typename T>
RewardFactory Plain() {
  return [](const nlohmann::json& options,
            const RewardContext&) -> absl::StatusOr<std::unique_ptr<Reward>> {
    ASSIGN_OR_RETURN(auto reward, T::Create(options));
    return std::unique_ptr<Reward>(std::move(reward));
  };
}

}  // namespace

RewardRegistry& RewardRegistry::Global() {
  static RewardRegistry* registry = [] {
    auto* r = new RewardRegistry;
    // Built-ins; a failure here is a bug (duplicate name).
    absl::Status s;
    s.Update(r->Register("math", Plain<MathReward>()));
    s.Update(r->Register("ifeval", Plain<IfEvalReward>()));
    s.Update(r->Register("format", Plain<FormatReward>()));
    s.Update(r->Register("length", Plain<LengthReward>()));
    s.Update(r->Register("code",
                         [](const nlohmann::json& options, const RewardContext& context)
                             -> absl::StatusOr<std::unique_ptr<Reward>> {
                           ASSIGN_OR_RETURN(auto reward, CodeReward::Create(options, context));
                           return std::unique_ptr<Reward>(std::move(reward));
                         }));
    s.Update(r->Register("weighted", MakeWeighted));
    s.Update(r->Register("by_domain", MakeByDomain));
    if (!s.ok()) std::abort();
    return r;
  }();
  return *registry;
}

absl::Status RewardRegistry::Register(const std::string& name, RewardFactory factory) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!factories_.emplace(name, std::move(factory)).second)
    return absl::AlreadyExistsError(absl::StrCat("reward '", name, "' is already registered"));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Reward>> RewardRegistry::Create(const std::string& name,
                                                               const nlohmann::json& options,
                                                               const RewardContext& context) const {
  RewardFactory factory;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = factories_.find(name);
    if (it == factories_.end()) {
      std::vector<std::string> names;
      for (const auto& [n, f] : factories_) names.push_back(n);
      return absl::NotFoundError(
          absl::StrCat("no reward named '", name, "' (known: ", absl::StrJoin(names, ", "), ")"));
    }
    factory = it->second;
  }
  // Factories read JSON; a type error inside one is bad input, not a crash.
  try {
    return factory(options.is_null() ? nlohmann::json::object() : options, context);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("reward '", name, "' options: ", e.what()));
  }
}

std::vector<std::string> RewardRegistry::Names() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> names;
  for (const auto& [n, f] : factories_) names.push_back(n);
  return names;
}

absl::StatusOr<std::unique_ptr<Reward>> CreateReward(const nlohmann::json& spec,
                                                     const RewardContext& context) {
  if (!spec.is_object() || !spec.contains("name") || !spec["name"].is_string())
    return absl::InvalidArgumentError(
        absl::StrCat("reward spec must be {\"name\": ..., \"options\": {...}}, got ", spec.dump()));
  const nlohmann::json options =
      spec.contains("options") ? spec["options"] : nlohmann::json::object();
  return RewardRegistry::Global().Create(spec["name"].get<std::string>(), options, context);
}

absl::StatusOr<RewardResult> WeightedReward::Score(const nlohmann::json& record,
                                                   const std::string& completion,
                                                   const nlohmann::json& metadata) const {
  RewardResult total;
  total.diagnostics["terms"] = nlohmann::json::array();
  for (const WeightedTerm& term : terms_) {
    auto r = term.reward->Score(record, completion, metadata);
    if (!r.ok()) return Annotate(r.status(), "reward term '" + term.name + "'");
    total.score += term.weight * r->score;
    total.diagnostics["terms"].push_back({{"name", term.name},
                                          {"weight", term.weight},
                                          {"score", r->score},
                                          {"diagnostics", r->diagnostics}});
  }
  return total;
}

absl::StatusOr<RewardResult> DomainReward::Score(const nlohmann::json& record,
                                                 const std::string& completion,
                                                 const nlohmann::json& metadata) const {
  std::string domain;
  if (record.is_object() && record.contains("domain") && record["domain"].is_string())
    domain = record["domain"].get<std::string>();
  const Reward* reward = nullptr;
  if (auto it = by_domain_.find(domain); it != by_domain_.end()) reward = it->second.get();
  if (reward == nullptr) reward = fallback_.get();
  if (reward == nullptr)
    return absl::InvalidArgumentError(
        absl::StrCat("no reward is configured for record.domain '", domain, "'"));
  auto r = reward->Score(record, completion, metadata);
  if (r.ok()) r->diagnostics["domain"] = domain;
  return r;
}

CompletionParts SplitCompletion(const std::string& completion) {
  constexpr absl::string_view kThinkClose = "</think>";
  CompletionParts parts;
  std::string text = completion;
  // Trailing end-of-sentence token(s) and whitespace after them.
  for (;;) {
    const size_t end = text.find_last_not_of(" \t\r\n");
    if (end == std::string::npos) {
      text.clear();
      break;
    }
    text.resize(end + 1);
    if (text.size() >= kEndOfSentence.size() &&
        text.compare(text.size() - kEndOfSentence.size(), kEndOfSentence.size(),
                     kEndOfSentence.data(), kEndOfSentence.size()) == 0) {
      text.resize(text.size() - kEndOfSentence.size());
      continue;
    }
    break;
  }
  size_t pos = 0;
  size_t first = std::string::npos, last = std::string::npos;
  while ((pos = text.find(kThinkClose.data(), pos, kThinkClose.size())) != std::string::npos) {
    if (first == std::string::npos) first = pos;
    last = pos;
    ++parts.think_close_count;
    pos += kThinkClose.size();
  }
  if (first == std::string::npos) {
    parts.answer = text;
    return parts;
  }
  parts.has_think_close = true;
  parts.reasoning = text.substr(0, first);
  parts.answer = text.substr(last + kThinkClose.size());
  return parts;
}

absl::StatusOr<double> GetNumber(const nlohmann::json& obj, const std::string& key, double def,
                                 const std::string& what) {
  if (!obj.is_object() || !obj.contains(key)) return def;
  if (!obj[key].is_number())
    return absl::InvalidArgumentError(
        absl::StrCat(what, ".", key, " must be a number, got ", obj[key].dump()));
  return obj[key].get<double>();
}

absl::StatusOr<bool> GetBool(const nlohmann::json& obj, const std::string& key, bool def,
                             const std::string& what) {
  if (!obj.is_object() || !obj.contains(key)) return def;
  if (!obj[key].is_boolean())
    return absl::InvalidArgumentError(
        absl::StrCat(what, ".", key, " must be true or false, got ", obj[key].dump()));
  return obj[key].get<bool>();
}

absl::StatusOr<std::string> GetString(const nlohmann::json& obj, const std::string& key,
                                      const std::string& def, const std::string& what) {
  if (!obj.is_object() || !obj.contains(key)) return def;
  if (!obj[key].is_string())
    return absl::InvalidArgumentError(
        absl::StrCat(what, ".", key, " must be a string, got ", obj[key].dump()));
  return obj[key].get<std::string>();
}

absl::Status CheckKnownKeys(const nlohmann::json& options, const std::vector<std::string>& known,
                            const std::string& what) {
  if (options.is_null()) return absl::OkStatus();
  if (!options.is_object())
    return absl::InvalidArgumentError(
        absl::StrCat(what, " must be a JSON object, got ", options.dump()));
  for (const auto& [key, value] : options.items()) {
    bool ok = false;
    for (const std::string& k : known) ok = ok || k == key;
    if (!ok)
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": unknown key '", key, "' (known: ", absl::StrJoin(known, ", "), ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> SeedOf(const nlohmann::json& metadata) {
  if (!metadata.is_object() || !metadata.contains("seed")) return uint64_t{0};
  const nlohmann::json& s = metadata["seed"];
  if (s.is_number_unsigned()) return s.get<uint64_t>();
  if (s.is_number_integer() && s.get<int64_t>() >= 0)
    return static_cast<uint64_t>(s.get<int64_t>());
  return absl::InvalidArgumentError(
      absl::StrCat("metadata.seed must be a non-negative integer, got ", s.dump()));
}

}  // namespace retort::rewards
