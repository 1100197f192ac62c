// Process-level fault tests: fork/exec the real `retort rollout-worker`,
// kill -9 it mid-generation, restart it on the same data directory, and check
// that every accepted request completes exactly once with no token lost or
// duplicated (the tokens equal the offline engine's for the same seeds).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "rollout/service/protocol.h"
#include "rollout/service/rollout_client.h"
#include "tests/rollout/test_util.h"

namespace retort::rollout {
namespace {

using retort::v1::Completion;

// A worker child process; killed with SIGKILL if still running at destruction.
class WorkerProcess {
 public:
  WorkerProcess(const std::string& data_dir, int port) {
    port_file_ = data_dir + ".port";
    std::filesystem::remove(port_file_);
    const std::string bin = std::string(RETORT_BINARY_DIR) + "/controller/retort";
    std::vector<std::string> args = {bin, "rollout-worker", "--model", testing::FixtureDir(), "--data-dir", data_dir,
                                     absl::StrCat("--port=", port), "--port-file", port_file_};
    pid_ = fork();
    if (pid_ == 0) {
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(bin.c_str(), argv.data());
      _exit(127);
    }
    for (int i = 0; i < 600 && port_ == 0; ++i) {
      std::ifstream f(port_file_);
      if (!(f >> port_)) port_ = 0;
      if (port_ == 0) usleep(20000);
    }
  }
  ~WorkerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  int port() const { return port_; }
  void Kill9() {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }
  int Term() {  // SIGTERM, returns the exit status
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  std::string port_file_;
};

retort::v1::GenerateRequest Request(uint64_t seed, int max_new, int n) {
  GenerationRequest g = testing::RandomRequest(seed, 9, max_new, n);
  retort::v1::GenerateRequest r;
  r.set_request_id(g.request_id);
  for (int64_t t : g.prompt) r.mutable_prompt_ids()->add_ids(t);
  auto* s = r.mutable_sampling();
  s->set_temperature(1.0f);
  s->set_seed(g.sampling.seed);
  s->set_max_new_tokens(max_new);
  s->set_n(n);
  s->set_ignore_eos(true);
  return r;
}

TEST(RolloutE2E, Kill9MidGenerationThenRestartCompletesEveryRequestOnce) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/rollout_e2e_", getpid());
  std::filesystem::remove_all(dir);
  auto worker = std::make_unique<WorkerProcess>(dir, 0);
  const int port = worker->port();
  ASSERT_GT(port, 0) << "worker did not start";
  const std::string address = absl::StrCat("127.0.0.1:", port);
  retort::v1::GenerateBatch batch;
  for (int i = 0; i < 6; ++i) *batch.add_requests() = Request(9000 + i, 400, 2);

  RolloutClientOptions o;
  o.workers = {address};
  o.deadline = absl::Seconds(200);
  o.retry_for = absl::Seconds(60);
  RolloutClient client(o);
  std::map<std::pair<std::string, int>, Completion> got;
  int deliveries = 0;
  absl::Status result;
  std::thread gen([&] {
    result = client.Generate(batch, [&](const Completion& c) {
      ++deliveries;
      got[{c.request_id(), c.sample_index()}] = c;
    });
  });
  // Kill once tokens are flowing, restart on the same port and data directory.
  RolloutClient probe(o);
  int64_t before = 0;
  for (int i = 0; i < 2000 && before < 150; ++i) {
    auto st = probe.GetStatus(0);
    if (st.ok()) before = st->generated_tokens();
    usleep(5000);
  }
  ASSERT_GE(before, 150);
  worker->Kill9();
  worker = std::make_unique<WorkerProcess>(dir, port);
  ASSERT_EQ(worker->port(), port);
  gen.join();
  ASSERT_TRUE(result.ok()) << result.ToString();
  EXPECT_EQ(deliveries, 12) << "a completion was delivered twice or lost";
  ASSERT_EQ(got.size(), 12u);
  int resumed = 0;
  for (const auto& r : batch.requests()) {
    auto canon = Canonicalize(r, nullptr);
    ASSERT_TRUE(canon.ok());
    for (int k = 0; k < 2; ++k) {
      const Completion& c = got.at({r.request_id(), k});
      auto ref = ReferenceGenerate(*testing::FixtureModel(), ToGenerationRequest(*canon), k);
      ASSERT_TRUE(ref.ok());
      ASSERT_EQ(c.token_ids_size(), 400);
      int diff = 0;
      for (int i = 0; i < 400; ++i) diff += c.token_ids(i) != ref->token_ids(i);
      EXPECT_EQ(diff, 0) << r.request_id() << " #" << k << " (resumed after " << c.resumed_tokens() << " tokens)";
      resumed += c.resumed_tokens() > 0;
    }
  }
  EXPECT_GT(resumed, 0) << "the kill did not interrupt any sample";
  std::printf("resumed %d of 12 samples from the WAL\n", resumed);
  // Graceful drain on SIGTERM: exit status 0.
  EXPECT_EQ(worker->Term(), 0);
}

}  // namespace
}  // namespace retort::rollout
