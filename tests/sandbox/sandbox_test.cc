// Sandbox API tests: verdicts and result fields, the checkers, the test
// runner, the pool's bounded queue, the rlimit fallback and its refusal, and
// the gRPC service.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "retort/v1/sandbox.grpc.pb.h"
#include "sandbox/sandbox.h"
#include "sandbox/service.h"
#include "tests/sandbox/test_util.h"

namespace retort::sandbox {
namespace {

using testing::SmallLimits;
using testing::Survivors;

constexpr uint32_t kUidBase = 1810000000u;

class SandboxTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto s = Sandbox::Create(testing::TestOptions(kUidBase));
    ASSERT_TRUE(s.ok()) << s.status();
    sandbox_ = std::move(s).value().release();
  }
  static void TearDownTestSuite() {
    delete sandbox_;
    sandbox_ = nullptr;
  }
  RunResult Run(Language language, const std::string& program, const std::string& stdin_data = "") {
    RunRequest r;
    r.language = language;
    r.program = program;
    r.stdin_data = stdin_data;
    r.limits = SmallLimits();
    auto result = sandbox_->Run(r);
    EXPECT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(Survivors(kUidBase), 0);
    return result.ok() ? *result : RunResult{};
  }
  static Sandbox* sandbox_;
};
Sandbox* SandboxTest::sandbox_ = nullptr;

TEST_F(SandboxTest, PythonEchoesStdin) {
  RunResult r = Run(Language::kPython, "import sys\nprint(sys.stdin.read().upper(), end='')\n", "abc\n");
  EXPECT_EQ(r.verdict, Verdict::kOk) << r.detail << r.stderr_data;
  EXPECT_EQ(r.stdout_data, "ABC\n");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_GT(r.peak_memory_kb, 0);
  EXPECT_GT(r.wall_ms, 0);
}

TEST_F(SandboxTest, CppCompilesAndRuns) {
  RunResult r = Run(Language::kCpp,
                    "#include <iostream>\nint main(){ long a,b; std::cin>>a>>b; std::cout<<a*b<<'\\n'; }",
                    "6 7");
  EXPECT_EQ(r.verdict, Verdict::kOk) << r.detail << r.compile_output;
  EXPECT_EQ(r.stdout_data, "42\n");
  EXPECT_GT(r.compile_ms, 0);
}

TEST_F(SandboxTest, CompileErrorIsReported) {
  RunResult r = Run(Language::kCpp, "int main() { return x; }");
  EXPECT_EQ(r.verdict, Verdict::kCompileError);
  EXPECT_NE(r.compile_output.find("was not declared"), std::string::npos) << r.compile_output;
}

TEST_F(SandboxTest, ExitCodesAndSignals) {
  RunResult r = Run(Language::kSh, "echo out; echo err >&2; exit 3");
  EXPECT_EQ(r.verdict, Verdict::kRuntimeError);
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_EQ(r.stdout_data, "out\n");
  EXPECT_EQ(r.stderr_data, "err\n");
  RunResult s = Run(Language::kCpp, "int main(){ volatile int* p = nullptr; return *p; }");
  EXPECT_EQ(s.verdict, Verdict::kKilledBySignal);
  EXPECT_EQ(s.term_signal, SIGSEGV);
}

TEST_F(SandboxTest, StderrOverCapIsOutputLimit) {
  RunResult r = Run(Language::kPython, "import sys\nsys.stderr.write('e' * (1 << 20))\n");
  EXPECT_EQ(r.verdict, Verdict::kOutputLimit);
  EXPECT_TRUE(r.stderr_truncated);
  EXPECT_FALSE(r.stdout_truncated);
}

TEST_F(SandboxTest, RejectsBadRequests) {
  RunRequest r;
  r.limits.cpu_ms = 0;
  EXPECT_EQ(sandbox_->Run(r).status().code(), absl::StatusCode::kInvalidArgument);
  RunRequest f;
  f.files = {{"../x", "", false}};
  EXPECT_EQ(sandbox_->Run(f).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SandboxTest, ExtraFilesAreReadOnly) {
  RunRequest r;
  r.language = Language::kPython;
  r.program = "print(open('data.txt').read())\ntry:\n    open('data.txt','w')\nexcept OSError:\n    print('RO')\n";
  r.files = {{"data.txt", "hello", false}};
  r.limits = SmallLimits();
  auto result = sandbox_->Run(r);
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(result->stdout_data, "hello\nRO\n");
}

TEST(CheckerTest, Modes) {
  Checker exact{CheckMode::kExact};
  Checker ws{CheckMode::kWhitespace};
  Checker fl{CheckMode::kFloat, 1e-6, 1e-6};
  EXPECT_TRUE(OutputMatches("1 2\n", "1 2\n", exact));
  EXPECT_FALSE(OutputMatches("1 2\n", "1 2", exact));
  EXPECT_TRUE(OutputMatches("1 2\n", "1   2", ws));
  EXPECT_TRUE(OutputMatches("1\n2\n", " 1 2 \n\n", ws));
  EXPECT_FALSE(OutputMatches("1 2", "12", ws));
  EXPECT_FALSE(OutputMatches("3", "", ws));
  EXPECT_TRUE(OutputMatches("0.333333", "0.3333331", fl));
  EXPECT_FALSE(OutputMatches("0.333333", "0.3334", fl));
  EXPECT_TRUE(OutputMatches("1e9", "1000000000.5", fl));  // relative
  EXPECT_FALSE(OutputMatches("yes 1.0", "no 1.0", fl));
  EXPECT_FALSE(OutputMatches("1.0", "1.0 2.0", fl));
  EXPECT_FALSE(OutputMatches("nan", "1", fl));
  EXPECT_TRUE(OutputMatches("nan", "nan", fl));
  EXPECT_FALSE(OutputMatches("inf", "1e308", fl));
}

TEST(CheckerTest, Json) {
  using nlohmann::json;
  Checker exact{CheckMode::kExact};
  Checker fl{CheckMode::kFloat, 1e-6, 1e-6};
  EXPECT_TRUE(JsonMatches(json::parse("[1, 2]"), json::parse("[1.0, 2]"), exact));
  EXPECT_FALSE(JsonMatches(json::parse("1"), json::parse("true"), exact));
  EXPECT_FALSE(JsonMatches(json::parse("[1, 2]"), json::parse("[2, 1]"), exact));
  EXPECT_TRUE(JsonMatches(json::parse("{\"a\": 1}"), json::parse("{\"a\": 1}"), exact));
  EXPECT_FALSE(JsonMatches(json::parse("{\"a\": 1}"), json::parse("{\"a\": 1, \"b\": 2}"), exact));
  EXPECT_TRUE(JsonMatches(json::parse("0.1"), json::parse("0.1000000001"), fl));
  EXPECT_FALSE(JsonMatches(json::parse("0.1"), json::parse("0.1000000001"), exact));
  EXPECT_FALSE(JsonMatches(json::parse("null"), json::parse("0"), fl));
  EXPECT_TRUE(JsonMatches(json::parse("\"a  b\""), json::parse("\"a b\""), Checker{}));
}

TEST_F(SandboxTest, RunTestsCountsCases) {
  std::vector<IoCase> cases = {{"2\n", "4\n"}, {"3\n", "9\n"}, {"5\n", "26\n"}};
  auto report = RunTests(*sandbox_, Language::kPython, "n = int(input())\nprint(n * n)\n", cases,
                         Checker{}, SmallLimits());
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->passed, 2);
  EXPECT_EQ(report->total, 3);
  EXPECT_EQ(report->cases[2].reason, "wrong answer");
  EXPECT_FALSE(report->all_passed());
  EXPECT_EQ(RunTests(*sandbox_, Language::kPython, "", {}, Checker{}, SmallLimits()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SandboxTest, RunTestsCppOnPool) {
  SandboxPool pool(sandbox_, 2, 4);
  std::vector<IoCase> cases;
  for (int i = 0; i < 6; ++i) cases.push_back({absl::StrCat(i), absl::StrCat(i + 1)});
  auto report = RunTests(*sandbox_, Language::kCpp,
                         "#include <cstdio>\nint main(){ int n; if(std::scanf(\"%d\",&n)!=1) return 1;"
                         " if(n==4){ for(;;); } std::printf(\"%d\\n\", n+1); }",
                         cases, Checker{}, SmallLimits(), &pool);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->passed, 5) << TestReportToJson(*report).dump();
  EXPECT_EQ(report->cases[4].verdict, Verdict::kTimeLimit);
  EXPECT_EQ(Survivors(kUidBase), 0);
}

TEST_F(SandboxTest, FunctionTestsWithTolerance) {
  std::vector<FunctionCase> cases = {{"[1, 3]", "0.3333333"}, {"[2, 4]", "0.5"}, {"[1, 0]", "0"}};
  auto report = RunFunctionTests(*sandbox_, "def div(a, b):\n    return a / b\n", "div", cases,
                                 Checker{CheckMode::kFloat, 1e-6, 1e-6}, SmallLimits());
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->passed, 2);
  EXPECT_NE(report->cases[2].reason.find("ZeroDivisionError"), std::string::npos)
      << report->cases[2].reason;
  EXPECT_EQ(RunFunctionTests(*sandbox_, "", "f", {{"not json", "1"}}, Checker{}, SmallLimits())
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SandboxTest, PoolQueueIsBounded) {
  SandboxPool pool(sandbox_, 1, 1);
  RunRequest slow;
  slow.language = Language::kSh;
  slow.program = "sleep 0.3";
  slow.limits = SmallLimits();
  auto a = pool.TrySubmit(slow);  // taken by the worker
  ASSERT_TRUE(a.ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  auto b = pool.TrySubmit(slow);  // waits in the queue
  ASSERT_TRUE(b.ok());
  auto c = pool.TrySubmit(slow);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(a->get()->verdict, Verdict::kOk);
  EXPECT_EQ(b->get()->verdict, Verdict::kOk);
}

TEST_F(SandboxTest, ConcurrentRunsAreIsolated) {
  SandboxPool pool(sandbox_, 4, 16);
  std::vector<std::future<absl::StatusOr<RunResult>>> futures;
  for (int i = 0; i < 12; ++i) {
    RunRequest r;
    r.language = Language::kPython;
    r.program = "import os\nopen('/work/mine', 'w').write(input())\nprint(open('/work/mine').read(), len(os.listdir('/work')))\n";
    r.stdin_data = absl::StrCat(i);
    r.limits = SmallLimits();
    futures.push_back(pool.Submit(std::move(r)));
  }
  for (int i = 0; i < 12; ++i) {
    auto r = futures[i].get();
    ASSERT_TRUE(r.ok());
    EXPECT_EQ(r->stdout_data, absl::StrCat(i, " 2\n")) << RunResultToJson(*r).dump();
  }
  EXPECT_EQ(Survivors(kUidBase), 0);
}

TEST(SandboxFallbackTest, RefusesWeakerLimitsByDefault) {
  SandboxOptions o = testing::TestOptions(1820000000u);
  o.cgroup = CgroupMode::kNone;
  auto s = Sandbox::Create(o);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.status().message().find("weaker"), std::string::npos) << s.status();
}

TEST(SandboxFallbackTest, RlimitsStillEnforceWhenAllowed) {
  SandboxOptions o = testing::TestOptions(1820000000u);
  o.cgroup = CgroupMode::kNone;
  o.degraded = DegradedPolicy::kAllowWeaker;
  auto s = Sandbox::Create(o);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_NE((*s)->capabilities().find("WEAKER"), std::string::npos);
  RunRequest r;
  r.language = Language::kPython;
  r.limits = SmallLimits();
  r.program = "x = []\nwhile True:\n    x.append(bytearray(1 << 20))\n";
  auto mem = (*s)->Run(r);
  ASSERT_TRUE(mem.ok());
  EXPECT_EQ(mem->verdict, Verdict::kMemoryLimit) << mem->detail << mem->stderr_data;
  EXPECT_NE(mem->enforcement.find("rlimit"), std::string::npos);
  r.program = "while True:\n    pass\n";
  auto cpu = (*s)->Run(r);
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(cpu->verdict, Verdict::kTimeLimit) << cpu->detail;
  EXPECT_EQ(Survivors(1820000000u), 0);
}

TEST_F(SandboxTest, GrpcServiceRoundTrip) {
  auto server = SandboxServer::Start(sandbox_, "127.0.0.1:0", 4);
  ASSERT_TRUE(server.ok()) << server.status();
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", (*server)->port()),
                                     grpc::InsecureChannelCredentials());
  auto stub = retort::v1::SandboxService::NewStub(channel);

  retort::v1::SandboxRunRequest req;
  req.set_protocol_version(kSandboxProtocolVersion);
  req.set_language(retort::v1::SANDBOX_LANGUAGE_PYTHON);
  req.set_program("print(input()[::-1])");
  req.set_stdin("abc\n");
  retort::v1::SandboxRunResponse resp;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  grpc::Status st = stub->Run(&ctx, req, &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(resp.verdict(), retort::v1::SANDBOX_VERDICT_OK);
  EXPECT_EQ(resp.stdout(), "cba\n");

  retort::v1::SandboxRunTestsRequest treq;
  treq.set_protocol_version(kSandboxProtocolVersion);
  treq.set_language(retort::v1::SANDBOX_LANGUAGE_PYTHON);
  treq.set_program("def f(x):\n    return x * 2\n");
  treq.set_function_name("f");
  auto* c1 = treq.add_function_cases();
  c1->set_args_json("[2]");
  c1->set_expected_json("4");
  auto* c2 = treq.add_function_cases();
  c2->set_args_json("[\"ab\"]");
  c2->set_expected_json("\"abab\"");
  auto* c3 = treq.add_function_cases();
  c3->set_args_json("[1]");
  c3->set_expected_json("3");
  retort::v1::SandboxRunTestsResponse tresp;
  grpc::ClientContext tctx;
  tctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  st = stub->RunTests(&tctx, treq, &tresp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(tresp.passed(), 2);
  EXPECT_EQ(tresp.total(), 3);

  req.set_protocol_version(99);
  grpc::ClientContext bctx;
  bctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  st = stub->Run(&bctx, req, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

}  // namespace
}  // namespace retort::sandbox
