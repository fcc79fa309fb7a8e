#include "runtime/pjrt.h"

#include <dlfcn.h>
#include <sys/stat.h>

namespace metagrad {

namespace {

Attribute FromNamedValue(const PJRT_NamedValue& value) {
  switch (value.type) {
    case PJRT_NamedValue_kString:
      return std::string(value.string_value, value.value_size);
    case PJRT_NamedValue_kInt64:
      return value.int64_value;
    case PJRT_NamedValue_kInt64List:
      return std::vector<int64_t>(value.int64_array_value, value.int64_array_value + value.value_size);
    case PJRT_NamedValue_kFloat:
      return static_cast<double>(value.float_value);
    case PJRT_NamedValue_kBool:
      return value.bool_value;
  }
  return std::string();
}

}  // namespace

std::shared_ptr<const Api> Api::Load(const std::string& path) {
  struct stat info;
  if (path.empty() || stat(path.c_str(), &info) != 0) {
    throw InvalidArgument("PJRT plugin not found at '" + path +
                          "': pass the path of a plugin shared library (for the CPU, install xla-cpu-pjrt)");
  }
  // RTLD_LOCAL keeps the plugin's bundled XLA symbols away from jaxlib's.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    throw InvalidArgument("cannot load PJRT plugin '" + path + "': " + dlerror());
  }
  using GetApiFn = const PJRT_Api* (*)();
  auto get_api = reinterpret_cast<GetApiFn>(dlsym(handle, "GetPjrtApi"));
  if (get_api == nullptr) {
    throw InvalidArgument("'" + path + "' is not a PJRT plugin: it exports no GetPjrtApi");
  }
  const PJRT_Api* raw = get_api();
  if (raw == nullptr) throw InvalidArgument("GetPjrtApi of '" + path + "' returned null");
  if (raw->pjrt_api_version.major_version != PJRT_API_MAJOR) {
    throw InvalidArgument("PJRT plugin '" + path + "' has C API major version " +
                          std::to_string(raw->pjrt_api_version.major_version) + ", metagrad was built for " +
                          std::to_string(PJRT_API_MAJOR));
  }
  std::shared_ptr<Api> api(new Api(raw, path));
  auto init = PJRT_ARGS(PJRT_Plugin_Initialize_Args);
  api->Check(raw->PJRT_Plugin_Initialize(&init), "initializing the PJRT plugin");
  auto attrs = PJRT_ARGS(PJRT_Plugin_Attributes_Args);
  api->Check(raw->PJRT_Plugin_Attributes(&attrs), "reading plugin attributes");
  for (size_t i = 0; i < attrs.num_attributes; ++i) {
    const PJRT_NamedValue& value = attrs.attributes[i];
    api->attributes_[std::string(value.name, value.name_size)] = FromNamedValue(value);
  }
  return api;
}

void Api::Check(PJRT_Error* error, const char* context) const {
  if (error == nullptr) return;
  auto message_args = PJRT_ARGS(PJRT_Error_Message_Args);
  message_args.error = error;
  api_->PJRT_Error_Message(&message_args);
  std::string message(message_args.message, message_args.message_size);
  auto code_args = PJRT_ARGS(PJRT_Error_GetCode_Args);
  code_args.error = error;
  PJRT_Error_Code code = PJRT_Error_Code_UNKNOWN;
  if (api_->PJRT_Error_GetCode(&code_args) == nullptr) code = code_args.code;
  Ignore(error);
  throw PjrtError(code, std::string(context) + ": " + message);
}

void Api::Ignore(PJRT_Error* error) const noexcept {
  if (error == nullptr) return;
  auto destroy = PJRT_ARGS(PJRT_Error_Destroy_Args);
  destroy.error = error;
  api_->PJRT_Error_Destroy(&destroy);
}

Event::~Event() {
  if (event_ == nullptr) return;
  auto args = PJRT_ARGS(PJRT_Event_Destroy_Args);
  args.event = event_;
  api_->Ignore(api_->raw()->PJRT_Event_Destroy(&args));
}

void Event::Await(const char* context) const {
  if (event_ == nullptr) return;
  auto args = PJRT_ARGS(PJRT_Event_Await_Args);
  args.event = event_;
  api_->Check(api_->raw()->PJRT_Event_Await(&args), context);
}

std::vector<PJRT_NamedValue> ToNamedValues(const std::map<std::string, Attribute>& options) {
  std::vector<PJRT_NamedValue> values;
  for (const auto& [name, value] : options) {
    auto named = PJRT_ARGS(PJRT_NamedValue);
    named.name = name.c_str();
    named.name_size = name.size();
    if (auto* s = std::get_if<std::string>(&value)) {
      named.type = PJRT_NamedValue_kString;
      named.string_value = s->c_str();
      named.value_size = s->size();
    } else if (auto* i = std::get_if<int64_t>(&value)) {
      named.type = PJRT_NamedValue_kInt64;
      named.int64_value = *i;
      named.value_size = 1;
    } else if (auto* list = std::get_if<std::vector<int64_t>>(&value)) {
      named.type = PJRT_NamedValue_kInt64List;
      named.int64_array_value = list->data();
      named.value_size = list->size();
    } else if (auto* f = std::get_if<double>(&value)) {
      named.type = PJRT_NamedValue_kFloat;
      named.float_value = static_cast<float>(*f);
      named.value_size = 1;
    } else {
      named.type = PJRT_NamedValue_kBool;
      named.bool_value = std::get<bool>(value);
      named.value_size = 1;
    }
    values.push_back(named);
  }
  return values;
}

}  // namespace metagrad
