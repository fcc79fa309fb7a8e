#include "runtime/client.h"

#include "runtime/buffer.h"
#include "runtime/executable.h"

namespace metagrad {

size_t ElementSize(PJRT_Buffer_Type type) {
  switch (type) {
    case PJRT_Buffer_Type_PRED:
    case PJRT_Buffer_Type_S8:
    case PJRT_Buffer_Type_U8:
      return 1;
    case PJRT_Buffer_Type_S16:
    case PJRT_Buffer_Type_U16:
    case PJRT_Buffer_Type_F16:
    case PJRT_Buffer_Type_BF16:
      return 2;
    case PJRT_Buffer_Type_S32:
    case PJRT_Buffer_Type_U32:
    case PJRT_Buffer_Type_F32:
      return 4;
    case PJRT_Buffer_Type_S64:
    case PJRT_Buffer_Type_U64:
    case PJRT_Buffer_Type_F64:
    case PJRT_Buffer_Type_C64:
      return 8;
    case PJRT_Buffer_Type_C128:
      return 16;
    default:
      throw InvalidArgument("unsupported element type " + std::to_string(static_cast<int>(type)));
  }
}

namespace {
const std::pair<PJRT_Buffer_Type, const char*> kDTypeNames[] = {
    {PJRT_Buffer_Type_PRED, "bool"},     {PJRT_Buffer_Type_S8, "int8"},       {PJRT_Buffer_Type_S16, "int16"},
    {PJRT_Buffer_Type_S32, "int32"},     {PJRT_Buffer_Type_S64, "int64"},     {PJRT_Buffer_Type_U8, "uint8"},
    {PJRT_Buffer_Type_U16, "uint16"},    {PJRT_Buffer_Type_U32, "uint32"},    {PJRT_Buffer_Type_U64, "uint64"},
    {PJRT_Buffer_Type_F16, "float16"},   {PJRT_Buffer_Type_F32, "float32"},   {PJRT_Buffer_Type_F64, "float64"},
    {PJRT_Buffer_Type_BF16, "bfloat16"}, {PJRT_Buffer_Type_C64, "complex64"}, {PJRT_Buffer_Type_C128, "complex128"},
};
}  // namespace

std::string DTypeName(PJRT_Buffer_Type type) {
  for (const auto& [t, name] : kDTypeNames) {
    if (t == type) return name;
  }
  return "type" + std::to_string(static_cast<int>(type));
}

PJRT_Buffer_Type ParseDType(const std::string& name) {
  for (const auto& [t, n] : kDTypeNames) {
    if (name == n) return t;
  }
  throw InvalidArgument("unsupported dtype '" + name + "'");
}

size_t ArraySpec::num_elements() const {
  size_t n = 1;
  for (int64_t d : dims) n *= static_cast<size_t>(d);
  return n;
}

size_t ArraySpec::num_bytes() const { return num_elements() * ElementSize(type); }

std::string ArraySpec::ToString() const {
  std::string s = DTypeName(type) + "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

std::string SerializeCompileOptions(int num_replicas, int num_partitions) {
  if (num_replicas < 1 || num_partitions < 1 || num_replicas > 127 || num_partitions > 127) {
    throw InvalidArgument("num_replicas and num_partitions must be in [1, 127]");
  }
  // CompileOptionsProto{executable_build_options (3): {num_replicas (4), num_partitions (5)}}
  std::string build_options = {0x20, static_cast<char>(num_replicas), 0x28, static_cast<char>(num_partitions)};
  return std::string{0x1a, static_cast<char>(build_options.size())} + build_options;
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
  PJRT_Error* error = api_->raw()->PJRT_Client_Destroy(&args);
  if (error != nullptr) {
    auto destroy = PJRT_ARGS(PJRT_Error_Destroy_Args);
    destroy.error = error;
    api_->raw()->PJRT_Error_Destroy(&destroy);
  }
}

const DeviceInfo& Client::device(int index) const {
  if (index < 0 || index >= static_cast<int>(devices_.size())) {
    throw InvalidArgument("device index " + std::to_string(index) + " out of range: the client has " +
                          std::to_string(devices_.size()) + " device(s)");
  }
  return devices_[index];
}

std::shared_ptr<Executable> Client::Compile(const std::string& code, const std::string& format,
                                            std::vector<ArraySpec> inputs, std::vector<bool> donated,
                                            int num_replicas, int num_partitions) {
  if (code.empty()) throw InvalidArgument("cannot compile an empty program");
  if (format != "mlir" && format != "hlo") {
    throw InvalidArgument("unknown program format '" + format + "': use 'mlir' (text or bytecode) or 'hlo'");
  }
  if (donated.size() != inputs.size()) {
    throw InvalidArgument("donated flags (" + std::to_string(donated.size()) + ") must match the inputs (" +
                          std::to_string(inputs.size()) + ")");
  }
  const std::string options = SerializeCompileOptions(num_replicas, num_partitions);
  auto program = PJRT_ARGS(PJRT_Program);
  program.code = const_cast<char*>(code.data());
  program.code_size = code.size();
  program.format = format.c_str();
  program.format_size = format.size();
  auto args = PJRT_ARGS(PJRT_Client_Compile_Args);
  args.client = client_;
  args.program = &program;
  args.compile_options = options.data();
  args.compile_options_size = options.size();
  api_->Check(api_->raw()->PJRT_Client_Compile(&args), "compiling the program");
  return std::make_shared<Executable>(shared_from_this(), args.executable, std::move(inputs), std::move(donated));
}

std::shared_ptr<Buffer> Client::BufferFromHost(const void* data, const ArraySpec& spec,
                                               const std::vector<int64_t>& byte_strides, int device_index) {
  ElementSize(spec.type);  // rejects unsupported types before the plugin sees them
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
