#include "runtime/executable.h"

#include "runtime/buffer.h"

namespace metagrad {

namespace {

// The PJRT_Executable behind a loaded executable, destroyed when done.
class Description {
 public:
  explicit Description(const Executable& executable) : api_(executable.client()->api()) {
    auto get = PJRT_ARGS(PJRT_LoadedExecutable_GetExecutable_Args);
    get.loaded_executable = executable.raw();
    api_.Check(api_->PJRT_LoadedExecutable_GetExecutable(&get), "reading the executable");
    program_ = get.executable;
  }
  ~Description() {
    auto destroy = PJRT_ARGS(PJRT_Executable_Destroy_Args);
    destroy.executable = program_;
    api_.Ignore(api_->PJRT_Executable_Destroy(&destroy));
  }
  Description(const Description&) = delete;
  Description& operator=(const Description&) = delete;
  PJRT_Executable* get() const { return program_; }

 private:
  const Api& api_;
  PJRT_Executable* program_;
};

}  // namespace

Executable::Executable(std::shared_ptr<Client> client, PJRT_LoadedExecutable* executable)
    : client_(std::move(client)), executable_(executable) {
  const Api& api = client_->api();
  const Description program(*this);
  auto count = PJRT_ARGS(PJRT_Executable_NumOutputs_Args);
  count.executable = program.get();
  auto types = PJRT_ARGS(PJRT_Executable_OutputElementTypes_Args);
  types.executable = program.get();
  auto dims = PJRT_ARGS(PJRT_Executable_OutputDimensions_Args);
  dims.executable = program.get();
  api.Check(api->PJRT_Executable_NumOutputs(&count), "counting outputs");
  api.Check(api->PJRT_Executable_OutputElementTypes(&types), "reading output types");
  api.Check(api->PJRT_Executable_OutputDimensions(&dims), "reading output shapes");
  const int64_t* next = dims.dims;
  for (size_t i = 0; i < count.num_outputs; ++i) {
    ArraySpec spec;
    spec.dims.assign(next, next + dims.dim_sizes[i]);
    next += dims.dim_sizes[i];
    spec.type = types.output_types[i];
    outputs_.push_back(std::move(spec));
  }
  // Argument lists go in the order of the executable's addressable devices:
  // the partitions of its device assignment.
  auto addressable = PJRT_ARGS(PJRT_LoadedExecutable_AddressableDevices_Args);
  addressable.executable = executable_;
  api.Check(api->PJRT_LoadedExecutable_AddressableDevices(&addressable), "listing the program's devices");
  for (size_t i = 0; i < addressable.num_addressable_devices; ++i) {
    devices_.push_back(client_->DeviceIndex(addressable.addressable_devices[i]));
  }
  if (devices_.empty()) throw InvalidArgument("the compiled program has no device of this client");
}

Executable::~Executable() {
  auto args = PJRT_ARGS(PJRT_LoadedExecutable_Destroy_Args);
  args.executable = executable_;
  client_->api().Ignore(client_->api()->PJRT_LoadedExecutable_Destroy(&args));
}

void Executable::SetSignature(std::vector<ArraySpec> inputs, std::vector<bool> donated) {
  if (donated.size() != inputs.size()) {
    throw InvalidArgument("donated flags (" + std::to_string(donated.size()) + ") must match the inputs (" +
                          std::to_string(inputs.size()) + ")");
  }
  for (const ArraySpec& spec : inputs) DTypeOf(spec.type);
  if (devices_.size() > 1) {
    int64_t input_bytes = 0;
    for (const ArraySpec& spec : inputs) input_bytes += static_cast<int64_t>(spec.num_bytes());
    const int64_t argument_bytes = CompiledMemoryStats().argument_bytes;
    if (input_bytes != argument_bytes) {
      throw InvalidArgument("the per-shard inputs hold " + std::to_string(input_bytes) +
                            " bytes per device but the partitioned program takes " + std::to_string(argument_bytes) +
                            ": give the shard shapes of the shardings the module was lowered with");
    }
  }
  inputs_ = std::move(inputs);
  donated_ = std::move(donated);
}

MemoryStats Executable::CompiledMemoryStats() const {
  const Api& api = client_->api();
  const Description program(*this);
  auto args = PJRT_ARGS(PJRT_Executable_GetCompiledMemoryStats_Args);
  args.executable = program.get();
  api.Check(api->PJRT_Executable_GetCompiledMemoryStats(&args), "reading compiled memory statistics");
  return {args.argument_size_in_bytes, args.output_size_in_bytes, args.alias_size_in_bytes, args.temp_size_in_bytes,
          args.generated_code_size_in_bytes};
}

std::string Executable::Serialize() const {
  const Api& api = client_->api();
  const Description program(*this);
  auto args = PJRT_ARGS(PJRT_Executable_Serialize_Args);
  args.executable = program.get();
  api.Check(api->PJRT_Executable_Serialize(&args), "serializing the executable");
  std::string bytes(args.serialized_bytes, args.serialized_bytes_size);
  if (args.serialized_executable_deleter != nullptr) args.serialized_executable_deleter(args.serialized_executable);
  return bytes;
}

void Executable::CheckArguments(const std::vector<Buffer*>& args) const {
  const size_t num_devices = devices_.size();
  if (args.size() != inputs_.size() * num_devices) {
    throw InvalidArgument("the program takes " + std::to_string(inputs_.size()) + " argument(s)" +
                          (num_devices > 1 ? " on each of " + std::to_string(num_devices) + " devices" : "") +
                          ", got " + std::to_string(args.size()) + (num_devices > 1 ? " buffers" : ""));
  }
  for (size_t k = 0; k < args.size(); ++k) {
    const size_t i = k / num_devices, d = k % num_devices;
    const std::string which =
        "argument " + std::to_string(i) + (num_devices > 1 ? " (shard " + std::to_string(d) + ")" : "");
    if (args[k] == nullptr) throw InvalidArgument(which + " is None");
    if (args[k]->client() != client_) throw InvalidArgument(which + " lives on another client");
    if (!(args[k]->spec() == inputs_[i])) {
      throw InvalidArgument(which + " is " + args[k]->spec().ToString() + ", the program expects " +
                            (num_devices > 1 ? "the shard " : "") + inputs_[i].ToString());
    }
    if (args[k]->device_index() != devices_[d]) {
      throw InvalidArgument(which + " is on device " + std::to_string(args[k]->device_index()) +
                            ", the program runs it on device " + std::to_string(devices_[d]) +
                            ": upload each shard to the device of its partition");
    }
    if (args[k]->is_deleted()) {
      throw InvalidArgument(which + " was donated to an earlier execution and holds no data any more");
    }
    if (donated_[i]) {
      for (size_t j = 0; j < args.size(); ++j) {
        if (j != k && args[j] == args[k]) {
          throw InvalidArgument(which + " is donated but also passed as argument " + std::to_string(j / num_devices) +
                                ": pass distinct buffers");
        }
      }
    }
  }
}

std::vector<BufferPtr> Executable::Execute(const std::vector<Buffer*>& args) const {
  CheckArguments(args);
  const size_t num_devices = devices_.size(), num_args = inputs_.size(), num_outputs = outputs_.size();
  std::vector<PJRT_Buffer*> raw_args(args.size()), raw_outputs(num_outputs * num_devices, nullptr);
  std::vector<PJRT_Buffer* const*> argument_lists(num_devices);
  std::vector<PJRT_Buffer**> output_lists(num_devices);
  for (size_t d = 0; d < num_devices; ++d) {  // device-major lists from the leaf-major arguments
    for (size_t i = 0; i < num_args; ++i) raw_args[d * num_args + i] = args[i * num_devices + d]->raw();
    argument_lists[d] = raw_args.data() + d * num_args;
    output_lists[d] = raw_outputs.data() + d * num_outputs;
  }
  auto options = PJRT_ARGS(PJRT_ExecuteOptions);
  auto execute = PJRT_ARGS(PJRT_LoadedExecutable_Execute_Args);
  execute.executable = executable_;
  execute.options = &options;
  execute.argument_lists = argument_lists.data();
  execute.num_devices = num_devices;
  execute.num_args = num_args;
  execute.output_lists = output_lists.data();
  client_->api().Check(client_->api()->PJRT_LoadedExecutable_Execute(&execute), "executing the program");
  std::vector<BufferPtr> outputs(raw_outputs.size());
  for (size_t d = 0; d < num_devices; ++d) {
    for (size_t j = 0; j < num_outputs; ++j) {
      outputs[j * num_devices + d] = std::make_shared<Buffer>(client_, raw_outputs[d * num_outputs + j]);
    }
  }
  return outputs;
}

}  // namespace metagrad
