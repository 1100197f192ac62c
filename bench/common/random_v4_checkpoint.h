// Random V4 checkpoints for the benchmarks: a released-layout model directory
// (config.json + model.safetensors) with random weights for a config, so a
// benchmark measures a model of any size through the normal loader.
#ifndef RETORT_BENCH_COMMON_RANDOM_V4_CHECKPOINT_H_
#define RETORT_BENCH_COMMON_RANDOM_V4_CHECKPOINT_H_

#include <string>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"

namespace retort::bench {

enum class RandomWeights {
  kDeployment,  // bf16 dense matrices, MXFP4-packed routed experts (what rollout runs)
  kTrainable,   // every matrix f32 (training needs fp32 masters)
};

// Writes `cfg` (released-layout config.json keys) and random weights into
// `dir`: matrices N(0, 1/in), norms near 1, mHC/sinks/ape f32, hash-routed
// layers with a fixed tid2eid. Deterministic (seed 42).
[[nodiscard]] absl::Status WriteRandomV4Checkpoint(const std::string& dir, const nlohmann::json& cfg,
                                                   RandomWeights kind);

}  // namespace retort::bench

#endif  // RETORT_BENCH_COMMON_RANDOM_V4_CHECKPOINT_H_
