// `retort rollout-worker` (the gRPC generation service) and `retort
// rollout-bench` (a load generator against running workers).
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "controller/command.h"
#include "controller/flags.h"
#include "model/base/status_macros.h"
#include "model/tokenizer/tokenizer.h"
#include "model/v4/model.h"
#include "rollout/service/protocol.h"
#include "rollout/service/rollout_client.h"
#include "rollout/service/rollout_server.h"

ABSL_DECLARE_FLAG(int32_t, max_new_tokens);  // controller/v4_commands.cc

ABSL_FLAG(int32_t, port, 0, "rollout-worker: port on 127.0.0.1 (0: any free port; printed on stdout)");
ABSL_FLAG(std::string, port_file, "", "rollout-worker: write the chosen port to this file");
ABSL_FLAG(std::string, data_dir, "", "rollout-worker: directory for the token WAL and the trajectory store");
ABSL_FLAG(double, drain_timeout_s, 30.0, "rollout-worker: on SIGTERM, seconds to let running requests finish");
ABSL_FLAG(int64_t, max_step_tokens, 512, "rollout-worker: tokens per engine step");
ABSL_FLAG(int64_t, state_budget_mb, 4096, "rollout-worker: decode-state memory budget (MiB)");
ABSL_FLAG(bool, share_prefix, true, "rollout-worker: prefill a group's prompt once and fork it for its n samples");
ABSL_FLAG(bool, sync_tokens, false, "rollout-worker: fsync every token batch (default: survives kill -9, not power loss)");
ABSL_FLAG(std::string, workers, "", "rollout-bench: comma-separated host:port list");
ABSL_FLAG(int32_t, concurrency, 1, "rollout-bench: requests in flight");
ABSL_FLAG(int32_t, requests, 16, "rollout-bench: requests in total");
ABSL_FLAG(int32_t, prompt_len, 16, "rollout-bench: prompt tokens per request");
ABSL_FLAG(int32_t, prompt_vocab, 256, "rollout-bench: prompt token ids are drawn from [2, prompt_vocab)");
ABSL_FLAG(int32_t, samples, 1, "rollout-bench: samples per request (GRPO group size n)");

namespace retort::controller {
namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "retort: %s\n", s.ToString().c_str());
  return 1;
}

int g_signal_pipe[2] = {-1, -1};
void OnShutdownSignal(int sig) {
  const int saved = errno;
  (void)!write(g_signal_pipe[1], &sig, sizeof(sig));
  errno = saved;
}

absl::Status RolloutWorker() {
  const std::string dir = absl::GetFlag(FLAGS_model);
  if (dir.empty()) return absl::InvalidArgumentError("--model DIR is required");
  if (absl::GetFlag(FLAGS_data_dir).empty()) return absl::InvalidArgumentError("--data-dir DIR is required");
  if (absl::GetFlag(FLAGS_device) != "cpu")
    return absl::UnimplementedError(absl::StrCat("--device ", absl::GetFlag(FLAGS_device), ": this build runs on cpu only"));
  if (absl::GetFlag(FLAGS_numerics) != "exact")
    return absl::UnimplementedError("rollout-worker: only --numerics exact runs on cpu");
  // Shutdown signals go through a self-pipe: threads started before main
  // (OpenBLAS) do not block them, so sigwait alone would miss some.
  if (pipe(g_signal_pipe) != 0) return absl::InternalError("rollout-worker: pipe() failed");
  struct sigaction sa = {};
  sa.sa_handler = OnShutdownSignal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);

  ASSIGN_OR_RETURN(std::unique_ptr<v4::Model> model, v4::Model::Load(dir));
  rollout::RolloutServerOptions o;
  o.address = absl::StrCat("127.0.0.1:", absl::GetFlag(FLAGS_port));
  o.data_dir = absl::GetFlag(FLAGS_data_dir);
  o.engine.max_step_tokens = absl::GetFlag(FLAGS_max_step_tokens);
  o.engine.state_bytes_budget = absl::GetFlag(FLAGS_state_budget_mb) << 20;
  o.engine.share_prefix = absl::GetFlag(FLAGS_share_prefix);
  o.wal.sync_tokens = absl::GetFlag(FLAGS_sync_tokens);
  const std::string tok_dir = absl::GetFlag(FLAGS_tokenizer).empty() ? dir : absl::GetFlag(FLAGS_tokenizer);
  if (std::ifstream(tok_dir + "/tokenizer.json").good()) {
    ASSIGN_OR_RETURN(std::unique_ptr<tokenizer::Tokenizer> tok, tokenizer::Tokenizer::LoadDir(tok_dir));
    o.tokenizer = std::move(tok);
  }
  ASSIGN_OR_RETURN(std::unique_ptr<rollout::RolloutServer> server, rollout::RolloutServer::Start(std::move(model), o));
  if (!absl::GetFlag(FLAGS_port_file).empty()) {
    const std::string tmp = absl::GetFlag(FLAGS_port_file) + ".tmp";
    std::ofstream(tmp) << server->port() << "\n";
    std::rename(tmp.c_str(), absl::GetFlag(FLAGS_port_file).c_str());
  }
  std::printf("rollout worker listening on %s (resumed %d requests, tokenizer %s)\n", server->address().c_str(),
              server->resumed_requests(), o.tokenizer ? "yes" : "no");
  std::fflush(stdout);
  std::thread signals([&] {
    int sig = 0;
    while (read(g_signal_pipe[0], &sig, sizeof(sig)) < 0) {
    }
    std::fprintf(stderr, "rollout worker: signal %d, draining\n", sig);
    server->Drain(absl::Seconds(absl::GetFlag(FLAGS_drain_timeout_s)));
  });
  server->Wait();
  signals.join();
  std::fprintf(stderr, "rollout worker: drained\n");
  return absl::OkStatus();
}

int RunRolloutWorker(const std::vector<std::string>& args) {
  absl::Status s = RolloutWorker();
  return s.ok() ? 0 : Fail(s);
}

absl::Status RolloutBench() {
  rollout::RolloutClientOptions o;
  for (absl::string_view w : absl::StrSplit(absl::GetFlag(FLAGS_workers), ',', absl::SkipEmpty()))
    o.workers.emplace_back(w);
  if (o.workers.empty()) return absl::InvalidArgumentError("--workers host:port,... is required");
  const int concurrency = absl::GetFlag(FLAGS_concurrency), total = absl::GetFlag(FLAGS_requests);
  const int max_new = absl::GetFlag(FLAGS_max_new_tokens), samples = absl::GetFlag(FLAGS_samples);
  if (concurrency < 1 || total < 1) return absl::InvalidArgumentError("--concurrency and --requests must be >= 1");
  rollout::RolloutClient client(o);
  std::atomic<int> next{0};
  std::atomic<int64_t> tokens{0};
  std::vector<double> latencies(total, 0.0);
  std::vector<absl::Status> errors(concurrency);
  const uint64_t seed = absl::GetFlag(FLAGS_seed);
  const std::string run = absl::StrCat("bench-", absl::ToUnixNanos(absl::Now()));
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> threads;
  for (int c = 0; c < concurrency; ++c) {
    threads.emplace_back([&, c] {
      for (int i; (i = next.fetch_add(1)) < total;) {
        std::mt19937_64 rng(seed * 1000003 + i);
        retort::v1::GenerateBatch batch;
        auto* r = batch.add_requests();
        r->set_request_id(absl::StrCat(run, "-", i));
        for (int t = 0; t < absl::GetFlag(FLAGS_prompt_len); ++t)
          r->mutable_prompt_ids()->add_ids(2 + static_cast<int64_t>(rng() % (absl::GetFlag(FLAGS_prompt_vocab) - 2)));
        auto* s = r->mutable_sampling();
        s->set_temperature(1.0f);
        s->set_max_new_tokens(max_new);
        s->set_n(samples);
        s->set_seed(seed + i);
        s->set_ignore_eos(true);
        const auto a = std::chrono::steady_clock::now();
        absl::Status st = client.Generate(batch, [&](const retort::v1::Completion& comp) { tokens += comp.token_ids_size(); });
        latencies[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
        if (!st.ok()) {
          errors[c] = st;
          return;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (const auto& e : errors) RETURN_IF_ERROR(e);
  std::sort(latencies.begin(), latencies.end());
  auto pct = [&](double p) { return latencies[std::min<size_t>(latencies.size() - 1, static_cast<size_t>(p * latencies.size()))]; };
  std::printf("rollout-bench requests=%d samples=%d concurrency=%d tokens=%lld seconds=%.3f tokens/s=%.1f p50=%.1fms p99=%.1fms\n",
              total, samples, concurrency, static_cast<long long>(tokens.load()), secs, tokens.load() / secs,
              pct(0.50) * 1e3, pct(0.99) * 1e3);
  return absl::OkStatus();
}

int RunRolloutBench(const std::vector<std::string>& args) {
  absl::Status s = RolloutBench();
  return s.ok() ? 0 : Fail(s);
}

}  // namespace

RETORT_COMMAND("rollout-worker", "serve generation over gRPC (RolloutService) with a token WAL", RunRolloutWorker);
RETORT_COMMAND("rollout-bench", "load-generate against rollout workers; prints tokens/s and p50/p99 latency",
               RunRolloutBench);

}  // namespace retort::controller
