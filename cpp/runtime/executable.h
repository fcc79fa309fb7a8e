// A compiled program: its signature, memory statistics, serialization, and
// execution with argument checks. A program partitioned over several devices
// (SPMD) runs once per device, each with its own shards; its signature is per
// shard and its values travel as flat leaf-major lists (leaf 0 on each device
// in turn, then leaf 1...). On one device that is the plain list of arrays.
#pragma once

#include <memory>
#include <vector>

#include "runtime/client.h"

namespace metagrad {

class Buffer;
using BufferPtr = std::shared_ptr<Buffer>;

// XLA's compiled memory statistics of a program (bytes, on the device).
struct MemoryStats {
  int64_t argument_bytes = 0;
  int64_t output_bytes = 0;
  int64_t alias_bytes = 0;  // outputs that reuse donated arguments
  int64_t temp_bytes = 0;   // scratch allocated during an execution
  int64_t generated_code_bytes = 0;
};

class Executable {
 public:
  // Takes ownership of `executable`; reads its devices and its outputs' specs.
  Executable(std::shared_ptr<Client> client, PJRT_LoadedExecutable* executable);
  ~Executable();
  Executable(const Executable&) = delete;
  Executable& operator=(const Executable&) = delete;

  // The inputs checked at every execution and the donated ones; the plugin
  // cannot report them, so they come from the program's text (lowering) or a
  // saved task's manifest. On several devices the per-shard inputs are checked
  // against XLA's argument bytes here: a multi-device execution that XLA
  // rejects on one device leaves the CPU client unable to finish any later one.
  void SetSignature(std::vector<ArraySpec> inputs, std::vector<bool> donated);

  const std::vector<ArraySpec>& inputs() const { return inputs_; }
  const std::vector<ArraySpec>& outputs() const { return outputs_; }
  const std::vector<bool>& donated() const { return donated_; }
  // The devices (positions in client()->devices()) of the partitions, in order.
  const std::vector<int>& devices() const { return devices_; }
  size_t num_devices() const { return devices_.size(); }
  const std::shared_ptr<Client>& client() const { return client_; }
  PJRT_LoadedExecutable* raw() const { return executable_; }

  // Per device.
  MemoryStats CompiledMemoryStats() const;
  // Platform-specific bytes for Client::Deserialize with the same plugin.
  std::string Serialize() const;

  // Enqueues one execution on each device and returns the outputs at once,
  // leaf-major like `args`; they become ready asynchronously. Donated
  // arguments are consumed.
  std::vector<BufferPtr> Execute(const std::vector<Buffer*>& args) const;

  // Checks count, shapes, dtypes, devices, liveness and donation of `args`
  // (inputs().size() * num_devices() buffers, leaf-major).
  void CheckArguments(const std::vector<Buffer*>& args) const;

 private:
  std::shared_ptr<Client> client_;
  PJRT_LoadedExecutable* executable_;
  std::vector<ArraySpec> inputs_;
  std::vector<bool> donated_;
  std::vector<ArraySpec> outputs_;
  std::vector<int> devices_;
};

}  // namespace metagrad
