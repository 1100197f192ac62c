// The test runner for code rewards: stdin/stdout cases and Python
// function-call cases, judged outside the sandbox.
//
// Note [Harness trust]
// In function-call mode the user's code shares an interpreter with our
// harness, so it can find the results descriptor and the nonce by
// introspection. That buys it nothing: the expected values never enter the
// sandbox, so the only record it can forge is an answer it computed itself.
// What the harness must defeat are the cheap hacks: exiting before the checks
// (a case without a record fails), objects whose __eq__ always says yes
// (values cross as json.dumps text and are compared here, as JSON), and
// printing PASS (stdout is ignored; records need the run's nonce). Two
// different records for one case fail that case.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <future>
#include <optional>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "model/base/status_macros.h"
#include "sandbox/internal/access.h"
#include "sandbox/sandbox.h"

namespace retort::sandbox {
namespace {

constexpr char kHarness[] = R"PY(
import json, os, sys

def _retort_describe(e):
    try:
        return (type(e).__name__ + ": " + str(e))[:300]
    except BaseException:
        return "exception"

def _retort_main():
    out = os.fdopen(3, "w", encoding="utf-8")
    with open("/work/cases.json", encoding="utf-8") as f:
        spec = json.load(f)
    nonce = spec["nonce"]
    dumps = json.dumps
    def emit(rec):
        rec["nonce"] = nonce
        out.write(dumps(rec) + "\n")
        out.flush()
    g = {"__name__": "__retort_solution__", "__builtins__": __builtins__}
    try:
        with open("/work/solution.py", encoding="utf-8") as f:
            src = f.read()
        exec(compile(src, "solution.py", "exec"), g)
    except BaseException as e:
        emit({"load_error": _retort_describe(e)})
        return
    fn = g.get(spec["function"])
    if not callable(fn):
        emit({"load_error": "no function named " + spec["function"]})
        return
    for i, args in enumerate(spec["cases"]):
        try:
            value = fn(*args)
            emit({"case": i, "value": dumps(value)})
        except BaseException as e:
            emit({"case": i, "error": _retort_describe(e)})

_retort_main()
)PY";

std::vector<absl::string_view> Tokens(const std::string& s) {
  return absl::StrSplit(s, absl::ByAnyChar(" \t\n\r\v\f"), absl::SkipEmpty());
}

// Parses a whole token as a number (strtod syntax: 1, -2.5e3, inf, nan).
bool ParseNumber(absl::string_view token, double* value) {
  std::string t(token);
  char* end = nullptr;
  *value = std::strtod(t.c_str(), &end);
  return !t.empty() && end == t.c_str() + t.size();
}

bool NumbersClose(double expected, double actual, const Checker& c) {
  if (std::isnan(expected) || std::isnan(actual)) return std::isnan(expected) && std::isnan(actual);
  if (std::isinf(expected) || std::isinf(actual)) return expected == actual;
  const double diff = std::fabs(expected - actual);
  return diff <= c.abs_tol || diff <= c.rel_tol * std::fabs(expected);
}

std::string NewNonce() {
  std::random_device rd;
  std::string nonce;
  for (int i = 0; i < 4; ++i) absl::StrAppend(&nonce, absl::Hex(rd(), absl::kZeroPad8));
  return nonce;
}

CaseResult FromRun(const RunResult& r) {
  CaseResult c;
  c.verdict = r.verdict;
  c.cpu_ms = r.cpu_ms;
  c.wall_ms = r.wall_ms;
  c.reason = r.detail.empty() ? VerdictName(r.verdict) : r.detail;
  return c;
}

void Tally(TestReport* report) {
  report->total = static_cast<int>(report->cases.size());
  report->passed = 0;
  for (const CaseResult& c : report->cases) {
    if (c.passed) ++report->passed;
    if (c.verdict == Verdict::kSandboxFailure) report->sandbox_failure = true;
  }
}

}  // namespace

absl::StatusOr<CheckMode> ParseCheckMode(absl::string_view name) {
  if (name == "exact") return CheckMode::kExact;
  if (name == "whitespace") return CheckMode::kWhitespace;
  if (name == "float") return CheckMode::kFloat;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown checker '", name, "' (expected exact, whitespace or float)"));
}

bool OutputMatches(const std::string& expected, const std::string& actual, const Checker& checker) {
  switch (checker.mode) {
    case CheckMode::kExact:
      return expected == actual;
    case CheckMode::kWhitespace:
      return Tokens(expected) == Tokens(actual);
    case CheckMode::kFloat: {
      std::vector<absl::string_view> e = Tokens(expected), a = Tokens(actual);
      if (e.size() != a.size()) return false;
      for (size_t i = 0; i < e.size(); ++i) {
        double x = 0, y = 0;
        if (ParseNumber(e[i], &x) && ParseNumber(a[i], &y)) {
          if (!NumbersClose(x, y, checker)) return false;
        } else if (e[i] != a[i]) {
          return false;
        }
      }
      return true;
    }
  }
  return false;
}

bool JsonMatches(const nlohmann::json& expected, const nlohmann::json& actual,
                 const Checker& checker) {
  if (expected.is_number() && actual.is_number()) {
    if (checker.mode == CheckMode::kFloat) {
      return NumbersClose(expected.get<double>(), actual.get<double>(), checker);
    }
    return expected == actual;  // 1 == 1.0; integers compare exactly
  }
  if (expected.type() != actual.type()) return false;
  if (expected.is_string()) {
    if (checker.mode == CheckMode::kExact) return expected == actual;
    return Tokens(expected.get<std::string>()) == Tokens(actual.get<std::string>());
  }
  if (expected.is_array()) {
    if (expected.size() != actual.size()) return false;
    for (size_t i = 0; i < expected.size(); ++i) {
      if (!JsonMatches(expected[i], actual[i], checker)) return false;
    }
    return true;
  }
  if (expected.is_object()) {
    if (expected.size() != actual.size()) return false;
    for (auto it = expected.begin(); it != expected.end(); ++it) {
      auto found = actual.find(it.key());
      if (found == actual.end() || !JsonMatches(it.value(), *found, checker)) return false;
    }
    return true;
  }
  return expected == actual;  // null, boolean
}

nlohmann::json TestReportToJson(const TestReport& report) {
  nlohmann::json j;
  j["passed"] = report.passed;
  j["total"] = report.total;
  j["compiled"] = report.compiled;
  j["sandbox_failure"] = report.sandbox_failure;
  if (!report.compile_output.empty()) j["compile_output"] = report.compile_output;
  nlohmann::json cases = nlohmann::json::array();
  for (const CaseResult& c : report.cases) {
    cases.push_back({{"passed", c.passed},
                     {"verdict", VerdictName(c.verdict)},
                     {"reason", c.reason},
                     {"cpu_ms", c.cpu_ms},
                     {"wall_ms", c.wall_ms}});
  }
  j["cases"] = std::move(cases);
  return j;
}

absl::StatusOr<TestReport> RunTests(const Sandbox& sandbox, Language language,
                                    const std::string& program, const std::vector<IoCase>& cases,
                                    const Checker& checker, const Limits& limits,
                                    SandboxPool* pool) {
  if (cases.empty()) return absl::InvalidArgumentError("RunTests: no test cases");
  RunRequest base;
  base.language = language;
  base.program = program;
  base.limits = limits;
  RETURN_IF_ERROR(internal::ValidateRequest(base));
  TestReport report;
  std::string binary;
  if (language == Language::kCpp) {
    RunResult compile = internal::SandboxAccess::Compile(sandbox, program, &binary);
    report.compile_output = compile.compile_output;
    if (compile.verdict != Verdict::kOk) {
      report.compiled = compile.verdict != Verdict::kCompileError;
      for (size_t i = 0; i < cases.size(); ++i) report.cases.push_back(FromRun(compile));
      Tally(&report);
      return report;
    }
  }
  auto run_case = [&sandbox, &binary, &base, &cases](size_t i) {
    RunRequest request = base;
    request.stdin_data = cases[i].stdin_data;
    return internal::SandboxAccess::RunPrepared(sandbox, request,
                                                base.language == Language::kCpp ? &binary : nullptr,
                                                nullptr);
  };
  std::vector<RunResult> runs(cases.size());
  if (pool != nullptr) {
    // Cases run on the pool's workers; binary, base and cases outlive the futures.
    std::vector<std::future<absl::StatusOr<RunResult>>> futures;
    for (size_t i = 0; i < cases.size(); ++i) {
      futures.push_back(internal::SandboxAccess::Submit(
          *pool, [&run_case, i]() -> absl::StatusOr<RunResult> { return run_case(i); }));
    }
    for (size_t i = 0; i < cases.size(); ++i) runs[i] = *futures[i].get();
  } else {
    for (size_t i = 0; i < cases.size(); ++i) runs[i] = run_case(i);
  }
  for (size_t i = 0; i < cases.size(); ++i) {
    const RunResult& r = runs[i];
    CaseResult c = FromRun(r);
    if (r.verdict == Verdict::kOk) {
      c.passed = !r.stdout_truncated && OutputMatches(cases[i].expected_stdout, r.stdout_data, checker);
      c.reason = c.passed ? "ok" : "wrong answer";
    }
    report.cases.push_back(std::move(c));
  }
  Tally(&report);
  return report;
}

absl::StatusOr<TestReport> RunFunctionTests(const Sandbox& sandbox, const std::string& program,
                                            const std::string& function_name,
                                            const std::vector<FunctionCase>& cases,
                                            const Checker& checker, const Limits& limits) {
  if (cases.empty()) return absl::InvalidArgumentError("RunFunctionTests: no test cases");
  if (function_name.empty()) return absl::InvalidArgumentError("RunFunctionTests: empty function name");
  const std::string nonce = NewNonce();
  nlohmann::json spec;
  spec["nonce"] = nonce;
  spec["function"] = function_name;
  spec["cases"] = nlohmann::json::array();
  std::vector<nlohmann::json> expected;
  for (size_t i = 0; i < cases.size(); ++i) {
    nlohmann::json args = nlohmann::json::parse(cases[i].args_json, nullptr, false);
    if (args.is_discarded() || !args.is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat("function case ", i, ": args_json is not a JSON array"));
    }
    nlohmann::json want = nlohmann::json::parse(cases[i].expected_json, nullptr, false);
    if (want.is_discarded()) {
      return absl::InvalidArgumentError(
          absl::StrCat("function case ", i, ": expected_json is not JSON"));
    }
    spec["cases"].push_back(std::move(args));
    expected.push_back(std::move(want));  // stays here: never written into the sandbox
  }
  RunRequest request;
  request.language = Language::kPython;
  request.program = kHarness;
  request.limits = limits;
  request.files = {{"solution.py", program, false}, {"cases.json", spec.dump(), false}};
  RETURN_IF_ERROR(internal::ValidateRequest(request));
  std::string channel;
  RunResult run = internal::SandboxAccess::RunPrepared(sandbox, request, nullptr, &channel);

  // Records: the first record per case wins; a second, different one voids it.
  std::vector<std::optional<nlohmann::json>> records(cases.size());
  std::vector<bool> conflicting(cases.size(), false);
  std::string load_error;
  for (absl::string_view line : absl::StrSplit(channel, '\n', absl::SkipEmpty())) {
    nlohmann::json rec = nlohmann::json::parse(line, nullptr, false);
    if (rec.is_discarded() || !rec.is_object()) continue;
    auto n = rec.find("nonce");
    if (n == rec.end() || !n->is_string() || n->get<std::string>() != nonce) continue;
    if (rec.contains("load_error") && rec["load_error"].is_string()) {
      load_error = rec["load_error"].get<std::string>();
      continue;
    }
    auto c = rec.find("case");
    if (c == rec.end() || !c->is_number_integer()) continue;
    const int64_t i = c->get<int64_t>();
    if (i < 0 || i >= static_cast<int64_t>(cases.size())) continue;
    if (records[i].has_value()) {
      if (*records[i] != rec) conflicting[i] = true;
      continue;
    }
    records[i] = std::move(rec);
  }

  TestReport report;
  for (size_t i = 0; i < cases.size(); ++i) {
    CaseResult c = FromRun(run);
    if (run.verdict == Verdict::kSandboxFailure) {
      report.cases.push_back(std::move(c));
      continue;
    }
    if (!load_error.empty()) {
      c.reason = absl::StrCat("program did not load: ", load_error);
    } else if (conflicting[i]) {
      c.reason = "conflicting results";
    } else if (!records[i].has_value()) {
      c.reason = absl::StrCat("no result (run ended: ", VerdictName(run.verdict),
                              run.detail.empty() ? "" : ", ", run.detail, ")");
    } else if (records[i]->contains("error")) {
      c.reason = absl::StrCat("exception: ", (*records[i])["error"].dump());
    } else {
      auto value = records[i]->find("value");
      nlohmann::json got = value != records[i]->end() && value->is_string()
                               ? nlohmann::json::parse(value->get<std::string>(), nullptr, false)
                               : nlohmann::json();
      if (got.is_discarded()) {
        c.reason = "result is not JSON";
      } else if (JsonMatches(expected[i], got, checker)) {
        c.passed = true;
        c.reason = "ok";
      } else {
        c.reason = "wrong answer";
      }
    }
    report.cases.push_back(std::move(c));
  }
  Tally(&report);
  return report;
}

}  // namespace retort::sandbox
