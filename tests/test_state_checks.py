"""The init and update checks (gradient_ascent_jax/_src/state_checks.py).

Gradients that do not match the state, a state that init did not make for
this optimizer, leaves that are not real floating arrays (integer, non-array,
complex), a beta too coarse for the state's dtype, an eps that flushes to 0.
"""

from __future__ import annotations

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from tests._reference import BETA
from tests._reference import FIRST_STEP
from tests._reference import LR
from tests._reference import MOMENTUM


def quiet(**kwargs):
  return gax.gradient_ascent(**{"logging_interval": None, **kwargs})


# Mismatched gradients ---------------------------------------------------------

PARAMS = {"w": jnp.zeros(3), "b": jnp.zeros(2)}


@pytest.mark.parametrize(
  ("grads", "what"),
  [
    ({"w": jnp.zeros(3)}, "structs"),
    ({"w": jnp.zeros(3), "c": jnp.zeros(2)}, "structs"),
    ({"w": jnp.zeros(4), "b": jnp.zeros(2)}, r"'w': shapes: \(4,\) != \(3,\)"),
    (
      {"w": jnp.zeros(3, jnp.float16), "b": jnp.zeros(2)},
      r"the gradient \['w'\] is float16, but the optimizer state holds its moment in float32",
    ),
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
  if grads["w"].dtype == jnp.float32:
    assert "tree 0 is the gradients, tree 1 the state" in str(error.value)
  else:
    assert "pass gradients in the dtypes of the params that init was given" in str(error.value)


# A state that init did not make for this optimizer ----------------------------


def test_update_with_none_state_says_to_call_init():
  tx = quiet()
  with pytest.raises(ValueError, match=r"gradient_ascent: .*got None") as error:
    tx.update(PARAMS, None, PARAMS)
  assert "call state = tx.init(params)" in str(error.value)


STATE_MISMATCHES = {
  # (tx that made the state, tx that gets it, what the message says was found)
  "clip-into-logging": (
    lambda: quiet(clip_value=1.0),
    lambda: gax.gradient_ascent(logging_interval=10),
    "got (FlipSignState, EmptyState, ScaleByAdaptiveRmsState",
  ),
  "logging-into-clip": (
    lambda: gax.gradient_ascent(logging_interval=10),
    lambda: quiet(clip_value=1.0),
    "got (LogProgressState, ",
  ),
  "adam": (lambda: optax.adam(1e-3), quiet, "got (ScaleByAdamState, EmptyState)"),
  "inject_hyperparams-into-plain": (
    lambda: optax.inject_hyperparams(gax.gradient_ascent)(logging_interval=None),
    quiet,
    "got InjectStatefulHyperparamsState",
  ),
  "multisteps-inner": (
    lambda: optax.MultiSteps(quiet(clip_value=1.0), 2).gradient_transformation(),
    lambda: optax.MultiSteps(quiet(), 2).gradient_transformation(),
    "got (FlipSignState, EmptyState, ",
  ),
  "apply_if_finite-inner": (
    lambda: optax.apply_if_finite(quiet(clip_value=1.0), 3),
    lambda: optax.apply_if_finite(quiet(), 3),
    "got (FlipSignState, EmptyState, ",
  ),
}


@pytest.mark.parametrize("name", sorted(STATE_MISMATCHES))
@pytest.mark.parametrize("jit", [False, True])
def test_state_of_another_optimizer_names_gradient_ascent(name, jit):
  made_by, used_by, found = STATE_MISMATCHES[name]
  state = made_by().init(PARAMS)
  update = used_by().update
  with pytest.raises(
    ValueError,
    match=r"^gradient_ascent: the optimizer state does not "
    r"belong to this optimizer\. Expected .* a tuple of \(",
  ) as error:
    (jax.jit(update) if jit else update)(PARAMS, state, PARAMS)
  message = str(error.value)
  assert found in message
  # Both ways on: the run's own settings, or a new run.
  assert "To go on with that run, build tx as it was built (logging on or off" in message
  assert "to start a new run, call state = tx.init(params)" in message


def test_state_of_another_accumulator_dtype_is_refused():
  made = quiet(accumulator_dtype=jnp.float32).init(PARAMS)
  tx = quiet(accumulator_dtype=jnp.bfloat16)
  with pytest.raises(
    ValueError,
    match="holds float32 moments, but this optimizer was built with accumulator_dtype=bfloat16",
  ) as error:
    tx.update(PARAMS, made, PARAMS)
  assert "tx.init(params)" in str(error.value)
  assert "to go on with that run, build tx as it was built" in str(error.value)


@pytest.mark.parametrize(
  ("made_with", "params"),
  [(jnp.float32, {"w": jnp.ones(2, jnp.bfloat16)}), (jnp.bfloat16, {"w": jnp.ones(2)})],
  ids=["float32-state-bfloat16-params", "bfloat16-state-float32-params"],
)
def test_state_of_an_accumulator_dtype_given_to_the_default_names_that_cause(made_with, params):
  # It blamed the gradients, which are right: the optimizer was built otherwise.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the coarse-beta warning of a bfloat16 state
    made = quiet(accumulator_dtype=made_with).init(params)
  with pytest.raises(ValueError, match="holds its moment in") as error:
    quiet().update(params, made, params)
  name = jnp.dtype(made_with).name
  assert f"built with accumulator_dtype=jnp.{name}, build tx that way" in str(error.value)


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
  with pytest.raises(
    ValueError, match="scale_by_adaptive_rms: the gradients do not match"
  ) as error:
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


@pytest.mark.parametrize("leaf", ["float32", object(), b"1.0"], ids=["str", "object", "bytes"])
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


# A state of low precision, a beta too close to 1 for it -------------------


def coarse_beta_warnings(make_state) -> list[warnings.WarningMessage]:
  """The warnings that ``make_state()`` gives, each time it is called."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    make_state()
  return list(caught)


def test_low_precision_state_warns_at_the_users_line_and_float32_state_does_not(caplog):
  with caplog.at_level(logging.WARNING, logger="gradient_ascent_jax"):
    [caught] = coarse_beta_warnings(lambda: quiet().init(jnp.zeros(2, jnp.bfloat16)))
  # Misuse seen when the state is made: a UserWarning naming the line of init.
  assert caught.category is UserWarning and caught.filename == __file__
  assert "accumulator_dtype=jnp.float32" in str(caught.message)
  assert not caplog.records
  assert not coarse_beta_warnings(
    lambda: quiet(accumulator_dtype=jnp.float32).init(jnp.zeros(2, jnp.bfloat16))
  )


@pytest.mark.parametrize(
  ("dtype", "accumulator_dtype", "beta", "fix", "not_said"),
  [
    (jnp.bfloat16, None, 0.999, "accumulator_dtype=jnp.float32", "float64"),
    (jnp.float16, None, 1 - 1e-4, "accumulator_dtype=jnp.float32", "float64"),
    (jnp.float32, None, 1 - 1e-9, "accumulator_dtype=jnp.float64", "accumulator_dtype=jnp.float32"),
    (
      jnp.bfloat16,
      jnp.float32,
      1 - 1e-9,
      "accumulator_dtype=jnp.float64",
      "accumulator_dtype=jnp.float32",
    ),
  ],
  ids=["bfloat16", "float16", "float32", "float32-state"],
)
def test_coarse_beta_warning_gives_advice_that_fits(dtype, accumulator_dtype, beta, fix, not_said):
  [message] = [
    str(w.message)
    for w in coarse_beta_warnings(
      lambda: quiet(beta=beta, accumulator_dtype=accumulator_dtype).init(jnp.zeros(2, dtype))
    )
  ]
  assert f"beta={beta} is closer to 1" in message
  assert fix in message and not_said not in message


def test_coarse_beta_warning_for_float64_state_only_asks_for_a_smaller_beta(x64):
  [message] = [
    str(w.message)
    for w in coarse_beta_warnings(lambda: quiet(beta=1 - 2**-53).init(jnp.zeros(2, jnp.float64)))
  ]
  assert "float64 state" in message and "1 - beta >= 2.22e-16." in message
  assert "accumulator_dtype" not in message


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
  ids=[
    "clip",
    "rms",
    "rms-float32-state",
    "momentum",
    "momentum-float32-state",
    "gradient_ascent-clip",
    "gradient_ascent",
  ],
)
def test_complex_gradient_raises_type_error_naming_transform_and_path(make, transform, jit):
  # clip_by_value raised "TypeError: float() argument must be a string or a real
  # number, not 'complex'"; with accumulator_dtype set, momentum silently dropped
  # the imaginary part and scale_by_adaptive_rms failed inside jnp.hypot.
  tx = make()
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(
    TypeError, match=rf"^{transform}: gradient \['layer'\]\['w'\] is complex"
  ) as error:
    update(COMPLEX_GRADS, tx.init(REAL_PARAMS))
  assert "optax.contrib.split_real_and_imaginary(gax.gradient_ascent(...))" in str(error.value)


def test_complex_params_raise_type_error_at_init_naming_the_fix():
  with pytest.raises(TypeError, match=r"parameter \['layer'\]\['w'\] has dtype complex64") as error:
    quiet().init({"layer": {"w": jnp.zeros(2, jnp.complex64)}})
  assert "optax.contrib.split_real_and_imaginary(gax.gradient_ascent(...))" in str(error.value)


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="long double is float64 here")
def test_numpy_long_double_params_are_told_to_cast():
  # A real float, which JAX lacks: not "only real floating-point parameters".
  with pytest.raises(TypeError, match=r"parameter \['x'\] has dtype float128, which JAX") as error:
    gax.gradient_ascent().init({"x": np.ones(2, np.longdouble)})
  assert "only real floating-point" not in str(error.value)
  assert "astype(np.float64)" in str(error.value)


@pytest.mark.parametrize(("beta", "warned"), [(0.999, True), (0.99, False), (1 - 2**-7, False)])
def test_bfloat16_state_of_float32_params_warns_only_past_its_resolution(beta, warned):
  # As the performance page says: accumulator_dtype=jnp.bfloat16 halves the state,
  # best with beta <= 1 - 2**-7; the default 0.999 warns at init.
  caught = coarse_beta_warnings(
    lambda: quiet(beta=beta, accumulator_dtype=jnp.bfloat16).init(jnp.zeros(4))
  )
  assert len(caught) == (1 if warned else 0)
  if warned:
    assert "1.4x larger" in str(caught[0].message)
