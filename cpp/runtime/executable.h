// A compiled program: its signature, memory statistics, serialization, and
// execution with argument checks.
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
  // Takes ownership of `executable`; reads its outputs' specs.
  Executable(std::shared_ptr<Client> client, PJRT_LoadedExecutable* executable);
  ~Executable();
  Executable(const Executable&) = delete;
  Executable& operator=(const Executable&) = delete;

  // The inputs checked at every execution and the donated ones; the plugin
  // cannot report them, so they come from the program's text (lowering) or a
  // saved task's manifest.
  void SetSignature(std::vector<ArraySpec> inputs, std::vector<bool> donated);

  const std::vector<ArraySpec>& inputs() const { return inputs_; }
  const std::vector<ArraySpec>& outputs() const { return outputs_; }
  const std::vector<bool>& donated() const { return donated_; }
  const std::shared_ptr<Client>& client() const { return client_; }
  PJRT_LoadedExecutable* raw() const { return executable_; }

  MemoryStats CompiledMemoryStats() const;
  // Platform-specific bytes for Client::Deserialize with the same plugin.
  std::string Serialize() const;

  // Enqueues one execution on device 0 and returns its outputs at once; they
  // become ready asynchronously. Donated arguments are consumed.
  std::vector<BufferPtr> Execute(const std::vector<Buffer*>& args) const;

  // Checks count, shapes, dtypes, liveness and donation of `args`.
  void CheckArguments(const std::vector<Buffer*>& args) const;

 private:
  std::shared_ptr<Client> client_;
  PJRT_LoadedExecutable* executable_;
  std::vector<ArraySpec> inputs_;
  std::vector<bool> donated_;
  std::vector<ArraySpec> outputs_;
};

}  // namespace metagrad
