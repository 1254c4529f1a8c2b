"""Each transform of gradient_ascent_jax/_src/transforms.py alone, against hand-worked values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax


def tree(a, b):
  """A two-leaf pytree: a vector of 2 and a 2x2 matrix (float32)."""
  return {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}


def params_like():
  return tree([0.0, 0.0], [[0.0, 0.0], [0.0, 0.0]])


def run_steps(tx, inputs, params=None):
  """Feeds each input tree to tx.update in turn; returns the outputs and the last state."""
  params = params_like() if params is None else params
  state = tx.init(params)
  outputs = []
  for updates in inputs:
    out, state = tx.update(updates, state, params)
    outputs.append(out)
  return outputs, state


def assert_tree_close(actual, expected, rtol=1e-6):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=0)


# --- flip_sign ---------------------------------------------------------------------------


def test_flip_sign_negates_every_leaf():
  outputs, state = run_steps(
      gax.flip_sign(),
      [tree([1.0, -2.0], [[3.0, 0.0], [-0.5, 4.0]]), tree([-1.0, 0.25], [[0.0, 1.0], [2.0, -8.0]])],
  )
  assert_tree_close(outputs[0], tree([-1.0, 2.0], [[-3.0, 0.0], [0.5, -4.0]]))
  assert_tree_close(outputs[1], tree([1.0, -0.25], [[0.0, -1.0], [-2.0, 8.0]]))
  assert isinstance(state, optax.EmptyState)


# --- clip_by_value -----------------------------------------------------------------------


def test_clip_by_value_clips_each_element():
  outputs, state = run_steps(
      gax.clip_by_value(1.5),
      [
          tree([0.5, -3.0], [[2.0, -1.5], [1.5, -0.25]]),
          tree([-1.6, 1.4], [[100.0, -100.0], [0.0, 1.5001]]),
      ],
  )
  # Inside [-1.5, 1.5] unchanged (the bounds included); outside set to +-1.5.
  assert_tree_close(outputs[0], tree([0.5, -1.5], [[1.5, -1.5], [1.5, -0.25]]))
  assert_tree_close(outputs[1], tree([-1.5, 1.4], [[1.5, -1.5], [0.0, 1.5]]))
  assert isinstance(state, optax.EmptyState)


# --- scale_by_adaptive_rms ---------------------------------------------------------------


def test_scale_by_adaptive_rms_three_steps():
  # beta = 0.75, eps = 0.5: a large eps tells "eps outside the sqrt" from "inside".
  #   m_t = 0.75 * m_{t-1} + 0.25 * h^2,   s = h / (sqrt(m_t) + 0.5)
  h1 = tree([2.0, 0.0], [[-2.0, 4.0], [1.0, 0.0]])
  h2 = tree([1.0, 4.0], [[-2.0, 0.0], [1.0, 0.0]])
  h3 = tree([0.0, -2.0], [[2.0, 2.0], [1.0, 0.0]])
  outputs, state = run_steps(gax.scale_by_adaptive_rms(beta=0.75, eps=0.5), [h1, h2, h3])
  # step 1: m = 0.25 h^2      -> a: [1, 0]        b: [[1, 4], [0.25, 0]]
  #         s = h/(sqrt m+.5) -> a: [2/1.5, 0/.5] b: [[-2/1.5, 4/2.5], [1/1, 0/.5]]
  assert_tree_close(outputs[0], tree([4 / 3, 0.0], [[-4 / 3, 1.6], [1.0, 0.0]]))
  # step 2: a: m = [0.75 + 0.25, 0 + 4] = [1, 4];    s = [1/1.5, 4/2.5]
  #         b: m = [[0.75 + 1, 3 + 0], [0.1875 + 0.25, 0]] = [[1.75, 3], [0.4375, 0]]
  #            s = [[-2/(sqrt 1.75 + .5), 0], [1/(sqrt .4375 + .5), 0]]
  assert_tree_close(
      outputs[1],
      tree(
          [2 / 3, 1.6],
          [[-2 / (np.sqrt(1.75) + 0.5), 0.0], [1 / (np.sqrt(0.4375) + 0.5), 0.0]],
      ),
  )
  # step 3: a: m = [0.75, 3 + 1] = [0.75, 4];        s = [0, -2/2.5]
  #         b: m = [[1.3125 + 1, 2.25 + 1], [0.328125 + 0.25, 0]] = [[2.3125, 3.25], [0.578125, 0]]
  assert_tree_close(
      outputs[2],
      tree(
          [0.0, -0.8],
          [
              [2 / (np.sqrt(2.3125) + 0.5), 2 / (np.sqrt(3.25) + 0.5)],
              [1 / (np.sqrt(0.578125) + 0.5), 0.0],
          ],
      ),
  )
  assert isinstance(state, gax.ScaleByAdaptiveRmsState)
  assert state._fields == ("second_moment",)
  assert_tree_close(state.second_moment, tree([0.75, 4.0], [[2.3125, 3.25], [0.578125, 0.0]]))


def test_scale_by_adaptive_rms_beta_zero_is_sign_like():
  # beta = 0: m = h^2, s = h / (|h| + eps) -> +-4/4.5 for |h| = 4.
  outputs, state = run_steps(
      gax.scale_by_adaptive_rms(beta=0.0, eps=0.5), [tree([4.0, -4.0], [[1.0, -1.0], [0.0, 2.0]])]
  )
  assert_tree_close(outputs[0], tree([4 / 4.5, -4 / 4.5], [[1 / 1.5, -1 / 1.5], [0.0, 2 / 2.5]]))
  assert_tree_close(state.second_moment, tree([16.0, 16.0], [[1.0, 1.0], [0.0, 4.0]]))


# --- momentum ----------------------------------------------------------------------------

S1 = tree([1.0, 2.0], [[-4.0, 0.0], [2.0, 1.0]])
S2 = tree([3.0, -1.0], [[2.0, 1.0], [-1.0, 1.0]])
S3 = tree([0.0, 4.0], [[0.0, -2.0], [0.5, 1.0]])


def test_momentum_heavy_ball_three_steps():
  # decay = 0.5: v_t = 0.5 v_{t-1} + s_t, d = v_t.
  outputs, state = run_steps(gax.momentum(decay=0.5), [S1, S2, S3])
  # v1 = s1
  assert_tree_close(outputs[0], tree([1.0, 2.0], [[-4.0, 0.0], [2.0, 1.0]]))
  # v2 = 0.5 v1 + s2 = [0.5+3, 1-1], [[-2+2, 0+1], [1-1, 0.5+1]]
  assert_tree_close(outputs[1], tree([3.5, 0.0], [[0.0, 1.0], [0.0, 1.5]]))
  # v3 = 0.5 v2 + s3 = [1.75+0, 0+4], [[0+0, 0.5-2], [0+0.5, 0.75+1]]
  assert_tree_close(outputs[2], tree([1.75, 4.0], [[0.0, -1.5], [0.5, 1.75]]))
  assert isinstance(state, gax.MomentumState)
  assert state._fields == ("velocity",)
  assert_tree_close(state.velocity, tree([1.75, 4.0], [[0.0, -1.5], [0.5, 1.75]]))


def test_momentum_nesterov_three_steps():
  # Same velocities as the heavy-ball test; d = s_t + 0.5 v_t.
  outputs, state = run_steps(gax.momentum(decay=0.5, nesterov=True), [S1, S2, S3])
  # d1 = s1 + 0.5 v1 = 1.5 s1
  assert_tree_close(outputs[0], tree([1.5, 3.0], [[-6.0, 0.0], [3.0, 1.5]]))
  # d2 = s2 + 0.5 [3.5, 0], [[0, 1], [0, 1.5]]
  assert_tree_close(outputs[1], tree([4.75, -1.0], [[2.0, 1.5], [-1.0, 1.75]]))
  # d3 = s3 + 0.5 [1.75, 4], [[0, -1.5], [0.5, 1.75]]
  assert_tree_close(outputs[2], tree([0.875, 6.0], [[0.0, -2.75], [0.75, 1.875]]))
  # The velocity itself is the heavy-ball one (no Nesterov term fed back).
  assert_tree_close(state.velocity, tree([1.75, 4.0], [[0.0, -1.5], [0.5, 1.75]]))


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_zero_decay_passes_updates_through(nesterov):
  outputs, state = run_steps(gax.momentum(decay=0.0, nesterov=nesterov), [S1, S2, S3])
  for out, s in zip(outputs, [S1, S2, S3], strict=True):
    assert_tree_close(out, jax.tree.map(np.asarray, s))
  assert_tree_close(state.velocity, jax.tree.map(np.asarray, S3))


# --- scale_by_warmup_decay ---------------------------------------------------------------


def test_scale_by_warmup_decay_four_steps():
  # lr = 0.5, warmup 4, decay 0.5:  lr_k = 0.5 * 0.5^k * min(1, (k+1)/4)
  #   k=0: 0.5 * 1     * 1/4 = 0.125      k=1: 0.5 * 0.5   * 2/4 = 0.125
  #   k=2: 0.5 * 0.25  * 3/4 = 0.09375    k=3: 0.5 * 0.125 * 1   = 0.0625
  u = tree([1.0, -2.0], [[4.0, 0.0], [-8.0, 16.0]])
  outputs, state = run_steps(
      gax.scale_by_warmup_decay(0.5, warmup_steps=4, lr_decay=0.5), [u, u, u, u]
  )
  for out, rate in zip(outputs, [0.125, 0.125, 0.09375, 0.0625], strict=True):
    # Optax's descent convention: multiplied by MINUS the rate.
    assert_tree_close(out, tree([-rate, 2 * rate], [[-4 * rate, 0.0], [8 * rate, -16 * rate]]))
  assert isinstance(state, gax.ScaleByWarmupDecayState)
  assert state._fields == ("count",)
  assert state.count.dtype == jnp.int32
  assert int(state.count) == 4


def test_scale_by_warmup_decay_constant_rate():
  u = tree([1.0, -2.0], [[4.0, 0.0], [-8.0, 16.0]])
  outputs, state = run_steps(gax.scale_by_warmup_decay(0.25), [u, u])
  for out in outputs:
    assert_tree_close(out, tree([-0.25, 0.5], [[-1.0, 0.0], [2.0, -4.0]]))
  assert int(state.count) == 2


def test_scale_by_warmup_decay_saturated_count_stays_finite():
  tx = gax.scale_by_warmup_decay(0.5, warmup_steps=4)
  u = tree([1.0, -2.0], [[4.0, 0.0], [-8.0, 16.0]])
  state = gax.ScaleByWarmupDecayState(count=jnp.asarray(2**31 - 1, jnp.int32))
  out, state = tx.update(u, state)
  # Past the warmup the rate is 0.5; the counter stays at the int32 maximum.
  assert_tree_close(out, tree([-0.5, 1.0], [[-2.0, 0.0], [4.0, -8.0]]))
  assert int(state.count) == 2**31 - 1


# --- state types, dtypes, pass-through leaves --------------------------------------------

STATEFUL = {
    "scale_by_adaptive_rms": (gax.scale_by_adaptive_rms, "second_moment"),
    "momentum": (gax.momentum, "velocity"),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_state_dtype_follows_params(name, dtype):
  factory, field = STATEFUL[name]
  params = jax.tree.map(lambda x: x.astype(dtype), params_like())
  tx = factory()
  state = tx.init(params)
  for leaf in jax.tree.leaves(getattr(state, field)):
    assert leaf.dtype == dtype
  grads = jax.tree.map(lambda x: x.astype(dtype), S1)
  updates, state = tx.update(grads, state, params)
  for leaf in jax.tree.leaves(updates) + jax.tree.leaves(getattr(state, field)):
    assert leaf.dtype == dtype


def test_state_dtype_follows_float64_params(x64):
  params = {"a": jnp.zeros(2, jnp.float64), "b": jnp.zeros((2, 2), jnp.float64)}
  for factory, field in STATEFUL.values():
    state = factory().init(params)
    assert {leaf.dtype for leaf in jax.tree.leaves(getattr(state, field))} == {
        jnp.dtype(jnp.float64)
    }


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_float32_accumulator_with_bfloat16_params(name):
  factory, field = STATEFUL[name]
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params_like())
  tx = factory(accumulator_dtype=jnp.float32)
  state = tx.init(params)
  grads = jax.tree.map(lambda x: x.astype(jnp.bfloat16), S1)
  updates, state = tx.update(grads, state, params)
  assert {leaf.dtype for leaf in jax.tree.leaves(getattr(state, field))} == {
      jnp.dtype(jnp.float32)
  }
  assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}


def test_float32_accumulator_keeps_small_beta_steps():
  # beta = 0.999 rounds to 1.0 in bfloat16; the float32 moment keeps it: after one step
  # m = 0.001 * 4^2 = 0.016 and s = 4 / (sqrt(0.016) + 1e-8) = 31.62...
  tx = gax.scale_by_adaptive_rms(beta=0.999, accumulator_dtype=jnp.float32)
  params = {"w": jnp.zeros(1, jnp.bfloat16)}
  state = tx.init(params)
  out, state = tx.update({"w": jnp.full(1, 4.0, jnp.bfloat16)}, state, params)
  np.testing.assert_allclose(np.asarray(state.second_moment["w"]), [0.016], rtol=1e-6)
  # bfloat16 has 8 significant bits: relative rounding up to 2**-8.
  np.testing.assert_allclose(np.asarray(out["w"], np.float32), [4 / np.sqrt(0.016)], rtol=2**-8)


@pytest.mark.parametrize(
    "tx_factory",
    [
        gax.flip_sign,
        lambda: gax.clip_by_value(1.0),
        lambda: gax.scale_by_adaptive_rms(accumulator_dtype=jnp.float32),
        lambda: gax.momentum(accumulator_dtype=jnp.float32),
        lambda: gax.momentum(nesterov=True, accumulator_dtype=jnp.bfloat16),
        gax.scale_by_warmup_decay,
    ],
    ids=["flip_sign", "clip_by_value", "adaptive_rms", "momentum", "nesterov", "warmup_decay"],
)
@pytest.mark.parametrize("grad_dtype", [jnp.bfloat16, jnp.float32])
def test_updates_come_back_in_gradient_dtype(tx_factory, grad_dtype):
  tx = tx_factory()
  params = jax.tree.map(lambda x: x.astype(grad_dtype), params_like())
  state = tx.init(params)
  grads = jax.tree.map(lambda x: x.astype(grad_dtype), S1)
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
    assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(grad_dtype)}


ALL_TRANSFORMS = {
    "flip_sign": gax.flip_sign,
    "clip_by_value": lambda: gax.clip_by_value(1.0),
    "scale_by_adaptive_rms": gax.scale_by_adaptive_rms,
    "momentum": lambda: gax.momentum(nesterov=True),
    "scale_by_warmup_decay": lambda: gax.scale_by_warmup_decay(0.5, 2, 0.5),
}


@pytest.mark.parametrize("name", sorted(ALL_TRANSFORMS))
@pytest.mark.parametrize("empty", [None, optax.MaskedNode()], ids=["None", "MaskedNode"])
def test_none_and_masked_leaves_pass_through(name, empty):
  tx = ALL_TRANSFORMS[name]()
  params = {"w": jnp.zeros(2), "frozen": empty}
  state = tx.init(params)
  reference = ALL_TRANSFORMS[name]()
  ref_state = reference.init({"w": jnp.zeros(2)})
  for grad in ([1.0, -3.0], [0.5, 2.0]):
    updates, state = tx.update({"w": jnp.asarray(grad), "frozen": empty}, state, params)
    expected, ref_state = reference.update({"w": jnp.asarray(grad)}, ref_state)
    # The empty leaf comes back as it went in; the real leaf is transformed as if alone.
    if empty is None:
      assert updates["frozen"] is None
    else:
      assert isinstance(updates["frozen"], optax.MaskedNode)
    np.testing.assert_array_equal(updates["w"], expected["w"])
  # The state keeps the empty leaf too (for the stateful transforms).
  for field_tree in state:
    if isinstance(field_tree, dict):
      assert jax.tree.structure(field_tree) == jax.tree.structure(params)


def test_masked_transform_leaves_other_leaves_untouched():
  # Under optax.masked the masked-out leaf reaches the transform as a MaskedNode.
  tx = optax.masked(gax.momentum(decay=0.5), {"w": True, "bias": False})
  params = {"w": jnp.zeros(2), "bias": jnp.zeros(2)}
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update({"w": jnp.ones(2), "bias": jnp.full(2, 7.0)}, state, params)
  np.testing.assert_array_equal(updates["w"], [1.5, 1.5])  # v2 = 0.5 * 1 + 1
  np.testing.assert_array_equal(updates["bias"], [7.0, 7.0])  # untouched


# --- differentiating through the optimizer (meta-gradients) ------------------------------


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
@pytest.mark.parametrize("param_dtype, rtol", [(jnp.bfloat16, 0.25), (jnp.float16, 0.01)])
def test_meta_gradient_with_respect_to_a_clip_value_rounded_into_half_precision(
    param_dtype, rtol
):
  def make_tx(clip_value):
    return gax.gradient_ascent(0.1, clip_value=clip_value, accumulator_dtype=jnp.float32)

  low = meta_gradient(make_tx, param_dtype, hyperparameter=2.0)
  np.testing.assert_allclose(low, meta_gradient(clip_then_optax_rms, hyperparameter=2.0), rtol=rtol)


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
