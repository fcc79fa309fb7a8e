// Bindings of TaskRunner: a whole training run or metagradient per call.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "runtime/task_runner.h"

namespace nb = nanobind;
using namespace metagrad;

const Plan& PlanFromPython(nb::handle plan);  // schedule_bindings.cc

namespace {

nb::dict ReportDict(const RunReport& r) {
  nb::dict d;
  d["steps"] = r.steps;
  d["forward_steps"] = r.forward_steps;
  d["reversed_steps"] = r.reversed_steps;
  d["executions"] = r.executions;
  d["peak_saved_states"] = r.peak_saved_states;
  d["peak_saved_bytes"] = r.peak_saved_bytes;
  d["state_bytes"] = r.state_bytes;
  d["determinism_checks"] = r.determinism_checks;
  d["seconds_forward"] = r.seconds_forward;
  d["seconds_reverse"] = r.seconds_reverse;
  d["seconds_total"] = r.seconds_total;
  return d;
}

}  // namespace

void BindTaskRunner(nb::module_& m) {
  nb::exception<CheckFailed>(m, "CheckFailed", PyExc_RuntimeError);

  nb::class_<TaskRunner>(m, "TaskRunner", "Runs a compiled task: training and metagradients, all in C++.")
      .def("__init__",
           [](TaskRunner* self, std::map<std::string, ExecutablePtr> programs,
              std::map<int64_t, ExecutablePtr> segment_vjp, std::map<int64_t, ExecutablePtr> advance, int64_t steps,
              std::vector<bool> differentiable, int num_z, std::vector<BufferPtr> data) {
             auto take = [&](const char* name) {
               auto found = programs.find(name);
               return found == programs.end() ? nullptr : found->second;
             };
             TaskPrograms p{take("init"),       take("step"),     take("output"), take("output_vjp"),
                            take("step_vjp"),   take("init_vjp"), std::move(segment_vjp), take("all_finite"),
                            std::move(advance)};
             new (self) TaskRunner(std::move(p), steps, std::move(differentiable), num_z, std::move(data));
           },
           nb::arg("programs"), nb::arg("segment_vjp"), nb::arg("advance"), nb::arg("steps"), nb::arg("differentiable"),
           nb::arg("num_z"), nb::arg("data"))
      .def_prop_ro("steps", &TaskRunner::steps)
      .def("train",
           [](TaskRunner& runner, const std::vector<BufferPtr>& z) {
             RunReport report;
             std::vector<BufferPtr> state;
             {
               nb::gil_scoped_release release;
               state = runner.Train(z, &report);
             }
             return nb::make_tuple(state, ReportDict(report));
           },
           nb::arg("z"), "init and all steps; returns (final state buffers, report).")
      .def("metagradient",
           [](TaskRunner& runner, const std::vector<BufferPtr>& z, nb::handle plan_object, int64_t determinism_stride,
              bool check_finite) {
             const Plan& plan = PlanFromPython(plan_object);
             TaskRunner::Result result;
             {
               nb::gil_scoped_release release;
               result = runner.Metagradient(z, plan, MetagradientOptions{determinism_stride, check_finite});
             }
             return nb::make_tuple(result.value, result.grad, ReportDict(result.report));
           },
           nb::arg("z"), nb::arg("plan"), nb::arg("determinism_stride") = 0, nb::arg("check_finite") = false,
           "Run the plan; returns (phi buffer, metagradient buffers, report).");
}
