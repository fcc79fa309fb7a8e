#include "bench/manifest.h"

#include <fstream>
#include <sstream>
#include <stdexcept>

#include "bench/json.h"

namespace metagrad::bench {

namespace {

constexpr int64_t kManifestVersion = 1;

std::vector<Leaf> ReadLeaves(const Json& manifest, const std::string& key) {
  std::vector<Leaf> leaves;
  const auto& entries = manifest.Get(key, "manifest").AsArray("manifest." + key);
  for (size_t i = 0; i < entries.size(); ++i) {
    const std::string what = "manifest." + key + "[" + std::to_string(i) + "]";
    const Json& entry = entries[i];
    Leaf leaf;
    leaf.path = entry.Get("path", what).AsString(what + ".path");
    for (const Json& d : entry.Get("shape", what).AsArray(what + ".shape")) {
      const int64_t dim = d.AsInt(what + ".shape[]");
      if (dim < 0) throw std::runtime_error(what + ".shape has a negative dimension");
      leaf.spec.dims.push_back(dim);
    }
    const std::string& dtype = entry.Get("dtype", what).AsString(what + ".dtype");
    try {
      leaf.spec.type = ParseDType(dtype);
    } catch (const std::exception&) {
      throw std::runtime_error(what + ".dtype '" + dtype + "' is not a supported dtype");
    }
    leaves.push_back(std::move(leaf));
  }
  return leaves;
}

std::vector<ArraySpec> Specs(const std::vector<Leaf>& leaves) {
  std::vector<ArraySpec> specs;
  for (const Leaf& leaf : leaves) specs.push_back(leaf.spec);
  return specs;
}

}  // namespace

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read '" + path + "'");
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (in.bad()) throw std::runtime_error("error while reading '" + path + "'");
  return bytes.str();
}

int64_t Manifest::state_bytes() const {
  int64_t total = 0;
  for (const Leaf& leaf : state) total += static_cast<int64_t>(leaf.spec.num_bytes());
  return total;
}

void Manifest::Signature(const std::string& name, std::vector<ArraySpec>* inputs,
                         std::vector<bool>* donated) const {
  auto found = programs.find(name);
  if (found != programs.end() && !found->second.inputs.empty()) {
    *inputs = found->second.inputs;
    *donated = found->second.donated;
    return;
  }
  const std::vector<ArraySpec> S = Specs(state), Z = Specs(z), X = Specs(data);
  std::vector<ArraySpec> D;
  for (size_t i = 0; i < state.size(); ++i) {
    if (differentiable[i]) D.push_back(state[i].spec);
  }
  const std::vector<ArraySpec> t = {ArraySpec{{}, PJRT_Buffer_Type_S32}};
  inputs->clear();
  donated->clear();
  auto add = [&](const std::vector<ArraySpec>& group, bool donate) {
    inputs->insert(inputs->end(), group.begin(), group.end());
    donated->insert(donated->end(), group.size(), donate);
  };
  if (name == "init") {
    add(Z, false), add(X, false);
  } else if (name == "step") {
    add(S, false), add(Z, false), add(X, false), add(t, false);
  } else if (name == "output" || name == "output_vjp") {
    add(S, false), add(Z, false), add(X, false);
  } else if (name == "step_vjp" || name.rfind("segment_vjp_", 0) == 0) {
    add(S, false), add(Z, false), add(X, false), add(t, false), add(D, true), add(Z, true);
  } else if (name == "init_vjp") {
    add(Z, false), add(X, false), add(D, true), add(Z, true);
  } else if (name == "all_finite") {
    add(D, false), add(Z, false);
  } else {
    throw std::runtime_error("program '" + name + "' is not one of lowering.py's programs");
  }
}

Manifest ReadManifest(const std::string& directory) {
  const std::string path = directory + "/manifest.json";
  const Json root = Json::Parse(ReadFile(path));
  root.AsObject("manifest");
  if (root.Get("format", "manifest").AsString("manifest.format") != "metagrad-task") {
    throw std::runtime_error(path + " is not a metagrad task manifest (format != \"metagrad-task\")");
  }
  const int64_t version = root.Get("version", "manifest").AsInt("manifest.version");
  if (version != kManifestVersion) {
    throw std::runtime_error(path + " has manifest version " + std::to_string(version) + ", this harness reads " +
                             std::to_string(kManifestVersion));
  }
  Manifest m;
  m.directory = directory;
  m.steps = root.Get("steps", "manifest").AsInt("manifest.steps");
  if (m.steps < 1) throw std::runtime_error("manifest.steps must be >= 1");
  m.backend = root.Get("backend", "manifest").AsString("manifest.backend");
  m.z = ReadLeaves(root, "z");
  m.data = ReadLeaves(root, "data");
  m.state = ReadLeaves(root, "state");
  for (const Json& flag : root.Get("differentiable", "manifest").AsArray("manifest.differentiable")) {
    m.differentiable.push_back(flag.AsBool("manifest.differentiable[]"));
  }
  if (m.differentiable.size() != m.state.size()) {
    throw std::runtime_error("manifest.differentiable has " + std::to_string(m.differentiable.size()) +
                             " flags for " + std::to_string(m.state.size()) + " state leaves");
  }
  if (const Json* versions = root.Find("versions")) {
    for (const auto& [key, value] : versions->AsObject("manifest.versions")) {
      if (value.type() == Json::Type::kString) m.versions[key] = value.AsString(key);
    }
  }
  for (const auto& [name, entry] : root.Get("programs", "manifest").AsObject("manifest.programs")) {
    const std::string what = "manifest.programs." + name;
    ProgramEntry program;
    program.file = entry.Get("file", what).AsString(what + ".file");
    if (program.file.empty() || program.file[0] == '/' || program.file.find("..") != std::string::npos) {
      throw std::runtime_error(what + ".file must be a path inside the task directory");
    }
    if (const Json* backend = entry.Find("backend")) program.backend = backend->AsString(what + ".backend");
    if (const Json* inputs = entry.Find("inputs")) {
      for (const Json& input : inputs->AsArray(what + ".inputs")) {
        ArraySpec spec;
        for (const Json& d : input.Get("shape", what + ".inputs[]").AsArray(what + ".inputs[].shape")) {
          spec.dims.push_back(d.AsInt(what + ".inputs[].shape[]"));
        }
        spec.type = ParseDType(input.Get("dtype", what + ".inputs[]").AsString(what + ".inputs[].dtype"));
        program.inputs.push_back(std::move(spec));
      }
      const Json* donated = entry.Find("donated");
      for (const Json& flag : donated ? donated->AsArray(what + ".donated") : std::vector<Json>{}) {
        program.donated.push_back(flag.AsBool(what + ".donated[]"));
      }
      if (program.donated.empty()) program.donated.assign(program.inputs.size(), false);
      if (program.donated.size() != program.inputs.size()) {
        throw std::runtime_error(what + ".donated must have one flag per input");
      }
    }
    m.programs[name] = std::move(program);
  }
  for (const char* required : {"init", "step"}) {
    if (m.programs.count(required) == 0) throw std::runtime_error(path + " lists no '" + required + "' program");
  }
  return m;
}

std::vector<std::string> ReadArrays(const Manifest& manifest, const std::string& prefix,
                                    const std::vector<Leaf>& leaves) {
  std::vector<std::string> arrays;
  for (size_t i = 0; i < leaves.size(); ++i) {
    const std::string path = manifest.directory + "/arrays/" + prefix + "_" + std::to_string(i) + ".bin";
    std::string bytes = ReadFile(path);
    if (bytes.size() != leaves[i].spec.num_bytes()) {
      throw std::runtime_error(path + " holds " + std::to_string(bytes.size()) + " bytes, " + leaves[i].path +
                               " (" + leaves[i].spec.ToString() + ") needs " +
                               std::to_string(leaves[i].spec.num_bytes()));
    }
    arrays.push_back(std::move(bytes));
  }
  return arrays;
}

}  // namespace metagrad::bench
