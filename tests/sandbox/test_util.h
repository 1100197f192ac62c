// Shared helpers for the sandbox tests: a Sandbox with small limits on its
// own host-uid range, and checks that nothing outlived a run.
#ifndef RETORT_TESTS_SANDBOX_TEST_UTIL_H_
#define RETORT_TESTS_SANDBOX_TEST_UTIL_H_

#include <dirent.h>

#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "gtest/gtest.h"
#include "sandbox/sandbox.h"

namespace retort::sandbox::testing {

inline Limits SmallLimits() {
  Limits l;
  l.cpu_ms = 1000;
  l.wall_ms = 2000;
  l.memory_mb = 64;
  l.max_pids = 16;
  l.file_size_mb = 4;
  l.open_files = 32;
  l.output_bytes = 64 << 10;
  l.tmpfs_mb = 8;
  l.tmpfs_inodes = 1000;
  return l;
}

inline SandboxOptions TestOptions(uint32_t uid_base) {
  SandboxOptions o;
  o.host_uid_base = uid_base;
  o.compile_limits.cpu_ms = 4000;
  o.compile_limits.wall_ms = 8000;
  o.compile_limits.memory_mb = 512;
  return o;
}

// Host processes whose real uid lies in [base, base + 2^20): anything a run
// of a sandbox with this base left behind.
inline int Survivors(uint32_t base) {
  int found = 0;
  DIR* d = opendir("/proc");
  if (d == nullptr) return -1;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::ifstream status(std::string("/proc/") + e->d_name + "/status");
    std::string line;
    while (std::getline(status, line)) {
      if (line.rfind("Uid:", 0) == 0) {
        std::istringstream in(line.substr(4));
        uint64_t uid = 0;
        in >> uid;
        if (uid >= base && uid < base + (1u << 20)) ++found;
        break;
      }
    }
  }
  closedir(d);
  return found;
}

}  // namespace retort::sandbox::testing

#endif  // RETORT_TESTS_SANDBOX_TEST_UTIL_H_
