#include "controller/model_backend.h"

#include <cstdlib>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "controller/flags.h"
#include "model/base/status_macros.h"
#ifdef RETORT_HAVE_CUDA
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/sampling.cuh"
#include "model/v4/cuda_model.h"
#endif

namespace retort::controller {
namespace {

absl::StatusOr<v4::Numerics> NumericsFromFlags() {
  const std::string n = absl::GetFlag(FLAGS_numerics);
  if (n == "exact") return v4::Numerics::kExact;
  if (n == "deployment") return v4::Numerics::kDeployment;
  return absl::InvalidArgumentError(absl::StrCat("--numerics must be exact or deployment, got '", n, "'"));
}

class CpuBackend : public ModelBackend {
 public:
  explicit CpuBackend(std::unique_ptr<v4::Model> m) : model_(std::move(m)) {}
  const io::V4Config& config() const override { return model_->config(); }
  std::string Describe() const override { return "cpu"; }
  absl::StatusOr<int> NewSequence() override {
    states_.push_back(model_->NewState());
    return static_cast<int>(states_.size() - 1);
  }
  absl::StatusOr<std::vector<float>> Step(absl::Span<const Chunk> chunks) override {
    std::vector<v4::Model::Chunk> c;
    for (const Chunk& ch : chunks) {
      if (ch.seq < 0 || ch.seq >= static_cast<int>(states_.size()))
        return absl::InvalidArgumentError(absl::StrCat("unknown sequence ", ch.seq));
      c.push_back({states_[ch.seq].get(), ch.tokens});
    }
    return model_->Step(c);
  }
  absl::StatusOr<rollout::SampledToken> StepAndSample(const Chunk& chunk, rollout::Sampler& sampler) override {
    ASSIGN_OR_RETURN(std::vector<float> logits, Step(absl::MakeConstSpan(&chunk, 1)));
    const int64_t V = config().vocab_size;
    if (logits.empty()) return absl::InvalidArgumentError("StepAndSample: empty chunk");
    return sampler.Sample(absl::MakeConstSpan(logits.data() + logits.size() - V, V));
  }

 private:
  std::unique_ptr<v4::Model> model_;
  std::vector<std::unique_ptr<v4::DecodeState>> states_;
};

#ifdef RETORT_HAVE_CUDA
class CudaBackend : public ModelBackend {
 public:
  CudaBackend(std::unique_ptr<v4::CudaModel> m, std::string desc) : model_(std::move(m)), desc_(std::move(desc)) {}
  const io::V4Config& config() const override { return model_->config(); }
  std::string Describe() const override { return desc_; }
  absl::StatusOr<int> NewSequence() override { return model_->NewSequence(); }
  absl::StatusOr<std::vector<float>> Step(absl::Span<const Chunk> chunks) override {
    std::vector<v4::CudaModel::Chunk> c;
    for (const Chunk& ch : chunks) c.push_back({ch.seq, ch.tokens});
    return model_->Step(c);
  }
  absl::StatusOr<rollout::SampledToken> StepAndSample(const Chunk& chunk, rollout::Sampler& sampler) override {
    if (chunk.tokens.empty()) return absl::InvalidArgumentError("StepAndSample: empty chunk");
    const int64_t V = config().vocab_size;
    std::vector<v4::CudaModel::Chunk> c = {{chunk.seq, chunk.tokens}};
    ASSIGN_OR_RETURN(const float* logits, model_->StepOnDevice(c));
    const float* last = logits + (static_cast<int64_t>(chunk.tokens.size()) - 1) * V;
    if (!scratch_.get()) {
      ASSIGN_OR_RETURN(scratch_, cuda::DeviceBuffer::Allocate(cuda::SamplingScratchBytes(1, V)));
      ASSIGN_OR_RETURN(io_, cuda::DeviceBuffer::Allocate(256));
    }
    const rollout::SamplingParams& p = sampler.params();
    const cuda::SamplingRow row{p.temperature, p.top_k, p.top_p, sampler.NextCanonical()};
    auto* base = io_.as<uint8_t>();
    auto* d_row = reinterpret_cast<cuda::SamplingRow*>(base);
    auto* d_tok = reinterpret_cast<int64_t*>(base + 64);
    auto* d_lp = reinterpret_cast<float*>(base + 128);
    auto* d_mlp = reinterpret_cast<float*>(base + 192);
    RETURN_IF_ERROR(cuda::CopyToDevice(d_row, &row, sizeof(row)));
    RETURN_IF_ERROR(cuda::SampleRows(last, 1, V, d_row, scratch_.get(), d_tok, d_lp, d_mlp, nullptr));
    rollout::SampledToken t;
    RETURN_IF_ERROR(cuda::CopyToHost(&t.token, d_tok, sizeof(int64_t)));
    RETURN_IF_ERROR(cuda::CopyToHost(&t.logprob, d_lp, sizeof(float)));
    RETURN_IF_ERROR(cuda::CopyToHost(&t.model_logprob, d_mlp, sizeof(float)));
    return t;
  }

 private:
  std::unique_ptr<v4::CudaModel> model_;
  std::string desc_;
  cuda::DeviceBuffer scratch_, io_;  // sampler scratch; row params and results
};
#endif

}  // namespace

namespace {

// --model in the given numerics, with --threads applied to the CPU pool.
absl::StatusOr<std::unique_ptr<v4::Model>> LoadCpuModel(v4::Numerics numerics) {
  const std::string dir = absl::GetFlag(FLAGS_model);
  // The CPU thread pool reads RETORT_NUM_THREADS when first used.
  if (absl::GetFlag(FLAGS_threads) > 0)
    setenv("RETORT_NUM_THREADS", std::to_string(absl::GetFlag(FLAGS_threads)).c_str(), 1);
  if (dir.empty()) return absl::InvalidArgumentError("--model DIR is required");
  return v4::Model::Load(dir, numerics);
}

}  // namespace

absl::StatusOr<std::unique_ptr<v4::Model>> LoadCpuModelFromFlags() {
  ASSIGN_OR_RETURN(v4::Numerics numerics, NumericsFromFlags());
  return LoadCpuModel(numerics);
}

absl::StatusOr<std::unique_ptr<ModelBackend>> LoadBackendFromFlags(int max_sequences, int64_t max_length) {
  const std::string device = absl::GetFlag(FLAGS_device);
  if (device == "cpu") {
    ASSIGN_OR_RETURN(auto m, LoadCpuModelFromFlags());
    return std::unique_ptr<ModelBackend>(new CpuBackend(std::move(m)));
  }
  if (device != "cuda") return absl::InvalidArgumentError(absl::StrCat("--device must be cpu or cuda, got '", device, "'"));
#ifdef RETORT_HAVE_CUDA
  ASSIGN_OR_RETURN(v4::Numerics numerics, NumericsFromFlags());
  // The weights load (and dequantize) on the host in exact form, then go to
  // the device in the numerics asked for.
  ASSIGN_OR_RETURN(auto host, LoadCpuModel(v4::Numerics::kExact));
  v4::CudaModelOptions o;
  o.max_sequences = max_sequences;
  o.max_length = max_length;
  o.numerics = numerics;
  ASSIGN_OR_RETURN(auto m, v4::CudaModel::Create(*host, o));
  ASSIGN_OR_RETURN(std::string desc, cuda::DeviceDescription(0));
  return std::unique_ptr<ModelBackend>(new CudaBackend(std::move(m), desc));
#else
  return absl::UnimplementedError("--device cuda: this build has no CUDA backend (nvcc was not found at configure time)");
#endif
}

}  // namespace retort::controller
