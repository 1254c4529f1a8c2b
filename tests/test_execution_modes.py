"""The same steps agree under no-jit, jit, pmap (chex.variants) and vmap.

Every mode is compared with the float64 NumPy reference of tests/_reference.py,
not only with another mode, so a bug shared by all modes fails here too.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradient_ascent_jax as gax
from tests._reference import ReferenceGradientAscent

CONFIGS = {
  "defaults": {},
  "everything": {
    "nesterov": True,
    "clip_value": 0.5,
    "lr_decay": 0.97,
    "warmup_steps": 3,
    "logging_interval": 2,
  },
}
STEPS = 6
# Fused (jit) and op-by-op float32 arithmetic round differently: compare with rtol 1e-5.


def _grad_sequence(key=0):
  """Deterministic gradients for STEPS steps on a {'w': (3, 2), 'b': (2,)} tree."""
  keys = jax.random.split(jax.random.key(key), STEPS)
  return [
    {"w": jax.random.normal(k, (3, 2)), "b": jax.random.normal(jax.random.fold_in(k, 1), (2,))}
    for k in keys
  ]


def _run(tx, grads):
  """The params after one step per gradient, from fixed initial params."""
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = jax.tree.map(jnp.add, params, updates)
  return params


def _reference_trajectory(options, grads, learning_rate=0.05):
  """The params after the steps of the float64 NumPy reference: the baseline."""
  options = {k: v for k, v in options.items() if k != "logging_interval"}
  reference = ReferenceGradientAscent(learning_rate=learning_rate, **options)
  params = {"w": np.ones((3, 2)), "b": np.zeros(2)}
  for g in grads:
    # The reference updates are in the order of jax.tree.leaves: b, w.
    b, w = reference.step([np.asarray(g["b"]), np.asarray(g["w"])])
    params = {"w": params["w"] + w, "b": params["b"] + b}
  return params


class ExecutionModesTest(chex.TestCase):
  @chex.variants(without_jit=True, with_jit=True, with_pmap=True)
  def test_modes_agree(self):
    for name, options in CONFIGS.items():
      with self.subTest(name):
        grads = _grad_sequence()
        tx = gax.gradient_ascent(learning_rate=0.05, **options)
        params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
        state = tx.init(params)

        @self.variant
        def step(params, state, g, tx=tx):
          updates, state = tx.update(g, state, params)
          return jax.tree.map(jnp.add, params, updates), state

        for g in grads:
          params, state = step(params, state, g)
        expected = _reference_trajectory(options, grads)
        chex.assert_trees_all_close(params, expected, rtol=1e-5, atol=1e-6)
        assert int(state[-1].count) == STEPS


@pytest.mark.slow  # 2 s or more on 2 cores
def test_pmap_over_8_devices_with_different_data():
  n = jax.local_device_count()
  assert n == 8
  tx = gax.gradient_ascent(learning_rate=0.05, **CONFIGS["everything"])
  per_device = [_grad_sequence(key=d) for d in range(n)]
  grads = [
    jax.tree.map(lambda *xs: jnp.stack(xs), *(per_device[d][s] for d in range(n)))
    for s in range(STEPS)
  ]
  params = {"w": jnp.ones((n, 3, 2)), "b": jnp.zeros((n, 2))}
  state = jax.pmap(tx.init)(params)

  @jax.pmap
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return jax.tree.map(jnp.add, params, updates), state

  for g in grads:
    params, state = step(params, state, g)
  for d in range(n):
    expected = _reference_trajectory(CONFIGS["everything"], per_device[d])
    chex.assert_trees_all_close(
      jax.tree.map(lambda x, d=d: x[d], params), expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_vmap_over_learning_rates_matches_separate_runs(name):
  options = {k: v for k, v in CONFIGS[name].items() if k != "logging_interval"}
  rates = jnp.array([0.0, 0.001, 0.01, 0.05, 0.3])
  grads = _grad_sequence()

  def run(lr):
    return _run(gax.gradient_ascent(learning_rate=lr, logging_interval=None, **options), grads)

  batched = jax.jit(jax.vmap(run))(rates)
  for i, lr in enumerate([0.0, 0.001, 0.01, 0.05, 0.3]):
    expected = run(lr)
    chex.assert_trees_all_close(
      jax.tree.map(lambda x, i=i: x[i], batched), expected, rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_close(
      expected, _reference_trajectory(options, grads, learning_rate=lr), rtol=1e-5, atol=1e-6
    )
  # Rate 0 must not move anything; the others must.
  np.testing.assert_array_equal(batched["w"][0], np.ones((3, 2)))
  assert not np.allclose(batched["w"][1], 1.0)


@pytest.mark.slow  # 3 s or more on 2 cores
def test_vmap_over_momentum_beta_and_nesterov_flag():
  grads = _grad_sequence()
  momenta = jnp.array([0.0, 0.9])
  betas = jnp.array([0.0, 0.99])
  flags = jnp.array([False, True])

  def run(m, b, nesterov):
    tx = gax.gradient_ascent(
      learning_rate=0.05, momentum=m, beta=b, nesterov=nesterov, logging_interval=None
    )
    return _run(tx, grads)

  batched = jax.vmap(run)(momenta, betas, flags)
  for i in range(2):
    expected = run(float(momenta[i]), float(betas[i]), bool(flags[i]))
    chex.assert_trees_all_close(
      jax.tree.map(lambda x, i=i: x[i], batched), expected, rtol=1e-5, atol=1e-6
    )
    options = dict(momentum=float(momenta[i]), beta=float(betas[i]), nesterov=bool(flags[i]))
    chex.assert_trees_all_close(
      expected, _reference_trajectory(options, grads), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", list(CONFIGS))
def test_numpy_float64_params_and_gradients_op_by_op_as_under_jit(name):
  # With 64-bit types off (the default) JAX computes with NumPy float64 as float32,
  # and init makes a float32 state from such params: an update op by op must accept
  # float64 NumPy gradients, as jit (which converts them first) and Optax do.
  assert not jax.config.jax_enable_x64
  options = CONFIGS[name]
  tx = gax.gradient_ascent(learning_rate=0.05, **options)
  grads = [jax.tree.map(lambda g: np.asarray(g, np.float64), g) for g in _grad_sequence()]
  params = {"w": np.ones((3, 2)), "b": np.zeros(2)}
  state = tx.init(params)
  floats = {
    leaf.dtype for leaf in jax.tree.leaves(state) if jnp.issubdtype(leaf.dtype, jnp.floating)
  }
  assert floats == {jnp.dtype(jnp.float32)}
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = jax.tree.map(lambda p, u: np.asarray(p + u, np.float64), params, updates)
  chex.assert_trees_all_close(params, _reference_trajectory(options, grads), rtol=1e-5, atol=1e-6)
