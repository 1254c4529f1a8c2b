"""Parameter groups: per-group hyperparameters, masking and frozen leaves.

The original optimizer took PyTorch-style "dicts defining parameter groups".
In Optax that is ``optax.multi_transform`` (one optimizer per label) and
``optax.masked``; these tests show each group runs with its own settings and
that frozen leaves stay exactly where they were.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from tests._reference import ReferenceGradientAscent

# Two groups with nothing in common: rate, clipping, Nesterov, warmup, beta.
BODY = dict(learning_rate=1e-3, momentum=0.9, logging_interval=None)
HEAD = dict(
  learning_rate=5e-2,
  momentum=0.5,
  beta=0.9,
  nesterov=True,
  clip_value=0.3,
  warmup_steps=3,
  logging_interval=None,
)
STEPS = 6


def make_params(dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 3)
  return {
    "body": {
      "w": jax.random.normal(keys[0], (4, 3), dtype),
      "b": jnp.zeros((3,), dtype),
    },
    "head": {"w": jax.random.normal(keys[1], (3, 2), dtype)},
  }


def gradient_stream(params, steps, seed=1):
  """Different gradients every step, large enough that clip_value=0.3 bites."""
  keys = jax.random.split(jax.random.key(seed), steps)
  for key in keys:
    leaves, treedef = jax.tree.flatten(params)
    leaf_keys = jax.random.split(key, len(leaves))
    yield jax.tree.unflatten(
      treedef,
      [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(leaf_keys, leaves, strict=True)],
    )


LABELS = {"body": {"w": "body", "b": "body"}, "head": {"w": "head"}}


@pytest.mark.slow  # 4 s or more on 2 cores
def test_multi_transform_matches_each_group_run_alone():
  params = make_params()
  tx = optax.multi_transform(
    {"body": gax.gradient_ascent(**BODY), "head": gax.gradient_ascent(**HEAD)}, LABELS
  )
  solo = {
    name: gax.gradient_ascent(**settings) for name, settings in [("body", BODY), ("head", HEAD)]
  }
  state = tx.init(params)
  solo_states = {name: solo[name].init(params[name]) for name in solo}
  # The same gradients under the OTHER group's settings, to show the groups differ.
  swapped = {"body": gax.gradient_ascent(**HEAD), "head": gax.gradient_ascent(**BODY)}
  swapped_states = {name: swapped[name].init(params[name]) for name in swapped}

  update = jax.jit(tx.update)
  clipped_any = False
  for grads in gradient_stream(params, STEPS):
    clipped_any |= bool(jnp.any(jnp.abs(grads["head"]["w"]) > HEAD["clip_value"]))
    updates, state = update(grads, state, params)
    for name in solo:
      expected, solo_states[name] = jax.jit(solo[name].update)(
        grads[name], solo_states[name], params[name]
      )
      jax.tree.map(np.testing.assert_array_equal, updates[name], expected)
      other, swapped_states[name] = swapped[name].update(
        grads[name], swapped_states[name], params[name]
      )
      assert not np.allclose(updates[name]["w"], other["w"])
    params = optax.apply_updates(params, updates)
  assert clipped_any


@pytest.mark.slow  # 4 s or more on 2 cores
def test_multi_transform_groups_follow_the_numpy_reference(x64):
  """Each group, in float64, is the float64 reference of docs/guide/math.md with its settings."""
  params = make_params(jnp.float64)
  tx = optax.multi_transform(
    {"body": gax.gradient_ascent(**BODY), "head": gax.gradient_ascent(**HEAD)}, LABELS
  )
  state = tx.init(params)

  def reference(settings):
    return ReferenceGradientAscent(**{k: v for k, v in settings.items() if k != "logging_interval"})

  body_ref, head_ref = reference(BODY), reference(HEAD)
  for grads in gradient_stream(params, STEPS):
    updates, state = tx.update(grads, state, params)
    body_expected = body_ref.step([grads["body"]["w"], grads["body"]["b"]])
    (head_expected,) = head_ref.step([grads["head"]["w"]])
    np.testing.assert_allclose(updates["body"]["w"], body_expected[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(updates["body"]["b"], body_expected[1], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(updates["head"]["w"], head_expected, rtol=1e-12, atol=1e-15)


def test_frozen_group_does_not_move():
  params = make_params()
  labels = {"body": {"w": "frozen", "b": "frozen"}, "head": {"w": "train"}}
  tx = optax.multi_transform(
    {"train": gax.gradient_ascent(**HEAD), "frozen": optax.set_to_zero()}, labels
  )
  state = tx.init(params)
  start = params

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for grads in gradient_stream(params, STEPS):
    params, state = step(params, state, grads)
  jax.tree.map(np.testing.assert_array_equal, params["body"], start["body"])
  assert not np.allclose(params["head"]["w"], start["head"]["w"])
  # The frozen group carries no moment buffers at all.
  assert jax.tree.leaves(state.inner_states["frozen"]) == []


def test_masked_passes_masked_out_leaves_through_and_freezing_needs_set_to_zero():
  """optax.masked leaves masked-out updates untouched; pair it with set_to_zero to freeze."""
  params = make_params()
  mask = {"body": {"w": True, "b": False}, "head": {"w": True}}
  inverse = jax.tree.map(lambda m: not m, mask)
  masked = optax.masked(gax.gradient_ascent(**BODY), mask)
  frozen = optax.chain(
    optax.masked(gax.gradient_ascent(**BODY), mask), optax.masked(optax.set_to_zero(), inverse)
  )
  # The trained leaves alone, as their own tree.
  solo = gax.gradient_ascent(**BODY)
  trained = lambda tree: {"w": tree["body"]["w"], "h": tree["head"]["w"]}  # noqa: E731
  masked_state, frozen_state, solo_state = (
    masked.init(params),
    frozen.init(params),
    solo.init(trained(params)),
  )
  start = params
  for grads in gradient_stream(params, STEPS):
    masked_updates, masked_state = masked.update(grads, masked_state, params)
    frozen_updates, frozen_state = frozen.update(grads, frozen_state, params)
    expected, solo_state = solo.update(trained(grads), solo_state, trained(params))
    # Masked-out: the raw gradient comes through, unscaled (a pitfall).
    np.testing.assert_array_equal(masked_updates["body"]["b"], grads["body"]["b"])
    np.testing.assert_array_equal(frozen_updates["body"]["b"], jnp.zeros(3))
    for updates in (masked_updates, frozen_updates):
      np.testing.assert_array_equal(updates["body"]["w"], expected["w"])
      np.testing.assert_array_equal(updates["head"]["w"], expected["h"])
    params = optax.apply_updates(params, frozen_updates)
  np.testing.assert_array_equal(params["body"]["b"], start["body"]["b"])
  assert not np.allclose(params["body"]["w"], start["body"]["w"])


def test_integer_leaves_need_a_mask():
  params = {"w": jnp.ones(3), "step": jnp.array(0, jnp.int32)}
  with pytest.raises(TypeError, match="step"):
    gax.gradient_ascent(logging_interval=None).init(params)

  labels = {"w": "train", "step": "frozen"}
  tx = optax.multi_transform(
    {
      "train": gax.gradient_ascent(learning_rate=0.1, logging_interval=None),
      "frozen": optax.set_to_zero(),
    },
    labels,
  )
  state = tx.init(params)
  grads = {"w": jnp.ones(3), "step": jnp.array(5, jnp.int32)}
  updates, state = tx.update(grads, state, params)
  new_params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new_params["step"], 0)
  assert new_params["step"].dtype == jnp.int32
  assert np.all(new_params["w"] > 1.0)

  masked = optax.masked(gax.gradient_ascent(logging_interval=None), {"w": True, "step": False})
  masked.init(params)  # no TypeError: the integer leaf is masked out


def test_none_leaves_pass_through():
  params = {"w": jnp.ones(2), "unused": None}
  tx = gax.gradient_ascent(learning_rate=0.1, logging_interval=2)
  state = tx.init(params)
  for _ in range(3):
    updates, state = jax.jit(tx.update)({"w": jnp.ones(2), "unused": None}, state, params)
    assert updates["unused"] is None
    params = optax.apply_updates(params, updates)
  assert params["unused"] is None
  assert np.all(params["w"] > 1.0)


def test_logging_in_one_group_logs_that_groups_gradient_norm(caplog):
  params = make_params()
  tx = optax.multi_transform(
    {
      "body": gax.gradient_ascent(**BODY),
      "head": gax.gradient_ascent(**{**HEAD, "logging_interval": 2}),
    },
    LABELS,
  )
  state = tx.init(params)
  update = jax.jit(tx.update)
  expected_norms = []
  with caplog.at_level(logging.INFO, logger="gradient_ascent_jax"):
    for grads in gradient_stream(params, 4):
      expected_norms.append(float(np.linalg.norm(np.asarray(grads["head"]["w"]))))
      _, state = update(grads, state, params)
    jax.effects_barrier()
  records = [r for r in caplog.records if r.name == "gradient_ascent_jax"]
  assert [r.step for r in records] == [2, 4]
  np.testing.assert_allclose(
    [r.grad_norm for r in records], [expected_norms[1], expected_norms[3]], rtol=1e-5
  )
  # Step 2 is the second step: warmup of 3 steps gives 2/3 of the rate.
  np.testing.assert_allclose(records[0].learning_rate, HEAD["learning_rate"] * 2 / 3, rtol=1e-6)
