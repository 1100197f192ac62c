// `retort tokenize --tokenizer DIR [--special] "text"`: prints the ids,
// space-separated, on one line. `retort detokenize --tokenizer DIR 1 2 3`:
// prints the decoded text exactly (no added newline).
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "controller/command.h"
#include "controller/flags.h"
#include "model/tokenizer/tokenizer.h"

ABSL_FLAG(bool, special, false,
          "tokenize: add BOS/EOS as tokenizer_config.json says (add_bos_token, add_eos_token)");

namespace {

using retort::tokenizer::TokenId;
using retort::tokenizer::Tokenizer;

const Tokenizer* LoadOrDie(std::unique_ptr<Tokenizer>* holder) {
  const std::string dir = absl::GetFlag(FLAGS_tokenizer);
  if (dir.empty()) {
    std::fprintf(stderr, "retort: --tokenizer DIR is required (a directory with tokenizer.json)\n");
    return nullptr;
  }
  auto tok = Tokenizer::LoadDir(dir);
  if (!tok.ok()) {
    std::fprintf(stderr, "retort: %s\n", tok.status().ToString().c_str());
    return nullptr;
  }
  *holder = std::move(tok).value();
  return holder->get();
}

int RunTokenize(const std::vector<std::string>& args) {
  if (args.size() != 1) {
    std::fprintf(stderr, "usage: retort tokenize --tokenizer DIR [--special] \"text\"\n");
    return 2;
  }
  std::unique_ptr<Tokenizer> holder;
  const Tokenizer* tok = LoadOrDie(&holder);
  if (tok == nullptr) return 1;
  retort::tokenizer::EncodeOptions options;
  options.add_special_tokens = absl::GetFlag(FLAGS_special);
  auto ids = tok->Encode(args[0], options);
  if (!ids.ok()) {
    std::fprintf(stderr, "retort: %s\n", ids.status().ToString().c_str());
    return 1;
  }
  std::printf("%s\n", absl::StrJoin(*ids, " ").c_str());
  return 0;
}

int RunDetokenize(const std::vector<std::string>& args) {
  std::unique_ptr<Tokenizer> holder;
  const Tokenizer* tok = LoadOrDie(&holder);
  if (tok == nullptr) return 1;
  std::vector<TokenId> ids;
  for (const std::string& a : args) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(a, &id) || !tok->IdToToken(id).has_value()) {
      std::fprintf(stderr, "retort: '%s' is not a token id of this tokenizer (0..%d)\n", a.c_str(),
                   tok->vocab_size() - 1);
      return 1;
    }
    ids.push_back(id);
  }
  const std::string text = tok->Decode(ids);
  std::fwrite(text.data(), 1, text.size(), stdout);
  return 0;
}

}  // namespace

RETORT_COMMAND("tokenize", "print the token ids of a text (--tokenizer DIR [--special])",
               RunTokenize);
RETORT_COMMAND("detokenize", "print the text of token ids (--tokenizer DIR 1 2 3)", RunDetokenize);
