// V4 model pieces with hand-checkable properties: compressed-entry emission
// and visibility, state accounting, YaRN frequencies, causality, batch
// invariance, bad input.
#include <cmath>
#include <random>

#include "gtest/gtest.h"
#include "model/io/safetensors.h"
#include "model/io/v4_config.h"
#include "model/v4/model.h"

namespace retort::v4 {
namespace {

std::unique_ptr<Model> LoadOrDie(const std::string& name) {
  auto m = Model::Load("tests/fixtures/v4/" + name);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(m).value() : nullptr;
}

TEST(V4ComponentsTest, CompressorsEmitOneEntryPerCompleteWindowAndStateBytesAreExact) {
  auto model = LoadOrDie("a");  // HCA m'=16, CSA m=4, sliding; window 8
  ASSERT_NE(model, nullptr);
  const auto& c = model->config();
  auto state = model->NewState();
  std::mt19937_64 rng(5);
  std::uniform_int_distribution<int64_t> tok(2, c.vocab_size - 1);
  int64_t length = 0;
  for (int64_t chunk : {1, 3, 4, 9, 16, 1, 1, 30}) {  // ragged chunks cross window edges
    std::vector<int64_t> ids(chunk);
    for (auto& t : ids) t = tok(rng);
    std::vector<Model::Chunk> chunks = {{state.get(), ids}};
    ASSERT_TRUE(model->Step(chunks).ok());
    length += chunk;
    ASSERT_EQ(state->length(), length);
    for (int l = 0; l < c.num_layers; ++l) {
      const int64_t want = c.attention[l] == io::AttentionKind::kSliding ? 0 : length / c.compress_ratio[l];
      EXPECT_EQ(state->CompressedEntries(l), want) << "layer " << l << " after " << length << " tokens";
      EXPECT_EQ(state->IndexerKeys(l), c.attention[l] == io::AttentionKind::kCsa ? want : 0) << "layer " << l;
    }
    EXPECT_EQ(state->Bytes(), model->StateBytes(length)) << "after " << length << " tokens";
  }
}

TEST(V4ComponentsTest, LogitsAtPositionTDoNotDependOnLaterTokens) {
  auto model = LoadOrDie("b");
  ASSERT_NE(model, nullptr);
  const int64_t V = model->config().vocab_size, T = 70;
  std::mt19937_64 rng(11);
  std::uniform_int_distribution<int64_t> tok(2, V - 1);
  std::vector<int64_t> a(T), b;
  for (auto& t : a) t = tok(rng);
  b = a;
  for (int64_t t = 40; t < T; ++t) b[t] = tok(rng);
  auto sa = model->NewState(), sb = model->NewState();
  std::vector<Model::Chunk> ca = {{sa.get(), a}}, cb = {{sb.get(), b}};
  auto la = model->Step(ca), lb = model->Step(cb);
  ASSERT_TRUE(la.ok() && lb.ok());
  // Bit-identical: every kernel is row-invariant (Note [Batch-invariant
  // MatMul] in model/kernels/cpu), so the later rows and the experts they
  // route to cannot move earlier logits by even an ulp.
  for (int64_t i = 0; i < 40 * V; ++i) ASSERT_EQ((*la)[i], (*lb)[i]) << "position " << i / V;
  float later = 0.0f;
  for (int64_t i = 41 * V; i < T * V; ++i) later = std::max(later, std::fabs((*la)[i] - (*lb)[i]));
  EXPECT_GT(later, 1e-2f) << "changing tokens 40.. should change the logits after them";
}

// Continuous batching regroups sequences every step; the rollout worker's
// resume promise needs a sequence's logits to have the same bits whatever
// shares its step. Sequence A runs alone (prefill, then decode), and again
// beside two others that sit before and after it, prefill alongside decode.
TEST(V4ComponentsTest, ASequencesLogitsDoNotDependOnItsBatchmates) {
  for (const char* fixture : {"b", "q"}) {
    auto model = LoadOrDie(fixture);
    ASSERT_NE(model, nullptr);
    const int64_t V = model->config().vocab_size;
    constexpr uint64_t kSeed = 7;
    std::mt19937_64 rng(kSeed);
    std::uniform_int_distribution<int64_t> tok(2, V - 1);
    auto tokens = [&](int n) {
      std::vector<int64_t> v(n);
      for (auto& t : v) t = tok(rng);
      return v;
    };
    const std::vector<int64_t> a_prompt = tokens(23), b_prompt = tokens(31), c_prompt = tokens(7);
    std::vector<std::vector<int64_t>> a_next, b_next, c_next;
    for (int step = 0; step < 6; ++step) {
      a_next.push_back(tokens(1));
      b_next.push_back(tokens(step == 2 ? 9 : 1));  // a prefill-sized chunk mid-decode
      c_next.push_back(tokens(1));
    }
    // Alone.
    auto a = model->NewState();
    std::vector<std::vector<float>> alone;
    {
      std::vector<Model::Chunk> ch = {{a.get(), a_prompt}};
      auto l = model->Step(ch);
      ASSERT_TRUE(l.ok()) << l.status();
      alone.push_back(*l);
    }
    for (int step = 0; step < 6; ++step) {
      std::vector<Model::Chunk> ch = {{a.get(), a_next[step]}};
      auto l = model->Step(ch);
      ASSERT_TRUE(l.ok()) << l.status();
      alone.push_back(*l);
    }
    // Batched: B before A at prefill; C joins after A for the decode steps,
    // and A moves to the front on odd steps.
    auto a2 = model->NewState(), b = model->NewState(), c = model->NewState();
    {
      std::vector<Model::Chunk> ch = {{b.get(), b_prompt}, {a2.get(), a_prompt}};
      auto l = model->Step(ch);
      ASSERT_TRUE(l.ok()) << l.status();
      const std::vector<float> got(l->begin() + b_prompt.size() * V, l->end());
      ASSERT_TRUE(got == alone[0])
          << fixture << ": prefill logits of A moved (seed " << kSeed << ")";
    }
    {
      std::vector<Model::Chunk> ch = {{c.get(), c_prompt}};
      ASSERT_TRUE(model->Step(ch).ok());
    }
    for (int step = 0; step < 6; ++step) {
      std::vector<Model::Chunk> ch;
      int64_t a_row = 0;
      if (step % 2 == 1) {
        ch = {{a2.get(), a_next[step]}, {b.get(), b_next[step]}, {c.get(), c_next[step]}};
      } else {
        ch = {{b.get(), b_next[step]}, {a2.get(), a_next[step]}, {c.get(), c_next[step]}};
        a_row = static_cast<int64_t>(b_next[step].size());
      }
      auto l = model->Step(ch);
      ASSERT_TRUE(l.ok()) << l.status();
      const std::vector<float> got(l->begin() + a_row * V, l->begin() + (a_row + 1) * V);
      ASSERT_TRUE(got == alone[step + 1])
          << fixture << ": decode step " << step << " logits of A moved (seed " << kSeed << ")";
    }
  }
}

TEST(V4ComponentsTest, YarnRampMatchesTheSpecWhereLoClampsToZero) {
  io::RopeConfig r;
  r.theta = 160000;
  r.yarn = true;
  r.factor = 16;
  r.original_max_position = 64;
  const auto f = RopeInverseFrequencies(r, 16);  // lo = 0, hi = ceil(1.55) = 2
  io::RopeConfig plain = r;
  plain.yarn = false;
  const auto g = RopeInverseFrequencies(plain, 16);
  ASSERT_EQ(f.size(), 8u);
  EXPECT_FLOAT_EQ(f[0], g[0]);                                 // ramp 0: extrapolation
  EXPECT_FLOAT_EQ(f[1], g[1] * 0.5f / 16 + g[1] * 0.5f);      // ramp 1/2
  for (int i = 2; i < 8; ++i) EXPECT_FLOAT_EQ(f[i], g[i] / 16);  // ramp 1: interpolation
  EXPECT_FLOAT_EQ(g[1], std::pow(160000.0f, -2.0f / 16));
}

TEST(V4ComponentsTest, BadTokensAreRejectedAndLeaveStateUntouched) {
  auto model = LoadOrDie("a");
  ASSERT_NE(model, nullptr);
  auto s = model->NewState();
  std::vector<int64_t> ok = {2, 3}, bad = {4, model->config().vocab_size};
  std::vector<Model::Chunk> c1 = {{s.get(), ok}};
  ASSERT_TRUE(model->Step(c1).ok());
  std::vector<Model::Chunk> c2 = {{s.get(), bad}};
  auto r = model->Step(c2);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("outside the vocabulary"), absl::string_view::npos);
  EXPECT_EQ(s->length(), 2);
  std::vector<Model::Chunk> dup = {{s.get(), ok}, {s.get(), ok}};
  EXPECT_FALSE(model->Step(dup).ok());
}

TEST(V4ComponentsTest, ClonedStateContinuesIdenticallyAndIndependently) {
  auto model = LoadOrDie("a");
  ASSERT_NE(model, nullptr);
  const int64_t V = model->config().vocab_size;
  std::vector<int64_t> prompt(21);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = 2 + (i * 37) % (V - 2);
  auto s = model->NewState();
  std::vector<Model::Chunk> c = {{s.get(), prompt}};
  ASSERT_TRUE(model->Step(c).ok());
  auto fork = s->Clone();
  EXPECT_EQ(fork->Bytes(), s->Bytes());
  std::vector<int64_t> a = {5, 6, 7, 8}, b = {9};
  // Advance the original on other tokens first: the fork must not see them.
  std::vector<Model::Chunk> cb = {{s.get(), b}};
  ASSERT_TRUE(model->Step(cb).ok());
  auto s2 = model->NewState();
  std::vector<int64_t> full = prompt;
  full.insert(full.end(), a.begin(), a.end());
  std::vector<Model::Chunk> cf = {{fork.get(), a}}, cref = {{s2.get(), full}};
  auto lf = model->Step(cf), lr = model->Step(cref);
  ASSERT_TRUE(lf.ok() && lr.ok());
  for (int64_t i = 0; i < 4 * V; ++i) ASSERT_NEAR((*lf)[i], (*lr)[21 * V + i], 1e-5f);
}

TEST(V4ComponentsTest, FromTensorsEqualsLoadAndRoutesAreCaptured) {
  auto model = LoadOrDie("a");
  ASSERT_NE(model, nullptr);
  auto ckpt = io::Checkpoint::Open("tests/fixtures/v4/a");
  ASSERT_TRUE(ckpt.ok());
  io::TensorMap map("pushed weights");
  for (const auto& n : (*ckpt)->TensorNames()) map.Add(n, (*ckpt)->Get(n)->Clone());
  auto pushed = Model::FromTensors(model->config(), map);
  ASSERT_TRUE(pushed.ok()) << pushed.status();
  std::vector<int64_t> ids = {3, 14, 15, 92, 65, 35, 89, 79};
  auto s1 = model->NewState(), s2 = (*pushed)->NewState();
  std::vector<Model::Chunk> c1 = {{s1.get(), ids}}, c2 = {{s2.get(), ids}};
  StepOutputs outs;
  outs.capture_routes = true;
  auto l1 = model->Step(c1, &outs), l2 = (*pushed)->Step(c2);
  ASSERT_TRUE(l1.ok() && l2.ok());
  EXPECT_EQ(*l1, *l2);
  const auto& c = model->config();
  ASSERT_EQ(static_cast<int>(outs.routes.size()), c.num_layers);
  const auto& tid2eid = model->weights().layers[0].moe.tid2eid;
  for (size_t r = 0; r < ids.size(); ++r)
    for (int k = 0; k < c.experts_per_token; ++k) {
      EXPECT_EQ(outs.routes[0][r * c.experts_per_token + k], tid2eid.data<int64_t>()[ids[r] * c.experts_per_token + k]);
      for (int l = 2; l < c.num_layers; ++l) {
        const int32_t e = outs.routes[l][r * c.experts_per_token + k];
        EXPECT_TRUE(e >= 0 && e < c.n_routed_experts);
      }
    }
  // A pushed tensor of the wrong shape is refused with its name.
  io::TensorMap bad = map;
  bad.Add("model.norm.weight", Tensor::Zeros(DType::kF32, {3}));
  auto r = Model::FromTensors(model->config(), bad);
  EXPECT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.norm.weight"), absl::string_view::npos) << r.status();
}

TEST(V4ComponentsTest, ConfigLayoutsAgreeOnTheFixtures) {
  auto hf = io::LoadV4Config("tests/fixtures/v4/b");
  auto rel = io::LoadV4Config("tests/fixtures/v4/q");
  ASSERT_TRUE(hf.ok()) << hf.status();
  ASSERT_TRUE(rel.ok()) << rel.status();
  EXPECT_EQ(hf->layout, io::CheckpointLayout::kHf);
  EXPECT_EQ(rel->layout, io::CheckpointLayout::kReleased);
  EXPECT_EQ(hf->rope_dim, 16);
  EXPECT_TRUE(hf->compress_rope.yarn);
  EXPECT_FALSE(hf->main_rope.yarn);
  EXPECT_EQ(rel->compress_ratio, (std::vector<int>{0, 4, 16, 4, 16}));
  EXPECT_EQ(rel->hash_routed, (std::vector<bool>{true, true, false, false, false}));
  EXPECT_TRUE(rel->fp8_weights);
  EXPECT_EQ(rel->expert_dtype, "fp4");
  EXPECT_EQ(rel->compress_rope.original_max_position, 256);
}

}  // namespace
}  // namespace retort::v4
