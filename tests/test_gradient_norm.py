"""The logged gradient norm (gradient_ascent_jax/_src/gradient_norm.py)."""

import logging

import jax
import jax.numpy as jnp
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


# Subnormal gradients: XLA:CPU reads subnormal inputs as 0 (denormals-are-zero), before
# any arithmetic, so no lift by a power of two can see them (docs/guide/math.md). ----

cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu",
                              reason="measured on XLA:CPU, which flushes subnormal inputs")


@cpu_only
# 2**-133: the smallest bfloat16 subnormal; 2**-127: the largest power of two below normal.
@pytest.mark.parametrize("element", [2.0**-133, 1e-39, 2.0**-127], ids=["2**-133", "1e-39", "2**-127"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_subnormal_gradient_has_norm_zero_as_in_jnp_linalg_norm(dtype, element):
  grads = {"w": jnp.full((4,), element, dtype)}
  # The bits are there (a subnormal, not 0): only XLA's arithmetic flushes them.
  assert np.asarray(grads["w"], np.float64)[0] > 0
  assert float(gradient_norm.global_norm(grads)) == 0.0
  assert float(jax.jit(gradient_norm.global_norm)(grads)) == 0.0
  assert float(jnp.linalg.norm(grads["w"].astype(jnp.float32))) == 0.0
  # The step sees a zero gradient too: it moves nothing, as the log says.
  tx = gax.gradient_ascent(learning_rate=0.01)
  updates, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_array_equal(np.asarray(updates["w"], np.float32), 0.0)


@cpu_only
def test_float64_subnormals_have_norm_zero_and_the_smallest_normal_is_right(x64):
  tiny = float(jnp.finfo(jnp.float64).tiny)  # 2**-1022
  norm = jax.jit(gradient_norm.global_norm)
  assert float(norm({"w": jnp.full((4,), tiny / 2, jnp.float64)})) == 0.0
  np.testing.assert_allclose(float(norm({"w": jnp.full((4,), tiny, jnp.float64)})), 2 * tiny,
                             rtol=1e-12)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    ("make_tree", "norm"),
    [(lambda: {"w": jnp.full((4,), 1e-100)}, 2e-100), (lambda: {"t": 1e-100, "u": 1e-100}, 2**0.5 * 1e-100)],
    ids=["jnp_full", "python_floats"],
)
def test_weakly_typed_float64_leaves_stay_float64(x64, make_tree, norm, jit):
  # jnp.full with a Python float, or a Python float, is weakly typed: promoted with
  # float32 it gave float32, where 1e-100 is 0.
  norm_of = jax.jit(gradient_norm.global_norm) if jit else gradient_norm.global_norm
  got = norm_of(make_tree())
  assert got.dtype == jnp.float64
  np.testing.assert_allclose(float(got), norm, rtol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_smallest_normal_gradient_is_right_where_jnp_linalg_norm_underflows(dtype):
  tiny = float(jnp.finfo(dtype).tiny)  # 2**-126 in both
  grads = {"w": jnp.full((4,), tiny, dtype)}
  np.testing.assert_allclose(float(jax.jit(gradient_norm.global_norm)(grads)), 2 * tiny, rtol=1e-6)
  # Its squares underflow in float32: jnp.linalg.norm gives 0 (measured).
  assert float(jnp.linalg.norm(grads["w"].astype(jnp.float32))) == 0.0


def test_float16_subnormals_are_right_being_normal_in_float32():
  grads = {"w": jnp.full((4,), 2.0**-24, jnp.float16)}  # the smallest float16 subnormal
  np.testing.assert_allclose(float(jax.jit(gradient_norm.global_norm)(grads)), 2.0**-23, rtol=1e-6)
