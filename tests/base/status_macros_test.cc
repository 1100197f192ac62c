#include "model/base/status_macros.h"

#include "gtest/gtest.h"

namespace retort {
namespace {

absl::StatusOr<int> Half(int x) {
  if (x % 2) return absl::InvalidArgumentError("odd");
  return x / 2;
}

absl::StatusOr<int> Quarter(int x) {
  ASSIGN_OR_RETURN(int h, Half(x));
  ASSIGN_OR_RETURN(int q, Half(h));
  return q;
}

absl::Status Check(int x) {
  RETURN_IF_ERROR(Half(x).status());
  return absl::OkStatus();
}

TEST(StatusMacrosTest, PropagatesErrorsAndValues) {
  EXPECT_EQ(*Quarter(8), 2);
  EXPECT_EQ(Quarter(6).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Check(4).ok());
  EXPECT_FALSE(Check(3).ok());
}

TEST(StatusMacrosTest, AnnotateKeepsCode) {
  absl::Status s = Annotate(absl::DataLossError("short read"), "model.safetensors");
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(s.message(), "model.safetensors: short read");
}

}  // namespace
}  // namespace retort
