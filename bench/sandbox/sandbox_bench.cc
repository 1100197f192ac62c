// sandbox_bench: per-run overhead and executions/s of the sandbox for an
// empty Python program and an empty C program (compiled once, then run), run
// one at a time and on a SandboxPool of --workers threads (default: cores).
// Prints one table. Usage: sandbox_bench [runs_per_row] [workers]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "sandbox/internal/access.h"
#include "sandbox/sandbox.h"

namespace {

using retort::sandbox::Language;
using retort::sandbox::RunRequest;
using retort::sandbox::RunResult;
using retort::sandbox::Sandbox;
using retort::sandbox::SandboxPool;
using retort::sandbox::Verdict;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

int main(int argc, char** argv) {
  const int runs = argc > 1 ? std::atoi(argv[1]) : 40;
  const int workers = argc > 2 ? std::atoi(argv[2])
                               : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  auto sandbox = Sandbox::Create({});
  if (!sandbox.ok()) {
    std::fprintf(stderr, "sandbox_bench: %s\n", sandbox.status().ToString().c_str());
    return 1;
  }
  struct Row {
    const char* name;
    Language language;
    std::string program;
  };
  std::vector<Row> rows = {
      {"empty python", Language::kPython, ""},
      {"empty C", Language::kCpp, "int main(){return 0;}"},
      {"true (sh)", Language::kSh, "true"},
  };
  std::printf("sandbox_bench: %d runs per row, pool of %d workers; %s\n", runs, workers,
              (*sandbox)->capabilities().c_str());
  std::printf("%-22s %14s %14s %14s %12s\n", "program", "serial ms/run", "serial runs/s",
              "pool runs/s", "compile ms");
  for (const Row& row : rows) {
    RunRequest request;
    request.language = row.language;
    request.program = row.program;
    int64_t compile_ms = 0;
    std::string binary;
    const bool is_c = row.language == Language::kCpp;
    if (is_c) {
      // Compile once (timed); the rows time runs of the binary alone.
      RunResult c = retort::sandbox::internal::SandboxAccess::Compile(**sandbox, row.program, &binary);
      if (c.verdict != Verdict::kOk) {
        std::fprintf(stderr, "compile failed: %s\n", c.detail.c_str());
        return 1;
      }
      compile_ms = c.compile_ms;
    }
    auto run_once = [&]() -> absl::StatusOr<RunResult> {
      return retort::sandbox::internal::SandboxAccess::RunPrepared(**sandbox, request,
                                                                   is_c ? &binary : nullptr, nullptr);
    };
    auto check = [&](const absl::StatusOr<RunResult>& r) {
      if (r.ok() && r->verdict == Verdict::kOk) return true;
      std::fprintf(stderr, "%s: %s\n", row.name,
                   r.ok() ? retort::sandbox::RunResultToJson(*r).dump().c_str()
                          : r.status().ToString().c_str());
      return false;
    };
    if (!check(run_once())) return 1;  // warm-up
    const auto t0 = Clock::now();
    for (int i = 0; i < runs; ++i) {
      if (!check(run_once())) return 1;
    }
    const double serial = Seconds(t0, Clock::now());
    SandboxPool pool(sandbox->get(), workers, 2 * workers);
    const auto t1 = Clock::now();
    std::vector<std::future<absl::StatusOr<RunResult>>> futures;
    for (int i = 0; i < runs; ++i) {
      futures.push_back(retort::sandbox::internal::SandboxAccess::Submit(pool, run_once));
    }
    bool ok = true;
    for (auto& f : futures) ok = check(f.get()) && ok;
    if (!ok) return 1;
    const double pooled = Seconds(t1, Clock::now());
    std::printf("%-22s %14.1f %14.1f %14.1f %12lld\n", row.name, 1000.0 * serial / runs,
                runs / serial, runs / pooled, static_cast<long long>(compile_ms));
  }
  return 0;
}
