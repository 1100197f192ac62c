// The DeepSeek-V4 model on one CUDA device: weights resident on the GPU, a
// pool of per-sequence decode states held on the device, and Step() — the
// same contract as Model::Step (model.h): a batch of (sequence, new tokens)
// chunks of any lengths, prefill and decode alike, appended to each
// sequence's state, logits returned in chunk order.
//
// State: Options.max_sequences slots are allocated up front, each sized for
// Options.max_length tokens (sliding-window ring, compressed KV entries,
// compressor rows, indexer keys — V4_SPEC.md §3), as an engine's KV cache is.
// NewSequence() takes a free slot, Release() returns it.
//
// Numerics: kExact runs the reference math in fp32 (dense weights f32 through
// pedantic cuBLAS, MXFP4 experts decoded exactly in registers) and matches
// the CPU Model within 1e-3 on the fixtures; kDeployment holds the matrices a
// V4 checkpoint ships FP8 (attention wq_a/wq_b/wkv/wo_a/wo_b, indexer wq_b,
// shared expert) as FP8 e4m3 with 128 x 128 block scales, multiplied with
// FP8-quantized activations (Options.fp8_activations), the other dense
// projections (compressors, indexer weights_proj, LM head) in bf16 with bf16
// activations, all with fp32 accumulation; norms, mHC, router, softmaxes and
// state stay fp32.
//
// Thread-compatible: one thread drives a CudaModel (it owns one stream and one
// cuBLAS handle). Errors: bad input (unknown sequence, token outside the
// vocabulary, a sequence past max_length) is InvalidArgument /
// ResourceExhausted and changes no state; a CUDA failure is Internal with the
// failing call and leaves the model unusable (every later call fails).
#ifndef RETORT_MODEL_V4_CUDA_MODEL_H_
#define RETORT_MODEL_V4_CUDA_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/io/v4_config.h"
#include "model/v4/model.h"

namespace retort::v4 {

struct CudaModelOptions {
  int max_sequences = 8;         // decode-state slots on the device. Default 8.
  int64_t max_length = 4096;     // tokens per sequence a slot holds. Default 4096.
  Numerics numerics = Numerics::kExact;
  int device = 0;                // CUDA device ordinal. Default 0.
  // Deployment numerics: MXFP4 experts on the tensor cores (bf16 activations)
  // where the groups are large enough (mxfp4.cuh's rule). Default true;
  // false keeps them on the CUDA-core kernels (f32 activations).
  bool tensor_core_experts = true;
  // Deployment numerics: the FP8 matrices (attention, indexer wq_b, shared
  // expert) multiply activations quantized to e4m3 per 1 x 128 block, as V4
  // deploys them. Default true; false keeps those activations bf16 (W8A16:
  // closer to the bf16 reference, every row count on the few-row kernel, so
  // prefill is slower).
  bool fp8_activations = true;
};

// Per-op device time of the steps run with profiling on (ms, summed).
struct CudaProfile {
  std::vector<std::pair<std::string, double>> ms;  // op name -> total ms, in first-seen order
  int64_t steps = 0;
};

class CudaModel {
 public:
  // Uploads the weights of a loaded CPU model. Fails with FailedPrecondition
  // when no CUDA device is present.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<CudaModel>> Create(const Model& host,
                                                                         const CudaModelOptions& options);
  // A model of `config` with random weights generated on the device (no host
  // copy): routed experts MXFP4, dense weights f32 (exact) or bf16
  // (deployment), scaled so activations stay O(1). For benchmarks at
  // V4-Flash sizes.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<CudaModel>> CreateRandom(const io::V4Config& config,
                                                                               const CudaModelOptions& options,
                                                                               uint64_t seed);
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  const io::V4Config& config() const;
  const CudaModelOptions& options() const;

  // A fresh sequence (length 0) in a free slot; ResourceExhausted when all
  // max_sequences slots are taken.
  [[nodiscard]] absl::StatusOr<int> NewSequence();
  // Returns the slot of `seq` to the pool (unknown ids are ignored).
  void Release(int seq);
  // Tokens held by `seq` (-1 for an unknown id).
  int64_t Length(int seq) const;
  // Copies `from`'s state into `to` (both in use): the fork of a prefilled
  // prompt for each sample of a group.
  [[nodiscard]] absl::Status CopySequence(int from, int to);

  struct Chunk {
    int seq;
    absl::Span<const int64_t> tokens;
  };
  // Appends each chunk's tokens to its sequence and returns the logits
  // [sum of tokens, vocab] in chunk order (copied to the host).
  [[nodiscard]] absl::StatusOr<std::vector<float>> Step(absl::Span<const Chunk> chunks);
  // The same, leaving the logits on the device: the returned pointer
  // ([rows, vocab] f32) stays valid until the next Step.
  [[nodiscard]] absl::StatusOr<const float*> StepOnDevice(absl::Span<const Chunk> chunks);

  // Decode through a captured CUDA graph: one token per sequence for the
  // fixed list `seqs`. The first call for a list captures the graph (the
  // call itself runs eagerly); later calls with the same list replay it.
  // Logits stay on the device as in StepOnDevice.
  [[nodiscard]] absl::StatusOr<const float*> DecodeGraph(absl::Span<const int> seqs,
                                                         absl::Span<const int64_t> tokens);

  // Benchmarks: puts `seq` in the state of having processed `length` tokens
  // (window ring, compressed entries, compressor rows and indexer keys filled
  // with random values of the right scale), without running the model.
  [[nodiscard]] absl::Status FillRandomState(int seq, int64_t length, uint64_t seed);

  // Profiling: with it on, each op of a step is bracketed by events (which
  // serialises nothing but adds a little launch overhead).
  void SetProfiling(bool on);
  CudaProfile TakeProfile();

  // Bytes of weights on the device, and of the state pool.
  int64_t WeightBytes() const;
  int64_t StatePoolBytes() const;
  // Bytes a decode step of `batch` sequences at `context` tokens must read:
  // every dense weight, the routed experts the batch can touch (min(E,
  // batch*k) of them, each read once), the shared expert, and the state the
  // attention reads (window + visible/selected entries + indexer keys).
  int64_t DecodeStepBytes(int64_t batch, int64_t context) const;

  struct Impl;

 private:
  explicit CudaModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace retort::v4

#endif  // RETORT_MODEL_V4_CUDA_MODEL_H_
