// Rollout client (see rollout_client.h).
#include "rollout/service/rollout_client.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "retort/v1/rollout.grpc.pb.h"
#include "rollout/service/protocol.h"

namespace retort::rollout {
namespace {

std::chrono::system_clock::time_point ToChrono(absl::Time t) { return absl::ToChronoTime(t); }

// Transient: the worker is gone, restarting or draining.
bool Retryable(const grpc::Status& s) {
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE) return true;
  // A connection reset mid-stream is sometimes reported as UNKNOWN.
  return s.error_code() == grpc::StatusCode::UNKNOWN && s.error_message().find("Stream removed") != std::string::npos;
}

}  // namespace

RolloutClient::RolloutClient(RolloutClientOptions options) : options_(std::move(options)) {
  for (const std::string& w : options_.workers) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    // Reconnect quickly after a worker restart.
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 50);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 500);
    args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 50);
    channels_.push_back(grpc::CreateCustomChannel(w, grpc::InsecureChannelCredentials(), args));
  }
}

RolloutClient::~RolloutClient() = default;

std::shared_ptr<grpc::Channel> RolloutClient::Channel(int worker) { return channels_.at(worker); }

absl::Status RolloutClient::Generate(const retort::v1::GenerateBatch& batch,
                                     const std::function<void(const retort::v1::Completion&)>& on_completion) {
  if (channels_.empty()) return absl::InvalidArgumentError("rollout client: no workers");
  const absl::Time deadline = absl::Now() + options_.deadline;
  const absl::Time retry_until = absl::Now() + options_.retry_for;
  std::map<std::string, int> expected;  // request id -> n
  for (const auto& r : batch.requests()) expected[r.request_id()] = r.sampling().n();
  std::set<std::pair<std::string, int32_t>> seen;
  absl::Duration backoff = options_.backoff;
  grpc::Status last;
  bool first = true;  // the first attempt sends everything, so the worker judges malformed requests
  while (true) {
    retort::v1::GenerateBatch todo;
    todo.set_protocol_version(kRolloutProtocolVersion);
    for (const auto& r : batch.requests()) {
      int got = 0;
      for (int32_t k = 0; k < r.sampling().n(); ++k) got += seen.count({r.request_id(), k});
      if (first || got < r.sampling().n()) *todo.add_requests() = r;
    }
    if (todo.requests_size() == 0) return absl::OkStatus();
    first = false;
    const int worker = static_cast<int>(next_.fetch_add(1) % channels_.size());
    auto stub = retort::v1::RolloutService::NewStub(Channel(worker));
    grpc::ClientContext ctx;
    ctx.set_deadline(ToChrono(deadline));
    ctx.set_wait_for_ready(false);
    std::unique_ptr<grpc::ClientReader<retort::v1::Completion>> reader = stub->Generate(&ctx, todo);
    retort::v1::Completion c;
    while (reader->Read(&c)) {
      if (seen.emplace(c.request_id(), c.sample_index()).second) on_completion(c);
    }
    last = reader->Finish();
    if (last.ok()) continue;  // loop re-checks that everything arrived
    if (!Retryable(last) || absl::Now() >= retry_until || absl::Now() >= deadline)
      return absl::Status(FromGrpc(last).code(),
                          absl::StrCat("worker ", options_.workers[worker], ": ", last.error_message()));
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(1));
  }
}

absl::StatusOr<std::vector<retort::v1::Completion>> RolloutClient::GenerateAll(const retort::v1::GenerateBatch& batch) {
  std::vector<retort::v1::Completion> out;
  absl::Status s = Generate(batch, [&](const retort::v1::Completion& c) { out.push_back(c); });
  if (!s.ok()) return s;
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return std::make_pair(a.request_id(), a.sample_index()) < std::make_pair(b.request_id(), b.sample_index());
  });
  return out;
}

absl::StatusOr<retort::v1::StatusResponse> RolloutClient::GetStatus(int worker) {
  grpc::ClientContext ctx;
  ctx.set_deadline(ToChrono(absl::Now() + absl::Seconds(10)));
  retort::v1::StatusRequest req;
  req.set_protocol_version(kRolloutProtocolVersion);
  retort::v1::StatusResponse resp;
  grpc::Status s = retort::v1::RolloutService::NewStub(Channel(worker))->GetStatus(&ctx, req, &resp);
  if (!s.ok()) return FromGrpc(s);
  return resp;
}

absl::Status RolloutClient::Pause(int worker) {
  grpc::ClientContext ctx;
  ctx.set_deadline(ToChrono(absl::Now() + absl::Seconds(10)));
  retort::v1::PauseRequest req;
  req.set_protocol_version(kRolloutProtocolVersion);
  retort::v1::PauseResponse resp;
  return FromGrpc(retort::v1::RolloutService::NewStub(Channel(worker))->Pause(&ctx, req, &resp));
}

absl::Status RolloutClient::Resume(int worker) {
  grpc::ClientContext ctx;
  ctx.set_deadline(ToChrono(absl::Now() + absl::Seconds(10)));
  retort::v1::PauseRequest req;
  req.set_protocol_version(kRolloutProtocolVersion);
  retort::v1::PauseResponse resp;
  return FromGrpc(retort::v1::RolloutService::NewStub(Channel(worker))->Resume(&ctx, req, &resp));
}

absl::StatusOr<int> RolloutClient::Abort(const std::vector<std::string>& request_ids) {
  int total = 0;
  for (size_t w = 0; w < channels_.size(); ++w) {
    grpc::ClientContext ctx;
    ctx.set_deadline(ToChrono(absl::Now() + absl::Seconds(10)));
    retort::v1::AbortRequest req;
    req.set_protocol_version(kRolloutProtocolVersion);
    for (const auto& id : request_ids) req.add_request_ids(id);
    retort::v1::AbortResponse resp;
    grpc::Status s = retort::v1::RolloutService::NewStub(channels_[w])->Abort(&ctx, req, &resp);
    if (!s.ok()) return FromGrpc(s);
    total += resp.aborted();
  }
  return total;
}

absl::StatusOr<retort::v1::UpdateWeightsResponse> RolloutClient::PushChunks(
    int worker, const std::vector<retort::v1::TensorChunk>& chunks) {
  grpc::ClientContext ctx;
  ctx.set_deadline(ToChrono(absl::Now() + options_.deadline));
  retort::v1::UpdateWeightsResponse resp;
  auto writer = retort::v1::RolloutService::NewStub(Channel(worker))->UpdateWeights(&ctx, &resp);
  for (const auto& c : chunks)
    if (!writer->Write(c)) break;  // the worker rejected the stream; Finish says why
  writer->WritesDone();
  grpc::Status s = writer->Finish();
  if (!s.ok()) return FromGrpc(s);
  return resp;
}

absl::StatusOr<retort::v1::UpdateWeightsResponse> RolloutClient::PushWeights(int worker, const io::TensorSource& source,
                                                                             uint64_t version) {
  constexpr size_t kChunk = 1 << 20;
  std::vector<retort::v1::TensorChunk> chunks;
  for (const std::string& name : source.TensorNames()) {
    absl::StatusOr<Tensor> t = source.Get(name);
    if (!t.ok()) return t.status();
    const size_t n = t->nbytes();
    for (size_t off = 0; off == 0 || off < n; off += kChunk) {
      retort::v1::TensorChunk c;
      c.set_name(name);
      c.set_dtype(std::string(DTypeName(t->dtype())));
      for (int64_t d : t->shape()) c.add_shape(d);
      c.set_offset(off);
      c.set_data(reinterpret_cast<const char*>(t->raw()) + off, std::min(kChunk, n - off));
      chunks.push_back(std::move(c));
      if (n == 0) break;
    }
  }
  if (chunks.empty()) return absl::InvalidArgumentError("PushWeights: no tensors");
  chunks.front().set_protocol_version(kRolloutProtocolVersion);
  chunks.front().set_weight_version(version);
  chunks.back().set_last(true);
  return PushChunks(worker, chunks);
}

absl::StatusOr<retort::v1::Completion> RemoteGenerate(const std::string& worker, const std::vector<int64_t>& prompt,
                                                      const retort::v1::SamplingParams& sampling, absl::Duration deadline) {
  RolloutClientOptions o;
  o.workers = {worker};
  o.deadline = deadline;
  RolloutClient client(o);
  retort::v1::GenerateBatch batch;
  auto* r = batch.add_requests();
  static std::atomic<uint64_t> counter{0};
  r->set_request_id(absl::StrCat("generate-", absl::ToUnixNanos(absl::Now()), "-", counter.fetch_add(1)));
  for (int64_t t : prompt) r->mutable_prompt_ids()->add_ids(t);
  *r->mutable_sampling() = sampling;
  if (r->sampling().n() == 0) r->mutable_sampling()->set_n(1);
  absl::StatusOr<std::vector<retort::v1::Completion>> out = client.GenerateAll(batch);
  if (!out.ok()) return out.status();
  if (out->empty()) return absl::InternalError("worker returned no completion");
  return out->front();
}

}  // namespace retort::rollout
