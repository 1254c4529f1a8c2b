"""The logged gradient norm (gradient_ascent_jax/_src/gradient_norm.py)."""

import logging

import jax
import numpy as np
import pytest

import gradient_ascent_jax as gax
from gradient_ascent_jax._src import gradient_norm

# Python-float leaves: op by op, a leaf of its own was read as an array (.ndim). --


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    ("tree", "norm"),
    [({"t": 0.5}, 0.5), ({"t": -3.0, "u": 4.0}, 5.0), ({"t": 2.0, "u": np.ones(2)}, np.sqrt(6.0))],
    ids=["one", "two", "with_an_array"],
)
def test_norm_of_python_float_leaves(tree, norm, jit):
  norm_of = jax.jit(gradient_norm.global_norm) if jit else gradient_norm.global_norm
  np.testing.assert_allclose(norm_of(tree), norm, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("names", [("t",), ("t", "u")], ids=["one", "two"])
def test_logging_step_on_python_float_leaves(names, jit, caplog):
  # tx.update({"t": 0.5}, ...) op by op raised AttributeError: 'float' object has
  # no attribute 'ndim'.
  params = dict.fromkeys(names, 1.0)
  grads = dict.fromkeys(names, 0.5)
  tx = gax.gradient_ascent(learning_rate=0.01, logging_interval=1)
  update = jax.jit(tx.update) if jit else tx.update
  with caplog.at_level(logging.INFO, logger="gradient_ascent_jax"):
    updates, _ = update(grads, tx.init(params), params)
    jax.effects_barrier()
  # First step: lr * g / sqrt((1 - beta) g**2) = 0.01 / sqrt(0.001) for g > 0.
  np.testing.assert_allclose([updates[name] for name in names], 0.01 / np.sqrt(0.001), rtol=1e-5)
  (record,) = [r for r in caplog.records if r.name == "gradient_ascent_jax"]
  np.testing.assert_allclose(record.grad_norm, 0.5 * np.sqrt(len(names)), rtol=1e-6)
