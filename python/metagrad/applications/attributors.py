"""Cheap data-attribution methods, the baselines of the exact metagradient.

Every method returns scores ``[m, n]`` in the metagradient's convention:
``scores[j, i]`` estimates ``d loss_j / d z_i``, how test example ``j``'s loss
changes when training example ``i``'s weight in the training objective
``mean_i(z_i * loss_i) + reg`` grows (positive: example ``i`` hurts ``j``).
Removing a set ``S`` is then predicted to change ``loss_j`` by
``-sum_{i in S} scores[j, i]``.

They need only the trained model (and, for TracIn, its checkpoints), not the
training run; they take per-example gradients (:func:`per_example_grads`), so
one set serves every method and hyperparameter:

* :func:`grad_dot`: ``-grad loss_j . grad loss_i`` at the final model (one SGD
  step's effect);
* :func:`tracin`: the same summed over checkpoints, weighted by the learning
  rate (Pruthi et al., TracIn);
* :func:`influence`: ``-(1/n) grad loss_j^T (H + damping I)^{-1} grad loss_i``
  with ``H`` the Hessian of the training objective at the final model, solved
  by conjugate gradients (Koh & Liang's influence functions): exact at the
  optimum of a strongly convex objective;
* :func:`trak`: random projections of per-example gradients of the margin and
  a ridge-regularized kernel inverse (Park et al., TRAK, one model).

``objective(params, *args) -> scalar`` is the full training objective.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

__all__ = ["per_example_grads", "grad_dot", "tracin", "influence", "trak_features", "trak"]


@functools.lru_cache(maxsize=None)
def _grads_fn(per_example_loss: Callable):
    def one(params, xi, yi):
        g = jax.grad(lambda q: per_example_loss(q, xi[None], yi[None])[0])(params)
        return ravel_pytree(g)[0]

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


def per_example_grads(per_example_loss: Callable, params, x, y, chunk: int = 256) -> jnp.ndarray:
    """``[b, p]``: the gradient of each example's loss with respect to the params (flattened by
    ``jax.flatten_util.ravel_pytree``). Compiled once per ``per_example_loss`` object: reuse it."""
    fn = _grads_fn(per_example_loss)
    x, y = jnp.asarray(x), jnp.asarray(y)
    return jnp.concatenate([fn(params, x[i:i + chunk], y[i:i + chunk]) for i in range(0, x.shape[0], chunk)], axis=0)


def grad_dot(g_test, g_train) -> np.ndarray:
    """``-grad loss_j . grad loss_i`` from per-example gradients at one model."""
    return -np.asarray(g_test @ g_train.T, np.float64)


def tracin(grads, lrs) -> np.ndarray:
    """``-sum_c lr_c grad loss_j(theta_c) . grad loss_i(theta_c)``; ``grads``: ``(g_test, g_train)`` per
    checkpoint ``c``, ``lrs``: the learning rate (summed over the steps) each checkpoint stands for."""
    return sum(float(lr) * grad_dot(g_test, g_train) for (g_test, g_train), lr in zip(grads, lrs))


@functools.lru_cache(maxsize=None)
def _influence_solver(objective: Callable, cg_steps: int):
    def solve(params, g_test, damping, args):
        flat, unravel = ravel_pytree(params)
        grad = jax.grad(lambda q: objective(unravel(q), *args))

        def hvp(v):
            return jax.jvp(grad, (flat,), (v,))[1] + damping * v

        return jax.vmap(lambda b: jax.scipy.sparse.linalg.cg(hvp, b, maxiter=cg_steps, tol=1e-6)[0])(g_test)

    return jax.jit(solve)


def influence(objective: Callable, params, g_test, g_train, *, damping: float, args=(), cg_steps: int = 100
              ) -> np.ndarray:
    """``-(1/n) grad loss_j^T (H + damping I)^{-1} grad loss_i``; ``H`` is the Hessian of
    ``objective(params, *args)`` at ``params``, inverted on the ``m`` test gradients by conjugate gradients
    (``cg_steps`` at most). Compiled once per ``objective`` object: reuse it."""
    s_test = _influence_solver(objective, int(cg_steps))(params, g_test, jnp.float32(damping), tuple(args))
    return -np.asarray(s_test @ g_train.T, np.float64) / g_train.shape[0]


def trak_features(g_test, g_train, *, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(phi_test, phi_train)``: per-example gradients (of the margin) projected to ``dim`` dimensions by a
    Gaussian matrix."""
    proj = jax.random.normal(jax.random.PRNGKey(seed), (g_train.shape[1], dim)) / np.sqrt(dim)
    return np.asarray(g_test @ proj, np.float64), np.asarray(g_train @ proj, np.float64)


def trak(phi_test, phi_train, p_train, *, ridge: float) -> np.ndarray:
    """TRAK with one model: ``scores[j, i] = -phi_j^T (Phi^T Phi + ridge * mean eig * I)^{-1} phi_i (1 - p_i)``,
    ``p_i`` the probability the model gives example ``i``'s label."""
    kernel = phi_train.T @ phi_train
    kernel = kernel + ridge * np.trace(kernel) / kernel.shape[0] * np.eye(kernel.shape[0])
    return -(phi_test @ np.linalg.solve(kernel, phi_train.T)) * (1.0 - np.asarray(p_train, np.float64))[None, :]
