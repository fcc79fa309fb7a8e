// Checkpointing schedules as pure data: a Plan is the exact sequence of
// advances, saves, restores, frees and reverses that traverses a training run
// of T steps backwards in bounded memory. Building a plan touches no device;
// the executor walks it. CheckPlan simulates a plan and names the first rule
// it breaks, so every policy can be tested without running a model.
//
// Executing a plan: the executor holds a *current state* at position `pos`
// (state_0 at pos 0 to begin with) and numbered slots 0..peak-1.
//   kAdvance(step=t, count=n)  pos == t; apply steps t..t+n-1; pos = t+n.
//   kSave(slot, step=pos)      the (empty) slot now holds the current state.
//   kRestore(slot, step)       current = the slot's state (step == its step);
//                              the slot keeps it.
//   kFree(slot, step)          the slot is released (step == its step).
//   kOutput(step=T)            exactly once, right after the forward pass
//                              first reaches T, before any reverse.
//   kReverse(step=t, count=n)  pos == t; reverse steps t+n-1 down to t (n == 1:
//                              one step's vjp; n > 1: one fused reverse of n
//                              steps). Reverses cover T-1..0 exactly once, in
//                              decreasing order. The reverse CONSUMES the
//                              current state: the next action never reads it
//                              (it is a kRestore, a kFree or the end), so the
//                              executor may donate it to the reverse.
// Unused fields: slot == -1 for advance/output/reverse, count == 0 for
// save/restore/free/output. Every slot is freed by the end of a plan.
//
// Host tier: a plan runs with a set of *host slots*. A save into a host slot
// copies the state to host memory (the current state stays on the device); a
// restore from one copies it back to the device. Which slots go to the host
// is the planner's choice (HostSlotOrder).
//
// Fused leaves: with leaf > 1 a policy works on blocks of `leaf` steps (the
// last block has T % leaf steps when that is nonzero) and reverses each block
// with one kReverse of the block's length, so at most two fused lengths occur.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace metagrad {

enum class ActionKind { kAdvance, kSave, kRestore, kFree, kOutput, kReverse };

struct Action {
  ActionKind kind;
  int64_t step;
  int64_t count;
  int slot;
};

using Plan = std::vector<Action>;

// "advance", "save", "restore", "free", "output", "reverse".
const char* ActionKindName(ActionKind kind);
// Parses the names above; throws std::invalid_argument otherwise.
ActionKind ParseActionKind(const std::string& name);
// "advance(step=0, count=4)", "save(slot=1, step=4)", "output(step=8)", ...
std::string ToString(const Action& action);
// One action per line.
std::string ToString(const Plan& plan);

// Saves every state 0..T-1 (slot i holds state i), outputs, reverses all.
// Peak T saved states, T forward steps.
Plan PlanStoreAll(int64_t T);

// Two-level scheme: saves the first state of every segment of `every` steps on
// the way forward; then, per segment in reverse order, restores its start,
// saves all its block starts and reverses them. The last segment's states are
// saved during the first forward pass already. `every` counts steps and must
// be a multiple of `leaf`. Peak about T/every + every/leaf, under 2T forward steps.
Plan PlanPeriodic(int64_t T, int64_t every, int64_t leaf = 1);

// Recursive k-ary REPLAY on the n = ceil(T/leaf) blocks: split [a,b) into
// min(k, b-a) near-equal segments (longer ones first), advance through them
// saving each segment's first state, then recurse into the segments in reverse
// order; a one-block segment is reversed directly. The last segment of a
// level is entered straight from the forward pass (no restore), and its own
// segment starts are saved on that same pass. Peak saved states
// 1 + (k-1)*ceil(log_k n) <= k*ceil(log_k n); forward steps <= T*ceil(log_k n)
// (T when n <= k). Throws std::invalid_argument if k < 2.
Plan PlanReplay(int64_t T, int k, int64_t leaf = 1);

// Binomial checkpointing (Griewank's revolve) on the n = ceil(T/leaf) blocks:
// the fewest forward block-advances possible with at most `slots` saved states
// at once (state_0's slot included), given that the forward pass must reach T
// for the output before the first reverse. Throws std::invalid_argument if
// slots < 1. Slots beyond n are not used.
Plan PlanRevolve(int64_t T, int slots, int64_t leaf = 1);

// Fewest forward block-advances a plan over `units` blocks with at most
// `slots` saved states can have (what PlanRevolve achieves with leaf == 1);
// saturates at INT64_MAX.
int64_t RevolveForwardSteps(int64_t units, int64_t slots);

struct PlanStats {
  int64_t forward_steps;   // steps applied by kAdvance, first forward pass included
  int64_t reversed_steps;  // == T for a valid plan
  int64_t peak_saved;      // most slots occupied at once (current state not counted)
  int64_t num_actions;
  std::vector<int64_t> fused_lengths;  // distinct kReverse counts, ascending
};

// Thrown by CheckPlan; a std::logic_error so callers may catch either.
class PlanError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// Simulates `plan` over T steps; throws PlanError naming the first violated
// rule (with the action's index), std::invalid_argument if T < 1.
PlanStats CheckPlan(const Plan& plan, int64_t T);

// The executions that apply steps [from, from + count): at each step t the
// largest fused length n in `fused` (n > 1) with t % n == 0 and t + n <= the
// end, else a single step. The same steps always decompose the same way, so
// a replay over whole chunks runs the same programs as the first pass.
// Returns (first step, length) pairs.
std::vector<std::pair<int64_t, int64_t>> ForwardChunks(int64_t from, int64_t count,
                                                       const std::vector<int64_t>& fused);

// What one execution of a program costs: its time, and the device bytes it
// adds to its live arguments (outputs that do not alias a donated argument,
// plus its temporaries: XLA's compiled memory statistics).
struct ProgramCost {
  double seconds = 0;
  int64_t bytes = 0;
};

// The costs of a task's programs, for predicting what a plan costs. Bytes are
// per device (a task over several devices holds a shard of each value on each).
struct CostTable {
  int64_t state_bytes = 0;      // one training state
  int64_t cotangent_bytes = 0;  // the cotangent of a state plus the metagradient accumulators
  ProgramCost init, step, output_vjp, step_vjp, init_vjp;
  std::map<int64_t, ProgramCost> advance, segment_vjp;  // fused programs by length
  // Copying one state to host memory and back (seconds; bytes unused).
  ProgramCost to_host, from_host;
};

struct PlanCost {
  double seconds = 0;           // the plan's executions and host copies
  int64_t peak_bytes = 0;       // on the device: saved states + current state + cotangents + the running program's
  int64_t peak_host_bytes = 0;  // saved states in host memory
  int64_t bytes_to_host = 0, bytes_from_host = 0;
  int64_t executions = 0;
};

// Walks a valid plan (CheckPlan first) with the task runner's accounting:
// the runner measures the same quantities on real buffers during a run.
// `host_slots` hold their states in host memory. Throws std::invalid_argument
// if the plan needs a program the table lacks.
PlanCost SimulatePlan(const Plan& plan, const CostTable& costs, const std::set<int>& host_slots = {});

// The slots of `plan`, cheapest to hold in host memory first: by the copies
// that would cost (saves + restores into and from the slot), then by slot
// number. The planner puts a prefix of this order on the host.
std::vector<int> HostSlotOrder(const Plan& plan);

}  // namespace metagrad
