// The code reward: last fenced block -> sandbox test runner (see code.h).
#include "rewards/code.h"

#include <algorithm>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "model/base/status_macros.h"

namespace retort::rewards {
namespace {

using sandbox::Language;

std::optional<Language> LanguageOfInfo(const std::string& info) {
  const std::string word = info.substr(0, info.find_first_of(" \t{"));
  if (word == "python" || word == "py" || word == "python3") return Language::kPython;
  if (word == "cpp" || word == "c++" || word == "cc" || word == "cxx") return Language::kCpp;
  if (word == "sh" || word == "bash" || word == "shell") return Language::kSh;
  return std::nullopt;
}

// JSON value of a case field: strings stay as they are, anything else
// (numbers in some datasets) is serialised.
std::string AsText(const nlohmann::json& v) {
  return v.is_string() ? v.get<std::string>() : v.dump();
}

struct Tests {
  std::vector<sandbox::IoCase> io;
  std::string fn_name;
  std::vector<sandbox::FunctionCase> calls;
};

absl::StatusOr<Tests> ParseTests(const nlohmann::json& t) {
  Tests tests;
  if (t.is_array()) {
    for (size_t k = 0; k < t.size(); ++k) {
      const nlohmann::json& c = t[k];
      const std::string what = absl::StrCat("record.tests[", k, "]");
      if (!c.is_object()) return absl::InvalidArgumentError(what + " must be an object");
      const char* in_key = c.contains("input") ? "input" : c.contains("stdin") ? "stdin" : nullptr;
      const char* out_key = c.contains("output")            ? "output"
                            : c.contains("expected_output") ? "expected_output"
                            : c.contains("stdout")          ? "stdout"
                                                            : nullptr;
      if (out_key == nullptr) return absl::InvalidArgumentError(what + " has no \"output\"");
      tests.io.push_back({in_key == nullptr ? "" : AsText(c[in_key]), AsText(c[out_key])});
    }
  } else if (t.is_object()) {
    if (t.contains("fn_name")) {
      if (!t["fn_name"].is_string() || t["fn_name"].get<std::string>().empty())
        return absl::InvalidArgumentError("record.tests.fn_name must be a non-empty string");
      tests.fn_name = t["fn_name"].get<std::string>();
    }
    if (t.contains("cases")) {
      if (tests.fn_name.empty() || !t["cases"].is_array())
        return absl::InvalidArgumentError("record.tests.cases needs fn_name and must be an array");
      for (size_t k = 0; k < t["cases"].size(); ++k) {
        const nlohmann::json& c = t["cases"][k];
        if (!c.is_object() || !c.contains("args") || !c["args"].is_array() ||
            !c.contains("expected"))
          return absl::InvalidArgumentError(absl::StrCat(
              "record.tests.cases[", k, "] must be {\"args\": [...], \"expected\": value}"));
        tests.calls.push_back({c["args"].dump(), c["expected"].dump()});
      }
    } else {
      if (!t.contains("inputs") || !t.contains("outputs") || !t["inputs"].is_array() ||
          !t["outputs"].is_array() || t["inputs"].size() != t["outputs"].size())
        return absl::InvalidArgumentError(
            "record.tests needs arrays \"inputs\" and \"outputs\" of the same length");
      for (size_t k = 0; k < t["inputs"].size(); ++k) {
        if (tests.fn_name.empty()) {
          tests.io.push_back({AsText(t["inputs"][k]), AsText(t["outputs"][k])});
        } else {
          const nlohmann::json& args = t["inputs"][k];
          if (!args.is_array())
            return absl::InvalidArgumentError(
                absl::StrCat("record.tests.inputs[", k, "] must be an array of arguments"));
          tests.calls.push_back({args.dump(), t["outputs"][k].dump()});
        }
      }
    }
  } else {
    return absl::InvalidArgumentError("record.tests must be an array or an object");
  }
  if (tests.io.empty() && tests.calls.empty())
    return absl::InvalidArgumentError("record.tests holds no test case");
  return tests;
}

}  // namespace

std::optional<CodeBlock> ExtractLastCodeBlock(const std::string& text) {
  std::optional<CodeBlock> last;
  bool open = false;
  char fence_char = 0;
  size_t fence_len = 0;
  CodeBlock current;
  for (absl::string_view line_view : absl::StrSplit(text, '\n')) {
    const std::string line(line_view);
    const std::string stripped(absl::StripLeadingAsciiWhitespace(line));
    size_t run = 0;
    const char c = stripped.empty() ? 0 : stripped[0];
    if (c == '`' || c == '~')
      while (run < stripped.size() && stripped[run] == c) ++run;
    if (!open) {
      if (run >= 3) {
        open = true;
        fence_char = c;
        fence_len = run;
        current = CodeBlock{};
        current.info = absl::AsciiStrToLower(absl::StripAsciiWhitespace(stripped.substr(run)));
      }
      continue;
    }
    if (c == fence_char && run >= fence_len &&
        absl::StripAsciiWhitespace(stripped.substr(run)).empty()) {
      open = false;
      last = current;
      continue;
    }
    current.code += line;
    current.code += '\n';
  }
  return last;
}

absl::StatusOr<std::unique_ptr<CodeReward>> CodeReward::Create(const nlohmann::json& options,
                                                               const RewardContext& context) {
  RETURN_IF_ERROR(CheckKnownKeys(
      options,
      {"aggregate", "language", "checker", "abs_tol", "rel_tol", "cpu_ms", "wall_ms", "memory_mb"},
      "code options"));
  if (context.sandbox == nullptr)
    return absl::FailedPreconditionError("code reward needs a sandbox (RewardContext.sandbox)");
  std::unique_ptr<CodeReward> r(new CodeReward);
  r->sandbox_ = context.sandbox;
  r->pool_ = context.pool;
  ASSIGN_OR_RETURN(const std::string aggregate,
                   GetString(options, "aggregate", "fraction", "code options"));
  if (aggregate != "fraction" && aggregate != "all")
    return absl::InvalidArgumentError("code options.aggregate must be \"fraction\" or \"all\"");
  r->all_or_nothing_ = aggregate == "all";
  ASSIGN_OR_RETURN(const std::string language, GetString(options, "language", "", "code options"));
  if (!language.empty()) {
    auto l = sandbox::ParseLanguage(language);
    if (!l.ok()) return Annotate(l.status(), "code options.language");
    r->language_ = *l;
  }
  ASSIGN_OR_RETURN(const std::string checker,
                   GetString(options, "checker", "whitespace", "code options"));
  auto mode = sandbox::ParseCheckMode(checker);
  if (!mode.ok()) return Annotate(mode.status(), "code options.checker");
  r->checker_.mode = *mode;
  ASSIGN_OR_RETURN(r->checker_.abs_tol, GetNumber(options, "abs_tol", 1e-6, "code options"));
  ASSIGN_OR_RETURN(r->checker_.rel_tol, GetNumber(options, "rel_tol", 1e-6, "code options"));
  ASSIGN_OR_RETURN(const double cpu_ms, GetNumber(options, "cpu_ms", 2000, "code options"));
  ASSIGN_OR_RETURN(const double wall_ms, GetNumber(options, "wall_ms", 5000, "code options"));
  ASSIGN_OR_RETURN(const double memory_mb, GetNumber(options, "memory_mb", 256, "code options"));
  if (cpu_ms < 1 || wall_ms < 1 || memory_mb < 1)
    return absl::InvalidArgumentError("code options: cpu_ms, wall_ms and memory_mb must be >= 1");
  r->limits_.cpu_ms = static_cast<int64_t>(cpu_ms);
  r->limits_.wall_ms = static_cast<int64_t>(wall_ms);
  r->limits_.memory_mb = static_cast<int64_t>(memory_mb);
  return r;
}

absl::StatusOr<RewardResult> CodeReward::Score(const nlohmann::json& record,
                                               const std::string& completion,
                                               const nlohmann::json& metadata) const {
  if (!record.is_object() || !record.contains("tests"))
    return absl::InvalidArgumentError("code reward: record.tests is missing");
  ASSIGN_OR_RETURN(const Tests tests, ParseTests(record["tests"]));
  RewardResult r;
  const std::optional<CodeBlock> block = ExtractLastCodeBlock(SplitCompletion(completion).answer);
  if (!block.has_value()) {
    r.diagnostics["reason"] = "no closed fenced code block in the answer";
    return r;
  }
  Language language = Language::kPython;
  if (language_.has_value()) {
    language = *language_;
  } else if (auto l = LanguageOfInfo(block->info)) {
    language = *l;
  } else if (record.contains("language") && record["language"].is_string()) {
    auto parsed = sandbox::ParseLanguage(record["language"].get<std::string>());
    if (!parsed.ok()) return Annotate(parsed.status(), "code reward: record.language");
    language = *parsed;
  }
  r.diagnostics["language"] = sandbox::LanguageName(language);
  absl::StatusOr<sandbox::TestReport> report;
  if (!tests.calls.empty()) {
    if (language != Language::kPython) {
      r.diagnostics["reason"] = "function-call tests need a Python program";
      return r;
    }
    sandbox::Limits limits = limits_;
    const int64_t scale = std::min<int64_t>(static_cast<int64_t>(tests.calls.size()), 10);
    limits.cpu_ms *= scale;
    limits.wall_ms *= scale;
    report = sandbox::RunFunctionTests(*sandbox_, block->code, tests.fn_name, tests.calls, checker_,
                                       limits);
  } else {
    report =
        sandbox::RunTests(*sandbox_, language, block->code, tests.io, checker_, limits_, pool_);
  }
  if (!report.ok()) return Annotate(report.status(), "code reward");
  if (report->sandbox_failure)
    return absl::UnavailableError(absl::StrCat("code reward: the sandbox failed; no score (",
                                               sandbox::TestReportToJson(*report).dump(), ")"));
  r.score = all_or_nothing_ ? (report->all_passed() ? 1.0 : 0.0) : report->fraction();
  r.diagnostics["passed"] = report->passed;
  r.diagnostics["total"] = report->total;
  r.diagnostics["report"] = sandbox::TestReportToJson(*report);
  return r;
}

}  // namespace retort::rewards
