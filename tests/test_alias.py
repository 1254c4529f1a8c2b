"""gradient_ascent() and maximize() (gradient_ascent_jax/_src/alias.py).

- gradient_ascent(...) is bit for bit the chain of public transforms the README shows;
- it agrees with the independent float64 NumPy reference (tests/_reference.py) over
  200+ steps of a small MLP, fed the same gradients and also on free-running trajectories;
- it equals sign-reversed optax.rmsprop for a constant learning rate;
- maximize(tx) is descent with tx on the negated objective: bit for bit op by op, to
  rounding under jit; weight decay still shrinks; line searches (L-BFGS) ascend.
"""

import functools
import logging
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from gradient_ascent_jax._src import alias
from tests import _mlp
from tests._reference import ReferenceGradientAscent


def explicit_chain(
  learning_rate=0.01,
  momentum=0.9,
  beta=0.999,
  eps=1e-8,
  nesterov=False,
  clip_value=None,
  lr_decay=None,
  warmup_steps=0,
  logging_interval=None,
  accumulator_dtype=None,
):
  """The chain as README.md writes it under "gradient_ascent(...) is exactly"."""
  stages = []
  if logging_interval:
    schedule = gax.warmup_decay_schedule(learning_rate, warmup_steps, lr_decay)
    stages.append(gax.log_progress(logging_interval, schedule))
  stages.append(gax.flip_sign())
  if clip_value is not None:
    stages.append(gax.clip_by_value(clip_value))
  stages += [
    gax.scale_by_adaptive_rms(beta, eps, accumulator_dtype=accumulator_dtype),
    gax.momentum(momentum, nesterov, accumulator_dtype=accumulator_dtype),
    gax.scale_by_warmup_decay(learning_rate, warmup_steps, lr_decay),
  ]
  return optax.chain(*stages)


def trajectory(tx, objective, params, steps):
  """Runs `steps` steps of tx on jax.grad(objective) in a lax.scan.

  Returns the params, updates and optimizer state after every step (stacked).
  """

  def body(carry, _):
    params, state = carry
    grads = jax.grad(objective)(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), (params, updates, state)

  _, history = jax.lax.scan(body, (params, tx.init(params)), length=steps)
  return history


def two_trajectories(first, second, params, steps=20):
  """trajectory() of two (tx, objective) pairs, compiled as one program (one compile)."""
  return jax.jit(lambda p: (trajectory(*first, p, steps), trajectory(*second, p, steps)))(params)


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def float32_problem():
  x, y = _mlp.make_data()
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  return _mlp.as_jax(_mlp.init_weights(), jnp.float32), functools.partial(_mlp.objective, x=x, y=y)


# --- (a) gradient_ascent(...) is the documented chain, bit for bit -------------------------

CHAIN_CONFIGS = {
  "defaults": {},
  "nesterov_clip_warmup_decay_logging_off": dict(
    learning_rate=0.03,
    nesterov=True,
    clip_value=0.5,
    warmup_steps=5,
    lr_decay=0.97,
    logging_interval=None,
  ),
  "schedule_logging_every_3": dict(
    learning_rate=optax.cosine_decay_schedule(0.05, 20),
    momentum=0.5,
    beta=0.9,
    eps=1e-6,
    warmup_steps=4,
    logging_interval=3,
  ),
  "float32_accumulators_logging_off": dict(
    momentum=0.0, clip_value=1.0, logging_interval=0, accumulator_dtype=jnp.float32
  ),
}


@pytest.mark.parametrize("name", sorted(CHAIN_CONFIGS))
def test_gradient_ascent_is_the_documented_chain_bit_for_bit(name):
  config = CHAIN_CONFIGS[name]
  params, objective = float32_problem()
  got, want = two_trajectories(
    (gax.gradient_ascent(**config), objective), (explicit_chain(**config), objective), params
  )
  # params, updates and every state leaf after every one of the 20 steps
  assert_trees_equal(got, want)
  # and it ascends
  assert objective(jax.tree.map(lambda p: p[-1], got[0])) > objective(params)


# --- (b) agreement with the float64 NumPy reference ---------------------------------------

REFERENCE_STEPS = 250
# The contract asks for rtol 1e-6 or tighter. Fed the same gradients, the updates agree to ~1e-11
# (float64 rounding, amplified where momentum sums nearly cancel); free-running
# trajectories add the sensitivity of the dynamics and agree to ~1e-10.
UPDATES_RTOL = 1e-9
PARAMS_RTOL = 1e-8

REFERENCE_CONFIGS = {
  "defaults": {},
  "nesterov_clip": dict(learning_rate=0.02, nesterov=True, clip_value=0.5),
  "warmup_decay": dict(learning_rate=0.05, warmup_steps=50, lr_decay=0.995),
  "cosine_schedule_nesterov": dict(
    learning_rate=optax.cosine_decay_schedule(0.05, REFERENCE_STEPS), momentum=0.8, nesterov=True
  ),
  "momentum0_clip": dict(learning_rate=0.01, momentum=0.0, beta=0.99, clip_value=1.0),
  "beta0_warmup": dict(learning_rate=0.002, beta=0.0, momentum=0.5, warmup_steps=20),
  # Optax's linear/exponential schedules compute in float32 from an int32 count even under
  # x64 (int32 / int is float32 in JAX); a piecewise-constant one stays exact.
  "everything": dict(
    learning_rate=optax.piecewise_constant_schedule(0.02, {100: 0.5}),
    momentum=0.7,
    beta=0.99,
    eps=1e-6,
    nesterov=True,
    clip_value=0.5,
    warmup_steps=30,
    lr_decay=0.995,
    logging_interval=None,
  ),
}

_grad = jax.jit(jax.grad(_mlp.objective))


def max_relative_difference(actual_leaves, expected_leaves):
  worst = 0.0
  for got, want in zip(actual_leaves, expected_leaves, strict=True):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    worst = max(worst, float(np.max(np.abs(got - want) / np.abs(want))))
  return worst


@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_agrees_with_numpy_reference(name, x64):
  config = REFERENCE_CONFIGS[name]
  x, y = (jnp.asarray(a, jnp.float64) for a in _mlp.make_data())
  params = _mlp.as_jax(_mlp.init_weights(), jnp.float64)
  tx = gax.gradient_ascent(**config)

  @jax.jit
  def step(params, state):
    grads = _grad(params, x, y)
    updates, state = tx.update(grads, state, params)
    return grads, updates, optax.apply_updates(params, updates), state

  reference_options = {k: v for k, v in config.items() if k != "logging_interval"}
  if callable(config.get("learning_rate")):  # the base schedule as a table, for speed
    table = np.asarray(jax.vmap(config["learning_rate"])(jnp.arange(REFERENCE_STEPS)))
    reference_options["learning_rate"] = table.__getitem__
  driven = ReferenceGradientAscent(**reference_options)  # fed the JAX trajectory's gradients
  free = ReferenceGradientAscent(**reference_options)  # runs its own trajectory
  free_params = [np.asarray(p) for p in jax.tree.leaves(params)]
  treedef = jax.tree.structure(params)
  state = tx.init(params)
  largest_gradient, worst_updates, worst_params = 0.0, 0.0, 0.0
  for k in range(REFERENCE_STEPS):
    grads, updates, params, state = step(params, state)
    grads, updates = jax.tree.leaves(grads), jax.tree.leaves(updates)
    expected = driven.step([np.asarray(g) for g in grads])
    for got, want in zip(updates, expected, strict=True):
      np.testing.assert_allclose(got, want, rtol=UPDATES_RTOL, atol=0, err_msg=f"step {k}")
    worst_updates = max(worst_updates, max_relative_difference(updates, expected))

    free_grads = jax.tree.leaves(_grad(jax.tree.unflatten(treedef, free_params), x, y))
    free_params = [p + u for p, u in zip(free_params, free.step(free_grads), strict=True)]
    for got, want in zip(jax.tree.leaves(params), free_params, strict=True):
      np.testing.assert_allclose(got, want, rtol=PARAMS_RTOL, atol=0, err_msg=f"step {k}")
    worst_params = max(worst_params, max_relative_difference(jax.tree.leaves(params), free_params))
    largest_gradient = max(largest_gradient, max(float(np.max(np.abs(g))) for g in grads))

  assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(params))
  if config.get("clip_value") is not None:  # the clip really was active
    assert largest_gradient > config["clip_value"]
  print(
    f"\n[numpy reference] {name}: {REFERENCE_STEPS} steps, max relative difference "
    f"updates (same gradients) {worst_updates:.3e}, free-running params {worst_params:.3e}"
  )


def test_reference_configurations_cover_the_spec():
  configs = REFERENCE_CONFIGS.values()
  assert len(REFERENCE_CONFIGS) >= 6
  assert any(c.get("nesterov") for c in configs)
  assert any(c.get("clip_value") for c in configs)
  assert any(c.get("warmup_steps") for c in configs)
  assert any(c.get("lr_decay") for c in configs)
  assert any(callable(c.get("learning_rate")) for c in configs)
  assert any(c.get("momentum", 0.9) == 0 for c in configs)
  assert any(c.get("beta", 0.999) == 0 for c in configs)


# --- (d) sign-reversed optax.rmsprop for a constant learning rate -------------------------


@pytest.mark.parametrize(
  "dtype, rtol", [(jnp.float32, 1e-5), (jnp.float64, 1e-12)], ids=["float32", "float64"]
)
@pytest.mark.parametrize(
  "momentum, beta", [(0.9, 0.999), (0.0, 0.9), (0.5, 0.0)], ids=["m0.9", "m0", "beta0"]
)
def test_equals_sign_reversed_optax_rmsprop(dtype, rtol, momentum, beta):
  with jax.enable_x64(dtype == jnp.float64):
    x, y = (jnp.asarray(a, dtype) for a in _mlp.make_data())
    params = _mlp.as_jax(_mlp.init_weights(), dtype)
    options = dict(learning_rate=0.02, momentum=momentum, beta=beta, eps=1e-7)
    tx = gax.gradient_ascent(**options, logging_interval=None)
    rmsprop = optax.rmsprop(
      0.02, decay=beta, eps=1e-7, eps_in_sqrt=False, momentum=momentum or None
    )

    @jax.jit
    def step(params, state, rms_state):
      grads = _grad(params, x, y)
      updates, state = tx.update(grads, state, params)
      rms_updates, rms_state = rmsprop.update(grads, rms_state, params)
      return optax.apply_updates(params, updates), state, rms_state, updates, rms_updates

    state, rms_state = tx.init(params), rmsprop.init(params)
    for _ in range(30):
      params, state, rms_state, updates, rms_updates = step(params, state, rms_state)
      for got, descent in zip(jax.tree.leaves(updates), jax.tree.leaves(rms_updates), strict=True):
        assert got.dtype == dtype
        # lr * (m * v + s) against m * (lr * v) + lr * s: the rounding differs by an ulp
        # of the terms (of order lr), which is large relative to their sum where m * v
        # and s nearly cancel; hence an absolute tolerance of rtol * lr as well.
        np.testing.assert_allclose(got, -descent, rtol=rtol, atol=rtol * 0.02)


# --- the size of the first steps ------------------------------------------------------------


def test_first_steps_are_hand_worked_multiples_of_the_learning_rate():
  # No bias correction: with a gradient g of constant sign, m_t = (1 - beta^t) g^2, so
  # s_t = sign(g) / sqrt(1 - beta^t) whatever |g|, and v_t = 0.9 v_{t-1} + s_t. By hand
  # (beta 0.999): v_1 = 1 / sqrt(0.001) = 31.6228; v peaks at step 11, 93.431; the first
  # ten v_t add up to 750.43.
  lr, g = 1e-3, jnp.array([-1e3, -0.1, 2.0, 50.0])
  tx = gax.gradient_ascent(learning_rate=lr)
  state, moves = tx.init(jnp.zeros(4)), []
  for _ in range(30):
    updates, state = tx.update(g, state)
    np.testing.assert_array_equal(np.sign(updates), np.sign(g))  # uphill, every element
    moves.append(np.abs(np.asarray(updates, np.float64)) / lr)
  moves = np.array(moves)
  np.testing.assert_allclose(moves[0], 31.6228, rtol=1e-5)
  np.testing.assert_allclose(moves.max(axis=0), 93.431, rtol=1e-4)
  np.testing.assert_array_equal(moves.argmax(axis=0), 10)  # step 11
  np.testing.assert_allclose(moves[:10].sum(axis=0), 750.43, rtol=1e-4)


def test_only_tiny_gradients_take_a_shorter_first_step():
  # The first step is lr * g / (sqrt(1 - beta) |g| + eps): eps counts for tiny g only.
  # By hand (defaults): 31.6228 / (1 + eps / (0.0316228 g)); 1% short at 3.16e-5.
  g = jnp.array([1e-6, 1e-5, 3.1623e-5, 1e-3, 100.0])
  tx = gax.gradient_ascent(learning_rate=1.0)
  updates, _ = tx.update(g, tx.init(jnp.zeros(5)))
  np.testing.assert_allclose(updates, [24.025, 30.653, 31.6228 / 1.01, 31.6128, 31.6228], rtol=1e-4)


def fit_gaussian_mixture(learning_rate, steps=2000):
  """Maximum likelihood of 0.5 N(-2, 1) + 0.5 N(3, 1) from 1000 draws; the fitted means, stds."""
  component, noise = jax.random.split(jax.random.key(0))
  data = jnp.where(jax.random.bernoulli(component, 0.5, (1000,)), -2.0, 3.0)
  data = data + jax.random.normal(noise, (1000,))

  def log_likelihood(p):
    std = jnp.exp(p["log_std"])
    log_densities = (
      jax.nn.log_softmax(p["logits"])
      - 0.5 * ((data[:, None] - p["mu"]) / std) ** 2
      - jnp.log(std)
      - 0.5 * jnp.log(2 * jnp.pi)
    )
    return jnp.mean(jax.nn.logsumexp(log_densities, axis=1))

  tx = gax.gradient_ascent(learning_rate)

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(jax.grad(log_likelihood)(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  params = {"mu": jnp.array([-0.5, 0.5]), "log_std": jnp.zeros(2), "logits": jnp.zeros(2)}
  (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=steps))(params)
  return np.asarray(params["mu"]), np.exp(np.asarray(params["log_std"]))


@pytest.mark.slow  # 2 s or more on 2 cores
def test_a_learning_rate_of_adams_habit_breaks_a_gaussian_mixture_fit():
  means, stds = fit_gaussian_mixture(1e-3)
  np.testing.assert_allclose(means, [-2.0, 3.0], atol=0.1)  # the sample's own error: ~0.07
  np.testing.assert_allclose(stds, [1.0, 1.0], atol=0.1)
  means, stds = fit_gaussian_mixture(3e-2)  # first step 0.95 on every parameter
  assert means.min() < -5.0 and stds.max() > 100.0, (means, stds)


# --- (c) maximize ---------------------------------------------------------------------------

DESCENT_OPTIMIZERS = {
  "sgd": lambda: optax.sgd(0.05),
  "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
  "sgd_nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
  "adam": lambda: optax.adam(0.01),
  "adamw": lambda: optax.adamw(0.01, weight_decay=0.1),
}


PEAK = {"w": jnp.array([1.0, -2.0, 0.5]), "m": jnp.array([[0.3, -0.7], [2.0, 1.5]])}


def peaked_gradient(params):
  """The gradient of the concave objective -|w - PEAK_w|^2 - sum(cosh(m - PEAK_m)), written
  out; the negated objective's gradient is exactly its negation."""
  return {"w": -2.0 * (params["w"] - PEAK["w"]), "m": -jnp.sinh(params["m"] - PEAK["m"])}


def eager_run(tx, gradient, params, steps=20):
  """Steps op by op; returns (params, updates, state) after every step."""
  state, history = tx.init(params), []
  for _ in range(steps):
    updates, state = tx.update(gradient(params), state, params)
    params = optax.apply_updates(params, updates)
    history.append((params, updates, state))
  return history


@pytest.mark.slow  # 2 s or more on 2 cores
@pytest.mark.parametrize("name", sorted(DESCENT_OPTIMIZERS))
def test_maximize_is_descent_on_the_negated_objective_exactly(name):
  # Op by op (no jit) every stage of these optimizers is odd in the gradient, so the two
  # runs are bit for bit the same. (Under jit XLA may contract a * b + c into an FMA in
  # one program and not the other: see the next test.)
  params = {"w": jnp.zeros(3), "m": jnp.zeros((2, 2))}
  with jax.disable_jit():
    ascent = eager_run(gax.maximize(DESCENT_OPTIMIZERS[name]()), peaked_gradient, params)
    descent = eager_run(
      DESCENT_OPTIMIZERS[name](), lambda p: jax.tree.map(jnp.negative, peaked_gradient(p)), params
    )
  assert_trees_equal(ascent, descent)  # params, updates and state after every step
  # and it climbs towards the peak
  distance = [optax.tree.norm(jax.tree.map(jnp.subtract, p, PEAK)) for p, _, _ in ascent]
  assert distance[-1] < distance[0] < optax.tree.norm(PEAK)


def test_maximize_is_descent_on_the_negated_objective_under_jit():
  params, objective = float32_problem()
  ascent, descent = two_trajectories(
    (gax.maximize(DESCENT_OPTIMIZERS["adamw"]()), objective),
    (DESCENT_OPTIMIZERS["adamw"](), lambda p: -objective(p)),
    params,
  )
  assert jax.tree.structure(ascent) == jax.tree.structure(descent)
  for got, want in zip(jax.tree.leaves(ascent), jax.tree.leaves(descent), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert objective(jax.tree.map(lambda p: p[-1], ascent[0])) > objective(params)


def test_weight_decay_still_shrinks_weights_under_maximize():
  # With a zero gradient Adam's own step is 0 / (sqrt(0) + eps) = 0, and AdamW adds the
  # decoupled decay: w <- w - lr * wd * w = w * (1 - 0.1 * 0.5) = 0.95 w per step.
  tx = gax.maximize(optax.adamw(0.1, weight_decay=0.5))
  w = {"w": jnp.array([1.0, -2.0]), "m": jnp.array([[4.0, 0.5], [-0.25, 8.0]])}
  state = tx.init(w)
  expected = [
    {"w": [0.95, -1.9], "m": [[3.8, 0.475], [-0.2375, 7.6]]},
    {"w": [0.9025, -1.805], "m": [[3.61, 0.45125], [-0.225625, 7.22]]},
    {"w": [0.857375, -1.71475], "m": [[3.4295, 0.4286875], [-0.21434375, 6.859]]},
  ]
  for want in expected:
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, w), state, w)
    w = optax.apply_updates(w, updates)
    for key in w:
      np.testing.assert_allclose(w[key], want[key], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(DESCENT_OPTIMIZERS))
def test_maximize_keeps_the_state_structure(name):
  params, _ = float32_problem()
  tx = DESCENT_OPTIMIZERS[name]()
  assert jax.tree.structure(gax.maximize(tx).init(params)) == jax.tree.structure(tx.init(params))


def test_maximize_keeps_injected_hyperparams():
  tx = gax.maximize(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3))
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-3)
  # Adam's first step is lr * sign(g) (up to eps); maximize moves WITH the gradient.
  state.hyperparams["learning_rate"] = jnp.asarray(0.5)
  updates, state = tx.update({"w": jnp.array([2.0, -3.0])}, state, params)
  np.testing.assert_allclose(updates["w"], [0.5, -0.5], rtol=1e-6)
  assert float(state.hyperparams["learning_rate"]) == 0.5


@pytest.mark.parametrize(
  "not_a_transform, hint",
  [(optax.adam, "factory"), (1e-3, "GradientTransformation"), (None, "GradientTransformation")],
  ids=["factory", "float", "None"],
)
def test_maximize_rejects_a_non_transform(not_a_transform, hint):
  with pytest.raises(TypeError, match=hint):
    gax.maximize(not_a_transform)


# --- maximize refuses what already ascends ------------------------------------------------


def objective_after(tx, steps=100):
  """-|x - 3|^2 after `steps` steps of tx from 0 (the maximum is 0)."""

  def objective(x):
    return -jnp.sum((x - 3.0) ** 2)

  x = jnp.zeros(3)
  state = tx.init(x)
  step = jax.jit(tx.update)
  for _ in range(steps):
    updates, state = step(jax.grad(objective)(x), state, x)
    x = optax.apply_updates(x, updates)
  return float(objective(x))


@pytest.mark.parametrize(
  "ascending",
  [lambda: gax.gradient_ascent(0.1), lambda: gax.maximize(optax.sgd(0.1))],
  ids=["gradient_ascent", "maximize"],
)
def test_maximize_refuses_a_transform_that_already_ascends(ascending):
  with pytest.raises(
    ValueError,
    match=r"^maximize: tx already ascends \(it is "
    r"gax\.gradient_ascent\(\.\.\.\) or gax\.maximize\(\.\.\.\)\)\. "
    "maximize\\(tx\\) would negate the gradients a second time and descend",
  ):
    gax.maximize(ascending())
  assert objective_after(ascending()) > -1.0  # as it is, it ascends: -27 -> near 0


@pytest.mark.parametrize(
  ("wrapped", "where"),
  [
    (
      lambda: optax.inject_hyperparams(gax.gradient_ascent)(learning_rate=0.1),
      "state.inner_state[0]",
    ),
    (lambda: optax.chain(gax.gradient_ascent(0.1), optax.add_decayed_weights(0.01)), "state[0][0]"),
    (lambda: optax.chain(gax.flip_sign(), optax.sgd(0.1)), "state[0]"),
  ],
  ids=["inject_hyperparams", "chain", "flip_sign"],
)
def test_maximize_refuses_at_init_what_ascends_inside_a_wrapper(wrapped, where):
  tx = gax.maximize(wrapped())  # the wrapper hides its inner transform until init
  with pytest.raises(ValueError, match=r"^maximize: tx already ascends") as error:
    tx.init(jnp.zeros(3))
  assert f"FlipSignState at {where}," in str(error.value)
  assert objective_after(wrapped()) > -1.0  # as it is, it ascends


@pytest.mark.parametrize(
  "descent",
  [
    lambda: optax.chain(optax.sgd(0.1), optax.add_decayed_weights(1e-4)),
    lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
  ],
  ids=["chain", "inject_hyperparams"],
)
def test_maximize_of_a_descent_chain_or_injection_still_ascends(descent):
  assert objective_after(descent()) < -27.0  # on its own it descends
  assert objective_after(gax.maximize(descent())) > -1.0


def test_maximize_update_with_none_state_says_to_call_init():
  with pytest.raises(ValueError, match=r"maximize: got state None\. Call state = tx\.init"):
    gax.maximize(optax.adam(1e-3)).update(jnp.ones(2), None, jnp.zeros(2))


CENTER = jnp.array([1.0, -2.0, 3.0])
CURVATURE = jnp.array([1.0, 2.0, 0.5])


def concave(x):
  """Maximum 0 at x = CENTER."""
  return -jnp.sum(CURVATURE * (x - CENTER) ** 2)


def run_with_cached_value_and_grad(tx, objective, steps):
  """The optax.value_and_grad_from_state pattern of line-search optimizers."""
  value_and_grad = optax.value_and_grad_from_state(objective)

  @jax.jit
  def step(x, state):
    value, grad = value_and_grad(x, state=state)
    updates, state = tx.update(grad, state, x, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(x, updates), state

  x, state = jnp.zeros(3), tx.init(jnp.zeros(3))
  path = [x]
  for _ in range(steps):
    x, state = step(x, state)
    path.append(x)
  return path, state


LINESEARCH_OPTIMIZERS = {
  "lbfgs": optax.lbfgs,
  "sgd_backtracking": lambda: optax.chain(
    optax.sgd(1.0),
    optax.scale_by_backtracking_linesearch(max_backtracking_steps=15, store_grad=True),
  ),
}


@pytest.mark.slow  # 2 s or more on 2 cores
@pytest.mark.parametrize("name", sorted(LINESEARCH_OPTIMIZERS))
def test_maximize_line_search_optimizer_with_value_and_grad_from_state(name):
  ascent, state = run_with_cached_value_and_grad(
    gax.maximize(LINESEARCH_OPTIMIZERS[name]()), concave, steps=12
  )
  values = [float(concave(x)) for x in ascent]
  # Every step after the first too: the cached value/grad must have the objective's sign.
  assert all(b >= a for a, b in zip(values[:-1], values[1:], strict=True)), values
  assert values[-1] > values[1] > values[0]
  assert values[-1] > -0.05  # close to the maximum 0 (L-BFGS reaches it in ~8 steps)
  if name == "sgd_backtracking":  # (L-BFGS compiles slowly; one run of it is enough)
    descent, _ = run_with_cached_value_and_grad(
      LINESEARCH_OPTIMIZERS[name](), lambda x: -concave(x), steps=12
    )
    for x_up, x_down in zip(ascent, descent, strict=True):
      np.testing.assert_array_equal(x_up, x_down)
  # The cache in the state holds the caller's objective (not its negation).
  np.testing.assert_allclose(optax.tree.get(state, "value"), concave(ascent[-1]), atol=1e-6)


@pytest.mark.slow  # 2 s or more on 2 cores
@pytest.mark.parametrize("name", sorted(LINESEARCH_OPTIMIZERS))
def test_maximize_line_search_hands_value_fn_its_own_extra_arguments(name):
  # Optax's line searches read value_fn's signature to pick the extra arguments it
  # takes: the negated value_fn must keep it, or update(..., weight=...) is refused.
  def objective(x, weight):
    return weight * concave(x)

  def run(tx, objective):
    @jax.jit
    def step(x, state):
      value, grad = jax.value_and_grad(objective)(x, 2.0)
      updates, state = tx.update(
        grad, state, x, value=value, grad=grad, value_fn=objective, weight=2.0
      )
      return optax.apply_updates(x, updates), state

    x, state, path = jnp.zeros(3), tx.init(jnp.zeros(3)), []
    for _ in range(8):
      x, state = step(x, state)
      path.append(x)
    return path

  ascent = run(gax.maximize(LINESEARCH_OPTIMIZERS[name]()), objective)
  values = [float(concave(x)) for x in [jnp.zeros(3), *ascent]]
  assert values[-1] > values[1] > values[0], values
  if name == "sgd_backtracking":  # (L-BFGS compiles slowly; one run of it is enough)
    descent = run(LINESEARCH_OPTIMIZERS[name](), lambda x, weight: -objective(x, weight))
    for x_up, x_down in zip(ascent, descent, strict=True):
      np.testing.assert_array_equal(x_up, x_down)


# --- maximize across the rest of Optax ------------------------------------------------------


def bowl(x):
  """Concave, maximum 0 at x = CENTER."""
  return -jnp.sum(CURVATURE * (x - CENTER) ** 2)


def run(
  tx, objective, steps=15, *, extra=None, start=None, grad_at=None, evaluate=None, corrupt=None
):
  """Steps tx op by op on jax.grad(objective); returns (params, updates, state, judged).

  extra(objective, params) gives the update's extra arguments, grad_at(params) the
  point where the gradient is taken, evaluate(state, params) the params to judge,
  corrupt(k, grads) the gradient actually passed at step k.
  """
  params = jnp.zeros(3) if start is None else start
  state, history = tx.init(params), []
  with jax.disable_jit():
    for k in range(steps):
      grads = jax.grad(objective)(grad_at(params) if grad_at else params)
      grads = corrupt(k, grads) if corrupt else grads
      updates, state = tx.update(
        grads, state, params, **(extra(objective, params) if extra else {})
      )
      params = optax.apply_updates(params, updates)
      history.append((params, updates, state, evaluate(state, params) if evaluate else params))
  return history


def ascent_and_descent(make, steps=15, **kwargs):
  """run() of maximize(make()) on bowl and of make() on -bowl."""
  return run(gax.maximize(make()), bowl, steps, **kwargs), run(
    make(), negated_bowl, steps, **kwargs
  )


def negated_bowl(x):
  return -bowl(x)


def assert_ascends_as_descent_on_negation(runs):
  ascent, descent = runs
  assert_trees_equal(ascent, descent)  # bit for bit, every step
  values = [float(bowl(judged)) for *_, judged in ascent]
  assert values[-1] > float(bowl(jnp.zeros(3))) + 1.0, values  # from -17.5 towards 0


@pytest.mark.slow  # 2 s or more on 2 cores
def test_maximize_reduce_on_plateau_sees_the_maximizers_progress():
  # sgd(0.6) on curvature 2 overshoots: the objective stops improving, the plateau
  # logic must notice (on the maximizer's value) and halve the step.
  def make():
    return optax.chain(optax.sgd(0.6), optax.contrib.reduce_on_plateau(factor=0.5, patience=2))

  runs = ascent_and_descent(make, steps=30, extra=lambda f, x: {"value": f(x)})
  assert_ascends_as_descent_on_negation(runs)
  assert float(optax.tree.get(runs[0][-1][2], "scale")) < 1.0  # it did reduce


def rise_then_flat(start, top):
  """An objective that rises in 10 steps of at least 1 from start to top, then stays."""
  return [start + (top - start) * k / 10 for k in range(11)] + [top] * 30


def plateau_scales(tx, values):
  """The reduce_on_plateau scale after each update fed value=values[k], and the last state."""
  x, update = jnp.zeros(3), jax.jit(tx.update)
  state, scales = tx.init(x), []
  for value in values:
    _, state = update(jnp.zeros(3), state, x, value=jnp.float32(value))
    scales.append(float(optax.tree.get(state, "scale")))
  return scales, state


@pytest.fixture
def plateau_warning_not_yet_shown(monkeypatch):
  monkeypatch.setattr(alias, "_plateau_relative_test_warned", threading.Event(), raising=False)


def maximize_with_plateau(**plateau):
  return gax.maximize(
    optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=3, factor=0.5, **plateau))
  )


@pytest.mark.parametrize(
  ("start", "top"),
  [(-30.0, -20.0), (-2.0, 8.0), (2.0, 12.0)],
  ids=["negative", "zero-crossing", "positive"],
)
def test_maximize_reduce_on_plateau_with_rtol_0_cuts_for_either_sign(start, top):
  scales, state = plateau_scales(
    maximize_with_plateau(rtol=0.0, atol=1e-3), rise_then_flat(start, top)
  )
  assert scales[10] == 1.0  # every rise of >= 1 is progress
  # 30 flat steps at patience 3: a halving every third step, ten in all.
  assert scales[-1] == 2.0**-10
  assert float(optax.tree.get(state, "best_value")) == -top  # the best of -objective


def test_maximize_reduce_on_plateau_with_optaxs_relative_test_never_cuts_a_positive_objective():
  # Optax's own test, value < (1 - rtol) * best - atol: under maximize the value is
  # -objective, and a flat negative value passes it.
  tx = maximize_with_plateau()
  assert plateau_scales(tx, rise_then_flat(-30.0, -20.0))[0][-1] == 2.0**-10
  assert plateau_scales(tx, rise_then_flat(2.0, 12.0))[0][-1] == 1.0


def test_gradient_ascent_with_reduce_on_plateau_is_its_chain_under_maximize():
  # The guide's recipe: gradient_ascent's stages after its flip_sign, under maximize.
  def plateau():
    return optax.contrib.reduce_on_plateau(patience=3, factor=0.5, rtol=0.0, atol=1e-3)

  def run(tx):
    x, state, path = jnp.zeros(3), tx.init(jnp.zeros(3)), []
    for _ in range(8):  # the objective sum(x) rises at every step
      updates, state = tx.update(jnp.ones(3), state, x, value=jnp.sum(x))
      x = optax.apply_updates(x, updates)
      path.append(x)
    return path, float(optax.tree.get(state, "scale", 1.0))  # (gradient_ascent has none)

  recipe = gax.maximize(
    optax.chain(
      gax.scale_by_adaptive_rms(), gax.momentum(), gax.scale_by_warmup_decay(0.05), plateau()
    )
  )
  with jax.disable_jit():
    plain, _ = run(gax.gradient_ascent(0.05))
    with_plateau, scale = run(recipe)
    assert scale == 1.0  # no plateau: it is gradient_ascent, bit for bit
    for x_plain, x_recipe in zip(plain, with_plateau, strict=True):
      np.testing.assert_array_equal(x_plain, x_recipe)
    # Chained after gradient_ascent() instead, the plateau logic gets +objective, a
    # value it minimizes: it cuts the rate while the objective rises.
    assert run(optax.chain(gax.gradient_ascent(0.05), plateau()))[1] < 1.0


def test_maximize_with_reduce_on_plateau_warns_once_at_init_with_the_fix(
  plateau_warning_not_yet_shown, caplog
):
  with (
    caplog.at_level(logging.WARNING, logger="gradient_ascent_jax"),
    warnings.catch_warnings(record=True) as caught,
  ):
    warnings.simplefilter("always")
    gax.maximize(optax.sgd(0.1)).init(jnp.zeros(3))
    assert not caught
    for _ in range(2):
      maximize_with_plateau().init(jnp.zeros(3))
  # Misuse seen at init: one UserWarning at the user's line, nothing logged.
  [warning] = caught
  assert warning.category is UserWarning and warning.filename == __file__
  assert not caplog.records
  message = str(warning.message)
  assert "reduce_on_plateau" in message and "state[1]" in message
  assert "rtol=0.0" in message and "atol" in message


def test_maximize_schedule_free_adamw_and_its_eval_params():
  runs = ascent_and_descent(
    lambda: optax.contrib.schedule_free_adamw(0.5, warmup_steps=2),
    evaluate=optax.contrib.schedule_free_eval_params,
  )
  assert_ascends_as_descent_on_negation(runs)


@pytest.mark.slow  # 2 s or more on 2 cores
@pytest.mark.parametrize("opaque", [False, True], ids=["transparent", "opaque"])
def test_maximize_sam(opaque):
  def make():
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(0.05))
    return optax.contrib.sam(optax.sgd(0.2), adversary, sync_period=2, opaque_mode=opaque)

  def grad_fn(objective, params):
    del params
    return {"grad_fn": lambda p, i: jax.grad(objective)(p)}

  runs = ascent_and_descent(make, steps=30, extra=grad_fn if opaque else None)
  assert_ascends_as_descent_on_negation(runs)


def test_maximize_lookahead():
  runs = ascent_and_descent(
    lambda: optax.lookahead(optax.sgd(0.2), sync_period=3, slow_step_size=0.5),
    start=optax.LookaheadParams.init_synced(jnp.zeros(3)),
    grad_at=lambda params: params.fast,
    evaluate=lambda state, params: params.slow,
  )
  assert_ascends_as_descent_on_negation(runs)


@pytest.mark.parametrize(
  "inside", [False, True], ids=["maximize-of-multisteps", "multisteps-of-maximize"]
)
def test_maximize_multisteps(inside):
  def multisteps(tx):
    return optax.MultiSteps(tx, every_k_schedule=3)

  if inside:
    ascent = multisteps(gax.maximize(optax.adam(0.3))).gradient_transformation()
  else:
    ascent = gax.maximize(multisteps(optax.adam(0.3)))  # the MultiSteps object itself
  descent = multisteps(optax.adam(0.3)).gradient_transformation()
  ascent_run, descent_run = run(ascent, bowl, 30), run(descent, negated_bowl, 30)
  if inside:
    # MultiSteps outside maximize accumulates the caller's gradient: the negation's.
    descent_run = [(p, u, s._replace(acc_grads=-s.acc_grads), j) for p, u, s, j in descent_run]
  assert_ascends_as_descent_on_negation((ascent_run, descent_run))


def test_maximize_apply_if_finite_skips_a_non_finite_step():
  def make():
    return optax.apply_if_finite(optax.adam(0.3), max_consecutive_errors=3)

  def corrupt(k, grads):
    return grads.at[0].set(jnp.nan) if k == 4 else grads

  runs = ascent_and_descent(make, corrupt=corrupt)
  assert_ascends_as_descent_on_negation(runs)
  ascent = runs[0]
  np.testing.assert_array_equal(ascent[4][0], ascent[3][0])  # the NaN step was skipped
  assert int(ascent[-1][2].total_notfinite) == 1


# --- the objective in update's extra arguments (value, grad, value_fn, obj_fn, grad_fn) ----


def test_maximize_hands_hutchinson_the_losss_curvature():
  # obj = -sum((x - 1)^2): the loss -obj has Hessian 2 I, so the diagonal estimate is 2.
  def objective(x):
    return -jnp.sum((x - 1.0) ** 2)

  estimator = gax.maximize(optax.contrib.hutchinson_estimator_diag_hessian())
  x = jnp.zeros(3)
  estimate, _ = estimator.update(jax.grad(objective)(x), estimator.init(x), x, obj_fn=objective)
  np.testing.assert_array_equal(estimate, [2.0, 2.0, 2.0])


@pytest.mark.slow  # 12 s
def test_maximize_sophia():
  def make():
    return optax.contrib.sophia(0.05, gamma=1.0, clip_threshold=10.0, update_interval=1)

  runs = ascent_and_descent(make, steps=40, extra=lambda f, x: {"obj_fn": f})
  assert_ascends_as_descent_on_negation(runs)


VALUE_OPTIMIZERS = {
  "polyak_sgd": lambda: optax.polyak_sgd(max_learning_rate=0.5),
  "momo": lambda: optax.contrib.momo(0.5),
  "momo_adam": lambda: optax.contrib.momo_adam(0.5),
}


@pytest.mark.slow  # 2 s or more on 2 cores
@pytest.mark.parametrize("name", sorted(VALUE_OPTIMIZERS))
def test_maximize_optimizers_that_take_the_value(name):
  runs = ascent_and_descent(VALUE_OPTIMIZERS[name], steps=30, extra=lambda f, x: {"value": f(x)})
  assert_ascends_as_descent_on_negation(runs)


@pytest.mark.parametrize("f_min", [-5.0, 0.0])
def test_maximize_polyak_sgd_f_min_bounds_the_negated_objective(f_min):
  # The objective's maximum is 5. Polyak's step is (value - f_min) / |grad|^2 on the
  # value it is handed, -objective: it ascends until the objective reaches -f_min.
  def objective(x):
    return 5.0 + bowl(x)

  tx = gax.maximize(optax.polyak_sgd(max_learning_rate=0.5, f_min=f_min))
  x, update = jnp.zeros(3), jax.jit(tx.update)
  state = tx.init(x)
  for _ in range(50):
    updates, state = update(jax.grad(objective)(x), state, x, value=objective(x))
    x = optax.apply_updates(x, updates)
  assert abs(float(objective(x)) - -f_min) < 1e-3, float(objective(x))


def probe(**used):
  """A transform whose update returns what each extra argument in `used` gives at params."""

  def update_fn(updates, state, params=None, **extra_args):
    del updates
    return {key: call(extra_args[key], params) for key, call in used.items()}, state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def test_maximize_negates_every_objective_argument_and_nothing_else():
  def value_and_aux(x):
    return jnp.sum(x), {"aux": jnp.ones(2)}

  def gradient(x):
    return {"g": 3.0 * x}

  def call(fn, params):
    return fn(params)

  def itself(value, params):
    del params
    return value

  tx = gax.maximize(
    probe(value=itself, grad=itself, value_fn=call, obj_fn=call, grad_fn=call, other=itself)
  )
  x = jnp.array([1.0, 2.0])
  seen, _ = tx.update(
    x,
    tx.init(x),
    x,
    value=5.0,
    grad={"g": x},
    value_fn=jnp.sum,
    obj_fn=value_and_aux,
    grad_fn=gradient,
    other=jnp.array(7.0),
  )
  assert float(seen["value"]) == -5.0
  np.testing.assert_array_equal(seen["grad"]["g"], [-1.0, -2.0])
  assert float(seen["value_fn"]) == -3.0
  value, aux = seen["obj_fn"]
  assert float(value) == -3.0
  np.testing.assert_array_equal(aux["aux"], [1.0, 1.0])  # the aux keeps its sign
  np.testing.assert_array_equal(seen["grad_fn"]["g"], [-3.0, -6.0])
  assert float(seen["other"]) == 7.0


# weight_decay ---------------------------------------------------------------------


@pytest.mark.parametrize("clip_value", [None, 0.5])
def test_weight_decay_enters_the_rms_scaling_after_the_clip(clip_value):
  # h = clip(g, -c, c) - wd * p goes into RMSprop; the NumPy reference is fed that h
  # (computed here) with its own clipping off. The params move, so p changes each step.
  wd = 0.3
  tx = gax.gradient_ascent(0.05, clip_value=clip_value, weight_decay=wd)
  reference = ReferenceGradientAscent(0.05)
  rng = np.random.default_rng(0)
  params = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  state = tx.init(params)
  for _ in range(20):
    grad = rng.normal(scale=2.0, size=(3, 4)).astype(np.float32)
    h = np.asarray(grad, np.float64)
    if clip_value is not None:
      h = np.clip(h, -clip_value, clip_value)
    h = h - wd * np.asarray(params, np.float64)
    updates, state = tx.update(jnp.asarray(grad), state, params)
    (expected,) = reference.step([h])
    # float32 against float64: v sums terms of both signs, so scale atol to the update.
    np.testing.assert_allclose(updates, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    params = optax.apply_updates(params, updates)


def test_weight_decay_pulls_the_maximum_toward_zero():
  # Ascent on -(x - 1)^2 - wd/2 x^2, whose maximum is at 2 / (2 + wd) (< 1, not > 1:
  # the decay shrinks). Start at the objective's own maximum, x = 1.
  wd = 0.5
  tx = gax.gradient_ascent(0.001, weight_decay=wd)
  x = jnp.ones(1)
  state = tx.init(x)
  step = jax.jit(
    lambda x, state: tx.update(jax.grad(lambda x: -jnp.sum((x - 1.0) ** 2))(x), state, x)
  )
  for _ in range(2000):
    updates, state = step(x, state)
    x = optax.apply_updates(x, updates)
  # RMSprop's steps do not shrink to 0 at the optimum; measured: within 2e-3 of it.
  np.testing.assert_allclose(x, 2 / (2 + wd), atol=5e-3)


def stage_types(tx, params=None):
  return [type(stage).__name__ for stage in tx.init(jnp.zeros(2) if params is None else params)]


@pytest.mark.parametrize("off", [None, 0.0, 0, -0.0, np.float64(0.0)])
def test_weight_decay_zero_adds_no_stage(off):
  # The default's state layout is unchanged, so checkpoints of it still restore.
  expected = [
    "FlipSignState",
    "ScaleByAdaptiveRmsState",
    "MomentumState",
    "ScaleByWarmupDecayState",
  ]
  assert stage_types(gax.gradient_ascent()) == expected
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    tx = gax.gradient_ascent(weight_decay=off, weight_decay_mask={"w": False})
  assert stage_types(tx) == expected
  # A mask with weight_decay left out is a forgotten rate: said once, at the caller's
  # line. An explicit 0 (a sweep's "off") is not.
  messages = [str(w.message) for w in caught if w.filename == __file__]
  assert len(messages) == (1 if off is None else 0), messages
  if off is None:
    assert "weight_decay_mask is set but weight_decay is not" in messages[0]


def test_weight_decay_adds_one_stateless_stage_after_the_clip():
  assert stage_types(gax.gradient_ascent(clip_value=1.0, weight_decay=0.1)) == [
    "FlipSignState",
    "EmptyState",
    "EmptyState",
    "ScaleByAdaptiveRmsState",
    "MomentumState",
    "ScaleByWarmupDecayState",
  ]
  # A JAX value cannot be known to be 0 when the optimizer is built: the stage is there.
  assert len(stage_types(gax.gradient_ascent(weight_decay=jnp.asarray(0.0)))) == 5


def test_weight_decay_without_params_says_to_pass_them():
  tx = gax.gradient_ascent(weight_decay=0.1)
  state = tx.init(jnp.ones(2))
  with pytest.raises(ValueError, match=r"call tx.update\(grads, state, params\)") as info:
    tx.update(jnp.ones(2), state)
  # The stage names itself, as every stage does; the note names the optimizer.
  assert str(info.value).startswith("add_decayed_weights: weight_decay > 0")
  assert "raised in a stage of gradient_ascent(...).update" in info.value.__notes__[0]
  # Without weight decay (None, the default, or 0), params stay optional.
  for off in ({}, {"weight_decay": None}, {"weight_decay": 0.0}):
    tx = gax.gradient_ascent(**off)
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


@pytest.mark.slow  # 2 s or more on 2 cores
@pytest.mark.parametrize(
  "mask",
  [{"w": True, "b": False}, lambda params: jax.tree.map(lambda p: p.ndim > 1, params)],
  ids=["pytree", "callable"],
)
def test_weight_decay_mask_spares_the_masked_out_leaves(mask):
  # A flat objective (zero gradient): only the decay moves the params.
  tx = gax.gradient_ascent(0.001, weight_decay=0.1, weight_decay_mask=mask)
  params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full(2, 2.0)}
  state = tx.init(params)
  for _ in range(10):
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params["b"], 2.0)  # not decayed: h = 0 every step
  assert float(jnp.max(params["w"])) < 1.96  # decayed toward 0 (first step alone: -0.0316)
  assert float(jnp.min(params["w"])) > 0.0


@pytest.mark.parametrize(
  "mask", [False, True, np.bool_(False), jnp.asarray(False)], ids=["False", "True", "numpy", "jax"]
)
def test_weight_decay_mask_of_a_single_bool_is_refused(mask):
  # What a callable mask becomes under optax.inject_hyperparams without static_args.
  with pytest.raises(ValueError, match="`weight_decay_mask` must be None, a pytree of bools"):
    gax.gradient_ascent(weight_decay=0.1, weight_decay_mask=mask)


@pytest.mark.parametrize(
  "leaf",
  [0.5, 1, "yes", np.array([True, False]), jnp.asarray(1.0)],
  ids=["float", "int", "str", "bool-array", "float-array"],
)
def test_weight_decay_mask_leaf_that_is_not_one_bool_is_refused_by_its_path(leaf):
  # Read by truthiness, 0.5 and "yes" would decay and 0 would not, silently.
  with pytest.raises(TypeError, match=r"`weight_decay_mask`: the leaf at \['w'\] is .*not a bool"):
    gax.gradient_ascent(weight_decay=0.1, weight_decay_mask={"w": leaf, "b": False})


def test_weight_decay_mask_function_returning_traced_bools_is_refused():
  # A mask must be known when the step is traced; inside jit a comparison of the
  # params' values is not.
  tx = gax.gradient_ascent(
    weight_decay=0.1, weight_decay_mask=lambda p: jax.tree.map(lambda x: jnp.any(x > 0), p)
  )
  params = {"w": jnp.ones(2)}
  with pytest.raises(TypeError, match=r"weight_decay_mask\(params\) returned: the leaf at"):
    jax.jit(tx.update)(params, tx.init(params), params)


@pytest.mark.parametrize(
  "mask", [{"v": True}, lambda params: {"v": True}], ids=["pytree", "callable"]
)
def test_weight_decay_mask_of_another_tree_names_the_mask(mask):
  tx = gax.gradient_ascent(weight_decay=0.1, weight_decay_mask=mask)
  params = {"w": jnp.ones(3), "b": jnp.ones(2)}
  with pytest.raises(ValueError, match="weight_decay_mask does not fit the params") as info:
    tx.update(params, tx.init(params), params)
  assert "PyTreeDef({'v': *})" in str(info.value)
  assert "PyTreeDef({'b': *, 'w': *})" in str(info.value)


def test_weight_decay_keeps_the_gradient_dtype_with_a_float32_rate():
  # A float32 rate times bfloat16 params is float32; the stages after the decay must
  # still see (and return) the gradients' bfloat16.
  tx = optax.inject_hyperparams(gax.gradient_ascent, hyperparam_dtype=jnp.float32)(
    learning_rate=0.01, weight_decay=0.1
  )
  params = jnp.ones(3, jnp.bfloat16)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(jnp.ones(3, jnp.bfloat16), state, params)
  assert updates.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(updates.astype(jnp.float32))))


def test_state_without_weight_decay_is_refused_with_it():
  params = jnp.ones(2)
  state = gax.gradient_ascent().init(params)
  with pytest.raises(ValueError, match="does not belong to this optimizer"):
    gax.gradient_ascent(weight_decay=0.1).update(jnp.ones(2), state, params)
  state = gax.gradient_ascent(weight_decay=0.1).init(params)
  with pytest.raises(ValueError, match="does not belong to this optimizer"):
    gax.gradient_ascent().update(jnp.ones(2), state, params)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_weight_decay_as_a_python_float_is_not_rounded_to_half_precision(dtype):
  # 1e-8 is 0 in float16; 1e-8 * 1000 is not. As the learning rate, the decay's
  # term is computed in float32, whether the rate is a Python float or a JAX one.
  params = jnp.full(2, 1000.0, dtype)
  updates = []
  for rate in (1e-8, jnp.float32(1e-8)):
    tx = gax.gradient_ascent(weight_decay=rate)
    updates.append(tx.update(jnp.zeros(2, dtype), tx.init(params), params)[0])
  assert float(updates[0][0]) < 0
  np.testing.assert_array_equal(updates[0], updates[1])


def test_clip_and_weight_decay_states_have_one_layout():
  # As "What happens when" says: each adds one stage with an empty state, so the
  # state of one is taken by the other (and holds the same arrays in the same places).
  params = jnp.ones(2)
  clipped, decayed = gax.gradient_ascent(clip_value=1.0), gax.gradient_ascent(weight_decay=0.1)
  state = clipped.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(decayed.init(params))
  _, after = decayed.update(jnp.ones(2), state, params)
  assert int(after[-1].count) == 1


def _flat_objective_path(weight_decay, steps=1000, **hyperparams):
  """A weight of 1.0 under zero gradients: only the decay moves it."""
  tx = gax.gradient_ascent(learning_rate=1e-3, weight_decay=weight_decay, **hyperparams)

  def step(carry, _):
    params, state = carry
    updates, state = tx.update(jnp.zeros(1), state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), params[0]

  params = jnp.ones(1)
  return np.asarray(jax.lax.scan(step, (params, tx.init(params)), length=steps)[1])


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_weight_decay_on_a_flat_objective_shrinks_at_a_speed_set_by_the_rate(momentum):
  # The RMS scaling divides the decay term by its own size, so weight_decay cancels
  # (docs/guide/hyperparameters.md). Measured over 1000 steps, the largest gap to
  # weight_decay=1: 1.5e-3 (1e-4), 1.5e-5 (1e-2), 1.6e-7 (100); 0.13 for 1e-6,
  # where weight_decay * |p| nears eps.
  reference = _flat_objective_path(1.0, momentum=momentum)
  for weight_decay, atol in ((1e-4, 5e-3), (1e-2, 1e-4), (100.0, 1e-5)):
    np.testing.assert_allclose(
      _flat_objective_path(weight_decay, momentum=momentum),
      reference,
      atol=atol,
      err_msg=f"weight_decay={weight_decay}",
    )
  # First step: -lr * h / sqrt((1 - beta) h**2) = -1e-3 / sqrt(1e-3), for any h = -wd * 1.
  np.testing.assert_allclose(reference[0], 1.0 - 1e-3 / np.sqrt(1e-3), rtol=1e-6)
  if momentum:  # measured: -0.0037 after 100 steps, 8.6e-6 after 200
    assert abs(reference[99]) < 0.01 and abs(reference[199]) < 1e-4
  else:  # measured: 0.4835 after 100 steps, 0.0061 after 1000
    np.testing.assert_allclose(reference[[99, 999]], [0.4835, 0.0061], rtol=0.01)


@pytest.mark.parametrize("mask", [True, False])
def test_a_lone_bool_mask_is_told_to_pass_none_or_leave_decay_out(mask):
  with pytest.raises(ValueError, match="got a single bool") as error:
    gax.gradient_ascent(weight_decay=0.1, weight_decay_mask=mask)
  message = str(error.value)
  fix = "To decay every leaf, pass None (the default); to decay none, leave weight_decay out."
  assert fix in message
  assert message.index(fix) < message.index("inject_hyperparams")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
  ("params", "expected"),
  [
    ({"w": jnp.float32(5.0)}, r"params\['w'\] has shape \(\), but its gradient has shape \(2,\)"),
    ({"w": jnp.ones(1)}, r"params\['w'\] has shape \(1,\), but its gradient has shape \(2,\)"),
    ({"w": jnp.ones((3, 2))}, r"params\['w'\] has shape \(3, 2\)"),
    ({"w": jnp.ones(3)}, r"params\['w'\] has shape \(3,\)"),
    ({"w": jnp.ones(2), "b": jnp.ones(1)}, "the params do not have the gradients' tree"),
  ],
  ids=["scalar", "one", "matrix", "three", "extra-leaf"],
)
def test_weight_decay_params_of_another_shape_or_tree_are_refused(params, expected, jit):
  # Broadcast silently before (the moments took the params' shape), or a bare JAX error.
  tx = gax.gradient_ascent(learning_rate=0.1, weight_decay=0.1)
  state = tx.init({"w": jnp.ones(2)})
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError, match=expected) as error:
    update({"w": jnp.ones(2)}, state, params)
  assert "tx.update(grads, state, params)" in str(error.value)


@pytest.mark.parametrize(
  "make", [gax.gradient_ascent, lambda: gax.maximize(optax.adam(1e-3))], ids=["ga", "maximize"]
)
def test_repr_names_the_public_optax_type(make):
  tx = make()
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  assert repr(tx).startswith("GradientTransformationExtraArgs(init=<function ")
  assert "_Ascending" not in repr(tx)
