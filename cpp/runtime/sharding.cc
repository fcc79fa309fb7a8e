#include "runtime/sharding.h"

#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <set>

namespace metagrad {

namespace {

int64_t AxisIndex(const Mesh& mesh, const std::string& axis) {
  for (size_t i = 0; i < mesh.axes.size(); ++i) {
    if (mesh.axes[i] == axis) return static_cast<int64_t>(i);
  }
  return -1;
}

std::string MeshText(const Mesh& mesh) {
  std::string text = "{";
  for (size_t i = 0; i < mesh.axes.size(); ++i) {
    text += (i ? ", '" : "'") + mesh.axes[i] + "': " + std::to_string(mesh.sizes[i]);
  }
  return text + "}";
}

// Row-major byte strides of an array of `dims`.
std::vector<int64_t> ByteStrides(const std::vector<int64_t>& dims, size_t element_size) {
  std::vector<int64_t> strides(dims.size());
  int64_t stride = static_cast<int64_t>(element_size);
  for (size_t i = dims.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= dims[i];
  }
  return strides;
}

}  // namespace

int64_t Mesh::num_devices() const {
  int64_t n = 1;
  for (int64_t size : sizes) n *= size;
  return n;
}

std::string ToString(const PartitionSpec& spec) {
  std::string text = "P(";
  for (size_t i = 0; i < spec.size(); ++i) {
    text += i ? ", " : "";
    if (spec[i].empty()) {
      text += "None";
    } else if (spec[i].size() == 1) {
      text += "'" + spec[i][0] + "'";
    } else {
      text += "(";
      for (size_t j = 0; j < spec[i].size(); ++j) text += (j ? ", '" : "'") + spec[i][j] + "'";
      text += ")";
    }
  }
  return text + ")";
}

void CheckPartitionSpec(const std::vector<int64_t>& dims, const PartitionSpec& spec, const Mesh& mesh,
                        const std::string& what) {
  if (mesh.axes.size() != mesh.sizes.size() || mesh.axes.empty()) {
    throw InvalidArgument("a mesh needs one size per axis and at least one axis");
  }
  for (int64_t size : mesh.sizes) {
    if (size < 1) throw InvalidArgument("mesh axis sizes must be >= 1, got " + MeshText(mesh));
  }
  if (spec.size() > dims.size()) {
    throw InvalidArgument(what + " has " + std::to_string(dims.size()) + " dimension(s) but its PartitionSpec " +
                          ToString(spec) + " names " + std::to_string(spec.size()));
  }
  std::set<std::string> used;
  for (size_t dim = 0; dim < spec.size(); ++dim) {
    int64_t parts = 1;
    for (const std::string& axis : spec[dim]) {
      const int64_t index = AxisIndex(mesh, axis);
      if (index < 0) {
        throw InvalidArgument(what + ": PartitionSpec " + ToString(spec) + " names mesh axis '" + axis +
                              "', the mesh is " + MeshText(mesh));
      }
      if (!used.insert(axis).second) {
        throw InvalidArgument(what + ": PartitionSpec " + ToString(spec) + " uses mesh axis '" + axis + "' twice");
      }
      parts *= mesh.sizes[index];
    }
    if (dims[dim] % parts != 0) {
      throw InvalidArgument(what + ": dimension " + std::to_string(dim) + " of size " + std::to_string(dims[dim]) +
                            " is split " + std::to_string(parts) + " ways by " + ToString(spec) +
                            ", which does not divide it; pad it or shard another dimension");
    }
  }
}

std::vector<int64_t> ShardDims(const std::vector<int64_t>& dims, const PartitionSpec& spec, const Mesh& mesh) {
  std::vector<int64_t> shard = dims;
  for (size_t dim = 0; dim < spec.size() && dim < dims.size(); ++dim) {
    for (const std::string& axis : spec[dim]) shard[dim] /= mesh.sizes[AxisIndex(mesh, axis)];
  }
  return shard;
}

std::vector<int64_t> ShardOffsets(const std::vector<int64_t>& dims, const PartitionSpec& spec, const Mesh& mesh,
                                  int64_t partition) {
  if (partition < 0 || partition >= mesh.num_devices()) {
    throw InvalidArgument("partition " + std::to_string(partition) + " is outside the mesh " + MeshText(mesh));
  }
  std::vector<int64_t> coords(mesh.sizes.size());
  for (size_t i = mesh.sizes.size(); i-- > 0;) {  // row-major: the last axis varies fastest
    coords[i] = partition % mesh.sizes[i];
    partition /= mesh.sizes[i];
  }
  const std::vector<int64_t> block = ShardDims(dims, spec, mesh);
  std::vector<int64_t> offsets(dims.size(), 0);
  for (size_t dim = 0; dim < spec.size() && dim < dims.size(); ++dim) {
    int64_t index = 0;
    for (const std::string& axis : spec[dim]) {
      const int64_t a = AxisIndex(mesh, axis);
      index = index * mesh.sizes[a] + coords[a];
    }
    offsets[dim] = index * block[dim];
  }
  return offsets;
}

std::vector<BufferPtr> UploadShards(Client& client, const void* data, const ArraySpec& global,
                                    const PartitionSpec& spec, const Mesh& mesh, const std::vector<int>& devices) {
  CheckPartitionSpec(global.dims, spec, mesh, "the array " + global.ToString());
  if (static_cast<int64_t>(devices.size()) != mesh.num_devices()) {
    throw InvalidArgument("the mesh " + MeshText(mesh) + " has " + std::to_string(mesh.num_devices()) +
                          " partitions, got " + std::to_string(devices.size()) + " devices");
  }
  const ArraySpec shard{ShardDims(global.dims, spec, mesh), global.type};
  const std::vector<int64_t> strides = ByteStrides(global.dims, DTypeOf(global.type).size);
  std::vector<BufferPtr> shards;
  for (size_t p = 0; p < devices.size(); ++p) {
    const std::vector<int64_t> offsets = ShardOffsets(global.dims, spec, mesh, static_cast<int64_t>(p));
    int64_t start = 0;
    for (size_t dim = 0; dim < offsets.size(); ++dim) start += offsets[dim] * strides[dim];
    // A whole array is dense; a block is a strided view of it, which PJRT copies directly.
    const bool whole = shard.dims == global.dims;
    shards.push_back(client.BufferFromHost(static_cast<const char*>(data) + start, shard,
                                           whole ? std::vector<int64_t>{} : strides, devices[p]));
  }
  return shards;
}

std::string AssembleShards(const std::vector<BufferPtr>& shards, const ArraySpec& global, const PartitionSpec& spec,
                           const Mesh& mesh) {
  CheckPartitionSpec(global.dims, spec, mesh, "the array " + global.ToString());
  if (static_cast<int64_t>(shards.size()) != mesh.num_devices()) {
    throw InvalidArgument("the mesh " + MeshText(mesh) + " has " + std::to_string(mesh.num_devices()) +
                          " partitions, got " + std::to_string(shards.size()) + " shards");
  }
  const size_t element = DTypeOf(global.type).size;
  const ArraySpec shard{ShardDims(global.dims, spec, mesh), global.type};
  const std::vector<int64_t> strides = ByteStrides(global.dims, element);
  std::string out(global.num_bytes(), '\0');
  std::set<std::vector<int64_t>> written;
  std::string block(shard.num_bytes(), '\0');
  for (size_t p = 0; p < shards.size(); ++p) {
    const std::vector<int64_t> offsets = ShardOffsets(global.dims, spec, mesh, static_cast<int64_t>(p));
    if (!written.insert(offsets).second) continue;
    if (!(shards[p]->spec() == shard)) {
      throw InvalidArgument("shard " + std::to_string(p) + " is " + shards[p]->spec().ToString() + ", expected " +
                            shard.ToString() + " for " + global.ToString() + " split by " + ToString(spec));
    }
    shards[p]->ToHost(block.data(), block.size());
    if (global.dims.empty()) {
      out = block;
      continue;
    }
    // Copy the block's rows (its last dimension is contiguous in both arrays).
    const size_t rank = global.dims.size();
    const size_t row = static_cast<size_t>(shard.dims[rank - 1]) * element;
    const size_t rows = row == 0 ? 0 : block.size() / row;
    std::vector<int64_t> index(rank, 0);  // of the row within the block, last entry unused
    for (size_t r = 0; r < rows; ++r) {
      int64_t at = offsets[rank - 1] * strides[rank - 1];
      for (size_t d = 0; d + 1 < rank; ++d) at += (offsets[d] + index[d]) * strides[d];
      std::memcpy(out.data() + at, block.data() + r * row, row);
      for (size_t d = rank - 1; d-- > 0;) {  // next row: increment the index, last-but-one dimension fastest
        if (++index[d] < shard.dims[d]) break;
        index[d] = 0;
      }
    }
  }
  return out;
}

std::string CheckCpuCores(const std::string& platform, size_t num_devices) {
  cpu_set_t set;
  const size_t cores = sched_getaffinity(0, sizeof(set), &set) == 0 ? static_cast<size_t>(CPU_COUNT(&set)) : 1;
  if (platform != "cpu" || num_devices <= cores) return "";
  const std::string message = std::to_string(num_devices) + " CPU devices on " + std::to_string(cores) +
                              " cores: XLA's CPU collectives can deadlock when the devices outnumber the cores, and "
                              "XLA then aborts the process (a 40 s rendezvous timeout)";
  const char* allow = std::getenv(kCpuOversubscribeEnv);
  if (allow != nullptr && std::string(allow) == "1") return message;
  throw InvalidArgument(message + ". Use a mesh of at most " + std::to_string(cores) +
                        " CPU devices, or set " + kCpuOversubscribeEnv + "=1 to run anyway (at the risk of that "
                        "abort: docs/scaling.md).");
}

}  // namespace metagrad
