// Checkpointing schedules as pure data: a Plan is the exact sequence of
// advances, saves, restores, frees and reverses that traverses a training run
// of T steps backwards in bounded memory. Building a plan touches no device;
// plan_walk.h walks it: to check it, to predict its cost and to run it.
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
// Fused blocks: with block > 1 a policy works on blocks of `block` steps (the
// last block has T % block steps when that is nonzero) and reverses each block
// with one kReverse of the block's length, so at most two fused lengths occur.
#pragma once

#include <cstdint>
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
// be a multiple of `block`. Peak about T/every + every/block, under 2T forward steps.
Plan PlanPeriodic(int64_t T, int64_t every, int64_t block = 1);

// Recursive k-ary REPLAY on the n = ceil(T/block) blocks: split [a,b) into
// min(k, b-a) near-equal segments (longer ones first), advance through them
// saving each segment's first state, then recurse into the segments in reverse
// order; a one-block segment is reversed directly. The last segment of a
// level is entered straight from the forward pass (no restore), and its own
// segment starts are saved on that same pass. Peak saved states
// 1 + (k-1)*ceil(log_k n) <= k*ceil(log_k n); forward steps <= T*ceil(log_k n)
// (T when n <= k). Throws std::invalid_argument if k < 2.
Plan PlanReplay(int64_t T, int k, int64_t block = 1);

// Binomial checkpointing (Griewank's revolve) on the n = ceil(T/block) blocks:
// the fewest forward block-advances possible with at most `slots` saved states
// at once (state_0's slot included), given that the forward pass must reach T
// for the output before the first reverse. Throws std::invalid_argument if
// slots < 1. Slots beyond n are not used.
Plan PlanRevolve(int64_t T, int slots, int64_t block = 1);

// Fewest forward block-advances a plan over `units` blocks with at most
// `slots` saved states can have (what PlanRevolve achieves with block == 1);
// saturates at INT64_MAX.
int64_t RevolveForwardSteps(int64_t units, int64_t slots);

// Thrown by a walk of a plan that breaks a rule (plan_walk.h); a
// std::logic_error so callers may catch either.
class PlanError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// The executions that apply steps [from, from + count): at each step t the
// largest fused length n in `fused` (n > 1) with t % n == 0 and t + n <= the
// end, else a single step. The same steps always decompose the same way, so
// a replay over whole chunks runs the same programs as the first pass.
// Returns (first step, length) pairs.
std::vector<std::pair<int64_t, int64_t>> ForwardChunks(int64_t from, int64_t count,
                                                       const std::vector<int64_t>& fused);

// The slots of `plan`, cheapest to hold in host memory first: by the copies
// that would cost (saves + restores into and from the slot), then by slot
// number. The planner puts a prefix of this order on the host.
std::vector<int> HostSlotOrder(const Plan& plan);

}  // namespace metagrad
