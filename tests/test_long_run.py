"""A long run inside one lax.scan: convergence, no NaN, and a saturating counter.

100,000 steps by default; the 1,000,000-step version is

  GAX_LONG_RUN_STEPS=1000000 python -m pytest tests/test_long_run.py
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradient_ascent_jax as gax

STEPS = int(os.environ.get("GAX_LONG_RUN_STEPS", "100000"))
INT32_MAX = 2**31 - 1
CURVATURE = jnp.array([0.5, 1.0, 2.0, 4.0, 0.25])
EXACT_MAXIMIZER = np.array([1.3, -2.1, 0.27, 3.0, -0.77])  # float64
MAXIMIZER = jnp.asarray(EXACT_MAXIMIZER, jnp.float32)
TOLERANCE = 1e-3  # on max |x - maximizer|
LR_START, LR_END = 0.05, 1e-6


def objective(x):
  """Concave, with its unique maximum 0 at x = MAXIMIZER."""
  return -jnp.sum(CURVATURE * (x - MAXIMIZER) ** 2)


def test_long_run_reaches_maximizer_through_counter_saturation():
  """STEPS steps; the int32 counter starts STEPS/2 below its maximum.

  The rate decays geometrically from LR_START to LR_END over the first half
  (RMSprop at a constant rate keeps oscillating with an amplitude ~ the
  rate); then the counter saturates at 2**31 - 1 and the schedule stays at
  its last value, LR_END, for the second half.
  """
  half = STEPS // 2
  start = INT32_MAX - half
  decay = (LR_END / LR_START) ** (1.0 / half)

  def learning_rate(count):  # int32 arithmetic: exact up to the saturated count
    return LR_START * decay ** (count - start).astype(jnp.float32)

  tx = gax.gradient_ascent(
    learning_rate=learning_rate,
    momentum=0.9,
    beta=0.999,
    nesterov=True,
    clip_value=10.0,
    logging_interval=None,
  )
  x = jnp.zeros_like(MAXIMIZER)
  state = tx.init(x)
  state = tuple(
    s._replace(count=jnp.asarray(start, jnp.int32))
    if isinstance(s, gax.ScaleByWarmupDecayState)
    else s
    for s in state
  )

  def step(carry, _):
    x, state = carry
    updates, state = tx.update(jax.grad(objective)(x), state, x)
    x = optax.apply_updates(x, updates)
    finite = jnp.all(jnp.array([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(state)]))
    distance = jnp.max(jnp.abs(x - MAXIMIZER))
    return (x, state), (distance, state[-1].count, finite & jnp.isfinite(x).all())

  started = time.perf_counter()
  run = jax.jit(lambda carry: jax.lax.scan(step, carry, None, length=STEPS))
  run = run.lower((x, state)).compile()
  compiled = time.perf_counter()
  (x, state), (distance, count, finite) = jax.block_until_ready(run((x, state)))
  finished = time.perf_counter()
  distance, count = np.asarray(distance), np.asarray(count, np.int64)

  assert finite.all()
  # The counter climbs by one per step, reaches 2**31 - 1 after `half` steps,
  # and stays there instead of wrapping to negative values.
  np.testing.assert_array_equal(count[:half], start + 1 + np.arange(half))
  assert (count[half:] == INT32_MAX).all() and int(state[-1].count) == INT32_MAX
  # The rate in force after saturation is LR_END (with decay rounded to
  # float32, as the schedule computes it), finite and positive.
  rate = float(learning_rate(state[-1].count))
  np.testing.assert_allclose(rate, LR_START * float(np.float32(decay)) ** half, rtol=1e-4)
  assert 0.9 * LR_END < rate < 1.1 * LR_END
  # At the maximizer within TOLERANCE, and stays there all through the saturated half.
  final = float(np.max(np.abs(np.asarray(x) - np.asarray(MAXIMIZER))))
  final_exact = float(np.max(np.abs(np.asarray(x, np.float64) - EXACT_MAXIMIZER)))
  assert final <= TOLERANCE and final_exact <= TOLERANCE, (final, final_exact)
  assert (distance[half:] <= TOLERANCE).all(), distance[half:].max()
  # It did travel: it started 3 away.
  assert distance[0] > 1.0
  print(
    f"{STEPS} steps: compile {compiled - started:.2f} s, run {finished - compiled:.2f} s; "
    f"final max |x - maximizer| = {final:.3g} (float32 maximizer), "
    f"{final_exact:.3g} (decimal maximizer)"
  )
