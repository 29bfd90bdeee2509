// The one way the C++ reads a setting: moe_ops::env::get("CPU_CACHE_MB") reads the environment
// variable MOE_OPS_CPU_CACHE_MB. One prefix for every variable; each name is listed, with its
// default and meaning, in moe_ops/envs.py (tests/test_envs.py fails on a read not listed there).
// Header-only and torch-free so the emulator and the kernel units can use it.
#pragma once

#include <cstdlib>
#include <string>

namespace moe_ops::env {

inline constexpr const char* kPrefix = "MOE_OPS_";

// The value of MOE_OPS_<name>, or nullptr when unset or empty (as moe_ops.envs.get treats it).
inline const char* get(const char* name) {
  const std::string full = std::string(kPrefix) + name;
  const char* v = std::getenv(full.c_str());
  return (v != nullptr && *v != '\0') ? v : nullptr;
}

// Whether MOE_OPS_<name> is set to anything but "" or "0".
inline bool flag(const char* name) {
  const char* v = get(name);
  return v != nullptr && std::string(v) != "0";
}

}  // namespace moe_ops::env
