"""The allowed values (docs/guide/hyperparameters.md).

Every bad concrete hyperparameter raises a ValueError naming it.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from tests._reference import ReferenceGradientAscent

# (argument, bad value) for every row of the allowed-values table (docs/guide/hyperparameters.md).
BAD_VALUES = [
  ("learning_rate", -0.1),
  ("learning_rate", float("nan")),
  ("learning_rate", "0.1"),
  ("learning_rate", 0.1 + 0j),
  ("momentum", np.complex64(0.5)),
  ("clip_value", np.float64(np.nan)),
  ("warmup_steps", np.float64(3.0)),
  ("momentum", -0.1),
  ("momentum", 1.0),
  ("momentum", 1.5),
  ("beta", -0.5),
  ("beta", 1.0),
  ("eps", 0.0),
  ("eps", -1e-8),
  ("eps", -0.0),
  ("eps", float("inf")),
  ("eps", None),
  ("clip_value", float("inf")),
  ("clip_value", -0.0),
  ("lr_decay", -0.0),
  ("clip_value", 0.0),
  ("clip_value", -1.0),
  ("lr_decay", 0.0),
  ("lr_decay", 1.5),
  ("lr_decay", -0.9),
  ("warmup_steps", -1),
  ("warmup_steps", 2.5),
  ("warmup_steps", 10.0),
  ("warmup_steps", True),
  ("logging_interval", -1),
  ("logging_interval", 1.5),
  ("nesterov", 1),
  ("nesterov", "yes"),
  ("logging_name", ""),
  ("logging_name", " "),
  ("logging_name", "disc."),
  ("logging_name", 3),
  ("weight_decay", -0.1),
  ("weight_decay", -1e-300),
  ("weight_decay", float("inf")),
  ("weight_decay", float("nan")),
  ("weight_decay", "1e-4"),
]

GOOD_VALUES = [
  ("learning_rate", 0.0),
  ("learning_rate", optax.constant_schedule(0.1)),
  ("learning_rate", np.float32(0.5)),
  ("learning_rate", -0.0),
  ("momentum", 0.0),
  ("momentum", -0.0),
  ("beta", -0.0),
  ("momentum", 0.999),
  ("beta", 0.0),
  ("eps", 1e-12),
  ("clip_value", None),
  ("clip_value", 1e-3),
  ("weight_decay", None),
  ("lr_decay", None),
  ("lr_decay", 1.0),
  ("lr_decay", 1e-6),
  ("warmup_steps", 0),
  ("warmup_steps", np.int64(100)),
  ("logging_interval", None),
  ("logging_interval", 0),
  ("logging_interval", 1),
  ("nesterov", True),
  ("nesterov", np.bool_(False)),
  ("logging_name", None),
  ("logging_name", "disc"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_gradient_ascent_rejects_bad_value_naming_the_argument(name, value):
  with pytest.raises(ValueError, match=f"`{name}` must be") as info:
    gax.gradient_ascent(**{name: value})
  assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [5.0, np.float64(5.0)])
def test_a_whole_float_count_is_told_to_pass_an_int(value):
  with pytest.raises(ValueError, match=r"Pass it as an int, warmup_steps=5\."):
    gax.gradient_ascent(warmup_steps=value)


def test_a_decay_rate_below_0_is_told_the_range():
  with pytest.raises(ValueError, match=r"from 0 \(which turns it off\) up to, not including, 1"):
    gax.gradient_ascent(beta=-0.1)


def test_a_schedule_that_returns_a_negative_rate_is_told_to_mend_the_schedule():
  tx = gax.gradient_ascent(learning_rate=lambda count: -0.1)
  with pytest.raises(ValueError, match="The schedule must return a rate >= 0") as info:
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)), jnp.ones(2))
  assert "or an optax schedule" not in str(info.value)


@pytest.mark.parametrize(("name", "value"), GOOD_VALUES)
def test_gradient_ascent_accepts_edge_values(name, value):
  """An edge value is accepted and used: two steps follow the NumPy reference."""
  tx = gax.gradient_ascent(**{name: value})
  reference_options = (
    {} if name in ("logging_interval", "logging_name", "weight_decay") else {name: value}
  )
  reference = ReferenceGradientAscent(**reference_options)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  for grad in ([1.0, -2.0, 0.5], [0.5, 3.0, -1.0]):
    updates, state = tx.update({"w": jnp.asarray(grad)}, state, params)
    (expected,) = reference.step([np.asarray(grad)])
    # float32 rounding of the terms of v (0.9 s_1 + s_2 may cancel).
    np.testing.assert_allclose(
      updates["w"], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max()
    )


@pytest.mark.parametrize(
  ("factory", "kwargs", "name"),
  [
    (gax.clip_by_value, {"clip_value": 0.0}, "clip_value"),
    (gax.scale_by_adaptive_rms, {"beta": 1.0}, "beta"),
    (gax.scale_by_adaptive_rms, {"eps": 0.0}, "eps"),
    (gax.scale_by_adaptive_rms, {"eps": None}, "eps"),
    (gax.momentum, {"decay": 1.0}, "decay"),
    (gax.momentum, {"nesterov": None}, "nesterov"),
    (gax.scale_by_warmup_decay, {"learning_rate": -1.0}, "learning_rate"),
    (gax.scale_by_warmup_decay, {"warmup_steps": -3}, "warmup_steps"),
    (gax.scale_by_warmup_decay, {"lr_decay": 2.0}, "lr_decay"),
    (gax.warmup_decay_schedule, {"lr_decay": 0.0}, "lr_decay"),
    (gax.log_progress, {"logging_interval": -2}, "logging_interval"),
    (gax.log_progress, {"logging_name": ""}, "logging_name"),
  ],
)
def test_each_public_factory_checks_its_arguments(factory, kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}` must be"):
    factory(**kwargs)


def test_error_message_says_how_to_fix():
  with pytest.raises(ValueError, match="Use None for no clipping"):
    gax.gradient_ascent(clip_value=0)


@pytest.mark.parametrize("clip_value", [None, 0.0])
def test_clip_by_value_alone_refuses_no_bound_and_says_to_leave_it_out(clip_value):
  # The stage has no "off" (gradient_ascent's clip_value=None adds no stage).
  with pytest.raises(ValueError, match="`clip_value` must be") as error:
    gax.clip_by_value(clip_value)
  assert "leave clip_by_value out of the chain" in str(error.value)
  assert "Use None" not in str(error.value)
  with pytest.raises(ValueError, match="Use 0 to turn warmup off"):
    gax.gradient_ascent(warmup_steps=-1)


def test_weight_decay_error_says_how_to_fix():
  with pytest.raises(ValueError, match=r"Use None \(the default\) for no decay") as info:
    gax.gradient_ascent(weight_decay=-0.01)
  assert "`weight_decay` must be in [0.0, inf), got -0.01" in str(info.value)


def test_weight_decay_jax_value_is_not_checked_at_construction():
  gax.gradient_ascent(weight_decay=jnp.asarray(-1.0))  # builds: it could be a tracer
  with pytest.raises(ValueError, match="`weight_decay` must be a scalar"):
    gax.gradient_ascent(weight_decay=jnp.ones(2))


def test_jax_values_are_not_checked_at_construction():
  # Tracers cannot be checked; concrete JAX arrays are treated the same way:
  # an out-of-range JAX value builds (no ValueError) ...
  gax.gradient_ascent(momentum=jnp.asarray(1.5), warmup_steps=jnp.asarray(-3))
  # ... and a valid one is used. First step, |h| = 2: m_1 = (1 - beta) h**2,
  # s_1 = h / (sqrt(m_1) + eps), v_1 = s_1, lr_0 = 0.01 / 3 (warmup 3).
  tx = gax.gradient_ascent(momentum=jnp.asarray(0.5), warmup_steps=jnp.asarray(3))
  updates, _ = tx.update(jnp.array([2.0, -2.0]), tx.init(jnp.zeros(2)))
  first = 0.01 / 3 * 2.0 / (np.sqrt(1e-3) * 2.0 + 1e-8)
  np.testing.assert_allclose(updates, [first, -first], rtol=1e-6)

  @jax.jit
  def build_and_step(lr):
    tx = gax.gradient_ascent(learning_rate=lr, logging_interval=None)
    params = jnp.ones(2)
    return tx.update(jnp.ones(2), tx.init(params), params)[0]

  np.testing.assert_allclose(
    build_and_step(0.5), 0.5 * np.ones(2) / (np.sqrt(1e-3) + 1e-8), rtol=1e-6
  )


# 0-d NumPy arrays (as jax.test_util.check_grads passes them) are numbers. ------


@pytest.mark.parametrize(
  ("name", "value"),
  [
    ("learning_rate", np.asarray(0.01)),
    ("momentum", np.asarray(0.5, np.float32)),
    ("beta", np.asarray(0.9)),
    ("eps", np.asarray(1e-6)),
    ("clip_value", np.asarray(2.0)),
    ("lr_decay", np.asarray(0.9)),
    ("warmup_steps", np.asarray(3)),
    ("logging_interval", np.asarray(0)),
    ("nesterov", np.asarray(True)),
  ],
)
def test_zero_dim_numpy_arrays_are_accepted(name, value):
  tx = gax.gradient_ascent(**{name: value})
  params = {"w": jnp.ones(3)}
  updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  assert updates["w"].shape == (3,)


@pytest.mark.parametrize(
  ("name", "value"),
  [
    ("learning_rate", np.asarray(-0.1)),
    ("momentum", np.asarray(1.0)),
    ("eps", np.asarray(0.0)),
    ("lr_decay", np.asarray(np.nan)),
    ("warmup_steps", np.asarray(-1)),
    ("warmup_steps", np.asarray(3.0)),
    ("nesterov", np.asarray(1)),
  ],
)
def test_zero_dim_numpy_arrays_are_checked_like_numbers(name, value):
  with pytest.raises(ValueError, match=f"`{name}` must be") as info:
    gax.gradient_ascent(**{name: value})
  assert repr(value) in str(info.value)


def test_zero_dim_numpy_hyperparameters_give_the_python_number_result():
  # First step with warmup 3: lr / 3 * h / (sqrt(1 - beta) |h| + eps), h = 1.
  tx = gax.gradient_ascent(np.asarray(0.3), warmup_steps=np.asarray(3), beta=np.asarray(0.75))
  params = jnp.zeros(2)
  updates, _ = tx.update(jnp.ones(2), tx.init(params), params)
  np.testing.assert_allclose(updates, 0.1 / (0.5 + 1e-8), rtol=1e-6)


@pytest.mark.parametrize(
  ("name", "value", "expected"),
  # First step, h = 1: lr * 1 / (sqrt(1 - beta) + eps) with beta = 0.75;
  # a large eps dominates the denominator.
  [("learning_rate", 2**40, 2**40 / 0.5), ("eps", 2**70, 0.01 / 2**70)],
)
def test_python_int_wider_than_int32_works(name, value, expected):
  tx = gax.gradient_ascent(beta=0.75, **{name: value})
  params = jnp.zeros(2)
  updates, _ = jax.jit(tx.update)(jnp.ones(2), tx.init(params), params)
  np.testing.assert_allclose(updates, expected, rtol=1e-6)


def test_python_int_beyond_float_range_is_rejected():
  with pytest.raises(ValueError, match="`learning_rate` must be a real number within the float64"):
    gax.gradient_ascent(10**400)


# Non-scalar hyperparameters: the shape is known even for tracers. -------------

# (factory, argument, a valid scalar value) for every numeric hyperparameter.
SCALAR_ARGS = [
  (gax.gradient_ascent, "learning_rate", 0.1),
  (gax.gradient_ascent, "momentum", 0.9),
  (gax.gradient_ascent, "beta", 0.9),
  (gax.gradient_ascent, "eps", 1e-8),
  (gax.gradient_ascent, "clip_value", 1.0),
  (gax.gradient_ascent, "lr_decay", 0.9),
  (gax.gradient_ascent, "warmup_steps", 3),
  (gax.gradient_ascent, "logging_interval", 2),
  (gax.gradient_ascent, "nesterov", True),
  (gax.clip_by_value, "clip_value", 1.0),
  (gax.scale_by_adaptive_rms, "beta", 0.9),
  (gax.scale_by_adaptive_rms, "eps", 1e-8),
  (gax.momentum, "decay", 0.9),
  (gax.momentum, "nesterov", True),
  (gax.scale_by_warmup_decay, "learning_rate", 0.1),
  (gax.scale_by_warmup_decay, "warmup_steps", 3),
  (gax.scale_by_warmup_decay, "lr_decay", 0.9),
  (gax.warmup_decay_schedule, "learning_rate", 0.1),
  (gax.warmup_decay_schedule, "warmup_steps", 3),
  (gax.warmup_decay_schedule, "lr_decay", 0.9),
  (gax.log_progress, "logging_interval", 2),
  (gax.log_progress, "learning_rate", 0.1),
]
SCALAR_ARG_IDS = [f"{f.__name__}-{name}" for f, name, _ in SCALAR_ARGS]


def _non_scalar_cases():
  """Each argument once, with one bad array; the arrays take turns within each kind.

  The kinds (real, integer, bool: validation's check_interval, check_count and
  check_bool) each check a JAX array and a NumPy one on their own branch, so
  turns alternate JAX and NumPy per kind; every shape below comes up as well.
  """
  arrays = [(jnp.full, (1,)), (np.full, (1,)), (jnp.full, (3,)), (np.full, (2, 2))]
  turns = {}
  cases = []
  for factory, name, value in SCALAR_ARGS:
    turn = turns[type(value)] = turns.get(type(value), -1) + 1
    make, shape = arrays[turn % len(arrays)]
    library = "jax" if make is jnp.full else "numpy"
    shown = "x".join(map(str, shape))
    cases.append(
      pytest.param(
        factory, name, value, make, shape, id=f"{factory.__name__}-{name}-{library}-{shown}"
      )
    )
  return cases


@pytest.mark.parametrize(("factory", "name", "value", "make", "shape"), _non_scalar_cases())
def test_non_scalar_hyperparameter_is_rejected_naming_it_and_its_shape(
  factory, name, value, make, shape
):
  with pytest.raises(ValueError, match=rf"`{name}` must be a scalar \(shape \(\)\)") as info:
    factory(**{name: make(shape, value)})
  assert f"an array of shape {shape}" in str(info.value)


@pytest.mark.parametrize(("factory", "name", "value"), SCALAR_ARGS[:9], ids=SCALAR_ARG_IDS[:9])
def test_non_scalar_tracer_is_rejected_at_trace_time(factory, name, value):
  @jax.jit
  def build(hyperparameter):
    factory(**{name: hyperparameter})

  with pytest.raises(ValueError, match=rf"`{name}` must be a scalar") as info:
    build(jnp.full(2, value))
  assert "a traced array of shape (2,)" in str(info.value)


@pytest.mark.parametrize(
  ("name", "value", "kind"),
  [
    ("learning_rate", jnp.asarray(True), "a real"),
    ("learning_rate", jnp.asarray(0.1 + 0j), "a real"),
    ("momentum", jnp.asarray(0.5 + 0j), "a real"),
    ("eps", np.asarray(True), "a real"),
    ("warmup_steps", jnp.asarray(3.0), "an integer"),
    ("logging_interval", jnp.asarray(2.0), "an integer"),
    ("nesterov", jnp.asarray(1), "a bool"),
    ("nesterov", jnp.asarray(1.0), "a bool"),
  ],
)
def test_array_of_the_wrong_kind_is_rejected(name, value, kind):
  with pytest.raises(ValueError, match=f"`{name}` must be {kind} scalar") as info:
    gax.gradient_ascent(**{name: value})
  assert f"dtype {value.dtype}" in str(info.value)


def test_vmap_over_a_hyperparameter_still_works():
  def first_update(lr):
    tx = gax.gradient_ascent(learning_rate=lr, beta=0.75)
    params = jnp.zeros(2)
    return tx.update(jnp.ones(2), tx.init(params), params)[0]

  updates = jax.vmap(first_update)(jnp.array([0.1, 0.2]))
  # lr * h / (sqrt(1 - beta) |h| + eps), h = 1.
  np.testing.assert_allclose(updates, [[0.2, 0.2], [0.4, 0.4]], rtol=1e-6)


# A schedule's output is checked when it is called (at trace time). ------------


@pytest.mark.parametrize(
  ("schedule", "match"),
  [
    (lambda count: jnp.full(1, 0.1), r"shape \(1,\)"),
    (lambda count: np.full(3, 0.1), r"shape \(3,\)"),
    (lambda count: jnp.asarray(True), "a real scalar"),
    (lambda count: True, "a real number"),
    (lambda count: -0.1, r"in \[0.0, inf\)"),
  ],
  ids=["jax-shape-1", "numpy-shape-3", "jax-bool", "python-bool", "negative"],
)
@pytest.mark.parametrize(
  "factory",
  [
    gax.gradient_ascent,
    gax.scale_by_warmup_decay,
    lambda lr: gax.log_progress(1, lr),
  ],
  ids=["gradient_ascent", "scale_by_warmup_decay", "log_progress"],
)
def test_bad_schedule_output_is_rejected_when_traced(factory, schedule, match):
  tx = factory(schedule)
  params = jnp.zeros(())
  with pytest.raises(ValueError, match=r"`learning_rate\(count\)` must be") as info:
    jax.jit(tx.update)(jnp.ones(()), tx.init(params), params)
  assert info.match(match)


def test_a_schedule_going_negative_on_the_device_is_not_checked_under_jit():
  # As "What happens when" says: a Python number is refused, a JAX array is not
  # checked (with or without jit), and the update then descends.
  params = jnp.zeros(())
  with pytest.raises(ValueError, match=r"`learning_rate\(count\)` must be"):
    tx = gax.gradient_ascent(lambda count: -0.01)
    tx.update(jnp.ones(()), tx.init(params), params)
  schedule = optax.linear_schedule(0.01, -0.01, transition_steps=100)
  tx = gax.gradient_ascent(schedule, momentum=0.0, beta=0.75)
  state = optax.tree.set(tx.init(params), count=jnp.asarray(80, jnp.int32))
  for update in (tx.update, jax.jit(tx.update)):
    updates, _ = update(jnp.ones(()), state, params)
    np.testing.assert_allclose(updates, -0.006 / 0.5, rtol=1e-5)  # lr(80) / sqrt(1 - beta)


@pytest.mark.parametrize("rate", [1, jnp.asarray(1), np.int64(1)], ids=["python", "jax", "numpy"])
def test_schedule_returning_an_int_works(rate):
  tx = gax.gradient_ascent(lambda count: rate, beta=0.75, momentum=0.0)
  params = jnp.zeros(())
  updates, _ = jax.jit(tx.update)(jnp.ones(()), tx.init(params), params)
  np.testing.assert_allclose(updates, 1 / 0.5, rtol=1e-6)  # lr / sqrt(1 - beta)


# Non-finite values: every float argument of every factory, each with one of them. --

FLOAT_ARGS = [(f, name, v) for f, name, v in SCALAR_ARGS if isinstance(v, float)]
NON_FINITE = [math.nan, math.inf, -math.inf, np.float32(np.inf)]


@pytest.mark.parametrize(
  ("factory", "name", "bad"),
  [(f, name, NON_FINITE[i % len(NON_FINITE)]) for i, (f, name, _) in enumerate(FLOAT_ARGS)],
  ids=[
    f"{f.__name__}-{name}-{NON_FINITE[i % len(NON_FINITE)]!r}"
    for i, (f, name, _) in enumerate(FLOAT_ARGS)
  ],
)
def test_non_finite_float_argument_is_rejected(factory, name, bad):
  with pytest.raises(ValueError, match=f"`{name}` must be in ") as info:
    factory(**{name: bad})
  assert repr(bad) in str(info.value)


# Counts beyond int32. -----------------------------------------------------------

INT32_MAX = 2**31 - 1


@pytest.mark.parametrize("warmup_steps", [2**31, 2**40, np.int64(2**40), 2**63 - 1])
def test_warmup_longer_than_int32_ramps_linearly(warmup_steps):
  tx = gax.gradient_ascent(learning_rate=1.0, beta=0.75, momentum=0.0, warmup_steps=warmup_steps)
  params = jnp.zeros(())
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(jnp.ones(()), state, params)
  # Step 1 of the warmup: lr * 1 / W, times 1 / sqrt(1 - beta) for h = 1.
  np.testing.assert_allclose(updates, 2.0 / float(warmup_steps), rtol=1e-6)
  schedule = gax.warmup_decay_schedule(1.0, warmup_steps)
  np.testing.assert_allclose(schedule(INT32_MAX), 2.0**31 / float(warmup_steps), rtol=1e-6)


def test_warmup_beyond_int64_is_rejected():
  with pytest.raises(
    ValueError, match=r"`warmup_steps` must be an integer in \[0, 9223372036854775807\]"
  ):
    gax.gradient_ascent(warmup_steps=2**63)


@pytest.mark.parametrize("factory", [gax.gradient_ascent, gax.log_progress])
@pytest.mark.parametrize("interval", [2**31, 2**40])
def test_logging_interval_beyond_the_int32_counter_is_rejected(factory, interval):
  with pytest.raises(
    ValueError, match=r"`logging_interval` must be an integer in \[0, 2147483647\]"
  ) as info:
    factory(logging_interval=interval)
  assert "would never log" in str(info.value)


def test_logging_interval_at_the_int32_maximum_is_accepted():
  tx = gax.gradient_ascent(logging_interval=INT32_MAX)
  params = jnp.zeros(2)
  updates, state = jax.jit(tx.update)(jnp.ones(2), tx.init(params), params)
  assert int(state[0].count) == 1 and np.isfinite(np.asarray(updates)).all()


# accumulator_dtype --------------------------------------------------------------


@pytest.mark.parametrize("factory", [gax.gradient_ascent, gax.scale_by_adaptive_rms, gax.momentum])
@pytest.mark.parametrize(
  "dtype",
  ["foo", jnp.int32, bool, jnp.complex64, jnp.float8_e4m3fn, object, 3],
  ids=["foo", "int32", "bool", "complex64", "float8", "object", "int"],
)
def test_bad_accumulator_dtype_is_rejected_at_construction(factory, dtype):
  with pytest.raises(
    ValueError, match="`accumulator_dtype` must be None or a floating-point"
  ) as info:
    factory(accumulator_dtype=dtype)
  assert repr(dtype) in str(info.value)


@pytest.mark.parametrize("dtype", [jnp.float32, "float32", np.dtype("float16"), jnp.bfloat16])
def test_floating_accumulator_dtype_is_accepted(dtype):
  tx = gax.gradient_ascent(accumulator_dtype=dtype)
  state = tx.init(jnp.zeros(2))
  assert state[1].second_moment.dtype == jnp.dtype(dtype)
  assert state[2].velocity.dtype == jnp.dtype(dtype)


def test_construction_does_no_device_work():
  # Building an optimizer inside a training loop or a sweep must stay cheap.
  with jax.transfer_guard("disallow"):
    gax.gradient_ascent(
      0.1,
      np.float32(0.5),
      np.asarray(0.9),
      1e-8,
      True,
      1.0,
      0.9,
      np.asarray(3),
      5,
      accumulator_dtype="float32",
    )
    gax.gradient_ascent(optax.linear_schedule(0.1, 0.0, 10), clip_value=np.float64(2.0))


@pytest.mark.parametrize("factory", [gax.gradient_ascent, gax.scale_by_adaptive_rms, gax.momentum])
@pytest.mark.parametrize(
  "dtype",
  [jnp.float64, "float64", np.float64, float, np.dtype("float64")],
  ids=["jnp", "str", "np", "float", "np.dtype"],
)
def test_float64_accumulator_without_x64_is_rejected_naming_x64(factory, dtype):
  # init silently made float32 moments, and every update then refused them
  # ("this optimizer was built with accumulator_dtype=float64 ... call init").
  assert not jax.config.jax_enable_x64
  with pytest.raises(ValueError, match="64-bit types are off") as info:
    factory(accumulator_dtype=dtype)
  assert "jax.config.update('jax_enable_x64', True)" in str(info.value)


def test_float64_accumulator_built_with_x64_is_rejected_at_init_without_it():
  with jax.enable_x64(True):
    tx = gax.gradient_ascent(accumulator_dtype=jnp.float64)
  with pytest.raises(ValueError, match="64-bit types are off"):
    tx.init(jnp.zeros(2))


def test_float64_accumulator_with_x64_keeps_float64_moments(x64):
  tx = gax.gradient_ascent(0.1, accumulator_dtype=jnp.float64)
  params = jnp.zeros(2, jnp.float32)
  state = tx.init(params)
  assert state[1].second_moment.dtype == jnp.float64 == state[2].velocity.dtype
  updates, state = tx.update(jnp.array([1.0, -2.0], jnp.float32), state, params)
  # First step: lr * h / sqrt((1 - beta) h**2) = 0.1 / sqrt(0.001) in each element's direction.
  np.testing.assert_allclose(updates, [3.16227766, -3.16227766], rtol=1e-6)
  assert updates.dtype == jnp.float32 and state[1].second_moment.dtype == jnp.float64
