// Runs a compiled task in the runtime: training, and the metagradient by
// executing a checkpointing plan (schedule.h) with device buffers only.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/buffer.h"
#include "runtime/executable.h"
#include "runtime/schedule.h"

namespace metagrad {

using ExecutablePtr = std::shared_ptr<Executable>;

// The programs of lowering.py, with the same flat signatures.
struct TaskPrograms {
  ExecutablePtr init, step, output, output_vjp, step_vjp, init_vjp;
  std::map<int64_t, ExecutablePtr> segment_vjp;  // fused reverse of n steps, by n
  ExecutablePtr all_finite;                      // (dS[D], dZ) -> bool[]; for the non-finite check
  // Optional fused forward programs, by n: (S, Z, X, t0) -> S after steps
  // t0..t0+n-1 in one execution. Training and the plan's advances use the
  // largest that fits (one execution instead of n: each execution costs tens
  // of microseconds on the CPU plugin beyond its compute). Chunks start at
  // multiples of n, so replays over whole chunks run the same programs as the
  // first pass; elsewhere results agree with single steps to rounding.
  std::map<int64_t, ExecutablePtr> advance;
};

struct MetagradientOptions {
  // Compare replayed states with the first forward pass, bit for bit, at
  // every `determinism_stride`-th position (0 disables the check).
  int64_t determinism_stride = 0;
  // Stop at the first reversed step whose cotangent holds NaN or Inf.
  bool check_finite = false;
};

struct RunReport {
  int64_t steps = 0;
  int64_t forward_steps = 0;   // step executions, replays included
  int64_t reversed_steps = 0;  // steps reversed (by step_vjp or fused segments)
  int64_t executions = 0;      // program executions dispatched
  int64_t peak_saved_states = 0;
  int64_t peak_saved_bytes = 0;
  int64_t state_bytes = 0;
  int64_t determinism_checks = 0;
  double seconds_forward = 0;  // init, first pass to T, output_vjp
  double seconds_reverse = 0;  // reverse traversal with its replays, init_vjp
  double seconds_total = 0;
};

// A non-deterministic step, or a non-finite cotangent, found during a run.
class CheckFailed : public std::runtime_error {
 public:
  CheckFailed(const std::string& message, int64_t step) : std::runtime_error(message), step_(step) {}
  int64_t step() const { return step_; }

 private:
  int64_t step_;
};

class TaskRunner {
 public:
  TaskRunner(TaskPrograms programs, int64_t steps, std::vector<bool> differentiable, int num_z,
             std::vector<BufferPtr> data);

  int64_t steps() const { return steps_; }
  const TaskPrograms& programs() const { return programs_; }

  // init then all T steps; returns the final state.
  std::vector<BufferPtr> Train(const std::vector<BufferPtr>& z, RunReport* report = nullptr);

  struct Result {
    BufferPtr value;
    std::vector<BufferPtr> grad;
    RunReport report;
  };
  Result Metagradient(const std::vector<BufferPtr>& z, const Plan& plan, const MetagradientOptions& options);

 private:
  std::vector<BufferPtr> Run(const ExecutablePtr& program, const std::vector<const std::vector<BufferPtr>*>& groups,
                             RunReport& report) const;
  // Applies steps [from, from + count) to `state`, with the largest fused
  // `advance` programs that fit, single steps for the rest.
  void Advance(std::vector<BufferPtr>& state, const std::vector<BufferPtr>& z, int64_t from, int64_t count,
               RunReport& report);
  const BufferPtr& StepIndex(int64_t t);
  void CheckZ(const std::vector<BufferPtr>& z) const;

  TaskPrograms programs_;
  int64_t steps_;
  std::vector<bool> differentiable_;
  int num_z_;
  std::vector<BufferPtr> data_;
  std::vector<BufferPtr> step_indices_;  // int32 scalars t, uploaded once
};

}  // namespace metagrad
