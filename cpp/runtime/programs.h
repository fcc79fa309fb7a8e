// The programs of a compiled task and their flat signatures: the one
// statement of the contract between lowering (python/metagrad/_src/lowering.py
// reads this table through the bindings), the task runner and saved tasks.
//
// Every program takes and returns flat lists of arrays, in groups:
//   S  every state leaf               Z  every metaparameter (z) leaf
//   X  every data leaf                t  the step index, an int32 scalar
//   B  the streamed batch of each step: per streamed leaf its rows, then
//      the rows' indices (int32); a program of n > 1 steps takes its steps'
//      batches stacked on a leading n axis. Empty for a task whose data all
//      stays on the device (batch_stream.h).
//   D  a cotangent per differentiable (floating-point) state leaf
//   A  an accumulator of the metagradient per z leaf (z's shape; float32
//      where z is a 16-bit float)
//   p  phi, the output: a scalar, or a vector of m outputs
//   f  a bool scalar
// With m outputs taken at once (a vector phi), D and A carry a leading m axis.
// A task sharded over N devices (TaskLayout::devices) has per-shard specs and
// N buffers per leaf in every group, leaf-major (executable.h); t, p and f are
// replicated (one copy per device).
//
// The kinds, their groups and donations are the table ProgramKinds()
// (programs.cc). What each computes: init builds state_0; step applies step
// t; advance_<n> steps t..t+n-1 in one execution; output is phi; output_vjp
// phi with its cotangents; step_vjp adds step t's dz to A and returns the
// cotangent of the state before it; segment_vjp_<n> reverses steps
// t+n-1..t in one execution; init_vjp adds init's dz; all_finite and
// state_finite are true when every floating element is finite.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "runtime/client.h"

namespace metagrad {

// Version of a saved task's manifest.json (python/metagrad/_src/saved.py
// writes it, cpp/bench/manifest.cc reads it; both take this constant).
constexpr int64_t kManifestVersion = 4;  // 3: sharded tasks (per-shard program signatures); 4: streamed data

class Executable;
using ExecutablePtr = std::shared_ptr<Executable>;

// One row per program kind; everything that needs to know the programs reads
// this table (the runner, the planner's cost table, the lowering, saved tasks).
// Adding a kind is one row here plus its builder in programs.py.
struct ProgramKind {
  const char* name;        // "segment_vjp" for segment_vjp_<n>
  bool sized;              // named <name>_<n>: n >= 1 steps in one execution
  const char* inputs;      // group letters, e.g. "SZXtDA"
  const char* donated;     // the input groups donated
  const char* outputs;
  const char* reverse_of;  // the forward kind it differentiates ("" for forward programs and checks)
  const char* one_step;    // a sized kind: the kind that does one of its steps ("step" for advance)
  const char* needed_by;   // "run": every task; "metagradient", "check_finite": those calls; "": optional
};

const std::vector<ProgramKind>& ProgramKinds();
// The row of `kind` ("advance", not "advance_4"); throws InvalidArgument for unknown kinds.
const ProgramKind& KindNamed(const std::string& kind);

struct ProgramName {
  const ProgramKind* kind;
  int64_t length;  // n of a sized program, 0 otherwise
};
// "segment_vjp_10" -> {segment_vjp, 10}; throws InvalidArgument naming the
// known programs for anything else.
ProgramName ParseProgramName(const std::string& name);
// The program that runs `count` steps of sized kind `kind` in one execution:
// its one-step kind for count == 1 ("step" for advance), "<kind>_<count>" otherwise.
std::string SizedProgram(const std::string& kind, int64_t count);

// Shapes and dtypes of a task's flat groups: of each device's shard.
struct TaskLayout {
  int64_t devices = 1;  // shards per leaf: the devices every program runs on
  std::vector<ArraySpec> state, z, data;
  std::vector<ArraySpec> batch;      // group B of one step (empty: no streamed data)
  std::vector<bool> differentiable;  // per state leaf: carries a cotangent
  std::vector<ArraySpec> accumulators;  // per z leaf (with the leading m axis when outputs > 0)
  ArraySpec phi;                        // a float scalar, or float[m]
  int64_t outputs = 0;                  // 0: phi is a scalar; m: a vector of m outputs

  std::vector<ArraySpec> Group(char group) const;
  int64_t state_bytes() const;      // of one state, per device
  int64_t cotangent_bytes() const;  // of a state's cotangents (D) and the accumulators (A), per device
};

// The inputs, donation flags and outputs program `name` must have for `layout`.
struct Signature {
  std::vector<ArraySpec> inputs;
  std::vector<bool> donated;
  std::vector<ArraySpec> outputs;
};
Signature ExpectedSignature(const std::string& name, const TaskLayout& layout);

// The executables of a task, by program name (names checked against ProgramKinds).
class TaskPrograms {
 public:
  TaskPrograms() = default;
  // Throws InvalidArgument for a name outside the contract.
  explicit TaskPrograms(std::map<std::string, ExecutablePtr> programs);

  // The program named `name`; nullptr when the task does not hold it.
  ExecutablePtr Find(const std::string& name) const;
  // The program that runs `count` steps of sized kind `kind` (SizedProgram);
  // throws InvalidArgument naming the lengths held when the task lacks it.
  const ExecutablePtr& Sized(const std::string& kind, int64_t count) const;
  // The lengths n > 1 of the sized kind's programs held, ascending.
  std::vector<int64_t> Lengths(const std::string& kind) const;
  // The programs the calls of `needed_by` need that the task lacks.
  std::vector<std::string> Missing(const std::string& needed_by) const;
  const std::map<std::string, ExecutablePtr>& all() const { return programs_; }

 private:
  std::map<std::string, ExecutablePtr> programs_;
};

}  // namespace metagrad
