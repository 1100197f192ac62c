// retort: the CLI. `retort <subcommand> [--flags] [args]`; `retort help`.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "controller/command.h"

namespace retort::controller {

std::vector<Command>& Commands() {
  static std::vector<Command> commands;
  return commands;
}

namespace {

void PrintHelp() {
  std::fprintf(stderr, "usage: retort <command> [--flags] [args]\n\ncommands:\n");
  auto cmds = Commands();
  std::sort(cmds.begin(), cmds.end(), [](const Command& a, const Command& b) { return a.name < b.name; });
  for (const auto& c : cmds) {
    std::fprintf(stderr, "  %-16.*s %.*s\n", static_cast<int>(c.name.size()), c.name.data(),
                 static_cast<int>(c.summary.size()), c.summary.data());
  }
  std::fprintf(stderr, "\n`retort <command> --help` lists every flag.\n");
}

}  // namespace
}  // namespace retort::controller

int main(int argc, char** argv) {
  using retort::controller::Commands;
  absl::SetProgramUsageMessage("retort <command> [--flags] [args]; `retort help` lists commands");
  if (argc < 2 || std::string(argv[1]) == "help" || std::string(argv[1]) == "--help") {
    retort::controller::PrintHelp();
    return argc < 2 ? 2 : 0;
  }
  const std::string name = argv[1];
  const retort::controller::Command* cmd = nullptr;
  for (const auto& c : Commands())
    if (c.name == name) cmd = &c;
  if (cmd == nullptr) {
    std::fprintf(stderr, "retort: unknown command '%s'\n\n", name.c_str());
    retort::controller::PrintHelp();
    return 2;
  }
  // Parse flags from everything after the subcommand name.
  // Abseil spells flags with underscores; the CLI accepts dashes too
  // (--max-new-tokens == --max_new_tokens). Only the name before '=' changes.
  std::vector<std::string> storage;
  storage.reserve(argc);
  for (int i = 2; i < argc; ++i) {
    std::string a = argv[i];
    if (a.size() > 2 && a[0] == '-' && a[1] == '-') {
      const size_t eq = a.find('=');
      for (size_t j = 2; j < std::min(eq, a.size()); ++j)
        if (a[j] == '-') a[j] = '_';
    }
    storage.push_back(std::move(a));
  }
  std::vector<char*> rest;
  rest.push_back(argv[0]);
  for (auto& a : storage) rest.push_back(a.data());
  std::vector<char*> positional = absl::ParseCommandLine(static_cast<int>(rest.size()), rest.data());
  std::vector<std::string> args(positional.begin() + 1, positional.end());
  return cmd->run(args);
}
