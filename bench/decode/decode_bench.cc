// bench/decode: batched decode through a stack of V4-Flash-shaped layers on
// the device (CudaModel, deployment numerics: bf16 dense projections, MXFP4
// routed + shared experts, fp32 state), at several batch sizes and context
// lengths, each beside its HBM roofline.
//
// Roofline of a step = the bytes it must read (every dense weight, the routed
// experts the batch can touch — min(E, batch*k) of them, each once — the
// shared expert, and the state attention reads: window, visible HCA entries,
// the CSA top-k entries and every CSA indexer key) over the bandwidth measured
// in the same run by a device-to-device copy. State is put in place with
// random values (FillRandomState) rather than by prefilling 64K tokens: a
// decode step does the same work either way.
//
// Steps run through the decode CUDA graph (--graph, default) or eagerly; one
// extra eager step with per-op events gives the time split. One JSON line per
// configuration on stdout after the table (for bench/decode/compare.py, which
// sets it beside the PyTorch baseline torch_v4.py).
//
// usage: decode_bench [--layers L] [--batches 1,8,64,256] [--contexts 4096,65536]
//                     [--steps N] [--eager] [--exact]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/common/bench_util.h"
#include "bench/common/cuda_timing.h"
#include "bench/common/v4_flash_config.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/v4/cuda_model.h"

namespace retort {
namespace {

using bench::Value;

std::vector<int64_t> ParseList(const char* s) {
  std::vector<int64_t> out;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(p, &v) || v < 1) {
      std::fprintf(stderr, "bad list '%s'\n", s);
      std::exit(2);
    }
    out.push_back(v);
  }
  return out;
}

struct Result {
  int64_t batch, context;
  double ms, roofline_ms;
  int64_t bytes;
};

}  // namespace
}  // namespace retort

int main(int argc, char** argv) {
  using namespace retort;
  int layers = 8, steps = 20;
  std::vector<int64_t> batches = {1, 8, 64, 256}, contexts = {4096, 65536};
  bool graph = true, exact = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--layers") layers = std::atoi(next());
    else if (a == "--steps") steps = std::atoi(next());
    else if (a == "--batches") batches = ParseList(next());
    else if (a == "--contexts") contexts = ParseList(next());
    else if (a == "--eager") graph = false;
    else if (a == "--exact") exact = true;
    else {
      std::fprintf(stderr, "usage: decode_bench [--layers L] [--batches 1,8,64,256] [--contexts 4096,65536] "
                           "[--steps N] [--eager] [--exact]\n");
      return 2;
    }
  }
  if (cuda::DeviceCount() == 0) {
    std::printf("decode_bench: no CUDA device, skipped\n");
    return 0;
  }
  std::printf("device: %s\n", Value(cuda::DeviceDescription(0)).c_str());
  const double bw = bench::MeasureCopyBandwidthGBs(nullptr);
  std::printf("HBM bandwidth (device copy): %.0f GB/s\n", bw);

  const io::V4Config config = bench::V4FlashLayers(layers);
  v4::CudaModelOptions o;
  o.max_sequences = static_cast<int>(*std::max_element(batches.begin(), batches.end()));
  o.max_length = *std::max_element(contexts.begin(), contexts.end()) + steps + 8;
  o.numerics = exact ? v4::Numerics::kExact : v4::Numerics::kDeployment;
  const auto t0 = std::chrono::steady_clock::now();
  auto model = Value(v4::CudaModel::CreateRandom(config, o, 1));
  const double build_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("model: %d V4-Flash layers (CSA/HCA alternating), %s numerics, weights %.2f GB on device, state pool "
              "%.2f GB (%d slots x %lld tokens), built in %.1fs\n",
              layers, exact ? "exact" : "deployment", model->WeightBytes() / 1e9, model->StatePoolBytes() / 1e9,
              o.max_sequences, static_cast<long long>(o.max_length), build_s);

  std::vector<int> seqs;
  for (int i = 0; i < o.max_sequences; ++i) seqs.push_back(Value(model->NewSequence()));
  std::vector<Result> results;
  std::vector<std::pair<std::string, std::string>> profiles;
  for (int64_t ctx : contexts) {
    for (int64_t B : batches) {
      std::vector<int> use(seqs.begin(), seqs.begin() + B);
      for (int s : use) BENCH_CHECK(model->FillRandomState(s, ctx, 100 + s));
      std::vector<int64_t> toks(B);
      for (int64_t b = 0; b < B; ++b) toks[b] = (b * 37 + 11) % config.vocab_size;
      std::vector<v4::CudaModel::Chunk> chunks;
      for (int64_t b = 0; b < B; ++b) chunks.push_back({use[b], absl::MakeConstSpan(&toks[b], 1)});
      auto step = [&]() {
        if (graph) Value(model->DecodeGraph(use, toks));
        else Value(model->StepOnDevice(chunks));
      };
      for (int w = 0; w < 3; ++w) step();  // eager, capture, replay
      std::vector<float> ms;  // wall time of each synchronous step, host work included
      for (int s = 0; s < steps; ++s) {
        const auto h0 = std::chrono::steady_clock::now();
        step();
        const double host_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - h0).count();
        ms.push_back(static_cast<float>(host_ms));
      }
      std::sort(ms.begin(), ms.end());
      const double med = ms[ms.size() / 2];
      // One profiled eager step: where the time goes.
      model->SetProfiling(true);
      Value(model->StepOnDevice(chunks));
      model->SetProfiling(false);
      v4::CudaProfile prof = model->TakeProfile();
      std::string split;
      double total = 0;
      for (const auto& [name, t] : prof.ms) total += t;
      for (const auto& [name, t] : prof.ms) {
        char buf[96];
        std::snprintf(buf, sizeof(buf), "%s%s %.3f ms (%.0f%%)", split.empty() ? "" : ", ", name.c_str(), t,
                      100.0 * t / total);
        split += buf;
      }
      profiles.emplace_back("batch " + std::to_string(B) + ", context " + std::to_string(ctx), split);
      const int64_t bytes = model->DecodeStepBytes(B, ctx);
      results.push_back({B, ctx, med, bytes / (bw * 1e9) * 1e3, bytes});
      std::fprintf(stderr, "  batch %lld context %lld: %.3f ms/step\n", static_cast<long long>(B),
                   static_cast<long long>(ctx), med);
    }
  }
  std::printf("\n| batch | context | ms/step | ms/layer | tokens/s | bytes/step | roofline ms | %% of roofline |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const Result& r : results)
    std::printf("| %lld | %lld | %.3f | %.3f | %.0f | %.2f GB | %.3f | %.0f%% |\n", static_cast<long long>(r.batch),
                static_cast<long long>(r.context), r.ms, r.ms / layers, r.batch * 1e3 / r.ms, r.bytes / 1e9,
                r.roofline_ms, 100.0 * r.roofline_ms / r.ms);
  std::printf("\nper-op device time of one eager step (profiled; the graph removes the launch gaps between ops):\n");
  for (const auto& [what, split] : profiles) std::printf("  %s: %s\n", what.c_str(), split.c_str());
  std::printf("\n");
  for (const Result& r : results)
    std::printf("{\"impl\":\"retort\",\"layers\":%d,\"batch\":%lld,\"context\":%lld,\"ms_per_step\":%.4f,"
                "\"ms_per_layer\":%.4f,\"tokens_per_s\":%.1f,\"bytes_per_step\":%lld,\"roofline_ms\":%.4f,"
                "\"graph\":%s}\n",
                layers, static_cast<long long>(r.batch), static_cast<long long>(r.context), r.ms, r.ms / layers,
                r.batch * 1e3 / r.ms, static_cast<long long>(r.bytes), r.roofline_ms, graph ? "true" : "false");
  return 0;
}
