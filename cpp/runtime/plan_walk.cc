#include "runtime/plan_walk.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

#include "runtime/programs.h"

namespace metagrad {
namespace {

constexpr int64_t kMaxSteps = std::numeric_limits<int32_t>::max();

const ProgramCost& CostOf(const CostTable& costs, const std::string& program) {
  auto found = costs.programs.find(program);
  if (found == costs.programs.end()) throw std::invalid_argument("the cost table has no " + program);
  return found->second;
}

// The rules of schedule.h and the accounting above, one action at a time.
class Walker {
 public:
  Walker(const Plan& plan, int64_t T, const CostTable* costs, const std::set<int>& host_slots,
         PlanExecutor* executor)
      : plan_(plan), T_(T), costs_(costs), host_slots_(host_slots), executor_(executor) {
    if (costs_ != nullptr) {
      for (const auto& [name, cost] : costs_->programs) {
        const ProgramName parsed = ParseProgramName(name);
        if (std::string(parsed.kind->name) == "advance") fused_forward_.push_back(parsed.length);
      }
      std::sort(fused_forward_.begin(), fused_forward_.end());
    }
  }

  PlanWalk Walk() {
    if (T_ < 1 || T_ > kMaxSteps) {
      throw std::invalid_argument("a plan needs T >= 1 and T <= 2^31-1, got T = " + std::to_string(T_));
    }
    if (costs_ != nullptr) CheckTableHoldsPrograms();
    walk_.stats.num_actions = static_cast<int64_t>(plan_.size());
    Execute("init");
    if (executor_) executor_->Init();
    have_current_ = true;
    for (index_ = 0; index_ < plan_.size(); ++index_) Do(plan_[index_]);
    End();
    Execute("init_vjp");
    if (executor_) executor_->Finish();
    walk_.stats.fused_lengths.assign(fused_reverse_.begin(), fused_reverse_.end());
    return walk_;
  }

 private:
  [[noreturn]] void Fail(const std::string& why) const {
    throw PlanError("action #" + std::to_string(index_) + " " + ToString(plan_[index_]) + ": " + why);
  }

  // Before any action: a plan whose programs the table lacks fails here, not halfway.
  void CheckTableHoldsPrograms() const {
    for (const char* program : {"init", "step", "output_vjp", "step_vjp", "init_vjp"}) CostOf(*costs_, program);
    for (const Action& a : plan_) {
      if (a.kind == ActionKind::kReverse && a.count > 1) CostOf(*costs_, SizedProgram("segment_vjp", a.count));
    }
  }

  // One execution of `program`, which takes the streamed batches of `steps` steps.
  void Execute(const std::string& program, int64_t steps = 0) {
    if (costs_ == nullptr) return;
    const ProgramCost& cost = CostOf(*costs_, program);
    const int64_t live = saved_ + (have_current_ && !current_saved_ ? costs_->state_bytes : 0) + cotangent_;
    walk_.cost.peak_bytes = std::max(walk_.cost.peak_bytes, live + cost.bytes);
    walk_.cost.seconds += std::max(cost.seconds, static_cast<double>(steps) * costs_->stream.seconds);
    walk_.cost.bytes_streamed += steps * costs_->stream.bytes;
    ++walk_.cost.executions;
  }

  void NeedCurrent(int64_t step) const {
    if (position_ < 0) Fail("the current state was consumed by the previous reverse; restore a slot first");
    if (position_ != step) {
      Fail("wrong position: needs the state at step " + std::to_string(step) + " but the current state is at step " +
           std::to_string(position_));
    }
  }

  void NeedSlot(const Action& a, bool occupied_wanted) const {
    if (a.slot < 0) Fail("slot misuse: negative slot " + std::to_string(a.slot));
    const bool held = static_cast<size_t>(a.slot) < slot_step_.size() && slot_step_[a.slot] >= 0;
    if (held && !occupied_wanted) {
      Fail("slot misuse: slot " + std::to_string(a.slot) + " already holds step " + std::to_string(slot_step_[a.slot]) +
           " (free it first)");
    }
    if (!held && occupied_wanted) Fail("slot misuse: slot " + std::to_string(a.slot) + " is empty");
    if (held && slot_step_[a.slot] != a.step) {
      Fail("slot misuse: slot " + std::to_string(a.slot) + " holds step " + std::to_string(slot_step_[a.slot]) +
           ", not step " + std::to_string(a.step));
    }
  }

  void Do(const Action& a) {
    if (output_due_ && a.kind != ActionKind::kOutput) {
      Fail("missing output: the forward pass reached step T = " + std::to_string(T_) + " and must output next");
    }
    const bool on_host = host_slots_.count(a.slot) > 0;
    switch (a.kind) {
      case ActionKind::kAdvance: Advance(a); break;
      case ActionKind::kSave: Save(a, on_host); break;
      case ActionKind::kRestore: Restore(a, on_host); break;
      case ActionKind::kFree: Free(a, on_host); break;
      case ActionKind::kOutput: Output(a); break;
      case ActionKind::kReverse: Reverse(a); break;
      default: Fail("unknown action kind " + std::to_string(static_cast<int>(a.kind)));
    }
  }

  void Advance(const Action& a) {
    if (a.count < 1) Fail("advance count must be >= 1");
    NeedCurrent(a.step);
    if (a.count > T_ - a.step) Fail("advance past the last step (T = " + std::to_string(T_) + ")");
    if (costs_ != nullptr) {
      for (const auto& [t, n] : ForwardChunks(a.step, a.count, fused_forward_)) {
        const std::string program = SizedProgram("advance", n);
        Execute(program, n);
        current_saved_ = false;
        current_slot_ = -1;
        if (executor_) executor_->Forward(program, t, n);
      }
    }
    position_ = a.step + a.count;
    walk_.stats.forward_steps += a.count;
    if (position_ == T_ && !output_) output_due_ = true;
  }

  void Save(const Action& a, bool on_host) {
    NeedSlot(a, false);
    NeedCurrent(a.step);
    // A plan cannot fill more slots than it has actions: this bounds the
    // walk's memory whatever the slot numbers of a hand-made plan.
    if (static_cast<size_t>(a.slot) >= plan_.size()) {
      Fail("slot misuse: slot " + std::to_string(a.slot) + " is beyond the plan's " + std::to_string(plan_.size()) +
           " actions (number slots from 0)");
    }
    if (static_cast<size_t>(a.slot) >= slot_step_.size()) slot_step_.resize(a.slot + 1, -1);
    slot_step_[a.slot] = a.step;
    walk_.stats.peak_saved = std::max(walk_.stats.peak_saved, ++occupied_);
    if (costs_ != nullptr) {
      if (on_host) {  // a copy goes to the host; the current state stays on the device
        host_ += costs_->state_bytes;
        walk_.cost.peak_host_bytes = std::max(walk_.cost.peak_host_bytes, host_);
        walk_.cost.bytes_to_host += costs_->state_bytes;
        walk_.cost.seconds += costs_->to_host.seconds;
        ++walk_.cost.host_saves;
      } else {
        saved_ += costs_->state_bytes;
        current_saved_ = true;
      }
      current_slot_ = on_host ? -1 : a.slot;
    }
    if (executor_) executor_->Save(a.slot, on_host);
  }

  void Restore(const Action& a, bool on_host) {
    NeedSlot(a, true);
    position_ = a.step;
    if (costs_ != nullptr) {
      if (on_host) {  // a fresh device copy
        walk_.cost.bytes_from_host += costs_->state_bytes;
        walk_.cost.seconds += costs_->from_host.seconds;
      }
      current_saved_ = !on_host;
      current_slot_ = on_host ? -1 : a.slot;
    }
    if (executor_) executor_->Restore(a.slot, on_host);
  }

  void Free(const Action& a, bool on_host) {
    NeedSlot(a, true);
    slot_step_[a.slot] = -1;
    --occupied_;
    if (costs_ != nullptr) {
      if (on_host) {
        host_ -= costs_->state_bytes;
      } else {
        saved_ -= costs_->state_bytes;
        // The freed slot held the current state exactly when nothing ran since it was restored or saved.
        if (current_slot_ == a.slot) {
          current_saved_ = false;
          current_slot_ = -1;
        }
      }
    }
    if (executor_) executor_->Free(a.slot, on_host);
  }

  void Output(const Action&) {
    if (output_) Fail("a second output (output happens exactly once)");
    if (position_ != T_) {
      Fail("output needs the final state at step T = " + std::to_string(T_) + ", current is at step " +
           std::to_string(position_));
    }
    output_ = true;
    output_due_ = false;
    Execute("output_vjp");
    if (costs_ != nullptr) cotangent_ = costs_->cotangent_bytes;
    if (executor_) executor_->Output();
  }

  void Reverse(const Action& a) {
    if (a.count < 1) Fail("reverse count must be >= 1");
    if (!output_) Fail("reverse before the output");
    if (a.step < 0 || a.step >= T_ || a.count > T_ - a.step) Fail("reverse of steps outside 0..T-1");
    if (a.step + a.count != next_reverse_end_) {
      Fail("reverse out of order: the next reverse must end at step " + std::to_string(next_reverse_end_ - 1) +
           " (covering steps " + std::to_string(a.step) + ".." + std::to_string(a.step + a.count - 1) + ")");
    }
    NeedCurrent(a.step);
    next_reverse_end_ = a.step;
    walk_.stats.reversed_steps += a.count;
    fused_reverse_.insert(a.count);
    position_ = -1;
    if (costs_ != nullptr) {
      const std::string program = SizedProgram("segment_vjp", a.count);
      Execute(program, a.count);
      if (executor_) executor_->Reverse(program, a.step, a.count);
    }
  }

  void End() const {
    auto fail = [](const std::string& why) { throw PlanError("end of plan: " + why); };
    if (output_due_ || !output_) fail("missing output (the plan never outputs at step T)");
    if (next_reverse_end_ != 0) {
      fail("step not reversed: steps 0.." + std::to_string(next_reverse_end_ - 1) + " were never reversed");
    }
    for (size_t s = 0; s < slot_step_.size(); ++s) {
      if (slot_step_[s] >= 0) {
        fail("slot misuse: slot " + std::to_string(s) + " (step " + std::to_string(slot_step_[s]) +
             ") is never freed");
      }
    }
  }

  const Plan& plan_;
  const int64_t T_;
  const CostTable* costs_;
  const std::set<int>& host_slots_;
  PlanExecutor* executor_;
  std::vector<int64_t> fused_forward_;  // the table's advance lengths

  PlanWalk walk_;
  size_t index_ = 0;
  // The rules' state.
  std::vector<int64_t> slot_step_;  // -1: free
  int64_t occupied_ = 0;
  int64_t position_ = 0;  // -1: consumed by a reverse
  int64_t next_reverse_end_ = T_;
  bool output_ = false;
  bool output_due_ = false;  // the forward pass just reached T
  std::set<int64_t> fused_reverse_;
  // The accounting's state (bytes per device).
  int64_t saved_ = 0, host_ = 0, cotangent_ = 0;
  bool have_current_ = false, current_saved_ = false;
  // The device slot that shares its buffers with the current state, if any
  // (-1): at most one does. One int, not a flag per slot, keeps the walk
  // linear in the plan's length.
  int current_slot_ = -1;
};

}  // namespace

PlanWalk WalkPlan(const Plan& plan, int64_t T, const CostTable* costs, const std::set<int>& host_slots,
                  PlanExecutor* executor) {
  if (executor != nullptr && costs == nullptr) {
    throw std::invalid_argument("a walk that runs a plan needs the programs' costs (their bytes at least)");
  }
  return Walker(plan, T, costs, host_slots, executor).Walk();
}

PlanStats CheckPlan(const Plan& plan, int64_t T) { return WalkPlan(plan, T).stats; }

PlanCost SimulatePlan(const Plan& plan, const CostTable& costs, const std::set<int>& host_slots) {
  auto output = std::find_if(plan.begin(), plan.end(), [](const Action& a) { return a.kind == ActionKind::kOutput; });
  if (output == plan.end()) throw PlanError("end of plan: missing output (the plan never outputs at step T)");
  return WalkPlan(plan, output->step, &costs, host_slots).cost;
}

}  // namespace metagrad
