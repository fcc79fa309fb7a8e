#include "bench/json.h"

#include <cerrno>
#include <cstdlib>
#include <set>

namespace metagrad::bench {

class JsonParser {
 public:
  explicit JsonParser(const std::string& text) : text_(text) {}

  Json ParseDocument() {
    SkipSpace();
    Json value = ParseValue(0);
    SkipSpace();
    if (pos_ != text_.size()) Fail("unexpected text after the JSON value");
    return value;
  }

 private:
  static constexpr int kMaxDepth = 64;

  [[noreturn]] void Fail(const std::string& message) const {
    throw JsonError("invalid JSON at byte " + std::to_string(pos_) + ": " + message);
  }

  void SkipSpace() {
    while (pos_ < text_.size() &&
           (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  char Peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }

  void Expect(char c) {
    if (Peek() != c) Fail(std::string("expected '") + c + "'");
    ++pos_;
  }

  void Literal(const char* word) {
    for (const char* p = word; *p; ++p) {
      if (Peek() != *p) Fail(std::string("expected '") + word + "'");
      ++pos_;
    }
  }

  Json ParseValue(int depth) {
    if (depth > kMaxDepth) Fail("nesting deeper than 64 levels");
    Json value;
    switch (Peek()) {
      case '{': value = ParseObject(depth); break;
      case '[': value = ParseArray(depth); break;
      case '"':
        value.type_ = Json::Type::kString;
        value.string_ = ParseString();
        break;
      case 't':
        Literal("true");
        value.type_ = Json::Type::kBool;
        value.bool_ = true;
        break;
      case 'f':
        Literal("false");
        value.type_ = Json::Type::kBool;
        break;
      case 'n':
        Literal("null");
        break;
      default:
        if (Peek() == '-' || (Peek() >= '0' && Peek() <= '9')) {
          value = ParseNumber();
        } else if (pos_ >= text_.size()) {
          Fail("unexpected end of input");
        } else {
          Fail(std::string("unexpected character '") + Peek() + "'");
        }
    }
    return value;
  }

  Json ParseObject(int depth) {
    Json value;
    value.type_ = Json::Type::kObject;
    std::set<std::string> keys;
    Expect('{');
    SkipSpace();
    if (Peek() == '}') {
      ++pos_;
      return value;
    }
    while (true) {
      SkipSpace();
      if (Peek() != '"') Fail("expected a string key");
      std::string key = ParseString();
      if (!keys.insert(key).second) Fail("duplicate key \"" + key + "\"");
      SkipSpace();
      Expect(':');
      SkipSpace();
      value.object_.emplace_back(std::move(key), ParseValue(depth + 1));
      SkipSpace();
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      Expect('}');
      return value;
    }
  }

  Json ParseArray(int depth) {
    Json value;
    value.type_ = Json::Type::kArray;
    Expect('[');
    SkipSpace();
    if (Peek() == ']') {
      ++pos_;
      return value;
    }
    while (true) {
      SkipSpace();
      value.array_.push_back(ParseValue(depth + 1));
      SkipSpace();
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      Expect(']');
      return value;
    }
  }

  unsigned Hex4() {
    unsigned code = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = Peek();
      unsigned digit;
      if (c >= '0' && c <= '9') digit = c - '0';
      else if (c >= 'a' && c <= 'f') digit = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') digit = c - 'A' + 10;
      else Fail("bad \\u escape");
      code = code * 16 + digit;
      ++pos_;
    }
    return code;
  }

  static void AppendUtf8(std::string& out, unsigned code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xC0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xE0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (code & 0x3F));
    }
  }

  std::string ParseString() {
    Expect('"');
    std::string out;
    while (true) {
      if (pos_ >= text_.size()) Fail("unterminated string");
      const unsigned char c = static_cast<unsigned char>(text_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) Fail("control character inside a string");
      if (c != '\\') {
        out += static_cast<char>(c);
        ++pos_;
        continue;
      }
      ++pos_;
      const char e = Peek();
      ++pos_;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned code = Hex4();
          if (code >= 0xD800 && code <= 0xDBFF) {
            if (Peek() != '\\') Fail("unpaired surrogate");
            ++pos_;
            if (Peek() != 'u') Fail("unpaired surrogate");
            ++pos_;
            const unsigned low = Hex4();
            if (low < 0xDC00 || low > 0xDFFF) Fail("unpaired surrogate");
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
          } else if (code >= 0xDC00 && code <= 0xDFFF) {
            Fail("unpaired surrogate");
          }
          AppendUtf8(out, code);
          break;
        }
        default:
          --pos_;
          Fail("bad escape");
      }
    }
  }

  Json ParseNumber() {
    const size_t start = pos_;
    auto digits = [&] {
      const size_t from = pos_;
      while (Peek() >= '0' && Peek() <= '9') ++pos_;
      return pos_ - from;
    };
    if (Peek() == '-') ++pos_;
    if (Peek() == '0') {
      ++pos_;
    } else if (digits() == 0) {
      Fail("bad number");
    }
    if (Peek() == '.') {
      ++pos_;
      if (digits() == 0) Fail("bad number: digits expected after '.'");
    }
    if (Peek() == 'e' || Peek() == 'E') {
      ++pos_;
      if (Peek() == '+' || Peek() == '-') ++pos_;
      if (digits() == 0) Fail("bad number: digits expected in the exponent");
    }
    Json value;
    value.type_ = Json::Type::kNumber;
    value.number_text_ = text_.substr(start, pos_ - start);
    value.number_ = std::strtod(value.number_text_.c_str(), nullptr);
    return value;
  }

  const std::string& text_;
  size_t pos_ = 0;
};

Json Json::Parse(const std::string& text) { return JsonParser(text).ParseDocument(); }

namespace {
const char* TypeName(Json::Type type) {
  switch (type) {
    case Json::Type::kNull: return "null";
    case Json::Type::kBool: return "a boolean";
    case Json::Type::kNumber: return "a number";
    case Json::Type::kString: return "a string";
    case Json::Type::kArray: return "an array";
    case Json::Type::kObject: return "an object";
  }
  return "?";
}

[[noreturn]] void Mismatch(const std::string& what, const char* expected, Json::Type got) {
  throw JsonError(what + " must be " + expected + ", got " + TypeName(got));
}
}  // namespace

bool Json::AsBool(const std::string& what) const {
  if (type_ != Type::kBool) Mismatch(what, "a boolean", type_);
  return bool_;
}

double Json::AsNumber(const std::string& what) const {
  if (type_ != Type::kNumber) Mismatch(what, "a number", type_);
  return number_;
}

int64_t Json::AsInt(const std::string& what) const {
  if (type_ != Type::kNumber) Mismatch(what, "an integer", type_);
  if (number_text_.find_first_of(".eE") != std::string::npos) {
    throw JsonError(what + " must be an integer, got " + number_text_);
  }
  errno = 0;
  char* end = nullptr;
  const long long value = std::strtoll(number_text_.c_str(), &end, 10);
  if (errno == ERANGE || *end != '\0') throw JsonError(what + " is out of range: " + number_text_);
  return static_cast<int64_t>(value);
}

const std::string& Json::AsString(const std::string& what) const {
  if (type_ != Type::kString) Mismatch(what, "a string", type_);
  return string_;
}

const std::vector<Json>& Json::AsArray(const std::string& what) const {
  if (type_ != Type::kArray) Mismatch(what, "an array", type_);
  return array_;
}

const std::vector<std::pair<std::string, Json>>& Json::AsObject(const std::string& what) const {
  if (type_ != Type::kObject) Mismatch(what, "an object", type_);
  return object_;
}

const Json* Json::Find(const std::string& key) const {
  for (const auto& [name, value] : object_) {
    if (name == key) return &value;
  }
  return nullptr;
}

const Json& Json::Get(const std::string& key, const std::string& what) const {
  AsObject(what);
  const Json* found = Find(key);
  if (found == nullptr) throw JsonError(what + " has no \"" + key + "\"");
  return *found;
}

}  // namespace metagrad::bench
