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
  if (args.size() != inputs_.size()) {
    throw InvalidArgument("the program takes " + std::to_string(inputs_.size()) + " argument(s), got " +
                          std::to_string(args.size()));
  }
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == nullptr) throw InvalidArgument("argument " + std::to_string(i) + " is None");
    if (args[i]->client() != client_) {
      throw InvalidArgument("argument " + std::to_string(i) + " lives on another client");
    }
    if (!(args[i]->spec() == inputs_[i])) {
      throw InvalidArgument("argument " + std::to_string(i) + " is " + args[i]->spec().ToString() +
                            ", the program expects " + inputs_[i].ToString());
    }
    if (args[i]->is_deleted()) {
      throw InvalidArgument("argument " + std::to_string(i) +
                            " was donated to an earlier execution and holds no data any more");
    }
    if (donated_[i]) {
      for (size_t j = 0; j < args.size(); ++j) {
        if (j != i && args[j] == args[i]) {
          throw InvalidArgument("argument " + std::to_string(i) + " is donated but also passed as argument " +
                                std::to_string(j) + ": pass distinct buffers");
        }
      }
    }
  }
}

std::vector<BufferPtr> Executable::Execute(const std::vector<Buffer*>& args) const {
  CheckArguments(args);
  std::vector<PJRT_Buffer*> raw_args(args.size());
  for (size_t i = 0; i < args.size(); ++i) raw_args[i] = args[i]->raw();
  std::vector<PJRT_Buffer*> raw_outputs(outputs_.size(), nullptr);
  PJRT_Buffer* const* argument_lists[] = {raw_args.data()};
  PJRT_Buffer** output_lists[] = {raw_outputs.data()};

  auto options = PJRT_ARGS(PJRT_ExecuteOptions);
  auto execute = PJRT_ARGS(PJRT_LoadedExecutable_Execute_Args);
  execute.executable = executable_;
  execute.options = &options;
  execute.argument_lists = argument_lists;
  execute.num_devices = 1;
  execute.num_args = raw_args.size();
  execute.output_lists = output_lists;
  client_->api().Check(client_->api()->PJRT_LoadedExecutable_Execute(&execute), "executing the program");
  std::vector<BufferPtr> outputs;
  outputs.reserve(raw_outputs.size());
  for (PJRT_Buffer* raw : raw_outputs) outputs.push_back(std::make_shared<Buffer>(client_, raw));
  return outputs;
}

}  // namespace metagrad
