"""Records kept in the state (``logging_emit="state"``) and ``gax.ProgressReader``.

The callback path is the oracle: every scenario runs on both paths and the
records (logger, level, message, step, norm, objective) must be the same.
"""

import functools
import logging
import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from gradient_ascent_jax._src import progress
from gradient_ascent_jax._src import records

LOGGER = "gradient_ascent_jax"
PATHS = ("callback", "state")


class _Collect(logging.Handler):
  def __init__(self):
    super().__init__(logging.DEBUG)
    self.seen = []

  def emit(self, record):
    self.seen.append(
      (
        record.name,
        record.levelno,
        record.getMessage(),
        getattr(record, "step", None),
        getattr(record, "grad_norm", None),
        getattr(record, "value", None),
      )
    )


@pytest.fixture
def collect(monkeypatch):
  """The library's records, at INFO, collected apart from other handlers."""
  monkeypatch.setattr(records, "_invisible_warned", {})
  handler = _Collect()
  logger = logging.getLogger(LOGGER)
  saved = logger.level, logger.propagate
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  yield handler.seen
  logger.removeHandler(handler)
  logger.level, logger.propagate = saved


def _objective(p):
  return -jnp.sum((p["a"] - 2.0) ** 2) - 0.5 * jnp.sum(p["b"] ** 2)


PARAMS = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}


def _train(path, collect, *, steps=25, donate=False, nan_at=None, read=True, params=PARAMS, **kw):
  """A jitted Python loop of ``steps`` steps; the records it logged (and the last state)."""
  tx = gax.gradient_ascent(0.05, logging_emit=path, **{"logging_interval": 5, **kw})

  def step(params, state, i):
    value, grads = jax.value_and_grad(_objective)(params)
    value = jnp.where(i == (-1 if nan_at is None else nan_at), jnp.nan, value)
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step, donate_argnums=(0, 1) if donate else ())
  params = jax.tree.map(jnp.copy, params)
  state, reader = tx.init(params), gax.ProgressReader()
  for i in range(steps):
    params, state = step(params, state, i)
    if path == "state" and read:
      reader(state)
  if path == "state" and read:
    reader.flush()
  jax.effects_barrier()
  seen = list(collect)
  collect.clear()
  return seen, state


@pytest.mark.slow  # 3 s or more on 2 cores
@pytest.mark.parametrize(
  "case",
  [
    {},
    {"donate": True},
    {"nan_at": 7},
    {"nan_at": 7, "donate": True},
    {"logging_name": "gen"},
    # A warning before the first due step: the optimizer's logger and name already.
    {"nan_at": 0, "logging_name": "gen"},
    {"logging_interval": 1, "steps": 6, "donate": True},
    # A leaf large enough that its norm is measured apart (a cond of its own).
    {"params": {"a": jnp.ones(70_000), "b": jnp.ones((2, 2))}, "donate": True},
    {"params": {"a": jnp.ones(70_000), "b": jnp.ones((2, 2))}, "nan_at": 7},
  ],
)
def test_state_path_logs_what_the_callback_path_logs(collect, case):
  by_callback, _ = _train("callback", collect, **case)
  by_state, _ = _train("state", collect, **case)
  assert by_callback, "the oracle logged nothing"
  assert by_state == by_callback


@pytest.mark.slow  # 2 s or more on 2 cores
def test_records_are_those_expected(collect):
  # Independent of the callback path: steps, levels and the first norm by hand.
  seen, _ = _train("state", collect, nan_at=7)
  assert [(s[1], s[3]) for s in seen] == [
    (logging.INFO, 5),
    (logging.WARNING, 8),
    (logging.INFO, 10),
    (logging.INFO, 15),
    (logging.INFO, 20),
    (logging.INFO, 25),
  ]
  assert "step 8: the objective passed as value= is not finite" in seen[1][2]
  seen, _ = _train("state", collect, logging_interval=1, steps=1)
  # The gradient at the start: a = 1 (d/da = 2 * (2 - 1) = 2 each), b = 1 (-1 each).
  np.testing.assert_allclose(seen[0][4], np.sqrt(3 * 4 + 4 * 1), rtol=1e-6)
  assert seen[0][5] == pytest.approx(-3.0 - 2.0)


def test_compiled_step_holds_no_callback_and_no_effect():
  tx = gax.gradient_ascent(logging_interval=10, logging_emit="state")
  step = lambda g, s, p: tx.update(g, s, p, value=1.0)  # noqa: E731
  args = (PARAMS, tx.init(PARAMS), PARAMS)
  assert not jax.make_jaxpr(step)(*args).effects
  lowered = jax.jit(step).lower(*args).as_text()
  assert "callback" not in lowered
  # The callback path of the same optimizer has one: the check can fail.
  tx = gax.gradient_ascent(logging_interval=10)
  assert "callback" in jax.jit(step).lower(PARAMS, tx.init(PARAMS), PARAMS).as_text()


def test_state_path_exports():
  # jax.export refuses host callbacks; the state path has none.
  tx = gax.gradient_ascent(logging_interval=2, logging_emit="state")
  state = tx.init(PARAMS)
  exported = jax.export.export(jax.jit(lambda g, s: tx.update(g, s, PARAMS)))(PARAMS, state)
  _, state = exported.call(PARAMS, state)
  _, state = exported.call(PARAMS, state)
  assert records.unpack(np.asarray(state[0].record))[0].step == 2


def test_callback_sends_one_packed_array(monkeypatch):
  calls = []
  original = jax.debug.callback

  def counting(callback, *args, **kwargs):
    calls.append(len(args))
    return original(callback, *args, **kwargs)

  monkeypatch.setattr(jax.debug, "callback", counting)
  tx = gax.gradient_ascent(logging_interval=1)
  jax.jit(lambda s: tx.update(PARAMS, s, PARAMS, value=1.0))(tx.init(PARAMS))
  jax.effects_barrier()
  assert calls == [1]


def test_packed_record_round_trips_every_field(x64):
  for dtype in (jnp.float32, jnp.float64):
    record = records.Record(
      step=jnp.asarray(2**31 - 1, jnp.int32),
      interval=jnp.asarray(7),
      learning_rate=jnp.float32(0.1),
      grad_norm=jnp.asarray(1e300 if dtype == jnp.float64 else 3e38, dtype),
      value=jnp.asarray(-1.25, dtype),
      show=True,
      descending=True,
      warn_step=jnp.asarray(5),
      nonfinite=False,
      value_nonfinite=True,
    )
    words = records.pack(record, has_value=True, has_rate=False, name="gen.é")
    # As the callback gets it (an array), and as the reader parses it (Python ints).
    for host in (np.asarray(words), np.asarray(words).tolist()):
      back, has_value, has_rate, name = records.unpack(host)
      assert (back.step, back.interval, back.show, back.descending) == (2**31 - 1, 7, True, True)
      assert (back.warn_step, back.nonfinite, back.value_nonfinite) == (5, False, True)
      assert back.learning_rate == np.float32(0.1)
      assert back.grad_norm == (1e300 if dtype == jnp.float64 else float(np.float32(3e38)))
      assert (back.value, has_value, has_rate, name) == (-1.25, True, False, "gen.é")


def _vmapped_run(collect, path, interval, x, value, steps):
  """What 4 vmapped copies log; ``value(x, i)`` is each copy's objective at call ``i``."""
  tx = gax.gradient_ascent(0.05, logging_interval=interval, logging_emit=path)
  state, reader = jax.vmap(tx.init)(x), gax.ProgressReader()

  def update(x, s, i):
    return tx.update(-2 * x, s, x, value=value(x, i))[1]

  step = jax.jit(jax.vmap(update, in_axes=(0, 0, None)))
  for i in range(steps):
    state = step(x, state, i)
    if path == "state":
      reader(state)
  reader.flush()
  jax.effects_barrier()
  seen = list(collect)
  collect.clear()
  return seen


@pytest.mark.slow  # 3 s or more on 2 cores
def test_vmap_copies_log_as_on_the_callback_path(collect):
  x = jnp.arange(8.0).reshape(4, 2)
  runs = [_vmapped_run(collect, path, 3, x, lambda x, i: -jnp.sum(x**2), 9) for path in PATHS]
  assert [s[3] for s in runs[0]] == [3, 6, 9]
  assert runs[1] == runs[0]


@pytest.mark.parametrize("interval", [1, 2])
def test_nan_in_a_later_vmap_copy_warns_once_as_on_the_callback_path(collect, interval):
  # Copy 0 stays finite; the others' objective is NaN from step 2 on. The first
  # copy logs the step, so it must also carry the warning that the others fired.
  x = jnp.zeros((4, 2)).at[1:].set(1.0)

  def value(x, i):
    return jnp.where((x[0] > 0) & (i >= 1), jnp.nan, -jnp.sum(x**2))

  runs = [_vmapped_run(collect, path, interval, x, value, 4) for path in PATHS]
  warnings = [s for s in runs[0] if s[1] == logging.WARNING]
  assert [s[3] for s in warnings] == [2], runs[0]
  assert runs[1] == runs[0]


@pytest.mark.parametrize("path", PATHS)
def test_vmap_over_states_at_different_steps_logs_each_step(collect, path):
  tx = gax.gradient_ascent(logging_interval=2, logging_emit=path)
  x = jnp.zeros((2, 2))
  state = jax.vmap(tx.init)(x)
  step = jax.jit(jax.vmap(lambda x, s: tx.update(jnp.ones(2), s, x)[1]))
  reader = gax.ProgressReader()
  # The second copy starts one step ahead: the copies are due on alternate calls.
  state = (state[0]._replace(count=jnp.array([0, 1], jnp.int32)), *state[1:])
  for _ in range(4):
    state = step(x, state)
    if path == "state":
      reader(state)
  reader.flush()
  jax.effects_barrier()
  assert [s[3] for s in collect] == [2, 2, 4, 4]


@pytest.mark.slow  # 2 s or more on 2 cores
@pytest.mark.parametrize("path", PATHS)
def test_nan_on_a_later_pmap_device_warns_once(collect, path):
  n = jax.local_device_count()
  x = jnp.arange(2.0 * n).reshape(n, 2)
  tx = gax.gradient_ascent(0.05, logging_interval=2, logging_emit=path)
  state, reader = jax.pmap(tx.init)(x), gax.ProgressReader()
  # Only the last device's objective is NaN, at every step.
  step = jax.pmap(
    lambda x, s: tx.update(
      -2 * x, s, x, value=jnp.where(jax.lax.axis_index("i") == n - 1, jnp.nan, 1.0)
    )[1],
    axis_name="i",
  )
  for _ in range(4):
    state = step(x, state)
    if path == "state":
      reader(state)
  reader.flush()
  jax.effects_barrier()
  warnings = [s for s in collect if s[1] == logging.WARNING]
  assert [s[3] for s in warnings] == [1]
  assert "the objective passed as value= is not finite" in warnings[0][2]
  assert [s[3] for s in collect if s[1] == logging.INFO] == [2, 4]
  # Every device remembers the warning, not only the one whose objective was NaN.
  np.testing.assert_array_equal(progress.unpacked(state[0]).nonfinite_warned, [True] * n)


@pytest.mark.slow  # 2 s or more on 2 cores
@pytest.mark.parametrize("path", PATHS)
def test_pmap_descent_rule_reads_the_first_devices_objective(collect, path):
  # Each device's objective is its own: the first device's records decide the
  # descent warning, and a lax.pmean makes the objective the batch's (as the docs say).
  n = jax.local_device_count()
  x = jnp.zeros((n, 2))

  def warned(falling, mean=False):
    tx = gax.gradient_ascent(0.05, logging_interval=1, logging_emit=path)
    state, reader = jax.pmap(tx.init)(x), gax.ProgressReader()

    def update(x, s, i):
      # The falling device falls n + 2 times faster than the others rise.
      mine = jnp.where(jax.lax.axis_index("i") == falling, -(n + 2) * i, i)
      value = mine.astype(jnp.float32)
      value = jax.lax.pmean(value, "i") if mean else value
      return tx.update(-2 * x, s, x, value=value)[1]

    step = jax.pmap(update, axis_name="i", in_axes=(0, 0, None))
    for i in range(12):
      state = step(x, state, i)
      if path == "state":
        reader(state)
    reader.flush()
    jax.effects_barrier()
    found = [s[3] for s in collect if s[1] == logging.WARNING]
    collect.clear()
    return found

  assert len(warned(0)) == 1
  assert warned(n - 1) == []
  assert len(warned(n - 1, mean=True)) == 1


@pytest.mark.parametrize("path", PATHS)
def test_nan_on_a_later_shard_map_device_warns_once(collect, path):
  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  spec = jax.sharding.PartitionSpec
  tx = gax.log_progress(logging_interval=1, learning_rate=0.1, emit=path)
  grads = jax.device_put(jnp.ones((mesh.size, 2)), jax.NamedSharding(mesh, spec("d")))
  state, reader = tx.init(grads), gax.ProgressReader()

  def per_device(g, s):
    bad = jax.lax.axis_index("d") == mesh.size - 1
    return tx.update(g, s, value=jnp.where(bad, jnp.nan, 1.0))[1]

  step = jax.jit(
    jax.shard_map(
      per_device, mesh=mesh, in_specs=(spec("d"), spec()), out_specs=spec(), check_vma=False
    )
  )
  for _ in range(2):
    state = step(grads, state)
    if path == "state":
      reader(state)
  reader.flush()
  jax.effects_barrier()
  assert [(s[1], s[3]) for s in collect] == [
    (logging.WARNING, 1),
    (logging.INFO, 1),
    (logging.INFO, 2),
  ]


def _per_device(tree, axis):
  """``tree`` marked as differing from device to device over ``axis`` (shard_map)."""
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(tree, axis, to="varying")
  return jax.lax.pvary(tree, axis)  # jax < 0.8.2 (the declared floor is 0.8.0)


def _rows_objective(w, x):
  return -jnp.sum((x @ w - 1.0) ** 2)


@pytest.mark.parametrize("mean", [False, True], ids=["own objective", "pmean objective"])
@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_shard_map_logs_the_first_devices_objective_once_per_step(collect, path, check_vma, mean):
  # The usual data-parallel step: the gradients are averaged, the objective is
  # each device's own unless it is averaged too. check_vma=True is shard_map's default.
  spec = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  x = jnp.arange(4.0 * mesh.size).reshape(mesh.size, 4) / 10
  x = jax.device_put(x, jax.NamedSharding(mesh, spec("d")))
  tx = gax.gradient_ascent(0.01, logging_interval=2, logging_emit=path)

  def local_step(w, state, x):
    value, grads = jax.value_and_grad(_rows_objective)(_per_device(w, "d"), x)
    value = jax.lax.pmean(value, "d") if mean else value
    updates, state = tx.update(jax.lax.pmean(grads, "d"), state, w, value=value)
    return w + updates, state

  step = jax.jit(
    jax.shard_map(
      local_step,
      mesh=mesh,
      in_specs=(spec(), spec(), spec("d")),
      out_specs=(spec(), spec()),
      check_vma=check_vma,
    )
  )
  w, state, reader = jnp.zeros(4), tx.init(jnp.zeros(4)), gax.ProgressReader()
  rows = np.asarray(x) if mean else np.asarray(x)[:1]  # the first device's row
  expected = []
  for _ in range(4):
    expected.append(-np.sum((rows @ np.asarray(w) - 1.0) ** 2) / (mesh.size if mean else 1))
    # Wait for each step: collectives in flight can deadlock fake CPU devices.
    w, state = jax.block_until_ready(step(w, state, x))
    if path == "state":
      reader(state)
  reader.flush()
  jax.effects_barrier()
  assert [(s[1], s[3]) for s in collect] == [(logging.INFO, 2), (logging.INFO, 4)]
  np.testing.assert_allclose([s[5] for s in collect], expected[1::2], rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_shard_map_check_vma_adds_no_collective(path):
  # The first device's objective travels in the all-reduce that the non-finite
  # rule makes anyway (check_vma=False: each device keeps its own objective).
  spec = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  x = jax.device_put(jnp.ones((mesh.size, 4)), jax.NamedSharding(mesh, spec("d")))
  tx = gax.gradient_ascent(0.01, logging_interval=2, logging_emit=path)

  def local_step(w, state, x):
    value, grads = jax.value_and_grad(_rows_objective)(_per_device(w, "d"), x)
    return tx.update(jax.lax.pmean(grads, "d"), state, w, value=value)

  def all_reduces(check_vma):
    step = jax.shard_map(
      local_step,
      mesh=mesh,
      in_specs=(spec(), spec(), spec("d")),
      out_specs=(spec(), spec()),
      check_vma=check_vma,
    )
    text = jax.jit(step).lower(jnp.zeros(4), tx.init(jnp.zeros(4)), x).as_text()
    return text.count("all_reduce")

  assert all_reduces(True) == all_reduces(False) == 2


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_shard_map_over_sharded_params_keeps_a_replicated_logging_state(collect, path, check_vma):
  # Gradients, moments and objective each device's own: the logging state is
  # the same on every device (out_specs P()) and logs the first device's record.
  spec = jax.sharding.PartitionSpec
  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  w = jax.device_put(jnp.ones((mesh.size, 2)), jax.NamedSharding(mesh, spec("d")))
  tx = gax.gradient_ascent(0.01, logging_interval=1, logging_emit=path)
  state, reader = tx.init(w), gax.ProgressReader()
  state_specs = jax.tree.map(lambda a: spec("d") if a.shape == w.shape else spec(), state)

  def local_step(w, state):
    value, grads = jax.value_and_grad(lambda w: -jnp.sum((w - 3.0) ** 2))(w)
    updates, state = tx.update(grads, state, w, value=value)
    return w + updates, state

  step = jax.jit(
    jax.shard_map(
      local_step,
      mesh=mesh,
      in_specs=(spec("d"), state_specs),
      out_specs=(spec("d"), state_specs),
      check_vma=check_vma,
    )
  )
  expected = []
  for _ in range(2):
    first = np.asarray(w)[0]  # the first device's shard
    expected.append((-np.sum((first - 3.0) ** 2), np.linalg.norm(-2 * (first - 3.0))))
    w, state = jax.block_until_ready(step(w, state))
    if path == "state":
      reader(state)
  reader.flush()
  jax.effects_barrier()
  assert [(s[1], s[3]) for s in collect] == [(logging.INFO, 1), (logging.INFO, 2)]
  np.testing.assert_allclose([(s[5], s[4]) for s in collect], expected, rtol=1e-5)


def test_two_named_optimizers_in_one_dict(collect):
  gen = gax.gradient_ascent(0.1, logging_interval=2, logging_emit="state", logging_name="gen")
  disc = gax.gradient_ascent(0.1, logging_interval=3, logging_emit="state", logging_name="disc")
  g, d = jnp.zeros(2), jnp.ones(2)
  states = {"gen": gen.init(g), "disc": disc.init(d)}

  @jax.jit
  def step(states):
    return {
      "gen": gen.update(jnp.ones(2), states["gen"], g)[1],
      "disc": disc.update(jnp.ones(2), states["disc"], d)[1],
    }

  reader = gax.ProgressReader()
  for _ in range(6):
    states = step(states)
    reader(states)
  reader.flush()
  seen = sorted((s[0], s[3]) for s in collect)
  assert seen == [
    (LOGGER + ".disc", 3),
    (LOGGER + ".disc", 6),
    (LOGGER + ".gen", 2),
    (LOGGER + ".gen", 4),
    (LOGGER + ".gen", 6),
  ]
  assert all(s[2].startswith(s[0].rsplit(".", 1)[1] + ": step ") for s in collect)


@pytest.mark.slow  # 2 s or more on 2 cores
def test_two_optimizers_each_with_its_own_reader_log_once_each(collect):
  txs = [gax.gradient_ascent(0.1, logging_interval=2, logging_emit="state") for _ in range(2)]
  states = [tx.init(jnp.zeros(2)) for tx in txs]
  readers = [gax.ProgressReader() for _ in txs]
  for _ in range(4):
    for k, tx in enumerate(txs):
      states[k] = jax.jit(tx.update)(jnp.full(2, k + 1.0), states[k])[1]
      readers[k](states[k])
  for reader in readers:
    reader.flush()
  assert sorted((s[3], round(s[4], 4)) for s in collect) == [
    (2, round(np.sqrt(2), 4)),
    (2, round(2 * np.sqrt(2), 4)),
    (4, round(np.sqrt(2), 4)),
    (4, round(2 * np.sqrt(2), 4)),
  ]


def test_one_state_in_two_containers_is_two_places_to_one_reader(collect):
  # As the docs say: hand a reader the same container on every call.
  tx = gax.gradient_ascent(0.1, logging_interval=2, logging_emit="state")
  state, reader = tx.init(jnp.zeros(2)), gax.ProgressReader()
  update = jax.jit(tx.update)
  for i in range(4):
    state = update(jnp.ones(2), state)[1]
    reader(state if i % 2 else {"opt": state})
  reader.flush()
  steps = [s[3] for s in collect]
  assert sorted(set(steps)) == [2, 4]
  assert len(steps) > len(set(steps)), steps


@pytest.fixture
def running(monkeypatch):
  """Arrays taken for still running: the reader's ``_ready`` says no to those in
  ``running.fresh``, and each copy the reader makes joins them (``running.copies``
  counts the copies)."""
  from gradient_ascent_jax._src import reader as reader_module

  running = types.SimpleNamespace(fresh=[], copies=0)
  copy = reader_module._copy

  def tracked_copy(words):
    running.copies += 1
    running.fresh.append(copy(words))
    return running.fresh[-1]

  monkeypatch.setattr(reader_module, "_copy", tracked_copy)
  monkeypatch.setattr(
    reader_module, "_ready", lambda words: not any(words is f for f in running.fresh)
  )
  return running


def test_reader_learns_the_interval_when_each_read_is_logged_a_call_late(collect, running):
  # The host runs ahead: every read is of a running step, ready only at the next
  # call, after that call read again. The reader must still learn the interval
  # (it copied on every call, 100 copies for 100 steps).
  fresh = running.fresh
  tx = gax.gradient_ascent(0.1, logging_interval=10, logging_emit="state")
  step = jax.jit(lambda state: tx.update(jnp.ones(2), state, jnp.zeros(2))[1])
  state, reader = tx.init(jnp.zeros(2)), gax.ProgressReader()
  for _ in range(100):
    state = step(state)
    fresh[:] = [state[0].record]  # this call's state is still running
    reader(state)
  fresh.clear()
  reader.flush()
  assert [s[3] for s in collect] == list(range(10, 101, 10))
  assert running.copies <= 100 // 10 + 5, running.copies


def _run_with_the_host_ahead(step, state, running, ahead: int, calls: int = 100) -> None:
  """``calls`` calls of ``step``, each read; the records stay running until call ``ahead``."""
  reader = gax.ProgressReader()
  for call in range(1, calls + 1):
    state = step(state)
    running.fresh.append(state[0].record)
    reader(state)
    if call >= ahead:
      running.fresh.clear()  # the device caught up: every record so far is ready
  reader.flush()


@pytest.mark.parametrize("ahead", [1, 5, 25])
def test_until_a_record_is_ready_the_reader_reads_every_call(collect, running, ahead):
  # The host runs `ahead` steps ahead of the device at the start: the reader cannot
  # learn the interval, and copies on each of those calls; then once per interval.
  tx = gax.gradient_ascent(0.1, logging_interval=10, logging_emit="state")
  step = jax.jit(lambda state: tx.update(jnp.ones(2), state, jnp.zeros(2))[1])
  _run_with_the_host_ahead(step, tx.init(jnp.zeros(2)), running, ahead)
  assert [s[3] for s in collect] == list(range(10, 101, 10))
  assert ahead <= running.copies <= ahead + 100 // 10 + 2, running.copies


@pytest.mark.parametrize("ahead", [1, 3, 25])
def test_several_steps_per_call_with_the_host_ahead_log_every_record(collect, running, ahead):
  # Five steps per call (a critic's inner loop), interval 50: a record stays in the
  # state for 10 calls. The first reads were still running when later calls came, and
  # the reader took one step per call for granted: it skipped calls 4-52 and lost
  # records (2 to 7 of 10).
  tx = gax.gradient_ascent(0.1, logging_interval=50, logging_emit="state")

  def update(_, state):
    return tx.update(jnp.ones(2), state, jnp.zeros(2))[1]

  step = jax.jit(lambda state: jax.lax.fori_loop(0, 5, update, state))
  _run_with_the_host_ahead(step, tx.init(jnp.zeros(2)), running, ahead)
  assert [s[3] for s in collect] == list(range(50, 501, 50))


@pytest.mark.parametrize("new", [5, 3, 7, 0])
def test_an_injected_interval_changed_mid_run_logs_the_callback_paths_steps(collect, new):
  # The reader planned its next read by the old interval and missed records due
  # sooner (10 -> 5: step 25; 10 -> 3: steps 21, 24, 27).
  logged = {}
  for emit in ("callback", "state"):
    tx = optax.inject_hyperparams(gax.gradient_ascent)(
      learning_rate=0.005, logging_interval=10, logging_emit=emit
    )
    step = jax.jit(functools.partial(lambda tx, s: tx.update(jnp.ones(3), s, jnp.zeros(3))[1], tx))
    state, reader = tx.init(jnp.zeros(3)), gax.ProgressReader()
    for t in range(40):
      if t == 20:
        interval = state.hyperparams["logging_interval"]
        state.hyperparams["logging_interval"] = jnp.full_like(interval, new)
      state = step(state)
      if emit == "state":
        reader(state)
    reader.flush()
    jax.effects_barrier()
    logged[emit] = [s[3] for s in collect]
    collect.clear()
  assert logged["state"] == logged["callback"]
  assert logged["callback"][:2] == [10, 20]
  assert logged["callback"][2:] == [t for t in range(21, 41) if new and t % new == 0]


def test_a_ready_record_behind_a_running_one_outlives_the_donated_state(collect, running):
  # Step 1's record is still running when step 2's, ready, is read: step 2's must
  # wait behind it, and step 3 donates the state that holds it.
  fresh = running.fresh
  tx = gax.gradient_ascent(0.1, logging_interval=1, logging_emit="state")
  step = jax.jit(lambda state: tx.update(jnp.ones(2), state, jnp.zeros(2))[1], donate_argnums=0)
  state, reader = tx.init(jnp.zeros(2)), gax.ProgressReader()
  state = step(state)
  fresh.append(state[0].record)  # step 1 is running
  reader(state)
  state = step(state)
  fresh.pop(0)  # its record was copied aside, and the copy is still running; step 2 is done
  reader(state)
  held = state[0].record
  state = step(state)  # donates the state of step 2
  reader(state)
  fresh.clear()
  reader.flush()
  assert held.is_deleted()
  assert [s[3] for s in collect] == [1, 2, 3]


def test_a_fast_loop_logs_the_ready_records_in_batches(collect, running, monkeypatch):
  # The host runs ahead (each read is of a running step, ready at the next call):
  # once the interval is learned, the records that are ready wait for the next
  # batch, at most a quarter second on, and are then logged together, in order.
  from gradient_ascent_jax._src import reader as reader_module

  clock, fresh = [0.0], running.fresh
  clocked = types.SimpleNamespace(monotonic=lambda: clock[0])
  monkeypatch.setattr(reader_module, "time", clocked, raising=False)
  tx = gax.gradient_ascent(0.1, logging_interval=2, logging_emit="state")
  step = jax.jit(lambda state: tx.update(jnp.ones(2), state, jnp.zeros(2))[1])
  state, reader = tx.init(jnp.zeros(2)), gax.ProgressReader()

  def run(steps):
    nonlocal state
    for _ in range(steps):
      state = step(state)
      fresh[:] = [state[0].record]  # this call's state is still running
      reader(state)

  run(20)
  # Step 2's record, logged while the reader learned the pace (the second read);
  # the others ready since step 3, waiting for the batch.
  assert [s[3] for s in collect] == [2]
  clock[0] = 0.2
  run(1)
  assert [s[3] for s in collect] == [2]
  clock[0] = 0.3
  run(1)
  assert [s[3] for s in collect] == list(range(2, 21, 2))
  run(4)
  assert [s[3] for s in collect] == list(range(2, 21, 2))
  fresh.clear()
  reader.flush()
  assert [s[3] for s in collect] == list(range(2, 27, 2))


@pytest.mark.slow  # 3 s or more on 2 cores
def test_reader_reads_once_per_interval_and_misses_no_record(collect, monkeypatch):
  # Reading a running step's record costs a copy that the next (donating) step
  # waits for: the reader reads one call in `interval`, which sees every record,
  # since a record stays in the state that many steps.
  from gradient_ascent_jax._src import reader as reader_module

  reads = []
  copy = reader_module._copy
  monkeypatch.setattr(reader_module, "_copy", lambda words: reads.append(1) or copy(words))
  tx = gax.gradient_ascent(0.1, logging_interval=10, logging_emit="state")
  big = jnp.ones((300, 300)) / 300

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, big):
    heavy = jax.lax.fori_loop(0, 20, lambda _, m: jnp.tanh(m @ m), big)  # keeps it running
    return tx.update(jnp.ones(2) * (1 + heavy[0, 0]), state, jnp.zeros(2))[1]

  state, reader = tx.init(jnp.zeros(2)), gax.ProgressReader()
  # The first two steps done before the loop goes on: until two records it read are
  # ready the reader cannot know the interval and the pace of calls, and reads every
  # call, for as many calls as the host runs ahead of the device (here, tens).
  for _ in range(2):
    state = jax.block_until_ready(step(state, big))
    reader(state)
  for _ in range(98):
    state = step(state, big)
    reader(state)
  reader.flush()
  assert [s[3] for s in collect] == list(range(10, 101, 10))
  assert len(reads) <= 100 // 10 + 5, len(reads)


@pytest.mark.parametrize(
  ("interval", "every", "expected"),
  [
    (10, 5, list(range(10, 101, 10))),  # every record is in some state the reader sees
    (2, 3, [2, 6, 8, 12, 14, 18, 20, 24, 26, 30]),  # records 4, 10, 16, ...: replaced unseen
    (3, 2, list(range(3, 31, 3))),
  ],
)
def test_reader_called_every_few_steps_logs_every_record_it_is_handed(
  collect, interval, every, expected
):
  # A loop that calls the reader every `every` steps only: the step counts in the
  # states tell the reader, which then reads every call, not one call per interval
  # (it logged 30, 80 and 100 of interval 10 read every 5 steps, before).
  tx = gax.gradient_ascent(0.1, logging_interval=interval, logging_emit="state")
  step = jax.jit(lambda s: tx.update(jnp.ones(2), s, jnp.zeros(2))[1], donate_argnums=0)
  state, reader = tx.init(jnp.zeros(2)), gax.ProgressReader()
  steps = 100 if interval == 10 else 30
  for t in range(1, steps + 1):
    state = step(state)
    if t % every == 0:
      reader(state)
  reader.flush()
  assert [s[3] for s in collect] == expected


def test_repeated_runs_each_log(collect):
  tx = gax.gradient_ascent(logging_interval=3, logging_emit="state")
  step = jax.jit(lambda s: tx.update(jnp.ones(2), s, jnp.zeros(2))[1])
  reader = gax.ProgressReader()
  for _ in range(2):
    state = tx.init(jnp.zeros(2))
    for _ in range(3):
      state = step(state)
      reader(state)
  reader.flush()
  assert [s[3] for s in collect] == [3, 3]


@pytest.mark.parametrize("jitted", [False, True], ids=["eager-init", "jitted-init"])
def test_runs_read_only_at_their_ends_are_told_apart_by_an_eager_init(collect, jitted):
  # As "What happens when" says: each eager init numbers its run; a jitted init
  # writes the number it was traced with, so runs whose records are equal word for
  # word, read only at their ends (the count never goes back), are logged once.
  tx = gax.gradient_ascent(logging_interval=3, logging_emit="state")
  init = jax.jit(tx.init) if jitted else tx.init
  step = jax.jit(lambda s: tx.update(jnp.ones(2), s, jnp.zeros(2))[1])
  reader = gax.ProgressReader()
  runs = [init(jnp.zeros(2)) for _ in range(3)]
  words = {int(state[0].record[records.RUN_WORD]) for state in runs}
  assert len(words) == (1 if jitted else 3)
  for state in runs:
    for _ in range(3):
      state = step(state)
    reader(state)
  reader.flush()
  assert [s[3] for s in collect] == ([3] if jitted else [3, 3, 3])


@pytest.mark.slow  # 4 s or more on 2 cores
def test_reader_does_not_wait_for_a_running_step(collect):
  # A step that runs for a while: right after reader(state) returns the record
  # is still being computed, so the reader did not wait for it.
  tx = gax.gradient_ascent(logging_interval=1, logging_emit="state")
  big = jnp.ones((600, 600)) / 600

  @jax.jit
  def slow_step(state, big):
    heavy = jax.lax.fori_loop(0, 400, lambda _, m: jnp.tanh(m @ m), big)
    return tx.update(jnp.ones(2) * heavy[0, 0], state, jnp.zeros(2))[1]

  state = tx.init(jnp.zeros(2))
  jax.block_until_ready(slow_step(state, big))  # compiled
  reader = gax.ProgressReader()
  state = slow_step(state, big)
  reader(state)
  running = not state[0].record.is_ready()
  reader.flush()
  assert running
  assert [s[3] for s in collect] == [1]


@pytest.mark.slow  # 2 s or more on 2 cores
def test_not_calling_the_reader_logs_nothing_and_a_late_call_logs_the_latest(collect):
  seen, state = _train("state", collect, read=False)
  assert seen == []
  reader = gax.ProgressReader()
  reader(state)
  reader.flush()
  assert [s[3] for s in collect] == [25]


def test_reader_of_a_state_without_kept_records_warns_once(caplog):
  caplog.set_level(logging.WARNING, logger=LOGGER)
  tx = gax.gradient_ascent(logging_interval=2)  # the callback path: nothing to read
  reader = gax.ProgressReader()
  for _ in range(3):
    reader(tx.init(jnp.zeros(2)))
  warnings = [r for r in caplog.records if r.name == LOGGER]
  assert len(warnings) == 1 and "logging_emit='state'" in warnings[0].getMessage()


def test_reader_inside_jit_is_refused():
  tx = gax.gradient_ascent(logging_interval=2, logging_emit="state")
  reader = gax.ProgressReader()
  with pytest.raises(TypeError, match="outside jit"):
    jax.jit(lambda s: reader(s))(tx.init(jnp.zeros(2)))


@pytest.mark.slow  # 2 s or more on 2 cores
def test_records_invisible_warning_and_descent_warning_come_through_the_reader(monkeypatch):
  monkeypatch.setattr(records, "_invisible_warned", {})
  handler = _Collect()
  logger = logging.getLogger(LOGGER)
  saved = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.WARNING)  # INFO records are dropped
  try:
    tx = gax.gradient_ascent(0.1, logging_interval=5, logging_emit="state")
    x = jnp.zeros(2)
    state, reader = tx.init(x), gax.ProgressReader()
    loss = lambda x: jnp.sum((x - 1.0) ** 2)  # noqa: E731
    # The gradient of a loss, its value as the objective: ascent that descends.
    step = jax.jit(lambda x, s: tx.update(jax.grad(loss)(x), s, x, value=-loss(x)))
    for _ in range(60):
      updates, state = step(x, state)
      x = optax.apply_updates(x, updates)
      reader(state)
    reader.flush()
  finally:
    logger.removeHandler(handler)
    logger.setLevel(saved)
  messages = [s[2] for s in handler.seen]
  assert sum("progress records are due" in m for m in messages) == 1
  assert sum("has fallen and stays down" in m for m in messages) == 1
  assert all(s[1] == logging.WARNING for s in handler.seen)


def test_emit_is_validated_and_a_state_of_the_other_path_is_refused():
  with pytest.raises(ValueError, match=r"`logging_emit` must be \"callback\" or \"state\""):
    gax.gradient_ascent(logging_interval=2, logging_emit="host")
  with pytest.raises(ValueError, match=r"`emit` must be"):
    gax.log_progress(2, emit=None)
  by_state = gax.gradient_ascent(logging_interval=2, logging_emit="state")
  by_callback = gax.gradient_ascent(logging_interval=2)
  with pytest.raises(ValueError, match="made by an optimizer with logging_emit='state'"):
    by_callback.update(jnp.ones(2), by_state.init(jnp.zeros(2)), jnp.zeros(2))
  with pytest.raises(ValueError, match="made by an optimizer with logging_emit='callback'"):
    by_state.update(jnp.ones(2), by_callback.init(jnp.zeros(2)), jnp.zeros(2))


@pytest.mark.slow  # 2 s or more on 2 cores
def test_healthy_state_path_passes_debug_nans(collect):
  with jax.debug_nans(True):
    _, state = _train("state", collect, steps=10)
  assert np.all(np.isfinite(np.asarray(state[0].record.view(np.float32)[3:6])))


@pytest.mark.slow  # 2 s or more on 2 cores
def test_multi_steps_and_threads(collect):
  tx = optax.MultiSteps(gax.log_progress(logging_interval=1, emit="state"), every_k_schedule=2)
  state = tx.init(jnp.zeros(2))
  update = jax.jit(tx.update)
  reader = gax.ProgressReader()
  for grads in (jnp.array([1.0, 0.0]), jnp.array([3.0, 0.0])):
    state = update(grads, state)[1]
    reader(state)
  reader.flush()
  # The kept inner state is that of the mean gradient (norm 2) at step 1.
  assert [(s[3], s[4]) for s in collect] == [(1, 2.0)]
  collect.clear()

  # Threads, each with its own reader, log their own records.
  tx = gax.gradient_ascent(logging_interval=2, logging_emit="state")
  step = jax.jit(lambda s: tx.update(jnp.ones(2), s, jnp.zeros(2))[1])

  def worker():
    state, reader = tx.init(jnp.zeros(2)), gax.ProgressReader()
    for _ in range(4):
      state = step(state)
      reader(state)
    reader.flush()

  threads = [threading.Thread(target=worker) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(s[3] for s in collect) == [2, 2, 2, 4, 4, 4]


def test_a_scan_keeps_only_its_last_record(collect):
  tx = gax.gradient_ascent(logging_interval=2, logging_emit="state")

  def run(state):
    body = lambda state, _: (tx.update(jnp.ones(2), state, jnp.zeros(2))[1], None)  # noqa: E731
    return jax.lax.scan(body, state, None, length=10)[0]

  reader = gax.ProgressReader()
  reader(jax.jit(run)(tx.init(jnp.zeros(2))))
  reader.flush()
  assert [s[3] for s in collect] == [10]


# The state path keeps the rules' state in the record: two arrays per state, and one
# array through the cond of a step that logs nothing. ----------------------------------


def test_the_state_path_keeps_two_arrays_and_the_callback_path_twelve():
  params = jnp.zeros(3)
  by_state = gax.log_progress(10, emit="state").init(params)
  by_callback = gax.log_progress(10).init(params)
  assert len(jax.tree.leaves(by_state)) == 2  # count and record
  assert len(jax.tree.leaves(by_callback)) == 11
  assert by_state.first_value is None and by_state.nonfinite_warned is None


def test_a_step_that_logs_nothing_passes_only_the_record_through_its_cond():
  tx = gax.log_progress(10, emit="state")
  params = jnp.zeros(3)
  jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, value=1.0))(params, tx.init(params))
  (cond,) = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "cond"]
  assert [str(v.aval) for v in cond.outvars] == [str(jax.typeof(tx.init(params).record))]


@pytest.mark.parametrize(
  "values", [(1.0, 2.0, 3.0, 1.5, 0.5, -1.0, -2.0, -3.0), (np.nan, 2.0, 1.0)]
)
def test_the_state_path_keeps_what_the_callback_path_keeps(values):
  params = jnp.zeros(2)
  grads = jnp.array([3.0, 4.0])
  states = {}
  for emit in ("callback", "state"):
    tx = gax.log_progress(2, emit=emit)
    update = jax.jit(lambda g, s, v, tx=tx: tx.update(g, s, value=v)[1])
    state = tx.init(params)
    for value in values:
      state = update(grads, state, value)
    states[emit] = progress.unpacked(state)
  for name in progress.LogProgressState._fields[:-1]:
    np.testing.assert_array_equal(
      getattr(states["state"], name), getattr(states["callback"], name), err_msg=name
    )
  assert int(states["state"].records) == len(values) // 2 - int(np.isnan(values[1]))
