// Vocabulary-chunked LM-head losses (see losses.h for the algorithm).
#include "learner/losses/losses.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "model/base/logging.h"
#include "model/base/thread_pool.h"

namespace retort::losses {
namespace {

constexpr int64_t kRowGrain = 4;  // rows per ParallelFor task (a row is a whole chunk)

// z[R, C] = h[R, D] · w[C, D]ᵀ
void ChunkLogits(const float* h, int64_t rows, int64_t dim, const float* w, int64_t cols,
                 float* z) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows),
              static_cast<int>(cols), static_cast<int>(dim), 1.0f, h, static_cast<int>(dim), w,
              static_cast<int>(dim), 0.0f, z, static_cast<int>(cols));
}

// dh[R, D] += dz[R, C] · w[C, D];  dw[C, D] += dz[R, C]ᵀ · h[R, D]
void ChunkBackward(const float* dz, int64_t rows, int64_t cols, int64_t dim, const float* h,
                   const float* w, float* dh, float* dw) {
  const int r = static_cast<int>(rows), c = static_cast<int>(cols), d = static_cast<int>(dim);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r, d, c, 1.0f, dz, c, w, d, 1.0f, dh, d);
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, c, d, r, 1.0f, dz, c, h, d, 1.0f, dw, d);
}

void ParallelRows(int64_t rows, const std::function<void(int64_t)>& fn) {
  ThreadPool::Default().ParallelFor(rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  });
}

// Online log-sum-exp state of one row: Σ exp(z − max) with a running max.
struct RunningLse {
  float max = -std::numeric_limits<float>::infinity();
  double sum = 0;
  // Rescales the sum to a new max if `chunk_max` exceeds the current one.
  void Raise(float chunk_max, double* also_scaled = nullptr) {
    if (chunk_max > max) {
      const double scale = std::exp(static_cast<double>(max) - chunk_max);
      sum *= scale;
      if (also_scaled) *also_scaled *= scale;
      max = chunk_max;
    }
  }
  double Value() const { return static_cast<double>(max) + std::log(sum); }
};

float RowMax(const float* row, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, row[j]);
  return m;
}

absl::Status CheckOptions(const ChunkOptions& o) {
  if (o.vocab_chunk < 1 || o.token_block < 1) {
    return absl::InvalidArgumentError(absl::StrCat("chunk options: vocab_chunk (", o.vocab_chunk,
                                                   ") and token_block (", o.token_block,
                                                   ") must be >= 1"));
  }
  return absl::OkStatus();
}

absl::Status CheckHead(const LmHead& head, const char* what) {
  if (head.tokens < 0 || head.dim < 1 || head.vocab < 1) {
    return absl::InvalidArgumentError(absl::StrCat(what,
                                                   ": need tokens >= 0, dim >= 1, vocab >= 1; got ",
                                                   head.tokens, ", ", head.dim, ", ", head.vocab));
  }
  if (static_cast<int64_t>(head.hidden.size()) != head.tokens * head.dim) {
    return absl::InvalidArgumentError(absl::StrCat(what, ".hidden has ", head.hidden.size(),
                                                   " elements, expected [", head.tokens, ", ",
                                                   head.dim, "]"));
  }
  if (static_cast<int64_t>(head.weight.size()) != head.vocab * head.dim) {
    return absl::InvalidArgumentError(absl::StrCat(what, ".weight has ", head.weight.size(),
                                                   " elements, expected [", head.vocab, ", ",
                                                   head.dim, "]"));
  }
  return absl::OkStatus();
}

// OK and `*want` = whether gradients are requested.
absl::Status CheckGrads(const HeadGrads& g, const LmHead& head, bool* want) {
  *want = !g.hidden.empty() || !g.weight.empty();
  if (!*want) return absl::OkStatus();
  if (static_cast<int64_t>(g.hidden.size()) != head.tokens * head.dim ||
      static_cast<int64_t>(g.weight.size()) != head.vocab * head.dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "grads: hidden/weight have ", g.hidden.size(), "/", g.weight.size(), " elements, expected ",
        head.tokens * head.dim, "/", head.vocab * head.dim, " (or both empty)"));
  }
  return absl::OkStatus();
}

absl::Status CheckCoeff(absl::Span<const float> coeff, int64_t tokens, const char* field) {
  if (static_cast<int64_t>(coeff.size()) != tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " has ", coeff.size(), " elements, expected one per token (", tokens, ")"));
  }
  for (size_t t = 0; t < coeff.size(); ++t) {
    if (!std::isfinite(coeff[t])) {
      return absl::InvalidArgumentError(absl::StrCat(field, "[", t, "] is not finite"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LogProbResult> WeightedLogProbLoss(const LmHead& head,
                                                  absl::Span<const int32_t> targets,
                                                  absl::Span<const float> coeff, HeadGrads grads,
                                                  const ChunkOptions& options) {
  bool want_grads = false;
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  if (absl::Status s = CheckHead(head, "head"); !s.ok()) return s;
  if (absl::Status s = CheckGrads(grads, head, &want_grads); !s.ok()) return s;
  if (absl::Status s = CheckCoeff(coeff, head.tokens, "coeff"); !s.ok()) return s;
  if (static_cast<int64_t>(targets.size()) != head.tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "targets has ", targets.size(), " elements, expected one per token (", head.tokens, ")"));
  }
  for (size_t t = 0; t < targets.size(); ++t) {
    if (targets[t] < 0 || targets[t] >= head.vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          "targets[", t, "] = ", targets[t], " is outside the vocabulary [0, ", head.vocab, ")"));
    }
  }

  const int64_t T = head.tokens, D = head.dim, V = head.vocab;
  const int64_t block = std::min(options.token_block, std::max<int64_t>(T, 1));
  const int64_t chunk = std::min(options.vocab_chunk, V);
  std::vector<float> z(static_cast<size_t>(block * chunk));
  std::vector<RunningLse> lse(static_cast<size_t>(block));
  std::vector<float> target_logit(static_cast<size_t>(block));
  LogProbResult result;
  result.logprob.resize(static_cast<size_t>(T));

  for (int64_t r0 = 0; r0 < T; r0 += block) {
    const int64_t R = std::min(block, T - r0);
    const float* h = head.hidden.data() + r0 * D;
    std::fill(lse.begin(), lse.end(), RunningLse{});
    // Pass 1: log-sum-exp and the target logit.
    for (int64_t c0 = 0; c0 < V; c0 += chunk) {
      const int64_t C = std::min(chunk, V - c0);
      ChunkLogits(h, R, D, head.weight.data() + c0 * D, C, z.data());
      ParallelRows(R, [&](int64_t i) {
        const float* row = z.data() + i * C;
        RunningLse& l = lse[i];
        l.Raise(RowMax(row, C));
        double s = 0;
        for (int64_t j = 0; j < C; ++j) s += std::exp(row[j] - l.max);
        l.sum += s;
        const int64_t y = targets[r0 + i];
        if (y >= c0 && y < c0 + C) target_logit[i] = row[y - c0];
      });
    }
    bool any = false;
    for (int64_t i = 0; i < R; ++i) {
      const double lp = static_cast<double>(target_logit[i]) - lse[i].Value();
      result.logprob[r0 + i] = lp;
      result.loss += static_cast<double>(coeff[r0 + i]) * lp;
      any = any || coeff[r0 + i] != 0;
    }
    if (!want_grads || !any) continue;
    // Pass 2: dL/dz = coeff (onehot(y) − p), then the two sgemms.
    for (int64_t c0 = 0; c0 < V; c0 += chunk) {
      const int64_t C = std::min(chunk, V - c0);
      const float* w = head.weight.data() + c0 * D;
      ChunkLogits(h, R, D, w, C, z.data());
      ParallelRows(R, [&](int64_t i) {
        float* row = z.data() + i * C;
        const float c = coeff[r0 + i];
        if (c == 0) {
          std::fill(row, row + C, 0.0f);
          return;
        }
        const float l = static_cast<float>(lse[i].Value());
        for (int64_t j = 0; j < C; ++j) row[j] = -c * std::exp(row[j] - l);
        const int64_t y = targets[r0 + i];
        if (y >= c0 && y < c0 + C) row[y - c0] += c;
      });
      ChunkBackward(z.data(), R, C, D, h, w, grads.hidden.data() + r0 * D,
                    grads.weight.data() + c0 * D);
    }
  }
  return result;
}

absl::StatusOr<LogProbResult> TokenCrossEntropy(const LmHead& head,
                                                absl::Span<const int32_t> targets,
                                                absl::Span<const float> mask, HeadGrads grads,
                                                const ChunkOptions& options) {
  if (static_cast<int64_t>(mask.size()) != head.tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "mask has ", mask.size(), " elements, expected one per token (", head.tokens, ")"));
  }
  double count = 0;
  for (size_t t = 0; t < mask.size(); ++t) {
    if (mask[t] != 0 && mask[t] != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("mask[", t, "] = ", mask[t], ", expected 0 or 1"));
    }
    count += mask[t];
  }
  std::vector<float> coeff(mask.size(), 0.0f);
  if (count > 0) {
    for (size_t t = 0; t < mask.size(); ++t) coeff[t] = static_cast<float>(-mask[t] / count);
  }
  return WeightedLogProbLoss(head, targets, coeff, grads, options);
}

std::vector<float> MaskedMeanCoefficients(absl::Span<const float> mask,
                                          absl::Span<const float> weight) {
  CHECK(weight.empty() || weight.size() == mask.size())
      << "weight has " << weight.size() << " elements, mask " << mask.size();
  double count = 0;
  for (float m : mask) count += m;
  std::vector<float> coeff(mask.size(), 0.0f);
  if (count == 0) return coeff;
  for (size_t t = 0; t < mask.size(); ++t) {
    coeff[t] = static_cast<float>((weight.empty() ? 1.0 : weight[t]) * mask[t] / count);
  }
  return coeff;
}

absl::StatusOr<ReverseKlResult> ReverseKlLoss(const LmHead& student, const TeacherHead& teacher,
                                              absl::Span<const float> coeff, HeadGrads grads,
                                              const ChunkOptions& options) {
  bool want_grads = false;
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  if (absl::Status s = CheckHead(student, "student"); !s.ok()) return s;
  const LmHead teacher_head{teacher.hidden, teacher.weight, student.tokens, teacher.dim,
                            student.vocab};
  if (absl::Status s = CheckHead(teacher_head, "teacher"); !s.ok()) return s;
  if (!teacher.norm_weight.empty() &&
      static_cast<int64_t>(teacher.norm_weight.size()) != teacher.dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("teacher.norm_weight has ", teacher.norm_weight.size(),
                     " elements, expected dim ", teacher.dim, " (or empty)"));
  }
  if (absl::Status s = CheckGrads(grads, student, &want_grads); !s.ok()) return s;
  if (absl::Status s = CheckCoeff(coeff, student.tokens, "coeff"); !s.ok()) return s;

  const int64_t T = student.tokens, Ds = student.dim, Dt = teacher.dim, V = student.vocab;
  const int64_t block = std::min(options.token_block, std::max<int64_t>(T, 1));
  const int64_t chunk = std::min(options.vocab_chunk, V);
  std::vector<float> zs(static_cast<size_t>(block * chunk)), zt(static_cast<size_t>(block * chunk));
  std::vector<float> normed;  // the teacher block after its final norm
  if (!teacher.norm_weight.empty()) normed.resize(static_cast<size_t>(block * Dt));
  std::vector<RunningLse> lse_s(static_cast<size_t>(block)), lse_t(static_cast<size_t>(block));
  // Running Σ exp(z_s − max_s)(z_s − z_t): scaled with lse_s's sum.
  std::vector<double> cross(static_cast<size_t>(block));
  std::vector<double> log_norm_s(static_cast<size_t>(block)),
      log_norm_t(static_cast<size_t>(block));
  ReverseKlResult result;
  result.kl.resize(static_cast<size_t>(T));

  for (int64_t r0 = 0; r0 < T; r0 += block) {
    const int64_t R = std::min(block, T - r0);
    const float* hs = student.hidden.data() + r0 * Ds;
    const float* ht = teacher.hidden.data() + r0 * Dt;
    if (!normed.empty()) {
      ParallelRows(R, [&](int64_t i) {
        const float* x = ht + i * Dt;
        double sq = 0;
        for (int64_t k = 0; k < Dt; ++k) sq += static_cast<double>(x[k]) * x[k];
        const float inv =
            static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(Dt) + teacher.norm_eps));
        float* out = normed.data() + i * Dt;
        for (int64_t k = 0; k < Dt; ++k) out[k] = x[k] * inv * teacher.norm_weight[k];
      });
      ht = normed.data();
    }
    std::fill(lse_s.begin(), lse_s.end(), RunningLse{});
    std::fill(lse_t.begin(), lse_t.end(), RunningLse{});
    std::fill(cross.begin(), cross.end(), 0.0);
    // Pass 1: both log-sum-exps and Σ p_s (z_s − z_t), online.
    for (int64_t c0 = 0; c0 < V; c0 += chunk) {
      const int64_t C = std::min(chunk, V - c0);
      ChunkLogits(hs, R, Ds, student.weight.data() + c0 * Ds, C, zs.data());
      ChunkLogits(ht, R, Dt, teacher.weight.data() + c0 * Dt, C, zt.data());
      ParallelRows(R, [&](int64_t i) {
        const float* s_row = zs.data() + i * C;
        const float* t_row = zt.data() + i * C;
        RunningLse& ls = lse_s[i];
        RunningLse& lt = lse_t[i];
        ls.Raise(RowMax(s_row, C), &cross[i]);
        lt.Raise(RowMax(t_row, C));
        double sum_s = 0, sum_t = 0, sum_cross = 0;
        for (int64_t j = 0; j < C; ++j) {
          const double e = std::exp(s_row[j] - ls.max);
          sum_s += e;
          sum_cross += e * (static_cast<double>(s_row[j]) - t_row[j]);
          sum_t += std::exp(t_row[j] - lt.max);
        }
        ls.sum += sum_s;
        lt.sum += sum_t;
        cross[i] += sum_cross;
      });
    }
    bool any = false;
    for (int64_t i = 0; i < R; ++i) {
      log_norm_s[i] = lse_s[i].Value();
      log_norm_t[i] = lse_t[i].Value();
      const double kl = cross[i] / lse_s[i].sum - log_norm_s[i] + log_norm_t[i];
      result.kl[r0 + i] = kl;
      result.loss += static_cast<double>(coeff[r0 + i]) * kl;
      any = any || coeff[r0 + i] != 0;
    }
    if (!want_grads || !any) continue;
    // Pass 2: dL/dz_s = coeff p_s (log p_s − log p_t − KL), written over zs.
    for (int64_t c0 = 0; c0 < V; c0 += chunk) {
      const int64_t C = std::min(chunk, V - c0);
      const float* ws = student.weight.data() + c0 * Ds;
      ChunkLogits(hs, R, Ds, ws, C, zs.data());
      ChunkLogits(ht, R, Dt, teacher.weight.data() + c0 * Dt, C, zt.data());
      ParallelRows(R, [&](int64_t i) {
        float* s_row = zs.data() + i * C;
        const float* t_row = zt.data() + i * C;
        const float c = coeff[r0 + i];
        if (c == 0) {
          std::fill(s_row, s_row + C, 0.0f);
          return;
        }
        const float lns = static_cast<float>(log_norm_s[i]);
        const float lnt = static_cast<float>(log_norm_t[i]);
        const float kl = static_cast<float>(result.kl[r0 + i]);
        for (int64_t j = 0; j < C; ++j) {
          const float log_ps = s_row[j] - lns;
          const float log_pt = t_row[j] - lnt;
          s_row[j] = c * std::exp(log_ps) * (log_ps - log_pt - kl);
        }
      });
      ChunkBackward(zs.data(), R, C, Ds, hs, ws, grads.hidden.data() + r0 * Ds,
                    grads.weight.data() + c0 * Ds);
    }
  }
  return result;
}

}  // namespace retort::losses
