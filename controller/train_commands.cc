// `retort grad`: loss and every parameter gradient of a V4 checkpoint on a batch.
// `retort learner sft --config FILE`: supervised fine-tuning (learner/sft/sft.h).
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "controller/command.h"
#include "controller/flags.h"
#include "learner/sft/sft.h"
#include "model/base/status_macros.h"
#include "model/io/safetensors.h"
#include "model/v4/model.h"
#include "model/v4/train.h"

ABSL_FLAG(std::string, config, "",
          "learner: the run's config, protobuf text (retort.v1.SftLearnerConfig; see "
          "configs/sft_tiny.textproto)");

namespace retort::controller {
namespace {

using Clock = std::chrono::steady_clock;

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "retort: %s\n", s.ToString().c_str());
  return 1;
}

absl::Status Grad() {
  const std::string dir = absl::GetFlag(FLAGS_model);
  const std::string in_path = absl::GetFlag(FLAGS_input), out_path = absl::GetFlag(FLAGS_output);
  if (dir.empty()) return absl::InvalidArgumentError("--model DIR is required");
  if (in_path.empty() || out_path.empty())
    return absl::InvalidArgumentError("--input and --output are required");
  if (absl::GetFlag(FLAGS_threads) > 0)
    setenv("RETORT_NUM_THREADS", std::to_string(absl::GetFlag(FLAGS_threads)).c_str(), 1);
  ASSIGN_OR_RETURN(auto model, v4::Model::Load(dir));
  ASSIGN_OR_RETURN(auto in, io::SafetensorsFile::Open(in_path));
  ASSIGN_OR_RETURN(Tensor ids, in->Get("input_ids"));
  const auto t0 = Clock::now();
  auto tensors = v4::LossAndGradientTensors(*model, ids);
  if (!tensors.ok()) return Annotate(tensors.status(), in_path);
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  RETURN_IF_ERROR(io::WriteSafetensors(out_path, *tensors, {{"producer", "retort grad"}}));
  std::fprintf(stderr, "grad: loss %.6f, %zu parameter gradients, %lld tokens in %.3fs; wrote %s\n",
               tensors->front().second.data<float>()[0], tensors->size() - 1,
               static_cast<long long>(ids.numel()), secs, out_path.c_str());
  return absl::OkStatus();
}

int GradMain(const std::vector<std::string>&) {
  absl::Status s = Grad();
  return s.ok() ? 0 : Fail(s);
}

absl::Status Sft() {
  const std::string path = absl::GetFlag(FLAGS_config);
  if (path.empty()) return absl::InvalidArgumentError("learner sft: --config FILE is required");
  if (absl::GetFlag(FLAGS_threads) > 0)
    setenv("RETORT_NUM_THREADS", std::to_string(absl::GetFlag(FLAGS_threads)).c_str(), 1);
  ASSIGN_OR_RETURN(sft::SftOptions options, sft::LoadSftConfig(path));
  ASSIGN_OR_RETURN(sft::SftStepReport last, sft::RunSft(options));
  std::fprintf(
      stderr,
      "sft: %lld steps, final loss %.6f, checkpoint %s/checkpoint, metrics %s/metrics.jsonl\n",
      static_cast<long long>(last.result.step + 1), last.result.loss, options.output_dir.c_str(),
      options.output_dir.c_str());
  return absl::OkStatus();
}

int LearnerMain(const std::vector<std::string>& args) {
  if (args.size() != 1 || args[0] != "sft")
    return Fail(absl::InvalidArgumentError(
        "usage: retort learner sft --config FILE (GRPO and OPD learners are not "
        "in this build)"));
  absl::Status s = Sft();
  return s.ok() ? 0 : Fail(s);
}

}  // namespace

RETORT_COMMAND("learner", "train: learner sft --config FILE", LearnerMain);
RETORT_COMMAND(
    "grad",
    "mean next-token loss and every parameter gradient: --model DIR --input IN --output OUT",
    GradMain);

}  // namespace retort::controller
