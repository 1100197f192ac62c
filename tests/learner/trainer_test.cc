// Trainer: updates lower the loss, checkpoints load as models, a resumed run
// continues exactly as the uninterrupted one, and damaged checkpoints fail
// with errors naming the file.
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "gtest/gtest.h"
#include "learner/trainer/trainer.h"

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
  v4::TokenBatch view() const { return {tokens, targets, weights, B, T}; }
};

// Next-token batch drawn from the trainer's RNG; the first 3 positions of each
// row are masked like a prompt. Advances the data position.
Batch NextBatch(Trainer& t, int64_t vocab) {
  Batch b;
  for (int64_t i = 0; i < b.B * b.T; ++i) b.tokens.push_back(2 + static_cast<int64_t>(t.NextRandom() % (vocab - 2)));
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
    EXPECT_NE(r.status().message().find("trainer_state.safetensors"), std::string::npos) << r.status();
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
      state.emplace_back(name == "model.norm.weight.adam_m" ? "model.nrom.weight.adam_m" : name, *(*f)->Get(name));
    ASSERT_TRUE(io::WriteSafetensors(d + "/trainer_state.safetensors", state).ok());
    auto r = Trainer::FromCheckpoint(d, Options());
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find("adam_m"), std::string::npos) << r.status();
    fs::remove_all(d);
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace retort::trainer
