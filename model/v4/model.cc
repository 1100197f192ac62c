// Model::Step — the V4 forward on CPU (exact numerics). V4_SPEC.md §2–3 and
// the transformers reference define every step; comments cite the spec.
#include "model/v4/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "model/base/logging.h"
#include "model/base/status_macros.h"
#include "model/base/thread_pool.h"
#include "model/kernels/cpu/cpu_kernels.h"

namespace retort::v4 {

using io::AttentionKind;

void Linear::Apply(const float* x, int64_t rows, float* y) const {
  if (mxfp4) {
    cpu::MxFp4MatMul(x, rows, in, weight.raw(), scales.raw(), out, y);
  } else {
    cpu::MatMul(x, rows, in, weight.data<float>(), out, y);
  }
}

int64_t CompressorState::Bytes() const {
  return static_cast<int64_t>(sizeof(float) * (entries.size() + pending_kv.size() + pending_score.size() +
                                               prev_kv.size() + prev_score.size()));
}

int64_t DecodeState::Bytes() const {
  int64_t b = 0;
  for (const auto& l : layers_) b += static_cast<int64_t>(l.window.size() * sizeof(float)) + l.kv.Bytes() + l.index.Bytes();
  return b;
}

std::unique_ptr<DecodeState> Model::NewState() const {
  auto s = std::make_unique<DecodeState>();
  s->layers_.resize(config_.num_layers);
  for (int l = 0; l < config_.num_layers; ++l) {
    LayerState& ls = s->layers_[l];
    ls.window.assign(static_cast<size_t>(config_.sliding_window * config_.head_dim), 0.0f);
  }
  return s;
}

int64_t Model::ParameterCount() const {
  const auto& c = config_;
  int64_t n = weights_.embed.numel() + weights_.head.out * weights_.head.in + weights_.norm.numel() +
              weights_.hc_head.fn.numel() + weights_.hc_head.base.numel() + weights_.hc_head.scale.numel();
  for (const auto& l : weights_.layers) {
    for (const HyperConnection* h : {&l.attn_hc, &l.ffn_hc}) n += h->fn.numel() + h->base.numel() + h->scale.numel();
    n += l.attn_norm.numel() + l.ffn_norm.numel();
    const Attention& a = l.attn;
    for (const Linear* x : {&a.wq_a, &a.wq_b, &a.wkv, &a.wo_a, &a.wo_b}) n += x->out * x->in;
    n += a.q_norm.numel() + a.kv_norm.numel() + a.sinks.numel();
    auto comp = [&](const Compressor& k) {
      return k.wkv.out * k.wkv.in + k.wgate.out * k.wgate.in + k.ape.numel() + k.norm.numel();
    };
    if (a.kind != AttentionKind::kSliding) n += comp(a.compressor);
    if (a.kind == AttentionKind::kCsa)
      n += a.indexer.wq_b.out * a.indexer.wq_b.in + a.indexer.weights_proj.out * a.indexer.weights_proj.in +
           comp(a.indexer.compressor);
    n += l.moe.gate.numel() + (l.moe.bias.defined() ? l.moe.bias.numel() : 0);
    const int64_t expert = 3 * c.moe_intermediate * c.hidden_size;
    n += expert * static_cast<int64_t>(l.moe.experts.size()) + (l.moe.has_shared ? expert : 0);
  }
  return n;
}

int64_t Model::ActivatedParameterCount() const {
  const int64_t expert = 3 * config_.moe_intermediate * config_.hidden_size;
  return ParameterCount() -
         static_cast<int64_t>(config_.num_layers) * (config_.n_routed_experts - config_.experts_per_token) * expert;
}

int64_t Model::StateBytes(int64_t length) const {
  const auto& c = config_;
  int64_t floats = 0;
  auto compressor = [&](int m, int64_t dim, bool overlap) {
    const int64_t coff = overlap ? 2 : 1;
    int64_t f = (length / m) * dim + 2 * (length % m) * coff * dim;  // entries + open-window kv/score rows
    if (overlap && length >= m) f += 2 * m * dim;                   // previous window's first half
    return f;
  };
  for (int l = 0; l < c.num_layers; ++l) {
    floats += c.sliding_window * c.head_dim;
    if (c.attention[l] != AttentionKind::kSliding)
      floats += compressor(c.compress_ratio[l], c.head_dim, c.attention[l] == AttentionKind::kCsa);
    if (c.attention[l] == AttentionKind::kCsa) floats += compressor(c.compress_ratio[l], c.index_head_dim, true);
  }
  return floats * static_cast<int64_t>(sizeof(float));
}

// ModelRunner holds the scratch of one Step.
class ModelRunner {
 public:
  ModelRunner(const Model& m, absl::Span<const Model::Chunk> chunks) : m_(m), c_(m.config_), chunks_(chunks) {
    for (const auto& ch : chunks) {
      row_begin_.push_back(rows_);
      rows_ += static_cast<int64_t>(ch.tokens.size());
    }
    tokens_.reserve(rows_);
    positions_.reserve(rows_);
    for (const auto& ch : chunks)
      for (size_t i = 0; i < ch.tokens.size(); ++i) {
        tokens_.push_back(ch.tokens[i]);
        positions_.push_back(ch.state->length_ + static_cast<int64_t>(i));
      }
  }

  std::vector<float> Run(StepOutputs* out);

 private:
  // mHC (§2.1): computes pre/post/comb for every row and the collapsed input u [rows, d].
  void HcPre(const HyperConnection& h, const std::vector<float>& X, std::vector<float>& u,
             std::vector<float>& post, std::vector<float>& comb) const;
  // X'_k = post_k * F + sum_j comb[j][k] X_j.
  void HcPost(const std::vector<float>& F, const std::vector<float>& post, const std::vector<float>& comb,
              std::vector<float>& X) const;
  void AttentionBlock(int layer, const std::vector<float>& x, std::vector<float>& out,
                      std::vector<std::vector<int32_t>>* selected);
  void MoeBlock(int layer, const std::vector<float>& x, std::vector<float>& out, std::vector<int32_t>* routes) const;
  // Feeds rows [r0, r0+n) of (kv, score) into a compressor; returns the new entries' count.
  void Compress(const Compressor& k, CompressorState& st, const float* kv, const float* score, int64_t n,
                int64_t first_pos) const;
  void Rope(float* x, int64_t rows, int64_t dim, int64_t pos, int kind, float sign) const;

  const Model& m_;
  const io::V4Config& c_;
  absl::Span<const Model::Chunk> chunks_;
  std::vector<int64_t> row_begin_;
  int64_t rows_ = 0;
  std::vector<int64_t> tokens_;
  std::vector<int64_t> positions_;
};

void ModelRunner::Rope(float* x, int64_t rows, int64_t dim, int64_t pos, int kind, float sign) const {
  const auto& f = m_.inv_freq_[kind];
  const int64_t half = static_cast<int64_t>(f.size());
  float cs[512], sn[512];
  CHECK_LE(half, 512);
  for (int64_t i = 0; i < half; ++i) {
    const float angle = f[i] * static_cast<float>(pos);  // fp32, as the reference
    cs[i] = std::cos(angle);
    sn[i] = std::sin(angle);
  }
  cpu::ApplyRope(x, rows, dim, 2 * half, cs, sn, sign);
}

void ModelRunner::HcPre(const HyperConnection& h, const std::vector<float>& X, std::vector<float>& u,
                        std::vector<float>& post, std::vector<float>& comb) const {
  const int hc = c_.hc_mult;
  const int64_t d = c_.hidden_size, width = hc * d, mix = (2 + hc) * hc;
  std::vector<float> mixes(rows_ * mix);
  cpu::MatMul(X.data(), rows_, width, h.fn.data<float>(), mix, mixes.data());
  u.assign(rows_ * d, 0.0f);
  post.resize(rows_ * hc);
  comb.resize(rows_ * hc * hc);
  const float* base = h.base.data<float>();
  const float* scale = h.scale.data<float>();
  const float eps = static_cast<float>(c_.hc_eps);
  ParallelFor(rows_, 8, [&](int64_t r0, int64_t r1) {
    std::vector<float> pre(hc);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = X.data() + r * width;
      float ss = 0.0f;
      for (int64_t i = 0; i < width; ++i) ss += xr[i] * xr[i];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(width) + static_cast<float>(c_.rms_norm_eps));
      const float* mr = mixes.data() + r * mix;
      for (int j = 0; j < hc; ++j) {
        pre[j] = cpu::Sigmoid(mr[j] * inv * scale[0] + base[j]) + eps;
        post[r * hc + j] = 2.0f * cpu::Sigmoid(mr[hc + j] * inv * scale[1] + base[hc + j]);
      }
      float* cm = comb.data() + r * hc * hc;
      for (int k = 0; k < hc * hc; ++k) cm[k] = mr[2 * hc + k] * inv * scale[2] + base[2 * hc + k];
      cpu::SinkhornProject(cm, hc, c_.hc_sinkhorn_iters, eps);
      float* ur = u.data() + r * d;
      for (int j = 0; j < hc; ++j)
        for (int64_t i = 0; i < d; ++i) ur[i] += pre[j] * xr[j * d + i];
    }
  });
}

void ModelRunner::HcPost(const std::vector<float>& F, const std::vector<float>& post, const std::vector<float>& comb,
                         std::vector<float>& X) const {
  const int hc = c_.hc_mult;
  const int64_t d = c_.hidden_size;
  ParallelFor(rows_, 8, [&](int64_t r0, int64_t r1) {
    std::vector<float> old(hc * d);
    for (int64_t r = r0; r < r1; ++r) {
      float* xr = X.data() + r * hc * d;
      std::copy(xr, xr + hc * d, old.begin());
      const float* cm = comb.data() + r * hc * hc;
      for (int k = 0; k < hc; ++k) {
        float* dst = xr + k * d;
        const float p = post[r * hc + k];
        const float* f = F.data() + r * d;
        for (int64_t i = 0; i < d; ++i) dst[i] = p * f[i];
        for (int j = 0; j < hc; ++j) {
          const float cjk = cm[j * hc + k];
          const float* src = old.data() + j * d;
          for (int64_t i = 0; i < d; ++i) dst[i] += cjk * src[i];
        }
      }
    }
  });
}

void ModelRunner::Compress(const Compressor& k, CompressorState& st, const float* kv, const float* score, int64_t n,
                           int64_t first_pos) const {
  const int m = k.ratio;
  const int64_t c = k.dim, w = (k.overlap ? 2 : 1) * c;
  const float* ape = k.ape.data<float>();
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = first_pos + t;
    const int slot = static_cast<int>(pos % m);
    CHECK_EQ(slot, st.pending);  // rows arrive in order; pending == pos mod m
    st.pending_kv.insert(st.pending_kv.end(), kv + t * w, kv + (t + 1) * w);
    for (int64_t i = 0; i < w; ++i) st.pending_score.push_back(score[t * w + i] + ape[slot * w + i]);
    ++st.pending;
    if (st.pending < m) continue;
    // Emit entry i = pos / m over tokens [i*m, (i+1)*m) (§2.3).
    std::vector<float> entry(c, 0.0f);
    for (int64_t ch = 0; ch < c; ++ch) {
      // Candidates: CSA previous window's channel ch (series "a"), then this
      // window's channel c+ch; HCA: this window's channel ch.
      float mx = -std::numeric_limits<float>::infinity();
      const int64_t cur_off = k.overlap ? c : 0;
      if (k.overlap && st.has_prev)
        for (int j = 0; j < m; ++j) mx = std::max(mx, st.prev_score[j * c + ch]);
      for (int j = 0; j < m; ++j) mx = std::max(mx, st.pending_score[j * w + cur_off + ch]);
      float denom = 0.0f, acc = 0.0f;
      if (k.overlap && st.has_prev)
        for (int j = 0; j < m; ++j) {
          const float e = std::exp(st.prev_score[j * c + ch] - mx);
          denom += e;
          acc += e * st.prev_kv[j * c + ch];
        }
      for (int j = 0; j < m; ++j) {
        const float e = std::exp(st.pending_score[j * w + cur_off + ch] - mx);
        denom += e;
        acc += e * st.pending_kv[j * w + cur_off + ch];
      }
      entry[ch] = acc / denom;
    }
    cpu::RmsNorm(entry.data(), 1, c, k.norm.data<float>(), static_cast<float>(c_.rms_norm_eps), entry.data());
    Rope(entry.data(), 1, c, (pos + 1 - m), /*kind=*/1, 1.0f);
    st.entries.insert(st.entries.end(), entry.begin(), entry.end());
    ++st.num_entries;
    if (k.overlap) {  // keep this window's first-half rows for the next entry
      st.prev_kv.resize(m * c);
      st.prev_score.resize(m * c);
      for (int j = 0; j < m; ++j)
        for (int64_t ch = 0; ch < c; ++ch) {
          st.prev_kv[j * c + ch] = st.pending_kv[j * w + ch];
          st.prev_score[j * c + ch] = st.pending_score[j * w + ch];
        }
      st.has_prev = true;
    }
    st.pending_kv.clear();
    st.pending_score.clear();
    st.pending = 0;
  }
}

void ModelRunner::AttentionBlock(int layer, const std::vector<float>& x, std::vector<float>& out,
                                 std::vector<std::vector<int32_t>>* selected) {
  const Attention& a = m_.weights_.layers[layer].attn;
  const int64_t d = c_.hidden_size, D = c_.head_dim, H = c_.num_heads, dc = c_.q_lora_rank;
  const int rope_kind = a.kind == AttentionKind::kSliding ? 0 : 1;
  const float eps = static_cast<float>(c_.rms_norm_eps);
  const int64_t N = rows_;

  std::vector<float> qr(N * dc), q(N * H * D), kv(N * D);
  a.wq_a.Apply(x.data(), N, qr.data());
  cpu::RmsNorm(qr.data(), N, dc, a.q_norm.data<float>(), eps, qr.data());
  a.wq_b.Apply(qr.data(), N, q.data());
  cpu::RmsNorm(q.data(), N * H, D, nullptr, eps, q.data());  // per-head, no weight
  a.wkv.Apply(x.data(), N, kv.data());
  cpu::RmsNorm(kv.data(), N, D, a.kv_norm.data<float>(), eps, kv.data());
  for (int64_t r = 0; r < N; ++r) {
    Rope(q.data() + r * H * D, H, D, positions_[r], rope_kind, 1.0f);
    Rope(kv.data() + r * D, 1, D, positions_[r], rope_kind, 1.0f);
  }

  const bool compressed = a.kind != AttentionKind::kSliding, csa = a.kind == AttentionKind::kCsa;
  std::vector<float> ckv, cscore, ikv, iscore, iq, iw;
  const int64_t Hi = c_.index_n_heads, Di = c_.index_head_dim;
  if (compressed) {
    const int64_t w = a.compressor.wkv.out;
    ckv.resize(N * w);
    cscore.resize(N * w);
    a.compressor.wkv.Apply(x.data(), N, ckv.data());
    a.compressor.wgate.Apply(x.data(), N, cscore.data());
  }
  if (csa) {
    const int64_t w = a.indexer.compressor.wkv.out;
    ikv.resize(N * w);
    iscore.resize(N * w);
    a.indexer.compressor.wkv.Apply(x.data(), N, ikv.data());
    a.indexer.compressor.wgate.Apply(x.data(), N, iscore.data());
    iq.resize(N * Hi * Di);
    a.indexer.wq_b.Apply(qr.data(), N, iq.data());
    iw.resize(N * Hi);
    a.indexer.weights_proj.Apply(x.data(), N, iw.data());
    for (int64_t r = 0; r < N; ++r) Rope(iq.data() + r * Hi * Di, Hi, Di, positions_[r], 1, 1.0f);
  }

  std::vector<float> o(N * H * D, 0.0f);
  const int64_t win = c_.sliding_window;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  for (size_t s = 0; s < chunks_.size(); ++s) {
    DecodeState& state = *chunks_[s].state;
    LayerState& ls = state.layers_[layer];
    const int64_t r0 = row_begin_[s], T = static_cast<int64_t>(chunks_[s].tokens.size());
    const int64_t p0 = state.length_;
    if (T == 0) continue;
    // 1. Compressors see the whole chunk first: an entry completed at p is visible to p (§3).
    if (compressed) {
      const int64_t w = a.compressor.wkv.out;
      Compress(a.compressor, ls.kv, ckv.data() + r0 * w, cscore.data() + r0 * w, T, p0);
    }
    if (csa) {
      const int64_t w = a.indexer.compressor.wkv.out;
      Compress(a.indexer.compressor, ls.index, ikv.data() + r0 * w, iscore.data() + r0 * w, T, p0);
    }
    const int m = compressed ? a.compressor.ratio : 1;
    // 2. Attention per query: window keys (ring for earlier positions, this
    //    chunk's rows otherwise) + visible compressed entries (all for HCA, the
    //    indexer's top-k for CSA), one softmax with the sink in the denominator.
    ParallelFor(T, 1, [&](int64_t t0, int64_t t1) {
      std::vector<const float*> keys;
      std::vector<float> logits, scores;
      std::vector<int64_t> order;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p = p0 + t;
        keys.clear();
        for (int64_t j = std::max<int64_t>(0, p - win + 1); j <= p; ++j)
          keys.push_back(j < p0 ? ls.window.data() + (j % win) * D : kv.data() + (r0 + (j - p0)) * D);
        const int64_t visible = compressed ? std::min<int64_t>((p + 1) / m, ls.kv.num_entries) : 0;
        if (a.kind == AttentionKind::kHca) {
          for (int64_t i = 0; i < visible; ++i) keys.push_back(ls.kv.entries.data() + i * D);
        } else if (csa && visible > 0) {
          // Lightning indexer (§2.4): I[t,s] = sum_h w_h * ReLU(q_h . K_s) * Di^-1/2, w_h = proj * Hi^-1/2.
          scores.assign(visible, 0.0f);
          const float* qt = iq.data() + (r0 + t) * Hi * Di;
          const float* wt = iw.data() + (r0 + t) * Hi;
          const float wscale = 1.0f / std::sqrt(static_cast<float>(Hi)), sscale = 1.0f / std::sqrt(static_cast<float>(Di));
          for (int64_t i = 0; i < visible; ++i) {
            const float* ki = ls.index.entries.data() + i * Di;
            float acc = 0.0f;
            for (int64_t h = 0; h < Hi; ++h) {
              float dot = 0.0f;
              for (int64_t e = 0; e < Di; ++e) dot += qt[h * Di + e] * ki[e];
              acc += std::max(dot, 0.0f) * sscale * (wt[h] * wscale);
            }
            scores[i] = acc;
          }
          const int64_t k = std::min<int64_t>(c_.index_topk, visible);
          order.resize(visible);
          std::iota(order.begin(), order.end(), 0);
          // Ties break towards the lower entry index, deterministically.
          std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t i, int64_t j) {
            return scores[i] > scores[j] || (scores[i] == scores[j] && i < j);
          });
          std::sort(order.begin(), order.begin() + k);
          for (int64_t i = 0; i < k; ++i) keys.push_back(ls.kv.entries.data() + order[i] * D);
          if (selected) (*selected)[r0 + t].assign(order.begin(), order.begin() + k);
        }
        const int64_t nk = static_cast<int64_t>(keys.size());
        logits.resize(nk);
        for (int64_t h = 0; h < H; ++h) {
          const float* qh = q.data() + (r0 + t) * H * D + h * D;
          float mx = a.sinks.data<float>()[h];
          for (int64_t j = 0; j < nk; ++j) {
            float dot = 0.0f;
            for (int64_t e = 0; e < D; ++e) dot += qh[e] * keys[j][e];
            logits[j] = dot * scale;
            mx = std::max(mx, logits[j]);
          }
          float denom = std::exp(a.sinks.data<float>()[h] - mx);
          for (int64_t j = 0; j < nk; ++j) denom += (logits[j] = std::exp(logits[j] - mx));
          float* oh = o.data() + (r0 + t) * H * D + h * D;
          for (int64_t j = 0; j < nk; ++j) {
            const float pj = logits[j] / denom;
            for (int64_t e = 0; e < D; ++e) oh[e] += pj * keys[j][e];
          }
        }
        Rope(o.data() + (r0 + t) * H * D, H, D, p, rope_kind, -1.0f);  // inverse RoPE at -p (§2.2)
      }
    });
    // 3. The chunk's window keys enter the ring.
    for (int64_t t = std::max<int64_t>(0, T - win); t < T; ++t)
      std::copy(kv.data() + (r0 + t) * D, kv.data() + (r0 + t + 1) * D, ls.window.data() + ((p0 + t) % win) * D);
  }

  // Grouped output projection: group g's heads (n_h/g of them) -> d_g, then wo_b.
  const int G = c_.o_groups;
  const int64_t per_group = H * D / G, dg = c_.o_lora_rank;
  std::vector<float> grp(N * per_group), mid(N * G * dg), part(N * dg);
  for (int g = 0; g < G; ++g) {
    for (int64_t r = 0; r < N; ++r)
      std::copy(o.data() + r * H * D + g * per_group, o.data() + r * H * D + (g + 1) * per_group,
                grp.data() + r * per_group);
    cpu::MatMul(grp.data(), N, per_group, a.wo_a.weight.data<float>() + g * dg * per_group, dg, part.data());
    for (int64_t r = 0; r < N; ++r) std::copy(part.data() + r * dg, part.data() + (r + 1) * dg, mid.data() + r * G * dg + g * dg);
  }
  out.resize(N * d);
  a.wo_b.Apply(mid.data(), N, out.data());
}

void ModelRunner::MoeBlock(int layer, const std::vector<float>& x, std::vector<float>& out,
                           std::vector<int32_t>* routes) const {
  const Moe& moe = m_.weights_.layers[layer].moe;
  const int64_t d = c_.hidden_size, I = c_.moe_intermediate, E = c_.n_routed_experts, N = rows_;
  const int K = c_.experts_per_token;
  const float limit = static_cast<float>(c_.swiglu_limit);
  std::vector<float> logits(N * E);
  cpu::MatMul(x.data(), N, d, moe.gate.data<float>(), E, logits.data());
  std::vector<int64_t> idx(N * K);
  std::vector<float> wts(N * K);
  std::vector<float> sc(E);
  std::vector<int64_t> order(E);
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t e = 0; e < E; ++e) sc[e] = std::sqrt(cpu::Softplus(logits[r * E + e]));  // §2.6
    if (moe.hash_routed) {
      for (int k = 0; k < K; ++k) idx[r * K + k] = moe.tid2eid.data<int64_t>()[tokens_[r] * K + k];
    } else {
      const float* bias = moe.bias.data<float>();
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int64_t i, int64_t j) {
        const float a = sc[i] + bias[i], b = sc[j] + bias[j];
        return a > b || (a == b && i < j);
      });
      for (int k = 0; k < K; ++k) idx[r * K + k] = order[k];
    }
    float sum = 0.0f;
    for (int k = 0; k < K; ++k) sum += sc[idx[r * K + k]];
    for (int k = 0; k < K; ++k)
      wts[r * K + k] = sc[idx[r * K + k]] / (sum + 1e-20f) * static_cast<float>(c_.routed_scaling_factor);
  }
  if (routes) routes->assign(idx.begin(), idx.end());
  // Rows grouped by expert; each (row, slot) result lands in its own buffer so
  // the final sum runs in slot order whatever the thread schedule.
  std::vector<std::vector<std::pair<int64_t, int>>> by_expert(E);
  for (int64_t r = 0; r < N; ++r)
    for (int k = 0; k < K; ++k) by_expert[idx[r * K + k]].push_back({r, k});
  std::vector<float> slot_out(N * K * d, 0.0f);
  auto run_expert = [&](const Expert& ex, const float* xin, int64_t n, float* y) {
    std::vector<float> g(n * I), u(n * I);
    ex.w1.Apply(xin, n, g.data());
    ex.w3.Apply(xin, n, u.data());
    for (int64_t i = 0; i < n * I; ++i) {
      float gi = g[i], ui = u[i];
      if (limit > 0) {
        gi = std::min(gi, limit);
        ui = std::clamp(ui, -limit, limit);
      }
      g[i] = cpu::Silu(gi) * ui;
    }
    ex.w2.Apply(g.data(), n, y);
  };
  ParallelFor(E, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const auto& rows = by_expert[e];
      if (rows.empty()) continue;
      const int64_t n = static_cast<int64_t>(rows.size());
      std::vector<float> xin(n * d), y(n * d);
      for (int64_t i = 0; i < n; ++i) std::copy(x.data() + rows[i].first * d, x.data() + (rows[i].first + 1) * d, xin.data() + i * d);
      run_expert(moe.experts[e], xin.data(), n, y.data());
      for (int64_t i = 0; i < n; ++i) {
        const auto [r, k] = rows[i];
        const float w = wts[r * K + k];
        float* dst = slot_out.data() + (r * K + k) * d;
        for (int64_t j = 0; j < d; ++j) dst[j] = y[i * d + j] * w;
      }
    }
  });
  out.assign(N * d, 0.0f);
  for (int64_t r = 0; r < N; ++r)
    for (int k = 0; k < K; ++k)
      for (int64_t j = 0; j < d; ++j) out[r * d + j] += slot_out[(r * K + k) * d + j];
  if (moe.has_shared) {
    std::vector<float> y(N * d);
    run_expert(moe.shared, x.data(), N, y.data());
    for (int64_t i = 0; i < N * d; ++i) out[i] += y[i];
  }
}

std::vector<float> ModelRunner::Run(StepOutputs* outputs) {
  const int hc = c_.hc_mult;
  const int64_t d = c_.hidden_size, V = c_.vocab_size;
  const float eps = static_cast<float>(c_.rms_norm_eps);
  std::vector<float> X(rows_ * hc * d);
  for (int64_t r = 0; r < rows_; ++r) {
    const float* e = m_.weights_.embed.data<float>() + tokens_[r] * d;
    for (int j = 0; j < hc; ++j) std::copy(e, e + d, X.data() + (r * hc + j) * d);
  }
  std::vector<float> u, post, comb, xn(rows_ * d), F;
  for (int l = 0; l < c_.num_layers; ++l) {
    const Layer& L = m_.weights_.layers[l];
    HcPre(L.attn_hc, X, u, post, comb);
    cpu::RmsNorm(u.data(), rows_, d, L.attn_norm.data<float>(), eps, xn.data());
    std::vector<std::vector<int32_t>> selected;
    const bool want_sel = outputs && outputs->capture_selection;
    if (want_sel) selected.resize(rows_);
    AttentionBlock(l, xn, F, want_sel ? &selected : nullptr);
    if (want_sel) outputs->selected.push_back(std::move(selected));
    HcPost(F, post, comb, X);
    HcPre(L.ffn_hc, X, u, post, comb);
    cpu::RmsNorm(u.data(), rows_, d, L.ffn_norm.data<float>(), eps, xn.data());
    std::vector<int32_t> routes;
    const bool want_routes = outputs && outputs->capture_routes;
    MoeBlock(l, xn, F, want_routes ? &routes : nullptr);
    if (want_routes) outputs->routes.push_back(std::move(routes));
    HcPost(F, post, comb, X);
    if (outputs && outputs->capture_hidden) outputs->hidden.push_back(X);
  }
  // hc_head (§2.1.7): y = sum_j w_j X_j with w = sigmoid(mix*scale + base) + eps.
  const HyperConnection& hh = m_.weights_.hc_head;
  std::vector<float> mixes(rows_ * hc), y(rows_ * d, 0.0f);
  cpu::MatMul(X.data(), rows_, hc * d, hh.fn.data<float>(), hc, mixes.data());
  for (int64_t r = 0; r < rows_; ++r) {
    const float* xr = X.data() + r * hc * d;
    float ss = 0.0f;
    for (int64_t i = 0; i < hc * d; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hc * d) + eps);
    for (int j = 0; j < hc; ++j) {
      const float w = cpu::Sigmoid(mixes[r * hc + j] * inv * hh.scale.data<float>()[0] + hh.base.data<float>()[j]) +
                      static_cast<float>(c_.hc_eps);
      for (int64_t i = 0; i < d; ++i) y[r * d + i] += w * xr[j * d + i];
    }
  }
  cpu::RmsNorm(y.data(), rows_, d, m_.weights_.norm.data<float>(), eps, y.data());
  std::vector<float> logits(rows_ * V);
  m_.weights_.head.Apply(y.data(), rows_, logits.data());
  for (const auto& ch : chunks_) ch.state->length_ += static_cast<int64_t>(ch.tokens.size());
  return logits;
}

absl::StatusOr<std::vector<float>> Model::Step(absl::Span<const Chunk> chunks, StepOutputs* outputs) const {
  for (size_t s = 0; s < chunks.size(); ++s) {
    if (chunks[s].state == nullptr) return absl::InvalidArgumentError(absl::StrCat("chunk ", s, " has no state"));
    if (static_cast<int>(chunks[s].state->layers_.size()) != config_.num_layers)
      return absl::InvalidArgumentError(absl::StrCat("chunk ", s, "'s state belongs to another model"));
    for (size_t j = s + 1; j < chunks.size(); ++j)
      if (chunks[j].state == chunks[s].state)
        return absl::InvalidArgumentError(absl::StrCat("chunks ", s, " and ", j, " share one state"));
    for (int64_t t : chunks[s].tokens)
      if (t < 0 || t >= config_.vocab_size)
        return absl::InvalidArgumentError(absl::StrCat("chunk ", s, ": token id ", t, " is outside the vocabulary [0, ",
                                                       config_.vocab_size, ")"));
  }
  ModelRunner runner(*this, chunks);
  return runner.Run(outputs);
}

}  // namespace retort::v4
