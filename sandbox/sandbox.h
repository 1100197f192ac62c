// The sandbox: runs untrusted programs (Python 3, C++ compiled with g++, sh)
// and judges them against test cases for code rewards.
//
// Isolation per run (see Note [Sandbox layers] in sandbox.cc): fresh user,
// mount, pid, network (only `lo`), ipc and uts namespaces; a read-only view
// of /usr and the loader files, a private size-limited tmpfs at /work (also
// reachable as /tmp); no inherited descriptors beyond 0/1/2; an allowlisted
// environment; PR_SET_NO_NEW_PRIVS; an unprivileged uid inside the user
// namespace (mapped to a per-run unprivileged host uid); a seccomp-bpf filter
// (libseccomp) denying ptrace, mount, unshare/setns, bpf, perf_event_open,
// keyctl, userfaultfd, io_uring_*, module loading and other-architecture
// syscalls; limits on CPU, wall time, memory, processes, file size, open
// files and captured output. The sandbox's init is pid 1 of its pid
// namespace: when a run ends it dies, and the kernel kills every process the
// program started, daemons included.
//
// Capabilities are probed once by Sandbox::Create, which logs what it found.
// Without a writable cgroup (v2, or v1 memory+pids+cpuacct) the memory,
// process and CPU limits fall back to per-process rlimits, which are weaker;
// Create refuses unless SandboxOptions::degraded says kAllowWeaker. Without
// user namespaces it always refuses.
//
// Thread-safety: a Sandbox is immutable after Create; Run and RunTests may be
// called from many threads at once. SandboxPool is thread-safe.
#ifndef RETORT_SANDBOX_SANDBOX_H_
#define RETORT_SANDBOX_SANDBOX_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace retort::sandbox {

namespace internal {
class SandboxAccess;  // test_runner.cc's door to compile-once and the results channel
}

enum class Language { kPython, kCpp, kSh };

// "python" | "cpp" | "sh".
const char* LanguageName(Language language);
absl::StatusOr<Language> ParseLanguage(absl::string_view name);

// Limits of one run. Every field must be > 0.
struct Limits {
  int64_t cpu_ms = 2000;     // CPU time of all the run's processes together. Default 2000.
  int64_t wall_ms = 5000;    // wall-clock time from start to kill. Default 5000.
  int64_t memory_mb = 256;   // memory of the whole run (cgroup: RSS + tmpfs + kernel);
                             // fallback RLIMIT_AS per process. Default 256.
  int64_t max_pids = 32;     // processes + threads alive at once. Default 32.
  int64_t file_size_mb = 16; // RLIMIT_FSIZE: largest file the program may write. Default 16.
  int64_t open_files = 64;   // RLIMIT_NOFILE. Default 64.
  int64_t output_bytes = 1 << 20;  // captured bytes per stream (stdout, stderr); a
                                   // program writing more is killed (kOutputLimit).
                                   // Default 1 MiB.
  int64_t tmpfs_mb = 64;     // size of the private /work tmpfs. Default 64.
  int64_t tmpfs_inodes = 4096;  // files + directories in /work. Default 4096.
};

// Limits for the g++ step of a C++ run.
Limits DefaultCompileLimits();  // cpu 10 s, wall 20 s, memory 1024 MB, 64 pids, 64 MB files

enum class DegradedPolicy {
  kRefuse,        // Create fails if a limit would be weaker than the cgroup version.
  kAllowWeaker,   // run with rlimits (logged at Create, and in every RunResult.enforcement).
};

enum class CgroupMode {
  kAuto,  // v2 if /sys/fs/cgroup has memory+pids controllers, else v1, else none.
  kV2,
  kV1,
  kNone,  // rlimits only (needs kAllowWeaker). Tests use it to exercise the fallback.
};

struct SandboxOptions {
  DegradedPolicy degraded = DegradedPolicy::kRefuse;  // Default kRefuse.
  CgroupMode cgroup = CgroupMode::kAuto;              // Default kAuto.
  std::string python = "/usr/bin/python3";  // Debian's interpreter. Default /usr/bin/python3.
  std::string cxx = "/usr/bin/g++";         // Default /usr/bin/g++.
  std::string shell = "/bin/sh";            // Default /bin/sh.
  std::vector<std::string> cxx_flags = {"-O2", "-std=gnu++17", "-pipe"};
  Limits compile_limits = DefaultCompileLimits();
  // Host uids [host_uid_base, host_uid_base + 2^20) are lent to runs, two per
  // run (sandbox root and the program's user). They must own no host files.
  // Default 1900000000.
  uint32_t host_uid_base = 1900000000u;
};

enum class Verdict {
  kOk,              // exited 0 within every limit
  kRuntimeError,    // exited non-zero
  kTimeLimit,       // CPU or wall limit
  kMemoryLimit,     // the memory limit (OOM kill in the cgroup, or allocation failure
                    // under RLIMIT_AS with SIGSEGV/SIGABRT/MemoryError)
  kOutputLimit,     // more than output_bytes on stdout or stderr, or the file size limit
  kKilledBySignal,  // a signal other than the above (SIGSEGV, SIGSYS from seccomp, ...)
  kCompileError,    // g++ rejected the program (or hit its own limits); nothing ran
  kSandboxFailure,  // the sandbox itself failed: no judgement about the program
};

// "ok" | "runtime_error" | "time_limit" | "memory_limit" | "output_limit" |
// "killed_by_signal" | "compile_error" | "sandbox_failure".
const char* VerdictName(Verdict verdict);

struct File {
  std::string name;     // a plain name placed in /work (no '/', not "." or "..")
  std::string content;
  bool executable = false;
};

struct RunRequest {
  Language language = Language::kPython;
  std::string program;     // source text (Python, C++ or sh)
  std::string stdin_data;  // the program's stdin (a sealed memfd; EOF after it)
  Limits limits;           // limits of the run (the compile step uses compile_limits)
  std::vector<std::string> args;  // argv[1..] of the program
  std::vector<File> files;        // extra files placed in /work, read-only to the program
};

struct RunResult {
  Verdict verdict = Verdict::kSandboxFailure;
  int exit_code = -1;    // when it exited; -1 otherwise
  int term_signal = 0;   // when a signal ended it; 0 otherwise
  int64_t cpu_ms = 0;    // CPU time (user + system) of all its processes
  int64_t wall_ms = 0;
  int64_t peak_memory_kb = 0;  // cgroup peak; fallback: largest process's max RSS
  std::string stdout_data;     // at most limits.output_bytes
  std::string stderr_data;
  bool stdout_truncated = false;
  bool stderr_truncated = false;
  std::string detail;       // why this verdict, in words ("cpu 1003 ms > limit 1000 ms")
  std::string compile_output;  // C++: g++'s stderr (capped), whatever the verdict
  int64_t compile_ms = 0;      // C++: wall time of the compile step
  std::string enforcement;  // "cgroup-v2" | "cgroup-v1" | "rlimit (weaker: ...)"
};

nlohmann::json RunResultToJson(const RunResult& result);

class Sandbox {
 public:
  // Probes user namespaces and cgroups, logs a one-line summary of what is
  // enforced and how. FailedPrecondition naming the missing capability when
  // the sandbox cannot run under `options.degraded`.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Sandbox>> Create(SandboxOptions options);
  ~Sandbox();
  Sandbox(const Sandbox&) = delete;
  Sandbox& operator=(const Sandbox&) = delete;

  // Runs one program. InvalidArgument for a bad request (limits <= 0, bad
  // file name); every judgement about the program, and failures of the
  // sandbox itself (verdict kSandboxFailure), come back as a RunResult.
  absl::StatusOr<RunResult> Run(const RunRequest& request) const;

  const SandboxOptions& options() const { return options_; }
  // E.g. "userns ok; cgroup-v1 (memory, pids, cpuacct) at /sys/fs/cgroup/...".
  const std::string& capabilities() const { return capabilities_; }

  struct Impl;  // sandbox.cc

 private:
  friend class internal::SandboxAccess;
  Sandbox(SandboxOptions options, std::unique_ptr<Impl> impl, std::string capabilities);
  // g++ in its own sandbox (compile_limits). kOk with `binary` filled, or
  // kCompileError / kSandboxFailure.
  RunResult Compile(const std::string& source, std::string* binary) const;
  // Runs `request`; for C++ `binary` is the compiled program (request.program
  // is ignored). `channel` non-null: fd 3 is a pipe whose bytes land there.
  RunResult RunPrepared(const RunRequest& request, const std::string* binary,
                        std::string* channel) const;

  SandboxOptions options_;
  std::unique_ptr<Impl> impl_;
  std::string capabilities_;
};

// Runs Sandbox::Run on `num_workers` threads. At most `queue_capacity`
// requests wait beyond the ones running. Thread-safe; the destructor finishes
// the queued jobs. `sandbox` is not owned and must outlive the pool.
class SandboxPool {
 public:
  SandboxPool(const Sandbox* sandbox, int num_workers, int queue_capacity);
  ~SandboxPool();
  SandboxPool(const SandboxPool&) = delete;
  SandboxPool& operator=(const SandboxPool&) = delete;

  // Never blocks: ResourceExhausted when the queue is full.
  absl::StatusOr<std::future<absl::StatusOr<RunResult>>> TrySubmit(RunRequest request);
  // Blocks while the queue is full.
  std::future<absl::StatusOr<RunResult>> Submit(RunRequest request);
  // Submit + wait.
  absl::StatusOr<RunResult> Run(RunRequest request);

  const Sandbox& sandbox() const { return *sandbox_; }

 private:
  friend class internal::SandboxAccess;
  using Task = std::function<absl::StatusOr<RunResult>()>;
  struct Job {
    Task task;
    std::promise<absl::StatusOr<RunResult>> promise;
  };
  std::future<absl::StatusOr<RunResult>> SubmitTask(Task task);  // blocks while full
  void WorkerLoop();

  const Sandbox* sandbox_;
  const int queue_capacity_;
  std::mutex mu_;
  std::condition_variable not_empty_;
  std::condition_variable not_full_;
  std::deque<Job> queue_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

// ---- Test runner (code rewards) -------------------------------------------
//
// Expected outputs never enter the sandbox: the program gets only stdin (or
// the call arguments) and its output is compared here, outside. A case passes
// only if the run's verdict is kOk AND its output matches; "exit 0" alone
// never passes.

enum class CheckMode {
  kExact,       // byte-for-byte equal
  kWhitespace,  // equal as sequences of whitespace-separated tokens
  kFloat,       // kWhitespace, but tokens that both parse as numbers match within
                // abs_tol or rel_tol * |expected|. JSON: numbers compared likewise.
};

struct Checker {
  CheckMode mode = CheckMode::kWhitespace;  // Default kWhitespace.
  double abs_tol = 1e-6;                    // Default 1e-6.
  double rel_tol = 1e-6;                    // Default 1e-6.
};

// "exact" | "whitespace" | "float".
absl::StatusOr<CheckMode> ParseCheckMode(absl::string_view name);

// True when `actual` matches `expected` under `checker` (pure; exposed for tests).
bool OutputMatches(const std::string& expected, const std::string& actual, const Checker& checker);
// Compares two JSON values: kExact/kWhitespace: equal (1 == 1.0, true != 1;
// kWhitespace also normalises whitespace inside strings); kFloat: numbers
// within tolerance. Object keys compared as sets.
bool JsonMatches(const nlohmann::json& expected, const nlohmann::json& actual, const Checker& checker);

struct IoCase {
  std::string stdin_data;
  std::string expected_stdout;
};

struct FunctionCase {
  std::string args_json;      // a JSON array: the positional arguments
  std::string expected_json;  // the JSON the return value must serialize to
};

struct CaseResult {
  bool passed = false;
  Verdict verdict = Verdict::kSandboxFailure;  // of the run that produced this case
  std::string reason;  // "ok" | "wrong answer" | "no result" | "exception: ..." | verdict detail
  int64_t cpu_ms = 0;
  int64_t wall_ms = 0;
};

struct TestReport {
  int passed = 0;
  int total = 0;
  std::vector<CaseResult> cases;
  bool compiled = true;         // false: kCompileError, every case failed
  bool sandbox_failure = false; // some case hit kSandboxFailure: the score means nothing
  std::string compile_output;
  double fraction() const { return total == 0 ? 0.0 : static_cast<double>(passed) / total; }
  bool all_passed() const { return total > 0 && passed == total; }
};

nlohmann::json TestReportToJson(const TestReport& report);

// Runs `program` once per case with the case's stdin, `limits` per case.
// C++ is compiled once. With `pool`, cases run concurrently on it.
// InvalidArgument when `cases` is empty.
absl::StatusOr<TestReport> RunTests(const Sandbox& sandbox, Language language,
                                    const std::string& program, const std::vector<IoCase>& cases,
                                    const Checker& checker, const Limits& limits,
                                    SandboxPool* pool = nullptr);

// Loads the Python `program` and calls `function_name(*args)` per case in
// one run (`limits` cover the whole run). A fixed harness sends each return
// value, serialized with json.dumps, on a private descriptor tagged with a
// per-run random nonce; stdout is ignored. A case with no record (the
// program exited, crashed or timed out first), an exception (SystemExit
// included), or a value json.dumps rejects (e.g. an object with a custom
// __eq__) fails. InvalidArgument when `cases` is empty or a case's JSON does
// not parse (naming the case).
absl::StatusOr<TestReport> RunFunctionTests(const Sandbox& sandbox, const std::string& program,
                                            const std::string& function_name,
                                            const std::vector<FunctionCase>& cases,
                                            const Checker& checker, const Limits& limits);

}  // namespace retort::sandbox

#endif  // RETORT_SANDBOX_SANDBOX_H_
