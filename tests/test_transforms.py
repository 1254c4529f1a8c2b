"""Each transform of gradient_ascent_jax/_src/transforms.py alone, against hand-worked values,
and its own warnings and trace-time checks."""

import logging
import warnings

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
  assert {leaf.dtype for leaf in jax.tree.leaves(getattr(state, field))} == {jnp.dtype(jnp.float32)}
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


# Nesterov without momentum ----------------------------------------------------------


@pytest.fixture
def nesterov_warning_not_yet_shown(monkeypatch):
  import threading

  from gradient_ascent_jax._src import transforms

  monkeypatch.setattr(transforms, "_nesterov_without_momentum_warned", threading.Event())


@pytest.mark.parametrize(
  "make",
  [
    lambda: gax.gradient_ascent(momentum=0, nesterov=True),
    lambda: gax.momentum(decay=np.float32(0.0), nesterov=True),
  ],
  ids=["gradient_ascent", "momentum"],
)
def test_nesterov_without_momentum_warns_once_at_the_users_line(
  make, nesterov_warning_not_yet_shown, caplog
):
  # A misuse seen when the optimizer is built: Python's warnings, at this file's line
  # (not the library's), once; not a log record.
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with caplog.at_level(logging.WARNING, logger="gradient_ascent_jax"):
      make()
      make()
  [warning] = caught
  assert warning.category is UserWarning and warning.filename == __file__
  message = str(warning.message)
  assert "nesterov=True has no effect with momentum 0" in message
  assert "nesterov=False" in message and "0.9" in message
  assert caplog.records == []


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.0, nesterov=False),
    dict(momentum=jnp.asarray(0.0), nesterov=True),
  ],  # injected: may be a schedule
  ids=["with-momentum", "no-nesterov", "jax-array"],
)
def test_no_nesterov_warning_when_it_has_an_effect_or_is_unknown(
  kwargs, nesterov_warning_not_yet_shown
):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    gax.gradient_ascent(**kwargs)
  assert caught == []


# clip_value below the smallest number of the gradient dtype -----------------------


@pytest.mark.parametrize(
  ("dtype", "clip_value", "smallest"),
  [
    (jnp.float16, 1e-8, "5.96e-08"),
    (jnp.float32, 1e-46, "1.4e-45"),
    (jnp.bfloat16, 1e-46, "9.18e-41"),
  ],
)
@pytest.mark.parametrize(
  "make",
  [lambda c: gax.gradient_ascent(clip_value=c, logging_interval=None), gax.clip_by_value],
  ids=["gradient_ascent", "clip"],
)
def test_clip_value_that_rounds_to_zero_is_rejected_when_traced(make, dtype, clip_value, smallest):
  tx = make(clip_value)
  params = jnp.zeros(2, dtype)
  with pytest.raises(ValueError, match=f"`clip_value` must be >= {smallest} for") as error:
    jax.jit(tx.update)(jnp.ones(2, dtype), tx.init(params), params)
  assert jnp.dtype(dtype).name in str(error.value)


def test_clip_by_value_still_clips_integer_updates():
  tx = gax.clip_by_value(2.0)
  updates, _ = tx.update(jnp.array([3, -5, 1]), tx.init(None))
  np.testing.assert_array_equal(updates, [2, -2, 1])
