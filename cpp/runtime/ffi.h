// Typed XLA FFI handlers (custom-call targets such as jaxlib's LAPACK kernels)
// registered with a PJRT plugin through its FFI extension.
//
// jaxlib registers its CPU and GPU kernels with jaxlib's own XLA; a plugin
// loaded by metagrad holds another copy of XLA with its own, empty, handler
// registry, so `custom_call @lapack_sgetrf_ffi` fails there until the handler
// is registered with that plugin too. A typed handler is a plain C function
// that reaches XLA only through the `XLA_FFI_Api` table in each call frame, so
// one function pointer serves any XLA whose FFI C API it is compatible with.
//
// XLA decides compatibility from versions: on registration it asks the
// handler for the FFI API version it was built with and drops it, silently
// through the PJRT extension, if that is newer than its own. jaxlib 0.10.2's
// handlers are 0.3; xla-cpu-pjrt 0.0.1's XLA is 0.2. Between the two, the
// call frame (168 bytes) and the API table (192 bytes) are the same; the one
// layout change is `stage` added to XLA_FFI_State_{Set,Get}_Args, used only
// by stateful handlers. A stateless handler one minor version ahead is
// therefore registered behind an adapter that declares the plugin's version
// and forwards every call (see RegisterFfiHandler).
#pragma once

#include <cstdint>
#include <string>

#include "runtime/pjrt.h"

namespace metagrad {

struct FfiApiVersion {
  int major;
  int minor;
  bool known() const { return major >= 0; }
  std::string ToString() const;
};

struct FfiHandlerMetadata {
  FfiApiVersion version;  // of the FFI headers the handler was built with
  uint32_t traits;
  bool creates_state;
};

// The XLA FFI C API version of the headers metagrad was built with (jaxlib's).
FfiApiVersion BuiltFfiApiVersion();

// Whether the plugin's PJRT FFI extension can register handlers.
bool HasFfiHandlerRegistration(const Api& api);

// Asks a typed handler (`XLA_FFI_Handler*`) for its metadata, as XLA does.
FfiHandlerMetadata QueryFfiHandler(void* handler);

// The XLA FFI C API version the plugin's XLA implements, learnt once per
// plugin from the call frame of the metadata query that registering a handler
// for `platform` makes; {-1, -1} if the plugin does not say.
FfiApiVersion PluginFfiApiVersion(const Api& api, const std::string& platform);

enum class FfiRegistration { kDirect, kAdapted };

// Registers `handler` for custom-call `target` on `platform` ("Host" for the
// CPU plugin, "CUDA" for the CUDA plugin) in the plugin's process-wide
// registry. A handler newer than the plugin is refused with both versions in
// the message, except a stateless 0.3 handler on a 0.2 plugin when
// `allow_adapter` (metagrad passes it for jaxlib's own kernels only): that one
// is registered behind a forwarding adapter.
FfiRegistration RegisterFfiHandler(const Api& api, const std::string& target, const std::string& platform,
                                   void* handler, bool allow_adapter);

}  // namespace metagrad
