// The programs of a compiled task and their flat signatures: the one
// statement of the contract between lowering (python/metagrad/_src/lowering.py
// reads this table through the bindings), the task runner and saved tasks.
//
// Every program takes and returns flat lists of arrays, in groups:
//   S  every state leaf               Z  every metaparameter (z) leaf
//   X  every data leaf                t  the step index, an int32 scalar
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
//   name             inputs         donated  outputs
//   init             Z X                     S
//   step             S Z X t                 S
//   advance_<n>      S Z X t                 S        steps t..t+n-1 in one execution
//   output           S Z X                   p
//   output_vjp       S Z X                   p D A
//   step_vjp         S Z X t D A    D A      D A      adds step t's dz to A
//   segment_vjp_<n>  S Z X t D A    D A      D A      steps t+n-1..t reversed in one execution
//   init_vjp         Z X D A        D A      A
//   all_finite       D A                     f        every element finite
//   state_finite     S                       f        every floating state element finite
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
constexpr int64_t kManifestVersion = 3;  // 3: sharded tasks (per-shard program signatures)

class Executable;
using ExecutablePtr = std::shared_ptr<Executable>;

struct ProgramKind {
  const char* name;     // "segment_vjp" for segment_vjp_<n>
  bool sized;           // named <name>_<n>, n >= 1 steps
  const char* inputs;   // group letters, e.g. "SZXtDA"
  const char* donated;  // the input groups donated
  const char* outputs;
};

const std::vector<ProgramKind>& ProgramKinds();

struct ProgramName {
  const ProgramKind* kind;
  int64_t length;  // n of a sized program, 0 otherwise
};
// "segment_vjp_10" -> {segment_vjp, 10}; throws InvalidArgument naming the
// known programs for anything else.
ProgramName ParseProgramName(const std::string& name);

// Shapes and dtypes of a task's flat groups: of each device's shard.
struct TaskLayout {
  int64_t devices = 1;  // shards per leaf: the devices every program runs on
  std::vector<ArraySpec> state, z, data;
  std::vector<bool> differentiable;  // per state leaf: carries a cotangent
  std::vector<ArraySpec> accumulators;  // per z leaf (with the leading m axis when outputs > 0)
  ArraySpec phi;                        // a float scalar, or float[m]
  int64_t outputs = 0;                  // 0: phi is a scalar; m: a vector of m outputs

  std::vector<ArraySpec> Group(char group) const;
  int64_t state_bytes() const;  // of one state, per device
};

// The inputs, donation flags and outputs program `name` must have for `layout`.
struct Signature {
  std::vector<ArraySpec> inputs;
  std::vector<bool> donated;
  std::vector<ArraySpec> outputs;
};
Signature ExpectedSignature(const std::string& name, const TaskLayout& layout);

// The executables of a task, by role.
struct TaskPrograms {
  ExecutablePtr init, step, output, output_vjp, step_vjp, init_vjp, all_finite, state_finite;
  // Fused programs by their number of steps n: forward advances (training
  // and replays use the largest that fits; chunks start at multiples of n)
  // and reverses of n steps.
  std::map<int64_t, ExecutablePtr> advance, segment_vjp;

  // The one place that maps program names to roles; unknown names throw.
  static TaskPrograms FromNamed(const std::map<std::string, ExecutablePtr>& programs);
};

}  // namespace metagrad
