// Shared helpers for the rollout tests: the fixture model and requests.
#ifndef RETORT_TESTS_ROLLOUT_TEST_UTIL_H_
#define RETORT_TESTS_ROLLOUT_TEST_UTIL_H_

#include <cstdlib>
#include <memory>
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "model/v4/model.h"
#include "rollout/engine/engine.h"

namespace retort::rollout::testing {

inline std::string FixtureDir() {
  const char* root = std::getenv("RETORT_SOURCE_DIR");
  return std::string(root ? root : ".") + "/tests/fixtures/v4/a";
}

inline std::shared_ptr<const v4::Model> FixtureModel() {
  static std::shared_ptr<const v4::Model> model = [] {
    auto m = v4::Model::Load(FixtureDir());
    if (!m.ok()) {
      ADD_FAILURE() << m.status().ToString();
      std::abort();
    }
    return std::shared_ptr<const v4::Model>(std::move(*m));
  }();
  return model;
}

// A request with a random prompt of `len` tokens in [2, 300).
inline GenerationRequest RandomRequest(uint64_t seed, int len, int max_new, int n = 1, float temperature = 1.0f) {
  std::mt19937_64 rng(seed);
  GenerationRequest r;
  r.request_id = "req-" + std::to_string(seed);
  r.group_id = r.request_id;
  for (int i = 0; i < len; ++i) r.prompt.push_back(2 + static_cast<int64_t>(rng() % 298));
  r.sampling.temperature = temperature;
  r.sampling.seed = seed * 7919;
  r.max_new_tokens = max_new;
  r.n = n;
  return r;
}

}  // namespace retort::rollout::testing

#endif  // RETORT_TESTS_ROLLOUT_TEST_UTIL_H_
