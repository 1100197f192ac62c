// SFT: config, JSONL reader, packing and the loop (see sft.h).
#include "learner/sft/sft.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "learner/trainer/event_writer.h"
#include "model/base/status_macros.h"
#include "model/tokenizer/chat_template.h"
#include "nlohmann/json.hpp"

namespace retort::sft {
namespace {

using json = nlohmann::json;

absl::Status UnknownKeys(const json& j, const std::set<std::string>& known,
                         const std::string& where) {
  for (auto it = j.begin(); it != j.end(); ++it)
    if (!known.count(it.key()))
      return absl::InvalidArgumentError(absl::StrCat(where, ": unknown field '", it.key(), "'"));
  return absl::OkStatus();
}

// Type checks before get<>(), so nlohmann never throws (retort does not use exceptions).
bool Fits(const json& v, const std::string*) { return v.is_string(); }
bool Fits(const json& v, const int64_t*) { return v.is_number_integer(); }
bool Fits(const json& v, const uint64_t*) { return v.is_number_unsigned(); }
bool Fits(const json& v, const double*) { return v.is_number(); }
bool Fits(const json& v, const float*) { return v.is_number(); }
bool Fits(const json& v, const bool*) { return v.is_boolean(); }

template <typename T>
absl::Status Read(const json& j, const char* key, const std::string& where, T* out,
                  bool required = false) {
  auto it = j.find(key);
  if (it == j.end()) {
    if (required)
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": missing required field '", key, "'"));
    return absl::OkStatus();
  }
  if (!Fits(*it, out))
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": field '", key, "' has the wrong type (", it->type_name(), ")"));
  *out = it->get<T>();
  return absl::OkStatus();
}

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
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON"));
  if (!j.is_object())
    return absl::InvalidArgumentError(absl::StrCat(source, ": must be a JSON object"));
  RETURN_IF_ERROR(
      UnknownKeys(j,
                  {"model", "data", "output_dir", "batch_size", "seq_len", "steps",
                   "checkpoint_every", "resume", "seed", "tensorboard", "bias_update_speed",
                   "qat_experts", "balance_loss_weight", "anticipatory_routing_delay", "optimizer"},
                  source));
  SftOptions o;
  RETURN_IF_ERROR(Read(j, "model", source, &o.model_dir, true));
  RETURN_IF_ERROR(Read(j, "data", source, &o.data_path, true));
  RETURN_IF_ERROR(Read(j, "output_dir", source, &o.output_dir, true));
  RETURN_IF_ERROR(Read(j, "batch_size", source, &o.batch_size));
  RETURN_IF_ERROR(Read(j, "seq_len", source, &o.seq_len));
  RETURN_IF_ERROR(Read(j, "steps", source, &o.steps));
  RETURN_IF_ERROR(Read(j, "checkpoint_every", source, &o.checkpoint_every));
  RETURN_IF_ERROR(Read(j, "resume", source, &o.resume));
  RETURN_IF_ERROR(Read(j, "seed", source, &o.trainer.seed));
  RETURN_IF_ERROR(Read(j, "tensorboard", source, &o.tensorboard));
  RETURN_IF_ERROR(Read(j, "bias_update_speed", source, &o.trainer.bias_update_speed));
  RETURN_IF_ERROR(Read(j, "qat_experts", source, &o.trainer.qat_experts));
  RETURN_IF_ERROR(Read(j, "balance_loss_weight", source, &o.trainer.balance_loss_weight));
  int64_t delay = o.trainer.anticipatory_routing_delay;
  RETURN_IF_ERROR(Read(j, "anticipatory_routing_delay", source, &delay));
  if (delay < 0 || delay > 1000)
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": 'anticipatory_routing_delay' must be in 0..1000, got ", delay));
  o.trainer.anticipatory_routing_delay = static_cast<int>(delay);
  if (o.trainer.balance_loss_weight < 0)
    return absl::InvalidArgumentError(absl::StrCat(source, ": 'balance_loss_weight' must be >= 0"));
  if (o.trainer.bias_update_speed < 0)
    return absl::InvalidArgumentError(absl::StrCat(source, ": 'bias_update_speed' must be >= 0"));
  for (const auto& [name, v] : {std::pair<const char*, int64_t>{"batch_size", o.batch_size},
                                {"seq_len", o.seq_len},
                                {"steps", o.steps}})
    if (v <= 0)
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": '", name, "' must be positive, got ", v));
  if (o.seq_len < 2)
    return absl::InvalidArgumentError(absl::StrCat(source, ": 'seq_len' must be at least 2"));
  if (o.checkpoint_every < 0)
    return absl::InvalidArgumentError(absl::StrCat(source, ": 'checkpoint_every' must be >= 0"));
  for (const char* key : {"model", "data", "output_dir"})
    if (j[key].get<std::string>().empty())
      return absl::InvalidArgumentError(absl::StrCat(source, ": '", key, "' must not be empty"));
  optim::OptimizerConfig& oc = o.trainer.optimizer;
  oc.schedule.total_steps = o.steps;
  if (auto it = j.find("optimizer"); it != j.end()) {
    const std::string where = source + ": optimizer";
    if (!it->is_object())
      return absl::InvalidArgumentError(absl::StrCat(where, " must be an object"));
    RETURN_IF_ERROR(UnknownKeys(*it,
                                {"schedule", "lr", "final_lr", "warmup_steps", "max_grad_norm",
                                 "weight_decay", "muon_momentum", "adam_beta1", "adam_beta2"},
                                where));
    std::string schedule = ScheduleKindName(oc.schedule.kind);
    RETURN_IF_ERROR(Read(*it, "schedule", where, &schedule));
    auto kind = optim::ScheduleKindFromName(schedule);
    if (!kind)
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": unknown schedule '", schedule, "' (constant, linear or cosine)"));
    oc.schedule.kind = *kind;
    RETURN_IF_ERROR(Read(*it, "lr", where, &oc.schedule.peak_lr));
    oc.schedule.final_lr = oc.schedule.peak_lr / 10;
    RETURN_IF_ERROR(Read(*it, "final_lr", where, &oc.schedule.final_lr));
    RETURN_IF_ERROR(Read(*it, "warmup_steps", where, &oc.schedule.warmup_steps));
    RETURN_IF_ERROR(Read(*it, "max_grad_norm", where, &oc.max_grad_norm));
    float wd = oc.muon.weight_decay;
    RETURN_IF_ERROR(Read(*it, "weight_decay", where, &wd));
    oc.muon.weight_decay = oc.adamw.weight_decay = wd;
    RETURN_IF_ERROR(Read(*it, "muon_momentum", where, &oc.muon.momentum));
    RETURN_IF_ERROR(Read(*it, "adam_beta1", where, &oc.adamw.beta1));
    RETURN_IF_ERROR(Read(*it, "adam_beta2", where, &oc.adamw.beta2));
  }
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
  auto flush = [&] {
    if (tok.empty()) return;
    tgt.resize(tok.size(), -1);
    tok.resize(T, 0);
    tgt.resize(T, -1);
    rows.tokens.push_back(std::move(tok));
    rows.targets.push_back(std::move(tgt));
    tok.clear();
    tgt.clear();
  };
  for (size_t i = 0; i < examples.size(); ++i) {
    const SftExample& ex = examples[i];
    const int64_t len = static_cast<int64_t>(ex.prompt.size() + ex.completion.size());
    if (len > T)
      return absl::InvalidArgumentError(
          absl::StrCat("example ", i, " has ", len, " tokens, more than seq_len ", T));
    if (static_cast<int64_t>(tok.size()) + len > T) flush();
    // Position p (this example's k-th token) predicts token k+1 when that is a completion token.
    const int64_t P = static_cast<int64_t>(ex.prompt.size());
    for (int64_t k = 0; k < len; ++k) {
      tok.push_back(k < P ? ex.prompt[k] : ex.completion[k - P]);
      tgt.push_back(k + 1 < len && k + 1 >= P ? ex.completion[k + 1 - P] : -1);
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
