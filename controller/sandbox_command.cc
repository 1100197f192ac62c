// `retort sandbox run --lang python|cpp|sh --file F [--stdin F] [--cpu-ms N]
// [--wall-ms N] [--memory-mb N]`: runs F in the sandbox and prints one JSON
// line with the result; exits 0 whatever the verdict, 1 if the sandbox itself
// failed, 2 on bad usage.
// `retort sandbox serve [--sandbox-port P] [--sandbox-max-concurrent N]`:
// serves retort.v1.SandboxService until killed.
// Both refuse to start without cgroup limits unless --sandbox-allow-weaker.
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "controller/command.h"
#include "sandbox/sandbox.h"
#include "sandbox/service.h"

ABSL_FLAG(std::string, lang, "", "sandbox run: python | cpp | sh");
ABSL_FLAG(std::string, file, "", "sandbox run: the program's source file");
ABSL_FLAG(std::string, stdin, "", "sandbox run: a file fed to the program's stdin (default: empty)");
ABSL_FLAG(int64_t, cpu_ms, 2000, "sandbox run: CPU time limit, ms");
ABSL_FLAG(int64_t, wall_ms, 5000, "sandbox run: wall time limit, ms");
ABSL_FLAG(int64_t, memory_mb, 256, "sandbox run: memory limit, MB");
ABSL_FLAG(bool, sandbox_allow_weaker, false,
          "sandbox: run with rlimits when no writable cgroup exists (weaker; logged)");
ABSL_FLAG(int32_t, sandbox_port, 50061, "sandbox serve: TCP port (0: any free port)");
ABSL_FLAG(int32_t, sandbox_max_concurrent, 8, "sandbox serve: calls run at once; more get RESOURCE_EXHAUSTED");

namespace {

using retort::sandbox::Sandbox;

bool ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return true;
}

std::unique_ptr<Sandbox> MakeSandbox() {
  retort::sandbox::SandboxOptions options;
  if (absl::GetFlag(FLAGS_sandbox_allow_weaker)) {
    options.degraded = retort::sandbox::DegradedPolicy::kAllowWeaker;
  }
  auto sandbox = Sandbox::Create(options);
  if (!sandbox.ok()) {
    std::fprintf(stderr, "retort: %s\n", sandbox.status().ToString().c_str());
    return nullptr;
  }
  return std::move(sandbox).value();
}

int RunOnce() {
  auto language = retort::sandbox::ParseLanguage(absl::GetFlag(FLAGS_lang));
  if (!language.ok()) {
    std::fprintf(stderr, "retort: --lang: %s\n", language.status().ToString().c_str());
    return 2;
  }
  retort::sandbox::RunRequest request;
  request.language = *language;
  const std::string file = absl::GetFlag(FLAGS_file);
  if (file.empty() || !ReadFile(file, &request.program)) {
    std::fprintf(stderr, "retort: --file: cannot read '%s'\n", file.c_str());
    return 2;
  }
  const std::string stdin_file = absl::GetFlag(FLAGS_stdin);
  if (!stdin_file.empty() && !ReadFile(stdin_file, &request.stdin_data)) {
    std::fprintf(stderr, "retort: --stdin: cannot read '%s'\n", stdin_file.c_str());
    return 2;
  }
  request.limits.cpu_ms = absl::GetFlag(FLAGS_cpu_ms);
  request.limits.wall_ms = absl::GetFlag(FLAGS_wall_ms);
  request.limits.memory_mb = absl::GetFlag(FLAGS_memory_mb);
  std::unique_ptr<Sandbox> sandbox = MakeSandbox();
  if (sandbox == nullptr) return 1;
  auto result = sandbox->Run(request);
  if (!result.ok()) {
    std::fprintf(stderr, "retort: %s\n", result.status().ToString().c_str());
    return 2;
  }
  const std::string line =
      retort::sandbox::RunResultToJson(*result).dump(-1, ' ', false,
                                                     nlohmann::json::error_handler_t::replace);
  std::printf("%s\n", line.c_str());
  return result->verdict == retort::sandbox::Verdict::kSandboxFailure ? 1 : 0;
}

int Serve() {
  std::unique_ptr<Sandbox> sandbox = MakeSandbox();
  if (sandbox == nullptr) return 1;
  auto server = retort::sandbox::SandboxServer::Start(
      sandbox.get(), absl::StrCat("0.0.0.0:", absl::GetFlag(FLAGS_sandbox_port)),
      absl::GetFlag(FLAGS_sandbox_max_concurrent));
  if (!server.ok()) {
    std::fprintf(stderr, "retort: %s\n", server.status().ToString().c_str());
    return 1;
  }
  std::fprintf(stderr, "retort: sandbox service listening on port %d\n", (*server)->port());
  (*server)->Wait();
  return 0;
}

int RunSandbox(const std::vector<std::string>& args) {
  if (args.size() == 1 && args[0] == "run") return RunOnce();
  if (args.size() == 1 && args[0] == "serve") return Serve();
  std::fprintf(stderr,
               "usage: retort sandbox run --lang python|cpp|sh --file F [--stdin F] [--cpu-ms N] "
               "[--wall-ms N] [--memory-mb N] [--sandbox-allow-weaker]\n"
               "       retort sandbox serve [--sandbox-port P] [--sandbox-max-concurrent N]\n");
  return 2;
}

}  // namespace

RETORT_COMMAND("sandbox", "run untrusted code in the sandbox (run | serve)", RunSandbox);
