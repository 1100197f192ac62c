// Trainer: parameters, update step and atomic checkpoints (see trainer.h).
#include "learner/trainer/trainer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "model/base/status_macros.h"
#include "model/io/v4_config.h"
#include "model/kernels/cpu/cpu_kernels.h"
#include "model/tensor/dtype.h"

namespace retort::trainer {
namespace {

constexpr char kStateFile[] = "trainer_state.safetensors";

absl::Status ErrnoError(const std::string& what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

absl::StatusOr<std::string> ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::Status FsyncPath(const std::string& path, bool directory) {
  const int fd = open(path.c_str(), directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd < 0) return ErrnoError("open", path);
  const int rc = fsync(fd);
  close(fd);
  if (rc != 0) return ErrnoError("fsync", path);
  return absl::OkStatus();
}

absl::Status WriteTextDurably(const std::string& path, const std::string& text) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return ErrnoError("create", path);
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      close(fd);
      return ErrnoError("write", path);
    }
    done += static_cast<size_t>(n);
  }
  if (fsync(fd) != 0) {
    close(fd);
    return ErrnoError("fsync", path);
  }
  if (close(fd) != 0) return ErrnoError("close", path);
  return absl::OkStatus();
}

Tensor Scalar(int64_t v) { return Tensor::FromI64({v}, {1}); }

absl::StatusOr<int64_t> ReadScalar(const io::SafetensorsFile& f, const std::string& name) {
  ASSIGN_OR_RETURN(Tensor t, f.Get(name));
  if (t.dtype() != DType::kI64 || t.numel() != 1)
    return absl::InvalidArgumentError(
        absl::StrCat(f.path(), ": '", name, "' must be i64 [1], got ", t.DebugString()));
  return t.data<int64_t>()[0];
}

constexpr std::pair<CheckpointLayout, std::string_view> kLayoutNames[] = {
    {CheckpointLayout::kHf, "hf"},
    {CheckpointLayout::kReleased, "released"},
};

}  // namespace

std::string_view CheckpointLayoutName(CheckpointLayout layout) {
  for (const auto& [l, name] : kLayoutNames)
    if (l == layout) return name;
  LOG(FATAL) << "unnamed CheckpointLayout " << static_cast<int>(layout);
  return "";
}

std::optional<CheckpointLayout> CheckpointLayoutFromName(std::string_view name) {
  for (const auto& [l, n] : kLayoutNames)
    if (n == name) return l;
  return std::nullopt;
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Build(const std::string& dir,
                                                        TrainerOptions options) {
  std::unique_ptr<Trainer> t(new Trainer());
  ASSIGN_OR_RETURN(t->config_json_, ReadText(dir + "/config.json"));
  ASSIGN_OR_RETURN(io::V4Config config, io::ParseV4Config(t->config_json_, dir + "/config.json"));
  {
    ASSIGN_OR_RETURN(std::unique_ptr<v4::Model> loaded, v4::Model::Load(dir));
    ASSIGN_OR_RETURN(t->tensors_, v4::HfTensors(*loaded));
  }
  // The model views tensors_: the optimizer's in-place updates are the model's.
  io::TensorMap map(dir + " (trainer parameters)");
  for (const auto& nt : t->tensors_) map.Add(nt.name, nt.value);
  ASSIGN_OR_RETURN(t->model_, v4::Model::FromTensors(config, map));
  if (options.anticipatory_routing_delay < 0)
    return absl::InvalidArgumentError(absl::StrCat("anticipatory_routing_delay must be >= 0, got ",
                                                   options.anticipatory_routing_delay));
  if (!(options.balance_loss_weight >= 0) || !std::isfinite(options.balance_loss_weight))
    return absl::InvalidArgumentError(absl::StrCat(
        "balance_loss_weight must be finite and >= 0, got ", options.balance_loss_weight));
  if (options.bias_update_speed < 0 || !std::isfinite(options.bias_update_speed))
    return absl::InvalidArgumentError(
        absl::StrCat("bias_update_speed must be finite and >= 0, got ", options.bias_update_speed));
  t->router_bias_.resize(config.num_layers);
  std::vector<optim::Parameter> params;
  for (const auto& nt : t->tensors_) {
    for (int l = 0; l < config.num_layers; ++l)
      if (nt.name == absl::StrCat("model.layers.", l, ".mlp.gate.e_score_correction_bias"))
        t->router_bias_[l] = nt.value;
    if (!nt.trainable) continue;
    Tensor g = Tensor::Zeros(DType::kF32, nt.value.shape());
    t->grads_[nt.name] = g;
    Tensor value = nt.value;
    const bool expert = nt.name.find(".mlp.experts.") != std::string::npos;
    if (options.qat_experts && expert) {
      value = nt.value.Clone();
      t->masters_[nt.name] = value;
    }
    params.push_back({nt.name, value, g});
  }
  ASSIGN_OR_RETURN(t->optimizer_, optim::Optimizer::Create(options.optimizer, std::move(params)));
  t->rng_state_ = options.seed;
  t->options_ = std::move(options);
  t->RefreshQuantizedExperts();
  return t;
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::FromModelDir(const std::string& dir,
                                                               TrainerOptions options) {
  return Build(dir, std::move(options));
}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::FromCheckpoint(const std::string& dir,
                                                                 TrainerOptions options) {
  const std::string state_path = dir + "/" + kStateFile;
  if (!std::filesystem::exists(state_path))
    return absl::NotFoundError(
        absl::StrCat(state_path, ": no trainer state (not a checkpoint SaveCheckpoint wrote)"));
  ASSIGN_OR_RETURN(std::shared_ptr<io::SafetensorsFile> state,
                   io::SafetensorsFile::Open(state_path));
  // Old checkpoints have no "model_layout": they were all HF.
  if (auto it = state->metadata().find("model_layout"); it != state->metadata().end()) {
    const auto layout = CheckpointLayoutFromName(it->second);
    if (!layout)
      return absl::DataLossError(
          absl::StrCat(state_path, ": unknown model_layout '", it->second, "'"));
    if (*layout != CheckpointLayout::kHf)
      return absl::FailedPreconditionError(absl::StrCat(
          dir, ": the model was saved in the ", it->second,
          " layout (FP8/MXFP4/BF16): the optimizer state belongs to fp32 master weights it "
          "does not hold, so the run cannot resume from it; resume from an HF-layout checkpoint, "
          "or start a new run from this directory as a model"));
  }
  auto built = Build(dir, std::move(options));
  if (!built.ok()) return Annotate(built.status(), absl::StrCat("loading checkpoint ", dir));
  std::unique_ptr<Trainer> t = std::move(built).value();
  std::map<std::string, Tensor> optim_state;
  for (const auto& [name, entry] : state->entries()) {
    if (name.rfind("trainer.", 0) == 0) continue;
    ASSIGN_OR_RETURN(Tensor v, state->Get(name));
    optim_state[name] = v.Clone();
  }
  if (absl::Status s = t->optimizer_->LoadState(optim_state); !s.ok())
    return Annotate(s, state_path);
  ASSIGN_OR_RETURN(int64_t step, ReadScalar(*state, "trainer.step"));
  if (step != t->optimizer_->step())
    return absl::DataLossError(absl::StrCat(state_path, ": trainer.step ", step,
                                            " disagrees with optim.step ", t->optimizer_->step()));
  ASSIGN_OR_RETURN(int64_t rng, ReadScalar(*state, "trainer.rng"));
  t->rng_state_ = static_cast<uint64_t>(rng);
  ASSIGN_OR_RETURN(t->data_position_, ReadScalar(*state, "trainer.data_position"));
  const auto& c = t->model_->config();
  for (int i = 0;; ++i) {
    const std::string tn = absl::StrCat("trainer.prefetch.", i, ".tokens");
    const std::string rn = absl::StrCat("trainer.prefetch.", i, ".routes");
    if (!state->Has(tn)) {
      if (state->Has(rn))
        return absl::DataLossError(absl::StrCat(state_path, ": '", rn, "' without '", tn, "'"));
      break;
    }
    if (t->options_.anticipatory_routing_delay <= 0)
      return absl::InvalidArgumentError(
          absl::StrCat(state_path,
                       ": holds anticipatory routes but the options turn "
                       "anticipatory routing off"));
    ASSIGN_OR_RETURN(Tensor tokens, state->Get(tn));
    ASSIGN_OR_RETURN(Tensor routes, state->Get(rn));
    if (tokens.dtype() != DType::kI64 || tokens.rank() != 2)
      return absl::InvalidArgumentError(
          absl::StrCat(state_path, ": '", tn, "' must be i64 [B, T], got ", tokens.DebugString()));
    Prefetched p;
    p.B = tokens.dim(0);
    p.T = tokens.dim(1);
    const Shape want = {c.num_layers, p.B, p.T, c.experts_per_token};
    if (routes.dtype() != DType::kI32 || routes.shape() != want)
      return absl::InvalidArgumentError(absl::StrCat(state_path, ": '", rn, "' must be i32 ",
                                                     ShapeString(want), ", got ",
                                                     routes.DebugString()));
    p.tokens.assign(tokens.data<int64_t>(), tokens.data<int64_t>() + tokens.numel());
    p.routes.assign(routes.data<int32_t>(), routes.data<int32_t>() + routes.numel());
    for (int32_t e : p.routes)
      if (e < 0 || e >= c.n_routed_experts)
        return absl::DataLossError(absl::StrCat(state_path, ": '", rn, "' names expert ", e));
    t->prefetched_.push_back(std::move(p));
  }
  return t;
}

void QuantizeMxFp4Rows(float* w, int64_t rows, int64_t cols) {
  uint8_t codes[32];
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < cols; b += 32) {
      float* x = w + r * cols + b;
      const int64_t n = std::min<int64_t>(32, cols - b);
      const float scale = E8M0ToF32(cpu::QuantizeMxFp4Block(x, n, codes));
      for (int64_t i = 0; i < n; ++i) x[i] = scale * E2M1ToF32(codes[i]);
    }
}

void Trainer::RefreshQuantizedExperts() {
  for (auto& nt : tensors_) {
    auto it = masters_.find(nt.name);
    if (it == masters_.end()) continue;
    std::memcpy(nt.value.mutable_data<float>(), it->second.data<float>(), nt.value.nbytes());
    const int64_t cols = nt.value.dim(-1);
    QuantizeMxFp4Rows(nt.value.mutable_data<float>(), nt.value.numel() / cols, cols);
  }
}

void Trainer::UpdateRouterBias(const std::vector<std::vector<int64_t>>& load) {
  const float speed = options_.bias_update_speed;
  if (speed == 0.0f) return;
  for (size_t l = 0; l < router_bias_.size(); ++l) {
    if (!router_bias_[l].defined()) continue;
    const auto& counts = load[l];
    double mean = 0;
    for (int64_t c : counts) mean += static_cast<double>(c);
    mean /= static_cast<double>(counts.size());
    float* bias = router_bias_[l].mutable_data<float>();
    for (size_t e = 0; e < counts.size(); ++e) {
      const double gap = mean - static_cast<double>(counts[e]);
      bias[e] += gap > 0 ? speed : gap < 0 ? -speed : 0.0f;
    }
  }
}

uint64_t Trainer::NextRandom() {
  // splitmix64: one word of state, so the checkpoint stores it exactly.
  uint64_t z = (rng_state_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

absl::StatusOr<v4::WeightedLoss> Trainer::Evaluate(const v4::TokenBatch& batch) const {
  return v4::WeightedTokenLossAndGradients(*model_, batch, nullptr);
}

absl::Status Trainer::Prefetch(const v4::TokenBatch& batch) {
  if (options_.anticipatory_routing_delay <= 0)
    return absl::FailedPreconditionError(
        "Prefetch: anticipatory routing is off (anticipatory_routing_delay = 0)");
  const auto& c = model_->config();
  const int64_t B = batch.B, T = batch.T, K = c.experts_per_token;
  if (B <= 0 || T <= 0 || static_cast<int64_t>(batch.tokens.size()) != B * T)
    return absl::InvalidArgumentError(absl::StrCat("Prefetch: tokens has ", batch.tokens.size(),
                                                   " entries, expected B*T for B=", B, " T=", T));
  Prefetched p;
  p.tokens.assign(batch.tokens.begin(), batch.tokens.end());
  p.routes.resize(static_cast<size_t>(c.num_layers) * B * T * K);
  p.B = B;
  p.T = T;
  if (!batch.documents.empty() && static_cast<int64_t>(batch.documents.size()) != B * T)
    return absl::InvalidArgumentError(absl::StrCat("Prefetch: documents has ",
                                                   batch.documents.size(),
                                                   " entries, expected B*T for B=", B, " T=", T));
  // Padding (not run) gets experts 0..K-1: valid routes nothing reads.
  for (size_t i = 0; i < p.routes.size(); ++i) p.routes[i] = static_cast<int32_t>(i % K);
  // Routed as the training forward runs it: document by document (Note [Packed documents]).
  for (const auto& [begin, length] : v4::SequencesOf(batch)) {
    auto state = model_->NewState();
    v4::StepOutputs out;
    out.capture_routes = true;
    std::vector<v4::Model::Chunk> chunk = {{state.get(), batch.tokens.subspan(begin, length)}};
    RETURN_IF_ERROR(model_->Step(chunk, &out).status());
    for (int l = 0; l < c.num_layers; ++l)
      std::copy(out.routes[l].begin(), out.routes[l].end(),
                p.routes.begin() + (l * B * T + begin) * K);
  }
  prefetched_.push_back(std::move(p));
  return absl::OkStatus();
}

absl::StatusOr<StepResult> Trainer::Step(const v4::TokenBatch& input) {
  v4::TokenBatch batch = input;
  batch.balance_loss_weight = options_.balance_loss_weight;
  std::vector<int32_t> routes;
  if (options_.anticipatory_routing_delay > 0) {
    if (prefetched_.empty())
      return absl::FailedPreconditionError(
          absl::StrCat("step ", step(), ": anticipatory routing needs this batch Prefetch()ed ",
                       options_.anticipatory_routing_delay, " steps earlier; nothing is queued"));
    Prefetched& p = prefetched_.front();
    if (p.B != batch.B || p.T != batch.T ||
        !std::equal(p.tokens.begin(), p.tokens.end(), batch.tokens.begin(), batch.tokens.end()))
      return absl::FailedPreconditionError(
          absl::StrCat("step ", step(), ": the batch is not the one Prefetch()ed for it"));
    if (!input.replay_routes.empty())
      return absl::InvalidArgumentError(
          "a batch with replay_routes cannot also use anticipatory routing");
    routes = std::move(p.routes);
    batch.replay_routes = routes;
  }
  v4::Gradients g;
  ASSIGN_OR_RETURN(v4::WeightedLoss wl, v4::WeightedTokenLossAndGradients(*model_, batch, &g));
  if (options_.anticipatory_routing_delay > 0) prefetched_.erase(prefetched_.begin());
  if (!std::isfinite(wl.loss))
    return absl::FailedPreconditionError(absl::StrCat("step ", step(), ": loss is ", wl.loss));
  // A tied head has no tensor of its own: its gradient is the embedding's.
  if (auto it = g.by_name.find("lm_head.weight");
      it != g.by_name.end() && !grads_.count("lm_head.weight")) {
    auto& emb = g.by_name["model.embed_tokens.weight"];
    if (emb.empty()) emb.assign(it->second.size(), 0.0f);
    for (size_t i = 0; i < emb.size(); ++i) emb[i] += it->second[i];
    g.by_name.erase(it);
  }
  for (auto& [name, tensor] : grads_) {
    float* dst = tensor.mutable_data<float>();
    auto it = g.by_name.find(name);
    if (it == g.by_name.end()) {
      std::memset(dst, 0, tensor.nbytes());
      continue;
    }
    CHECK_EQ(static_cast<int64_t>(it->second.size()), tensor.numel()) << name;
    std::memcpy(dst, it->second.data(), tensor.nbytes());
  }
  ASSIGN_OR_RETURN(optim::StepStats stats, optimizer_->Step());
  RefreshQuantizedExperts();
  UpdateRouterBias(wl.expert_load);
  StepResult r;
  r.step = stats.step;
  r.loss = wl.loss;
  r.lr = stats.lr;
  r.grad_norm = stats.grad_norm;
  r.clip_scale = stats.clip_scale;
  r.balance_loss = wl.balance_loss;
  for (int64_t v : batch.targets) r.tokens += v >= 0;
  return r;
}

absl::Status Trainer::SaveCheckpoint(const std::string& dir) const {
  namespace fs = std::filesystem;
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  const fs::path final_path(d);
  const fs::path parent = final_path.has_parent_path() ? final_path.parent_path() : fs::path(".");
  const std::string tmp = absl::StrCat(d, ".tmp-", getpid());
  // The model part first: a layout that cannot hold this model fails before
  // anything is written.
  std::vector<std::pair<std::string, Tensor>> model_tensors;
  for (const auto& nt : tensors_) {
    auto it = masters_.find(nt.name);  // QAT: the fp32 masters, not their round trip
    model_tensors.emplace_back(nt.name, it == masters_.end() ? nt.value : it->second);
  }
  switch (options_.checkpoint_layout) {
    case CheckpointLayout::kHf:
      break;
    case CheckpointLayout::kReleased: {
      auto released = v4::ReleasedTensors(model_tensors);
      if (!released.ok()) return Annotate(released.status(), "released-layout checkpoint " + d);
      model_tensors = std::move(released).value();
      break;
    }
  }
  std::error_code ec;
  fs::remove_all(tmp, ec);
  if (!fs::create_directories(tmp, ec) || ec)
    return absl::InternalError(absl::StrCat("creating ", tmp, ": ", ec.message()));
  RETURN_IF_ERROR(WriteTextDurably(tmp + "/config.json", config_json_));
  RETURN_IF_ERROR(
      io::WriteSafetensors(tmp + "/model.safetensors", model_tensors, {{"format", "pt"}}));
  std::vector<std::pair<std::string, Tensor>> state;
  for (auto& [name, t] : optimizer_->SaveState()) state.emplace_back(name, t);
  state.emplace_back("trainer.step", Scalar(optimizer_->step()));
  state.emplace_back("trainer.rng", Scalar(static_cast<int64_t>(rng_state_)));
  state.emplace_back("trainer.data_position", Scalar(data_position_));
  const int64_t L = model_->config().num_layers, K = model_->config().experts_per_token;
  for (size_t i = 0; i < prefetched_.size(); ++i) {
    const Prefetched& p = prefetched_[i];
    state.emplace_back(absl::StrCat("trainer.prefetch.", i, ".tokens"),
                       Tensor::FromI64(p.tokens, {p.B, p.T}));
    state.emplace_back(absl::StrCat("trainer.prefetch.", i, ".routes"),
                       Tensor::FromI32(p.routes, {L, p.B, p.T, K}));
  }
  RETURN_IF_ERROR(io::WriteSafetensors(
      tmp + "/" + kStateFile, state,
      {{"producer", "retort trainer"},
       {"model_layout", std::string(CheckpointLayoutName(options_.checkpoint_layout))}}));
  RETURN_IF_ERROR(FsyncPath(tmp, true));
  const std::string old = absl::StrCat(d, ".old-", getpid());
  const bool had_old = fs::exists(final_path);
  if (had_old && rename(d.c_str(), old.c_str()) != 0) return ErrnoError("rename", d);
  if (rename(tmp.c_str(), d.c_str()) != 0) return ErrnoError("rename", tmp);
  RETURN_IF_ERROR(FsyncPath(parent.string(), true));
  if (had_old) fs::remove_all(old, ec);  // the new checkpoint is durable already
  return absl::OkStatus();
}

}  // namespace retort::trainer
