// Backward through the whole V4 model against the Hugging Face reference's
// parameter gradients (tests/fixtures/v4/{a,b}: grad.<name>, loss).
#include <cmath>
#include <cstdio>

#include "gtest/gtest.h"
#include "model/io/safetensors.h"
#include "model/v4/train.h"

namespace retort::v4 {
namespace {

// Bound on max|ours - reference| / max|reference| per parameter.
//
// Fixture a runs its SwiGLU with limit 1.0, and layer 3's shared expert has
// up-projections within 1e-6 of that limit (0.99999923, 1.0000062, ...): a
// one-ulp difference between our forward and the reference's decides whether
// the clamp passes the gradient for that element. The flipped elements change
// layer 3's up-projection gradient by ~1% and everything below layer 3 by
// ~0.1–0.5% through dx. That is the clamp's discontinuity, not an error, so
// those parameters get a looser bound; every other gradient of a and all of
// fixture b (clamp limit 2.0, no such ties) must match to 1e-4.
float Tolerance(const std::string& fixture, const std::string& param) {
  if (fixture != "a") return 1e-4f;
  for (int l = 0; l <= 3; ++l)
    if (param.find("layers." + std::to_string(l) + ".") != std::string::npos) return 2e-2f;
  return param == "model.embed_tokens.weight" ? 2e-2f : 1e-4f;
}

class V4GradTest : public ::testing::TestWithParam<std::string> {};

TEST_P(V4GradTest, LossAndEveryParameterGradientMatchReference) {
  const std::string dir = "tests/fixtures/v4/" + GetParam();
  auto model = Model::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  auto expected = io::SafetensorsFile::Open(dir + "/expected.safetensors");
  ASSERT_TRUE(expected.ok());
  Tensor ids = *(*expected)->Get("input_ids");
  const int64_t B = ids.dim(0), T = ids.dim(1);
  Gradients grads;
  auto loss = NextTokenLossAndGradients(**model, absl::MakeConstSpan(ids.data<int64_t>(), B * T), B, T, &grads);
  ASSERT_TRUE(loss.ok()) << loss.status();
  const float ref_loss = (*expected)->Get("loss")->data<float>()[0];
  EXPECT_NEAR(*loss, ref_loss, 1e-5f);
  int checked = 0;
  float worst_rel = 0.0f;
  std::string worst_name;
  for (const auto& [name, entry] : (*expected)->entries()) {
    if (name.rfind("grad.", 0) != 0) continue;
    const std::string pname = name.substr(5);
    auto it = grads.by_name.find(pname);
    ASSERT_NE(it, grads.by_name.end()) << "no gradient for " << pname;
    Tensor ref = *(*expected)->Get(name);
    ASSERT_EQ(static_cast<int64_t>(it->second.size()), ref.numel()) << pname;
    // Relative to the gradient's scale: max |diff| / max |ref|, with the scale
    // floored at 1e-3 (scalars such as hc_head.hc_scale sum many cancelling terms).
    float maxdiff = 0.0f, maxref = 0.0f;
    for (int64_t i = 0; i < ref.numel(); ++i) {
      maxdiff = std::max(maxdiff, std::fabs(it->second[i] - ref.data<float>()[i]));
      maxref = std::max(maxref, std::fabs(ref.data<float>()[i]));
    }
    const float rel = maxdiff / std::max(maxref, 1e-3f);
    if (rel > worst_rel) {
      worst_rel = rel;
      worst_name = pname;
    }
    EXPECT_LT(rel, Tolerance(GetParam(), pname)) << pname << " max|diff| " << maxdiff << " max|ref| " << maxref;
    ++checked;
  }
  std::printf("%s: loss %.6f (ref %.6f); %d parameter gradients, worst relative error %.2e (%s)\n", GetParam().c_str(),
              *loss, ref_loss, checked, worst_rel, worst_name.c_str());
  // No gradient reaches the indexer (top-k passes none) and nothing extra appears.
  for (const auto& [name, g] : grads.by_name)
    EXPECT_TRUE((*expected)->Has("grad." + name)) << "gradient for " << name << " that the reference does not have";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, V4GradTest, ::testing::Values("a", "b"));

}  // namespace
}  // namespace retort::v4
