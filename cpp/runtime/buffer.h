// An owned PJRT device buffer.
#pragma once

#include <memory>

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

  // True once the buffer was donated to an execution (or deleted).
  bool is_deleted() const;
  size_t on_device_size() const;
  // Blocks until the buffer's value is computed; throws the computation's error.
  void Await() const;
  // Blocks until the value is copied into `dst` (row-major, `size` bytes).
  void ToHost(void* dst, size_t size) const;

  // Zero-copy access for DLPack export: the pointer stays valid while an
  // external reference is held.
  void* AcquireExternalPointer();
  void ReleaseExternalPointer();

 private:
  std::shared_ptr<Client> client_;
  PJRT_Buffer* buffer_;
  ArraySpec spec_;
};

}  // namespace metagrad
