// metagrad-bench: runs a saved task (CompiledTask.save) with no Python in the
// process. Loads a PJRT plugin, compiles the task's portable StableHLO
// programs, uploads data and z, then times training and metagradients under
// the given checkpointing schedules, and measures per-execution dispatch
// overhead. Text or --json output.
//
// Dispatch overhead is measured three ways (see PrintUsage / docs/performance.md):
//   tiny      a scalar x+1 program executed N times in a dependent chain
//             (enqueue all, await the last): the runtime's cost per execution
//             when the computation itself is nil;
//   null_step a program with the step's exact signature (state, z, data, t)
//             whose outputs alias the donated state inputs, so it computes
//             nothing: the cost of dispatching a step-shaped execution
//             (argument checks, PJRT execute, output wrapping);
//   fused     when the task directory holds an `advance_<n>` program (n steps
//             in one execution, written by bench/save_task.py): training time
//             per step minus that program's time per step is the whole
//             per-step cost of running one execution per step.
// A task saved over several devices (a sharding in its manifest) runs on the
// devices it names: data and z are uploaded shard by shard, the metagradient
// assembled from its shards; the dispatch measurement is single-device only
// and skipped for it.
#include <glob.h>
#include <limits.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <type_traits>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "bench/manifest.h"
#include "runtime/buffer.h"
#include "runtime/executable.h"
#include "runtime/plan_walk.h"
#include "runtime/sharding.h"
#include "runtime/task_runner.h"

namespace metagrad::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

void PrintUsage(std::ostream& out) {
  out << "usage: metagrad-bench TASK_DIR [options]\n"
         "  TASK_DIR              a directory written by CompiledTask.save (manifest.json, programs/, arrays/)\n"
         "options:\n"
         "  --plugin PATH         PJRT plugin (default: $METAGRAD_PJRT_PLUGIN, else the CPU plugin of the\n"
         "                        xla-cpu-pjrt package installed beside this program)\n"
         "  --schedule LIST       comma-separated schedules, each KIND[:ARG[:BLOCK]]:\n"
         "                          replay:K  budget:STATES  periodic:EVERY  storeall  none (training only)\n"
         "                        default replay:4\n"
         "  --block N             steps per fused reverse block, for schedules without their own (default 1)\n"
         "  --steps T             run T training steps instead of the manifest's (the programs do not\n"
         "                        depend on T unless the task's z or data do)\n"
         "  --repeat N            timed repetitions of training and of each schedule (default 3)\n"
         "  --warmup N            untimed runs of each first (default 1)\n"
         "  --dispatch-iters N    executions per dispatch measurement (default 5000, 0 skips)\n"
         "  --check-determinism N compare replayed states with the first pass every N steps\n"
         "  --no-fused-forward    run one execution per forward step even when the directory has\n"
         "                        advance_<n> programs (by default training and replays use them)\n"
         "  --json                one JSON object on stdout instead of text\n"
         "  --save-grad DIR       write each schedule's phi and metagradient as raw arrays:\n"
         "                        DIR/<i>/value.bin and DIR/<i>/grad_<leaf>.bin (i: the schedule's index)\n";
}

struct ScheduleSpec {
  std::string kind;
  int64_t arg = 0;
  int64_t block = 1;
  std::string Name() const {
    std::string name = kind;
    if (kind != "storeall") name += ":" + std::to_string(arg);
    if (block != 1) name += " block=" + std::to_string(block);
    return name;
  }
};

int64_t ParseInt(const std::string& text, const std::string& what) {
  char* end = nullptr;
  errno = 0;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE) {
    throw std::invalid_argument(what + " must be an integer, got '" + text + "'");
  }
  return value;
}

std::vector<std::string> Split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream in(text);
  while (std::getline(in, part, sep)) parts.push_back(part);
  if (!text.empty() && text.back() == sep) parts.push_back("");
  return parts;
}

std::vector<ScheduleSpec> ParseSchedules(const std::string& text, int64_t default_block) {
  std::vector<ScheduleSpec> specs;
  for (const std::string& item : Split(text, ',')) {
    const std::vector<std::string> parts = Split(item, ':');
    ScheduleSpec spec;
    spec.kind = parts.empty() ? "" : parts[0];
    spec.block = default_block;
    if (spec.kind == "none") continue;
    if (spec.kind == "storeall") {
      if (parts.size() != 1) throw std::invalid_argument("storeall takes no argument: '" + item + "'");
    } else if (spec.kind == "replay" || spec.kind == "budget" || spec.kind == "periodic") {
      if (parts.size() < 2 || parts.size() > 3) {
        throw std::invalid_argument("schedule '" + item + "' must be " + spec.kind + ":N or " + spec.kind +
                                    ":N:BLOCK");
      }
      spec.arg = ParseInt(parts[1], "the argument of '" + item + "'");
      if (parts.size() == 3) spec.block = ParseInt(parts[2], "the block length of '" + item + "'");
    } else {
      throw std::invalid_argument("unknown schedule '" + item +
                                  "': use replay:K, budget:STATES, periodic:EVERY, storeall or none");
    }
    if (spec.block < 1) throw std::invalid_argument("the block length must be >= 1 in '" + item + "'");
    specs.push_back(spec);
  }
  return specs;
}

Plan MakePlan(const ScheduleSpec& spec, int64_t steps) {
  if (spec.kind == "replay") {
    if (spec.arg < 2 || spec.arg > INT32_MAX) throw std::invalid_argument("replay:K needs K >= 2");
    return PlanReplay(steps, static_cast<int>(spec.arg), spec.block);
  }
  if (spec.kind == "budget") {  // Python's Budget(states=STATES, block=BLOCK): revolve with STATES slots
    if (spec.arg < 1 || spec.arg > INT32_MAX) throw std::invalid_argument("budget:STATES needs STATES >= 1");
    return PlanRevolve(steps, static_cast<int>(spec.arg), spec.block);
  }
  if (spec.kind == "periodic") {
    if (spec.arg < 1 || spec.arg % spec.block != 0) {
      throw std::invalid_argument("periodic:EVERY needs EVERY >= 1 and a multiple of the block length");
    }
    return PlanPeriodic(steps, spec.arg, spec.block);
  }
  return PlanStoreAll(steps);
}

struct Options {
  std::string directory;
  std::string plugin;
  std::vector<ScheduleSpec> schedules;
  int64_t repeat = 3;
  int64_t warmup = 1;
  int64_t dispatch_iters = 5000;
  int64_t determinism_stride = 0;
  int64_t steps = 0;  // 0: the manifest's
  bool json = false;
  bool fused_forward = true;
  std::string save_grad;
};

Options ParseArgs(int argc, char** argv) {
  Options o;
  std::string schedules = "replay:4";
  int64_t block = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      PrintUsage(std::cout);
      std::exit(0);
    } else if (arg == "--plugin") {
      o.plugin = value();
    } else if (arg == "--schedule") {
      schedules = value();
    } else if (arg == "--block") {
      block = ParseInt(value(), "--block");
    } else if (arg == "--steps") {
      o.steps = ParseInt(value(), "--steps");
      if (o.steps < 1) throw std::invalid_argument("--steps must be >= 1");
    } else if (arg == "--repeat") {
      o.repeat = ParseInt(value(), "--repeat");
    } else if (arg == "--warmup") {
      o.warmup = ParseInt(value(), "--warmup");
    } else if (arg == "--dispatch-iters") {
      o.dispatch_iters = ParseInt(value(), "--dispatch-iters");
    } else if (arg == "--check-determinism") {
      o.determinism_stride = ParseInt(value(), "--check-determinism");
    } else if (arg == "--json") {
      o.json = true;
    } else if (arg == "--save-grad") {
      o.save_grad = value();
    } else if (arg == "--no-fused-forward") {
      o.fused_forward = false;
    } else if (!arg.empty() && arg[0] == '-') {
      throw std::invalid_argument("unknown option " + arg);
    } else if (o.directory.empty()) {
      o.directory = arg;
    } else {
      throw std::invalid_argument("more than one task directory given");
    }
  }
  if (o.directory.empty()) throw std::invalid_argument("no task directory given");
  if (o.repeat < 1 || o.warmup < 0 || o.dispatch_iters < 0 || o.determinism_stride < 0) {
    throw std::invalid_argument("--repeat must be >= 1; --warmup, --dispatch-iters, --check-determinism >= 0");
  }
  if (block < 1) throw std::invalid_argument("--block must be >= 1");
  o.schedules = ParseSchedules(schedules, block);
  return o;
}

// ---------------------------------------------------------------------------
// Output: an ordered tree of values printed as text or JSON.

struct Stat {
  double min = 0, median = 0, mean = 0;
  std::vector<double> samples;
};

Stat Summarize(std::vector<double> samples) {
  Stat s;
  s.samples = samples;
  if (samples.empty()) return s;
  std::sort(samples.begin(), samples.end());
  s.min = samples.front();
  const size_t n = samples.size();
  s.median = n % 2 ? samples[n / 2] : 0.5 * (samples[n / 2 - 1] + samples[n / 2]);
  double total = 0;
  for (double v : samples) total += v;
  s.mean = total / static_cast<double>(n);
  return s;
}

std::string JsonEscape(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

std::string Num(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}

// A JSON object under construction, keys in insertion order.
class Obj {
 public:
  Obj& Set(const std::string& key, const std::string& raw_json) {
    entries_.emplace_back(key, raw_json);
    return *this;
  }
  Obj& Str(const std::string& key, const std::string& value) { return Set(key, JsonEscape(value)); }
  Obj& Double(const std::string& key, double value) { return Set(key, Num(value)); }
  Obj& Int(const std::string& key, int64_t value) { return Set(key, std::to_string(value)); }
  Obj& Bool(const std::string& key, bool value) { return Set(key, value ? "true" : "false"); }
  Obj& Child(const std::string& key, const Obj& child) { return Set(key, child.Dump()); }
  Obj& StatOf(const std::string& key, const Stat& s) {
    Obj o;
    o.Double("min", s.min).Double("median", s.median).Double("mean", s.mean);
    std::string samples = "[";
    for (size_t i = 0; i < s.samples.size(); ++i) samples += (i ? ", " : "") + Num(s.samples[i]);
    o.Set("samples", samples + "]");
    return Child(key, o);
  }
  std::string Dump() const {
    std::string out = "{";
    for (size_t i = 0; i < entries_.size(); ++i) {
      out += (i ? ", " : "") + JsonEscape(entries_[i].first) + ": " + entries_[i].second;
    }
    return out + "}";
  }

 private:
  std::vector<std::pair<std::string, std::string>> entries_;
};

// ---------------------------------------------------------------------------

std::string MlirType(const ArraySpec& spec) {
  std::string type = "tensor<";
  for (int64_t d : spec.dims) type += std::to_string(d) + "x";
  return type + DTypeOf(spec.type).mlir + ">";
}

const char* kTinyProgram = R"(module @tiny attributes {mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%arg0: tensor<f32>) -> tensor<f32> {
    %c = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %0 = stablehlo.add %arg0, %c : tensor<f32>
    return %0 : tensor<f32>
  }
}
)";

// (S, Z, X, t) -> S with every state input donated and returned as is.
std::string NullStepProgram(const std::vector<ArraySpec>& step_inputs, size_t num_state) {
  std::string args, results, values;
  for (size_t i = 0; i < step_inputs.size(); ++i) {
    args += (i ? ", " : "") + std::string("%arg") + std::to_string(i) + ": " + MlirType(step_inputs[i]);
    if (i < num_state) {
      args += " {tf.aliasing_output = " + std::to_string(i) + " : i32}";
      results += (i ? ", " : "") + MlirType(step_inputs[i]);
      values += (i ? ", " : "") + std::string("%arg") + std::to_string(i);
    }
  }
  return "module @null_step attributes {mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {\n"
         "  func.func public @main(" + args + ") -> (" + results + ") {\n"
         "    return " + values + " : " + results + "\n  }\n}\n";
}

double PeakRssBytes() {
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) * 1024.0;
}

// A whole array on the host.
struct HostArray {
  ArraySpec spec;
  std::string bytes;
};

// The metagradient's leaves as whole arrays (assembled from their shards).
std::vector<HostArray> GradArrays(const Manifest& m, const std::vector<BufferPtr>& grad) {
  std::vector<HostArray> arrays;
  const size_t n = static_cast<size_t>(m.layout.devices);
  for (size_t i = 0; i < m.z_global.size(); ++i) {
    const std::vector<BufferPtr> shards(grad.begin() + static_cast<long>(i * n),
                                        grad.begin() + static_cast<long>((i + 1) * n));
    HostArray array{{m.z_global[i].dims, shards[0]->spec().type}, {}};  // float32 accumulators for 16-bit z
    if (m.sharded) {
      array.bytes = AssembleShards(shards, array.spec, m.sharding.z[i], m.sharding.mesh);
    } else {
      array.bytes.resize(array.spec.num_bytes());
      shards[0]->ToHost(array.bytes.data(), array.bytes.size());
    }
    arrays.push_back(std::move(array));
  }
  return arrays;
}

double L2Norm(const std::vector<HostArray>& arrays) {
  double total = 0;
  for (const HostArray& array : arrays) {
    const size_t n = array.spec.num_elements();
    for (size_t i = 0; i < n; ++i) {
      double v = 0;
      if (array.spec.type == PJRT_Buffer_Type_F32) v = reinterpret_cast<const float*>(array.bytes.data())[i];
      else if (array.spec.type == PJRT_Buffer_Type_F64) v = reinterpret_cast<const double*>(array.bytes.data())[i];
      else return NAN;
      total += v * v;
    }
  }
  return std::sqrt(total);
}

double ScalarValue(const BufferPtr& buffer) {
  if (buffer->spec().type == PJRT_Buffer_Type_F32) {
    float v;
    buffer->ToHost(&v, sizeof(v));
    return v;
  }
  if (buffer->spec().type == PJRT_Buffer_Type_F64) {
    double v;
    buffer->ToHost(&v, sizeof(v));
    return v;
  }
  return NAN;
}

std::string Human(double seconds) {
  char buf[64];
  if (seconds >= 1) std::snprintf(buf, sizeof(buf), "%.3f s", seconds);
  else if (seconds >= 1e-3) std::snprintf(buf, sizeof(buf), "%.2f ms", seconds * 1e3);
  else std::snprintf(buf, sizeof(buf), "%.2f us", seconds * 1e6);
  return buf;
}

std::string Bytes(double bytes) {
  char buf[64];
  if (bytes >= 1 << 30) std::snprintf(buf, sizeof(buf), "%.2f GiB", bytes / (1 << 30));
  else if (bytes >= 1 << 20) std::snprintf(buf, sizeof(buf), "%.2f MiB", bytes / (1 << 20));
  else if (bytes >= 1 << 10) std::snprintf(buf, sizeof(buf), "%.1f KiB", bytes / (1 << 10));
  else std::snprintf(buf, sizeof(buf), "%.0f B", bytes);
  return buf;
}

// -- phases of a run -----------------------------------------------------------

// The CPU plugin of the xla-cpu-pjrt package installed in the same Python
// environment as this program: <env>/bin/metagrad-bench next to
// <env>/lib/python3.*/site-packages/xla_plugins/xla_cpu_pjrt/xla_cpu_pjrt.so.
std::string FindCpuPlugin() {
  char self[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return "";
  self[n] = '\0';
  std::string dir(self);
  dir = dir.substr(0, dir.find_last_of('/'));
  const std::string relative = "xla_plugins/xla_cpu_pjrt/xla_cpu_pjrt.so";
  std::vector<std::string> patterns = {dir + "/../lib/python3*/site-packages/" + relative,
                                       dir + "/../../" + relative,  // site-packages/metagrad/bin
                                       dir + "/../lib64/python3*/site-packages/" + relative};
  for (const std::string& pattern : patterns) {
    glob_t found;
    if (glob(pattern.c_str(), 0, nullptr, &found) == 0 && found.gl_pathc > 0) {
      std::string path = found.gl_pathv[0];
      globfree(&found);
      return path;
    }
    globfree(&found);
  }
  return "";
}

std::string ChoosePlugin(const Options& o) {
  if (!o.plugin.empty()) return o.plugin;
  if (const char* env = std::getenv("METAGRAD_PJRT_PLUGIN")) {
    if (*env) return env;
  }
  std::string found = FindCpuPlugin();
  if (found.empty()) {
    throw std::invalid_argument(
        "no PJRT plugin found: pass --plugin PATH or set $METAGRAD_PJRT_PLUGIN (the CPU plugin ships in the "
        "xla-cpu-pjrt package: python -c \"import metagrad.runtime as r; print(r.cpu_plugin_path())\")");
  }
  return found;
}

struct TaskFiles {
  Manifest manifest;
  std::map<std::string, std::string> code;
  std::vector<std::string> data, z;
};

TaskFiles ReadTask(const Options& o) {
  TaskFiles files{ReadManifest(o.directory), {}, {}, {}};
  Manifest& m = files.manifest;
  if (o.steps > 0) m.steps = o.steps;
  for (const auto& [name, entry] : m.programs) files.code[name] = ReadFile(entry.file);
  files.data = ReadArrays(m, m.data_files, m.data_global, m.data_paths);
  files.z = ReadArrays(m, m.z_files, m.z_global, m.z_paths);
  return files;
}

// The stream of a task with streamed data over its first T steps (nullptr without one).
std::shared_ptr<BatchStream> OpenStream(const std::shared_ptr<Client>& client, const Manifest& m, int64_t T) {
  if (m.batch_global.empty()) return nullptr;
  const int64_t batch = m.batch_global.back().dims.at(0);
  const std::string bytes = ReadFile(m.stream_batches);
  const int64_t saved_steps = static_cast<int64_t>(bytes.size() / sizeof(int64_t)) / batch;
  if (bytes.size() != static_cast<size_t>(saved_steps * batch) * sizeof(int64_t) || saved_steps < T) {
    throw ManifestError(m.stream_batches + " holds " + std::to_string(bytes.size()) + " bytes, not an int64 index "
                        "table of at least " + std::to_string(T) + " steps of " + std::to_string(batch) + " rows");
  }
  std::vector<int64_t> index(static_cast<size_t>(T * batch));
  std::memcpy(index.data(), bytes.data(), index.size() * sizeof(int64_t));
  StreamDevices devices;
  if (m.sharded) devices = StreamDevices{m.sharding.devices, m.sharding.mesh, m.sharding.batch};
  return std::make_shared<BatchStream>(m.stream_rows, std::move(index), T, batch, client, devices);
}

struct CompiledPrograms {
  std::map<std::string, ExecutablePtr> executables;
  Obj seconds_per_program, temp_bytes;
  double seconds = 0;
};

CompiledPrograms CompileAll(Client& client, const TaskFiles& files, bool fused_forward) {
  CompiledPrograms out;
  const Manifest& m = files.manifest;
  std::string options;  // empty: one device
  if (m.sharded) {
    const std::string warning = CheckCpuCores(client.platform_name(), m.sharding.devices.size());
    if (!warning.empty()) std::cerr << "warning: " << warning << "\n";
    std::vector<int> ids;
    for (int device : m.sharding.devices) ids.push_back(client.device(device).id);
    options = SerializeCompileOptions(ids, m.sharding.use_shardy_partitioner,
                                      MultiDeviceDebugOptions(client.platform_name(), ids.size()));
  }
  for (const auto& [name, code] : files.code) {
    if (!fused_forward && std::string(ParseProgramName(name).kind->name) == "advance") continue;
    const Signature& signature = files.manifest.programs.at(name).signature;
    const auto start = Clock::now();
    try {
      out.executables[name] = client.Compile(code, "mlir", signature.inputs, signature.donated, options);
    } catch (const std::exception& e) {
      throw ManifestError(files.manifest.programs.at(name).file + ": does not compile as program " + name + ": " +
                          e.what());
    }
    // The artifact itself, not only its manifest entry: another program's file in its place compiles.
    if (!(out.executables[name]->outputs() == signature.outputs)) {
      throw ManifestError(files.manifest.programs.at(name).file + ": is not program " + name + ": it returns " +
                          SpecList(out.executables[name]->outputs()) + ", " + name + " returns " +
                          SpecList(signature.outputs));
    }
    const double seconds = Since(start);
    out.seconds += seconds;
    out.seconds_per_program.Double(name, seconds);
    int64_t temp = -1;
    try {
      temp = out.executables[name]->CompiledMemoryStats().temp_bytes;
    } catch (const PjrtError&) {
    }
    out.temp_bytes.Int(name, temp);
  }
  return out;
}

// Whole host arrays as device buffers: per leaf, one shard per device (leaf-major).
std::vector<BufferPtr> Upload(Client& client, const Manifest& m, const std::vector<std::string>& bytes,
                              const std::vector<ArraySpec>& specs, const std::vector<PartitionSpec>& sharding) {
  std::vector<BufferPtr> buffers;
  for (size_t i = 0; i < bytes.size(); ++i) {
    if (!m.sharded) {
      buffers.push_back(client.BufferFromHost(bytes[i].data(), specs[i], {}, 0));
      continue;
    }
    for (BufferPtr& shard :
         UploadShards(client, bytes[i].data(), specs[i], sharding[i], m.sharding.mesh, m.sharding.devices)) {
      buffers.push_back(std::move(shard));
    }
  }
  return buffers;
}

struct Case {
  ScheduleSpec spec;
  Plan plan;
  PlanStats stats;
  std::vector<double> total, forward, reverse;
  RunReport report;
  BufferPtr value;
  std::vector<BufferPtr> grad;
};

// Plans up front: a bad schedule fails before any timing.
std::vector<Case> MakeCases(const Options& o, const TaskPrograms& programs, int64_t T) {
  std::vector<Case> cases;
  for (const ScheduleSpec& spec : o.schedules) {
    Case c{spec, MakePlan(spec, T), {}, {}, {}, {}, {}, nullptr, {}};
    c.stats = CheckPlan(c.plan, T);
    for (int64_t length : c.stats.fused_lengths) {
      if (length > 1 && programs.Find(SizedProgram("segment_vjp", length)) == nullptr) {
        std::string have;
        for (int64_t n : programs.Lengths("segment_vjp")) have += " " + std::to_string(n);
        throw std::invalid_argument("schedule " + spec.Name() + " fuses " + std::to_string(length) +
                                    " steps, but the task directory has no segment_vjp_" + std::to_string(length) +
                                    " (it has:" + (have.empty() ? " none" : have) +
                                    "); call compiled.prepare(schedule) before compiled.save(dir)");
      }
    }
    c.report.schedule = spec.Name();
    cases.push_back(std::move(c));
  }
  return cases;
}

// Training and every schedule, interleaved so that noise hits all alike.
Stat TimeRuns(const Options& o, TaskRunner& runner, const std::vector<BufferPtr>& z, std::vector<Case>& cases) {
  std::vector<double> train_seconds;
  MetagradientOptions options;
  options.determinism_stride = o.determinism_stride;
  for (int64_t r = 0; r < o.warmup + o.repeat; ++r) {
    const bool timed = r >= o.warmup;
    RunReport train_report;
    runner.Train(z, &train_report);
    if (timed) train_seconds.push_back(train_report.seconds_total);
    for (Case& c : cases) {
      TaskRunner::Result result = runner.Metagradient(z, c.plan, options);
      if (!timed) continue;
      c.total.push_back(result.report.seconds_total);
      c.forward.push_back(result.report.seconds_forward);
      c.reverse.push_back(result.report.seconds_reverse);
      result.report.schedule = c.report.schedule;
      c.report = result.report;
      c.value = result.value;
      c.grad = result.grad;
    }
  }
  return Summarize(train_seconds);
}

void WriteBytes(const std::string& path, const BufferPtr& buffer) {
  std::string bytes(buffer->spec().num_bytes(), '\0');
  buffer->ToHost(bytes.data(), bytes.size());
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write '" + path + "'");
}

void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write '" + path + "'");
}

void SaveGrads(const std::string& directory, const Manifest& m, const std::vector<Case>& cases) {
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string dir = directory + "/" + std::to_string(i);
    if (mkdir(directory.c_str(), 0755) != 0 && errno != EEXIST) throw std::runtime_error("cannot create " + directory);
    if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) throw std::runtime_error("cannot create " + dir);
    WriteBytes(dir + "/value.bin", cases[i].value);
    const std::vector<HostArray> grad = GradArrays(m, cases[i].grad);
    for (size_t j = 0; j < grad.size(); ++j) WriteFile(dir + "/grad_" + std::to_string(j) + ".bin", grad[j].bytes);
  }
}

// The run's report as JSON, field by field from the one list of fields.
Obj ReportJson(const RunReport& report) {
  Obj o;
  VisitReportFields([&](const char* name, auto member, const char*) {
    using T = std::decay_t<decltype(report.*member)>;
    if constexpr (std::is_same_v<T, std::string>) {
      o.Str(name, report.*member);
    } else if constexpr (std::is_same_v<T, double>) {
      o.Double(name, report.*member);
    } else if constexpr (std::is_same_v<T, std::map<std::string, double>>) {
      Obj seconds;
      for (const auto& [key, value] : report.*member) seconds.Double(key, value);
      o.Child(name, seconds);
    } else {
      o.Int(name, report.*member);
    }
  });
  return o;
}

Obj DescribeCase(const Manifest& m, const Case& c, const Stat& train, std::ostringstream& text) {
  const Stat total = Summarize(c.total), forward = Summarize(c.forward), reverse = Summarize(c.reverse);
  const int64_t T = c.report.steps;
  const double ratio = total.median / train.median;
  const double value = ScalarValue(c.value);
  const double grad_norm = L2Norm(GradArrays(m, c.grad));
  Obj s;
  s.Str("schedule", c.spec.Name()).Str("kind", c.spec.kind).Int("arg", c.spec.arg).Int("block", c.spec.block);
  s.StatOf("seconds", total).StatOf("seconds_forward", forward).StatOf("seconds_reverse", reverse);
  s.Double("ratio_to_train", ratio);
  s.Child("report", ReportJson(c.report));
  s.Double("value", value).Double("grad_norm", grad_norm);
  char line[512];
  std::snprintf(line, sizeof(line),
                "  metagradient %-20s median %s = %.2fx train (min %s; forward %s, reverse %s); %lld forward "
                "steps (%.2f T), %lld executions; peak %lld saved states = %s, %s on the device; phi %.6g, "
                "|grad| %.6g\n",
                c.spec.Name().c_str(), Human(total.median).c_str(), ratio, Human(total.min).c_str(),
                Human(forward.median).c_str(), Human(reverse.median).c_str(),
                static_cast<long long>(c.report.forward_steps),
                static_cast<double>(c.report.forward_steps) / static_cast<double>(T),
                static_cast<long long>(c.report.executions), static_cast<long long>(c.report.peak_saved_states),
                Bytes(static_cast<double>(c.report.peak_saved_bytes)).c_str(),
                Bytes(static_cast<double>(c.report.peak_device_bytes)).c_str(), value, grad_norm);
  text << line;
  return s;
}

// Per-execution cost of the runtime: a tiny program, a step-shaped null
// program, the real step, and fused advances (see the header comment).
Obj MeasureDispatch(Client& client, const TaskFiles& files, const std::map<std::string, ExecutablePtr>& executables,
                    const std::vector<BufferPtr>& z, const std::vector<BufferPtr>& data, int64_t n,
                    std::ostringstream& text) {
  const Manifest& manifest = files.manifest;
  Obj dispatch;
  dispatch.Int("iterations", n);
  auto tiny = client.Compile(kTinyProgram, "mlir", {ArraySpec{{}, PJRT_Buffer_Type_F32}}, {false});
  const float zero = 0;
  auto chain = [&](bool await_each) {
    BufferPtr x = client.BufferFromHost(&zero, ArraySpec{{}, PJRT_Buffer_Type_F32}, {}, 0);
    const auto t0 = Clock::now();
    for (int64_t i = 0; i < n; ++i) {
      x = tiny->Execute({x.get()})[0];
      if (await_each) x->Await();
    }
    x->Await();
    return Since(t0) / static_cast<double>(n);
  };
  chain(false);  // warm up
  std::vector<double> tiny_async, tiny_sync;
  for (int rep = 0; rep < 3; ++rep) {
    tiny_async.push_back(chain(false));
    tiny_sync.push_back(chain(true));
  }
  const Signature& step = manifest.programs.at("step").signature;
  std::vector<bool> null_donated(step.inputs.size(), false);
  for (size_t i = 0; i < manifest.layout.state.size(); ++i) null_donated[i] = true;
  auto null_step =
      client.Compile(NullStepProgram(step.inputs, manifest.layout.state.size()), "mlir", step.inputs, null_donated);
  std::vector<Buffer*> init_args;
  for (auto& b : z) init_args.push_back(b.get());
  for (auto& b : data) init_args.push_back(b.get());
  std::vector<BufferPtr> state0 = executables.at("init")->Execute(init_args);
  for (auto& b : state0) b->Await();
  const int32_t t_value = 0;
  BufferPtr t_buffer = client.BufferFromHost(&t_value, ArraySpec{{}, PJRT_Buffer_Type_S32}, {}, 0);
  auto run_chain = [&](const Executable& exe, int64_t count, bool await_each, std::vector<BufferPtr> state) {
    std::vector<Buffer*> args;
    const auto t0 = Clock::now();
    for (int64_t i = 0; i < count; ++i) {
      args.clear();
      for (auto& b : state) args.push_back(b.get());
      for (auto& b : z) args.push_back(b.get());
      for (auto& b : data) args.push_back(b.get());
      args.push_back(t_buffer.get());
      state = exe.Execute(args);
      if (await_each) state[0]->Await();
    }
    for (auto& b : state) b->Await();
    return Since(t0) / static_cast<double>(count);
  };
  // The null step consumes its (donated) state: give it a private copy.
  auto fresh_state = [&] {
    std::vector<BufferPtr> copy;
    for (auto& b : state0) {
      std::vector<char> bytes(b->spec().num_bytes());
      b->ToHost(bytes.data(), bytes.size());
      copy.push_back(client.BufferFromHost(bytes.data(), b->spec(), {}, 0));
    }
    return copy;
  };
  run_chain(*null_step, std::min<int64_t>(n, 100), false, fresh_state());
  std::vector<double> null_async, null_sync, step_sync, step_async;
  const int64_t real_steps = std::min<int64_t>(manifest.steps, 1000);
  for (int rep = 0; rep < 3; ++rep) {
    null_async.push_back(run_chain(*null_step, n, false, fresh_state()));
    null_sync.push_back(run_chain(*null_step, n, true, fresh_state()));
    step_sync.push_back(run_chain(*executables.at("step"), real_steps, true, state0));
    step_async.push_back(run_chain(*executables.at("step"), real_steps, false, state0));
  }
  const Stat ta = Summarize(tiny_async), ts = Summarize(tiny_sync), na = Summarize(null_async),
             ns = Summarize(null_sync), ss = Summarize(step_sync), sa = Summarize(step_async);
  dispatch.Double("tiny_us", ta.median * 1e6).Double("tiny_await_each_us", ts.median * 1e6);
  dispatch.Double("null_step_us", na.median * 1e6).Double("null_step_await_each_us", ns.median * 1e6);
  dispatch.Double("step_us", sa.median * 1e6).Double("step_await_each_us", ss.median * 1e6);
  dispatch.Double("null_step_fraction_of_step", na.median / sa.median);
  text << "  dispatch (median of 3 x " << n << " executions): tiny " << Human(ta.median) << " per execution ("
       << Human(ts.median) << " awaiting each); step-shaped null program " << Human(na.median) << " ("
       << Human(ns.median) << " awaiting each)\n";
  text << "    real step: " << Human(sa.median) << " per step chained, " << Human(ss.median)
       << " awaiting each; null-step dispatch is " << Num(100 * na.median / sa.median) << "% of a step\n";
  for (const auto& [name, exe] : executables) {
    const ProgramName parsed = ParseProgramName(name);
    if (std::string(parsed.kind->name) != "advance") continue;
    const int64_t per = parsed.length;
    const int64_t runs = std::max<int64_t>(1, real_steps / per);
    std::vector<double> fused;
    run_chain(*exe, 1, false, state0);
    for (int rep = 0; rep < 3; ++rep) fused.push_back(run_chain(*exe, runs, false, state0) / per);
    const Stat f = Summarize(fused);
    Obj fo;
    fo.Int("steps_per_execution", per).Double("us_per_step", f.median * 1e6);
    fo.Double("overhead_us_per_step", (sa.median - f.median) * 1e6);
    dispatch.Child(name, fo);
    text << "    " << name << ": " << Human(f.median) << " per step fused, so one execution per step costs "
         << Human(sa.median - f.median) << " more per step\n";
  }
  return dispatch;
}

int Run(const Options& o) {
  Obj out;
  std::ostringstream text;
  out.Str("task", o.directory);

  auto start = Clock::now();
  const TaskFiles files = ReadTask(o);
  const Manifest& manifest = files.manifest;
  const double seconds_read = Since(start);

  start = Clock::now();
  const std::string plugin = ChoosePlugin(o);
  int64_t cpu_devices = 1;
  for (int device : manifest.sharding.devices) cpu_devices = std::max<int64_t>(cpu_devices, device + 1);
  auto client = Client::Create(Api::Load(plugin), DefaultClientOptions(plugin, cpu_devices));
  const double seconds_client = Since(start);

  CompiledPrograms compiled = CompileAll(*client, files, o.fused_forward);

  start = Clock::now();
  const std::vector<BufferPtr> data =
      Upload(*client, manifest, files.data, manifest.data_global, manifest.sharding.data);
  const std::vector<BufferPtr> z = Upload(*client, manifest, files.z, manifest.z_global, manifest.sharding.z);
  const double seconds_upload = Since(start);

  const int64_t T = manifest.steps;
  Obj phases;
  phases.Double("read", seconds_read).Double("plugin_and_client", seconds_client);
  phases.Double("compile", compiled.seconds).Child("compile_per_program", compiled.seconds_per_program);
  phases.Double("upload", seconds_upload);
  Obj info;
  info.Int("steps", T).Str("backend", manifest.backend).Str("plugin", plugin);
  info.Str("platform", client->platform_name() + " " + client->platform_version());
  info.Int("devices", manifest.layout.devices);
  info.Int("state_bytes", manifest.layout.state_bytes());
  info.Int("state_leaves", static_cast<int64_t>(manifest.layout.state.size()));
  info.Child("program_temp_bytes", compiled.temp_bytes);
  out.Child("info", info);
  out.Child("phases", phases);
  text << "metagrad-bench " << o.directory << "\n";
  text << "  task: T=" << T << ", backend " << manifest.backend << ", state " << Bytes(manifest.layout.state_bytes())
       << (manifest.sharded ? " per device" : "") << " in " << manifest.layout.state.size() << " leaves; platform "
       << client->platform_name()
       << (manifest.sharded ? ", " + std::to_string(manifest.layout.devices) + " devices" : std::string()) << "\n";
  text << "  phases: read " << Human(seconds_read) << ", plugin+client " << Human(seconds_client) << ", compile "
       << Human(compiled.seconds) << " (" << compiled.executables.size() << " programs), upload "
       << Human(seconds_upload) << "\n";

  const TaskPrograms programs(compiled.executables);
  std::string fused_forward;
  for (int64_t n : programs.Lengths("advance")) fused_forward += (fused_forward.empty() ? "" : ",") + std::to_string(n);
  out.Str("fused_forward", fused_forward);
  text << "  forward: " << (fused_forward.empty() ? "one execution per step" : "fused, advance_" + fused_forward)
       << "\n";
  TaskRunner runner(programs, manifest.layout, T, data, OpenStream(client, manifest, T));

  std::vector<Case> cases = MakeCases(o, programs, T);
  const Stat train = TimeRuns(o, runner, z, cases);
  out.Child("train", Obj().StatOf("seconds", train).Double("us_per_step_median", train.median / T * 1e6));
  text << "  train: median " << Human(train.median) << " (min " << Human(train.min) << ", "
       << Human(train.median / T) << " per step) over " << o.repeat << " runs\n";
  std::string schedules_json = "[";
  for (size_t i = 0; i < cases.size(); ++i) {
    schedules_json += (i ? ", " : "") + DescribeCase(manifest, cases[i], train, text).Dump();
  }
  out.Set("metagradient", schedules_json + "]");
  if (!o.save_grad.empty()) SaveGrads(o.save_grad, manifest, cases);

  if (o.dispatch_iters > 0 && manifest.sharded) {
    text << "  dispatch: not measured (single-device measurement; this task runs on " << manifest.layout.devices
         << " devices)\n";
  } else if (o.dispatch_iters > 0 && !manifest.layout.batch.empty()) {
    text << "  dispatch: not measured (the null step takes no streamed batches)\n";
  } else if (o.dispatch_iters > 0) {
    out.Child("dispatch", MeasureDispatch(*client, files, compiled.executables, z, data, o.dispatch_iters, text));
  }
  out.Double("peak_rss_bytes", PeakRssBytes());
  text << "  process peak RSS " << Bytes(PeakRssBytes()) << "\n";
  std::cout << (o.json ? out.Dump() + "\n" : text.str());
  return 0;
}

}  // namespace
}  // namespace metagrad::bench

int main(int argc, char** argv) {
  metagrad::bench::Options options;
  try {
    options = metagrad::bench::ParseArgs(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "metagrad-bench: " << e.what() << "\n\n";
    metagrad::bench::PrintUsage(std::cerr);
    return 2;
  }
  try {
    return metagrad::bench::Run(options);
  } catch (const std::exception& e) {
    std::cerr << "metagrad-bench: " << e.what() << "\n";
    return 1;
  }
}
