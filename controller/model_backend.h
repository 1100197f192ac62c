// The model behind `retort forward` and `retort generate`: the CPU Model or,
// with --device cuda in a CUDA build, the CudaModel — one interface over
// both (sequences by id, Step over chunks, logits on the host).
#ifndef RETORT_CONTROLLER_MODEL_BACKEND_H_
#define RETORT_CONTROLLER_MODEL_BACKEND_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/v4/model.h"
#include "rollout/engine/sampler.h"

namespace retort::controller {

class ModelBackend {
 public:
  virtual ~ModelBackend() = default;
  virtual const io::V4Config& config() const = 0;
  // "cpu" or the device description.
  virtual std::string Describe() const = 0;
  [[nodiscard]] virtual absl::StatusOr<int> NewSequence() = 0;
  struct Chunk {
    int seq;
    absl::Span<const int64_t> tokens;
  };
  [[nodiscard]] virtual absl::StatusOr<std::vector<float>> Step(absl::Span<const Chunk> chunks) = 0;
  // Steps one chunk and samples from its last row with `sampler` (on the
  // device for CUDA: the logits stay there).
  [[nodiscard]] virtual absl::StatusOr<rollout::SampledToken> StepAndSample(const Chunk& chunk,
                                                                           rollout::Sampler& sampler) = 0;
};

// From --model, --device, --numerics, --threads. A CUDA backend holds
// `max_sequences` slots of `max_length` tokens.
[[nodiscard]] absl::StatusOr<std::unique_ptr<ModelBackend>> LoadBackendFromFlags(int max_sequences,
                                                                                 int64_t max_length);
// The CPU model alone (inspect).
[[nodiscard]] absl::StatusOr<std::unique_ptr<v4::Model>> LoadCpuModelFromFlags();

}  // namespace retort::controller

#endif  // RETORT_CONTROLLER_MODEL_BACKEND_H_
