// The expression layer of the math grader: a parser for LaTeX / ASCII
// mathematical expressions and an evaluator that computes exactly with
// rationals where it can (integers, fractions, decimals, integer powers,
// perfect roots) and in double precision otherwise (pi, e, trig, logs).
//
// Grammar (loosest to tightest): sums (+ -), products (* \cdot \times / \div
// and implicit multiplication "2x", "x(y+1)", "\sqrt2\pi"), unary +/-, powers
// (^, right-associative; "x^2", "x^{2+y}"), postfix "!", primaries: numbers
// ("12", "0.5", ".5", "1.5e-3"), variables (a letter with an optional
// subscript "x_1", "a_{12}", or a Greek letter), constants (\pi, pi, e,
// \infty), groups ( ) { } and |x|, \frac{a}{b} (and \frac12), \sqrt{x},
// \sqrt[n]{x}, functions (\sin \cos \tan \sec \csc \cot \arcsin \arccos
// \arctan \sinh \cosh \tanh \ln \log \log_b \exp, ASCII sin(x) sqrt(x) ...,
// "\sin^2 x").
//
// Thread-safety: parsed expressions are immutable; everything here is pure.
#ifndef RETORT_REWARDS_INTERNAL_MATH_EXPR_H_
#define RETORT_REWARDS_INTERNAL_MATH_EXPR_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace retort::rewards::internal {

// A rational num/den in lowest terms, den > 0. 128-bit parts; operations
// that would overflow return nullopt and the caller falls back to double.
struct Rational {
  __int128 num = 0;
  __int128 den = 1;
  bool operator==(const Rational& o) const { return num == o.num && den == o.den; }
  double ToDouble() const { return static_cast<double>(num) / static_cast<double>(den); }
};
std::optional<Rational> MakeRational(__int128 num, __int128 den);
std::optional<Rational> RationalAdd(const Rational& a, const Rational& b);
std::optional<Rational> RationalMul(const Rational& a, const Rational& b);
std::optional<Rational> RationalDiv(const Rational& a,
                                    const Rational& b);  // nullopt for b == 0 too

// The value of an expression at a point.
struct Value {
  enum Kind { kUndefined, kExact, kReal };
  Kind kind = kUndefined;
  Rational q;      // kExact
  double d = 0.0;  // kReal (may be +-inf for \infty); also set for kExact
  static Value Undefined() { return Value{}; }
  static Value Exact(const Rational& r) { return Value{kExact, r, r.ToDouble()}; }
  static Value Real(double x);  // NaN -> kUndefined
};

struct Expr;
using ExprPtr = std::shared_ptr<const Expr>;

struct Expr {
  enum Kind { kNum, kVar, kPi, kE, kInf, kAdd, kSub, kMul, kDiv, kPow, kNeg, kFunc, kFactorial };
  Kind kind = kNum;
  std::string text;              // kNum: the literal ("0.50", "1.5e3"); kVar: name; kFunc: name
  bool written_as_frac = false;  // kDiv from \frac (vs "/")
  bool implicit = false;         // kMul by juxtaposition
  std::vector<ExprPtr> args;     // operands; kFunc "log": {base, x}; "root": {n, x}
};

// Parses one expression (no top-level commas or relations). InvalidArgument
// with the position when the text is not an expression we understand.
absl::StatusOr<ExprPtr> ParseExpr(const std::string& text);

// Names of the variables in `e`.
void CollectVariables(const Expr& e, std::set<std::string>* out);

// Evaluates `e` with `vars` bound. Unbound variables are kUndefined.
Value Evaluate(const Expr& e, const std::map<std::string, Value>& vars);

// A number written as a final answer: an integer, decimal or scientific
// literal, a fraction of two integer literals (\frac{a}{b}, a/b), 10^k,
// m\times10^k, \infty, each optionally negated. "1+2", "2\cdot3", "\sqrt4"
// are not literals.
bool IsNumberLiteral(const Expr& e);
// The integer literal's digits with sign ("-12", "7") when `e` is one
// (possibly negated, leading zeros removed), for exact comparison of
// integers of any size.
std::optional<std::string> IntegerLiteralDigits(const Expr& e);

}  // namespace retort::rewards::internal

#endif  // RETORT_REWARDS_INTERNAL_MATH_EXPR_H_
