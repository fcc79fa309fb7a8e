// How a value is split over the devices of one client: a mesh of named axes
// and, per array, the mesh axes that split each of its dimensions (jax's
// PartitionSpec). Programs lowered with these shardings are partitioned by
// XLA's SPMD partitioner; every device holds one shard of every value.
//
// Where each block lives (checked against XLA in tests/test_sharding.py):
// partition p has mesh coordinates unravel(p, sizes) (row-major, as jax's
// AbstractMesh numbers its devices); a dimension split over axes (a, b) is in
// size[a] * size[b] blocks, and partition p holds block
// coord[a] * size[b] + coord[b]. Python (_src/sharding.py) and the harness
// cut host arrays into shards and assemble them with these functions only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/buffer.h"
#include "runtime/executable.h"

namespace metagrad {

struct Mesh {
  std::vector<std::string> axes;
  std::vector<int64_t> sizes;
  int64_t num_devices() const;
};

// Per dimension of an array, the mesh axes splitting it, the most major
// first. Dimensions beyond its length are whole; all empty: replicated.
using PartitionSpec = std::vector<std::vector<std::string>>;

// "P('batch', None)"-like text, for messages.
std::string ToString(const PartitionSpec& spec);

// Throws InvalidArgument, naming `what`, unless `spec` splits an array of
// `dims` evenly over `mesh`: axes known and used once, no more entries than
// dimensions, every split dividing its dimension.
void CheckPartitionSpec(const std::vector<int64_t>& dims, const PartitionSpec& spec, const Mesh& mesh,
                        const std::string& what);

// The CPU plugin's devices share one pool of compute threads, one per core, and
// XLA runs collectives on pool threads: with more devices than cores, devices
// waiting in an all-reduce can hold every thread while the others need one, and
// XLA aborts the process after a 40 s rendezvous timeout (docs/scaling.md). That
// abort cannot be caught, so a CPU task over more devices than schedulable cores
// throws InvalidArgument unless $METAGRAD_CPU_OVERSUBSCRIBE=1; then the returned
// warning is non-empty. Used by Python and by the harness.
std::string CheckCpuCores(const std::string& platform, size_t num_devices);
inline constexpr char kCpuOversubscribeEnv[] = "METAGRAD_CPU_OVERSUBSCRIBE";

// The dimensions of every shard (the spec must pass CheckPartitionSpec).
std::vector<int64_t> ShardDims(const std::vector<int64_t>& dims, const PartitionSpec& spec, const Mesh& mesh);

// Where partition `partition`'s block starts, per dimension.
std::vector<int64_t> ShardOffsets(const std::vector<int64_t>& dims, const PartitionSpec& spec, const Mesh& mesh,
                                  int64_t partition);

// Uploads the block of every partition of a dense row-major host array:
// partition p's to client device devices[p] (strided copies, no host copy).
std::vector<BufferPtr> UploadShards(Client& client, const void* data, const ArraySpec& global,
                                    const PartitionSpec& spec, const Mesh& mesh, const std::vector<int>& devices);

// The global row-major array from its shards (one per partition); replicated
// blocks are read once.
std::string AssembleShards(const std::vector<BufferPtr>& shards, const ArraySpec& global, const PartitionSpec& spec,
                           const Mesh& mesh);

}  // namespace metagrad
