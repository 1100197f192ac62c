// cgroup v2 / v1 plumbing for sandbox runs.
#include "sandbox/internal/cgroup.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "model/base/status_macros.h"

namespace retort::sandbox::internal {
namespace {

std::string ReadSmallFile(const std::string& path, bool* ok) {
  std::ifstream in(path);
  if (!in) {
    *ok = false;
    return "";
  }
  std::stringstream ss;
  ss << in.rdbuf();
  *ok = true;
  return ss.str();
}

absl::Status WriteFile(const std::string& path, const std::string& value) {
  int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return absl::PermissionDeniedError(absl::StrCat("open ", path, ": ", strerror(errno)));
  ssize_t n = write(fd, value.data(), value.size());
  int err = errno;
  close(fd);
  if (n != static_cast<ssize_t>(value.size())) {
    return absl::PermissionDeniedError(
        absl::StrCat("write '", value, "' to ", path, ": ", strerror(err)));
  }
  return absl::OkStatus();
}

int64_t ReadInt(const std::string& path) {
  bool ok = false;
  std::string s = ReadSmallFile(path, &ok);
  int64_t v = 0;
  if (!ok || !absl::SimpleAtoi(absl::StripAsciiWhitespace(s), &v)) return -1;
  return v;
}

// The value of `key` in a "key value" per line file (memory.events, cpu.stat).
int64_t ReadKeyed(const std::string& path, absl::string_view key) {
  bool ok = false;
  std::string s = ReadSmallFile(path, &ok);
  if (!ok) return -1;
  for (absl::string_view line : absl::StrSplit(s, '\n')) {
    std::vector<absl::string_view> kv = absl::StrSplit(line, ' ', absl::SkipEmpty());
    int64_t v = 0;
    if (kv.size() == 2 && kv[0] == key && absl::SimpleAtoi(kv[1], &v)) return v;
  }
  return -1;
}

bool MakeDir(const std::string& path) { return mkdir(path.c_str(), 0755) == 0 || errno == EEXIST; }

// A writable parent directory under `base`: our own cgroup first (so the
// limits nest under whatever confines us), else the hierarchy's root.
absl::StatusOr<std::string> MakeParent(const std::vector<std::string>& candidates) {
  std::string errors;
  for (const std::string& base : candidates) {
    const std::string dir = absl::StrCat(base, "/retort-sandbox");
    if (MakeDir(dir) && access(dir.c_str(), W_OK) == 0) return dir;
    absl::StrAppend(&errors, " ", dir, ": ", strerror(errno), ";");
  }
  return absl::PermissionDeniedError(absl::StrCat("no writable cgroup directory:", errors));
}

// Mount point of the v1 hierarchy that carries `controller`, from /proc/mounts.
std::string V1MountPoint(const std::string& controller) {
  bool ok = false;
  std::string mounts = ReadSmallFile("/proc/mounts", &ok);
  for (absl::string_view line : absl::StrSplit(mounts, '\n')) {
    std::vector<absl::string_view> f = absl::StrSplit(line, ' ');
    if (f.size() < 4 || f[2] != "cgroup") continue;
    for (absl::string_view opt : absl::StrSplit(f[3], ',')) {
      if (opt == controller) return std::string(f[1]);
    }
  }
  return "";
}

// Our own path in the v1 hierarchy of `controller`, from /proc/self/cgroup.
std::string V1OwnPath(const std::string& controller) {
  bool ok = false;
  std::string s = ReadSmallFile("/proc/self/cgroup", &ok);
  for (absl::string_view line : absl::StrSplit(s, '\n')) {
    std::vector<absl::string_view> f = absl::StrSplit(line, absl::MaxSplits(':', 2));
    if (f.size() != 3) continue;
    for (absl::string_view c : absl::StrSplit(f[1], ',')) {
      if (c == controller) return std::string(f[2]);
    }
  }
  return "/";
}

absl::StatusOr<CgroupLayout> ProbeV2() {
  const std::string root = "/sys/fs/cgroup";
  bool ok = false;
  std::string controllers = ReadSmallFile(root + "/cgroup.controllers", &ok);
  if (!ok) return absl::NotFoundError("no cgroup v2 hierarchy at /sys/fs/cgroup");
  std::vector<absl::string_view> have = absl::StrSplit(absl::StripAsciiWhitespace(controllers), ' ');
  for (const char* need : {"memory", "pids"}) {
    if (std::find(have.begin(), have.end(), need) == have.end()) {
      return absl::NotFoundError(absl::StrCat("cgroup v2 at /sys/fs/cgroup lacks the ", need, " controller"));
    }
  }
  // The root cgroup is exempt from the no-internal-processes rule, so the
  // parent lives directly under it with memory+pids delegated below.
  RETURN_IF_ERROR(WriteFile(root + "/cgroup.subtree_control", "+memory +pids"));
  const std::string parent = root + "/retort-sandbox";
  if (!MakeDir(parent)) {
    return absl::PermissionDeniedError(absl::StrCat("mkdir ", parent, ": ", strerror(errno)));
  }
  RETURN_IF_ERROR(WriteFile(parent + "/cgroup.subtree_control", "+memory +pids"));
  CgroupLayout layout;
  layout.version = 2;
  layout.parents = {parent};
  return layout;
}

absl::StatusOr<CgroupLayout> ProbeV1() {
  CgroupLayout layout;
  layout.version = 1;
  for (const std::string controller : {"memory", "pids", "cpuacct"}) {
    const std::string mnt = V1MountPoint(controller);
    if (mnt.empty()) {
      return absl::NotFoundError(absl::StrCat("no cgroup v1 ", controller, " hierarchy mounted"));
    }
    std::string own = V1OwnPath(controller);
    std::vector<std::string> candidates;
    if (own != "/") candidates.push_back(mnt + own);
    candidates.push_back(mnt);
    ASSIGN_OR_RETURN(std::string parent, MakeParent(candidates));
    layout.parents.push_back(parent);
  }
  return layout;
}

}  // namespace

std::string CgroupLayout::Describe() const {
  if (version == 0) return "none";
  return absl::StrCat("cgroup-v", version, " at ", absl::StrJoin(parents, ", "));
}

absl::StatusOr<CgroupLayout> ProbeCgroups(CgroupMode mode) {
  switch (mode) {
    case CgroupMode::kNone:
      return CgroupLayout{};
    case CgroupMode::kV2:
      return ProbeV2();
    case CgroupMode::kV1:
      return ProbeV1();
    case CgroupMode::kAuto: {
      auto v2 = ProbeV2();
      if (v2.ok()) return v2;
      auto v1 = ProbeV1();
      if (v1.ok()) return v1;
      return absl::NotFoundError(
          absl::StrCat("v2: ", v2.status().message(), "; v1: ", v1.status().message()));
    }
  }
  return absl::InternalError("unreachable");
}

absl::StatusOr<std::unique_ptr<RunCgroup>> RunCgroup::Create(const CgroupLayout& layout,
                                                             const std::string& name,
                                                             int64_t memory_bytes,
                                                             int64_t max_pids) {
  std::vector<std::string> dirs;
  for (const std::string& parent : layout.parents) {
    const std::string dir = absl::StrCat(parent, "/", name);
    if (mkdir(dir.c_str(), 0755) != 0) {
      for (const std::string& d : dirs) rmdir(d.c_str());
      return absl::InternalError(absl::StrCat("mkdir ", dir, ": ", strerror(errno)));
    }
    dirs.push_back(dir);
  }
  std::unique_ptr<RunCgroup> cg(new RunCgroup(layout.version, dirs));
  const std::string mem = std::to_string(memory_bytes);
  if (layout.version == 2) {
    RETURN_IF_ERROR(WriteFile(dirs[0] + "/memory.max", mem));
    // No swap: the limit is on memory the program really holds.
    if (access((dirs[0] + "/memory.swap.max").c_str(), F_OK) == 0) {
      RETURN_IF_ERROR(WriteFile(dirs[0] + "/memory.swap.max", "0"));
    }
    RETURN_IF_ERROR(WriteFile(dirs[0] + "/pids.max", std::to_string(max_pids)));
  } else {
    RETURN_IF_ERROR(WriteFile(dirs[0] + "/memory.limit_in_bytes", mem));
    if (access((dirs[0] + "/memory.memsw.limit_in_bytes").c_str(), F_OK) == 0) {
      RETURN_IF_ERROR(WriteFile(dirs[0] + "/memory.memsw.limit_in_bytes", mem));
    }
    RETURN_IF_ERROR(WriteFile(dirs[1] + "/pids.max", std::to_string(max_pids)));
  }
  return cg;
}

absl::Status RunCgroup::Attach(pid_t pid) const {
  for (const std::string& dir : dirs_) {
    RETURN_IF_ERROR(WriteFile(dir + "/cgroup.procs", std::to_string(pid)));
  }
  return absl::OkStatus();
}

int64_t RunCgroup::CpuNanos() const {
  if (version_ == 2) {
    int64_t us = ReadKeyed(dirs_[0] + "/cpu.stat", "usage_usec");
    return us < 0 ? -1 : us * 1000;
  }
  return ReadInt(dirs_[2] + "/cpuacct.usage");
}

int64_t RunCgroup::PeakMemoryBytes() const {
  if (version_ == 2) return ReadInt(dirs_[0] + "/memory.peak");
  return ReadInt(dirs_[0] + "/memory.max_usage_in_bytes");
}

bool RunCgroup::OomKilled() const {
  if (version_ == 2) return ReadKeyed(dirs_[0] + "/memory.events", "oom_kill") > 0;
  int64_t kills = ReadKeyed(dirs_[0] + "/memory.oom_control", "oom_kill");
  if (kills >= 0) return kills > 0;
  return ReadInt(dirs_[0] + "/memory.failcnt") > 0;  // kernels without the counter
}

int RunCgroup::KillAll() const {
  int found = 0;
  for (const std::string& dir : dirs_) {
    bool ok = false;
    std::string procs = ReadSmallFile(dir + "/cgroup.procs", &ok);
    for (absl::string_view p : absl::StrSplit(procs, '\n', absl::SkipEmpty())) {
      int pid = 0;
      if (absl::SimpleAtoi(p, &pid) && pid > 0) {
        kill(pid, SIGKILL);
        ++found;
      }
    }
  }
  return found;
}

RunCgroup::~RunCgroup() {
  for (const std::string& dir : dirs_) {
    // The run's pid namespace is gone by now; a killed task can take a moment
    // to leave the cgroup, so retry briefly.
    for (int attempt = 0; attempt < 200; ++attempt) {
      if (rmdir(dir.c_str()) == 0 || errno == ENOENT) break;
      KillAll();
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
}

}  // namespace retort::sandbox::internal
