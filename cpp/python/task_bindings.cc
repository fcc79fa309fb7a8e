// Bindings of the task contract (programs.h) and TaskRunner: a whole
// training run or metagradient per call, interruptible with Ctrl-C.
#include <Python.h>
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/set.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "runtime/task_runner.h"

namespace nb = nanobind;
using namespace metagrad;

const Plan& PlanFromPython(nb::handle plan);  // schedule_bindings.cc

namespace {

// The runner's monitor, called between executions with the GIL released: a
// pending Ctrl-C becomes KeyboardInterrupt, raised through the runner (whose
// buffers are released on the way out) back to the caller; `progress`, if
// given, is called with (steps done, total).
TaskRunner::Monitor Monitor(nb::object progress) {
  return [progress](int64_t done, int64_t total) {
    nb::gil_scoped_acquire acquire;
    if (PyErr_CheckSignals() != 0) throw nb::python_error();
    if (!progress.is_none()) progress(done, total);
  };
}

nb::dict KindDict(const ProgramKind& kind) {
  nb::dict d;
  d["name"] = kind.name;
  d["sized"] = kind.sized;
  d["inputs"] = kind.inputs;
  d["donated"] = kind.donated;
  d["outputs"] = kind.outputs;
  d["reverse_of"] = kind.reverse_of;
  d["one_step"] = kind.one_step;
  d["needed_by"] = kind.needed_by;
  return d;
}

}  // namespace

void BindTaskRunner(nb::module_& m) {
  m.attr("MANIFEST_VERSION") = kManifestVersion;
  m.attr("CALIBRATION_VERSION") = kCalibrationVersion;
  m.attr("PREFETCH_DEPTH") = kPrefetchDepth;
  m.attr("HOST_MEMORY_KIND") = kHostMemoryKind;
  m.def("program_kinds", [] {
        nb::list kinds;
        for (const ProgramKind& kind : ProgramKinds()) kinds.append(KindDict(kind));
        return kinds;
      },
      "The programs of a task and their argument groups (see cpp/runtime/programs.h).");
  m.def("parse_program_name", [](const std::string& name) {
        const ProgramName parsed = ParseProgramName(name);
        return std::make_pair(std::string(parsed.kind->name), parsed.length);
      },
      nb::arg("name"), "'segment_vjp_10' -> ('segment_vjp', 10); ValueError for unknown names.");
  m.def("sized_program", &SizedProgram, nb::arg("kind"), nb::arg("count"),
        "The program that runs `count` steps of sized kind `kind`: ('advance', 1) -> 'step', ('advance', 4) -> "
        "'advance_4'.");

  nb::class_<TaskLayout>(m, "TaskLayout", "Shapes and dtypes of a task's flat argument groups.")
      .def(nb::init<>())
      .def_rw("devices", &TaskLayout::devices, "devices the task runs on: shards per leaf")
      .def_rw("state", &TaskLayout::state)
      .def_rw("z", &TaskLayout::z)
      .def_rw("data", &TaskLayout::data)
      .def_rw("batch", &TaskLayout::batch, "group B of one step: the streamed leaves' batches, then their indices")
      .def_rw("differentiable", &TaskLayout::differentiable)
      .def_rw("accumulators", &TaskLayout::accumulators)
      .def_rw("phi", &TaskLayout::phi)
      .def_rw("outputs", &TaskLayout::outputs)
      .def_prop_ro("state_bytes", &TaskLayout::state_bytes, "bytes of one state, per device")
      .def_prop_ro("cotangent_bytes", &TaskLayout::cotangent_bytes,
                   "bytes of a state's cotangents and the metagradient's accumulators, per device")
      .def("expected_signature",
           [](const TaskLayout& layout, const std::string& name) {
             const Signature s = ExpectedSignature(name, layout);
             return nb::make_tuple(s.inputs, s.donated, s.outputs);
           },
           nb::arg("name"), "(inputs, donated, outputs) that program `name` must have.");

  nb::class_<RunReport> report(m, "Report", "What one training or metagradient run did, measured by the runtime.");
  report.def(nb::init<>());
  VisitReportFields([&](const char* name, auto member, const char* doc) { report.def_rw(name, member, doc); });
  report.def_prop_ro("replayed_steps", [](const RunReport& r) { return r.forward_steps - r.steps; },
                     "Forward steps beyond the first pass.");
  report.def("_asdict", [](const RunReport& r) {
    nb::dict d;
    VisitReportFields([&](const char* name, auto member, const char*) { d[name] = r.*member; });
    return d;
  }, "The fields as a dict.");
  report.def("__repr__", [](const RunReport& r) {
    std::string text = "Report(";
    bool first = true;
    VisitReportFields([&](const char* name, auto member, const char*) {
      text += std::string(first ? "" : ", ") + name + "=" + nb::repr(nb::cast(r.*member)).c_str();
      first = false;
    });
    return text + ")";
  });

  using Rows = nb::ndarray<uint8_t, nb::ro, nb::c_contig, nb::device::cpu, nb::ndim<2>>;
  using IndexTable = nb::ndarray<int64_t, nb::ro, nb::c_contig, nb::device::cpu, nb::ndim<2>>;
  nb::class_<BatchStream>(m, "BatchStream",
                          "Training data in host memory, gathered one batch per step as a run reaches it.")
      .def("__init__",
           [](BatchStream* self, std::vector<nb::object> rows, std::vector<ArraySpec> row_specs, IndexTable index,
              std::shared_ptr<Client> client, std::vector<int> devices,
              const std::vector<std::pair<std::string, int64_t>>& mesh, std::vector<PartitionSpec> specs) {
             if (rows.size() != row_specs.size()) throw InvalidArgument("one row spec per leaf of rows");
             std::vector<StreamedLeaf> leaves;
             for (size_t i = 0; i < rows.size(); ++i) {
               StreamedLeaf leaf;
               leaf.row = row_specs[i];
               if (nb::isinstance<nb::tuple>(rows[i])) {
                 std::tie(leaf.path, leaf.offset, leaf.num_rows) =
                     nb::cast<std::tuple<std::string, int64_t, int64_t>>(rows[i]);
               } else {
                 const Rows array = nb::cast<Rows>(rows[i]);
                 if (array.shape(1) != leaf.row.num_bytes()) {
                   throw InvalidArgument("rows of " + std::to_string(array.shape(1)) + " bytes, their spec " +
                                         leaf.row.ToString() + " has " + std::to_string(leaf.row.num_bytes()));
                 }
                 leaf.rows = reinterpret_cast<const char*>(array.data());
                 leaf.num_rows = static_cast<int64_t>(array.shape(0));
               }
               leaves.push_back(std::move(leaf));
             }
             const int64_t steps = static_cast<int64_t>(index.shape(0)), batch = static_cast<int64_t>(index.shape(1));
             StreamDevices where{std::move(devices), {}, std::move(specs)};
             for (const auto& [axis, size] : mesh) {
               where.mesh.axes.push_back(axis);
               where.mesh.sizes.push_back(size);
             }
             new (self) BatchStream(std::move(leaves), std::vector<int64_t>(index.data(), index.data() + steps * batch),
                                    steps, batch, std::move(client), std::move(where));
           },
           nb::arg("rows"), nb::arg("row_specs"), nb::arg("index"), nb::arg("client"),
           nb::arg("devices") = std::vector<int>{0},
           nb::arg("mesh") = std::vector<std::pair<std::string, int64_t>>{}, nb::arg("specs") = std::vector<PartitionSpec>{},
           nb::keep_alive<1, 2>(),
           "rows: per leaf, its N rows in memory as a C-contiguous uint8 array (N, bytes per row), kept alive by "
           "the stream, or in a file as (path, byte offset, N); row_specs: one row's shape and dtype; index: int64 "
           "(T, B), the rows step t reads; devices: the client's devices of the partitions; with several, their "
           "mesh [(axis, size)] and one PartitionSpec per leaf of a step's batch (the rows' leaves, then their "
           "index), splitting the rows' axis only.")
      .def_prop_ro("batch_specs", &BatchStream::BatchSpecs)
      .def("batch_bytes", &BatchStream::BatchBytes, nb::arg("count") = 1);

  nb::class_<TaskRunner>(m, "TaskRunner", "Runs a compiled task: training and metagradients, all in C++.")
      .def("__init__",
           [](TaskRunner* self, const std::map<std::string, ExecutablePtr>& programs, TaskLayout layout,
              int64_t steps, std::vector<BufferPtr> data, std::shared_ptr<BatchStream> stream) {
             new (self)
                 TaskRunner(TaskPrograms(programs), std::move(layout), steps, std::move(data), std::move(stream));
           },
           nb::arg("programs"), nb::arg("layout"), nb::arg("steps"), nb::arg("data"),
           nb::arg("stream").none() = nb::none())
      .def_prop_ro("steps", &TaskRunner::steps)
      .def("train",
           [](TaskRunner& runner, const std::vector<BufferPtr>& z, nb::object progress) {
             RunReport report;
             std::vector<BufferPtr> state;
             const TaskRunner::Monitor monitor = Monitor(progress);
             {
               nb::gil_scoped_release release;
               state = runner.Train(z, &report, monitor);
             }
             return nb::make_tuple(state, report);
           },
           nb::arg("z"), nb::arg("progress") = nb::none(),
           "init and all steps; returns (final state buffers, report). progress(done, total) is called between "
           "executions, at most every 50 ms.")
      .def("metagradient",
           [](TaskRunner& runner, const std::vector<BufferPtr>& z, nb::handle plan_object, int64_t determinism_stride,
              bool check_finite, nb::object progress, std::set<int> host_slots,
              const std::string& host_memory_kind) {
             const Plan& plan = PlanFromPython(plan_object);
             TaskRunner::Result result;
             const TaskRunner::Monitor monitor = Monitor(progress);
             {
               nb::gil_scoped_release release;
               result = runner.Metagradient(
                   z, plan,
                   MetagradientOptions{determinism_stride, check_finite, std::move(host_slots), host_memory_kind},
                   monitor);
             }
             return nb::make_tuple(result.value, result.grad, result.report);
           },
           nb::arg("z"), nb::arg("plan"), nb::arg("determinism_stride") = 0, nb::arg("check_finite") = false,
           nb::arg("progress") = nb::none(), nb::arg("host_slots") = std::set<int>{},
           nb::arg("host_memory_kind") = kHostMemoryKind,
           "Run the plan (the states of `host_slots` in host memory); returns (phi buffer of partition 0, "
           "metagradient buffers leaf-major, report). progress(done, total): forward and reversed steps, called "
           "between executions at most every 50 ms.")
      .def("calibrate",
           [](TaskRunner& runner, const std::vector<BufferPtr>& z, int repeats, const std::string& host_memory_kind) {
             const TaskRunner::Monitor monitor = Monitor(nb::none());
             nb::gil_scoped_release release;
             return runner.Calibrate(z, repeats, host_memory_kind, monitor);
           },
           nb::arg("z"), nb::arg("repeats") = 3, nb::arg("host_memory_kind") = "",
           "Seconds and device bytes per execution of each program (and, with a host memory kind, the seconds to "
           "copy a state there, 'to_host', and back, 'from_host').")
      .def_prop_ro("stream_bytes", &TaskRunner::StreamBytes,
                   "device bytes of the streamed batches in flight during a run (0 without streamed data)")
      .def("program_bytes", &TaskRunner::ProgramBytes, nb::call_guard<nb::gil_scoped_release>(),
           "Device bytes per execution of each program (no run).");
}
