"""JAX's own autodiff for a metagrad Task: the peers metagrad is measured against.

``train`` runs the task in one ``lax.scan``; ``scan_metagradient`` is
``jax.grad`` through that scan (all states stored, or ``jax.checkpoint``
segments); ``replay_metagradient`` is REPLAY driven from Python;
``memory_stats`` is the compiled device memory of each one's program.
"""

from metagrad._src.baselines import clear_cache, memory_stats, replay_metagradient, scan_metagradient, train

__all__ = ["clear_cache", "memory_stats", "replay_metagradient", "scan_metagradient", "train"]
