// The gRPC SandboxService (proto/retort/v1/sandbox.proto) over a Sandbox, so
// rollout and reward processes on other machines can run untrusted code.
//
// Each call runs on its own thread; at most `max_concurrent` calls run at
// once and further ones get RESOURCE_EXHAUSTED at once (callers retry with
// backoff), so the queue is bounded by the callers. Thread-safe. The Sandbox
// is not owned and must outlive the server.
#ifndef RETORT_SANDBOX_SERVICE_H_
#define RETORT_SANDBOX_SERVICE_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "retort/v1/sandbox.pb.h"
#include "sandbox/sandbox.h"

namespace retort::sandbox {

inline constexpr uint32_t kSandboxProtocolVersion = 1;

// Proto <-> in-process conversions (exposed for tests). Unset limits take
// Limits' defaults.
absl::StatusOr<RunRequest> FromProto(const retort::v1::SandboxRunRequest& proto);
retort::v1::SandboxRunResponse ToProto(const RunResult& result);

// The Run and RunTests logic of the service without gRPC.
absl::StatusOr<retort::v1::SandboxRunResponse> HandleRun(const Sandbox& sandbox,
                                                         const retort::v1::SandboxRunRequest& req);
absl::StatusOr<retort::v1::SandboxRunTestsResponse> HandleRunTests(
    const Sandbox& sandbox, const retort::v1::SandboxRunTestsRequest& req);

class SandboxServer {
 public:
  // Listens on `address` ("0.0.0.0:50061"; port 0 picks one, see port()).
  static absl::StatusOr<std::unique_ptr<SandboxServer>> Start(const Sandbox* sandbox,
                                                              const std::string& address,
                                                              int max_concurrent);
  ~SandboxServer();  // shuts down, waiting for calls in flight
  int port() const;
  void Wait();  // blocks until shutdown

  class Impl;

 private:
  explicit SandboxServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace retort::sandbox

#endif  // RETORT_SANDBOX_SERVICE_H_
