// `retort forward`, `retort generate`, `retort inspect`: the V4 model from the CLI.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "controller/command.h"
#include "controller/flags.h"
#include "controller/model_backend.h"
#include "model/base/status_macros.h"
#include "model/io/safetensors.h"
#include "model/tokenizer/chat_template.h"
#include "model/tokenizer/tokenizer.h"
#include "model/v4/model.h"
#include "rollout/engine/engine.h"
#include "rollout/engine/sampler.h"
#include "rollout/service/rollout_client.h"

ABSL_FLAG(int64_t, decode_from, -1, "forward: prefill this many tokens, then decode one at a time");
ABSL_FLAG(std::string, compare, "",
          "forward: reference safetensors (logits, decode_logits); exit 1 if any differs by more than --tolerance");
ABSL_FLAG(double, tolerance, 1e-4, "forward --compare: max absolute logit difference");
ABSL_FLAG(std::string, tokens, "", "generate: prompt token ids, space-separated");
ABSL_FLAG(int32_t, max_new_tokens, 32, "generate: tokens to sample at most");
ABSL_FLAG(double, temperature, 1.0, "generate: sampling temperature (0: greedy)");
ABSL_FLAG(double, top_p, 1.0, "generate: nucleus sampling mass (1: off)");
ABSL_FLAG(int32_t, top_k, 0, "generate: sample among the k most likely tokens (0: off)");
ABSL_FLAG(std::string, prompt, "",
          "generate: user text, rendered with the V4 chat template and encoded with the model's tokenizer "
          "(--tokenizer, default --model); the completion is printed as text");
ABSL_FLAG(std::string, reasoning, "none", "generate --prompt: reasoning mode none|high|max");
ABSL_FLAG(bool, ignore_eos, false, "generate: keep sampling after the end-of-sequence token");
ABSL_FLAG(std::string, worker, "",
          "generate: host:port[,host:port...] of rollout workers to generate on instead of loading the model "
          "(same flags; --prompt is rendered here with --tokenizer or --model DIR's tokenizer)");
ABSL_FLAG(double, worker_deadline_s, 600, "generate --worker: deadline of the whole call, retries included");
ABSL_FLAG(int64_t, context, 4096, "inspect: context length for the KV-state size");

namespace retort::controller {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "retort: %s\n", s.ToString().c_str());
  return 1;
}

// A one-line status that rewrites itself: done/total, rate and ETA.
// Redraws at most twice a second on a terminal; elsewhere prints every 10 s and at the end.
void Progress(const char* what, int64_t done, int64_t total, double secs, int64_t tokens) {
  static double last = -1.0;
  const bool tty = isatty(fileno(stderr));
  if (done != total && last >= 0 && secs - last < (tty ? 0.5 : 10.0) && secs >= last) return;
  last = done == total ? -1.0 : secs;
  const double rate = secs > 0 ? tokens / secs : 0.0;
  const double eta = done > 0 ? secs * (total - done) / done : 0.0;
  if (tty) std::fprintf(stderr, "\r");
  std::fprintf(stderr, "%s %lld/%lld  %.1f tok/s  ETA %.0fs   ", what, static_cast<long long>(done),
               static_cast<long long>(total), rate, eta);
  if (done == total || !tty) std::fprintf(stderr, "\n");
}

absl::Status Forward() {
  const std::string in_path = absl::GetFlag(FLAGS_input), out_path = absl::GetFlag(FLAGS_output);
  if (in_path.empty() || out_path.empty()) return absl::InvalidArgumentError("--input and --output are required");
  ASSIGN_OR_RETURN(auto in, io::SafetensorsFile::Open(in_path));
  ASSIGN_OR_RETURN(Tensor ids, in->Get("input_ids"));
  if (ids.rank() != 2 || (ids.dtype() != DType::kI64 && ids.dtype() != DType::kI32))
    return absl::InvalidArgumentError(absl::StrCat(in_path, ": input_ids must be int64 [B, T], got ", ids.DebugString()));
  const int64_t B = ids.dim(0), T = ids.dim(1);
  // Two sets of sequences: the full forward and the --decode-from run.
  ASSIGN_OR_RETURN(auto model, LoadBackendFromFlags(static_cast<int>(2 * B), T));
  const int64_t V = model->config().vocab_size;
  std::vector<int64_t> tok(B * T);
  for (int64_t i = 0; i < B * T; ++i)
    tok[i] = ids.dtype() == DType::kI64 ? ids.data<int64_t>()[i] : ids.data<int32_t>()[i];

  std::vector<std::pair<std::string, Tensor>> outputs;
  const auto t0 = Clock::now();
  {
    std::vector<ModelBackend::Chunk> chunks;
    for (int64_t b = 0; b < B; ++b) {
      ASSIGN_OR_RETURN(int seq, model->NewSequence());
      chunks.push_back({seq, absl::MakeConstSpan(tok.data() + b * T, T)});
    }
    ASSIGN_OR_RETURN(std::vector<float> logits, model->Step(chunks));
    outputs.emplace_back("logits", Tensor::FromF32(logits, {B, T, V}));
  }
  std::fprintf(stderr, "forward on %s: %lld x %lld tokens in %.3fs (%.1f tok/s)\n", model->Describe().c_str(),
               static_cast<long long>(B),
               static_cast<long long>(T), Seconds(t0, Clock::now()), B * T / Seconds(t0, Clock::now()));
  const int64_t P = absl::GetFlag(FLAGS_decode_from);
  if (P >= 0) {
    if (P < 1 || P >= T)
      return absl::InvalidArgumentError(absl::StrCat("--decode-from must be in [1, ", T - 1, "], got ", P));
    std::vector<ModelBackend::Chunk> chunks;
    for (int64_t b = 0; b < B; ++b) {
      ASSIGN_OR_RETURN(int seq, model->NewSequence());
      chunks.push_back({seq, absl::MakeConstSpan(tok.data() + b * T, P)});
    }
    RETURN_IF_ERROR(model->Step(chunks).status());
    std::vector<float> dec(B * (T - P) * V);
    const auto t1 = Clock::now();
    for (int64_t j = 0; j < T - P; ++j) {
      for (int64_t b = 0; b < B; ++b) chunks[b].tokens = absl::MakeConstSpan(tok.data() + b * T + P + j, 1);
      ASSIGN_OR_RETURN(std::vector<float> step, model->Step(chunks));
      for (int64_t b = 0; b < B; ++b)
        std::copy(step.begin() + b * V, step.begin() + (b + 1) * V, dec.begin() + (b * (T - P) + j) * V);
      Progress("decode", j + 1, T - P, Seconds(t1, Clock::now()), (j + 1) * B);
    }
    outputs.emplace_back("decode_logits", Tensor::FromF32(dec, {B, T - P, V}));
  }
  RETURN_IF_ERROR(io::WriteSafetensors(out_path, outputs, {{"producer", "retort forward"}}));
  std::fprintf(stderr, "wrote %s\n", out_path.c_str());

  const std::string ref_path = absl::GetFlag(FLAGS_compare);
  if (!ref_path.empty()) {
    ASSIGN_OR_RETURN(auto ref, io::SafetensorsFile::Open(ref_path));
    const double tol = absl::GetFlag(FLAGS_tolerance);
    bool ok = true;
    for (const auto& [name, t] : outputs) {
      if (!ref->Has(name)) continue;
      ASSIGN_OR_RETURN(Tensor r, ref->Get(name));
      if (r.shape() != t.shape() || r.dtype() != DType::kF32)
        return absl::InvalidArgumentError(absl::StrCat(ref_path, ": '", name, "' is ", r.DebugString(), ", expected ",
                                                       t.DebugString()));
      double worst = 0.0;
      for (int64_t i = 0; i < t.numel(); ++i)
        worst = std::max(worst, static_cast<double>(std::fabs(t.data<float>()[i] - r.data<float>()[i])));
      std::printf("%-14s max |retort - reference| = %.3g  (tolerance %.1g)  %s\n", name.c_str(), worst, tol,
                  worst <= tol ? "ok" : "FAIL");
      ok &= worst <= tol;
    }
    if (!ok) return absl::OutOfRangeError("logits differ from the reference beyond the tolerance");
  }
  return absl::OkStatus();
}

int RunForward(const std::vector<std::string>& args) {
  absl::Status s = Forward();
  return s.ok() ? 0 : Fail(s);
}

absl::StatusOr<std::vector<int64_t>> ParseIds(const std::string& text) {
  std::vector<int64_t> ids;
  for (absl::string_view part : absl::StrSplit(text, absl::ByAnyChar(" ,\t\n"), absl::SkipEmpty())) {
    int64_t v;
    if (!absl::SimpleAtoi(part, &v))
      return absl::InvalidArgumentError(absl::StrCat("--tokens: '", std::string(part), "' is not a token id"));
    ids.push_back(v);
  }
  if (ids.empty()) return absl::InvalidArgumentError("--tokens is empty");
  return ids;
}

// Reports a generated completion like the offline path: ids (or streamed text)
// on stdout, rate and log-prob on stderr, and the completion parse when a
// tokenizer rendered the prompt.
void PrintCompletionSummary(const tokenizer::Tokenizer* tok, tokenizer::ReasoningMode mode,
                            const std::vector<int64_t>& out) {
  if (!tok) return;
  std::vector<tokenizer::TokenId> ids(out.begin(), out.end());
  tokenizer::ParsedCompletion parsed = tokenizer::ParseCompletion(tok->Decode(ids), mode);
  std::fprintf(stderr, "completion: %s%s%s (reasoning %zu chars, answer %zu chars)\n",
               tokenizer::CompletionStatusName(parsed.status), parsed.error.empty() ? "" : ": ",
               parsed.error.c_str(), parsed.reasoning.size(), parsed.content.size());
}

// `generate --worker`: the same request sent to rollout workers (failover in
// the order given); the worker's sampler, seed and log-probs.
absl::Status GenerateOnWorkers(const std::vector<int64_t>& prompt, const rollout::SamplingParams& sp,
                               int32_t max_new, const tokenizer::Tokenizer* tok, tokenizer::ReasoningMode mode) {
  if (max_new < 1) return absl::InvalidArgumentError("generate --worker: --max-new-tokens must be >= 1");
  rollout::RolloutClientOptions o;
  o.workers = absl::StrSplit(absl::GetFlag(FLAGS_worker), ',', absl::SkipEmpty());
  o.deadline = absl::Seconds(absl::GetFlag(FLAGS_worker_deadline_s));
  rollout::RolloutClient client(o);
  retort::v1::GenerateBatch batch;
  retort::v1::GenerateRequest* r = batch.add_requests();
  r->set_request_id(absl::StrCat("generate-", getpid(), "-", absl::ToUnixNanos(absl::Now())));
  for (int64_t t : prompt) r->mutable_prompt_ids()->add_ids(t);
  retort::v1::SamplingParams* p = r->mutable_sampling();
  p->set_temperature(sp.temperature);
  p->set_top_p(sp.top_p);
  p->set_top_k(sp.top_k);
  p->set_seed(sp.seed);
  p->set_max_new_tokens(max_new);
  p->set_n(1);
  p->set_ignore_eos(absl::GetFlag(FLAGS_ignore_eos));
  const auto t0 = Clock::now();
  ASSIGN_OR_RETURN(std::vector<retort::v1::Completion> done, client.GenerateAll(batch));
  const double seconds = Seconds(t0, Clock::now());
  if (done.size() != 1) return absl::InternalError(absl::StrCat("worker returned ", done.size(), " completions for 1"));
  const retort::v1::Completion& c = done.front();
  std::vector<int64_t> out(c.token_ids().begin(), c.token_ids().end());
  double sum_logprob = 0.0;
  for (float lp : c.logprobs()) sum_logprob += lp;
  if (tok) {
    std::vector<tokenizer::TokenId> ids(out.begin(), out.end());
    std::printf("%s\n", tok->Decode(ids).c_str());
  } else {
    std::string line;
    for (size_t i = 0; i < out.size(); ++i) absl::StrAppend(&line, i ? " " : "", out[i]);
    std::printf("%s\n", line.c_str());
  }
  std::fprintf(stderr, "worker: prompt %zu tokens, generated %zu tokens in %.3fs (%.1f tok/s, end to end), finish %s, "
               "weight version %lld, sum log-prob %.3f\n",
               prompt.size(), out.size(), seconds, out.size() / std::max(seconds, 1e-9),
               rollout::FinishReasonName(c.finish_reason()),
               static_cast<long long>(c.weight_versions_size() ? c.weight_versions(c.weight_versions_size() - 1) : 0),
               sum_logprob);
  PrintCompletionSummary(tok, mode, out);
  return absl::OkStatus();
}

absl::Status Generate() {
  const bool remote = !absl::GetFlag(FLAGS_worker).empty();
  const std::string prompt_text = absl::GetFlag(FLAGS_prompt);
  if (prompt_text.empty() == absl::GetFlag(FLAGS_tokens).empty())
    return absl::InvalidArgumentError("give exactly one of --tokens \"1 2 3\" or --prompt \"text\"");
  std::vector<int64_t> prompt;
  std::unique_ptr<tokenizer::Tokenizer> tok;
  tokenizer::ReasoningMode mode = tokenizer::ReasoningMode::kNone;
  if (!prompt_text.empty()) {
    std::string dir = absl::GetFlag(FLAGS_tokenizer);
    if (dir.empty()) dir = absl::GetFlag(FLAGS_model);
    if (dir.empty()) return absl::InvalidArgumentError("--prompt needs --tokenizer DIR or --model DIR to render the chat template");
    ASSIGN_OR_RETURN(tok, tokenizer::Tokenizer::LoadDir(dir));
    ASSIGN_OR_RETURN(mode, tokenizer::ParseReasoningMode(absl::GetFlag(FLAGS_reasoning)));
    tokenizer::Message user;
    user.role = tokenizer::Role::kUser;
    user.content = prompt_text;
    tokenizer::ChatOptions opts;
    opts.reasoning = mode;
    ASSIGN_OR_RETURN(std::vector<tokenizer::TokenId> ids, tokenizer::RenderChatIds(*tok, {user}, opts));
    prompt.assign(ids.begin(), ids.end());
  } else {
    ASSIGN_OR_RETURN(prompt, ParseIds(absl::GetFlag(FLAGS_tokens)));
  }
  rollout::SamplingParams sp;
  sp.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  sp.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  sp.top_k = absl::GetFlag(FLAGS_top_k);
  sp.seed = absl::GetFlag(FLAGS_seed);
  RETURN_IF_ERROR(rollout::ValidateSamplingParams(sp));
  const int32_t max_new = absl::GetFlag(FLAGS_max_new_tokens);
  if (max_new < 0) return absl::InvalidArgumentError("--max-new-tokens must be >= 0");
  if (remote) return GenerateOnWorkers(prompt, sp, max_new, tok.get(), mode);
  ASSIGN_OR_RETURN(auto model, LoadBackendFromFlags(1, static_cast<int64_t>(prompt.size()) + max_new));
  rollout::Sampler sampler(sp);
  ASSIGN_OR_RETURN(int seq, model->NewSequence());
  const int64_t eos = tok && tok->eos_id() ? *tok->eos_id() : model->config().eos_token_id;
  ModelBackend::Chunk chunk = {seq, prompt};
  std::vector<int64_t> out;
  double sum_logprob = 0.0, prefill_s = 0.0;
  std::unique_ptr<tokenizer::StreamDecoder> stream;
  if (tok) stream = std::make_unique<tokenizer::StreamDecoder>(tok.get());
  const auto t0 = Clock::now();
  auto t1 = t0;
  for (int32_t i = 0; i < max_new; ++i) {
    ASSIGN_OR_RETURN(rollout::SampledToken s, model->StepAndSample(chunk, sampler));
    if (i == 0) {
      t1 = Clock::now();
      prefill_s = Seconds(t0, t1);  // the prompt's step and the first sample
    }
    out.push_back(s.token);
    sum_logprob += s.logprob;
    if (stream) {  // text streams as it is generated, UTF-8 safe across tokens
      std::fputs(stream->Push(static_cast<tokenizer::TokenId>(s.token)).c_str(), stdout);
      std::fflush(stdout);
    }
    if (s.token == eos && !absl::GetFlag(FLAGS_ignore_eos)) break;
    chunk.tokens = absl::MakeConstSpan(&out.back(), 1);
  }
  if (stream) {
    std::printf("%s\n", stream->Finish().c_str());
  } else {
    std::string line;
    for (size_t i = 0; i < out.size(); ++i) absl::StrAppend(&line, i ? " " : "", out[i]);
    std::printf("%s\n", line.c_str());
  }
  const double decode_s = Seconds(t1, Clock::now());
  const size_t decoded = out.empty() ? 0 : out.size() - 1;
  std::fprintf(stderr, "%s: prompt %zu tokens (prefill + first token %.3fs), then %zu tokens in %.3fs (%.1f tok/s), "
               "sum log-prob %.3f\n",
               model->Describe().c_str(), prompt.size(), prefill_s, decoded, decode_s,
               decoded / std::max(decode_s, 1e-9), sum_logprob);
  PrintCompletionSummary(tok.get(), mode, out);
  return absl::OkStatus();
}

int RunGenerate(const std::vector<std::string>& args) {
  absl::Status s = Generate();
  return s.ok() ? 0 : Fail(s);
}

std::string Human(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f %s", bytes, units[u]);
  return buf;
}

absl::Status Inspect() {
  ASSIGN_OR_RETURN(auto model, LoadCpuModelFromFlags());
  const io::V4Config& c = model->config();
  std::printf("model        %s (%s layout)\n", absl::GetFlag(FLAGS_model).c_str(),
              c.layout == io::CheckpointLayout::kHf ? "HF" : "released");
  std::printf("sizes        d=%lld layers=%d heads=%d x %lld (rope %lld) q_lora=%lld o_groups=%d x %lld vocab=%lld\n",
              static_cast<long long>(c.hidden_size), c.num_layers, c.num_heads, static_cast<long long>(c.head_dim),
              static_cast<long long>(c.rope_dim), static_cast<long long>(c.q_lora_rank), c.o_groups,
              static_cast<long long>(c.o_lora_rank), static_cast<long long>(c.vocab_size));
  std::printf("moe          %d routed (top-%d, x%.2f) + %d shared, intermediate %lld, swiglu limit %.1f, experts %s\n",
              c.n_routed_experts, c.experts_per_token, c.routed_scaling_factor, c.n_shared_experts,
              static_cast<long long>(c.moe_intermediate), c.swiglu_limit, c.expert_dtype.c_str());
  std::string layers;
  for (int l = 0; l < c.num_layers; ++l)
    absl::StrAppend(&layers, l ? " " : "", io::AttentionKindName(c.attention[l]),
                    c.attention[l] == io::AttentionKind::kSliding ? "" : absl::StrCat("/", c.compress_ratio[l]),
                    c.hash_routed[l] ? "+hash" : "");
  std::printf("layers       %s\n", layers.c_str());
  std::printf("attention    window %lld, indexer %d x %lld top-%d, mHC x%d (%d Sinkhorn steps)\n",
              static_cast<long long>(c.sliding_window), c.index_n_heads, static_cast<long long>(c.index_head_dim),
              c.index_topk, c.hc_mult, c.hc_sinkhorn_iters);
  std::printf("rope         main theta %.0f; compressed theta %.0f%s\n", c.main_rope.theta, c.compress_rope.theta,
              c.compress_rope.yarn ? absl::StrCat(" + YaRN x", c.compress_rope.factor, " (original ",
                                                  c.compress_rope.original_max_position, ")").c_str()
                                   : "");
  std::printf("parameters   %lld total, %lld activated per token\n", static_cast<long long>(model->ParameterCount()),
              static_cast<long long>(model->ActivatedParameterCount()));
  ASSIGN_OR_RETURN(auto ckpt, io::Checkpoint::Open(absl::GetFlag(FLAGS_model)));
  std::map<std::string, std::pair<int64_t, int64_t>> by_dtype;
  for (const auto& n : ckpt->TensorNames()) {
    ASSIGN_OR_RETURN(io::TensorEntry e, ckpt->Entry(n));
    auto& [count, bytes] = by_dtype[std::string(DTypeName(e.dtype))];
    ++count;
    bytes += static_cast<int64_t>(e.end - e.begin);
  }
  std::printf("checkpoint   %s in %zu tensors\n", Human(static_cast<double>(ckpt->TotalBytes())).c_str(),
              ckpt->TensorNames().size());
  for (const auto& [dt, cb] : by_dtype)
    std::printf("  %-9s  %6lld tensors  %s\n", dt.c_str(), static_cast<long long>(cb.first), Human(static_cast<double>(cb.second)).c_str());
  const int64_t L = absl::GetFlag(FLAGS_context);
  if (L <= 0) return absl::InvalidArgumentError("--context must be positive");
  const int64_t state = model->StateBytes(L);
  std::printf("decode state at %lld tokens: %s per sequence (fp32), %.1f bytes per token\n", static_cast<long long>(L),
              Human(static_cast<double>(state)).c_str(), static_cast<double>(state) / L);
  return absl::OkStatus();
}

int RunInspect(const std::vector<std::string>& args) {
  absl::Status s = Inspect();
  return s.ok() ? 0 : Fail(s);
}

}  // namespace

RETORT_COMMAND("forward", "full forward (and cached decode) of input_ids -> logits safetensors", RunForward);
RETORT_COMMAND("generate", "sample tokens from a V4 checkpoint", RunGenerate);
RETORT_COMMAND("inspect", "config summary, parameter counts, tensor dtypes, decode-state size", RunInspect);

}  // namespace retort::controller
