// NextTokenLossAndGradients: a training forward that keeps each layer's
// activations, then the backward of every V4 component (see train.h).
// Notation follows model.cc; "d" prefixes a gradient. The per-component
// functions are declared in internal/train_ops.h (for the finite-difference
// tests); SequenceLossAndGrads chains them for one sequence.
#include "model/v4/train.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "model/base/logging.h"
#include "model/base/status_macros.h"
#include "model/kernels/cpu/cpu_kernels.h"
#include "model/v4/internal/train_ops.h"

namespace retort::v4 {
namespace internal {

using io::AttentionKind;

// y[T,out] = x[T,in] W^T.
void Fwd(const Linear& l, const float* x, int64_t T, float* y) { l.Apply(x, T, y); }

// Backward of y = x W^T: dx[T,in] += dy W, dW[out,in] += dy^T x (either may be null).
void Back(const float* W, int64_t out, int64_t in, const float* x, const float* dy, int64_t T, float* dx,
          float* dW) {
  if (T == 0) return;
  if (dx) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, in, out, 1.0f, dy, out, W, in, 1.0f, dx, in);
  if (dW) cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, T, 1.0f, dy, out, x, in, 1.0f, dW, in);
}

// y = x * r * w with r = rsqrt(mean(x^2) + eps); saves r.
void NormFwd(const float* x, int64_t T, int64_t D, const float* w, float eps, float* y, float* r) {
  for (int64_t t = 0; t < T; ++t) {
    float ss = 0.0f;
    for (int64_t i = 0; i < D; ++i) ss += x[t * D + i] * x[t * D + i];
    r[t] = 1.0f / std::sqrt(ss / D + eps);
    for (int64_t i = 0; i < D; ++i) y[t * D + i] = (w ? w[i] : 1.0f) * (x[t * D + i] * r[t]);
  }
}

// dx += r*g - x r^3 (g.x)/D with g = dy*w; dw += dy * x * r.
void NormBack(const float* x, int64_t T, int64_t D, const float* w, const float* r, const float* dy, float* dx,
              float* dw) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * D;
    const float* gt = dy + t * D;
    float dot = 0.0f;
    for (int64_t i = 0; i < D; ++i) dot += gt[i] * (w ? w[i] : 1.0f) * xt[i];
    const float rt = r[t], c = rt * rt * rt * dot / D;
    for (int64_t i = 0; i < D; ++i) {
      dx[t * D + i] += rt * gt[i] * (w ? w[i] : 1.0f) - c * xt[i];
      if (dw) dw[i] += gt[i] * xt[i] * rt;
    }
  }
}


// ---- mHC -------------------------------------------------------------------


// Sinkhorn with every intermediate saved: out = (softmax rows + eps), then
// col, (row, col) x (iters-1). `saved` receives E and the input of each step.
void SinkhornSaved(const float* logits, int hc, int iters, float eps, float* out, float* saved) {
  const int n = hc * hc;
  for (int i = 0; i < hc; ++i) {
    float mx = logits[i * hc];
    for (int j = 1; j < hc; ++j) mx = std::max(mx, logits[i * hc + j]);
    float sum = 0.0f;
    for (int j = 0; j < hc; ++j) sum += (out[i * hc + j] = std::exp(logits[i * hc + j] - mx));
    for (int j = 0; j < hc; ++j) out[i * hc + j] /= sum;
  }
  std::copy(out, out + n, saved);  // E
  for (int k = 0; k < n; ++k) out[k] += eps;
  int step = 0;
  auto norm = [&](bool rows) {
    std::copy(out, out + n, saved + n * (1 + step++));
    for (int a = 0; a < hc; ++a) {
      float s = 0.0f;
      for (int b = 0; b < hc; ++b) s += rows ? out[a * hc + b] : out[b * hc + a];
      for (int b = 0; b < hc; ++b) (rows ? out[a * hc + b] : out[b * hc + a]) /= (s + eps);
    }
  };
  norm(false);
  for (int it = 1; it < iters; ++it) {
    norm(true);
    norm(false);
  }
}

// d(comb) -> d(logits), walking the saved steps backwards.
void SinkhornBack(const float* saved, int hc, int iters, float eps, const float* dout, float* dlogits) {
  const int n = hc * hc, steps = 2 * iters - 1;
  Vec g(dout, dout + n), ga(n);
  for (int st = steps - 1; st >= 0; --st) {
    const bool rows = st % 2 == 1;  // step 0 is a column normalisation, then row, col, ...
    const float* A = saved + n * (1 + st);
    for (int a = 0; a < hc; ++a) {
      float s = 0.0f, gdot = 0.0f;
      for (int b = 0; b < hc; ++b) {
        const int k = rows ? a * hc + b : b * hc + a;
        s += A[k];
        gdot += g[k] * A[k];
      }
      const float inv = 1.0f / (s + eps);
      for (int b = 0; b < hc; ++b) {
        const int k = rows ? a * hc + b : b * hc + a;
        ga[k] = g[k] * inv - gdot * inv * inv;
      }
    }
    g = ga;
  }
  const float* E = saved;  // softmax rows; the +eps passes the gradient unchanged
  for (int i = 0; i < hc; ++i) {
    float dot = 0.0f;
    for (int j = 0; j < hc; ++j) dot += g[i * hc + j] * E[i * hc + j];
    for (int j = 0; j < hc; ++j) dlogits[i * hc + j] = E[i * hc + j] * (g[i * hc + j] - dot);
  }
}


// Forward of one mHC instance over [T, hc, d]: u = sum pre_j X_j.
void HcFwd(const Ctx& cx, const HyperConnection& h, const Vec& X, int64_t T, Vec& u, HcSaved& s) {
  const int hc = cx.c.hc_mult, mix = (2 + hc) * hc;
  const int64_t d = cx.c.hidden_size, W = hc * d;
  const float eps = static_cast<float>(cx.c.hc_eps), neps = static_cast<float>(cx.c.rms_norm_eps);
  s.raw.resize(T * mix);
  cpu::MatMul(X.data(), T, W, h.fn.data<float>(), mix, s.raw.data());
  s.inv.resize(T);
  s.pre.resize(T * hc);
  s.post.resize(T * hc);
  s.zp.resize(T * hc);
  s.zq.resize(T * hc);
  s.comb.resize(T * hc * hc);
  s.steps = 2 * cx.c.hc_sinkhorn_iters - 1;
  s.sk.resize(T * hc * hc * (1 + s.steps));
  u.assign(T * d, 0.0f);
  const float* base = h.base.data<float>();
  const float* sc = h.scale.data<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = X.data() + t * W;
    float ss = 0.0f;
    for (int64_t i = 0; i < W; ++i) ss += xt[i] * xt[i];
    const float inv = s.inv[t] = 1.0f / std::sqrt(ss / W + neps);
    const float* r = s.raw.data() + t * mix;
    float zc[64];
    for (int j = 0; j < hc; ++j) {
      s.zp[t * hc + j] = r[j] * inv * sc[0] + base[j];
      s.pre[t * hc + j] = cpu::Sigmoid(s.zp[t * hc + j]) + eps;
      s.zq[t * hc + j] = r[hc + j] * inv * sc[1] + base[hc + j];
      s.post[t * hc + j] = 2.0f * cpu::Sigmoid(s.zq[t * hc + j]);
    }
    for (int k = 0; k < hc * hc; ++k) zc[k] = r[2 * hc + k] * inv * sc[2] + base[2 * hc + k];
    SinkhornSaved(zc, hc, cx.c.hc_sinkhorn_iters, eps, s.comb.data() + t * hc * hc,
                  s.sk.data() + t * hc * hc * (1 + s.steps));
    for (int j = 0; j < hc; ++j)
      for (int64_t i = 0; i < d; ++i) u[t * d + i] += s.pre[t * hc + j] * xt[j * d + i];
  }
}

// X' = post (x) F + comb^T X.
void HcMix(const Ctx& cx, const Vec& X, const Vec& F, const HcSaved& s, int64_t T, Vec& out) {
  const int hc = cx.c.hc_mult;
  const int64_t d = cx.c.hidden_size;
  out.assign(T * hc * d, 0.0f);
  for (int64_t t = 0; t < T; ++t)
    for (int k = 0; k < hc; ++k) {
      float* o = out.data() + (t * hc + k) * d;
      for (int64_t i = 0; i < d; ++i) o[i] = s.post[t * hc + k] * F[t * d + i];
      for (int j = 0; j < hc; ++j) {
        const float cjk = s.comb[t * hc * hc + j * hc + k];
        const float* xj = X.data() + (t * hc + j) * d;
        for (int64_t i = 0; i < d; ++i) o[i] += cjk * xj[i];
      }
    }
}

// Backward of X' = post F + comb^T X and u = sum pre X through the maps.
// In: dXo (grad of X'), du (grad of u, from the sublayer). Out: dX (+=), dF.
void HcBack(Ctx& cx, const std::string& prefix, const HyperConnection& h, const Vec& X, const Vec& F,
            const HcSaved& s, int64_t T, const Vec& dXo, const Vec& du, Vec& dX) {
  const int hc = cx.c.hc_mult, mix = (2 + hc) * hc;
  const int64_t d = cx.c.hidden_size, W = hc * d;
  const float eps = static_cast<float>(cx.c.hc_eps);
  const float* sc = h.scale.data<float>();
  Vec& dfn = cx.G(prefix + "fn", mix * W);
  Vec& dbase = cx.G(prefix + "base", mix);
  Vec& dscale = cx.G(prefix + "scale", 3);
  Vec dmi(T * mix);  // dm * inv, for dfn and dX
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = X.data() + t * W;
    float dpost[16], dpre[16], dcomb[64], dzc[64];
    for (int k = 0; k < hc; ++k) {
      const float* g = dXo.data() + (t * hc + k) * d;
      float dp = 0.0f;
      for (int64_t i = 0; i < d; ++i) dp += g[i] * F[t * d + i];
      dpost[k] = dp;
      for (int j = 0; j < hc; ++j) {
        const float* xj = xt + j * d;
        float dc = 0.0f;
        for (int64_t i = 0; i < d; ++i) dc += g[i] * xj[i];
        dcomb[j * hc + k] = dc;
      }
    }
    for (int j = 0; j < hc; ++j) {
      const float* xj = xt + j * d;
      float dp = 0.0f;
      for (int64_t i = 0; i < d; ++i) dp += du[t * d + i] * xj[i];
      dpre[j] = dp;
    }
    // dX from the mixing, the collapse and (below) the mix projection.
    for (int j = 0; j < hc; ++j) {
      float* dxj = dX.data() + (t * hc + j) * d;
      for (int64_t i = 0; i < d; ++i) {
        float acc = s.pre[t * hc + j] * du[t * d + i];
        for (int k = 0; k < hc; ++k) acc += s.comb[t * hc * hc + j * hc + k] * dXo[(t * hc + k) * d + i];
        dxj[i] += acc;
      }
    }
    SinkhornBack(s.sk.data() + t * hc * hc * (1 + s.steps), hc, cx.c.hc_sinkhorn_iters, eps, dcomb, dzc);
    const float inv = s.inv[t];
    const float* r = s.raw.data() + t * mix;
    float dm[64];
    for (int j = 0; j < hc; ++j) {
      const float sp = cpu::Sigmoid(s.zp[t * hc + j]), sq = cpu::Sigmoid(s.zq[t * hc + j]);
      const float dzp = dpre[j] * sp * (1 - sp), dzq = dpost[j] * 2.0f * sq * (1 - sq);
      dbase[j] += dzp;
      dbase[hc + j] += dzq;
      dscale[0] += dzp * r[j] * inv;
      dscale[1] += dzq * r[hc + j] * inv;
      dm[j] = dzp * sc[0];
      dm[hc + j] = dzq * sc[1];
    }
    for (int k = 0; k < hc * hc; ++k) {
      dbase[2 * hc + k] += dzc[k];
      dscale[2] += dzc[k] * r[2 * hc + k] * inv;
      dm[2 * hc + k] = dzc[k] * sc[2];
    }
    float rdot = 0.0f;
    for (int j = 0; j < mix; ++j) {
      dmi[t * mix + j] = dm[j] * inv;
      rdot += dm[j] * r[j];
    }
    // m = raw * inv with inv = (mean(x^2)+eps)^-1/2: d inv/dx = -inv^3 x / W.
    const float c = rdot * inv * inv * inv / W;
    float* dxt = dX.data() + t * W;
    for (int64_t i = 0; i < W; ++i) dxt[i] -= c * xt[i];
  }
  Back(h.fn.data<float>(), mix, W, X.data(), dmi.data(), T, dX.data(), dfn.data());
}

// ---- attention ---------------------------------------------------------------


void CompFwd(const Ctx& cx, const Compressor& k, const Vec& x, int64_t T, const RopeTable& rope, CompSaved& s) {
  const int m = k.ratio;
  const int64_t c = k.dim, w = (k.overlap ? 2 : 1) * c;
  s.kv.resize(T * w);
  s.score.resize(T * w);
  Fwd(k.wkv, x.data(), T, s.kv.data());
  Fwd(k.wgate, x.data(), T, s.score.data());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < w; ++i) s.score[t * w + i] += k.ape.data<float>()[(t % m) * w + i];
  s.n = T / m;
  s.cand = (k.overlap ? 2 : 1) * m;
  s.sm.assign(s.n * c * s.cand, 0.0f);
  s.raw.assign(s.n * c, 0.0f);
  for (int64_t e = 0; e < s.n; ++e)
    for (int64_t ch = 0; ch < c; ++ch) {
      // Candidates: [prev window rows, first half] (CSA, e > 0) then [this window, second half or only half].
      float sc[512], kv[512];
      int n = 0;
      bool valid[512];
      for (int j = 0; j < s.cand; ++j) {
        const bool prev = k.overlap && j < m;
        const int64_t row = prev ? (e - 1) * m + j : e * m + (j - (k.overlap ? m : 0));
        const int64_t col = prev ? ch : (k.overlap ? c + ch : ch);
        valid[j] = !(prev && e == 0);
        sc[j] = valid[j] ? s.score[row * w + col] : -INFINITY;
        kv[j] = valid[j] ? s.kv[row * w + col] : 0.0f;
        n++;
      }
      float mx = -INFINITY;
      for (int j = 0; j < n; ++j) mx = std::max(mx, sc[j]);
      float den = 0.0f;
      for (int j = 0; j < n; ++j) den += valid[j] ? std::exp(sc[j] - mx) : 0.0f;
      float acc = 0.0f;
      for (int j = 0; j < n; ++j) {
        const float p = valid[j] ? std::exp(sc[j] - mx) / den : 0.0f;
        s.sm[(e * c + ch) * s.cand + j] = p;
        acc += p * kv[j];
      }
      s.raw[e * c + ch] = acc;
    }
  s.normed.resize(s.n * c);
  s.r.resize(s.n);
  NormFwd(s.raw.data(), s.n, c, k.norm.data<float>(), static_cast<float>(cx.c.rms_norm_eps), s.normed.data(), s.r.data());
  s.C = s.normed;
  for (int64_t e = 0; e < s.n; ++e) rope.Apply(s.C.data() + e * c, 1, c, e * m, 1.0f);
}

void CompBack(Ctx& cx, const std::string& prefix, const Compressor& k, const Vec& x, int64_t T, const RopeTable& rope,
              const CompSaved& s, const Vec& dC, Vec& dx) {
  const int m = k.ratio;
  const int64_t c = k.dim, w = (k.overlap ? 2 : 1) * c, d = cx.c.hidden_size;
  Vec dn = dC, draw(s.n * c, 0.0f);
  for (int64_t e = 0; e < s.n; ++e) rope.Apply(dn.data() + e * c, 1, c, e * m, -1.0f);
  NormBack(s.raw.data(), s.n, c, k.norm.data<float>(), s.r.data(), dn.data(), draw.data(),
           cx.G(prefix + "kv_norm.weight", c).data());
  Vec dkv(T * w, 0.0f), dsc(T * w, 0.0f);
  for (int64_t e = 0; e < s.n; ++e)
    for (int64_t ch = 0; ch < c; ++ch) {
      const float g = draw[e * c + ch];
      const float* p = s.sm.data() + (e * c + ch) * s.cand;
      float dot = 0.0f;
      int64_t rows[512], cols[512];
      for (int j = 0; j < s.cand; ++j) {
        const bool prev = k.overlap && j < m;
        rows[j] = prev ? (e - 1) * m + j : e * m + (j - (k.overlap ? m : 0));
        cols[j] = prev ? ch : (k.overlap ? c + ch : ch);
        if (p[j] > 0) dot += p[j] * g * s.kv[rows[j] * w + cols[j]];
      }
      for (int j = 0; j < s.cand; ++j) {
        if (p[j] == 0.0f) continue;
        const float kvj = s.kv[rows[j] * w + cols[j]];
        dkv[rows[j] * w + cols[j]] += p[j] * g;
        dsc[rows[j] * w + cols[j]] += p[j] * (g * kvj - dot);
      }
    }
  Vec& dape = cx.G(prefix + "position_bias", m * w);
  for (int64_t t = 0; t < s.n * m; ++t)
    for (int64_t i = 0; i < w; ++i) dape[(t % m) * w + i] += dsc[t * w + i];
  Back(k.wkv.weight.data<float>(), w, d, x.data(), dkv.data(), T, dx.data(), cx.G(prefix + "kv_proj.weight", w * d).data());
  Back(k.wgate.weight.data<float>(), w, d, x.data(), dsc.data(), T, dx.data(),
       cx.G(prefix + "gate_proj.weight", w * d).data());
}


void OutProjFwd(const Ctx& cx, const Attention& a, const Vec& orot, int64_t T, Vec& mid, Vec& out) {
  const auto& c = cx.c;
  const int64_t d = c.hidden_size, HD = c.num_heads * c.head_dim;
  const int G = c.o_groups;
  const int64_t pg = HD / G, dg = c.o_lora_rank;
  mid.assign(T * G * dg, 0.0f);
  Vec grp(T * pg), part(T * dg);
  for (int g = 0; g < G; ++g) {
    for (int64_t t = 0; t < T; ++t)
      std::copy(orot.data() + t * HD + g * pg, orot.data() + t * HD + (g + 1) * pg, grp.data() + t * pg);
    cpu::MatMul(grp.data(), T, pg, a.wo_a.weight.data<float>() + g * dg * pg, dg, part.data());
    for (int64_t t = 0; t < T; ++t) std::copy(part.data() + t * dg, part.data() + (t + 1) * dg, mid.data() + t * G * dg + g * dg);
  }
  out.resize(T * d);
  Fwd(a.wo_b, mid.data(), T, out.data());
}

void OutProjBack(Ctx& cx, const std::string& prefix, const Attention& a, const Vec& orot, const Vec& mid, int64_t T,
                 const Vec& dout, Vec& dorot) {
  const auto& c = cx.c;
  const int64_t d = c.hidden_size, HD = c.num_heads * c.head_dim;
  const int G = c.o_groups;
  const int64_t pg = HD / G, dg = c.o_lora_rank;
  Vec dmid(T * G * dg, 0.0f);
  Back(a.wo_b.weight.data<float>(), d, G * dg, mid.data(), dout.data(), T, dmid.data(),
       cx.G(prefix + "o_b_proj.weight", d * G * dg).data());
  Vec grp(T * pg), dgrp(T * pg), dpart(T * dg);
  Vec& dwoa = cx.G(prefix + "o_a_proj.weight", G * dg * pg);
  for (int g = 0; g < G; ++g) {
    for (int64_t t = 0; t < T; ++t) {
      std::copy(orot.data() + t * HD + g * pg, orot.data() + t * HD + (g + 1) * pg, grp.data() + t * pg);
      std::copy(dmid.data() + t * G * dg + g * dg, dmid.data() + t * G * dg + (g + 1) * dg, dpart.data() + t * dg);
    }
    std::fill(dgrp.begin(), dgrp.end(), 0.0f);
    Back(a.wo_a.weight.data<float>() + g * dg * pg, dg, pg, grp.data(), dpart.data(), T, dgrp.data(),
         dwoa.data() + g * dg * pg);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < pg; ++i) dorot[t * HD + g * pg + i] += dgrp[t * pg + i];
  }
}

void AttnFwd(const Ctx& cx, int l, const Vec& x, int64_t T, const std::vector<std::vector<int32_t>>* selected,
             AttnSaved& s, Vec& out) {
  const Attention& a = cx.m.weights().layers[l].attn;
  const auto& c = cx.c;
  const int64_t D = c.head_dim, H = c.num_heads, dc = c.q_lora_rank, win = c.sliding_window;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const RopeTable rope(cx.m.inv_freq(a.kind == AttentionKind::kSliding ? 0 : 1));
  s.qa.resize(T * dc);
  s.qr.resize(T * dc);
  s.qa_r.resize(T);
  Fwd(a.wq_a, x.data(), T, s.qa.data());
  NormFwd(s.qa.data(), T, dc, a.q_norm.data<float>(), eps, s.qr.data(), s.qa_r.data());
  s.q.resize(T * H * D);
  Fwd(a.wq_b, s.qr.data(), T, s.q.data());
  s.qrot.resize(T * H * D);
  s.q_r.resize(T * H);
  NormFwd(s.q.data(), T * H, D, nullptr, eps, s.qrot.data(), s.q_r.data());
  s.kvr.resize(T * D);
  s.k.resize(T * D);
  s.kv_r.resize(T);
  Fwd(a.wkv, x.data(), T, s.kvr.data());
  NormFwd(s.kvr.data(), T, D, a.kv_norm.data<float>(), eps, s.k.data(), s.kv_r.data());
  for (int64_t t = 0; t < T; ++t) {
    rope.Apply(s.qrot.data() + t * H * D, H, D, t, 1.0f);
    rope.Apply(s.k.data() + t * D, 1, D, t, 1.0f);
  }
  const bool compressed = a.kind != AttentionKind::kSliding;
  if (compressed) CompFwd(cx, a.compressor, x, T, rope, s.comp);
  const int m = compressed ? a.compressor.ratio : 1;
  s.keys.assign(T, {});
  s.p_off.assign(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    auto& ks = s.keys[t];
    for (int64_t j = std::max<int64_t>(0, t - win + 1); j <= t; ++j) ks.push_back(static_cast<int32_t>(j));
    if (a.kind == AttentionKind::kHca) {
      for (int64_t e = 0; e < (t + 1) / m; ++e) ks.push_back(static_cast<int32_t>(-1 - e));
    } else if (a.kind == AttentionKind::kCsa) {
      for (int32_t e : (*selected)[t]) ks.push_back(-1 - e);
    }
    s.p_off[t + 1] = s.p_off[t] + H * static_cast<int64_t>(ks.size());
  }
  s.p.assign(s.p_off[T], 0.0f);
  s.psink.assign(T * H, 0.0f);
  s.o.assign(T * H * D, 0.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  auto key = [&](int32_t id) { return id >= 0 ? s.k.data() + id * D : s.comp.C.data() + (-1 - id) * D; };
  for (int64_t t = 0; t < T; ++t) {
    const auto& ks = s.keys[t];
    const int64_t nk = static_cast<int64_t>(ks.size());
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = s.qrot.data() + (t * H + h) * D;
      float* p = s.p.data() + s.p_off[t] + h * nk;
      const float sink = a.sinks.data<float>()[h];
      float mx = sink;
      for (int64_t j = 0; j < nk; ++j) {
        const float* kj = key(ks[j]);
        float dot = 0.0f;
        for (int64_t e = 0; e < D; ++e) dot += qh[e] * kj[e];
        p[j] = dot * scale;
        mx = std::max(mx, p[j]);
      }
      float den = std::exp(sink - mx);
      for (int64_t j = 0; j < nk; ++j) den += (p[j] = std::exp(p[j] - mx));
      for (int64_t j = 0; j < nk; ++j) p[j] /= den;
      s.psink[t * H + h] = std::exp(sink - mx) / den;
      float* oh = s.o.data() + (t * H + h) * D;
      for (int64_t j = 0; j < nk; ++j) {
        const float* kj = key(ks[j]);
        for (int64_t e = 0; e < D; ++e) oh[e] += p[j] * kj[e];
      }
    }
  }
  s.orot = s.o;
  for (int64_t t = 0; t < T; ++t) rope.Apply(s.orot.data() + t * H * D, H, D, t, -1.0f);
  OutProjFwd(cx, a, s.orot, T, s.mid, out);
}

void AttnBack(Ctx& cx, int l, const Vec& x, int64_t T, const AttnSaved& s, const Vec& dout, Vec& dx) {
  const Attention& a = cx.m.weights().layers[l].attn;
  const auto& c = cx.c;
  const int64_t d = c.hidden_size, D = c.head_dim, H = c.num_heads, dc = c.q_lora_rank;
  const std::string P = absl::StrCat("model.layers.", l, ".self_attn.");
  const RopeTable rope(cx.m.inv_freq(a.kind == AttentionKind::kSliding ? 0 : 1));
  Vec dorot(T * H * D, 0.0f);
  OutProjBack(cx, P, a, s.orot, s.mid, T, dout, dorot);
  Vec dO = dorot;  // o' = R(-t) o  =>  do = R(t) do'
  for (int64_t t = 0; t < T; ++t) rope.Apply(dO.data() + t * H * D, H, D, t, 1.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  Vec dqrot(T * H * D, 0.0f), dk(T * D, 0.0f), dC(s.comp.C.size(), 0.0f);
  Vec& dsink = cx.G(P + "sinks", H);
  auto key = [&](int32_t id) { return id >= 0 ? s.k.data() + id * D : s.comp.C.data() + (-1 - id) * D; };
  auto dkey = [&](int32_t id) { return id >= 0 ? dk.data() + id * D : dC.data() + (-1 - id) * D; };
  for (int64_t t = 0; t < T; ++t) {
    const auto& ks = s.keys[t];
    const int64_t nk = static_cast<int64_t>(ks.size());
    std::vector<float> dp(nk);
    for (int64_t h = 0; h < H; ++h) {
      const float* p = s.p.data() + s.p_off[t] + h * nk;
      const float* go = dO.data() + (t * H + h) * D;
      const float* qh = s.qrot.data() + (t * H + h) * D;
      float sum = 0.0f;
      for (int64_t j = 0; j < nk; ++j) {
        const float* kj = key(ks[j]);
        float v = 0.0f;
        for (int64_t e = 0; e < D; ++e) v += go[e] * kj[e];
        dp[j] = v;
        sum += p[j] * v;
      }
      dsink[h] -= s.psink[t * H + h] * sum;
      float* dq = dqrot.data() + (t * H + h) * D;
      for (int64_t j = 0; j < nk; ++j) {
        const float dl = p[j] * (dp[j] - sum) * scale;
        const float* kj = key(ks[j]);
        float* dkj = dkey(ks[j]);
        for (int64_t e = 0; e < D; ++e) {
          dq[e] += dl * kj[e];
          dkj[e] += dl * qh[e] + p[j] * go[e];
        }
      }
    }
  }
  if (a.kind != AttentionKind::kSliding) CompBack(cx, P + "compressor.", a.compressor, x, T, rope, s.comp, dC, dx);
  // k = R(t) norm(kvr)
  for (int64_t t = 0; t < T; ++t) rope.Apply(dk.data() + t * D, 1, D, t, -1.0f);
  Vec dkvr(T * D, 0.0f);
  NormBack(s.kvr.data(), T, D, a.kv_norm.data<float>(), s.kv_r.data(), dk.data(), dkvr.data(),
           cx.G(P + "kv_norm.weight", D).data());
  Back(a.wkv.weight.data<float>(), D, d, x.data(), dkvr.data(), T, dx.data(), cx.G(P + "kv_proj.weight", D * d).data());
  // q = R(t) headnorm(q_b(norm(q_a x)))
  for (int64_t t = 0; t < T; ++t) rope.Apply(dqrot.data() + t * H * D, H, D, t, -1.0f);
  Vec dq(T * H * D, 0.0f);
  NormBack(s.q.data(), T * H, D, nullptr, s.q_r.data(), dqrot.data(), dq.data(), nullptr);
  Vec dqr(T * dc, 0.0f), dqa(T * dc, 0.0f);
  Back(a.wq_b.weight.data<float>(), H * D, dc, s.qr.data(), dq.data(), T, dqr.data(),
       cx.G(P + "q_b_proj.weight", H * D * dc).data());
  NormBack(s.qa.data(), T, dc, a.q_norm.data<float>(), s.qa_r.data(), dqr.data(), dqa.data(),
           cx.G(P + "q_a_norm.weight", dc).data());
  Back(a.wq_a.weight.data<float>(), dc, d, x.data(), dqa.data(), T, dx.data(), cx.G(P + "q_a_proj.weight", dc * d).data());
}

// ---- MoE ---------------------------------------------------------------------



void ExpertFwd(const Ctx& cx, const Expert& ex, const float* x, ExpertSaved& s) {
  const int64_t I = cx.c.moe_intermediate, d = cx.c.hidden_size;
  const float L = static_cast<float>(cx.c.swiglu_limit);
  s.g.resize(I);
  s.u.resize(I);
  s.act.resize(I);
  s.y.resize(d);
  Fwd(ex.w1, x, 1, s.g.data());
  Fwd(ex.w3, x, 1, s.u.data());
  for (int64_t i = 0; i < I; ++i) {
    const float g = L > 0 ? std::min(s.g[i], L) : s.g[i];
    const float u = L > 0 ? std::clamp(s.u[i], -L, L) : s.u[i];
    s.act[i] = cpu::Silu(g) * u;
  }
  Fwd(ex.w2, s.act.data(), 1, s.y.data());
}

// dy: grad of the expert output (already weighted). Accumulates dx and weight grads.
void ExpertBack(Ctx& cx, const Expert& ex, const float* x, const ExpertSaved& s, const float* dy, float* dx,
                float* dw1, float* dw3, float* dw2) {
  const int64_t I = cx.c.moe_intermediate, d = cx.c.hidden_size;
  const float L = static_cast<float>(cx.c.swiglu_limit);
  Vec dact(I, 0.0f), dg(I), du(I);
  Back(ex.w2.weight.data<float>(), d, I, s.act.data(), dy, 1, dact.data(), dw2);
  for (int64_t i = 0; i < I; ++i) {
    const bool g_pass = !(L > 0) || s.g[i] <= L;
    const bool u_pass = !(L > 0) || (s.u[i] >= -L && s.u[i] <= L);
    const float g = g_pass ? s.g[i] : L;
    const float u = u_pass ? s.u[i] : std::clamp(s.u[i], -L, L);
    const float sg = cpu::Sigmoid(g);
    const float dsilu = sg * (1.0f + g * (1.0f - sg));
    dg[i] = g_pass ? dact[i] * u * dsilu : 0.0f;
    du[i] = u_pass ? dact[i] * cpu::Silu(g) : 0.0f;
  }
  Back(ex.w1.weight.data<float>(), I, d, x, dg.data(), 1, dx, dw1);
  Back(ex.w3.weight.data<float>(), I, d, x, du.data(), 1, dx, dw3);
}

// `replay` (when non-null) is [T, K] expert ids recorded at sampling time: used
// instead of the top-k selection (routing replay); the weights still come
// from the current scores of those experts.
void MoeFwd(const Ctx& cx, int l, const Vec& x, const int64_t* tokens, int64_t T, const int32_t* replay, MoeSaved& s,
            Vec& out) {
  const Moe& moe = cx.m.weights().layers[l].moe;
  const auto& c = cx.c;
  const int64_t d = c.hidden_size, E = c.n_routed_experts;
  const int K = c.experts_per_token;
  s.logits.resize(T * E);
  s.scores.resize(T * E);
  cpu::MatMul(x.data(), T, d, moe.gate.data<float>(), E, s.logits.data());
  for (int64_t i = 0; i < T * E; ++i) s.scores[i] = std::sqrt(cpu::Softplus(s.logits[i]));
  s.idx.resize(T * K);
  s.w.resize(T * K);
  s.slot.assign(T * K, {});
  out.assign(T * d, 0.0f);
  std::vector<int64_t> order(E);
  for (int64_t t = 0; t < T; ++t) {
    const float* sc = s.scores.data() + t * E;
    if (replay != nullptr) {
      for (int k = 0; k < K; ++k) s.idx[t * K + k] = replay[t * K + k];
    } else if (moe.hash_routed) {
      for (int k = 0; k < K; ++k) s.idx[t * K + k] = moe.tid2eid.data<int64_t>()[tokens[t] * K + k];
    } else {
      const float* bias = moe.bias.data<float>();
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int64_t i, int64_t j) {
        const float a = sc[i] + bias[i], b = sc[j] + bias[j];
        return a > b || (a == b && i < j);
      });
      for (int k = 0; k < K; ++k) s.idx[t * K + k] = order[k];
    }
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) sum += sc[s.idx[t * K + k]];
    for (int k = 0; k < K; ++k) {
      s.w[t * K + k] = sc[s.idx[t * K + k]] / (sum + 1e-20f) * static_cast<float>(c.routed_scaling_factor);
      ExpertSaved& es = s.slot[t * K + k];
      ExpertFwd(cx, moe.experts[s.idx[t * K + k]], x.data() + t * d, es);
      for (int64_t i = 0; i < d; ++i) out[t * d + i] += s.w[t * K + k] * es.y[i];
    }
  }
  // Note [Sequence balance loss]: DeepSeek-V3's sequence-wise auxiliary loss,
  // L = alpha * sum_e f_e P_e with f_e = E/(K T) * #{t : e in top-k(t)} (a
  // count: no gradient) and P_e = 1/T sum_t s_te / sum_j s_tj (the scores
  // normalised over all experts). dL/d(normalised s_te) = alpha f_e / T.
  if (cx.balance_weight > 0.0f && !moe.hash_routed) {
    std::vector<double> f(E, 0.0), P(E, 0.0);
    for (int64_t i = 0; i < T * K; ++i) f[s.idx[i]] += static_cast<double>(E) / (static_cast<double>(K) * T);
    for (int64_t t = 0; t < T; ++t) {
      double S = 0;
      for (int64_t e = 0; e < E; ++e) S += s.scores[t * E + e];
      for (int64_t e = 0; e < E; ++e) P[e] += s.scores[t * E + e] / S / T;
    }
    s.bal_g.resize(E);
    s.balance_loss = 0;
    for (int64_t e = 0; e < E; ++e) {
      s.balance_loss += cx.balance_weight * f[e] * P[e];
      s.bal_g[e] = static_cast<float>(cx.balance_weight * f[e] / T);
    }
  }
  if (moe.has_shared) {
    s.shared.assign(T, {});
    for (int64_t t = 0; t < T; ++t) {
      ExpertFwd(cx, moe.shared, x.data() + t * d, s.shared[t]);
      for (int64_t i = 0; i < d; ++i) out[t * d + i] += s.shared[t].y[i];
    }
  }
}

void MoeBack(Ctx& cx, int l, const Vec& x, int64_t T, const MoeSaved& s, const Vec& dout, Vec& dx) {
  const Moe& moe = cx.m.weights().layers[l].moe;
  const auto& c = cx.c;
  const int64_t d = c.hidden_size, E = c.n_routed_experts, I = c.moe_intermediate;
  const int K = c.experts_per_token;
  const float rsf = static_cast<float>(c.routed_scaling_factor);
  const std::string P = absl::StrCat("model.layers.", l, ".mlp.");
  Vec& dgu = cx.G(P + "experts.gate_up_proj", E * 2 * I * d);
  Vec& ddown = cx.G(P + "experts.down_proj", E * d * I);
  Vec dz(T * E, 0.0f), dy(d);
  for (int64_t t = 0; t < T; ++t) {
    const float* go = dout.data() + t * d;
    const float* sc = s.scores.data() + t * E;
    float S = 1e-20f, dws[64];
    for (int k = 0; k < K; ++k) S += sc[s.idx[t * K + k]];
    for (int k = 0; k < K; ++k) {
      const int64_t e = s.idx[t * K + k];
      const ExpertSaved& es = s.slot[t * K + k];
      float dw = 0.0f;
      for (int64_t i = 0; i < d; ++i) dw += go[i] * es.y[i];
      dws[k] = dw;
      for (int64_t i = 0; i < d; ++i) dy[i] = s.w[t * K + k] * go[i];
      ExpertBack(cx, moe.experts[e], x.data() + t * d, es, dy.data(), dx.data() + t * d,
                 dgu.data() + e * 2 * I * d, dgu.data() + (e * 2 * I + I) * d, ddown.data() + e * d * I);
    }
    // w_k = rsf * s_k / S  =>  ds_j = rsf * (dw_j / S - sum_k dw_k s_k / S^2) for the selected j.
    float cross = 0.0f;
    for (int k = 0; k < K; ++k) cross += dws[k] * sc[s.idx[t * K + k]];
    for (int k = 0; k < K; ++k) {
      const int64_t e = s.idx[t * K + k];
      const float ds = rsf * (dws[k] / S - cross / (S * S));
      // s = sqrt(softplus(z)): ds/dz = sigmoid(z) / (2 s)
      if (sc[e] > 0) dz[t * E + e] += ds * cpu::Sigmoid(s.logits[t * E + e]) / (2.0f * sc[e]);
    }
  }
  if (!s.bal_g.empty()) {
    // Through s'_e = s_e / S: ds_j = (g_j - sum_e g_e s'_e) / S; then sqrt-softplus.
    for (int64_t t = 0; t < T; ++t) {
      const float* sc = s.scores.data() + t * E;
      float S = 0.0f, dot = 0.0f;
      for (int64_t e = 0; e < E; ++e) S += sc[e];
      for (int64_t e = 0; e < E; ++e) dot += s.bal_g[e] * sc[e] / S;
      for (int64_t e = 0; e < E; ++e)
        if (sc[e] > 0)
          dz[t * E + e] += (s.bal_g[e] - dot) / S * cpu::Sigmoid(s.logits[t * E + e]) / (2.0f * sc[e]);
    }
  }
  Back(moe.gate.data<float>(), E, d, x.data(), dz.data(), T, dx.data(), cx.G(P + "gate.weight", E * d).data());
  if (moe.has_shared) {
    Vec& d1 = cx.G(P + "shared_experts.gate_proj.weight", I * d);
    Vec& d3 = cx.G(P + "shared_experts.up_proj.weight", I * d);
    Vec& d2 = cx.G(P + "shared_experts.down_proj.weight", d * I);
    for (int64_t t = 0; t < T; ++t)
      ExpertBack(cx, moe.shared, x.data() + t * d, s.shared[t], dout.data() + t * d, dx.data() + t * d, d1.data(),
                 d3.data(), d2.data());
  }
}

void HcHeadFwd(const Ctx& cx, const HyperConnection& hh, const Vec& X, int64_t T, Vec& y, HcHeadSaved& s) {
  const int hc = cx.c.hc_mult;
  const int64_t d = cx.c.hidden_size, Wd = hc * d;
  const float eps = static_cast<float>(cx.c.rms_norm_eps);
  s.raw.resize(T * hc);
  s.inv.resize(T);
  s.wgt.resize(T * hc);
  s.z.resize(T * hc);
  y.assign(T * d, 0.0f);
  cpu::MatMul(X.data(), T, Wd, hh.fn.data<float>(), hc, s.raw.data());
  for (int64_t t = 0; t < T; ++t) {
    float ss = 0.0f;
    for (int64_t i = 0; i < Wd; ++i) ss += X[t * Wd + i] * X[t * Wd + i];
    s.inv[t] = 1.0f / std::sqrt(ss / Wd + eps);
    for (int j = 0; j < hc; ++j) {
      s.z[t * hc + j] = s.raw[t * hc + j] * s.inv[t] * hh.scale.data<float>()[0] + hh.base.data<float>()[j];
      s.wgt[t * hc + j] = cpu::Sigmoid(s.z[t * hc + j]) + static_cast<float>(cx.c.hc_eps);
      for (int64_t i = 0; i < d; ++i) y[t * d + i] += s.wgt[t * hc + j] * X[t * Wd + j * d + i];
    }
  }
}

void HcHeadBack(Ctx& cx, const HyperConnection& hh, const Vec& X, int64_t T, const HcHeadSaved& s, const Vec& dy,
                Vec& dX) {
  const int hc = cx.c.hc_mult;
  const int64_t d = cx.c.hidden_size, Wd = hc * d;
  Vec dmi(T * hc);
  Vec& dbase = cx.G("model.hc_head.hc_base", hc);
  Vec& dscale = cx.G("model.hc_head.hc_scale", 1);
  for (int64_t t = 0; t < T; ++t) {
    float rdot = 0.0f;
    for (int j = 0; j < hc; ++j) {
      float dw = 0.0f;
      for (int64_t i = 0; i < d; ++i) {
        dw += dy[t * d + i] * X[t * Wd + j * d + i];
        dX[t * Wd + j * d + i] += s.wgt[t * hc + j] * dy[t * d + i];
      }
      const float sg = cpu::Sigmoid(s.z[t * hc + j]);
      const float dzj = dw * sg * (1 - sg);
      dbase[j] += dzj;
      dscale[0] += dzj * s.raw[t * hc + j] * s.inv[t];
      const float dm = dzj * hh.scale.data<float>()[0];
      dmi[t * hc + j] = dm * s.inv[t];
      rdot += dm * s.raw[t * hc + j];
    }
    const float cc = rdot * s.inv[t] * s.inv[t] * s.inv[t] / Wd;
    for (int64_t i = 0; i < Wd; ++i) dX[t * Wd + i] -= cc * X[t * Wd + i];
  }
  Back(hh.fn.data<float>(), hc, Wd, X.data(), dmi.data(), T, dX.data(), cx.G("model.hc_head.hc_fn", hc * Wd).data());
}

namespace {

struct LayerSaved {
  Vec X0, X1;  // streams entering the attention and the FFN sublayer
  HcSaved hc_attn, hc_ffn;
  Vec u_attn, xn_attn, r_attn, f_attn;
  Vec u_ffn, xn_ffn, r_ffn, f_ffn;
  AttnSaved attn;
  MoeSaved moe;
};

// One sequence: forward with saved activations, then backward of
// sum_t weights[t] * -log p(targets[t] | tokens[..t]) over positions whose
// target is >= 0. Writes log p(target) (0 where masked) to `logprobs`.
// `replay`: [L, n, K] recorded routes (n = B*T positions) or null; this
// sequence starts at position `offset` of it. Adds this sequence's routed assignments to `load` [L][E].
absl::StatusOr<double> SequenceLossAndGrads(Ctx& cx, const int64_t* tokens, int64_t T, const int64_t* targets,
                                            const float* weights, float* logprobs, const int32_t* replay,
                                            int64_t offset, int64_t n, std::vector<std::vector<int64_t>>& load) {
  const auto& c = cx.c;
  const Weights& W = cx.m.weights();
  const int hc = c.hc_mult;
  const int64_t d = c.hidden_size, V = c.vocab_size;
  const float eps = static_cast<float>(c.rms_norm_eps);
  // Indexer selections come from the inference path (they carry no gradient).
  StepOutputs sel;
  sel.capture_selection = true;
  auto state = cx.m.NewState();
  std::vector<Model::Chunk> chunk = {{state.get(), absl::MakeConstSpan(tokens, T)}};
  RETURN_IF_ERROR(cx.m.Step(chunk, &sel).status());

  Vec X(T * hc * d);
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < hc; ++j)
      std::copy(W.embed.data<float>() + tokens[t] * d, W.embed.data<float>() + (tokens[t] + 1) * d,
                X.data() + (t * hc + j) * d);
  std::vector<LayerSaved> saved(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    const Layer& L = W.layers[l];
    LayerSaved& s = saved[l];
    s.X0 = X;
    HcFwd(cx, L.attn_hc, X, T, s.u_attn, s.hc_attn);
    s.xn_attn.resize(T * d);
    s.r_attn.resize(T);
    NormFwd(s.u_attn.data(), T, d, L.attn_norm.data<float>(), eps, s.xn_attn.data(), s.r_attn.data());
    AttnFwd(cx, l, s.xn_attn, T, &sel.selected[l], s.attn, s.f_attn);
    HcMix(cx, s.X0, s.f_attn, s.hc_attn, T, X);
    s.X1 = X;
    HcFwd(cx, L.ffn_hc, X, T, s.u_ffn, s.hc_ffn);
    s.xn_ffn.resize(T * d);
    s.r_ffn.resize(T);
    NormFwd(s.u_ffn.data(), T, d, L.ffn_norm.data<float>(), eps, s.xn_ffn.data(), s.r_ffn.data());
    const int K = c.experts_per_token;
    MoeFwd(cx, l, s.xn_ffn, tokens, T, replay ? replay + (l * n + offset) * K : nullptr, s.moe, s.f_ffn);
    for (int64_t e : s.moe.idx) ++load[l][e];
    cx.balance_loss += s.moe.balance_loss;
    HcMix(cx, s.X1, s.f_ffn, s.hc_ffn, T, X);
  }
  // hc_head, final norm, head, loss.
  Vec y;
  HcHeadSaved head_saved;
  HcHeadFwd(cx, W.hc_head, X, T, y, head_saved);
  Vec yn(T * d), yr(T), logits(T * V);
  NormFwd(y.data(), T, d, W.norm.data<float>(), eps, yn.data(), yr.data());
  Fwd(W.head, yn.data(), T, logits.data());
  double loss = 0.0;
  Vec dlogits(T * V, 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    logprobs[t] = 0.0f;
    if (targets[t] < 0) continue;
    const float* lt = logits.data() + t * V;
    const float mx = *std::max_element(lt, lt + V);
    double z_sum = 0.0;
    for (int64_t v = 0; v < V; ++v) z_sum += std::exp(static_cast<double>(lt[v] - mx));
    const double lse = mx + std::log(z_sum);
    const double nll = lse - lt[targets[t]];
    logprobs[t] = static_cast<float>(-nll);
    const float w = weights[t];
    loss += static_cast<double>(w) * nll;
    if (w == 0.0f) continue;
    for (int64_t v = 0; v < V; ++v) dlogits[t * V + v] = static_cast<float>(std::exp(lt[v] - lse)) * w;
    dlogits[t * V + targets[t]] -= w;
  }
  // ---- backward ----
  Vec dyn(T * d, 0.0f), dy(T * d, 0.0f);
  Back(W.head.weight.data<float>(), V, d, yn.data(), dlogits.data(), T, dyn.data(),
       cx.G("lm_head.weight", V * d).data());
  NormBack(y.data(), T, d, W.norm.data<float>(), yr.data(), dyn.data(), dy.data(), cx.G("model.norm.weight", d).data());
  Vec dX(T * hc * d, 0.0f);
  HcHeadBack(cx, W.hc_head, X, T, head_saved, dy, dX);
  for (int l = c.num_layers - 1; l >= 0; --l) {
    const Layer& L = W.layers[l];
    LayerSaved& s = saved[l];
    const std::string P = absl::StrCat("model.layers.", l, ".");
    // FFN sublayer: X2 = post F + comb^T X1, F = moe(norm(u)), u = sum pre X1.
    Vec dF(T * d, 0.0f);
    for (int64_t t = 0; t < T; ++t)
      for (int k = 0; k < hc; ++k)
        for (int64_t i = 0; i < d; ++i) dF[t * d + i] += s.hc_ffn.post[t * hc + k] * dX[(t * hc + k) * d + i];
    Vec dxn(T * d, 0.0f), du(T * d, 0.0f), dX1(T * hc * d, 0.0f);
    MoeBack(cx, l, s.xn_ffn, T, s.moe, dF, dxn);
    NormBack(s.u_ffn.data(), T, d, L.ffn_norm.data<float>(), s.r_ffn.data(), dxn.data(), du.data(),
             cx.G(P + "post_attention_layernorm.weight", d).data());
    HcBack(cx, P + "ffn_hc.", L.ffn_hc, s.X1, s.f_ffn, s.hc_ffn, T, dX, du, dX1);
    // Attention sublayer.
    Vec dFa(T * d, 0.0f);
    for (int64_t t = 0; t < T; ++t)
      for (int k = 0; k < hc; ++k)
        for (int64_t i = 0; i < d; ++i) dFa[t * d + i] += s.hc_attn.post[t * hc + k] * dX1[(t * hc + k) * d + i];
    Vec dxa(T * d, 0.0f), dua(T * d, 0.0f), dX0(T * hc * d, 0.0f);
    AttnBack(cx, l, s.xn_attn, T, s.attn, dFa, dxa);
    NormBack(s.u_attn.data(), T, d, L.attn_norm.data<float>(), s.r_attn.data(), dxa.data(), dua.data(),
             cx.G(P + "input_layernorm.weight", d).data());
    HcBack(cx, P + "attn_hc.", L.attn_hc, s.X0, s.f_attn, s.hc_attn, T, dX1, dua, dX0);
    dX.swap(dX0);
    s = LayerSaved();  // free as we go
  }
  Vec& demb = cx.G("model.embed_tokens.weight", V * d);
  for (int64_t t = 0; t < T; ++t)
    for (int j = 0; j < hc; ++j)
      for (int64_t i = 0; i < d; ++i) demb[tokens[t] * d + i] += dX[(t * hc + j) * d + i];
  return loss;
}

}  // namespace
}  // namespace internal

std::vector<std::pair<int64_t, int64_t>> SequencesOf(const TokenBatch& batch) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t b = 0; b < batch.B; ++b) {
    const int64_t row = b * batch.T;
    if (batch.documents.empty()) {
      out.emplace_back(row, batch.T);
      continue;
    }
    for (int64_t t = 0; t < batch.T;) {
      const int32_t doc = batch.documents[row + t];
      int64_t e = t + 1;
      while (e < batch.T && batch.documents[row + e] == doc) ++e;
      if (doc >= 0) out.emplace_back(row + t, e - t);
      t = e;
    }
  }
  return out;
}

absl::StatusOr<WeightedLoss> WeightedTokenLossAndGradients(const Model& model, const TokenBatch& batch,
                                                           Gradients* grads) {
  const auto& c = model.config();
  const int64_t B = batch.B, T = batch.T, n = B * T;
  if (B <= 0 || T <= 0)
    return absl::InvalidArgumentError(absl::StrCat("token batch: need B >= 1 and T >= 1, got B=", B, " T=", T));
  if (static_cast<int64_t>(batch.tokens.size()) != n)
    return absl::InvalidArgumentError(absl::StrCat("token batch: tokens has ", batch.tokens.size(),
                                                   " entries, expected B*T = ", n));
  if (static_cast<int64_t>(batch.targets.size()) != n)
    return absl::InvalidArgumentError(absl::StrCat("token batch: targets has ", batch.targets.size(),
                                                   " entries, expected B*T = ", n));
  if (static_cast<int64_t>(batch.weights.size()) != n)
    return absl::InvalidArgumentError(absl::StrCat("token batch: weights has ", batch.weights.size(),
                                                   " entries, expected B*T = ", n));
  for (int64_t i = 0; i < n; ++i) {
    if (batch.tokens[i] < 0 || batch.tokens[i] >= c.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("token batch: tokens[", i / T, ", ", i % T, "] = ",
                                                     batch.tokens[i], " is outside the vocabulary 0..",
                                                     c.vocab_size - 1));
    if (batch.targets[i] < -1 || batch.targets[i] >= c.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("token batch: targets[", i / T, ", ", i % T, "] = ",
                                                     batch.targets[i], " is neither -1 (masked) nor in 0..",
                                                     c.vocab_size - 1));
    if (!std::isfinite(batch.weights[i]))
      return absl::InvalidArgumentError(absl::StrCat("token batch: weights[", i / T, ", ", i % T,
                                                     "] is not finite"));
  }
  if (!batch.documents.empty()) {
    if (static_cast<int64_t>(batch.documents.size()) != n)
      return absl::InvalidArgumentError(absl::StrCat("token batch: documents has ", batch.documents.size(),
                                                     " entries, expected B*T = ", n));
    for (int64_t i = 0; i < n; ++i)
      if (batch.documents[i] < 0 && batch.targets[i] >= 0)
        return absl::InvalidArgumentError(absl::StrCat("token batch: position [", i / T, ", ", i % T,
                                                       "] is padding (documents < 0) but has target ",
                                                       batch.targets[i]));
  }
  for (const auto& l : model.weights().layers)
    for (const auto& e : l.moe.experts)
      if (e.w1.mxfp4 || e.w2.mxfp4 || e.w3.mxfp4)
        return absl::UnimplementedError("training needs fp32 master weights; this checkpoint has MXFP4 experts");
  if (c.hc_mult > 8 || c.experts_per_token > 64 || (c.CsaRatio() > 0 && 2 * c.CsaRatio() > 512))
    return absl::InvalidArgumentError("training path supports hc_mult <= 8 and experts_per_token <= 64");
  for (const auto& l : model.weights().layers)
    if (l.attn.kind != io::AttentionKind::kSliding && 2 * l.attn.compressor.ratio > 512)
      return absl::InvalidArgumentError("training path supports compress ratios up to 256");
  const int K = c.experts_per_token;
  const int64_t E = c.n_routed_experts;
  if (!batch.replay_routes.empty()) {
    const int64_t want = static_cast<int64_t>(c.num_layers) * n * K;
    if (static_cast<int64_t>(batch.replay_routes.size()) != want)
      return absl::InvalidArgumentError(absl::StrCat("token batch: replay_routes has ", batch.replay_routes.size(),
                                                     " entries, expected layers*B*T*experts_per_token = ", want));
    for (int64_t i = 0; i < want; i += K)
      for (int k = 0; k < K; ++k) {
        const int32_t e = batch.replay_routes[i + k];
        const int64_t row = i / K, layer = row / n, pos = row % n;
        if (e < 0 || e >= E)
          return absl::InvalidArgumentError(absl::StrCat("token batch: replay_routes[layer ", layer, ", ", pos / T,
                                                         ", ", pos % T, "] names expert ", e, ", outside 0..", E - 1));
        for (int j = 0; j < k; ++j)
          if (batch.replay_routes[i + j] == e)
            return absl::InvalidArgumentError(absl::StrCat("token batch: replay_routes[layer ", layer, ", ", pos / T,
                                                           ", ", pos % T, "] repeats expert ", e));
      }
  }
  std::map<std::string, internal::Vec> local;
  if (!(batch.balance_loss_weight >= 0.0f) || !std::isfinite(batch.balance_loss_weight))
    return absl::InvalidArgumentError(absl::StrCat("token batch: balance_loss_weight must be finite and >= 0, got ",
                                                   batch.balance_loss_weight));
  internal::Ctx cx{model, c, grads ? grads->by_name : local, batch.balance_loss_weight};
  WeightedLoss out;
  out.logprobs.assign(n, 0.0f);
  out.expert_load.assign(c.num_layers, std::vector<int64_t>(E, 0));
  const int32_t* replay = batch.replay_routes.empty() ? nullptr : batch.replay_routes.data();
  // Note [Packed documents]: each run of equal non-negative document ids is
  // its own sequence (positions from 0, no attention, compressor window or
  // state across runs); negative ids are padding and are not run at all.
  for (const auto& [begin, length] : SequencesOf(batch)) {
    ASSIGN_OR_RETURN(double l, internal::SequenceLossAndGrads(
                                   cx, batch.tokens.data() + begin, length, batch.targets.data() + begin,
                                   batch.weights.data() + begin, out.logprobs.data() + begin, replay, begin, n,
                                   out.expert_load));
    out.loss += l;
  }
  out.balance_loss = cx.balance_loss;
  return out;
}

absl::StatusOr<float> NextTokenLossAndGradients(const Model& model, absl::Span<const int64_t> tokens, int64_t B,
                                                int64_t T, Gradients* grads) {
  if (B <= 0 || T < 2 || static_cast<int64_t>(tokens.size()) != B * T)
    return absl::InvalidArgumentError(absl::StrCat("need tokens [B, T] with B >= 1, T >= 2; got ", tokens.size(),
                                                   " tokens for B=", B, " T=", T));
  // Position t predicts token t+1 with weight 1/(B(T-1)); the last position has no target.
  const float scale = 1.0f / static_cast<float>(B * (T - 1));
  std::vector<int64_t> targets(B * T, -1);
  std::vector<float> weights(B * T, 0.0f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t + 1 < T; ++t) {
      targets[b * T + t] = tokens[b * T + t + 1];
      weights[b * T + t] = scale;
    }
  TokenBatch batch{tokens, targets, weights, B, T, {}, 0.0f, {}};
  ASSIGN_OR_RETURN(WeightedLoss r, WeightedTokenLossAndGradients(model, batch, grads));
  return static_cast<float>(r.loss);
}

}  // namespace retort::v4
