"""A small regression MLP (3 -> 8 -> tanh -> 1) shared by the numeric-agreement tests.

Weights and data are NumPy arrays from a fixed seed, so the JAX, NumPy-reference
and PyTorch sides can start from identical values.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

N_IN, N_HIDDEN, N_OUT, N_POINTS = 3, 8, 1, 32


def init_weights(seed: int = 0) -> dict:
  """Float64 weights laid out as x @ w + b (w has shape (fan_in, fan_out))."""
  rng = np.random.default_rng(seed)
  return {
    "hidden": {
      "w": rng.normal(0.0, 0.6, (N_IN, N_HIDDEN)),
      "b": rng.normal(0.0, 0.1, (N_HIDDEN,)),
    },
    "out": {
      "w": rng.normal(0.0, 0.6, (N_HIDDEN, N_OUT)),
      "b": rng.normal(0.0, 0.1, (N_OUT,)),
    },
  }


def make_data(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Inputs x (32, 3) and targets y (32, 1) of a smooth function, scaled so that the
  first gradients are larger than 1 (clipping at 0.5 or 1.0 is exercised)."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1.0, 1.0, (N_POINTS, N_IN))
  y = 3.0 * np.sin(x @ np.array([[1.5], [-1.0], [0.5]])) + 1.0
  return x, y


def predict(params, x):
  hidden = jnp.tanh(x @ params["hidden"]["w"] + params["hidden"]["b"])
  return hidden @ params["out"]["w"] + params["out"]["b"]


def objective(params, x, y):
  """What the tests MAXIMIZE: minus the mean squared error."""
  return -jnp.mean((predict(params, x) - y) ** 2)


def as_jax(tree: dict, dtype) -> dict:
  return {layer: {k: jnp.asarray(v, dtype) for k, v in p.items()} for layer, p in tree.items()}
