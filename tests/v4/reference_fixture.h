// The Hugging Face reference fixtures of tests/fixtures/v4 (a, b, q) as the V4
// tests read them: the CPU model, the expected outputs and their input ids.
#ifndef RETORT_TESTS_V4_REFERENCE_FIXTURE_H_
#define RETORT_TESTS_V4_REFERENCE_FIXTURE_H_

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>

#include "gtest/gtest.h"
#include "model/io/safetensors.h"
#include "model/v4/model.h"

namespace retort::v4::testing {

struct ReferenceFixture {
  std::unique_ptr<Model> model;  // null when loading failed (the failure is already reported)
  std::shared_ptr<io::SafetensorsFile> expected;
  Tensor ids;                    // input_ids [B, T]
  int64_t B = 0, T = 0, V = 0;
};

inline ReferenceFixture LoadReferenceFixture(const std::string& name) {
  ReferenceFixture f;
  const std::string dir = "tests/fixtures/v4/" + name;
  auto m = Model::Load(dir);
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return f;
  auto e = io::SafetensorsFile::Open(dir + "/expected.safetensors");
  EXPECT_TRUE(e.ok()) << e.status();
  if (!e.ok()) return f;
  f.model = std::move(m).value();
  f.expected = *e;
  f.ids = *f.expected->Get("input_ids");
  f.B = f.ids.dim(0);
  f.T = f.ids.dim(1);
  f.V = f.model->config().vocab_size;
  return f;
}

inline float MaxAbsDiff(const float* a, const float* b, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

}  // namespace retort::v4::testing

#endif  // RETORT_TESTS_V4_REFERENCE_FIXTURE_H_
