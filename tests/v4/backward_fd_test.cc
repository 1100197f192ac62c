// Finite-difference checks of every backward formula of the CPU training path
// (model/v4/internal/train_ops.h), one component at a time, on a tiny random
// V4 model with odd sizes (d 9, head_dim 10 with 4 rotary dims, 3 heads in 3
// output groups, q rank 7, hc 3, 5 experts of width 7, window 3, HCA m = 3,
// CSA m = 4) and odd sequence lengths.
//
// Each check takes L = sum_i r_i out_i (+ the balance loss for the MoE) for a
// fixed random r, runs the component's backward with d out = r, and compares
// every input and parameter gradient with central differences
// (L(x + h) - L(x - h)) / 2h, h = 1e-2 * max(1, |x|) (fp32 code: the step
// balances the O(h^2) truncation against the fp32 rounding of L, ~1e-7 |L| / h).
// Bound: max_i |fd_i - an_i| / max(max_i |an_i|, 1e-3) <= 2e-3 per tensor (the
// worst seen at this seed is 3.1e-4, attention dq_a_proj).
// A failure prints the seed, the tensor and its worst element.
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "model/base/logging.h"
#include "model/io/safetensors.h"
#include "model/v4/internal/train_ops.h"
#include "model/v4/model.h"

namespace retort::v4::internal {
namespace {

constexpr uint64_t kSeed = 20260611;
constexpr double kBound = 2e-3;

std::vector<float> Random(std::mt19937_64& rng, int64_t n, float scale, float mean = 0.0f) {
  std::normal_distribution<float> dist(mean, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

double Dot(const Vec& a, const Vec& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

// The tiny model: layer 0 sliding window with hash routing, layer 1 HCA
// (m = 3), layer 2 CSA (m = 4, lightning indexer), learned routing in 1 and 2.
struct TinyModel {
  io::V4Config cfg;
  io::TensorMap map{"tiny random V4"};
  std::map<std::string, Tensor> tensors;  // the model views these: perturb in place
  std::unique_ptr<Model> model;

  float* Data(const std::string& name) { return tensors.at(name).mutable_data<float>(); }
  int64_t Size(const std::string& name) const { return tensors.at(name).numel(); }
};

std::unique_ptr<TinyModel> MakeTinyModel(std::mt19937_64& rng) {
  auto tm = std::make_unique<TinyModel>();
  io::V4Config& c = tm->cfg;
  c.vocab_size = 11;
  c.hidden_size = 9;
  c.num_layers = 3;
  c.num_heads = 3;
  c.head_dim = 10;
  c.rope_dim = 4;
  c.q_lora_rank = 7;
  c.o_groups = 3;
  c.o_lora_rank = 5;
  c.n_routed_experts = 5;
  c.n_shared_experts = 1;
  c.experts_per_token = 2;
  c.moe_intermediate = 7;
  c.routed_scaling_factor = 1.5;
  c.swiglu_limit = 0;  // no clamp unless a test asks for one
  c.sliding_window = 3;
  c.index_n_heads = 2;
  c.index_head_dim = 6;
  c.index_topk = 2;
  c.hc_mult = 3;
  c.hc_sinkhorn_iters = 20;
  c.main_rope.theta = 10000;
  c.compress_rope = {160000, true, 4.0, 16, 32, 1};
  c.attention = {io::AttentionKind::kSliding, io::AttentionKind::kHca, io::AttentionKind::kCsa};
  c.compress_ratio = {0, 3, 4};
  c.hash_routed = {true, false, false};
  c.max_position_embeddings = 64;
  const int64_t d = c.hidden_size, D = c.head_dim, H = c.num_heads, hc = c.hc_mult;
  const int64_t mix = (2 + hc) * hc, E = c.n_routed_experts, I = c.moe_intermediate;
  auto add = [&](const std::string& name, Shape shape, float scale, float mean = 0.0f) {
    Tensor t = Tensor::FromF32(Random(rng, NumElements(shape), scale, mean), shape);
    tm->tensors[name] = t;
    tm->map.Add(name, t);
  };
  auto linear = [&](const std::string& name, int64_t out, int64_t in) {
    add(name, {out, in}, 1.0f / std::sqrt(static_cast<float>(in)));
  };
  auto comp = [&](const std::string& p, int64_t m, int64_t dim, bool overlap) {
    const int64_t w = (overlap ? 2 : 1) * dim;
    linear(p + "kv_proj.weight", w, d);
    linear(p + "gate_proj.weight", w, d);
    add(p + "position_bias", {m, w}, 0.5f);
    add(p + "kv_norm.weight", {dim}, 0.1f, 1.0f);
  };
  add("model.embed_tokens.weight", {c.vocab_size, d}, 1.0f);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const char* h : {"attn_hc.", "ffn_hc."}) {
      add(p + h + "fn", {mix, hc * d}, 0.3f);
      add(p + h + "base", {mix}, 0.5f);
      add(p + h + "scale", {3}, 0.2f, 0.8f);
    }
    add(p + "input_layernorm.weight", {d}, 0.1f, 1.0f);
    add(p + "post_attention_layernorm.weight", {d}, 0.1f, 1.0f);
    const std::string a = p + "self_attn.";
    linear(a + "q_a_proj.weight", c.q_lora_rank, d);
    add(a + "q_a_norm.weight", {c.q_lora_rank}, 0.1f, 1.0f);
    linear(a + "q_b_proj.weight", H * D, c.q_lora_rank);
    linear(a + "kv_proj.weight", D, d);
    add(a + "kv_norm.weight", {D}, 0.1f, 1.0f);
    linear(a + "o_a_proj.weight", c.o_groups * c.o_lora_rank, H * D / c.o_groups);
    linear(a + "o_b_proj.weight", d, c.o_groups * c.o_lora_rank);
    add(a + "sinks", {H}, 1.0f);
    if (c.attention[l] != io::AttentionKind::kSliding) {
      const bool csa = c.attention[l] == io::AttentionKind::kCsa;
      comp(a + "compressor.", c.compress_ratio[l], D, csa);
      if (csa) {
        const std::string ix = a + "compressor.indexer.";
        linear(ix + "q_b_proj.weight", c.index_n_heads * c.index_head_dim, c.q_lora_rank);
        linear(ix + "scorer.weights_proj.weight", c.index_n_heads, d);
        comp(ix, 4, c.index_head_dim, true);
      }
    }
    const std::string f = p + "mlp.";
    linear(f + "gate.weight", E, d);
    if (c.hash_routed[l]) {
      std::vector<int64_t> tid(c.vocab_size * c.experts_per_token);
      for (int64_t v = 0; v < c.vocab_size; ++v)
        for (int k = 0; k < c.experts_per_token; ++k)
          tid[v * c.experts_per_token + k] = (v + k) % E;
      Tensor t = Tensor::FromI64(tid, {c.vocab_size, c.experts_per_token});
      tm->map.Add(f + "gate.tid2eid", t);
    } else {
      add(f + "gate.e_score_correction_bias", {E}, 0.1f);
    }
    add(f + "experts.gate_up_proj", {E, 2 * I, d}, 1.0f / 3.0f);
    add(f + "experts.down_proj", {E, d, I}, 1.0f / std::sqrt(7.0f));
    linear(f + "shared_experts.gate_proj.weight", I, d);
    linear(f + "shared_experts.up_proj.weight", I, d);
    linear(f + "shared_experts.down_proj.weight", d, I);
  }
  add("model.hc_head.hc_fn", {hc, hc * d}, 0.3f);
  add("model.hc_head.hc_base", {hc}, 0.5f);
  add("model.hc_head.hc_scale", {1}, 0.2f, 0.8f);
  add("model.norm.weight", {d}, 0.1f, 1.0f);
  add("lm_head.weight", {c.vocab_size, d}, 0.3f);
  auto model = Model::FromTensors(c, tm->map);
  CHECK(model.ok()) << model.status();
  tm->model = std::move(model).value();
  return tm;
}

// Compares `analytic` (d L / d x) with central differences of `loss` over
// every element of x[0..n). Returns the worst relative error.
double CheckGradient(const std::string& what, float* x, int64_t n, const Vec& analytic,
                     const std::function<double()>& loss) {
  EXPECT_EQ(static_cast<int64_t>(analytic.size()), n) << what;
  if (static_cast<int64_t>(analytic.size()) != n) return INFINITY;
  Vec fd(n);
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float h = 1e-2f * std::max(1.0f, std::fabs(v));
    x[i] = v + h;
    const float up = x[i];
    const double lp = loss();
    x[i] = v - h;
    const float down = x[i];
    const double lm = loss();
    x[i] = v;
    fd[i] = static_cast<float>((lp - lm) / (static_cast<double>(up) - down));
  }
  double scale = 1e-3, worst = 0;
  int64_t at = 0;
  for (int64_t i = 0; i < n; ++i)
    scale = std::max(scale, static_cast<double>(std::fabs(analytic[i])));
  for (int64_t i = 0; i < n; ++i) {
    const double e = std::fabs(static_cast<double>(fd[i]) - analytic[i]) / scale;
    if (e > worst) {
      worst = e;
      at = i;
    }
  }
  EXPECT_LE(worst, kBound) << "seed " << kSeed << ": " << what << " worst element " << at << " of "
                           << n << ": finite difference " << fd[at] << ", backward " << analytic[at]
                           << " (scale " << scale << ")";
  std::printf("  %-48s n=%-5lld worst rel err %.2e (element %lld)\n", what.c_str(),
              static_cast<long long>(n), worst, static_cast<long long>(at));
  return worst;
}

class BackwardFdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    rng_.seed(kSeed);
    tiny_ = MakeTinyModel(rng_);
  }
  const io::V4Config& cfg() const { return tiny_->cfg; }
  Ctx MakeCtx(const io::V4Config& c) { return Ctx{*tiny_->model, c, grads_}; }
  Vec& Grad(const std::string& name) { return grads_[name]; }

  std::mt19937_64 rng_;
  std::unique_ptr<TinyModel> tiny_;
  std::map<std::string, Vec> grads_;
};

TEST_F(BackwardFdTest, RmsNormWeightedAndUnweighted) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  for (const bool weighted : {true, false})
    for (const int64_t T : {1, 3}) {
      const int64_t D = 7;
      Vec x = Random(rng_, T * D, 1.5f), w = Random(rng_, D, 0.3f, 1.0f),
          r = Random(rng_, T * D, 1.0f);
      const float* wp = weighted ? w.data() : nullptr;
      auto loss = [&] {
        Vec y(T * D), rs(T);
        NormFwd(x.data(), T, D, wp, 1e-6f, y.data(), rs.data());
        return Dot(y, r);
      };
      Vec y(T * D), rs(T), dx(T * D, 0.0f), dw(D, 0.0f);
      NormFwd(x.data(), T, D, wp, 1e-6f, y.data(), rs.data());
      NormBack(x.data(), T, D, wp, rs.data(), r.data(), dx.data(), weighted ? dw.data() : nullptr);
      const std::string tag =
          std::string(weighted ? "weighted" : "unweighted") + " T=" + std::to_string(T);
      CheckGradient("rmsnorm " + tag + " dx", x.data(), T * D, dx, loss);
      if (weighted) CheckGradient("rmsnorm " + tag + " dw", w.data(), D, dw, loss);
    }
}

TEST_F(BackwardFdTest, SinkhornAllTwentyIterations) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  for (const int hc : {3, 4}) {
    const int iters = 20, n = hc * hc;
    Vec logits = Random(rng_, n, 1.0f), r = Random(rng_, n, 1.0f);
    Vec out(n), saved(n * 2 * iters);
    auto loss = [&] {
      SinkhornSaved(logits.data(), hc, iters, 1e-6f, out.data(), saved.data());
      return Dot(out, r);
    };
    loss();
    Vec dlogits(n, 0.0f);
    SinkhornBack(saved.data(), hc, iters, 1e-6f, r.data(), dlogits.data());
    CheckGradient("sinkhorn hc=" + std::to_string(hc) + " dlogits", logits.data(), n, dlogits,
                  loss);
  }
}

TEST_F(BackwardFdTest, MhcPreAndPostMaps) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int hc = cfg().hc_mult;
  const int64_t d = cfg().hidden_size, T = 3;
  Ctx cx = MakeCtx(cfg());
  const HyperConnection& h = tiny_->model->weights().layers[1].ffn_hc;
  Vec X = Random(rng_, T * hc * d, 1.0f), F = Random(rng_, T * d, 1.0f);
  Vec r1 = Random(rng_, T * hc * d, 1.0f), r2 = Random(rng_, T * d, 1.0f);
  auto loss = [&] {
    Vec u, Xo;
    HcSaved s;
    HcFwd(cx, h, X, T, u, s);
    HcMix(cx, X, F, s, T, Xo);
    return Dot(Xo, r1) + Dot(u, r2);
  };
  Vec u, Xo, dX(T * hc * d, 0.0f);
  HcSaved s;
  HcFwd(cx, h, X, T, u, s);
  HcMix(cx, X, F, s, T, Xo);
  HcBack(cx, "hc.", h, X, F, s, T, r1, r2, dX);
  Vec dF(T * d, 0.0f);  // the caller's part: dF = sum_k post_k dX'_k
  for (int64_t t = 0; t < T; ++t)
    for (int k = 0; k < hc; ++k)
      for (int64_t i = 0; i < d; ++i)
        dF[t * d + i] += s.post[t * hc + k] * r1[(t * hc + k) * d + i];
  CheckGradient("mhc dX", X.data(), X.size(), dX, loss);
  CheckGradient("mhc dF", F.data(), F.size(), dF, loss);
  const std::string p = "model.layers.1.ffn_hc.";
  for (const char* n : {"fn", "base", "scale"})
    CheckGradient(std::string("mhc d") + n, tiny_->Data(p + n), tiny_->Size(p + n),
                  Grad(std::string("hc.") + n), loss);
}

TEST_F(BackwardFdTest, HcHead) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int hc = cfg().hc_mult;
  const int64_t d = cfg().hidden_size;
  for (const int64_t T : {1, 3}) {
    grads_.clear();
    Ctx cx = MakeCtx(cfg());
    const HyperConnection& hh = tiny_->model->weights().hc_head;
    Vec X = Random(rng_, T * hc * d, 1.0f), r = Random(rng_, T * d, 1.0f);
    auto loss = [&] {
      Vec y;
      HcHeadSaved s;
      HcHeadFwd(cx, hh, X, T, y, s);
      return Dot(y, r);
    };
    Vec y, dX(T * hc * d, 0.0f);
    HcHeadSaved s;
    HcHeadFwd(cx, hh, X, T, y, s);
    HcHeadBack(cx, hh, X, T, s, r, dX);
    const std::string tag = "hc_head T=" + std::to_string(T);
    CheckGradient(tag + " dX", X.data(), X.size(), dX, loss);
    for (const char* n : {"hc_fn", "hc_base", "hc_scale"}) {
      const std::string name = std::string("model.hc_head.") + n;
      CheckGradient(tag + " d" + n, tiny_->Data(name), tiny_->Size(name), Grad(name), loss);
    }
  }
}

// CSA (overlapping, m = 4: two series over 8 tokens, stride 4) and HCA
// (m = 3): T leaves an uncompressed tail in both.
TEST_F(BackwardFdTest, CompressorCsaOverlappingAndHca) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int64_t d = cfg().hidden_size;
  for (const int layer : {2, 1}) {
    grads_.clear();
    Ctx cx = MakeCtx(cfg());
    const Compressor& k = tiny_->model->weights().layers[layer].attn.compressor;
    const RopeTable rope(tiny_->model->inv_freq(1));
    const int64_t T = layer == 2 ? 11 : 7;
    Vec x = Random(rng_, T * d, 1.0f);
    CompSaved s;
    CompFwd(cx, k, x, T, rope, s);
    ASSERT_EQ(s.n, 2) << "two entries";
    Vec r = Random(rng_, s.C.size(), 1.0f);
    auto loss = [&] {
      CompSaved t;
      CompFwd(cx, k, x, T, rope, t);
      return Dot(t.C, r);
    };
    Vec dx(T * d, 0.0f);
    CompBack(cx, "comp.", k, x, T, rope, s, r, dx);
    const std::string tag = layer == 2 ? "compressor CSA m=4" : "compressor HCA m=3";
    CheckGradient(tag + " dx", x.data(), x.size(), dx, loss);
    const std::string p = "model.layers." + std::to_string(layer) + ".self_attn.compressor.";
    for (const char* n : {"kv_proj.weight", "gate_proj.weight", "position_bias", "kv_norm.weight"})
      CheckGradient(tag + " d" + n, tiny_->Data(p + n), tiny_->Size(p + n),
                    Grad(std::string("comp.") + n), loss);
  }
}

TEST_F(BackwardFdTest, GroupedOutputProjection) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int64_t T = 3, HD = cfg().num_heads * cfg().head_dim;
  Ctx cx = MakeCtx(cfg());
  const Attention& a = tiny_->model->weights().layers[0].attn;
  Vec orot = Random(rng_, T * HD, 1.0f), r = Random(rng_, T * cfg().hidden_size, 1.0f);
  auto loss = [&] {
    Vec mid, out;
    OutProjFwd(cx, a, orot, T, mid, out);
    return Dot(out, r);
  };
  Vec mid, out, dorot(T * HD, 0.0f);
  OutProjFwd(cx, a, orot, T, mid, out);
  OutProjBack(cx, "o.", a, orot, mid, T, r, dorot);
  CheckGradient("out-proj dorot", orot.data(), orot.size(), dorot, loss);
  for (const char* n : {"o_a_proj.weight", "o_b_proj.weight"})
    CheckGradient(std::string("out-proj d") + n,
                  tiny_->Data(std::string("model.layers.0.self_attn.") + n),
                  tiny_->Size(std::string("model.layers.0.self_attn.") + n),
                  Grad(std::string("o.") + n), loss);
}

// Sliding window + sinks (layer 0), + all visible HCA entries (layer 1), +
// indexer-chosen CSA entries (layer 2; the selection is an input: top-k has
// no gradient). Every self_attn parameter but the indexer's is checked.
TEST_F(BackwardFdTest, AttentionWindowSinksAndCompressedEntries) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int64_t d = cfg().hidden_size;
  for (const int layer : {0, 1, 2}) {
    const int64_t T = layer == 0 ? 7 : 9;
    grads_.clear();
    Ctx cx = MakeCtx(cfg());
    // CSA: query t sees entries e with (e + 1) * 4 <= t + 1; pick the last two visible.
    std::vector<std::vector<int32_t>> selected(T);
    for (int64_t t = 0; t < T; ++t) {
      const int32_t visible = static_cast<int32_t>((t + 1) / 4);
      for (int32_t e = std::max(0, visible - 2); e < visible; ++e) selected[t].push_back(e);
    }
    Vec x = Random(rng_, T * d, 1.0f), r = Random(rng_, T * d, 1.0f);
    auto loss = [&] {
      AttnSaved s;
      Vec out;
      AttnFwd(cx, layer, x, T, &selected, s, out);
      return Dot(out, r);
    };
    AttnSaved s;
    Vec out, dx(T * d, 0.0f);
    AttnFwd(cx, layer, x, T, &selected, s, out);
    AttnBack(cx, layer, x, T, s, r, dx);
    const std::string tag = std::string("attention ") + (layer == 0   ? "window"
                                                         : layer == 1 ? "HCA"
                                                                      : "CSA");
    CheckGradient(tag + " dx", x.data(), x.size(), dx, loss);
    const std::string p = "model.layers." + std::to_string(layer) + ".self_attn.";
    int checked = 0;
    for (const auto& [name, g] : grads_) {
      ASSERT_EQ(name.rfind(p, 0), 0u) << name;
      ASSERT_EQ(name.find("indexer"), std::string::npos) << name;
      CheckGradient(tag + " d" + name.substr(p.size()), tiny_->Data(name), tiny_->Size(name), g,
                    loss);
      ++checked;
    }
    EXPECT_EQ(checked, layer == 0 ? 8 : 12) << "every attention parameter has a gradient";
  }
}

// One SwiGLU expert with both clamps binding on some elements: the limit is
// placed in the widest gap of the activations so that no element sits within
// `margin` of a kink, and the finite-difference steps cannot cross one.
TEST_F(BackwardFdTest, ExpertSwiGluClampsAwayFromTheKinks) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int64_t d = cfg().hidden_size, I = cfg().moe_intermediate;
  const Expert& ex = tiny_->model->weights().layers[1].moe.shared;
  Vec x = Random(rng_, d, 1.5f);
  Vec g(I), u(I);
  ex.w1.Apply(x.data(), 1, g.data());
  ex.w3.Apply(x.data(), 1, u.data());
  double best_margin = 0, limit = 0;
  for (double L = 0.05; L < 5; L += 0.005) {
    int g_over = 0, u_over = 0;
    double margin = INFINITY;
    for (int64_t i = 0; i < I; ++i) {
      g_over += g[i] > L;
      u_over += std::fabs(u[i]) > L;
      margin = std::min({margin, std::fabs(g[i] - L), std::fabs(std::fabs(u[i]) - L)});
    }
    if (g_over > 0 && g_over < I && u_over > 0 && u_over < I && margin > best_margin) {
      best_margin = margin;
      limit = L;
    }
  }
  ASSERT_GT(best_margin, 0.08) << "no clamp limit with both clamps binding away from the kinks";
  io::V4Config c = cfg();
  c.swiglu_limit = limit;
  Ctx cx = MakeCtx(c);
  std::printf("  swiglu_limit %.3f, nearest activation %.3f away\n", limit, best_margin);
  Vec r = Random(rng_, d, 1.0f);
  auto loss = [&] {
    ExpertSaved s;
    ExpertFwd(cx, ex, x.data(), s);
    return Dot(s.y, r);
  };
  ExpertSaved s;
  ExpertFwd(cx, ex, x.data(), s);
  Vec dx(d, 0.0f), dw1(I * d, 0.0f), dw3(I * d, 0.0f), dw2(d * I, 0.0f);
  ExpertBack(cx, ex, x.data(), s, r.data(), dx.data(), dw1.data(), dw3.data(), dw2.data());
  CheckGradient("expert dx", x.data(), d, dx, loss);
  const std::string p = "model.layers.1.mlp.shared_experts.";
  CheckGradient("expert dw1 (gate)", tiny_->Data(p + "gate_proj.weight"), I * d, dw1, loss);
  CheckGradient("expert dw3 (up)", tiny_->Data(p + "up_proj.weight"), I * d, dw3, loss);
  CheckGradient("expert dw2 (down)", tiny_->Data(p + "down_proj.weight"), d * I, dw2, loss);
}

// The MoE of a learned-routing layer: router weights through sqrt-softplus
// scores of the selected experts, normalisation, routed_scaling_factor, the
// sequence balance loss, the routed experts and the shared expert. Replayed
// routes keep the selection fixed (top-k itself has no gradient); a second
// case routes by top-k at a point where the perturbations flip no selection.
TEST_F(BackwardFdTest, MoeRouterThroughSqrtSoftplus) {
  SCOPED_TRACE(::testing::Message() << "seed " << kSeed);
  const int64_t d = cfg().hidden_size, T = 5, E = cfg().n_routed_experts;
  const int K = cfg().experts_per_token;
  for (const bool replay : {true, false}) {
    grads_.clear();
    Ctx cx = MakeCtx(cfg());
    cx.balance_weight = 0.1f;
    std::vector<int32_t> routes(T * K);
    for (int64_t t = 0; t < T; ++t)
      for (int k = 0; k < K; ++k) routes[t * K + k] = static_cast<int32_t>((3 * t + 2 * k) % E);
    const std::vector<int64_t> tokens = {1, 4, 2, 9, 7};
    Vec x = Random(rng_, T * d, 1.0f), r = Random(rng_, T * d, 1.0f);
    const int32_t* rp = replay ? routes.data() : nullptr;
    MoeSaved base;
    Vec out, dx(T * d, 0.0f);
    MoeFwd(cx, 2, x, tokens.data(), T, rp, base, out);
    bool flipped = false;
    auto loss = [&] {
      MoeSaved s;
      Vec o;
      MoeFwd(cx, 2, x, tokens.data(), T, rp, s, o);
      flipped |= s.idx != base.idx;
      return Dot(o, r) + s.balance_loss;
    };
    MoeBack(cx, 2, x, T, base, r, dx);
    const std::string tag = replay ? "moe (replayed routes)" : "moe (top-k)";
    EXPECT_GT(base.balance_loss, 0.0);
    CheckGradient(tag + " dx", x.data(), x.size(), dx, loss);
    const std::string p = "model.layers.2.mlp.";
    for (const char* n : {"gate.weight", "experts.gate_up_proj", "experts.down_proj",
                          "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
                          "shared_experts.down_proj.weight"})
      CheckGradient(tag + " d" + n, tiny_->Data(p + n), tiny_->Size(p + n), Grad(p + n), loss);
    EXPECT_FALSE(flipped)
        << "a finite-difference step changed the top-k selection: pick another point";
  }
}

}  // namespace
}  // namespace retort::v4::internal
