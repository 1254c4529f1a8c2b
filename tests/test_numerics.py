"""The precision machinery (gradient_ascent_jax/_src/numerics.py), through the transforms.

Huge gradients that saturate the second moment and recover, low-precision
state, h**2 overflowing where m_t fits, tiny float16 gradients, a learning rate
or clip bound that must not round to 0, and the derivative fixes that keep
meta-gradients (jax.grad through the optimizer) finite.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from tests._reference import BETA
from tests._reference import FIRST_STEP
from tests._reference import LR
from tests._reference import first_step


def quiet(**kwargs):
  return gax.gradient_ascent(**{"logging_interval": None, **kwargs})


# Huge gradients -----------------------------------------------------------------


def run_after_huge_gradient(dtype, huge, n_steps, accumulator_dtype=None):
  """One step with gradient [huge, 1], then n_steps of the ordinary gradient [-1, -1].

  Returns the first update, the second moments right after it, the params right
  after it, and per later step: m[0], the update, the params, all-finite flags.
  """
  tx = quiet(accumulator_dtype=accumulator_dtype)
  params = jnp.zeros(2, dtype)
  state = tx.init(params)
  first, state = tx.update(jnp.array([huge, 1.0], dtype), state)
  params = optax.apply_updates(params, first)
  after_huge = (first, state[1].second_moment, params)

  def body(carry, _):
    params, state = carry
    updates, state = tx.update(jnp.full(2, -1.0, dtype), state)
    params = optax.apply_updates(params, updates)
    finite = jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(state)]))
    return (params, state), (state[1].second_moment[0], updates, params, finite)

  _, trace = jax.jit(lambda c: jax.lax.scan(body, c, None, length=n_steps))((params, state))
  return after_huge, [np.asarray(x).astype(np.float64) for x in trace]


@pytest.mark.parametrize(
  ("dtype", "huge", "n_steps", "final_moment_max", "recovered_ratio"),
  [
    # float32: h**2 = 1e60 overflows; the moment saturates at 3.4e38 and
    # decays by beta per step: 0.999**100000 * 3.4e38 = 1e-5, so m -> 1.
    (jnp.float32, 1e30, 100_000, 1.01, 0.99),
    # float16: h**2 fits float32 (where it is computed), m = 3.6e6 is
    # stored saturated at 65504; float16 rounding (spacing 2**-10) stops
    # the 0.001-per-step average short of 1, hence the looser bounds.
    (jnp.float16, 6e4, 30_000, 2.0, 0.5),
  ],
  ids=["float32-1e30", "float16-6e4"],
)
def test_huge_gradient_saturates_then_recovers(
  dtype, huge, n_steps, final_moment_max, recovered_ratio
):
  (first, moment, params_after), (m0, updates, params, finite) = run_after_huge_gradient(
    dtype, huge, n_steps
  )
  u = float(jnp.finfo(dtype).eps)
  # The huge step is the ordinary first RMSprop step, not a jump.
  np.testing.assert_allclose(
    np.asarray(first, np.float64),
    [first_step(float(jnp.asarray(huge, dtype))), FIRST_STEP],
    rtol=2 * u,
  )
  assert float(moment[0]) == float(jnp.finfo(dtype).max)  # saturated, finite
  assert finite.all() and np.isfinite(updates).all() and np.isfinite(params).all()
  assert (np.diff(m0) <= 0).all() and m0[0] < float(jnp.finfo(dtype).max)  # decays
  assert m0[-1] <= final_moment_max
  # The element that saw the huge gradient moves with the ordinary gradient
  # again (down), by far more than the huge step moved it up ...
  assert params[-1, 0] < float(params_after[0]) - 10
  # ... and at nearly the rate of the element that never saw it.
  assert updates[-1, 0] <= recovered_ratio * updates[-1, 1] < 0


def recovery_steps(dtype, huge, limit, accumulator_dtype=None):
  """Steps of the ordinary gradient [-1, -1], after one [huge, 1], until the element
  that saw the huge gradient steps at least half as far as the other one.

  Returns that count (limit if it never did) and the final second moments.
  """
  tx = quiet(accumulator_dtype=accumulator_dtype)
  _, state = tx.update(jnp.array([huge, 1.0], dtype), tx.init(jnp.zeros(2, dtype)))

  def not_recovered(carry):
    k, _, updates = carry
    return (k < limit) & (updates[0].astype(jnp.float32) > 0.5 * updates[1].astype(jnp.float32))

  def step(carry):
    k, state, _ = carry
    updates, state = tx.update(jnp.full(2, -1.0, dtype), state)
    return k + 1, state, updates

  start = (0, state, jnp.array([0.0, -1.0], dtype))
  k, state, _ = jax.jit(lambda c: jax.lax.while_loop(not_recovered, step, c))(start)
  return int(k), np.asarray(state[1].second_moment, np.float64)


@pytest.mark.parametrize(
  ("dtype", "accumulator_dtype", "huge"),
  [
    (jnp.bfloat16, None, 1e38),
    (jnp.float32, jnp.bfloat16, 1e38),
    (jnp.float16, None, 6e4),
    (jnp.float32, jnp.float16, 6e4),
  ],
  ids=[
    "bfloat16",
    "float32-params-bfloat16-state",
    "float16-6e4",
    "float32-params-float16-state-6e4",
  ],
)
def test_low_precision_state_recovers_from_a_huge_gradient(dtype, accumulator_dtype, huge):
  """beta * m rounds back to m in bfloat16; the saturated moment must still decay."""
  # The float32 state, fed the same gradient: m_k = beta**k (m_0 - 1) + 1 reaches 4
  # (a step half the ordinary one) after log((m_0 - 1) / 3) / -log(beta) steps; the
  # updates, through momentum 0.9, follow about 1 / (1 - 0.9) = 10 steps later.
  f32_steps, f32_moment = recovery_steps(jnp.float32, huge, 200_000)
  m_0 = min(float(np.finfo(np.float32).max), (1 - BETA) * huge**2)
  assert f32_steps == pytest.approx(math.log((m_0 - 1) / 3) / -math.log(BETA) + 10, abs=5)

  steps, moment = recovery_steps(dtype, huge, 2 * f32_steps, accumulator_dtype)
  assert steps < 2 * f32_steps, f"not recovered in {steps} steps, float32 took {f32_steps}"
  # and, for a constant gradient, the untouched element's average settles where
  # float32's does (rounded to nearest it stopped 4x short in bfloat16, at 0.25).
  np.testing.assert_allclose(moment[1], f32_moment[1], rtol=2**-7)


# bf16 params with float32 state ------------------------------------------------------


def test_bfloat16_params_with_float32_state():
  tx = quiet(accumulator_dtype=jnp.float32)
  params = {"w": jnp.zeros(4, jnp.bfloat16)}
  state = tx.init(params)
  assert state[1].second_moment["w"].dtype == jnp.float32
  assert state[2].velocity["w"].dtype == jnp.float32
  grads = {"w": jnp.array([0.5, -2.0, 3.0, 1e-3], jnp.bfloat16)}
  m = np.zeros(4)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    assert updates["w"].dtype == jnp.bfloat16
    # The float32 moment tracks the float64 recursion m = beta m + (1-beta) g^2.
    m = BETA * m + (1 - BETA) * np.asarray(grads["w"], np.float64) ** 2
    np.testing.assert_allclose(state[1].second_moment["w"], m, rtol=1e-6)
  # With bf16 state the same moments are off by bf16 rounding (about 2**-9).
  bf16_tx = quiet()
  bf16_state = bf16_tx.init(params)
  for _ in range(3):
    _, bf16_state = bf16_tx.update(grads, bf16_state, params)
  assert bf16_state[1].second_moment["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(bf16_state[1].second_moment["w"], np.float64), m, rtol=2**-7
  )


# Tiny float16 gradients ---------------------------------------------------------------


def test_tiny_float16_gradient_gives_ordinary_step():
  """(1 - beta) h**2 = 1e-9 underflows float16 state, yet the step is ordinary."""
  tx = quiet()
  params = jnp.zeros(3, jnp.float16)
  grads = jnp.array([1e-3, -1e-4, 2e-2], jnp.float16)
  updates, state = tx.update(grads, tx.init(params))
  h = np.asarray(grads, np.float64)
  np.testing.assert_allclose(
    np.asarray(updates, np.float64), [first_step(x) for x in h], rtol=2**-9
  )
  # The stored float16 moments of the two small ones underflow to 0; v stays finite.
  np.testing.assert_array_equal(np.asarray(state[1].second_moment[:2], np.float64), 0.0)
  assert np.isfinite(np.asarray(state[2].velocity, np.float64)).all()


# h**2 overflows, m_t does not --------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_square_overflows_but_moment_fits(dtype):
  """beta = 0.5, h = 2.3e19: h**2 = 5.3e38 overflows float32, m_1 = 2.6e38 fits."""
  tx = quiet(beta=0.5, momentum=0.0)
  params = jnp.zeros(2, dtype)
  grads = jnp.array([2.3e19, 1.0], dtype)
  updates, state = tx.update(grads, tx.init(params))
  h = np.asarray(grads, np.float64)
  u = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(np.asarray(state[1].second_moment, np.float64), 0.5 * h**2, rtol=2 * u)
  # s = h / sqrt(0.5 h**2) = sqrt(2), the ordinary first step for beta = 0.5.
  np.testing.assert_allclose(np.asarray(updates, np.float64), LR * math.sqrt(2), rtol=2 * u)


# A small Python-float learning rate with float16 params ------------------------------


@pytest.mark.parametrize("warmup_steps", [0, 1])
def test_small_learning_rate_is_not_rounded_to_float16(warmup_steps):
  lr = 1e-8  # 0 in float16 (smallest subnormal 6e-8); the update lr * s = 3.2e-7 is not
  tx = quiet(learning_rate=lr, warmup_steps=warmup_steps)
  params = jnp.zeros(2, jnp.float16)
  updates, _ = jax.jit(tx.update)(jnp.array([1.0, -1.0], jnp.float16), tx.init(params), params)
  assert updates.dtype == jnp.float16
  expected = FIRST_STEP / LR * lr * np.array([1.0, -1.0])
  np.testing.assert_allclose(np.asarray(updates, np.float64), expected, rtol=0, atol=2**-24)


# clip_value rounded down into the gradient dtype ---------------------------------


def test_clip_value_at_the_smallest_float16_still_clips():
  tx = gax.clip_by_value(2.0**-24)  # the smallest float16 subnormal
  updates, _ = tx.update(jnp.array([1.0, -1.0], jnp.float16), tx.init(None))
  np.testing.assert_array_equal(np.asarray(updates, np.float64), [2.0**-24, -(2.0**-24)])


# Differentiating through the optimizer (meta-gradients) --------------------------------


def meta_gradient(make_tx, param_dtype=jnp.float32, steps=5, hyperparameter=0.1):
  """d/dh of the objective after ``steps`` updates of ``make_tx(h)``, float32 objective."""
  start = jax.random.normal(jax.random.key(0), (16,))
  target = 3.0 * jax.random.normal(jax.random.key(1), (16,))

  def objective(x):
    return -jnp.sum((x.astype(jnp.float32) - target) ** 2)

  def final_objective(value):
    tx = make_tx(value)
    x = start.astype(param_dtype)

    def step(carry, _):
      x, state = carry
      updates, state = tx.update(jax.grad(objective)(x).astype(param_dtype), state, x)
      return (optax.apply_updates(x, updates), state), None

    (x, _), _ = jax.lax.scan(step, (x, tx.init(x)), length=steps)
    return objective(x)

  return float(jax.jit(jax.grad(final_objective))(jnp.float32(hyperparameter)))


@pytest.mark.slow  # 2 s or more on 2 cores
def test_meta_gradient_in_float32_matches_the_optax_chain():
  got = meta_gradient(gax.gradient_ascent)
  want = meta_gradient(
    lambda lr: optax.chain(
      optax.scale_by_rms(0.999, 1e-8, eps_in_sqrt=False), optax.trace(0.9), optax.scale(lr)
    )
  )
  np.testing.assert_allclose(got, want, rtol=1e-4)  # measured: equal; 2.2e-6 over 6 other seeds


# Largest relative distance from the float32 meta-gradient over 20 problems
# (seeds) of this shape, times about 1.2: bfloat16 params 0.21, float16 params
# 0.008, bfloat16 state 0.046, float16 state 0.028. Half-precision params move
# in steps of their own spacing, hence the spread.
@pytest.mark.slow  # 3 s or more on 2 cores
@pytest.mark.parametrize(
  "param_dtype, accumulator_dtype, rtol",
  [
    (jnp.bfloat16, None, 0.25),
    (jnp.float16, None, 0.01),
    (jnp.float32, jnp.bfloat16, 0.055),
    (jnp.float32, jnp.float16, 0.035),
  ],
  ids=["bfloat16-params", "float16-params", "bfloat16-state", "float16-state"],
)
def test_meta_gradient_through_a_low_precision_state(param_dtype, accumulator_dtype, rtol):
  # The one-unit nudge that keeps a rounded moment moving (jnp.nextafter) had
  # no derivative: jax.grad raised NotImplementedError from the second update.
  float32 = meta_gradient(gax.gradient_ascent)
  low = meta_gradient(
    lambda lr: gax.gradient_ascent(lr, accumulator_dtype=accumulator_dtype), param_dtype
  )
  assert np.isfinite(low)
  np.testing.assert_allclose(low, float32, rtol=rtol)


def clip_then_optax_rms(clip_value):
  return optax.chain(
    optax.clip(clip_value),
    optax.scale_by_rms(0.999, 1e-8, eps_in_sqrt=False),
    optax.trace(0.9),
    optax.scale(0.1),
  )


def test_meta_gradient_with_respect_to_clip_value_matches_optax_clip():
  # The bound was rounded with jnp.nextafter even when the dtypes agree, and
  # jax.grad raised NotImplementedError: Differentiation rule for 'nextafter'.
  got = meta_gradient(lambda c: gax.gradient_ascent(0.1, clip_value=c), hyperparameter=2.0)
  want = meta_gradient(clip_then_optax_rms, hyperparameter=2.0)
  np.testing.assert_allclose(got, want, rtol=1e-4)  # measured: equal (43.96); 2.4e-6 at c=4


# Largest relative distance from float32 at clip_value 0.5, 2 and 4: bfloat16
# params 0.19, float16 0.006 (the bound is rounded down into their dtype).
@pytest.mark.slow  # 2 s or more on 2 cores
@pytest.mark.parametrize("param_dtype, rtol", [(jnp.bfloat16, 0.25), (jnp.float16, 0.01)])
def test_meta_gradient_with_respect_to_a_clip_value_rounded_into_half_precision(param_dtype, rtol):
  def make_tx(clip_value):
    return gax.gradient_ascent(0.1, clip_value=clip_value, accumulator_dtype=jnp.float32)

  low = meta_gradient(make_tx, param_dtype, hyperparameter=2.0)
  np.testing.assert_allclose(low, meta_gradient(clip_then_optax_rms, hyperparameter=2.0), rtol=rtol)


@pytest.mark.slow  # 4 s or more on 2 cores
@pytest.mark.parametrize("accumulator_dtype", [None, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_meta_gradient_with_an_element_at_its_optimum_is_that_of_the_others(accumulator_dtype):
  # An element that starts at its optimum has gradient 0 at every step; sqrt'(0)
  # = inf times the 0 flowing back made the whole meta-gradient NaN from the
  # second update on.
  def final_objective(lr, target):
    def objective(x):
      return -jnp.sum((x - target) ** 2)

    tx = gax.gradient_ascent(lr, accumulator_dtype=accumulator_dtype)
    x = jnp.zeros_like(target)
    state = tx.init(x)
    for _ in range(3):
      updates, state = tx.update(jax.grad(objective)(x), state, x)
      x = optax.apply_updates(x, updates)
    return objective(x)

  with_it = jax.grad(final_objective)(jnp.float32(0.1), jnp.array([3.0, -1.0, 0.5, 0.0]))
  without = jax.grad(final_objective)(jnp.float32(0.1), jnp.array([3.0, -1.0, 0.5]))
  assert np.isfinite(without)
  np.testing.assert_allclose(with_it, without, rtol=1e-6)
