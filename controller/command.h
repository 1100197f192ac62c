// The `retort` CLI is one binary with subcommands. Each subcommand lives in
// its own controller/<name>_command.cc and registers itself with
// RETORT_COMMAND; main.cc parses Abseil flags and dispatches.
//
// Flags are process-global (Abseil): a flag used by several subcommands is
// defined once in flags.cc and declared in flags.h; a flag only one
// subcommand uses is defined in that subcommand's file.
#ifndef RETORT_CONTROLLER_COMMAND_H_
#define RETORT_CONTROLLER_COMMAND_H_

#include <string>
#include <string_view>
#include <vector>

namespace retort::controller {

// `args` holds the positional arguments after the subcommand name (flags
// already parsed). Returns the process exit code.
using CommandFn = int (*)(const std::vector<std::string>& args);

struct Command {
  std::string_view name;
  std::string_view summary;  // one line for `retort help`
  CommandFn run;
};

std::vector<Command>& Commands();

struct CommandRegistrar {
  explicit CommandRegistrar(Command c) { Commands().push_back(c); }
};

}  // namespace retort::controller

#define RETORT_COMMAND(name, summary, fn)                                      \
  static ::retort::controller::CommandRegistrar retort_command_registrar_##fn( \
      ::retort::controller::Command{name, summary, fn})

#endif  // RETORT_CONTROLLER_COMMAND_H_
