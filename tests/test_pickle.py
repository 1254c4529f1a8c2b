"""Every public factory's result survives pickling, as Ray, Dask and multiprocessing ship it."""

import pickle

import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax

# What each public factory (every lower-case name in __all__ but carry_over, which builds
# nothing) builds, with its options on.
FACTORIES = {
  "clip_by_value": [lambda: gax.clip_by_value(0.5)],
  "flip_sign": [gax.flip_sign],
  "gradient_ascent": [
    lambda: gax.gradient_ascent(0.05, nesterov=True, clip_value=1.0, lr_decay=0.9, warmup_steps=2),
    lambda: gax.gradient_ascent(0.05, logging_interval=2),
  ],
  "log_progress": [lambda: gax.log_progress(2, 0.1)],
  "maximize": [
    lambda: gax.maximize(optax.adam(0.1)),
    lambda: gax.maximize(optax.inject_hyperparams(optax.adam)(learning_rate=0.1)),
  ],
  "momentum": [lambda: gax.momentum(0.9, nesterov=True)],
  "scale_by_adaptive_rms": [gax.scale_by_adaptive_rms],
  "scale_by_warmup_decay": [lambda: gax.scale_by_warmup_decay(0.1, 2, 0.9)],
  "warmup_decay_schedule": [lambda: gax.warmup_decay_schedule(0.1, 2, 0.9)],
}
CASES = [(name, i) for name, makers in FACTORIES.items() for i in range(len(makers))]


def test_every_public_factory_is_covered():
  assert set(FACTORIES) == {name for name in gax.__all__ if name[0].islower()} - {"carry_over"}


def _steps(tx, params, grads, count=3):
  state = tx.init(params)
  states, all_updates = [state], []
  for _ in range(count):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    all_updates.append(updates)
    states.append(state)
  return all_updates, states


def _assert_bit_identical(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).dtype == np.asarray(b).dtype


@pytest.mark.parametrize(("name", "index"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_cloudpickled_factory_result_steps_identically(name, index, caplog):
  made = FACTORIES[name][index]()
  copy = cloudpickle.loads(cloudpickle.dumps(made))
  if name == "warmup_decay_schedule":
    counts = jnp.arange(6)
    _assert_bit_identical(jax.vmap(copy)(counts), jax.vmap(made)(counts))
    return
  params = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array(0.25)}
  grads = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(-0.75)}
  want = _steps(made, params, grads)
  got = _steps(copy, params, grads)
  _assert_bit_identical(got, want)
  # The state itself pickles with the standard library, as checkpoints of it do.
  _, states = want
  _assert_bit_identical(pickle.loads(pickle.dumps(states[-1])), states[-1])


def test_cloudpickled_state_path_steps_identically_but_for_the_run_number():
  # Each eager tx.init writes a new run number into the record (word 6), so that a
  # reader tells runs apart; every other word, and every other leaf, is identical.
  made = gax.gradient_ascent(0.05, logging_interval=2, logging_emit="state")
  copy = cloudpickle.loads(cloudpickle.dumps(made))
  params = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array(0.25)}
  grads = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(-0.75)}
  (want_updates, want_states), (got_updates, got_states) = (
    _steps(tx, params, grads) for tx in (made, copy)
  )
  _assert_bit_identical(got_updates, want_updates)
  for got, want in zip(got_states, want_states, strict=True):
    got_record, want_record = np.asarray(got[0].record), np.asarray(want[0].record)
    assert got_record[6] != want_record[6]
    np.testing.assert_array_equal(np.delete(got_record, 6), np.delete(want_record, 6))
    _assert_bit_identical(got[1:], want[1:])
    _assert_bit_identical(got[0].count, want[0].count)
