// SandboxService: proto conversion and the gRPC callback server.
#include "sandbox/service.h"

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "model/base/status_macros.h"
#include "retort/v1/sandbox.grpc.pb.h"

namespace retort::sandbox {
namespace {

namespace pb = ::retort::v1;

// absl and gRPC status codes are equal by construction.
grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::StatusOr<Language> LanguageFromProto(pb::SandboxLanguage l) {
  switch (l) {
    case pb::SANDBOX_LANGUAGE_PYTHON:
      return Language::kPython;
    case pb::SANDBOX_LANGUAGE_CPP:
      return Language::kCpp;
    case pb::SANDBOX_LANGUAGE_SH:
      return Language::kSh;
    default:
      return absl::InvalidArgumentError(absl::StrCat("language: unsupported value ", l));
  }
}

pb::SandboxVerdict VerdictToProto(Verdict v) {
  switch (v) {
    case Verdict::kOk:
      return pb::SANDBOX_VERDICT_OK;
    case Verdict::kRuntimeError:
      return pb::SANDBOX_VERDICT_RUNTIME_ERROR;
    case Verdict::kTimeLimit:
      return pb::SANDBOX_VERDICT_TIME_LIMIT;
    case Verdict::kMemoryLimit:
      return pb::SANDBOX_VERDICT_MEMORY_LIMIT;
    case Verdict::kOutputLimit:
      return pb::SANDBOX_VERDICT_OUTPUT_LIMIT;
    case Verdict::kKilledBySignal:
      return pb::SANDBOX_VERDICT_KILLED_BY_SIGNAL;
    case Verdict::kCompileError:
      return pb::SANDBOX_VERDICT_COMPILE_ERROR;
    case Verdict::kSandboxFailure:
      return pb::SANDBOX_VERDICT_SANDBOX_FAILURE;
  }
  return pb::SANDBOX_VERDICT_UNSPECIFIED;
}

Limits LimitsFromProto(const pb::SandboxLimits& p) {
  Limits l;
  auto set = [](int64_t v, int64_t* field) {
    if (v != 0) *field = v;
  };
  set(p.cpu_ms(), &l.cpu_ms);
  set(p.wall_ms(), &l.wall_ms);
  set(p.memory_mb(), &l.memory_mb);
  set(p.max_pids(), &l.max_pids);
  set(p.file_size_mb(), &l.file_size_mb);
  set(p.open_files(), &l.open_files);
  set(p.output_bytes(), &l.output_bytes);
  set(p.tmpfs_mb(), &l.tmpfs_mb);
  set(p.tmpfs_inodes(), &l.tmpfs_inodes);
  return l;
}

absl::Status CheckVersion(uint32_t v) {
  if (v == kSandboxProtocolVersion) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat("sandbox protocol_version ", v,
                                                    " is not the server's ",
                                                    kSandboxProtocolVersion));
}

}  // namespace

absl::StatusOr<RunRequest> FromProto(const pb::SandboxRunRequest& proto) {
  RETURN_IF_ERROR(CheckVersion(proto.protocol_version()));
  RunRequest r;
  ASSIGN_OR_RETURN(r.language, LanguageFromProto(proto.language()));
  r.program = proto.program();
  r.stdin_data = proto.stdin();
  r.limits = LimitsFromProto(proto.limits());
  r.args.assign(proto.args().begin(), proto.args().end());
  for (const pb::SandboxFile& f : proto.files()) r.files.push_back({f.name(), f.content(), f.executable()});
  return r;
}

pb::SandboxRunResponse ToProto(const RunResult& r) {
  pb::SandboxRunResponse p;
  p.set_verdict(VerdictToProto(r.verdict));
  p.set_exit_code(r.exit_code);
  p.set_signal(r.term_signal);
  p.set_cpu_ms(r.cpu_ms);
  p.set_wall_ms(r.wall_ms);
  p.set_peak_memory_kb(r.peak_memory_kb);
  p.set_stdout(r.stdout_data);
  p.set_stderr(r.stderr_data);
  p.set_stdout_truncated(r.stdout_truncated);
  p.set_stderr_truncated(r.stderr_truncated);
  p.set_detail(r.detail);
  p.set_compile_output(r.compile_output);
  p.set_compile_ms(r.compile_ms);
  p.set_enforcement(r.enforcement);
  return p;
}

absl::StatusOr<pb::SandboxRunResponse> HandleRun(const Sandbox& sandbox,
                                                 const pb::SandboxRunRequest& req) {
  ASSIGN_OR_RETURN(RunRequest request, FromProto(req));
  ASSIGN_OR_RETURN(RunResult result, sandbox.Run(request));
  return ToProto(result);
}

absl::StatusOr<pb::SandboxRunTestsResponse> HandleRunTests(const Sandbox& sandbox,
                                                           const pb::SandboxRunTestsRequest& req) {
  RETURN_IF_ERROR(CheckVersion(req.protocol_version()));
  Checker checker;
  if (!req.checker().mode().empty()) {
    ASSIGN_OR_RETURN(checker.mode, ParseCheckMode(req.checker().mode()));
  }
  if (req.checker().abs_tol() != 0) checker.abs_tol = req.checker().abs_tol();
  if (req.checker().rel_tol() != 0) checker.rel_tol = req.checker().rel_tol();
  const Limits limits = LimitsFromProto(req.limits());
  absl::StatusOr<TestReport> report;
  if (!req.function_name().empty()) {
    if (req.language() != pb::SANDBOX_LANGUAGE_PYTHON) {
      return absl::InvalidArgumentError("function_name: function cases are Python only");
    }
    std::vector<FunctionCase> cases;
    for (const auto& c : req.function_cases()) cases.push_back({c.args_json(), c.expected_json()});
    report = RunFunctionTests(sandbox, req.program(), req.function_name(), cases, checker, limits);
  } else {
    ASSIGN_OR_RETURN(Language language, LanguageFromProto(req.language()));
    std::vector<IoCase> cases;
    for (const auto& c : req.io_cases()) cases.push_back({c.stdin(), c.expected_stdout()});
    report = RunTests(sandbox, language, req.program(), cases, checker, limits);
  }
  if (!report.ok()) return report.status();
  pb::SandboxRunTestsResponse p;
  p.set_passed(report->passed);
  p.set_total(report->total);
  p.set_compiled(report->compiled);
  p.set_sandbox_failure(report->sandbox_failure);
  p.set_compile_output(report->compile_output);
  for (const CaseResult& c : report->cases) {
    pb::SandboxCaseResult* out = p.add_cases();
    out->set_passed(c.passed);
    out->set_verdict(VerdictToProto(c.verdict));
    out->set_reason(c.reason);
    out->set_cpu_ms(c.cpu_ms);
    out->set_wall_ms(c.wall_ms);
  }
  return p;
}

class SandboxServer::Impl final : public pb::SandboxService::CallbackService {
 public:
  Impl(const Sandbox* sandbox, int max_concurrent)
      : sandbox_(sandbox), max_concurrent_(max_concurrent) {}

  grpc::ServerUnaryReactor* Run(grpc::CallbackServerContext* ctx, const pb::SandboxRunRequest* req,
                                pb::SandboxRunResponse* resp) override {
    return Dispatch(ctx, [this, req, resp] {
      auto r = HandleRun(*sandbox_, *req);
      if (r.ok()) *resp = std::move(r).value();
      return r.status();
    });
  }
  grpc::ServerUnaryReactor* RunTests(grpc::CallbackServerContext* ctx,
                                     const pb::SandboxRunTestsRequest* req,
                                     pb::SandboxRunTestsResponse* resp) override {
    return Dispatch(ctx, [this, req, resp] {
      auto r = HandleRunTests(*sandbox_, *req);
      if (r.ok()) *resp = std::move(r).value();
      return r.status();
    });
  }

  // Waits for calls in flight (their threads touch this object).
  void Drain() {
    std::unique_lock<std::mutex> lock(mu_);
    idle_.wait(lock, [&] { return in_flight_ == 0; });
  }

  std::unique_ptr<grpc::Server> server;
  int port = 0;

 private:
  template <typename Fn>
  grpc::ServerUnaryReactor* Dispatch(grpc::CallbackServerContext* ctx, Fn fn) {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (in_flight_ >= max_concurrent_) {
        reactor->Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                     absl::StrCat("sandbox server busy: ", max_concurrent_,
                                                  " calls running")));
        return reactor;
      }
      ++in_flight_;
    }
    std::thread([this, reactor, fn = std::move(fn)]() mutable {
      reactor->Finish(ToGrpc(fn()));
      std::lock_guard<std::mutex> lock(mu_);
      if (--in_flight_ == 0) idle_.notify_all();
    }).detach();
    return reactor;
  }

  const Sandbox* sandbox_;
  const int max_concurrent_;
  std::mutex mu_;
  std::condition_variable idle_;
  int in_flight_ = 0;
};

absl::StatusOr<std::unique_ptr<SandboxServer>> SandboxServer::Start(const Sandbox* sandbox,
                                                                    const std::string& address,
                                                                    int max_concurrent) {
  if (max_concurrent <= 0) return absl::InvalidArgumentError("max_concurrent must be > 0");
  auto impl = std::make_unique<Impl>(sandbox, max_concurrent);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &impl->port);
  builder.RegisterService(impl.get());
  builder.SetMaxReceiveMessageSize(256 << 20);
  builder.SetMaxSendMessageSize(256 << 20);
  impl->server = builder.BuildAndStart();
  if (impl->server == nullptr || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat("sandbox server: cannot listen on ", address));
  }
  return std::unique_ptr<SandboxServer>(new SandboxServer(std::move(impl)));
}

SandboxServer::SandboxServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SandboxServer::~SandboxServer() {
  impl_->server->Shutdown();
  impl_->Drain();
}
int SandboxServer::port() const { return impl_->port; }
void SandboxServer::Wait() { impl_->server->Wait(); }

}  // namespace retort::sandbox
