// Tests for learner/losses: finite-difference gradient checks against
// double-precision references, the PyTorch reverse-KL fixture, chunk-size
// invariance, masking and argument errors.
#include "learner/losses/losses.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace retort::losses {
namespace {

constexpr uint32_t kSeed = 977;

std::vector<float> Gaussian(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// ---- double-precision references (full [T, V] in memory; tiny sizes only) ----

using Vec = std::vector<double>;

Vec ToDouble(const std::vector<float>& v) { return Vec(v.begin(), v.end()); }

// Row t of log_softmax(h Wᵀ).
Vec LogSoftmaxRow(const Vec& h, const Vec& w, int64_t t, int64_t dim, int64_t vocab) {
  Vec z(vocab);
  double mx = -INFINITY;
  for (int64_t v = 0; v < vocab; ++v) {
    double s = 0;
    for (int64_t k = 0; k < dim; ++k) s += h[t * dim + k] * w[v * dim + k];
    z[v] = s;
    mx = std::max(mx, s);
  }
  double sum = 0;
  for (double x : z) sum += std::exp(x - mx);
  const double lse = mx + std::log(sum);
  for (double& x : z) x -= lse;
  return z;
}

double RefWeightedLogProb(const Vec& h, const Vec& w, const std::vector<int32_t>& y,
                          const std::vector<float>& c, int64_t dim, int64_t vocab) {
  double loss = 0;
  for (size_t t = 0; t < y.size(); ++t) loss += c[t] * LogSoftmaxRow(h, w, t, dim, vocab)[y[t]];
  return loss;
}

double RefReverseKl(const Vec& hs, const Vec& ws, const Vec& ht, const Vec& wt,
                    const std::vector<float>& c, int64_t ds, int64_t dt, int64_t vocab,
                    Vec* kl_out = nullptr) {
  double loss = 0;
  for (size_t t = 0; t < c.size(); ++t) {
    Vec ls = LogSoftmaxRow(hs, ws, t, ds, vocab), lt = LogSoftmaxRow(ht, wt, t, dt, vocab);
    double kl = 0;
    for (int64_t v = 0; v < vocab; ++v) kl += std::exp(ls[v]) * (ls[v] - lt[v]);
    if (kl_out) kl_out->push_back(kl);
    loss += c[t] * kl;
  }
  return loss;
}

// Central differences of `f` at every element of `x` (double, step 1e-6),
// compared with the analytic fp32 gradient `g`. fp32 logits put ~1e-6
// relative noise into the analytic gradient; the FD truncation error is
// ~1e-10. Bound: |g − fd| <= 1e-5 + 1e-3·|fd|.
void ExpectGradientMatchesFiniteDifferences(Vec& x, const std::function<double()>& f,
                                            const std::vector<float>& g, const std::string& what) {
  ASSERT_EQ(x.size(), g.size()) << what;
  const double step = 1e-6;
  int bad = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double keep = x[i];
    x[i] = keep + step;
    const double up = f();
    x[i] = keep - step;
    const double down = f();
    x[i] = keep;
    const double fd = (up - down) / (2 * step);
    if (std::abs(g[i] - fd) > 1e-5 + 1e-3 * std::abs(fd) && ++bad <= 5) {
      ADD_FAILURE() << what << "[" << i << "]: analytic " << g[i] << ", finite difference " << fd;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": elements off";
}

double RelativeError(const std::vector<float>& a, const Vec& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// ---- a small problem ----------------------------------------------------------

struct Problem {
  int64_t tokens, dim, vocab, teacher_dim;
  std::vector<float> h, w, ht, wt, coeff, mask;
  std::vector<int32_t> y;
};

Problem MakeProblem(int64_t tokens, int64_t dim, int64_t vocab, int64_t teacher_dim,
                    uint32_t seed) {
  std::mt19937 rng(seed);
  Problem p{tokens, dim, vocab, teacher_dim, {}, {}, {}, {}, {}, {}, {}};
  p.h = Gaussian(tokens * dim, rng);
  p.w = Gaussian(vocab * dim, rng, 0.4f);
  p.ht = Gaussian(tokens * teacher_dim, rng);
  p.wt = Gaussian(vocab * teacher_dim, rng, 0.4f);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(vocab - 1));
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t t = 0; t < tokens; ++t) {
    p.y.push_back(tok(rng));
    p.coeff.push_back(u(rng));
    p.mask.push_back(t % 3 == 1 ? 0.0f : 1.0f);  // every third token is "prompt"
  }
  return p;
}

LmHead Student(const Problem& p) { return {p.h, p.w, p.tokens, p.dim, p.vocab}; }
TeacherHead Teacher(const Problem& p) { return {p.ht, p.wt, p.teacher_dim, {}, 1e-6f}; }

struct Grads {
  std::vector<float> h, w;
  Grads(const Problem& p) : h(p.tokens * p.dim, 0.0f), w(p.vocab * p.dim, 0.0f) {}
  HeadGrads Spans() { return {absl::MakeSpan(h), absl::MakeSpan(w)}; }
};

// ---- finite differences ---------------------------------------------------------

TEST(WeightedLogProb, GradientsMatchFiniteDifferences) {
  SCOPED_TRACE(testing::Message() << "seed=" << kSeed);
  Problem p = MakeProblem(5, 8, 23, 8, kSeed);
  Grads g(p);
  auto r = WeightedLogProbLoss(Student(p), p.y, p.coeff, g.Spans(), {7, 2});
  ASSERT_TRUE(r.ok()) << r.status();
  Vec h = ToDouble(p.h), w = ToDouble(p.w);
  auto f = [&] { return RefWeightedLogProb(h, w, p.y, p.coeff, p.dim, p.vocab); };
  EXPECT_NEAR(r->loss, f(), 1e-5 * (1 + std::abs(f())));
  for (int64_t t = 0; t < p.tokens; ++t) {
    EXPECT_NEAR(r->logprob[t], LogSoftmaxRow(h, w, t, p.dim, p.vocab)[p.y[t]], 1e-5);
  }
  ExpectGradientMatchesFiniteDifferences(h, f, g.h, "dL/dh");
  ExpectGradientMatchesFiniteDifferences(w, f, g.w, "dL/dW");
}

TEST(TokenCrossEntropy, GradientsMatchFiniteDifferences) {
  SCOPED_TRACE(testing::Message() << "seed=" << kSeed);
  Problem p = MakeProblem(6, 8, 19, 8, kSeed + 1);
  Grads g(p);
  auto r = TokenCrossEntropy(Student(p), p.y, p.mask, g.Spans(), {5, 4});
  ASSERT_TRUE(r.ok()) << r.status();
  double count = 0;
  for (float m : p.mask) count += m;
  std::vector<float> c;
  for (float m : p.mask) c.push_back(static_cast<float>(-m / count));
  Vec h = ToDouble(p.h), w = ToDouble(p.w);
  auto f = [&] { return RefWeightedLogProb(h, w, p.y, c, p.dim, p.vocab); };
  EXPECT_NEAR(r->loss, f(), 1e-5 * (1 + std::abs(f())));
  EXPECT_GT(r->loss, 0);
  ExpectGradientMatchesFiniteDifferences(h, f, g.h, "dCE/dh");
  ExpectGradientMatchesFiniteDifferences(w, f, g.w, "dCE/dW");
}

TEST(ReverseKl, GradientsMatchFiniteDifferences) {
  SCOPED_TRACE(testing::Message() << "seed=" << kSeed);
  Problem p = MakeProblem(5, 8, 29, 12, kSeed + 2);  // teacher dim differs from the student's
  for (float& c : p.coeff) c = std::abs(c);
  Grads g(p);
  auto r = ReverseKlLoss(Student(p), Teacher(p), p.coeff, g.Spans(), {6, 3});
  ASSERT_TRUE(r.ok()) << r.status();
  Vec hs = ToDouble(p.h), ws = ToDouble(p.w), ht = ToDouble(p.ht), wt = ToDouble(p.wt);
  Vec kl;
  const double ref = RefReverseKl(hs, ws, ht, wt, p.coeff, p.dim, p.teacher_dim, p.vocab, &kl);
  EXPECT_NEAR(r->loss, ref, 1e-5 * (1 + std::abs(ref)));
  for (int64_t t = 0; t < p.tokens; ++t) {
    EXPECT_NEAR(r->kl[t], kl[t], 1e-5 * (1 + kl[t]));
    EXPECT_GT(r->kl[t], 0);
  }
  auto f = [&] { return RefReverseKl(hs, ws, ht, wt, p.coeff, p.dim, p.teacher_dim, p.vocab); };
  ExpectGradientMatchesFiniteDifferences(hs, f, g.h, "dKL/dh_s");
  ExpectGradientMatchesFiniteDifferences(ws, f, g.w, "dKL/dW_s");
}

TEST(ReverseKl, ZeroWhenStudentEqualsTeacher) {
  Problem p = MakeProblem(4, 8, 31, 8, kSeed + 3);
  Grads g(p);
  auto r = ReverseKlLoss(Student(p), {p.h, p.w, p.dim, {}, 1e-6f}, p.mask, g.Spans(), {8, 4});
  ASSERT_TRUE(r.ok());
  for (double kl : r->kl) EXPECT_NEAR(kl, 0.0, 1e-6);
  for (float x : g.h) EXPECT_NEAR(x, 0.0f, 1e-6);
}

TEST(ReverseKl, TeacherFinalNormEqualsPreNormalisedHidden) {
  SCOPED_TRACE(testing::Message() << "seed=" << kSeed);
  Problem p = MakeProblem(7, 8, 41, 10, kSeed + 4);
  std::mt19937 rng(kSeed + 40);
  std::vector<float> norm_w = Gaussian(p.teacher_dim, rng);
  const float eps = 1e-6f;
  std::vector<float> normed(p.ht.size());
  for (int64_t t = 0; t < p.tokens; ++t) {
    double sq = 0;
    for (int64_t k = 0; k < p.teacher_dim; ++k) sq += std::pow(p.ht[t * p.teacher_dim + k], 2);
    const double inv = 1 / std::sqrt(sq / p.teacher_dim + eps);
    for (int64_t k = 0; k < p.teacher_dim; ++k) {
      normed[t * p.teacher_dim + k] =
          static_cast<float>(p.ht[t * p.teacher_dim + k] * inv * norm_w[k]);
    }
  }
  Grads a(p), b(p);
  auto with_norm =
      ReverseKlLoss(Student(p), {p.ht, p.wt, p.teacher_dim, norm_w, eps}, p.mask, a.Spans());
  auto pre = ReverseKlLoss(Student(p), {normed, p.wt, p.teacher_dim, {}, eps}, p.mask, b.Spans());
  ASSERT_TRUE(with_norm.ok() && pre.ok());
  EXPECT_NEAR(with_norm->loss, pre->loss, 1e-6 * (1 + pre->loss));
  for (size_t i = 0; i < a.h.size(); ++i) EXPECT_NEAR(a.h[i], b.h[i], 1e-6);
}

// ---- the PyTorch fixture ------------------------------------------------------------

// Reads the float64 tensors of a safetensors file (retort's Tensor has no f64).
std::map<std::string, std::pair<std::vector<int64_t>, Vec>> ReadF64Safetensors(
    const std::string& path) {
  std::map<std::string, std::pair<std::vector<int64_t>, Vec>> out;
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  if (!in) return out;
  uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  std::string header(n, '\0');
  in.read(header.data(), static_cast<std::streamsize>(n));
  std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const nlohmann::json j = nlohmann::json::parse(header);
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& e = it.value();
    if (name == "__metadata__") continue;
    EXPECT_EQ(e["dtype"], "F64") << name;
    const size_t b = e["data_offsets"][0], end = e["data_offsets"][1];
    EXPECT_LE(end, data.size()) << name;
    Vec v((end - b) / 8);
    std::memcpy(v.data(), data.data() + b, end - b);
    out[name] = {e["shape"].get<std::vector<int64_t>>(), std::move(v)};
  }
  return out;
}

std::string FixturePath(const std::string& rel) {
  const char* root = std::getenv("RETORT_SOURCE_DIR");
  return root ? std::string(root) + "/" + rel : rel;
}

TEST(ReverseKl, MatchesPyTorchFixture) {
  auto fx = ReadF64Safetensors(FixturePath("tests/fixtures/distill/rkl.safetensors"));
  ASSERT_EQ(fx.size(), 10u);
  const auto& [hs_shape, hs] = fx.at("h_s");
  const auto& [ws_shape, ws] = fx.at("w_s");
  const int64_t n = hs_shape[0], d = hs_shape[1], v = ws_shape[0];
  ASSERT_EQ(n, 37);
  ASSERT_EQ(v, 1009);
  auto f32 = [](const Vec& x) { return std::vector<float>(x.begin(), x.end()); };
  std::vector<float> h_s = f32(hs), w_s = f32(ws), h_t = f32(fx.at("h_t").second),
                     w_t = f32(fx.at("w_t").second);
  std::vector<float> mask = f32(fx.at("mask").second), weight = f32(fx.at("weight").second);
  std::vector<float> gh(n * d, 0.0f), gw(v * d, 0.0f);
  std::vector<float> coeff = MaskedMeanCoefficients(mask, weight);
  // 1009 = 4·256 − 15: the default chunking leaves a ragged last chunk too.
  for (ChunkOptions chunks : {ChunkOptions{}, ChunkOptions{256, 16}}) {
    std::fill(gh.begin(), gh.end(), 0.0f);
    std::fill(gw.begin(), gw.end(), 0.0f);
    auto r = ReverseKlLoss({h_s, w_s, n, d, v}, {h_t, w_t, d, {}, 1e-6f}, coeff,
                           {absl::MakeSpan(gh), absl::MakeSpan(gw)}, chunks);
    ASSERT_TRUE(r.ok()) << r.status();
    // Bound: fp32 logits (|z| ~ 5, ulp ~ 5e-7) against float64 autograd.
    const double ref_loss = fx.at("loss").second[0];
    EXPECT_NEAR(r->loss, ref_loss, 1e-5 * std::abs(ref_loss));
    const Vec& kl = fx.at("kl_per_token").second;
    for (int64_t t = 0; t < n; ++t)
      EXPECT_NEAR(r->kl[t], kl[t], 1e-5 * (1 + kl[t])) << "token " << t;
    const double eh = RelativeError(gh, fx.at("grad_h_s").second);
    const double ew = RelativeError(gw, fx.at("grad_w_s").second);
    EXPECT_LE(eh, 1e-5) << "grad_h_s relative error";
    EXPECT_LE(ew, 1e-5) << "grad_w_s relative error";
    RecordProperty("grad_h_s_rel_err", (std::ostringstream() << eh).str());
    RecordProperty("grad_w_s_rel_err", (std::ostringstream() << ew).str());
  }
}

// ---- chunking and masking -------------------------------------------------------------

TEST(Chunking, ResultsInvariantToChunkSizes) {
  SCOPED_TRACE(testing::Message() << "seed=" << kSeed);
  Problem p = MakeProblem(9, 16, 53, 12, kSeed + 5);
  const ChunkOptions reference{p.vocab, p.tokens};
  const std::vector<ChunkOptions> variants = {{1, 1},       {7, 3},       {7, 9},
                                              {p.vocab, 4}, {1000, 1000}, {52, 2}};
  for (int which = 0; which < 3; ++which) {
    auto run = [&](const ChunkOptions& o, Grads& g) -> std::pair<double, std::vector<double>> {
      switch (which) {
        case 0: {
          auto r = WeightedLogProbLoss(Student(p), p.y, p.coeff, g.Spans(), o);
          EXPECT_TRUE(r.ok());
          return {r->loss, r->logprob};
        }
        case 1: {
          auto r = TokenCrossEntropy(Student(p), p.y, p.mask, g.Spans(), o);
          EXPECT_TRUE(r.ok());
          return {r->loss, r->logprob};
        }
        default: {
          auto r = ReverseKlLoss(Student(p), Teacher(p), p.mask, g.Spans(), o);
          EXPECT_TRUE(r.ok());
          return {r->loss, r->kl};
        }
      }
    };
    Grads g_ref(p);
    auto [loss_ref, per_ref] = run(reference, g_ref);
    for (const ChunkOptions& o : variants) {
      SCOPED_TRACE(testing::Message() << "loss " << which << " vocab_chunk=" << o.vocab_chunk
                                      << " token_block=" << o.token_block);
      Grads g(p);
      auto [loss, per] = run(o, g);
      EXPECT_NEAR(loss, loss_ref, 1e-6 * (1 + std::abs(loss_ref)));
      for (size_t t = 0; t < per.size(); ++t)
        EXPECT_NEAR(per[t], per_ref[t], 1e-6 * (1 + std::abs(per_ref[t])));
      for (size_t i = 0; i < g.h.size(); ++i) ASSERT_NEAR(g.h[i], g_ref.h[i], 2e-6) << "dh " << i;
      for (size_t i = 0; i < g.w.size(); ++i) ASSERT_NEAR(g.w[i], g_ref.w[i], 2e-6) << "dW " << i;
    }
  }
}

TEST(Masking, MaskedTokensContributeNothing) {
  SCOPED_TRACE(testing::Message() << "seed=" << kSeed);
  Problem p = MakeProblem(8, 8, 37, 8, kSeed + 6);
  // The same problem with only the unmasked tokens.
  Problem kept = p;
  kept.h.clear();
  kept.ht.clear();
  kept.y.clear();
  kept.mask.clear();
  for (int64_t t = 0; t < p.tokens; ++t) {
    if (p.mask[t] == 0) continue;
    kept.h.insert(kept.h.end(), p.h.begin() + t * p.dim, p.h.begin() + (t + 1) * p.dim);
    kept.ht.insert(kept.ht.end(), p.ht.begin() + t * p.dim, p.ht.begin() + (t + 1) * p.dim);
    kept.y.push_back(p.y[t]);
    kept.mask.push_back(1.0f);
  }
  kept.tokens = static_cast<int64_t>(kept.y.size());
  ASSERT_LT(kept.tokens, p.tokens);

  Grads full(p), part(kept);
  auto a = TokenCrossEntropy(Student(p), p.y, p.mask, full.Spans(), {5, 3});
  auto b = TokenCrossEntropy(Student(kept), kept.y, kept.mask, part.Spans(), {5, 3});
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NEAR(a->loss, b->loss, 1e-6);
  for (size_t i = 0; i < full.w.size(); ++i) EXPECT_NEAR(full.w[i], part.w[i], 1e-6);
  for (int64_t t = 0; t < p.tokens; ++t) {
    if (p.mask[t] != 0) continue;
    for (int64_t k = 0; k < p.dim; ++k)
      EXPECT_EQ(full.h[t * p.dim + k], 0.0f) << "masked token " << t;
  }

  // Reverse KL with masked-mean coefficients: same story.
  Grads kfull(p), kpart(kept);
  auto c = ReverseKlLoss(Student(p), Teacher(p), MaskedMeanCoefficients(p.mask, {}), kfull.Spans(),
                         {5, 3});
  auto d = ReverseKlLoss(Student(kept), Teacher(kept), MaskedMeanCoefficients(kept.mask, {}),
                         kpart.Spans(), {5, 3});
  ASSERT_TRUE(c.ok() && d.ok());
  EXPECT_NEAR(c->loss, d->loss, 1e-6);
  for (size_t i = 0; i < kfull.w.size(); ++i) EXPECT_NEAR(kfull.w[i], kpart.w[i], 1e-6);
  for (int64_t t = 0; t < p.tokens; ++t) {
    if (p.mask[t] != 0) continue;
    for (int64_t k = 0; k < p.dim; ++k)
      EXPECT_EQ(kfull.h[t * p.dim + k], 0.0f) << "masked token " << t;
  }

  // All-masked: zero loss, zero gradients.
  std::vector<float> none(p.tokens, 0.0f);
  Grads zero(p);
  auto e = TokenCrossEntropy(Student(p), p.y, none, zero.Spans());
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->loss, 0.0);
  for (float x : zero.w) EXPECT_EQ(x, 0.0f);
}

TEST(Gradients, AccumulateIntoCallerBuffersAndForwardOnlyWorks) {
  Problem p = MakeProblem(4, 8, 17, 8, kSeed + 7);
  Grads once(p), twice(p);
  ASSERT_TRUE(WeightedLogProbLoss(Student(p), p.y, p.coeff, once.Spans()).ok());
  ASSERT_TRUE(WeightedLogProbLoss(Student(p), p.y, p.coeff, twice.Spans()).ok());
  ASSERT_TRUE(WeightedLogProbLoss(Student(p), p.y, p.coeff, twice.Spans()).ok());
  for (size_t i = 0; i < once.w.size(); ++i) EXPECT_FLOAT_EQ(twice.w[i], 2 * once.w[i]);
  auto fwd = WeightedLogProbLoss(Student(p), p.y, p.coeff, {});
  auto full = WeightedLogProbLoss(Student(p), p.y, p.coeff, once.Spans());
  ASSERT_TRUE(fwd.ok() && full.ok());
  EXPECT_EQ(fwd->loss, full->loss);
  EXPECT_EQ(fwd->logprob, full->logprob);
}

TEST(Errors, BadInputsNameTheField) {
  Problem p = MakeProblem(3, 4, 11, 4, kSeed + 8);
  std::vector<int32_t> bad_y = p.y;
  bad_y[1] = 11;
  auto r = WeightedLogProbLoss(Student(p), bad_y, p.coeff, {});
  ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(r.status().message()).find("targets[1]"), std::string::npos) << r.status();
  std::vector<float> short_coeff(2, 1.0f);
  EXPECT_EQ(WeightedLogProbLoss(Student(p), p.y, short_coeff, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<float> half_mask(p.tokens, 0.5f);
  EXPECT_EQ(TokenCrossEntropy(Student(p), p.y, half_mask, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  LmHead wrong = Student(p);
  wrong.vocab = 12;
  EXPECT_EQ(WeightedLogProbLoss(wrong, p.y, p.coeff, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(WeightedLogProbLoss(Student(p), p.y, p.coeff, {}, {0, 4}).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<float> small_grad(3);
  EXPECT_EQ(ReverseKlLoss(Student(p), Teacher(p), p.mask, {absl::MakeSpan(small_grad), {}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace retort::losses
