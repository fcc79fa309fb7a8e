// An owned PJRT device buffer.
#pragma once

#include <memory>
#include <string>

#include "runtime/client.h"

namespace metagrad {

class Buffer {
 public:
  Buffer(std::shared_ptr<Client> client, PJRT_Buffer* buffer);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  PJRT_Buffer* raw() const { return buffer_; }
  const ArraySpec& spec() const { return spec_; }
  const std::shared_ptr<Client>& client() const { return client_; }
  // Position of the buffer's device in client()->devices().
  int device_index() const { return device_index_; }
  // Kind of the memory space holding it: "device", "pinned_host", "unpinned_host"...
  std::string memory_kind() const;

  // True once the buffer was donated to an execution (or deleted).
  bool is_deleted() const;
  size_t on_device_size() const;
  // Blocks until the buffer's value is computed; throws the computation's error.
  void Await() const;
  // Blocks until the value is copied into `dst` (row-major, `size` bytes).
  void ToHost(void* dst, size_t size) const;
  // A copy in memory space `kind` of the same device, returned at once and
  // ready asynchronously (executions that take it wait for it). Throws
  // InvalidArgument naming the device's kinds when it has no `kind`.
  std::shared_ptr<Buffer> CopyToMemory(const std::string& kind) const;

  // Zero-copy access for DLPack export: the pointer stays valid while an
  // external reference is held.
  void* AcquireExternalPointer();
  void ReleaseExternalPointer();

 private:
  std::shared_ptr<Client> client_;
  PJRT_Buffer* buffer_;
  ArraySpec spec_;
  int device_index_;
};

}  // namespace metagrad
