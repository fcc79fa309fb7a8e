#include "runtime/task_runner.h"

#include <chrono>
#include <unordered_map>

namespace metagrad {

namespace {

using Clock = std::chrono::steady_clock;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void AwaitAll(const std::vector<BufferPtr>& buffers) {
  for (const auto& buffer : buffers) buffer->Await();
}

std::vector<std::string> HostCopy(const std::vector<BufferPtr>& buffers) {
  std::vector<std::string> copies;
  for (const auto& buffer : buffers) {
    std::string bytes(buffer->spec().num_bytes(), '\0');
    buffer->ToHost(bytes.data(), bytes.size());
    copies.push_back(std::move(bytes));
  }
  return copies;
}

int64_t TotalBytes(const std::vector<BufferPtr>& buffers) {
  int64_t total = 0;
  for (const auto& buffer : buffers) total += static_cast<int64_t>(buffer->spec().num_bytes());
  return total;
}

}  // namespace

TaskRunner::TaskRunner(TaskPrograms programs, int64_t steps, std::vector<bool> differentiable, int num_z,
                       std::vector<BufferPtr> data)
    : programs_(std::move(programs)),
      steps_(steps),
      differentiable_(std::move(differentiable)),
      num_z_(num_z),
      data_(std::move(data)) {
  if (steps_ < 1) throw InvalidArgument("a task needs at least one step, got " + std::to_string(steps_));
  for (const auto* program : {&programs_.init, &programs_.step}) {
    if (*program == nullptr) throw InvalidArgument("the task's init and step programs are required");
  }
}

const BufferPtr& TaskRunner::StepIndex(int64_t t) {
  if (step_indices_.empty()) step_indices_.resize(static_cast<size_t>(steps_));
  BufferPtr& slot = step_indices_[static_cast<size_t>(t)];
  if (slot == nullptr) {
    const int32_t value = static_cast<int32_t>(t);
    slot = programs_.step->client()->BufferFromHost(&value, ArraySpec{{}, PJRT_Buffer_Type_S32}, {}, 0);
  }
  return slot;
}

std::vector<BufferPtr> TaskRunner::Run(const ExecutablePtr& program,
                                       const std::vector<const std::vector<BufferPtr>*>& groups,
                                       RunReport& report) const {
  std::vector<Buffer*> args;
  for (const auto* group : groups) {
    for (const auto& buffer : *group) args.push_back(buffer.get());
  }
  ++report.executions;
  return program->Execute(args);
}

void TaskRunner::Advance(std::vector<BufferPtr>& state, const std::vector<BufferPtr>& z, int64_t from,
                         int64_t count, RunReport& report) {
  // Fused chunks start at multiples of their length, so the first pass and
  // every replay run the same programs over the same steps wherever a replay
  // covers a whole chunk.
  const int64_t end = from + count;
  for (int64_t t = from; t < end;) {
    std::vector<BufferPtr> index = {StepIndex(t)};
    const ExecutablePtr* fused = nullptr;
    int64_t n = 1;
    for (auto it = programs_.advance.rbegin(); it != programs_.advance.rend(); ++it) {
      if (it->first > 1 && t % it->first == 0 && t + it->first <= end) {
        fused = &it->second;
        n = it->first;
        break;
      }
    }
    if (fused != nullptr) {
      state = Run(*fused, {&state, &z, &data_, &index}, report);
      t += n;
    } else {
      state = Run(programs_.step, {&state, &z, &data_, &index}, report);
      t += 1;
    }
  }
}

void TaskRunner::CheckZ(const std::vector<BufferPtr>& z) const {
  if (static_cast<int>(z.size()) != num_z_) {
    throw InvalidArgument("z has " + std::to_string(z.size()) + " leaves, the task was compiled for " +
                          std::to_string(num_z_));
  }
}

std::vector<BufferPtr> TaskRunner::Train(const std::vector<BufferPtr>& z, RunReport* report) {
  CheckZ(z);
  RunReport local;
  RunReport& r = report ? *report : local;
  const auto start = Clock::now();
  std::vector<BufferPtr> state = Run(programs_.init, {&z, &data_}, r);
  Advance(state, z, 0, steps_, r);
  AwaitAll(state);
  r.steps = steps_;
  r.forward_steps = steps_;
  r.seconds_forward = r.seconds_total = SecondsSince(start);
  return state;
}

TaskRunner::Result TaskRunner::Metagradient(const std::vector<BufferPtr>& z, const Plan& plan,
                                            const MetagradientOptions& options) {
  CheckZ(z);
  for (const auto* program : {&programs_.output_vjp, &programs_.step_vjp, &programs_.init_vjp}) {
    if (*program == nullptr) throw InvalidArgument("the task was compiled without its reverse programs");
  }
  if (options.check_finite && programs_.all_finite == nullptr) {
    throw InvalidArgument("check_finite needs the all_finite program");
  }
  // Validates the plan (every step reversed once, in order) before any device work.
  const PlanStats stats = CheckPlan(plan, steps_);
  for (int64_t length : stats.fused_lengths) {
    if (length > 1 && programs_.segment_vjp.count(length) == 0) {
      throw InvalidArgument("the plan fuses " + std::to_string(length) +
                            " steps but no segment program of that length was compiled");
    }
  }

  Result result;
  RunReport& report = result.report;
  report.steps = steps_;
  const auto start = Clock::now();

  std::vector<BufferPtr> current = Run(programs_.init, {&z, &data_}, report);
  report.state_bytes = TotalBytes(current);
  int64_t position = 0;
  std::unordered_map<int, std::pair<int64_t, std::vector<BufferPtr>>> slots;
  std::vector<BufferPtr> cotangent;  // dS[D], then zacc
  std::vector<BufferPtr> z_acc;

  // Bit-exact copies of states from the first forward pass (before any
  // restore), compared with the same positions when they are replayed.
  std::unordered_map<int64_t, std::vector<std::string>> reference;
  bool replaying = false;
  auto record_or_check = [&](int64_t pos, int64_t replayed_from) {
    if (options.determinism_stride <= 0 || pos % options.determinism_stride != 0) return;
    if (!replaying) {
      reference[pos] = HostCopy(current);
      return;
    }
    auto found = reference.find(pos);
    if (found == reference.end()) return;
    ++report.determinism_checks;
    if (HostCopy(current) != found->second) {
      throw CheckFailed("training is not deterministic: replaying step " + std::to_string(pos - 1) +
                            " (from the state saved at step " + std::to_string(replayed_from) +
                            ") gave a state that differs from the first pass. Steps must be pure functions "
                            "of (state, z, data, t): derive randomness and batch order from t.",
                        pos - 1);
    }
  };

  auto check_finite = [&](int64_t step) {
    std::vector<BufferPtr> flag = Run(programs_.all_finite, {&cotangent, &z_acc}, report);
    bool finite = false;
    flag[0]->ToHost(&finite, sizeof(finite));
    if (!finite) {
      throw CheckFailed("the cotangent after reversing step " + std::to_string(step) +
                            " holds NaN or Inf: training or phi is not finite there (lower the learning rate, "
                            "clip, or check the data)",
                        step);
    }
  };

  int64_t replay_origin = 0;
  record_or_check(0, 0);
  for (const Action& action : plan) {
    switch (action.kind) {
      case ActionKind::kAdvance:
        if (options.determinism_stride > 0) {
          // Stop at every checked position (fused programs in between).
          for (int64_t t = action.step; t < action.step + action.count;) {
            const int64_t stride = options.determinism_stride;
            const int64_t n = std::min(action.step + action.count - t, stride - t % stride);
            Advance(current, z, t, n, report);
            t += n;
            position = t;
            record_or_check(position, replay_origin);
          }
        } else {
          Advance(current, z, action.step, action.count, report);
          position = action.step + action.count;
        }
        report.forward_steps += action.count;
        break;
      case ActionKind::kSave: {
        slots[action.slot] = {position, current};
        const int64_t held = static_cast<int64_t>(slots.size());
        report.peak_saved_states = std::max(report.peak_saved_states, held);
        break;
      }
      case ActionKind::kRestore: {
        const auto& saved = slots.at(action.slot);
        position = saved.first;
        current = saved.second;
        replay_origin = position;
        replaying = true;
        break;
      }
      case ActionKind::kFree:
        slots.erase(action.slot);
        break;
      case ActionKind::kOutput: {
        std::vector<BufferPtr> out = Run(programs_.output_vjp, {&current, &z, &data_}, report);
        result.value = out[0];
        const size_t num_d = out.size() - 1 - static_cast<size_t>(num_z_);
        cotangent.assign(out.begin() + 1, out.begin() + 1 + static_cast<long>(num_d));
        z_acc.assign(out.begin() + 1 + static_cast<long>(num_d), out.end());
        AwaitAll(z_acc);
        report.seconds_forward = SecondsSince(start);
        break;
      }
      case ActionKind::kReverse: {
        std::vector<BufferPtr> index = {StepIndex(action.step)};
        const ExecutablePtr& program =
            action.count == 1 ? programs_.step_vjp : programs_.segment_vjp.at(action.count);
        std::vector<BufferPtr> out = Run(program, {&current, &z, &data_, &index, &cotangent, &z_acc}, report);
        cotangent.assign(out.begin(), out.begin() + static_cast<long>(cotangent.size()));
        z_acc.assign(out.begin() + static_cast<long>(cotangent.size()), out.end());
        report.reversed_steps += action.count;
        if (options.check_finite) check_finite(action.step);
        break;
      }
    }
  }
  result.grad = Run(programs_.init_vjp, {&z, &data_, &cotangent, &z_acc}, report);
  AwaitAll(result.grad);
  result.value->Await();
  report.peak_saved_bytes = report.peak_saved_states * report.state_bytes;
  report.seconds_total = SecondsSince(start);
  report.seconds_reverse = report.seconds_total - report.seconds_forward;
  return result;
}

}  // namespace metagrad
