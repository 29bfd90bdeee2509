// The argument limits every backend shares, in one place (not named limits.h: that would shadow the C header).
//
// moe_ops/ops.py raises the user-facing errors (worded for the user, before any kernel runs) with
// the same values; the C++ keeps short invariant checks on these constants for callers that go
// straight to torch.ops.moe_ops.*. build_info()["limits"] exports them and tests/test_limits.py
// fails when the Python and C++ values disagree.
#pragma once

#include <cstdint>

namespace moe_ops::limits {

// ids, offsets and slot indices are int32 on every backend.
inline constexpr int64_t kInt32Max = 2147483647;
// top-k per token: the gating kernels keep k candidates in registers.
inline constexpr int64_t kMaxK = 32;
// offsets[E + 1] must index in int32.
inline constexpr int64_t kMaxExperts = kInt32Max - 1;

}  // namespace moe_ops::limits
