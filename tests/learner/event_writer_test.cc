// TensorBoard event files: CRC32C against published check values, TFRecord
// framing round trips, damaged files detected, Event protos as written.
#include "learner/trainer/event_writer.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "retort/v1/event.pb.h"

namespace retort::trainer {
namespace {

TEST(EventWriterTest, Crc32cMatchesCheckValues) {
  EXPECT_EQ(Crc32c("123456789"), 0xe3069283u);            // the CRC catalogue's check value
  EXPECT_EQ(Crc32c(std::string(32, '\0')), 0x8a9136aau);  // RFC 3720 B.4
  EXPECT_EQ(Crc32c(std::string(32, '\xff')), 0x62a8ab43u);
  EXPECT_EQ(Crc32c(""), 0u);
  EXPECT_EQ(MaskCrc(0), 0xa282ead8u);
  EXPECT_EQ(MaskCrc(0x12345678u), ((0x12345678u >> 15) | (0x12345678u << 17)) + 0xa282ead8u);
}

TEST(EventWriterTest, FramesRoundTripAndDamageIsDetected) {
  const std::string bytes =
      TfRecordFrame("hello") + TfRecordFrame("") + TfRecordFrame(std::string(1000, 'x'));
  ASSERT_EQ(bytes.size(), 3 * 16u + 5 + 1000);
  auto records = ReadTfRecords(bytes, "mem");
  ASSERT_TRUE(records.ok()) << records.status();
  EXPECT_EQ(*records, (std::vector<std::string>{"hello", "", std::string(1000, 'x')}));
  EXPECT_EQ(ReadTfRecords(bytes.substr(0, bytes.size() - 1), "mem").status().code(),
            absl::StatusCode::kDataLoss);
  for (size_t at : {size_t{0}, size_t{9}, size_t{13}, size_t{18}}) {
    std::string bad = bytes;
    bad[at] ^= 0x01;
    EXPECT_EQ(ReadTfRecords(bad, "mem").status().code(), absl::StatusCode::kDataLoss)
        << "byte " << at;
  }
}

TEST(EventWriterTest, WritesFileVersionThenScalarEvents) {
  const std::string dir = ::testing::TempDir() + "/event_writer_test_" + std::to_string(getpid());
  std::string path;
  {
    auto w = EventWriter::Create(dir);
    ASSERT_TRUE(w.ok()) << w.status();
    path = (*w)->path();
    EXPECT_NE(path.find("/events.out.tfevents."), std::string::npos);
    ASSERT_TRUE((*w)->WriteScalars(3, {{"train/loss", 1.25f}, {"train/lr", 0.001f}}).ok());
    ASSERT_TRUE((*w)->WriteScalars(4, {{"train/loss", 0.5f}}).ok());
  }
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  auto records = ReadTfRecords(ss.str(), path);
  ASSERT_TRUE(records.ok()) << records.status();
  ASSERT_EQ(records->size(), 3u);
  retort::v1::Event e;
  ASSERT_TRUE(e.ParseFromString((*records)[0]));
  EXPECT_EQ(e.file_version(), "brain.Event:2");
  EXPECT_GT(e.wall_time(), 1.6e9);
  ASSERT_TRUE(e.ParseFromString((*records)[1]));
  EXPECT_EQ(e.step(), 3);
  ASSERT_EQ(e.summary().value_size(), 2);
  EXPECT_EQ(e.summary().value(0).tag(), "train/loss");
  EXPECT_EQ(e.summary().value(0).simple_value(), 1.25f);
  EXPECT_EQ(e.summary().value(1).tag(), "train/lr");
  EXPECT_EQ(e.summary().value(1).simple_value(), 0.001f);
  ASSERT_TRUE(e.ParseFromString((*records)[2]));
  EXPECT_EQ(e.step(), 4);
  EXPECT_EQ(e.summary().value(0).simple_value(), 0.5f);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace retort::trainer
