// Training data that stays in host memory: the batch of each step gathered
// from host rows and copied to the device as the plan reaches it.
//
// A streamed leaf is N row-major rows in host memory, or in a file read with
// pread (never mapped: a file truncated under a mapping would end the process
// with SIGBUS); step t reads the rows index[t] of a (T, B) index table, so
// every replay reads exactly the rows the first pass read. A file whose size
// or modification time changes while it is streamed fails the read that
// notices, before its rows reach a program. A
// program of n steps (advance_<n>, segment_vjp_<n>) takes the n batches of
// its steps stacked on a leading axis: per leaf (n, B, row...), and the rows'
// indices as int32 (n, B) (programs.h, group B).
//
// A run knows its plan before it starts, so it hands the stream the order in
// which it will take batches (Begin); a worker thread gathers and uploads
// them in that order, at most `depth` ahead of the run. A batch taken out of
// that order is gathered at once (counted as a miss). One call streams at a
// time: Begin waits for the previous call's End.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "runtime/executable.h"
#include "runtime/sharding.h"

namespace metagrad {

struct StreamedLeaf {
  const char* rows = nullptr;  // N rows in memory, owned by the caller, alive while the stream is; or
  std::string path;            // N rows in this file, from byte `offset`
  int64_t offset = 0;
  int64_t num_rows = 0;
  ArraySpec row;  // one row's dims and type
};

// Where a stream's batches go: one device, or the partitions of a sharded
// task, each batch split by one PartitionSpec per leaf of group B (each
// leaf's rows, then their index) that may split only the rows' axis.
struct StreamDevices {
  std::vector<int> devices = {0};  // the client's devices, one per partition
  Mesh mesh;                       // with several devices
  std::vector<PartitionSpec> specs;
};

// Streamed rows that cannot be read as they were when the stream opened them.
class StreamError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct StreamStats {
  int64_t batches = 0;        // batches (of one step each) copied to the device
  int64_t bytes = 0;          // their bytes, indices included
  int64_t misses = 0;         // executions whose batches were not prefetched
  double seconds_waited = 0;  // the run waiting for batches not yet on the device
};

class BatchStream {
 public:
  // `index`: T * B row numbers, step-major; each must lie in [0, num_rows) of every leaf.
  BatchStream(std::vector<StreamedLeaf> leaves, std::vector<int64_t> index, int64_t steps, int64_t batch,
              std::shared_ptr<Client> client, StreamDevices devices = {});
  ~BatchStream();
  BatchStream(const BatchStream&) = delete;
  BatchStream& operator=(const BatchStream&) = delete;

  int64_t steps() const { return steps_; }
  int64_t batch() const { return batch_; }
  // The per-step specs of group B, per device: each leaf's (B, row...), then
  // int32 (B), as the device's shard of them.
  std::vector<ArraySpec> BatchSpecs() const;
  // Bytes per device of the batches of `count` steps.
  int64_t BatchBytes(int64_t count) const;

  // Starts prefetching the batches (first step, count) of `order` for a call
  // on this thread, once no other call streams; the call, however it ends,
  // calls End on this thread. `depth`: batches held ahead of the run.
  void Begin(std::vector<std::pair<int64_t, int64_t>> order, int depth);
  // The buffers of group B for steps t..t+count-1: per leaf (indices last),
  // one shard per device.
  std::vector<BufferPtr> Take(int64_t t, int64_t count);
  // Stops the worker and drops what it prefetched; returns what the call
  // streamed, and lets the next call begin.
  StreamStats End();

 private:
  // An open file of rows, with the size and modification time it had when opened.
  struct File {
    int fd = -1;
    int64_t size = 0;
    int64_t modified_ns = 0;
    ~File();
  };
  std::vector<BufferPtr> Gather(int64_t t, int64_t count);
  // The whole per-step specs of group B (not sharded).
  std::vector<ArraySpec> GlobalSpecs() const;
  // Uploads leaf `leaf`'s batches of `count` steps, gathered in `host`.
  std::vector<BufferPtr> Upload(size_t leaf, const void* host, int64_t count) const;
  // Copies rows index[0..rows) of leaf `leaf` into `out`.
  void ReadRows(size_t leaf, const int64_t* index, int64_t rows, char* out) const;
  void CheckUnchanged(size_t leaf) const;
  void Work();

  const std::vector<StreamedLeaf> leaves_;
  std::vector<std::unique_ptr<File>> files_;  // per leaf; nullptr for rows in memory
  const std::vector<int64_t> index_;
  const int64_t steps_, batch_;
  const std::shared_ptr<Client> client_;
  const StreamDevices devices_;

  std::mutex call_mutex_;  // held from Begin to End
  std::unique_lock<std::mutex> call_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<std::pair<int64_t, int64_t>> order_;
  size_t next_to_gather_ = 0;  // into order_
  size_t next_to_take_ = 0;    // into order_
  // order_[next_to_take_...], gathered, each with its (first step, count)
  std::deque<std::pair<std::pair<int64_t, int64_t>, std::vector<BufferPtr>>> ready_;
  int depth_ = 0;
  bool stopping_ = false;
  std::exception_ptr failure_;
  std::thread worker_;
  StreamStats stats_;
};

}  // namespace metagrad
