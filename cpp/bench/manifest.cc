#include "bench/manifest.h"

#include <sys/stat.h>

#include <climits>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "bench/json.h"

namespace metagrad::bench {

namespace {

ArraySpec ReadSpec(const Json& entry, const std::string& what) {
  ArraySpec spec;
  for (const Json& d : entry.Get("shape", what).AsArray(what + ".shape")) {
    const int64_t dim = d.AsInt(what + ".shape[]");
    if (dim < 0) throw JsonError(what + ".shape has a negative dimension");
    spec.dims.push_back(dim);
  }
  const std::string& dtype = entry.Get("dtype", what).AsString(what + ".dtype");
  try {
    spec.type = DTypeNamed(dtype).type;
  } catch (const std::exception&) {
    throw JsonError(what + ".dtype '" + dtype + "' is not a supported dtype");
  }
  return spec;
}

std::vector<ArraySpec> ReadLeaves(const Json& layout, const std::string& key, std::vector<std::string>* paths) {
  std::vector<ArraySpec> specs;
  const auto& entries = layout.Get(key, "layout").AsArray("layout." + key);
  for (size_t i = 0; i < entries.size(); ++i) {
    const std::string what = "layout." + key + "[" + std::to_string(i) + "]";
    specs.push_back(ReadSpec(entries[i], what));
    if (paths != nullptr) paths->push_back(entries[i].Get("path", what).AsString(what + ".path"));
  }
  return specs;
}

// A relative path that stays inside the task directory (no absolute paths,
// no "..", no symbolic link out of it).
std::string Inside(const std::string& directory, const std::string& relative, const std::string& what) {
  if (relative.empty() || relative[0] == '/' || relative.find("..") != std::string::npos) {
    throw JsonError(what + " must be a relative path inside the task directory, got '" + relative + "'");
  }
  const std::string full = directory + "/" + relative;
  char root[PATH_MAX], resolved[PATH_MAX];
  if (realpath(directory.c_str(), root) != nullptr && realpath(full.c_str(), resolved) != nullptr) {
    const std::string r(root), f(resolved);
    if (f.compare(0, r.size() + 1, r + "/") != 0) throw JsonError(what + " '" + relative + "' leaves the task directory");
  }
  return full;
}

// The rows of a streamed task: per leaf of layout.batch but the last (the
// rows' index), a file and where its rows start.
void ReadStream(const Json& entry, Manifest& m) {
  const auto& rows = entry.Get("rows", "stream").AsArray("stream.rows");
  if (m.batch_global.size() < 2 || rows.size() != m.batch_global.size() - 1) {
    throw JsonError("stream.rows lists " + std::to_string(rows.size()) + " leaves for layout.batch's " +
                    std::to_string(m.batch_global.size()) + " (its rows, then their index)");
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    const std::string what = "stream.rows[" + std::to_string(i) + "]";
    StreamedLeaf leaf;
    const std::string& file = rows[i].Get("file", what).AsString(what + ".file");
    leaf.path = !file.empty() && file[0] == '/' ? file : Inside(m.directory, file, what + ".file");
    leaf.offset = rows[i].Get("offset", what).AsInt(what + ".offset");
    leaf.num_rows = rows[i].Get("rows", what).AsInt(what + ".rows");
    if (leaf.offset < 0 || leaf.num_rows < 1) throw JsonError(what + " needs offset >= 0 and rows >= 1");
    if (const Json* modified = rows[i].Find("modified_ns")) {  // a referenced file, as it was when saved
      struct stat st {};
      const int64_t bytes = rows[i].Get("bytes", what).AsInt(what + ".bytes");
      if (stat(leaf.path.c_str(), &st) == 0 &&
          (static_cast<int64_t>(st.st_size) != bytes ||
           static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec != modified->AsInt(what))) {
        throw JsonError(what + ".file " + leaf.path + " changed after the task was saved (" + std::to_string(bytes) +
                        " bytes then, " + std::to_string(st.st_size) + " now, or written to since): save the task "
                        "again");
      }
    }
    leaf.row = m.batch_global[i];
    leaf.row.dims.erase(leaf.row.dims.begin());  // one step's batch: (B, row...)
    m.stream_rows.push_back(std::move(leaf));
  }
  m.stream_batches = Inside(m.directory, entry.Get("batches", "stream").AsString("stream.batches"), "stream.batches");
}

// One PartitionSpec per leaf: a list (per dimension) of lists of mesh axes.
std::vector<PartitionSpec> ReadSpecs(const Json& sharding, const std::string& key, const std::vector<ArraySpec>& leaves,
                                     const Mesh& mesh) {
  const std::string what = "sharding." + key;
  const auto& entries = sharding.Get(key, "sharding").AsArray(what);
  if (entries.size() != leaves.size()) {
    throw JsonError(what + " has " + std::to_string(entries.size()) + " specs for " + std::to_string(leaves.size()) +
                    " leaves");
  }
  std::vector<PartitionSpec> specs;
  for (size_t i = 0; i < entries.size(); ++i) {
    const std::string leaf = what + "[" + std::to_string(i) + "]";
    PartitionSpec spec;
    for (const Json& dim : entries[i].AsArray(leaf)) {
      std::vector<std::string> axes;
      for (const Json& axis : dim.AsArray(leaf + "[]")) axes.push_back(axis.AsString(leaf + "[][]"));
      spec.push_back(std::move(axes));
    }
    try {
      CheckPartitionSpec(leaves[i].dims, spec, mesh, leaf);
    } catch (const InvalidArgument& e) {
      throw JsonError(e.what());
    }
    specs.push_back(std::move(spec));
  }
  return specs;
}

std::vector<ArraySpec> Shards(const std::vector<ArraySpec>& leaves, const std::vector<PartitionSpec>& specs,
                              const Mesh& mesh, bool leading_whole_axis = false) {
  std::vector<ArraySpec> shards;
  for (size_t i = 0; i < leaves.size(); ++i) {
    PartitionSpec spec = specs[i];
    if (leading_whole_axis) spec.insert(spec.begin(), std::vector<std::string>{});
    shards.push_back(ArraySpec{ShardDims(leaves[i].dims, spec, mesh), leaves[i].type});
  }
  return shards;
}

// The layout of each device's shards from the whole layout and the sharding.
void ReadSharding(const Json& entry, Manifest& m) {
  TaskSharding& s = m.sharding;
  for (const Json& axis : entry.Get("mesh", "sharding").AsArray("sharding.mesh")) {
    const auto& pair = axis.AsArray("sharding.mesh[]");
    if (pair.size() != 2) throw JsonError("sharding.mesh entries must be [name, size]");
    s.mesh.axes.push_back(pair[0].AsString("sharding.mesh[][0]"));
    s.mesh.sizes.push_back(pair[1].AsInt("sharding.mesh[][1]"));
  }
  const std::string& partitioner = entry.Get("partitioner", "sharding").AsString("sharding.partitioner");
  if (partitioner != "shardy" && partitioner != "gspmd") {
    throw JsonError("sharding.partitioner must be 'shardy' or 'gspmd', got '" + partitioner + "'");
  }
  s.use_shardy_partitioner = partitioner == "shardy";
  for (const Json& device : entry.Get("devices", "sharding").AsArray("sharding.devices")) {
    const int64_t index = device.AsInt("sharding.devices[]");
    if (index < 0 || index > INT32_MAX) throw JsonError("sharding.devices must be device indices >= 0");
    s.devices.push_back(static_cast<int>(index));
  }
  try {
    CheckPartitionSpec({}, {}, s.mesh, "sharding.mesh");
  } catch (const InvalidArgument& e) {
    throw JsonError(e.what());
  }
  if (static_cast<int64_t>(s.devices.size()) != s.mesh.num_devices()) {
    throw JsonError("sharding.devices lists " + std::to_string(s.devices.size()) + " devices for a mesh of " +
                    std::to_string(s.mesh.num_devices()));
  }
  TaskLayout& layout = m.layout;
  s.state = ReadSpecs(entry, "state", layout.state, s.mesh);
  s.z = ReadSpecs(entry, "z", layout.z, s.mesh);
  s.data = ReadSpecs(entry, "data", layout.data, s.mesh);
  layout.devices = s.mesh.num_devices();
  layout.state = Shards(layout.state, s.state, s.mesh);
  layout.z = Shards(layout.z, s.z, s.mesh);
  layout.data = Shards(layout.data, s.data, s.mesh);
  layout.accumulators = Shards(layout.accumulators, s.z, s.mesh, layout.outputs > 0);
  if (!layout.batch.empty()) {
    s.batch = ReadSpecs(entry, "batch", layout.batch, s.mesh);
    layout.batch = Shards(layout.batch, s.batch, s.mesh);
  }
}

ProgramEntry ReadProgram(const Manifest& m, const std::string& name, const Json& entry) {
  const std::string what = "programs." + name;
  ProgramEntry program;
  program.file = Inside(m.directory, entry.Get("file", what).AsString(what + ".file"), what + ".file");
  program.backend = entry.Get("backend", what).AsString(what + ".backend");
  for (const Json& input : entry.Get("inputs", what).AsArray(what + ".inputs")) {
    program.signature.inputs.push_back(ReadSpec(input, what + ".inputs[]"));
    program.signature.donated.push_back(input.Get("donated", what + ".inputs[]").AsBool(what + ".inputs[].donated"));
  }
  for (const Json& output : entry.Get("outputs", what).AsArray(what + ".outputs")) {
    program.signature.outputs.push_back(ReadSpec(output, what + ".outputs[]"));
  }
  Signature expected;
  try {
    expected = ExpectedSignature(name, m.layout);
  } catch (const InvalidArgument& e) {
    throw JsonError(what + ": " + e.what());
  }
  if (!(program.signature.inputs == expected.inputs) || program.signature.donated != expected.donated) {
    throw JsonError(what + ".inputs are " + SpecList(program.signature.inputs) + ", the layout implies " +
                    SpecList(expected.inputs) + " (with their donation) for " + name);
  }
  if (!(program.signature.outputs == expected.outputs)) {
    throw JsonError(what + ".outputs are " + SpecList(program.signature.outputs) + ", the layout implies " +
                    SpecList(expected.outputs) + " for " + name);
  }
  return program;
}

}  // namespace

std::string SpecList(const std::vector<ArraySpec>& specs) {
  std::string text = "[";
  for (size_t i = 0; i < specs.size(); ++i) text += (i ? ", " : "") + specs[i].ToString();
  return text + "]";
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ManifestError("cannot read '" + path + "'");
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (in.bad()) throw ManifestError("error while reading '" + path + "'");
  return bytes.str();
}

Manifest ReadManifest(const std::string& directory) {
  Manifest m;
  m.directory = directory;
  m.path = directory + "/manifest.json";
  try {
    const Json root = Json::Parse(ReadFile(m.path));
    root.AsObject("manifest");
    if (root.Get("format", "manifest").AsString("format") != "metagrad-task") {
      throw JsonError("not a metagrad task manifest (format != \"metagrad-task\")");
    }
    const int64_t version = root.Get("version", "manifest").AsInt("version");
    if (version != kManifestVersion) {
      throw JsonError("manifest version " + std::to_string(version) + ", this harness reads version " +
                      std::to_string(kManifestVersion) + " (save the task again)");
    }
    m.steps = root.Get("steps", "manifest").AsInt("steps");
    if (m.steps < 1 || m.steps > INT32_MAX) throw JsonError("steps must be in [1, 2^31-1]");
    m.backend = root.Get("backend", "manifest").AsString("backend");
    const Json& layout = root.Get("layout", "manifest");
    m.layout.z = ReadLeaves(layout, "z", &m.z_paths);
    m.layout.data = ReadLeaves(layout, "data", &m.data_paths);
    m.layout.state = ReadLeaves(layout, "state", nullptr);
    m.layout.accumulators = ReadLeaves(layout, "accumulators", nullptr);
    if (m.layout.accumulators.size() != m.layout.z.size()) {
      throw JsonError("layout.accumulators must have one entry per z leaf");
    }
    m.layout.phi = ReadSpec(layout.Get("phi", "layout"), "layout.phi");
    if (m.layout.phi.dims.size() > 1) throw JsonError("layout.phi must be a scalar or a vector");
    m.layout.outputs = m.layout.phi.dims.empty() ? 0 : m.layout.phi.dims[0];
    if (layout.Find("batch") != nullptr) m.layout.batch = ReadLeaves(layout, "batch", nullptr);
    for (const ArraySpec& spec : m.layout.state) m.layout.differentiable.push_back(DTypeOf(spec.type).floating);
    m.z_global = m.layout.z;
    m.data_global = m.layout.data;
    m.batch_global = m.layout.batch;
    if (const Json* sharding = root.Find("sharding")) {
      m.sharded = true;
      ReadSharding(*sharding, m);
    }
    if (const Json* versions = root.Find("versions")) {
      for (const auto& [key, value] : versions->AsObject("versions")) {
        if (value.type() == Json::Type::kString) m.versions[key] = value.AsString(key);
      }
    }
    for (const auto& [name, entry] : root.Get("programs", "manifest").AsObject("programs")) {
      m.programs[name] = ReadProgram(m, name, entry);
    }
    for (const char* required : {"init", "step"}) {
      if (m.programs.count(required) == 0) throw JsonError(std::string("programs lists no '") + required + "'");
    }
    if (const Json* stream = root.Find("stream")) {
      ReadStream(*stream, m);
    } else if (!m.layout.batch.empty()) {
      throw JsonError("layout.batch: the programs take streamed batches, but the manifest has no stream");
    }
    const Json& arrays = root.Get("arrays", "manifest");
    for (const auto& [key, files, count] : {std::make_tuple("z", &m.z_files, m.layout.z.size()),
                                           std::make_tuple("data", &m.data_files, m.layout.data.size())}) {
      const auto& entries = arrays.Get(key, "arrays").AsArray(std::string("arrays.") + key);
      if (entries.size() != count) {
        throw JsonError(std::string("arrays.") + key + " lists " + std::to_string(entries.size()) + " files for " +
                        std::to_string(count) + " leaves");
      }
      for (size_t i = 0; i < entries.size(); ++i) {
        const std::string what = std::string("arrays.") + key + "[" + std::to_string(i) + "]";
        files->push_back(Inside(directory, entries[i].AsString(what), what));
      }
    }
  } catch (const JsonError& e) {
    throw ManifestError(m.path + ": " + e.what());
  }
  return m;
}

std::vector<std::string> ReadArrays(const Manifest& manifest, const std::vector<std::string>& files,
                                    const std::vector<ArraySpec>& specs, const std::vector<std::string>& paths) {
  std::vector<std::string> arrays;
  for (size_t i = 0; i < files.size(); ++i) {
    std::string bytes = ReadFile(files[i]);
    if (bytes.size() != specs[i].num_bytes()) {
      throw ManifestError(files[i] + " holds " + std::to_string(bytes.size()) + " bytes, " + paths[i] + " (" +
                          specs[i].ToString() + ") needs " + std::to_string(specs[i].num_bytes()) +
                          " (listed in " + manifest.path + ")");
    }
    arrays.push_back(std::move(bytes));
  }
  return arrays;
}

}  // namespace metagrad::bench
