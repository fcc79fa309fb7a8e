// One walk of a checkpointing plan (schedule.h), shared by everything that
// reads a plan: checking it (CheckPlan), predicting what it costs
// (SimulatePlan) and running it on device buffers (TaskRunner::Metagradient).
// The walk holds the plan's rules and the accounting of device and host
// bytes; an executor does the work of each action. So the prediction and the
// run count the same bytes by the same formula, and a run checks its plan
// once, as it walks it.
//
// Device bytes at an execution: the saved states in device slots, the current
// state unless a device slot shares its buffers (right after a save into it
// or a restore from it), the cotangents and accumulators once output_vjp made
// them, and what the program adds (its outputs that alias no donated
// argument, and its temporaries). Data and z are outside the count: they stay
// on the device throughout.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "runtime/schedule.h"

namespace metagrad {

// What one execution of a program costs: its time, and the device bytes it
// adds to its live arguments (outputs that do not alias a donated argument,
// plus its temporaries: XLA's compiled memory statistics).
struct ProgramCost {
  double seconds = 0;
  int64_t bytes = 0;
};

// The costs of a task's programs, for walking a plan. Bytes are per device (a
// task over several devices holds a shard of each value on each).
struct CostTable {
  int64_t state_bytes = 0;      // one training state
  int64_t cotangent_bytes = 0;  // the cotangent of a state plus the metagradient accumulators
  // By program name (programs.h): "init", "step", "advance_10", "segment_vjp_10", ...
  std::map<std::string, ProgramCost> programs;
  // Copying one state to host memory and back (seconds; bytes unused).
  ProgramCost to_host, from_host;
  // Gathering one step's streamed batch on the host and copying it to the
  // device (its seconds and bytes); zero without streamed data. A worker
  // thread does it ahead of the programs, so an execution of n steps costs
  // the longer of the program and n batches.
  ProgramCost stream;
};

struct PlanStats {
  int64_t forward_steps = 0;   // steps applied by kAdvance, first forward pass included
  int64_t reversed_steps = 0;  // == T for a valid plan
  int64_t peak_saved = 0;      // most slots occupied at once (current state not counted)
  int64_t num_actions = 0;
  std::vector<int64_t> fused_lengths;  // distinct kReverse counts, ascending
};

struct PlanCost {
  double seconds = 0;           // the plan's executions and host copies
  int64_t peak_bytes = 0;       // on the device (see above)
  int64_t peak_host_bytes = 0;  // saved states in host memory
  int64_t bytes_to_host = 0, bytes_from_host = 0;
  int64_t bytes_streamed = 0;  // streamed batches copied to the device
  int64_t host_saves = 0;  // saves into host slots
  int64_t executions = 0;
};

// Does the work of a plan's actions, in the order the walk meets them, each
// after the walk has checked it. Programs are named as in programs.h.
class PlanExecutor {
 public:
  virtual ~PlanExecutor() = default;
  virtual void Init() = 0;
  // One execution of `program` ("step" or "advance_<count>") from the current
  // state at `step`.
  virtual void Forward(const std::string& program, int64_t step, int64_t count) = 0;
  virtual void Save(int slot, bool on_host) = 0;
  virtual void Restore(int slot, bool on_host) = 0;
  virtual void Free(int slot, bool on_host) = 0;
  virtual void Output() = 0;
  // One execution of `program` ("step_vjp" or "segment_vjp_<count>"):
  // reverses steps step+count-1 down to step.
  virtual void Reverse(const std::string& program, int64_t step, int64_t count) = 0;
  virtual void Finish() = 0;  // init_vjp
};

struct PlanWalk {
  PlanStats stats;
  PlanCost cost;  // zero without a cost table
};

// Walks `plan` over T steps. Throws std::invalid_argument unless
// 1 <= T <= 2^31-1, and PlanError naming the first action that breaks a rule
// of schedule.h (an executor has then done the actions before it). With
// `costs`, splits each advance into the table's fused forward programs
// (ForwardChunks) and adds up seconds and bytes, `host_slots` holding their
// states in host memory; throws std::invalid_argument, before any action,
// if the plan needs a program the table lacks. With an `executor` (which
// needs `costs`), calls it for each action.
PlanWalk WalkPlan(const Plan& plan, int64_t T, const CostTable* costs = nullptr,
                  const std::set<int>& host_slots = {}, PlanExecutor* executor = nullptr);

// The rules alone: WalkPlan(plan, T).stats.
PlanStats CheckPlan(const Plan& plan, int64_t T);

// The cost of `plan` over the T its output action names, from `costs`.
PlanCost SimulatePlan(const Plan& plan, const CostTable& costs, const std::set<int>& host_slots = {});

}  // namespace metagrad
