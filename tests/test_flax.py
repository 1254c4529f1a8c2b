"""Flax integration: training a classifier by maximizing its log-likelihood.

Both Flax APIs are driven with ``gax.gradient_ascent``: NNX through
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and Linen through
``flax.training.train_state.TrainState``. The data is scikit-learn's bundled
8x8 digits (10 classes, so chance accuracy is 10%).
"""

import functools
import logging

from flax import linen
from flax import nnx
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import gradient_ascent_jax as gax

STEPS = 150
LEARNING_RATE = 3e-3
# Far above the 10% of guessing; a linear model alone reaches ~95% here.
MIN_TEST_ACCURACY = 0.85


@pytest.fixture(scope="module")
def digits():
  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  x, y = x[order], y[order]
  split = 1400
  return (jnp.asarray(x[:split]), jnp.asarray(y[:split])), (
    jnp.asarray(x[split:]),
    jnp.asarray(y[split:]),
  )


def mean_log_likelihood(logits, labels):
  """Average log-probability of the true class: the objective to maximize."""
  log_probs = jax.nn.log_softmax(logits)
  return jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def accuracy(logits, labels):
  return float(jnp.mean(jnp.argmax(logits, axis=-1) == labels))


class NnxMlp(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 32, rngs=rngs)
    self.out = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))


class LinenMlp(linen.Module):
  @linen.compact
  def __call__(self, x):
    return linen.Dense(10)(jax.nn.relu(linen.Dense(32)(x)))


@pytest.mark.slow  # 5 s or more on 2 cores
def test_nnx_optimizer_maximizes_log_likelihood(digits, caplog):
  (x_train, y_train), (x_test, y_test) = digits
  model = NnxMlp(nnx.Rngs(0))
  tx = gax.gradient_ascent(learning_rate=LEARNING_RATE, logging_interval=50)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def objective(model):
      return mean_log_likelihood(model(x), y)

    value, grads = nnx.value_and_grad(objective)(model)
    optimizer.update(model, grads)
    return value

  start = float(mean_log_likelihood(model(x_train), y_train))
  with caplog.at_level(logging.INFO, logger="gradient_ascent_jax"):
    history = [float(train_step(model, optimizer, x_train, y_train)) for _ in range(STEPS)]
    jax.effects_barrier()
  end = float(mean_log_likelihood(model(x_train), y_train))

  # Ten classes at random initialisation: log-likelihood near log(1/10).
  assert start < -1.5
  assert end > -0.35, f"log-likelihood only rose from {start:.3f} to {end:.3f}"
  assert history[-1] > history[len(history) // 2] > history[0]
  assert accuracy(model(x_test), y_test) >= MIN_TEST_ACCURACY
  assert int(optimizer.step[...]) == STEPS
  steps_logged = [r.step for r in caplog.records if r.name == "gradient_ascent_jax"]
  assert steps_logged == [50, 100, 150]


@pytest.mark.slow  # 5 s or more on 2 cores
def test_nnx_optimizer_step_is_the_plain_optax_step(digits):
  """nnx.Optimizer.update applies exactly tx.update + optax.apply_updates."""
  (x_train, y_train), _ = digits
  model = NnxMlp(nnx.Rngs(1))
  tx = gax.gradient_ascent(learning_rate=LEARNING_RATE, clip_value=0.5, logging_interval=None)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, params = nnx.split(model, nnx.Param)
  plain_params = jax.tree.map(jnp.copy, nnx.to_pure_dict(params))
  plain_state = tx.init(plain_params)

  def plain_objective(p):
    restored = nnx.merge(graphdef, nnx.State(p))
    return mean_log_likelihood(restored(x_train), y_train)

  for _ in range(3):
    grads = nnx.grad(lambda m: mean_log_likelihood(m(x_train), y_train))(model)
    optimizer.update(model, grads)
    plain_grads = jax.grad(plain_objective)(plain_params)
    updates, plain_state = tx.update(plain_grads, plain_state, plain_params)
    plain_params = optax.apply_updates(plain_params, updates)

  jax.tree.map(
    np.testing.assert_array_equal,
    nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    plain_params,
  )


def test_linen_train_state_maximizes_log_likelihood(digits):
  (x_train, y_train), (x_test, y_test) = digits
  module = LinenMlp()
  params = module.init(jax.random.key(0), x_train[:1])["params"]
  state = train_state.TrainState.create(
    apply_fn=module.apply,
    params=params,
    tx=gax.gradient_ascent(learning_rate=LEARNING_RATE, logging_interval=None),
  )

  def objective(params, x, y):
    return mean_log_likelihood(state.apply_fn({"params": params}, x), y)

  @jax.jit
  def train_step(state, x, y):
    value, grads = jax.value_and_grad(objective)(state.params, x, y)
    return state.apply_gradients(grads=grads), value

  start = float(objective(state.params, x_train, y_train))
  history = []
  for _ in range(STEPS):
    state, value = train_step(state, x_train, y_train)
    history.append(float(value))
  end = float(objective(state.params, x_train, y_train))

  assert start < -1.5
  assert end > -0.35, f"log-likelihood only rose from {start:.3f} to {end:.3f}"
  assert history[-1] > history[len(history) // 2] > history[0]
  logits = state.apply_fn({"params": state.params}, x_test)
  assert accuracy(logits, y_test) >= MIN_TEST_ACCURACY
  assert int(state.step) == STEPS
  # The step counter inside the optimizer state agrees with TrainState's.
  assert int(state.opt_state[-1].count) == STEPS


def test_linen_apply_gradients_cannot_pass_value():
  # docs/guide/flax.md writes apply_gradients out because its keywords go to .replace().
  params = {"w": jnp.zeros(2)}
  state = train_state.TrainState.create(
    apply_fn=None, params=params, tx=gax.gradient_ascent(1e-3, logging_interval=1)
  )
  with pytest.raises(TypeError, match="value"):
    state.apply_gradients(grads={"w": jnp.ones(2)}, value=jnp.float32(1.0))


def test_nnx_optimizer_update_passes_value_to_the_log(caplog):
  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, gax.gradient_ascent(1e-3, logging_interval=1), wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 2)))))(model)
  with caplog.at_level(logging.INFO, logger="gradient_ascent_jax"):
    optimizer.update(model, grads, value=jnp.float32(-2.5))
    jax.effects_barrier()
  assert [r.value for r in caplog.records if r.name == "gradient_ascent_jax"] == [-2.5]


@pytest.mark.slow  # 3 s or more on 2 cores
def test_progress_reader_finds_records_in_nnx_split_state_and_pure_dicts(caplog):
  # NNX's functional API (nnx.split, a jitted step over the State, nnx.merge inside)
  # keeps the LogProgressState's fields by name but not its type; so do the plain
  # dicts of nnx.to_pure_dict. The reader finds the records there too, the same
  # ones as with nnx.jit, and nothing in a look-alike of another dtype.
  caplog.set_level(logging.INFO, logger="gradient_ascent_jax")
  tx = gax.gradient_ascent(0.01, logging_interval=2, logging_emit="state")
  x = jnp.ones((1, 2))

  def records():
    got = [(r.step, r.grad_norm) for r in caplog.records if hasattr(r, "grad_norm")]
    caplog.clear()
    return got

  def objective(model):
    return -jnp.sum(model(x) ** 2)

  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer):
    optimizer.update(model, nnx.grad(objective)(model))

  reader = gax.ProgressReader()
  for _ in range(4):
    nnx_step(model, optimizer)
    reader(optimizer)
  reader.flush()
  expected = records()
  assert [step for step, _ in expected] == [2, 4]

  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))

  @functools.partial(jax.jit, donate_argnums=0)
  def split_step(state):
    model, optimizer = nnx.merge(graphdef, state)
    optimizer.update(model, nnx.grad(objective)(model))
    return nnx.state((model, optimizer))

  reader = gax.ProgressReader()
  for _ in range(4):
    state = split_step(state)
    reader(state)
    reader(nnx.to_pure_dict(state))  # the same records: each is logged once
  reader.flush()
  assert records() == expected

  reader = gax.ProgressReader()
  reader({"opt": {"count": jnp.zeros([], jnp.int32), "record": jnp.zeros(40, jnp.float32)}})
  assert [r.message for r in caplog.records][0].startswith("ProgressReader: the state it was given")


def test_progress_reader_finds_records_in_nnx_optimizer_and_train_state(caplog):
  caplog.set_level(logging.INFO, logger="gradient_ascent_jax")

  def steps():
    return [r.step for r in caplog.records if r.name == "gradient_ascent_jax"]

  model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
  tx = gax.gradient_ascent(0.01, logging_interval=2, logging_emit="state")
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer):
    grads = nnx.grad(lambda m: -jnp.sum(m(jnp.ones((1, 2))) ** 2))(model)
    optimizer.update(model, grads)

  reader = gax.ProgressReader()
  for _ in range(4):
    nnx_step(model, optimizer)
    reader(optimizer)
  reader.flush()
  assert steps() == [2, 4]
  caplog.clear()

  params = {"w": jnp.ones(2)}
  ts = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  ts_step = jax.jit(lambda ts: ts.apply_gradients(grads={"w": -ts.params["w"]}))
  for _ in range(4):
    ts = ts_step(ts)
    reader(ts)
  reader.flush()
  assert steps() == [2, 4]
