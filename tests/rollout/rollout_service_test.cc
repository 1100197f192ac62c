// RolloutService over real loopback gRPC (127.0.0.1, OS-picked ports):
// concurrent clients, equality with the offline engine, weight updates
// mid-stream, bad requests, health, client failover, trajectory writes.
#include <unistd.h>

#include <filesystem>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "model/io/safetensors.h"
#include "retort/v1/rollout.grpc.pb.h"
#include "rollout/service/protocol.h"
#include "rollout/service/rollout_client.h"
#include "rollout/service/rollout_server.h"
#include "tests/rollout/test_util.h"

namespace retort::rollout {
namespace {

using retort::v1::Completion;
using testing::FixtureModel;

std::string TempDir(const std::string& name) {
  static int counter = 0;
  std::string d = absl::StrCat(::testing::TempDir(), "/rollout_svc_", name, "_", getpid(), "_", counter++);
  std::filesystem::remove_all(d);
  return d;
}

std::unique_ptr<RolloutServer> StartServer(const std::string& name, RolloutServerOptions o = {}) {
  o.data_dir = TempDir(name);
  auto s = RolloutServer::Start(FixtureModel(), o);
  EXPECT_TRUE(s.ok()) << s.status().ToString();
  return std::move(*s);
}

retort::v1::GenerateRequest ProtoRequest(uint64_t seed, int len, int max_new, int n = 1) {
  GenerationRequest g = testing::RandomRequest(seed, len, max_new, n);
  retort::v1::GenerateRequest r;
  r.set_request_id(g.request_id);
  for (int64_t t : g.prompt) r.mutable_prompt_ids()->add_ids(t);
  auto* s = r.mutable_sampling();
  s->set_temperature(g.sampling.temperature);
  s->set_seed(g.sampling.seed);
  s->set_max_new_tokens(max_new);
  s->set_n(n);
  return r;
}

// The offline engine's answer for a proto request.
Completion Reference(const retort::v1::GenerateRequest& r, int sample) {
  auto c = Canonicalize(r, nullptr);
  EXPECT_TRUE(c.ok());
  auto out = ReferenceGenerate(*FixtureModel(), ToGenerationRequest(*c), sample);
  EXPECT_TRUE(out.ok()) << out.status().ToString();
  return *out;
}

RolloutClient Client(const std::vector<std::string>& workers) {
  RolloutClientOptions o;
  o.workers = workers;
  o.deadline = absl::Seconds(60);
  o.retry_for = absl::Seconds(10);
  return RolloutClient(o);
}

TEST(RolloutService, ConcurrentClientsGetTheOfflineEnginesTokens) {
  auto server = StartServer("concurrent");
  const int kClients = 8, kPerClient = 3;
  std::vector<std::vector<Completion>> got(kClients);
  std::vector<std::thread> threads;
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      RolloutClient client = Client({server->address()});
      for (int i = 0; i < kPerClient; ++i) {
        retort::v1::GenerateBatch batch;
        *batch.add_requests() = ProtoRequest(1000 + c * 10 + i, 3 + c, 12 + i, 1 + i % 3);
        auto out = client.GenerateAll(batch);
        ASSERT_TRUE(out.ok()) << out.status().ToString();
        got[c].insert(got[c].end(), out->begin(), out->end());
      }
    });
  }
  for (auto& t : threads) t.join();
  int total = 0;
  for (int c = 0; c < kClients; ++c) {
    for (const Completion& comp : got[c]) {
      ++total;
      const int i = static_cast<int>(std::stoll(comp.request_id().substr(4)) - 1000 - c * 10);
      Completion ref = Reference(ProtoRequest(1000 + c * 10 + i, 3 + c, 12 + i, 1 + i % 3), comp.sample_index());
      EXPECT_EQ(comp.token_ids().size(), ref.token_ids().size());
      for (int k = 0; k < std::min(comp.token_ids_size(), ref.token_ids_size()); ++k)
        EXPECT_EQ(comp.token_ids(k), ref.token_ids(k)) << comp.request_id() << " token " << k;
      EXPECT_EQ(comp.finish_reason(), ref.finish_reason());
    }
  }
  EXPECT_EQ(total, kClients * (1 + 2 + 3));
}

TEST(RolloutService, BadRequestsAreRejectedAndTheWorkerKeepsServing) {
  auto server = StartServer("bad");
  RolloutClient client = Client({server->address()});
  auto expect = [&](retort::v1::GenerateRequest r, absl::StatusCode code, const std::string& needle) {
    retort::v1::GenerateBatch b;
    *b.add_requests() = r;
    SCOPED_TRACE(needle);
    absl::Status s = client.Generate(b, [](const Completion&) {});
    EXPECT_EQ(s.code(), code) << s.ToString();
    EXPECT_NE(std::string(s.message()).find(needle), std::string::npos) << s.ToString();
  };
  auto good = ProtoRequest(1, 5, 6);
  auto r = good;
  r.mutable_prompt_ids()->clear_ids();
  expect(r, absl::StatusCode::kInvalidArgument, "prompt is empty");
  r = good;
  r.mutable_prompt_ids()->set_ids(1, 99999);
  expect(r, absl::StatusCode::kInvalidArgument, "outside the vocabulary");
  r = good;
  r.mutable_sampling()->set_n(0);
  expect(r, absl::StatusCode::kInvalidArgument, "n must be");
  r = good;
  r.mutable_sampling()->set_max_new_tokens(2000000000);
  expect(r, absl::StatusCode::kInvalidArgument, "max_new_tokens");
  r = good;
  for (int i = 0; i < 5000; ++i) r.mutable_prompt_ids()->add_ids(3);
  expect(r, absl::StatusCode::kInvalidArgument, "context too long");
  r = good;
  r.clear_prompt_ids();
  expect(r, absl::StatusCode::kInvalidArgument, "no prompt");
  r = good;
  r.mutable_chat()->add_messages()->set_content("hi");
  expect(r, absl::StatusCode::kFailedPrecondition, "tokenizer");
  // Unknown protocol version.
  {
    auto stub = retort::v1::RolloutService::NewStub(
        grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    retort::v1::GenerateBatch b;
    b.set_protocol_version(99);
    *b.add_requests() = good;
    auto reader = stub->Generate(&ctx, b);
    Completion c;
    while (reader->Read(&c)) {
    }
    grpc::Status s = reader->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_NE(s.error_message().find("protocol_version 99"), std::string::npos) << s.error_message();
  }
  // The worker still serves; re-using an id with a different prompt is refused.
  auto ok = client.GenerateAll([&] {
    retort::v1::GenerateBatch b;
    *b.add_requests() = good;
    return b;
  }());
  ASSERT_TRUE(ok.ok()) << ok.status().ToString();
  EXPECT_EQ(ok->size(), 1u);
  r = good;
  r.mutable_prompt_ids()->set_ids(0, 7);
  expect(r, absl::StatusCode::kFailedPrecondition, "different prompt");
  // Re-sending the same request returns the logged completion (idempotent).
  retort::v1::GenerateBatch again;
  *again.add_requests() = good;
  auto twice = client.GenerateAll(again);
  ASSERT_TRUE(twice.ok());
  ASSERT_EQ(twice->size(), 1u);
  EXPECT_EQ((*twice)[0].SerializeAsString(), (*ok)[0].SerializeAsString());
}

TEST(RolloutService, WeightUpdateMidStreamRecordsTheVersionPerToken) {
  auto server = StartServer("weights");
  RolloutClient client = Client({server->address()});
  auto req = ProtoRequest(42, 6, 60, 2);
  req.mutable_sampling()->set_ignore_eos(true);
  ASSERT_TRUE(client.Pause(0).ok());
  std::vector<Completion> got;
  std::thread gen([&] {
    retort::v1::GenerateBatch b;
    *b.add_requests() = req;
    auto out = client.GenerateAll(b);
    ASSERT_TRUE(out.ok()) << out.status().ToString();
    got = *out;
  });
  // Let ~20 tokens through, pause, push version 1 (the same tensors), resume.
  ASSERT_TRUE(client.Resume(0).ok());
  while (client.GetStatus(0)->generated_tokens() < 20) usleep(200);
  ASSERT_TRUE(client.Pause(0).ok());
  auto ckpt = io::Checkpoint::Open(testing::FixtureDir());
  ASSERT_TRUE(ckpt.ok());
  auto pushed = client.PushWeights(0, **ckpt, 1);
  ASSERT_TRUE(pushed.ok()) << pushed.status().ToString();
  EXPECT_EQ(pushed->weight_version(), 1u);
  // An older or equal version is refused; so are wrong shapes, dtypes and truncated streams.
  EXPECT_EQ(client.PushWeights(0, **ckpt, 1).status().code(), absl::StatusCode::kFailedPrecondition);
  {
    io::TensorMap bad;
    for (const auto& n : (*ckpt)->TensorNames()) bad.Add(n, *(*ckpt)->Get(n));
    bad.Add("model.norm.weight", Tensor::Zeros(DType::kF32, {3}));
    auto s = client.PushWeights(0, bad, 5);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << s.status().ToString();
    std::vector<retort::v1::TensorChunk> chunks(2);
    chunks[0].set_protocol_version(kRolloutProtocolVersion);
    chunks[0].set_weight_version(6);
    chunks[0].set_name("x");
    chunks[0].set_dtype("f32");
    chunks[0].add_shape(4);
    chunks[0].set_data(std::string(8, '\0'));
    chunks[1] = chunks[0];
    chunks[1].set_offset(8);  // no `last`: truncated
    auto t = client.PushChunks(0, chunks);
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(std::string(t.status().message()).find("truncated"), std::string::npos) << t.status().ToString();
    chunks.resize(1);
    chunks[0].set_dtype("complex128");
    chunks[0].set_last(true);
    EXPECT_EQ(client.PushChunks(0, chunks).status().code(), absl::StatusCode::kInvalidArgument);
  }
  ASSERT_TRUE(client.Resume(0).ok());
  gen.join();
  ASSERT_EQ(got.size(), 2u);
  for (const Completion& c : got) {
    ASSERT_EQ(c.token_ids_size(), 60);
    int v0 = 0, v1 = 0;
    for (int i = 0; i < 60; ++i) {
      const int64_t v = c.weight_versions(i);
      ASSERT_TRUE(v == 0 || v == 1);
      if (i > 0) {
        EXPECT_GE(v, c.weight_versions(i - 1)) << "versions go back at token " << i;
      }
      (v == 0 ? v0 : v1)++;
    }
    EXPECT_GE(v0, 10);
    EXPECT_GE(v1, 1);
    // Same tensors: the tokens are those of an unchanging model.
    Completion ref = Reference(req, c.sample_index());
    for (int i = 0; i < 60; ++i) EXPECT_EQ(c.token_ids(i), ref.token_ids(i));
  }
  EXPECT_EQ(client.GetStatus(0)->weight_version(), 1u);
}

TEST(RolloutService, HealthServingUntilDrained) {
  auto server = StartServer("health");
  auto channel = grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials());
  grpc::GenericStub generic(channel);
  auto check = [&]() -> std::pair<grpc::Status, std::string> {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::ByteBuffer req, resp;  // HealthCheckRequest{service: ""} encodes to no bytes
    grpc::Slice empty("");
    req = grpc::ByteBuffer(&empty, 1);
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    grpc::Status status;
    generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &req, &resp,
                      [&](grpc::Status s) {
                        std::lock_guard<std::mutex> l(mu);
                        status = s;
                        done = true;
                        cv.notify_all();
                      });
    std::unique_lock<std::mutex> l(mu);
    cv.wait(l, [&] { return done; });
    std::vector<grpc::Slice> slices;
    std::string bytes;
    if (status.ok() && resp.Dump(&slices).ok())
      for (auto& s : slices) bytes += std::string(reinterpret_cast<const char*>(s.begin()), s.size());
    return {status, bytes};
  };
  auto [s, bytes] = check();
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(bytes, std::string("\x08\x01", 2));  // status: SERVING
  server->Drain(absl::Seconds(1));
  auto [s2, bytes2] = check();
  EXPECT_FALSE(s2.ok() && bytes2 == std::string("\x08\x01", 2));
}

TEST(RolloutService, ClientFailsOverToTheNextWorker) {
  auto dead = StartServer("dead");
  const std::string dead_address = dead->address();
  dead->Drain(absl::ZeroDuration());
  dead.reset();
  auto live = StartServer("live");
  RolloutClient client = Client({dead_address, live->address()});
  retort::v1::GenerateBatch b;
  for (int i = 0; i < 4; ++i) *b.add_requests() = ProtoRequest(500 + i, 4, 8, 2);
  auto out = client.GenerateAll(b);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  EXPECT_EQ(out->size(), 8u);
  for (const Completion& c : *out) {
    Completion ref = Reference(b.requests(static_cast<int>(std::stoll(c.request_id().substr(4)) - 500)), c.sample_index());
    EXPECT_EQ(c.token_ids().size(), ref.token_ids().size());
  }
}

TEST(RolloutService, CompletionsLandInTheTrajectoryStore) {
  const std::string dir = TempDir("traj");
  {
    RolloutServerOptions o;
    o.data_dir = dir;
    auto server = RolloutServer::Start(FixtureModel(), o);
    ASSERT_TRUE(server.ok());
    RolloutClient client = Client({(*server)->address()});
    retort::v1::GenerateBatch b;
    for (int i = 0; i < 3; ++i) {
      auto r = ProtoRequest(700 + i, 5, 6, 2);
      r.set_experiment("exp1");
      r.set_step(4);
      r.set_group_id(absl::StrCat("g", i));
      *b.add_requests() = r;
    }
    ASSERT_TRUE(client.GenerateAll(b).ok());
  }
  auto store = TrajectoryStore::Open(dir + "/trajectories");
  ASSERT_TRUE(store.ok());
  auto groups = (*store)->ReadSteps("exp1", 4, 5);
  ASSERT_TRUE(groups.ok());
  ASSERT_EQ(groups->size(), 3u);
  for (const auto& g : *groups) {
    EXPECT_EQ(g.prompt.prompt_ids_size(), 5);
    EXPECT_EQ(g.completions.size(), 2u);
  }
}

}  // namespace
}  // namespace retort::rollout
