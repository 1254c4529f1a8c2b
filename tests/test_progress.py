"""SPEC section 7: progress logging through `logging`, from inside jit."""

import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from gradient_ascent_jax import progress

LOGGER = "gradient_ascent_jax"
GRADS = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}  # global norm 5


def _run(tx, steps, grads=GRADS, jit=True):
  params = jax.tree.map(jnp.zeros_like, grads)
  state = tx.init(params)

  def step(state):
    return tx.update(grads, state, params)[1]

  step = jax.jit(step) if jit else step
  for _ in range(steps):
    state = step(state)
  jax.effects_barrier()
  return state


def _records(caplog):
  return [r for r in caplog.records if r.name == LOGGER]


@pytest.fixture
def log(caplog):
  caplog.set_level(logging.INFO, logger=LOGGER)
  return caplog


@pytest.mark.parametrize("jit", [True, False])
def test_records_at_exactly_every_interval(log, jit):
  tx = gax.gradient_ascent(learning_rate=0.2, warmup_steps=20, logging_interval=10)
  _run(tx, 35, jit=jit)
  records = _records(log)
  assert [r.step for r in records] == [10, 20, 30]
  # lr in force at step t (count t - 1): 0.2 * min(1, t / 20).
  np.testing.assert_allclose([r.learning_rate for r in records], [0.1, 0.2, 0.2], rtol=1e-6)
  np.testing.assert_allclose([r.grad_norm for r in records], [5.0] * 3, rtol=1e-6)
  assert all(r.levelno == logging.INFO for r in records)
  assert "step 20: learning rate 0.2, gradient norm 5" in records[1].getMessage()


def test_norm_is_of_the_gradient_as_passed_before_clipping(log):
  tx = gax.gradient_ascent(clip_value=0.5, logging_interval=1)
  _run(tx, 1)
  (record,) = _records(log)
  assert record.step == 1
  np.testing.assert_allclose(record.grad_norm, 5.0, rtol=1e-6)


@pytest.mark.parametrize("interval", [None, 0])
def test_no_records_and_no_callback_when_off(log, interval):
  tx = gax.gradient_ascent(logging_interval=interval)
  _run(tx, 12)
  assert _records(log) == []
  params = jax.tree.map(jnp.zeros_like, GRADS)
  lowered = jax.jit(tx.update).lower(GRADS, tx.init(params), params).as_text()
  assert "callback" not in lowered


def test_callback_present_in_program_when_on():
  tx = gax.gradient_ascent(logging_interval=10)
  params = jax.tree.map(jnp.zeros_like, GRADS)
  lowered = jax.jit(tx.update).lower(GRADS, tx.init(params), params).as_text()
  assert "callback" in lowered


@pytest.fixture
def fresh_warning(monkeypatch):
  """The once-per-process WARNING, re-armed for this test."""
  monkeypatch.setattr(progress, "_invisible_warned", threading.Event())


def test_default_compiles_no_callback():
  tx = gax.gradient_ascent()
  params = jax.tree.map(jnp.zeros_like, GRADS)
  lowered = jax.jit(tx.update).lower(GRADS, tx.init(params), params).as_text()
  assert "callback" not in lowered
  # The default chain has no logging stage at all: its state holds no counter for it.
  assert not any(isinstance(s, gax.LogProgressState) for s in tx.init(params))


def test_one_warning_when_records_would_be_dropped(caplog, fresh_warning):
  # Python's default: nothing configured, so the logger is enabled for WARNING only.
  caplog.set_level(logging.WARNING, logger=LOGGER)
  _run(gax.gradient_ascent(logging_interval=1), 3)
  _run(gax.gradient_ascent(logging_interval=2), 4)  # a second optimizer: still once
  records = _records(caplog)
  assert [r.levelno for r in records] == [logging.WARNING]
  message = records[0].getMessage()
  assert "dropped" in message
  assert "logging.basicConfig(level=logging.INFO)" in message
  assert "logging_interval=None" in message


def test_no_warning_when_records_are_shown(log, fresh_warning):
  _run(gax.gradient_ascent(logging_interval=1), 3)
  records = _records(log)
  assert [r.levelno for r in records] == [logging.INFO] * 3


def test_no_warning_when_logging_is_off(caplog, fresh_warning):
  caplog.set_level(logging.WARNING, logger=LOGGER)
  _run(gax.gradient_ascent(), 3)
  assert _records(caplog) == []


def test_library_attaches_no_handler_of_its_own(log):
  # Records reach the user's handlers only; the library shows nothing itself.
  _run(gax.gradient_ascent(logging_interval=1), 2)
  assert logging.getLogger(LOGGER).handlers == []
  assert len(_records(log)) == 2


def test_one_record_per_step_under_vmap(log):
  tx = gax.gradient_ascent(logging_interval=5)
  grads = jnp.ones((4, 3))  # a batch of 4 independent optimizers

  def run(g):
    state = tx.init(g)

    def body(state, _):
      return tx.update(g, state, g)[1], None

    return jax.lax.scan(body, state, None, length=12)[0]

  jax.jit(jax.vmap(run))(grads)
  jax.effects_barrier()
  assert [r.step for r in _records(log)] == [5, 10]


def test_one_record_per_step_under_pmap(log):
  n = jax.local_device_count()
  assert n == 8
  tx = gax.gradient_ascent(logging_interval=2)
  grads = jnp.ones((n, 3))
  params = jnp.zeros((n, 3))
  state = jax.pmap(tx.init)(params)
  step = jax.pmap(lambda g, s, p: tx.update(g, s, p)[1])
  for _ in range(6):
    state = step(grads, state, params)
  jax.effects_barrier()
  assert [r.step for r in _records(log)] == [2, 4, 6]


def test_injected_interval_is_decided_at_run_time(log):
  tx = optax.inject_hyperparams(gax.gradient_ascent)(logging_interval=3)
  params = jnp.zeros(2)
  state = tx.init(params)
  step = jax.jit(lambda s: tx.update(jnp.ones(2), s, params)[1])
  for _ in range(6):
    state = step(state)
  state.hyperparams["logging_interval"] = jnp.asarray(0, jnp.int32)  # off
  for _ in range(6):
    state = step(state)
  state.hyperparams["logging_interval"] = jnp.asarray(5, jnp.int32)
  for _ in range(3):
    state = step(state)
  jax.effects_barrier()
  assert [r.step for r in _records(log)] == [3, 6, 15]


def test_log_progress_passes_updates_through_and_counts():
  tx = gax.log_progress(logging_interval=4, learning_rate=0.1)
  state = tx.init(GRADS)
  for _ in range(3):
    updates, state = tx.update(GRADS, state)
  assert int(state.count) == 3
  jax.tree.map(np.testing.assert_array_equal, updates, GRADS)
  assert gax.log_progress(None).init(GRADS) == optax.EmptyState()
