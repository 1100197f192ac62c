// The training loop's core: a Trainer owns a V4 model's fp32 parameters
// (under their transformers names), runs the weighted-token forward/backward,
// and applies one clipped, scheduled Muon/AdamW update per batch by parameter
// group. Checkpoints hold everything a run needs to continue bit-for-bit:
//
//   <dir>/config.json              the model config, as the run was started
//   <dir>/model.safetensors        the model in the layout the options ask for
//                                  (HF fp32 by default; released FP8/MXFP4 on
//                                  request), both read by Model::Load
//   <dir>/trainer_state.safetensors optimizer state (Optimizer::SaveState),
//                                  "trainer.step", "trainer.rng",
//                                  "trainer.data_position" (i64 [1] each),
//                                  and anticipatory routes not yet used:
//                                  "trainer.prefetch.<i>.tokens" (i64 [B, T]),
//                                  "trainer.prefetch.<i>.routes" (i32 [L, B, T, K]);
//                                  metadata "model_layout": "hf" | "released"
//
// A checkpoint is written into <dir>.tmp-<pid>, every file and the directory
// fsynced, then renamed to <dir>; a previous <dir> is first renamed to
// <dir>.old-<pid> and removed once the new one is in place and its parent
// directory fsynced. A crash leaves a whole old or a whole new checkpoint
// (between the two renames the old one sits at <dir>.old-<pid>), never a mix.
//
// Thread-safety: not thread-safe; one learner thread owns a Trainer.
#ifndef RETORT_LEARNER_TRAINER_TRAINER_H_
#define RETORT_LEARNER_TRAINER_TRAINER_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "learner/optim/optim.h"
#include "model/io/safetensors.h"
#include "model/v4/model.h"
#include "model/v4/train.h"

namespace retort::trainer {

// How SaveCheckpoint writes <dir>/model.safetensors.
enum class CheckpointLayout : uint8_t {
  // transformers names, every parameter fp32 (QAT: the masters): the
  // checkpoint resumes bit-for-bit.
  kHf,
  // DeepSeek's released names and formats (v4::ReleasedTensors: FP8 dense
  // matrices with 128x128 E8M0 scales, MXFP4 routed experts, BF16/F32 rest),
  // for serving and rollout. Lossy, so FromCheckpoint refuses to resume from
  // it: the optimizer state belongs to fp32 masters the file no longer holds,
  // and continuing from quantized weights would silently change the run.
  // (FromModelDir may start a new run from it.)
  kReleased,
};
// "hf" / "released" (the trainer state's "model_layout" metadata).
std::string_view CheckpointLayoutName(CheckpointLayout layout);
std::optional<CheckpointLayout> CheckpointLayoutFromName(std::string_view name);

struct TrainerOptions {
  optim::OptimizerConfig optimizer;  // groups, Muon/AdamW, schedule, clipping
  uint64_t seed = 0;                 // initial state of the trainer's RNG. Default: 0
  // Auxiliary-loss-free balancing (DeepSeek-V3's sign rule; V4_SPEC.md §4):
  // after each update every learned-routing layer's e_score_correction_bias
  // moves by speed * sign(mean load - load_e), load counted over the batch's
  // tokens. 0 disables. Default: 0.001 (the spec's speed)
  float bias_update_speed = 0.001f;
  // Quantization-aware training of the routed experts: forward and backward
  // see every expert matrix rounded to MXFP4 (see QuantizeMxFp4Rows), the
  // gradient passes straight through to the fp32 masters the optimizer
  // updates, and checkpoints hold the masters. Default: false
  bool qat_experts = false;
  // Weight of the sequence-wise balance loss (v4::TokenBatch::
  // balance_loss_weight) applied to every batch. Default: 0 (off; the spec's
  // pre-training uses 1e-4)
  float balance_loss_weight = 0.0f;
  // Anticipatory routing (V4_SPEC.md §6): 0 = off. With delay Δt > 0, the
  // routes of the batch of step t come from the parameters of step t − Δt:
  // the caller hands each batch to Prefetch() Δt steps before it is trained
  // on (the first Δt batches before step 0, so they route with θ_0), and
  // Step() replays the routes Prefetch computed. Default: 0
  int anticipatory_routing_delay = 0;
  // Layout of the checkpoint's model part (see CheckpointLayout). Default: kHf
  CheckpointLayout checkpoint_layout = CheckpointLayout::kHf;
};

// MXFP4 round trip of a row-major [rows, cols] matrix in place: each run of 32
// values along a row (the last run of a row may be shorter) gets the E8M0
// scale 2^ceil(log2(amax / 6)) (6 = the largest e2m1 value, so nothing
// saturates; an all-zero block stays zero) and each value becomes
// scale * e2m1(x / scale), rounded to nearest, ties to even.
void QuantizeMxFp4Rows(float* w, int64_t rows, int64_t cols);

struct StepResult {
  int64_t step = 0;  // index of the update just applied (0-based)
  double loss = 0;   // WeightedLoss::loss of the batch, before the update
  double lr = 0;
  double grad_norm = 0;  // global L2 norm before clipping
  double clip_scale = 1;
  int64_t tokens = 0;       // unmasked target positions in the batch
  double balance_loss = 0;  // sequence-wise balance loss (0 when off)
};

class Trainer {
 public:
  // Starts from a model directory (config.json + safetensors, any layout the
  // loader reads; MXFP4-packed experts are Unimplemented: no fp32 masters).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Trainer>> FromModelDir(
      const std::string& dir, TrainerOptions options);
  // Resumes from a checkpoint SaveCheckpoint wrote. A missing, truncated or
  // corrupt file is NotFound / DataLoss / InvalidArgument naming the file; a
  // released-layout checkpoint is FailedPrecondition (see CheckpointLayout);
  // optimizer state that does not fit the model's parameters is an error.
  // `options` must describe the same run (groups and hyper-parameters are
  // not stored); the step, RNG and data position come from the checkpoint.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Trainer>> FromCheckpoint(
      const std::string& dir, TrainerOptions options);

  // One update on `batch` (see v4::TokenBatch; the weights carry the loss
  // normalisation). A non-finite loss or gradient norm is FailedPrecondition
  // and leaves the parameters unchanged.
  [[nodiscard]] absl::StatusOr<StepResult> Step(const v4::TokenBatch& batch);
  // Anticipatory routing: computes `batch`'s routes with the current
  // parameters and queues them for the Step() that trains on this batch.
  // FailedPrecondition when anticipatory routing is off; InvalidArgument for
  // a bad batch. Queued routes are checkpointed.
  [[nodiscard]] absl::Status Prefetch(const v4::TokenBatch& batch);
  int64_t prefetched() const { return static_cast<int64_t>(prefetched_.size()); }

  // Loss of `batch` under the current parameters, no update.
  [[nodiscard]] absl::StatusOr<v4::WeightedLoss> Evaluate(const v4::TokenBatch& batch) const;

  [[nodiscard]] absl::Status SaveCheckpoint(const std::string& dir) const;

  const v4::Model& model() const { return *model_; }
  int64_t step() const { return optimizer_->step(); }
  // The run's RNG (splitmix64; data shuffling and sampling draw from it) and
  // the data reader's position; both are checkpointed.
  uint64_t NextRandom();
  int64_t data_position() const { return data_position_; }
  void set_data_position(int64_t p) { data_position_ = p; }

 private:
  Trainer() = default;
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Trainer>> Build(const std::string& dir,
                                                                      TrainerOptions options);

  std::string config_json_;               // config.json text of the source directory
  std::vector<v4::NamedTensor> tensors_;  // every model tensor; the model views them
  std::map<std::string, Tensor> grads_;   // trainable name -> gradient
  std::vector<Tensor> router_bias_;  // per layer: e_score_correction_bias (undefined: hash layer)
  // QAT: expert tensor name -> fp32 master (the optimizer's parameter); the
  // model's own tensor holds the master's MXFP4 round trip.
  std::map<std::string, Tensor> masters_;
  TrainerOptions options_;
  struct Prefetched {
    std::vector<int64_t> tokens;  // [B, T]: Step() checks it trains on the same batch
    std::vector<int32_t> routes;  // [L, B, T, K]
    int64_t B = 0, T = 0;
  };
  std::vector<Prefetched> prefetched_;  // FIFO, oldest first
  void RefreshQuantizedExperts();
  void UpdateRouterBias(const std::vector<std::vector<int64_t>>& load);
  std::unique_ptr<v4::Model> model_;
  std::unique_ptr<optim::Optimizer> optimizer_;
  uint64_t rng_state_ = 0;
  int64_t data_position_ = 0;
};

}  // namespace retort::trainer

#endif  // RETORT_LEARNER_TRAINER_TRAINER_H_
