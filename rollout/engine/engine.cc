// Continuous-batching engine (see engine.h).
//
// Note [Token stream]: every sequence sees one stream `tokens` = prompt ++
// generated. `pos` counts stream tokens already fed into its DecodeState. The
// logits row produced by feeding stream token j predicts generated index
// g = j + 1 - P (P = prompt length); rows with g < 0 are prompt-internal. A
// row with g < generated.size() re-predicts a logged token (resume): the
// sampler is replayed on it to advance its RNG, and the logged token is kept.
// A row with g == generated.size() samples a fresh token. A group leader
// (sample -1) only feeds the prompt; when it reaches P it is forked into the
// group's samples, each of which consumes the leader's last row as g = 0.
#include "rollout/engine/engine.h"

#include <algorithm>
#include <chrono>
#include <set>

#include "absl/strings/str_cat.h"
#include "model/base/logging.h"

namespace retort::rollout {

using retort::v1::Completion;
using retort::v1::FinishReason;

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case retort::v1::FINISH_REASON_UNSPECIFIED: return "unspecified";
    case retort::v1::FINISH_REASON_EOS: return "eos";
    case retort::v1::FINISH_REASON_STOP_TOKEN: return "stop_token";
    case retort::v1::FINISH_REASON_LENGTH: return "length";
    case retort::v1::FINISH_REASON_ABORTED: return "aborted";
    case retort::v1::FinishReason_INT_MIN_SENTINEL_DO_NOT_USE_:
    case retort::v1::FinishReason_INT_MAX_SENTINEL_DO_NOT_USE_: break;
  }
  return "?";
}

namespace {

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

SamplingParams SeededParams(const GenerationRequest& r, int32_t sample) {
  SamplingParams p = r.sampling;
  p.seed = SampleSeed(r.sampling.seed, sample);
  return p;
}

// Finish reason after `generated` tokens, or UNSPECIFIED to go on.
FinishReason StopReason(const GenerationRequest& r, const v4::Model& model, absl::Span<const int64_t> generated) {
  if (generated.empty()) return retort::v1::FINISH_REASON_UNSPECIFIED;
  const int64_t last = generated.back();
  if (!r.ignore_eos && last == model.config().eos_token_id) return retort::v1::FINISH_REASON_EOS;
  if (std::find(r.stop_token_ids.begin(), r.stop_token_ids.end(), last) != r.stop_token_ids.end())
    return retort::v1::FINISH_REASON_STOP_TOKEN;
  if (static_cast<int64_t>(generated.size()) >= r.max_new_tokens) return retort::v1::FINISH_REASON_LENGTH;
  if (static_cast<int64_t>(r.prompt.size() + generated.size()) >= model.config().max_position_embeddings)
    return retort::v1::FINISH_REASON_LENGTH;
  return retort::v1::FINISH_REASON_UNSPECIFIED;
}

// Bytes to reserve for a sequence that may grow to `length` tokens: the most
// its state holds at any length up to `length` (StateBytes dips when a
// compression window closes and its pending rows fold into one entry; windows
// are at most 2 x 128 tokens in V4, so the last 512 lengths cover the peak).
int64_t ReserveBytes(const v4::Model& model, int64_t length) {
  int64_t most = 0;
  for (int64_t l = std::max<int64_t>(1, length - 512); l <= length; ++l) most = std::max(most, model.StateBytes(l));
  return most;
}

Completion BaseCompletion(const GenerationRequest& r, int32_t sample) {
  Completion c;
  c.set_request_id(r.request_id);
  c.set_group_id(r.group_id);
  c.set_sample_index(sample);
  c.mutable_prompt_ids()->Add(r.prompt.begin(), r.prompt.end());
  return c;
}

void AddRoutes(const v4::StepOutputs& out, int64_t row, int k, Completion* c) {
  retort::v1::TokenRoutes* t = c->add_routed_experts();
  for (const auto& layer : out.routes)
    for (int e = 0; e < k; ++e) t->add_expert_ids(layer[row * k + e]);
}

}  // namespace

struct Engine::Sequence {
  int32_t sample = -1;  // -1: the group leader (prompt prefill only)
  std::unique_ptr<v4::DecodeState> state;
  std::unique_ptr<Sampler> sampler;
  std::vector<int64_t> tokens;  // prompt ++ generated (Note [Token stream])
  int64_t pos = 0;
  Completion out;  // generated tokens with per-token data
  bool finished = false;
};

struct Engine::Group {
  GenerationRequest req;
  CompletionSink sink;
  int64_t reserved = 0;
  bool aborted = false;
  std::vector<int32_t> samples;                   // to generate
  std::vector<Completion> done_at_admission;      // resumed samples already at a stop condition
  std::vector<std::unique_ptr<Sequence>> seqs;    // leader only (before the fork) or the samples
  bool forked = false;
};

Engine::Engine(std::shared_ptr<const v4::Model> model, uint64_t version, EngineOptions options, TokenObserver observer)
    : options_(options), observer_(std::move(observer)), model_(std::move(model)), version_(version) {
  CHECK(model_ != nullptr);
}

Engine::~Engine() { Stop(); }

void Engine::Start() {
  std::lock_guard<std::mutex> l(mu_);
  CHECK(!thread_.joinable());
  stop_ = false;
  thread_ = std::thread([this] { Loop(); });
}

void Engine::Stop() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

absl::Status Engine::Validate(const GenerationRequest& r) const {
  std::shared_ptr<const v4::Model> model = this->model();
  const io::V4Config& c = model->config();
  const std::string who = absl::StrCat("request '", r.request_id, "': ");
  if (r.prompt.empty()) return absl::InvalidArgumentError(who + "prompt is empty");
  for (size_t i = 0; i < r.prompt.size(); ++i)
    if (r.prompt[i] < 0 || r.prompt[i] >= c.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat(who, "prompt token ", i, " has id ", r.prompt[i],
                                                     ", outside the vocabulary [0, ", c.vocab_size, ")"));
  for (int64_t s : r.stop_token_ids)
    if (s < 0 || s >= c.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat(who, "stop token id ", s, " is outside the vocabulary [0, ", c.vocab_size, ")"));
  if (r.n < 1 || r.n > options_.max_samples)
    return absl::InvalidArgumentError(absl::StrCat(who, "n must be in [1, ", options_.max_samples, "], got ", r.n));
  if (r.max_new_tokens < 1 || r.max_new_tokens > options_.max_new_tokens_limit)
    return absl::InvalidArgumentError(absl::StrCat(who, "max_new_tokens must be in [1, ", options_.max_new_tokens_limit,
                                                   "], got ", r.max_new_tokens));
  if (static_cast<int64_t>(r.prompt.size()) >= c.max_position_embeddings)
    return absl::InvalidArgumentError(absl::StrCat(who, "context too long: prompt has ", r.prompt.size(),
                                                   " tokens, the model's context is ", c.max_position_embeddings));
  if (absl::Status s = ValidateSamplingParams(r.sampling); !s.ok())
    return absl::InvalidArgumentError(absl::StrCat(who, s.message()));
  const int64_t need =
      r.n * ReserveBytes(*model, std::min<int64_t>(r.prompt.size() + r.max_new_tokens, c.max_position_embeddings));
  if (need > options_.state_bytes_budget)
    return absl::InvalidArgumentError(absl::StrCat(who, "needs ", need, " bytes of decode state, more than the worker's budget of ",
                                                   options_.state_bytes_budget));
  for (const auto& [sample, logged] : r.resume) {
    if (sample < 0 || sample >= r.n) return absl::InvalidArgumentError(absl::StrCat(who, "resume sample ", sample, " out of range"));
    if (logged.token_ids_size() != logged.logprobs_size() || logged.token_ids_size() != logged.weight_versions_size() ||
        logged.token_ids_size() != logged.model_logprobs_size())
      return absl::InvalidArgumentError(absl::StrCat(who, "resume sample ", sample, " has ragged per-token fields"));
  }
  return absl::OkStatus();
}

absl::Status Engine::Submit(GenerationRequest request, CompletionSink sink) {
  if (absl::Status s = Validate(request); !s.ok()) return s;
  auto g = std::make_unique<Group>();
  std::shared_ptr<const v4::Model> model = this->model();
  std::set<int32_t> skip(request.skip.begin(), request.skip.end());
  for (int32_t i = 0; i < request.n; ++i) {
    if (skip.count(i)) continue;
    auto it = request.resume.find(i);
    if (it != request.resume.end()) {
      const auto& ids = it->second.token_ids();
      FinishReason why = StopReason(request, *model, absl::MakeConstSpan(ids.data(), ids.size()));
      if (why != retort::v1::FINISH_REASON_UNSPECIFIED) {
        Completion c = BaseCompletion(request, i);
        c.mutable_token_ids()->CopyFrom(it->second.token_ids());
        c.mutable_logprobs()->CopyFrom(it->second.logprobs());
        c.mutable_model_logprobs()->CopyFrom(it->second.model_logprobs());
        c.mutable_weight_versions()->CopyFrom(it->second.weight_versions());
        c.set_finish_reason(why);
        c.set_resumed_tokens(ids.size());
        g->done_at_admission.push_back(std::move(c));
        continue;
      }
    }
    g->samples.push_back(i);
  }
  g->reserved = static_cast<int64_t>(g->samples.size()) *
                ReserveBytes(*model, std::min<int64_t>(request.prompt.size() + request.max_new_tokens,
                                                       model->config().max_position_embeddings));
  g->req = std::move(request);
  g->sink = std::move(sink);
  {
    std::lock_guard<std::mutex> l(mu_);
    const std::string& id = g->req.request_id;
    if (std::find(active_ids_.begin(), active_ids_.end(), id) != active_ids_.end())
      return absl::AlreadyExistsError(absl::StrCat("request '", id, "' is already running"));
    for (const auto& q : queue_)
      if (q->req.request_id == id) return absl::AlreadyExistsError(absl::StrCat("request '", id, "' is already queued"));
    queue_.push_back(std::move(g));
  }
  cv_.notify_all();
  return absl::OkStatus();
}

int Engine::Abort(const std::vector<std::string>& request_ids) {
  int matched = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (const std::string& id : request_ids) {
      bool found = std::find(active_ids_.begin(), active_ids_.end(), id) != active_ids_.end();
      for (const auto& q : queue_) found |= q->req.request_id == id;
      if (found) {
        ++matched;
        aborts_.push_back(id);
      }
    }
  }
  cv_.notify_all();
  return matched;
}

bool Engine::IsActive(const std::string& request_id) const {
  std::lock_guard<std::mutex> l(mu_);
  if (std::find(active_ids_.begin(), active_ids_.end(), request_id) != active_ids_.end()) return true;
  for (const auto& q : queue_)
    if (q->req.request_id == request_id) return true;
  return false;
}

void Engine::Pause() {
  std::lock_guard<std::mutex> l(mu_);
  paused_ = true;
}

void Engine::Resume() {
  {
    std::lock_guard<std::mutex> l(mu_);
    paused_ = false;
  }
  cv_.notify_all();
}

absl::Status Engine::SwapModel(std::shared_ptr<const v4::Model> model, uint64_t version) {
  std::lock_guard<std::mutex> l(mu_);
  const uint64_t current = std::max(version_, pending_model_ ? pending_version_ : 0);
  if (version <= current)
    return absl::FailedPreconditionError(
        absl::StrCat("weight version ", version, " is not newer than the worker's version ", current));
  pending_model_ = std::move(model);
  pending_version_ = version;
  return absl::OkStatus();
}

uint64_t Engine::weight_version() const {
  std::lock_guard<std::mutex> l(mu_);
  return version_;
}

std::shared_ptr<const v4::Model> Engine::model() const {
  std::lock_guard<std::mutex> l(mu_);
  return pending_model_ ? pending_model_ : model_;
}

EngineStatus Engine::Status() const {
  std::lock_guard<std::mutex> l(mu_);
  EngineStatus s;
  s.weight_version = version_;
  s.queued_groups = static_cast<int32_t>(queue_.size());
  s.running_sequences = running_sequences_;
  s.state_bytes = state_bytes_;
  s.reserved_bytes = reserved_bytes_;
  s.state_bytes_budget = options_.state_bytes_budget;
  s.generated_tokens = generated_tokens_;
  s.steps = steps_;
  s.replay_mismatches = replay_mismatches_;
  s.paused = paused_;
  if (!rate_window_.empty()) {
    const double span = std::max(NowSeconds() - rate_window_.front().first, 1e-3);
    int64_t t = 0;
    for (const auto& [when, n] : rate_window_) t += n;
    s.tokens_per_second = t / span;
  }
  return s;
}

void Engine::Loop() {
  while (true) {
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] {
        return stop_ || !aborts_.empty() ||
               (!paused_ && (!queue_.empty() || !running_.empty()));
      });
      if (stop_) return;
    }
    StepOnce();
  }
}

void Engine::RunUntilIdle() {
  CHECK(!thread_.joinable()) << "RunUntilIdle with a background loop running";
  while (StepOnce()) {
  }
}

bool Engine::StepOnce() {
  std::shared_ptr<const v4::Model> model;
  uint64_t version;
  std::vector<std::unique_ptr<Group>> finished_groups;  // aborted while queued
  std::vector<std::pair<CompletionSink*, Completion>> deliveries;
  std::vector<std::string> aborts;
  bool paused = false;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (pending_model_) {
      model_ = std::move(pending_model_);
      version_ = pending_version_;
    }
    model = model_;
    version = version_;
    aborts.swap(aborts_);
    paused = paused_;
    // Aborted while queued: complete at once.
    for (auto it = queue_.begin(); it != queue_.end();) {
      if (std::find(aborts.begin(), aborts.end(), (*it)->req.request_id) != aborts.end()) {
        (*it)->aborted = true;
        finished_groups.push_back(std::move(*it));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    if (!paused_) {
      // Admission: FIFO while the memory budget and sequence cap allow; a group
      // is always admitted into an idle engine (Validate bounds its size).
      while (!queue_.empty()) {
        Group& g = *queue_.front();
        const int32_t want = static_cast<int32_t>(g.samples.size());
        const bool idle = running_.empty();
        if (!idle && (reserved_bytes_ + g.reserved > options_.state_bytes_budget ||
                      running_sequences_ + want > options_.max_running_sequences))
          break;
        reserved_bytes_ += g.reserved;
        running_sequences_ += want;
        active_ids_.push_back(g.req.request_id);
        running_.push_back(std::move(queue_.front()));
        queue_.pop_front();
        Group& a = *running_.back();
        if (a.samples.empty()) {
          a.forked = true;  // every sample finished before the restart: nothing to run
        } else if (options_.share_prefix) {
          auto leader = std::make_unique<Sequence>();
          leader->state = model->NewState();
          leader->tokens = a.req.prompt;
          a.seqs.push_back(std::move(leader));
        } else {
          a.forked = true;
          for (int32_t i : a.samples) {
            auto s = std::make_unique<Sequence>();
            s->sample = i;
            s->state = model->NewState();
            a.seqs.push_back(std::move(s));
          }
        }
      }
    }
  }
  for (auto& g : finished_groups) {
    for (Completion& c : g->done_at_admission) g->sink(std::move(c));
    for (int32_t i : g->samples) {
      Completion c = BaseCompletion(g->req, i);
      auto it = g->req.resume.find(i);
      if (it != g->req.resume.end()) {
        c.mutable_token_ids()->CopyFrom(it->second.token_ids());
        c.mutable_logprobs()->CopyFrom(it->second.logprobs());
        c.mutable_model_logprobs()->CopyFrom(it->second.model_logprobs());
        c.mutable_weight_versions()->CopyFrom(it->second.weight_versions());
      }
      c.set_finish_reason(retort::v1::FINISH_REASON_ABORTED);
      g->sink(std::move(c));
    }
  }
  const bool had_aborts = !finished_groups.empty();
  finished_groups.clear();

  // Initialise sequences created at admission (sampler, stream, resumed tokens).
  for (auto& g : running_) {
    for (Completion& c : g->done_at_admission) deliveries.emplace_back(&g->sink, std::move(c));
    g->done_at_admission.clear();
    if (std::find(aborts.begin(), aborts.end(), g->req.request_id) != aborts.end()) g->aborted = true;
    for (auto& s : g->seqs) {
      if (s->sample < 0 || s->sampler) continue;
      s->sampler = std::make_unique<Sampler>(SeededParams(g->req, s->sample));
      s->tokens = g->req.prompt;
      s->out = BaseCompletion(g->req, s->sample);
      auto it = g->req.resume.find(s->sample);
      if (it != g->req.resume.end()) {
        s->tokens.insert(s->tokens.end(), it->second.token_ids().begin(), it->second.token_ids().end());
        s->out.mutable_token_ids()->CopyFrom(it->second.token_ids());
        s->out.mutable_logprobs()->CopyFrom(it->second.logprobs());
        s->out.mutable_model_logprobs()->CopyFrom(it->second.model_logprobs());
        s->out.mutable_weight_versions()->CopyFrom(it->second.weight_versions());
        s->out.set_resumed_tokens(it->second.token_ids_size());
      }
    }
  }

  // Schedule: one decode token per ready sequence (round-robin when over
  // budget), then prefill/replay chunks with what is left.
  struct Planned {
    Group* group;
    Sequence* seq;
    int64_t count;
  };
  std::vector<Planned> plan;
  std::vector<Planned> decodes, prefills;
  for (auto& g : running_) {
    if (g->aborted || paused) continue;
    for (auto& s : g->seqs) {
      if (s->finished) continue;
      const int64_t avail = static_cast<int64_t>(s->tokens.size()) - s->pos;
      if (avail <= 0) continue;
      // Past the prompt a sample feeds one token per step, logged (resumed)
      // tokens too: a replay then builds bit-for-bit the state the first run
      // built, so the continuation equals the uninterrupted one (a chunked
      // prefill of the logged tokens sums in another order and can flip a
      // later sample at a near-tie).
      const int64_t P = static_cast<int64_t>(g->req.prompt.size());
      if (s->sample >= 0 && s->pos >= P) {
        decodes.push_back({g.get(), s.get(), 1});
      } else {
        prefills.push_back({g.get(), s.get(), std::min(avail, P - s->pos)});
      }
    }
  }
  int64_t budget = options_.max_step_tokens;
  if (!decodes.empty()) {
    const int64_t nd = static_cast<int64_t>(decodes.size());
    const int64_t start = decode_cursor_ % nd;
    const int64_t take = std::min(nd, budget);
    for (int64_t i = 0; i < take; ++i) plan.push_back(decodes[(start + i) % nd]);
    decode_cursor_ = (start + take) % nd;
    budget -= take;
  }
  for (Planned p : prefills) {
    if (budget <= 0) break;
    p.count = std::min({p.count, options_.prefill_chunk, budget});
    budget -= p.count;
    plan.push_back(p);
  }

  bool want_routes = false;
  std::vector<v4::Model::Chunk> chunks;
  for (const Planned& p : plan) {
    chunks.push_back({p.seq->state.get(), absl::MakeConstSpan(p.seq->tokens.data() + p.seq->pos, p.count)});
    want_routes |= p.group->req.capture_routes;
  }
  std::vector<GeneratedToken> fresh;
  int64_t mismatches = 0;
  if (!chunks.empty()) {
    v4::StepOutputs outputs;
    outputs.capture_routes = want_routes;
    absl::StatusOr<std::vector<float>> logits = model->Step(chunks, want_routes ? &outputs : nullptr);
    // Validate() checked every id, so a failing Step is a bug.
    CHECK(logits.ok()) << logits.status().ToString();
    const int64_t V = model->config().vocab_size;
    const int k = model->config().experts_per_token;
    int64_t row = 0;
    auto process = [&](Group& g, Sequence& s, const float* lg, int64_t at_row, int64_t index) {
      const int64_t have = s.out.token_ids_size();
      SampledToken t = s.sampler->Sample(absl::MakeConstSpan(lg, V));
      if (g.req.capture_routes) AddRoutes(outputs, at_row, k, &s.out);
      if (index < have) {  // replaying a logged token
        if (t.token != s.out.token_ids(index)) ++mismatches;
        return;
      }
      CHECK_EQ(index, have);
      s.out.add_token_ids(t.token);
      s.out.add_logprobs(t.logprob);
      s.out.add_model_logprobs(t.model_logprob);
      s.out.add_weight_versions(static_cast<int64_t>(version));
      s.tokens.push_back(t.token);
      fresh.push_back({&g.req.request_id, s.sample, static_cast<int32_t>(index), t.token, t.logprob,
                       t.model_logprob, static_cast<int64_t>(version)});
      const auto& ids = s.out.token_ids();
      FinishReason why = StopReason(g.req, *model, absl::MakeConstSpan(ids.data(), ids.size()));
      if (why != retort::v1::FINISH_REASON_UNSPECIFIED) {
        s.finished = true;
        s.out.set_finish_reason(why);
      }
    };
    for (const Planned& p : plan) {
      Group& g = *p.group;
      Sequence& s = *p.seq;
      const int64_t P = static_cast<int64_t>(g.req.prompt.size());
      for (int64_t j = s.pos; j < s.pos + p.count; ++j, ++row) {
        const int64_t index = j + 1 - P;
        if (index < 0 || s.sample < 0) continue;
        process(g, s, logits->data() + row * V, row, index);
      }
      s.pos += p.count;
      if (s.sample < 0 && s.pos == P) {
        // Fork the prefilled prompt for every sample (the leader's state goes to the last).
        const float* last = logits->data() + (row - 1) * V;
        std::unique_ptr<Sequence> leader = std::move(g.seqs.front());
        g.seqs.clear();
        for (size_t i = 0; i < g.samples.size(); ++i) {
          auto s2 = std::make_unique<Sequence>();
          s2->sample = g.samples[i];
          s2->state = i + 1 == g.samples.size() ? std::move(leader->state) : leader->state->Clone();
          s2->pos = P;
          s2->sampler = std::make_unique<Sampler>(SeededParams(g.req, s2->sample));
          s2->tokens = g.req.prompt;
          s2->out = BaseCompletion(g.req, s2->sample);
          auto it = g.req.resume.find(s2->sample);
          if (it != g.req.resume.end()) {
            s2->tokens.insert(s2->tokens.end(), it->second.token_ids().begin(), it->second.token_ids().end());
            s2->out.mutable_token_ids()->CopyFrom(it->second.token_ids());
            s2->out.mutable_logprobs()->CopyFrom(it->second.logprobs());
            s2->out.mutable_model_logprobs()->CopyFrom(it->second.model_logprobs());
            s2->out.mutable_weight_versions()->CopyFrom(it->second.weight_versions());
            s2->out.set_resumed_tokens(it->second.token_ids_size());
          }
          process(g, *s2, last, row - 1, 0);
          g.seqs.push_back(std::move(s2));
        }
        g.forked = true;
      }
    }
  }
  if (observer_ && !fresh.empty()) observer_(fresh);

  // Retire finished sequences and aborted groups.
  int64_t released = 0, retired = 0, live_bytes = 0;
  std::vector<std::string> gone;
  for (auto it = running_.begin(); it != running_.end();) {
    Group& g = **it;
    for (auto& s : g.seqs) {
      if (s->sample < 0) continue;
      if (g.aborted && !s->finished) {
        s->finished = true;
        s->out.set_finish_reason(retort::v1::FINISH_REASON_ABORTED);
      }
      if (s->finished && s->state) {
        deliveries.emplace_back(&g.sink, std::move(s->out));
        s->state.reset();
        ++retired;
      }
      if (s->state) live_bytes += s->state->Bytes();
    }
    if (!g.forked && !g.seqs.empty() && g.seqs.front()->state) live_bytes += g.seqs.front()->state->Bytes();
    if (g.aborted && !g.forked) {
      // Aborted during prefill: every sample completes empty (or with its logged tokens).
      for (int32_t i : g.samples) {
        Completion c = BaseCompletion(g.req, i);
        auto r = g.req.resume.find(i);
        if (r != g.req.resume.end()) {
          c.mutable_token_ids()->CopyFrom(r->second.token_ids());
          c.mutable_logprobs()->CopyFrom(r->second.logprobs());
          c.mutable_model_logprobs()->CopyFrom(r->second.model_logprobs());
          c.mutable_weight_versions()->CopyFrom(r->second.weight_versions());
        }
        c.set_finish_reason(retort::v1::FINISH_REASON_ABORTED);
        deliveries.emplace_back(&g.sink, std::move(c));
        ++retired;
      }
      g.samples.clear();
      g.seqs.clear();
    }
    bool all_done = g.forked || g.samples.empty();
    for (auto& s : g.seqs) all_done &= s->sample >= 0 && s->state == nullptr;
    if (all_done) {
      released += g.reserved;
      gone.push_back(g.req.request_id);
      // Deliver before the group (and its sink) is destroyed.
      for (auto& [sink, c] : deliveries) (*sink)(std::move(c));
      deliveries.clear();
      it = running_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto& [sink, c] : deliveries) (*sink)(std::move(c));
  {
    std::lock_guard<std::mutex> l(mu_);
    reserved_bytes_ -= released;
    running_sequences_ -= static_cast<int32_t>(retired);
    state_bytes_ = live_bytes;
    generated_tokens_ += static_cast<int64_t>(fresh.size());
    replay_mismatches_ += mismatches;
    if (!chunks.empty()) ++steps_;
    const double now = NowSeconds();
    if (!fresh.empty()) rate_window_.emplace_back(now, static_cast<int64_t>(fresh.size()));
    while (!rate_window_.empty() && now - rate_window_.front().first > 5.0) rate_window_.pop_front();
    for (const std::string& id : gone) active_ids_.erase(std::find(active_ids_.begin(), active_ids_.end(), id));
  }
  return !chunks.empty() || had_aborts || retired > 0 || !running_.empty();
}

absl::StatusOr<Completion> ReferenceGenerate(const v4::Model& model, const GenerationRequest& request, int32_t sample,
                                             uint64_t version) {
  Sampler sampler(SeededParams(request, sample));
  auto state = model.NewState();
  Completion out = BaseCompletion(request, sample);
  std::vector<int64_t> feed = request.prompt;
  const int64_t V = model.config().vocab_size;
  const int k = model.config().experts_per_token;
  while (true) {
    std::vector<v4::Model::Chunk> chunk = {{state.get(), feed}};
    v4::StepOutputs outputs;
    outputs.capture_routes = request.capture_routes;
    absl::StatusOr<std::vector<float>> logits = model.Step(chunk, request.capture_routes ? &outputs : nullptr);
    if (!logits.ok()) return logits.status();
    const int64_t rows = static_cast<int64_t>(feed.size());
    SampledToken t = sampler.Sample(absl::MakeConstSpan(logits->data() + (rows - 1) * V, V));
    if (request.capture_routes) AddRoutes(outputs, rows - 1, k, &out);
    out.add_token_ids(t.token);
    out.add_logprobs(t.logprob);
    out.add_model_logprobs(t.model_logprob);
    out.add_weight_versions(static_cast<int64_t>(version));
    const auto& ids = out.token_ids();
    FinishReason why = StopReason(request, model, absl::MakeConstSpan(ids.data(), ids.size()));
    if (why != retort::v1::FINISH_REASON_UNSPECIFIED) {
      out.set_finish_reason(why);
      return out;
    }
    feed = {t.token};
  }
}

}  // namespace retort::rollout
