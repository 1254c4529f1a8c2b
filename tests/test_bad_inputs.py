"""What happens on bad or extreme inputs: one test per row of the README table
"What happens when…"."""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from tests._reference import ReferenceGradientAscent

INT32_MAX = 2**31 - 1
LR, MOMENTUM, BETA = 0.01, 0.9, 0.999  # the defaults
EPS = 1e-8


def first_step(h):
  """The first update: m_1 = (1-beta) h^2, s_1 = h / (sqrt(m_1) + eps), v_1 = s_1."""
  return LR * h / (math.sqrt(1 - BETA) * abs(h) + EPS)


FIRST_STEP = first_step(1.0)


def quiet(**kwargs):
  return gax.gradient_ascent(**{"logging_interval": None, **kwargs})


# Invalid hyperparameters: tests/test_validation.py.


# Mismatched gradients ---------------------------------------------------------

PARAMS = {"w": jnp.zeros(3), "b": jnp.zeros(2)}


@pytest.mark.parametrize(
    ("grads", "what"),
    [
        ({"w": jnp.zeros(3)}, "structs"),
        ({"w": jnp.zeros(3), "c": jnp.zeros(2)}, "structs"),
        ({"w": jnp.zeros(4), "b": jnp.zeros(2)}, r"'w': shapes: \(4,\) != \(3,\)"),
        ({"w": jnp.zeros(3, jnp.float16), "b": jnp.zeros(2)}, "'w': types: float16 != float32"),
    ],
    ids=["missing-leaf", "renamed-leaf", "shape", "dtype"],
)
@pytest.mark.parametrize("jit", [False, True])
def test_mismatched_gradients_raise_value_error(grads, what, jit):
  tx = quiet()
  state = tx.init(PARAMS)
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError, match=what) as error:
    update(grads, state)
  assert "tree 0 is the gradients, tree 1 the state" in str(error.value)


# A state that init did not make for this optimizer ----------------------------


def test_update_with_none_state_says_to_call_init():
  tx = quiet()
  with pytest.raises(ValueError, match=r"gradient_ascent: .*got None") as error:
    tx.update(PARAMS, None, PARAMS)
  assert "call state = tx.init(params)" in str(error.value)


def adam_state(params):
  return optax.adam(1e-3).init(params)


def wrapped_in(wrap):
  return lambda **kwargs: wrap(quiet(**kwargs))


STATE_MISMATCHES = {
    # (tx that made the state, tx that gets it, what the message says was found)
    "clip-into-logging": (
        lambda: quiet(clip_value=1.0), lambda: gax.gradient_ascent(logging_interval=10),
        "got (FlipSignState, EmptyState, ScaleByAdaptiveRmsState"),
    "logging-into-clip": (
        lambda: gax.gradient_ascent(logging_interval=10), lambda: quiet(clip_value=1.0),
        "got (LogProgressState, "),
    "adam": (lambda: optax.adam(1e-3), quiet, "got (ScaleByAdamState, EmptyState)"),
    "inject_hyperparams-into-plain": (
        lambda: optax.inject_hyperparams(gax.gradient_ascent)(logging_interval=None), quiet,
        "got InjectStatefulHyperparamsState"),
    "multisteps-inner": (
        lambda: optax.MultiSteps(quiet(clip_value=1.0), 2).gradient_transformation(),
        lambda: optax.MultiSteps(quiet(), 2).gradient_transformation(),
        "got (FlipSignState, EmptyState, "),
    "apply_if_finite-inner": (
        lambda: optax.apply_if_finite(quiet(clip_value=1.0), 3),
        lambda: optax.apply_if_finite(quiet(), 3),
        "got (FlipSignState, EmptyState, "),
}


@pytest.mark.parametrize("name", sorted(STATE_MISMATCHES))
@pytest.mark.parametrize("jit", [False, True])
def test_state_of_another_optimizer_names_gradient_ascent(name, jit):
  made_by, used_by, found = STATE_MISMATCHES[name]
  state = made_by().init(PARAMS)
  update = used_by().update
  with pytest.raises(ValueError, match=r"^gradient_ascent: the optimizer state does not "
                     r"belong to this optimizer\. Expected .* a tuple of \(") as error:
    (jax.jit(update) if jit else update)(PARAMS, state, PARAMS)
  message = str(error.value)
  assert found in message
  assert "call state = tx.init(params)" in message


def test_state_of_another_accumulator_dtype_is_refused():
  made = quiet(accumulator_dtype=jnp.float32).init(PARAMS)
  tx = quiet(accumulator_dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="holds float32 moments, but this optimizer was "
                     "built with accumulator_dtype=bfloat16") as error:
    tx.update(PARAMS, made, PARAMS)
  assert "tx.init(params)" in str(error.value)


def test_state_of_nesterov_and_other_hyperparameters_is_accepted():
  """Same stages, same state: only what the stages compute from it differs."""
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([1.0, -2.0, 0.5])}
  made_by = quiet(nesterov=True, beta=0.9, learning_rate=0.1)
  _, state = made_by.update(grads, made_by.init(params), params)
  updates, _ = quiet().update(grads, state, params)
  # Heavy ball on the Nesterov velocity: v = 0.9 v_1 + s_2 with v_1 = s_1.
  m1 = 0.1 * np.asarray(grads["w"]) ** 2
  m2 = BETA * m1 + (1 - BETA) * np.asarray(grads["w"]) ** 2
  v = MOMENTUM * grads["w"] / np.sqrt(m1) + grads["w"] / np.sqrt(m2)
  np.testing.assert_allclose(updates["w"], LR * v, rtol=1e-5)


def test_errors_inside_a_stage_say_they_come_from_gradient_ascent():
  tx = quiet()
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="scale_by_adaptive_rms: the gradients do not match") as error:
    tx.update({"w": jnp.zeros(4), "b": jnp.zeros(2)}, state)
  assert any("gradient_ascent" in note for note in getattr(error.value, "__notes__", []))


# Non-floating leaves ----------------------------------------------------------


@pytest.mark.parametrize(
    "leaf",
    [jnp.zeros(2, jnp.int32), jnp.zeros(2, bool), jnp.zeros(2, jnp.complex64), 3],
    ids=["int32", "bool", "complex64", "python-int"],
)
def test_non_float_leaf_raises_type_error_naming_path(leaf):
  params = {"w": jnp.zeros(2), "layer": {"count": leaf}}
  with pytest.raises(TypeError, match=r"\['layer'\]\['count'\]") as error:
    quiet().init(params)
  assert jnp.result_type(leaf).name in str(error.value)


@pytest.mark.parametrize(
    ("leaf", "dtype"),
    [
        (np.array([object()]), "object"),
        (np.array(["a"]), "<U1"),
        (np.str_("x"), "<U1"),
        (np.datetime64("2020"), "datetime64[Y]"),
    ],
    ids=["object-array", "str-array", "numpy-str", "datetime64"],
)
def test_numpy_leaf_of_a_dtype_jax_lacks_raises_type_error_naming_path(leaf, dtype):
  params = {"w": jnp.zeros(2), "layer": {"count": leaf}}
  with pytest.raises(TypeError, match=r"parameter \['layer'\]\['count'\] has dtype") as error:
    quiet().init(params)
  assert f"has dtype {dtype};" in str(error.value)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize(
    "make",
    [
        quiet,
        lambda: quiet(accumulator_dtype=jnp.float32),
        gax.scale_by_adaptive_rms,
        gax.momentum,
    ],
    ids=["gradient_ascent", "float32-state", "scale_by_adaptive_rms", "momentum"],
)
def test_float8_leaf_raises_type_error_at_init_naming_path(make, dtype):
  params = {"w": jnp.zeros(2), "layer": {"kernel": jnp.zeros(2, dtype)}}
  with pytest.raises(TypeError, match=r"parameter \['layer'\]\['kernel'\] has dtype") as error:
    make().init(params)
  assert jnp.dtype(dtype).name in str(error.value)
  assert "Keep float32 or bfloat16 parameters" in str(error.value)


@pytest.mark.parametrize(
    "leaf", ["float32", object(), b"1.0"], ids=["str", "object", "bytes"]
)
@pytest.mark.parametrize("make", [quiet, gax.scale_by_adaptive_rms, gax.momentum])
def test_non_array_leaf_raises_type_error_naming_path(make, leaf):
  params = {"w": jnp.zeros(2), "layer": {"name": leaf}}
  with pytest.raises(TypeError, match=r"parameter \['layer'\]\['name'\] must be an array") as error:
    make().init(params)
  assert f"of type {type(leaf).__name__}." in str(error.value)


def test_masked_out_int_leaf_passes_through():
  params = {"w": jnp.zeros(2), "step": jnp.array(7)}
  tx = optax.masked(quiet(), {"w": True, "step": False})
  state = tx.init(params)
  grads = {"w": jnp.ones(2), "step": jnp.array(5)}
  updates, _ = tx.update(grads, state, params)
  assert int(updates["step"]) == 5  # untouched
  np.testing.assert_allclose(updates["w"], FIRST_STEP, rtol=1e-6)


# None / MaskedNode leaves, empty trees ----------------------------------------


def test_none_and_masked_node_leaves_pass_through():
  params = {"w": jnp.zeros(2), "frozen": None, "masked": optax.MaskedNode()}
  grads = {"w": jnp.ones(2), "frozen": None, "masked": optax.MaskedNode()}
  tx = quiet()
  for update in (tx.update, jax.jit(tx.update)):
    updates, state = update(grads, tx.init(params))
    assert updates["frozen"] is None and updates["masked"] == optax.MaskedNode()
    np.testing.assert_allclose(updates["w"], FIRST_STEP, rtol=1e-6)
    assert state[1].second_moment["frozen"] is None


def test_empty_pytree():
  tx = gax.gradient_ascent(logging_interval=1)
  for update in (tx.update, jax.jit(tx.update)):
    state = tx.init({})
    updates, state = update({}, state)
    assert updates == {}
    assert int(state[-1].count) == 1 and int(state[0].count) == 1


# Non-finite gradients ---------------------------------------------------------


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_gradient_without_protection_gives_nan(bad):
  tx = quiet()
  state = tx.init(jnp.zeros(2))
  updates, state = tx.update(jnp.array([bad, 1.0]), state)
  # NaN propagates; inf gives inf / sqrt(inf) = NaN (the second moment then
  # saturates at finfo.max); the other element is fine.
  assert np.isnan(updates[0]) and np.isnan(state[2].velocity[0])
  expected_moment = np.nan if np.isnan(bad) else np.finfo(np.float32).max
  np.testing.assert_array_equal(state[1].second_moment[0], expected_moment)
  np.testing.assert_allclose(updates[1], FIRST_STEP, rtol=1e-6)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_apply_if_finite_protects_params_and_state(bad):
  tx = optax.apply_if_finite(quiet(), max_consecutive_errors=3)
  params = jnp.zeros(2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  updates, state = step(jnp.array([1.0, -1.0]), state, params)
  params = optax.apply_updates(params, updates)
  before_params, before_inner = params, state.inner_state

  updates, state = step(jnp.array([bad, 1.0]), state, params)
  params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params, before_params)
  for after, before in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(before_inner), strict=True):
    np.testing.assert_array_equal(after, before)
  assert int(state.notfinite_count) == 1 and int(state.total_notfinite) == 1

  updates, state = step(jnp.array([1.0, -1.0]), state, params)  # recovers
  assert int(state.notfinite_count) == 0 and np.all(np.asarray(updates) != 0)
  assert int(state.inner_state[-1].count) == 2


# Huge gradients -----------------------------------------------------------------


def run_after_huge_gradient(dtype, huge, n_steps, accumulator_dtype=None):
  """One step with gradient [huge, 1], then n_steps of the ordinary gradient [-1, -1].

  Returns the first update, the second moments right after it, the params right
  after it, and per later step: m[0], the update, the params, all-finite flags.
  """
  tx = quiet(accumulator_dtype=accumulator_dtype)
  params = jnp.zeros(2, dtype)
  state = tx.init(params)
  first, state = tx.update(jnp.array([huge, 1.0], dtype), state)
  params = optax.apply_updates(params, first)
  after_huge = (first, state[1].second_moment, params)

  def body(carry, _):
    params, state = carry
    updates, state = tx.update(jnp.full(2, -1.0, dtype), state)
    params = optax.apply_updates(params, updates)
    finite = jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(state)]))
    return (params, state), (state[1].second_moment[0], updates, params, finite)

  _, trace = jax.jit(lambda c: jax.lax.scan(body, c, None, length=n_steps))((params, state))
  return after_huge, [np.asarray(x).astype(np.float64) for x in trace]


@pytest.mark.parametrize(
    ("dtype", "huge", "n_steps", "final_moment_max", "recovered_ratio"),
    [
        # float32: h**2 = 1e60 overflows; the moment saturates at 3.4e38 and
        # decays by beta per step: 0.999**100000 * 3.4e38 = 1e-5, so m -> 1.
        (jnp.float32, 1e30, 100_000, 1.01, 0.99),
        # float16: h**2 fits float32 (where it is computed), m = 3.6e6 is
        # stored saturated at 65504; float16 rounding (spacing 2**-10) stops
        # the 0.001-per-step average short of 1, hence the looser bounds.
        (jnp.float16, 6e4, 30_000, 2.0, 0.5),
    ],
    ids=["float32-1e30", "float16-6e4"],
)
def test_huge_gradient_saturates_then_recovers(dtype, huge, n_steps, final_moment_max,
                                               recovered_ratio):
  (first, moment, params_after), (m0, updates, params, finite) = run_after_huge_gradient(
      dtype, huge, n_steps)
  u = float(jnp.finfo(dtype).eps)
  # The huge step is the ordinary first RMSprop step, not a jump.
  np.testing.assert_allclose(
      np.asarray(first, np.float64), [first_step(float(jnp.asarray(huge, dtype))), FIRST_STEP],
      rtol=2 * u)
  assert float(moment[0]) == float(jnp.finfo(dtype).max)  # saturated, finite
  assert finite.all() and np.isfinite(updates).all() and np.isfinite(params).all()
  assert (np.diff(m0) <= 0).all() and m0[0] < float(jnp.finfo(dtype).max)  # decays
  assert m0[-1] <= final_moment_max
  # The element that saw the huge gradient moves with the ordinary gradient
  # again (down), by far more than the huge step moved it up ...
  assert params[-1, 0] < float(params_after[0]) - 10
  # ... and at nearly the rate of the element that never saw it.
  assert updates[-1, 0] <= recovered_ratio * updates[-1, 1] < 0


def recovery_steps(dtype, huge, limit, accumulator_dtype=None):
  """Steps of the ordinary gradient [-1, -1], after one [huge, 1], until the element
  that saw the huge gradient steps at least half as far as the other one.

  Returns that count (limit if it never did) and the final second moments.
  """
  tx = quiet(accumulator_dtype=accumulator_dtype)
  _, state = tx.update(jnp.array([huge, 1.0], dtype), tx.init(jnp.zeros(2, dtype)))

  def not_recovered(carry):
    k, _, updates = carry
    return (k < limit) & (updates[0].astype(jnp.float32) > 0.5 * updates[1].astype(jnp.float32))

  def step(carry):
    k, state, _ = carry
    updates, state = tx.update(jnp.full(2, -1.0, dtype), state)
    return k + 1, state, updates

  start = (0, state, jnp.array([0.0, -1.0], dtype))
  k, state, _ = jax.jit(lambda c: jax.lax.while_loop(not_recovered, step, c))(start)
  return int(k), np.asarray(state[1].second_moment, np.float64)


@pytest.mark.parametrize(
    ("dtype", "accumulator_dtype", "huge"),
    [
        (jnp.bfloat16, None, 1e38),
        (jnp.float32, jnp.bfloat16, 1e38),
        (jnp.float16, None, 6e4),
        (jnp.float32, jnp.float16, 6e4),
    ],
    ids=["bfloat16", "float32-params-bfloat16-state", "float16-6e4",
         "float32-params-float16-state-6e4"],
)
def test_low_precision_state_recovers_from_a_huge_gradient(dtype, accumulator_dtype, huge):
  """beta * m rounds back to m in bfloat16; the saturated moment must still decay."""
  # The float32 state, fed the same gradient: m_k = beta**k (m_0 - 1) + 1 reaches 4
  # (a step half the ordinary one) after log((m_0 - 1) / 3) / -log(beta) steps; the
  # updates, through momentum 0.9, follow about 1 / (1 - 0.9) = 10 steps later.
  f32_steps, f32_moment = recovery_steps(jnp.float32, huge, 200_000)
  m_0 = min(float(np.finfo(np.float32).max), (1 - BETA) * huge**2)
  assert f32_steps == pytest.approx(math.log((m_0 - 1) / 3) / -math.log(BETA) + 10, abs=5)

  steps, moment = recovery_steps(dtype, huge, 2 * f32_steps, accumulator_dtype)
  assert steps < 2 * f32_steps, f"not recovered in {steps} steps, float32 took {f32_steps}"
  # and, for a constant gradient, the untouched element's average settles where
  # float32's does (rounded to nearest it stopped 4x short in bfloat16, at 0.25).
  np.testing.assert_allclose(moment[1], f32_moment[1], rtol=2**-7)


def test_low_precision_state_warns_and_float32_state_does_not(caplog):
  with caplog.at_level(logging.WARNING, logger="gradient_ascent_jax"):
    quiet().init(jnp.zeros(2, jnp.bfloat16))
  assert any("accumulator_dtype=jnp.float32" in r.getMessage() for r in caplog.records)
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="gradient_ascent_jax"):
    quiet(accumulator_dtype=jnp.float32).init(jnp.zeros(2, jnp.bfloat16))
  assert not caplog.records


@pytest.mark.parametrize(
    ("dtype", "accumulator_dtype", "beta", "fix", "not_said"),
    [
        (jnp.bfloat16, None, 0.999, "accumulator_dtype=jnp.float32", "float64"),
        (jnp.float16, None, 1 - 1e-4, "accumulator_dtype=jnp.float32", "float64"),
        (jnp.float32, None, 1 - 1e-9, "accumulator_dtype=jnp.float64", "accumulator_dtype=jnp.float32"),
        (jnp.bfloat16, jnp.float32, 1 - 1e-9, "accumulator_dtype=jnp.float64",
         "accumulator_dtype=jnp.float32"),
    ],
    ids=["bfloat16", "float16", "float32", "float32-state"],
)
def test_coarse_beta_warning_gives_advice_that_fits(dtype, accumulator_dtype, beta, fix, not_said,
                                                    caplog):
  with caplog.at_level(logging.WARNING, logger="gradient_ascent_jax"):
    quiet(beta=beta, accumulator_dtype=accumulator_dtype).init(jnp.zeros(2, dtype))
  [message] = [r.getMessage() for r in caplog.records]
  assert f"beta={beta} is closer to 1" in message
  assert fix in message and not_said not in message


def test_coarse_beta_warning_for_float64_state_only_asks_for_a_smaller_beta(x64, caplog):
  with caplog.at_level(logging.WARNING, logger="gradient_ascent_jax"):
    quiet(beta=1 - 2**-53).init(jnp.zeros(2, jnp.float64))
  [message] = [r.getMessage() for r in caplog.records]
  assert "float64 state" in message and "1 - beta >= 2.22e-16." in message
  assert "accumulator_dtype" not in message


# Nesterov without momentum ----------------------------------------------------------


@pytest.fixture
def nesterov_warning_not_yet_shown(monkeypatch):
  import threading

  from gradient_ascent_jax._src import transforms

  monkeypatch.setattr(transforms, "_nesterov_without_momentum_warned", threading.Event())


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    "make",
    [lambda: gax.gradient_ascent(momentum=0, nesterov=True),
     lambda: gax.momentum(decay=np.float32(0.0), nesterov=True)],
    ids=["gradient_ascent", "momentum"],
)
def test_nesterov_without_momentum_warns_once(make, nesterov_warning_not_yet_shown, caplog):
  with caplog.at_level(logging.WARNING, logger="gradient_ascent_jax"):
    make()
    make()
  [message] = _warnings(caplog)
  assert "nesterov=True has no effect with momentum 0" in message
  assert "nesterov=False" in message and "0.9" in message


@pytest.mark.parametrize(
    "kwargs",
    [dict(momentum=0.9, nesterov=True), dict(momentum=0.0, nesterov=False),
     dict(momentum=jnp.asarray(0.0), nesterov=True)],  # injected: may be a schedule
    ids=["with-momentum", "no-nesterov", "jax-array"],
)
def test_no_nesterov_warning_when_it_has_an_effect_or_is_unknown(
    kwargs, nesterov_warning_not_yet_shown, caplog
):
  with caplog.at_level(logging.WARNING, logger="gradient_ascent_jax"):
    gax.gradient_ascent(**kwargs)
  assert _warnings(caplog) == []


# Zero gradients -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_all_zero_gradients_give_zero_updates(dtype):
  tx = quiet(nesterov=True, clip_value=1.0, warmup_steps=2, lr_decay=0.9)
  params = {"w": jnp.zeros((2, 3), dtype), "b": jnp.zeros((), dtype)}
  state = tx.init(params)
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state)
    for leaf in jax.tree.leaves((updates, state[:-1])):
      np.testing.assert_array_equal(np.asarray(leaf, np.float64), 0.0)  # no NaN: 0/(0+eps)


# Step counter at the int32 maximum ------------------------------------------------


def with_count(state, count):
  count = jnp.asarray(count, jnp.int32)
  return tuple(
      s._replace(count=count) if isinstance(s, (gax.ScaleByWarmupDecayState,
                                                gax.LogProgressState)) else s
      for s in state
  )


@pytest.mark.parametrize(
    ("lr_decay", "expected_rate"),
    # warmup factor min(1, 2**31 / 100) = 1; 0.5**(2**31 - 1) underflows to 0.
    [(None, LR), (1.0, LR), (0.5, 0.0)],
)
def test_step_counter_saturates_at_int32_max(lr_decay, expected_rate):
  tx = gax.gradient_ascent(lr_decay=lr_decay, warmup_steps=100, logging_interval=1000)
  params = jnp.zeros(2)
  state = with_count(tx.init(params), INT32_MAX - 1)
  step = jax.jit(tx.update)
  for _ in range(3):  # INT32_MAX - 1 -> INT32_MAX -> stays there
    updates, state = step(jnp.array([1.0, -1.0]), state, params)
    assert np.isfinite(np.asarray(updates)).all()
  assert int(state[0].count) == INT32_MAX and int(state[-1].count) == INT32_MAX
  rate = gax.warmup_decay_schedule(LR, 100, lr_decay)(state[-1].count)
  assert np.isfinite(float(rate))
  np.testing.assert_allclose(float(rate), expected_rate, rtol=1e-6)
  # Third step, |h| = 1: m_t = 1 - beta**t, s_t = 1 / sqrt(m_t), v_3 = .81 s_1 + .9 s_2 + s_3.
  s = [1 / (math.sqrt(1 - BETA**t) + EPS) for t in (1, 2, 3)]
  v = MOMENTUM**2 * s[0] + MOMENTUM * s[1] + s[2]
  np.testing.assert_allclose(np.asarray(updates), expected_rate * v * np.array([1, -1]),
                             rtol=1e-5)


# bf16 params with float32 state ------------------------------------------------------


def test_bfloat16_params_with_float32_state():
  tx = quiet(accumulator_dtype=jnp.float32)
  params = {"w": jnp.zeros(4, jnp.bfloat16)}
  state = tx.init(params)
  assert state[1].second_moment["w"].dtype == jnp.float32
  assert state[2].velocity["w"].dtype == jnp.float32
  grads = {"w": jnp.array([0.5, -2.0, 3.0, 1e-3], jnp.bfloat16)}
  m = np.zeros(4)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    assert updates["w"].dtype == jnp.bfloat16
    # The float32 moment tracks the float64 recursion m = beta m + (1-beta) g^2.
    m = BETA * m + (1 - BETA) * np.asarray(grads["w"], np.float64) ** 2
    np.testing.assert_allclose(state[1].second_moment["w"], m, rtol=1e-6)
  # With bf16 state the same moments are off by bf16 rounding (about 2**-9).
  bf16_tx = quiet()
  bf16_state = bf16_tx.init(params)
  for _ in range(3):
    _, bf16_state = bf16_tx.update(grads, bf16_state, params)
  assert bf16_state[1].second_moment["w"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16_state[1].second_moment["w"], np.float64), m,
                             rtol=2**-7)


# Tiny float16 gradients ---------------------------------------------------------------


def test_tiny_float16_gradient_gives_ordinary_step():
  """(1 - beta) h**2 = 1e-9 underflows float16 state, yet the step is ordinary."""
  tx = quiet()
  params = jnp.zeros(3, jnp.float16)
  grads = jnp.array([1e-3, -1e-4, 2e-2], jnp.float16)
  updates, state = tx.update(grads, tx.init(params))
  h = np.asarray(grads, np.float64)
  np.testing.assert_allclose(np.asarray(updates, np.float64), [first_step(x) for x in h],
                             rtol=2**-9)
  # The stored float16 moments of the two small ones underflow to 0; v stays finite.
  np.testing.assert_array_equal(np.asarray(state[1].second_moment[:2], np.float64), 0.0)
  assert np.isfinite(np.asarray(state[2].velocity, np.float64)).all()


# h**2 overflows, m_t does not --------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_square_overflows_but_moment_fits(dtype):
  """beta = 0.5, h = 2.3e19: h**2 = 5.3e38 overflows float32, m_1 = 2.6e38 fits."""
  tx = quiet(beta=0.5, momentum=0.0)
  params = jnp.zeros(2, dtype)
  grads = jnp.array([2.3e19, 1.0], dtype)
  updates, state = tx.update(grads, tx.init(params))
  h = np.asarray(grads, np.float64)
  u = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(np.asarray(state[1].second_moment, np.float64), 0.5 * h**2,
                             rtol=2 * u)
  # s = h / sqrt(0.5 h**2) = sqrt(2), the ordinary first step for beta = 0.5.
  np.testing.assert_allclose(np.asarray(updates, np.float64), LR * math.sqrt(2), rtol=2 * u)


# Non-array gradient leaves ----------------------------------------------------------


@pytest.mark.parametrize("leaf", ["1.0", object(), b"1"], ids=["str", "object", "bytes"])
@pytest.mark.parametrize(
    ("make", "transform"),
    [
        (quiet, "flip_sign"),
        (gax.flip_sign, "flip_sign"),
        (lambda: gax.clip_by_value(1.0), "clip_by_value"),
        (gax.scale_by_adaptive_rms, "scale_by_adaptive_rms"),
        (gax.momentum, "momentum"),
    ],
    ids=["gradient_ascent", "flip_sign", "clip_by_value", "scale_by_adaptive_rms", "momentum"],
)
def test_non_array_gradient_leaf_raises_type_error_naming_path(make, transform, leaf):
  params = {"w": jnp.zeros(2), "b": jnp.zeros(())}
  tx = make()
  state = tx.init(params)
  grads = {"w": jnp.ones(2), "b": leaf}
  with pytest.raises(TypeError, match=rf"{transform}: gradient \['b'\] must be an array"):
    tx.update(grads, state, params)


# A small Python-float learning rate with float16 params ------------------------------


@pytest.mark.parametrize("warmup_steps", [0, 1])
def test_small_learning_rate_is_not_rounded_to_float16(warmup_steps):
  lr = 1e-8  # 0 in float16 (smallest subnormal 6e-8); the update lr * s = 3.2e-7 is not
  tx = quiet(learning_rate=lr, warmup_steps=warmup_steps)
  params = jnp.zeros(2, jnp.float16)
  updates, _ = jax.jit(tx.update)(jnp.array([1.0, -1.0], jnp.float16), tx.init(params), params)
  assert updates.dtype == jnp.float16
  expected = FIRST_STEP / LR * lr * np.array([1.0, -1.0])
  np.testing.assert_allclose(np.asarray(updates, np.float64), expected, rtol=0, atol=2**-24)


# eps below the smallest normal float32 --------------------------------------------


@pytest.mark.parametrize("eps", [1e-46, 1e-40])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
    "make", [quiet, gax.scale_by_adaptive_rms], ids=["gradient_ascent", "scale_by_adaptive_rms"]
)
def test_eps_that_vanishes_in_float32_is_rejected_at_init(make, dtype, eps):
  with pytest.raises(ValueError, match=r"`eps` must be >= 1.18e-38 for float32") as error:
    make(eps=eps).init(jnp.zeros(2, dtype))
  assert "0 / 0 = NaN" in str(error.value)


def test_tiny_eps_is_fine_in_float64(x64):
  tx = quiet(eps=1e-300)
  params = jnp.zeros(2, jnp.float64)
  updates, _ = tx.update(jnp.array([1.0, 0.0]), tx.init(params), params)
  np.testing.assert_array_equal(np.isnan(np.asarray(updates)), [False, False])
  assert updates[1] == 0


# clip_value below the smallest number of the gradient dtype -----------------------


@pytest.mark.parametrize(
    ("dtype", "clip_value", "smallest"),
    [(jnp.float16, 1e-8, "5.96e-08"), (jnp.float32, 1e-46, "1.4e-45"),
     (jnp.bfloat16, 1e-46, "9.18e-41")],
)
@pytest.mark.parametrize(
    "make", [lambda c: quiet(clip_value=c), gax.clip_by_value], ids=["gradient_ascent", "clip"]
)
def test_clip_value_that_rounds_to_zero_is_rejected_when_traced(make, dtype, clip_value, smallest):
  tx = make(clip_value)
  params = jnp.zeros(2, dtype)
  with pytest.raises(ValueError, match=f"`clip_value` must be >= {smallest} for") as error:
    jax.jit(tx.update)(jnp.ones(2, dtype), tx.init(params), params)
  assert jnp.dtype(dtype).name in str(error.value)


def test_clip_value_at_the_smallest_float16_still_clips():
  tx = gax.clip_by_value(2.0**-24)  # the smallest float16 subnormal
  updates, _ = tx.update(jnp.array([1.0, -1.0], jnp.float16), tx.init(None))
  np.testing.assert_array_equal(np.asarray(updates, np.float64), [2.0**-24, -(2.0**-24)])


def test_clip_by_value_still_clips_integer_updates():
  tx = gax.clip_by_value(2.0)
  updates, _ = tx.update(jnp.array([3, -5, 1]), tx.init(None))
  np.testing.assert_array_equal(updates, [2, -2, 1])


# Complex numbers --------------------------------------------------------------

COMPLEX_GRADS = {"layer": {"w": jnp.array([3.0 + 4.0j, 12.0j], jnp.complex64)}}
REAL_PARAMS = {"layer": {"w": jnp.zeros(2)}}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
    ("make", "transform"),
    [
        (lambda: gax.clip_by_value(1.0), "clip_by_value"),
        (lambda: gax.scale_by_adaptive_rms(), "scale_by_adaptive_rms"),
        (lambda: gax.scale_by_adaptive_rms(accumulator_dtype=jnp.float32), "scale_by_adaptive_rms"),
        (lambda: gax.momentum(), "momentum"),
        (lambda: gax.momentum(accumulator_dtype=jnp.float32), "momentum"),
        (lambda: quiet(clip_value=1.0, accumulator_dtype=jnp.float32), "clip_by_value"),
        (lambda: quiet(accumulator_dtype=jnp.float32), "scale_by_adaptive_rms"),
    ],
    ids=["clip", "rms", "rms-float32-state", "momentum", "momentum-float32-state",
         "gradient_ascent-clip", "gradient_ascent"],
)
def test_complex_gradient_raises_type_error_naming_transform_and_path(make, transform, jit):
  # clip_by_value raised "TypeError: float() argument must be a string or a real
  # number, not 'complex'"; with accumulator_dtype set, momentum silently dropped
  # the imaginary part and scale_by_adaptive_rms failed inside jnp.hypot.
  tx = make()
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(TypeError, match=rf"^{transform}: gradient \['layer'\]\['w'\] is complex") as error:
    update(COMPLEX_GRADS, tx.init(REAL_PARAMS))
  assert "optax.contrib.split_real_and_imaginary(gax.gradient_ascent(...))" in str(error.value)


def test_complex_params_raise_type_error_at_init_naming_the_fix():
  with pytest.raises(TypeError, match=r"parameter \['layer'\]\['w'\] has dtype complex64") as error:
    quiet().init({"layer": {"w": jnp.zeros(2, jnp.complex64)}})
  assert "optax.contrib.split_real_and_imaginary(gax.gradient_ascent(...))" in str(error.value)


def test_linear_stages_work_on_complex_updates(caplog):
  # flip_sign and scale_by_warmup_decay are linear: defined for complex numbers.
  caplog.set_level(logging.INFO, logger="gradient_ascent_jax")
  for tx, factor in [(gax.flip_sign(), -1.0), (gax.scale_by_warmup_decay(0.5, 2), -0.25)]:
    updates, _ = tx.update(COMPLEX_GRADS, tx.init(COMPLEX_GRADS))
    assert updates["layer"]["w"].dtype == jnp.complex64
    np.testing.assert_allclose(updates["layer"]["w"], factor * np.array([3 + 4j, 12j]), rtol=1e-6)
  # log_progress passes them through and logs sqrt(|3+4i|**2 + |12i|**2) = 13.
  tx = gax.log_progress(1, 0.1)
  updates, _ = tx.update(COMPLEX_GRADS, tx.init(COMPLEX_GRADS))
  assert updates is COMPLEX_GRADS
  [record] = [r for r in caplog.records if r.name == "gradient_ascent_jax"]
  np.testing.assert_allclose(record.grad_norm, 13.0, rtol=1e-6)


def test_maximize_of_a_complex_capable_optimizer_descends_on_the_negated_gradient():
  params = {"z": jnp.array([1.0 + 2.0j, -0.5j], jnp.complex64)}
  grads = {"z": jnp.array([0.3 - 1.0j, 2.0 + 0.5j], jnp.complex64)}
  tx = gax.maximize(optax.adam(0.1))
  state = tx.init(params)
  reference, reference_state = optax.adam(0.1), optax.adam(0.1).init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    expected, reference_state = reference.update(jax.tree.map(jnp.negative, grads), reference_state, params)
    np.testing.assert_allclose(updates["z"], expected["z"], rtol=1e-6)


def test_split_real_and_imaginary_runs_gradient_ascent_on_both_parts():
  # The fix the complex errors name: real and imaginary parts as two real
  # parameters, against the float64 NumPy reference on those parts.
  z = jnp.array([1.0 + 2.0j, -0.5 + 0.25j], jnp.complex64)
  grads = [jnp.array([0.3 - 1.0j, 2.0 + 0.5j]), jnp.array([-1.0 + 0.1j, 0.5 - 3.0j])]
  tx = optax.contrib.split_real_and_imaginary(gax.gradient_ascent(0.1, clip_value=1.5))
  state = tx.init(z)
  reference = ReferenceGradientAscent(0.1, clip_value=1.5)
  for g in grads * 2:
    updates, state = tx.update(g.astype(jnp.complex64), state, z)
    z = optax.apply_updates(z, updates)
    real, imaginary = reference.step([np.real(g), np.imag(g)])
    np.testing.assert_allclose(updates, real + 1j * imaginary, rtol=2e-5)
