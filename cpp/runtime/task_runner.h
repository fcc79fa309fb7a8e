// Runs a compiled task in the runtime: training, and the metagradient by
// executing a checkpointing plan (schedule.h) on device buffers, with saved
// states in host memory where the plan's host slots say. A task over several
// devices holds every value as one shard per device (programs.h).
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "runtime/batch_stream.h"
#include "runtime/buffer.h"
#include "runtime/executable.h"
#include "runtime/plan_walk.h"
#include "runtime/programs.h"

namespace metagrad {

// The memory kind of the host tier: host memory the device copies to and from
// directly (PJRT's memory kinds; the CPU plugin and CUDA's both offer it).
inline constexpr char kHostMemoryKind[] = "pinned_host";

struct MetagradientOptions {
  // Compare replayed states with the first forward pass at every
  // `determinism_stride`-th position the run reaches anyway (0 disables),
  // and the fused forward programs with single steps once.
  int64_t determinism_stride = 0;
  // Stop at the first forward step whose state, or the first reversed step
  // whose cotangent, holds NaN or Inf.
  bool check_finite = false;
  // Slots of the plan whose states live in host memory (memory kind
  // `host_memory_kind` of each shard's device).
  std::set<int> host_slots;
  std::string host_memory_kind = kHostMemoryKind;
};

// How TaskRunner::Calibrate measures: part of the key of a calibration kept in
// the disk cache, so that a changed method measures again. 2: chains of at
// least 20 ms at every step position, in interleaved rounds; 3: each chain
// after one untimed execution.
constexpr int64_t kCalibrationVersion = 3;

// What one run did. Its fields are listed once, in VisitReportFields. Bytes
// are per device: over several devices each holds one shard of every value
// (a replicated leaf whole), and even shardings make every device equal.
struct RunReport {
  std::string schedule;
  int64_t devices = 1;
  int64_t steps = 0;
  int64_t forward_steps = 0;   // steps applied by forward programs, replays included
  int64_t reversed_steps = 0;  // steps reversed (by step_vjp or fused segments)
  int64_t executions = 0;      // program executions dispatched
  int64_t peak_saved_states = 0;
  int64_t peak_saved_bytes = 0;
  int64_t state_bytes = 0;
  int64_t peak_device_bytes = 0;  // saved states + current state + cotangents + the running program's temporaries
  int64_t data_bytes = 0;         // data and z, on the device throughout, and the streamed batches in flight
  int64_t streamed_bytes = 0;     // streamed batches copied host -> device (every replay streams its batches again)
  double seconds_waiting_for_data = 0;  // the run waiting for streamed batches not on the device yet
  int64_t prefetch_misses = 0;    // executions whose batches were gathered when needed, not ahead
  int64_t peak_host_bytes = 0;    // saved states held in host memory
  int64_t host_saved_states = 0;  // saves that went to host memory
  int64_t bytes_to_host = 0;      // copied device -> host (saves)
  int64_t bytes_from_host = 0;    // copied host -> device (restores)
  int64_t predicted_peak_device_bytes = 0;  // the planner's figure for peak_device_bytes (0: no prediction)
  int64_t predicted_peak_host_bytes = 0;    // the planner's figure for peak_host_bytes
  double predicted_seconds = 0;             // the planner's figure for seconds_total (0: no prediction)
  int64_t budget_bytes = 0;                 // the device-memory budget the plan was chosen for (0: none)
  int64_t host_budget_bytes = 0;            // the host-memory budget per device (0: none)
  int64_t determinism_checks = 0;
  double seconds_forward = 0;  // init, first pass to T, output_vjp
  double seconds_reverse = 0;  // reverse traversal with its replays, init_vjp
  double seconds_total = 0;
  // Set up by the caller before the run, not by the runner: seconds the call
  // spent building what the run needed (by phase, and XLA's compile per program).
  std::map<std::string, double> setup_seconds;
  std::map<std::string, double> compile_seconds;
};

// Programs' worth of streamed batches a run gathers ahead of the one running.
constexpr int kPrefetchDepth = 2;

// Calls visit(name, member pointer, doc) for each field of RunReport: the
// bindings and the harness's JSON read the fields from here.
template <typename Visit>
void VisitReportFields(Visit&& visit) {
  visit("schedule", &RunReport::schedule, "the schedule that ran");
  visit("devices", &RunReport::devices,
        "devices the task runs on; every byte figure is per device (each holds one shard of every value)");
  visit("steps", &RunReport::steps, "training steps T");
  visit("forward_steps", &RunReport::forward_steps, "steps run forward, replays included");
  visit("reversed_steps", &RunReport::reversed_steps, "steps reversed");
  visit("executions", &RunReport::executions, "program executions dispatched");
  visit("peak_saved_states", &RunReport::peak_saved_states, "most saved states held at once");
  visit("peak_saved_bytes", &RunReport::peak_saved_bytes, "their bytes");
  visit("state_bytes", &RunReport::state_bytes, "bytes of one training state");
  visit("peak_device_bytes", &RunReport::peak_device_bytes,
        "most device bytes the run held at once: saved states, the current state, cotangents and accumulators, and "
        "the temporaries of the program running (XLA's compiled memory statistics)");
  visit("data_bytes", &RunReport::data_bytes,
        "data and z, on the device throughout the run, and the device buffers of streamed batches in flight");
  visit("streamed_bytes", &RunReport::streamed_bytes,
        "bytes of streamed batches copied from host memory to the device (replayed steps stream theirs again)");
  visit("seconds_waiting_for_data", &RunReport::seconds_waiting_for_data,
        "seconds the run waited for streamed batches that were not on the device yet");
  visit("prefetch_misses", &RunReport::prefetch_misses,
        "executions whose streamed batches were gathered when needed instead of ahead (0 when the prefetch "
        "followed the plan)");
  visit("peak_host_bytes", &RunReport::peak_host_bytes, "most bytes of saved states held in host memory at once");
  visit("host_saved_states", &RunReport::host_saved_states, "saves that went to host memory");
  visit("bytes_to_host", &RunReport::bytes_to_host, "bytes copied from the device to host memory (saves)");
  visit("bytes_from_host", &RunReport::bytes_from_host, "bytes copied from host memory to the device (restores)");
  visit("predicted_peak_device_bytes", &RunReport::predicted_peak_device_bytes,
        "the planner's prediction of peak_device_bytes (0 without one)");
  visit("predicted_peak_host_bytes", &RunReport::predicted_peak_host_bytes,
        "the planner's prediction of peak_host_bytes");
  visit("predicted_seconds", &RunReport::predicted_seconds, "the planner's prediction of seconds_total (0 without one)");
  visit("budget_bytes", &RunReport::budget_bytes,
        "the device-memory budget the planner chose the plan for: peak_device_bytes + data_bytes fit in it");
  visit("host_budget_bytes", &RunReport::host_budget_bytes,
        "the host-memory budget per device the planner chose the plan for (0: no host tier)");
  visit("determinism_checks", &RunReport::determinism_checks, "replayed states compared with the first pass");
  visit("seconds_forward", &RunReport::seconds_forward, "init, the first forward pass and the output");
  visit("seconds_reverse", &RunReport::seconds_reverse, "the reverse traversal with its replays");
  visit("seconds_total", &RunReport::seconds_total, "the whole run");
  visit("setup_seconds", &RunReport::setup_seconds,
        "seconds this call spent before the run, by phase: 'trace' (JAX tracing and lowering), 'enzyme' (waiting "
        "for Enzyme's reverses), 'compile' (XLA), 'calibrate' (timing programs for the planner); empty when "
        "everything was built and calibrated already");
  visit("compile_seconds", &RunReport::compile_seconds, "XLA's compile of each program this call built, in seconds");
}

// A non-deterministic step, or a non-finite state or cotangent, found during a run.
class CheckFailed : public std::runtime_error {
 public:
  CheckFailed(const std::string& message, int64_t step) : std::runtime_error(message), step_(step) {}
  int64_t step() const { return step_; }

 private:
  int64_t step_;
};

// Thread safety: a runner runs one call at a time. Train, Metagradient,
// Calibrate and ProgramBytes hold its lock, under which they use its caches
// (step indices, execution bytes) and the call's monitor; callers on several
// threads wait their turn. Calls on different runners run concurrently.
class TaskRunner {
 public:
  // `stream`: the batches of group B (programs.h), for a task with streamed data.
  TaskRunner(TaskPrograms programs, TaskLayout layout, int64_t steps, std::vector<BufferPtr> data,
             std::shared_ptr<BatchStream> stream = nullptr);

  int64_t steps() const { return steps_; }
  const TaskPrograms& programs() const { return programs_; }
  const TaskLayout& layout() const { return layout_; }

  // Called between executions, at most every 50 ms, during the call it is
  // given to, with the steps done (forward and reversed) and the run's total;
  // it may throw to abandon the run (a Ctrl-C from Python).
  using Monitor = std::function<void(int64_t done, int64_t total)>;

  // init then all T steps; returns the final state.
  std::vector<BufferPtr> Train(const std::vector<BufferPtr>& z, RunReport* report = nullptr,
                               const Monitor& monitor = {});

  struct Result {
    BufferPtr value;
    std::vector<BufferPtr> grad;
    RunReport report;
  };
  Result Metagradient(const std::vector<BufferPtr>& z, const Plan& plan, const MetagradientOptions& options,
                      const Monitor& monitor = {});

  // The cost of each program (by its name in programs.h) on this task's
  // inputs: seconds per execution (the median of `repeats` samples, each a
  // chain of executions lasting at least 20 ms after one untimed execution,
  // taken in rounds that time every program once, after one untimed round)
  // and the device bytes an execution adds; with a `host_memory_kind`, also
  // "to_host" and "from_host": the seconds to copy one state there and back.
  std::map<std::string, ProgramCost> Calibrate(const std::vector<BufferPtr>& z, int repeats,
                                               const std::string& host_memory_kind = "",
                                               const Monitor& monitor = {});
  // The device bytes of each program, without running anything.
  std::map<std::string, ProgramCost> ProgramBytes();
  // Device bytes of the streamed batches in flight: those of the running
  // program and of the prefetched ones, each as large as the longest program's.
  int64_t StreamBytes() const;

 private:
  friend class Traversal;
  class Call;  // holds the lock and the monitor for one call


  std::vector<BufferPtr> Run(const ExecutablePtr& program, const std::vector<const std::vector<BufferPtr>*>& groups,
                             RunReport& report);
  // Applies one chunk (start, length) to `state`.
  std::vector<BufferPtr> Apply(const std::vector<BufferPtr>& state, const std::vector<BufferPtr>& z,
                               std::pair<int64_t, int64_t> chunk, RunReport& report);
  // t as an int32 on every device.
  const std::vector<BufferPtr>& StepIndex(int64_t t);
  // The inputs of a program of `count` steps from t: the streamed batches (group B), then t.
  std::vector<BufferPtr> StepInputs(int64_t t, int64_t count);
  void CheckZ(const std::vector<BufferPtr>& z) const;
  // Throws InvalidArgument naming the programs the calls of `needed_by` need that the task lacks.
  void RequirePrograms(const std::string& needed_by) const;
  // The state's and cotangents' bytes and each program's execution bytes, for the walk of a plan.
  CostTable BytesTable();
  // Bytes per device of leaf-major shards.
  int64_t DeviceBytes(const std::vector<BufferPtr>& buffers) const;
  // Device bytes an execution of `program` adds to its live arguments:
  // outputs that do not alias a donated argument, and its temporaries.
  int64_t ExecutionBytes(const ExecutablePtr& program);

  TaskPrograms programs_;
  TaskLayout layout_;
  int64_t steps_;
  std::vector<BufferPtr> data_;
  std::shared_ptr<BatchStream> stream_;
  std::vector<int64_t> advance_lengths_;  // of the fused forward programs
  std::vector<std::vector<BufferPtr>> step_indices_;  // int32 scalars t per device, uploaded once
  std::map<const Executable*, int64_t> execution_bytes_;
  // Recursive: Calibrate asks ProgramBytes under the lock it holds.
  std::recursive_mutex mutex_;
  const Monitor* monitor_ = nullptr;  // the running call's, under mutex_
  int64_t monitor_total_ = 0;
  std::chrono::steady_clock::time_point last_check_{};
};

}  // namespace metagrad
