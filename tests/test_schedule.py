"""Checkpointing plans: validity of every policy, exact small plans, revolve
optimality against a DP and an exhaustive search, CheckPlan's rules, and
argument errors. Pure C++ planning, no device."""

from __future__ import annotations

import collections
import functools
import math
import time

import pytest

from metagrad import schedules
from metagrad.schedules import Action, Budget, Periodic, Plan, PlanError, Replay, StoreAll, revolve_forward_steps

T_VALUES = (1, 2, 3, 7, 16, 100, 1000, 1023, 1025)
K_VALUES = (2, 3, 4, 10, 32)
BLOCKS = (1, 4, 16)


def ceil_log(k: int, n: int) -> int:
    """Smallest d with k**d >= n (0 for n == 1)."""
    d = 0
    while k**d < n:
        d += 1
    return d


def units(T: int, block: int) -> int:
    return -(-T // block)


def block_lengths(T: int, block: int) -> list[int]:
    return sorted({min(block, T)} | ({T % block} if T % block else set()))


def check_structure(plan: Plan, T: int, block: int) -> dict:
    """CheckPlan, plus what it cannot know: block-aligned reverses, small slot numbers."""
    stats = plan.stats(T)
    assert stats["reversed_steps"] == T
    assert stats["num_actions"] == len(plan)
    assert stats["fused_lengths"] == block_lengths(T, block)
    reverses = [a for a in plan if a.kind == "reverse"]
    assert len(reverses) == units(T, block)
    assert [a.step for a in reverses] == [u * block for u in reversed(range(units(T, block)))]
    slots = {a.slot for a in plan if a.kind in ("save", "restore", "free")}
    assert slots == set(range(stats["peak_saved"]))
    return stats


def actions(*specs) -> Plan:
    return Plan([Action(*spec) for spec in specs])


def as_tuples(plan: Plan) -> list[tuple]:
    return [(a.kind, a.step, a.count, a.slot) for a in plan]


# --- every policy yields a valid plan ----------------------------------------


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("T", T_VALUES)
def test_replay_valid_and_within_bounds(T, block):
    n = units(T, block)
    for k in K_VALUES:
        stats = check_structure(Replay(k=k, block=block).plan(T), T, block)
        depth = ceil_log(k, n)
        assert stats["peak_saved"] <= max(1, k * depth), (T, k, block)
        assert stats["peak_saved"] <= 1 + (k - 1) * depth, (T, k, block)
        if n == k**depth:
            assert stats["peak_saved"] == 1 + (k - 1) * depth, (T, k, block)
        # Forward steps: the first pass, then at most one replay of everything per level below the top.
        assert T <= stats["forward_steps"] <= T * max(1, depth), (T, k, block)
        if n <= k:
            assert stats["forward_steps"] == T


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("T", T_VALUES)
def test_other_policies_valid(T, block):
    n = units(T, block)
    if block == 1:
        stats = check_structure(StoreAll().plan(T), T, 1)
        assert (stats["peak_saved"], stats["forward_steps"]) == (T, T)
    for every in {block, 3 * block, 10 * block, max(block, math.isqrt(T) // block * block)}:
        stats = check_structure(Periodic(every=every, block=block).plan(T), T, block)
        e = every // block
        assert stats["peak_saved"] <= units(n, e) + e - 1
        assert T <= stats["forward_steps"] < 2 * T or T == 1
    for slots in (1, 2, 3, 5, 17, n, n + 5):
        stats = check_structure(Budget(states=slots, block=block).plan(T), T, block)
        assert stats["peak_saved"] <= slots
        if block == 1:
            assert stats["forward_steps"] == revolve_forward_steps(T, slots)
    if n >= 2:
        assert check_structure(Budget(states=1, block=block).plan(T), T, block)["peak_saved"] == 1


def test_known_numbers():
    assert StoreAll().plan(100).stats(100)["forward_steps"] == 100
    # 10 segment starts + the last segment's 9 other states; 9 segments replayed up to their last step.
    stats = Periodic(every=10).plan(100).stats(100)
    assert (stats["peak_saved"], stats["forward_steps"]) == (19, 100 + 9 * 9)
    # Revolve with one slot replays from state_0 for every step: T + T(T-1)/2.
    assert Budget(states=1).plan(50).stats(50)["forward_steps"] == 50 + 50 * 49 // 2
    # Slots >= T: store all.
    assert Budget(states=100).plan(100).stats(100) == StoreAll().plan(100).stats(100)


# The docstring of metagrad.schedules quotes these.
COMPARISON = {  # (T, k): (Replay forward steps, Replay peak, revolve forward steps at that peak)
    (1000, 2): (5045, 10, 3640), (1000, 4): (3775, 15, 3035), (1000, 8): (3140, 22, 2703),
    (1000, 32): (1938, 62, 1938), (10000, 2): (69009, 14, 46129), (10000, 4): (51545, 20, 37980),
    (10000, 8): (41167, 30, 34020), (10000, 32): (28377, 71, 27302),
}


@pytest.mark.parametrize("T,k", sorted(COMPARISON))
def test_revolve_beats_or_ties_replay_at_equal_memory(T, k):
    replay = Replay(k=k).plan(T).stats(T)
    revolve = Budget(states=replay["peak_saved"]).plan(T).stats(T)
    assert (replay["forward_steps"], replay["peak_saved"], revolve["forward_steps"]) == COMPARISON[T, k]
    assert revolve["peak_saved"] <= replay["peak_saved"]
    assert revolve["forward_steps"] <= replay["forward_steps"]


@pytest.mark.parametrize("T", (7, 100, 1023, 1025))
@pytest.mark.parametrize("k", (2, 3, 4, 10))
def test_revolve_never_worse_than_replay(T, k):
    for block in (1, 4):
        replay = Replay(k=k, block=block).plan(T).stats(T)
        revolve = Budget(states=replay["peak_saved"], block=block).plan(T).stats(T)
        assert revolve["forward_steps"] <= replay["forward_steps"], (T, k, block)
        assert Budget(k=k, block=block).plan(T).stats(T) == revolve, (T, k, block)


def test_budget_k_is_the_default_and_takes_replays_memory():
    # the numbers of the module docstring's table: Replay(4) 3775 / 51545 steps in 15 / 20 states
    assert Budget(k=4).slots(steps=1000) == 15 and Budget(k=4).slots(steps=10000) == 20
    assert Budget(k=4).plan(1000).stats(1000)["forward_steps"] == 3035
    assert Budget(k=4).plan(10000).stats(10000)["forward_steps"] == 37980
    with pytest.raises(ValueError, match=r"depends on steps; pass steps="):
        Budget(k=4).slots()


# --- exact plans, written out by hand ----------------------------------------


def test_store_all_by_hand():
    assert as_tuples(StoreAll().plan(3)) == [
        ("save", 0, 0, 0), ("advance", 0, 1, -1), ("save", 1, 0, 1), ("advance", 1, 1, -1),
        ("save", 2, 0, 2), ("advance", 2, 1, -1), ("output", 3, 0, -1),
        ("restore", 2, 0, 2), ("reverse", 2, 1, -1), ("free", 2, 0, 2),
        ("restore", 1, 0, 1), ("reverse", 1, 1, -1), ("free", 1, 0, 1),
        ("restore", 0, 0, 0), ("reverse", 0, 1, -1), ("free", 0, 0, 0),
    ]


def test_replay_by_hand():
    # [0,4) -> [0,2) [2,4); the first pass also splits the last segment [2,4) -> [2,3) [3,4).
    plan = Replay(k=2).plan(4)
    assert as_tuples(plan) == [
        ("save", 0, 0, 0), ("advance", 0, 2, -1), ("save", 2, 0, 1), ("advance", 2, 1, -1),
        ("save", 3, 0, 2), ("advance", 3, 1, -1), ("output", 4, 0, -1),
        ("restore", 3, 0, 2), ("reverse", 3, 1, -1), ("free", 3, 0, 2),
        ("restore", 2, 0, 1), ("reverse", 2, 1, -1), ("free", 2, 0, 1),
        # [0,2): replay to 1, reverse step 1 from the current state (no save), then step 0.
        ("restore", 0, 0, 0), ("advance", 0, 1, -1), ("reverse", 1, 1, -1),
        ("restore", 0, 0, 0), ("reverse", 0, 1, -1), ("free", 0, 0, 0),
    ]
    assert plan.stats(4) == {"forward_steps": 5, "reversed_steps": 4, "peak_saved": 3, "num_actions": 19,
                             "fused_lengths": [1]}


def test_replay_fused_by_hand():
    # T=10, block=4: blocks [0,4) [4,8) [8,10); k=2 splits them 2 + 1.
    plan = Replay(k=2, block=4).plan(10)
    assert as_tuples(plan) == [
        ("save", 0, 0, 0), ("advance", 0, 8, -1), ("save", 8, 0, 1), ("advance", 8, 2, -1), ("output", 10, 0, -1),
        ("restore", 8, 0, 1), ("reverse", 8, 2, -1), ("free", 8, 0, 1),
        ("restore", 0, 0, 0), ("advance", 0, 4, -1), ("reverse", 4, 4, -1),
        ("restore", 0, 0, 0), ("reverse", 0, 4, -1), ("free", 0, 0, 0),
    ]
    assert plan.stats(10)["fused_lengths"] == [2, 4]
    assert plan.stats(10)["forward_steps"] == 14


def test_revolve_by_hand():
    # 4 steps, 2 slots: checkpoints at 0 and 2; [2,4) replayed from 2 with no free slot, [0,2) with one.
    assert as_tuples(Budget(states=2).plan(4)) == [
        ("save", 0, 0, 0), ("advance", 0, 2, -1), ("save", 2, 0, 1), ("advance", 2, 2, -1), ("output", 4, 0, -1),
        ("restore", 2, 0, 1), ("advance", 2, 1, -1), ("reverse", 3, 1, -1),
        ("restore", 2, 0, 1), ("reverse", 2, 1, -1), ("free", 2, 0, 1),
        ("restore", 0, 0, 0), ("advance", 0, 1, -1), ("reverse", 1, 1, -1),
        ("restore", 0, 0, 0), ("reverse", 0, 1, -1), ("free", 0, 0, 0),
    ]


# --- revolve is optimal --------------------------------------------------------


@functools.lru_cache(maxsize=None)
def dp_reverse(l: int, c: int) -> int:
    """Fewest advances to reverse l steps whose start is saved and current, with c more slots."""
    if l <= 1:
        return 0
    if c == 0:
        return l * (l - 1) // 2
    return min(dp_reverse(l, c - 1), min(m + dp_reverse(l - m, c - 1) + dp_reverse(m, c) for m in range(1, l)))


@functools.lru_cache(maxsize=None)
def dp_total(l: int, c: int) -> int:
    """Same, from state_0 saved, when the forward pass must first reach the end for the output."""
    if l == 1:
        return 1
    best = l + dp_reverse(l, 0)
    if c > 0:
        best = min(best, dp_total(l, c - 1),
                   min(m + dp_total(l - m, c - 1) + dp_reverse(m, c) for m in range(1, l)))
    return best


def test_revolve_matches_dp():
    for l in range(1, 41):
        for c in range(0, 6):
            stats = Budget(states=c + 1).plan(l).stats(l)
            assert stats["forward_steps"] == dp_total(l, c), (l, c)
            assert stats["peak_saved"] <= c + 1
            assert revolve_forward_steps(l, c + 1) == dp_total(l, c)


def test_dp_closed_form():
    # Griewank's binomial form, with s = c + 1 slots counting the segment start:
    # F(l, c) = r*l - C(s+r, s+1) where C(s+r-1, s) < l <= C(s+r, s).
    for l in range(2, 80):
        for c in range(0, 7):
            s = c + 1
            r = next(r for r in range(l + 1) if math.comb(s + r, s) >= l)
            assert dp_reverse(l, c) == r * l - math.comb(s + r, s + 1), (l, c)


def exhaustive_optimum(T: int, slots: int) -> int:
    """Fewest forward steps over ALL plans (0-1 BFS over the executor's state space)."""
    start = (0, frozenset(), T, False)  # pos (-1: consumed), saved steps, next reverse end, output done
    best = {start: 0}
    queue = collections.deque([(0, start)])
    while queue:
        cost, state = queue.popleft()
        if cost > best[state]:
            continue
        pos, saved, end, out = state
        if end == 0:
            return cost
        moves = []
        if 0 <= pos < T:
            moves.append((1, (pos + 1, saved, end, out or pos + 1 == T)))  # output right when T is reached
            if pos not in saved and len(saved) < slots:
                moves.append((0, (pos, saved | {pos}, end, out)))
        for p in saved:
            moves.append((0, (p, saved, end, out)))
            moves.append((0, (pos, saved - {p}, end, out)))
        if out and pos == end - 1:
            moves.append((0, (-1, saved, pos, out)))
        for step, nxt in moves:
            if cost + step < best.get(nxt, math.inf):
                best[nxt] = cost + step
                (queue.appendleft if step == 0 else queue.append)((cost + step, nxt))
    raise AssertionError("no plan found")


def test_revolve_matches_exhaustive_search():
    for T in range(1, 8):
        for slots in range(1, 4):
            assert Budget(states=slots).plan(T).stats(T)["forward_steps"] == exhaustive_optimum(T, slots), (T, slots)


def test_large_plans_are_fast():
    start = time.perf_counter()
    revolve = Budget(states=20).plan(100_000).stats(100_000)
    replay = Replay(k=2).plan(100_000).stats(100_000)
    one = Budget(states=1).plan(100_000).stats(100_000)
    assert time.perf_counter() - start < 2.0
    assert revolve["peak_saved"] <= 20 and revolve["forward_steps"] == revolve_forward_steps(100_000, 20)
    assert replay["peak_saved"] <= 1 + ceil_log(2, 100_000)
    assert one["forward_steps"] == 100_000 + 100_000 * 99_999 // 2


# --- budgets -------------------------------------------------------------------


def test_budget_bytes_become_states():
    plan = Budget(bytes=10 * 4096 + 4095).plan(1000, state_bytes=4096)
    stats = plan.stats(1000)
    assert stats["peak_saved"] == 10
    assert stats["forward_steps"] == 3640
    assert Budget(bytes=10 * 4096).slots(4096) == 10
    assert Budget(states=7).slots() == 7


# --- CheckPlan rejects broken plans --------------------------------------------

BROKEN = [
    # (T, actions, message)
    (2, [("save", 0, 0, 0), ("advance", 1, 1)], "wrong position: needs the state at step 1 but the current state is at step 0"),
    (2, [("save", 0, 0, 0), ("advance", 0, 2), ("output", 2), ("restore", 0, 0, 0), ("reverse", 0, 1)],
     "reverse out of order: the next reverse must end at step 1"),
    (2, [("save", 0, 0, 0), ("save", 0, 0, 0)], "slot misuse: slot 0 already holds step 0"),
    (2, [("restore", 0, 0, 3)], "slot misuse: slot 3 is empty"),
    (2, [("save", 0, 0, 0), ("advance", 0, 1), ("restore", 1, 0, 0)], "slot misuse: slot 0 holds step 0, not step 1"),
    (2, [("save", 0, 0, 0), ("free", 1, 0, 0)], "slot misuse: slot 0 holds step 0, not step 1"),
    (2, [("save", 0, 0, -1)], "slot misuse: negative slot"),
    (1, [("save", 0, 0, 0), ("advance", 0, 1), ("restore", 0, 0, 0)], "missing output"),
    (1, [("save", 0, 0, 0), ("advance", 0, 1)], "missing output"),
    (1, [("advance", 0, 1), ("output", 1), ("output", 1)], "a second output"),
    (2, [("advance", 0, 1), ("output", 1)], "output needs the final state at step T = 2"),
    (2, [("save", 0, 0, 0), ("reverse", 0, 1)], "reverse before the output"),
    (1, [("advance", 0, 2)], "advance past the last step"),
    (1, [("advance", 0, 0)], "advance count must be >= 1"),
    (2, [("save", 1, 0, 0)], "wrong position"),
    (2, [("save", 0, 0, 0), ("advance", 0, 1), ("save", 1, 0, 1), ("advance", 1, 1), ("output", 2),
         ("restore", 1, 0, 1), ("reverse", 1, 1), ("reverse", 0, 1)], "consumed by the previous reverse"),
    (2, [("save", 0, 0, 0), ("advance", 0, 1), ("save", 1, 0, 1), ("advance", 1, 1), ("output", 2),
         ("restore", 1, 0, 1), ("reverse", 1, 1), ("free", 1, 0, 1), ("free", 0, 0, 0)],
     "step not reversed: steps 0..0 were never reversed"),
    (1, [("save", 0, 0, 0), ("advance", 0, 1), ("output", 1), ("restore", 0, 0, 0), ("reverse", 0, 1)],
     "slot misuse: slot 0 \\(step 0\\) is never freed"),
]


@pytest.mark.parametrize("T,specs,message", BROKEN)
def test_check_plan_rejects(T, specs, message):
    with pytest.raises(PlanError, match=message):
        actions(*specs).stats(T)


def test_check_plan_error_names_the_action():
    with pytest.raises(RuntimeError, match=r"action #1 advance\(step=1, count=1\)"):
        actions(("save", 0, 0, 0), ("advance", 1, 1)).stats(2)


def test_check_plan_accepts_a_hand_made_plan():
    plan = actions(("advance", 0, 1), ("save", 1, 0, 0), ("advance", 1, 1), ("output", 2), ("restore", 1, 0, 0),
                   ("reverse", 1, 1), ("free", 1, 0, 0), ("reverse", 0, 1))
    with pytest.raises(PlanError, match="consumed"):  # nothing holds state_0
        plan.stats(2)
    fused = actions(("save", 0, 0, 0), ("advance", 0, 2), ("output", 2), ("restore", 0, 0, 0), ("reverse", 0, 2),
                    ("free", 0, 0, 0))
    assert fused.stats(2) == {"forward_steps": 2, "reversed_steps": 2, "peak_saved": 1, "num_actions": 6,
                              "fused_lengths": [2]}


# --- the Python objects ----------------------------------------------------------


def test_plan_object():
    plan = Replay(k=2).plan(4)
    assert len(plan) == 19 and len(list(plan)) == 19
    assert plan[-1] == Action("free", 0, 0, 0) and plan[0] == plan[-len(plan)]
    with pytest.raises(IndexError):
        plan[19]
    assert repr(plan[1]) == "advance(step=0, count=2)"
    assert repr(plan[0]) == "save(slot=0, step=0)"
    assert repr(plan[6]) == "output(step=4)"
    assert str(plan).splitlines() == [repr(a) for a in plan]
    assert Plan(list(plan)).stats(4) == plan.stats(4)
    assert Plan(plan).stats(4) == plan.stats(4)  # a Plan is a sequence of Actions
    assert issubclass(PlanError, RuntimeError)


# --- bad arguments -------------------------------------------------------------------


@pytest.mark.parametrize("make,message", [
    (lambda: Replay(k=1), r"Replay: k must be in \[2, 2147483647\], got 1"),
    (lambda: Replay(k=4, block=0), r"Replay: block must be in \[1, 9223372036854775807\], got 0"),
    (lambda: Periodic(every=0), r"Periodic: every must be in \[1, 9223372036854775807\], got 0"),
    (lambda: Periodic(every=6, block=4), r"every \(6\) must be a multiple of block \(4\)"),
    (lambda: Budget(), "exactly one of states=, bytes= or k="),
    (lambda: Budget(states=2, bytes=100), "exactly one of states=, bytes= or k="),
    (lambda: Budget(states=2, k=4), "exactly one of states=, bytes= or k="),
    (lambda: Budget(k=1), r"Budget: k must be in \[2, 2147483647\], got 1"),
    (lambda: Budget(states=0), r"Budget: states must be in \[1, 2147483647\], got 0"),
    (lambda: Budget(bytes=0), r"Budget: bytes must be in \[1, 9223372036854775807\], got 0"),
    (lambda: Budget(bytes=100).plan(10, state_bytes=4096), r"holds 0 states of 4096 bytes; the minimum is 1 state"),
    (lambda: Budget(bytes=100).plan(10), r"state_bytes must be in \[1, 9223372036854775807\], got 0"),
    (lambda: Replay().plan(0), r"steps must be in \[1, 2147483647\], got 0"),
    (lambda: StoreAll().plan(-3), r"steps must be in \[1, 2147483647\], got -3"),
    (lambda: schedules.plan_replay(10, 1), r"REPLAY needs k >= 2"),
    (lambda: schedules.plan_revolve(10, 0), r"revolve needs slots >= 1"),
    (lambda: schedules.plan_periodic(10, 6, 4), r"every \(6\) must be a multiple of block \(4\)"),
    (lambda: schedules.plan_store_all(0), r"T >= 1"),
    (lambda: schedules.plan_replay(10, 2, 0), r"block must be >= 1"),
    (lambda: Action("jump", 0), r"unknown action kind 'jump'"),
    (lambda: Plan([]).stats(0), r"T >= 1"),
])
def test_bad_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_types():
    with pytest.raises(TypeError, match="k must be an int"):
        Replay(k=2.5)
    with pytest.raises(TypeError, match="steps must be an int"):
        Replay().plan("10")
