// A PJRT client: the devices it drives, compilation, and host-to-device uploads.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "runtime/dtypes.h"
#include "runtime/pjrt.h"

namespace metagrad {

class Buffer;
class Executable;

struct ArraySpec {
  std::vector<int64_t> dims;
  PJRT_Buffer_Type type;
  size_t num_elements() const;
  size_t num_bytes() const;
  std::string ToString() const;  // "float32[64,10]"
  bool operator==(const ArraySpec& other) const { return dims == other.dims && type == other.type; }
};

struct DeviceInfo {
  PJRT_Device* device;
  int id;
  std::string kind;
  std::vector<std::string> memory_kinds;
};

// The create options metagrad uses for a plugin: the CUDA plugin gets
// platform_name=cuda and no preallocation, the CPU plugin `cpu_device_count`.
std::map<std::string, Attribute> DefaultClientOptions(const std::string& plugin_path, int64_t cpu_device_count);

// Serialized xla.CompileOptionsProto for a program on the devices with ids
// `device_ids`: with one device, one replica and one partition (the plugin
// places it); with N > 1, N partitions made by XLA's SPMD partitioner,
// partition p on device_ids[p], and `use_shardy_partitioner` (required for
// modules lowered with Shardy, jax's default; GSPMD modules compile either
// way). `debug_options` override the plugin's own XLA debug options by name
// (env_option_overrides; the plugin rejects unknown names). Never empty:
// empty options abort the CPU plugin inside its device assignment.
std::string SerializeCompileOptions(const std::vector<int>& device_ids = {0}, bool use_shardy_partitioner = false,
                                    const std::map<std::string, bool>& debug_options = {});

// The debug options a program over several CPU devices needs: single-threaded
// kernels. XLA's in-process collectives block the thread that reaches them;
// with multi-threaded Eigen kernels that can be an intra-op pool thread, and
// with more partitions than pool threads (4 devices on 2 cores) the partitions
// still computing starve: a rendezvous timeout aborts the process.
std::map<std::string, bool> MultiDeviceDebugOptions(const std::string& platform, size_t num_devices);

class Client : public std::enable_shared_from_this<Client> {
 public:
  static std::shared_ptr<Client> Create(std::shared_ptr<const Api> api,
                                        const std::map<std::string, Attribute>& options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  const Api& api() const { return *api_; }
  const std::shared_ptr<const Api>& api_ptr() const { return api_; }
  PJRT_Client* raw() const { return client_; }
  const std::string& platform_name() const { return platform_name_; }
  const std::string& platform_version() const { return platform_version_; }
  const std::vector<DeviceInfo>& devices() const { return devices_; }
  const DeviceInfo& device(int index) const;
  // The position of `device` in devices(); throws InvalidArgument if absent.
  int DeviceIndex(PJRT_Device* device) const;

  // Compiles `code` ("mlir": MLIR text or bytecode, including portable
  // StableHLO artifacts). `inputs` is the program's signature, checked at
  // every execution; `donated[i]` marks inputs the program aliases to
  // outputs, per shard for a program over several devices. `options`: a
  // serialized CompileOptionsProto (empty: SerializeCompileOptions()).
  std::shared_ptr<Executable> Compile(const std::string& code, const std::string& format,
                                      std::vector<ArraySpec> inputs, std::vector<bool> donated,
                                      const std::string& options = "");

  // Loads an executable written by Executable::Serialize with this plugin
  // version (the caller keys its cache on that version).
  std::shared_ptr<Executable> Deserialize(const std::string& serialized, std::vector<ArraySpec> inputs,
                                          std::vector<bool> donated);

  // The device's memory statistics (PJRT_Device_MemoryStats); throws
  // PjrtError where the plugin does not keep them.
  struct MemoryStats {
    int64_t bytes_in_use = 0;
    int64_t peak_bytes_in_use = -1;  // -1: not reported
    int64_t bytes_limit = -1;
  };
  MemoryStats DeviceMemoryStats(int device_index) const;

  // Copies dense host data (row-major, or with `byte_strides`) to a device.
  std::shared_ptr<Buffer> BufferFromHost(const void* data, const ArraySpec& spec,
                                         const std::vector<int64_t>& byte_strides, int device_index);

 private:
  Client(std::shared_ptr<const Api> api, PJRT_Client* client);
  std::shared_ptr<Executable> Wrap(PJRT_LoadedExecutable* executable, std::vector<ArraySpec> inputs,
                                   std::vector<bool> donated);
  std::shared_ptr<const Api> api_;
  PJRT_Client* client_;
  std::string platform_name_;
  std::string platform_version_;
  std::vector<DeviceInfo> devices_;
};

}  // namespace metagrad
