"""Metagradient descent (MGD): optimize a metaparameter ``z`` with metagradients.

See :func:`run`; the step rules, projections and :class:`History` are pure and
composable, in the style of Optax.
"""

from metagrad._src.mgd import (
    History, StepRule, adam, box, cosine_decay, gradient_step, leafwise, pixel_range, run, sign_step, simplex, top_k,
)

__all__ = [
    "History", "StepRule", "adam", "box", "cosine_decay", "gradient_step", "leafwise", "pixel_range", "run",
    "sign_step", "simplex", "top_k",
]
