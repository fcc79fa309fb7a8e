#include "runtime/ffi.h"

#include <array>
#include <cstddef>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>

// The XLA FFI C API header of the jaxlib whose handlers are registered: the
// metadata queries below speak the ABI those handlers were built with.
#include "xla/ffi/api/c_api.h"

namespace metagrad {

namespace {

// The PJRT FFI extension (xla/pjrt/c/pjrt_c_api_ffi_extension.h, extension
// version 2). xla-cpu-pjrt ships only pjrt_c_api.h, so the structs used here
// are declared by hand. The registration args changed layout while the
// extension version stayed 2: `int api_version` after target_name_size was
// dropped (60 -> 52 bytes; xla-cpu-pjrt 0.0.1 expects 52). Which one a plugin
// reads is learnt from the size it expects (RegisterArgsSize): sending the
// other would register a garbage handler pointer.
struct RegisterArgs52 {
  size_t struct_size;
  const char* target_name;
  size_t target_name_size;
  void* handler;
  const char* platform_name;
  size_t platform_name_size;
  uint32_t traits;
};
struct RegisterArgs60 {
  size_t struct_size;
  const char* target_name;
  size_t target_name_size;
  int api_version;  // 1: typed FFI handler
  void* handler;
  const char* platform_name;
  size_t platform_name_size;
  uint32_t traits;
};
static_assert(offsetof(RegisterArgs52, traits) + sizeof(uint32_t) == 52, "layout of PJRT FFI register args");
static_assert(offsetof(RegisterArgs60, traits) + sizeof(uint32_t) == 60, "layout of PJRT FFI register args");

using FfiRegisterHandlerFn = PJRT_Error* (*)(void*);

struct FfiExtension {
  PJRT_Extension_Base base;
  void* type_id_register;
  void* user_data_add;
  FfiRegisterHandlerFn register_handler;
};
constexpr size_t kFfiExtensionSize = offsetof(FfiExtension, register_handler) + sizeof(FfiRegisterHandlerFn);

const FfiExtension* FindFfiExtension(const Api& api) {
  for (const PJRT_Extension_Base* ext = api->extension_start; ext != nullptr; ext = ext->next) {
    if (ext->type == PJRT_Extension_Type_FFI) {
      // Extensions from before handler registration existed are 40 bytes.
      if (ext->struct_size < kFfiExtensionSize) return nullptr;
      const auto* ffi = reinterpret_cast<const FfiExtension*>(ext);
      return ffi->register_handler != nullptr ? ffi : nullptr;
    }
  }
  return nullptr;
}

const FfiExtension& RequireFfiExtension(const Api& api, const std::string& target) {
  const FfiExtension* ffi = FindFfiExtension(api);
  if (ffi == nullptr) {
    throw InvalidArgument("PJRT plugin '" + api.path() + "' cannot register FFI handlers (its PJRT FFI extension " +
                          "has no register_handler): programs calling '" + target + "' cannot run on it");
  }
  return *ffi;
}

// The size of PJRT_FFI_Register_Handler_Args the plugin was built with. A
// plugin checks struct_size before reading any field and names its own size
// when the caller's is smaller ("... size: expected 52, got 8 ..."), so an
// 8-byte call is a harmless question. 0 if the answer cannot be read.
size_t RegisterArgsSize(const Api& api, const FfiExtension& ffi) {
  size_t question = sizeof(size_t);
  PJRT_Error* error = ffi.register_handler(&question);
  if (error == nullptr) return 0;
  try {
    api.Check(error, "");
  } catch (const PjrtError& e) {
    const std::string message = e.what();
    const size_t at = message.find("size: expected ");
    if (at != std::string::npos) return std::strtoul(message.c_str() + at + 15, nullptr, 10);
  }
  return 0;
}

void RegisterWithPlugin(const Api& api, const FfiExtension& ffi, size_t args_size, const std::string& target,
                        const std::string& platform, void* handler) {
  const std::string context = "registering FFI handler '" + target + "' for " + platform;
  if (args_size == 52) {
    RegisterArgs52 args{52, target.data(), target.size(), handler, platform.data(), platform.size(), 0};
    api.Check(ffi.register_handler(&args), context.c_str());
  } else if (args_size == 60) {
    RegisterArgs60 args{60, target.data(), target.size(), 1, handler, platform.data(), platform.size(), 0};
    api.Check(ffi.register_handler(&args), context.c_str());
  } else {
    throw InvalidArgument("PJRT plugin '" + api.path() + "' expects FFI registration args of " +
                          std::to_string(args_size) + " bytes, a layout metagrad does not know (52 or 60): " +
                          "programs calling '" + target + "' cannot run on it");
  }
}

bool IsMetadataQuery(const XLA_FFI_CallFrame* frame) {
  return frame->extension_start != nullptr && frame->extension_start->type == XLA_FFI_Extension_Metadata;
}

// Fills a metadata query's answer, within the struct sizes the caller gave.
XLA_FFI_Error* AnswerMetadata(XLA_FFI_CallFrame* frame, FfiApiVersion version, uint32_t traits) {
  auto* extension = reinterpret_cast<XLA_FFI_Metadata_Extension*>(frame->extension_start);
  XLA_FFI_Metadata* metadata = extension->metadata;
  if (extension->extension_base.struct_size < XLA_FFI_Metadata_Extension_STRUCT_SIZE || metadata == nullptr ||
      metadata->struct_size < XLA_FFI_Metadata_STRUCT_SIZE) {
    return nullptr;  // nothing to fill: the caller then sees no version and refuses the handler
  }
  metadata->api_version = XLA_FFI_Api_Version{XLA_FFI_Api_Version_STRUCT_SIZE, nullptr, version.major, version.minor};
  metadata->traits = traits;
  if (metadata->struct_size >= offsetof(XLA_FFI_Metadata, state_type_id) + sizeof(XLA_FFI_TypeId)) {
    metadata->state_type_id = XLA_FFI_UNKNOWN_TYPE_ID;
  }
  return nullptr;
}

// --- The plugin's FFI version -------------------------------------------------

std::mutex g_mutex;  // guards everything below
FfiApiVersion g_probed{-1, -1};

// Registered only to be asked for its metadata: records the version of the
// XLA_FFI_Api in the call frame, and declares a major version no XLA accepts,
// so the plugin never keeps it.
XLA_FFI_Error* VersionProbe(XLA_FFI_CallFrame* frame) {
  if (!IsMetadataQuery(frame)) return nullptr;
  if (frame->api != nullptr && frame->api->struct_size >= offsetof(XLA_FFI_Api, api_version) +
                                                              sizeof(XLA_FFI_Api_Version)) {
    g_probed = {frame->api->api_version.major_version, frame->api->api_version.minor_version};
  }
  return AnswerMetadata(frame, {XLA_FFI_API_MAJOR + 1, 0}, 0);
}

struct PluginFacts {
  size_t register_args_size;
  FfiApiVersion version;
};
std::map<const PJRT_Api*, PluginFacts> g_plugins;

const PluginFacts& Facts(const Api& api, const FfiExtension& ffi, const std::string& platform) {
  auto found = g_plugins.find(api.raw());
  if (found != g_plugins.end()) return found->second;
  PluginFacts facts{RegisterArgsSize(api, ffi), {-1, -1}};
  g_probed = {-1, -1};
  try {
    RegisterWithPlugin(api, ffi, facts.register_args_size, "metagrad_ffi_version_probe", platform,
                       reinterpret_cast<void*>(&VersionProbe));
  } catch (const std::exception&) {
    // A plugin that reports the refusal is fine: the metadata query came first.
  }
  facts.version = g_probed;
  return g_plugins.emplace(api.raw(), facts).first->second;
}

// --- Adapters ------------------------------------------------------------------

// A handler's entry point carries no user data, so each adapted handler gets
// its own instantiation of Adapter<I>, reading slot I.
struct AdapterSlot {
  XLA_FFI_Handler* handler;
  FfiApiVersion declared;
  uint32_t traits;
};
constexpr size_t kAdapterSlots = 256;
std::array<AdapterSlot, kAdapterSlots> g_slots{};
size_t g_used_slots = 0;

template <size_t I>
XLA_FFI_Error* Adapter(XLA_FFI_CallFrame* frame) {
  const AdapterSlot& slot = g_slots[I];
  if (IsMetadataQuery(frame)) return AnswerMetadata(frame, slot.declared, slot.traits);
  return slot.handler(frame);
}

template <size_t... I>
constexpr std::array<XLA_FFI_Handler*, sizeof...(I)> MakeAdapters(std::index_sequence<I...>) {
  return {&Adapter<I>...};
}
constexpr std::array<XLA_FFI_Handler*, kAdapterSlots> kAdapters = MakeAdapters(std::make_index_sequence<kAdapterSlots>{});

XLA_FFI_Handler* AdapterFor(void* handler, FfiApiVersion declared, uint32_t traits) {
  for (size_t i = 0; i < g_used_slots; ++i) {
    const AdapterSlot& slot = g_slots[i];
    if (reinterpret_cast<void*>(slot.handler) == handler && slot.declared.major == declared.major &&
        slot.declared.minor == declared.minor) {
      return kAdapters[i];
    }
  }
  if (g_used_slots == kAdapterSlots) {
    throw InvalidArgument("more than " + std::to_string(kAdapterSlots) + " FFI handlers need a version adapter");
  }
  g_slots[g_used_slots] = {reinterpret_cast<XLA_FFI_Handler*>(handler), declared, traits};
  return kAdapters[g_used_slots++];
}

}  // namespace

std::string FfiApiVersion::ToString() const {
  return known() ? std::to_string(major) + "." + std::to_string(minor) : std::string("unknown");
}

FfiApiVersion BuiltFfiApiVersion() { return {XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR}; }

bool HasFfiHandlerRegistration(const Api& api) { return FindFfiExtension(api) != nullptr; }

FfiHandlerMetadata QueryFfiHandler(void* handler) {
  if (handler == nullptr) throw InvalidArgument("FFI handler pointer is null");
  XLA_FFI_Metadata metadata{};
  metadata.struct_size = sizeof(XLA_FFI_Metadata);
  metadata.api_version.struct_size = XLA_FFI_Api_Version_STRUCT_SIZE;
  metadata.api_version.major_version = -1;
  metadata.api_version.minor_version = -1;
  XLA_FFI_Metadata_Extension extension{};
  extension.extension_base.struct_size = XLA_FFI_Metadata_Extension_STRUCT_SIZE;
  extension.extension_base.type = XLA_FFI_Extension_Metadata;
  extension.metadata = &metadata;
  XLA_FFI_CallFrame frame{};
  frame.struct_size = XLA_FFI_CallFrame_STRUCT_SIZE;
  frame.extension_start = &extension.extension_base;
  frame.stage = XLA_FFI_ExecutionStage_EXECUTE;
  frame.args.struct_size = XLA_FFI_Args_STRUCT_SIZE;
  frame.rets.struct_size = XLA_FFI_Rets_STRUCT_SIZE;
  frame.attrs.struct_size = XLA_FFI_Attrs_STRUCT_SIZE;
  // No XLA_FFI_Api, as in XLA's own query: a handler needs it only to report
  // an error, and a call frame of exactly the size of jaxlib's headers gives a
  // jaxlib handler none to report.
  XLA_FFI_Error* error = reinterpret_cast<XLA_FFI_Handler*>(handler)(&frame);
  if (error != nullptr) throw InvalidArgument("the FFI handler did not answer the metadata query");
  return {{metadata.api_version.major_version, metadata.api_version.minor_version},
          metadata.traits,
          metadata.state_type_id.type_id != XLA_FFI_UNKNOWN_TYPE_ID.type_id};
}

FfiApiVersion PluginFfiApiVersion(const Api& api, const std::string& platform) {
  const FfiExtension* ffi = FindFfiExtension(api);
  if (ffi == nullptr) return {-1, -1};
  std::lock_guard<std::mutex> lock(g_mutex);
  return Facts(api, *ffi, platform).version;
}

FfiRegistration RegisterFfiHandler(const Api& api, const std::string& target, const std::string& platform,
                                   void* handler, bool allow_adapter) {
  if (handler == nullptr) throw InvalidArgument("FFI handler for '" + target + "' is null");
  const FfiExtension& ffi = RequireFfiExtension(api, target);
  const FfiHandlerMetadata handler_info = QueryFfiHandler(handler);
  std::lock_guard<std::mutex> lock(g_mutex);
  const PluginFacts& plugin = Facts(api, ffi, platform);
  const FfiApiVersion have = plugin.version, need = handler_info.version;
  const bool accepted = !have.known() || (need.major == have.major && need.minor <= have.minor);
  if (accepted) {
    RegisterWithPlugin(api, ffi, plugin.register_args_size, target, platform, handler);
    return FfiRegistration::kDirect;
  }
  // The only adapted case: the one step whose ABI difference is known and
  // does not concern stateless handlers (see ffi.h).
  const bool adaptable = allow_adapter && !handler_info.creates_state && have.major == 0 && have.minor == 2 &&
                         need.major == 0 && need.minor == 3;
  if (!adaptable) {
    throw InvalidArgument("FFI handler '" + target + "' was built with XLA FFI API " + need.ToString() +
                          ", newer than the " + have.ToString() + " of PJRT plugin '" + api.path() +
                          "', which would refuse it: rebuild the handler with the plugin's XLA FFI headers, " +
                          "or use a plugin built from a newer XLA");
  }
  RegisterWithPlugin(api, ffi, plugin.register_args_size, target, platform,
                     reinterpret_cast<void*>(AdapterFor(handler, have, handler_info.traits)));
  return FfiRegistration::kAdapted;
}

}  // namespace metagrad
