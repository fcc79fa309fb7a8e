#include "runtime/programs.h"

#include <algorithm>
#include <cstring>

namespace metagrad {

const std::vector<ProgramKind>& ProgramKinds() {
  static const std::vector<ProgramKind> kinds = {
      // name           sized  inputs     donated outputs reverse_of one_step   needed_by
      {"init",          false, "ZX",     "",     "S",    "",        "",         "run"},
      {"step",          false, "SZXBt",  "",     "S",    "",        "",         "run"},
      {"advance",       true,  "SZXBt",  "",     "S",    "",        "step",     ""},
      {"output",        false, "SZX",    "",     "p",    "",        "",         ""},
      {"output_vjp",    false, "SZX",    "",     "pDA",  "output",  "",         "metagradient"},
      {"step_vjp",      false, "SZXBtDA", "DA",  "DA",   "step",    "",         "metagradient"},
      {"segment_vjp",   true,  "SZXBtDA", "DA",  "DA",   "step",    "step_vjp", ""},
      {"init_vjp",      false, "ZXDA",   "DA",   "A",    "init",    "",         "metagradient"},
      {"all_finite",    false, "DA",     "",     "f",    "",        "",         "check_finite"},
      {"state_finite",  false, "S",      "",     "f",    "",        "",         "check_finite"},
  };
  return kinds;
}

namespace {

std::string KnownPrograms() {
  std::string known;
  for (const ProgramKind& kind : ProgramKinds()) {
    known += std::string(known.empty() ? "" : ", ") + kind.name + (kind.sized ? "_<n>" : "");
  }
  return known;
}

}  // namespace

const ProgramKind& KindNamed(const std::string& kind) {
  for (const ProgramKind& k : ProgramKinds()) {
    if (kind == k.name) return k;
  }
  throw InvalidArgument("'" + kind + "' is not a kind of program (known: " + KnownPrograms() + ")");
}

ProgramName ParseProgramName(const std::string& name) {
  for (const ProgramKind& kind : ProgramKinds()) {
    if (!kind.sized) {
      if (name == kind.name) return {&kind, 0};
      continue;
    }
    const std::string prefix = std::string(kind.name) + "_";
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string digits = name.substr(prefix.size());
    if (digits.empty() || digits.size() > 9 || digits.find_first_not_of("0123456789") != std::string::npos ||
        digits[0] == '0') {
      break;
    }
    return {&kind, std::stoll(digits)};
  }
  throw InvalidArgument("'" + name + "' is not a program of a task (known: " + KnownPrograms() + ")");
}

std::string SizedProgram(const std::string& kind, int64_t count) {
  const ProgramKind& k = KindNamed(kind);
  if (!k.sized) throw InvalidArgument("'" + kind + "' is not a sized kind of program");
  if (count < 1) throw InvalidArgument("a program runs at least one step, got " + std::to_string(count));
  return count == 1 ? std::string(k.one_step) : kind + "_" + std::to_string(count);
}

std::vector<ArraySpec> TaskLayout::Group(char group) const {
  switch (group) {
    case 'S': return state;
    case 'Z': return z;
    case 'X': return data;
    case 'B': return batch;
    case 't': return {ArraySpec{{}, PJRT_Buffer_Type_S32}};
    case 'A': return accumulators;
    case 'f': return {ArraySpec{{}, PJRT_Buffer_Type_PRED}};
    case 'p': return {phi};
    case 'D': {
      std::vector<ArraySpec> specs;
      for (size_t i = 0; i < state.size(); ++i) {
        if (!differentiable[i]) continue;
        ArraySpec spec = state[i];
        if (outputs > 0) spec.dims.insert(spec.dims.begin(), outputs);
        specs.push_back(std::move(spec));
      }
      return specs;
    }
  }
  throw InvalidArgument(std::string("unknown argument group '") + group + "'");
}

int64_t TaskLayout::state_bytes() const {
  int64_t total = 0;
  for (const ArraySpec& spec : state) total += static_cast<int64_t>(spec.num_bytes());
  return total;
}

int64_t TaskLayout::cotangent_bytes() const {
  int64_t total = 0;
  for (char group : {'D', 'A'}) {
    for (const ArraySpec& spec : Group(group)) total += static_cast<int64_t>(spec.num_bytes());
  }
  return total;
}

Signature ExpectedSignature(const std::string& name, const TaskLayout& layout) {
  const ProgramName parsed = ParseProgramName(name);
  const ProgramKind& kind = *parsed.kind;
  Signature signature;
  for (const char* group = kind.inputs; *group; ++group) {
    const bool donated = std::strchr(kind.donated, *group) != nullptr;
    for (ArraySpec& spec : layout.Group(*group)) {
      if (*group == 'B' && parsed.length > 1) spec.dims.insert(spec.dims.begin(), parsed.length);
      signature.inputs.push_back(std::move(spec));
      signature.donated.push_back(donated);
    }
  }
  for (const char* group = kind.outputs; *group; ++group) {
    for (ArraySpec& spec : layout.Group(*group)) signature.outputs.push_back(std::move(spec));
  }
  return signature;
}

TaskPrograms::TaskPrograms(std::map<std::string, ExecutablePtr> programs) : programs_(std::move(programs)) {
  for (const auto& [name, executable] : programs_) ParseProgramName(name);
}

ExecutablePtr TaskPrograms::Find(const std::string& name) const {
  auto found = programs_.find(name);
  return found == programs_.end() ? nullptr : found->second;
}

const ExecutablePtr& TaskPrograms::Sized(const std::string& kind, int64_t count) const {
  const std::string name = SizedProgram(kind, count);
  auto found = programs_.find(name);
  if (found != programs_.end() && found->second != nullptr) return found->second;
  std::string held;
  for (int64_t n : Lengths(kind)) held += " " + std::to_string(n);
  throw InvalidArgument("the task has no " + name + " (its " + kind + " lengths:" + (held.empty() ? " none" : held) +
                        ")");
}

std::vector<int64_t> TaskPrograms::Lengths(const std::string& kind) const {
  std::vector<int64_t> lengths;
  for (const auto& [name, executable] : programs_) {
    const ProgramName parsed = ParseProgramName(name);
    if (executable != nullptr && parsed.kind->name == kind) lengths.push_back(parsed.length);
  }
  std::sort(lengths.begin(), lengths.end());
  return lengths;
}

std::vector<std::string> TaskPrograms::Missing(const std::string& needed_by) const {
  std::vector<std::string> missing;
  for (const ProgramKind& kind : ProgramKinds()) {
    if (needed_by == kind.needed_by && Find(kind.name) == nullptr) missing.emplace_back(kind.name);
  }
  return missing;
}

}  // namespace metagrad
