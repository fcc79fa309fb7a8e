// A saved task directory (python/metagrad/_src/saved.py documents the
// format), read without Python. Program signatures come from the manifest and
// are checked against the contract (runtime/programs.h) for the task's layout.
#pragma once

#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime/batch_stream.h"
#include "runtime/programs.h"
#include "runtime/sharding.h"

namespace metagrad::bench {

// A malformed task directory; the message names the file (and field).
class ManifestError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ProgramEntry {
  std::string file;  // inside the task directory
  std::string backend;
  Signature signature;
};

// How a sharded task splits its leaves (absent: one device).
struct TaskSharding {
  Mesh mesh;
  bool use_shardy_partitioner = true;
  std::vector<int> devices;  // of the partitions, in order (indices in the client's devices)
  std::vector<PartitionSpec> state, z, data;
  std::vector<PartitionSpec> batch;  // per leaf of a streamed batch (layout.batch)
};

struct Manifest {
  std::string directory;
  std::string path;  // of manifest.json
  int64_t steps = 0;
  std::string backend;
  TaskLayout layout;                      // per shard: what the programs take
  std::vector<ArraySpec> z_global, data_global;  // the whole arrays, as stored
  std::vector<ArraySpec> batch_global;           // one step's whole streamed batch
  bool sharded = false;
  TaskSharding sharding;
  std::vector<std::string> z_paths, data_paths;  // pytree paths of the leaves, for messages
  std::vector<std::string> z_files, data_files;  // arrays, inside the directory
  std::map<std::string, ProgramEntry> programs;
  std::map<std::string, std::string> versions;
  // Streamed data (layout.batch non-empty): each leaf's rows in a file (one
  // carried inside the directory, or a referenced file by its absolute path),
  // and the index table, int64 (steps, batch), inside the directory.
  std::vector<StreamedLeaf> stream_rows;
  std::string stream_batches;
};

// Parses and validates `directory`/manifest.json; throws ManifestError.
Manifest ReadManifest(const std::string& directory);

// Whole file as bytes; throws ManifestError naming it if it cannot be read.
std::string ReadFile(const std::string& path);
// "[f32[3], s32[]]": specs as error messages show them.
std::string SpecList(const std::vector<ArraySpec>& specs);

// The arrays of `files` (inside the directory), size-checked against `specs` (whole arrays).
std::vector<std::string> ReadArrays(const Manifest& manifest, const std::vector<std::string>& files,
                                    const std::vector<ArraySpec>& specs, const std::vector<std::string>& paths);

}  // namespace metagrad::bench
