"""warmup_decay_schedule (gradient_ascent_jax/_src/schedules.py) against hand-worked values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax


def rates(schedule, steps):
  return [float(schedule(k)) for k in range(steps)]


def test_constant():
  schedule = gax.warmup_decay_schedule(0.1)
  np.testing.assert_allclose(rates(schedule, 3) + [float(schedule(1000))], [0.1] * 4, rtol=1e-7)


def test_warmup_only():
  # lr_k = 0.5 * min(1, (k+1)/4): the first step already uses lr/4.
  schedule = gax.warmup_decay_schedule(0.5, warmup_steps=4)
  np.testing.assert_allclose(
    rates(schedule, 7), [0.125, 0.25, 0.375, 0.5, 0.5, 0.5, 0.5], rtol=1e-7
  )


def test_warmup_of_one_step_is_constant():
  # min(1, (k+1)/1) = 1 for every k >= 0.
  np.testing.assert_allclose(
    rates(gax.warmup_decay_schedule(0.5, warmup_steps=1), 3), [0.5] * 3, rtol=1e-7
  )


def test_decay_only():
  # lr_k = 0.5 * 0.5^k
  schedule = gax.warmup_decay_schedule(0.5, lr_decay=0.5)
  np.testing.assert_allclose(rates(schedule, 4), [0.5, 0.25, 0.125, 0.0625], rtol=1e-7)


def test_decay_of_one_is_constant():
  np.testing.assert_allclose(
    rates(gax.warmup_decay_schedule(0.5, lr_decay=1.0), 3), [0.5] * 3, rtol=1e-7
  )


def test_warmup_and_decay():
  # lr_k = 1.0 * 0.5^k * min(1, (k+1)/3)
  #   k=0: 1 * 1/3 = 1/3     k=1: 0.5 * 2/3 = 1/3     k=2: 0.25 * 1 = 0.25
  #   k=3: 0.125             k=4: 0.0625
  schedule = gax.warmup_decay_schedule(1.0, warmup_steps=3, lr_decay=0.5)
  np.testing.assert_allclose(rates(schedule, 5), [1 / 3, 1 / 3, 0.25, 0.125, 0.0625], rtol=1e-6)


def test_callable_base_schedule():
  # base(k) = linear 1.0 -> 0.0 over 4 steps = 1 - k/4
  # lr_k = base(k) * 0.5^k * min(1, (k+1)/2)
  #   k=0: 1    * 1     * 1/2 = 0.5
  #   k=1: 0.75 * 0.5   * 1   = 0.375
  #   k=2: 0.5  * 0.25        = 0.125
  #   k=3: 0.25 * 0.125       = 0.03125
  #   k=4: 0    * ...         = 0
  base = optax.linear_schedule(init_value=1.0, end_value=0.0, transition_steps=4)
  schedule = gax.warmup_decay_schedule(base, warmup_steps=2, lr_decay=0.5)
  np.testing.assert_allclose(
    rates(schedule, 5), [0.5, 0.375, 0.125, 0.03125, 0.0], rtol=1e-6, atol=1e-12
  )


def test_schedule_drives_an_optax_optimizer():
  # As an optax.Schedule it is usable by any Optax optimizer: sgd step k is -lr_k * g.
  tx = optax.sgd(gax.warmup_decay_schedule(0.5, warmup_steps=4))
  params = jnp.zeros(1)
  state = tx.init(params)
  seen = []
  for _ in range(5):
    updates, state = tx.update(jnp.ones(1), state, params)
    seen.append(float(updates[0]))
  np.testing.assert_allclose(seen, [-0.125, -0.25, -0.375, -0.5, -0.5], rtol=1e-7)


def test_traced_warmup_steps_under_jit():
  traces = []

  @jax.jit
  def rate(warmup_steps, count):
    traces.append(None)
    return gax.warmup_decay_schedule(0.5, warmup_steps=warmup_steps, lr_decay=0.5)(count)

  # warmup 4: lr_k = 0.5 * 0.5^k * min(1, (k+1)/4)
  #   k=0: 0.125   k=1: 0.125   k=2: 0.09375   k=5: 0.5 * 0.03125 = 0.015625
  got = [float(rate(jnp.int32(4), jnp.int32(k))) for k in (0, 1, 2, 5)]
  np.testing.assert_allclose(got, [0.125, 0.125, 0.09375, 0.015625], rtol=1e-6)
  # warmup 0 (off), same compiled function: lr_k = 0.5 * 0.5^k
  got = [float(rate(jnp.int32(0), jnp.int32(k))) for k in (0, 1, 2)]
  np.testing.assert_allclose(got, [0.5, 0.25, 0.125], rtol=1e-6)
  assert len(traces) == 1


def test_traced_warmup_steps_without_decay_is_finite_at_zero():
  rate = jax.jit(lambda w, k: gax.warmup_decay_schedule(0.5, warmup_steps=w)(k))
  for k in (0, 3):
    value = float(rate(jnp.int32(0), jnp.int32(k)))
    assert value == pytest.approx(0.5, rel=1e-7)


@pytest.mark.parametrize("traced", [False, True])
def test_saturated_int32_count_gives_finite_rate(traced):
  count = jnp.asarray(2**31 - 1, jnp.int32)
  warmup = jnp.int32(4) if traced else 4
  # Far past the warmup: the base rate. count + 1 must not wrap to a negative number.
  schedule = gax.warmup_decay_schedule(0.5, warmup_steps=warmup)
  value = float(jax.jit(schedule)(count))
  assert np.isfinite(value)
  assert value == pytest.approx(0.5, rel=1e-7)
  # With decay the rate underflows to 0 but stays finite and non-negative.
  decayed = float(jax.jit(gax.warmup_decay_schedule(0.5, warmup, lr_decay=0.99))(count))
  assert np.isfinite(decayed) and decayed >= 0.0


def test_float64_schedule_values(x64):
  # Under x64 the values carry full double precision: 1/3 exactly to ~1e-16.
  schedule = gax.warmup_decay_schedule(1.0, warmup_steps=3, lr_decay=0.5)
  np.testing.assert_allclose(
    [float(schedule(jnp.int64(k))) for k in range(3)], [1 / 3, 1 / 3, 0.25], rtol=1e-15
  )
