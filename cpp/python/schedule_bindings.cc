// Python bindings of the checkpointing plans (runtime/schedule.h): Action,
// an opaque Plan (the C++ vector stays inside the Python object), the
// builders, and PlanError (a RuntimeError) for plans that break a rule.
//
// The Python Plan wraps metagrad::Plan in PlanObject rather than binding
// std::vector<Action> itself: making the vector opaque here would clash (ODR)
// with any other file that passes a Plan through nanobind's stl/vector.h
// caster. Such a file still works (the caster reads a Plan as a sequence of
// Actions, a copy); PlanFromPython below gives the vector without a copy.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/set.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "runtime/plan_walk.h"

namespace nb = nanobind;
using namespace nb::literals;
using metagrad::Action;
using metagrad::ActionKind;
using metagrad::Plan;

namespace {

struct PlanObject {
  Plan actions;
};

PlanObject Wrap(Plan plan) { return PlanObject{std::move(plan)}; }

nb::dict StatsDict(const Plan& plan, int64_t T) {
  const metagrad::PlanStats stats = metagrad::CheckPlan(plan, T);
  nb::dict d;
  d["forward_steps"] = stats.forward_steps;
  d["reversed_steps"] = stats.reversed_steps;
  d["peak_saved"] = stats.peak_saved;
  d["num_actions"] = stats.num_actions;
  d["fused_lengths"] = stats.fused_lengths;
  return d;
}

int64_t Index(const Plan& plan, int64_t i) {
  const int64_t n = static_cast<int64_t>(plan.size());
  if (i < 0) i += n;
  if (i < 0 || i >= n) throw nb::index_error("plan index out of range");
  return i;
}

}  // namespace

// The C++ plan inside a Python Plan object, without a copy (declare it where
// needed); raises TypeError (nb::cast_error) for anything else. The reference
// lives as long as the Python object does.
const metagrad::Plan& PlanFromPython(nb::handle plan) { return nb::cast<const PlanObject&>(plan).actions; }

void BindSchedule(nb::module_& m) {

  nb::class_<Action>(m, "Action", "One step of a checkpointing plan.")
      .def("__init__",
           [](Action* self, const std::string& kind, int64_t step, int64_t count, int slot) {
             new (self) Action{metagrad::ParseActionKind(kind), step, count, slot};
           },
           "kind"_a, "step"_a, "count"_a = 0, "slot"_a = -1,
           "Action(kind, step, count=0, slot=-1); kind is advance, save, restore, free, output or reverse.")
      .def_prop_ro("kind", [](const Action& a) { return std::string(metagrad::ActionKindName(a.kind)); })
      .def_ro("step", &Action::step)
      .def_ro("count", &Action::count)
      .def_ro("slot", &Action::slot)
      .def("__eq__",
           [](const Action& a, const Action& b) {
             return a.kind == b.kind && a.step == b.step && a.count == b.count && a.slot == b.slot;
           })
      .def("__repr__", [](const Action& a) { return metagrad::ToString(a); });

  nb::class_<PlanObject>(m, "Plan", "A checkpointing plan: a sequence of Actions held in C++.")
      .def("__init__", [](PlanObject* self, std::vector<Action> actions) { new (self) PlanObject{std::move(actions)}; },
           "actions"_a, "A plan from a list of Actions (for tests and hand-made schedules).")
      .def("__len__", [](const PlanObject& p) { return p.actions.size(); })
      .def("__getitem__", [](const PlanObject& p, int64_t i) { return p.actions[Index(p.actions, i)]; }, "i"_a)
      .def("stats", [](const PlanObject& p, int64_t T) { return StatsDict(p.actions, T); }, "T"_a,
           "Simulate the plan over T steps: a dict with forward_steps, reversed_steps, peak_saved, num_actions and "
           "fused_lengths (distinct reverse counts, ascending). Raises PlanError naming the first broken rule.")
      .def("__str__", [](const PlanObject& p) { return metagrad::ToString(p.actions); })
      .def("__repr__",
           [](const PlanObject& p) { return "<Plan of " + std::to_string(p.actions.size()) + " actions>"; });

  m.def("plan_store_all", [](int64_t T) { return Wrap(metagrad::PlanStoreAll(T)); }, "T"_a,
        "Save every state, output, reverse all. Peak T.");
  m.def("plan_periodic",
        [](int64_t T, int64_t every, int64_t block) { return Wrap(metagrad::PlanPeriodic(T, every, block)); }, "T"_a,
        "every"_a, "block"_a = 1,
        "Two-level scheme: a checkpoint every `every` steps (a multiple of block), each segment stored in reverse.");
  m.def("plan_replay", [](int64_t T, int k, int64_t block) { return Wrap(metagrad::PlanReplay(T, k, block)); }, "T"_a,
        "k"_a, "block"_a = 1, "Recursive k-ary REPLAY: peak <= k*ceil(log_k(T/block)), about T*log_k(T/block) forward steps.");
  m.def("plan_revolve", [](int64_t T, int slots, int64_t block) { return Wrap(metagrad::PlanRevolve(T, slots, block)); },
        "T"_a, "slots"_a, "block"_a = 1,
        "Binomial checkpointing (revolve): fewest forward steps with at most `slots` saved states.");
  nb::class_<metagrad::ProgramCost>(m, "ProgramCost", "Seconds and device bytes of one execution of a program.")
      .def(nb::init<>())
      .def_rw("seconds", &metagrad::ProgramCost::seconds)
      .def_rw("bytes", &metagrad::ProgramCost::bytes)
      .def("__repr__", [](const metagrad::ProgramCost& c) {
        return "ProgramCost(seconds=" + std::to_string(c.seconds) + ", bytes=" + std::to_string(c.bytes) + ")";
      });
  nb::class_<metagrad::CostTable>(m, "CostTable", "The costs of a task's programs (see schedule.h).")
      .def(nb::init<>())
      .def_rw("state_bytes", &metagrad::CostTable::state_bytes)
      .def_rw("cotangent_bytes", &metagrad::CostTable::cotangent_bytes)
      .def_rw("programs", &metagrad::CostTable::programs,
              "by program name ('init', 'step', 'advance_10', 'segment_vjp_10', ...)")
      .def_rw("to_host", &metagrad::CostTable::to_host, "copying one state to host memory")
      .def_rw("from_host", &metagrad::CostTable::from_host, "copying one state back to the device")
      .def_rw("stream", &metagrad::CostTable::stream,
              "gathering one step's streamed batch and copying it to the device (zero without streamed data)");
  m.def("simulate_plan",
        [](nb::handle plan, const metagrad::CostTable& costs, const std::set<int>& host_slots) {
          const metagrad::PlanCost cost = metagrad::SimulatePlan(PlanFromPython(plan), costs, host_slots);
          nb::dict d;
          d["seconds"] = cost.seconds;
          d["peak_bytes"] = cost.peak_bytes;
          d["peak_host_bytes"] = cost.peak_host_bytes;
          d["bytes_to_host"] = cost.bytes_to_host;
          d["bytes_from_host"] = cost.bytes_from_host;
          d["bytes_streamed"] = cost.bytes_streamed;
          d["host_saves"] = cost.host_saves;
          d["executions"] = cost.executions;
          return d;
        },
        "plan"_a, "costs"_a, "host_slots"_a = std::set<int>{},
        "Predicted seconds, peak device and host bytes, bytes copied each way and executions of a plan whose "
        "`host_slots` live in host memory: the walk a run makes (raises PlanError for a plan that breaks a rule).");
  m.def("host_slot_order", [](nb::handle plan) { return metagrad::HostSlotOrder(PlanFromPython(plan)); }, "plan"_a,
        "The plan's slots, cheapest to hold in host memory first (fewest saves and restores).");
  m.def("revolve_forward_steps", &metagrad::RevolveForwardSteps, "units"_a, "slots"_a,
        "The fewest forward block-advances any plan over `units` blocks with `slots` saved states can have.");
}
