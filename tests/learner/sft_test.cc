// SFT: config validation, the JSONL reader (id and chat records), packing with
// prompt masks, overfitting a tiny V4 model (fixture b: HCA, CSA + indexer,
// hash and learned routing, shared expert, mHC) from configs/sft_tiny.textproto,
// and a resumed run that matches an uninterrupted one.
#include "learner/sft/sft.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "learner/trainer/event_writer.h"
#include "model/v4/model.h"
#include "nlohmann/json.hpp"

namespace retort::sft {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string Temp(const std::string& name) {
  return ::testing::TempDir() + "/sft_test_" + std::to_string(getpid()) + "_" + name;
}

std::string WriteFile(const std::string& name, const std::string& text) {
  const std::string p = Temp(name);
  std::ofstream(p) << text;
  return p;
}

std::vector<json> Metrics(const std::string& dir) {
  std::vector<json> out;
  std::ifstream in(dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) out.push_back(json::parse(line));
  return out;
}

TEST(SftTest, OverfitsTinyModelFromTheExampleConfig) {
  auto o = LoadSftConfig("configs/sft_tiny.textproto");
  ASSERT_TRUE(o.ok()) << o.status();
  o->output_dir = Temp("overfit");
  int reports = 0;
  auto last = RunSft(*o, [&](const SftStepReport& r) {
    EXPECT_EQ(r.result.step, reports++);
    EXPECT_EQ(r.total_steps, 60);
  });
  ASSERT_TRUE(last.ok()) << last.status();
  const auto m = Metrics(o->output_dir);
  ASSERT_EQ(m.size(), 60u);
  EXPECT_GT(m.front()["loss"].get<double>(), 4.0);  // ~ln(384) before training
  EXPECT_LT(last->result.loss, 0.01);
  for (size_t i = 0; i < m.size(); ++i) {
    EXPECT_EQ(m[i]["step"].get<int64_t>(), static_cast<int64_t>(i + 1));
    EXPECT_EQ(m[i]["scored_tokens"].get<int64_t>(), 48);  // 8 examples x 6 completion tokens
    EXPECT_GT(m[i]["tokens_per_s"].get<double>(), 0.0);
  }
  // TensorBoard: one event file with the file_version event and a loss per step.
  std::vector<fs::path> event_files;
  for (const auto& e : fs::directory_iterator(o->output_dir + "/tensorboard"))
    event_files.push_back(e.path());
  ASSERT_EQ(event_files.size(), 1u);
  {
    std::ifstream in(event_files[0], std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    auto records = trainer::ReadTfRecords(ss.str(), event_files[0].string());
    ASSERT_TRUE(records.ok()) << records.status();
    EXPECT_EQ(records->size(), 61u);
  }
  // The final checkpoint is a model directory whose greedy continuation of a
  // training prompt is its completion.
  auto model = v4::Model::Load(o->output_dir + "/checkpoint");
  ASSERT_TRUE(model.ok()) << model.status();
  auto data = ReadSftData("configs/data/sft_tiny.jsonl", nullptr, 384);
  ASSERT_TRUE(data.ok());
  const SftExample& ex = (*data)[3];
  auto state = (*model)->NewState();
  std::vector<int64_t> feed = ex.prompt;
  for (size_t k = 0; k < ex.completion.size(); ++k) {
    std::vector<v4::Model::Chunk> chunk = {{state.get(), feed}};
    auto logits = (*model)->Step(chunk);
    ASSERT_TRUE(logits.ok());
    const float* last_row = logits->data() + (feed.size() - 1) * 384;
    const int64_t next = std::max_element(last_row, last_row + 384) - last_row;
    EXPECT_EQ(next, ex.completion[k]) << "completion token " << k;
    feed = {next};
  }
  fs::remove_all(o->output_dir);
}

TEST(SftTest, ResumedRunMatchesUninterruptedRun) {
  auto base = LoadSftConfig("configs/sft_tiny.textproto");
  ASSERT_TRUE(base.ok()) << base.status();
  base->trainer.optimizer.schedule.kind =
      optim::ScheduleKind::kConstant;  // lr independent of 'steps'
  base->steps = 6;
  SftOptions straight = *base;
  straight.output_dir = Temp("straight");
  ASSERT_TRUE(RunSft(straight).ok());
  SftOptions first = *base;
  first.output_dir = Temp("resumed");
  first.steps = 4;
  ASSERT_TRUE(RunSft(first).ok());
  SftOptions second = first;
  second.steps = 6;
  second.resume = true;
  ASSERT_TRUE(RunSft(second).ok());
  const auto a = Metrics(straight.output_dir), b = Metrics(first.output_dir);
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(b[i]["step"], a[i]["step"]);
    EXPECT_NEAR(b[i]["loss"].get<double>(), a[i]["loss"].get<double>(), 1e-6) << "step " << i + 1;
  }
  // The same with every MoE training feature on: QAT, balance loss and
  // anticipatory routing (whose queued routes ride along in the checkpoint).
  SftOptions moe = *base;
  moe.trainer.qat_experts = true;
  moe.trainer.balance_loss_weight = 1e-3f;
  moe.trainer.anticipatory_routing_delay = 2;
  SftOptions moe_straight = moe, moe_first = moe;
  moe_straight.output_dir = Temp("moe_straight");
  moe_first.output_dir = Temp("moe_resumed");
  moe_first.steps = 3;
  ASSERT_TRUE(RunSft(moe_straight).ok());
  ASSERT_TRUE(RunSft(moe_first).ok());
  SftOptions moe_second = moe_first;
  moe_second.steps = 6;
  moe_second.resume = true;
  auto moe_last = RunSft(moe_second);
  ASSERT_TRUE(moe_last.ok()) << moe_last.status();
  const auto c = Metrics(moe_straight.output_dir), d = Metrics(moe_first.output_dir);
  ASSERT_EQ(c.size(), 6u);
  ASSERT_EQ(d.size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_NEAR(d[i]["loss"].get<double>(), c[i]["loss"].get<double>(), 1e-6)
        << "moe step " << i + 1;
    EXPECT_GT(c[i]["balance_loss"].get<double>(), 0.0);
  }
  EXPECT_LT(c[5]["loss"].get<double>(), c[0]["loss"].get<double>());
  fs::remove_all(moe_straight.output_dir);
  fs::remove_all(moe_first.output_dir);
  SftOptions again = second;  // already at 'steps'
  EXPECT_EQ(RunSft(again).status().code(), absl::StatusCode::kFailedPrecondition);
  fs::remove_all(straight.output_dir);
  fs::remove_all(first.output_dir);
}

TEST(SftTest, ConfigErrorsNameTheField) {
  const std::string ok = "model: \"m\" data: \"d\" output_dir: \"o\"\n";
  ASSERT_TRUE(ParseSftConfig(ok, "c.textproto").ok());
  auto message = [](const std::string& text) {
    auto r = ParseSftConfig(text, "c.textproto");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << text;
    return std::string(r.status().message());
  };
  auto contains = [](const std::string& haystack, const std::string& needle) {
    return ::testing::AssertionResult(haystack.find(needle) != std::string::npos)
           << "'" << needle << "' not in: " << haystack;
  };
  // Malformed text: file, 1-based line and column of the offending token.
  EXPECT_TRUE(contains(message(ok + "steps: 60\noptimizer {\n  lr: 0.1\n"), "c.textproto:5:1:"));
  EXPECT_TRUE(contains(message(ok + "steps 60\n"), "c.textproto:2:7:"));
  EXPECT_TRUE(contains(message(ok + "steps: \"sixty\"\n"), "c.textproto:2:8:"));
  EXPECT_TRUE(contains(message(ok + "seq_len: 4.5\n"), "c.textproto:2:10:"));
  EXPECT_TRUE(contains(message(ok + "qat_experts: 7\n"), "c.textproto:2:"));
  EXPECT_TRUE(contains(message(ok + "steps: 1\nsteps: 2\n"), "c.textproto:3:"));
  // Unknown fields and enum names are errors naming the field and position.
  EXPECT_TRUE(contains(message(ok + "batchsize: 2\n"), "c.textproto:2:"));
  EXPECT_TRUE(contains(message(ok + "batchsize: 2\n"), "batchsize"));
  EXPECT_TRUE(contains(message(ok + "optimizer { betas: 1 }\n"), "betas"));
  EXPECT_TRUE(contains(message(ok + "optimizer { schedule: STEP }\n"), "c.textproto:2:"));
  EXPECT_TRUE(contains(message(ok + "optimizer { schedule: STEP }\n"), "STEP"));
  // Bad values name the field.
  EXPECT_TRUE(contains(message("data: \"d\" output_dir: \"o\"\n"), "'model'"));
  EXPECT_TRUE(contains(message("model: \"m\" data: \"\" output_dir: \"o\"\n"), "'data'"));
  EXPECT_TRUE(contains(message(ok + "batch_size: 0\n"), "'batch_size' must be positive, got 0"));
  EXPECT_TRUE(contains(message(ok + "steps: -3\n"), "'steps' must be positive, got -3"));
  EXPECT_TRUE(contains(message(ok + "seq_len: 1\n"), "'seq_len'"));
  EXPECT_TRUE(contains(message(ok + "checkpoint_every: -1\n"), "'checkpoint_every'"));
  EXPECT_TRUE(
      contains(message(ok + "anticipatory_routing_delay: 1001\n"), "'anticipatory_routing_delay'"));
  EXPECT_TRUE(contains(message(ok + "bias_update_speed: -1\n"), "'bias_update_speed'"));
  EXPECT_TRUE(contains(message(ok + "balance_loss_weight: nan\n"), "'balance_loss_weight'"));
  EXPECT_TRUE(
      contains(message(ok + "optimizer { lr: 0 }\n"), "'optimizer.lr' must be finite and > 0"));
  EXPECT_TRUE(contains(message(ok + "optimizer { lr: -0.1 }\n"), "'optimizer.lr'"));
  EXPECT_TRUE(contains(message(ok + "optimizer { final_lr: -1 }\n"), "'optimizer.final_lr'"));
  EXPECT_TRUE(
      contains(message(ok + "optimizer { warmup_steps: -1 }\n"), "'optimizer.warmup_steps'"));
  EXPECT_TRUE(
      contains(message(ok + "optimizer { weight_decay: -0.5 }\n"), "'optimizer.weight_decay'"));
  EXPECT_TRUE(contains(message(ok + "optimizer { adam_beta2: 1 }\n"), "'optimizer.adam_beta2'"));
  EXPECT_TRUE(
      contains(message(ok + "optimizer { muon_momentum: -0.1 }\n"), "'optimizer.muon_momentum'"));
  // A number the enum does not name parses (proto3 enums are open) and is refused here.
  EXPECT_TRUE(contains(message(ok + "optimizer { schedule: 7 }\n"), "'optimizer.schedule' is 7"));
  EXPECT_TRUE(contains(
      message(ok + "steps: 5\noptimizer { schedule: LR_SCHEDULE_COSINE warmup_steps: 5 }\n"),
      "warmup_steps"));
  EXPECT_TRUE(contains(message(ok + "checkpoint_layout: 9\n"), "'checkpoint_layout' is 9"));
  // TextFormat places an unknown enum name at the token after it (here the next line).
  EXPECT_TRUE(contains(message(ok + "checkpoint_layout: FP8\n"),
                       "c.textproto:3:1: Unknown enumeration value of \"FP8\" for field "
                       "\"checkpoint_layout\""));
  auto released = ParseSftConfig(ok + "checkpoint_layout: CHECKPOINT_LAYOUT_RELEASED\n", "c");
  ASSERT_TRUE(released.ok()) << released.status();
  EXPECT_EQ(released->trainer.checkpoint_layout, trainer::CheckpointLayout::kReleased);
  // Defaults where a field is not written; explicit values where it is.
  auto defaults = ParseSftConfig(ok, "c.textproto");
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  const SftOptions want;
  EXPECT_EQ(defaults->batch_size, want.batch_size);
  EXPECT_EQ(defaults->seq_len, want.seq_len);
  EXPECT_EQ(defaults->steps, want.steps);
  EXPECT_TRUE(defaults->tensorboard);
  EXPECT_EQ(defaults->trainer.bias_update_speed, 0.001f);
  EXPECT_EQ(defaults->trainer.optimizer.schedule.kind, optim::ScheduleKind::kConstant);
  EXPECT_EQ(defaults->trainer.optimizer.schedule.peak_lr, 2.7e-4);
  EXPECT_EQ(defaults->trainer.optimizer.muon.weight_decay, 0.1f);
  EXPECT_EQ(defaults->trainer.optimizer.max_grad_norm, 1.0);
  EXPECT_EQ(defaults->trainer.checkpoint_layout, trainer::CheckpointLayout::kHf);
  auto parsed =
      ParseSftConfig(ok + "# a comment\n"
                          "qat_experts: true bias_update_speed: 0.5 seed: 9\n"
                          "optimizer { lr: 0.01 warmup_steps: 3 schedule: LR_SCHEDULE_LINEAR\n"
                          "  adam_beta1: 0.8 weight_decay: 0 }\n",
                     "c.textproto");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(parsed->trainer.qat_experts);
  EXPECT_EQ(parsed->trainer.bias_update_speed, 0.5f);
  EXPECT_EQ(parsed->trainer.seed, 9u);
  EXPECT_EQ(parsed->trainer.optimizer.schedule.kind, optim::ScheduleKind::kLinear);
  EXPECT_EQ(parsed->trainer.optimizer.schedule.peak_lr, 0.01);
  EXPECT_EQ(parsed->trainer.optimizer.schedule.final_lr, 0.001);
  EXPECT_EQ(parsed->trainer.optimizer.schedule.warmup_steps, 3);
  EXPECT_EQ(parsed->trainer.optimizer.schedule.total_steps, 100);
  EXPECT_EQ(parsed->trainer.optimizer.adamw.beta1, 0.8f);
  EXPECT_EQ(parsed->trainer.optimizer.adamw.weight_decay, 0.0f);
  EXPECT_EQ(parsed->trainer.optimizer.muon.weight_decay, 0.0f);
  EXPECT_EQ(LoadSftConfig("/nonexistent/sft.textproto").status().code(),
            absl::StatusCode::kNotFound);
  // The file name reaches the message through LoadSftConfig too.
  const std::string bad_file = WriteFile("bad.textproto", ok + "steps: [1]\n");
  EXPECT_TRUE(contains(std::string(LoadSftConfig(bad_file).status().message()), bad_file + ":2:"));
}

TEST(SftTest, DataErrorsNameFileAndLine) {
  auto message = [](const std::string& text) {
    const std::string p = WriteFile("data.jsonl", text);
    return std::string(ReadSftData(p, nullptr, 100).status().message());
  };
  EXPECT_NE(message("{\"prompt_ids\": [1], \"completion_ids\": [2]}\nnot json\n")
                .find(":2: not a JSON object"),
            std::string::npos);
  EXPECT_NE(
      message("{\"prompt_ids\": [1], \"completion_ids\": [200]}\n").find("200 is outside 0..99"),
      std::string::npos);
  EXPECT_NE(message("{\"prompt_ids\": [1], \"completion_ids\": []}\n").find("empty"),
            std::string::npos);
  EXPECT_NE(message("{\"prompt_ids\": [1]}\n").find("'completion_ids'"), std::string::npos);
  EXPECT_NE(message("{\"prompt\": \"hi\", \"completion\": \"there\"}\n").find("needs a tokenizer"),
            std::string::npos);
  EXPECT_NE(message("{\"text\": \"x\"}\n").find(":1:"), std::string::npos);
  EXPECT_NE(message("\n").find("no records"), std::string::npos);
  EXPECT_FALSE(PackExamples({{{1, 2, 3}, {4, 5}}}, 4).ok());
}

TEST(SftTest, PackingMasksPromptsAndKeepsExamplesApart) {
  // Two examples fit a row of 8; the third starts the next row.
  auto rows = PackExamples({{{1, 2}, {3, 4}}, {{5}, {6, 7}}, {{8, 9, 10}, {11}}}, 8);
  ASSERT_TRUE(rows.ok()) << rows.status();
  ASSERT_EQ(rows->tokens.size(), 2u);
  EXPECT_EQ(rows->tokens[0], (std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 0}));
  // Position 1 (last prompt token) predicts 3, position 2 predicts 4; the
  // example's last token predicts nothing (the next example is not its completion).
  EXPECT_EQ(rows->targets[0], (std::vector<int64_t>{-1, 3, 4, -1, 6, 7, -1, -1}));
  EXPECT_EQ(rows->tokens[1], (std::vector<int64_t>{8, 9, 10, 11, 0, 0, 0, 0}));
  EXPECT_EQ(rows->targets[1], (std::vector<int64_t>{-1, -1, 11, -1, -1, -1, -1, -1}));
  // Each example is its own document (the model runs it as its own sequence); -1 is padding.
  EXPECT_EQ(rows->documents[0], (std::vector<int32_t>{0, 0, 0, 0, 1, 1, 1, -1}));
  EXPECT_EQ(rows->documents[1], (std::vector<int32_t>{0, 0, 0, 0, -1, -1, -1, -1}));
  const SftBatch b =
      MakeBatch(*rows, 3, 0, 5);  // 3 rows of an epoch of 2: wraps into the next epoch
  EXPECT_EQ(b.B, 3);
  int64_t scored = 0;
  float sum = 0;
  for (size_t i = 0; i < b.targets.size(); ++i) {
    scored += b.targets[i] >= 0;
    sum += b.weights[i];
    if (b.targets[i] < 0) {
      EXPECT_EQ(b.weights[i], 0.0f);
    }
  }
  EXPECT_GE(scored, 5);
  EXPECT_EQ(b.documents.size(), b.tokens.size());
  EXPECT_EQ(b.view().documents.size(), b.tokens.size());
  EXPECT_NEAR(sum, 1.0f, 1e-6f);
}

TEST(SftTest, ChatRecordsMaskThePromptTurns) {
  auto tok = tokenizer::Tokenizer::LoadDir("tests/fixtures/tokenizer");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::string p = WriteFile(
      "chat.jsonl",
      R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, )"
      R"({"role": "assistant", "content": "4"}]})"
      "\n"
      R"({"prompt": "Say hi", "completion": "hi"})"
      "\n");
  auto data = ReadSftData(p, tok->get(), (*tok)->vocab_size());
  ASSERT_TRUE(data.ok()) << data.status();
  ASSERT_EQ(data->size(), 2u);
  for (const SftExample& ex : *data) {
    ASSERT_FALSE(ex.completion.empty());
    const std::string completion =
        (*tok)->Decode(std::vector<tokenizer::TokenId>(ex.completion.begin(), ex.completion.end()));
    EXPECT_EQ(completion.find("<｜User｜>"), std::string::npos) << completion;
    ASSERT_TRUE((*tok)->eos_id().has_value());
    EXPECT_EQ(ex.completion.back(), *(*tok)->eos_id()) << completion;
  }
  EXPECT_NE((*tok)
                ->Decode(std::vector<tokenizer::TokenId>((*data)[0].prompt.begin(),
                                                         (*data)[0].prompt.end()))
                .find("2+2?"),
            std::string::npos);
  // A conversation that does not end with the assistant has nothing to learn.
  const std::string bad =
      WriteFile("chat_bad.jsonl", R"({"messages": [{"role": "user", "content": "x"}]})"
                                  "\n");
  EXPECT_NE(ReadSftData(bad, tok->get(), (*tok)->vocab_size()).status().message().find("assistant"),
            std::string::npos);
}

}  // namespace
}  // namespace retort::sft
