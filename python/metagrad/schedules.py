"""Checkpointing schedules: how the reverse pass gets the states it needs.

Pass one as ``CompiledTask.metagradient(z, schedule=...)``; ``schedule.plan(T)``
returns the plan (a C++ action list) for inspection.
"""

from metagrad._src.schedules import (
    Action, Budget, Periodic, Plan, PlanError, Replay, StoreAll, plan_periodic, plan_replay, plan_revolve,
    plan_store_all, revolve_forward_steps,
)

__all__ = [
    "Action", "Budget", "Periodic", "Plan", "PlanError", "Replay", "StoreAll", "plan_periodic", "plan_replay",
    "plan_revolve", "plan_store_all", "revolve_forward_steps",
]
