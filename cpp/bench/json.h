// A small, strict JSON reader (RFC 8259) for the manifests metagrad writes:
// no comments, no trailing commas, no duplicate keys, nothing after the value.
// Errors name the byte offset. No dependencies beyond the standard library.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace metagrad::bench {

class JsonError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Json {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  Json() = default;
  static Json Parse(const std::string& text);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_object() const { return type_ == Type::kObject; }
  bool is_array() const { return type_ == Type::kArray; }

  // Typed access; each throws JsonError naming `what` on a type mismatch.
  bool AsBool(const std::string& what) const;
  double AsNumber(const std::string& what) const;
  // The number as an exact integer (rejects fractions and out-of-range values).
  int64_t AsInt(const std::string& what) const;
  const std::string& AsString(const std::string& what) const;
  const std::vector<Json>& AsArray(const std::string& what) const;
  // Object members in file order.
  const std::vector<std::pair<std::string, Json>>& AsObject(const std::string& what) const;

  // Object member lookup: Get throws if absent, Find returns nullptr.
  const Json& Get(const std::string& key, const std::string& what) const;
  const Json* Find(const std::string& key) const;

 private:
  friend class JsonParser;
  Type type_ = Type::kNull;
  bool bool_ = false;
  double number_ = 0;
  std::string number_text_;  // the literal, for exact integer conversion
  std::string string_;
  std::vector<Json> array_;
  std::vector<std::pair<std::string, Json>> object_;
};

}  // namespace metagrad::bench
