"""Checkpoints: save mid-run, restore into a state built from scratch, resume.

A resumed run must be bit-identical to one that never stopped. The restore
side does what a new process would: build a new optimizer, ``tx.init`` a
target (or its abstract shape), then load the saved values into it. Two
formats, neither of them pickle: orbax-checkpoint and flax.serialization
(msgpack).
"""

import logging
from pathlib import Path
import subprocess
import sys

from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import gradient_ascent_jax as gax
from tests._reference import ReferenceGradientAscent

TOTAL_STEPS = 10
SAVE_AFTER = 4
LOGGING_INTERVAL = 3

# Each builds a fresh optimizer, as the restoring process would.
OPTIMIZERS = {
  "gradient_ascent": lambda: gax.gradient_ascent(
    learning_rate=0.05,
    clip_value=0.5,
    lr_decay=0.97,
    warmup_steps=3,
    logging_interval=LOGGING_INTERVAL,
  ),
  "inject_hyperparams": lambda: optax.inject_hyperparams(gax.gradient_ascent)(
    learning_rate=0.05, nesterov=True, warmup_steps=3, logging_interval=LOGGING_INTERVAL
  ),
  "multi_steps": lambda: optax.MultiSteps(
    gax.gradient_ascent(learning_rate=0.05, logging_interval=LOGGING_INTERVAL), 2
  ),
}


def init_params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (5, 3)), "b": jax.random.normal(k2, (3,))}


def objective(params, step):
  """A smooth objective whose data changes with the step number."""
  x = jax.random.normal(jax.random.fold_in(jax.random.key(42), step), (8, 5))
  logits = x @ params["w"] + params["b"]
  return jnp.mean(jax.nn.log_softmax(logits)[:, 0]) - 0.01 * jnp.sum(params["w"] ** 2)


def make_step(tx):
  @jax.jit
  def step(params, state, k):
    grads = jax.grad(objective)(params, k)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def run(tx, params, state, start, stop, change_rate_at=None):
  step = make_step(tx)
  for k in range(start, stop):
    if k == change_rate_at:
      # An injected value changed by hand mid-run must survive the round trip.
      state.hyperparams["learning_rate"] = jnp.asarray(0.02, jnp.float32)
    params, state = step(params, state, k)
  return params, state


def save_orbax(tmp_path, tree):
  path = tmp_path / "checkpoint"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree)
  return path


def restore_orbax(saved, target):
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(saved, jax.eval_shape(lambda: target))


def save_msgpack(tmp_path, tree):
  path = tmp_path / "checkpoint.msgpack"
  path.write_bytes(serialization.to_bytes(tree))
  return path


def restore_msgpack(saved, target):
  return serialization.from_bytes(target, saved.read_bytes())


FORMATS = {
  "orbax": (save_orbax, restore_orbax),
  "msgpack": (save_msgpack, restore_msgpack),
}


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert np.asarray(a).dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(a, e)


@pytest.mark.slow  # 7 s or more on 2 cores
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resumed_run_is_bit_identical(name, fmt, tmp_path, caplog):
  save, restore = FORMATS[fmt]
  change_at = 2 if name == "inject_hyperparams" else None

  with caplog.at_level(logging.INFO, logger="gradient_ascent_jax"):
    tx = OPTIMIZERS[name]()
    params = init_params()
    straight = run(tx, params, tx.init(params), 0, TOTAL_STEPS, change_at)
    jax.effects_barrier()
    straight_log = [r.step for r in caplog.records if r.name == "gradient_ascent_jax"]
    caplog.clear()

    # First "process": run part of the way, save, forget everything.
    tx = OPTIMIZERS[name]()
    params = init_params()
    params, state = run(tx, params, tx.init(params), 0, SAVE_AFTER, change_at)
    saved = save(tmp_path, {"params": params, "opt_state": state})
    del tx, params, state
    jax.effects_barrier()
    caplog.clear()

    # Second "process": new optimizer, fresh target, load, continue.
    tx = OPTIMIZERS[name]()
    fresh_params = init_params()
    target = {"params": fresh_params, "opt_state": tx.init(fresh_params)}
    restored = restore(saved, target)
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    resumed = run(tx, restored["params"], restored["opt_state"], SAVE_AFTER, TOTAL_STEPS, change_at)
    jax.effects_barrier()
    resumed_log = [r.step for r in caplog.records if r.name == "gradient_ascent_jax"]

  assert_trees_equal(resumed[0], straight[0])
  assert_trees_equal(resumed[1], straight[1])

  # The run really moved, so equality is not trivial, and it ascended: the
  # objective (averaged over the data of every step) went up.
  def average_objective(params):
    return np.mean([objective(params, k) for k in range(TOTAL_STEPS)])

  assert average_objective(straight[0]) > average_objective(init_params()) + 0.05
  # Logging resumed at the right step numbers: the log counter was restored.
  expected_log = list(range(LOGGING_INTERVAL, TOTAL_STEPS + 1, LOGGING_INTERVAL))
  if name == "multi_steps":
    # The inner optimizer takes one step per 2 micro-steps, but MultiSteps calls
    # it on both (keeping only the second's state): each logging step logs twice.
    expected_log = [
      step
      for step in range(LOGGING_INTERVAL, TOTAL_STEPS // 2 + 1, LOGGING_INTERVAL)
      for _ in range(2)
    ]
  assert straight_log == expected_log
  assert [s for s in straight_log if s * (2 if name == "multi_steps" else 1) > SAVE_AFTER] == (
    resumed_log
  )


def test_checkpoint_holds_the_moments_by_name_in_the_params_dtype():
  """What a checkpoint of this package contains: every stage's state by field
  name, the moments of SPEC section 3 after two steps (float64 NumPy
  reference), in each parameter's dtype, and the step count as int32."""
  hyperparams = dict(learning_rate=0.05, momentum=0.8, beta=0.9, clip_value=0.5)
  tx = gax.gradient_ascent(**hyperparams)
  params = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3, jnp.bfloat16)}
  grads = [init_params(), {"w": -init_params()["w"] / 2, "b": 3 * init_params()["b"]}]
  grads = [jax.tree.map(lambda g, p: g.astype(p.dtype), g, params) for g in grads]
  state = tx.init(params)
  reference = ReferenceGradientAscent(**hyperparams)
  for g in grads:
    _, state = tx.update(g, state, params)
    reference.step([np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(g)])

  saved = serialization.msgpack_restore(serialization.to_bytes(state))
  # Stages in chain order: flip_sign, clip_by_value, scale_by_adaptive_rms, momentum, scale.
  assert list(saved) == ["0", "1", "2", "3", "4"]
  assert saved["0"] == {} and saved["1"] == {}
  assert set(saved["2"]) == {"second_moment"} and set(saved["3"]) == {"velocity"}
  assert saved["4"]["count"].dtype == np.int32 and int(saved["4"]["count"]) == 2
  for i, name in enumerate(["b", "w"]):  # jax.tree.leaves order
    tolerance = 1e-2 if name == "b" else 1e-6
    for field, stage, expected in (
      ("second_moment", "2", reference.m[i]),
      ("velocity", "3", -reference.v[i]),
    ):  # descends on -objective
      stored = saved[stage][field][name]
      assert stored.dtype == params[name].dtype, (field, name, stored.dtype)
      np.testing.assert_allclose(stored.astype(np.float64), expected, rtol=tolerance, atol=1e-7)
  # And it restores into the state of the same optimizer, not of another one.
  np.testing.assert_array_equal(
    serialization.from_state_dict(tx.init(params), saved)[3].velocity["w"], state[3].velocity["w"]
  )
  with pytest.raises(ValueError):
    serialization.from_state_dict(optax.adam(1e-3).init(params), saved)


RESUME_IN_NEW_PROCESS = """
import sys
sys.path.append(sys.argv[3])  # the checkout, for `tests`, after the installed package
from flax import serialization
import jax
import orbax.checkpoint as ocp
from tests import test_checkpoint as t

tx = t.OPTIMIZERS["gradient_ascent"]()
params = t.init_params()
target = {"params": params, "opt_state": tx.init(params)}
with ocp.StandardCheckpointer() as checkpointer:
  restored = checkpointer.restore(sys.argv[1], jax.eval_shape(lambda: target))
params, state = t.run(
    tx, restored["params"], restored["opt_state"], t.SAVE_AFTER, t.TOTAL_STEPS
)
with open(sys.argv[2], "wb") as f:
  f.write(serialization.to_bytes({"params": params, "opt_state": state}))
"""


@pytest.mark.slow  # a new Python process (8 s)
def test_resume_in_a_new_python_process(tmp_path):
  """The real thing once: a separate interpreter restores the orbax checkpoint."""
  tx = OPTIMIZERS["gradient_ascent"]()
  params = init_params()
  straight = run(tx, params, tx.init(params), 0, TOTAL_STEPS)
  params, state = run(tx, params, tx.init(params), 0, SAVE_AFTER)
  saved = save_orbax(tmp_path, {"params": params, "opt_state": state})

  result = tmp_path / "resumed.msgpack"
  root = Path(__file__).resolve().parent.parent
  subprocess.run(  # from tmp_path: `-c` puts the cwd first on sys.path
    [sys.executable, "-c", RESUME_IN_NEW_PROCESS, str(saved), str(result), str(root)],
    check=True,
    cwd=tmp_path,
    timeout=300,
  )
  resumed = serialization.from_bytes(
    {"params": params, "opt_state": tx.init(params)}, result.read_bytes()
  )
  assert_trees_equal(resumed["params"], straight[0])
  assert_trees_equal(resumed["opt_state"], straight[1])


def one_step_state(tx, params):
  _, state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  return state


def next_update(tx, state, params):
  return tx.update(jax.tree.map(jnp.ones_like, params), state, params)[0]


def test_state_restored_without_a_target_says_to_restore_into_one_and_that_works(tmp_path):
  tx = gax.gradient_ascent(learning_rate=0.1, warmup_steps=5)
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  state = one_step_state(tx, params)
  path = save_orbax(tmp_path, {"params": params, "opt_state": state})
  with ocp.StandardCheckpointer() as checkpointer:
    untyped = checkpointer.restore(path)  # no target: lists and dicts
  assert type(untyped["opt_state"]) is list
  msgpack_untyped = serialization.msgpack_restore(serialization.to_bytes(state))
  for plain, kind in ((untyped["opt_state"], "list"), (msgpack_untyped, "dict")):
    for update in (tx.update, jax.jit(tx.update)):
      with pytest.raises(ValueError) as raised:
        update(jax.tree.map(jnp.ones_like, params), plain, params)
      message = str(raised.value)
      assert f"the optimizer state is a plain {kind} holding the right arrays" in message
      assert "restored without a target" in message
      assert "Do not replace it with tx.init(params), which starts over" in message
      assert "state = gax.carry_over(restored, tx.init(params))" in message
      assert "Checkpoints guide" in message

  # The advice, followed: each restores the step taken, and the run goes on from there.
  expected = next_update(tx, state, params)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(
      path, jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
    )
  assert_trees_equal(next_update(tx, restored["opt_state"], params), expected)
  with ocp.CheckpointManager(tmp_path / "managed") as manager:
    manager.save(1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    restored = manager.restore(
      1, args=ocp.args.StandardRestore(jax.eval_shape(lambda: tx.init(params)))
    )
  assert_trees_equal(next_update(tx, restored, params), expected)
  restored = serialization.from_state_dict(tx.init(params), msgpack_untyped)
  assert_trees_equal(next_update(tx, restored, params), expected)
  for plain in (untyped["opt_state"], msgpack_untyped):
    assert_trees_equal(next_update(tx, gax.carry_over(plain, tx.init(params)), params), expected)


# The chain that gradient_ascent is, of public stages, and each stage with a state alone.
STAGES = {
  "chain": lambda: optax.chain(
    gax.log_progress(2, 0.05),
    gax.flip_sign(),
    gax.scale_by_adaptive_rms(),
    gax.momentum(),
    gax.scale_by_warmup_decay(0.05),
  ),
  "log_progress": lambda: gax.log_progress(2, 0.05),
  "flip_sign": gax.flip_sign,
  "scale_by_adaptive_rms": gax.scale_by_adaptive_rms,
  "momentum": gax.momentum,
  "scale_by_warmup_decay": lambda: gax.scale_by_warmup_decay(0.05),
}


def restore_without_and_with_target(fmt, tmp_path, state, target):
  if fmt == "msgpack":
    blob = serialization.to_bytes(state)
    return serialization.msgpack_restore(blob), serialization.from_bytes(target, blob)
  path = save_orbax(tmp_path, {"opt_state": state})
  with ocp.StandardCheckpointer() as checkpointer:
    plain = checkpointer.restore(path)["opt_state"]
    restored = checkpointer.restore(path, jax.eval_shape(lambda: {"opt_state": target}))
  return plain, restored["opt_state"]


@pytest.mark.parametrize("fmt", ["orbax", "msgpack"])
@pytest.mark.parametrize("stages", list(STAGES))
def test_stage_restored_without_a_target_says_to_restore_into_one(stages, fmt, tmp_path, caplog):
  tx = STAGES[stages]()
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  state = one_step_state(tx, params)
  plain, restored = restore_without_and_with_target(fmt, tmp_path, state, tx.init(params))
  if stages == "flip_sign" and plain is None:
    pytest.skip("orbax restores the empty state as None, which flip_sign passes on")
  for update in (tx.update, jax.jit(tx.update)):
    with pytest.raises(ValueError) as raised:
      update(jax.tree.map(jnp.ones_like, params), plain, params)
    message = str(raised.value)
    assert "restored without a target" in message
    assert "Do not replace it with tx.init(params), which starts over" in message
    assert "state = gax.carry_over(restored, tx.init(params))" in message
    assert "earlier version" not in message
  # The advice, followed either way, resumes the run.
  assert_trees_equal(next_update(tx, restored, params), next_update(tx, state, params))
  carried = gax.carry_over(plain, tx.init(params))
  assert_trees_equal(next_update(tx, carried, params), next_update(tx, state, params))


def test_plain_state_of_other_arrays_is_still_another_optimizers(tmp_path):
  tx = gax.gradient_ascent(learning_rate=0.1)
  params = {"w": jnp.ones(3)}
  others = (one_step_state(tx, {"w": jnp.ones(4)}), optax.adam(1e-3).init(params))
  for i, other in enumerate(others):  # another shape; another optimizer
    path = save_orbax(tmp_path / str(i), other)
    with ocp.StandardCheckpointer() as checkpointer:
      untyped = checkpointer.restore(path)
    with pytest.raises(ValueError, match="does not belong to this optimizer") as raised:
      tx.update(jax.tree.map(jnp.ones_like, params), untyped, params)
    assert "restored without a target" not in str(raised.value)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_new_reader_of_a_resumed_state_path_run_logs_the_saved_record_again(
  fmt, tmp_path, caplog
):
  # As the checkpoints guide says: the record in the checkpoint is logged once more.
  caplog.set_level(logging.INFO, logger="gradient_ascent_jax")
  tx = gax.gradient_ascent(0.1, logging_interval=5, logging_emit="state")
  params = {"w": jnp.ones(3)}
  step = jax.jit(lambda p, s: tx.update({"w": jnp.ones(3)}, s, p)[1])

  def run(state, steps):
    reader = gax.ProgressReader()
    for _ in range(steps):
      state = step(params, state)
      reader(state)
    reader.flush()
    logged = [r.step for r in caplog.records if r.name == "gradient_ascent_jax"]
    caplog.clear()
    return state, logged

  state, before = run(tx.init(params), 10)
  save, restore = FORMATS[fmt]
  restored = restore(save(tmp_path, state), tx.init(params))
  _, after = run(restored, 2)
  assert (before, after) == ([5, 10], [10])


WRAPPERS = {
  "inject_hyperparams": lambda: optax.inject_hyperparams(gax.gradient_ascent)(learning_rate=0.1),
  "MultiSteps": lambda: optax.MultiSteps(gax.gradient_ascent(0.1), every_k_schedule=2),
  "apply_if_finite": lambda: optax.apply_if_finite(gax.gradient_ascent(0.1), 3),
  "multi_transform": lambda: optax.multi_transform(
    {"a": gax.gradient_ascent(0.1), "b": gax.gradient_ascent(0.2)}, {"w": "a", "v": "b"}
  ),
}


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_optax_wrapper_state_restored_without_a_target_is_carried_over(name):
  # As "What happens when" says: Optax's own AttributeError, and carry_over mends it.
  tx = WRAPPERS[name]()
  params = {"w": jnp.ones(3), "v": jnp.full(2, 2.0)}
  grads = {"w": jnp.array([1.0, -2.0, 0.5]), "v": jnp.array([0.3, 3.0])}
  _, state = tx.update(grads, tx.init(params), params)
  restored = serialization.msgpack_restore(serialization.to_bytes(state))
  with pytest.raises(AttributeError, match="'dict' object has no attribute"):
    tx.update(grads, restored, params)
  carried = gax.carry_over(restored, tx.init(params))
  assert_trees_equal(tx.update(grads, carried, params), tx.update(grads, state, params))


@pytest.mark.parametrize("fmt", ["msgpack", "orbax", "state_dict"])
def test_reader_reads_a_state_path_run_restored_without_a_target(fmt, tmp_path, caplog):
  # Plain dicts whose unused fields are None (or gone): the record is still found.
  caplog.set_level(logging.INFO, logger="gradient_ascent_jax")
  tx = gax.gradient_ascent(0.1, logging_interval=2, logging_emit="state")
  params = jnp.ones(2)
  state = tx.init(params)
  for _ in range(2):
    state = tx.update(jnp.ones(2), state, params)[1]
  if fmt == "state_dict":
    plain = serialization.to_state_dict(state)
  else:
    plain, _ = restore_without_and_with_target(fmt, tmp_path, state, tx.init(params))
  assert not isinstance(plain, tuple)  # plain containers, not the state's types
  reader = gax.ProgressReader()
  reader(plain)
  reader.flush()
  logged = [(r.name, r.levelname, r.step) for r in caplog.records if r.name.startswith("gradient")]
  assert logged == [("gradient_ascent_jax", "INFO", 2)]


@pytest.mark.parametrize("fmt", ["msgpack", "orbax"])
@pytest.mark.parametrize("logging_interval", [None, 2])
def test_gradient_ascent_in_a_users_chain_restored_without_a_target(
  fmt, logging_interval, tmp_path
):
  # msgpack hands gradient_ascent a key of the outer dict ('1'): it was told that
  # the state belongs to another optimizer and to call tx.init, which starts over.
  tx = optax.chain(
    optax.clip_by_global_norm(1.0), gax.gradient_ascent(0.1, logging_interval=logging_interval)
  )
  params = {"w": jnp.arange(3.0)}
  state = tx.init(params)
  for _ in range(3):
    state = tx.update(params, state, params)[1]
  plain, restored = restore_without_and_with_target(fmt, tmp_path, state, tx.init(params))
  with pytest.raises(ValueError, match="restored without a target") as error:
    tx.update(params, plain, params)
  assert "gax.carry_over(restored, tx.init(params))" in str(error.value)
  assert "does not belong" not in str(error.value)
  carried = gax.carry_over(plain, tx.init(params))
  assert_trees_equal(tx.update(params, carried, params), tx.update(params, restored, params))
