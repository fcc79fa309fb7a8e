#include "runtime/programs.h"

#include <cstring>

namespace metagrad {

const std::vector<ProgramKind>& ProgramKinds() {
  static const std::vector<ProgramKind> kinds = {
      {"init", false, "ZX", "", "S"},
      {"step", false, "SZXt", "", "S"},
      {"advance", true, "SZXt", "", "S"},
      {"output", false, "SZX", "", "p"},
      {"output_vjp", false, "SZX", "", "pDA"},
      {"step_vjp", false, "SZXtDA", "DA", "DA"},
      {"segment_vjp", true, "SZXtDA", "DA", "DA"},
      {"init_vjp", false, "ZXDA", "DA", "A"},
      {"all_finite", false, "DA", "", "f"},
      {"state_finite", false, "S", "", "f"},
  };
  return kinds;
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
  std::string known;
  for (const ProgramKind& kind : ProgramKinds()) {
    known += std::string(known.empty() ? "" : ", ") + kind.name + (kind.sized ? "_<n>" : "");
  }
  throw InvalidArgument("'" + name + "' is not a program of a task (known: " + known + ")");
}

std::vector<ArraySpec> TaskLayout::Group(char group) const {
  switch (group) {
    case 'S': return state;
    case 'Z': return z;
    case 'X': return data;
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

Signature ExpectedSignature(const std::string& name, const TaskLayout& layout) {
  const ProgramKind& kind = *ParseProgramName(name).kind;
  Signature signature;
  for (const char* group = kind.inputs; *group; ++group) {
    const bool donated = std::strchr(kind.donated, *group) != nullptr;
    for (ArraySpec& spec : layout.Group(*group)) {
      signature.inputs.push_back(std::move(spec));
      signature.donated.push_back(donated);
    }
  }
  for (const char* group = kind.outputs; *group; ++group) {
    for (ArraySpec& spec : layout.Group(*group)) signature.outputs.push_back(std::move(spec));
  }
  return signature;
}

TaskPrograms TaskPrograms::FromNamed(const std::map<std::string, ExecutablePtr>& programs) {
  TaskPrograms p;
  for (const auto& [name, executable] : programs) {
    const ProgramName parsed = ParseProgramName(name);
    const std::string kind = parsed.kind->name;
    if (kind == "advance") {
      p.advance[parsed.length] = executable;
    } else if (kind == "segment_vjp") {
      p.segment_vjp[parsed.length] = executable;
    } else {
      ExecutablePtr* slot = kind == "init"         ? &p.init
                            : kind == "step"       ? &p.step
                            : kind == "output"     ? &p.output
                            : kind == "output_vjp" ? &p.output_vjp
                            : kind == "step_vjp"   ? &p.step_vjp
                            : kind == "init_vjp"   ? &p.init_vjp
                            : kind == "all_finite" ? &p.all_finite
                                                   : &p.state_finite;
      *slot = executable;
    }
  }
  return p;
}

}  // namespace metagrad
