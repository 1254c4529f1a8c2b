"""Multi-device use on the 8 fake CPU devices of conftest.py.

Model parallelism: params sharded over a 2x4 mesh; the optimizer state must
follow each parameter's sharding and the update must need no communication.
Data parallelism: replicated params, a sharded batch, gradients averaged
across devices with ``jax.shard_map`` and with ``jax.pmap``; both must match a
single-device step on the whole batch. Logging must give one record per
logging step, not one per device.
"""

import contextlib
import logging
import re

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from tests._reference import ReferenceGradientAscent

STEPS = 5
COMMUNICATION = ("all-gather", "all-to-all", "collective-permute")

# Every kind of leaf: both mesh axes on one weight, one axis, replicated, scalar.
SPECS = {
  "w1": P("x", "y"),
  "b1": P("y"),
  "w2": P("y", None),
  "b2": P(),
  "temperature": P(),
}


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "conftest.py should give 8 CPU devices"
  return Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))


def make_params():
  keys = jax.random.split(jax.random.key(0), 4)
  return {
    "w1": jax.random.normal(keys[0], (8, 16)),
    "b1": jax.random.normal(keys[1], (16,)),
    "w2": jax.random.normal(keys[2], (16, 4)),
    "b2": jax.random.normal(keys[3], (4,)),
    "temperature": jnp.asarray(1.5),
  }


def shard(tree, mesh):
  return jax.device_put(tree, {k: NamedSharding(mesh, s) for k, s in SPECS.items()})


def elementwise_objective(params):
  """Separable in the parameters, so its gradient needs no communication."""
  return sum(jnp.sum(jnp.log1p(jnp.cos(p) ** 2) - 0.1 * p**2) for p in jax.tree.leaves(params))


def gradient_stream(params, steps):
  for k in range(steps):
    key = jax.random.fold_in(jax.random.key(7), k)
    yield jax.tree.map(lambda p, key=key: jax.random.normal(key, p.shape), params)


HYPERPARAMS = dict(learning_rate=0.05, clip_value=0.8, nesterov=True, warmup_steps=2, lr_decay=0.99)


def make_tx(logging_interval=None):
  return gax.gradient_ascent(**HYPERPARAMS, logging_interval=logging_interval)


def apply_update(tx):
  def update(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return update


def assert_state_follows_params(state, params):
  """Moment buffers are sharded like their parameter; counters are replicated."""
  moments = [s for s in state if isinstance(s, gax.ScaleByAdaptiveRmsState | gax.MomentumState)]
  assert len(moments) == 2
  for moment in moments:
    (buffers,) = moment
    for name, param in params.items():
      leaf = buffers[name]
      assert leaf.sharding.is_equivalent_to(param.sharding, param.ndim), (
        f"{type(moment).__name__}.{name}: {leaf.sharding} vs {param.sharding}"
      )
  counts = [
    s.count for s in state if isinstance(s, gax.ScaleByWarmupDecayState | gax.LogProgressState)
  ]
  assert counts and all(c.sharding.is_fully_replicated for c in counts)


def assert_same_up_to_rounding(got, want):
  """Integers exactly; floats to 1e-6 of the leaf's largest magnitude."""
  if jnp.issubdtype(got.dtype, jnp.inexact):
    scale = float(np.max(np.abs(np.asarray(want, np.float64)), initial=0.0))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)
  else:
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # 5 s or more on 2 cores
def test_state_sharding_follows_params_and_matches_one_device(mesh):
  single = make_params()
  params = shard(single, mesh)
  assert params["w1"].sharding.spec == P("x", "y")
  assert len(params["w1"].addressable_shards) == 8
  assert params["w1"].addressable_shards[0].data.shape == (4, 4)
  tx = make_tx()
  state = tx.init(params)  # eager init puts each buffer where its param lives
  assert_state_follows_params(state, params)
  single_state = tx.init(single)

  update = jax.jit(apply_update(tx))
  reference = ReferenceGradientAscent(**HYPERPARAMS)
  expected = [np.asarray(p, np.float64) for p in jax.tree.leaves(single)]
  for grads in gradient_stream(single, STEPS):
    params, state = update(params, state, shard(grads, mesh))
    single, single_state = update(single, single_state, grads)
    assert_state_follows_params(state, params)
    for name, spec in SPECS.items():
      assert params[name].sharding.is_equivalent_to(NamedSharding(mesh, spec), params[name].ndim)
    steps = reference.step([np.asarray(g) for g in jax.tree.leaves(grads)])
    expected = [p + u for p, u in zip(expected, steps, strict=True)]
  # Element-wise arithmetic, but the sharded step is another compiled program, which XLA
  # may fuse differently. Measured after 5 steps: the same bits on jax 0.8.0 and 0.10.2;
  # on jax 0.12.0.1 (Python 3.13) one weight, its velocity and its second moment differ
  # by up to 1.5e-7 of the leaf's largest magnitude (the rest bit for bit).
  jax.tree.map(assert_same_up_to_rounding, params, single)
  jax.tree.map(assert_same_up_to_rounding, state, single_state)
  # And both are the steps of the float64 NumPy reference, to float32 rounding.
  for got, want in zip(jax.tree.leaves(single), expected, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_eager_init_replicates_step_counters_over_the_params_mesh(mesh):
  """Not left on one default device: in a multi-process run such a counter is
  local to each process, and orbax refuses to save it (test_multiprocess.py)."""
  params = shard(make_params(), mesh)
  state = make_tx(logging_interval=2).init(params)
  counts = [
    s.count for s in state if isinstance(s, gax.ScaleByWarmupDecayState | gax.LogProgressState)
  ]
  assert len(counts) == 2
  for count in counts:
    assert count.sharding.device_set == set(mesh.devices.flat)
    assert count.sharding.is_fully_replicated
  # One device in, one device out: nothing is placed on a mesh by itself.
  single_state = make_tx().init(make_params())
  (single_count,) = [s.count for s in single_state if isinstance(s, gax.ScaleByWarmupDecayState)]
  assert len(single_count.sharding.device_set) == 1


@pytest.mark.slow  # 2 s or more on 2 cores
def test_jitted_init_follows_params_with_explicit_mesh_axes():
  mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    params = shard(make_params(), mesh)
    state = jax.jit(make_tx().init)(params)
    assert_state_follows_params(state, params)


@pytest.mark.slow  # 7 s or more on 2 cores
@pytest.mark.parametrize("logging_interval", [None, 2])
def test_compiled_sharded_step_needs_no_communication(mesh, logging_interval):
  params = shard(make_params(), mesh)
  tx = make_tx(logging_interval)
  state = tx.init(params)
  grads = jax.grad(elementwise_objective)(params)

  update_text = jax.jit(apply_update(tx)).lower(params, state, grads).compile().as_text().lower()

  def train_step(params, state):
    return apply_update(tx)(params, state, jax.grad(elementwise_objective)(params))

  step_text = jax.jit(train_step).lower(params, state).compile().as_text().lower()

  for text in (update_text, step_text):
    for collective in COMMUNICATION:
      assert collective not in text, f"{collective} in the compiled step"
  if logging_interval is None:
    # Nothing at all crosses devices or reaches the host.
    assert "all-reduce" not in update_text
    assert "callback" not in update_text
    assert "callback" not in step_text
  else:
    # The search does find things: the log needs the global gradient norm.
    assert "all-reduce" in update_text
    assert "callback" in update_text


def test_sharded_logging_emits_one_record_per_logging_step(mesh, caplog):
  single = make_params()
  params = shard(single, mesh)
  tx = make_tx(logging_interval=2)
  state = tx.init(params)
  update = jax.jit(apply_update(tx))
  norms = []
  with caplog.at_level(logging.INFO, logger="gradient_ascent_jax"):
    for grads in gradient_stream(single, 6):
      norms.append(float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))))
      params, state = update(params, state, shard(grads, mesh))
    jax.effects_barrier()
  records = [r for r in caplog.records if r.name == "gradient_ascent_jax"]
  assert [r.step for r in records] == [2, 4, 6]
  np.testing.assert_allclose([r.grad_norm for r in records], norms[1::2], rtol=1e-5)


# Leaves of one shape in different layouts, as a Megatron pair of weights has them.
CROSSED = {"w_in": P(None, "model"), "w_out": P("model", None), "w_mid": P(None, "model")}


def crossed_grads(mesh):
  grads = {name: jnp.arange(64.0).reshape(8, 8) * (i + 1) / 100 for i, name in enumerate(CROSSED)}
  return grads, {name: NamedSharding(mesh, spec) for name, spec in CROSSED.items()}


def collective_shapes(text):
  """The result types of every collective in a compiled HLO text, by collective."""
  found = {}
  for line in text.splitlines():
    match = re.search(r"= (.+?) ([a-z-]+?)(?:-start)?\(", line)
    if match and match[2] in (*COMMUNICATION, "all-reduce", "reduce-scatter"):
      found.setdefault(match[2], []).append(match[1])
  return found


@pytest.mark.parametrize(
  "axis_type", [AxisType.Auto, AxisType.Explicit, None], ids=["Auto", "Explicit", "mesh-not-set"]
)
def test_logging_step_logs_same_shaped_leaves_in_different_layouts(axis_type, caplog):
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type or AxisType.Auto,) * 2)
  grads, shardings = crossed_grads(mesh)
  # Without jax.set_mesh the layouts are unknown when tracing: the leaves are
  # stacked as on one device, and XLA may move one (the docs say so).
  with jax.set_mesh(mesh) if axis_type else contextlib.nullcontext():
    params = jax.device_put(grads, shardings)
    tx = gax.gradient_ascent(0.05, logging_interval=1)
    state = tx.init(params)
    step = jax.jit(tx.update)
    text = step.lower(params, state, params).compile().as_text()
    with caplog.at_level(logging.INFO, logger="gradient_ascent_jax"):
      step(params, state, params)
      jax.effects_barrier()
  collectives = collective_shapes(text) if axis_type else {"all-reduce": []}
  assert set(collectives) == {"all-reduce"}, collectives
  for shapes in collectives["all-reduce"]:
    # The two sums of squares of a leaf (or of a stack of leaves), scalars; a
    # tuple of those when XLA combines all-reduces. Never a leaf.
    shapes = re.sub(r"/\*index=\d+\*/", "", shapes)
    assert re.fullmatch(r"\(?(f32\[\](, )?)+\)?", shapes), shapes
  (record,) = [r for r in caplog.records if r.name == "gradient_ascent_jax"]
  want = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in grads.values()))
  np.testing.assert_allclose(record.grad_norm, want, rtol=1e-6)


# Data parallelism: a logistic-regression log-likelihood on a sharded batch.

BATCH, FEATURES, CLASSES = 64, 6, 3


def data():
  kx, kw = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (BATCH, FEATURES))
  y = jnp.argmax(x @ jax.random.normal(kw, (FEATURES, CLASSES)), axis=1)
  return x, y


def classifier_params():
  return {"w": jnp.zeros((FEATURES, CLASSES)), "b": jnp.zeros((CLASSES,))}


def mean_log_likelihood(params, x, y):
  log_probs = jax.nn.log_softmax(x @ params["w"] + params["b"])
  return jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def single_device_run(tx, steps):
  x, y = data()
  params = classifier_params()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(mean_log_likelihood)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def shard_map_run(tx, mesh, steps):
  x, y = data()
  axes = ("x", "y")
  params = classifier_params()
  state = tx.init(params)

  def local_step(params, state, x, y):
    # Mark the replicated params as per-device values so that grad gives each
    # device its local gradient; pmean then averages them.
    if hasattr(jax.lax, "pcast"):
      local = jax.lax.pcast(params, axes, to="varying")
    else:  # jax < 0.8.2 (the declared floor is 0.8.0): pcast's predecessor
      local = jax.lax.pvary(params, axes)
    grads = jax.lax.pmean(jax.grad(mean_log_likelihood)(local, x, y), axes)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(
    jax.shard_map(
      local_step,
      mesh=mesh,
      in_specs=(P(), P(), P(axes), P(axes)),
      out_specs=(P(), P()),
    )
  )
  for _ in range(steps):
    # Collective steps left in flight on fake CPU devices can deadlock a busy
    # machine (docs/guide/multi_device.md): wait for each.
    params, state = jax.block_until_ready(step(params, state, x, y))
  return params, state


def pmap_run(tx, steps):
  x, y = data()
  n = jax.device_count()
  replicate = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * n), tree)  # noqa: E731
  params = replicate(classifier_params())
  state = replicate(tx.init(classifier_params()))

  def local_step(params, state, x, y):
    grads = jax.lax.pmean(jax.grad(mean_log_likelihood)(params, x, y), "devices")
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(local_step, axis_name="devices")
  xs, ys = x.reshape(n, BATCH // n, FEATURES), y.reshape(n, BATCH // n)
  for _ in range(steps):
    params, state = jax.block_until_ready(step(params, state, xs, ys))
  # Every device holds the same copy.
  for leaf in jax.tree.leaves((params, state)):
    np.testing.assert_array_equal(leaf, jnp.broadcast_to(leaf[0], leaf.shape))
  return jax.tree.map(lambda a: a[0], (params, state))


@pytest.mark.slow  # 4 s or more on 2 cores
@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_data_parallel_matches_single_device(mesh, mode, caplog):
  steps = 6
  expected_params, expected_state = single_device_run(make_tx(), steps)
  with caplog.at_level(logging.INFO, logger="gradient_ascent_jax"):
    tx = make_tx(logging_interval=3)
    if mode == "shard_map":
      params, state = shard_map_run(tx, mesh, steps)
    else:
      params, state = pmap_run(tx, steps)
    jax.effects_barrier()

  # Averaging 8 partial means sums in another order: equal up to rounding.
  for actual, expected in zip(
    jax.tree.leaves(params), jax.tree.leaves(expected_params), strict=True
  ):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-6)
  moments = [s for s in state if isinstance(s, gax.ScaleByAdaptiveRmsState | gax.MomentumState)]
  expected_moments = [
    s for s in expected_state if isinstance(s, gax.ScaleByAdaptiveRmsState | gax.MomentumState)
  ]
  for actual, expected in zip(
    jax.tree.leaves(moments), jax.tree.leaves(expected_moments), strict=True
  ):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-7)
  # It ascends: the log-likelihood it was given the gradient of went up.
  x, y = data()
  assert mean_log_likelihood(params, x, y) > mean_log_likelihood(classifier_params(), x, y) + 0.1
  # Eight devices call back on each logging step; one record comes out.
  assert [r.step for r in caplog.records if r.name == "gradient_ascent_jax"] == [3, 6]


@pytest.mark.parametrize("emit", ["callback", "state"])
def test_state_of_unplaced_params_is_unplaced_and_goes_where_the_data_is(mesh, emit):
  """Params on no particular device give a state on none either (every leaf
  uncommitted), so that a step with a batch sharded over the mesh, or pmap over
  a stacked state, places it as it places the params."""
  tx = gax.gradient_ascent(learning_rate=0.1, logging_interval=2, logging_emit=emit)
  w = jnp.zeros(4)
  state = tx.init(w)
  assert [leaf.committed for leaf in jax.tree.leaves(state)] == [False] * len(
    jax.tree.leaves(state)
  )
  batch = jax.device_put(
    jnp.ones((64, 4)), NamedSharding(Mesh(mesh.devices.reshape(-1), "d"), P("d"))
  )

  @jax.jit
  def step(w, state, x):
    g = jax.grad(lambda w: -jnp.mean((x @ w - 1.0) ** 2))(w)
    updates, state = tx.update(g, state, w)
    return w + updates, state

  w_next, _ = step(w, state, batch)
  np.testing.assert_allclose(w_next, jnp.full(4, 0.1 * np.sqrt(1000)), rtol=1e-5)
  stacked = jax.tree.map(lambda leaf: jnp.stack([leaf] * 8), (w, state))
  updates, _ = jax.pmap(lambda w, s: tx.update(jnp.ones(4), s, w))(*stacked)
  assert updates.shape == (8, 4)
