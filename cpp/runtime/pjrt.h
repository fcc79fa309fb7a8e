// Loading a PJRT plugin and calling its C API: the one place where PJRT_Error
// becomes a C++ exception, and RAII owners for PJRT events.
#pragma once

#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

#include "pjrt_c_api.h"

namespace metagrad {

// An error reported by the PJRT plugin, carrying XLA's own message.
class PjrtError : public std::runtime_error {
 public:
  PjrtError(PJRT_Error_Code code, const std::string& message)
      : std::runtime_error(message), code_(code) {}
  PJRT_Error_Code code() const { return code_; }

 private:
  PJRT_Error_Code code_;
};

// Bad input caught before it reaches the plugin (wrong count, shape, dtype...).
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Zeroed args struct with struct_size set, as every PJRT call requires.
template <typename Args, size_t Size>
Args MakeArgs() {
  Args args;
  std::memset(&args, 0, sizeof(args));
  args.struct_size = Size;
  return args;
}
#define PJRT_ARGS(T) ::metagrad::MakeArgs<T, T##_STRUCT_SIZE>()

using Attribute = std::variant<std::string, int64_t, std::vector<int64_t>, double, bool>;

// A loaded plugin. Never unloaded: plugins do not support dlclose.
class Api {
 public:
  static std::shared_ptr<const Api> Load(const std::string& path);

  const PJRT_Api* operator->() const { return api_; }
  const PJRT_Api* raw() const { return api_; }
  const std::string& path() const { return path_; }
  std::pair<int, int> version() const {
    return {api_->pjrt_api_version.major_version, api_->pjrt_api_version.minor_version};
  }
  const std::map<std::string, Attribute>& attributes() const { return attributes_; }

  // Throws PjrtError (and frees the error) when `error` is set.
  void Check(PJRT_Error* error, const char* context) const;
  // Frees `error` (if set) without looking at it: for destructors and other
  // places that cannot throw.
  void Ignore(PJRT_Error* error) const noexcept;

 private:
  Api(const PJRT_Api* api, std::string path) : api_(api), path_(std::move(path)) {}
  const PJRT_Api* api_;
  std::string path_;
  std::map<std::string, Attribute> attributes_;
};

// Owner of a PJRT_Event.
class Event {
 public:
  Event(std::shared_ptr<const Api> api, PJRT_Event* event) : api_(std::move(api)), event_(event) {}
  Event(Event&& other) noexcept : api_(std::move(other.api_)), event_(other.event_) { other.event_ = nullptr; }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event();
  // Blocks until ready; throws the event's error if it has one.
  void Await(const char* context) const;

 private:
  std::shared_ptr<const Api> api_;
  PJRT_Event* event_;
};

std::vector<PJRT_NamedValue> ToNamedValues(const std::map<std::string, Attribute>& options);

}  // namespace metagrad
