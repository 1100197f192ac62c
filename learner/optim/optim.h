// Optimizers for retort learners: Muon for weight matrices, AdamW for
// everything else, learning-rate schedules and global gradient-norm clipping.
//
// Numerics follow ../shared/V4_SPEC.md §6:
//   Muon (every logically independent 2-D matrix; a rank-3 [E, n, m] tensor is
//   E separate expert matrices):
//     M_t = mu*M_{t-1} + G_t                         (momentum buffer, mu = 0.95)
//     O'  = NS(mu*M_t + G_t)                          (Nesterov; NS below)
//     O   = O' * sqrt(max(n, m)) * gamma              (gamma = 0.18: update RMS 0.18)
//     W  <- W*(1 - lr*wd) - lr*O                      (decoupled weight decay)
//   NS: X0 = U/||U||_F, then 8 steps with (a,b,c) = (3.4445, -4.7750, 2.0315)
//   and 2 with (2, -1.5, 0.5), each X <- aX + b(XXᵀ)X + c(XXᵀ)²X, computed on
//   the wide orientation (transposed when rows > cols, so XXᵀ is the small
//   side). fp32, OpenBLAS sgemm.
//   AdamW: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²; bias-corrected
//     W <- W*(1 - lr*wd) - lr * m̂/(sqrt(v̂) + eps).
//
// Parameters are retort::Tensor handles (f32, CPU, contiguous, writable) shared
// with the model: the optimizer updates the parameter storage in place and
// reads (never writes) the gradient tensors. Optimizer state (momenta, Adam
// moments, step) is exported/imported as named f32/i64 tensors so a checkpoint
// can store it next to the model.
//
// Thread-safety: an Optimizer is not thread-safe; one learner thread owns it.
// Step() itself uses OpenBLAS threads for the Newton–Schulz matmuls.
#ifndef RETORT_LEARNER_OPTIM_OPTIM_H_
#define RETORT_LEARNER_OPTIM_OPTIM_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/tensor/tensor.h"

namespace retort::optim {

// ---- learning-rate schedules -----------------------------------------------

enum class ScheduleKind : uint8_t {
  kConstant,  // peak_lr after warmup
  kLinear,    // linear decay from peak_lr to final_lr over [warmup, total)
  kCosine,    // half-cosine from peak_lr to final_lr over [warmup, total)
};
std::string ScheduleKindName(ScheduleKind kind);
std::optional<ScheduleKind> ScheduleKindFromName(const std::string& name);

struct ScheduleOptions {
  ScheduleKind kind = ScheduleKind::kConstant;
  double peak_lr = 2.7e-4;   // Default: V4-Flash pre-training peak (spec §6)
  double final_lr = 2.7e-5;  // floor reached at total_steps (linear/cosine). Default: peak/10
  int64_t warmup_steps = 0;  // linear ramp peak*(s+1)/warmup for s < warmup. Default: none
  int64_t total_steps = 1;   // end of the decay; lr stays at final_lr after it
};

// Learning rate for the update with 0-based index `step` (the first update is
// step 0). Warmup: peak*(step+1)/warmup_steps for step < warmup_steps, so step
// warmup_steps-1 reaches peak exactly. Decay progress
// p = (step - warmup)/(total - warmup) clamped to [0, 1].
double LearningRate(const ScheduleOptions& options, int64_t step);
[[nodiscard]] absl::Status ValidateSchedule(const ScheduleOptions& options);

// ---- optimizer hyper-parameters ------------------------------------------

enum class OptimizerKind : uint8_t { kMuon, kAdamW };
std::string OptimizerKindName(OptimizerKind kind);

struct MuonOptions {
  float momentum = 0.95f;     // mu, Nesterov. Default: 0.95 (spec)
  float update_rms = 0.18f;   // gamma: RMS of the update before lr. Default: 0.18 (spec)
  float weight_decay = 0.1f;  // lambda, decoupled. Default: 0.1 (spec)
};

struct AdamWOptions {
  float beta1 = 0.9f;         // Default: 0.9 (spec)
  float beta2 = 0.95f;        // Default: 0.95 (spec)
  float eps = 1e-20f;         // Default: 1e-20 (spec §6; fp32 represents it)
  float weight_decay = 0.1f;  // decoupled. Default: 0.1 (spec)
};

// One rule of the parameter-group config. `pattern` is a glob over the full
// parameter name: '*' matches any run of characters (dots included), '?' one
// character; everything else literally. Rules are tried in order; the first
// match decides. Unmatched parameters: rank >= 2 -> Muon, else AdamW.
struct ParamGroupRule {
  std::string pattern;
  OptimizerKind kind = OptimizerKind::kAdamW;
  double lr_scale = 1.0;              // multiplies the scheduled lr. Default: 1
  std::optional<float> weight_decay;  // overrides the optimizer's wd when set
};

// The V4 rules (spec §6): embeddings, LM head, absolute position embeddings
// and compressor position biases go to AdamW although they are matrices;
// RMSNorm weights, hc_base/hc_scale, attention sinks and router biases are
// 1-D and fall to AdamW by rank; every other matrix (experts one by one,
// hc_fn included) goes to Muon.
std::vector<ParamGroupRule> DefaultV4Rules();

// True when glob `pattern` matches all of `name` (syntax above).
bool GlobMatch(const std::string& pattern, const std::string& name);

struct OptimizerConfig {
  std::vector<ParamGroupRule> rules = DefaultV4Rules();
  MuonOptions muon;
  AdamWOptions adamw;
  ScheduleOptions schedule;
  // Global L2 norm over all gradients is clipped to this before the update
  // (grads scaled by max/norm when norm > max; the gradient tensors themselves
  // are not modified). <= 0 disables clipping. Default: 1.0
  double max_grad_norm = 1.0;
};

// ---- the optimizer ---------------------------------------------------------

struct Parameter {
  std::string name;  // e.g. "model.layers.0.mlp.experts.3.gate_proj.weight"
  Tensor value;      // f32, CPU, writable; updated in place
  Tensor grad;       // f32, same shape; read by Step()
};

struct StepStats {
  int64_t step = 0;       // index of the update just applied (0-based)
  double lr = 0;          // scheduled lr (before per-group lr_scale)
  double grad_norm = 0;   // global L2 norm before clipping
  double clip_scale = 1;  // factor applied to every gradient (1: not clipped)
};

class Optimizer {
 public:
  // Assigns every parameter to Muon or AdamW by `config.rules`. Errors
  // (InvalidArgument naming the parameter): non-f32 / non-CPU / read-only
  // value, grad shape mismatch, duplicate name, Muon for a rank-1 or rank>3
  // tensor, invalid schedule or hyper-parameters.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Optimizer>> Create(
      OptimizerConfig config, std::vector<Parameter> params);

  // Clips, schedules and applies one update to every parameter. A non-finite
  // gradient norm returns FailedPrecondition and changes nothing (the caller
  // decides whether to skip the batch or stop).
  [[nodiscard]] absl::StatusOr<StepStats> Step();

  // Number of updates applied so far (the index the next Step() uses).
  int64_t step() const { return step_; }
  OptimizerKind KindOf(const std::string& name) const;  // CHECKs the name exists
  const OptimizerConfig& config() const { return config_; }

  // Optimizer state as named tensors (fresh copies): "optim.step" (i64 [1]),
  // "<param>.muon_momentum", "<param>.adam_m", "<param>.adam_v" (f32, the
  // parameter's shape).
  std::map<std::string, Tensor> SaveState() const;
  // Restores SaveState()'s output. Every expected tensor must be present with
  // the right dtype and shape (NotFound / InvalidArgument naming it); extra
  // names are an InvalidArgument too (they mean a different parameter set).
  // On error nothing is changed.
  [[nodiscard]] absl::Status LoadState(const std::map<std::string, Tensor>& state);

 private:
  struct Slot {
    Parameter param;
    OptimizerKind kind;
    double lr_scale;
    float weight_decay;
    Tensor momentum;  // Muon
    Tensor adam_m;    // AdamW
    Tensor adam_v;    // AdamW
  };
  explicit Optimizer(OptimizerConfig config) : config_(std::move(config)) {}
  void MuonUpdate(Slot& slot, float lr, float grad_scale);
  void AdamWUpdate(Slot& slot, float lr, float grad_scale);

  OptimizerConfig config_;
  std::vector<Slot> slots_;
  int64_t step_ = 0;
  std::vector<float> scratch_;  // Newton–Schulz work space, reused across steps
};

// ---- building blocks, public for tests and benches -------------------------

// Global L2 norm of all tensors' elements (accumulated in double).
double GlobalGradNorm(const std::vector<Tensor>& grads);

// Replaces the row-major [rows, cols] matrix `x` by the hybrid Newton–Schulz
// orthogonalisation of x/||x||_F (10 steps, coefficients above). A zero matrix
// stays zero. Singular values of the result lie near 1 (within ~[0.99, 1.01]
// in fp32 for input singular values >= 1e-4·||x||_F; exact zeros stay zero).
void NewtonSchulzOrthogonalize(float* x, int64_t rows, int64_t cols);

}  // namespace retort::optim

#endif  // RETORT_LEARNER_OPTIM_OPTIM_H_
