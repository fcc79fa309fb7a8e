#include "runtime/batch_stream.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>

namespace metagrad {

namespace {

// The spec of `count` steps' batches of a leaf whose one-step spec is `spec`:
// programs of several steps take them stacked on a leading axis.
ArraySpec Stacked(ArraySpec spec, int64_t count) {
  if (count > 1) spec.dims.insert(spec.dims.begin(), count);
  return spec;
}

int64_t ModifiedNanoseconds(const struct stat& st) {
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

}  // namespace

BatchStream::File::~File() {
  if (fd >= 0) close(fd);
}

BatchStream::BatchStream(std::vector<StreamedLeaf> leaves, std::vector<int64_t> index, int64_t steps, int64_t batch,
                         std::shared_ptr<Client> client, StreamDevices devices)
    : leaves_(std::move(leaves)),
      index_(std::move(index)),
      steps_(steps),
      batch_(batch),
      client_(std::move(client)),
      devices_(std::move(devices)) {
  if (steps_ < 1 || batch_ < 1) throw InvalidArgument("a streamed batch needs steps >= 1 and rows >= 1 per step");
  if (static_cast<int64_t>(index_.size()) != steps_ * batch_) {
    throw InvalidArgument("the index table has " + std::to_string(index_.size()) + " entries, not steps * batch = " +
                          std::to_string(steps_ * batch_));
  }
  if (leaves_.empty()) throw InvalidArgument("a streamed batch needs at least one leaf of rows");
  if (devices_.devices.empty()) throw InvalidArgument("a stream needs at least one device");
  if (devices_.devices.size() > 1) {
    if (devices_.mesh.num_devices() != static_cast<int64_t>(devices_.devices.size()) ||
        devices_.specs.size() != leaves_.size() + 1) {
      throw InvalidArgument("a stream over " + std::to_string(devices_.devices.size()) +
                            " devices needs their mesh and one PartitionSpec per leaf of its batches and one for "
                            "their index");
    }
    const std::vector<ArraySpec> global = GlobalSpecs();
    for (size_t i = 0; i < global.size(); ++i) {
      const std::string what = i < leaves_.size() ? "streamed leaf " + std::to_string(i) : "the streamed rows' index";
      CheckPartitionSpec(global[i].dims, devices_.specs[i], devices_.mesh, what);
      for (size_t dim = 1; dim < devices_.specs[i].size(); ++dim) {
        if (!devices_.specs[i][dim].empty()) {
          throw InvalidArgument(what + ": a streamed batch may be split along its rows only, not " +
                                ToString(devices_.specs[i]));
        }
      }
    }
  }
  for (const StreamedLeaf& leaf : leaves_) {
    if (leaf.path.empty()) {
      files_.push_back(nullptr);
      continue;
    }
    auto file = std::make_unique<File>();
    file->fd = open(leaf.path.c_str(), O_RDONLY | O_CLOEXEC);
    struct stat st {};
    if (file->fd < 0 || fstat(file->fd, &st) != 0) {
      throw InvalidArgument("cannot open the streamed rows' file " + leaf.path + ": " + std::strerror(errno));
    }
    file->size = static_cast<int64_t>(st.st_size);
    file->modified_ns = ModifiedNanoseconds(st);
    const int64_t needed = leaf.offset + leaf.num_rows * static_cast<int64_t>(leaf.row.num_bytes());
    if (file->size < needed) {
      throw InvalidArgument("the streamed rows' file " + leaf.path + " holds " + std::to_string(file->size) +
                            " bytes; its " + std::to_string(leaf.num_rows) + " rows of " + leaf.row.ToString() +
                            " from byte " + std::to_string(leaf.offset) + " need " + std::to_string(needed));
    }
    files_.push_back(std::move(file));
  }
  for (const StreamedLeaf& leaf : leaves_) {
    for (size_t i = 0; i < index_.size(); ++i) {
      if (index_[i] < 0 || index_[i] >= leaf.num_rows) {
        throw InvalidArgument("the index table's row " + std::to_string(index_[i]) + " (step " +
                              std::to_string(i / batch_) + ") is outside the " + std::to_string(leaf.num_rows) +
                              " rows of the streamed data");
      }
    }
  }
}

BatchStream::~BatchStream() {
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  if (worker_.joinable()) worker_.join();
}

std::vector<ArraySpec> BatchStream::GlobalSpecs() const {
  std::vector<ArraySpec> specs;
  for (const StreamedLeaf& leaf : leaves_) {
    ArraySpec spec = leaf.row;
    spec.dims.insert(spec.dims.begin(), batch_);
    specs.push_back(std::move(spec));
  }
  specs.push_back(ArraySpec{{batch_}, PJRT_Buffer_Type_S32});
  return specs;
}

std::vector<ArraySpec> BatchStream::BatchSpecs() const {
  std::vector<ArraySpec> specs = GlobalSpecs();
  if (devices_.devices.size() == 1) return specs;
  for (size_t i = 0; i < specs.size(); ++i) specs[i].dims = ShardDims(specs[i].dims, devices_.specs[i], devices_.mesh);
  return specs;
}

std::vector<BufferPtr> BatchStream::Upload(size_t leaf, const void* host, int64_t count) const {
  const ArraySpec global = Stacked(GlobalSpecs()[leaf], count);
  if (devices_.devices.size() == 1) return {client_->BufferFromHost(host, global, {}, devices_.devices[0])};
  PartitionSpec spec = devices_.specs[leaf];
  if (count > 1) spec.insert(spec.begin(), std::vector<std::string>{});  // the steps' axis is whole
  return UploadShards(*client_, host, global, spec, devices_.mesh, devices_.devices);
}

int64_t BatchStream::BatchBytes(int64_t count) const {
  int64_t total = 0;
  for (const ArraySpec& spec : BatchSpecs()) total += static_cast<int64_t>(spec.num_bytes());
  return total * count;
}

std::vector<BufferPtr> BatchStream::Gather(int64_t t, int64_t count) {
  if (t < 0 || count < 1 || t + count > steps_) {
    throw InvalidArgument("no streamed batches for steps " + std::to_string(t) + ".." + std::to_string(t + count - 1) +
                          " of " + std::to_string(steps_));
  }
  const int64_t rows = count * batch_;
  const int64_t* index = index_.data() + t * batch_;
  std::vector<BufferPtr> buffers;
  std::vector<char> staging;
  for (size_t leaf = 0; leaf < leaves_.size(); ++leaf) {
    staging.resize(static_cast<size_t>(rows) * leaves_[leaf].row.num_bytes());
    ReadRows(leaf, index, rows, staging.data());
    for (BufferPtr& shard : Upload(leaf, staging.data(), count)) buffers.push_back(std::move(shard));
  }
  const std::vector<int32_t> rows_read(index, index + rows);
  for (BufferPtr& shard : Upload(leaves_.size(), rows_read.data(), count)) buffers.push_back(std::move(shard));
  const std::lock_guard<std::mutex> lock(mutex_);
  stats_.batches += count;
  stats_.bytes += BatchBytes(count);
  return buffers;
}

void BatchStream::CheckUnchanged(size_t leaf) const {
  const File& file = *files_[leaf];
  struct stat st {};
  if (fstat(file.fd, &st) != 0) {
    throw StreamError("cannot read the streamed rows' file " + leaves_[leaf].path + ": " + std::strerror(errno));
  }
  if (static_cast<int64_t>(st.st_size) != file.size || ModifiedNanoseconds(st) != file.modified_ns) {
    throw StreamError("the streamed rows' file " + leaves_[leaf].path + " changed while it was streamed (" +
                      (static_cast<int64_t>(st.st_size) != file.size
                           ? "its size went from " + std::to_string(file.size) + " to " + std::to_string(st.st_size) +
                                 " bytes"
                           : std::string("it was written to")) +
                      "): replays would read rows that differ from the first pass's. Leave the file unchanged "
                      "while a task streams it, and make the Stream again after changing it.");
  }
}

void BatchStream::ReadRows(size_t leaf, const int64_t* index, int64_t rows, char* out) const {
  const StreamedLeaf& source = leaves_[leaf];
  const size_t row_bytes = source.row.num_bytes();
  if (files_[leaf] == nullptr) {
    for (int64_t i = 0; i < rows; ++i) {
      std::memcpy(out + static_cast<size_t>(i) * row_bytes, source.rows + static_cast<size_t>(index[i]) * row_bytes,
                  row_bytes);
    }
    return;
  }
  CheckUnchanged(leaf);
  // One read per run of consecutive row numbers.
  for (int64_t i = 0; i < rows;) {
    int64_t run = 1;
    while (i + run < rows && index[i + run] == index[i] + run) ++run;
    size_t done = 0, want = static_cast<size_t>(run) * row_bytes;
    const off_t at = static_cast<off_t>(source.offset + index[i] * static_cast<int64_t>(row_bytes));
    while (done < want) {
      const ssize_t got = pread(files_[leaf]->fd, out + static_cast<size_t>(i) * row_bytes + done, want - done,
                                at + static_cast<off_t>(done));
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) {
        throw StreamError("reading the streamed rows' file " + source.path + " failed at byte " +
                          std::to_string(at + static_cast<off_t>(done)) + ": " +
                          (got < 0 ? std::strerror(errno) : "the file ended"));
      }
      done += static_cast<size_t>(got);
    }
    i += run;
  }
  CheckUnchanged(leaf);  // a write during the read could have torn it
}

void BatchStream::Begin(std::vector<std::pair<int64_t, int64_t>> order, int depth) {
  call_ = std::unique_lock<std::mutex>(call_mutex_);
  const std::lock_guard<std::mutex> lock(mutex_);
  order_ = std::move(order);
  depth_ = std::max(depth, 1);
  next_to_gather_ = next_to_take_ = 0;
  stopping_ = false;
  failure_ = nullptr;
  stats_ = {};
  worker_ = std::thread([this] { Work(); });
}

void BatchStream::Work() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    changed_.wait(lock, [this] {
      return stopping_ || next_to_gather_ >= order_.size() || static_cast<int>(ready_.size()) < depth_;
    });
    if (stopping_ || next_to_gather_ >= order_.size()) return;
    const std::pair<int64_t, int64_t> batches = order_[next_to_gather_];
    lock.unlock();
    try {
      std::vector<BufferPtr> buffers = Gather(batches.first, batches.second);
      lock.lock();
      ready_.emplace_back(batches, std::move(buffers));
      ++next_to_gather_;
    } catch (...) {
      lock.lock();
      failure_ = std::current_exception();
      changed_.notify_all();
      return;
    }
    changed_.notify_all();
  }
}

std::vector<BufferPtr> BatchStream::Take(int64_t t, int64_t count) {
  const auto start = std::chrono::steady_clock::now();
  const std::pair<int64_t, int64_t> wanted(t, count);
  std::unique_lock<std::mutex> lock(mutex_);
  std::vector<BufferPtr> buffers;
  if (worker_.joinable() && next_to_take_ < order_.size() && order_[next_to_take_] == wanted) {
    const size_t position = next_to_take_;
    changed_.wait(lock, [&] {
      return !ready_.empty() || failure_ != nullptr || stopping_ || next_to_take_ != position;
    });
    if (next_to_take_ == position && !ready_.empty() && ready_.front().first == wanted) {
      buffers = std::move(ready_.front().second);
      ready_.pop_front();
      ++next_to_take_;
      changed_.notify_all();
    } else if (next_to_take_ == position && ready_.empty() && failure_ != nullptr) {
      std::rethrow_exception(failure_);
    }
  }
  if (buffers.empty()) {  // not prefetched: gathered now
    ++stats_.misses;
    lock.unlock();
    buffers = Gather(t, count);
    lock.lock();
  }
  stats_.seconds_waited += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return buffers;
}

StreamStats BatchStream::End() {
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  if (worker_.joinable()) worker_.join();
  StreamStats stats;
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    ready_.clear();
    order_.clear();
    stats = stats_;
  }
  if (call_.owns_lock()) call_.unlock();
  return stats;
}

}  // namespace metagrad
