// Expression parser and exact/real evaluator for the math grader (see
// math_expr.h).
#include "rewards/internal/math_expr.h"

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <utility>

#include "absl/strings/str_cat.h"

namespace retort::rewards::internal {
namespace {

__int128 Gcd(__int128 a, __int128 b) {
  if (a < 0) a = -a;
  if (b < 0) b = -b;
  while (b != 0) {
    const __int128 t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// 2^126: parts beyond this are treated as overflow so that negation and the
// sums below never wrap.
constexpr __int128 kLimit = static_cast<__int128>(1) << 126;

bool MulOverflows(__int128 a, __int128 b, __int128* out) {
  if (__builtin_mul_overflow(a, b, out)) return true;
  return *out >= kLimit || *out <= -kLimit;
}

}  // namespace

std::optional<Rational> MakeRational(__int128 num, __int128 den) {
  if (den == 0) return std::nullopt;
  if (num >= kLimit || num <= -kLimit || den >= kLimit || den <= -kLimit) return std::nullopt;
  if (den < 0) {
    num = -num;
    den = -den;
  }
  const __int128 g = Gcd(num, den);
  if (g > 1) {
    num /= g;
    den /= g;
  }
  return Rational{num, den};
}

std::optional<Rational> RationalAdd(const Rational& a, const Rational& b) {
  __int128 x, y, d;
  if (MulOverflows(a.num, b.den, &x) || MulOverflows(b.num, a.den, &y) ||
      MulOverflows(a.den, b.den, &d))
    return std::nullopt;
  return MakeRational(x + y, d);
}

std::optional<Rational> RationalMul(const Rational& a, const Rational& b) {
  // Cross-reduce first so that products of reduced fractions stay small.
  const __int128 g1 = Gcd(a.num, b.den), g2 = Gcd(b.num, a.den);
  const __int128 an = g1 > 1 ? a.num / g1 : a.num, bd = g1 > 1 ? b.den / g1 : b.den;
  const __int128 bn = g2 > 1 ? b.num / g2 : b.num, ad = g2 > 1 ? a.den / g2 : a.den;
  __int128 n, d;
  if (MulOverflows(an, bn, &n) || MulOverflows(ad, bd, &d)) return std::nullopt;
  return MakeRational(n, d);
}

std::optional<Rational> RationalDiv(const Rational& a, const Rational& b) {
  if (b.num == 0) return std::nullopt;
  const Rational inverse = b.num < 0 ? Rational{-b.den, -b.num} : Rational{b.den, b.num};
  return RationalMul(a, inverse);
}

Value Value::Real(double x) {
  if (std::isnan(x)) return Undefined();
  Value v;
  v.kind = kReal;
  v.d = x;
  return v;
}

namespace {

// ---- Parser ---------------------------------------------------------------

const char* const kAsciiFunctions[] = {  // longest first where one is a prefix of another
    "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "sqrt", "sin", "cos",
    "tan",    "sec",    "csc",    "cot",  "exp",  "abs",  "ln",   "log"};
const char* const kLatexFunctions[] = {"arcsin", "arccos", "arctan", "sinh", "cosh",
                                       "tanh",   "sin",    "cos",    "tan",  "sec",
                                       "csc",    "cot",    "exp",    "ln",   "log"};
const char* const kGreek[] = {
    "alpha",    "beta",    "gamma", "delta",  "epsilon", "varepsilon", "zeta",  "eta",   "theta",
    "vartheta", "iota",    "kappa", "lambda", "mu",      "nu",         "xi",    "rho",   "sigma",
    "tau",      "upsilon", "phi",   "varphi", "chi",     "psi",        "omega", "Gamma", "Delta",
    "Theta",    "Lambda",  "Xi",    "Sigma",  "Phi",     "Psi",        "Omega"};

ExprPtr Make(Expr::Kind kind, std::vector<ExprPtr> args = {}, std::string text = "") {
  auto e = std::make_shared<Expr>();
  e->kind = kind;
  e->args = std::move(args);
  e->text = std::move(text);
  return e;
}

class Parser {
 public:
  explicit Parser(const std::string& s) : s_(s) {}

  absl::StatusOr<ExprPtr> ParseAll() {
    ExprPtr e = ParseSum();
    SkipSpace();
    if (e == nullptr || !error_.empty()) return Fail();
    if (i_ != s_.size()) {
      if (error_.empty()) error_ = "unexpected text";
      return Fail();
    }
    return e;
  }

 private:
  absl::Status Fail() const {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot parse '", s_, "' at ", i_, ": ", error_.empty() ? "syntax" : error_));
  }
  void SkipSpace() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool AtEnd() {
    SkipSpace();
    return i_ >= s_.size();
  }
  char Peek() {
    SkipSpace();
    return i_ < s_.size() ? s_[i_] : '\0';
  }
  // The LaTeX command name at i_ ("frac" for "\frac12"), without consuming.
  std::string PeekCommand() {
    SkipSpace();
    if (i_ >= s_.size() || s_[i_] != '\\') return "";
    size_t j = i_ + 1;
    while (j < s_.size() && std::isalpha(static_cast<unsigned char>(s_[j]))) ++j;
    return s_.substr(i_ + 1, j - i_ - 1);
  }
  bool Error(const std::string& what) {
    if (error_.empty()) error_ = what;
    return false;
  }

  ExprPtr ParseSum() {
    ExprPtr left = ParseProduct();
    while (left != nullptr) {
      const char c = Peek();
      if (c == '+' || c == '-') {
        ++i_;
        ExprPtr right = ParseProduct();
        if (right == nullptr) return nullptr;
        left = Make(c == '+' ? Expr::kAdd : Expr::kSub, {left, right});
      } else if (PeekCommand() == "pm" || PeekCommand() == "mp") {
        Error("\\pm is not a single value");
        return nullptr;
      } else {
        break;
      }
    }
    return left;
  }

  bool StartsImplicitFactor() {
    const char c = Peek();
    if (c == '\0') return false;
    if (std::isdigit(static_cast<unsigned char>(c)) || std::isalpha(static_cast<unsigned char>(c)))
      return true;
    if (c == '(' || c == '{') return true;
    if (c == '.' && i_ + 1 < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_ + 1])))
      return true;
    if (c == '\\') {
      const std::string cmd = PeekCommand();
      static const char* const kNotFactor[] = {
          "cdot", "times", "div",  "right", "le",  "leq",      "ge",        "geq",
          "ne",   "neq",   "lt",   "gt",    "in",  "cup",      "cap",       "pm",
          "mp",   "to",    "quad", "qquad", "end", "setminus", "rightarrow"};
      for (const char* n : kNotFactor)
        if (cmd == n) return false;
      return !cmd.empty();
    }
    return false;
  }

  ExprPtr ParseProduct() {
    ExprPtr left = ParseUnary();
    while (left != nullptr) {
      const char c = Peek();
      const std::string cmd = PeekCommand();
      if (c == '*' || cmd == "cdot" || cmd == "times") {
        i_ += c == '*' ? 1 : cmd.size() + 1;
        ExprPtr right = ParseUnary();
        if (right == nullptr) return nullptr;
        left = Make(Expr::kMul, {left, right});
      } else if (c == '/' || cmd == "div") {
        i_ += c == '/' ? 1 : cmd.size() + 1;
        ExprPtr right = ParseUnary();
        if (right == nullptr) return nullptr;
        left = Make(Expr::kDiv, {left, right});
      } else if (StartsImplicitFactor()) {
        ExprPtr right = ParsePower();
        if (right == nullptr) return nullptr;
        auto m = std::make_shared<Expr>();
        m->kind = Expr::kMul;
        m->implicit = true;
        m->args = {left, right};
        left = m;
      } else {
        break;
      }
    }
    return left;
  }

  // Nesting bound: a hostile answer of 100k '(' must not overflow the stack.
  struct DepthGuard {
    explicit DepthGuard(int* depth) : depth_(depth) { ++*depth_; }
    ~DepthGuard() { --*depth_; }
    int* depth_;
  };
  static constexpr int kMaxDepth = 200;

  ExprPtr ParseUnary() {
    DepthGuard guard(&depth_);
    if (depth_ > kMaxDepth) {
      Error("nested too deeply");
      return nullptr;
    }
    const char c = Peek();
    if (c == '-' || c == '+') {
      ++i_;
      ExprPtr operand = ParseUnary();
      if (operand == nullptr) return nullptr;
      return c == '-' ? Make(Expr::kNeg, {operand}) : operand;
    }
    return ParsePower();
  }

  ExprPtr ParsePower() {
    ExprPtr base = ParsePostfix();
    if (base == nullptr) return nullptr;
    if (Peek() == '^') {
      ++i_;
      // The exponent is a signed factor with its own power, or a braced
      // group: "2^-1", "x^2", "e^x", "2^{10}", right-associative "2^3^2".
      ExprPtr exponent = ParseUnary();
      if (exponent == nullptr) return nullptr;
      return Make(Expr::kPow, {base, exponent});
    }
    return base;
  }

  ExprPtr ParsePostfix() {
    ExprPtr e = ParsePrimary();
    while (e != nullptr && Peek() == '!') {
      ++i_;
      e = Make(Expr::kFactorial, {e});
    }
    return e;
  }

  ExprPtr ParseGroup(char open, char close) {
    ++i_;  // open
    ExprPtr inner = ParseSum();
    if (inner == nullptr) return nullptr;
    if (Peek() != close) {
      Error(std::string("expected '") + close + "'");
      return nullptr;
    }
    ++i_;
    return inner;
  }

  // A LaTeX argument: a braced group, or a single character / command
  // ("\frac12", "\sqrt2", "\frac\pi2").
  ExprPtr ParseLatexArgument() {
    const char c = Peek();
    if (c == '{') return ParseGroup('{', '}');
    if (std::isdigit(static_cast<unsigned char>(c))) {
      ++i_;
      return Make(Expr::kNum, {}, std::string(1, c));
    }
    if (std::isalpha(static_cast<unsigned char>(c))) {
      ++i_;
      return c == 'e' ? Make(Expr::kE) : Make(Expr::kVar, {}, std::string(1, c));
    }
    if (c == '\\') return ParsePrimary();
    Error("expected an argument");
    return nullptr;
  }

  ExprPtr ParseNumber() {
    const size_t start = i_;
    while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
    if (i_ < s_.size() && s_[i_] == '.' && i_ + 1 < s_.size() &&
        std::isdigit(static_cast<unsigned char>(s_[i_ + 1]))) {
      ++i_;
      while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
    }
    // Scientific notation: e/E, optional sign, digits (else 'e' is Euler's number).
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      size_t j = i_ + 1;
      if (j < s_.size() && (s_[j] == '+' || s_[j] == '-')) ++j;
      if (j < s_.size() && std::isdigit(static_cast<unsigned char>(s_[j]))) {
        while (j < s_.size() && std::isdigit(static_cast<unsigned char>(s_[j]))) ++j;
        i_ = j;
      }
    }
    return Make(Expr::kNum, {}, s_.substr(start, i_ - start));
  }

  // A function application after its name: optional "^k" (\sin^2 x), the
  // argument (parenthesised, braced, or the next factor with its power).
  ExprPtr ParseFunctionTail(const std::string& name, ExprPtr base) {
    ExprPtr power;
    if (Peek() == '^') {
      ++i_;
      power = ParseUnary();
      if (power == nullptr) return nullptr;
    }
    ExprPtr arg;
    const char c = Peek();
    if (c == '(') {
      arg = ParseGroup('(', ')');
    } else if (c == '{') {
      arg = ParseGroup('{', '}');
    } else {
      arg = ParseUnary();
    }
    if (arg == nullptr) return nullptr;
    ExprPtr f =
        base != nullptr ? Make(Expr::kFunc, {base, arg}, name) : Make(Expr::kFunc, {arg}, name);
    return power != nullptr ? Make(Expr::kPow, {f, power}) : f;
  }

  ExprPtr ParseVariableTail(std::string name) {
    // Subscript: x_1, x_{12}, a_n.
    if (i_ < s_.size() && s_[i_] == '_') {
      ++i_;
      if (i_ < s_.size() && s_[i_] == '{') {
        const size_t close = s_.find('}', i_);
        if (close == std::string::npos) {
          Error("unclosed subscript");
          return nullptr;
        }
        name.push_back('_');
        name.append(s_, i_ + 1, close - i_ - 1);
        i_ = close + 1;
      } else if (i_ < s_.size() && std::isalnum(static_cast<unsigned char>(s_[i_]))) {
        name.push_back('_');
        name.push_back(s_[i_]);
        ++i_;
      } else {
        Error("bad subscript");
        return nullptr;
      }
    }
    return Make(Expr::kVar, {}, name);
  }

  ExprPtr ParseCommand() {
    ++i_;  // backslash
    size_t j = i_;
    while (j < s_.size() && std::isalpha(static_cast<unsigned char>(s_[j]))) ++j;
    std::string cmd = s_.substr(i_, j - i_);
    if (cmd.empty()) {
      Error("bad command");
      return nullptr;
    }
    auto known = [](const std::string& c) {
      static const char* const kOthers[] = {"frac",  "dfrac", "tfrac", "cfrac", "sqrt",        "pi",
                                            "infty", "infin", "left",  "right", "operatorname"};
      for (const char* n : kOthers)
        if (c == n) return true;
      for (const char* n : kLatexFunctions)
        if (c == n) return true;
      for (const char* n : kGreek)
        if (c == n) return true;
      return false;
    };
    if (!known(cmd)) {
      // "\pix", "\sinx": the longest known command that prefixes the letters.
      size_t best = 0;
      for (size_t len = cmd.size(); len > 0; --len) {
        if (known(cmd.substr(0, len))) {
          best = len;
          break;
        }
      }
      if (best == 0) {
        Error("unknown command \\" + cmd);
        return nullptr;
      }
      cmd = cmd.substr(0, best);
    }
    i_ += cmd.size();
    if (cmd == "left" || cmd == "right") return ParsePrimary();
    if (cmd == "frac" || cmd == "dfrac" || cmd == "tfrac" || cmd == "cfrac") {
      ExprPtr num = ParseLatexArgument();
      if (num == nullptr) return nullptr;
      ExprPtr den = ParseLatexArgument();
      if (den == nullptr) return nullptr;
      auto d = std::make_shared<Expr>();
      d->kind = Expr::kDiv;
      d->written_as_frac = true;
      d->args = {num, den};
      return d;
    }
    if (cmd == "sqrt") {
      ExprPtr index;
      if (Peek() == '[') {
        index = ParseGroup('[', ']');
        if (index == nullptr) return nullptr;
      }
      ExprPtr arg = ParseLatexArgument();
      if (arg == nullptr) return nullptr;
      return index != nullptr ? Make(Expr::kFunc, {index, arg}, "root")
                              : Make(Expr::kFunc, {arg}, "sqrt");
    }
    if (cmd == "pi") return Make(Expr::kPi);
    if (cmd == "infty" || cmd == "infin") return Make(Expr::kInf);
    if (cmd == "operatorname") {
      if (Peek() != '{') {
        Error("\\operatorname needs {name}");
        return nullptr;
      }
      const size_t close = s_.find('}', i_);
      if (close == std::string::npos) {
        Error("unclosed \\operatorname");
        return nullptr;
      }
      const std::string name = s_.substr(i_ + 1, close - i_ - 1);
      i_ = close + 1;
      return ParseFunctionTail(name, nullptr);
    }
    for (const char* n : kGreek)
      if (cmd == n) return ParseVariableTail(cmd);
    if (cmd == "log") {
      ExprPtr base;
      if (i_ < s_.size() && s_[i_] == '_') {
        ++i_;
        base = ParseLatexArgument();
        if (base == nullptr) return nullptr;
      }
      return ParseFunctionTail("log", base);
    }
    return ParseFunctionTail(cmd, nullptr);
  }

  ExprPtr ParsePrimary() {
    DepthGuard guard(&depth_);
    if (depth_ > kMaxDepth) {
      Error("nested too deeply");
      return nullptr;
    }
    const char c = Peek();
    if (c == '\0') {
      Error("unexpected end");
      return nullptr;
    }
    if (std::isdigit(static_cast<unsigned char>(c)) || c == '.') {
      if (c == '.' &&
          !(i_ + 1 < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_ + 1])))) {
        Error("stray '.'");
        return nullptr;
      }
      return ParseNumber();
    }
    if (c == '(') return ParseGroup('(', ')');
    if (c == '{') return ParseGroup('{', '}');
    if (c == '[') return ParseGroup('[', ']');
    if (c == '|') {
      ExprPtr inner = ParseGroup('|', '|');
      if (inner == nullptr) return nullptr;
      return Make(Expr::kFunc, {inner}, "abs");
    }
    if (c == '\\') return ParseCommand();
    if (std::isalpha(static_cast<unsigned char>(c))) {
      // ASCII function names and pi; otherwise a single-letter variable.
      for (const char* name : kAsciiFunctions) {
        const size_t n = std::char_traits<char>::length(name);
        if (s_.compare(i_, n, name) == 0) {
          i_ += n;
          if (std::string(name) == "log" && i_ < s_.size() && s_[i_] == '_') {
            ++i_;
            ExprPtr base = ParseLatexArgument();
            if (base == nullptr) return nullptr;
            return ParseFunctionTail("log", base);
          }
          return ParseFunctionTail(name, nullptr);
        }
      }
      if (s_.compare(i_, 2, "pi") == 0) {
        i_ += 2;
        return Make(Expr::kPi);
      }
      ++i_;
      if (c == 'e' && !(i_ < s_.size() && s_[i_] == '_')) return Make(Expr::kE);
      return ParseVariableTail(std::string(1, c));
    }
    Error(std::string("unexpected '") + c + "'");
    return nullptr;
  }

  const std::string& s_;
  size_t i_ = 0;
  int depth_ = 0;
  std::string error_;
};

// ---- Evaluation ------------------------------------------------------------

// Parses a decimal / scientific literal exactly; nullopt when it does not
// fit (the caller uses strtod).
std::optional<Rational> ParseLiteral(const std::string& text) {
  __int128 mantissa = 0;
  int frac_digits = 0;
  bool in_frac = false;
  size_t k = 0;
  for (; k < text.size(); ++k) {
    const char c = text[k];
    if (c == '.') {
      in_frac = true;
      continue;
    }
    if (c == 'e' || c == 'E') break;
    if (MulOverflows(mantissa, 10, &mantissa)) return std::nullopt;
    mantissa += c - '0';
    if (in_frac) ++frac_digits;
  }
  long exponent = -frac_digits;
  if (k < text.size()) {
    const long e = std::strtol(text.c_str() + k + 1, nullptr, 10);
    if (e > 60 || e < -60) return std::nullopt;
    exponent += e;
  }
  if (exponent > 60 || exponent < -60) return std::nullopt;
  __int128 scale = 1;
  for (long t = 0; t < std::labs(exponent); ++t) scale *= 10;
  if (mantissa == 0) return Rational{0, 1};
  if (exponent >= 0) {
    __int128 n;
    if (MulOverflows(mantissa, scale, &n)) return std::nullopt;
    return MakeRational(n, 1);
  }
  return MakeRational(mantissa, scale);
}

std::optional<Rational> PowInt(Rational base, long exponent) {
  if (exponent < 0) {
    if (base.num == 0) return std::nullopt;
    base = base.num < 0 ? Rational{-base.den, -base.num} : Rational{base.den, base.num};
    exponent = -exponent;
  }
  if (exponent > 256) return std::nullopt;
  Rational result{1, 1};
  for (long t = 0; t < exponent; ++t) {
    auto r = RationalMul(result, base);
    if (!r) return std::nullopt;
    result = *r;
  }
  return result;
}

// floor(x^(1/n)) exactly for x >= 0 when it is a perfect power; nullopt otherwise.
std::optional<__int128> ExactRoot(__int128 x, int n) {
  if (x < 0) return std::nullopt;
  if (x < 2) return x;
  const double approx = std::pow(static_cast<double>(x), 1.0 / n);
  for (__int128 r = static_cast<__int128>(approx) - 1; r <= static_cast<__int128>(approx) + 1;
       ++r) {
    if (r < 0) continue;
    __int128 p = 1;
    bool over = false;
    for (int t = 0; t < n && !over; ++t) over = MulOverflows(p, r, &p);
    if (!over && p == x) return r;
  }
  return std::nullopt;
}

Value Arith(Expr::Kind kind, const Value& a, const Value& b) {
  if (a.kind == Value::kUndefined || b.kind == Value::kUndefined) return Value::Undefined();
  if (a.kind == Value::kExact && b.kind == Value::kExact) {
    std::optional<Rational> r;
    switch (kind) {
      case Expr::kAdd:
        r = RationalAdd(a.q, b.q);
        break;
      case Expr::kSub:
        r = RationalAdd(a.q, Rational{-b.q.num, b.q.den});
        break;
      case Expr::kMul:
        r = RationalMul(a.q, b.q);
        break;
      case Expr::kDiv:
        if (b.q.num == 0) return Value::Undefined();
        r = RationalDiv(a.q, b.q);
        break;
      default:
        break;
    }
    if (r) return Value::Exact(*r);
  }
  const double x = a.d, y = b.d;
  switch (kind) {
    case Expr::kAdd:
      return Value::Real(x + y);
    case Expr::kSub:
      return Value::Real(x - y);
    case Expr::kMul:
      return Value::Real(x * y);
    case Expr::kDiv:
      return y == 0.0 ? Value::Undefined() : Value::Real(x / y);
    default:
      return Value::Undefined();
  }
}

Value Power(const Value& base, const Value& exponent) {
  if (base.kind == Value::kUndefined || exponent.kind == Value::kUndefined)
    return Value::Undefined();
  if (base.kind == Value::kExact && exponent.kind == Value::kExact) {
    const Rational& e = exponent.q;
    if (e.den == 1 && e.num >= -256 && e.num <= 256) {
      if (base.q.num == 0 && e.num < 0) return Value::Undefined();
      if (auto r = PowInt(base.q, static_cast<long>(e.num))) return Value::Exact(*r);
    } else if (e.den <= 12 && e.num >= -256 && e.num <= 256 && base.q.num >= 0) {
      // b^(p/q) exactly when num and den of b are perfect q-th powers.
      const int q = static_cast<int>(e.den);
      auto rn = ExactRoot(base.q.num, q);
      auto rd = ExactRoot(base.q.den, q);
      if (rn && rd) {
        if (*rn == 0 && e.num < 0) return Value::Undefined();
        if (auto r = PowInt(Rational{*rn, *rd}, static_cast<long>(e.num))) return Value::Exact(*r);
      }
    }
  }
  const double b = base.d, x = exponent.d;
  if (b < 0 && x != std::floor(x)) {
    // Real odd roots of negatives: (-8)^(1/3) = -2.
    if (exponent.kind == Value::kExact && exponent.q.den % 2 == 1) {
      const double mag = std::pow(-b, x);
      return Value::Real(exponent.q.num % 2 == 0 ? mag : -mag);
    }
    return Value::Undefined();
  }
  if (b == 0 && x < 0) return Value::Undefined();
  return Value::Real(std::pow(b, x));
}

Value ApplyFunction(const std::string& name, const std::vector<Value>& args) {
  for (const Value& a : args)
    if (a.kind == Value::kUndefined) return Value::Undefined();
  const Value& x = args.back();
  if (name == "sqrt") return Power(x, Value::Exact(Rational{1, 2}));
  if (name == "root") {
    if (args[0].kind != Value::kExact || args[0].q.den != 1 || args[0].q.num < 1 ||
        args[0].q.num > 12)
      return Value::Undefined();
    return Power(x, Value::Exact(Rational{1, args[0].q.num}));
  }
  if (name == "abs") {
    if (x.kind == Value::kExact)
      return Value::Exact(Rational{x.q.num < 0 ? -x.q.num : x.q.num, x.q.den});
    return Value::Real(std::fabs(x.d));
  }
  const double v = x.d;
  if (name == "sin") return Value::Real(std::sin(v));
  if (name == "cos") return Value::Real(std::cos(v));
  if (name == "tan") return Value::Real(std::tan(v));
  if (name == "sec") return Value::Real(1.0 / std::cos(v));
  if (name == "csc") return std::sin(v) == 0 ? Value::Undefined() : Value::Real(1.0 / std::sin(v));
  if (name == "cot") return std::tan(v) == 0 ? Value::Undefined() : Value::Real(1.0 / std::tan(v));
  if (name == "arcsin") return std::fabs(v) > 1 ? Value::Undefined() : Value::Real(std::asin(v));
  if (name == "arccos") return std::fabs(v) > 1 ? Value::Undefined() : Value::Real(std::acos(v));
  if (name == "arctan") return Value::Real(std::atan(v));
  if (name == "sinh") return Value::Real(std::sinh(v));
  if (name == "cosh") return Value::Real(std::cosh(v));
  if (name == "tanh") return Value::Real(std::tanh(v));
  if (name == "exp") {
    if (x.kind == Value::kExact && x.q.num == 0) return Value::Exact(Rational{1, 1});
    return Value::Real(std::exp(v));
  }
  if (name == "ln" || name == "log") {
    if (v <= 0) return Value::Undefined();
    if (x.kind == Value::kExact && x.q.num == 1 && x.q.den == 1)
      return Value::Exact(Rational{0, 1});
    if (args.size() == 2) {
      const double b = args[0].d;
      if (b <= 0 || b == 1) return Value::Undefined();
      // log_b x exactly when x is an integer power of an integer b (log_2 8 = 3).
      if (args[0].kind == Value::kExact && x.kind == Value::kExact && args[0].q.den == 1 &&
          x.q.den == 1) {
        __int128 p = args[0].q.num;
        for (int k = 1; k <= 127; ++k) {
          if (p == x.q.num) return Value::Exact(Rational{k, 1});
          if (MulOverflows(p, args[0].q.num, &p)) break;
        }
      }
      return Value::Real(std::log(v) / std::log(b));
    }
    // "log" without a base is the natural log, as in most contest solutions' \log.
    return Value::Real(std::log(v));
  }
  return Value::Undefined();  // an unknown \operatorname
}

bool IsIntegerNum(const Expr& e) {
  return e.kind == Expr::kNum && e.text.find_first_of(".eE") == std::string::npos;
}
bool IsSignedNum(const Expr& e, bool integer_only) {
  const Expr& x = e.kind == Expr::kNeg ? *e.args[0] : e;
  return x.kind == Expr::kNum && (!integer_only || IsIntegerNum(x));
}
bool IsTen(const Expr& e) { return e.kind == Expr::kNum && e.text == "10"; }

}  // namespace

absl::StatusOr<ExprPtr> ParseExpr(const std::string& text) { return Parser(text).ParseAll(); }

void CollectVariables(const Expr& e, std::set<std::string>* out) {
  if (e.kind == Expr::kVar) out->insert(e.text);
  for (const ExprPtr& a : e.args) CollectVariables(*a, out);
}

Value Evaluate(const Expr& e, const std::map<std::string, Value>& vars) {
  switch (e.kind) {
    case Expr::kNum: {
      if (auto r = ParseLiteral(e.text)) return Value::Exact(*r);
      return Value::Real(std::strtod(e.text.c_str(), nullptr));
    }
    case Expr::kVar: {
      auto it = vars.find(e.text);
      return it == vars.end() ? Value::Undefined() : it->second;
    }
    case Expr::kPi:
      return Value::Real(M_PI);
    case Expr::kE:
      return Value::Real(M_E);
    case Expr::kInf:
      return Value::Real(HUGE_VAL);
    case Expr::kAdd:
    case Expr::kSub:
    case Expr::kMul:
    case Expr::kDiv:
      return Arith(e.kind, Evaluate(*e.args[0], vars), Evaluate(*e.args[1], vars));
    case Expr::kPow:
      return Power(Evaluate(*e.args[0], vars), Evaluate(*e.args[1], vars));
    case Expr::kNeg: {
      const Value v = Evaluate(*e.args[0], vars);
      if (v.kind == Value::kExact) return Value::Exact(Rational{-v.q.num, v.q.den});
      if (v.kind == Value::kReal) return Value::Real(-v.d);
      return v;
    }
    case Expr::kFunc: {
      std::vector<Value> args;
      for (const ExprPtr& a : e.args) args.push_back(Evaluate(*a, vars));
      return ApplyFunction(e.text, args);
    }
    case Expr::kFactorial: {
      const Value v = Evaluate(*e.args[0], vars);
      if (v.kind != Value::kExact || v.q.den != 1 || v.q.num < 0 || v.q.num > 30)
        return Value::Undefined();
      Rational r{1, 1};
      for (__int128 k = 2; k <= v.q.num; ++k) r.num *= k;  // 30! < 2^108
      return Value::Exact(r);
    }
  }
  return Value::Undefined();
}

bool IsNumberLiteral(const Expr& e) {
  const Expr& x = e.kind == Expr::kNeg ? *e.args[0] : e;
  switch (x.kind) {
    case Expr::kNum:
    case Expr::kInf:
      return true;
    case Expr::kDiv:
      return IsSignedNum(*x.args[0], true) && IsSignedNum(*x.args[1], true);
    case Expr::kPow:  // 10^k
      return IsTen(*x.args[0]) && IsSignedNum(*x.args[1], true);
    case Expr::kMul:  // m \times 10^k
      return !x.implicit && x.args[0]->kind == Expr::kNum && x.args[1]->kind == Expr::kPow &&
             IsTen(*x.args[1]->args[0]) && IsSignedNum(*x.args[1]->args[1], true);
    default:
      return false;
  }
}

std::optional<std::string> IntegerLiteralDigits(const Expr& e) {
  const bool negative = e.kind == Expr::kNeg;
  const Expr& x = negative ? *e.args[0] : e;
  if (!IsIntegerNum(x)) return std::nullopt;
  size_t k = 0;
  while (k + 1 < x.text.size() && x.text[k] == '0') ++k;
  std::string digits = x.text.substr(k);
  if (digits == "0") return digits;
  return negative ? "-" + digits : digits;
}

}  // namespace retort::rewards::internal
