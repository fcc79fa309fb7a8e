// A compiled program: its signature, and execution with argument checks.
#pragma once

#include <memory>
#include <vector>

#include "runtime/client.h"

namespace metagrad {

class Buffer;
using BufferPtr = std::shared_ptr<Buffer>;

class Executable {
 public:
  Executable(std::shared_ptr<Client> client, PJRT_LoadedExecutable* executable, std::vector<ArraySpec> inputs,
             std::vector<bool> donated);
  ~Executable();
  Executable(const Executable&) = delete;
  Executable& operator=(const Executable&) = delete;

  const std::vector<ArraySpec>& inputs() const { return inputs_; }
  const std::vector<ArraySpec>& outputs() const { return outputs_; }
  const std::vector<bool>& donated() const { return donated_; }
  const std::shared_ptr<Client>& client() const { return client_; }
  PJRT_LoadedExecutable* raw() const { return executable_; }

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
