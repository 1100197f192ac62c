// Tests for learner/optim: Newton–Schulz orthogonalisation quality, Muon and
// AdamW against hand-computed / double-precision references, schedules,
// clipping, parameter groups and optimizer-state round trips.
#include "learner/optim/optim.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace retort::optim {
namespace {

constexpr uint32_t kSeed = 20240607;

// ---- double-precision helpers ---------------------------------------------

using Mat = std::vector<double>;  // row-major

Mat MatMul(const Mat& a, const Mat& b, int n, int k, int m) {  // [n,k]·[k,m]
  Mat c(static_cast<size_t>(n) * m, 0.0);
  for (int i = 0; i < n; ++i)
    for (int p = 0; p < k; ++p)
      for (int j = 0; j < m; ++j) c[i * m + j] += a[i * k + p] * b[p * m + j];
  return c;
}

Mat Transpose(const Mat& a, int n, int m) {
  Mat t(a.size());
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) t[j * n + i] = a[i * m + j];
  return t;
}

// n x k matrix with orthonormal columns (Gram–Schmidt on Gaussian columns).
Mat RandomOrthonormal(int n, int k, std::mt19937& rng) {
  std::normal_distribution<double> normal;
  Mat q(static_cast<size_t>(n) * k);
  for (int j = 0; j < k; ++j) {
    std::vector<double> v(n);
    for (double& x : v) x = normal(rng);
    for (int pass = 0; pass < 2; ++pass) {
      for (int p = 0; p < j; ++p) {
        double dot = 0;
        for (int i = 0; i < n; ++i) dot += v[i] * q[i * k + p];
        for (int i = 0; i < n; ++i) v[i] -= dot * q[i * k + p];
      }
    }
    double norm = 0;
    for (double x : v) norm += x * x;
    norm = std::sqrt(norm);
    for (int i = 0; i < n; ++i) q[i * k + j] = v[i] / norm;
  }
  return q;
}

// U diag(s) Vᵀ as an n x m float matrix; s has min(n, m) entries.
std::vector<float> MatrixWithSpectrum(int n, int m, const std::vector<double>& s,
                                      std::mt19937& rng) {
  const int k = std::min(n, m);
  Mat u = RandomOrthonormal(n, k, rng), v = RandomOrthonormal(m, k, rng);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < k; ++j) u[i * k + j] *= s[j];
  Mat a = MatMul(u, Transpose(v, m, k), n, k, m);
  return std::vector<float>(a.begin(), a.end());
}

// Eigenvalues of a symmetric k x k matrix (cyclic Jacobi), ascending.
std::vector<double> SymmetricEigenvalues(Mat a, int k) {
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0;
    for (int i = 0; i < k; ++i)
      for (int j = i + 1; j < k; ++j) off += a[i * k + j] * a[i * k + j];
    if (off < 1e-26) break;
    for (int p = 0; p < k; ++p) {
      for (int q = p + 1; q < k; ++q) {
        if (std::abs(a[p * k + q]) < 1e-300) continue;
        const double theta = (a[q * k + q] - a[p * k + p]) / (2 * a[p * k + q]);
        const double t = (theta >= 0 ? 1 : -1) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int r = 0; r < k; ++r) {  // columns p, q
          const double arp = a[r * k + p], arq = a[r * k + q];
          a[r * k + p] = c * arp - s * arq;
          a[r * k + q] = s * arp + c * arq;
        }
        for (int r = 0; r < k; ++r) {  // rows p, q
          const double apr = a[p * k + r], aqr = a[q * k + r];
          a[p * k + r] = c * apr - s * aqr;
          a[q * k + r] = s * apr + c * aqr;
        }
      }
    }
  }
  std::vector<double> ev(k);
  for (int i = 0; i < k; ++i) ev[i] = a[i * k + i];
  std::sort(ev.begin(), ev.end());
  return ev;
}

// Singular values (ascending) of the n x m matrix x.
std::vector<double> SingularValues(const std::vector<float>& x, int n, int m) {
  Mat a(x.begin(), x.end());
  const bool wide = n <= m;
  const int k = wide ? n : m;
  Mat gram = wide ? MatMul(a, Transpose(a, n, m), n, m, n) : MatMul(Transpose(a, n, m), a, m, n, m);
  std::vector<double> ev = SymmetricEigenvalues(gram, k);
  for (double& e : ev) e = std::sqrt(std::max(e, 0.0));
  return ev;
}

// The hybrid schedule on one scalar singular value x (exact arithmetic).
double ScalarNewtonSchulz(double x) {
  for (int i = 0; i < 8; ++i) x = 3.4445 * x - 4.7750 * x * x * x + 2.0315 * std::pow(x, 5);
  for (int i = 0; i < 2; ++i) x = 2 * x - 1.5 * x * x * x + 0.5 * std::pow(x, 5);
  return x;
}

// Newton–Schulz exactly as specified, in double, no transposition trick.
Mat ReferenceNewtonSchulz(Mat x, int n, int m) {
  double norm = 0;
  for (double v : x) norm += v * v;
  norm = std::sqrt(norm);
  for (double& v : x) v /= norm;
  for (int s = 0; s < 10; ++s) {
    const double a = s < 8 ? 3.4445 : 2, b = s < 8 ? -4.7750 : -1.5, c = s < 8 ? 2.0315 : 0.5;
    Mat g = MatMul(x, Transpose(x, n, m), n, m, n);
    Mat gg = MatMul(g, g, n, n, n);
    Mat poly(g.size());
    for (size_t i = 0; i < g.size(); ++i) poly[i] = b * g[i] + c * gg[i];
    Mat px = MatMul(poly, x, n, n, m);
    for (size_t i = 0; i < x.size(); ++i) x[i] = a * x[i] + px[i];
  }
  return x;
}

std::vector<float> Gaussian(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// ---- Newton–Schulz ---------------------------------------------------------

// In exact arithmetic the hybrid schedule maps every x in [1e-4, 1] into
// [1, 1.0021] (x >= 3e-4: [1, 1.00054]); fp32 rounding widens that a little.
constexpr double kBandLow = 0.995, kBandHigh = 1.005;

TEST(NewtonSchulz, SingularValuesNearOneForConditionedMatrices) {
  SCOPED_TRACE(testing::Message() << "seed=" << kSeed);
  std::mt19937 rng(kSeed);
  const std::pair<int, int> shapes[] = {{32, 32}, {16, 48}, {48, 16}, {7, 19},
                                        {19, 7},  {64, 24}, {1, 9},   {9, 1}};
  for (auto [n, m] : shapes) {
    SCOPED_TRACE(testing::Message() << n << "x" << m);
    const int k = std::min(n, m);
    std::vector<double> s(k);
    // log-uniform spectrum spanning 1e-3 .. 1, times an arbitrary overall scale
    std::uniform_real_distribution<double> u(std::log(1e-3), 0.0);
    for (double& v : s) v = 37.0 * std::exp(u(rng));
    s[0] = 37.0;
    std::vector<float> x = MatrixWithSpectrum(n, m, s, rng);
    NewtonSchulzOrthogonalize(x.data(), n, m);
    for (double sv : SingularValues(x, n, m)) {
      EXPECT_GE(sv, kBandLow);
      EXPECT_LE(sv, kBandHigh);
    }
  }
}

TEST(NewtonSchulz, SingularValuesNearOneForGaussianMatrices) {
  SCOPED_TRACE(testing::Message() << "seed=" << kSeed);
  std::mt19937 rng(kSeed + 1);
  const std::pair<int, int> shapes[] = {{24, 24}, {20, 70}, {70, 20}};
  for (auto [n, m] : shapes) {
    SCOPED_TRACE(testing::Message() << n << "x" << m);
    std::vector<float> x = Gaussian(static_cast<size_t>(n) * m, rng);
    std::vector<double> in = SingularValues(x, n, m);
    double fro = 0;
    for (double v : in) fro += v * v;
    // Precondition of the band: normalised singular values >= 1e-4.
    ASSERT_GE(in.front() / std::sqrt(fro), 1e-4);
    NewtonSchulzOrthogonalize(x.data(), n, m);
    for (double sv : SingularValues(x, n, m)) {
      EXPECT_GE(sv, kBandLow);
      EXPECT_LE(sv, kBandHigh);
    }
  }
}

TEST(NewtonSchulz, RankDeficientKeepsNullSpace) {
  SCOPED_TRACE(testing::Message() << "seed=" << kSeed);
  std::mt19937 rng(kSeed + 2);
  for (auto [n, m] : {std::pair{24, 40}, std::pair{40, 24}}) {
    SCOPED_TRACE(testing::Message() << n << "x" << m);
    const int k = std::min(n, m), rank = 10;
    std::vector<double> s(k, 0.0);
    for (int i = 0; i < rank; ++i) s[i] = 0.05 + i;  // condition ~200
    std::vector<float> x = MatrixWithSpectrum(n, m, s, rng);
    NewtonSchulzOrthogonalize(x.data(), n, m);
    std::vector<double> out = SingularValues(x, n, m);  // ascending
    for (int i = 0; i < k - rank; ++i) {
      // The null directions hold only fp32 rounding of the input (~1e-7
      // relative), amplified by at most 3.4445^8 * 2^2 ~ 2e4.
      EXPECT_LE(out[i], 0.01) << "null singular value " << i;
    }
    for (int i = k - rank; i < k; ++i) {
      EXPECT_GE(out[i], kBandLow);
      EXPECT_LE(out[i], kBandHigh);
    }
  }
}

TEST(NewtonSchulz, MatchesDoubleReferenceBothOrientations) {
  SCOPED_TRACE(testing::Message() << "seed=" << kSeed);
  std::mt19937 rng(kSeed + 3);
  for (auto [n, m] : {std::pair{5, 3}, std::pair{3, 5}, std::pair{6, 6}}) {
    std::vector<float> x = Gaussian(static_cast<size_t>(n) * m, rng);
    Mat ref = ReferenceNewtonSchulz(Mat(x.begin(), x.end()), n, m);
    NewtonSchulzOrthogonalize(x.data(), n, m);
    for (size_t i = 0; i < x.size(); ++i)
      EXPECT_NEAR(x[i], ref[i], 2e-4) << n << "x" << m << " element " << i;
  }
}

TEST(NewtonSchulz, ZeroStaysZero) {
  std::vector<float> x(12, 0.0f);
  NewtonSchulzOrthogonalize(x.data(), 3, 4);
  for (float v : x) EXPECT_EQ(v, 0.0f);
}

// ---- Muon ------------------------------------------------------------------

OptimizerConfig PlainConfig(double lr, double max_grad_norm = 0) {
  OptimizerConfig c;
  c.schedule.kind = ScheduleKind::kConstant;
  c.schedule.peak_lr = lr;
  c.max_grad_norm = max_grad_norm;
  return c;
}

Tensor F32(const std::vector<float>& v, Shape shape) {
  return Tensor::FromF32(v, std::move(shape));
}

std::vector<float> Values(const Tensor& t) {
  return {t.data<float>(), t.data<float>() + t.numel()};
}

void SetValues(Tensor& t, const std::vector<float>& v) {
  ASSERT_EQ(static_cast<int64_t>(v.size()), t.numel());
  std::copy(v.begin(), v.end(), t.mutable_data<float>());
}

TEST(Muon, UpdateRmsIsPointEighteen) {
  SCOPED_TRACE(testing::Message() << "seed=" << kSeed);
  std::mt19937 rng(kSeed + 4);
  const Shape shapes[] = {{64, 32}, {32, 64}, {48, 48}, {3, 16, 40}};
  for (const Shape& shape : shapes) {
    SCOPED_TRACE(ShapeString(shape));
    OptimizerConfig config = PlainConfig(1.0);
    config.muon.weight_decay = 0;
    Tensor w = Tensor::Zeros(DType::kF32, shape);
    Tensor g = F32(Gaussian(static_cast<size_t>(NumElements(shape)), rng), shape);
    auto opt = Optimizer::Create(config, {{"layers.0.w", w, g}});
    ASSERT_TRUE(opt.ok()) << opt.status();
    ASSERT_EQ((*opt)->KindOf("layers.0.w"), OptimizerKind::kMuon);
    ASSERT_TRUE((*opt)->Step().ok());
    // With W0 = 0, lr = 1, wd = 0: W1 = -O, so RMS(W1) is the update RMS.
    const int64_t experts = shape.size() == 3 ? shape[0] : 1;
    const int64_t per = w.numel() / experts;
    for (int64_t e = 0; e < experts; ++e) {
      double sq = 0;
      for (int64_t i = 0; i < per; ++i) sq += std::pow(w.data<float>()[e * per + i], 2);
      EXPECT_NEAR(std::sqrt(sq / per), 0.18, 0.18 * 0.005) << "expert " << e;
    }
  }
}

TEST(Muon, TwoStepsMatchHandComputedDiagonalCase) {
  // Diagonal gradients: Newton–Schulz acts on each singular value separately
  // (odd polynomial, so signs are kept) and O' = diag(f(s_i/||s||)).
  const float lr = 0.01f, wd = 0.1f, mu = 0.95f;
  OptimizerConfig config = PlainConfig(lr);
  Tensor w = F32({1, 2, 3, 4}, {2, 2});
  Tensor g = F32({3, 0, 0, 4}, {2, 2});
  auto opt = Optimizer::Create(config, {{"blocks.w", w, g}});
  ASSERT_TRUE(opt.ok()) << opt.status();
  const double scale = std::sqrt(2.0) * 0.18;
  // Step 1: M1 = G1, U1 = mu*M1 + G1 = 1.95*diag(3, 4) -> normalised (0.6, 0.8).
  double expect[4] = {1, 2, 3, 4};
  auto apply = [&](double o00, double o11) {
    for (double& v : expect) v *= 1 - static_cast<double>(lr) * wd;
    expect[0] -= lr * scale * o00;
    expect[3] -= lr * scale * o11;
  };
  apply(ScalarNewtonSchulz(0.6), ScalarNewtonSchulz(0.8));
  ASSERT_TRUE((*opt)->Step().ok());
  for (int i = 0; i < 4; ++i)
    EXPECT_NEAR(w.data<float>()[i], expect[i], 2e-6) << "step 1, element " << i;
  // Step 2: G2 = diag(1, -2); M2 = 0.95*diag(3,4) + G2 = diag(3.85, 1.8);
  // U2 = 0.95*M2 + G2 = diag(4.6575, -0.29).
  SetValues(g, {1, 0, 0, -2});
  const double u0 = mu * (mu * 3.0 + 1) + 1, u1 = mu * (mu * 4.0 - 2) - 2;
  const double norm = std::hypot(u0, u1);
  apply(ScalarNewtonSchulz(u0 / norm), -ScalarNewtonSchulz(std::abs(u1) / norm));
  ASSERT_TRUE((*opt)->Step().ok());
  for (int i = 0; i < 4; ++i)
    EXPECT_NEAR(w.data<float>()[i], expect[i], 2e-6) << "step 2, element " << i;
}

TEST(Muon, VectorShapedMatricesBothOrientations) {
  // A 1 x m (or m x 1) matrix has one singular value, 1 after normalisation:
  // O' = f(1) * G/||G|| and sqrt(max(n,m)) = sqrt(3).
  for (const Shape& shape : {Shape{1, 3}, Shape{3, 1}}) {
    SCOPED_TRACE(ShapeString(shape));
    OptimizerConfig config = PlainConfig(0.1);
    config.muon.weight_decay = 0;
    Tensor w = Tensor::Zeros(DType::kF32, shape);
    Tensor g = F32({1, -2, 2}, shape);  // ||g|| = 3
    auto opt = Optimizer::Create(config, {{"w", w, g}});
    ASSERT_TRUE(opt.ok()) << opt.status();
    ASSERT_TRUE((*opt)->Step().ok());
    const double f1 = ScalarNewtonSchulz(1.0);
    const double gv[3] = {1, -2, 2};
    for (int i = 0; i < 3; ++i) {
      EXPECT_NEAR(w.data<float>()[i], -0.1 * std::sqrt(3.0) * 0.18 * f1 * gv[i] / 3.0, 1e-6);
    }
  }
}

TEST(Muon, ExpertsAreOrthogonalisedSeparately) {
  SCOPED_TRACE(testing::Message() << "seed=" << kSeed);
  std::mt19937 rng(kSeed + 5);
  const int n = 6, m = 10;
  std::vector<float> w0 = Gaussian(2 * n * m, rng), g0 = Gaussian(2 * n * m, rng);
  Tensor w3 = F32(w0, {2, n, m}), g3 = F32(g0, {2, n, m});
  Tensor wa = F32({w0.begin(), w0.begin() + n * m}, {n, m}),
         ga = F32({g0.begin(), g0.begin() + n * m}, {n, m});
  Tensor wb = F32({w0.begin() + n * m, w0.end()}, {n, m}),
         gb = F32({g0.begin() + n * m, g0.end()}, {n, m});
  auto joint = Optimizer::Create(PlainConfig(0.02), {{"experts", w3, g3}});
  auto split = Optimizer::Create(PlainConfig(0.02), {{"e0", wa, ga}, {"e1", wb, gb}});
  ASSERT_TRUE(joint.ok() && split.ok());
  for (int step = 0; step < 2; ++step) {
    ASSERT_TRUE((*joint)->Step().ok());
    ASSERT_TRUE((*split)->Step().ok());
  }
  std::vector<float> a = Values(wa), b = Values(wb);
  a.insert(a.end(), b.begin(), b.end());
  EXPECT_EQ(Values(w3), a);
}

// ---- AdamW -----------------------------------------------------------------

TEST(AdamW, TwoStepsMatchHandComputed) {
  const double lr = 0.05, wd = 0.1, b1 = 0.9, b2 = 0.95, eps = 1e-8;
  OptimizerConfig config = PlainConfig(lr);
  config.adamw.eps = static_cast<float>(eps);
  Tensor w = F32({0.5f, -1.0f, 2.0f}, {3});
  Tensor g = F32({0.2f, -0.4f, 0.0f}, {3});
  auto opt = Optimizer::Create(config, {{"model.norm.weight", w, g}});
  ASSERT_TRUE(opt.ok()) << opt.status();
  ASSERT_EQ((*opt)->KindOf("model.norm.weight"), OptimizerKind::kAdamW);
  // Step 1: m = 0.1 g, v = 0.05 g², m̂ = g, v̂ = g²: update = g/(|g| + eps).
  double ew[3] = {0.5, -1.0, 2.0}, m[3] = {}, v[3] = {};
  const double g1[3] = {0.2, -0.4, 0.0}, g2[3] = {-0.1, -0.3, 0.5};
  for (int t = 1; t <= 2; ++t) {
    const double* gt = t == 1 ? g1 : g2;
    for (int i = 0; i < 3; ++i) {
      m[i] = b1 * m[i] + (1 - b1) * gt[i];
      v[i] = b2 * v[i] + (1 - b2) * gt[i] * gt[i];
      const double mh = m[i] / (1 - std::pow(b1, t)), vh = v[i] / (1 - std::pow(b2, t));
      ew[i] = ew[i] * (1 - lr * wd) - lr * mh / (std::sqrt(vh) + eps);
    }
    if (t == 2) SetValues(g, {-0.1f, -0.3f, 0.5f});
    ASSERT_TRUE((*opt)->Step().ok());
    for (int i = 0; i < 3; ++i)
      EXPECT_NEAR(w.data<float>()[i], ew[i], 1e-6) << "step " << t << " element " << i;
  }
}

// ---- schedules ---------------------------------------------------------------

TEST(Schedule, BoundarySteps) {
  ScheduleOptions o;
  o.peak_lr = 1.0;
  o.final_lr = 0.1;
  o.warmup_steps = 10;
  o.total_steps = 110;
  for (ScheduleKind kind :
       {ScheduleKind::kConstant, ScheduleKind::kLinear, ScheduleKind::kCosine}) {
    o.kind = kind;
    ASSERT_TRUE(ValidateSchedule(o).ok());
    SCOPED_TRACE(ScheduleKindName(kind));
    EXPECT_DOUBLE_EQ(LearningRate(o, 0), 0.1);
    EXPECT_DOUBLE_EQ(LearningRate(o, 4), 0.5);
    EXPECT_DOUBLE_EQ(LearningRate(o, 9), 1.0);
    EXPECT_DOUBLE_EQ(LearningRate(o, 10), 1.0);
  }
  o.kind = ScheduleKind::kConstant;
  EXPECT_DOUBLE_EQ(LearningRate(o, 110), 1.0);
  EXPECT_DOUBLE_EQ(LearningRate(o, 100000), 1.0);
  o.kind = ScheduleKind::kLinear;
  EXPECT_DOUBLE_EQ(LearningRate(o, 35), 0.775);
  EXPECT_DOUBLE_EQ(LearningRate(o, 60), 0.55);
  EXPECT_DOUBLE_EQ(LearningRate(o, 110), 0.1);
  EXPECT_DOUBLE_EQ(LearningRate(o, 5000), 0.1);
  o.kind = ScheduleKind::kCosine;
  EXPECT_NEAR(LearningRate(o, 35), 0.1 + 0.9 * 0.5 * (1 + std::sqrt(0.5)), 1e-12);
  EXPECT_NEAR(LearningRate(o, 60), 0.55, 1e-12);
  EXPECT_NEAR(LearningRate(o, 109), 0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * 0.99)), 1e-12);
  EXPECT_DOUBLE_EQ(LearningRate(o, 110), 0.1);
  EXPECT_DOUBLE_EQ(LearningRate(o, 5000), 0.1);
  o.warmup_steps = 0;
  EXPECT_DOUBLE_EQ(LearningRate(o, 0), 1.0);
  o.total_steps = 0;
  EXPECT_EQ(ValidateSchedule(o).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ScheduleKindFromName("cosine"), ScheduleKind::kCosine);
  EXPECT_EQ(ScheduleKindFromName("cosh"), std::nullopt);
}

// ---- clipping ---------------------------------------------------------------

TEST(Clipping, GlobalNormScalesEveryGradient) {
  OptimizerConfig config = PlainConfig(0.1, /*max_grad_norm=*/1.0);
  // Global norm over both tensors: sqrt(3² + 4² + 12²) = 13.
  Tensor w1 = F32({0, 0}, {2}), g1 = F32({3, 4}, {2});
  Tensor w2 = F32({0, 0, 0, 0}, {2, 2}), g2 = F32({12, 0, 0, 0}, {2, 2});
  auto opt = Optimizer::Create(config, {{"a.bias", w1, g1}, {"b.w", w2, g2}});
  ASSERT_TRUE(opt.ok()) << opt.status();
  auto stats = (*opt)->Step();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_DOUBLE_EQ(stats->grad_norm, 13.0);
  EXPECT_NEAR(stats->clip_scale, 1.0 / 13.0, 1e-15);
  // Both optimizers see the clipped gradient: their first moments say so.
  auto state = (*opt)->SaveState();
  EXPECT_NEAR(state.at("a.bias.adam_m").data<float>()[0], 0.1 * 3 / 13.0, 1e-7);
  EXPECT_NEAR(state.at("a.bias.adam_m").data<float>()[1], 0.1 * 4 / 13.0, 1e-7);
  EXPECT_NEAR(state.at("b.w.muon_momentum").data<float>()[0], 12 / 13.0, 1e-6);
  EXPECT_EQ(g1.data<float>()[0], 3.0f);  // gradients themselves untouched

  // Below the threshold nothing is scaled.
  SetValues(g1, {0.3f, 0.4f});
  SetValues(g2, {0, 0, 0, 0});
  stats = (*opt)->Step();
  ASSERT_TRUE(stats.ok());
  EXPECT_NEAR(stats->grad_norm, 0.5, 1e-7);
  EXPECT_EQ(stats->clip_scale, 1.0);
}

TEST(Clipping, NonFiniteGradientIsRefusedWithoutChanges) {
  Tensor w = F32({1, 2}, {2}), g = F32({NAN, 1}, {2});
  auto opt = Optimizer::Create(PlainConfig(0.1, 1.0), {{"x.bias", w, g}});
  ASSERT_TRUE(opt.ok());
  auto stats = (*opt)->Step();
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(Values(w), (std::vector<float>{1, 2}));
  EXPECT_EQ((*opt)->step(), 0);
}

// ---- groups -------------------------------------------------------------------

TEST(Groups, GlobMatch) {
  EXPECT_TRUE(GlobMatch("*embed*", "model.embed_tokens.weight"));
  EXPECT_TRUE(GlobMatch("*.head.weight", "model.head.weight"));
  EXPECT_FALSE(GlobMatch("*.head.weight", "model.hc_head.fn"));
  EXPECT_TRUE(GlobMatch("layers.?.w", "layers.7.w"));
  EXPECT_FALSE(GlobMatch("layers.?.w", "layers.17.w"));
  EXPECT_TRUE(GlobMatch("*", ""));
  EXPECT_TRUE(GlobMatch("a*b*c", "a.x.b.y.c"));
  EXPECT_FALSE(GlobMatch("a*b*c", "a.x.b.y.d"));
}

TEST(Groups, DefaultV4RulesAndOverrides) {
  auto p = [](const std::string& name, Shape shape) {
    return Parameter{name, Tensor::Zeros(DType::kF32, shape), Tensor::Zeros(DType::kF32, shape)};
  };
  std::vector<Parameter> params = {
      p("model.embed_tokens.weight", {11, 4}),
      p("lm_head.weight", {11, 4}),
      p("model.norm.weight", {4}),
      p("model.layers.0.self_attn.wq_a.weight", {6, 4}),
      p("model.layers.0.self_attn.compressor.ape", {4, 4}),
      p("model.layers.0.attn.attn_sink", {2}),
      p("model.layers.0.mlp.experts.w1", {3, 5, 4}),
      p("model.layers.0.mlp.gate.bias", {3}),
      p("model.layers.0.hc_attn_fn", {8, 4}),
  };
  auto opt = Optimizer::Create(PlainConfig(0.1), params);
  ASSERT_TRUE(opt.ok()) << opt.status();
  const std::pair<const char*, OptimizerKind> expect[] = {
      {"model.embed_tokens.weight", OptimizerKind::kAdamW},
      {"lm_head.weight", OptimizerKind::kAdamW},
      {"model.norm.weight", OptimizerKind::kAdamW},
      {"model.layers.0.self_attn.wq_a.weight", OptimizerKind::kMuon},
      {"model.layers.0.self_attn.compressor.ape", OptimizerKind::kAdamW},
      {"model.layers.0.attn.attn_sink", OptimizerKind::kAdamW},
      {"model.layers.0.mlp.experts.w1", OptimizerKind::kMuon},
      {"model.layers.0.mlp.gate.bias", OptimizerKind::kAdamW},
      {"model.layers.0.hc_attn_fn", OptimizerKind::kMuon},
  };
  for (auto [name, kind] : expect) EXPECT_EQ((*opt)->KindOf(name), kind) << name;

  // A rule sending a vector to Muon is a config error naming the parameter.
  OptimizerConfig bad = PlainConfig(0.1);
  bad.rules.insert(bad.rules.begin(), {"*.norm.weight", OptimizerKind::kMuon, 1.0, std::nullopt});
  auto err = Optimizer::Create(bad, {p("model.norm.weight", {4})});
  ASSERT_EQ(err.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(err.status().message()).find("model.norm.weight"), std::string::npos);

  // Per-group lr_scale and weight decay: a frozen group does not move.
  OptimizerConfig frozen = PlainConfig(0.1);
  frozen.rules.insert(frozen.rules.begin(), {"frozen.*", OptimizerKind::kAdamW, 0.0, 0.0f});
  Tensor w = F32({1, 2}, {2}), g = F32({1, 1}, {2});
  auto f = Optimizer::Create(frozen, {{"frozen.x", w, g}});
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE((*f)->Step().ok());
  EXPECT_EQ(Values(w), (std::vector<float>{1, 2}));

  // Shape mismatch between value and grad.
  auto mismatch =
      Optimizer::Create(PlainConfig(0.1), {{"w", F32({1, 2}, {2}), F32({1, 2, 3}, {3})}});
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kInvalidArgument);
}

// ---- state round trip --------------------------------------------------------

TEST(OptimizerState, RoundTripGivesIdenticalSubsequentSteps) {
  SCOPED_TRACE(testing::Message() << "seed=" << kSeed);
  std::mt19937 rng(kSeed + 6);
  struct Spec {
    std::string name;
    Shape shape;
  };
  const std::vector<Spec> specs = {{"model.embed_tokens.weight", {13, 8}},
                                   {"model.layers.0.attn.wq.weight", {8, 12}},
                                   {"model.layers.0.mlp.experts.w2", {3, 8, 5}},
                                   {"model.norm.weight", {8}}};
  auto make = [&](std::vector<Tensor>* grads, const std::vector<std::vector<float>>& init) {
    std::vector<Parameter> params;
    for (size_t i = 0; i < specs.size(); ++i) {
      params.push_back({specs[i].name, F32(init[i], specs[i].shape),
                        Tensor::Zeros(DType::kF32, specs[i].shape)});
      grads->push_back(params.back().grad);
    }
    return params;
  };
  std::vector<std::vector<float>> init;
  for (const Spec& s : specs) init.push_back(Gaussian(NumElements(s.shape), rng));
  OptimizerConfig config;
  config.schedule = {ScheduleKind::kCosine, 0.02, 0.002, 2, 10};
  config.max_grad_norm = 3.0;
  std::vector<Tensor> grads_a;
  std::vector<Parameter> params_a = make(&grads_a, init);
  auto a = Optimizer::Create(config, params_a);
  ASSERT_TRUE(a.ok()) << a.status();
  auto fill_grads = [&](std::vector<Tensor>& grads, uint32_t step) {
    std::mt19937 g_rng(kSeed * 31 + step);
    for (Tensor& g : grads) SetValues(g, Gaussian(g.numel(), g_rng));
  };
  for (uint32_t s = 0; s < 3; ++s) {
    fill_grads(grads_a, s);
    ASSERT_TRUE((*a)->Step().ok());
  }
  // "Checkpoint": the parameters and the optimizer state.
  std::map<std::string, Tensor> state = (*a)->SaveState();
  std::vector<std::vector<float>> saved;
  for (const Parameter& p : params_a) saved.push_back(Values(p.value));
  std::vector<Tensor> grads_b;
  std::vector<Parameter> params_b = make(&grads_b, saved);
  auto b = Optimizer::Create(config, params_b);
  ASSERT_TRUE(b.ok());
  ASSERT_TRUE((*b)->LoadState(state).ok());
  EXPECT_EQ((*b)->step(), 3);
  for (uint32_t s = 3; s < 6; ++s) {
    fill_grads(grads_a, s);
    fill_grads(grads_b, s);
    auto sa = (*a)->Step();
    auto sb = (*b)->Step();
    ASSERT_TRUE(sa.ok() && sb.ok());
    EXPECT_EQ(sa->lr, sb->lr);
    EXPECT_EQ(sa->grad_norm, sb->grad_norm);
  }
  for (size_t i = 0; i < params_a.size(); ++i) {
    EXPECT_EQ(Values(params_a[i].value), Values(params_b[i].value)) << specs[i].name;
  }

  // Bad state: missing, mis-shaped and foreign tensors are refused, untouched.
  auto missing = state;
  missing.erase("model.norm.weight.adam_v");
  EXPECT_EQ((*b)->LoadState(missing).code(), absl::StatusCode::kNotFound);
  auto misshaped = state;
  misshaped["model.norm.weight.adam_v"] = Tensor::Zeros(DType::kF32, {9});
  EXPECT_EQ((*b)->LoadState(misshaped).code(), absl::StatusCode::kInvalidArgument);
  auto foreign = state;
  foreign["model.other.adam_m"] = Tensor::Zeros(DType::kF32, {1});
  EXPECT_EQ((*b)->LoadState(foreign).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*b)->step(), 6);
}

}  // namespace
}  // namespace retort::optim
