// A saved task directory (python/metagrad/compiled.py, CompiledTask.save):
//   manifest.json            steps, programs {name: {file, backend}}, leaf
//                            specs of z, data and state, differentiable flags
//   programs/<name>.mlirbc   portable StableHLO artifacts
//   arrays/{data,z}_<i>.bin  raw little-endian arrays, C order
// Read without Python; program signatures follow lowering.py's table.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "runtime/client.h"

namespace metagrad::bench {

struct Leaf {
  std::string path;
  ArraySpec spec;
};

struct ProgramEntry {
  std::string file;     // relative to the task directory
  std::string backend;  // "enzyme", "jax" or "none"
  // Present when the manifest lists them per program; else from the table.
  std::vector<ArraySpec> inputs;
  std::vector<bool> donated;
};

struct Manifest {
  std::string directory;
  int64_t steps = 0;
  std::string backend;
  std::map<std::string, ProgramEntry> programs;
  std::vector<Leaf> z, data, state;
  std::vector<bool> differentiable;  // per state leaf
  std::map<std::string, std::string> versions;

  int64_t state_bytes() const;
  // Input specs and donation flags of program `name` (lowering.py's table):
  //   init (Z, X); step (S, Z, X, t); output, output_vjp (S, Z, X);
  //   step_vjp, segment_vjp_n (S, Z, X, t, D, Z) with D and the last Z donated;
  //   init_vjp (Z, X, D, Z) with D and the last Z donated; all_finite (D, Z).
  void Signature(const std::string& name, std::vector<ArraySpec>* inputs, std::vector<bool>* donated) const;
};

// Parses and validates `directory`/manifest.json; throws std::runtime_error
// (JsonError for syntax) naming what is wrong.
Manifest ReadManifest(const std::string& directory);

// Whole file as bytes; throws if it cannot be read.
std::string ReadFile(const std::string& path);

// arrays/<prefix>_<i>.bin for each leaf, size-checked against its spec.
std::vector<std::string> ReadArrays(const Manifest& manifest, const std::string& prefix,
                                    const std::vector<Leaf>& leaves);

}  // namespace metagrad::bench
