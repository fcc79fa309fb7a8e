#include "runtime/schedule.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <set>
#include <sstream>

namespace metagrad {
namespace {

constexpr int64_t kSaturated = std::numeric_limits<int64_t>::max();

constexpr int64_t kMaxSteps = std::numeric_limits<int32_t>::max();

int64_t SaturatingAdd(int64_t a, int64_t b) { return a > kSaturated - b ? kSaturated : a + b; }

// a * b for a, b >= 0, saturating at INT64_MAX.
int64_t SaturatingMul(int64_t a, int64_t b) { return b != 0 && a > kSaturated / b ? kSaturated : a * b; }

// beta(s, r) = C(s + r, s): the most blocks s slots and r sweeps can reverse.
// beta(s, r) = 0 for r < 0; saturates at INT64_MAX.
int64_t Beta(int64_t s, int64_t r) {
  if (r < 0) return 0;
  const int64_t k = std::min(s, r);
  const int64_t n = s + r;
  int64_t result = 1;
  for (int64_t i = 1; i <= k; ++i) {
    // result == C(n-k+i-1, i-1); C(n-k+i, i) = result * (n-k+i) / i is exact
    // and not smaller. With g = gcd(result, i), i/g divides n-k+i.
    const int64_t g = std::gcd(result, i);
    result = SaturatingMul(result / g, (n - k + i) / (i / g));
    if (result == kSaturated) return kSaturated;
  }
  return result;
}

// Smallest r >= 0 with beta(s, r) >= l (l >= 1, s >= 1).
int64_t Sweeps(int64_t s, int64_t l) {
  int64_t hi = 1;
  while (Beta(s, hi) < l) hi *= 2;
  int64_t lo = 0;  // beta(s, 0) == 1 < l unless l == 1
  if (Beta(s, lo) >= l) return 0;
  while (hi - lo > 1) {  // beta(s, lo) < l <= beta(s, hi)
    const int64_t mid = lo + (hi - lo) / 2;
    (Beta(s, mid) >= l ? hi : lo) = mid;
  }
  return hi;
}

// Fewest block advances reversing l blocks whose start is saved (and maybe
// current), with c more slots: F(l, c) = r*l - beta(c+2, r-1) where
// beta(c+1, r-1) < l <= beta(c+1, r); F(l, 0) = l(l-1)/2.
int64_t ReverseCost(int64_t l, int64_t c) {
  if (l <= 1) return 0;
  if (c == 0) return l % 2 == 0 ? SaturatingMul(l / 2, l - 1) : SaturatingMul(l, (l - 1) / 2);
  const int64_t r = Sweeps(c + 1, l);
  // r*l - beta(c+2, r-1) <= r*l; once r*l saturates the true cost is astronomical anyway.
  const int64_t rl = SaturatingMul(r, l);
  return rl == kSaturated ? kSaturated : rl - Beta(c + 2, r - 1);
}

// An optimal first checkpoint m (1 <= m < l) for ReverseCost(l, c), c >= 1:
// any m with beta(s, r-2) <= m <= beta(s, r-1) and
// beta(s-1, r-1) <= l-m <= beta(s-1, r), s = c+1 (checked against a DP).
int64_t RevolveSplit(int64_t l, int64_t c) {
  const int64_t s = c + 1;
  const int64_t r = Sweeps(s, l);
  const int64_t rest_cap = Beta(s - 1, r);
  int64_t m = std::max<int64_t>(Beta(s, r - 2), 1);
  if (rest_cap < l) m = std::max(m, l - rest_cap);
  return std::clamp<int64_t>(m, 1, l - 1);
}

// Block counts of the first forward pass of revolve: lengths[j] blocks are
// reversed later with j free slots besides their start (level c first, level
// 0 holds T-1). The cost sum_j ReverseCost(lengths[j], j) is convex in each
// length, with increments r, so taking the n cheapest increments is optimal:
// level j can take beta(j+1, theta) blocks at increments <= theta.
std::vector<int64_t> RevolveLevels(int64_t n, int64_t c) {
  int64_t theta = 0;
  // sum_{j=0..c} beta(j+1, theta) == beta(c+1, theta+1) - 1
  while (Beta(c + 1, theta + 1) - 1 < n) ++theta;
  std::vector<int64_t> lengths(c + 1, 0);
  int64_t used = 0;
  for (int64_t j = 0; j <= c; ++j) {
    lengths[j] = theta >= 1 ? Beta(j + 1, theta - 1) : 0;
    used += lengths[j];
  }
  int64_t rest = n - used;
  for (int64_t j = 0; j <= c && rest > 0; ++j) {
    const int64_t more = std::min(rest, Beta(j + 1, theta) - lengths[j]);
    lengths[j] += more;
    rest -= more;
  }
  return lengths;
}

// Emits actions over blocks ("units") and tracks the current position, the
// slots and the peak; slot numbers are the smallest free ones.
class Builder {
 public:
  Builder(int64_t T, int64_t block) : T_(T), block_(block), units_(T / block + (T % block != 0)) {}

  int64_t units() const { return units_; }
  int64_t pos() const { return pos_; }
  Plan Take() { return std::move(plan_); }

  void AdvanceTo(int64_t unit) {
    if (unit == pos_) return;
    plan_.push_back({ActionKind::kAdvance, Start(pos_), Start(unit) - Start(pos_), -1});
    pos_ = unit;
  }
  int Save() {
    int slot;
    if (free_.empty()) {
      slot = static_cast<int>(slot_unit_.size());
      slot_unit_.push_back(pos_);
    } else {
      slot = *free_.begin();
      free_.erase(free_.begin());
      slot_unit_[slot] = pos_;
    }
    plan_.push_back({ActionKind::kSave, Start(pos_), 0, slot});
    return slot;
  }
  void Restore(int slot) {
    pos_ = slot_unit_[slot];
    plan_.push_back({ActionKind::kRestore, Start(pos_), 0, slot});
  }
  // Makes the current state the one at `unit`, restoring `slot` if needed.
  void At(int64_t unit, int slot) {
    if (pos_ != unit) Restore(slot);
  }
  void Free(int slot) {
    if (slot < 0) return;
    plan_.push_back({ActionKind::kFree, Start(slot_unit_[slot]), 0, slot});
    free_.insert(slot);
  }
  void Output() { plan_.push_back({ActionKind::kOutput, T_, 0, -1}); }
  // Reverses the block at pos(), consuming the current state.
  void Reverse() {
    plan_.push_back({ActionKind::kReverse, Start(pos_), Start(pos_ + 1) - Start(pos_), -1});
    pos_ = -1;
  }

 private:
  // unit * block_ saturates: with a huge block, every unit past 0 starts at T.
  int64_t Start(int64_t unit) const { return unit == 0 ? 0 : unit > T_ / block_ ? T_ : std::min(unit * block_, T_); }

  int64_t T_, block_, units_;
  int64_t pos_ = 0;
  Plan plan_;
  std::vector<int64_t> slot_unit_;
  std::set<int> free_;
};

void CheckCommon(int64_t T, int64_t block) {
  if (T < 1) throw std::invalid_argument("a plan needs T >= 1 steps, got T = " + std::to_string(T));
  if (T > kMaxSteps) {
    throw std::invalid_argument("a plan has at most 2^31-1 steps (the step index is an int32), got T = " +
                                std::to_string(T));
  }
  if (block < 1) throw std::invalid_argument("block must be >= 1 steps, got block = " + std::to_string(block));
}

// Reverses blocks [lo, hi) (the state at lo saved in slot_lo) by saving every
// block start; with `first`, the forward pass goes on to T and outputs.
void ReverseStoringAll(Builder& b, int64_t lo, int64_t hi, int slot_lo, bool first) {
  std::vector<int> slots(hi - lo, -1);
  slots[0] = slot_lo;
  b.At(lo, slot_lo);
  for (int64_t u = lo + 1; u < hi; ++u) {
    b.AdvanceTo(u);
    // The last block is reversed straight from the current state unless the
    // forward pass has to go past it to the output.
    if (u < hi - 1 || first) slots[u - lo] = b.Save();
  }
  if (first) {
    b.AdvanceTo(hi);
    b.Output();
  }
  for (int64_t u = hi - 1; u >= lo; --u) {
    b.At(u, slots[u - lo]);
    b.Reverse();
    b.Free(slots[u - lo]);
  }
}

}  // namespace

const char* ActionKindName(ActionKind kind) {
  switch (kind) {
    case ActionKind::kAdvance: return "advance";
    case ActionKind::kSave: return "save";
    case ActionKind::kRestore: return "restore";
    case ActionKind::kFree: return "free";
    case ActionKind::kOutput: return "output";
    case ActionKind::kReverse: return "reverse";
  }
  return "unknown";
}

ActionKind ParseActionKind(const std::string& name) {
  for (ActionKind kind : {ActionKind::kAdvance, ActionKind::kSave, ActionKind::kRestore, ActionKind::kFree,
                          ActionKind::kOutput, ActionKind::kReverse}) {
    if (name == ActionKindName(kind)) return kind;
  }
  throw std::invalid_argument("unknown action kind '" + name +
                              "' (expected advance, save, restore, free, output or reverse)");
}

std::string ToString(const Action& a) {
  std::ostringstream out;
  out << ActionKindName(a.kind) << "(";
  switch (a.kind) {
    case ActionKind::kAdvance:
    case ActionKind::kReverse: out << "step=" << a.step << ", count=" << a.count; break;
    case ActionKind::kSave:
    case ActionKind::kRestore:
    case ActionKind::kFree: out << "slot=" << a.slot << ", step=" << a.step; break;
    case ActionKind::kOutput: out << "step=" << a.step; break;
    default: out << "step=" << a.step << ", count=" << a.count << ", slot=" << a.slot; break;
  }
  out << ")";
  return out.str();
}

std::string ToString(const Plan& plan) {
  std::string text;
  for (const Action& a : plan) {
    text += ToString(a);
    text += '\n';
  }
  return text;
}

Plan PlanStoreAll(int64_t T) {
  CheckCommon(T, 1);
  Builder b(T, 1);
  ReverseStoringAll(b, 0, T, b.Save(), /*first=*/true);
  return b.Take();
}

Plan PlanPeriodic(int64_t T, int64_t every, int64_t block) {
  CheckCommon(T, block);
  if (every < 1) throw std::invalid_argument("every must be >= 1 steps, got every = " + std::to_string(every));
  if (every % block != 0) {
    throw std::invalid_argument("every (" + std::to_string(every) + ") must be a multiple of block (" +
                                std::to_string(block) + ")");
  }
  Builder b(T, block);
  const int64_t n = b.units();
  const int64_t e = every / block;
  std::vector<int> starts;  // slot of each segment's first state
  for (int64_t lo = 0; lo < n; lo += e) {
    b.AdvanceTo(lo);
    starts.push_back(b.Save());
  }
  for (int64_t i = static_cast<int64_t>(starts.size()) - 1; i >= 0; --i) {
    const int64_t lo = i * e;
    ReverseStoringAll(b, lo, std::min(lo + e, n), starts[i], /*first=*/i + 1 == static_cast<int64_t>(starts.size()));
  }
  return b.Take();
}

Plan PlanReplay(int64_t T, int k, int64_t block) {
  CheckCommon(T, block);
  if (k < 2) throw std::invalid_argument("REPLAY needs k >= 2 segments per level, got k = " + std::to_string(k));
  Builder b(T, block);
  struct Task {
    int64_t lo, hi;  // blocks [lo, hi)
    int slot;        // holds the state at lo; -1: it is the current state
    bool first;      // on the first forward pass: go on to T and output
  };
  std::vector<Task> stack{{0, b.units(), b.Save(), true}};
  std::vector<int64_t> bounds;
  std::vector<int> slots;
  while (!stack.empty()) {
    const Task task = stack.back();
    stack.pop_back();
    const int64_t n = task.hi - task.lo;
    if (n == 1) {
      if (task.first) {
        b.AdvanceTo(task.hi);
        b.Output();
      }
      b.At(task.lo, task.slot);
      b.Reverse();
      b.Free(task.slot);
      continue;
    }
    b.At(task.lo, task.slot);
    const int64_t m = std::min<int64_t>(k, n);
    bounds.assign(1, task.lo);
    for (int64_t i = 0; i < m; ++i) bounds.push_back(bounds.back() + n / m + (i < n % m ? 1 : 0));
    slots.assign(1, task.slot);
    for (int64_t i = 1; i < m; ++i) {
      b.AdvanceTo(bounds[i]);
      const bool direct = i == m - 1 && bounds[m] - bounds[i] == 1 && !task.first;
      slots.push_back(direct ? -1 : b.Save());
    }
    for (int64_t i = 0; i < m; ++i) stack.push_back({bounds[i], bounds[i + 1], slots[i], task.first && i == m - 1});
  }
  return b.Take();
}

int64_t RevolveForwardSteps(int64_t units, int64_t slots) {
  if (units < 1) throw std::invalid_argument("units must be >= 1, got " + std::to_string(units));
  if (slots < 1) throw std::invalid_argument("revolve needs slots >= 1, got " + std::to_string(slots));
  const int64_t c = std::min(slots - 1, units - 1);
  const std::vector<int64_t> lengths = RevolveLevels(units, c);
  int64_t total = units;
  for (int64_t j = 0; j <= c; ++j) total = SaturatingAdd(total, ReverseCost(lengths[j], j));
  return total;
}

Plan PlanRevolve(int64_t T, int slots, int64_t block) {
  CheckCommon(T, block);
  if (slots < 1) {
    throw std::invalid_argument("revolve needs slots >= 1 (state_0 takes one), got slots = " +
                                std::to_string(slots));
  }
  Builder b(T, block);
  const int64_t n = b.units();
  const int64_t c = std::min<int64_t>(slots - 1, n - 1);
  const std::vector<int64_t> lengths = RevolveLevels(n, c);
  struct Task {
    int64_t lo, len, free;  // blocks [lo, lo+len), with `free` slots besides the start's
    int slot;               // holds the state at lo; -1: it is the current state
  };
  std::vector<Task> stack;
  // First forward pass: a checkpoint at the start of every level's blocks.
  int64_t last = 0;
  while (lengths[last] == 0) ++last;
  int64_t lo = 0;
  int slot = b.Save();
  for (int64_t j = c; j > last; --j) {
    if (lengths[j] == 0) continue;
    stack.push_back({lo, lengths[j], j, slot});
    lo += lengths[j];
    b.AdvanceTo(lo);
    slot = b.Save();
  }
  b.AdvanceTo(n);
  b.Output();
  stack.push_back({lo, n - lo, last, slot});
  while (!stack.empty()) {
    const Task task = stack.back();
    stack.pop_back();
    if (task.len == 1) {
      b.At(task.lo, task.slot);
      b.Reverse();
      b.Free(task.slot);
    } else if (task.free == 0) {
      for (int64_t u = task.lo + task.len - 1; u >= task.lo; --u) {
        b.At(task.lo, task.slot);
        b.AdvanceTo(u);
        b.Reverse();
      }
      b.Free(task.slot);
    } else {
      const int64_t m = RevolveSplit(task.len, task.free);
      b.At(task.lo, task.slot);
      b.AdvanceTo(task.lo + m);
      const int next = task.len - m == 1 ? -1 : b.Save();
      stack.push_back({task.lo, m, task.free, task.slot});
      stack.push_back({task.lo + m, task.len - m, task.free - 1, next});
    }
  }
  return b.Take();
}

std::vector<std::pair<int64_t, int64_t>> ForwardChunks(int64_t from, int64_t count,
                                                       const std::vector<int64_t>& fused) {
  std::vector<std::pair<int64_t, int64_t>> chunks;
  const int64_t end = from + count;
  for (int64_t t = from; t < end;) {
    int64_t n = 1;
    for (auto it = fused.rbegin(); it != fused.rend(); ++it) {
      if (*it > n && t % *it == 0 && *it <= end - t) n = *it;
    }
    chunks.emplace_back(t, n);
    t += n;
  }
  return chunks;
}

std::vector<int> HostSlotOrder(const Plan& plan) {
  std::map<int, int64_t> copies;
  for (const Action& a : plan) {
    if (a.kind == ActionKind::kSave || a.kind == ActionKind::kRestore) ++copies[a.slot];
  }
  std::vector<int> order;
  for (const auto& [slot, count] : copies) order.push_back(slot);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return copies[a] < copies[b]; });
  return order;
}

}  // namespace metagrad
