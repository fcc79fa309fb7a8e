"""Checkpointing schedules: how the reverse pass gets the states it needs.

Pass one as ``CompiledTask.metagradient(z, schedule=...)``; ``schedule.plan(T)``
returns the plan (a C++ action list) for inspection. :class:`Auto` (the
default) chooses the plan from the task's costs: :func:`choose` is that
search (plans predicted within :data:`NEAR_TIE` of the fastest are a tie,
which goes to the fewest executions), :func:`choose_with_gaps` the second
search the default ``Auto`` makes, over the lengths :data:`GAP_BLOCKS`, where
its first choice has shorter blocks than the longest; :func:`simulate_plan`
the prediction of a plan's seconds and peak device (and host) bytes from a :class:`CostTable`,
and :func:`host_slot_order` the order in which the planner moves a plan's
slots to host memory.
"""

from metagrad._runtime import CostTable, ProgramCost, host_slot_order, simulate_plan
from metagrad._src.planner import GAP_BLOCKS, NEAR_TIE, Auto, Choice, DeviceMemoryError, choose, choose_with_gaps
from metagrad._src.schedules import (
    Action, Budget, Periodic, Plan, PlanError, Replay, StoreAll, plan_periodic, plan_replay, plan_revolve,
    plan_store_all, revolve_forward_steps,
)

__all__ = [
    "GAP_BLOCKS", "NEAR_TIE", "Action", "Auto", "Budget", "Choice", "CostTable", "DeviceMemoryError", "Periodic",
    "Plan", "PlanError", "ProgramCost", "Replay", "StoreAll", "choose", "choose_with_gaps", "host_slot_order",
    "plan_periodic", "plan_replay", "plan_revolve", "plan_store_all", "revolve_forward_steps", "simulate_plan",
]
