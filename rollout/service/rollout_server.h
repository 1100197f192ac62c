// The rollout worker's gRPC server: RolloutService over an Engine, with the
// token write-ahead log and the trajectory store under one data directory.
//
// Lifecycle: Start() opens <data_dir>/wal and <data_dir>/trajectories,
// resubmits every unfinished request found in the log (re-prefill + continue,
// see engine.h), and serves. Generate is idempotent per request id: a request
// is logged (synced) before it is accepted; each finished sample's Completion
// is logged (synced), then written to the trajectory store when the request
// names an experiment, then streamed. A client that re-sends an accepted id
// (after a restart or a lost stream) gets the logged completions and the rest
// as they finish; a stream never carries one (request, sample) twice.
//
// Drain (SIGTERM): health turns NOT_SERVING, new Generate calls get
// UNAVAILABLE, running requests get up to `timeout` to finish; what is left
// stays in the log and resumes on the next start.
//
// Thread-safety: public methods are thread-safe.
#ifndef RETORT_ROLLOUT_SERVICE_ROLLOUT_SERVER_H_
#define RETORT_ROLLOUT_SERVICE_ROLLOUT_SERVER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "model/v4/model.h"
#include "rollout/engine/engine.h"
#include "rollout/store/trajectory_store.h"

namespace retort::tokenizer {
class Tokenizer;
}

namespace retort::rollout {

struct RolloutServerOptions {
  // host:port to listen on; port 0 picks a free one (see port()). Loopback by
  // default. Default: "127.0.0.1:0".
  std::string address = "127.0.0.1:0";
  std::string data_dir;      // required: holds wal/ and trajectories/
  uint64_t weight_version = 0;  // version of the initial model. Default: 0.
  EngineOptions engine;
  TokenWalOptions wal;
  // Optional chat-template tokenizer; chat requests are FailedPrecondition without it.
  std::shared_ptr<const tokenizer::Tokenizer> tokenizer;
  int32_t max_batch_requests = 4096;  // requests per Generate call at most. Default: 4096.
};

class RolloutServer {
 public:
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<RolloutServer>> Start(std::shared_ptr<const v4::Model> model,
                                                                            RolloutServerOptions options);
  ~RolloutServer();  // Drain(absl::ZeroDuration()) if not drained yet.

  int port() const;
  std::string address() const;  // "127.0.0.1:<port>"
  // Requests resumed from the log at start.
  int resumed_requests() const;
  Engine& engine();

  // See the file comment. Returns when the server has shut down.
  void Drain(absl::Duration timeout);
  // Blocks until Drain() has finished (from another thread or a signal).
  void Wait();

  class Impl;

 private:
  explicit RolloutServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace retort::rollout

#endif  // RETORT_ROLLOUT_SERVICE_ROLLOUT_SERVER_H_
