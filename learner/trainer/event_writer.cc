// TensorBoard event files (see event_writer.h).
#include "learner/trainer/event_writer.h"

#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "retort/v1/event.pb.h"

namespace retort::trainer {
namespace {

std::array<uint32_t, 256> MakeTable() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k)
      c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;  // reflected Castagnoli
    t[i] = c;
  }
  return t;
}

void PutLe(std::string* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

uint64_t GetLe(const char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(static_cast<uint8_t>(p[i])) << (8 * i);
  return v;
}

double Now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

uint32_t Crc32c(absl::string_view data) {
  static const std::array<uint32_t, 256> table = MakeTable();
  uint32_t c = 0xffffffffu;
  for (unsigned char b : data) c = table[(c ^ b) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

uint32_t MaskCrc(uint32_t crc) { return ((crc >> 15) | (crc << 17)) + 0xa282ead8u; }

std::string TfRecordFrame(absl::string_view record) {
  std::string out, len;
  PutLe(&len, record.size(), 8);
  out += len;
  PutLe(&out, MaskCrc(Crc32c(len)), 4);
  out.append(record.data(), record.size());
  PutLe(&out, MaskCrc(Crc32c(record)), 4);
  return out;
}

absl::StatusOr<std::vector<std::string>> ReadTfRecords(absl::string_view bytes,
                                                       const std::string& source) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < bytes.size()) {
    if (bytes.size() - pos < 12)
      return absl::DataLossError(absl::StrCat(source, ": truncated record header at byte ", pos));
    const absl::string_view len_bytes = bytes.substr(pos, 8);
    const uint64_t len = GetLe(bytes.data() + pos, 8);
    if (GetLe(bytes.data() + pos + 8, 4) != MaskCrc(Crc32c(len_bytes)))
      return absl::DataLossError(absl::StrCat(source, ": length CRC mismatch at byte ", pos));
    if (len > bytes.size() - pos - 12 || bytes.size() - pos - 12 - len < 4)
      return absl::DataLossError(absl::StrCat(source, ": truncated record at byte ", pos));
    const absl::string_view record = bytes.substr(pos + 12, len);
    if (GetLe(bytes.data() + pos + 12 + len, 4) != MaskCrc(Crc32c(record)))
      return absl::DataLossError(absl::StrCat(source, ": record CRC mismatch at byte ", pos));
    out.emplace_back(record);
    pos += 12 + len + 4;
  }
  return out;
}

absl::StatusOr<std::unique_ptr<EventWriter>> EventWriter::Create(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("creating ", dir, ": ", ec.message()));
  char host[256] = "localhost";
  gethostname(host, sizeof(host) - 1);
  std::unique_ptr<EventWriter> w(new EventWriter());
  w->path_ = absl::StrCat(dir, "/events.out.tfevents.", static_cast<int64_t>(Now()), ".", host, ".",
                          getpid());
  w->file_ = std::fopen(w->path_.c_str(), "wb");
  if (w->file_ == nullptr)
    return absl::InternalError(absl::StrCat("creating ", w->path_, ": ", std::strerror(errno)));
  retort::v1::Event first;
  first.set_wall_time(Now());
  first.set_file_version("brain.Event:2");
  if (absl::Status s = w->Append(first.SerializeAsString()); !s.ok()) return s;
  return w;
}

EventWriter::~EventWriter() {
  if (file_ != nullptr) std::fclose(file_);
}

absl::Status EventWriter::Append(const std::string& record) {
  const std::string frame = TfRecordFrame(record);
  if (std::fwrite(frame.data(), 1, frame.size(), file_) != frame.size() || std::fflush(file_) != 0)
    return absl::InternalError(absl::StrCat("writing ", path_, ": ", std::strerror(errno)));
  return absl::OkStatus();
}

absl::Status EventWriter::WriteScalars(int64_t step,
                                       const std::vector<std::pair<std::string, float>>& scalars) {
  retort::v1::Event e;
  e.set_wall_time(Now());
  e.set_step(step);
  for (const auto& [tag, value] : scalars) {
    retort::v1::SummaryValue* v = e.mutable_summary()->add_value();
    v->set_tag(tag);
    v->set_simple_value(value);
  }
  return Append(e.SerializeAsString());
}

}  // namespace retort::trainer
