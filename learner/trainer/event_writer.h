// TensorBoard event files: scalars as Event protos (proto/retort/v1/event.proto)
// in TFRecord framing — uint64 length, masked CRC32C of the length, the
// record, masked CRC32C of the record; CRC32C is Castagnoli's, masked as
// ((crc >> 15) | (crc << 17)) + 0xa282ead8, all little-endian.
//
// The file is <dir>/events.out.tfevents.<unix seconds>.<host>; its first
// record is the file_version event. Each scalar call appends one record and
// flushes it to the OS (TensorBoard tails the file while a run goes).
//
// Thread-safety: not thread-safe; one writer per run.
#ifndef RETORT_LEARNER_TRAINER_EVENT_WRITER_H_
#define RETORT_LEARNER_TRAINER_EVENT_WRITER_H_

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace retort::trainer {

// CRC32C (Castagnoli) of `data`, and the TFRecord mask of a CRC.
uint32_t Crc32c(absl::string_view data);
uint32_t MaskCrc(uint32_t crc);

// One TFRecord frame around `record`.
std::string TfRecordFrame(absl::string_view record);
// Splits a TFRecord file's bytes back into records, checking both CRCs of
// each (DataLoss naming `source` and the byte offset on any mismatch or a
// truncated frame).
[[nodiscard]] absl::StatusOr<std::vector<std::string>> ReadTfRecords(absl::string_view bytes,
                                                                     const std::string& source);

class EventWriter {
 public:
  // Creates `dir` when needed and opens a new event file in it.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<EventWriter>> Create(const std::string& dir);
  ~EventWriter();
  EventWriter(const EventWriter&) = delete;
  EventWriter& operator=(const EventWriter&) = delete;

  // Appends one Event at `step` holding every (tag, value) as a simple_value.
  [[nodiscard]] absl::Status WriteScalars(
      int64_t step, const std::vector<std::pair<std::string, float>>& scalars);
  const std::string& path() const { return path_; }

 private:
  EventWriter() = default;
  [[nodiscard]] absl::Status Append(const std::string& record);
  std::string path_;
  FILE* file_ = nullptr;
};

}  // namespace retort::trainer

#endif  // RETORT_LEARNER_TRAINER_EVENT_WRITER_H_
