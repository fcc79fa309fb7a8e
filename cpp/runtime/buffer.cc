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
  auto device = PJRT_ARGS(PJRT_Buffer_Device_Args);
  device.buffer = buffer_;
  api.Check(api->PJRT_Buffer_Device(&device), "reading a buffer's device");
  device_index_ = client_->DeviceIndex(device.device);
}

namespace {

std::string MemoryKind(const Api& api, PJRT_Memory* memory) {
  auto kind = PJRT_ARGS(PJRT_Memory_Kind_Args);
  kind.memory = memory;
  api.Check(api->PJRT_Memory_Kind(&kind), "reading a memory kind");
  return std::string(kind.kind, kind.kind_size);
}

}  // namespace

std::string Buffer::memory_kind() const {
  const Api& api = client_->api();
  auto args = PJRT_ARGS(PJRT_Buffer_Memory_Args);
  args.buffer = buffer_;
  api.Check(api->PJRT_Buffer_Memory(&args), "reading a buffer's memory space");
  return MemoryKind(api, args.memory);
}

std::shared_ptr<Buffer> Buffer::CopyToMemory(const std::string& kind) const {
  if (is_deleted()) throw InvalidArgument("the buffer was donated to an execution and no longer holds data");
  const Api& api = client_->api();
  const DeviceInfo& device = client_->device(device_index_);
  auto memories = PJRT_ARGS(PJRT_Device_AddressableMemories_Args);
  memories.device = device.device;
  api.Check(api->PJRT_Device_AddressableMemories(&memories), "listing memory spaces");
  PJRT_Memory* target = nullptr;
  for (size_t m = 0; m < memories.num_memories && target == nullptr; ++m) {
    if (MemoryKind(api, memories.memories[m]) == kind) target = memories.memories[m];
  }
  if (target == nullptr) {
    std::string known;
    for (const std::string& name : device.memory_kinds) known += (known.empty() ? "" : ", ") + name;
    throw InvalidArgument("device " + std::to_string(device.id) + " has no memory kind '" + kind + "'; it has: " +
                          known);
  }
  auto args = PJRT_ARGS(PJRT_Buffer_CopyToMemory_Args);
  args.buffer = buffer_;
  args.dst_memory = target;
  api.Check(api->PJRT_Buffer_CopyToMemory(&args), "copying a buffer to another memory space");
  return std::make_shared<Buffer>(client_, args.dst_buffer);
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
