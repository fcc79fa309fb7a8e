#include "runtime/task_runner.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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

int64_t TotalBytes(const std::vector<BufferPtr>& buffers) {
  int64_t total = 0;
  for (const auto& buffer : buffers) total += static_cast<int64_t>(buffer->spec().num_bytes());
  return total;
}

std::vector<BufferPtr> CopyAll(const std::vector<BufferPtr>& buffers, const std::string& kind) {
  std::vector<BufferPtr> copies;
  for (const auto& buffer : buffers) copies.push_back(buffer->CopyToMemory(kind));
  return copies;
}

// A flag every device computed the same (replicated): partition 0's copy.
bool ReadFlag(const std::vector<BufferPtr>& flag) {
  bool value = false;
  flag[0]->ToHost(&value, sizeof(value));
  return value;
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

float HalfToFloat(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  if (exponent == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(static_cast<float>(mantissa), -24);
  if (exponent == 31) return mantissa ? NAN : (sign ? -INFINITY : INFINITY);
  const uint32_t bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

double Element(const char* data, size_t i, PJRT_Buffer_Type type) {
  switch (type) {
    case PJRT_Buffer_Type_F32: { float v; std::memcpy(&v, data + 4 * i, 4); return v; }
    case PJRT_Buffer_Type_F64: { double v; std::memcpy(&v, data + 8 * i, 8); return v; }
    case PJRT_Buffer_Type_BF16: {
      uint16_t h; std::memcpy(&h, data + 2 * i, 2);
      const uint32_t bits = static_cast<uint32_t>(h) << 16;
      float v; std::memcpy(&v, &bits, 4); return v;
    }
    case PJRT_Buffer_Type_F16: { uint16_t h; std::memcpy(&h, data + 2 * i, 2); return HalfToFloat(h); }
    default: return 0;
  }
}

// Two computations of the same state by different programs agree to
// rounding: per floating leaf max|a - b| <= rtol * max|b| with rtol far above
// the rounding of a few steps (fused programs round differently from single
// steps) and far below what a step with per-program constants (numpy
// randomness baked in at trace time) produces. Other leaves must be equal.
bool AgreeToRounding(const std::string& a, const std::string& b, const ArraySpec& spec) {
  if (!DTypeOf(spec.type).floating) return a == b;
  const double eps = spec.type == PJRT_Buffer_Type_BF16 ? 7.8e-3 : spec.type == PJRT_Buffer_Type_F16 ? 9.8e-4 : 1.2e-7;
  const double rtol = std::max(1e-3, 16 * eps);
  double diff = 0, scale = 0;
  for (size_t i = 0, n = spec.num_elements(); i < n; ++i) {
    const double x = Element(a.data(), i, spec.type), y = Element(b.data(), i, spec.type);
    if (std::isnan(x) != std::isnan(y)) return false;
    if (!std::isnan(x)) diff = std::max(diff, std::fabs(x - y));
    if (std::isfinite(y)) scale = std::max(scale, std::fabs(y));
  }
  return diff <= rtol * scale;
}

std::string StepRange(int64_t from, int64_t to) {
  return to - from == 1 ? "step " + std::to_string(from) : "steps " + std::to_string(from) + ".." + std::to_string(to - 1);
}

// One call's use of a task's stream: prefetches the batches of `order` while
// the call runs and, however the call ends, stops and reports what it streamed.
class StreamCall {
 public:
  StreamCall(BatchStream* stream, std::vector<std::pair<int64_t, int64_t>> order, RunReport& report)
      : stream_(stream), report_(report) {
    if (stream_ != nullptr) stream_->Begin(std::move(order), kPrefetchDepth);
  }
  ~StreamCall() {
    if (stream_ == nullptr) return;
    const StreamStats stats = stream_->End();
    report_.streamed_bytes = stats.bytes;
    report_.seconds_waiting_for_data = stats.seconds_waited;
    report_.prefetch_misses = stats.misses;
  }
  StreamCall(const StreamCall&) = delete;
  StreamCall& operator=(const StreamCall&) = delete;

 private:
  BatchStream* stream_;
  RunReport& report_;
};

// The (first step, count) of every forward and reverse execution of a plan,
// in the order a run executes them: the order its streamed batches are taken.
class BatchOrder : public PlanExecutor {
 public:
  std::vector<std::pair<int64_t, int64_t>> order;
  void Init() override {}
  void Forward(const std::string&, int64_t step, int64_t count) override { order.emplace_back(step, count); }
  void Save(int, bool) override {}
  void Restore(int, bool) override {}
  void Free(int, bool) override {}
  void Output() override {}
  void Reverse(const std::string&, int64_t step, int64_t count) override { order.emplace_back(step, count); }
  void Finish() override {}
};

}  // namespace

TaskRunner::TaskRunner(TaskPrograms programs, TaskLayout layout, int64_t steps, std::vector<BufferPtr> data,
                       std::shared_ptr<BatchStream> stream)
    : programs_(std::move(programs)),
      layout_(std::move(layout)),
      steps_(steps),
      data_(std::move(data)),
      stream_(std::move(stream)) {
  if (steps_ < 1 || steps_ > INT32_MAX) {
    throw InvalidArgument("a task needs 1 to 2^31-1 steps (the step index is an int32), got " +
                          std::to_string(steps_));
  }
  for (const std::string& name : programs_.Missing("run")) {
    throw InvalidArgument("the task's " + name + " program is required");
  }
  if (layout_.differentiable.size() != layout_.state.size()) {
    throw InvalidArgument("the layout needs one differentiable flag per state leaf");
  }
  const std::vector<int>& devices = programs_.Find("step")->devices();
  if (static_cast<int64_t>(devices.size()) != layout_.devices) {
    throw InvalidArgument("the layout is sharded over " + std::to_string(layout_.devices) +
                          " device(s), the step program runs on " + std::to_string(devices.size()));
  }
  for (const auto& [name, program] : programs_.all()) {
    if (program != nullptr && program->devices() != devices) {
      throw InvalidArgument("the task's programs must all run on the same devices (" + name + " does not)");
    }
  }
  if (stream_ != nullptr) {
    if (stream_->steps() != steps_) {
      throw InvalidArgument("the streamed batches cover " + std::to_string(stream_->steps()) + " steps, the task has " +
                            std::to_string(steps_));
    }
    if (!(stream_->BatchSpecs() == layout_.batch)) {
      throw InvalidArgument("the streamed batches do not have the shapes the task's programs were compiled for");
    }
  } else if (!layout_.batch.empty()) {
    throw InvalidArgument("the task's programs take streamed batches: the runner needs their stream");
  }
  advance_lengths_ = programs_.Lengths("advance");
}

class TaskRunner::Call {
 public:
  Call(TaskRunner& runner, const Monitor& monitor) : runner_(runner), lock_(runner.mutex_) {
    runner_.monitor_ = monitor ? &monitor : nullptr;
    runner_.last_check_ = {};
  }
  ~Call() { runner_.monitor_ = nullptr; }
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;

 private:
  TaskRunner& runner_;
  std::lock_guard<std::recursive_mutex> lock_;
};

const std::vector<BufferPtr>& TaskRunner::StepIndex(int64_t t) {
  if (step_indices_.empty()) step_indices_.resize(static_cast<size_t>(steps_));
  std::vector<BufferPtr>& slot = step_indices_[static_cast<size_t>(t)];
  if (slot.empty()) {
    const int32_t value = static_cast<int32_t>(t);
    const ExecutablePtr step = programs_.Find("step");
    for (int device : step->devices()) {
      slot.push_back(step->client()->BufferFromHost(&value, ArraySpec{{}, PJRT_Buffer_Type_S32}, {}, device));
    }
  }
  return slot;
}

std::vector<BufferPtr> TaskRunner::StepInputs(int64_t t, int64_t count) {
  if (stream_ == nullptr) return StepIndex(t);
  std::vector<BufferPtr> inputs;
  try {
    inputs = stream_->Take(t, count);
  } catch (const StreamError& error) {
    throw CheckFailed(error.what(), t);
  }
  const std::vector<BufferPtr>& index = StepIndex(t);
  inputs.insert(inputs.end(), index.begin(), index.end());
  return inputs;
}

int64_t TaskRunner::StreamBytes() const {
  if (stream_ == nullptr) return 0;
  int64_t longest = 1;
  for (const char* kind : {"advance", "segment_vjp"}) {
    for (int64_t n : programs_.Lengths(kind)) longest = std::max(longest, n);
  }
  return (kPrefetchDepth + 1) * stream_->BatchBytes(longest);
}

int64_t TaskRunner::DeviceBytes(const std::vector<BufferPtr>& buffers) const {
  return TotalBytes(buffers) / layout_.devices;
}

int64_t TaskRunner::ExecutionBytes(const ExecutablePtr& program) {
  auto found = execution_bytes_.find(program.get());
  if (found != execution_bytes_.end()) return found->second;
  int64_t bytes = 0;
  try {
    const MemoryStats stats = program->CompiledMemoryStats();
    bytes = std::max<int64_t>(0, stats.output_bytes - stats.alias_bytes) + stats.temp_bytes;
  } catch (const PjrtError&) {
    // A plugin without memory statistics: count the outputs alone.
    for (const ArraySpec& spec : program->outputs()) bytes += static_cast<int64_t>(spec.num_bytes());
  }
  execution_bytes_[program.get()] = bytes;
  return bytes;
}

std::vector<BufferPtr> TaskRunner::Run(const ExecutablePtr& program,
                                       const std::vector<const std::vector<BufferPtr>*>& groups,
                                       RunReport& report) {
  if (monitor_ != nullptr) {
    const auto now = Clock::now();
    if (now - last_check_ >= std::chrono::milliseconds(50)) {
      last_check_ = now;
      (*monitor_)(report.forward_steps + report.reversed_steps, monitor_total_);
    }
  }
  std::vector<Buffer*> args;
  for (const auto* group : groups) {
    for (const auto& buffer : *group) args.push_back(buffer.get());
  }
  ++report.executions;
  return program->Execute(args);
}

std::vector<BufferPtr> TaskRunner::Apply(const std::vector<BufferPtr>& state, const std::vector<BufferPtr>& z,
                                         std::pair<int64_t, int64_t> chunk, RunReport& report) {
  const std::vector<BufferPtr> inputs = StepInputs(chunk.first, chunk.second);
  return Run(programs_.Sized("advance", chunk.second), {&state, &z, &data_, &inputs}, report);
}

void TaskRunner::CheckZ(const std::vector<BufferPtr>& z) const {
  if (z.size() != layout_.z.size() * static_cast<size_t>(layout_.devices)) {
    throw InvalidArgument("z has " + std::to_string(z.size()) + " buffers, the task was compiled for " +
                          std::to_string(layout_.z.size()) + " leaves" +
                          (layout_.devices > 1 ? " of " + std::to_string(layout_.devices) + " shards each" : ""));
  }
}

std::vector<BufferPtr> TaskRunner::Train(const std::vector<BufferPtr>& z, RunReport* report,
                                         const Monitor& monitor) {
  const Call call(*this, monitor);
  CheckZ(z);
  RunReport local;
  RunReport& r = report ? *report : local;
  const auto start = Clock::now();
  monitor_total_ = steps_;
  std::vector<BufferPtr> state = Run(programs_.Find("init"), {&z, &data_}, r);
  const std::vector<std::pair<int64_t, int64_t>> chunks = ForwardChunks(0, steps_, advance_lengths_);
  const StreamCall streaming(stream_.get(), chunks, r);
  for (const auto& chunk : chunks) {
    state = Apply(state, z, chunk, r);
    r.forward_steps += chunk.second;
  }
  AwaitAll(state);
  r.steps = steps_;
  r.devices = layout_.devices;
  r.state_bytes = layout_.state_bytes();
  r.seconds_forward = r.seconds_total = SecondsSince(start);
  return state;
}

// One metagradient run: the work of each action of the plan, on device
// buffers (saved states of host slots copied to host memory and back), with
// the optional checks; the walk (plan_walk.h) checks the plan and counts the
// bytes. Values are flat leaf-major lists of shards.
class Traversal : public PlanExecutor {
 public:
  Traversal(TaskRunner& runner, const std::vector<BufferPtr>& z, const MetagradientOptions& options,
            TaskRunner::Result& result, const Plan& plan)
      : r_(runner),
        z_(z),
        options_(options),
        result_(result),
        report_(result.report),
        shards_(static_cast<size_t>(runner.layout_.devices)),
        spot_check_(options.determinism_stride > 0 ? -1 : SpotCheckPosition(plan, runner.advance_lengths_)) {}

  void Init() override {
    start_ = Clock::now();
    current_ = r_.Run(r_.programs_.Find("init"), {&z_, &r_.data_}, report_);
    if (options_.determinism_stride > 0) {
      CheckFusedAgainstSingle();
      references_[0] = HostCopy(current_);
    }
  }

  void Forward(const std::string& program, int64_t step, int64_t count) override {
    std::vector<BufferPtr> before = std::move(current_);
    const std::vector<BufferPtr> inputs = r_.StepInputs(step, count);
    current_ = r_.Run(r_.programs_.Find(program), {&before, &z_, &r_.data_, &inputs}, report_);
    position_ = step + count;
    if (!replaying_) first_pass_chunk_start_[position_] = step;
    exact_ = exact_ && first_pass_chunk_start_.count(position_) && first_pass_chunk_start_[position_] == step;
    report_.forward_steps += count;
    if (options_.check_finite && !replaying_) CheckStateFinite(before, {step, count});
    if (options_.determinism_stride > 0 ? position_ % options_.determinism_stride == 0 : position_ == spot_check_) {
      CheckDeterminism();
      if (replaying_) spot_check_ = -1;  // once: later replays through it cost a host copy each
    }
  }

  // A save into a host slot copies the state out (asynchronously: later work
  // on the device does not wait for it); the current state stays on the device.
  void Save(int slot, bool on_host) override {
    slots_[slot] = {position_, on_host ? CopyAll(current_, options_.host_memory_kind) : current_, exact_, on_host};
  }

  void Restore(int slot_number, bool) override {
    const Slot& slot = slots_.at(slot_number);
    position_ = slot.position;
    exact_ = slot.exact;
    // Programs take device buffers: a host slot's state comes back as a fresh
    // copy, which the next execution waits for.
    current_ = slot.on_host ? CopyAll(slot.state, "device") : slot.state;
    replay_origin_ = position_;
    replaying_ = true;
  }

  void Free(int slot, bool) override { slots_.erase(slot); }

  void Output() override {
    std::vector<BufferPtr> out = r_.Run(r_.programs_.Find("output_vjp"), {&current_, &z_, &r_.data_}, report_);
    result_.value = out[0];  // phi is replicated: partition 0's copy
    const long first = static_cast<long>(shards_);
    const long num_d = static_cast<long>(out.size() - shards_ - r_.layout_.z.size() * shards_);
    cotangent_.assign(out.begin() + first, out.begin() + first + num_d);
    z_acc_.assign(out.begin() + first + num_d, out.end());
    AwaitAll(z_acc_);
    report_.seconds_forward = SecondsSince(start_);
    if (options_.check_finite) CheckCotangentFinite(r_.steps_, "the output phi (or its gradient)");
  }

  void Reverse(const std::string& program, int64_t step, int64_t count) override {
    const std::vector<BufferPtr> inputs = r_.StepInputs(step, count);
    std::vector<BufferPtr> out =
        r_.Run(r_.programs_.Find(program), {&current_, &z_, &r_.data_, &inputs, &cotangent_, &z_acc_}, report_);
    cotangent_.assign(out.begin(), out.begin() + static_cast<long>(cotangent_.size()));
    z_acc_.assign(out.begin() + static_cast<long>(cotangent_.size()), out.end());
    report_.reversed_steps += count;
    if (options_.check_finite) CheckCotangentFinite(step, "reversing " + StepRange(step, step + count));
  }

  void Finish() override {
    result_.grad = r_.Run(r_.programs_.Find("init_vjp"), {&z_, &r_.data_, &cotangent_, &z_acc_}, report_);
    AwaitAll(result_.grad);
    result_.value->Await();
    report_.seconds_total = SecondsSince(start_);
    report_.seconds_reverse = report_.seconds_total - report_.seconds_forward;
  }

 private:
  struct Slot {
    int64_t position;
    std::vector<BufferPtr> state;
    bool exact;  // computed by the same programs from the same states as the first pass
    bool on_host;
  };

  bool Finite(const char* program, const std::vector<const std::vector<BufferPtr>*>& groups) {
    return ReadFlag(r_.Run(r_.programs_.Find(program), groups, report_));
  }
  // The first pass's state after `chunk`; on NaN/Inf, single steps from the
  // chunk's (still held) input name the first step that produced it.
  void CheckStateFinite(const std::vector<BufferPtr>& before, std::pair<int64_t, int64_t> chunk) {
    if (Finite("state_finite", {&current_})) return;
    std::vector<BufferPtr> state = before;
    for (int64_t t = chunk.first; t < chunk.first + chunk.second; ++t) {
      state = r_.Apply(state, z_, {t, 1}, report_);
      if (!Finite("state_finite", {&state})) {
        throw CheckFailed("training diverged: the state after step " + std::to_string(t) +
                              " holds NaN or Inf (the first forward step that does). Lower the learning rate, "
                              "clip, or check the data and z.",
                          t);
      }
    }
    throw CheckFailed("training diverged: the state after " + StepRange(chunk.first, chunk.first + chunk.second) +
                          " holds NaN or Inf in the fused program, but not when the steps run one by one",
                      chunk.first);
  }

  void CheckCotangentFinite(int64_t step, const std::string& where) {
    if (Finite("all_finite", {&cotangent_, &z_acc_})) return;
    throw CheckFailed("the cotangent after " + where +
                          " holds NaN or Inf while the forward pass was finite: the reverse of a step overflows "
                          "there (lower the learning rate, clip, or use a smoother output)",
                      step);
  }

  // Every fused forward program against the same steps run one by one, once,
  // from state_0: a step that is not a pure function of its inputs (numpy
  // randomness or Python state read at trace time) bakes different constants
  // into each compiled program and shows up here.
  void CheckFusedAgainstSingle() {
    for (int64_t n : r_.programs_.Lengths("advance")) {
      if (n > r_.steps_) continue;
      std::vector<BufferPtr> single = current_;
      for (int64_t t = 0; t < n; ++t) single = r_.Apply(single, z_, {t, 1}, report_);
      const std::vector<BufferPtr> fused = r_.Apply(current_, z_, {0, n}, report_);
      const auto a = HostCopy(fused), b = HostCopy(single);
      ++report_.determinism_checks;
      for (size_t i = 0; i < a.size(); ++i) {
        if (!AgreeToRounding(a[i], b[i], r_.layout_.state[i / shards_])) {
          throw CheckFailed("training is not deterministic: the fused program for steps 0.." + std::to_string(n - 1) +
                                " and the same steps run one by one disagree beyond rounding (state leaf " +
                                std::to_string(i / shards_) + "). Each compiled program computes something different, as "
                                "when a step reads numpy randomness or Python state while it is traced: derive "
                                "randomness from t (jax.random.fold_in(key, t)) and read only its arguments.",
                            0);
        }
      }
    }
  }

  // Without a determinism check asked for, every run still compares one state:
  // the first that a replay recomputes where the first pass ended a chunk (two
  // copies of one state to the host). A step that is not a pure function of
  // its inputs rarely agrees there; the thorough check compares every state.
  // Returns -1 for a plan without replays.
  static int64_t SpotCheckPosition(const Plan& plan, const std::vector<int64_t>& fused) {
    std::unordered_map<int64_t, bool> first_pass;  // chunk ends before the first restore
    bool replaying = false;
    for (const Action& a : plan) {
      replaying = replaying || a.kind == ActionKind::kRestore;
      if (a.kind != ActionKind::kAdvance) continue;
      for (const auto& [t, n] : ForwardChunks(a.step, a.count, fused)) {
        if (!replaying) {
          first_pass[t + n] = true;
        } else if (first_pass.count(t + n)) {
          return t + n;
        }
      }
    }
    return -1;
  }

  // First pass: record the state. Replays: compare. A replay that reached
  // this position through the same programs from the same states as the first
  // pass must agree bit for bit when every state is checked; the spot check,
  // and one that got here through other programs (single steps where the first
  // pass ran a fused chunk), must agree to rounding (a GPU's reductions need
  // not repeat bit for bit).
  void CheckDeterminism() {
    if (!replaying_) {
      references_[position_] = HostCopy(current_);
      return;
    }
    auto found = references_.find(position_);
    if (found == references_.end()) return;
    ++report_.determinism_checks;
    const auto copy = HostCopy(current_);
    if (copy == found->second) {
      exact_ = true;
      return;
    }
    bool close = true;
    for (size_t i = 0; i < copy.size() && close; ++i) {
      close = AgreeToRounding(copy[i], found->second[i], r_.layout_.state[i / shards_]);
    }
    if ((exact_ && options_.determinism_stride > 0) || !close) {
      throw CheckFailed("training is not deterministic: replaying " + StepRange(replay_origin_, position_) +
                            " (from the state saved at step " + std::to_string(replay_origin_) +
                            ") gave a state that differs from the first pass" +
                            (close ? " though the same programs ran" : " beyond rounding") +
                            ". Steps must be pure functions of (state, z, data, t): derive randomness and batch "
                            "order from t.",
                        position_ - 1);
    }
    exact_ = false;
  }

  TaskRunner& r_;
  const std::vector<BufferPtr>& z_;
  const MetagradientOptions options_;
  TaskRunner::Result& result_;
  RunReport& report_;
  const size_t shards_;  // per leaf: the task's devices
  int64_t spot_check_;  // the position the spot check compares (-1: none, or done)
  Clock::time_point start_;

  std::vector<BufferPtr> current_;
  int64_t position_ = 0;
  bool exact_ = true;
  bool replaying_ = false;
  int64_t replay_origin_ = 0;
  std::unordered_map<int, Slot> slots_;
  std::vector<BufferPtr> cotangent_;  // dS[D]
  std::vector<BufferPtr> z_acc_;
  std::unordered_map<int64_t, int64_t> first_pass_chunk_start_;  // end position -> start of its first-pass chunk
  std::unordered_map<int64_t, std::vector<std::string>> references_;
};

void TaskRunner::RequirePrograms(const std::string& needed_by) const {
  std::string missing;
  for (const std::string& name : programs_.Missing(needed_by)) missing += (missing.empty() ? "" : ", ") + name;
  if (!missing.empty()) {
    throw InvalidArgument(needed_by + " needs programs the task was compiled without: " + missing);
  }
}

CostTable TaskRunner::BytesTable() {
  CostTable table;
  table.state_bytes = layout_.state_bytes();
  table.cotangent_bytes = layout_.cotangent_bytes();
  table.programs = ProgramBytes();
  return table;
}

TaskRunner::Result TaskRunner::Metagradient(const std::vector<BufferPtr>& z, const Plan& plan,
                                            const MetagradientOptions& options, const Monitor& monitor) {
  const Call call(*this, monitor);
  CheckZ(z);
  RequirePrograms("metagradient");
  if (options.check_finite) RequirePrograms("check_finite");
  if (options.determinism_stride < 0) {
    throw InvalidArgument("determinism_stride must be >= 0, got " + std::to_string(options.determinism_stride));
  }
  const CostTable bytes = BytesTable();
  for (const Action& action : plan) {  // every fused reverse the plan needs, before any device work
    if (action.kind == ActionKind::kReverse && action.count > 1) programs_.Sized("segment_vjp", action.count);
  }
  Result result;
  RunReport& report = result.report;
  report.steps = steps_;
  report.devices = layout_.devices;
  report.state_bytes = layout_.state_bytes();
  report.data_bytes = DeviceBytes(data_) + DeviceBytes(z) + StreamBytes();
  monitor_total_ = 0;
  for (const Action& action : plan) {
    if (action.kind == ActionKind::kAdvance || action.kind == ActionKind::kReverse) monitor_total_ += action.count;
  }
  BatchOrder batches;
  if (stream_ != nullptr) {
    if (options.determinism_stride > 0) {  // Traversal::CheckFusedAgainstSingle runs first
      for (int64_t n : advance_lengths_) {
        if (n > steps_) continue;
        for (int64_t t = 0; t < n; ++t) batches.order.emplace_back(t, 1);
        batches.order.emplace_back(0, n);
      }
    }
    WalkPlan(plan, steps_, &bytes, options.host_slots, &batches);
  }
  PlanWalk walk;
  {
    const StreamCall streaming(stream_.get(), std::move(batches.order), report);
    Traversal traversal(*this, z, options, result, plan);
    walk = WalkPlan(plan, steps_, &bytes, options.host_slots, &traversal);
  }
  report.peak_saved_states = walk.stats.peak_saved;
  report.peak_saved_bytes = walk.stats.peak_saved * report.state_bytes;
  report.peak_device_bytes = walk.cost.peak_bytes;
  report.peak_host_bytes = walk.cost.peak_host_bytes;
  report.host_saved_states = walk.cost.host_saves;
  report.bytes_to_host = walk.cost.bytes_to_host;
  report.bytes_from_host = walk.cost.bytes_from_host;
  return result;
}

namespace {

// Calibration. A chain of a few executions of a short program (the digits
// MLP's step: 0.4 ms) lasts less than the noise of a thread-pool wake-up, and
// timing each program for all its repeats before the next lets the machine's
// load drift between programs: both made the ratios between programs, which
// decide the plan, vary 1.5x from one calibration to the next. So each sample
// is a chain of at least kSampleSeconds, and the repeats run in rounds that
// time every program once.
constexpr double kSampleSeconds = 0.02;
constexpr int kMinChain = 2;
constexpr int kMaxChain = 256;

// Seconds per execution of `run`, which enqueues one execution that feeds on
// the previous one's outputs (as in a run: dispatch overlaps compute) and
// returns its outputs. The first execution of each sample, the first after
// another program, is not timed: with it the wide MLP's step calibrated 20-30%
// above what the long chains of a run pay. The first (warm-up) sample sets the
// chain's length.
class ChainTimer {
 public:
  explicit ChainTimer(std::function<std::vector<BufferPtr>()> run) : run_(std::move(run)) {}

  double operator()() {
    AwaitAll(run_());
    const auto start = Clock::now();
    std::vector<BufferPtr> last;
    for (int i = 0; i < length_; ++i) last = run_();
    AwaitAll(last);
    const double seconds = SecondsSince(start) / length_;
    if (!sized_) {
      const double wanted = std::ceil(kSampleSeconds / std::max(seconds, 1e-9));
      length_ = static_cast<int>(std::clamp(wanted, static_cast<double>(kMinChain), static_cast<double>(kMaxChain)));
      sized_ = true;
    }
    return seconds;
  }

 private:
  std::function<std::vector<BufferPtr>()> run_;
  int length_ = kMinChain;
  bool sized_ = false;
};

double Median(std::vector<double> samples) {
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

}  // namespace

std::map<std::string, ProgramCost> TaskRunner::ProgramBytes() {
  const std::lock_guard<std::recursive_mutex> lock(mutex_);
  std::map<std::string, ProgramCost> costs;
  for (const auto& [name, program] : programs_.all()) {
    if (program != nullptr) costs[name].bytes = ExecutionBytes(program);
  }
  return costs;
}

std::map<std::string, ProgramCost> TaskRunner::Calibrate(const std::vector<BufferPtr>& z, int repeats,
                                                         const std::string& host_memory_kind,
                                                         const Monitor& monitor) {
  const Call call(*this, monitor);
  CheckZ(z);
  if (repeats < 1) throw InvalidArgument("repeats must be >= 1");
  RequirePrograms("metagradient");
  std::map<std::string, ProgramCost> costs = ProgramBytes();
  RunReport report;
  // Each sampler returns one sample of seconds per execution; states, cotangents
  // and accumulators chain through them as in a run (their values do not change
  // what a program costs).
  std::vector<std::pair<std::string, std::function<double()>>> samplers;
  std::vector<BufferPtr> state = Run(programs_.Find("init"), {&z, &data_}, report);
  samplers.emplace_back("init", ChainTimer([&] { return state = Run(programs_.Find("init"), {&z, &data_}, report); }));
  // Programs of n steps run at every step position a run uses, in turn: each
  // position's index buffer, as in a run. Streamed batches are gathered once,
  // for two positions: a run prefetches them while programs run, so the
  // programs are timed alone.
  std::map<std::pair<int64_t, int64_t>, std::vector<BufferPtr>> streamed;
  auto cycle = [this, &streamed](int64_t n) {
    return [this, n, &streamed, t = int64_t{0}]() mutable -> const std::vector<BufferPtr>& {
      const int64_t positions = std::max<int64_t>(1, steps_ - n + 1);
      if (stream_ == nullptr) {
        t = (t + n) % positions;
        return StepIndex(t);
      }
      t = t == 0 ? std::min(n, positions - 1) : 0;
      std::vector<BufferPtr>& inputs = streamed[{t, n}];
      if (inputs.empty()) inputs = StepInputs(t, n);
      return inputs;
    };
  };
  auto forward = [&](const ExecutablePtr& program, int64_t n) {
    return ChainTimer([&, program, position = cycle(n)]() mutable {
      return state = Run(program, {&state, &z, &data_, &position()}, report);
    });
  };
  samplers.emplace_back("step", forward(programs_.Find("step"), 1));
  for (int64_t n : advance_lengths_) samplers.emplace_back(SizedProgram("advance", n), forward(programs_.Sized("advance", n), n));
  if (stream_ != nullptr) {
    // One step's batch, gathered and copied as the prefetch does, at every step in turn.
    costs["stream"].bytes = stream_->BatchBytes(1);
    samplers.emplace_back("stream", ChainTimer([this, t = int64_t{0}]() mutable {
      t = (t + 1) % steps_;
      return StepInputs(t, 1);
    }));
  }
  std::vector<BufferPtr> host;
  if (!host_memory_kind.empty()) {
    // One state's copy each way, timed alone (the copies are asynchronous).
    host = CopyAll(state, host_memory_kind);
    AwaitAll(host);
    samplers.emplace_back("to_host", [&] {
      const auto start = Clock::now();
      AwaitAll(CopyAll(state, host_memory_kind));
      return SecondsSince(start);
    });
    samplers.emplace_back("from_host", [&] {
      const auto start = Clock::now();
      AwaitAll(CopyAll(host, "device"));
      return SecondsSince(start);
    });
  }
  std::vector<BufferPtr> cotangent, accumulators;
  const long num_z = static_cast<long>(layout_.z.size()) * layout_.devices;
  const long num_phi = static_cast<long>(layout_.devices);
  auto output = [&] {
    std::vector<BufferPtr> out = Run(programs_.Find("output_vjp"), {&state, &z, &data_}, report);
    cotangent.assign(out.begin() + num_phi, out.end() - num_z);
    accumulators.assign(out.end() - num_z, out.end());
    return out;
  };
  AwaitAll(output());
  samplers.emplace_back("output_vjp", ChainTimer(output));
  // Reverses donate their cotangents: chain them, as a traversal does.
  auto reverse = [&](const ExecutablePtr& program, int64_t n) {
    return ChainTimer([&, program, position = cycle(n)]() mutable {
      std::vector<BufferPtr> out =
          Run(program, {&state, &z, &data_, &position(), &cotangent, &accumulators}, report);
      cotangent.assign(out.begin(), out.begin() + static_cast<long>(cotangent.size()));
      accumulators.assign(out.begin() + static_cast<long>(cotangent.size()), out.end());
      return out;
    });
  };
  samplers.emplace_back("step_vjp", reverse(programs_.Find("step_vjp"), 1));
  for (int64_t n : programs_.Lengths("segment_vjp")) {
    samplers.emplace_back(SizedProgram("segment_vjp", n), reverse(programs_.Sized("segment_vjp", n), n));
  }
  // init_vjp consumes the cotangents output_vjp makes: time it alone.
  samplers.emplace_back("init_vjp", [&] {
    AwaitAll(output());
    const auto start = Clock::now();
    AwaitAll(Run(programs_.Find("init_vjp"), {&z, &data_, &cotangent, &accumulators}, report));
    return SecondsSince(start);
  });
  std::map<std::string, std::vector<double>> samples;
  for (int round = 0; round <= repeats; ++round) {
    for (auto& [name, sample] : samplers) {
      const double seconds = sample();
      if (round > 0) samples[name].push_back(seconds);
    }
  }
  for (auto& [name, timed] : samples) costs[name].seconds = Median(std::move(timed));
  return costs;
}

}  // namespace metagrad
