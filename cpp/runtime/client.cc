#include "runtime/client.h"

#include "runtime/buffer.h"
#include "runtime/executable.h"

namespace metagrad {

size_t ArraySpec::num_elements() const {
  size_t n = 1;
  for (int64_t d : dims) n *= static_cast<size_t>(d);
  return n;
}

size_t ArraySpec::num_bytes() const { return num_elements() * DTypeOf(type).size; }

std::string ArraySpec::ToString() const {
  std::string s = std::string(DTypeOf(type).name) + "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

std::map<std::string, Attribute> DefaultClientOptions(const std::string& plugin_path, int64_t cpu_device_count) {
  const std::string file = plugin_path.substr(plugin_path.find_last_of('/') + 1);
  if (file.find("cuda") != std::string::npos) {
    return {{"platform_name", std::string("cuda")}, {"allocator", std::string("default")}, {"preallocate", false}};
  }
  if (cpu_device_count < 1) throw InvalidArgument("cpu_device_count must be >= 1, got " + std::to_string(cpu_device_count));
  return {{"cpu_device_count", cpu_device_count}};
}

namespace {

// Just enough protobuf wire format for the few CompileOptionsProto fields set here.
void PutVarint(std::string& out, uint64_t value) {
  while (value >= 0x80) {
    out.push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
}

void PutVarintField(std::string& out, int field, uint64_t value) {
  PutVarint(out, static_cast<uint64_t>(field) << 3);
  PutVarint(out, value);
}

void PutBytesField(std::string& out, int field, const std::string& bytes) {
  PutVarint(out, (static_cast<uint64_t>(field) << 3) | 2);
  PutVarint(out, bytes.size());
  out += bytes;
}

}  // namespace

std::string SerializeCompileOptions(const std::vector<int>& device_ids, bool use_shardy_partitioner,
                                    const std::map<std::string, bool>& debug_options) {
  if (device_ids.empty()) throw InvalidArgument("a program needs at least one device");
  // ExecutableBuildOptionsProto{num_replicas (4), num_partitions (5)}
  std::string build;
  PutVarintField(build, 4, 1);
  PutVarintField(build, 5, device_ids.size());
  if (device_ids.size() > 1) {
    // DeviceAssignmentProto{replica_count (1), computation_count (2),
    //   computation_devices (3): per partition {replica_device_ids (1)}}
    std::string assignment;
    PutVarintField(assignment, 1, 1);
    PutVarintField(assignment, 2, device_ids.size());
    for (int id : device_ids) {
      if (id < 0) throw InvalidArgument("device ids must be >= 0, got " + std::to_string(id));
      std::string computation;
      PutVarintField(computation, 1, static_cast<uint64_t>(id));
      PutBytesField(assignment, 3, computation);
    }
    // use_spmd_partitioning (6), device_assignment (9), use_shardy_partitioner (19)
    PutVarintField(build, 6, 1);
    PutBytesField(build, 9, assignment);
    if (use_shardy_partitioner) PutVarintField(build, 19, 1);
  }
  std::string options;  // CompileOptionsProto{executable_build_options (3)}
  PutBytesField(options, 3, build);
  for (const auto& [name, value] : debug_options) {
    // env_option_overrides (7): map entry {key (1), value (2): OptionOverrideProto{bool_field (2)}}
    std::string override_value, entry;
    PutVarintField(override_value, 2, value ? 1 : 0);
    PutBytesField(entry, 1, name);
    PutBytesField(entry, 2, override_value);
    PutBytesField(options, 7, entry);
  }
  return options;
}

std::map<std::string, bool> MultiDeviceDebugOptions(const std::string& platform, size_t num_devices) {
  if (platform != "cpu" || num_devices < 2) return {};
  return {{"xla_cpu_multi_thread_eigen", false}};
}

std::shared_ptr<Client> Client::Create(std::shared_ptr<const Api> api,
                                       const std::map<std::string, Attribute>& options) {
  std::vector<PJRT_NamedValue> values = ToNamedValues(options);
  auto args = PJRT_ARGS(PJRT_Client_Create_Args);
  args.create_options = values.data();
  args.num_options = values.size();
  api->Check((*api)->PJRT_Client_Create(&args), "creating the PJRT client");
  return std::shared_ptr<Client>(new Client(std::move(api), args.client));
}

Client::Client(std::shared_ptr<const Api> api, PJRT_Client* client) : api_(std::move(api)), client_(client) {
  const PJRT_Api* raw_api = api_->raw();
  auto name = PJRT_ARGS(PJRT_Client_PlatformName_Args);
  name.client = client_;
  api_->Check(raw_api->PJRT_Client_PlatformName(&name), "reading the platform name");
  platform_name_.assign(name.platform_name, name.platform_name_size);
  auto version = PJRT_ARGS(PJRT_Client_PlatformVersion_Args);
  version.client = client_;
  api_->Check(raw_api->PJRT_Client_PlatformVersion(&version), "reading the platform version");
  platform_version_.assign(version.platform_version, version.platform_version_size);

  auto devices = PJRT_ARGS(PJRT_Client_AddressableDevices_Args);
  devices.client = client_;
  api_->Check(raw_api->PJRT_Client_AddressableDevices(&devices), "listing devices");
  for (size_t i = 0; i < devices.num_addressable_devices; ++i) {
    DeviceInfo info;
    info.device = devices.addressable_devices[i];
    auto description = PJRT_ARGS(PJRT_Device_GetDescription_Args);
    description.device = info.device;
    api_->Check(raw_api->PJRT_Device_GetDescription(&description), "describing a device");
    auto id = PJRT_ARGS(PJRT_DeviceDescription_Id_Args);
    id.device_description = description.device_description;
    api_->Check(raw_api->PJRT_DeviceDescription_Id(&id), "reading a device id");
    info.id = id.id;
    auto kind = PJRT_ARGS(PJRT_DeviceDescription_Kind_Args);
    kind.device_description = description.device_description;
    api_->Check(raw_api->PJRT_DeviceDescription_Kind(&kind), "reading a device kind");
    info.kind.assign(kind.device_kind, kind.device_kind_size);
    auto memories = PJRT_ARGS(PJRT_Device_AddressableMemories_Args);
    memories.device = info.device;
    api_->Check(raw_api->PJRT_Device_AddressableMemories(&memories), "listing memory spaces");
    for (size_t m = 0; m < memories.num_memories; ++m) {
      auto memory_kind = PJRT_ARGS(PJRT_Memory_Kind_Args);
      memory_kind.memory = memories.memories[m];
      api_->Check(raw_api->PJRT_Memory_Kind(&memory_kind), "reading a memory kind");
      info.memory_kinds.emplace_back(memory_kind.kind, memory_kind.kind_size);
    }
    devices_.push_back(std::move(info));
  }
}

Client::~Client() {
  auto args = PJRT_ARGS(PJRT_Client_Destroy_Args);
  args.client = client_;
  api_->Ignore(api_->raw()->PJRT_Client_Destroy(&args));
}

const DeviceInfo& Client::device(int index) const {
  if (index < 0 || index >= static_cast<int>(devices_.size())) {
    throw InvalidArgument("device index " + std::to_string(index) + " out of range: the client has " +
                          std::to_string(devices_.size()) + " device(s)");
  }
  return devices_[index];
}

int Client::DeviceIndex(PJRT_Device* device) const {
  for (size_t i = 0; i < devices_.size(); ++i) {
    if (devices_[i].device == device) return static_cast<int>(i);
  }
  throw InvalidArgument("a device that this client does not address");
}

std::shared_ptr<Executable> Client::Compile(const std::string& code, const std::string& format,
                                            std::vector<ArraySpec> inputs, std::vector<bool> donated,
                                            const std::string& options) {
  if (code.empty()) throw InvalidArgument("cannot compile an empty program");
  if (format != "mlir" && format != "hlo") {
    throw InvalidArgument("unknown program format '" + format + "': use 'mlir' (text or bytecode) or 'hlo'");
  }
  const std::string compile_options = options.empty() ? SerializeCompileOptions() : options;
  auto program = PJRT_ARGS(PJRT_Program);
  program.code = const_cast<char*>(code.data());
  program.code_size = code.size();
  program.format = format.c_str();
  program.format_size = format.size();
  auto args = PJRT_ARGS(PJRT_Client_Compile_Args);
  args.client = client_;
  args.program = &program;
  args.compile_options = compile_options.data();
  args.compile_options_size = compile_options.size();
  api_->Check(api_->raw()->PJRT_Client_Compile(&args), "compiling the program");
  return Wrap(args.executable, std::move(inputs), std::move(donated));
}

std::shared_ptr<Executable> Client::Deserialize(const std::string& serialized, std::vector<ArraySpec> inputs,
                                                std::vector<bool> donated) {
  if (serialized.empty()) throw InvalidArgument("cannot load an empty serialized executable");
  auto args = PJRT_ARGS(PJRT_Executable_DeserializeAndLoad_Args);
  args.client = client_;
  args.serialized_executable = serialized.data();
  args.serialized_executable_size = serialized.size();
  api_->Check(api_->raw()->PJRT_Executable_DeserializeAndLoad(&args), "loading a serialized executable");
  return Wrap(args.loaded_executable, std::move(inputs), std::move(donated));
}

std::shared_ptr<Executable> Client::Wrap(PJRT_LoadedExecutable* executable, std::vector<ArraySpec> inputs,
                                         std::vector<bool> donated) {
  auto owned = std::make_shared<Executable>(shared_from_this(), executable);  // destroys it if the checks throw
  owned->SetSignature(std::move(inputs), std::move(donated));
  return owned;
}

Client::MemoryStats Client::DeviceMemoryStats(int device_index) const {
  auto args = PJRT_ARGS(PJRT_Device_MemoryStats_Args);
  args.device = device(device_index).device;
  api_->Check(api_->raw()->PJRT_Device_MemoryStats(&args), "reading device memory statistics");
  MemoryStats stats;
  stats.bytes_in_use = args.bytes_in_use;
  if (args.peak_bytes_in_use_is_set) stats.peak_bytes_in_use = args.peak_bytes_in_use;
  if (args.bytes_limit_is_set) stats.bytes_limit = args.bytes_limit;
  return stats;
}

std::shared_ptr<Buffer> Client::BufferFromHost(const void* data, const ArraySpec& spec,
                                               const std::vector<int64_t>& byte_strides, int device_index) {
  DTypeOf(spec.type);  // rejects unsupported types before the plugin sees them
  auto args = PJRT_ARGS(PJRT_Client_BufferFromHostBuffer_Args);
  args.client = client_;
  args.data = data;
  args.type = spec.type;
  args.dims = spec.dims.data();
  args.num_dims = spec.dims.size();
  args.byte_strides = byte_strides.empty() ? nullptr : byte_strides.data();
  args.num_byte_strides = byte_strides.size();
  // The copy happens during the call, so the caller's array may change afterwards.
  args.host_buffer_semantics = PJRT_HostBufferSemantics_kImmutableOnlyDuringCall;
  args.device = device(device_index).device;
  api_->Check(api_->raw()->PJRT_Client_BufferFromHostBuffer(&args), "copying an array to the device");
  Event done(api_, args.done_with_host_buffer);
  auto buffer = std::make_shared<Buffer>(shared_from_this(), args.buffer);
  done.Await("copying an array to the device");
  return buffer;
}

}  // namespace metagrad
