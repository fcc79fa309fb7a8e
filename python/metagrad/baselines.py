"""JAX's own autodiff for a metagrad Task: the peers metagrad is measured against.

``train`` runs the task in one ``lax.scan``; ``scan_metagradient`` is
``jax.grad`` through that scan (all states stored, or ``jax.checkpoint``
segments); ``replay_metagradient`` is REPLAY driven from Python.
"""

from metagrad._src.baselines import clear_cache, replay_metagradient, scan_metagradient, train

__all__ = ["clear_cache", "replay_metagradient", "scan_metagradient", "train"]
