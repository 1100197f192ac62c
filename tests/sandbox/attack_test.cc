// The hostile-code suite: one test per attack. Each asserts the verdict, that
// the host is untouched where the attack aims at it, and that no process of
// the run survives (no host process left with one of this suite's uids).
//
// Network rule: nothing may be sent to a non-loopback address. The "public
// address" attack uses 192.0.2.1 (TEST-NET-1, RFC 5737) and connects only
// after the program has confirmed its namespace holds nothing but `lo`, so the
// kernel answers ENETUNREACH without emitting a packet.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "sandbox/sandbox.h"
#include "tests/sandbox/test_util.h"

namespace retort::sandbox {
namespace {

using testing::SmallLimits;
using testing::Survivors;

constexpr uint32_t kUidBase = 1800000000u;

class AttackTest : public ::testing::Test {
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

  RunResult Run(Language language, const std::string& program, Limits limits = SmallLimits()) {
    RunRequest r;
    r.language = language;
    r.program = program;
    r.limits = limits;
    auto result = sandbox_->Run(r);
    EXPECT_TRUE(result.ok()) << result.status();
    if (!result.ok()) return {};
    EXPECT_EQ(Survivors(kUidBase), 0) << "a process of the run survived";
    return *result;
  }
  RunResult Py(const std::string& p, Limits l = SmallLimits()) { return Run(Language::kPython, p, l); }
  RunResult Cpp(const std::string& p, Limits l = SmallLimits()) { return Run(Language::kCpp, p, l); }
  RunResult Sh(const std::string& p, Limits l = SmallLimits()) { return Run(Language::kSh, p, l); }

  static Sandbox* sandbox_;
};
Sandbox* AttackTest::sandbox_ = nullptr;

std::string Describe(const RunResult& r) {
  return RunResultToJson(r).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

TEST_F(AttackTest, ForkBomb) {
  RunResult r = Cpp("#include <unistd.h>\nint main(){ for(;;) fork(); }");
  EXPECT_EQ(r.verdict, Verdict::kTimeLimit) << Describe(r);
}

TEST_F(AttackTest, ShellForkBomb) {
  // The classic bomb backgrounds itself; the shell then sleeps (wall limit)
  // or, when the pids limit already denies it that fork, fails (exit 2).
  // Either way the pid namespace takes the bomb down with it.
  RunResult r = Sh("b() { b | b & }; b; sleep 100");
  EXPECT_TRUE(r.verdict == Verdict::kTimeLimit ||
              (r.verdict == Verdict::kRuntimeError &&
               r.stderr_data.find("Cannot fork") != std::string::npos))
      << Describe(r);
}

TEST_F(AttackTest, ThreadBomb) {
  RunResult r = Py(
      "import threading, time\n"
      "while True:\n"
      "    threading.Thread(target=time.sleep, args=(100,), daemon=True).start()\n");
  EXPECT_EQ(r.verdict, Verdict::kRuntimeError) << Describe(r);
  EXPECT_NE(r.stderr_data.find("can't start new thread"), std::string::npos) << r.stderr_data;
}

TEST_F(AttackTest, MemoryBomb) {
  RunResult r = Py("x = []\nwhile True:\n    x.append(bytearray(1 << 20))\n");
  EXPECT_EQ(r.verdict, Verdict::kMemoryLimit) << Describe(r);
  EXPECT_LE(r.peak_memory_kb, 64 * 1024 + 1024) << Describe(r);
}

TEST_F(AttackTest, MemoryBombInC) {
  RunResult r = Cpp(
      "#include <cstdlib>\n#include <cstring>\nint main(){ for(;;){ char* p=(char*)malloc(1<<20);"
      " if(!p) return 3; memset(p,1,1<<20);} }");
  EXPECT_EQ(r.verdict, Verdict::kMemoryLimit) << Describe(r);
}

TEST_F(AttackTest, CpuSpin) {
  // A generous wall limit so that the CPU limit stops it even when other
  // work shares this machine's cores.
  Limits limits = SmallLimits();
  limits.wall_ms = 6000;
  RunResult r = Py("while True:\n    pass\n", limits);
  EXPECT_EQ(r.verdict, Verdict::kTimeLimit) << Describe(r);
  EXPECT_GE(r.cpu_ms, 1000);
  EXPECT_NE(r.detail.find("cpu"), std::string::npos) << "the CPU limit should stop it: " << r.detail;
}

TEST_F(AttackTest, MultiThreadCpuSpin) {
  RunResult r = Cpp(
      "#include <thread>\n#include <vector>\nint main(){ std::vector<std::thread> t;"
      " for(int i=0;i<4;++i) t.emplace_back([]{ volatile unsigned long x=0; for(;;) ++x; });"
      " for(auto& th: t) th.join(); }");
  EXPECT_EQ(r.verdict, Verdict::kTimeLimit) << Describe(r);
  // On a loaded 2-core machine the wall limit may come first.
  EXPECT_TRUE(r.cpu_ms >= 1000 || r.detail.find("wall") != std::string::npos) << Describe(r);
}

TEST_F(AttackTest, SleepForever) {
  RunResult r = Py("import time\ntime.sleep(10**6)\n");
  EXPECT_EQ(r.verdict, Verdict::kTimeLimit) << Describe(r);
  EXPECT_NE(r.detail.find("wall"), std::string::npos) << r.detail;
  EXPECT_LT(r.wall_ms, 3000);
}

TEST_F(AttackTest, IgnoresSigterm) {
  RunResult r = Py(
      "import signal, time\n"
      "for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):\n"
      "    signal.signal(s, signal.SIG_IGN)\n"
      "time.sleep(10**6)\n");
  EXPECT_EQ(r.verdict, Verdict::kTimeLimit) << Describe(r);
}

TEST_F(AttackTest, OneGigabyteOfOutput) {
  RunResult r = Py(
      "import sys\nchunk = b'x' * (1 << 20)\n"
      "for _ in range(1024):\n    sys.stdout.buffer.write(chunk)\n");
  EXPECT_EQ(r.verdict, Verdict::kOutputLimit) << r.detail;
  EXPECT_TRUE(r.stdout_truncated);
  EXPECT_EQ(r.stdout_data.size(), 64u << 10);
  EXPECT_LT(r.wall_ms, 2000);
}

TEST_F(AttackTest, WritesOutsideWorkdir) {
  const std::string tag = absl::StrCat("retort-attack-", getpid());
  const std::string host_tmp = "/tmp/" + tag;  // the sandbox's /tmp is its own /work
  RunResult r = Py(absl::StrCat(
      "import os\n"
      "for p in ['/etc/", tag, "', '/usr/", tag, "', '/", tag, "', '/dev/", tag,
      "', '/proc/", tag, "', '/usr/bin/python3']:\n"
      "    try:\n"
      "        open(p, 'a').write('x')\n"
      "        print('WROTE', p)\n"
      "    except OSError as e:\n"
      "        print('DENIED', p, e.errno)\n"
      "open('/tmp/", tag, "', 'w').write('private')\n"
      "print('TMP', open('/work/", tag, "').read())\n"));
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  EXPECT_EQ(r.stdout_data.find("WROTE"), std::string::npos) << r.stdout_data;
  EXPECT_NE(r.stdout_data.find("TMP private"), std::string::npos) << r.stdout_data;
  for (const std::string& p : {"/etc/" + tag, "/usr/" + tag, "/" + tag, host_tmp}) {
    struct stat st{};
    EXPECT_NE(stat(p.c_str(), &st), 0) << p << " appeared on the host";
  }
}

TEST_F(AttackTest, ReadsShadowAndInitEnviron) {
  RunResult r = Py(
      "for p in ['/etc/shadow', '/proc/1/environ', '/proc/1/cmdline', '/proc/1/root/etc/shadow']:\n"
      "    try:\n"
      "        data = open(p, 'rb').read()\n"
      "        print('READ', p, len(data))\n"
      "    except OSError as e:\n"
      "        print('DENIED', p, e.errno)\n"
      "import os\nprint('ENV', sorted(os.environ))\n");
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  EXPECT_EQ(r.stdout_data.find("READ"), std::string::npos) << r.stdout_data;
  EXPECT_EQ(r.stdout_data.find("RETORT_SOURCE_DIR"), std::string::npos) << r.stdout_data;
}

TEST_F(AttackTest, ListsHostProcesses) {
  RunResult r = Py(
      "import os\n"
      "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
      "print(len(pids), max(pids), os.getpid())\n");
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  int count = 0, max_pid = 0, own = 0;
  ASSERT_EQ(std::sscanf(r.stdout_data.c_str(), "%d %d %d", &count, &max_pid, &own), 3);
  EXPECT_EQ(count, 1) << "only the program itself is visible: " << r.stdout_data;
  EXPECT_EQ(max_pid, own);
}

// A host listener on 127.0.0.1 the sandbox must not reach.
class HostListener {
 public:
  HostListener() {
    fd_ = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    listen(fd_, 4);
    socklen_t len = sizeof(a);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
  }
  ~HostListener() { close(fd_); }
  int port() const { return port_; }
  bool GotConnection() const { return accept(fd_, nullptr, nullptr) >= 0; }

 private:
  int fd_ = -1;
  int port_ = 0;
};

TEST_F(AttackTest, ConnectsToHostLoopback) {
  HostListener host;
  RunResult r = Py(absl::StrCat(
      "import socket\ns = socket.socket()\ns.settimeout(1)\n"
      "try:\n    s.connect(('127.0.0.1', ", host.port(), "))\n    print('CONNECTED')\n"
      "except OSError as e:\n    print('REFUSED', e.errno)\n"));
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  EXPECT_NE(r.stdout_data.find("REFUSED"), std::string::npos) << r.stdout_data;
  EXPECT_FALSE(host.GotConnection());
}

TEST_F(AttackTest, ConnectsToNonLocalAddress) {
  // The program checks its interfaces first and connects only when `lo` is
  // the only one (so no packet can leave); the test then requires both.
  RunResult r = Py(
      "import socket, errno\n"
      "names = sorted(n for _, n in socket.if_nameindex())\n"
      "print('IFACES', names)\n"
      "if names == ['lo']:\n"
      "    s = socket.socket()\n"
      "    s.settimeout(1)\n"
      "    try:\n"
      "        s.connect(('192.0.2.1', 80))\n"
      "        print('CONNECTED')\n"
      "    except OSError as e:\n"
      "        print('ERR', errno.errorcode.get(e.errno, e.errno))\n"
      "else:\n"
      "    print('SKIPPED')\n");
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  EXPECT_NE(r.stdout_data.find("IFACES ['lo']"), std::string::npos) << r.stdout_data;
  EXPECT_NE(r.stdout_data.find("ERR ENETUNREACH"), std::string::npos) << r.stdout_data;
}

TEST_F(AttackTest, ServerInsideIsInvisibleOutside) {
  // Port chosen by the test so the host can probe the same number afterwards.
  std::mt19937 rng(getpid());
  const int port = 20000 + static_cast<int>(rng() % 20000);
  RunResult r = Py(absl::StrCat(
      "import socket\nsrv = socket.socket()\nsrv.bind(('127.0.0.1', ", port, "))\nsrv.listen()\n"
      "c = socket.create_connection(('127.0.0.1', ", port, "))\n"
      "a, _ = srv.accept()\nc.sendall(b'ping')\nprint('SERVER', a.recv(4).decode())\n"));
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r) << " port " << port;
  EXPECT_NE(r.stdout_data.find("SERVER ping"), std::string::npos) << r.stdout_data;
  int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_NE(connect(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  close(s);
}

TEST_F(AttackTest, Ptrace) {
  RunResult r = Cpp(
      "#include <sys/ptrace.h>\n#include <cerrno>\n#include <cstdio>\n#include <unistd.h>\n"
      "int main(){ long a = ptrace(PTRACE_TRACEME, 0, 0, 0); int e1 = errno;"
      " long b = ptrace(PTRACE_ATTACH, getppid(), 0, 0); int e2 = errno;"
      " std::printf(\"%ld %d %ld %d\\n\", a, e1, b, e2); }");
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  EXPECT_EQ(r.stdout_data, absl::StrCat("-1 ", EPERM, " -1 ", EPERM, "\n"));
}

TEST_F(AttackTest, RaisesRlimits) {
  RunResult r = Py(
      "import resource\n"
      "for name in ['RLIMIT_CPU', 'RLIMIT_NOFILE', 'RLIMIT_NPROC', 'RLIMIT_FSIZE']:\n"
      "    res = getattr(resource, name)\n"
      "    soft, hard = resource.getrlimit(res)\n"
      "    try:\n"
      "        resource.setrlimit(res, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
      "        print('RAISED', name)\n"
      "    except (ValueError, OSError) as e:\n"
      "        print('DENIED', name)\n");
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  EXPECT_EQ(r.stdout_data.find("RAISED"), std::string::npos) << r.stdout_data;
}

TEST_F(AttackTest, KillMinusOne) {
  pid_t canary = fork();
  if (canary == 0) {
    pause();
    _exit(0);
  }
  RunResult r = Cpp(
      "#include <csignal>\n#include <cstdio>\nint main(){ int rc = kill(-1, SIGKILL);"
      " std::printf(\"ALIVE %d\\n\", rc); }");
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  EXPECT_EQ(kill(canary, 0), 0) << "a host process was killed";
  kill(canary, SIGKILL);
  waitpid(canary, nullptr, 0);
}

TEST_F(AttackTest, DoubleForkDaemon) {
  RunResult r = Py(
      "import os, time\n"
      "if os.fork() == 0:\n"
      "    os.setsid()\n"
      "    if os.fork() == 0:\n"
      "        time.sleep(1000)\n"
      "    os._exit(0)\n"
      "print('PARENT DONE')\n");
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  EXPECT_NE(r.stdout_data.find("PARENT DONE"), std::string::npos);
  // Run() already asserted that no process of this suite's uids survives.
}

TEST_F(AttackTest, SetuidBinaries) {
  RunResult r = Sh(
      "for b in /usr/bin/su /usr/bin/mount; do [ -u \"$b\" ] && echo \"SUID $b\"; done\n"
      "/usr/bin/mount -t tmpfs none /work 2>/dev/null && echo MOUNTED\n"
      "echo \"UID $(id -u) EUID $(id -u)\"\n"
      "/usr/bin/su root -c 'echo ROOTSHELL' </dev/null 2>/dev/null\n"
      "true\n");
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  EXPECT_NE(r.stdout_data.find("UID 1000 EUID 1000"), std::string::npos) << r.stdout_data;
  EXPECT_EQ(r.stdout_data.find("ROOTSHELL"), std::string::npos) << r.stdout_data;
  EXPECT_EQ(r.stdout_data.find("MOUNTED"), std::string::npos) << r.stdout_data;
}

TEST_F(AttackTest, MountUnshareBpfIoUring) {
  RunResult r = Cpp(R"CPP(
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <sched.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/sched.h>
int main() {
  struct { const char* name; long rc; } calls[] = {
    {"mount", mount("none", "/work", "tmpfs", 0, nullptr)},
    {"unshare", unshare(CLONE_NEWUSER)},
    {"unshare_ns", unshare(CLONE_NEWNS)},
    {"setns", syscall(SYS_setns, 0, 0)},
    {"clone_newuser", syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)},
    {"bpf", syscall(SYS_bpf, 0, nullptr, 0)},
    {"io_uring_setup", syscall(SYS_io_uring_setup, 8, nullptr)},
    {"perf_event_open", syscall(SYS_perf_event_open, nullptr, 0, -1, -1, 0)},
    {"keyctl", syscall(SYS_keyctl, 0, 0, 0, 0, 0)},
    {"userfaultfd", syscall(SYS_userfaultfd, 0)},
    {"init_module", syscall(SYS_init_module, nullptr, 0, "")},
  };
  for (auto& c : calls) std::printf("%s %ld %d\n", c.name, c.rc, c.rc == -1 ? errno : 0);
}
)CPP");
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  // errno is read after the whole table ran, so check the return codes and
  // that each call is denied by seccomp (EPERM) where it matters.
  for (const char* name : {"mount", "unshare", "unshare_ns", "setns", "clone_newuser", "bpf",
                           "io_uring_setup", "perf_event_open", "keyctl", "userfaultfd",
                           "init_module"}) {
    EXPECT_NE(r.stdout_data.find(absl::StrCat(name, " -1 ")), std::string::npos)
        << name << " succeeded: " << r.stdout_data;
  }
}

TEST_F(AttackTest, OtherArchitectureSyscall) {
  // int 0x80 enters the i386 table, which the filter kills on sight.
  RunResult r = Cpp(
      "int main(){ long ret; asm volatile(\"int $0x80\" : \"=a\"(ret) : \"a\"(20) : \"memory\");"
      " return 0; }");
  EXPECT_EQ(r.verdict, Verdict::kKilledBySignal) << Describe(r);
  EXPECT_EQ(r.term_signal, SIGSYS);
}

TEST_F(AttackTest, SymlinkAndHardlinkEscapes) {
  RunResult r = Py(
      "import os\n"
      "os.symlink('/proc/1/root/etc/shadow', '/work/s1')\n"
      "os.symlink('/etc/hostname', '/work/s2')\n"
      "for p in ['/work/s1', '/work/s2']:\n"
      "    try:\n"
      "        print('READ', p, len(open(p).read()))\n"
      "    except OSError as e:\n"
      "        print('DENIED', p, e.errno)\n"
      "for src in ['/etc/passwd', '/usr/bin/python3', '/proc/self/exe']:\n"
      "    try:\n"
      "        os.link(src, '/work/h' + str(abs(hash(src)) % 1000))\n"
      "        print('LINKED', src)\n"
      "    except OSError as e:\n"
      "        print('NOLINK', src, e.errno)\n");
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  EXPECT_EQ(r.stdout_data.find("LINKED"), std::string::npos) << r.stdout_data;
  EXPECT_EQ(r.stdout_data.find("READ /work/s1"), std::string::npos) << r.stdout_data;
  // The compile step hands the binary back; a symlink planted there instead of
  // a file must not make the host read a file of its own choosing.
  RunResult c = Cpp("#error no binary\n");
  EXPECT_EQ(c.verdict, Verdict::kCompileError);
}

TEST_F(AttackTest, InheritedDescriptorProbing) {
  // A descriptor the host opened without O_CLOEXEC must not reach the program.
  int leak = open("/etc/hostname", O_RDONLY);
  ASSERT_GE(leak, 0);
  RunResult r = Cpp(
      "#include <fcntl.h>\n#include <cstdio>\nint main(){ int n=0; for(int fd=3; fd<65536; ++fd)"
      " if(fcntl(fd, F_GETFD) != -1){ ++n; std::printf(\"OPEN %d\\n\", fd);} std::printf(\"N %d\\n\", n); }");
  close(leak);
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  EXPECT_EQ(r.stdout_data, "N 0\n");
}

TEST_F(AttackTest, FillsTmpfs) {
  RunResult r = Py(
      "import errno\nn = 0\n"
      "try:\n"
      "    with open('/work/big', 'wb') as f:\n"
      "        while True:\n"
      "            f.write(b'x' * (1 << 20)); f.flush(); n += 1\n"
      "except OSError as e:\n"
      "    print('STOP', errno.errorcode[e.errno], n)\n");
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  // 8 MB tmpfs, 4 MB file size limit: whichever comes first stops it.
  EXPECT_TRUE(r.stdout_data.find("STOP ENOSPC") == 0 || r.stdout_data.find("STOP EFBIG") == 0)
      << r.stdout_data;
}

TEST_F(AttackTest, MillionFiles) {
  RunResult r = Py(
      "import os\nn = 0\n"
      "try:\n"
      "    for i in range(10**6):\n"
      "        open('/work/f%d' % i, 'w').close(); n += 1\n"
      "except OSError as e:\n"
      "    print('STOP', e.errno, n)\n");
  EXPECT_EQ(r.verdict, Verdict::kOk) << Describe(r);
  int err = 0, n = 0;
  ASSERT_EQ(std::sscanf(r.stdout_data.c_str(), "STOP %d %d", &err, &n), 2) << r.stdout_data;
  EXPECT_EQ(err, ENOSPC);
  EXPECT_LE(n, 1000);
}

TEST_F(AttackTest, CompileIncludesDevRandom) {
  RunResult r = Cpp("#include \"/dev/random\"\nint main(){}\n");
  EXPECT_EQ(r.verdict, Verdict::kCompileError) << Describe(r);
  EXPECT_LT(r.compile_ms, 9000);
}

TEST_F(AttackTest, CompileTemplateBomb) {
  RunResult r = Cpp(
      "template<class... T> struct L {};\n"
      "template<int N, class... T> struct B { using t = typename B<N - 1, T..., T...>::t; };\n"
      "template<class... T> struct B<0, T...> { using t = L<T...>; };\n"
      "int main(){ typename B<40, int>::t x; (void)x; }\n");
  EXPECT_EQ(r.verdict, Verdict::kCompileError) << Describe(r);
  EXPECT_LT(r.compile_ms, 9000);
}

// ---- test-harness hacks (the code reward path) ------------------------------

class HarnessHackTest : public AttackTest {
 protected:
  TestReport Functions(const std::string& program) {
    std::vector<FunctionCase> cases = {{"[1, 2]", "3"}, {"[10, -4]", "6"}, {"[0, 0]", "0"}};
    auto report = RunFunctionTests(*sandbox_, program, "add", cases, Checker{}, SmallLimits());
    EXPECT_TRUE(report.ok()) << report.status();
    EXPECT_EQ(Survivors(kUidBase), 0);
    return report.ok() ? *report : TestReport{};
  }
  TestReport Io(const std::string& program) {
    std::vector<IoCase> cases = {{"1 2\n", "3\n"}, {"10 -4\n", "6\n"}};
    auto report = RunTests(*sandbox_, Language::kPython, program, cases, Checker{}, SmallLimits());
    EXPECT_TRUE(report.ok()) << report.status();
    return report.ok() ? *report : TestReport{};
  }
};

TEST_F(HarnessHackTest, HonestSolutionPasses) {
  EXPECT_EQ(Functions("def add(a, b):\n    return a + b\n").passed, 3);
  EXPECT_EQ(Io("a, b = map(int, input().split())\nprint(a + b)\n").passed, 2);
}

TEST_F(HarnessHackTest, SysExitBeforeAsserts) {
  EXPECT_EQ(Functions("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b\n").passed, 0);
  EXPECT_EQ(Functions("import os\ndef add(a, b):\n    os._exit(0)\n").passed, 0);
  EXPECT_EQ(Functions("import sys\ndef add(a, b):\n    sys.exit(0)\n").passed, 0);
  EXPECT_EQ(Io("import sys\nsys.exit(0)\n").passed, 0);
}

TEST_F(HarnessHackTest, AlwaysEqualObject) {
  EXPECT_EQ(Functions("class Eq:\n    def __eq__(self, other): return True\n"
                      "    def __ne__(self, other): return False\n"
                      "def add(a, b):\n    return Eq()\n")
                .passed,
            0);
  EXPECT_EQ(Functions("class I(int):\n    def __eq__(self, other): return True\n"
                      "def add(a, b):\n    return I(999)\n")
                .passed,
            0);
}

TEST_F(HarnessHackTest, PrintsPass) {
  EXPECT_EQ(Functions("print('PASS'); print('All tests passed')\n"
                      "def add(a, b):\n    print('PASS')\n    return None\n")
                .passed,
            0);
  EXPECT_EQ(Io("print('PASS')\n").passed, 0);
}

TEST_F(HarnessHackTest, ForgesRecordsOnTheChannel) {
  // Writes plausible records to fd 3 without knowing the nonce, then records
  // with the real nonce (found by reading the cases file) but guessed values:
  // neither can pass without the expected values, which never enter the sandbox.
  TestReport r = Functions(
      "import os, json\n"
      "spec = json.load(open('/work/cases.json'))\n"
      "assert 'expected' not in json.dumps(spec)\n"
      "for i in range(3):\n"
      "    os.write(3, (json.dumps({'case': i, 'value': '0'}) + '\\n').encode())\n"
      "    os.write(3, (json.dumps({'nonce': spec['nonce'], 'case': i, 'value': '42'}) + '\\n').encode())\n"
      "def add(a, b):\n    return a + b\n");
  EXPECT_EQ(r.passed, 0) << TestReportToJson(r).dump();
}

}  // namespace
}  // namespace retort::sandbox
