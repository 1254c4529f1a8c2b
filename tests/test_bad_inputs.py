"""Bad or extreme inputs through gradient_ascent that no one module answers.

None and MaskedNode leaves, empty trees, non-finite gradients (and
optax.apply_if_finite), zero gradients, the step counter at the int32
maximum, complex numbers through Optax. The checks of one module are in its
test file: tests/test_state_checks.py (state and leaves), tests/test_numerics.py
(precision), tests/test_validation.py (invalid hyperparameters).
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from tests._reference import BETA
from tests._reference import EPS
from tests._reference import FIRST_STEP
from tests._reference import LR
from tests._reference import MOMENTUM
from tests._reference import ReferenceGradientAscent

INT32_MAX = 2**31 - 1


def quiet(**kwargs):
  return gax.gradient_ascent(**{"logging_interval": None, **kwargs})


# None / MaskedNode leaves, empty trees ----------------------------------------


def test_none_and_masked_node_leaves_pass_through():
  params = {"w": jnp.zeros(2), "frozen": None, "masked": optax.MaskedNode()}
  grads = {"w": jnp.ones(2), "frozen": None, "masked": optax.MaskedNode()}
  tx = quiet()
  for update in (tx.update, jax.jit(tx.update)):
    updates, state = update(grads, tx.init(params))
    assert updates["frozen"] is None and updates["masked"] == optax.MaskedNode()
    np.testing.assert_allclose(updates["w"], FIRST_STEP, rtol=1e-6)
    assert state[1].second_moment["frozen"] is None


def test_empty_pytree():
  tx = gax.gradient_ascent(logging_interval=1)
  for update in (tx.update, jax.jit(tx.update)):
    state = tx.init({})
    updates, state = update({}, state)
    assert updates == {}
    assert int(state[-1].count) == 1 and int(state[0].count) == 1


# Non-finite gradients ---------------------------------------------------------


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_gradient_without_protection_gives_nan(bad):
  tx = quiet()
  state = tx.init(jnp.zeros(2))
  updates, state = tx.update(jnp.array([bad, 1.0]), state)
  # NaN propagates; inf gives inf / sqrt(inf) = NaN (the second moment then
  # saturates at finfo.max); the other element is fine.
  assert np.isnan(updates[0]) and np.isnan(state[2].velocity[0])
  expected_moment = np.nan if np.isnan(bad) else np.finfo(np.float32).max
  np.testing.assert_array_equal(state[1].second_moment[0], expected_moment)
  np.testing.assert_allclose(updates[1], FIRST_STEP, rtol=1e-6)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_apply_if_finite_protects_params_and_state(bad):
  tx = optax.apply_if_finite(quiet(), max_consecutive_errors=3)
  params = jnp.zeros(2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  updates, state = step(jnp.array([1.0, -1.0]), state, params)
  params = optax.apply_updates(params, updates)
  before_params, before_inner = params, state.inner_state

  updates, state = step(jnp.array([bad, 1.0]), state, params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params, before_params)
  for after, before in zip(
    jax.tree.leaves(state.inner_state), jax.tree.leaves(before_inner), strict=True
  ):
    np.testing.assert_array_equal(after, before)
  assert int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1

  updates, state = step(jnp.array([1.0, -1.0]), state, params)  # recovers
  assert int(state.notfinite_count) == 0 and np.all(np.asarray(updates) != 0)
  assert int(state.inner_state[-1].count) == 2


# Zero gradients -------------------------------------------------------------------


@pytest.mark.slow  # 2 s or more on 2 cores
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_all_zero_gradients_give_zero_updates(dtype):
  tx = quiet(nesterov=True, clip_value=1.0, warmup_steps=2, lr_decay=0.9)
  params = {"w": jnp.zeros((2, 3), dtype), "b": jnp.zeros((), dtype)}
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state)
    for leaf in jax.tree.leaves((updates, state[:-1])):
      np.testing.assert_array_equal(np.asarray(leaf, np.float64), 0.0)  # no NaN: 0/(0+eps)


# Step counter at the int32 maximum ------------------------------------------------


def with_count(state, count):
  count = jnp.asarray(count, jnp.int32)
  return tuple(
    s._replace(count=count)
    if isinstance(s, (gax.ScaleByWarmupDecayState, gax.LogProgressState))
    else s
    for s in state
  )


@pytest.mark.parametrize(
  ("lr_decay", "expected_rate"),
  # warmup factor min(1, 2**31 / 100) = 1; 0.5**(2**31 - 1) underflows to 0.
  [(None, LR), (1.0, LR), (0.5, 0.0)],
)
def test_step_counter_saturates_at_int32_max(lr_decay, expected_rate):
  tx = gax.gradient_ascent(lr_decay=lr_decay, warmup_steps=100, logging_interval=1000)
  params = jnp.zeros(2)
  state = with_count(tx.init(params), INT32_MAX - 1)
  step = jax.jit(tx.update)
  for _ in range(3):  # INT32_MAX - 1 -> INT32_MAX -> stays there
    updates, state = step(jnp.array([1.0, -1.0]), state, params)
    assert np.isfinite(np.asarray(updates)).all()
  assert int(state[0].count) == INT32_MAX and int(state[-1].count) == INT32_MAX
  rate = gax.warmup_decay_schedule(LR, 100, lr_decay)(state[-1].count)
  assert np.isfinite(float(rate))
  np.testing.assert_allclose(float(rate), expected_rate, rtol=1e-6)
  # Third step, |h| = 1: m_t = 1 - beta**t, s_t = 1 / sqrt(m_t), v_3 = .81 s_1 + .9 s_2 + s_3.
  s = [1 / (math.sqrt(1 - BETA**t) + EPS) for t in (1, 2, 3)]
  v = MOMENTUM**2 * s[0] + MOMENTUM * s[1] + s[2]
  np.testing.assert_allclose(np.asarray(updates), expected_rate * v * np.array([1, -1]), rtol=1e-5)


# Complex numbers: what works ------------------------------------------------

COMPLEX_GRADS = {"layer": {"w": jnp.array([3.0 + 4.0j, 12.0j], jnp.complex64)}}


def test_linear_stages_work_on_complex_updates(caplog):
  # flip_sign and scale_by_warmup_decay are linear: defined for complex numbers.
  caplog.set_level(logging.INFO, logger="gradient_ascent_jax")
  for tx, factor in [(gax.flip_sign(), -1.0), (gax.scale_by_warmup_decay(0.5, 2), -0.25)]:
    updates, _ = tx.update(COMPLEX_GRADS, tx.init(COMPLEX_GRADS))
    assert updates["layer"]["w"].dtype == jnp.complex64
    np.testing.assert_allclose(updates["layer"]["w"], factor * np.array([3 + 4j, 12j]), rtol=1e-6)
  # log_progress passes them through and logs sqrt(|3+4i|**2 + |12i|**2) = 13.
  tx = gax.log_progress(1, 0.1)
  updates, _ = tx.update(COMPLEX_GRADS, tx.init(COMPLEX_GRADS))
  assert updates is COMPLEX_GRADS
  [record] = [r for r in caplog.records if r.name == "gradient_ascent_jax"]
  np.testing.assert_allclose(record.grad_norm, 13.0, rtol=1e-6)


def test_maximize_of_a_complex_capable_optimizer_descends_on_the_negated_gradient():
  params = {"z": jnp.array([1.0 + 2.0j, -0.5j], jnp.complex64)}
  grads = {"z": jnp.array([0.3 - 1.0j, 2.0 + 0.5j], jnp.complex64)}
  tx = gax.maximize(optax.adam(0.1))
  state = tx.init(params)
  reference, reference_state = optax.adam(0.1), optax.adam(0.1).init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    expected, reference_state = reference.update(
      jax.tree.map(jnp.negative, grads), reference_state, params
    )
    np.testing.assert_allclose(updates["z"], expected["z"], rtol=1e-6)


def test_split_real_and_imaginary_runs_gradient_ascent_on_both_parts():
  # The fix the complex errors name: real and imaginary parts as two real
  # parameters, against the float64 NumPy reference on those parts.
  z = jnp.array([1.0 + 2.0j, -0.5 + 0.25j], jnp.complex64)
  grads = [jnp.array([0.3 - 1.0j, 2.0 + 0.5j]), jnp.array([-1.0 + 0.1j, 0.5 - 3.0j])]
  tx = optax.contrib.split_real_and_imaginary(gax.gradient_ascent(0.1, clip_value=1.5))
  state = tx.init(z)
  reference = ReferenceGradientAscent(0.1, clip_value=1.5)
  for g in grads * 2:
    updates, state = tx.update(g.astype(jnp.complex64), state, z)
    z = optax.apply_updates(z, updates)
    real, imaginary = reference.step([np.real(g), np.imag(g)])
    np.testing.assert_allclose(updates, real + 1j * imaginary, rtol=2e-5)


def test_complex_params_reach_the_maximum_with_the_conjugated_gradient():
  # As the complex errors say: conjugate JAX's gradient. Unconjugated, the
  # imaginary parts move away from the maximum at c.
  c = jnp.array([1.0 + 2.0j, -3.0 - 1.0j], jnp.complex64)

  def objective(z):
    return -jnp.sum(jnp.abs(z - c) ** 2)

  ends = {}
  for conjugate in (True, False):
    tx = optax.contrib.split_real_and_imaginary(gax.gradient_ascent(0.05))
    z = jnp.zeros(2, jnp.complex64)
    state = tx.init(z)
    for _ in range(300):
      grad = jax.grad(objective)(z)
      updates, state = tx.update(jnp.conj(grad) if conjugate else grad, state, z)
      z = optax.apply_updates(z, updates)
    ends[conjugate] = z
  np.testing.assert_allclose(ends[True], c, atol=1e-3)
  assert np.all(np.abs(np.imag(ends[False] - c)) > 100)
