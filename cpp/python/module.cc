// metagrad._runtime: a thin nanobind layer over the C++ runtime. The GIL is
// released around everything that may block (compile, execute, waits, copies).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "runtime/buffer.h"
#include "runtime/client.h"
#include "runtime/executable.h"
#include "runtime/ffi.h"
#include "runtime/schedule.h"
#include "runtime/sharding.h"
#include "runtime/task_runner.h"

namespace nb = nanobind;
using namespace metagrad;

void BindSchedule(nanobind::module_& m);
void BindTaskRunner(nanobind::module_& m);

namespace {

nb::dlpack::dtype ToDLPack(PJRT_Buffer_Type type) {
  const DType& d = DTypeOf(type);
  return {d.dlpack, static_cast<uint8_t>(d.size * 8), 1};
}

using HostArray = nb::ndarray<nb::ro, nb::device::cpu>;

// `type` overrides the array's own dtype (same element size), for bfloat16
// arrays that arrive as their uint16 bits.
BufferPtr UploadAs(Client& client, HostArray array, int device, std::optional<PJRT_Buffer_Type> type) {
  ArraySpec spec;
  if (array.dtype().lanes != 1) throw InvalidArgument("vector dtypes are not supported");
  const DType& dtype = type ? DTypeOf(*type) : DTypeFromDLPack(array.dtype().code, array.dtype().bits);
  spec.type = dtype.type;
  const int64_t size = static_cast<int64_t>(dtype.size);
  std::vector<int64_t> byte_strides;
  bool dense = true;
  int64_t expected = size;
  for (size_t i = array.ndim(); i-- > 0;) {
    if (array.shape(i) != 1 && array.stride(i) * size != expected) dense = false;
    expected *= static_cast<int64_t>(array.shape(i));
  }
  for (size_t i = 0; i < array.ndim(); ++i) {
    spec.dims.push_back(static_cast<int64_t>(array.shape(i)));
    if (!dense) byte_strides.push_back(array.stride(i) * size);
  }
  nb::gil_scoped_release release;
  return client.BufferFromHost(array.data(), spec, byte_strides, device);
}

BufferPtr Upload(Client& client, HostArray array, int device) { return UploadAs(client, array, device, {}); }

// numpy exports ml_dtypes' bfloat16 through neither DLPack nor the buffer
// protocol, so such arrays cross the boundary as their uint16 bits, both ways.
bool IsBfloat16(nb::handle array) {
  nb::object dtype = nb::getattr(array, "dtype", nb::none());
  return !dtype.is_none() && nb::str(nb::getattr(dtype, "name", nb::str(""))).equal(nb::str("bfloat16"));
}

BufferPtr UploadBfloat16(Client& client, nb::object array, int device) {
  if (!IsBfloat16(array)) {
    throw nb::type_error("buffer_from_array expects an array in host memory (numpy, or anything exposing DLPack or "
                         "the buffer protocol on the CPU); for an array on a GPU (a JAX array there), use "
                         "metagrad.runtime.to_device(x, client), which copies it through the host");
  }
  nb::object bits = nb::module_::import_("numpy").attr("asarray")(array).attr("view")("uint16");
  return UploadAs(client, nb::cast<HostArray>(bits), device, PJRT_Buffer_Type_BF16);
}

nb::object ToNumpy(const BufferPtr& buffer) {
  const ArraySpec& spec = buffer->spec();
  const size_t bytes = spec.num_bytes();
  auto* data = new uint8_t[bytes > 0 ? bytes : 1];
  nb::capsule owner(data, [](void* p) noexcept { delete[] static_cast<uint8_t*>(p); });
  {
    nb::gil_scoped_release release;
    buffer->ToHost(data, bytes);
  }
  std::vector<size_t> shape(spec.dims.begin(), spec.dims.end());
  if (spec.type == PJRT_Buffer_Type_BF16) {
    nb::object bits = nb::cast(nb::ndarray<nb::numpy, uint16_t>(data, shape.size(), shape.data(), owner));
    return bits.attr("view")(nb::module_::import_("ml_dtypes").attr("bfloat16"));
  }
  return nb::cast(nb::ndarray<nb::numpy>(data, shape.size(), shape.data(), owner, nullptr, ToDLPack(spec.type)));
}

// A zero-copy view of the device memory that keeps the buffer pinned.
nb::object DLPackView(const BufferPtr& buffer) {
  void* data;
  {
    nb::gil_scoped_release release;
    data = buffer->AcquireExternalPointer();
  }
  auto* keep = new BufferPtr(buffer);
  nb::capsule owner(keep, [](void* p) noexcept {
    auto* held = static_cast<BufferPtr*>(p);
    try {
      (*held)->ReleaseExternalPointer();
    } catch (...) {
    }
    delete held;
  });
  const ArraySpec& spec = buffer->spec();
  std::vector<size_t> shape(spec.dims.begin(), spec.dims.end());
  const bool on_cpu = buffer->client()->platform_name() == "cpu";
  return nb::cast(nb::ndarray<>(data, shape.size(), shape.data(), owner, nullptr, ToDLPack(spec.type),
                                on_cpu ? nb::device::cpu::value : nb::device::cuda::value, 0));
}

std::vector<BufferPtr> Execute(const Executable& executable, const std::vector<BufferPtr>& args) {
  std::vector<Buffer*> raw;
  raw.reserve(args.size());
  for (const auto& arg : args) raw.push_back(arg.get());
  nb::gil_scoped_release release;
  return executable.Execute(raw);
}

std::string SpecDType(const ArraySpec& spec) { return DTypeOf(spec.type).name; }

nb::dict StatsDict(const MemoryStats& stats) {
  nb::dict d;
  d["argument_bytes"] = stats.argument_bytes;
  d["output_bytes"] = stats.output_bytes;
  d["alias_bytes"] = stats.alias_bytes;
  d["temp_bytes"] = stats.temp_bytes;
  d["generated_code_bytes"] = stats.generated_code_bytes;
  return d;
}

std::pair<int, int> VersionPair(FfiApiVersion v) { return {v.major, v.minor}; }

// The function pointer held by a capsule (jaxlib's handler capsules are named
// "xla._CUSTOM_CALL_TARGET"; ctypes or user capsules may be unnamed).
void* CapsulePointer(nb::handle capsule) {
  if (!PyCapsule_CheckExact(capsule.ptr())) {
    throw nb::type_error("expected a PyCapsule holding an XLA FFI handler (e.g. from jax.ffi.pycapsule)");
  }
  void* pointer = PyCapsule_GetPointer(capsule.ptr(), PyCapsule_GetName(capsule.ptr()));
  if (pointer == nullptr) throw nb::python_error();
  return pointer;
}

}  // namespace

NB_MODULE(_runtime, m) {
  m.doc() = "metagrad's C++ runtime: PJRT plugins, clients, device buffers and executables.";

  // Every exception of the runtime, registered once: PJRT's own errors, failed
  // run checks and broken plans as RuntimeError subclasses, bad arguments
  // caught before the plugin as ValueError.
  nb::exception<PjrtError>(m, "PjrtError", PyExc_RuntimeError);
  nb::exception<CheckFailed>(m, "CheckFailed", PyExc_RuntimeError);
  nb::exception<PlanError>(m, "PlanError", PyExc_RuntimeError);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def("dtypes", [] {
        std::vector<std::tuple<std::string, std::string, bool>> table;
        for (const DType& d : DTypes()) table.emplace_back(d.name, d.mlir, d.floating);
        return table;
      },
      "The element types the runtime handles: (numpy name, MLIR name, floating).");
  m.def("default_client_options", &DefaultClientOptions, nb::arg("plugin_path"), nb::arg("cpu_device_count") = 1,
        "The create options metagrad passes to a plugin.");
  m.def("compile_options",
        [](const std::vector<int>& device_ids, bool use_shardy_partitioner, const std::string& platform) {
          const std::string options = SerializeCompileOptions(
              device_ids, use_shardy_partitioner, MultiDeviceDebugOptions(platform, device_ids.size()));
          return nb::bytes(options.data(), options.size());
        },
        nb::arg("device_ids") = std::vector<int>{0}, nb::arg("use_shardy_partitioner") = false,
        nb::arg("platform") = "",
        "The serialized xla.CompileOptionsProto for a program on these device ids (several: SPMD partitions, "
        "with the debug options the `platform` needs for them).");

  // Shardings (runtime/sharding.h): a mesh as [(axis, size)], a PartitionSpec
  // as one list of axis names per dimension.
  auto mesh_of = [](const std::vector<std::pair<std::string, int64_t>>& axes) {
    Mesh mesh;
    for (const auto& [name, size] : axes) {
      mesh.axes.push_back(name);
      mesh.sizes.push_back(size);
    }
    return mesh;
  };
  m.attr("CPU_OVERSUBSCRIBE_ENV") = kCpuOversubscribeEnv;
  m.def("check_cpu_cores", &CheckCpuCores, nb::arg("platform"), nb::arg("num_devices"),
        "ValueError for more CPU devices than cores (unless $METAGRAD_CPU_OVERSUBSCRIBE=1: then a warning text).");
  m.def("check_partition_spec",
        [mesh_of](const std::vector<int64_t>& shape, const PartitionSpec& spec,
                  const std::vector<std::pair<std::string, int64_t>>& mesh, const std::string& what) {
          CheckPartitionSpec(shape, spec, mesh_of(mesh), what);
        },
        nb::arg("shape"), nb::arg("spec"), nb::arg("mesh"), nb::arg("what"),
        "ValueError unless `spec` splits an array of `shape` evenly over `mesh`.");
  m.def("shard_shape",
        [mesh_of](const std::vector<int64_t>& shape, const PartitionSpec& spec,
                  const std::vector<std::pair<std::string, int64_t>>& mesh) {
          return ShardDims(shape, spec, mesh_of(mesh));
        },
        nb::arg("shape"), nb::arg("spec"), nb::arg("mesh"), "The shape of every shard.");
  m.def("shard_offsets",
        [mesh_of](const std::vector<int64_t>& shape, const PartitionSpec& spec,
                  const std::vector<std::pair<std::string, int64_t>>& mesh, int64_t partition) {
          return ShardOffsets(shape, spec, mesh_of(mesh), partition);
        },
        nb::arg("shape"), nb::arg("spec"), nb::arg("mesh"), nb::arg("partition"),
        "Where partition `partition`'s block starts, per dimension.");

  m.attr("PJRT_API_MAJOR") = PJRT_API_MAJOR;
  m.attr("PJRT_API_MINOR") = PJRT_API_MINOR;

  nb::class_<Api>(m, "Plugin", "A loaded PJRT plugin (never unloaded).")
      .def_static("load", &Api::Load, nb::arg("path"), "dlopen a PJRT plugin and read its API table.")
      .def_prop_ro("path", &Api::path)
      .def_prop_ro("api_version", &Api::version, "(major, minor) PJRT C API version of the plugin.")
      .def_prop_ro("attributes", &Api::attributes, "Plugin attributes, e.g. stablehlo_current_version.")
      .def_prop_ro("can_register_ffi_handlers",
                   [](const std::shared_ptr<const Api>& api) { return HasFfiHandlerRegistration(*api); },
                   "Whether the plugin's PJRT FFI extension can register custom-call handlers.")
      .def("ffi_api_version",
           [](const std::shared_ptr<const Api>& api, const std::string& platform) {
             return VersionPair(PluginFfiApiVersion(*api, platform));
           },
           nb::arg("platform"), "(major, minor) XLA FFI C API version of the plugin's XLA; (-1, -1) if unknown.")
      .def("register_ffi_handler",
           [](const std::shared_ptr<const Api>& api, const std::string& target, const std::string& platform,
              nb::handle capsule, bool allow_adapter) {
             return RegisterFfiHandler(*api, target, platform, CapsulePointer(capsule), allow_adapter) ==
                            FfiRegistration::kAdapted
                        ? "adapted"
                        : "direct";
           },
           nb::arg("target"), nb::arg("platform"), nb::arg("handler"), nb::arg("allow_adapter") = false,
           "Register a typed XLA FFI handler (a capsule) for custom-call `target` on `platform`; returns "
           "'direct' or 'adapted' (a stateless handler one FFI minor version ahead, behind a version adapter).");

  m.attr("XLA_FFI_API_VERSION") = VersionPair(BuiltFfiApiVersion());
  m.def("ffi_handler_metadata",
        [](nb::handle capsule) {
          FfiHandlerMetadata info = QueryFfiHandler(CapsulePointer(capsule));
          nb::dict d;
          d["api_version"] = VersionPair(info.version);
          d["traits"] = info.traits;
          d["creates_state"] = info.creates_state;
          return d;
        },
        nb::arg("handler"), "Metadata of a typed XLA FFI handler (a capsule): the FFI API version it was built with.");

  nb::class_<ArraySpec>(m, "ArraySpec")
      .def(nb::init<>())
      .def("__init__",
           [](ArraySpec* self, std::vector<int64_t> dims, const std::string& dtype) {
             new (self) ArraySpec{std::move(dims), DTypeNamed(dtype).type};
           },
           nb::arg("shape"), nb::arg("dtype"))
      .def_prop_ro("shape", [](const ArraySpec& s) { return s.dims; })
      .def_prop_ro("dtype", &SpecDType)
      .def_prop_ro("nbytes", &ArraySpec::num_bytes)
      .def("__eq__", &ArraySpec::operator==)
      .def("__repr__", &ArraySpec::ToString);

  nb::class_<DeviceInfo>(m, "Device")
      .def_ro("id", &DeviceInfo::id)
      .def_ro("kind", &DeviceInfo::kind)
      .def_ro("memory_kinds", &DeviceInfo::memory_kinds)
      .def("__repr__", [](const DeviceInfo& d) { return "Device(id=" + std::to_string(d.id) + ", kind=" + d.kind + ")"; });

  nb::class_<Client>(m, "Client", "A PJRT client: devices, compilation, uploads.")
      .def_static("create", &Client::Create, nb::arg("plugin"), nb::arg("options") = std::map<std::string, Attribute>{},
                  nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("plugin_path", [](const Client& c) { return c.api().path(); })
      .def_prop_ro("plugin_api_version", [](const Client& c) { return c.api().version(); })
      .def_prop_ro("plugin_attributes", [](const Client& c) { return c.api().attributes(); })
      .def_prop_ro("platform_name", &Client::platform_name)
      .def_prop_ro("platform_version", &Client::platform_version)
      .def_prop_ro("devices", &Client::devices)
      .def("compile",
           [](Client& client, nb::bytes code, const std::string& format, std::vector<ArraySpec> inputs,
              std::vector<bool> donated, nb::bytes options) {
             std::string program(code.c_str(), code.size()), compile_options(options.c_str(), options.size());
             nb::gil_scoped_release release;
             return client.Compile(program, format, std::move(inputs), std::move(donated), compile_options);
           },
           nb::arg("code"), nb::arg("format"), nb::arg("inputs"), nb::arg("donated"), nb::arg("options") = nb::bytes("", 0),
           "Compile MLIR (text or bytecode) with the signature `inputs` and donation flags; `options` is a "
           "serialized xla.CompileOptionsProto (empty: one replica, one partition).")
      .def("deserialize",
           [](Client& client, nb::bytes serialized, std::vector<ArraySpec> inputs, std::vector<bool> donated) {
             std::string bytes(serialized.c_str(), serialized.size());
             nb::gil_scoped_release release;
             return client.Deserialize(bytes, std::move(inputs), std::move(donated));
           },
           nb::arg("serialized"), nb::arg("inputs"), nb::arg("donated"),
           "Load an executable written by Executable.serialize() with this plugin version.")
      .def("memory_stats",
           [](const Client& client, int device) -> nb::object {
             Client::MemoryStats stats;
             try {
               stats = client.DeviceMemoryStats(device);
             } catch (const PjrtError&) {
               return nb::none();  // the plugin keeps none (the CPU plugin)
             }
             nb::dict d;
             d["bytes_in_use"] = stats.bytes_in_use;
             if (stats.peak_bytes_in_use >= 0) d["peak_bytes_in_use"] = stats.peak_bytes_in_use;
             if (stats.bytes_limit >= 0) d["bytes_limit"] = stats.bytes_limit;
             return d;
           },
           nb::arg("device") = 0, "The device's memory statistics, or None where the plugin keeps none.")
      .def("buffer_from_array", &Upload, nb::arg("array"), nb::arg("device") = 0,
           "Copy a host array (anything exposing DLPack or the buffer protocol on the CPU) to a device.")
      .def("buffer_from_array", &UploadBfloat16, nb::arg("array"), nb::arg("device") = 0,
           "Copy a numpy bfloat16 array (ml_dtypes) to a device.");

  nb::class_<Buffer>(m, "Buffer", "A device buffer owned by the runtime.")
      .def_prop_ro("spec", &Buffer::spec)
      .def_prop_ro("shape", [](const Buffer& b) { return b.spec().dims; })
      .def_prop_ro("dtype", [](const Buffer& b) { return std::string(DTypeOf(b.spec().type).name); })
      .def_prop_ro("is_deleted", &Buffer::is_deleted)
      .def_prop_ro("on_device_size", &Buffer::on_device_size)
      .def_prop_ro("device", &Buffer::device_index, "Index of the buffer's device in client.devices.")
      .def_prop_ro("memory_kind", &Buffer::memory_kind, "'device', 'pinned_host', 'unpinned_host'...")
      .def("copy_to_memory", &Buffer::CopyToMemory, nb::arg("kind"), nb::call_guard<nb::gil_scoped_release>(),
           "A copy in memory space `kind` of the same device (ready asynchronously).")
      .def("block_until_ready", &Buffer::Await, nb::call_guard<nb::gil_scoped_release>())
      .def("to_numpy", &ToNumpy, "Copy the value to a new numpy array.")
      .def("__dlpack__", [](const BufferPtr& b, nb::kwargs) { return DLPackView(b); },
           "Zero-copy DLPack capsule of the device memory (the buffer stays pinned while it is used).")
      .def("__dlpack_device__", [](const Buffer& b) {
        const bool on_cpu = b.client()->platform_name() == "cpu";
        return std::make_pair(on_cpu ? 1 : 2, 0);
      });

  nb::class_<Executable>(m, "Executable", "A compiled program.")
      .def_prop_ro("inputs", &Executable::inputs)
      .def_prop_ro("outputs", &Executable::outputs)
      .def_prop_ro("donated", &Executable::donated)
      .def_prop_ro("devices", &Executable::devices, "The devices of its partitions, in order (indices in client.devices).")
      .def("memory_stats", [](const Executable& e) { return StatsDict(e.CompiledMemoryStats()); },
           "XLA's compiled memory statistics: argument, output, alias, temp and generated-code bytes.")
      .def("serialize",
           [](const Executable& e) {
             std::string bytes;
             {
               nb::gil_scoped_release release;
               bytes = e.Serialize();
             }
             return nb::bytes(bytes.data(), bytes.size());
           },
           "Platform-specific bytes for Client.deserialize with the same plugin version.")
      .def("execute", &Execute, nb::arg("args"),
           "Enqueue one execution (on each device: `args` are leaf-major shards); outputs are device buffers, "
           "leaf-major, ready asynchronously.");

  BindSchedule(m);
  BindTaskRunner(m);
}
