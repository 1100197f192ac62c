// Per-run cgroups (v2, or v1 memory + pids + cpuacct) for the sandbox: create
// with limits, attach a pid, read usage, kill leftovers, remove. Internal to
// sandbox/.
#ifndef RETORT_SANDBOX_INTERNAL_CGROUP_H_
#define RETORT_SANDBOX_INTERNAL_CGROUP_H_

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "sandbox/sandbox.h"

namespace retort::sandbox::internal {

// Where per-run cgroups go. Found once by Probe; immutable afterwards.
struct CgroupLayout {
  int version = 0;  // 0: none, 1 or 2
  // v2: one parent directory. v1: parents for memory, pids, cpuacct (in order).
  std::vector<std::string> parents;
  std::string Describe() const;
};

// Finds (and creates) the parent cgroups for `mode`. NotFound/PermissionDenied
// with the reason when the requested kind is not available.
absl::StatusOr<CgroupLayout> ProbeCgroups(CgroupMode mode);

// One run's cgroup(s). The destructor kills whatever is left and removes them.
class RunCgroup {
 public:
  static absl::StatusOr<std::unique_ptr<RunCgroup>> Create(const CgroupLayout& layout,
                                                           const std::string& name,
                                                           int64_t memory_bytes, int64_t max_pids);
  ~RunCgroup();

  [[nodiscard]] absl::Status Attach(pid_t pid) const;
  int64_t CpuNanos() const;         // -1 when unreadable
  int64_t PeakMemoryBytes() const;  // -1 when unknown
  bool OomKilled() const;
  // Kills every process still in the cgroup(s); returns how many there were.
  int KillAll() const;

 private:
  RunCgroup(int version, std::vector<std::string> dirs) : version_(version), dirs_(std::move(dirs)) {}
  int version_;
  std::vector<std::string> dirs_;  // v2: one; v1: memory, pids, cpuacct
};

}  // namespace retort::sandbox::internal

#endif  // RETORT_SANDBOX_INTERNAL_CGROUP_H_
