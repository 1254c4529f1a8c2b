"""optax.inject_hyperparams over every numeric hyperparameter, without retracing.

The updates are compared with the float64 NumPy reference (tests/_reference.py)
run with the injected values, not only with what Optax stores.
"""

import logging
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from tests._reference import ReferenceGradientAscent

NUMERIC = {
  "learning_rate": 0.05,
  "momentum": 0.8,
  "beta": 0.9,
  "eps": 1e-6,
  "clip_value": 0.7,
  "lr_decay": 0.95,
  "warmup_steps": 4,
  "logging_interval": 0,
}
GRAD = {"w": jnp.array([[0.3, -2.0], [1.5, 0.01]]), "b": jnp.array([-0.4, 0.9])}
# The gradient of step k is GRAD * SCALES[k]: a constant gradient would hide
# clipping (RMSprop's h / sqrt(mean h**2) is then the same for any |h|).
SCALES = (1.0, -3.0, 0.5, 2.0, -1.0)


def grad_at(k):
  return jax.tree.map(lambda g: g * SCALES[k], GRAD)


def _params():
  return jax.tree.map(jnp.zeros_like, GRAD)


def _plain_run(steps, **hyperparams):
  tx = gax.gradient_ascent(**hyperparams)
  params = _params()
  state = tx.init(params)
  for k in range(steps):
    updates, state = tx.update(grad_at(k), state, params)
    params = optax.apply_updates(params, updates)
  return params


def _reference_run(steps, **hyperparams):
  """The params after `steps` steps of the NumPy reference on grad_at(0), grad_at(1), ..."""
  hyperparams.pop("logging_interval", None)
  reference = ReferenceGradientAscent(**hyperparams)
  b, w = np.zeros(2), np.zeros((2, 2))
  for k in range(steps):
    db, dw = reference.step([np.asarray(grad_at(k)["b"]), np.asarray(grad_at(k)["w"])])  # leaves
    b, w = b + db, w + dw
  return {"b": b, "w": w}


def _assert_params_close(params, expected):
  for name in ("b", "w"):
    np.testing.assert_allclose(params[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_every_numeric_hyperparameter_is_injected(caplog):
  tx = optax.inject_hyperparams(gax.gradient_ascent, static_args=("nesterov",))(
    nesterov=True, **NUMERIC
  )
  params = _params()
  state = tx.init(params)
  # Not weight_decay: its default, None, is not a number, so Optax does not inject it.
  assert set(state.hyperparams) == set(NUMERIC)
  # The stored values are the ones the steps use: the NumPy reference with them.
  state.hyperparams["logging_interval"] = jnp.full_like(state.hyperparams["logging_interval"], 2)
  with caplog.at_level(logging.INFO, logger="gradient_ascent_jax"):
    for k in range(4):
      updates, state = tx.update(grad_at(k), state, params)
      params = optax.apply_updates(params, updates)
    jax.effects_barrier()
  _assert_params_close(params, _reference_run(4, nesterov=True, **NUMERIC))
  # The injected logging_interval (0 at construction, 2 injected) is in force.
  assert [r.step for r in caplog.records if r.name == "gradient_ascent_jax"] == [2, 4]


def test_bools_and_none_defaults_are_not_injected():
  # As the hyperparameters page says.
  tx = optax.inject_hyperparams(gax.gradient_ascent)(learning_rate=0.1, nesterov=True)
  state = tx.init(_params())
  assert set(state.hyperparams) == {"learning_rate", "momentum", "beta", "eps", "warmup_steps"}
  tx = optax.inject_hyperparams(gax.gradient_ascent)(clip_value=10.0)
  assert "clip_value" in tx.init(_params()).hyperparams


def test_injected_run_equals_plain_run_and_never_retraces():
  traces = []
  tx = optax.inject_hyperparams(gax.gradient_ascent, static_args=("nesterov",))(
    nesterov=True, **NUMERIC
  )

  @jax.jit
  def step(params, state, grads):
    traces.append(1)  # runs only while tracing
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = _params()
  state = tx.init(params)
  for k in range(3):
    params, state = step(params, state, grad_at(k))
  np.testing.assert_allclose(params["w"], _plain_run(3, nesterov=True, **NUMERIC)["w"], rtol=1e-5)
  _assert_params_close(params, _reference_run(3, nesterov=True, **NUMERIC))

  # Change every injected value between steps: same compiled step, new numbers.
  changed = {
    "learning_rate": 0.2,
    "momentum": 0.5,
    "beta": 0.5,
    "eps": 1e-3,
    "clip_value": 0.1,
    "lr_decay": 0.5,
    "warmup_steps": 1,
    "logging_interval": 0,
  }
  unchanged = jax.tree.map(jnp.copy, state)
  for name, value in changed.items():
    # full_like keeps dtype and weak type, so the compiled step is reused.
    state.hyperparams[name] = jnp.full_like(state.hyperparams[name], value)
  params_new, _ = step(params, state, grad_at(3))
  params_old, _ = step(params, unchanged, grad_at(3))
  assert len(traces) == 1
  assert not np.allclose(params_new["w"], params_old["w"])


NEW_VALUES = {
  "learning_rate": 0.01,
  "momentum": 0.3,
  "beta": 0.5,
  "eps": 0.1,
  "lr_decay": 0.5,
  "clip_value": 0.1,
  "warmup_steps": 1,
}


@pytest.mark.parametrize("name", list(NEW_VALUES))
def test_injected_value_is_used(name):
  """Each injected value changes the result exactly like passing it directly."""
  values = dict(NUMERIC)
  values.pop("logging_interval")
  tx = optax.inject_hyperparams(gax.gradient_ascent)(logging_interval=None, **values)
  params = _params()
  state = tx.init(params)
  new_value = NEW_VALUES[name]
  state.hyperparams[name] = jnp.full_like(state.hyperparams[name], new_value)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for k in range(3):
    updates, state = step(params, state, grad_at(k))
    params = optax.apply_updates(params, updates)
  expected = _reference_run(3, **dict(values, **{name: new_value}))
  _assert_params_close(params, expected)
  np.testing.assert_allclose(
    params["w"],
    _plain_run(3, logging_interval=None, **dict(values, **{name: new_value}))["w"],
    rtol=1e-5,
  )
  stale = _reference_run(3, **values)
  assert not np.allclose(params["w"], stale["w"], rtol=1e-5)


def test_schedule_as_injected_learning_rate():
  schedule = optax.linear_schedule(0.1, 0.0, transition_steps=10)
  tx = optax.inject_hyperparams(gax.gradient_ascent)(learning_rate=schedule, logging_interval=None)
  params = _params()
  state = tx.init(params)
  for k in range(3):
    updates, state = tx.update(grad_at(k), state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(state.hyperparams["learning_rate"], 0.1 * (1 - k / 10), rtol=1e-6)
    # The steps use that rate: the reference with lr(k) = 0.1 (1 - k / 10).
    _assert_params_close(params, _reference_run(k + 1, learning_rate=lambda k: 0.1 * (1 - k / 10)))


# float16/bfloat16 params: Optax casts injected hyperparameters to their dtype. --

FLOAT_HYPERPARAMS = {
  gax.gradient_ascent: {
    "learning_rate": 0.01,
    "momentum": 0.9,
    "beta": 0.999,
    "eps": 1e-8,
    "clip_value": 1.0,
    "lr_decay": 0.9999,
  },
  gax.scale_by_adaptive_rms: {"beta": 0.999, "eps": 1e-8},
  gax.momentum: {"decay": 0.9},
  gax.clip_by_value: {"clip_value": 1.0},
  gax.scale_by_warmup_decay: {"learning_rate": 0.01, "lr_decay": 0.9999},
}
INJECTED_ONE = [(factory, name) for factory, values in FLOAT_HYPERPARAMS.items() for name in values]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
  ("factory", "name"), INJECTED_ONE, ids=[f"{f.__name__}-{n}" for f, n in INJECTED_ONE]
)
def test_hyperparameter_rounded_to_half_precision_is_rejected(factory, name, dtype, jit):
  values = FLOAT_HYPERPARAMS[factory]
  others = tuple(other for other in values if other != name)
  tx = optax.inject_hyperparams(factory, static_args=others)(**values)
  params = jnp.zeros(2, dtype)
  init = jax.jit(tx.init) if jit else tx.init
  with pytest.raises(ValueError, match=f"`{name}` must be float32 or wider") as info:
    init(params)
  assert jnp.dtype(dtype).name in str(info.value)
  assert "hyperparam_dtype=jnp.float32" in str(info.value)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_hyperparam_dtype_float32_keeps_the_math_for_half_precision_params(dtype):
  tx = optax.inject_hyperparams(gax.gradient_ascent, hyperparam_dtype=jnp.float32)()
  params = jnp.zeros(2, dtype)
  updates, _ = jax.jit(tx.update)(jnp.array([1.0, 0.0], dtype), tx.init(params), params)
  assert updates.dtype == dtype
  # First step, h = 1: lr / (sqrt(1 - beta) + eps) = 0.316 (bfloat16 beta = 1.0
  # gave 1.0e6); h = 0 gives 0, not 0 / (0 + 0) (float16 eps = 0).
  np.testing.assert_allclose(
    np.asarray(updates, np.float32), [0.01 / (0.001**0.5 + 1e-8), 0.0], rtol=2**-7
  )


def test_injected_schedule_returning_a_vector_is_rejected_naming_it():
  tx = optax.inject_hyperparams(gax.gradient_ascent)(learning_rate=lambda count: jnp.full(1, 0.1))
  with pytest.raises(
    ValueError, match=r"`learning_rate` must be a scalar \(shape \(\)\), got .*shape \(1,\)"
  ):
    tx.init(_params())


def test_warmup_beyond_int32_is_injected_as_a_static_arg():
  # Optax turns injected numbers into int32 arrays, so 2**31 overflows in its
  # own init; static_args passes it through as a Python int, which works.
  with pytest.raises(OverflowError):
    optax.inject_hyperparams(gax.gradient_ascent)(warmup_steps=2**31).init(jnp.zeros(2))
  tx = optax.inject_hyperparams(gax.gradient_ascent, static_args=("warmup_steps",))(
    learning_rate=0.1, warmup_steps=2**31
  )
  updates, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)), jnp.zeros(2))
  # Step 1 of the ramp: lr / warmup_steps, times g / sqrt((1 - beta) g**2).
  np.testing.assert_allclose(updates, 0.1 / 2**31 / np.sqrt(0.001), rtol=1e-5)


def test_plain_state_into_injected_optimizer_fails_in_optax():
  tx = optax.inject_hyperparams(gax.gradient_ascent)(learning_rate=0.1)
  with pytest.raises(AttributeError, match="hyperparams"):
    tx.update(jnp.ones(2), gax.gradient_ascent().init(jnp.zeros(2)), jnp.zeros(2))


@pytest.mark.slow  # 4 s or more on 2 cores
def test_gradient_with_respect_to_an_injected_clip_value():
  # Rounding the injected bound used jnp.nextafter, which has no derivative:
  # jax.grad raised NotImplementedError.
  weights = jax.tree.map(lambda g: jnp.linspace(-1.0, 2.0, g.size).reshape(g.shape), GRAD)

  def final_objective(clip_value, injected):
    if injected:
      tx = optax.inject_hyperparams(gax.gradient_ascent)(learning_rate=0.1, clip_value=0.7)
    else:  # the same chain from Optax's transforms, built with the traced bound
      tx = optax.chain(
        optax.clip(clip_value),
        optax.scale_by_rms(0.999, 1e-8, eps_in_sqrt=False),
        optax.trace(0.9),
        optax.scale(0.1),
      )
    params = _params()
    state = tx.init(params)
    if injected:
      state.hyperparams["clip_value"] = clip_value
    for k in range(len(SCALES)):
      updates, state = tx.update(grad_at(k), state, params)
      params = optax.apply_updates(params, updates)
    return sum(jnp.vdot(w, p) for w, p in zip(jax.tree.leaves(weights), jax.tree.leaves(params)))

  got = jax.grad(final_objective)(jnp.float32(0.7), True)
  want = jax.grad(final_objective)(jnp.float32(0.7), False)
  assert abs(float(want)) > 0.1  # clipping matters here
  np.testing.assert_allclose(got, want, rtol=1e-4)  # measured: -4.81370 vs -4.81367, 7.7e-6


def test_injected_weight_decay_is_used_and_changes_without_retracing():
  traces = []
  tx = optax.inject_hyperparams(gax.gradient_ascent)(learning_rate=0.01, weight_decay=0.2)
  plain = gax.gradient_ascent(0.01, weight_decay=0.2)
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.5, 0.1, -0.3])}

  @jax.jit
  def step(params, state):
    traces.append(1)  # runs only while tracing
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state, plain_params, plain_state = tx.init(params), params, plain.init(params)
  for _ in range(3):
    params, state = step(params, state)
    updates, plain_state = plain.update(grads, plain_state, plain_params)
    plain_params = optax.apply_updates(plain_params, updates)
  # The injected beta is float32: 1 - beta differs from 1e-3 by 1.3e-5 (measured 6.4e-6).
  np.testing.assert_allclose(params["w"], plain_params["w"], rtol=2e-5)

  # A new value between steps: the same compiled step, other numbers.
  unchanged = jax.tree.map(jnp.copy, state)
  # full_like keeps dtype and weak type, so the compiled step is reused.
  state.hyperparams["weight_decay"] = jnp.full_like(state.hyperparams["weight_decay"], 5.0)
  params_new, _ = step(params, state)
  params_old, _ = step(params, unchanged)
  assert len(traces) == 1
  assert not np.allclose(params_new["w"], params_old["w"])


def test_injected_default_has_no_decay_stage_and_needs_no_params():
  # The default weight_decay is None, which Optax does not inject: no decay stage,
  # so update needs no params (the default 0.0 was injected and added one).
  params, grads = jnp.ones(2), jnp.ones(2)
  tx = optax.inject_hyperparams(gax.gradient_ascent)(learning_rate=0.01)
  assert "weight_decay" not in tx.init(params).hyperparams
  updates, _ = tx.update(grads, tx.init(params))
  plain, _ = gax.gradient_ascent(0.01).update(grads, gax.gradient_ascent(0.01).init(params))
  np.testing.assert_allclose(updates, plain, rtol=2e-5)  # float32 injected beta: see above


def test_injected_weight_decay_needs_params_or_a_static_arg():
  # An injected rate is a JAX value that may be > 0, even where it is built with 0:
  # the stage is in the chain and update needs the params (as for
  # optax.inject_hyperparams(optax.adamw)). As a static argument, 0 adds no stage.
  params, grads = jnp.ones(2), jnp.ones(2)
  tx = optax.inject_hyperparams(gax.gradient_ascent)(learning_rate=0.01, weight_decay=0.0)
  with pytest.raises(ValueError, match=r"static_args=\('weight_decay',\)"):
    tx.update(grads, tx.init(params))
  tx.update(grads, tx.init(params), params)
  tx = optax.inject_hyperparams(gax.gradient_ascent, static_args=("weight_decay",))(
    learning_rate=0.01, weight_decay=0.0
  )
  updates, _ = tx.update(grads, tx.init(params))
  plain, _ = gax.gradient_ascent(0.01).update(grads, gax.gradient_ascent(0.01).init(params))
  np.testing.assert_allclose(updates, plain, rtol=2e-5)  # float32 injected beta: see above


# Optax's own contract for inject_hyperparams (optax/_src/alias_test.py,
# test_optimizers_can_be_wrapped_in_inject_hyperparams): the injected optimizer's
# inner state is the plain one's, and its updates and new state match.
KNOB_SETS = {
  "defaults": {},
  "clip_nesterov": {"clip_value": 0.5, "nesterov": True},
  "warmup_decay": {"learning_rate": 0.05, "warmup_steps": 3, "lr_decay": 0.9},
  "logging": {"logging_interval": 2},
  "weight_decay": {"weight_decay": 0.1},
  "weight_decay_mask": {"weight_decay": 0.1, "weight_decay_mask": [True, False]},
  # A dtype object, not jnp.float32: Optax takes any callable for a schedule.
  "accumulator_dtype": {"accumulator_dtype": jnp.dtype("float32"), "momentum": 0.5},
}


@pytest.mark.parametrize("knobs", list(KNOB_SETS.values()), ids=list(KNOB_SETS))
def test_inner_state_and_updates_are_those_of_the_plain_optimizer(knobs):
  opt = gax.gradient_ascent(**knobs)
  opt_inject = optax.inject_hyperparams(gax.gradient_ascent)(**knobs)
  params = [jnp.negative(jnp.ones((2, 3))), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), jnp.negative(jnp.ones((2, 5, 2)))]

  state = jax.jit(opt.init)(params)
  state_inject = jax.jit(opt_inject.init)(params)
  assert jax.tree.structure(state_inject.inner_state) == jax.tree.structure(state)
  for _ in range(3):
    updates, state = jax.jit(opt.update)(grads, state, params)
    updates_inject, state_inject = jax.jit(opt_inject.update)(grads, state_inject, params)
    assert jax.tree.structure(state_inject.inner_state) == jax.tree.structure(state)
    # The injected beta is float32: 1 - beta differs from 1e-3 by 1.3e-5.
    chex.assert_trees_all_close(updates_inject, updates, rtol=1e-4)
    chex.assert_trees_all_close(state_inject.inner_state, state, rtol=1e-4)


@pytest.mark.parametrize(
  "knobs", [KNOB_SETS["defaults"], KNOB_SETS["clip_nesterov"]], ids=["defaults", "clip_nesterov"]
)
def test_injected_without_weight_decay_updates_without_params(knobs):
  opt = gax.gradient_ascent(**knobs)
  opt_inject = optax.inject_hyperparams(gax.gradient_ascent)(**knobs)
  params, grads = jnp.zeros(3), jnp.array([0.5, -1.0, 2.0])
  updates, _ = jax.jit(opt.update)(grads, opt.init(params))
  updates_inject, _ = jax.jit(opt_inject.update)(grads, opt_inject.init(params))
  np.testing.assert_allclose(updates_inject, updates, rtol=1e-4)


# A callable weight_decay_mask: Optax calls any callable not in static_args with the
# step count, as a schedule. --------------------------------------------------------


def _matrices(params):
  return jax.tree.map(lambda x: x.ndim > 1, params)


def _as_jax_bools(params):
  return jax.tree.map(lambda x: jnp.asarray(x.ndim > 1), params)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mask", [_matrices, _as_jax_bools])
def test_callable_mask_not_static_is_refused_naming_the_fix(mask, jit):
  # It arrived as mask(count) = False: no leaf decayed, and nothing was said.
  tx = optax.inject_hyperparams(gax.gradient_ascent)(
    learning_rate=1e-3, weight_decay=0.1, weight_decay_mask=mask
  )
  init = jax.jit(tx.init) if jit else tx.init
  with pytest.raises(ValueError, match=r'static_args=\("weight_decay_mask",\)') as info:
    init(_params())
  assert "got a single bool" in str(info.value)


def test_callable_mask_in_static_args_decays_the_chosen_leaves():
  params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full(2, 2.0)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = optax.inject_hyperparams(gax.gradient_ascent, static_args=("weight_decay_mask",))(
    learning_rate=1e-3, weight_decay=0.1, weight_decay_mask=_matrices
  )
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  # Zero gradient: h = -0.1 * 2 on w, so the first step is -lr / sqrt(1 - beta).
  np.testing.assert_allclose(updates["w"], -1e-3 / np.sqrt(1e-3), rtol=1e-4)
  np.testing.assert_array_equal(updates["b"], 0.0)


@pytest.mark.parametrize("factory", [gax.gradient_ascent, gax.scale_by_adaptive_rms, gax.momentum])
def test_dtype_not_static_is_refused_naming_the_fix(factory):
  # jnp.float32 is callable: Optax called it with the count, and jnp.zeros(dtype=
  # an array) failed with "Passing an array as a dtype argument is no longer supported".
  tx = optax.inject_hyperparams(factory)(accumulator_dtype=jnp.float32)
  with pytest.raises(ValueError, match=r'static_args=\("accumulator_dtype",\)'):
    tx.init(jnp.zeros(2))
  for static_args, dtype in ((("accumulator_dtype",), jnp.float32), ((), "float32")):
    tx = optax.inject_hyperparams(factory, static_args, hyperparam_dtype=jnp.float32)(
      accumulator_dtype=dtype
    )
    state = tx.init(jnp.zeros(2, jnp.bfloat16))
    assert {leaf.dtype for leaf in jax.tree.leaves(state.inner_state)} >= {jnp.dtype(jnp.float32)}


def test_injected_beta_too_coarse_for_the_state_warns_at_init_as_when_built_with_it():
  # The injected beta is a concrete float32 array at an eager init: it is read (it
  # was skipped as unknown, and bfloat16 state got no warning).
  tx = optax.inject_hyperparams(gax.gradient_ascent, hyperparam_dtype=jnp.float32)()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tx.init({"w": jnp.ones(4, jnp.bfloat16)})
    jax.jit(tx.init)({"w": jnp.ones(4, jnp.bfloat16)})  # traced: no value to read
  [message] = [str(w.message) for w in caught]
  assert "beta=0.999 is closer to 1 than bfloat16 state can resolve" in message
