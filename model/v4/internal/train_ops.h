// Internal to model/v4 and its tests: the per-component forward and
// backward functions of the CPU training path (train.cc), exposed so that
// tests/v4/backward_fd_test.cc can check each backward formula against
// finite differences on its own. Nothing outside model/v4 and tests includes
// this header; the public API is train.h.
//
// Conventions: row-major f32 buffers (Vec); "Fwd" fills a Saved struct with
// what the matching "Back" needs; every Back *accumulates* into its input
// gradient (dx, dX) and into the parameter gradients Ctx::G(name) keyed by
// transformers names, as train.cc's whole-model backward does.
// Thread-safety: pure functions; a Ctx belongs to one thread.
#ifndef RETORT_MODEL_V4_INTERNAL_TRAIN_OPS_H_
#define RETORT_MODEL_V4_INTERNAL_TRAIN_OPS_H_

#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "model/io/v4_config.h"
#include "model/kernels/cpu/cpu_kernels.h"
#include "model/v4/model.h"

namespace retort::v4::internal {

using Vec = std::vector<float>;

// Backward of y = x W^T: dx[T,in] += dy W, dW[out,in] += dy^T x (either may be null).
void Back(const float* W, int64_t out, int64_t in, const float* x, const float* dy, int64_t T,
          float* dx, float* dW);

// RMSNorm over rows of D: y = x * r * w (w null: no weight), r = rsqrt(mean(x^2) + eps) saved per
// row.
void NormFwd(const float* x, int64_t T, int64_t D, const float* w, float eps, float* y, float* r);
// dx += r*g - x r^3 (g.x)/D with g = dy*w; dw += dy * x * r (dw may be null).
void NormBack(const float* x, int64_t T, int64_t D, const float* w, const float* r, const float* dy,
              float* dx, float* dw);

class RopeTable {
 public:
  RopeTable(const std::vector<float>& inv_freq) : f_(inv_freq) {}
  // Rotates the trailing 2*|f| dims of `rows` vectors of width `dim` at `pos` (sign -1: inverse).
  void Apply(float* x, int64_t rows, int64_t dim, int64_t pos, float sign) const {
    float cs[512], sn[512];
    for (size_t i = 0; i < f_.size(); ++i) {
      const float a = f_[i] * static_cast<float>(pos);
      cs[i] = std::cos(a);
      sn[i] = std::sin(a);
    }
    cpu::ApplyRope(x, rows, dim, 2 * static_cast<int64_t>(f_.size()), cs, sn, sign);
  }

 private:
  const std::vector<float>& f_;
};

// ---- mHC (V4_SPEC.md §2.1) ---------------------------------------------------

struct HcSaved {
  Vec raw, inv, pre, post, comb;  // [T,mix], [T], [T,hc], [T,hc], [T,hc*hc]
  Vec zp, zq;                     // pre/post logits [T,hc]
  Vec sk;                         // Sinkhorn: per token the softmax E then each normalisation input
  int steps = 0;                  // normalisations per token
};

// Sinkhorn with every intermediate saved: out = (softmax rows + eps), then
// col, (row, col) x (iters-1). `saved` ([hc*hc * 2*iters]) receives E and the
// input of each normalisation step.
void SinkhornSaved(const float* logits, int hc, int iters, float eps, float* out, float* saved);
// d(out) -> d(logits) through all 2*iters - 1 normalisations and the softmax.
void SinkhornBack(const float* saved, int hc, int iters, float eps, const float* dout,
                  float* dlogits);

// The model (weights, RoPE tables), the config the functions read (may be a
// modified copy of the model's, e.g. another swiglu_limit), and the gradient
// map parameters accumulate into.
struct Ctx {
  const Model& m;
  const io::V4Config& c;
  std::map<std::string, Vec>& g;
  float balance_weight = 0.0f;  // Note [Sequence balance loss]; 0: off
  double balance_loss = 0.0;    // summed over sequences and layers
  Vec& G(const std::string& name, int64_t n) {
    auto& v = g[name];
    if (v.empty()) v.assign(n, 0.0f);
    return v;
  }
};

// Forward of one mHC instance over X [T, hc, d]: u = sum_j pre_j X_j.
void HcFwd(const Ctx& cx, const HyperConnection& h, const Vec& X, int64_t T, Vec& u, HcSaved& s);
// X' = post (x) F + comb^T X.
void HcMix(const Ctx& cx, const Vec& X, const Vec& F, const HcSaved& s, int64_t T, Vec& out);
// Backward of X' = post F + comb^T X and u = sum pre X through the maps (and
// Sinkhorn): dXo = d X', du = d u (from the sublayer). dX += d X; parameter
// gradients under `prefix` + {fn, base, scale}. d F = sum_k post_k dXo_k is
// the caller's.
void HcBack(Ctx& cx, const std::string& prefix, const HyperConnection& h, const Vec& X,
            const Vec& F, const HcSaved& s, int64_t T, const Vec& dXo, const Vec& du, Vec& dX);

struct HcHeadSaved {
  Vec raw, inv, wgt, z;  // [T, hc] mix, [T] rsqrt, [T, hc] weights, [T, hc] logits
};
// hc_head: y [T, d] = sum_j w_j X_j, w = sigmoid(mix * scale + base) + hc_eps.
void HcHeadFwd(const Ctx& cx, const HyperConnection& hh, const Vec& X, int64_t T, Vec& y,
               HcHeadSaved& s);
// dX += d X; gradients of model.hc_head.hc_{fn,base,scale}.
void HcHeadBack(Ctx& cx, const HyperConnection& hh, const Vec& X, int64_t T, const HcHeadSaved& s,
                const Vec& dy, Vec& dX);

// ---- attention (§2.2, §2.3) --------------------------------------------------

struct CompSaved {
  Vec kv, score;       // [T, w] raw rows (score includes ape)
  Vec sm;              // per entry, per channel, per candidate row: softmax weight [n, c, cand]
  Vec raw, normed, r;  // [n, c], [n, c], [n]
  Vec C;               // [n, c] after RoPE
  int64_t n = 0;
  int cand = 0;
};

// KV compressor over x [T, d] (CSA overlapping or HCA): T / m entries C [n, c]
// (softmax over candidates per channel, position bias, norm, RoPE at i*m).
void CompFwd(const Ctx& cx, const Compressor& k, const Vec& x, int64_t T, const RopeTable& rope,
             CompSaved& s);
// dC -> dx (+=) and `prefix` + {kv_proj.weight, gate_proj.weight, position_bias, kv_norm.weight}.
void CompBack(Ctx& cx, const std::string& prefix, const Compressor& k, const Vec& x, int64_t T,
              const RopeTable& rope, const CompSaved& s, const Vec& dC, Vec& dx);

struct AttnSaved {
  Vec qa, qa_r, qr, q, q_r, qrot, kvr, kv_r, k;
  CompSaved comp;
  std::vector<std::vector<int32_t>>
      keys;                    // per query: key ids (>= 0 window position, < 0: -1-entry)
  Vec p;                       // concatenated probabilities per (t, h, key)
  std::vector<int64_t> p_off;  // offset of query t's block in p (H * |keys[t]|)
  Vec psink;                   // [T, H]
  Vec o, orot, mid;
};

// Grouped output projection: out [T, d] = wo_b concat_g(wo_a[g] orot[:, g]);
// mid [T, g*d_g] is saved.
void OutProjFwd(const Ctx& cx, const Attention& a, const Vec& orot, int64_t T, Vec& mid, Vec& out);
// dout -> dorot (+=) and `prefix` + {o_a_proj.weight, o_b_proj.weight}.
void OutProjBack(Ctx& cx, const std::string& prefix, const Attention& a, const Vec& orot,
                 const Vec& mid, int64_t T, const Vec& dout, Vec& dorot);

// Attention of layer l over x [T, d] (the attn_norm output): window + sinks,
// HCA entries, or CSA entries `selected`[t] (the indexer's choice, no gradient).
void AttnFwd(const Ctx& cx, int l, const Vec& x, int64_t T,
             const std::vector<std::vector<int32_t>>* selected, AttnSaved& s, Vec& out);
// dout -> dx (+=) and every model.layers.l.self_attn.* gradient but the indexer's.
void AttnBack(Ctx& cx, int l, const Vec& x, int64_t T, const AttnSaved& s, const Vec& dout,
              Vec& dx);

// ---- MoE (§2.6) --------------------------------------------------------------

struct ExpertSaved {
  Vec g, u, act, y;  // [I], [I], [I], [d]
};

struct MoeSaved {
  Vec logits, scores;             // [T, E]
  std::vector<int64_t> idx;       // [T, K]
  Vec w;                          // [T, K]
  std::vector<ExpertSaved> slot;  // [T*K]
  std::vector<ExpertSaved> shared;
  // Sequence-wise balance loss (learned-routing layers, weight > 0):
  // bal_g[e] = d(balance loss)/d(normalised score of e) at every position.
  Vec bal_g;
  double balance_loss = 0.0;
};

// One SwiGLU expert on one token x [d]: y = w2(silu(min(g, L)) * clamp(u, -L, L)).
void ExpertFwd(const Ctx& cx, const Expert& ex, const float* x, ExpertSaved& s);
// dy: grad of the expert output (already weighted). Accumulates dx and the
// weight gradients dw1 [I, d], dw3 [I, d], dw2 [d, I] (the clamps pass no
// gradient where they bind).
void ExpertBack(Ctx& cx, const Expert& ex, const float* x, const ExpertSaved& s, const float* dy,
                float* dx, float* dw1, float* dw3, float* dw2);
// MoE of layer l over x [T, d]: sqrt-softplus scores, top-k (or hash, or
// `replay` [T, K] routes), normalised weights * routed_scaling_factor, the
// shared expert, and the sequence balance loss when cx.balance_weight > 0.
void MoeFwd(const Ctx& cx, int l, const Vec& x, const int64_t* tokens, int64_t T,
            const int32_t* replay, MoeSaved& s, Vec& out);
// dout -> dx (+=), the router weight (through the selected experts' scores
// and the balance loss), experts and shared expert.
void MoeBack(Ctx& cx, int l, const Vec& x, int64_t T, const MoeSaved& s, const Vec& dout, Vec& dx);

}  // namespace retort::v4::internal

#endif  // RETORT_MODEL_V4_INTERNAL_TRAIN_OPS_H_
