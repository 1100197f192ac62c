// The test runner's access to Sandbox internals: compile once, run a compiled
// binary many times, and the private results channel on fd 3. Internal to
// sandbox/.
#ifndef RETORT_SANDBOX_INTERNAL_ACCESS_H_
#define RETORT_SANDBOX_INTERNAL_ACCESS_H_

#include <functional>
#include <future>
#include <string>

#include "absl/status/status.h"
#include "sandbox/sandbox.h"

namespace retort::sandbox::internal {

// InvalidArgument for limits <= 0 or a bad extra file name.
[[nodiscard]] absl::Status ValidateRequest(const RunRequest& request);

class SandboxAccess {
 public:
  static RunResult Compile(const Sandbox& sandbox, const std::string& source, std::string* binary) {
    return sandbox.Compile(source, binary);
  }
  static RunResult RunPrepared(const Sandbox& sandbox, const RunRequest& request,
                               const std::string* binary, std::string* channel) {
    return sandbox.RunPrepared(request, binary, channel);
  }
  static std::future<absl::StatusOr<RunResult>> Submit(SandboxPool& pool,
                                                       std::function<absl::StatusOr<RunResult>()> task) {
    return pool.SubmitTask(std::move(task));
  }
};

}  // namespace retort::sandbox::internal

#endif  // RETORT_SANDBOX_INTERNAL_ACCESS_H_
