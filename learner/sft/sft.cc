// SFT: config, JSONL reader, packing and the loop (see sft.h).
#include "learner/sft/sft.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "learner/trainer/event_writer.h"
#include "model/base/status_macros.h"
#include "model/tokenizer/chat_template.h"
#include "nlohmann/json.hpp"
#include "retort/v1/config.pb.h"

namespace retort::sft {
namespace {

using json = nlohmann::json;

// TextFormat reports errors with 0-based line and column; the first becomes
// "<file>:<line>:<column>: <message>" (1-based, as editors count).
class ConfigErrorCollector : public google::protobuf::io::ErrorCollector {
 public:
  explicit ConfigErrorCollector(std::string source) : source_(std::move(source)) {}
  void AddError(int line, google::protobuf::io::ColumnNumber column,
                const std::string& message) override {
    if (first_.empty())
      first_ = absl::StrCat(source_, ":", line + 1, ":", column + 1, ": ", message);
  }
  const std::string& first_error() const { return first_; }

 private:
  std::string source_;
  std::string first_;
};

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::StatusOr<std::vector<int64_t>> Ids(const json& j, const char* key, int64_t vocab,
                                         const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_array())
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": '", key, "' must be an array of token ids"));
  std::vector<int64_t> ids;
  for (const auto& v : *it) {
    if (!v.is_number_integer())
      return absl::InvalidArgumentError(absl::StrCat(where, ": '", key, "' holds a non-integer"));
    const int64_t id = v.get<int64_t>();
    if (id < 0 || id >= vocab)
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": '", key, "' id ", id, " is outside 0..", vocab - 1));
    ids.push_back(id);
  }
  return ids;
}

absl::StatusOr<tokenizer::Role> RoleOf(const std::string& r, const std::string& where) {
  if (r == "system") return tokenizer::Role::kSystem;
  if (r == "user") return tokenizer::Role::kUser;
  if (r == "assistant") return tokenizer::Role::kAssistant;
  if (r == "tool") return tokenizer::Role::kTool;
  return absl::InvalidArgumentError(absl::StrCat(where, ": unknown role '", r, "'"));
}

// prompt = the conversation before the last assistant turn, rendered with the
// generation prompt; completion = what the complete rendering adds.
absl::StatusOr<SftExample> ChatExample(const tokenizer::Tokenizer& tok,
                                       const std::vector<tokenizer::Message>& msgs, int64_t vocab,
                                       const std::string& where) {
  if (msgs.size() < 2 || msgs.back().role != tokenizer::Role::kAssistant)
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": messages must end with an assistant turn after a prompt"));
  tokenizer::ChatOptions opts;
  std::vector<tokenizer::Message> head(msgs.begin(), msgs.end() - 1);
  ASSIGN_OR_RETURN(std::vector<tokenizer::TokenId> prompt,
                   tokenizer::RenderChatIds(tok, head, opts));
  ASSIGN_OR_RETURN(std::vector<tokenizer::TokenId> full, tokenizer::RenderChatIds(tok, msgs, opts));
  if (full.size() <= prompt.size() || !std::equal(prompt.begin(), prompt.end(), full.begin()))
    return absl::InvalidArgumentError(
        absl::StrCat(where,
                     ": the rendered prompt is not a prefix of the rendered "
                     "conversation (cannot mask it)"));
  SftExample ex;
  ex.prompt.assign(prompt.begin(), prompt.end());
  ex.completion.assign(full.begin() + prompt.size(), full.end());
  for (int64_t id : full)
    if (id < 0 || id >= vocab)
      return absl::InvalidArgumentError(absl::StrCat(where, ": the tokenizer produced id ", id,
                                                     ", outside the model's vocabulary 0..",
                                                     vocab - 1));
  return ex;
}

}  // namespace

absl::StatusOr<SftOptions> ParseSftConfig(const std::string& text, const std::string& source) {
  v1::SftLearnerConfig cfg;
  {
    ConfigErrorCollector errors(source);
    google::protobuf::TextFormat::Parser parser;
    parser.RecordErrorsTo(&errors);  // unknown fields and repeated singular fields are errors
    if (!parser.ParseFromString(text, &cfg) || !errors.first_error().empty())
      return absl::InvalidArgumentError(errors.first_error().empty()
                                            ? absl::StrCat(source, ": not a valid SftLearnerConfig")
                                            : errors.first_error());
  }
  auto bad = [&](const std::string& field, const auto&... what) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": '", field, "' ", what...));
  };
  SftOptions o;
  o.model_dir = cfg.model();
  o.data_path = cfg.data();
  o.output_dir = cfg.output_dir();
  for (const auto& [name, value] :
       {std::pair<const char*, const std::string*>{"model", &o.model_dir},
        {"data", &o.data_path},
        {"output_dir", &o.output_dir}})
    if (value->empty()) return bad(name, "is required and must not be empty");
  if (cfg.has_batch_size()) o.batch_size = cfg.batch_size();
  if (cfg.has_seq_len()) o.seq_len = cfg.seq_len();
  if (cfg.has_steps()) o.steps = cfg.steps();
  if (cfg.has_checkpoint_every()) o.checkpoint_every = cfg.checkpoint_every();
  if (cfg.has_resume()) o.resume = cfg.resume();
  if (cfg.has_tensorboard()) o.tensorboard = cfg.tensorboard();
  trainer::TrainerOptions& tr = o.trainer;
  if (cfg.has_seed()) tr.seed = cfg.seed();
  if (cfg.has_bias_update_speed()) tr.bias_update_speed = cfg.bias_update_speed();
  if (cfg.has_qat_experts()) tr.qat_experts = cfg.qat_experts();
  if (cfg.has_balance_loss_weight()) tr.balance_loss_weight = cfg.balance_loss_weight();
  int64_t delay = tr.anticipatory_routing_delay;
  if (cfg.has_anticipatory_routing_delay()) delay = cfg.anticipatory_routing_delay();
  for (const auto& [name, v] : {std::pair<const char*, int64_t>{"batch_size", o.batch_size},
                                {"seq_len", o.seq_len},
                                {"steps", o.steps}})
    if (v <= 0) return bad(name, "must be positive, got ", v);
  if (o.seq_len < 2) return bad("seq_len", "must be at least 2, got ", o.seq_len);
  if (o.checkpoint_every < 0)
    return bad("checkpoint_every", "must be >= 0, got ", o.checkpoint_every);
  if (delay < 0 || delay > 1000)
    return bad("anticipatory_routing_delay", "must be in 0..1000, got ", delay);
  tr.anticipatory_routing_delay = static_cast<int>(delay);
  if (!(tr.balance_loss_weight >= 0) || !std::isfinite(tr.balance_loss_weight))
    return bad("balance_loss_weight", "must be finite and >= 0, got ", tr.balance_loss_weight);
  if (!(tr.bias_update_speed >= 0) || !std::isfinite(tr.bias_update_speed))
    return bad("bias_update_speed", "must be finite and >= 0, got ", tr.bias_update_speed);

  if (!v1::CheckpointLayout_IsValid(cfg.checkpoint_layout()))
    return bad("checkpoint_layout", "is ", static_cast<int>(cfg.checkpoint_layout()),
               ", not a known layout (CHECKPOINT_LAYOUT_HF or _RELEASED)");
  tr.checkpoint_layout = cfg.checkpoint_layout() == v1::CHECKPOINT_LAYOUT_RELEASED
                             ? trainer::CheckpointLayout::kReleased
                             : trainer::CheckpointLayout::kHf;

  optim::OptimizerConfig& oc = tr.optimizer;
  const v1::OptimizerSettings& op = cfg.optimizer();
  oc.schedule.total_steps = o.steps;
  if (!v1::LrSchedule_IsValid(op.schedule()))  // proto3 enums are open: any number parses
    return bad("optimizer.schedule", "is ", static_cast<int>(op.schedule()),
               ", not a known schedule (LR_SCHEDULE_CONSTANT, _LINEAR or _COSINE)");
  oc.schedule.kind = op.schedule() == v1::LR_SCHEDULE_LINEAR   ? optim::ScheduleKind::kLinear
                     : op.schedule() == v1::LR_SCHEDULE_COSINE ? optim::ScheduleKind::kCosine
                                                               : optim::ScheduleKind::kConstant;
  if (op.has_lr()) oc.schedule.peak_lr = op.lr();
  if (!(oc.schedule.peak_lr > 0) || !std::isfinite(oc.schedule.peak_lr))
    return bad("optimizer.lr", "must be finite and > 0, got ", oc.schedule.peak_lr);
  oc.schedule.final_lr = op.has_final_lr() ? op.final_lr() : oc.schedule.peak_lr / 10;
  if (!(oc.schedule.final_lr >= 0) || !std::isfinite(oc.schedule.final_lr))
    return bad("optimizer.final_lr", "must be finite and >= 0, got ", oc.schedule.final_lr);
  if (op.has_warmup_steps()) oc.schedule.warmup_steps = op.warmup_steps();
  if (oc.schedule.warmup_steps < 0)
    return bad("optimizer.warmup_steps", "must be >= 0, got ", oc.schedule.warmup_steps);
  if (op.has_max_grad_norm()) oc.max_grad_norm = op.max_grad_norm();
  if (!std::isfinite(oc.max_grad_norm))
    return bad("optimizer.max_grad_norm", "must be finite, got ", oc.max_grad_norm);
  if (op.has_weight_decay()) oc.muon.weight_decay = oc.adamw.weight_decay = op.weight_decay();
  if (!(oc.muon.weight_decay >= 0) || !std::isfinite(oc.muon.weight_decay))
    return bad("optimizer.weight_decay", "must be finite and >= 0, got ", oc.muon.weight_decay);
  auto unit = [&](const char* name, bool has, float value, float* out) -> absl::Status {
    if (!has) return absl::OkStatus();
    if (!(value >= 0.0f && value < 1.0f)) return bad(name, "must be in [0, 1), got ", value);
    *out = value;
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(unit("optimizer.muon_momentum", op.has_muon_momentum(), op.muon_momentum(),
                       &oc.muon.momentum));
  RETURN_IF_ERROR(
      unit("optimizer.adam_beta1", op.has_adam_beta1(), op.adam_beta1(), &oc.adamw.beta1));
  RETURN_IF_ERROR(
      unit("optimizer.adam_beta2", op.has_adam_beta2(), op.adam_beta2(), &oc.adamw.beta2));
  if (absl::Status s = optim::ValidateSchedule(oc.schedule); !s.ok())
    return Annotate(s, source + ": optimizer");
  return o;
}

absl::StatusOr<SftOptions> LoadSftConfig(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  return ParseSftConfig(text, path);
}

absl::StatusOr<std::vector<SftExample>> ReadSftData(const std::string& path,
                                                    const tokenizer::Tokenizer* tok,
                                                    int64_t vocab) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::vector<SftExample> out;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = absl::StrCat(path, ":", n);
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return absl::InvalidArgumentError(absl::StrCat(where, ": not a JSON object"));
    if (j.contains("prompt_ids") || j.contains("completion_ids")) {
      SftExample ex;
      ASSIGN_OR_RETURN(ex.prompt, Ids(j, "prompt_ids", vocab, where));
      ASSIGN_OR_RETURN(ex.completion, Ids(j, "completion_ids", vocab, where));
      if (ex.completion.empty())
        return absl::InvalidArgumentError(absl::StrCat(where, ": 'completion_ids' is empty"));
      out.push_back(std::move(ex));
      continue;
    }
    if (!j.contains("messages") && !(j.contains("prompt") && j.contains("completion")))
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": a record needs prompt_ids/completion_ids, prompt/completion or messages"));
    if (tok == nullptr)
      return absl::FailedPreconditionError(absl::StrCat(
          where,
          ": a text record needs a tokenizer, and the model directory has no tokenizer.json"));
    std::vector<tokenizer::Message> msgs;
    if (j.contains("messages")) {
      if (!j["messages"].is_array())
        return absl::InvalidArgumentError(absl::StrCat(where, ": 'messages' must be an array"));
      for (const auto& m : j["messages"]) {
        if (!m.is_object() || !m.contains("role") || !m.contains("content") ||
            !m["role"].is_string() || !m["content"].is_string())
          return absl::InvalidArgumentError(
              absl::StrCat(where, ": each message needs string 'role' and 'content'"));
        tokenizer::Message msg;
        ASSIGN_OR_RETURN(msg.role, RoleOf(m["role"].get<std::string>(), where));
        msg.content = m["content"].get<std::string>();
        msgs.push_back(std::move(msg));
      }
    } else {
      if (!j["prompt"].is_string() || !j["completion"].is_string())
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": 'prompt' and 'completion' must be strings"));
      msgs.push_back({tokenizer::Role::kUser, j["prompt"].get<std::string>(), "", {}, ""});
      msgs.push_back({tokenizer::Role::kAssistant, j["completion"].get<std::string>(), "", {}, ""});
    }
    ASSIGN_OR_RETURN(SftExample ex, ChatExample(*tok, msgs, vocab, where));
    out.push_back(std::move(ex));
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no records"));
  return out;
}

absl::StatusOr<PackedRows> PackExamples(const std::vector<SftExample>& examples, int64_t T) {
  PackedRows rows;
  rows.seq_len = T;
  std::vector<int64_t> tok, tgt;
  std::vector<int32_t> doc;
  auto flush = [&] {
    if (tok.empty()) return;
    tgt.resize(tok.size(), -1);
    tok.resize(T, 0);
    tgt.resize(T, -1);
    doc.resize(T, -1);
    rows.tokens.push_back(std::move(tok));
    rows.targets.push_back(std::move(tgt));
    rows.documents.push_back(std::move(doc));
    tok.clear();
    tgt.clear();
    doc.clear();
  };
  for (size_t i = 0; i < examples.size(); ++i) {
    const SftExample& ex = examples[i];
    const int64_t len = static_cast<int64_t>(ex.prompt.size() + ex.completion.size());
    if (len > T)
      return absl::InvalidArgumentError(
          absl::StrCat("example ", i, " has ", len, " tokens, more than seq_len ", T));
    if (static_cast<int64_t>(tok.size()) + len > T) flush();
    const int32_t d = doc.empty() ? 0 : doc.back() + 1;
    // Position p (this example's k-th token) predicts token k+1 when that is a completion token.
    const int64_t P = static_cast<int64_t>(ex.prompt.size());
    for (int64_t k = 0; k < len; ++k) {
      tok.push_back(k < P ? ex.prompt[k] : ex.completion[k - P]);
      tgt.push_back(k + 1 < len && k + 1 >= P ? ex.completion[k + 1 - P] : -1);
      doc.push_back(d);
    }
  }
  flush();
  return rows;
}

SftBatch MakeBatch(const PackedRows& rows, int64_t batch_size, int64_t position, uint64_t seed) {
  const int64_t R = static_cast<int64_t>(rows.tokens.size());
  SftBatch b;
  b.B = batch_size;
  b.T = rows.seq_len;
  int64_t cached_epoch = -1;
  std::vector<int64_t> perm(R);
  int64_t scored = 0;
  for (int64_t j = 0; j < batch_size; ++j) {
    const int64_t k = position * batch_size + j, epoch = k / R;
    if (epoch != cached_epoch) {
      std::iota(perm.begin(), perm.end(), 0);
      std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(epoch));
      std::shuffle(perm.begin(), perm.end(), rng);
      cached_epoch = epoch;
    }
    const int64_t r = perm[k % R];
    b.tokens.insert(b.tokens.end(), rows.tokens[r].begin(), rows.tokens[r].end());
    b.targets.insert(b.targets.end(), rows.targets[r].begin(), rows.targets[r].end());
    b.documents.insert(b.documents.end(), rows.documents[r].begin(), rows.documents[r].end());
  }
  for (int64_t t : b.targets) scored += t >= 0;
  const float w = scored > 0 ? 1.0f / static_cast<float>(scored) : 0.0f;
  for (int64_t t : b.targets) b.weights.push_back(t >= 0 ? w : 0.0f);
  return b;
}

absl::StatusOr<SftStepReport> RunSft(const SftOptions& o,
                                     const std::function<void(const SftStepReport&)>& on_step) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(o.output_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("creating ", o.output_dir, ": ", ec.message()));
  const std::string ckpt = o.output_dir + "/checkpoint";
  std::unique_ptr<trainer::Trainer> t;
  if (o.resume) {
    ASSIGN_OR_RETURN(t, trainer::Trainer::FromCheckpoint(ckpt, o.trainer));
  } else {
    ASSIGN_OR_RETURN(t, trainer::Trainer::FromModelDir(o.model_dir, o.trainer));
  }
  std::unique_ptr<tokenizer::Tokenizer> tok;
  if (fs::exists(o.model_dir + "/tokenizer.json")) {
    ASSIGN_OR_RETURN(tok, tokenizer::Tokenizer::LoadDir(o.model_dir));
  }
  ASSIGN_OR_RETURN(std::vector<SftExample> examples,
                   ReadSftData(o.data_path, tok.get(), t->model().config().vocab_size));
  auto packed = PackExamples(examples, o.seq_len);
  if (!packed.ok()) return Annotate(packed.status(), o.data_path);
  const std::string metrics_path = o.output_dir + "/metrics.jsonl";
  std::ofstream metrics(metrics_path, o.resume ? std::ios::app : std::ios::trunc);
  if (!metrics) return absl::InternalError(absl::StrCat(metrics_path, ": cannot open for writing"));
  std::unique_ptr<trainer::EventWriter> events;
  if (o.tensorboard) {
    ASSIGN_OR_RETURN(events, trainer::EventWriter::Create(o.output_dir + "/tensorboard"));
  }
  const bool tty = isatty(fileno(stderr));
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t first = t->step();
  int64_t tokens_done = 0;
  SftStepReport report;
  report.total_steps = o.steps;
  if (first >= o.steps)
    return absl::FailedPreconditionError(
        absl::StrCat(ckpt, " is at step ", first, ", not before 'steps' ", o.steps));
  // Anticipatory routing: batch p is prefetched (routed) before the update of
  // step p - delay; a resumed trainer brings its queue from the checkpoint.
  const int64_t delay = o.trainer.anticipatory_routing_delay;
  for (int64_t p = t->data_position() + t->prefetched();
       delay > 0 && p < t->data_position() + delay; ++p)
    RETURN_IF_ERROR(t->Prefetch(MakeBatch(*packed, o.batch_size, p, o.trainer.seed).view()));
  while (t->step() < o.steps) {
    if (delay > 0)
      RETURN_IF_ERROR(t->Prefetch(
          MakeBatch(*packed, o.batch_size, t->data_position() + delay, o.trainer.seed).view()));
    const SftBatch batch = MakeBatch(*packed, o.batch_size, t->data_position(), o.trainer.seed);
    auto r = t->Step(batch.view());
    if (!r.ok()) return Annotate(r.status(), absl::StrCat("sft step ", t->step()));
    t->set_data_position(t->data_position() + 1);
    tokens_done += batch.B * batch.T;
    report.result = *r;
    report.elapsed_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    report.tokens_per_s = report.elapsed_s > 0 ? tokens_done / report.elapsed_s : 0;
    const int64_t done = r->step + 1;
    const double eta =
        report.elapsed_s / static_cast<double>(done - first) * static_cast<double>(o.steps - done);
    json line = {{"step", done},
                 {"loss", r->loss},
                 {"balance_loss", r->balance_loss},
                 {"lr", r->lr},
                 {"grad_norm", r->grad_norm},
                 {"clip_scale", r->clip_scale},
                 {"scored_tokens", r->tokens},
                 {"tokens_per_s", report.tokens_per_s},
                 {"elapsed_s", report.elapsed_s}};
    metrics << line.dump() << "\n";
    metrics.flush();
    if (events)
      RETURN_IF_ERROR(events->WriteScalars(
          done, {{"train/loss", static_cast<float>(r->loss)},
                 {"train/lr", static_cast<float>(r->lr)},
                 {"train/grad_norm", static_cast<float>(r->grad_norm)},
                 {"train/tokens_per_s", static_cast<float>(report.tokens_per_s)}}));
    std::fprintf(stderr, "%ssft step %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s  ETA %.0fs%s",
                 tty ? "\r" : "", static_cast<long long>(done), static_cast<long long>(o.steps),
                 r->loss, r->lr, report.tokens_per_s, eta, tty && done != o.steps ? "   " : "\n");
    if (on_step) on_step(report);
    if ((o.checkpoint_every > 0 && done % o.checkpoint_every == 0) || done == o.steps)
      RETURN_IF_ERROR(t->SaveCheckpoint(ckpt));
  }
  if (!metrics) return absl::DataLossError(absl::StrCat(metrics_path, ": write failed"));
  return report;
}

}  // namespace retort::sft
