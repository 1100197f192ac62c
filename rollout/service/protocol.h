// The rollout protocol's version, status mapping and request conversion,
// shared by the worker and its clients.
//
// absl::Status and grpc::Status codes are equal by construction; ToGrpc/FromGrpc
// map them 1:1 with the message unchanged. Thread-safe (pure functions).
#ifndef RETORT_ROLLOUT_SERVICE_PROTOCOL_H_
#define RETORT_ROLLOUT_SERVICE_PROTOCOL_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "grpcpp/support/status.h"
#include "retort/v1/rollout.pb.h"
#include "rollout/engine/engine.h"

namespace retort::tokenizer {
class Tokenizer;
}

namespace retort::rollout {

// Bumped when a field changes meaning; workers reject any other version.
inline constexpr uint32_t kRolloutProtocolVersion = 1;

// FailedPrecondition naming both versions unless `version` is ours.
[[nodiscard]] absl::Status CheckProtocolVersion(uint32_t version, const char* what);

grpc::Status ToGrpc(const absl::Status& s);
absl::Status FromGrpc(const grpc::Status& s);

// The canonical form of a request: the prompt as token ids (chat messages
// rendered with the V4 chat template by `tokenizer`), group id defaulted to
// the request id. InvalidArgument naming the field for a missing request id
// or prompt, unknown roles or reasoning modes; FailedPrecondition for a chat
// prompt when `tokenizer` is null.
[[nodiscard]] absl::StatusOr<retort::v1::GenerateRequest> Canonicalize(const retort::v1::GenerateRequest& request,
                                                                      const tokenizer::Tokenizer* tokenizer);

// The engine's view of a canonical request (ids prompt).
GenerationRequest ToGenerationRequest(const retort::v1::GenerateRequest& canonical);

}  // namespace retort::rollout

#endif  // RETORT_ROLLOUT_SERVICE_PROTOCOL_H_
