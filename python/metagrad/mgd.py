"""Metagradient descent (MGD): optimize a metaparameter ``z`` with metagradients.

See :func:`run`: the step rule is any ``optax.GradientTransformation``
(:func:`sign_step` is the paper's); the projections and :class:`History` are
pure and composable.
"""

from metagrad._src.mgd import History, box, leafwise, pixel_range, run, sign_step, simplex, top_k

__all__ = ["History", "box", "leafwise", "pixel_range", "run", "sign_step", "simplex", "top_k"]
