// The rollout worker's gRPC service (see rollout_server.h).
#include "rollout/service/rollout_server.h"

#include <atomic>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "model/base/logging.h"
#include "model/base/status_macros.h"
#include "model/io/safetensors.h"
#include "retort/v1/rollout.grpc.pb.h"
#include "rollout/service/protocol.h"

namespace retort::rollout {

using retort::v1::Completion;

namespace {

class GenerateStream;

// Which open Generate streams wait for which request ids.
class Hub {
 public:
  void Subscribe(const std::string& id, GenerateStream* s) {
    std::lock_guard<std::mutex> l(mu_);
    subs_.emplace(id, s);
  }
  void Unsubscribe(GenerateStream* s) {
    std::lock_guard<std::mutex> l(mu_);
    for (auto it = subs_.begin(); it != subs_.end();) it = it->second == s ? subs_.erase(it) : std::next(it);
  }
  int Subscribers(const std::string& id) {
    std::lock_guard<std::mutex> l(mu_);
    return static_cast<int>(subs_.count(id));
  }
  void Deliver(const Completion& c);
  std::mutex& mu() { return mu_; }

 private:
  std::mutex mu_;
  std::multimap<std::string, GenerateStream*> subs_;
};

class GenerateStream final : public grpc::ServerWriteReactor<Completion> {
 public:
  using CancelFn = std::function<void(const std::vector<std::string>&)>;
  GenerateStream(Hub* hub, CancelFn on_cancel) : hub_(hub), on_cancel_(std::move(on_cancel)) {}

  void Expect(std::vector<std::string> ids, int count) {
    std::lock_guard<std::mutex> l(mu_);
    ids_ = std::move(ids);
    expected_ = count;
  }
  // Queues `c` unless this stream already carried (request, sample).
  void Push(const Completion& c) {
    std::lock_guard<std::mutex> l(mu_);
    if (finished_ || !seen_.emplace(c.request_id(), c.sample_index()).second) return;
    queue_.push_back(c);
    Pump();
  }
  void FinishWith(const grpc::Status& s) {
    std::lock_guard<std::mutex> l(mu_);
    if (finished_) return;
    finished_ = true;
    Finish(s);
  }
  void Go() {
    std::lock_guard<std::mutex> l(mu_);
    started_ = true;
    Pump();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> l(mu_);
    writing_ = false;
    if (!ok) {
      if (!finished_) {
        finished_ = true;
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "stream broken"));
      }
      return;
    }
    Pump();
  }
  void OnCancel() override {
    std::vector<std::string> ids;
    {
      std::lock_guard<std::mutex> l(mu_);
      ids = ids_;
    }
    on_cancel_(ids);
  }
  void OnDone() override {
    hub_->Unsubscribe(this);
    delete this;
  }

 private:
  void Pump() {  // mu_ held
    if (finished_ || writing_ || !started_) return;
    if (!queue_.empty()) {
      current_ = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
      StartWrite(&current_);
    } else if (static_cast<int>(seen_.size()) == expected_) {
      finished_ = true;
      Finish(grpc::Status::OK);
    }
  }

  Hub* hub_;
  CancelFn on_cancel_;
  std::mutex mu_;
  std::vector<std::string> ids_;
  int expected_ = 0;
  std::set<std::pair<std::string, int32_t>> seen_;
  std::deque<Completion> queue_;
  Completion current_;
  bool writing_ = false, finished_ = false, started_ = false;
};

void Hub::Deliver(const Completion& c) {
  std::lock_guard<std::mutex> l(mu_);
  auto [a, b] = subs_.equal_range(c.request_id());
  for (auto it = a; it != b; ++it) it->second->Push(c);
}

}  // namespace

class RolloutServer::Impl final : public retort::v1::RolloutService::CallbackService {
 public:
  RolloutServerOptions options;
  std::unique_ptr<TokenWal> wal;
  std::unique_ptr<TrajectoryStore> trajectories;
  std::unique_ptr<Engine> engine;
  std::unique_ptr<grpc::Server> server;
  Hub hub;
  int port = 0;
  int resumed = 0;
  std::atomic<bool> draining{false};
  std::atomic<bool> shutting_down{false};
  std::mutex drain_mu;
  std::condition_variable drain_cv;
  bool drained = false;

  // The engine's completion sink for one request.
  Engine::CompletionSink SinkFor(const retort::v1::GenerateRequest& r) {
    return [this, experiment = r.experiment(), step = r.step()](Completion c) {
      if (absl::Status s = wal->Finish(c); !s.ok()) LOG(ERROR) << "completion not logged: " << s.ToString();
      if (!experiment.empty())
        if (absl::Status s = trajectories->PutCompletion(experiment, step, c); !s.ok())
          LOG(ERROR) << "completion not stored: " << s.ToString();
      hub.Deliver(c);
    };
  }

  absl::Status SubmitLogged(const retort::v1::GenerateRequest& canonical, const RecoveredRequest* recovered) {
    GenerationRequest g = ToGenerationRequest(canonical);
    if (recovered != nullptr) {
      g.resume = recovered->partial;
      for (const auto& [sample, c] : recovered->finished) g.skip.push_back(sample);
    }
    return engine->Submit(std::move(g), SinkFor(canonical));
  }

  absl::Status StartGenerate(const retort::v1::GenerateBatch& batch, GenerateStream* stream) {
    if (draining.load()) return absl::UnavailableError("worker is draining; send to another worker");
    if (absl::Status s = CheckProtocolVersion(batch.protocol_version(), "GenerateBatch"); !s.ok()) return s;
    if (batch.requests_size() == 0) return absl::InvalidArgumentError("GenerateBatch has no requests");
    if (batch.requests_size() > options.max_batch_requests)
      return absl::InvalidArgumentError(absl::StrCat("GenerateBatch has ", batch.requests_size(),
                                                     " requests; at most ", options.max_batch_requests));
    std::vector<retort::v1::GenerateRequest> canon;
    std::vector<bool> known;
    std::set<std::string> ids;
    int expected = 0;
    for (const auto& r : batch.requests()) {
      ASSIGN_OR_RETURN(retort::v1::GenerateRequest c, Canonicalize(r, options.tokenizer.get()));
      if (!ids.insert(c.request_id()).second)
        return absl::InvalidArgumentError(absl::StrCat("request id '", c.request_id(), "' appears twice in the batch"));
      absl::StatusOr<retort::v1::GenerateRequest> logged = wal->FindRequest(c.request_id());
      if (logged.ok()) {
        if (logged->SerializeAsString() != c.SerializeAsString())
          return absl::FailedPreconditionError(absl::StrCat("request id '", c.request_id(),
                                                            "' was accepted before with a different prompt or sampling"));
        known.push_back(true);
      } else if (absl::IsNotFound(logged.status())) {
        if (absl::Status s = engine->Validate(ToGenerationRequest(c)); !s.ok()) return s;
        known.push_back(false);
      } else {
        return logged.status();
      }
      expected += c.sampling().n();
      canon.push_back(std::move(c));
    }
    // Durable before accepted.
    for (size_t i = 0; i < canon.size(); ++i) {
      if (known[i]) continue;
      if (absl::Status s = wal->Accept(canon[i]); !s.ok()) return s;
      if (!canon[i].experiment().empty()) {
        retort::v1::PromptRecord p;
        p.set_experiment(canon[i].experiment());
        p.set_step(canon[i].step());
        p.set_group_id(canon[i].group_id());
        *p.mutable_prompt_ids() = canon[i].prompt_ids().ids();
        *p.mutable_sampling() = canon[i].sampling();
        if (absl::Status s = trajectories->PutPrompt(p); !s.ok()) return s;
      }
    }
    stream->Expect(std::vector<std::string>(ids.begin(), ids.end()), expected);
    for (const auto& c : canon) hub.Subscribe(c.request_id(), stream);
    for (size_t i = 0; i < canon.size(); ++i) {
      const auto& c = canon[i];
      if (!known[i]) {
        if (absl::Status s = SubmitLogged(c, nullptr); !s.ok()) return s;
        continue;
      }
      // Attach: logged completions now, the rest when they finish.
      bool unfinished = false;
      for (int32_t k = 0; k < c.sampling().n(); ++k) {
        absl::StatusOr<Completion> done = wal->FindFinished(c.request_id(), k);
        if (done.ok()) stream->Push(*done);
        else unfinished = true;
      }
      if (unfinished && !engine->IsActive(c.request_id())) {
        ASSIGN_OR_RETURN(std::vector<RecoveredRequest> all, wal->Recover());
        for (const RecoveredRequest& r : all)
          if (r.request.request_id() == c.request_id())
            if (absl::Status s = SubmitLogged(c, &r); !s.ok() && !absl::IsAlreadyExists(s)) return s;
      }
    }
    stream->Go();
    return absl::OkStatus();
  }

  // ---- RPCs

  grpc::ServerWriteReactor<Completion>* Generate(grpc::CallbackServerContext* ctx,
                                                 const retort::v1::GenerateBatch* batch) override {
    auto* stream = new GenerateStream(&hub, [this](const std::vector<std::string>& ids) {
      if (shutting_down.load()) return;  // drain: leave them in the log to resume
      std::vector<std::string> orphans;
      for (const auto& id : ids)
        if (hub.Subscribers(id) <= 1) orphans.push_back(id);
      engine->Abort(orphans);
    });
    absl::Status s = StartGenerate(*batch, stream);
    if (!s.ok()) stream->FinishWith(ToGrpc(s));
    return stream;
  }

  class WeightsReader final : public grpc::ServerReadReactor<retort::v1::TensorChunk> {
   public:
    WeightsReader(Impl* impl, retort::v1::UpdateWeightsResponse* response) : impl_(impl), response_(response) {
      StartRead(&chunk_);
    }
    void OnReadDone(bool ok) override {
      absl::Status s = ok ? Consume() : Complete();
      if (!s.ok() || !ok) {
        Finish(ToGrpc(s));
        return;
      }
      StartRead(&chunk_);
    }
    void OnDone() override { delete this; }

   private:
    struct Pending {
      Tensor tensor;
      uint64_t received = 0;
    };
    absl::Status Consume() {
      const auto& c = chunk_;
      if (first_) {
        first_ = false;
        if (absl::Status s = CheckProtocolVersion(c.protocol_version(), "UpdateWeights"); !s.ok()) return s;
        version_ = c.weight_version();
        const uint64_t current = impl_->engine->weight_version();
        if (version_ <= current)
          return absl::FailedPreconditionError(absl::StrCat("UpdateWeights: weight_version ", version_,
                                                            " is not newer than the worker's version ", current));
      }
      if (saw_last_) return absl::InvalidArgumentError("UpdateWeights: chunk after the one marked last");
      if (c.name().empty()) return absl::InvalidArgumentError("UpdateWeights: chunk without a tensor name");
      auto it = tensors_.find(c.name());
      if (it == tensors_.end()) {
        std::optional<DType> dt = DTypeFromName(c.dtype());
        if (!dt) return absl::InvalidArgumentError(absl::StrCat("UpdateWeights: tensor '", c.name(), "' has unknown dtype '", c.dtype(), "'"));
        Shape shape(c.shape().begin(), c.shape().end());
        for (int64_t d : shape)
          if (d < 0 || d > (int64_t{1} << 40))
            return absl::InvalidArgumentError(absl::StrCat("UpdateWeights: tensor '", c.name(), "' has a bad shape"));
        if (DTypeBytes(*dt, NumElements(shape)) > (int64_t{1} << 36))
          return absl::InvalidArgumentError(absl::StrCat("UpdateWeights: tensor '", c.name(), "' is absurdly large"));
        it = tensors_.emplace(c.name(), Pending{Tensor::Zeros(*dt, shape), 0}).first;
      }
      Pending& p = it->second;
      if (c.offset() != p.received)
        return absl::InvalidArgumentError(absl::StrCat("UpdateWeights: tensor '", c.name(), "' chunk at offset ", c.offset(),
                                                       ", expected ", p.received));
      if (p.received + c.data().size() > p.tensor.nbytes())
        return absl::InvalidArgumentError(absl::StrCat("UpdateWeights: tensor '", c.name(), "' gets more than its ",
                                                       p.tensor.nbytes(), " bytes"));
      std::memcpy(p.tensor.mutable_raw() + p.received, c.data().data(), c.data().size());
      p.received += c.data().size();
      bytes_ += c.data().size();
      saw_last_ = c.last();
      return absl::OkStatus();
    }
    absl::Status Complete() {
      if (first_) return absl::InvalidArgumentError("UpdateWeights: empty stream");
      if (!saw_last_) return absl::InvalidArgumentError("UpdateWeights: truncated stream (no chunk marked last)");
      io::TensorMap map("UpdateWeights stream");
      for (auto& [name, p] : tensors_) {
        if (p.received != p.tensor.nbytes())
          return absl::InvalidArgumentError(absl::StrCat("UpdateWeights: tensor '", name, "' got ", p.received, " of ",
                                                         p.tensor.nbytes(), " bytes"));
        map.Add(name, p.tensor);
      }
      std::shared_ptr<const v4::Model> current = impl_->engine->model();
      absl::StatusOr<std::unique_ptr<v4::Model>> model = v4::Model::FromTensors(current->config(), map, current->numerics());
      if (!model.ok()) return absl::InvalidArgumentError(absl::StrCat("UpdateWeights: ", model.status().message()));
      if (absl::Status s = impl_->engine->SwapModel(std::move(*model), version_); !s.ok()) return s;
      response_->set_weight_version(version_);
      response_->set_tensors(static_cast<int64_t>(tensors_.size()));
      response_->set_bytes(static_cast<int64_t>(bytes_));
      LOG(INFO) << "weights version " << version_ << " received (" << tensors_.size() << " tensors, " << bytes_ << " bytes)";
      return absl::OkStatus();
    }

    Impl* impl_;
    retort::v1::UpdateWeightsResponse* response_;
    retort::v1::TensorChunk chunk_;
    bool first_ = true, saw_last_ = false;
    uint64_t version_ = 0, bytes_ = 0;
    std::map<std::string, Pending> tensors_;
  };

  grpc::ServerReadReactor<retort::v1::TensorChunk>* UpdateWeights(grpc::CallbackServerContext* ctx,
                                                                  retort::v1::UpdateWeightsResponse* response) override {
    return new WeightsReader(this, response);
  }

  grpc::ServerUnaryReactor* Abort(grpc::CallbackServerContext* ctx, const retort::v1::AbortRequest* req,
                                  retort::v1::AbortResponse* resp) override {
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    absl::Status s = CheckProtocolVersion(req->protocol_version(), "Abort");
    if (s.ok()) resp->set_aborted(engine->Abort(std::vector<std::string>(req->request_ids().begin(), req->request_ids().end())));
    r->Finish(ToGrpc(s));
    return r;
  }
  grpc::ServerUnaryReactor* Pause(grpc::CallbackServerContext* ctx, const retort::v1::PauseRequest* req,
                                  retort::v1::PauseResponse*) override {
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    absl::Status s = CheckProtocolVersion(req->protocol_version(), "Pause");
    if (s.ok()) engine->Pause();
    r->Finish(ToGrpc(s));
    return r;
  }
  grpc::ServerUnaryReactor* Resume(grpc::CallbackServerContext* ctx, const retort::v1::PauseRequest* req,
                                   retort::v1::PauseResponse*) override {
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    absl::Status s = CheckProtocolVersion(req->protocol_version(), "Resume");
    if (s.ok()) engine->Resume();
    r->Finish(ToGrpc(s));
    return r;
  }
  grpc::ServerUnaryReactor* GetStatus(grpc::CallbackServerContext* ctx, const retort::v1::StatusRequest* req,
                                      retort::v1::StatusResponse* resp) override {
    grpc::ServerUnaryReactor* r = ctx->DefaultReactor();
    absl::Status s = CheckProtocolVersion(req->protocol_version(), "GetStatus");
    if (s.ok()) {
      EngineStatus e = engine->Status();
      resp->set_weight_version(e.weight_version);
      resp->set_queued_groups(e.queued_groups);
      resp->set_running_sequences(e.running_sequences);
      resp->set_tokens_per_second(e.tokens_per_second);
      resp->set_state_bytes(e.state_bytes);
      resp->set_state_bytes_budget(e.state_bytes_budget);
      resp->set_generated_tokens(e.generated_tokens);
      resp->set_paused(e.paused);
      resp->set_draining(draining.load());
      resp->set_protocol_version(kRolloutProtocolVersion);
      resp->set_steps(e.steps);
    }
    r->Finish(ToGrpc(s));
    return r;
  }
};

RolloutServer::RolloutServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

absl::StatusOr<std::unique_ptr<RolloutServer>> RolloutServer::Start(std::shared_ptr<const v4::Model> model,
                                                                    RolloutServerOptions options) {
  if (options.data_dir.empty()) return absl::InvalidArgumentError("rollout worker: data_dir is required");
  std::error_code ec;
  std::filesystem::create_directories(options.data_dir, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("rollout worker: cannot create data_dir ", options.data_dir, ": ", ec.message()));
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  ASSIGN_OR_RETURN(impl->wal, TokenWal::Open(options.data_dir + "/wal", options.wal));
  ASSIGN_OR_RETURN(impl->trajectories, TrajectoryStore::Open(options.data_dir + "/trajectories"));
  Impl* raw = impl.get();
  impl->engine = std::make_unique<Engine>(
      std::move(model), options.weight_version, options.engine, [raw](const std::vector<GeneratedToken>& tokens) {
        std::vector<TokenWal::TokenRecord> records;
        records.reserve(tokens.size());
        for (const GeneratedToken& t : tokens)
          records.push_back({*t.request_id, t.sample, t.index, t.token, t.logprob, t.model_logprob, t.weight_version});
        if (absl::Status s = raw->wal->AppendTokens(records); !s.ok()) LOG(ERROR) << "tokens not logged: " << s.ToString();
      });
  // Resume what the log holds.
  ASSIGN_OR_RETURN(std::vector<RecoveredRequest> recovered, impl->wal->Recover());
  for (const RecoveredRequest& r : recovered) {
    if (static_cast<int32_t>(r.finished.size()) == r.request.sampling().n()) continue;
    absl::Status s = impl->SubmitLogged(r.request, &r);
    if (!s.ok()) {
      LOG(ERROR) << "cannot resume request '" << r.request.request_id() << "': " << s.ToString();
      continue;
    }
    int64_t tokens = 0;
    for (const auto& [k, c] : r.partial) tokens += c.token_ids_size();
    LOG(INFO) << "resuming request '" << r.request.request_id() << "' (" << r.finished.size() << " of "
              << r.request.sampling().n() << " samples finished, " << tokens << " logged tokens)";
    ++impl->resumed;
  }
  impl->engine->Start();

  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.address, grpc::InsecureServerCredentials(), &impl->port);
  builder.RegisterService(impl.get());
  builder.SetMaxReceiveMessageSize(64 << 20);
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0)
    return absl::UnavailableError(absl::StrCat("rollout worker: cannot listen on ", options.address));
  impl->server->GetHealthCheckService()->SetServingStatus(true);
  return std::unique_ptr<RolloutServer>(new RolloutServer(std::move(impl)));
}

RolloutServer::~RolloutServer() { Drain(absl::ZeroDuration()); }

int RolloutServer::port() const { return impl_->port; }
std::string RolloutServer::address() const { return absl::StrCat("127.0.0.1:", impl_->port); }
int RolloutServer::resumed_requests() const { return impl_->resumed; }
Engine& RolloutServer::engine() { return *impl_->engine; }

void RolloutServer::Drain(absl::Duration timeout) {
  if (impl_->draining.exchange(true)) {
    Wait();
    return;
  }
  impl_->server->GetHealthCheckService()->SetServingStatus(false);
  const absl::Time end = absl::Now() + timeout;
  while (absl::Now() < end) {
    EngineStatus s = impl_->engine->Status();
    if (s.queued_groups == 0 && s.running_sequences == 0) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  // Let finished streams flush their last writes before cancelling the rest.
  impl_->shutting_down = true;
  impl_->engine->Stop();
  impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  impl_->server->Wait();
  {
    std::lock_guard<std::mutex> l(impl_->drain_mu);
    impl_->drained = true;
  }
  impl_->drain_cv.notify_all();
}

void RolloutServer::Wait() {
  std::unique_lock<std::mutex> l(impl_->drain_mu);
  impl_->drain_cv.wait(l, [&] { return impl_->drained; });
}

}  // namespace retort::rollout
