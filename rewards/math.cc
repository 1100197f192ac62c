// The math reward: answer extraction, normalisation, structural and
// algebraic comparison (see math.h).
//
// Note [Math grading]
// A reward that says "correct" for a wrong answer teaches the policy to
// produce that wrong answer, so every rule here errs towards "not equal":
//  - Structure before value: "(0,9)" and "[0,9)" are both pairs of the same
//    numbers, but their brackets differ, so they differ. Relations compare
//    operators ("x>5" is not "x<5"; "5<x" is "x>5").
//  - A reference written as a number accepts only numbers: the policy must
//    finish the arithmetic ("1+2" is not "3") unless allow_unevaluated.
//  - Numbers compare exactly: integers digit by digit (any size), decimals
//    and fractions as exact rationals (0.5 = 1/2, 0.50 = 1/2, 0.5 != 50).
//    Only values that are not rational (pi, sqrt 2, logs) use rel_tol.
//  - Algebraic equivalence evaluates both sides at seeded random rational
//    points with exact arithmetic where it can; points where either side is
//    undefined are skipped, and too few defined points mean "not equal".
//  - Words ("Monday", "xyz") are compared as text, case-insensitively, never
//    as products of single-letter variables (which would make anagrams equal).
#include "rewards/math.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "model/base/status_macros.h"
#include "rewards/internal/math_expr.h"
#include "rewards/internal/regex.h"

namespace retort::rewards {
namespace {

using internal::Expr;
using internal::ExprPtr;
using internal::Value;

void ReplaceAllIn(std::string* s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  size_t pos = 0;
  while ((pos = s->find(from, pos)) != std::string::npos) {
    s->replace(pos, from.size(), to);
    pos += to.size();
  }
}

// Replaces the command "\name" where it is not the prefix of a longer
// command ("\left" but not "\leftarrow").
void ReplaceCommand(std::string* s, const std::string& name, const std::string& with) {
  const std::string pat = "\\" + name;
  std::string out;
  size_t i = 0;
  while (i < s->size()) {
    if (s->compare(i, pat.size(), pat) == 0 &&
        (i + pat.size() >= s->size() ||
         !std::isalpha(static_cast<unsigned char>((*s)[i + pat.size()])))) {
      out += with;
      i += pat.size();
    } else {
      out += (*s)[i++];
    }
  }
  *s = std::move(out);
}

std::string Trim(const std::string& s) { return std::string(absl::StripAsciiWhitespace(s)); }

// Index of the '}' closing the '{' at `open`; escaped \{ \} do not count.
size_t MatchBrace(const std::string& s, size_t open) {
  int depth = 0;
  for (size_t i = open; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size() && (s[i + 1] == '{' || s[i + 1] == '}')) {
      ++i;
      continue;
    }
    if (s[i] == '{') ++depth;
    if (s[i] == '}' && --depth == 0) return i;
  }
  return std::string::npos;
}

bool IsUnitWords(const std::string& s) {
  if (s.empty() || s == "or" || s == "and") return false;
  for (char c : s)
    if (!std::isalpha(static_cast<unsigned char>(c)) && c != ' ' && c != '.') return false;
  return true;
}

// \text{...} and friends: units after a value are dropped ("5\text{ cm}^2"
// -> "5"), anything else is unwrapped ("\text{(A)}" -> "(A)").
void UnwrapTextGroups(std::string* s) {
  static const char* const kTextCommands[] = {"textbf", "textit", "textrm", "textnormal", "text",
                                              "mathrm", "mathbf", "mathit", "mathnormal", "mbox"};
  for (const char* cmd : kTextCommands) {
    const std::string pat = std::string("\\") + cmd;
    size_t pos = 0;
    while ((pos = s->find(pat, pos)) != std::string::npos) {
      size_t open = pos + pat.size();
      while (open < s->size() && (*s)[open] == ' ') ++open;
      if (open >= s->size() || (*s)[open] != '{') {
        pos += pat.size();
        continue;
      }
      const size_t close = MatchBrace(*s, open);
      if (close == std::string::npos) break;
      const std::string content = s->substr(open + 1, close - open - 1);
      const std::string trimmed = Trim(content);
      const bool math_constant = (pat == "\\mathrm" || pat == "\\mathbf") && trimmed.size() == 1;
      const bool unit = !Trim(s->substr(0, pos)).empty() && IsUnitWords(trimmed) && !math_constant;
      if (unit) {
        size_t end = close + 1;
        // A squared/cubed unit: "^2", "^{2}".
        if (end < s->size() && (*s)[end] == '^') {
          if (end + 1 < s->size() && std::isdigit(static_cast<unsigned char>((*s)[end + 1]))) {
            end += 2;
          } else if (end + 1 < s->size() && (*s)[end + 1] == '{') {
            const size_t c2 = MatchBrace(*s, end + 1);
            if (c2 != std::string::npos) end = c2 + 1;
          }
        }
        s->erase(pos, end - pos);
      } else {
        const std::string replacement = " " + content + " ";
        s->replace(pos, close + 1 - pos, replacement);
        pos += replacement.size();
      }
    }
  }
}

bool IsPlainUnit(std::string w) {
  static const std::set<std::string> kUnits = {
      "unit",     "units",  "cm",     "m",      "km",          "mm",      "inch",    "inches",
      "ft",       "feet",   "foot",   "yd",     "yard",        "yards",   "mile",    "miles",
      "mph",      "kg",     "g",      "mg",     "lb",          "lbs",     "pound",   "pounds",
      "oz",       "ounces", "s",      "sec",    "second",      "seconds", "min",     "minute",
      "minutes",  "hour",   "hours",  "hr",     "hrs",         "day",     "days",    "week",
      "weeks",    "year",   "years",  "degree", "degrees",     "dollar",  "dollars", "cent",
      "cents",    "meter",  "meters", "metres", "centimeters", "square",  "sq",      "cubic",
      "liter",    "liters", "litres", "ml",     "l",           "people",  "ways",    "points",
      "students", "percent"};
  while (!w.empty() && (w.back() == '.' || w.back() == '2' || w.back() == '3' || w.back() == '^'))
    w.pop_back();
  return kUnits.count(absl::AsciiStrToLower(w)) > 0;
}

// Drops plain-text unit words after a number: "12 square units" -> "12".
void DropPlainUnits(std::string* s) {
  std::vector<std::string> words = absl::StrSplit(*s, ' ', absl::SkipEmpty());
  if (words.size() < 2) return;
  const char first = words[0][0];
  if (!(std::isdigit(static_cast<unsigned char>(first)) || first == '-' || first == '.' ||
        words[0].rfind("\\frac", 0) == 0))
    return;
  size_t keep = words.size();
  while (keep > 1 && IsPlainUnit(words[keep - 1])) --keep;
  if (keep == words.size()) return;
  const std::string& last = words[keep - 1];
  const char tail = last.back();
  if (!std::isdigit(static_cast<unsigned char>(tail)) && tail != '}') return;
  words.resize(keep);
  *s = absl::StrJoin(words, " ");
}

// ---- Structured answers -----------------------------------------------------

struct Answer {
  enum Kind { kExpr, kTuple, kSet, kList, kUnion, kMatrix, kRelation, kText };
  Kind kind = kText;
  std::string text;              // canonical (whitespace removed)
  ExprPtr expr;                  // kExpr
  char open = 0, close = 0;      // kTuple: '(' or '[' / ')' or ']'
  std::vector<Answer> items;     // elements / sides / entries (row-major)
  std::vector<std::string> ops;  // kRelation: "<" "<=" ">" ">=" "=" "!=" between sides
  int rows = 0, cols = 0;        // kMatrix
};

const char* KindName(Answer::Kind kind) {
  switch (kind) {
    case Answer::kExpr:
      return "expression";
    case Answer::kTuple:
      return "tuple/interval";
    case Answer::kSet:
      return "set";
    case Answer::kList:
      return "list of answers";
    case Answer::kUnion:
      return "union";
    case Answer::kMatrix:
      return "matrix";
    case Answer::kRelation:
      return "relation";
    case Answer::kText:
      return "text";
  }
  return "?";
}

std::string Canonical(const std::string& s) {
  std::string out;
  for (char c : s)
    if (!std::isspace(static_cast<unsigned char>(c))) out += c;
  return out;
}

// Length of a separator at s[i] (depth 0), 0 when none. `rel` receives the
// canonical relation operator for relation separators.
using SeparatorFn = size_t (*)(const std::string& s, size_t i, std::string* rel);

size_t CommaSeparator(const std::string& s, size_t i, std::string*) {
  if (s[i] == ',' || s[i] == ';') return 1;
  for (const char* word : {" or ", " and "}) {
    const size_t n = std::char_traits<char>::length(word);
    if (s.compare(i, n, word) == 0) return n;
  }
  return 0;
}

size_t CupSeparator(const std::string& s, size_t i, std::string*) {
  if (s.compare(i, 4, "\\cup") == 0 &&
      (i + 4 >= s.size() || !std::isalpha(static_cast<unsigned char>(s[i + 4]))))
    return 4;
  if (s.compare(i, 1, "U") == 0 && i > 0 && i + 1 < s.size() &&
      (s[i - 1] == ')' || s[i - 1] == ']' || s[i - 1] == ' ') &&
      (s[i + 1] == '(' || s[i + 1] == '[' || s[i + 1] == ' '))
    return 1;
  return 0;
}

size_t RelationSeparator(const std::string& s, size_t i, std::string* rel) {
  static const std::pair<const char*, const char*> kOps[] = {
      {"\\leqslant", "<="}, {"\\geqslant", ">="}, {"\\leq", "<="}, {"\\geq", ">="}, {"\\le", "<="},
      {"\\ge", ">="},       {"\\neq", "!="},      {"\\ne", "!="},  {"\\lt", "<"},   {"\\gt", ">"},
      {"<=", "<="},         {">=", ">="},         {"!=", "!="},    {"=<", "<="},    {"=>", ">="},
      {"<", "<"},           {">", ">"},           {"=", "="}};
  for (const auto& [text, op] : kOps) {
    const size_t n = std::char_traits<char>::length(text);
    if (s.compare(i, n, text) != 0) continue;
    if (text[0] == '\\' && i + n < s.size() && std::isalpha(static_cast<unsigned char>(s[i + n])))
      continue;
    *rel = op;
    return n;
  }
  return 0;
}

// Splits `s` at separators outside ( [ { \{ groups. `ops` gets the relation
// operators when splitting relations.
std::vector<std::string> SplitTopLevel(const std::string& s, SeparatorFn sep,
                                       std::vector<std::string>* ops = nullptr) {
  std::vector<std::string> parts;
  int depth = 0;
  size_t last = 0;
  for (size_t i = 0; i < s.size();) {
    const char c = s[i];
    if (c == '\\' && i + 1 < s.size() && (s[i + 1] == '{' || s[i + 1] == '}')) {
      depth += s[i + 1] == '{' ? 1 : -1;
      i += 2;
      continue;
    }
    if (c == '(' || c == '[' || c == '{') {
      ++depth;
      ++i;
      continue;
    }
    if (c == ')' || c == ']' || c == '}') {
      --depth;
      ++i;
      continue;
    }
    if (depth == 0) {
      std::string rel;
      const size_t n = sep(s, i, &rel);
      if (n > 0) {
        parts.push_back(s.substr(last, i - last));
        if (ops != nullptr) ops->push_back(rel);
        i += n;
        last = i;
        continue;
      }
    }
    ++i;
  }
  parts.push_back(s.substr(last));
  return parts;
}

// True when the bracket at s[0] (one char, or "\{" when `escaped`) closes
// exactly at the end of `s`.
bool EnclosesWhole(const std::string& s) {
  int depth = 0;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '\\' && i + 1 < s.size() && (s[i + 1] == '{' || s[i + 1] == '}')) {
      depth += s[i + 1] == '{' ? 1 : -1;
      ++i;
    } else if (c == '(' || c == '[' || c == '{') {
      ++depth;
    } else if (c == ')' || c == ']' || c == '}') {
      --depth;
    } else {
      continue;
    }
    if (depth == 0 && i + 1 < s.size()) return false;
  }
  return depth == 0;
}

// A run of 3+ letters that is not a function name: the answer is a word.
bool LooksLikeWords(const std::string& s) {
  static const char* const kNames[] = {"sin", "cos",  "tan", "sec", "csc", "cot",  "ln",   "log",
                                       "exp", "sqrt", "abs", "pi",  "arc", "sinh", "cosh", "tanh"};
  for (size_t i = 0; i < s.size();) {
    if (s[i] == '\\') {  // a command: skip its name
      ++i;
      while (i < s.size() && std::isalpha(static_cast<unsigned char>(s[i]))) ++i;
      continue;
    }
    if (!std::isalpha(static_cast<unsigned char>(s[i]))) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < s.size() && std::isalpha(static_cast<unsigned char>(s[j]))) ++j;
    const std::string run = s.substr(i, j - i);
    if (run.size() >= 3) {
      bool mathy = false;
      for (const char* n : kNames)
        if (run.find(n) != std::string::npos) mathy = true;
      if (!mathy) return true;
    }
    i = j;
  }
  return false;
}

Answer ParseAnswer(const std::string& raw, int depth = 0);

Answer TextAnswer(const std::string& s) {
  Answer a;
  a.kind = Answer::kText;
  a.text = Canonical(s);
  return a;
}

std::vector<Answer> ParseItems(const std::vector<std::string>& parts, int depth) {
  std::vector<Answer> items;
  for (const std::string& p : parts) items.push_back(ParseAnswer(p, depth + 1));
  return items;
}

Answer ParseMatrix(const std::string& s, int depth) {
  // \begin{pmatrix} a & b \\ c & d \end{pmatrix} (also bmatrix, vmatrix, matrix, array).
  const size_t env_open = s.find('{');
  const size_t env_close = s.find('}', env_open);
  if (env_open == std::string::npos || env_close == std::string::npos) return TextAnswer(s);
  size_t body_begin = env_close + 1;
  const std::string env = s.substr(env_open + 1, env_close - env_open - 1);
  if (env == "array" && body_begin < s.size() && s[body_begin] == '{') {
    const size_t spec_close = MatchBrace(s, body_begin);
    if (spec_close == std::string::npos) return TextAnswer(s);
    body_begin = spec_close + 1;
  }
  const size_t body_end = s.rfind("\\end{");
  if (body_end == std::string::npos || body_end < body_begin) return TextAnswer(s);
  const std::string body = s.substr(body_begin, body_end - body_begin);
  Answer m;
  m.kind = Answer::kMatrix;
  m.text = Canonical(s);
  std::vector<std::string> rows;
  size_t last = 0;
  for (size_t pos; (pos = body.find("\\\\", last)) != std::string::npos; last = pos + 2)
    rows.push_back(body.substr(last, pos - last));
  rows.push_back(body.substr(last));
  while (!rows.empty() && Trim(rows.back()).empty()) rows.pop_back();
  for (const std::string& row : rows) {
    std::vector<std::string> cells = absl::StrSplit(row, '&');
    if (m.cols == 0) m.cols = static_cast<int>(cells.size());
    if (static_cast<int>(cells.size()) != m.cols) return TextAnswer(s);  // ragged
    for (const std::string& cell : cells) m.items.push_back(ParseAnswer(cell, depth + 1));
    ++m.rows;
  }
  return m;
}

Answer ParseAnswer(const std::string& raw, int depth) {
  const std::string s = Trim(raw);
  if (s.empty() || depth > 16) return TextAnswer(s);
  if (s.rfind("\\begin{", 0) == 0) return ParseMatrix(s, depth);

  std::vector<std::string> parts = SplitTopLevel(s, CupSeparator);
  if (parts.size() > 1) {
    Answer u;
    u.kind = Answer::kUnion;
    u.text = Canonical(s);
    u.items = ParseItems(parts, depth);
    return u;
  }
  parts = SplitTopLevel(s, CommaSeparator);
  if (parts.size() > 1) {
    Answer l;
    l.kind = Answer::kList;
    l.text = Canonical(s);
    for (const std::string& p : parts)
      if (!Trim(p).empty()) l.items.push_back(ParseAnswer(p, depth + 1));
    if (l.items.size() == 1) return l.items[0];
    return l;
  }
  std::vector<std::string> ops;
  parts = SplitTopLevel(s, RelationSeparator, &ops);
  if (parts.size() > 1) {
    Answer r;
    r.kind = Answer::kRelation;
    r.text = Canonical(s);
    r.ops = ops;
    r.items = ParseItems(parts, depth);
    return r;
  }
  if (s.size() >= 4 && s.rfind("\\{", 0) == 0 && s.compare(s.size() - 2, 2, "\\}") == 0 &&
      EnclosesWhole(s)) {
    Answer set;
    set.kind = Answer::kSet;
    set.text = Canonical(s);
    const std::string inner = Trim(s.substr(2, s.size() - 4));
    if (!inner.empty()) set.items = ParseItems(SplitTopLevel(inner, CommaSeparator), depth);
    return set;
  }
  if (s.size() >= 2 && (s[0] == '(' || s[0] == '[') && (s.back() == ')' || s.back() == ']') &&
      EnclosesWhole(s)) {
    const std::string inner = s.substr(1, s.size() - 2);
    std::vector<std::string> elems = SplitTopLevel(inner, CommaSeparator);
    if (elems.size() > 1) {
      Answer t;
      t.kind = Answer::kTuple;
      t.text = Canonical(s);
      t.open = s[0];
      t.close = s.back();
      t.items = ParseItems(elems, depth);
      return t;
    }
    if ((s[0] == '(') != (s.back() == ')')) return TextAnswer(s);  // "[5)" is not a number
    // A single parenthesised value: fall through to the expression parser.
  }
  if (LooksLikeWords(s)) return TextAnswer(s);
  auto expr = internal::ParseExpr(s);
  if (!expr.ok()) return TextAnswer(s);
  Answer e;
  e.kind = Answer::kExpr;
  e.text = Canonical(s);
  e.expr = *expr;
  return e;
}

// ---- Comparison --------------------------------------------------------------

class Comparer {
 public:
  Comparer(const MathOptions& options, uint64_t seed) : options_(options), seed_(seed) {}

  bool Equal(const Answer& ref, const Answer& cand) {
    // "x = 5" answers "5" (and the other way round).
    if (ref.kind != Answer::kRelation && cand.kind == Answer::kRelation) {
      if (const Answer* rhs = VariableEqualsRhs(cand)) return Equal(ref, *rhs);
    }
    if (cand.kind != Answer::kRelation && ref.kind == Answer::kRelation) {
      if (const Answer* rhs = VariableEqualsRhs(ref)) return Equal(*rhs, cand);
    }
    if (ref.kind == Answer::kText || cand.kind == Answer::kText) {
      Method("text");
      if (absl::AsciiStrToLower(ref.text) == absl::AsciiStrToLower(cand.text)) return true;
      return Fail(absl::StrCat("text '", cand.text, "' differs from '", ref.text, "'"));
    }
    const bool ref_many = ref.kind == Answer::kList || ref.kind == Answer::kSet;
    const bool cand_many = cand.kind == Answer::kList || cand.kind == Answer::kSet;
    if (ref_many && cand_many) return Unordered(ref.items, cand.items);
    if (ref.kind != cand.kind) {
      Method("structure");
      return Fail(absl::StrCat("a ", KindName(cand.kind), " where the reference is a ",
                               KindName(ref.kind)));
    }
    switch (ref.kind) {
      case Answer::kTuple:
        Method("structure");
        if (ref.open != cand.open || ref.close != cand.close)
          return Fail(absl::StrCat("brackets ", std::string(1, cand.open),
                                   std::string(1, cand.close), " differ from ",
                                   std::string(1, ref.open), std::string(1, ref.close)));
        return Ordered(ref.items, cand.items);
      case Answer::kUnion:
        return Unordered(ref.items, cand.items);
      case Answer::kMatrix:
        Method("structure");
        if (ref.rows != cand.rows || ref.cols != cand.cols)
          return Fail(absl::StrCat("matrix shape ", cand.rows, "x", cand.cols, " differs from ",
                                   ref.rows, "x", ref.cols));
        return Ordered(ref.items, cand.items);
      case Answer::kRelation:
        return RelationEqual(ref, cand);
      case Answer::kExpr:
        return ExprEqual(*ref.expr, *cand.expr);
      case Answer::kList:
      case Answer::kSet:
      case Answer::kText:
        break;
    }
    return Fail("unsupported structure");
  }

  const std::string& method() const { return method_; }
  const std::string& reason() const { return reason_; }

 private:
  static const Answer* VariableEqualsRhs(const Answer& a) {
    if (a.ops.size() == 1 && a.ops[0] == "=" && a.items[0].kind == Answer::kExpr &&
        a.items[0].expr->kind == Expr::kVar)
      return &a.items[1];
    return nullptr;
  }

  void Method(const std::string& m) {
    // The most specific method wins: structure < number/algebraic.
    if (method_.empty() || method_ == "structure") method_ = m;
  }
  bool Fail(const std::string& why) {
    if (reason_.empty()) reason_ = why;
    return false;
  }

  bool Ordered(const std::vector<Answer>& ref, const std::vector<Answer>& cand) {
    if (ref.size() != cand.size())
      return Fail(absl::StrCat(cand.size(), " elements where the reference has ", ref.size()));
    for (size_t k = 0; k < ref.size(); ++k)
      if (!Equal(ref[k], cand[k])) return false;
    return true;
  }

  bool Unordered(const std::vector<Answer>& ref, const std::vector<Answer>& cand) {
    Method("structure");
    if (ref.size() != cand.size())
      return Fail(absl::StrCat(cand.size(), " answers where the reference has ", ref.size()));
    std::vector<bool> used(cand.size(), false);
    for (const Answer& r : ref) {
      bool found = false;
      for (size_t k = 0; k < cand.size() && !found; ++k) {
        if (used[k]) continue;
        Comparer probe(options_, seed_);
        if (probe.Equal(r, cand[k])) {
          used[k] = true;
          found = true;
          if (method_ == "structure" || method_.empty()) method_ = probe.method();
        }
      }
      if (!found) return Fail(absl::StrCat("no answer matches '", r.text, "'"));
    }
    return true;
  }

  static std::string Flip(const std::string& op) {
    if (op == "<") return ">";
    if (op == ">") return "<";
    if (op == "<=") return ">=";
    if (op == ">=") return "<=";
    return op;  // = and != are symmetric
  }

  bool RelationEqual(const Answer& ref, const Answer& cand) {
    Method("structure");
    if (ref.items.size() != cand.items.size())
      return Fail(absl::StrCat("relation with ", cand.items.size(), " sides, reference has ",
                               ref.items.size()));
    if (ref.ops == cand.ops) {
      Comparer probe(options_, seed_);
      if (probe.Ordered(ref.items, cand.items)) {
        method_ = probe.method();
        return true;
      }
    }
    // The same relation read right to left: "5 < x" is "x > 5".
    std::vector<std::string> flipped;
    for (auto it = cand.ops.rbegin(); it != cand.ops.rend(); ++it) flipped.push_back(Flip(*it));
    if (ref.ops == flipped) {
      std::vector<Answer> reversed(cand.items.rbegin(), cand.items.rend());
      Comparer probe(options_, seed_);
      if (probe.Ordered(ref.items, reversed)) {
        method_ = probe.method();
        return true;
      }
    }
    return Fail(absl::StrCat("relation '", cand.text, "' differs from '", ref.text, "'"));
  }

  bool ValuesEqual(const Value& a, const Value& b) const {
    if (a.kind == Value::kExact && b.kind == Value::kExact) return a.q == b.q;
    if (a.d == b.d) return true;
    if (std::isinf(a.d) || std::isinf(b.d)) return false;
    const double diff = std::fabs(a.d - b.d);
    return diff <= options_.rel_tol * std::max(std::fabs(a.d), std::fabs(b.d)) || diff <= 1e-12;
  }

  bool ExprEqual(const Expr& ref, const Expr& cand) {
    std::set<std::string> ref_vars, cand_vars;
    internal::CollectVariables(ref, &ref_vars);
    internal::CollectVariables(cand, &cand_vars);
    if (internal::IsNumberLiteral(ref)) {
      Method("number");
      if (!internal::IsNumberLiteral(cand) && !options_.allow_unevaluated)
        return Fail("the answer is not a number in final form (an unevaluated expression)");
      if (!cand_vars.empty()) return Fail("the answer has variables; the reference is a number");
      const auto ref_int = internal::IntegerLiteralDigits(ref);
      const auto cand_int = internal::IntegerLiteralDigits(cand);
      if (ref_int && cand_int) {
        if (*ref_int == *cand_int) return true;
        return Fail(absl::StrCat(*cand_int, " != ", *ref_int));
      }
      const Value a = internal::Evaluate(ref, {}), b = internal::Evaluate(cand, {});
      if (a.kind == Value::kUndefined || b.kind == Value::kUndefined)
        return Fail("a value is undefined");
      if (ValuesEqual(a, b)) return true;
      return Fail("the values differ");
    }
    std::set<std::string> vars = ref_vars;
    vars.insert(cand_vars.begin(), cand_vars.end());
    if (vars.empty()) {
      Method("number");
      const Value a = internal::Evaluate(ref, {}), b = internal::Evaluate(cand, {});
      if (a.kind == Value::kUndefined || b.kind == Value::kUndefined)
        return Fail("a value is undefined");
      if (ValuesEqual(a, b)) return true;
      return Fail("the values differ");
    }
    Method("algebraic");
    // Seeded points: rationals +-n/d, n in [1,30], d in [1,7]. mt19937_64 is
    // specified bit-exactly by the standard, so points are the same everywhere.
    std::mt19937_64 rng(seed_ ^ 0x6d617468ULL);
    int valid = 0;
    const int want = std::max(options_.num_points, 3);
    for (int attempt = 0; attempt < 6 * want && valid < want; ++attempt) {
      std::map<std::string, Value> point;
      for (const std::string& v : vars) {
        const int64_t n = static_cast<int64_t>(rng() % 30) + 1;
        const int64_t d = static_cast<int64_t>(rng() % 7) + 1;
        // Alternate signs so that both half-lines are probed ("sqrt(x^2)" vs "x").
        const bool negative = attempt % 2 == 1 && (rng() & 3) != 0;
        point[v] = Value::Exact(*internal::MakeRational(negative ? -n : n, d));
      }
      const Value a = internal::Evaluate(ref, point), b = internal::Evaluate(cand, point);
      if (a.kind == Value::kUndefined || b.kind == Value::kUndefined) continue;
      ++valid;
      if (!ValuesEqual(a, b)) return Fail("the expressions differ at a sample point");
    }
    if (valid < 3) return Fail("too few points where both expressions are defined");
    return true;
  }

  const MathOptions& options_;
  uint64_t seed_;
  std::string method_;
  std::string reason_;
};

}  // namespace

std::optional<std::string> ExtractBoxed(const std::string& text) {
  size_t best = std::string::npos;
  size_t best_len = 0;
  for (const char* cmd : {"\\boxed", "\\fbox"}) {
    const size_t pos = text.rfind(cmd);
    if (pos != std::string::npos && (best == std::string::npos || pos > best)) {
      best = pos;
      best_len = std::char_traits<char>::length(cmd);
    }
  }
  if (best == std::string::npos) return std::nullopt;
  size_t i = best + best_len;
  while (i < text.size() && text[i] == ' ') ++i;
  if (i < text.size() && text[i] == '{') {
    const size_t close = MatchBrace(text, i);
    if (close == std::string::npos) return std::nullopt;
    return text.substr(i + 1, close - i - 1);
  }
  // "\boxed 5": up to the next '$' or whitespace.
  const size_t end = text.find_first_of("$ \n\t", i);
  std::string token = text.substr(i, end == std::string::npos ? std::string::npos : end - i);
  if (token.empty()) return std::nullopt;
  return token;
}

std::string NormalizeMathAnswer(const std::string& answer) {
  std::string s = answer;
  if (auto boxed = ExtractBoxed(s)) s = *boxed;
  // Unicode spellings.
  static const std::pair<const char*, const char*> kUnicode[] = {
      {"\xE2\x88\x92", "-"},      {"\xC3\x97", "\\times "},   {"\xC2\xB7", "\\cdot "},
      {"\xE2\x88\x9A", "\\sqrt"}, {"\xCF\x80", "\\pi "},      {"\xE2\x88\x9E", "\\infty "},
      {"\xE2\x89\xA4", "\\le "},  {"\xE2\x89\xA5", "\\ge "},  {"\xE2\x89\xA0", "\\ne "},
      {"\xC2\xB0", ""},           {"\xE2\x88\xAA", "\\cup "}, {"\xE2\x80\x89", " "},
      {"\xC2\xA0", " "}};
  for (const auto& [from, to] : kUnicode) ReplaceAllIn(&s, from, to);
  // Math-mode delimiters and display wrappers.
  for (const char* d : {"\\[", "\\]", "\\(", "\\)"}) ReplaceAllIn(&s, d, " ");
  ReplaceAllIn(&s, "\\$", "");
  ReplaceAllIn(&s, "$", "");
  for (const char* cmd : {"dfrac", "tfrac", "cfrac"}) ReplaceCommand(&s, cmd, "\\frac");
  for (const char* cmd :
       {"left", "right", "displaystyle", "bigl", "bigr", "Bigl", "Bigr", "big", "Big", "middle"})
    ReplaceCommand(&s, cmd, "");
  {
    // Spacing commands \! \, \; \: "\ " (but a row break "\\\\" stays).
    std::string out;
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] == '\\' && i + 1 < s.size()) {
        const char n = s[i + 1];
        if (n == '\\') {
          out += "\\\\";
          ++i;
          continue;
        }
        if (n == '!' || n == ',' || n == ';' || n == ':' || n == ' ') {
          out += ' ';
          ++i;
          continue;
        }
      }
      out += s[i];
    }
    s = std::move(out);
  }
  ReplaceAllIn(&s, "{,}", "");  // 1{,}000
  for (const char* cmd : {"quad", "qquad"}) ReplaceCommand(&s, cmd, " ");
  ReplaceAllIn(&s, "~", " ");
  ReplaceCommand(&s, "lbrace", "\\{");
  ReplaceCommand(&s, "rbrace", "\\}");
  for (const char* cmd : {"lvert", "rvert", "vert"}) ReplaceCommand(&s, cmd, "|");
  for (const char* cmd : {"emptyset", "varnothing"}) ReplaceCommand(&s, cmd, "\\{\\}");
  // Degrees and percent.
  for (const char* deg : {"^{\\circ}", "^\\circ", "{}^\\circ"}) ReplaceAllIn(&s, deg, "");
  ReplaceCommand(&s, "circ", "");
  ReplaceCommand(&s, "degree", "");
  ReplaceAllIn(&s, "\\%", "");
  ReplaceAllIn(&s, "%", "");
  UnwrapTextGroups(&s);
  // Collapse whitespace.
  std::string collapsed;
  for (char c : s) {
    if (std::isspace(static_cast<unsigned char>(c))) {
      if (!collapsed.empty() && collapsed.back() != ' ') collapsed += ' ';
    } else {
      collapsed += c;
    }
  }
  s = Trim(collapsed);
  // Trailing periods.
  while (!s.empty() && (s.back() == '.' || s.back() == ' ')) s.pop_back();
  DropPlainUnits(&s);
  // "x \in [0,1]" is the interval.
  static const internal::Regex kInPrefix = internal::Regex::CompileOrDie(R"(^[A-Za-z]\s*\\in\s*)");
  if (auto m = kInPrefix.FindAll(s); !m.empty()) s = s.substr(m[0].end);
  // Thousands separators in a lone number: 1,234,567.89.
  static const internal::Regex kThousands =
      internal::Regex::CompileOrDie(R"(^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$)");
  if (kThousands.Search(s)) s.erase(std::remove(s.begin(), s.end(), ','), s.end());
  return s;
}

MathVerdict GradeMathAnswer(const std::string& answer, const std::string& reference,
                            const MathOptions& options, uint64_t seed) {
  MathVerdict v;
  v.normalized_answer = NormalizeMathAnswer(answer);
  v.normalized_reference = NormalizeMathAnswer(reference);
  if (v.normalized_answer.empty()) {
    v.method = "none";
    v.reason = "empty answer";
    return v;
  }
  if (Canonical(v.normalized_answer) == Canonical(v.normalized_reference)) {
    v.correct = true;
    v.method = "string";
    return v;
  }
  // Answers beyond this size are not math a grader parses; they compare as
  // text (bounded work per completion).
  constexpr size_t kMaxParsedBytes = 4096;
  if (v.normalized_answer.size() > kMaxParsedBytes ||
      v.normalized_reference.size() > kMaxParsedBytes) {
    v.method = "text";
    v.reason = "answer too long to parse; text differs";
    return v;
  }
  const Answer ref = ParseAnswer(v.normalized_reference);
  const Answer cand = ParseAnswer(v.normalized_answer);
  Comparer comparer(options, seed);
  v.correct = comparer.Equal(ref, cand);
  v.method = comparer.method().empty() ? "structure" : comparer.method();
  if (!v.correct) v.reason = comparer.reason().empty() ? "not equal" : comparer.reason();
  return v;
}

// ---- The reward --------------------------------------------------------------

struct MathReward::Impl {
  MathOptions options;
  std::optional<internal::Regex> pattern;
};

absl::StatusOr<std::unique_ptr<MathReward>> MathReward::Create(const nlohmann::json& options) {
  RETURN_IF_ERROR(CheckKnownKeys(
      options, {"answer_pattern", "allow_unevaluated", "rel_tol", "num_points"}, "math options"));
  auto impl = std::make_shared<Impl>();
  ASSIGN_OR_RETURN(impl->options.answer_pattern,
                   GetString(options, "answer_pattern", "", "math options"));
  ASSIGN_OR_RETURN(impl->options.allow_unevaluated,
                   GetBool(options, "allow_unevaluated", false, "math options"));
  ASSIGN_OR_RETURN(impl->options.rel_tol, GetNumber(options, "rel_tol", 1e-9, "math options"));
  ASSIGN_OR_RETURN(const double points, GetNumber(options, "num_points", 8, "math options"));
  if (points < 3 || points > 1000 || points != std::floor(points))
    return absl::InvalidArgumentError("math options.num_points must be an integer in [3, 1000]");
  impl->options.num_points = static_cast<int>(points);
  if (impl->options.rel_tol < 0 || impl->options.rel_tol > 0.1)
    return absl::InvalidArgumentError("math options.rel_tol must be in [0, 0.1]");
  if (!impl->options.answer_pattern.empty()) {
    auto re = internal::Regex::Compile(impl->options.answer_pattern);
    if (!re.ok()) return Annotate(re.status(), "math options.answer_pattern");
    impl->pattern = *std::move(re);
  }
  return std::unique_ptr<MathReward>(new MathReward(std::move(impl)));
}

std::optional<std::string> MathReward::ExtractAnswer(const std::string& completion) const {
  const CompletionParts parts = SplitCompletion(completion);
  if (auto boxed = ExtractBoxed(parts.answer)) return boxed;
  if (impl_->pattern.has_value()) {
    const auto matches = impl_->pattern->FindAll(parts.answer);
    if (!matches.empty()) {
      const internal::RegexMatch& m = matches.back();
      return m.groups.size() > 1 ? m.groups[1] : m.groups[0];
    }
  }
  return std::nullopt;
}

absl::StatusOr<RewardResult> MathReward::Score(const nlohmann::json& record,
                                               const std::string& completion,
                                               const nlohmann::json& metadata) const {
  if (!record.is_object() || !record.contains("answer"))
    return absl::InvalidArgumentError("math reward: record.answer is missing");
  const nlohmann::json& ref_json = record["answer"];
  std::string reference;
  if (ref_json.is_string()) {
    reference = ref_json.get<std::string>();
  } else if (ref_json.is_number()) {
    reference = ref_json.dump();
  } else {
    return absl::InvalidArgumentError("math reward: record.answer must be a string or a number");
  }
  ASSIGN_OR_RETURN(const uint64_t seed, SeedOf(metadata));
  RewardResult result;
  result.diagnostics["reference"] = reference;
  bool thinking = false;
  if (record.contains("thinking") && record["thinking"].is_boolean())
    thinking = record["thinking"].get<bool>();
  if (metadata.is_object() && metadata.contains("thinking") && metadata["thinking"].is_boolean())
    thinking = metadata["thinking"].get<bool>();
  if (thinking && !SplitCompletion(completion).has_think_close) {
    result.diagnostics["reason"] = "thinking turn without </think>: the reasoning never ended";
    return result;
  }
  const std::optional<std::string> answer = ExtractAnswer(completion);
  if (!answer.has_value()) {
    result.diagnostics["reason"] = "no final answer (no \\boxed{} or answer pattern match)";
    return result;
  }
  const MathVerdict v = GradeMathAnswer(*answer, reference, impl_->options, seed);
  result.score = v.correct ? 1.0 : 0.0;
  result.diagnostics["extracted"] = *answer;
  result.diagnostics["normalized_answer"] = v.normalized_answer;
  result.diagnostics["normalized_reference"] = v.normalized_reference;
  result.diagnostics["method"] = v.method;
  if (!v.correct) result.diagnostics["reason"] = v.reason;
  return result;
}

}  // namespace retort::rewards
