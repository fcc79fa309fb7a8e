#include "runtime/buffer.h"

namespace metagrad {

Buffer::Buffer(std::shared_ptr<Client> client, PJRT_Buffer* buffer) : client_(std::move(client)), buffer_(buffer) {
  const Api& api = client_->api();
  auto dims = PJRT_ARGS(PJRT_Buffer_Dimensions_Args);
  dims.buffer = buffer_;
  api.Check(api->PJRT_Buffer_Dimensions(&dims), "reading buffer dimensions");
  spec_.dims.assign(dims.dims, dims.dims + dims.num_dims);
  auto type = PJRT_ARGS(PJRT_Buffer_ElementType_Args);
  type.buffer = buffer_;
  api.Check(api->PJRT_Buffer_ElementType(&type), "reading buffer element type");
  spec_.type = type.type;
}

Buffer::~Buffer() {
  auto args = PJRT_ARGS(PJRT_Buffer_Destroy_Args);
  args.buffer = buffer_;
  client_->api().Ignore(client_->api()->PJRT_Buffer_Destroy(&args));
}

bool Buffer::is_deleted() const {
  auto args = PJRT_ARGS(PJRT_Buffer_IsDeleted_Args);
  args.buffer = buffer_;
  client_->api().Check(client_->api()->PJRT_Buffer_IsDeleted(&args), "querying a buffer");
  return args.is_deleted;
}

size_t Buffer::on_device_size() const {
  auto args = PJRT_ARGS(PJRT_Buffer_OnDeviceSizeInBytes_Args);
  args.buffer = buffer_;
  client_->api().Check(client_->api()->PJRT_Buffer_OnDeviceSizeInBytes(&args), "reading a buffer size");
  return args.on_device_size_in_bytes;
}

void Buffer::Await() const {
  if (is_deleted()) throw InvalidArgument("the buffer was donated to an execution and no longer holds data");
  auto args = PJRT_ARGS(PJRT_Buffer_ReadyEvent_Args);
  args.buffer = buffer_;
  client_->api().Check(client_->api()->PJRT_Buffer_ReadyEvent(&args), "waiting for a buffer");
  Event(client_->api_ptr(), args.event).Await("computing a buffer");
}

void Buffer::ToHost(void* dst, size_t size) const {
  if (is_deleted()) throw InvalidArgument("the buffer was donated to an execution and no longer holds data");
  if (size < spec_.num_bytes()) throw InvalidArgument("host destination too small for " + spec_.ToString());
  auto args = PJRT_ARGS(PJRT_Buffer_ToHostBuffer_Args);
  args.src = buffer_;
  args.dst = dst;
  args.dst_size = size;
  client_->api().Check(client_->api()->PJRT_Buffer_ToHostBuffer(&args), "copying a buffer to the host");
  Event(client_->api_ptr(), args.event).Await("copying a buffer to the host");
}

void* Buffer::AcquireExternalPointer() {
  Await();
  const Api& api = client_->api();
  auto increase = PJRT_ARGS(PJRT_Buffer_IncreaseExternalReferenceCount_Args);
  increase.buffer = buffer_;
  api.Check(api->PJRT_Buffer_IncreaseExternalReferenceCount(&increase), "pinning a buffer for DLPack");
  auto pointer = PJRT_ARGS(PJRT_Buffer_OpaqueDeviceMemoryDataPointer_Args);
  pointer.buffer = buffer_;
  api.Check(api->PJRT_Buffer_OpaqueDeviceMemoryDataPointer(&pointer), "reading a buffer's device pointer");
  return pointer.device_memory_ptr;
}

void Buffer::ReleaseExternalPointer() {
  auto decrease = PJRT_ARGS(PJRT_Buffer_DecreaseExternalReferenceCount_Args);
  decrease.buffer = buffer_;
  client_->api().Check(client_->api()->PJRT_Buffer_DecreaseExternalReferenceCount(&decrease),
                       "unpinning a buffer");
}

}  // namespace metagrad
