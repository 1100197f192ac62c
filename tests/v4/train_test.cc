// The training entry points around the backward: `retort grad`'s tensors
// against the reference (fixture b), HfTensors round trips, and the per-token
// weighted loss (masking, linearity in the weights, finite differences).
#include "model/v4/train.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "gtest/gtest.h"
#include "model/base/logging.h"
#include "model/io/safetensors.h"

namespace retort::v4 {
namespace {

const char kFixtureB[] = "tests/fixtures/v4/b";

// max|a - b| / max(max|b|, 1e-3), the bound grad_test.cc uses.
float RelativeError(const float* a, const float* b, int64_t n) {
  float maxdiff = 0.0f, maxref = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    maxdiff = std::max(maxdiff, std::fabs(a[i] - b[i]));
    maxref = std::max(maxref, std::fabs(b[i]));
  }
  return maxdiff / std::max(maxref, 1e-3f);
}

TEST(V4TrainTest, GradCommandTensorsMatchFixtureB) {
  auto model = Model::Load(kFixtureB);
  ASSERT_TRUE(model.ok()) << model.status();
  auto expected = io::SafetensorsFile::Open(std::string(kFixtureB) + "/expected.safetensors");
  ASSERT_TRUE(expected.ok()) << expected.status();
  auto tensors = LossAndGradientTensors(**model, *(*expected)->Get("input_ids"));
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  // Through the file the command writes, as `retort grad` does.
  const std::string path =
      ::testing::TempDir() + "/grad_" + std::to_string(getpid()) + ".safetensors";
  ASSERT_TRUE(io::WriteSafetensors(path, *tensors).ok());
  auto got = io::SafetensorsFile::Open(path);
  ASSERT_TRUE(got.ok()) << got.status();
  int compared = 0;
  for (const auto& [name, entry] : (*expected)->entries()) {
    if (name != "loss" && name.rfind("grad.", 0) != 0) continue;
    ASSERT_TRUE((*got)->Has(name)) << "retort grad wrote no " << name;
    Tensor a = *(*got)->Get(name), b = *(*expected)->Get(name);
    ASSERT_EQ(a.dtype(), DType::kF32) << name;
    ASSERT_EQ(a.shape(), b.shape()) << name;
    EXPECT_LE(RelativeError(a.data<float>(), b.data<float>(), a.numel()), 1e-3f) << name;
    ++compared;
  }
  EXPECT_GT(compared, 100);
  for (const auto& [name, entry] : (*got)->entries())
    EXPECT_TRUE((*expected)->Has(name))
        << "retort grad wrote " << name << ", which the reference does not have";
  unlink(path.c_str());
}

TEST(V4TrainTest, GradRejectsBadInputIds) {
  auto model = Model::Load(kFixtureB);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(LossAndGradientTensors(**model, Tensor::FromF32({1, 2, 3, 4}, {2, 2})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LossAndGradientTensors(**model, Tensor::FromI64({1, 2, 3}, {3})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LossAndGradientTensors(**model, Tensor::FromI64({1, 2, 3}, {3, 1})).status().code(),
            absl::StatusCode::kInvalidArgument);  // T = 1: nothing to predict
  EXPECT_EQ(LossAndGradientTensors(**model, Tensor::FromI64({1, 99999}, {1, 2})).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The model rebuilt from its HF tensors computes the same logits, and shares
// their storage: writing a tensor changes the rebuilt model.
TEST(V4TrainTest, HfTensorsReloadIdenticallyAndShareStorage) {
  auto model = Model::Load(kFixtureB);
  ASSERT_TRUE(model.ok()) << model.status();
  auto tensors = HfTensors(**model);
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  io::TensorMap map;
  for (const auto& t : *tensors) map.Add(t.name, t.value);
  auto rebuilt = Model::FromTensors((*model)->config(), map);
  ASSERT_TRUE(rebuilt.ok()) << rebuilt.status();
  std::vector<int64_t> ids = {5, 17, 3, 250, 9, 9, 41, 100, 7, 2, 300, 12, 66, 1, 8, 20, 21, 22};
  auto run = [&](const Model& m) {
    auto s = m.NewState();
    std::vector<Model::Chunk> chunk = {{s.get(), ids}};
    return *m.Step(chunk);
  };
  const std::vector<float> a = run(**model), b = run(**rebuilt);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(a[i], b[i]) << i;
  for (auto& t : *tensors)
    if (t.name == "model.layers.3.mlp.experts.gate_up_proj")
      for (int64_t i = 0; i < t.value.numel(); ++i) t.value.mutable_data<float>()[i] *= 1.5f;
  const std::vector<float> c = run(**rebuilt);
  double diff = 0;
  for (size_t i = 0; i < a.size(); ++i)
    diff = std::max(diff, static_cast<double>(std::fabs(a[i] - c[i])));
  EXPECT_GT(diff, 1e-4);
  // Every trainable tensor is one the backward produces a gradient for.
  Gradients grads;
  ASSERT_TRUE(
      NextTokenLossAndGradients(**model, ids, 1, static_cast<int64_t>(ids.size()), &grads).ok());
  for (const auto& t : *tensors)
    if (t.trainable) {
      EXPECT_TRUE(grads.by_name.count(t.name)) << t.name;
    }
}

struct WeightedCase {
  std::vector<int64_t> tokens, targets;
  std::vector<float> weights;
  int64_t B = 2, T = 13;
  TokenBatch batch() const { return {tokens, targets, weights, B, T, {}, 0.0f, {}}; }
};

// Random ids; every third position masked, the rest with weights of both signs.
WeightedCase RandomCase(uint64_t seed, int64_t vocab) {
  WeightedCase c;
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> tok(2, vocab - 1);
  std::uniform_real_distribution<float> w(-0.5f, 1.0f);
  for (int64_t i = 0; i < c.B * c.T; ++i) {
    c.tokens.push_back(tok(rng));
    c.targets.push_back(i % 3 == 1 ? -1 : tok(rng));
    c.weights.push_back(i % 3 == 1 ? 123.0f : w(rng));  // masked: weight ignored
  }
  return c;
}

TEST(V4TrainTest, WeightedLossMasksAndIsLinearInTheWeights) {
  auto model = Model::Load(kFixtureB);
  ASSERT_TRUE(model.ok()) << model.status();
  const uint64_t seed = 11;
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  WeightedCase c = RandomCase(seed, (*model)->config().vocab_size);
  Gradients g_all;
  auto all = WeightedTokenLossAndGradients(**model, c.batch(), &g_all);
  ASSERT_TRUE(all.ok()) << all.status();
  double expect = 0;
  for (int64_t i = 0; i < c.B * c.T; ++i) {
    if (c.targets[i] < 0) {
      EXPECT_EQ(all->logprobs[i], 0.0f) << i;
      continue;
    }
    EXPECT_LT(all->logprobs[i], 0.0f) << i;
    expect += -c.weights[i] * all->logprobs[i];
  }
  EXPECT_NEAR(all->loss, expect, 1e-5 * std::fabs(expect) + 1e-6);
  // Split the weights into two halves: losses and gradients add up.
  WeightedCase c1 = c, c2 = c;
  for (int64_t i = 0; i < c.B * c.T; ++i) (i % 2 ? c1 : c2).weights[i] = 0.0f;
  Gradients g1, g2;
  auto l1 = WeightedTokenLossAndGradients(**model, c1.batch(), &g1);
  auto l2 = WeightedTokenLossAndGradients(**model, c2.batch(), &g2);
  ASSERT_TRUE(l1.ok() && l2.ok());
  EXPECT_NEAR(l1->loss + l2->loss, all->loss, 1e-5);
  ASSERT_EQ(g1.by_name.size(), g_all.by_name.size());
  for (const auto& [name, g] : g_all.by_name) {
    std::vector<float> sum(g.size());
    for (size_t i = 0; i < g.size(); ++i) sum[i] = g1.by_name[name][i] + g2.by_name[name][i];
    EXPECT_LE(RelativeError(sum.data(), g.data(), static_cast<int64_t>(g.size())), 1e-4f) << name;
  }
  // A mask changes nothing when its weight changes.
  WeightedCase c3 = c;
  for (int64_t i = 0; i < c.B * c.T; ++i)
    if (c3.targets[i] < 0) c3.weights[i] = -7.0f;
  auto l3 = WeightedTokenLossAndGradients(**model, c3.batch(), nullptr);
  ASSERT_TRUE(l3.ok());
  EXPECT_EQ(l3->loss, all->loss);
}

TEST(V4TrainTest, WeightedLossRejectsBadBatches) {
  auto model = Model::Load(kFixtureB);
  ASSERT_TRUE(model.ok()) << model.status();
  WeightedCase c = RandomCase(3, (*model)->config().vocab_size);
  auto code = [&](const WeightedCase& x) {
    return WeightedTokenLossAndGradients(**model, x.batch(), nullptr).status();
  };
  WeightedCase bad = c;
  bad.weights.pop_back();
  EXPECT_NE(code(bad).message().find("weights"), std::string::npos) << code(bad);
  bad = c;
  bad.targets[5] = -2;
  EXPECT_NE(code(bad).message().find("targets[0, 5]"), std::string::npos) << code(bad);
  bad = c;
  bad.targets[14] = (*model)->config().vocab_size;
  EXPECT_NE(code(bad).message().find("targets[1, 1]"), std::string::npos) << code(bad);
  bad = c;
  bad.tokens[2] = -1;
  EXPECT_NE(code(bad).message().find("tokens[0, 2]"), std::string::npos) << code(bad);
  bad = c;
  bad.weights[0] = std::nanf("");
  EXPECT_NE(code(bad).message().find("weights[0, 0]"), std::string::npos) << code(bad);
  bad = c;
  bad.T = 0;
  EXPECT_EQ(code(bad).code(), absl::StatusCode::kInvalidArgument);
}

// Routing replay: the routes the model itself picks reproduce its loss and
// gradients exactly; other routes change them; expert_load counts the routes.
TEST(V4TrainTest, ReplayedRoutesReplaceTheSelection) {
  auto model = Model::Load(kFixtureB);
  ASSERT_TRUE(model.ok()) << model.status();
  const auto& cfg = (*model)->config();
  const int K = cfg.experts_per_token;
  WeightedCase c = RandomCase(5, cfg.vocab_size);
  // [L, B, T, K] from the inference path's captured routes.
  std::vector<int32_t> routes(cfg.num_layers * c.B * c.T * K);
  for (int64_t b = 0; b < c.B; ++b) {
    auto s = (*model)->NewState();
    StepOutputs out;
    out.capture_routes = true;
    std::vector<Model::Chunk> chunk = {
        {s.get(), absl::MakeConstSpan(c.tokens.data() + b * c.T, c.T)}};
    ASSERT_TRUE((*model)->Step(chunk, &out).ok());
    for (int l = 0; l < cfg.num_layers; ++l)
      std::copy(out.routes[l].begin(), out.routes[l].end(),
                routes.begin() + ((l * c.B + b) * c.T) * K);
  }
  Gradients g0, g1;
  auto plain = WeightedTokenLossAndGradients(**model, c.batch(), &g0);
  TokenBatch replay = c.batch();
  replay.replay_routes = routes;
  auto replayed = WeightedTokenLossAndGradients(**model, replay, &g1);
  ASSERT_TRUE(plain.ok() && replayed.ok()) << replayed.status();
  EXPECT_EQ(plain->loss, replayed->loss);
  for (const auto& [name, g] : g0.by_name) EXPECT_EQ(g, g1.by_name[name]) << name;
  for (int l = 0; l < cfg.num_layers; ++l) {
    std::vector<int64_t> counts(cfg.n_routed_experts, 0);
    for (int64_t i = 0; i < c.B * c.T * K; ++i) ++counts[routes[l * c.B * c.T * K + i]];
    EXPECT_EQ(plain->expert_load[l], counts) << "layer " << l;
  }
  // Other experts for every token of layer 2 (e -> e+1 mod E keeps them distinct).
  std::vector<int32_t> shifted = routes;
  for (int64_t i = 0; i < c.B * c.T * K; ++i) {
    int32_t& e = shifted[2 * c.B * c.T * K + i];
    e = (e + 1) % cfg.n_routed_experts;
  }
  replay.replay_routes = shifted;
  auto other = WeightedTokenLossAndGradients(**model, replay, nullptr);
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_NE(other->loss, plain->loss);
  EXPECT_NE(other->expert_load[2], plain->expert_load[2]);
  // Bad replays name the problem.
  std::vector<int32_t> bad = routes;
  bad.pop_back();
  replay.replay_routes = bad;
  EXPECT_NE(WeightedTokenLossAndGradients(**model, replay, nullptr)
                .status()
                .message()
                .find("replay_routes has"),
            std::string::npos);
  bad = routes;
  bad[K] = cfg.n_routed_experts;
  replay.replay_routes = bad;
  EXPECT_NE(
      WeightedTokenLossAndGradients(**model, replay, nullptr).status().message().find("outside"),
      std::string::npos);
  bad = routes;
  bad[1] = bad[0];
  replay.replay_routes = bad;
  EXPECT_NE(WeightedTokenLossAndGradients(**model, replay, nullptr)
                .status()
                .message()
                .find("repeats expert"),
            std::string::npos);
}

// Every MoE layer's routed experts for every token of the case.
std::vector<std::vector<int32_t>> Routes(const Model& m, const WeightedCase& c) {
  std::vector<std::vector<int32_t>> all;
  for (int64_t b = 0; b < c.B; ++b) {
    auto s = m.NewState();
    StepOutputs out;
    out.capture_routes = true;
    std::vector<Model::Chunk> chunk = {
        {s.get(), absl::MakeConstSpan(c.tokens.data() + b * c.T, c.T)}};
    CHECK(m.Step(chunk, &out).ok());
    for (auto& r : out.routes) all.push_back(std::move(r));
  }
  return all;
}

// Central differences of the weighted loss along a random direction in one
// tensor at a time, against the analytic directional derivative g·v. The
// model is a random-initialised tiny V4 (fixture b: HCA, CSA with indexer,
// hash and learned routing, shared expert, mHC) rebuilt from HfTensors so
// its parameters can be perturbed in place.
TEST(V4TrainTest, WeightedLossGradientMatchesFiniteDifferences) {
  auto loaded = Model::Load(kFixtureB);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  auto tensors = HfTensors(**loaded);
  ASSERT_TRUE(tensors.ok());
  io::TensorMap map;
  for (const auto& t : *tensors) map.Add(t.name, t.value);
  // Without the SwiGLU clamp (continuous, but kinked where it binds; the
  // reference test covers it) the loss is smooth away from routing ties.
  io::V4Config config = (*loaded)->config();
  config.swiglu_limit = 0;
  auto model = Model::FromTensors(config, map);
  ASSERT_TRUE(model.ok()) << model.status();
  const uint64_t seed = 2024;
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  WeightedCase c = RandomCase(seed, (*model)->config().vocab_size);
  Gradients grads;
  ASSERT_TRUE(WeightedTokenLossAndGradients(**model, c.batch(), &grads).ok());
  const auto base_routes = Routes(**model, c);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  int checked = 0;
  for (auto& t : *tensors) {
    if (!t.trainable) continue;
    float* p = t.value.mutable_data<float>();
    const int64_t n = t.value.numel();
    std::vector<float> v(n), orig(p, p + n);
    // Perturb relative to the tensor's own scale so routes and clamps stay put.
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(p[i]) * p[i];
    const float rms = std::max(static_cast<float>(std::sqrt(ss / n)), 1e-2f);
    for (auto& x : v) x = rms * normal(rng);
    const std::vector<float>& g = grads.by_name.at(t.name);
    double analytic = 0;
    for (int64_t i = 0; i < n; ++i) analytic += static_cast<double>(g[i]) * v[i];
    // Top-k routing is piecewise: a step that flips an expert choice measures
    // the jump, not the slope, so such steps are halved until no route moves.
    float eps = 1e-3f;
    bool smooth = false;
    double numeric = 0;
    for (int tries = 0; tries < 6 && !smooth; ++tries, eps *= 0.5f) {
      auto loss_at = [&](float s) {
        for (int64_t i = 0; i < n; ++i) p[i] = orig[i] + s * v[i];
        smooth = smooth && Routes(**model, c) == base_routes;
        return WeightedTokenLossAndGradients(**model, c.batch(), nullptr)->loss;
      };
      smooth = true;
      numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
    }
    std::copy(orig.begin(), orig.end(), p);
    if (!smooth) continue;  // a route sits on a tie: no slope to compare
    EXPECT_NEAR(numeric, analytic, 2e-2 * std::fabs(analytic) + 2e-3)
        << t.name << ": finite difference " << numeric << ", analytic " << analytic;
    if (getenv("FD_VERBOSE"))
      std::printf("%-60s %12.6f %12.6f\n", t.name.c_str(), numeric, analytic);
    ++checked;
  }
  EXPECT_GE(checked, 100);  // of the 109 trainable tensors; a tie may skip a few
}

}  // namespace
}  // namespace retort::v4

namespace retort::v4 {
namespace {

// The sequence-wise balance loss alone (every target masked): linear in its
// weight, off at 0, and its gradient (router weights and everything upstream)
// matches central differences away from routing ties.
TEST(V4TrainTest, SequenceBalanceLossGradientMatchesFiniteDifferences) {
  auto loaded = Model::Load(kFixtureB);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  auto tensors = HfTensors(**loaded);
  ASSERT_TRUE(tensors.ok());
  io::TensorMap map;
  for (const auto& t : *tensors) map.Add(t.name, t.value);
  io::V4Config config = (*loaded)->config();
  config.swiglu_limit = 0;  // smooth (see WeightedLossGradientMatchesFiniteDifferences)
  auto model = Model::FromTensors(config, map);
  ASSERT_TRUE(model.ok()) << model.status();
  const uint64_t seed = 99;
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  WeightedCase c = RandomCase(seed, config.vocab_size);
  std::fill(c.targets.begin(), c.targets.end(), -1);
  TokenBatch batch = c.batch();
  EXPECT_EQ(WeightedTokenLossAndGradients(**model, batch, nullptr)->balance_loss, 0.0);
  batch.balance_loss_weight = 1.0f;
  Gradients grads;
  auto base = WeightedTokenLossAndGradients(**model, batch, &grads);
  ASSERT_TRUE(base.ok()) << base.status();
  EXPECT_EQ(base->loss, 0.0);
  // Near-uniform routing gives about alpha per learned layer and row (3 layers x 2 rows).
  EXPECT_GT(base->balance_loss, 3.0);
  EXPECT_LT(base->balance_loss, 20.0);
  batch.balance_loss_weight = 2.0f;
  EXPECT_NEAR(WeightedTokenLossAndGradients(**model, batch, nullptr)->balance_loss,
              2 * base->balance_loss, 1e-5);
  batch.balance_loss_weight = 1.0f;
  const auto base_routes = Routes(**model, c);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  int checked = 0;
  for (auto& t : *tensors) {
    const bool wanted = t.name.find("mlp.gate.weight") != std::string::npos ||
                        t.name == "model.layers.0.self_attn.q_a_proj.weight" ||
                        t.name == "model.layers.1.ffn_hc.fn" ||
                        t.name == "model.embed_tokens.weight";
    if (!wanted || t.name == "model.layers.0.mlp.gate.weight") continue;  // layer 0 is hash-routed
    float* p = t.value.mutable_data<float>();
    const int64_t n = t.value.numel();
    std::vector<float> v(n), orig(p, p + n);
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(p[i]) * p[i];
    const float rms = std::max(static_cast<float>(std::sqrt(ss / n)), 1e-2f);
    for (auto& x : v) x = rms * normal(rng);
    const std::vector<float>& g = grads.by_name.at(t.name);
    double analytic = 0;
    for (int64_t i = 0; i < n; ++i) analytic += static_cast<double>(g[i]) * v[i];
    float eps = 1e-3f;
    bool smooth = false;
    double numeric = 0;
    for (int tries = 0; tries < 6 && !smooth; ++tries, eps *= 0.5f) {
      auto loss_at = [&](float s) {
        for (int64_t i = 0; i < n; ++i) p[i] = orig[i] + s * v[i];
        smooth = smooth && Routes(**model, c) == base_routes;
        return WeightedTokenLossAndGradients(**model, batch, nullptr)->balance_loss;
      };
      smooth = true;
      numeric = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
    }
    std::copy(orig.begin(), orig.end(), p);
    if (!smooth) continue;
    EXPECT_NEAR(numeric, analytic, 2e-2 * std::fabs(analytic) + 2e-3)
        << t.name << ": finite difference " << numeric << ", analytic " << analytic;
    EXPECT_NE(analytic, 0.0) << t.name;
    ++checked;
  }
  EXPECT_GE(checked, 5);
  batch.balance_loss_weight = -1.0f;
  EXPECT_EQ(WeightedTokenLossAndGradients(**model, batch, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Note [Packed documents]: a row holding two documents (and padding) gives
// the loss, log-probs, expert loads and every gradient of the two documents
// run as batches of their own, and not those of the concatenation, whose
// second document attends to (and is compressed together with) the first.
TEST(V4TrainTest, PackedDocumentsRunAsSeparateSequences) {
  auto model = Model::Load(kFixtureB);
  ASSERT_TRUE(model.ok()) << model.status();
  constexpr uint64_t kSeed = 4242;
  std::mt19937_64 rng(kSeed);
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int64_t V = (*model)->config().vocab_size;
  // Row 0: document A (9 tokens), document B (13), 2 padding; row 1: one document of 24.
  const int64_t T = 24, lengths[] = {9, 13, 24};
  std::vector<std::vector<int64_t>> docs;
  for (int64_t len : lengths) {
    std::vector<int64_t> d(len);
    for (auto& t : d) t = 2 + static_cast<int64_t>(rng() % (V - 2));
    docs.push_back(d);
  }
  std::vector<int64_t> tokens(2 * T, 0), targets(2 * T, -1);
  std::vector<int32_t> documents(2 * T, -1);
  std::vector<float> weights(2 * T, 0.0f);
  const int64_t starts[] = {0, 9, T};
  for (int k = 0; k < 3; ++k)
    for (int64_t i = 0; i < lengths[k]; ++i) {
      tokens[starts[k] + i] = docs[k][i];
      documents[starts[k] + i] = k == 2 ? 0 : k;
      if (i + 1 < lengths[k]) targets[starts[k] + i] = docs[k][i + 1];
    }
  int64_t scored = 0;
  for (int64_t t : targets) scored += t >= 0;
  for (size_t i = 0; i < targets.size(); ++i)
    if (targets[i] >= 0) weights[i] = (0.5f + static_cast<float>(rng() % 100) / 100) / scored;
  TokenBatch packed{tokens, targets, weights, 2, T, {}, 0.0f, documents};
  Gradients g_packed;
  auto lp = WeightedTokenLossAndGradients(**model, packed, &g_packed);
  ASSERT_TRUE(lp.ok()) << lp.status();

  Gradients g_apart;
  double loss_apart = 0;
  std::vector<int64_t> load_apart((*model)->config().n_routed_experts, 0);
  for (int k = 0; k < 3; ++k) {
    const int64_t s = starts[k], n = lengths[k];
    TokenBatch one{absl::MakeConstSpan(tokens.data() + s, n),
                   absl::MakeConstSpan(targets.data() + s, n),
                   absl::MakeConstSpan(weights.data() + s, n),
                   1,
                   n,
                   {},
                   0.0f, {}};
    auto l = WeightedTokenLossAndGradients(**model, one, &g_apart);
    ASSERT_TRUE(l.ok()) << l.status();
    loss_apart += l->loss;
    for (int64_t i = 0; i < n; ++i)
      EXPECT_EQ(lp->logprobs[s + i], l->logprobs[i]) << "document " << k;
    for (size_t e = 0; e < load_apart.size(); ++e) load_apart[e] += l->expert_load[1][e];
  }
  EXPECT_EQ(lp->logprobs[22], 0.0f);  // padding
  EXPECT_EQ(lp->expert_load[1], load_apart) << "padding routes nowhere";
  EXPECT_NEAR(lp->loss, loss_apart, 1e-9 * std::fabs(loss_apart));
  float worst = 0;
  std::string worst_name;
  ASSERT_EQ(g_packed.by_name.size(), g_apart.by_name.size());
  for (const auto& [name, g] : g_apart.by_name) {
    ASSERT_TRUE(g_packed.by_name.count(name)) << name;
    const float rel =
        RelativeError(g_packed.by_name[name].data(), g.data(), static_cast<int64_t>(g.size()));
    if (rel > worst) {
      worst = rel;
      worst_name = name;
    }
    EXPECT_LE(rel, 1e-6f) << name;
  }
  std::printf(
      "packed vs separate documents: loss %.9g vs %.9g, worst gradient relative error %.2e (%s)\n",
      lp->loss, loss_apart, worst, worst_name.c_str());

  // The cross-attending concatenation (no documents) is another function.
  TokenBatch concatenated = packed;
  concatenated.documents = {};
  Gradients g_cat;
  auto lc = WeightedTokenLossAndGradients(**model, concatenated, &g_cat);
  ASSERT_TRUE(lc.ok()) << lc.status();
  std::printf("concatenated row: loss %.9g\n", lc->loss);
  EXPECT_GT(std::fabs(lc->loss - lp->loss), 1e-3 * std::fabs(lp->loss));
  for (int64_t i = 0; i < 9; ++i)
    EXPECT_NEAR(lc->logprobs[i], lp->logprobs[i], 1e-5f) << "document A sees nothing before it";
  float differs = 0;
  for (int64_t i = 9; i < 21; ++i)
    differs = std::max(differs, std::fabs(lc->logprobs[i] - lp->logprobs[i]));
  EXPECT_GT(differs, 1e-3f) << "document B attends to document A when concatenated";
  EXPECT_GT(
      RelativeError(g_cat.by_name["model.embed_tokens.weight"].data(),
                    g_packed.by_name["model.embed_tokens.weight"].data(),
                    static_cast<int64_t>(g_packed.by_name["model.embed_tokens.weight"].size())),
      1e-3f);

  // Padding with a target, or documents of the wrong size, are bad batches.
  std::vector<int64_t> bad_targets = targets;
  bad_targets[22] = 5;
  TokenBatch bad = packed;
  bad.targets = bad_targets;
  EXPECT_NE(WeightedTokenLossAndGradients(**model, bad, nullptr).status().message().find("padding"),
            std::string::npos);
  bad = packed;
  bad.documents = absl::MakeConstSpan(documents.data(), 5);
  EXPECT_EQ(WeightedTokenLossAndGradients(**model, bad, nullptr).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retort::v4
