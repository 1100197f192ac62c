// The V4 model on the device against the Hugging Face reference fixtures
// (tests/fixtures/v4 a, b, q) and against the CPU model: full forwards in one
// batched step, ragged prefill + batched decode, chunked prefill at odd chunk
// sizes, the decode CUDA graph, and deployment numerics (reported). Skips
// without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "model/io/safetensors.h"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/v4/cuda_model.h"
#include "model/v4/model.h"
#include "tests/v4/reference_fixture.h"

namespace retort::v4 {
namespace {

// Exact numerics: within 1e-3 absolute of the reference logits (the issue's
// bound; the CPU path holds 1e-4, the device differs by summation order).
constexpr float kTol = 1e-3f;

#define SKIP_WITHOUT_CUDA() \
  if (cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device"

using testing::MaxAbsDiff;

// The reference fixture and its model on the device.
struct Fixture : testing::ReferenceFixture {
  std::unique_ptr<CudaModel> dev;  // null when creating it failed (already reported)
};

Fixture LoadFixture(const std::string& name, Numerics numerics = Numerics::kExact, CudaModelOptions o = {}) {
  Fixture f;
  static_cast<testing::ReferenceFixture&>(f) = testing::LoadReferenceFixture(name);
  if (!f.model) return f;
  o.max_length = 256;
  o.numerics = numerics;
  auto d = CudaModel::Create(*f.model, o);
  EXPECT_TRUE(d.ok()) << d.status();
  if (d.ok()) f.dev = std::move(d).value();
  return f;
}

int64_t ArgMax(const float* x, int64_t n) { return std::max_element(x, x + n) - x; }

class CudaFixtureTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaFixtureTest, BatchedFullForwardMatchesReference) {
  SKIP_WITHOUT_CUDA();
  Fixture f = LoadFixture(GetParam());
  ASSERT_NE(f.dev, nullptr);
  Tensor logits = *f.expected->Get("logits");
  std::vector<CudaModel::Chunk> chunks;
  for (int64_t b = 0; b < f.B; ++b) {
    auto seq = f.dev->NewSequence();
    ASSERT_TRUE(seq.ok()) << seq.status();
    chunks.push_back({*seq, absl::MakeConstSpan(f.ids.data<int64_t>() + b * f.T, f.T)});
  }
  auto got = f.dev->Step(chunks);
  ASSERT_TRUE(got.ok()) << got.status();
  const float err = MaxAbsDiff(got->data(), logits.data<float>(), f.B * f.T * f.V);
  EXPECT_LT(err, kTol) << GetParam();
  std::printf("%s cuda exact: full-forward logits max |diff| %.3g (bound %.0e)\n", GetParam().c_str(), err, kTol);
}

TEST_P(CudaFixtureTest, RaggedPrefillThenBatchedDecodeMatchesReference) {
  SKIP_WITHOUT_CUDA();
  Fixture f = LoadFixture(GetParam());
  ASSERT_NE(f.dev, nullptr);
  Tensor dec = *f.expected->Get("decode_logits");
  Tensor logits = *f.expected->Get("logits");
  const int64_t steps = dec.dim(1), P = f.T - steps;
  std::vector<int> seqs;
  std::vector<int64_t> pos(f.B);
  std::vector<CudaModel::Chunk> chunks;
  for (int64_t b = 0; b < f.B; ++b) {
    seqs.push_back(*f.dev->NewSequence());
    pos[b] = P - 5 * b;  // ragged prefill lengths
    chunks.push_back({seqs[b], absl::MakeConstSpan(f.ids.data<int64_t>() + b * f.T, pos[b])});
  }
  ASSERT_TRUE(f.dev->Step(chunks).ok());
  float worst = 0.0f;
  while (true) {
    chunks.clear();
    std::vector<int64_t> which;
    for (int64_t b = 0; b < f.B; ++b)
      if (pos[b] < f.T) {
        chunks.push_back({seqs[b], absl::MakeConstSpan(f.ids.data<int64_t>() + b * f.T + pos[b], 1)});
        which.push_back(b);
      }
    if (chunks.empty()) break;
    auto got = f.dev->Step(chunks);
    ASSERT_TRUE(got.ok()) << got.status();
    for (size_t i = 0; i < which.size(); ++i) {
      const int64_t b = which[i], p = pos[b];
      const float* ref = p >= P ? dec.data<float>() + (b * steps + (p - P)) * f.V
                                : logits.data<float>() + (b * f.T + p) * f.V;
      const float err = MaxAbsDiff(got->data() + i * f.V, ref, f.V);
      worst = std::max(worst, err);
      EXPECT_LT(err, kTol) << GetParam() << " batch " << b << " position " << p;
      ++pos[b];
    }
  }
  std::printf("%s cuda exact: ragged prefill + decode, worst max |diff| %.3g\n", GetParam().c_str(), worst);
}

// Chunked prefill at odd chunk sizes (1, 7, 19, the rest) equals one prefill.
TEST_P(CudaFixtureTest, OddChunkedPrefillMatchesReference) {
  SKIP_WITHOUT_CUDA();
  Fixture f = LoadFixture(GetParam());
  ASSERT_NE(f.dev, nullptr);
  Tensor logits = *f.expected->Get("logits");
  const int seq = *f.dev->NewSequence();
  const int64_t* ids = f.ids.data<int64_t>();
  int64_t p = 0;
  float worst = 0.0f;
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{19}, f.T}) {
    n = std::min(n, f.T - p);
    if (n == 0) break;
    std::vector<CudaModel::Chunk> chunks = {{seq, absl::MakeConstSpan(ids + p, n)}};
    auto got = f.dev->Step(chunks);
    ASSERT_TRUE(got.ok()) << got.status();
    worst = std::max(worst, MaxAbsDiff(got->data(), logits.data<float>() + p * f.V, n * f.V));
    p += n;
  }
  EXPECT_LT(worst, kTol) << GetParam();
  std::printf("%s cuda exact: chunks 1/7/19/rest, worst max |diff| %.3g\n", GetParam().c_str(), worst);
}

// Deployment numerics: reported, with loose bounds on top-1 agreement against
// the reference (which runs the dequantized weights on unquantized
// activations). a and b are bf16 checkpoints, so deployment rounds their
// weights and activations to bf16; q ships FP8 matrices, which deployment
// keeps FP8 — exact, they are the checkpoint's values — and multiplies with
// activations quantized to e4m3 per 1 x 128 block (V4's deployment), or with
// bf16 activations (W8A16, fp8_activations = false). The fixtures are tiny
// random models where one bf16 ulp flips router and indexer choices (rounding
// only the weights already moves their logits by 0.9-2.7, as the PyTorch
// baseline's check shows), so bf16 agrees on 0.83-0.92 of the rows, and the
// e4m3 activation rounding (2^-4 relative per value, at every FP8 projection)
// moves them further. The bounds only catch a broken path (chance agreement
// is ~1/vocab).
void ReportDeployment(const std::string& name, bool fp8_activations, double bound) {
  CudaModelOptions o;
  o.fp8_activations = fp8_activations;
  Fixture f = LoadFixture(name, Numerics::kDeployment, o);
  ASSERT_NE(f.dev, nullptr);
  Tensor logits = *f.expected->Get("logits");
  std::vector<CudaModel::Chunk> chunks;
  for (int64_t b = 0; b < f.B; ++b)
    chunks.push_back({*f.dev->NewSequence(), absl::MakeConstSpan(f.ids.data<int64_t>() + b * f.T, f.T)});
  auto got = f.dev->Step(chunks);
  ASSERT_TRUE(got.ok()) << got.status();
  const int64_t rows = f.B * f.T;
  int64_t agree = 0;
  for (int64_t r = 0; r < rows; ++r)
    agree += ArgMax(got->data() + r * f.V, f.V) == ArgMax(logits.data<float>() + r * f.V, f.V);
  const float err = MaxAbsDiff(got->data(), logits.data<float>(), rows * f.V);
  const double frac = static_cast<double>(agree) / rows;
  std::printf("%s cuda deployment%s: top-1 agreement %.4f (%ld/%ld), max logit |diff| %.3g\n", name.c_str(),
              fp8_activations ? "" : " (W8A16)", frac, static_cast<long>(agree), static_cast<long>(rows), err);
  EXPECT_GE(frac, bound) << name;
}

TEST_P(CudaFixtureTest, DeploymentNumericsReport) {
  SKIP_WITHOUT_CUDA();
  const bool fp8 = GetParam() == "q";  // a and b have no FP8 matrices: one report
  ReportDeployment(GetParam(), true, fp8 ? 0.3 : 0.6);
  if (fp8) ReportDeployment(GetParam(), false, 0.6);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaFixtureTest, ::testing::Values("a", "b", "q"));

// The decode graph replays the same math as eager steps (q has MXFP4 experts;
// graphs need them: the dense-expert path syncs on the host).
TEST(CudaModelTest, DecodeGraphMatchesEagerSteps) {
  SKIP_WITHOUT_CUDA();
  Fixture f = LoadFixture("q");
  ASSERT_NE(f.dev, nullptr);
  const int64_t* ids = f.ids.data<int64_t>();
  const int64_t P = 40;
  std::vector<int> eager, graph;
  for (int64_t b = 0; b < f.B; ++b) {
    eager.push_back(*f.dev->NewSequence());
    graph.push_back(*f.dev->NewSequence());
    for (int s : {eager.back(), graph.back()}) {
      std::vector<CudaModel::Chunk> c = {{s, absl::MakeConstSpan(ids + b * f.T, P)}};
      ASSERT_TRUE(f.dev->Step(c).ok());
    }
  }
  float worst = 0.0f;
  for (int64_t p = P; p < P + 12; ++p) {
    std::vector<CudaModel::Chunk> chunks;
    std::vector<int64_t> toks;
    for (int64_t b = 0; b < f.B; ++b) {
      chunks.push_back({eager[b], absl::MakeConstSpan(ids + b * f.T + p, 1)});
      toks.push_back(ids[b * f.T + p]);
    }
    auto want = f.dev->Step(chunks);
    ASSERT_TRUE(want.ok()) << want.status();
    auto got_dev = f.dev->DecodeGraph(graph, toks);
    ASSERT_TRUE(got_dev.ok()) << got_dev.status();
    std::vector<float> got(f.B * f.V);
    ASSERT_TRUE(cuda::CopyToHost(got.data(), *got_dev, sizeof(float) * got.size()).ok());
    worst = std::max(worst, MaxAbsDiff(got.data(), want->data(), f.B * f.V));
  }
  EXPECT_LT(worst, 1e-5f);
  std::printf("decode graph vs eager: max |diff| %.3g over 12 steps (call 1 eager, 2 capture, 3+ replay)\n", worst);
}

TEST(CudaModelTest, BadInputIsRejectedAndChangesNothing) {
  SKIP_WITHOUT_CUDA();
  CudaModelOptions two;
  two.max_sequences = 2;
  Fixture f = LoadFixture("b", Numerics::kExact, two);
  ASSERT_NE(f.dev, nullptr);
  const int s = *f.dev->NewSequence();
  const std::vector<int64_t> ok = {1, 2, 3}, bad = {1, f.V, 3};
  std::vector<CudaModel::Chunk> c = {{s, absl::MakeConstSpan(bad)}};
  EXPECT_EQ(f.dev->Step(c).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f.dev->Length(s), 0);
  c = {{s + 1, absl::MakeConstSpan(ok)}};
  EXPECT_EQ(f.dev->Step(c).status().code(), absl::StatusCode::kInvalidArgument);  // not in use
  c = {{s, absl::MakeConstSpan(ok)}, {s, absl::MakeConstSpan(ok)}};
  EXPECT_EQ(f.dev->Step(c).status().code(), absl::StatusCode::kInvalidArgument);  // one sequence twice
  std::vector<int64_t> tooLong(257, 1);
  c = {{s, absl::MakeConstSpan(tooLong)}};
  EXPECT_EQ(f.dev->Step(c).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(f.dev->NewSequence().ok());
  EXPECT_EQ(f.dev->NewSequence().status().code(), absl::StatusCode::kResourceExhausted);
  c = {{s, absl::MakeConstSpan(ok)}};
  ASSERT_TRUE(f.dev->Step(c).ok());
  EXPECT_EQ(f.dev->Length(s), 3);
}

// Forked sequences (CopySequence) continue exactly like the original.
TEST(CudaModelTest, CopySequenceForksState) {
  SKIP_WITHOUT_CUDA();
  Fixture f = LoadFixture("q");
  ASSERT_NE(f.dev, nullptr);
  const int64_t* ids = f.ids.data<int64_t>();
  const int a = *f.dev->NewSequence(), b = *f.dev->NewSequence();
  std::vector<CudaModel::Chunk> c = {{a, absl::MakeConstSpan(ids, 33)}};
  ASSERT_TRUE(f.dev->Step(c).ok());
  ASSERT_TRUE(f.dev->CopySequence(a, b).ok());
  EXPECT_EQ(f.dev->Length(b), 33);
  c = {{a, absl::MakeConstSpan(ids + 33, 9)}};
  auto x = f.dev->Step(c);
  c = {{b, absl::MakeConstSpan(ids + 33, 9)}};
  auto y = f.dev->Step(c);
  ASSERT_TRUE(x.ok() && y.ok());
  EXPECT_EQ(MaxAbsDiff(x->data(), y->data(), 9 * f.V), 0.0f);
}

// A two-layer (CSA, HCA) random model small enough for quick device tests.
io::V4Config SmallRandomConfig() {
  io::V4Config c;
  c.vocab_size = 512, c.hidden_size = 256, c.num_layers = 2, c.num_heads = 4, c.head_dim = 64, c.rope_dim = 16;
  c.q_lora_rank = 128, c.o_groups = 2, c.o_lora_rank = 64, c.n_routed_experts = 8, c.n_shared_experts = 1;
  c.experts_per_token = 2, c.moe_intermediate = 128, c.routed_scaling_factor = 1.5, c.swiglu_limit = 10;
  c.sliding_window = 16, c.index_n_heads = 4, c.index_head_dim = 32, c.index_topk = 8;
  c.attention = {io::AttentionKind::kCsa, io::AttentionKind::kHca};
  c.compress_ratio = {4, 16};
  c.hash_routed = {false, false};
  c.max_position_embeddings = 4096;
  return c;
}

// Deployment prefill with enough rows per expert takes the tensor-core MXFP4
// path (bf16 activations). Against the same random model in exact numerics
// (f32 weights whose bf16 rounding the deployment model holds, the same MXFP4
// experts), its relative L2 error over the logits must stay within 1.5x (+1%)
// of the deployment model's with the experts on the CUDA-core kernels: bf16
// flips router and indexer choices in a random model either way (~9% here),
// while a wrong tile or permutation gives O(1).
TEST(CudaModelTest, DeploymentTensorCorePrefillTracksExact) {
  SKIP_WITHOUT_CUDA();
  io::V4Config c = SmallRandomConfig();
  std::vector<int64_t> ids(300);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>((i * 131 + 7) % c.vocab_size);
  std::vector<float> got[3];  // exact, deployment (tensor cores), deployment (CUDA cores)
  for (int mode = 0; mode < 3; ++mode) {
    CudaModelOptions o;
    o.max_sequences = 1, o.max_length = 512;
    o.numerics = mode == 0 ? Numerics::kExact : Numerics::kDeployment;
    o.tensor_core_experts = mode == 1;
    auto m = CudaModel::CreateRandom(c, o, 3);
    ASSERT_TRUE(m.ok()) << m.status();
    const int s = *(*m)->NewSequence();
    std::vector<CudaModel::Chunk> ch = {{s, absl::MakeConstSpan(ids)}};
    auto r = (*m)->Step(ch);
    ASSERT_TRUE(r.ok()) << r.status();
    got[mode] = *r;
  }
  auto rel = [&](const std::vector<float>& a) {
    double num = 0, den = 0;
    for (size_t i = 0; i < got[0].size(); ++i) {
      num += (a[i] - got[0][i]) * (a[i] - got[0][i]);
      den += got[0][i] * got[0][i];
    }
    return std::sqrt(num / den);
  };
  const double tc = rel(got[1]), cc = rel(got[2]);
  std::printf("deployment vs exact prefill, relative L2: tensor-core experts %.4f, CUDA-core experts %.4f\n", tc, cc);
  EXPECT_LT(tc, 1.5 * cc + 0.01);
}

// Deployment numerics hold the FP8 matrices (attention, indexer wq_b, shared
// expert) as FP8: steps of >= 16 rows run them through cuBLASLt's
// block-scaled GEMM, smaller steps through the few-row kernel. Both quantize
// activations the same way, so one 300-token prefill and the same tokens in
// steps of 10 differ by summation order and cuBLASLt's block-scaled
// precision (~2^-11 relative, cuda_fp8_gemm_test). Every expert is routed
// and the indexer keeps every entry, so no top-k choice can flip; but each
// FP8 activation quantization turns a tiny difference into occasional flips
// of an e4m3 rounding (2^-4 of a value), so over a dozen FP8 projections the
// two runs drift apart to a few percent (5.2% measured on an H200). The
// bound (relative L2 < 15%) still catches a wrong path (a wrong scale,
// padding row or group gives O(1)); the figures are printed.
TEST(CudaModelTest, DeploymentFp8PathsAgree) {
  SKIP_WITHOUT_CUDA();
  // Widths that take cuBLASLt's FP8 GEMM (in % 512 == 0); every expert routed,
  // every indexer entry kept.
  io::V4Config c = SmallRandomConfig();
  c.hidden_size = 512, c.head_dim = 128, c.q_lora_rank = 512, c.o_lora_rank = 128, c.moe_intermediate = 512;
  c.experts_per_token = 8, c.index_topk = 128;
  CudaModelOptions o;
  o.max_sequences = 2, o.max_length = 512;
  o.numerics = Numerics::kDeployment;
  o.tensor_core_experts = false;  // the same expert kernels at both step sizes
  auto m = CudaModel::CreateRandom(c, o, 9);
  ASSERT_TRUE(m.ok()) << m.status();
  std::vector<int64_t> ids(300);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int64_t>((i * 97 + 3) % c.vocab_size);
  const int a = *(*m)->NewSequence(), b = *(*m)->NewSequence();
  std::vector<CudaModel::Chunk> one = {{a, absl::MakeConstSpan(ids)}};
  auto big = (*m)->Step(one);
  ASSERT_TRUE(big.ok()) << big.status();
  std::vector<float> small;
  for (size_t p = 0; p < ids.size(); p += 10) {
    std::vector<CudaModel::Chunk> ch = {{b, absl::MakeConstSpan(ids.data() + p, 10)}};
    auto r = (*m)->Step(ch);
    ASSERT_TRUE(r.ok()) << r.status();
    small.insert(small.end(), r->begin(), r->end());
  }
  ASSERT_EQ(small.size(), big->size());
  double num = 0, den = 0;
  for (size_t i = 0; i < small.size(); ++i) {
    num += (small[i] - (*big)[i]) * (small[i] - (*big)[i]);
    den += (*big)[i] * (*big)[i];
  }
  const double rel = std::sqrt(num / den);
  std::printf("deployment FP8: cuBLASLt prefill vs few-row steps of 10, relative L2 %.3g, max |diff| %.3g\n", rel,
              MaxAbsDiff(small.data(), big->data(), static_cast<int64_t>(small.size())));
  EXPECT_LT(rel, 0.15);
}

}  // namespace
}  // namespace retort::v4
