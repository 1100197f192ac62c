// Trainer: updates lower the loss, checkpoints load as models, a resumed run
// continues exactly as the uninterrupted one, and damaged checkpoints fail
// with errors naming the file.
#include "learner/trainer/trainer.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"
#include "model/base/logging.h"
#include "model/kernels/cpu/cpu_kernels.h"
#include "model/tensor/dtype.h"
#include "model/v4/train.h"

namespace retort::trainer {
namespace {

namespace fs = std::filesystem;
const char kFixtureB[] = "tests/fixtures/v4/b";

TrainerOptions Options() {
  TrainerOptions o;
  o.seed = 77;
  o.optimizer.schedule.kind = optim::ScheduleKind::kCosine;
  o.optimizer.schedule.peak_lr = 2e-3;
  o.optimizer.schedule.final_lr = 2e-4;
  o.optimizer.schedule.warmup_steps = 2;
  o.optimizer.schedule.total_steps = 8;
  o.optimizer.max_grad_norm = 1.0;
  return o;
}

struct Batch {
  std::vector<int64_t> tokens, targets;
  std::vector<float> weights;
  int64_t B = 2, T = 12;
  v4::TokenBatch view() const { return {tokens, targets, weights, B, T, {}, 0.0f, {}}; }
};

// Next-token batch drawn from the trainer's RNG; the first 3 positions of each
// row are masked like a prompt. Advances the data position.
Batch NextBatch(Trainer& t, int64_t vocab) {
  Batch b;
  for (int64_t i = 0; i < b.B * b.T; ++i)
    b.tokens.push_back(2 + static_cast<int64_t>(t.NextRandom() % (vocab - 2)));
  const float w = 1.0f / static_cast<float>(b.B * (b.T - 4));
  for (int64_t r = 0; r < b.B; ++r)
    for (int64_t i = 0; i < b.T; ++i) {
      const bool scored = i >= 3 && i + 1 < b.T;
      b.targets.push_back(scored ? b.tokens[r * b.T + i + 1] : -1);
      b.weights.push_back(scored ? w : 0.0f);
    }
  t.set_data_position(t.data_position() + 1);
  return b;
}

std::string TempDir(const std::string& name) {
  return ::testing::TempDir() + "/trainer_test_" + std::to_string(getpid()) + "_" + name;
}

std::vector<float> Logits(const v4::Model& m, const std::vector<int64_t>& ids) {
  auto s = m.NewState();
  std::vector<v4::Model::Chunk> chunk = {{s.get(), ids}};
  return *m.Step(chunk);
}

TEST(TrainerTest, StepsOnOneBatchLowerItsLoss) {
  auto t = Trainer::FromModelDir(kFixtureB, Options());
  ASSERT_TRUE(t.ok()) << t.status();
  const Batch b = NextBatch(**t, (*t)->model().config().vocab_size);
  double first = 0, last = 0;
  for (int i = 0; i < 6; ++i) {
    auto r = (*t)->Step(b.view());
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->step, i);
    EXPECT_EQ(r->tokens, 2 * 8);
    if (i == 0) first = r->loss;
    last = r->loss;
  }
  EXPECT_LT(last, first - 0.5) << "first " << first << " last " << last;
}

TEST(TrainerTest, ResumedRunMatchesUninterruptedRun) {
  const int k = 2, n = 3;
  const int64_t V = 384;
  std::vector<double> straight;
  std::vector<float> straight_logits;
  {
    auto t = Trainer::FromModelDir(kFixtureB, Options());
    ASSERT_TRUE(t.ok()) << t.status();
    for (int i = 0; i < k + n; ++i) {
      auto r = (*t)->Step(NextBatch(**t, V).view());
      ASSERT_TRUE(r.ok()) << r.status();
      straight.push_back(r->loss);
    }
    straight_logits = Logits((*t)->model(), {3, 5, 7, 11, 13, 17, 19, 23});
  }
  const std::string dir = TempDir("resume");
  {
    auto t = Trainer::FromModelDir(kFixtureB, Options());
    ASSERT_TRUE(t.ok()) << t.status();
    for (int i = 0; i < k; ++i) {
      auto r = (*t)->Step(NextBatch(**t, V).view());
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->loss, straight[i]) << "step " << i;
    }
    ASSERT_TRUE((*t)->SaveCheckpoint(dir).ok());
    // Saving twice replaces the checkpoint atomically and leaves no temporaries.
    ASSERT_TRUE((*t)->SaveCheckpoint(dir + "/").ok());
    for (const auto& e : fs::directory_iterator(fs::path(dir).parent_path()))
      EXPECT_EQ(e.path().string().find(dir + "."), std::string::npos) << e.path();
    // The checkpoint's model is a plain HF-layout model directory.
    auto reloaded = v4::Model::Load(dir);
    ASSERT_TRUE(reloaded.ok()) << reloaded.status();
    const std::vector<int64_t> ids = {9, 8, 7, 6, 5, 4, 3, 2};
    EXPECT_EQ(Logits(**reloaded, ids), Logits((*t)->model(), ids));
  }
  auto t = Trainer::FromCheckpoint(dir, Options());
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ((*t)->step(), k);
  EXPECT_EQ((*t)->data_position(), k);
  for (int i = k; i < k + n; ++i) {
    auto r = (*t)->Step(NextBatch(**t, V).view());
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->step, i);
    EXPECT_NEAR(r->loss, straight[i], 1e-6) << "step " << i;
  }
  EXPECT_EQ(Logits((*t)->model(), {3, 5, 7, 11, 13, 17, 19, 23}), straight_logits);
  fs::remove_all(dir);
}

void Truncate(const std::string& path, int64_t keep) { fs::resize_file(path, keep); }

TEST(TrainerTest, DamagedCheckpointsFailNamingTheFile) {
  const std::string dir = TempDir("damaged");
  {
    auto t = Trainer::FromModelDir(kFixtureB, Options());
    ASSERT_TRUE(t.ok()) << t.status();
    ASSERT_TRUE((*t)->Step(NextBatch(**t, 384).view()).ok());
    ASSERT_TRUE((*t)->SaveCheckpoint(dir).ok());
  }
  ASSERT_TRUE(Trainer::FromCheckpoint(dir, Options()).ok());
  auto copy = [&](const std::string& name) {
    const std::string d = TempDir(name);
    fs::remove_all(d);
    fs::copy(dir, d);
    return d;
  };
  {
    const std::string d = copy("truncated_model");
    Truncate(d + "/model.safetensors", fs::file_size(d + "/model.safetensors") / 2);
    auto r = Trainer::FromCheckpoint(d, Options());
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("model.safetensors"), std::string::npos) << r.status();
    fs::remove_all(d);
  }
  {
    const std::string d = copy("truncated_state");
    Truncate(d + "/trainer_state.safetensors", 100);
    auto r = Trainer::FromCheckpoint(d, Options());
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("trainer_state.safetensors"), std::string::npos)
        << r.status();
    fs::remove_all(d);
  }
  {
    const std::string d = copy("no_state");
    fs::remove(d + "/trainer_state.safetensors");
    auto r = Trainer::FromCheckpoint(d, Options());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
    fs::remove_all(d);
  }
  {
    const std::string d = copy("bad_config");
    std::ofstream(d + "/config.json") << "{\"hidden_size\": ";
    auto r = Trainer::FromCheckpoint(d, Options());
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("config.json"), std::string::npos) << r.status();
    fs::remove_all(d);
  }
  {
    // Optimizer state of another parameter set (a tensor renamed).
    const std::string d = copy("foreign_state");
    auto f = io::SafetensorsFile::Open(dir + "/trainer_state.safetensors");
    ASSERT_TRUE(f.ok());
    std::vector<std::pair<std::string, Tensor>> state;
    for (const auto& [name, e] : (*f)->entries())
      state.emplace_back(name == "model.norm.weight.adam_m" ? "model.nrom.weight.adam_m" : name,
                         *(*f)->Get(name));
    ASSERT_TRUE(io::WriteSafetensors(d + "/trainer_state.safetensors", state).ok());
    auto r = Trainer::FromCheckpoint(d, Options());
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("adam_m"), std::string::npos) << r.status();
    fs::remove_all(d);
  }
  fs::remove_all(dir);
}

TEST(TrainerTest, RouterBiasMovesBySpeedTowardsTheMeanLoad) {
  TrainerOptions o = Options();
  o.bias_update_speed = 0.01f;
  auto t = Trainer::FromModelDir(kFixtureB, o);
  ASSERT_TRUE(t.ok()) << t.status();
  const auto& cfg = (*t)->model().config();
  const Batch b = NextBatch(**t, cfg.vocab_size);
  auto before = (*t)->Evaluate(b.view());  // the step's forward routes the same way
  ASSERT_TRUE(before.ok());
  std::vector<std::vector<float>> bias0;
  for (const auto& layer : (*t)->model().weights().layers)
    bias0.push_back(layer.moe.hash_routed
                        ? std::vector<float>{}
                        : std::vector<float>(layer.moe.bias.data<float>(),
                                             layer.moe.bias.data<float>() + cfg.n_routed_experts));
  ASSERT_TRUE((*t)->Step(b.view()).ok());
  int moved = 0;
  for (int l = 0; l < cfg.num_layers; ++l) {
    const auto& moe = (*t)->model().weights().layers[l].moe;
    if (moe.hash_routed) continue;
    const auto& load = before->expert_load[l];
    double mean = 0;
    for (int64_t c : load) mean += c;
    mean /= load.size();
    for (int e = 0; e < cfg.n_routed_experts; ++e) {
      const float want = bias0[l][e] + (load[e] < mean ? 0.01f : load[e] > mean ? -0.01f : 0.0f);
      EXPECT_EQ(moe.bias.data<float>()[e], want)
          << "layer " << l << " expert " << e << " load " << load[e];
      moved += moe.bias.data<float>()[e] != bias0[l][e];
    }
  }
  EXPECT_GT(moved, 0);
  // Off: biases stay.
  o.bias_update_speed = 0;
  auto still = Trainer::FromModelDir(kFixtureB, o);
  ASSERT_TRUE(still.ok());
  ASSERT_TRUE((*still)->Step(b.view()).ok());
  for (int l = 0; l < cfg.num_layers; ++l) {
    if (bias0[l].empty()) continue;
    for (int e = 0; e < cfg.n_routed_experts; ++e)
      EXPECT_EQ((*still)->model().weights().layers[l].moe.bias.data<float>()[e], bias0[l][e]);
  }
  o.bias_update_speed = -1;
  EXPECT_EQ(Trainer::FromModelDir(kFixtureB, o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TrainerTest, QuantizeMxFp4RoundsPerBlockOf32) {
  // amax 7 -> scale 2^ceil(log2(7/6)) = 2; x/2 = .13 .37 .6 1.3 2.55 3.5 -> 0 .5 .5 1.5 3 4 (3.5:
  // tie, even code).
  std::vector<float> w(40, 0.0f);
  const float in[] = {0.26f, 0.74f, 1.2f, 2.6f, 5.1f, 7.0f, -7.0f, -0.9f};
  std::copy(in, in + 8, w.begin());
  // Columns 32..39 form their own (short) block: amax 0.3 -> scale 2^ceil(log2(0.05)) = 1/16.
  w[32] = 0.3f;
  w[33] = 0.1f;
  w[34] = -0.02f;
  QuantizeMxFp4Rows(w.data(), 1, 40);
  const float want[] = {0.0f, 1.0f, 1.0f, 3.0f, 6.0f, 8.0f, -8.0f, -1.0f};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(w[i], want[i]) << i;
  for (int i = 8; i < 32; ++i) EXPECT_EQ(w[i], 0.0f);
  EXPECT_EQ(w[32], 0.25f);      // 0.3*16 = 4.8 -> 4
  EXPECT_EQ(w[33], 0.09375f);   // 1.6 -> 1.5
  EXPECT_EQ(w[34], -0.03125f);  // -0.32 -> -0.5 (nearer than 0)
  std::vector<float> again = w;
  QuantizeMxFp4Rows(again.data(), 1, 40);
  EXPECT_EQ(again, w);  // the grid is a fixed point
}

TEST(TrainerTest, QatTrainsMastersThroughTheMxFp4Forward) {
  TrainerOptions o = Options();
  o.qat_experts = true;
  auto t = Trainer::FromModelDir(kFixtureB, o);
  ASSERT_TRUE(t.ok()) << t.status();
  const auto& cfg = (*t)->model().config();
  auto expert_weights = [&](const v4::Model& m) {
    const auto& w = m.weights().layers[2].moe.experts[1].w1.weight;
    return std::vector<float>(w.data<float>(), w.data<float>() + w.numel());
  };
  auto on_grid = [](std::vector<float> w, int64_t cols) {
    std::vector<float> q = w;
    QuantizeMxFp4Rows(q.data(), static_cast<int64_t>(q.size()) / cols, cols);
    return q == w;
  };
  EXPECT_TRUE(on_grid(expert_weights((*t)->model()), cfg.hidden_size));
  double first = 0, last = 0;
  const Batch b = NextBatch(**t, cfg.vocab_size);
  for (int i = 0; i < 5; ++i) {
    auto r = (*t)->Step(b.view());
    ASSERT_TRUE(r.ok()) << r.status();
    (i == 0 ? first : last) = r->loss;
  }
  EXPECT_LT(last, first);
  const std::vector<float> forward_w = expert_weights((*t)->model());
  EXPECT_TRUE(on_grid(forward_w, cfg.hidden_size));
  // The checkpoint holds the fp32 masters, whose round trip is what the model computes with.
  const std::string dir = TempDir("qat");
  ASSERT_TRUE((*t)->SaveCheckpoint(dir).ok());
  auto masters = v4::Model::Load(dir);
  ASSERT_TRUE(masters.ok()) << masters.status();
  std::vector<float> m = expert_weights(**masters);
  EXPECT_FALSE(on_grid(m, cfg.hidden_size));
  QuantizeMxFp4Rows(m.data(), static_cast<int64_t>(m.size()) / cfg.hidden_size, cfg.hidden_size);
  EXPECT_EQ(m, forward_w);
  // Resuming reproduces the quantized forward.
  auto resumed = Trainer::FromCheckpoint(dir, o);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ(expert_weights((*resumed)->model()), forward_w);
  auto r1 = (*t)->Step(b.view()), r2 = (*resumed)->Step(b.view());
  ASSERT_TRUE(r1.ok() && r2.ok());
  EXPECT_EQ(r1->loss, r2->loss);
  fs::remove_all(dir);
}

// A released FP4 checkpoint (fixture q: FP8 dense weights, MXFP4 experts)
// trains with QAT: its experts decode exactly to fp32 masters, the MXFP4 round
// trip of those masters is the checkpoint's own FP4 grid, so the trainer's
// forward is the checkpoint's forward.
TEST(TrainerTest, QatStartsFromAnMxFp4CheckpointOnItsOwnGrid) {
  auto packed = v4::Model::Load("tests/fixtures/v4/q");
  ASSERT_TRUE(packed.ok()) << packed.status();
  ASSERT_TRUE(packed->get()->weights().layers.back().moe.experts[0].w1.mxfp4);
  TrainerOptions o = Options();
  o.qat_experts = true;
  auto t = Trainer::FromModelDir("tests/fixtures/v4/q", o);
  ASSERT_TRUE(t.ok()) << t.status();
  const auto& cfg = (*t)->model().config();
  const std::vector<int64_t> ids = {3, 50, 7, 200, 11, 400, 13, 17, 99, 23, 5, 42};
  const std::vector<float> a = Logits(**packed, ids), b = Logits((*t)->model(), ids);
  ASSERT_EQ(a.size(), b.size());
  float worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(a[i] - b[i]));
  EXPECT_LT(worst, 1e-4f) << "dense QAT forward vs packed MXFP4 forward";
  for (size_t l = 0; l < cfg.num_layers; ++l) {
    const v4::Linear& p = packed->get()->weights().layers[l].moe.experts[1].w2;
    const v4::Linear& q = (*t)->model().weights().layers[l].moe.experts[1].w2;
    std::vector<float> decoded(p.out * p.in);
    cpu::DequantizeMxFp4(p.weight.raw(), p.scales.raw(), p.out, p.in, decoded.data());
    EXPECT_EQ(std::vector<float>(q.weight.data<float>(), q.weight.data<float>() + decoded.size()),
              decoded)
        << "layer " << l;
  }
  const Batch batch = NextBatch(**t, cfg.vocab_size);
  double first = 0, last = 0;
  for (int i = 0; i < 4; ++i) {
    auto r = (*t)->Step(batch.view());
    ASSERT_TRUE(r.ok()) << r.status();
    (i == 0 ? first : last) = r->loss;
  }
  EXPECT_LT(last, first);
  // Without QAT the same checkpoint trains its decoded experts directly.
  o.qat_experts = false;
  EXPECT_TRUE(Trainer::FromModelDir("tests/fixtures/v4/q", o).ok());
}

// The format V4_SPEC.md §4 gives each HF-named tensor in the released layout
// (stated here independently of export.cc's table): '8' FP8 128x128 blocks,
// '4' MXFP4 per 32, 'b' BF16, 'f' F32 as is, 'i' I64 as is.
char ReleasedFormatOf(const std::string& n) {
  auto ends = [&](const std::string& s) { return n.ends_with(s); };
  if (n.find(".mlp.experts.") != std::string::npos) return '4';
  if (ends("tid2eid")) return 'i';
  if (n.find("_hc.") != std::string::npos || n.find("hc_head") != std::string::npos ||
      ends("sinks") || ends("position_bias") || ends("e_score_correction_bias"))
    return 'f';
  if (n.find("shared_experts.") != std::string::npos || ends("self_attn.q_a_proj.weight") ||
      ends("self_attn.q_b_proj.weight") || ends("self_attn.kv_proj.weight") ||
      ends("o_a_proj.weight") || ends("o_b_proj.weight") || ends("indexer.q_b_proj.weight"))
    return '8';
  return 'b';  // embed, head, norms, compressor projections, weights_proj, router weight
}

// A released-layout checkpoint: Model::Load reads it, its forward is the
// forward of the trainer's fp32 weights quantized the same way in memory (the
// loaded model computes with the MXFP4 experts packed, the in-memory one with
// their dense decode: same values, other summation order), it differs from
// the fp32 forward by the quantization, and a run cannot resume from it.
TEST(TrainerTest, ReleasedLayoutCheckpointLoadsAsTheQuantizedModel) {
  TrainerOptions o = Options();
  o.checkpoint_layout = CheckpointLayout::kReleased;
  o.optimizer.schedule.peak_lr = 1e-2;  // move every weight off the FP8 / FP4 grid of fixture q
  auto t = Trainer::FromModelDir("tests/fixtures/v4/q", o);
  ASSERT_TRUE(t.ok()) << t.status();
  const io::V4Config cfg = (*t)->model().config();
  const Batch batch = NextBatch(**t, cfg.vocab_size);
  for (int i = 0; i < 2; ++i) ASSERT_TRUE((*t)->Step(batch.view()).ok());
  const std::string dir = TempDir("released");
  ASSERT_TRUE((*t)->SaveCheckpoint(dir).ok());

  auto file = io::SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  auto dtype = [&](const std::string& name) {
    auto e = (*file)->Get(name);
    EXPECT_TRUE(e.ok()) << name << ": " << e.status();
    return e.ok() ? e->dtype() : DType::kF32;
  };
  EXPECT_EQ(dtype("layers.1.attn.wq_a.weight"), DType::kF8E4M3);
  EXPECT_EQ(dtype("layers.1.attn.wq_a.scale"), DType::kE8M0);
  EXPECT_EQ(dtype("layers.1.attn.indexer.wq_b.weight"), DType::kF8E4M3);
  EXPECT_EQ(dtype("layers.1.ffn.experts.7.w2.weight"), DType::kI8);
  EXPECT_EQ(dtype("layers.1.ffn.experts.7.w2.scale"), DType::kE8M0);
  EXPECT_EQ(dtype("layers.1.attn.compressor.wkv.weight"), DType::kBF16);
  EXPECT_EQ(dtype("embed.weight"), DType::kBF16);
  EXPECT_EQ(dtype("layers.1.hc_attn_fn"), DType::kF32);
  EXPECT_EQ(dtype("layers.0.ffn.gate.tid2eid"), DType::kI64);
  EXPECT_FALSE((*file)->Has("model.embed_tokens.weight"));

  auto loaded = v4::Model::Load(dir);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_TRUE((*loaded)->weights().layers[2].moe.experts[3].w1.mxfp4);
  // The same quantization in memory, under the HF names.
  auto params = v4::HfTensors((*t)->model());
  ASSERT_TRUE(params.ok()) << params.status();
  io::TensorMap quantized("quantized in memory");
  int64_t changed = 0;
  for (v4::NamedTensor& p : *params) {
    Tensor q = p.value.Clone();
    const char f = ReleasedFormatOf(p.name);
    if (f == '8') {
      const int64_t rows = q.dim(0), cols = q.dim(1);
      std::vector<uint8_t> codes(rows * cols), scales(((rows + 127) / 128) * ((cols + 127) / 128));
      cpu::QuantizeFp8Blocks(q.data<float>(), rows, cols, codes.data(), scales.data());
      cpu::DequantizeFp8Blocks(codes.data(), scales.data(), rows, cols, q.mutable_data<float>());
    } else if (f == '4') {
      QuantizeMxFp4Rows(q.mutable_data<float>(), q.numel() / q.dim(-1), q.dim(-1));  // the QAT one
    } else if (f == 'b') {
      for (int64_t i = 0; i < q.numel(); ++i)
        q.mutable_data<float>()[i] = Bf16ToF32(F32ToBf16(q.data<float>()[i]));
    }
    if (q.dtype() == DType::kF32) {
      double e2 = 0, x2 = 0;
      for (int64_t i = 0; i < q.numel(); ++i) {
        const double x = p.value.data<float>()[i], e = q.data<float>()[i] - x;
        changed += e != 0;
        e2 += e * e;
        x2 += x * x;
      }
      // Per-tensor relative error bounds of the formats (measured on this
      // fixture: FP8 <= 1.5%, MXFP4 <= 2.6%, BF16 <= 0.19%).
      const double bound = f == '8' ? 1.0 / 32 : f == '4' ? 0.1 : f == 'b' ? 1.0 / 256 : 0.0;
      EXPECT_LE(std::sqrt(e2 / std::max(x2, 1e-30)), bound) << p.name << " format " << f;
    }
    quantized.Add(p.name, q);
  }
  EXPECT_GT(changed, 100000) << "the trained weights sit off the quantization grids";
  auto in_memory = v4::Model::FromTensors(cfg, quantized);
  ASSERT_TRUE(in_memory.ok()) << in_memory.status();
  const std::vector<int64_t> ids = {3,  50, 7,  200, 11,  400, 13, 17, 99,
                                    23, 5,  42, 8,   311, 64,  2,  19};
  const std::vector<float> a = Logits(**loaded, ids), b = Logits(**in_memory, ids),
                           f = Logits((*t)->model(), ids);
  float vs_memory = 0, vs_fp32 = 0, fp32_amax = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    vs_memory = std::max(vs_memory, std::fabs(a[i] - b[i]));
    vs_fp32 = std::max(vs_fp32, std::fabs(a[i] - f[i]));
    fp32_amax = std::max(fp32_amax, std::fabs(f[i]));
  }
  double mean_vs_fp32 = 0, mean_fp32 = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    mean_vs_fp32 += std::fabs(a[i] - f[i]) / a.size();
    mean_fp32 += std::fabs(f[i]) / a.size();
  }
  std::fprintf(stderr,
               "released checkpoint logits: max |loaded - quantized in memory| %.3g; "
               "|loaded - fp32| max %.3g mean %.3g (fp32 |logit| max %.3g mean %.3g)\n",
               vs_memory, vs_fp32, mean_vs_fp32, fp32_amax, mean_fp32);
  EXPECT_LT(vs_memory, 1e-4f);  // the packed-MXFP4 vs dense bound of QatStartsFromAnMxFp4...
  // Against fp32 the difference is the quantization (measured: max 3.2, mean
  // 0.34 of mean |logit| 1.16). Fixture q's random weights amplify weight
  // noise: 1% multiplicative noise on every weight moves the logits as much.
  EXPECT_GT(mean_vs_fp32, 1e-3);             // the quantization is there ...
  EXPECT_LT(mean_vs_fp32, 0.5 * mean_fp32);  // ... and bounded
  EXPECT_LT(vs_fp32, fp32_amax);

  // No resume from it (the fp32 masters are gone); a new run may start from it.
  auto resumed = Trainer::FromCheckpoint(dir, o);
  EXPECT_EQ(resumed.status().code(), absl::StatusCode::kFailedPrecondition) << resumed.status();
  EXPECT_NE(resumed.status().message().find("released layout"), std::string::npos);
  EXPECT_TRUE(Trainer::FromModelDir(dir, Options()).ok());
  fs::remove_all(dir);
}

TEST(TrainerTest, ReleasedLayoutNeedsExpertRowsOfMultiplesOf32) {
  TrainerOptions o = Options();
  o.checkpoint_layout = CheckpointLayout::kReleased;
  auto t = Trainer::FromModelDir(kFixtureB, o);  // moe_intermediate_size 40: down_proj rows of 40
  ASSERT_TRUE(t.ok()) << t.status();
  const std::string dir = TempDir("released_b");
  const absl::Status s = (*t)->SaveCheckpoint(dir);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("down_proj"), std::string::npos) << s;
  EXPECT_FALSE(fs::exists(dir));
  EXPECT_FALSE(fs::exists(dir + ".tmp-" + std::to_string(getpid()))) << "nothing half-written";
}

// [L, B, T, K] routes of `b` under the model's current parameters.
std::vector<int32_t> RoutesOf(const v4::Model& m, const Batch& b) {
  const auto& c = m.config();
  const int64_t K = c.experts_per_token;
  std::vector<int32_t> routes(c.num_layers * b.B * b.T * K);
  for (int64_t r = 0; r < b.B; ++r) {
    auto s = m.NewState();
    v4::StepOutputs out;
    out.capture_routes = true;
    std::vector<v4::Model::Chunk> chunk = {
        {s.get(), absl::MakeConstSpan(b.tokens.data() + r * b.T, b.T)}};
    CHECK(m.Step(chunk, &out).ok());
    for (int l = 0; l < c.num_layers; ++l)
      std::copy(out.routes[l].begin(), out.routes[l].end(),
                routes.begin() + ((l * b.B + r) * b.T) * K);
  }
  return routes;
}

// Anticipatory routing with delay 2 equals explicit replay of the routes each
// batch had two steps earlier (θ_0 for the first two), and resumes exactly
// with routes still queued.
TEST(TrainerTest, AnticipatoryRoutingUsesRoutesFromDeltaStepsEarlier) {
  const int delay = 2, steps = 6;
  TrainerOptions plain = Options();
  plain.balance_loss_weight = 1e-2f;
  TrainerOptions ant = plain;
  ant.anticipatory_routing_delay = delay;
  auto ref = Trainer::FromModelDir(kFixtureB, plain);
  auto a = Trainer::FromModelDir(kFixtureB, ant);
  ASSERT_TRUE(ref.ok() && a.ok()) << a.status();
  auto data = Trainer::FromModelDir(kFixtureB, plain);  // only its RNG draws the batches
  ASSERT_TRUE(data.ok());
  std::vector<Batch> batches;
  for (int i = 0; i < steps + delay; ++i) batches.push_back(NextBatch(**data, 384));
  EXPECT_EQ((*a)->Step(batches[0].view()).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ((*ref)->Prefetch(batches[0].view()).code(), absl::StatusCode::kFailedPrecondition);
  std::vector<std::vector<int32_t>> routes(steps + delay);
  for (int i = 0; i < delay; ++i) {
    routes[i] = RoutesOf((*ref)->model(), batches[i]);
    ASSERT_TRUE((*a)->Prefetch(batches[i].view()).ok());
  }
  EXPECT_EQ((*a)->Step(batches[1].view()).status().code(),
            absl::StatusCode::kFailedPrecondition);  // not queued first
  std::vector<double> losses;
  const std::string dir = TempDir("anticipatory");
  for (int s = 0; s < steps; ++s) {
    routes[s + delay] = RoutesOf((*ref)->model(), batches[s + delay]);
    ASSERT_TRUE((*a)->Prefetch(batches[s + delay].view()).ok());
    v4::TokenBatch replay = batches[s].view();
    replay.replay_routes = routes[s];
    auto r_ref = (*ref)->Step(replay);
    auto r_a = (*a)->Step(batches[s].view());
    ASSERT_TRUE(r_ref.ok() && r_a.ok()) << r_a.status();
    EXPECT_EQ(r_a->loss, r_ref->loss) << "step " << s;
    EXPECT_EQ(r_a->balance_loss, r_ref->balance_loss) << "step " << s;
    EXPECT_GT(r_a->balance_loss, 0.0);
    losses.push_back(r_a->loss);
    if (s == 2) {
      ASSERT_TRUE((*a)->SaveCheckpoint(dir).ok());
    }
  }
  // Routes from two steps back differ from fresh ones somewhere by now.
  EXPECT_NE(RoutesOf((*a)->model(), batches[steps - 1]), routes[steps - 1]);
  auto resumed = Trainer::FromCheckpoint(dir, ant);
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ((*resumed)->prefetched(), delay);
  for (int s = 3; s < steps; ++s) {
    ASSERT_TRUE((*resumed)->Prefetch(batches[s + delay].view()).ok());
    auto r = (*resumed)->Step(batches[s].view());
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->loss, losses[s]) << "resumed step " << s;
  }
  EXPECT_EQ(Trainer::FromCheckpoint(dir, plain).status().code(),
            absl::StatusCode::kInvalidArgument);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace retort::trainer
