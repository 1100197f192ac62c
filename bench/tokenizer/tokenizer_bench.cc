// tokenizer_bench: encode and decode throughput (MB/s of UTF-8 text, one
// thread) on ~4 MB of deterministic mixed text: English prose, code, CJK,
// emoji and digits, and all of them interleaved.
//
// usage: tokenizer_bench [TOKENIZER_DIR]   (default tests/fixtures/tokenizer)
// "cold" encodes with a freshly loaded tokenizer (empty pre-token cache);
// "warm" encodes the same text again.
#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "model/tokenizer/tokenizer.h"

namespace {

using retort::tokenizer::TokenId;
using retort::tokenizer::Tokenizer;

void AppendCp(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string Prose(std::mt19937& rng, size_t bytes) {
  static const char* kWords[] = {
      "the",    "model",   "reasoning", "answer",   "is",   "of",   "a",     "token",    "training",
      "policy", "reward",  "gradient",  "and",      "with", "for",  "large", "language", "sequence",
      "which",  "however", "therefore", "Consider", "We",   "it's", "don't"};
  std::string s;
  while (s.size() < bytes) {
    s += kWords[rng() % (sizeof(kWords) / sizeof(kWords[0]))];
    s += (rng() % 12 == 0) ? ". " : (rng() % 9 == 0 ? ", " : " ");
    if (rng() % 80 == 0) s += "\n\n";
  }
  return s;
}

std::string Code(std::mt19937& rng, size_t bytes) {
  static const char* kLines[] = {"def forward(self, x):\n",
                                 "    return torch.matmul(q, k.transpose(-1, -2))\n",
                                 "for (int i = 0; i < n; ++i) {\n",
                                 "  out[i] = a[i] * b[i] + c;\n",
                                 "}\n",
                                 "if (status.ok() && count > 0) return absl::OkStatus();\n",
                                 "    self.cache = {}  # key -> list[int]\n",
                                 "\tprintf(\"%d\\n\", x);\n"};
  std::string s;
  while (s.size() < bytes) s += kLines[rng() % (sizeof(kLines) / sizeof(kLines[0]))];
  return s;
}

std::string Cjk(std::mt19937& rng, size_t bytes) {
  std::string s;
  while (s.size() < bytes) {
    AppendCp(0x4E00 + rng() % (0x9FA5 - 0x4E00), &s);
    if (rng() % 15 == 0) s += "，";
    if (rng() % 40 == 0) s += "。\n";
  }
  return s;
}

std::string Emoji(std::mt19937& rng, size_t bytes) {
  std::string s;
  while (s.size() < bytes) {
    AppendCp(0x1F300 + rng() % 0x300, &s);
    if (rng() % 6 == 0) s += " ";
  }
  return s;
}

std::string Digits(std::mt19937& rng, size_t bytes) {
  std::string s;
  while (s.size() < bytes) {
    s += std::to_string(rng() % 1000000);
    s += (rng() % 3 == 0) ? "." : " ";
  }
  return s;
}

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "tests/fixtures/tokenizer";
  std::mt19937 rng(12345);
  constexpr size_t kPart = 800 * 1000;
  std::vector<std::pair<std::string, std::string>> corpora = {{"prose", Prose(rng, kPart)},
                                                              {"code", Code(rng, kPart)},
                                                              {"cjk", Cjk(rng, kPart)},
                                                              {"emoji", Emoji(rng, kPart)},
                                                              {"digits", Digits(rng, kPart)}};
  std::string mixed;
  for (size_t off = 0; off < kPart; off += 2000)
    for (auto& [name, text] : corpora) {
      // Cut at a character boundary.
      size_t end = std::min(off + 2000, text.size());
      while (end < text.size() && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) ++end;
      size_t begin = off;
      while (begin < text.size() && (static_cast<unsigned char>(text[begin]) & 0xC0) == 0x80)
        ++begin;
      if (begin < end) mixed.append(text, begin, end - begin);
    }
  corpora.emplace_back("mixed", mixed);

  std::printf("tokenizer: %s\n", dir.c_str());
  std::printf("%-8s %9s %9s %10s %14s %14s %14s\n", "text", "MB", "tokens", "bytes/tok",
              "encode cold", "encode warm", "decode");
  for (auto& [name, text] : corpora) {
    auto tok = Tokenizer::LoadDir(dir);
    if (!tok.ok()) {
      std::fprintf(stderr, "%s\n", tok.status().ToString().c_str());
      return 1;
    }
    const double mb = text.size() / 1e6;
    auto t0 = std::chrono::steady_clock::now();
    auto ids = (*tok)->Encode(text);
    const double cold = Seconds(t0);
    if (!ids.ok()) {
      std::fprintf(stderr, "%s\n", ids.status().ToString().c_str());
      return 1;
    }
    t0 = std::chrono::steady_clock::now();
    auto again = (*tok)->Encode(text);
    const double warm = Seconds(t0);
    t0 = std::chrono::steady_clock::now();
    std::string back = (*tok)->Decode(*ids);
    const double dec = Seconds(t0);
    if (back != text || !again.ok() || *again != *ids) {
      std::fprintf(stderr, "%s: round trip failed\n", name.c_str());
      return 1;
    }
    std::printf("%-8s %9.2f %9zu %10.2f %9.1f MB/s %9.1f MB/s %9.1f MB/s\n", name.c_str(), mb,
                ids->size(), static_cast<double>(text.size()) / ids->size(), mb / cold, mb / warm,
                mb / dec);
  }
  return 0;
}
