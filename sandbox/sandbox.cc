// The sandbox executor: namespaces, mounts, seccomp, limits, and the parent's
// supervision loop. See sandbox.h for the contract.
//
// Note [Sandbox layers]
// A run is three processes deep:
//   host (a Run caller's thread)
//    └─ init: clone(NEWUSER|NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS|NEWCGROUP), pid 1
//        └─ program: the interpreter / compiler / binary, via execve
// The host writes init's uid/gid maps (sandbox uid 0 -> host uid H, 1000 ->
// H+1, both unprivileged and fresh per run, so RLIMIT_NPROC is per run too),
// puts init into the run's cgroup, and lets it go. init builds a new root on
// a small tmpfs (read-only binds of /usr and the loader files, a fresh /proc
// with hidepid=2, a few /dev nodes, a size- and inode-limited tmpfs at /work,
// /tmp -> /work), pivots into it, raises `lo`, drops supplementary groups and
// marks itself non-dumpable. The program then drops to uid/gid 1000 (no
// capabilities left, even in the user namespace), sets rlimits, sets
// PR_SET_NO_NEW_PRIVS, loads the seccomp filter, keeps only fds 0/1/2 (and 3
// for the test harness) and execs. When the program exits, init reports its
// wait status and exits; the kernel then kills everything left in the pid
// namespace. The host kills init on a limit (SIGKILL; nothing can ignore it).
//
// Note [Fork safety]
// The host is multi-threaded (pools, gRPC), so between clone and execve the
// children call only raw syscalls on memory prepared before the clone: no
// malloc, no stdio, no locks (another thread may have held them at clone time).
// init forks the program with a raw clone for the same reason.
//
// Note [Seccomp denylist]
// The filter allows by default and denies (EPERM) a list of syscalls, and
// kills on any other architecture (i386 int 0x80, x32). An allowlist would be
// tighter, but CPython, g++ (cc1plus, as, collect2, ld) and arbitrary C++
// binaries use a broad set that changes with glibc versions; a missing entry
// shows up as a wrong reward, not an error. The program already runs with no
// capabilities in its own namespaces, so what matters is the kernel surface an
// unprivileged process could still reach: new namespaces (unshare, setns,
// clone with CLONE_NEW*, clone3 whose flags seccomp cannot read), ptrace and
// process_vm_*, bpf, perf_event_open, keyrings, userfaultfd, io_uring, module
// and kexec calls, mount and the new mount API, handles, and the rest below.
#include "sandbox/sandbox.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <grp.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/base/logging.h"
#include "model/base/status_macros.h"
#include "sandbox/internal/access.h"
#include "sandbox/internal/cgroup.h"

namespace retort::sandbox {

const char* LanguageName(Language language) {
  switch (language) {
    case Language::kPython:
      return "python";
    case Language::kCpp:
      return "cpp";
    case Language::kSh:
      return "sh";
  }
  return "?";
}

absl::StatusOr<Language> ParseLanguage(absl::string_view name) {
  if (name == "python" || name == "py") return Language::kPython;
  if (name == "cpp" || name == "c++") return Language::kCpp;
  if (name == "sh") return Language::kSh;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown language '", name, "' (expected python, cpp or sh)"));
}

const char* VerdictName(Verdict verdict) {
  switch (verdict) {
    case Verdict::kOk:
      return "ok";
    case Verdict::kRuntimeError:
      return "runtime_error";
    case Verdict::kTimeLimit:
      return "time_limit";
    case Verdict::kMemoryLimit:
      return "memory_limit";
    case Verdict::kOutputLimit:
      return "output_limit";
    case Verdict::kKilledBySignal:
      return "killed_by_signal";
    case Verdict::kCompileError:
      return "compile_error";
    case Verdict::kSandboxFailure:
      return "sandbox_failure";
  }
  return "?";
}

Limits DefaultCompileLimits() {
  Limits l;
  l.cpu_ms = 10000;
  l.wall_ms = 20000;
  l.memory_mb = 1024;
  l.max_pids = 64;
  l.file_size_mb = 64;
  l.open_files = 256;
  l.output_bytes = 64 << 10;
  l.tmpfs_mb = 256;
  l.tmpfs_inodes = 4096;
  return l;
}

nlohmann::json RunResultToJson(const RunResult& r) {
  nlohmann::json j;
  j["verdict"] = VerdictName(r.verdict);
  j["exit_code"] = r.exit_code;
  j["signal"] = r.term_signal;
  j["cpu_ms"] = r.cpu_ms;
  j["wall_ms"] = r.wall_ms;
  j["peak_memory_kb"] = r.peak_memory_kb;
  // Program output is arbitrary bytes; invalid UTF-8 becomes U+FFFD.
  j["stdout"] = r.stdout_data;
  j["stderr"] = r.stderr_data;
  j["stdout_truncated"] = r.stdout_truncated;
  j["stderr_truncated"] = r.stderr_truncated;
  j["detail"] = r.detail;
  j["compile_output"] = r.compile_output;
  j["compile_ms"] = r.compile_ms;
  j["enforcement"] = r.enforcement;
  return j;
}

namespace {

using Clock = std::chrono::steady_clock;

constexpr uid_t kSandboxUid = 1000;  // the program's uid/gid inside the namespace
constexpr int kHarnessFd = 3;        // RunTests' private results descriptor
constexpr int64_t kMaxCollectBytes = 256 << 20;
constexpr int64_t kMaxHarnessBytes = 64 << 20;

// Setup steps of init/program, reported on failure (index into kStepNames).
enum Step : int32_t {
  kStepSync,
  kStepHostname,
  kStepMountPrivate,
  kStepRootTmpfs,
  kStepMkdir,
  kStepBind,
  kStepBindReadOnly,
  kStepSymlink,
  kStepProc,
  kStepWorkTmpfs,
  kStepWriteFile,
  kStepPivot,
  kStepRemountRoot,
  kStepLoopback,
  kStepGroups,
  kStepFork,
  kStepUid,
  kStepRlimit,
  kStepNoNewPrivs,
  kStepSeccomp,
  kStepFds,
  kStepExec,
  kStepCollect,
};
constexpr const char* kStepNames[] = {
    "waiting for the host", "sethostname",   "making mounts private", "root tmpfs",
    "mkdir",                "bind mount",    "read-only remount",     "symlink",
    "mounting /proc",       "/work tmpfs",   "writing a file",        "pivot_root",
    "read-only root",       "raising lo",    "setgroups",             "forking the program",
    "setuid/setgid",        "setrlimit",     "PR_SET_NO_NEW_PRIVS",   "loading seccomp",
    "arranging fds",        "execve",        "collecting a file",
};

// What init sends the host once, just before it exits (< PIPE_BUF: atomic).
struct InitReport {
  int32_t kind;  // 0: the program ended (wait_status valid); 1: setup failed at `step`
  int32_t wait_status;
  int32_t step;
  int32_t err;
  struct rusage usage;  // the program's, from wait4
};

// A read-only bind of a host path, a symlink mirroring one, or a created dir.
struct MountEntry {
  std::string host_path;  // "/usr"
  std::string new_path;   // "/tmp/usr" (the new root is assembled at /tmp)
  bool is_dir = true;
  bool symlink = false;
  std::string link_target;
};

// Everything init and the program need, built before clone (Note [Fork safety]).
struct ChildPlan {
  int sync_fd = -1;    // host -> init: one byte once maps and cgroup are set
  int report_fd = -1;  // init -> host: InitReport
  int stdin_fd = -1;
  int stdout_fd = -1;
  int stderr_fd = -1;
  int collect_fd = -1;  // init -> host: bytes of collect_name after a clean exit
  int harness_fd = -1;  // program -> host: test harness records (dup'ed to fd 3)
  const std::vector<MountEntry>* mounts = nullptr;
  std::string work_options;  // tmpfs options for /work
  std::string passwd;
  std::string group;
  const std::vector<File>* files = nullptr;
  const char* collect_name = nullptr;
  const char* exec_path = nullptr;
  std::vector<char*> argv;
  std::vector<char*> envp;
  struct rlimit cpu, fsize, nofile, nproc, as, core;
  bool limit_as = false;
  const struct sock_fprog* seccomp = nullptr;
};

// ---- child side: raw syscalls only -----------------------------------------

[[noreturn]] void InitFail(const ChildPlan& plan, Step step) {
  InitReport r{};
  r.kind = 1;
  r.step = step;
  r.err = errno;
  (void)!write(plan.report_fd, &r, sizeof(r));
  _exit(1);
}

bool WriteAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    ssize_t n = write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

bool WriteNewFile(const char* path, const char* data, size_t size, mode_t mode) {
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
  if (fd < 0) return false;
  bool ok = WriteAll(fd, data, size) && fchmod(fd, mode) == 0;
  close(fd);
  return ok;
}

// Closes every descriptor except those in `keep` (ascending, -1 ignored).
void CloseAllExcept(const int* keep, int n) {
  int sorted[8];
  int m = 0;
  for (int i = 0; i < n; ++i) {
    if (keep[i] >= 0) sorted[m++] = keep[i];
  }
  for (int i = 1; i < m; ++i) {  // insertion sort: at most 8 entries
    for (int j = i; j > 0 && sorted[j - 1] > sorted[j]; --j) std::swap(sorted[j - 1], sorted[j]);
  }
  unsigned lo = 0;
  for (int i = 0; i < m; ++i) {
    if (static_cast<unsigned>(sorted[i]) > lo) syscall(SYS_close_range, lo, sorted[i] - 1, 0);
    lo = sorted[i] + 1;
  }
  syscall(SYS_close_range, lo, ~0u, 0);
}

bool Mkdir(const char* path) { return mkdir(path, 0755) == 0 || errno == EEXIST; }

bool BindReadOnly(const MountEntry& e) {
  if (mount(e.host_path.c_str(), e.new_path.c_str(), nullptr, MS_BIND | MS_REC, nullptr) != 0) {
    return false;
  }
  struct mount_attr attr{};
  attr.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
  if (e.host_path.rfind("/dev/", 0) == 0) attr.attr_set = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID;
  return syscall(SYS_mount_setattr, AT_FDCWD, e.new_path.c_str(), AT_RECURSIVE, &attr,
                 sizeof(attr)) == 0;
}

[[noreturn]] void ProgramMain(const ChildPlan& plan, int exec_err_fd) {
  // Descriptors: 0/1/2 from the plan, 3 the harness channel (if any), and
  // exec_err_fd (close-on-exec) for reporting a failed execve to init.
  if (dup2(plan.stdin_fd, 0) < 0 || dup2(plan.stdout_fd, 1) < 0 || dup2(plan.stderr_fd, 2) < 0) {
    _exit(125);
  }
  int err_fd = fcntl(exec_err_fd, F_DUPFD_CLOEXEC, 10);
  if (err_fd < 0) _exit(125);
  if (plan.harness_fd >= 0 && dup2(plan.harness_fd, kHarnessFd) < 0) _exit(125);
  const int keep[] = {0, 1, 2, plan.harness_fd >= 0 ? kHarnessFd : -1, err_fd};
  CloseAllExcept(keep, 5);
  auto fail = [&](Step step) {
    int32_t msg[2] = {step, errno};
    (void)!write(err_fd, msg, sizeof(msg));
    _exit(126);
  };
  if (syscall(SYS_setresgid, kSandboxUid, kSandboxUid, kSandboxUid) != 0 ||
      syscall(SYS_setresuid, kSandboxUid, kSandboxUid, kSandboxUid) != 0) {
    fail(kStepUid);
  }
  if (setrlimit(RLIMIT_CPU, &plan.cpu) != 0 || setrlimit(RLIMIT_FSIZE, &plan.fsize) != 0 ||
      setrlimit(RLIMIT_NOFILE, &plan.nofile) != 0 || setrlimit(RLIMIT_NPROC, &plan.nproc) != 0 ||
      setrlimit(RLIMIT_CORE, &plan.core) != 0 ||
      (plan.limit_as && setrlimit(RLIMIT_AS, &plan.as) != 0)) {
    fail(kStepRlimit);
  }
  if (chdir("/work") != 0) fail(kStepFds);
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) fail(kStepNoNewPrivs);
  if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, plan.seccomp) != 0) fail(kStepSeccomp);
  execve(plan.exec_path, plan.argv.data(), plan.envp.data());
  fail(kStepExec);
  _exit(127);
}

[[noreturn]] void InitMain(const ChildPlan& plan) {
  prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
  {
    const int keep[] = {plan.sync_fd,   plan.report_fd,  plan.stdin_fd,  plan.stdout_fd,
                        plan.stderr_fd, plan.collect_fd, plan.harness_fd};
    CloseAllExcept(keep, 7);
  }
  char go = 0;
  if (read(plan.sync_fd, &go, 1) != 1) _exit(1);  // the host gave up
  close(plan.sync_fd);
  // Become the namespace's root (host uid H): until now init carried the
  // host's ids, which are unmapped here.
  // Raw syscalls: glibc's set*id would signal the parent's other threads,
  // which do not exist here, and wait for them forever (Note [Fork safety]).
  if (syscall(SYS_setresgid, 0, 0, 0) != 0 || syscall(SYS_setresuid, 0, 0, 0) != 0) {
    InitFail(plan, kStepUid);
  }
  if (syscall(SYS_setgroups, 0, nullptr) != 0) InitFail(plan, kStepGroups);

  if (sethostname("sandbox", 7) != 0) InitFail(plan, kStepHostname);
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) {
    InitFail(plan, kStepMountPrivate);
  }
  if (mount("retort-root", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
            "size=1m,nr_inodes=512,mode=0755") != 0) {
    InitFail(plan, kStepRootTmpfs);
  }
  for (const char* dir : {"/tmp/etc", "/tmp/dev", "/tmp/proc", "/tmp/work"}) {
    if (!Mkdir(dir)) InitFail(plan, kStepMkdir);
  }
  for (const MountEntry& e : *plan.mounts) {
    if (e.symlink) {
      if (symlink(e.link_target.c_str(), e.new_path.c_str()) != 0) InitFail(plan, kStepSymlink);
      continue;
    }
    if (e.is_dir) {
      if (!Mkdir(e.new_path.c_str())) InitFail(plan, kStepMkdir);
    } else if (!WriteNewFile(e.new_path.c_str(), "", 0, 0644)) {
      InitFail(plan, kStepMkdir);
    }
    if (!BindReadOnly(e)) InitFail(plan, kStepBindReadOnly);
  }
  for (const char* link : {"/tmp/dev/fd", "/tmp/dev/stdin", "/tmp/dev/stdout", "/tmp/dev/stderr"}) {
    const char* target = link[9] == 'f'   ? "/proc/self/fd"
                         : link[12] == 'i' ? "/proc/self/fd/0"
                         : link[15] == 'o' ? "/proc/self/fd/1"
                                           : "/proc/self/fd/2";
    if (symlink(target, link) != 0) InitFail(plan, kStepSymlink);
  }
  if (symlink("work", "/tmp/tmp") != 0) InitFail(plan, kStepSymlink);
  if (!WriteNewFile("/tmp/etc/passwd", plan.passwd.data(), plan.passwd.size(), 0644) ||
      !WriteNewFile("/tmp/etc/group", plan.group.data(), plan.group.size(), 0644)) {
    InitFail(plan, kStepWriteFile);
  }
  // hidepid=2: the program (uid 1000) cannot see init (uid 0), only itself.
  if (mount("proc", "/tmp/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2") != 0) {
    InitFail(plan, kStepProc);
  }
  if (mount("retort-work", "/tmp/work", "tmpfs", MS_NOSUID | MS_NODEV,
            plan.work_options.c_str()) != 0) {
    InitFail(plan, kStepWorkTmpfs);
  }
  if (chdir("/tmp") != 0 || syscall(SYS_pivot_root, ".", ".") != 0 ||
      umount2(".", MNT_DETACH) != 0 || chdir("/") != 0) {
    InitFail(plan, kStepPivot);
  }
  // Files for the program: owned by sandbox root, read-only to the program.
  for (const File& f : *plan.files) {
    char path[512] = "/work/";
    if (f.name.size() > sizeof(path) - 7) InitFail(plan, kStepWriteFile);
    memcpy(path + 6, f.name.c_str(), f.name.size() + 1);
    if (!WriteNewFile(path, f.content.data(), f.content.size(), f.executable ? 0755 : 0644)) {
      InitFail(plan, kStepWriteFile);
    }
  }
  if (chown("/work", kSandboxUid, kSandboxUid) != 0) InitFail(plan, kStepWriteFile);
  if (mount(nullptr, "/", nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV,
            nullptr) != 0) {
    InitFail(plan, kStepRemountRoot);
  }
  {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr{};
    memcpy(ifr.ifr_name, "lo", 3);
    if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) != 0) InitFail(plan, kStepLoopback);
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) != 0) InitFail(plan, kStepLoopback);
    close(s);
  }
  prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

  int exec_err[2];
  if (pipe2(exec_err, O_CLOEXEC) != 0) InitFail(plan, kStepFork);
  long pid = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
  if (pid < 0) InitFail(plan, kStepFork);
  if (pid == 0) {
    close(exec_err[0]);
    ProgramMain(plan, exec_err[1]);
  }
  close(exec_err[1]);
  close(plan.stdin_fd);
  close(plan.stdout_fd);
  close(plan.stderr_fd);
  if (plan.harness_fd >= 0) close(plan.harness_fd);
  int32_t exec_msg[2];
  ssize_t got;
  do {
    got = read(exec_err[0], exec_msg, sizeof(exec_msg));
  } while (got < 0 && errno == EINTR);
  if (got == sizeof(exec_msg)) {
    errno = exec_msg[1];
    InitFail(plan, static_cast<Step>(exec_msg[0]));
  }
  close(exec_err[0]);

  // Reap everything (orphans are reparented to us) until the program ends.
  InitReport report{};
  for (;;) {
    int status = 0;
    struct rusage usage{};
    pid_t done = wait4(-1, &status, __WALL, &usage);
    if (done < 0) {
      if (errno == EINTR) continue;
      InitFail(plan, kStepFork);
    }
    if (done == pid) {
      report.kind = 0;
      report.wait_status = status;
      report.usage = usage;
      break;
    }
  }
  if (plan.collect_fd >= 0 && plan.collect_name != nullptr && WIFEXITED(report.wait_status) &&
      WEXITSTATUS(report.wait_status) == 0) {
    int fd = open(plan.collect_name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    struct stat st{};
    if (fd >= 0 && fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
      char buf[65536];
      ssize_t n;
      while ((n = read(fd, buf, sizeof(buf))) > 0) {
        if (!WriteAll(plan.collect_fd, buf, static_cast<size_t>(n))) break;
      }
    }
    if (fd >= 0) close(fd);
    close(plan.collect_fd);
  }
  (void)!write(plan.report_fd, &report, sizeof(report));
  _exit(0);  // pid 1 exits: the kernel kills everything left in the namespace
}

// ---- host side ---------------------------------------------------------------

struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(Fd&& o) noexcept : fd(o.fd) { o.fd = -1; }
  Fd& operator=(Fd&& o) noexcept {
    reset();
    fd = o.fd;
    o.fd = -1;
    return *this;
  }
  ~Fd() { reset(); }
  void reset() {
    if (fd >= 0) close(fd);
    fd = -1;
  }
};

struct Pipe {
  Fd read_end, write_end;
};

absl::StatusOr<Pipe> MakePipe() {
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) return absl::InternalError(absl::StrCat("pipe2: ", strerror(errno)));
  Pipe pipe;
  pipe.read_end = Fd(p[0]);
  pipe.write_end = Fd(p[1]);
  return pipe;
}

absl::StatusOr<Fd> SealedMemfd(const std::string& data) {
  Fd fd(static_cast<int>(memfd_create("retort-stdin", MFD_CLOEXEC | MFD_ALLOW_SEALING)));
  if (fd.fd < 0) return absl::InternalError(absl::StrCat("memfd_create: ", strerror(errno)));
  if (!WriteAll(fd.fd, data.data(), data.size()) || lseek(fd.fd, 0, SEEK_SET) != 0 ||
      fcntl(fd.fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
    return absl::InternalError(absl::StrCat("writing stdin memfd: ", strerror(errno)));
  }
  return fd;
}

absl::Status WriteProcFile(pid_t pid, const char* name, const std::string& value) {
  const std::string path = absl::StrCat("/proc/", pid, "/", name);
  int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return absl::InternalError(absl::StrCat("open ", path, ": ", strerror(errno)));
  ssize_t n = write(fd, value.data(), value.size());
  int err = errno;
  close(fd);
  if (n != static_cast<ssize_t>(value.size())) {
    return absl::InternalError(absl::StrCat("write ", path, ": ", strerror(err)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<sock_filter>> BuildSeccompFilter() {
  scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
  if (ctx == nullptr) return absl::InternalError("seccomp_init failed");
  struct Releaser {
    scmp_filter_ctx c;
    ~Releaser() { seccomp_release(c); }
  } releaser{ctx};
  // Other architectures (i386 via int 0x80, x32) kill the process.
  if (seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_KILL_PROCESS) != 0) {
    return absl::InternalError("seccomp_attr_set(BADARCH)");
  }
  const uint32_t deny = SCMP_ACT_ERRNO(EPERM);
  static const char* const kDenied[] = {
      "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
      "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
      "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns", "bpf",
      "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd", "io_uring_setup",
      "io_uring_enter", "io_uring_register", "init_module", "finit_module", "delete_module",
      "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct", "quotactl",
      "quotactl_fd", "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "syslog",
      "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
      "setdomainname", "iopl", "ioperm", "vhangup", "uselib", "nfsservctl", "fanotify_init",
      "personality", "landlock_create_ruleset", "memfd_secret",
  };
  for (const char* name : kDenied) {
    int nr = seccomp_syscall_resolve_name(name);
    if (nr == __NR_SCMP_ERROR) continue;  // not on this kernel's table
    if (seccomp_rule_add(ctx, deny, nr, 0) != 0) {
      return absl::InternalError(absl::StrCat("seccomp_rule_add(", name, ")"));
    }
  }
  // clone3 passes its flags in memory seccomp cannot read: ENOSYS makes glibc
  // fall back to clone, whose flags we can check.
  if (seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0) != 0) {
    return absl::InternalError("seccomp_rule_add(clone3)");
  }
  for (uint64_t flag : std::initializer_list<uint64_t>{
           CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWIPC, CLONE_NEWUTS,
           CLONE_NEWCGROUP, static_cast<uint64_t>(CLONE_NEWTIME)}) {
    if (seccomp_rule_add(ctx, deny, SCMP_SYS(clone), 1, SCMP_A0(SCMP_CMP_MASKED_EQ, flag, flag)) !=
        0) {
      return absl::InternalError("seccomp_rule_add(clone)");
    }
  }
  // TIOCSTI/TIOCLINUX would push input into a terminal the host owns.
  for (uint64_t req : {static_cast<uint64_t>(TIOCSTI), static_cast<uint64_t>(TIOCLINUX)}) {
    if (seccomp_rule_add(ctx, deny, SCMP_SYS(ioctl), 1, SCMP_A1(SCMP_CMP_MASKED_EQ, 0xffffffffu, req)) != 0) {
      return absl::InternalError("seccomp_rule_add(ioctl)");
    }
  }
  Fd mem(static_cast<int>(memfd_create("retort-seccomp", MFD_CLOEXEC)));
  if (mem.fd < 0 || seccomp_export_bpf(ctx, mem.fd) != 0) {
    return absl::InternalError("seccomp_export_bpf failed");
  }
  off_t size = lseek(mem.fd, 0, SEEK_END);
  if (size <= 0 || size % sizeof(sock_filter) != 0) return absl::InternalError("bad BPF size");
  std::vector<sock_filter> program(size / sizeof(sock_filter));
  if (pread(mem.fd, program.data(), size, 0) != size) return absl::InternalError("reading BPF");
  return program;
}

absl::Status ValidateLimits(const Limits& l, absl::string_view what) {
  for (auto [v, name] : {std::pair{l.cpu_ms, "cpu_ms"}, {l.wall_ms, "wall_ms"},
                         {l.memory_mb, "memory_mb"}, {l.max_pids, "max_pids"},
                         {l.file_size_mb, "file_size_mb"}, {l.open_files, "open_files"},
                         {l.output_bytes, "output_bytes"}, {l.tmpfs_mb, "tmpfs_mb"},
                         {l.tmpfs_inodes, "tmpfs_inodes"}}) {
    if (v <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(what, ".", name, " must be > 0, got ", v));
    }
  }
  return absl::OkStatus();
}

bool ValidFileName(const std::string& name) {
  return !name.empty() && name.size() < 200 && name != "." && name != ".." &&
         name.find('/') == std::string::npos && name.find('\0') == std::string::npos;
}

}  // namespace

struct Sandbox::Impl {
  internal::CgroupLayout cgroups;
  std::vector<sock_filter> filter;
  struct sock_fprog fprog{};
  std::vector<MountEntry> mounts;
  mutable std::atomic<uint64_t> next_run{0};

  // One stage (compile or run) in a fresh sandbox.
  struct Stage {
    std::string exec_path;
    std::vector<std::string> argv;
    const std::vector<File>* files = nullptr;
    const std::string* stdin_data = nullptr;
    Limits limits;
    const char* collect = nullptr;  // path inside the sandbox to send back on exit 0
    std::string* collected = nullptr;
    std::string* harness = nullptr;  // non-null: fd 3 is a results channel
  };
  RunResult RunStage(const SandboxOptions& options, const Stage& stage) const;
};

Sandbox::Sandbox(SandboxOptions options, std::unique_ptr<Impl> impl, std::string capabilities)
    : options_(std::move(options)), impl_(std::move(impl)), capabilities_(std::move(capabilities)) {}
Sandbox::~Sandbox() = default;

absl::StatusOr<std::unique_ptr<Sandbox>> Sandbox::Create(SandboxOptions options) {
  RETURN_IF_ERROR(ValidateLimits(options.compile_limits, "compile_limits"));
  auto impl = std::make_unique<Impl>();
  // User namespaces: without them there is no sandbox at all.
  {
    pid_t pid = static_cast<pid_t>(syscall(SYS_clone, CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET |
                                                          CLONE_NEWNS | SIGCHLD,
                                           0, 0, 0, 0));
    if (pid == 0) _exit(0);
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sandbox: user/pid/net/mount namespaces are not available (clone: ", strerror(errno),
          "); untrusted code cannot run on this machine"));
    }
  }
  std::string weaker;
  auto layout = internal::ProbeCgroups(options.cgroup);
  if (layout.ok()) {
    impl->cgroups = *layout;
  } else if (options.cgroup != CgroupMode::kAuto && options.cgroup != CgroupMode::kNone) {
    return absl::FailedPreconditionError(
        absl::StrCat("sandbox: the requested cgroup mode is unavailable: ", layout.status().message()));
  }
  if (impl->cgroups.version == 0) {
    weaker =
        "no writable cgroup: memory is RLIMIT_AS per process, CPU is RLIMIT_CPU per process (whole "
        "seconds), processes are RLIMIT_NPROC, peak memory is the largest process's RSS";
    if (!layout.ok()) absl::StrAppend(&weaker, " (", layout.status().message(), ")");
    if (options.degraded == DegradedPolicy::kRefuse) {
      return absl::FailedPreconditionError(absl::StrCat(
          "sandbox: refusing to run with weaker limits: ", weaker,
          ". Set DegradedPolicy::kAllowWeaker (CLI: --sandbox_allow_weaker) to accept them."));
    }
  }
  ASSIGN_OR_RETURN(impl->filter, BuildSeccompFilter());
  impl->fprog.len = static_cast<unsigned short>(impl->filter.size());
  impl->fprog.filter = impl->filter.data();
  for (const std::string& tool : {options.python, options.cxx, options.shell}) {
    if (access(tool.c_str(), X_OK) != 0) {
      LOG(WARNING) << "sandbox: " << tool << " is not executable here; runs that need it will fail";
    }
  }
  // The read-only view of the system: /usr, the top-level links or dirs
  // merged-/usr systems keep, the loader's files in /etc, and a few /dev nodes.
  impl->mounts.push_back({"/usr", "/tmp/usr", true, false, ""});
  for (const char* top : {"bin", "sbin", "lib", "lib32", "lib64", "libx32"}) {
    const std::string host = absl::StrCat("/", top);
    struct stat st{};
    if (lstat(host.c_str(), &st) != 0) continue;
    MountEntry e{host, absl::StrCat("/tmp/", top), true, false, ""};
    if (S_ISLNK(st.st_mode)) {
      char target[4096];
      ssize_t n = readlink(host.c_str(), target, sizeof(target) - 1);
      if (n <= 0) continue;
      e.symlink = true;
      e.link_target.assign(target, n);
    } else if (!S_ISDIR(st.st_mode)) {
      continue;
    }
    impl->mounts.push_back(e);
  }
  for (const char* etc : {"ld.so.cache", "ld.so.conf", "ld.so.conf.d", "alternatives",
                          "localtime", "python3", "python3.11"}) {
    const std::string host = absl::StrCat("/etc/", etc);
    struct stat st{};
    if (stat(host.c_str(), &st) != 0) continue;
    impl->mounts.push_back({host, absl::StrCat("/tmp/etc/", etc), S_ISDIR(st.st_mode), false, ""});
  }
  for (const char* dev : {"null", "zero", "full", "random", "urandom"}) {
    impl->mounts.push_back(
        {absl::StrCat("/dev/", dev), absl::StrCat("/tmp/dev/", dev), false, false, ""});
  }
  std::string caps = absl::StrCat("user/mount/pid/net/ipc/uts/cgroup namespaces ok; seccomp (",
                                  impl->filter.size(), " BPF instructions); limits via ",
                                  impl->cgroups.version == 0 ? "rlimits only" : impl->cgroups.Describe());
  if (!weaker.empty()) {
    LOG(WARNING) << "sandbox: running with WEAKER limits (allowed by the degraded policy): " << weaker;
    absl::StrAppend(&caps, "; WEAKER: ", weaker);
  }
  LOG(INFO) << "sandbox: " << caps;
  return std::unique_ptr<Sandbox>(new Sandbox(std::move(options), std::move(impl), caps));
}

RunResult Sandbox::Impl::RunStage(const SandboxOptions& options, const Stage& stage) const {
  RunResult result;
  const Limits& lim = stage.limits;
  result.enforcement = cgroups.version == 0
                           ? std::string("rlimit (weaker: per-process memory and CPU)")
                           : absl::StrCat("cgroup-v", cgroups.version);
  auto failure = [&](const absl::Status& s) {
    result.verdict = Verdict::kSandboxFailure;
    result.detail = std::string(s.message());
    return result;
  };
  const uint64_t run = next_run.fetch_add(1);
  const uint32_t host_uid = options.host_uid_base + static_cast<uint32_t>((run % (1u << 19)) * 2);

  std::unique_ptr<internal::RunCgroup> cgroup;
  if (cgroups.version != 0) {
    auto cg = internal::RunCgroup::Create(cgroups, absl::StrCat("run-", getpid(), "-", run),
                                          lim.memory_mb << 20, lim.max_pids);
    if (!cg.ok()) return failure(cg.status());
    cgroup = std::move(cg).value();
  }
  auto sync = MakePipe();
  auto report = MakePipe();
  auto out = MakePipe();
  auto err = MakePipe();
  auto stdin_fd = SealedMemfd(stage.stdin_data ? *stage.stdin_data : std::string());
  if (!sync.ok() || !report.ok() || !out.ok() || !err.ok() || !stdin_fd.ok()) {
    return failure(absl::InternalError(absl::StrCat("creating pipes: ", strerror(errno))));
  }
  Pipe collect, harness;
  if (stage.collect != nullptr) {
    auto p = MakePipe();
    if (!p.ok()) return failure(p.status());
    collect = std::move(p).value();
  }
  if (stage.harness != nullptr) {
    auto p = MakePipe();
    if (!p.ok()) return failure(p.status());
    harness = std::move(p).value();
  }

  ChildPlan plan;
  plan.sync_fd = sync->read_end.fd;
  plan.report_fd = report->write_end.fd;
  plan.stdin_fd = stdin_fd->fd;
  plan.stdout_fd = out->write_end.fd;
  plan.stderr_fd = err->write_end.fd;
  plan.collect_fd = collect.write_end.fd;
  plan.harness_fd = harness.write_end.fd;
  plan.mounts = &mounts;
  plan.work_options = absl::StrCat("size=", lim.tmpfs_mb, "m,nr_inodes=", lim.tmpfs_inodes,
                                   ",mode=0755");
  plan.passwd = "root:x:0:0:root:/:/bin/sh\nsandbox:x:1000:1000:sandbox:/work:/bin/sh\n";
  plan.group = "root:x:0:\nsandbox:x:1000:\n";
  plan.files = stage.files;
  plan.collect_name = stage.collect;
  plan.exec_path = stage.exec_path.c_str();
  std::vector<std::string> env = {"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/work", "TMPDIR=/work",
                                  "LANG=C.UTF-8", "PYTHONDONTWRITEBYTECODE=1", "PYTHONHASHSEED=0"};
  for (const std::string& a : stage.argv) plan.argv.push_back(const_cast<char*>(a.c_str()));
  plan.argv.push_back(nullptr);
  for (const std::string& e : env) plan.envp.push_back(const_cast<char*>(e.c_str()));
  plan.envp.push_back(nullptr);
  // RLIMIT_CPU backs up the cgroup's CPU watch (and is the limit without one).
  const rlim_t cpu_s = static_cast<rlim_t>((lim.cpu_ms + 999) / 1000) + (cgroups.version ? 1 : 0);
  plan.cpu = {cpu_s, cpu_s + 1};
  plan.fsize = {static_cast<rlim_t>(lim.file_size_mb) << 20, static_cast<rlim_t>(lim.file_size_mb) << 20};
  plan.nofile = {static_cast<rlim_t>(lim.open_files), static_cast<rlim_t>(lim.open_files)};
  plan.nproc = {static_cast<rlim_t>(lim.max_pids), static_cast<rlim_t>(lim.max_pids)};
  plan.as = {static_cast<rlim_t>(lim.memory_mb) << 20, static_cast<rlim_t>(lim.memory_mb) << 20};
  plan.core = {0, 0};
  plan.limit_as = cgroups.version == 0;
  plan.seccomp = &fprog;

  const Clock::time_point start = Clock::now();
  const pid_t init = static_cast<pid_t>(
      syscall(SYS_clone,
              CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC |
                  CLONE_NEWUTS | CLONE_NEWCGROUP | SIGCHLD,
              0, 0, 0, 0));
  if (init < 0) return failure(absl::InternalError(absl::StrCat("clone: ", strerror(errno))));
  if (init == 0) InitMain(plan);  // never returns

  // From here on init exists: every exit path kills and reaps it.
  bool init_reaped = false;
  struct rusage init_usage{};
  int init_status = 0;
  auto kill_and_reap = [&] {
    if (init_reaped) return;
    kill(init, SIGKILL);
    while (wait4(init, &init_status, 0, &init_usage) < 0 && errno == EINTR) {
    }
    init_reaped = true;
  };
  sync->read_end.reset();
  report->write_end.reset();
  out->write_end.reset();
  err->write_end.reset();
  stdin_fd->reset();
  collect.write_end.reset();
  harness.write_end.reset();

  absl::Status setup = WriteProcFile(init, "setgroups", "allow");
  if (setup.ok()) {
    setup = WriteProcFile(init, "uid_map",
                          absl::StrCat("0 ", host_uid, " 1\n", kSandboxUid, " ", host_uid + 1, " 1\n"));
  }
  if (setup.ok()) {
    setup = WriteProcFile(init, "gid_map",
                          absl::StrCat("0 ", host_uid, " 1\n", kSandboxUid, " ", host_uid + 1, " 1\n"));
  }
  if (setup.ok() && cgroup) setup = cgroup->Attach(init);
  Fd pidfd(static_cast<int>(syscall(SYS_pidfd_open, init, 0)));
  if (setup.ok() && pidfd.fd < 0) setup = absl::InternalError(absl::StrCat("pidfd_open: ", strerror(errno)));
  if (setup.ok() && write(sync->write_end.fd, "g", 1) != 1) {
    setup = absl::InternalError(absl::StrCat("releasing init: ", strerror(errno)));
  }
  if (!setup.ok()) {
    kill_and_reap();
    return failure(setup);
  }
  sync->write_end.reset();

  struct Stream {
    int fd;
    std::string* sink;
    int64_t cap;
    bool* truncated;
    bool open = true;
  };
  std::string report_bytes;
  bool collect_over = false, harness_over = false;
  bool dummy_flag = false;
  std::vector<Stream> streams = {
      {out->read_end.fd, &result.stdout_data, lim.output_bytes, &result.stdout_truncated},
      {err->read_end.fd, &result.stderr_data, lim.output_bytes, &result.stderr_truncated},
      {report->read_end.fd, &report_bytes, static_cast<int64_t>(sizeof(InitReport)), &dummy_flag},
  };
  if (collect.read_end.fd >= 0) {
    streams.push_back({collect.read_end.fd, stage.collected, kMaxCollectBytes, &collect_over});
  }
  if (harness.read_end.fd >= 0) {
    streams.push_back({harness.read_end.fd, stage.harness, kMaxHarnessBytes, &harness_over});
  }
  for (Stream& s : streams) fcntl(s.fd, F_SETFL, O_NONBLOCK);

  // Reads what is there; false when a stream went over its cap.
  auto drain = [&](Stream& s) {
    char buf[65536];
    for (;;) {
      ssize_t n = read(s.fd, buf, sizeof(buf));
      if (n > 0) {
        const int64_t room = s.cap - static_cast<int64_t>(s.sink->size());
        if (n > room) {
          s.sink->append(buf, static_cast<size_t>(std::max<int64_t>(room, 0)));
          *s.truncated = true;
          return false;
        }
        s.sink->append(buf, static_cast<size_t>(n));
        continue;
      }
      if (n == 0) s.open = false;
      return true;  // EOF, EAGAIN or an error
    }
  };

  enum class Stop { kNone, kExited, kWall, kCpu, kOutput };
  Stop stop = Stop::kNone;
  const Clock::time_point deadline = start + std::chrono::milliseconds(lim.wall_ms);
  while (stop == Stop::kNone) {
    std::vector<pollfd> pfds;
    for (const Stream& s : streams) {
      if (s.open) pfds.push_back({s.fd, POLLIN, 0});
    }
    pfds.push_back({pidfd.fd, POLLIN, 0});
    const auto now = Clock::now();
    if (now >= deadline) {
      stop = Stop::kWall;
      break;
    }
    int64_t wait_ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count() + 1;
    if (cgroup) wait_ms = std::min<int64_t>(wait_ms, 10);  // CPU watch period
    int rc = poll(pfds.data(), pfds.size(), static_cast<int>(wait_ms));
    if (rc < 0 && errno != EINTR) {
      kill_and_reap();
      return failure(absl::InternalError(absl::StrCat("poll: ", strerror(errno))));
    }
    for (Stream& s : streams) {
      if (s.open && !drain(s) && (s.sink == &result.stdout_data || s.sink == &result.stderr_data)) {
        stop = Stop::kOutput;
      }
    }
    if (stop != Stop::kNone) break;
    if (pfds.back().revents != 0) {
      stop = Stop::kExited;
      break;
    }
    if (cgroup) {
      int64_t cpu_ns = cgroup->CpuNanos();
      if (cpu_ns > lim.cpu_ms * 1000000) stop = Stop::kCpu;
    }
  }
  kill_and_reap();  // no-op signal when init already exited
  result.wall_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
  for (Stream& s : streams) {
    if (s.open && !drain(s) && stop == Stop::kExited &&
        (s.sink == &result.stdout_data || s.sink == &result.stderr_data)) {
      stop = Stop::kOutput;
    }
  }
  if (cgroup) {
    if (cgroup->KillAll() > 0) {
      LOG(ERROR) << "sandbox: processes outlived the pid namespace of run " << run << "; killed";
    }
    result.cpu_ms = std::max<int64_t>(cgroup->CpuNanos(), 0) / 1000000;
    int64_t peak = cgroup->PeakMemoryBytes();
    result.peak_memory_kb = peak >= 0 ? peak / 1024 : init_usage.ru_maxrss;
  } else {
    result.cpu_ms = (init_usage.ru_utime.tv_sec + init_usage.ru_stime.tv_sec) * 1000 +
                    (init_usage.ru_utime.tv_usec + init_usage.ru_stime.tv_usec) / 1000;
    result.peak_memory_kb = init_usage.ru_maxrss;
  }
  const bool oom = cgroup && cgroup->OomKilled();
  cgroup.reset();  // removes the cgroup

  InitReport rep{};
  const bool have_report = report_bytes.size() == sizeof(InitReport);
  if (have_report) memcpy(&rep, report_bytes.data(), sizeof(rep));
  if (have_report && rep.kind == 1) {
    result.verdict = Verdict::kSandboxFailure;
    const int step = rep.step;
    result.detail = absl::StrCat("sandbox setup failed at ",
                                 step >= 0 && step <= kStepCollect ? kStepNames[step] : "?", ": ",
                                 strerror(rep.err));
    return result;
  }
  if (have_report) {
    if (WIFEXITED(rep.wait_status)) result.exit_code = WEXITSTATUS(rep.wait_status);
    if (WIFSIGNALED(rep.wait_status)) result.term_signal = WTERMSIG(rep.wait_status);
  }
  const int sig = result.term_signal;
  if (stop == Stop::kOutput) {
    result.verdict = Verdict::kOutputLimit;
    result.detail = absl::StrCat("more than ", lim.output_bytes, " bytes on ",
                                 result.stdout_truncated ? "stdout" : "stderr");
  } else if (oom) {
    result.verdict = Verdict::kMemoryLimit;
    result.detail = absl::StrCat("out of memory (limit ", lim.memory_mb, " MB)");
  } else if (stop == Stop::kCpu || sig == SIGXCPU || result.cpu_ms > lim.cpu_ms ||
             (sig == SIGKILL && cgroups.version == 0 && result.cpu_ms >= (lim.cpu_ms * 9) / 10)) {
    result.verdict = Verdict::kTimeLimit;
    result.detail = absl::StrCat("cpu ", result.cpu_ms, " ms > limit ", lim.cpu_ms, " ms");
  } else if (stop == Stop::kWall) {
    result.verdict = Verdict::kTimeLimit;
    result.detail = absl::StrCat("wall ", result.wall_ms, " ms > limit ", lim.wall_ms, " ms");
  } else if (!have_report) {
    result.verdict = Verdict::kSandboxFailure;
    result.detail = "the sandbox's init ended without a report";
  } else if (sig == SIGXFSZ) {
    result.verdict = Verdict::kOutputLimit;
    result.detail = absl::StrCat("file size limit (", lim.file_size_mb, " MB)");
  } else if (sig != 0) {
    result.verdict = Verdict::kKilledBySignal;
    result.detail = absl::StrCat("killed by signal ", sig, " (", strsignal(sig), ")",
                                 sig == SIGSYS ? ": a forbidden syscall" : "");
  } else if (result.exit_code == 0) {
    result.verdict = Verdict::kOk;
  } else {
    result.verdict = Verdict::kRuntimeError;
    result.detail = absl::StrCat("exit status ", result.exit_code);
    // Under RLIMIT_AS an allocation failure surfaces as an error exit.
    if (cgroups.version == 0 &&
        (result.stderr_data.find("MemoryError") != std::string::npos ||
         result.stderr_data.find("std::bad_alloc") != std::string::npos)) {
      result.verdict = Verdict::kMemoryLimit;
      result.detail = absl::StrCat("allocation failed under RLIMIT_AS ", lim.memory_mb, " MB");
    }
  }
  if (collect_over || harness_over) {
    result.verdict = Verdict::kOutputLimit;
    result.detail = collect_over ? "compiled binary too large" : "test results too large";
  }
  return result;
}

RunResult Sandbox::Compile(const std::string& source, std::string* binary) const {
  std::vector<File> sources = {{"main.cpp", source, false}};
  static const std::string kNoStdin;
  Impl::Stage cc;
  cc.files = &sources;
  cc.limits = options_.compile_limits;
  cc.exec_path = options_.cxx;
  cc.argv = {"g++"};
  for (const std::string& f : options_.cxx_flags) cc.argv.push_back(f);
  for (const char* a : {"/work/main.cpp", "-o", "/work/main"}) cc.argv.push_back(a);
  cc.collect = "/work/main";
  cc.collected = binary;
  cc.stdin_data = &kNoStdin;
  RunResult compile = impl_->RunStage(options_, cc);
  compile.compile_output = compile.stderr_data;
  compile.compile_ms = compile.wall_ms;
  if (compile.verdict == Verdict::kSandboxFailure) return compile;
  if (compile.verdict != Verdict::kOk || binary->empty()) {
    compile.detail = absl::StrCat("compilation failed: ", VerdictName(compile.verdict),
                                  compile.detail.empty() ? "" : ": ", compile.detail);
    compile.verdict = Verdict::kCompileError;
    compile.stdout_data.clear();
    compile.stderr_data.clear();
    binary->clear();
  }
  return compile;
}

RunResult Sandbox::RunPrepared(const RunRequest& request, const std::string* binary,
                               std::string* channel) const {
  std::vector<File> files = request.files;
  Impl::Stage stage;
  stage.files = &files;
  stage.stdin_data = &request.stdin_data;
  stage.limits = request.limits;
  stage.harness = channel;
  switch (request.language) {
    case Language::kPython:
      files.push_back({"main.py", request.program, false});
      stage.exec_path = options_.python;
      stage.argv = {"python3", "-I", "-B", "/work/main.py"};
      break;
    case Language::kSh:
      files.push_back({"main.sh", request.program, false});
      stage.exec_path = options_.shell;
      stage.argv = {"sh", "/work/main.sh"};
      break;
    case Language::kCpp:
      CHECK(binary != nullptr);
      files.push_back({"main", *binary, true});
      stage.exec_path = "/work/main";
      stage.argv = {"main"};
      break;
  }
  for (const std::string& a : request.args) stage.argv.push_back(a);
  return impl_->RunStage(options_, stage);
}

absl::Status internal::ValidateRequest(const RunRequest& request) {
  RETURN_IF_ERROR(ValidateLimits(request.limits, "limits"));
  for (const File& f : request.files) {
    if (!ValidFileName(f.name) || f.name == "main" || f.name == "main.py" ||
        f.name == "main.cpp" || f.name == "main.sh") {
      return absl::InvalidArgumentError(absl::StrCat(
          "bad file name '", f.name, "' (a plain name, not main, main.py, main.cpp or main.sh)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<RunResult> Sandbox::Run(const RunRequest& request) const {
  RETURN_IF_ERROR(internal::ValidateRequest(request));
  if (request.language != Language::kCpp) return RunPrepared(request, nullptr, nullptr);
  std::string binary;
  RunResult compile = Compile(request.program, &binary);
  if (compile.verdict != Verdict::kOk) return compile;
  RunResult result = RunPrepared(request, &binary, nullptr);
  result.compile_output = compile.compile_output;
  result.compile_ms = compile.compile_ms;
  return result;
}

}  // namespace retort::sandbox
