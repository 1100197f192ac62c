// Protocol helpers (see protocol.h).
#include "rollout/service/protocol.h"

#include "absl/strings/str_cat.h"

#ifdef RETORT_ROLLOUT_HAVE_TOKENIZER
#include "model/tokenizer/chat_template.h"
#include "model/tokenizer/tokenizer.h"
#endif

namespace retort::rollout {

absl::Status CheckProtocolVersion(uint32_t version, const char* what) {
  if (version == kRolloutProtocolVersion) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(what, ": protocol_version ", version,
                                                    " is not understood; this worker speaks version ",
                                                    kRolloutProtocolVersion));
}

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

absl::StatusOr<retort::v1::GenerateRequest> Canonicalize(const retort::v1::GenerateRequest& request,
                                                         const tokenizer::Tokenizer* tok) {
  retort::v1::GenerateRequest out = request;
  if (request.request_id().empty()) return absl::InvalidArgumentError("GenerateRequest.request_id is empty");
  if (request.request_id().find('\0') != std::string::npos)
    return absl::InvalidArgumentError("GenerateRequest.request_id contains a NUL byte");
  if (out.group_id().empty()) out.set_group_id(request.request_id());
  const std::string who = absl::StrCat("request '", request.request_id(), "': ");
  if (request.group_id().find('\0') != std::string::npos || request.experiment().find('\0') != std::string::npos)
    return absl::InvalidArgumentError(who + "group_id / experiment contains a NUL byte");
  switch (request.prompt_case()) {
    case retort::v1::GenerateRequest::kPromptIds:
      break;
    case retort::v1::GenerateRequest::kChat: {
#ifdef RETORT_ROLLOUT_HAVE_TOKENIZER
      if (tok == nullptr)
        return absl::FailedPreconditionError(who + "chat prompts need a tokenizer; this worker has none "
                                                   "(start it with --tokenizer DIR or a --model with tokenizer.json)");
      tokenizer::ChatOptions options;
      const std::string mode = request.chat().reasoning_mode().empty() ? "none" : request.chat().reasoning_mode();
      absl::StatusOr<tokenizer::ReasoningMode> m = tokenizer::ParseReasoningMode(mode);
      if (!m.ok()) return absl::InvalidArgumentError(absl::StrCat(who, "chat.reasoning_mode: ", m.status().message()));
      options.reasoning = *m;
      std::vector<tokenizer::Message> messages;
      for (int i = 0; i < request.chat().messages_size(); ++i) {
        const auto& in = request.chat().messages(i);
        tokenizer::Message msg;
        if (in.role() == "system") msg.role = tokenizer::Role::kSystem;
        else if (in.role() == "user") msg.role = tokenizer::Role::kUser;
        else if (in.role() == "assistant") msg.role = tokenizer::Role::kAssistant;
        else if (in.role() == "tool") msg.role = tokenizer::Role::kTool;
        else return absl::InvalidArgumentError(absl::StrCat(who, "chat.messages[", i, "].role '", in.role(),
                                                            "' is not system, user, assistant or tool"));
        msg.content = in.content();
        msg.reasoning = in.reasoning();
        messages.push_back(std::move(msg));
      }
      if (messages.empty()) return absl::InvalidArgumentError(who + "chat.messages is empty");
      absl::StatusOr<std::vector<tokenizer::TokenId>> ids = tokenizer::RenderChatIds(*tok, messages, options);
      if (!ids.ok()) return absl::InvalidArgumentError(absl::StrCat(who, "chat: ", ids.status().message()));
      out.mutable_prompt_ids()->mutable_ids()->Clear();
      for (tokenizer::TokenId id : *ids) out.mutable_prompt_ids()->add_ids(id);
      break;
#else
      return absl::UnimplementedError(who + "chat prompts need retort_tokenizer, which this build lacks");
#endif
    }
    case retort::v1::GenerateRequest::PROMPT_NOT_SET:
      return absl::InvalidArgumentError(who + "no prompt: set prompt_ids or chat");
  }
  return out;
}

GenerationRequest ToGenerationRequest(const retort::v1::GenerateRequest& c) {
  GenerationRequest r;
  r.request_id = c.request_id();
  r.group_id = c.group_id();
  r.prompt.assign(c.prompt_ids().ids().begin(), c.prompt_ids().ids().end());
  const auto& s = c.sampling();
  r.sampling.temperature = s.temperature();
  r.sampling.top_p = s.top_p() == 0.0f ? 1.0f : s.top_p();
  r.sampling.top_k = s.top_k();
  r.sampling.seed = s.seed();
  r.max_new_tokens = s.max_new_tokens();
  r.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  r.n = s.n();
  r.ignore_eos = s.ignore_eos();
  r.capture_routes = s.return_routed_experts();
  return r;
}

}  // namespace retort::rollout
