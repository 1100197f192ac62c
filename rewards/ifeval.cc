// IFEval verifiable instructions (see ifeval.h). Each check follows the
// reference implementation (instructions.py / instructions_util.py of
// google-research/instruction_following_eval); where we differ it says so.
#include "rewards/ifeval.h"

#include <algorithm>
#include <cctype>
#include <functional>
#include <map>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "model/base/status_macros.h"
#include "rewards/internal/regex.h"

namespace retort::rewards {
namespace {

using internal::Regex;

enum class Arg { kInt, kString, kStringList, kRelation };

// Instruction id -> the kwargs it needs. Optional kwargs with IFEval's
// defaults are not listed (postscript_marker, section_spliter).
const std::map<std::string, std::vector<std::pair<std::string, Arg>>>& InstructionTable() {
  static const auto* table = new std::map<std::string, std::vector<std::pair<std::string, Arg>>>{
      {"keywords:existence", {{"keywords", Arg::kStringList}}},
      {"keywords:frequency",
       {{"keyword", Arg::kString}, {"frequency", Arg::kInt}, {"relation", Arg::kRelation}}},
      {"keywords:forbidden_words", {{"forbidden_words", Arg::kStringList}}},
      {"keywords:letter_frequency",
       {{"letter", Arg::kString}, {"let_frequency", Arg::kInt}, {"let_relation", Arg::kRelation}}},
      {"length_constraints:number_words", {{"num_words", Arg::kInt}, {"relation", Arg::kRelation}}},
      {"length_constraints:number_sentences",
       {{"num_sentences", Arg::kInt}, {"relation", Arg::kRelation}}},
      {"length_constraints:number_paragraphs", {{"num_paragraphs", Arg::kInt}}},
      {"length_constraints:nth_paragraph_first_word",
       {{"num_paragraphs", Arg::kInt}, {"nth_paragraph", Arg::kInt}, {"first_word", Arg::kString}}},
      {"detectable_content:number_placeholders", {{"num_placeholders", Arg::kInt}}},
      {"detectable_content:postscript", {}},
      {"detectable_format:number_bullet_lists", {{"num_bullets", Arg::kInt}}},
      {"detectable_format:constrained_response", {}},
      {"detectable_format:number_highlighted_sections", {{"num_highlights", Arg::kInt}}},
      {"detectable_format:multiple_sections", {{"num_sections", Arg::kInt}}},
      {"detectable_format:json_format", {}},
      {"detectable_format:title", {}},
      {"combination:two_responses", {}},
      {"combination:repeat_prompt", {{"prompt_to_repeat", Arg::kString}}},
      {"startend:end_checker", {{"end_phrase", Arg::kString}}},
      {"startend:quotation", {}},
      {"change_case:capital_word_frequency",
       {{"capital_frequency", Arg::kInt}, {"capital_relation", Arg::kRelation}}},
      {"change_case:english_capital", {}},
      {"change_case:english_lowercase", {}},
      {"punctuation:no_comma", {}},
  };
  return *table;
}

absl::Status CheckArg(const std::string& what, const nlohmann::json& v, Arg type) {
  bool ok = false;
  switch (type) {
    case Arg::kInt:
      ok = v.is_number_integer() && v.get<int64_t>() >= 0;
      break;
    case Arg::kString:
      ok = v.is_string();
      break;
    case Arg::kStringList:
      ok = v.is_array() &&
           std::all_of(v.begin(), v.end(), [](const nlohmann::json& x) { return x.is_string(); });
      break;
    case Arg::kRelation:
      ok = v.is_string() &&
           (v.get<std::string>() == "less than" || v.get<std::string>() == "at least");
      break;
  }
  if (ok) return absl::OkStatus();
  static const char* const kExpect[] = {"a non-negative integer", "a string", "a list of strings",
                                        "\"less than\" or \"at least\""};
  return absl::InvalidArgumentError(
      absl::StrCat(what, " must be ", kExpect[static_cast<int>(type)], ", got ", v.dump()));
}

bool Compare(int64_t count, const nlohmann::json& kwargs, const std::string& n_key,
             const std::string& rel_key) {
  const int64_t n = kwargs[n_key].get<int64_t>();
  return kwargs[rel_key].get<std::string>() == "less than" ? count < n : count >= n;
}

std::string Lower(const std::string& s) { return absl::AsciiStrToLower(s); }
std::string Strip(const std::string& s) { return std::string(absl::StripAsciiWhitespace(s)); }

std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && !(static_cast<unsigned char>(c) & 0x80))
      out += '\\';
    out += c;
  }
  return out;
}

// nltk RegexpTokenizer(r"\w+"): IFEval's word count.
int64_t CountWords(const std::string& text) {
  static const Regex kWord = Regex::CompileOrDie(R"(\w+)");
  return static_cast<int64_t>(kWord.FindAll(text).size());
}

// instructions_util.split_into_sentences, rule for rule.
std::vector<std::string> SplitIntoSentences(const std::string& input) {
  static const std::string kAlphabets = "([A-Za-z])";
  static const std::string kStarters =
      R"((Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|That\s|This\s|Wherever))";
  static const std::string kSuffixes = "(Inc|Ltd|Jr|Sr|Co)";
  static const std::vector<std::pair<Regex, std::string>>* rules = [] {
    auto* r = new std::vector<std::pair<Regex, std::string>>;
    auto add = [&](const std::string& p, const std::string& rep) {
      r->emplace_back(Regex::CompileOrDie(p), rep);
    };
    add("(Mr|St|Mrs|Ms|Dr)[.]", "$1<prd>");
    add("[.](com|net|org|io|gov|edu|me)", "<prd>$1");
    add("([0-9])[.]([0-9])", "$1<prd>$2");
    return r;
  }();
  static const std::vector<std::pair<Regex, std::string>>* rules2 = [] {
    auto* r = new std::vector<std::pair<Regex, std::string>>;
    auto add = [&](const std::string& p, const std::string& rep) {
      r->emplace_back(Regex::CompileOrDie(p), rep);
    };
    add(R"(\s)" + kAlphabets + "[.] ", " $1<prd> ");
    add("([A-Z][.][A-Z][.](?:[A-Z][.])?) " + kStarters, "$1<stop> $2");
    add(kAlphabets + "[.]" + kAlphabets + "[.]" + kAlphabets + "[.]", "$1<prd>$2<prd>$3<prd>");
    add(kAlphabets + "[.]" + kAlphabets + "[.]", "$1<prd>$2<prd>");
    add(" " + kSuffixes + "[.] " + kStarters, " $1<stop> $2");
    add(" " + kSuffixes + "[.]", " $1<prd>");
    add(" " + kAlphabets + "[.]", " $1<prd>");
    return r;
  }();
  static const Regex kMultipleDots = Regex::CompileOrDie(R"(\.{2,})");
  std::string text = " " + input + "  ";
  std::replace(text.begin(), text.end(), '\n', ' ');
  for (const auto& [re, rep] : *rules) text = re.Replace(text, rep);
  {
    std::string out;
    size_t last = 0;
    for (const auto& m : kMultipleDots.FindAll(text)) {
      out += text.substr(last, m.begin - last);
      for (size_t k = m.begin; k < m.end; ++k) out += "<prd>";
      out += "<stop>";
      last = m.end;
    }
    text = out + text.substr(last);
  }
  auto replace_all = [&](const std::string& from, const std::string& to) {
    size_t pos = 0;
    while ((pos = text.find(from, pos)) != std::string::npos) {
      text.replace(pos, from.size(), to);
      pos += to.size();
    }
  };
  replace_all("Ph.D.", "Ph<prd>D<prd>");
  for (const auto& [re, rep] : *rules2) text = re.Replace(text, rep);
  replace_all(".\xE2\x80\x9D", "\xE2\x80\x9D.");
  replace_all(".\"", "\".");
  replace_all("!\"", "\"!");
  replace_all("?\"", "\"?");
  replace_all(".", ".<stop>");
  replace_all("?", "?<stop>");
  replace_all("!", "!<stop>");
  replace_all("<prd>", ".");
  std::vector<std::string> sentences;
  for (absl::string_view piece : absl::StrSplit(text, "<stop>"))
    sentences.push_back(Strip(std::string(piece)));
  if (!sentences.empty() && sentences.back().empty()) sentences.pop_back();
  return sentences;
}

// Python's str.isupper / str.islower for ASCII letters (other characters are
// uncased here; Python also cases non-ASCII letters).
bool HasCased(const std::string& s, bool upper) {
  bool any = false;
  for (unsigned char c : s) {
    if (std::isupper(c)) {
      if (!upper) return false;
      any = true;
    } else if (std::islower(c)) {
      if (upper) return false;
      any = true;
    }
  }
  return any;
}

absl::StatusOr<bool> Check(const IfEvalInstruction& ins, const std::string& value) {
  const std::string& id = ins.id;
  const nlohmann::json& kw = ins.kwargs;
  if (id == "keywords:existence") {
    for (const auto& k : kw["keywords"])
      if (Lower(value).find(Lower(k.get<std::string>())) == std::string::npos) return false;
    return true;
  }
  if (id == "keywords:frequency") {
    const std::string keyword = kw["keyword"].get<std::string>();
    if (keyword.empty()) return absl::InvalidArgumentError("keywords:frequency: empty keyword");
    const Regex re = Regex::CompileOrDie(Escape(keyword), Regex::kIgnoreCase);
    return Compare(static_cast<int64_t>(re.FindAll(value).size()), kw, "frequency", "relation");
  }
  if (id == "keywords:forbidden_words") {
    for (const auto& w : kw["forbidden_words"]) {
      const Regex re =
          Regex::CompileOrDie("\\b" + Escape(w.get<std::string>()) + "\\b", Regex::kIgnoreCase);
      if (re.Search(value)) return false;
    }
    return true;
  }
  if (id == "keywords:letter_frequency") {
    const std::string letter = Lower(kw["letter"].get<std::string>());
    if (letter.empty())
      return absl::InvalidArgumentError("keywords:letter_frequency: empty letter");
    const std::string text = Lower(value);
    int64_t count = 0;
    for (size_t pos = 0; (pos = text.find(letter, pos)) != std::string::npos; pos += letter.size())
      ++count;
    return Compare(count, kw, "let_frequency", "let_relation");
  }
  if (id == "length_constraints:number_words")
    return Compare(CountWords(value), kw, "num_words", "relation");
  if (id == "length_constraints:number_sentences")
    return Compare(static_cast<int64_t>(SplitIntoSentences(value).size()), kw, "num_sentences",
                   "relation");
  if (id == "length_constraints:number_paragraphs") {
    static const Regex kDivider = Regex::CompileOrDie(R"(\s?\*\*\*\s?)");
    const std::vector<std::string> paragraphs = kDivider.Split(value);
    int64_t count = static_cast<int64_t>(paragraphs.size());
    for (size_t k = 0; k < paragraphs.size(); ++k) {
      if (!Strip(paragraphs[k]).empty()) continue;
      if (k == 0 || k + 1 == paragraphs.size()) {
        --count;
      } else {
        return false;  // an empty paragraph between dividers
      }
    }
    return count == kw["num_paragraphs"].get<int64_t>();
  }
  if (id == "length_constraints:nth_paragraph_first_word") {
    static const Regex kBlank = Regex::CompileOrDie(R"(\n\n)");
    const std::vector<std::string> paragraphs = kBlank.Split(value);
    int64_t count = 0;
    for (const std::string& p : paragraphs)
      if (!Strip(p).empty()) ++count;
    const int64_t nth = kw["nth_paragraph"].get<int64_t>();
    if (nth < 1 || nth > count) return false;
    const std::string paragraph = Strip(paragraphs[nth - 1]);
    if (paragraph.empty()) return false;
    std::string word;
    for (absl::string_view w :
         absl::StrSplit(paragraph, absl::ByAnyChar(" \t\n\r"), absl::SkipEmpty())) {
      word = std::string(w);
      break;
    }
    // lstrip quotes, then keep up to the first punctuation mark.
    while (!word.empty() && (word[0] == '\'' || word[0] == '"')) word.erase(0, 1);
    std::string first;
    for (char c : word) {
      if (c == '.' || c == ',' || c == '?' || c == '!' || c == '\'' || c == '"') break;
      first += c;
    }
    return Lower(first) == Lower(kw["first_word"].get<std::string>()) &&
           count == kw["num_paragraphs"].get<int64_t>();
  }
  if (id == "detectable_content:number_placeholders") {
    static const Regex kPlaceholder = Regex::CompileOrDie(R"(\[.*?\])");
    return static_cast<int64_t>(kPlaceholder.FindAll(value).size()) >=
           kw["num_placeholders"].get<int64_t>();
  }
  if (id == "detectable_content:postscript") {
    const std::string marker =
        kw.contains("postscript_marker") && kw["postscript_marker"].is_string()
            ? kw["postscript_marker"].get<std::string>()
            : "P.S.";
    std::string pattern;
    if (marker == "P.P.S") {
      pattern = R"(\s*p\.\s?p\.\s?s.*$)";
    } else if (marker == "P.S.") {
      pattern = R"(\s*p\.\s?s\..*$)";
    } else {
      pattern = R"(\s*)" + Escape(Lower(marker)) + ".*$";
    }
    return Regex::CompileOrDie(pattern, Regex::kMultiline).Search(Lower(value));
  }
  if (id == "detectable_format:number_bullet_lists") {
    static const Regex kStar = Regex::CompileOrDie(R"(^\s*\*[^\*].*$)", Regex::kMultiline);
    static const Regex kDash = Regex::CompileOrDie(R"(^\s*-.*$)", Regex::kMultiline);
    const int64_t n =
        static_cast<int64_t>(kStar.FindAll(value).size() + kDash.FindAll(value).size());
    return n == kw["num_bullets"].get<int64_t>();
  }
  if (id == "detectable_format:constrained_response") {
    const std::string v = Strip(value);
    for (const char* option : {"My answer is yes.", "My answer is no.", "My answer is maybe."})
      if (v.find(option) != std::string::npos) return true;
    return false;
  }
  if (id == "detectable_format:number_highlighted_sections") {
    static const Regex kSingle = Regex::CompileOrDie(R"(\*[^\n\*]*\*)");
    static const Regex kDouble = Regex::CompileOrDie(R"(\*\*[^\n\*]*\*\*)");
    int64_t n = 0;
    for (const auto& m : kSingle.FindAll(value)) {
      std::string h = m.groups[0];
      while (!h.empty() && h.front() == '*') h.erase(0, 1);
      while (!h.empty() && h.back() == '*') h.pop_back();
      if (!Strip(h).empty()) ++n;
    }
    for (const auto& m : kDouble.FindAll(value)) {
      const std::string& h = m.groups[0];
      if (!Strip(h.substr(2, h.size() - 4)).empty()) ++n;
    }
    return n >= kw["num_highlights"].get<int64_t>();
  }
  if (id == "detectable_format:multiple_sections") {
    const std::string splitter = kw.contains("section_spliter") && kw["section_spliter"].is_string()
                                     ? kw["section_spliter"].get<std::string>()
                                     : "Section";
    const Regex re = Regex::CompileOrDie(R"(\s?)" + Escape(Strip(splitter)) + R"(\s?\d+\s?)");
    const int64_t sections = static_cast<int64_t>(re.Split(value).size()) - 1;
    return sections >= kw["num_sections"].get<int64_t>();
  }
  if (id == "detectable_format:json_format") {
    std::string v = Strip(value);
    for (const char* prefix : {"```json", "```Json", "```JSON", "```"}) {
      if (absl::StartsWith(v, prefix)) {
        v = v.substr(std::char_traits<char>::length(prefix));
        break;
      }
    }
    if (absl::EndsWith(v, "```")) v.resize(v.size() - 3);
    return nlohmann::json::accept(Strip(v));
  }
  if (id == "detectable_format:title") {
    static const Regex kTitle = Regex::CompileOrDie(R"(<<[^\n]+>>)");
    for (const auto& m : kTitle.FindAll(value)) {
      std::string t = m.groups[0];
      while (!t.empty() && t.front() == '<') t.erase(0, 1);
      while (!t.empty() && t.back() == '>') t.pop_back();
      if (!Strip(t).empty()) return true;
    }
    return false;
  }
  if (id == "combination:two_responses") {
    std::vector<std::string> valid;
    const std::vector<std::string> parts = absl::StrSplit(value, "******");
    for (size_t k = 0; k < parts.size(); ++k) {
      if (Strip(parts[k]).empty()) {
        if (k != 0 && k + 1 != parts.size()) return false;
      } else {
        valid.push_back(parts[k]);
      }
    }
    return valid.size() == 2 && Strip(valid[0]) != Strip(valid[1]);
  }
  if (id == "combination:repeat_prompt")
    return absl::StartsWith(Lower(Strip(value)),
                            Lower(Strip(kw["prompt_to_repeat"].get<std::string>())));
  if (id == "startend:end_checker") {
    std::string v = Strip(value);
    while (!v.empty() && v.front() == '"') v.erase(0, 1);
    while (!v.empty() && v.back() == '"') v.pop_back();
    return absl::EndsWith(Lower(v), Lower(Strip(kw["end_phrase"].get<std::string>())));
  }
  if (id == "startend:quotation") {
    const std::string v = Strip(value);
    return v.size() > 1 && v.front() == '"' && v.back() == '"';
  }
  if (id == "change_case:capital_word_frequency") {
    static const Regex kWord = Regex::CompileOrDie(R"(\w+)");
    int64_t n = 0;
    for (const auto& m : kWord.FindAll(value))
      if (HasCased(m.groups[0], /*upper=*/true)) ++n;
    return Compare(n, kw, "capital_frequency", "capital_relation");
  }
  if (id == "change_case:english_capital") return HasCased(value, /*upper=*/true);
  if (id == "change_case:english_lowercase") return HasCased(value, /*upper=*/false);
  if (id == "punctuation:no_comma") return value.find(',') == std::string::npos;
  return absl::InvalidArgumentError("unknown IFEval instruction '" + id + "'");
}

absl::Status Validate(const IfEvalInstruction& ins, const std::string& what) {
  const auto& table = InstructionTable();
  auto it = table.find(ins.id);
  if (it == table.end()) {
    if (ins.id == "language:response_language")
      return absl::InvalidArgumentError(
          what + ": language:response_language needs a language detector; not supported");
    return absl::InvalidArgumentError(what + ": unknown IFEval instruction '" + ins.id + "'");
  }
  if (!ins.kwargs.is_object())
    return absl::InvalidArgumentError(what + ".kwargs must be an object");
  for (const auto& [key, type] : it->second) {
    if (!ins.kwargs.contains(key))
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": ", ins.id, " needs kwarg '", key, "'"));
    RETURN_IF_ERROR(CheckArg(absl::StrCat(what, ".", key), ins.kwargs[key], type));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<IfEvalInstruction>> ParseIfEvalConstraints(const nlohmann::json& list) {
  std::vector<IfEvalInstruction> out;
  if (list.is_object() && list.contains("instruction_id_list")) {
    const nlohmann::json& ids = list["instruction_id_list"];
    const nlohmann::json kwargs =
        list.contains("kwargs") ? list["kwargs"] : nlohmann::json::array();
    if (!ids.is_array() || !kwargs.is_array() || (!kwargs.empty() && kwargs.size() != ids.size()))
      return absl::InvalidArgumentError(
          "constraints: instruction_id_list and kwargs must be arrays of the same length");
    for (size_t k = 0; k < ids.size(); ++k) {
      if (!ids[k].is_string())
        return absl::InvalidArgumentError(
            absl::StrCat("constraints.instruction_id_list[", k, "] must be a string"));
      IfEvalInstruction ins{ids[k].get<std::string>(), kwargs.empty() || kwargs[k].is_null()
                                                           ? nlohmann::json::object()
                                                           : kwargs[k]};
      // IFEval's data pads kwargs with nulls for unused keys.
      if (ins.kwargs.is_object()) {
        nlohmann::json clean = nlohmann::json::object();
        for (const auto& [key, v] : ins.kwargs.items())
          if (!v.is_null()) clean[key] = v;
        ins.kwargs = clean;
      }
      RETURN_IF_ERROR(Validate(ins, absl::StrCat("constraints[", k, "]")));
      out.push_back(std::move(ins));
    }
  } else if (list.is_array()) {
    for (size_t k = 0; k < list.size(); ++k) {
      const nlohmann::json& item = list[k];
      const std::string what = absl::StrCat("constraints[", k, "]");
      if (!item.is_object() || !item.contains("id") || !item["id"].is_string())
        return absl::InvalidArgumentError(what + " must be an object with a string \"id\"");
      IfEvalInstruction ins;
      ins.id = item["id"].get<std::string>();
      if (item.contains("kwargs")) {
        ins.kwargs = item["kwargs"];
      } else {
        ins.kwargs = nlohmann::json::object();
        for (const auto& [key, v] : item.items())
          if (key != "id" && !v.is_null()) ins.kwargs[key] = v;
      }
      RETURN_IF_ERROR(Validate(ins, what));
      out.push_back(std::move(ins));
    }
  } else {
    return absl::InvalidArgumentError(
        "constraints must be an array of {\"id\", kwargs...} or {\"instruction_id_list\", "
        "\"kwargs\"}");
  }
  if (out.empty()) return absl::InvalidArgumentError("constraints: the list is empty");
  return out;
}

absl::StatusOr<bool> CheckInstruction(const IfEvalInstruction& instruction,
                                      const std::string& response) {
  RETURN_IF_ERROR(Validate(instruction, "instruction"));
  return Check(instruction, response);
}

absl::StatusOr<bool> CheckInstructionLoose(const IfEvalInstruction& instruction,
                                           const std::string& response) {
  RETURN_IF_ERROR(Validate(instruction, "instruction"));
  const std::vector<std::string> lines = absl::StrSplit(response, '\n');
  auto join = [&](size_t begin, size_t end) {
    std::vector<std::string> part;
    for (size_t k = begin; k < end && k < lines.size(); ++k) part.push_back(lines[k]);
    return Strip(absl::StrJoin(part, "\n"));
  };
  const size_t n = lines.size();
  std::vector<std::string> variants = {response, join(1, n), join(0, n == 0 ? 0 : n - 1),
                                       join(1, n == 0 ? 0 : n - 1)};
  for (size_t k = 0; k < 4; ++k) {
    std::string no_stars = variants[k];
    no_stars.erase(std::remove(no_stars.begin(), no_stars.end(), '*'), no_stars.end());
    variants.push_back(no_stars);
  }
  for (const std::string& v : variants) {
    if (Strip(v).empty()) continue;
    ASSIGN_OR_RETURN(const bool ok, Check(instruction, v));
    if (ok) return true;
  }
  return false;
}

absl::StatusOr<std::unique_ptr<IfEvalReward>> IfEvalReward::Create(const nlohmann::json& options) {
  RETURN_IF_ERROR(CheckKnownKeys(options, {"mode", "aggregate"}, "ifeval options"));
  ASSIGN_OR_RETURN(const std::string mode, GetString(options, "mode", "strict", "ifeval options"));
  ASSIGN_OR_RETURN(const std::string aggregate,
                   GetString(options, "aggregate", "all", "ifeval options"));
  if (mode != "strict" && mode != "loose")
    return absl::InvalidArgumentError(
        "ifeval options.mode must be \"strict\" or \"loose\", got \"" + mode + "\"");
  if (aggregate != "all" && aggregate != "fraction")
    return absl::InvalidArgumentError(
        "ifeval options.aggregate must be \"all\" or \"fraction\", got \"" + aggregate + "\"");
  return std::unique_ptr<IfEvalReward>(new IfEvalReward(mode == "loose", aggregate == "all"));
}

absl::StatusOr<RewardResult> IfEvalReward::Score(const nlohmann::json& record,
                                                 const std::string& completion,
                                                 const nlohmann::json& metadata) const {
  if (!record.is_object() || !record.contains("constraints"))
    return absl::InvalidArgumentError("ifeval reward: record.constraints is missing");
  auto parsed = ParseIfEvalConstraints(record["constraints"]);
  if (!parsed.ok()) return Annotate(parsed.status(), "record");
  const std::string response = SplitCompletion(completion).answer;
  RewardResult r;
  nlohmann::json details = nlohmann::json::array();
  int followed = 0;
  for (const IfEvalInstruction& ins : *parsed) {
    ASSIGN_OR_RETURN(const bool strict, Check(ins, response));
    bool loose = strict;
    if (!strict) {
      ASSIGN_OR_RETURN(loose, CheckInstructionLoose(ins, response));
    }
    const bool ok = loose_ ? loose : strict;
    followed += ok;
    details.push_back({{"id", ins.id}, {"strict", strict}, {"loose", loose}});
  }
  const int total = static_cast<int>(parsed->size());
  r.score = all_ ? (followed == total ? 1.0 : 0.0) : static_cast<double>(followed) / total;
  r.diagnostics["instructions"] = details;
  r.diagnostics["followed"] = followed;
  r.diagnostics["total"] = total;
  r.diagnostics["mode"] = loose_ ? "loose" : "strict";
  return r;
}

}  // namespace retort::rewards
