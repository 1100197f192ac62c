#include "rollout/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"

namespace retort::rollout {

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature))
    return absl::InvalidArgumentError(absl::StrCat("temperature must be >= 0, got ", p.temperature));
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", p.top_p));
  if (p.top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", p.top_k));
  return absl::OkStatus();
}

double Sampler::NextCanonical() {
  if (params_.temperature == 0.0f) return 0.0;
  // What std::uniform_real_distribution<double>(0, sum) draws, before scaling.
  return std::generate_canonical<double, std::numeric_limits<double>::digits>(rng_);
}

SampledToken Sampler::Sample(absl::Span<const float> logits) {
  const int64_t V = static_cast<int64_t>(logits.size());
  // Raw log-softmax (for model_logprob).
  const float mx = *std::max_element(logits.begin(), logits.end());
  double z = 0.0;
  for (float l : logits) z += std::exp(static_cast<double>(l - mx));
  const double log_z = mx + std::log(z);
  SampledToken out;
  if (params_.temperature == 0.0f) {
    out.token = std::max_element(logits.begin(), logits.end()) - logits.begin();
    out.logprob = 0.0f;
    out.model_logprob = static_cast<float>(logits[out.token] - log_z);
    return out;
  }
  // Candidates sorted by logit (ties: lower id first), truncated by top-k then top-p.
  std::vector<int64_t> ids(V);
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int64_t a, int64_t b) { return logits[a] > logits[b]; });
  int64_t keep = V;
  if (params_.top_k > 0) keep = std::min<int64_t>(keep, params_.top_k);
  std::vector<double> p(keep);
  double sum = 0.0;
  for (int64_t i = 0; i < keep; ++i) sum += (p[i] = std::exp((logits[ids[i]] - mx) / params_.temperature));
  if (params_.top_p < 1.0f) {
    double acc = 0.0;
    int64_t cut = keep;
    for (int64_t i = 0; i < keep; ++i) {
      acc += p[i] / sum;
      if (acc >= params_.top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    sum = 0.0;
    for (int64_t i = 0; i < keep; ++i) sum += p[i];
  }
  // r uniform in [0, sum): the canonical draw scaled, exactly what
  // uniform_real_distribution<double>(0, sum) computes (and what the CUDA
  // twin receives through NextCanonical()).
  const double r = std::generate_canonical<double, std::numeric_limits<double>::digits>(rng_) * sum;
  double acc = 0.0;
  int64_t pick = keep - 1;
  for (int64_t i = 0; i < keep; ++i) {
    acc += p[i];
    if (r < acc) {
      pick = i;
      break;
    }
  }
  out.token = ids[pick];
  out.logprob = static_cast<float>(std::log(p[pick] / sum));
  out.model_logprob = static_cast<float>(logits[out.token] - log_z);
  return out;
}

}  // namespace retort::rollout
