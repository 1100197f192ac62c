// Muon, AdamW, schedules and clipping (see optim.h for the update rules).
#include "learner/optim/optim.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"

namespace retort::optim {
namespace {

// Spec §6: 8 steps of the fast quintic, then 2 that converge to exactly 1
// (f(x) = 2x - 1.5x^3 + 0.5x^5 has f(1) = 1, f'(1) = 0).
constexpr int kFastSteps = 8;
constexpr float kFast[3] = {3.4445f, -4.7750f, 2.0315f};
constexpr int kFinishSteps = 2;
constexpr float kFinish[3] = {2.0f, -1.5f, 0.5f};

constexpr char kStepStateName[] = "optim.step";
constexpr char kMomentumSuffix[] = ".muon_momentum";
constexpr char kAdamMSuffix[] = ".adam_m";
constexpr char kAdamVSuffix[] = ".adam_v";

struct ScheduleKindEntry {
  ScheduleKind kind;
  const char* name;
};
constexpr ScheduleKindEntry kScheduleKinds[] = {
    {ScheduleKind::kConstant, "constant"},
    {ScheduleKind::kLinear, "linear"},
    {ScheduleKind::kCosine, "cosine"},
};

// One Newton–Schulz step on the wide k x l matrix x (k <= l):
// x <- a x + (b A + c A A) x with A = x xᵀ. `a_buf`, `b_buf` are k x k, `y` is k x l.
void NewtonSchulzStep(const float coeff[3], int k, int l, float* x, float* y, float* a_buf,
                      float* b_buf) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, k, k, l, 1.0f, x, l, x, l, 0.0f, a_buf, k);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, k, k, k, coeff[2], a_buf, k, a_buf, k,
              0.0f, b_buf, k);
  for (int i = 0; i < k * k; ++i) b_buf[i] += coeff[1] * a_buf[i];
  std::memcpy(y, x, sizeof(float) * static_cast<size_t>(k) * l);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, k, l, k, 1.0f, b_buf, k, x, l, coeff[0], y,
              l);
  std::memcpy(x, y, sizeof(float) * static_cast<size_t>(k) * l);
}

absl::Status ValidateParam(const Parameter& p) {
  if (!p.value.defined() || p.value.dtype() != DType::kF32 || p.value.device() != Device::kCpu ||
      !p.value.writable()) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter '", p.name, "': value must be a writable f32 CPU tensor, got ",
                     p.value.defined() ? p.value.DebugString() : std::string("undefined")));
  }
  if (!p.grad.defined() || p.grad.dtype() != DType::kF32 || p.grad.device() != Device::kCpu ||
      p.grad.shape() != p.value.shape()) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter '", p.name, "': grad must be an f32 CPU tensor of shape ",
                     ShapeString(p.value.shape()), ", got ",
                     p.grad.defined() ? p.grad.DebugString() : std::string("undefined")));
  }
  return absl::OkStatus();
}

}  // namespace

// ---- schedules --------------------------------------------------------------

std::string ScheduleKindName(ScheduleKind kind) {
  for (const auto& e : kScheduleKinds) {
    if (e.kind == kind) return e.name;
  }
  LOG(FATAL) << "unknown ScheduleKind " << static_cast<int>(kind);
  return "";
}

std::optional<ScheduleKind> ScheduleKindFromName(const std::string& name) {
  for (const auto& e : kScheduleKinds) {
    if (name == e.name) return e.kind;
  }
  return std::nullopt;
}

absl::Status ValidateSchedule(const ScheduleOptions& o) {
  if (!(o.peak_lr >= 0) || !(o.final_lr >= 0) || !std::isfinite(o.peak_lr) ||
      !std::isfinite(o.final_lr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("schedule: peak_lr and final_lr must be finite and >= 0, got ", o.peak_lr,
                     ", ", o.final_lr));
  }
  if (o.warmup_steps < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("schedule: warmup_steps must be >= 0, got ", o.warmup_steps));
  }
  if (o.kind != ScheduleKind::kConstant && o.total_steps <= o.warmup_steps) {
    return absl::InvalidArgumentError(absl::StrCat("schedule: total_steps (", o.total_steps,
                                                   ") must exceed warmup_steps (", o.warmup_steps,
                                                   ") for ", ScheduleKindName(o.kind)));
  }
  return absl::OkStatus();
}

double LearningRate(const ScheduleOptions& o, int64_t step) {
  CHECK_GE(step, 0);
  if (step < o.warmup_steps)
    return o.peak_lr * static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  double p = 0;
  if (o.kind != ScheduleKind::kConstant) {
    p = static_cast<double>(step - o.warmup_steps) /
        static_cast<double>(o.total_steps - o.warmup_steps);
    p = std::clamp(p, 0.0, 1.0);
  }
  switch (o.kind) {
    case ScheduleKind::kConstant:
      return o.peak_lr;
    case ScheduleKind::kLinear:
      return o.peak_lr + (o.final_lr - o.peak_lr) * p;
    case ScheduleKind::kCosine:
      return o.final_lr + (o.peak_lr - o.final_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * p));
  }
  LOG(FATAL) << "unknown ScheduleKind " << static_cast<int>(o.kind);
  return 0;
}

// ---- groups -------------------------------------------------------------------

std::string OptimizerKindName(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::kMuon:
      return "muon";
    case OptimizerKind::kAdamW:
      return "adamw";
  }
  return "?";
}

bool GlobMatch(const std::string& pattern, const std::string& name) {
  // Iterative matcher with single-star backtracking: O(|pattern|·|name|).
  size_t p = 0, n = 0, star = std::string::npos, star_n = 0;
  while (n < name.size()) {
    if (p < pattern.size() && (pattern[p] == '?' || pattern[p] == name[n])) {
      ++p;
      ++n;
    } else if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      star_n = n;
    } else if (star != std::string::npos) {
      p = star + 1;
      n = ++star_n;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

std::vector<ParamGroupRule> DefaultV4Rules() {
  std::vector<ParamGroupRule> rules;
  for (const char* pattern : {"*embed*", "*lm_head*", "head.weight", "*.head.weight", "*.ape",
                              "*.ape.*", "*position_bias*"}) {
    rules.push_back({pattern, OptimizerKind::kAdamW, 1.0, std::nullopt});
  }
  return rules;
}

// ---- optimizer ----------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Optimizer>> Optimizer::Create(OptimizerConfig config,
                                                             std::vector<Parameter> params) {
  if (absl::Status s = ValidateSchedule(config.schedule); !s.ok()) return s;
  const MuonOptions& mu = config.muon;
  const AdamWOptions& ad = config.adamw;
  if (!(mu.momentum >= 0 && mu.momentum < 1) || !(mu.update_rms > 0) || !(mu.weight_decay >= 0)) {
    return absl::InvalidArgumentError(
        "muon: need 0 <= momentum < 1, update_rms > 0, weight_decay >= 0");
  }
  if (!(ad.beta1 >= 0 && ad.beta1 < 1) || !(ad.beta2 >= 0 && ad.beta2 < 1) || !(ad.eps >= 0) ||
      !(ad.weight_decay >= 0)) {
    return absl::InvalidArgumentError("adamw: need betas in [0, 1), eps >= 0, weight_decay >= 0");
  }
  std::unique_ptr<Optimizer> opt(new Optimizer(std::move(config)));
  std::set<std::string> names;
  for (Parameter& p : params) {
    if (absl::Status s = ValidateParam(p); !s.ok()) return s;
    if (!names.insert(p.name).second) {
      return absl::InvalidArgumentError(absl::StrCat("parameter '", p.name, "' given twice"));
    }
    Slot slot{std::move(p), OptimizerKind::kAdamW, 1.0, 0.0f, {}, {}, {}};
    const ParamGroupRule* rule = nullptr;
    for (const ParamGroupRule& r : opt->config_.rules) {
      if (GlobMatch(r.pattern, slot.param.name)) {
        rule = &r;
        break;
      }
    }
    const int rank = slot.param.value.rank();
    slot.kind = rule ? rule->kind : (rank >= 2 ? OptimizerKind::kMuon : OptimizerKind::kAdamW);
    slot.lr_scale = rule ? rule->lr_scale : 1.0;
    const Shape& shape = slot.param.value.shape();
    if (slot.kind == OptimizerKind::kMuon) {
      if (rank != 2 && rank != 3) {
        return absl::InvalidArgumentError(
            absl::StrCat("parameter '", slot.param.name, "' ", ShapeString(shape),
                         ": Muon needs a matrix [n, m] or experts [E, n, m]"));
      }
      slot.weight_decay =
          rule && rule->weight_decay ? *rule->weight_decay : opt->config_.muon.weight_decay;
      slot.momentum = Tensor::Zeros(DType::kF32, shape);
    } else {
      slot.weight_decay =
          rule && rule->weight_decay ? *rule->weight_decay : opt->config_.adamw.weight_decay;
      slot.adam_m = Tensor::Zeros(DType::kF32, shape);
      slot.adam_v = Tensor::Zeros(DType::kF32, shape);
    }
    opt->slots_.push_back(std::move(slot));
  }
  return opt;
}

OptimizerKind Optimizer::KindOf(const std::string& name) const {
  for (const Slot& s : slots_) {
    if (s.param.name == name) return s.kind;
  }
  LOG(FATAL) << "no parameter named " << name;
  return OptimizerKind::kAdamW;
}

double GlobalGradNorm(const std::vector<Tensor>& grads) {
  double sum = 0;
  for (const Tensor& g : grads) {
    const float* d = g.data<float>();
    for (int64_t i = 0, n = g.numel(); i < n; ++i) sum += static_cast<double>(d[i]) * d[i];
  }
  return std::sqrt(sum);
}

absl::StatusOr<StepStats> Optimizer::Step() {
  StepStats stats;
  stats.step = step_;
  std::vector<Tensor> grads;
  grads.reserve(slots_.size());
  for (const Slot& s : slots_) grads.push_back(s.param.grad);
  stats.grad_norm = GlobalGradNorm(grads);
  if (!std::isfinite(stats.grad_norm)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "optimizer step ", step_, ": gradient norm is ", stats.grad_norm, "; no update applied"));
  }
  if (config_.max_grad_norm > 0 && stats.grad_norm > config_.max_grad_norm) {
    stats.clip_scale = config_.max_grad_norm / stats.grad_norm;
  }
  stats.lr = LearningRate(config_.schedule, step_);
  for (Slot& s : slots_) {
    const float lr = static_cast<float>(stats.lr * s.lr_scale);
    const float scale = static_cast<float>(stats.clip_scale);
    switch (s.kind) {
      case OptimizerKind::kMuon:
        MuonUpdate(s, lr, scale);
        break;
      case OptimizerKind::kAdamW:
        AdamWUpdate(s, lr, scale);
        break;
    }
  }
  ++step_;
  return stats;
}

void Optimizer::MuonUpdate(Slot& slot, float lr, float grad_scale) {
  const Shape& shape = slot.param.value.shape();
  const int64_t experts = shape.size() == 3 ? shape[0] : 1;
  const int64_t n = shape[shape.size() - 2], m = shape[shape.size() - 1];
  const int64_t size = n * m;
  const float mu = config_.muon.momentum;
  const float out_scale = std::sqrt(static_cast<float>(std::max(n, m))) * config_.muon.update_rms;
  const float decay = 1.0f - lr * slot.weight_decay;
  scratch_.resize(static_cast<size_t>(size));
  float* u = scratch_.data();
  for (int64_t e = 0; e < experts; ++e) {
    const float* g = slot.param.grad.data<float>() + e * size;
    float* mom = slot.momentum.mutable_data<float>() + e * size;
    float* w = slot.param.value.mutable_data<float>() + e * size;
    for (int64_t i = 0; i < size; ++i) {
      const float gi = g[i] * grad_scale;
      mom[i] = mu * mom[i] + gi;
      u[i] = mu * mom[i] + gi;  // Nesterov look-ahead
    }
    NewtonSchulzOrthogonalize(u, n, m);
    for (int64_t i = 0; i < size; ++i) w[i] = w[i] * decay - lr * out_scale * u[i];
  }
}

void Optimizer::AdamWUpdate(Slot& slot, float lr, float grad_scale) {
  const AdamWOptions& o = config_.adamw;
  const double t = static_cast<double>(step_ + 1);
  const float inv_bc1 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(o.beta1), t)));
  const float inv_sqrt_bc2 =
      static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(static_cast<double>(o.beta2), t)));
  const float decay = 1.0f - lr * slot.weight_decay;
  const float* g = slot.param.grad.data<float>();
  float* w = slot.param.value.mutable_data<float>();
  float* m = slot.adam_m.mutable_data<float>();
  float* v = slot.adam_v.mutable_data<float>();
  for (int64_t i = 0, size = slot.param.value.numel(); i < size; ++i) {
    const float gi = g[i] * grad_scale;
    m[i] = o.beta1 * m[i] + (1.0f - o.beta1) * gi;
    v[i] = o.beta2 * v[i] + (1.0f - o.beta2) * gi * gi;
    const float m_hat = m[i] * inv_bc1;
    const float denom = std::sqrt(v[i]) * inv_sqrt_bc2 + o.eps;
    w[i] = w[i] * decay - lr * (denom > 0 ? m_hat / denom : 0.0f);
  }
}

std::map<std::string, Tensor> Optimizer::SaveState() const {
  std::map<std::string, Tensor> state;
  const int64_t step = step_;
  state[kStepStateName] = Tensor::FromI64(absl::MakeConstSpan(&step, 1), {1});
  for (const Slot& s : slots_) {
    switch (s.kind) {
      case OptimizerKind::kMuon:
        state[s.param.name + kMomentumSuffix] = s.momentum.Clone();
        break;
      case OptimizerKind::kAdamW:
        state[s.param.name + kAdamMSuffix] = s.adam_m.Clone();
        state[s.param.name + kAdamVSuffix] = s.adam_v.Clone();
        break;
    }
  }
  return state;
}

absl::Status Optimizer::LoadState(const std::map<std::string, Tensor>& state) {
  // Validate everything first so a failure leaves the optimizer untouched.
  auto find = [&](const std::string& name, DType dtype,
                  const Shape& shape) -> absl::StatusOr<const Tensor*> {
    auto it = state.find(name);
    if (it == state.end())
      return absl::NotFoundError(absl::StrCat("optimizer state: missing tensor '", name, "'"));
    const Tensor& t = it->second;
    if (!t.defined() || t.dtype() != dtype || t.shape() != shape || t.device() != Device::kCpu) {
      return absl::InvalidArgumentError(
          absl::StrCat("optimizer state: tensor '", name, "' is ",
                       t.defined() ? t.DebugString() : std::string("undefined"), ", expected ",
                       std::string(DTypeName(dtype)), ShapeString(shape)));
    }
    return &t;
  };
  std::vector<std::pair<const Tensor*, Tensor*>> copies;
  auto step_t = find(kStepStateName, DType::kI64, {1});
  if (!step_t.ok()) return step_t.status();
  const int64_t step = (*step_t)->data<int64_t>()[0];
  if (step < 0)
    return absl::InvalidArgumentError(absl::StrCat("optimizer state: negative step ", step));
  size_t expected = 1;
  for (Slot& s : slots_) {
    const Shape& shape = s.param.value.shape();
    std::vector<std::pair<std::string, Tensor*>> wanted;
    switch (s.kind) {
      case OptimizerKind::kMuon:
        wanted = {{s.param.name + kMomentumSuffix, &s.momentum}};
        break;
      case OptimizerKind::kAdamW:
        wanted = {{s.param.name + kAdamMSuffix, &s.adam_m},
                  {s.param.name + kAdamVSuffix, &s.adam_v}};
        break;
    }
    for (auto& [name, dst] : wanted) {
      auto src = find(name, DType::kF32, shape);
      if (!src.ok()) return src.status();
      copies.emplace_back(*src, dst);
      ++expected;
    }
  }
  if (state.size() != expected) {
    for (const auto& [name, t] : state) {
      bool known = name == kStepStateName;
      for (const auto& [src, dst] : copies) known = known || src == &t;
      if (!known) {
        return absl::InvalidArgumentError(absl::StrCat(
            "optimizer state: tensor '", name, "' belongs to no parameter of this optimizer"));
      }
    }
  }
  for (auto& [src, dst] : copies) std::memcpy(dst->mutable_raw(), src->raw(), src->nbytes());
  step_ = step;
  return absl::OkStatus();
}

// ---- Newton–Schulz --------------------------------------------------------------

void NewtonSchulzOrthogonalize(float* x, int64_t rows, int64_t cols) {
  CHECK_GT(rows, 0);
  CHECK_GT(cols, 0);
  const int64_t size = rows * cols;
  double sq = 0;
  for (int64_t i = 0; i < size; ++i) sq += static_cast<double>(x[i]) * x[i];
  if (sq == 0) return;
  const float inv_norm = static_cast<float>(1.0 / std::sqrt(sq));
  const bool transpose = rows > cols;
  const int k = static_cast<int>(transpose ? cols : rows);  // small side
  const int l = static_cast<int>(transpose ? rows : cols);
  std::vector<float> work(static_cast<size_t>(2 * size + 2 * static_cast<int64_t>(k) * k));
  float* wide = work.data();
  float* y = wide + size;
  float* a_buf = y + size;
  float* b_buf = a_buf + static_cast<size_t>(k) * k;
  if (transpose) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) wide[c * rows + r] = x[r * cols + c] * inv_norm;
  } else {
    for (int64_t i = 0; i < size; ++i) wide[i] = x[i] * inv_norm;
  }
  for (int s = 0; s < kFastSteps; ++s) NewtonSchulzStep(kFast, k, l, wide, y, a_buf, b_buf);
  for (int s = 0; s < kFinishSteps; ++s) NewtonSchulzStep(kFinish, k, l, wide, y, a_buf, b_buf);
  if (transpose) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) x[r * cols + c] = wide[c * rows + r];
  } else {
    std::memcpy(x, wide, sizeof(float) * static_cast<size_t>(size));
  }
}

}  // namespace retort::optim
