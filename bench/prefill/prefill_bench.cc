// bench/prefill: prefill of 4K, 16K and 64K-token prompts through one CSA
// (m = 4, indexer top-512) and one HCA (m' = 128) layer of V4-Flash shape on
// the device (CudaModel, deployment numerics), in chunks of --chunk tokens as
// an engine's chunked prefill runs. Reports tokens/s, the per-op split, and
// the attention core's and the lightning indexer's FLOP/s, with FLOPs counted
// from the keys each query actually attends to (window + visible HCA entries
// or the CSA top-k: 4 * heads * head_dim per key for QK and PV) and the
// indexer's scoring (2 * index heads * index dim per visible entry).
//
// usage: prefill_bench [--prompts 4096,16384,65536] [--chunk 16384]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/common/bench_util.h"
#include "bench/common/v4_flash_config.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/v4/cuda_model.h"

int main(int argc, char** argv) {
  using namespace retort;
  using bench::Value;
  std::vector<int64_t> prompts = {4096, 16384, 65536};
  int64_t chunk = 16384;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--prompts" && i + 1 < argc) {
      prompts.clear();
      for (absl::string_view p : absl::StrSplit(argv[++i], ',', absl::SkipEmpty())) {
        int64_t v = 0;
        if (!absl::SimpleAtoi(p, &v) || v < 1) return 2;
        prompts.push_back(v);
      }
    } else if (a == "--chunk" && i + 1 < argc) {
      chunk = std::atoll(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: prefill_bench [--prompts 4096,16384,65536] [--chunk 16384]\n");
      return 2;
    }
  }
  if (cuda::DeviceCount() == 0) {
    std::printf("prefill_bench: no CUDA device, skipped\n");
    return 0;
  }
  const io::V4Config c = bench::V4FlashLayers(2);
  v4::CudaModelOptions o;
  o.max_sequences = 1;
  o.max_length = *std::max_element(prompts.begin(), prompts.end());
  o.numerics = v4::Numerics::kDeployment;
  auto model = Value(v4::CudaModel::CreateRandom(c, o, 7));
  std::printf("device: %s; 1 CSA + 1 HCA V4-Flash layer, deployment numerics, chunks of %lld tokens\n",
              Value(cuda::DeviceDescription(0)).c_str(), static_cast<long long>(chunk));
  std::printf("\n| prompt | seconds | tokens/s | attention core | attn TFLOP/s | indexer | indexer TFLOP/s | "
              "MoE experts | split |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
  for (int64_t T : prompts) {
    std::vector<int64_t> ids(T);
    for (int64_t t = 0; t < T; ++t) ids[t] = (t * 7919 + 13) % c.vocab_size;
    // Warm-up on a short prompt (allocator, cuBLAS heuristics), then the run.
    int seq = Value(model->NewSequence());
    std::vector<v4::CudaModel::Chunk> warm = {{seq, absl::MakeConstSpan(ids.data(), std::min<int64_t>(T, 1024))}};
    Value(model->StepOnDevice(warm));
    model->Release(seq);
    seq = Value(model->NewSequence());
    model->SetProfiling(true);
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t p = 0; p < T; p += chunk) {
      std::vector<v4::CudaModel::Chunk> ch = {{seq, absl::MakeConstSpan(ids.data() + p, std::min(chunk, T - p))}};
      Value(model->StepOnDevice(ch));
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    model->SetProfiling(false);
    model->Release(seq);
    const v4::CudaProfile prof = model->TakeProfile();
    double core = 0, indexer = 0, experts = 0, total = 0;
    for (const auto& [name, ms] : prof.ms) {
      total += ms;
      if (name == "attn.core") core = ms;
      if (name == "attn.indexer") indexer = ms;
      if (name == "moe.experts") experts = ms;
    }
    double attn_flops = 0, index_flops = 0;
    for (int64_t p = 0; p < T; ++p) {
      const double win = std::min<int64_t>(p + 1, c.sliding_window);
      const double csa_vis = (p + 1) / 4, hca_vis = (p + 1) / 128;
      attn_flops += 4.0 * c.num_heads * c.head_dim * (win + std::min<double>(csa_vis, c.index_topk));
      attn_flops += 4.0 * c.num_heads * c.head_dim * (win + hca_vis);
      index_flops += 2.0 * c.index_n_heads * c.index_head_dim * csa_vis;
    }
    std::string split;
    for (const auto& [name, ms] : prof.ms) {
      char buf[64];
      std::snprintf(buf, sizeof(buf), "%s%s %.0f%%", split.empty() ? "" : ", ", name.c_str(), 100.0 * ms / total);
      split += buf;
    }
    std::printf("| %lld | %.3f | %.0f | %.1f ms | %.1f | %.1f ms | %.1f | %.1f ms | %s |\n", static_cast<long long>(T),
                secs, T / secs, core, attn_flops / (core * 1e-3) / 1e12, indexer,
                index_flops / (indexer * 1e-3) / 1e12, experts, split.c_str());
  }
  return 0;
}
