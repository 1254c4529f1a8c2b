"""SPEC section 5: every bad concrete hyperparameter raises a ValueError naming it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax

# (argument, bad value) for every row of SPEC section 5.
BAD_VALUES = [
    ("learning_rate", -0.1),
    ("learning_rate", float("nan")),
    ("learning_rate", "0.1"),
    ("momentum", -0.1),
    ("momentum", 1.0),
    ("momentum", 1.5),
    ("beta", -0.5),
    ("beta", 1.0),
    ("eps", 0.0),
    ("eps", -1e-8),
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
]

GOOD_VALUES = [
    ("learning_rate", 0.0),
    ("learning_rate", optax.constant_schedule(0.1)),
    ("learning_rate", np.float32(0.5)),
    ("momentum", 0.0),
    ("momentum", 0.999),
    ("beta", 0.0),
    ("eps", 1e-12),
    ("clip_value", None),
    ("clip_value", 1e-3),
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
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_gradient_ascent_rejects_bad_value_naming_the_argument(name, value):
  with pytest.raises(ValueError, match=f"`{name}` must be") as info:
    gax.gradient_ascent(**{name: value})
  assert repr(value) in str(info.value)


@pytest.mark.parametrize(("name", "value"), GOOD_VALUES)
def test_gradient_ascent_accepts_edge_values(name, value):
  tx = gax.gradient_ascent(**{name: value})
  params = {"w": jnp.ones(3)}
  updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  assert updates["w"].shape == (3,)


@pytest.mark.parametrize(
    ("factory", "kwargs", "name"),
    [
        (gax.clip_by_value, {"clip_value": 0.0}, "clip_value"),
        (gax.scale_by_adaptive_rms, {"beta": 1.0}, "beta"),
        (gax.scale_by_adaptive_rms, {"eps": 0.0}, "eps"),
        (gax.momentum, {"decay": 1.0}, "decay"),
        (gax.momentum, {"nesterov": None}, "nesterov"),
        (gax.scale_by_warmup_decay, {"learning_rate": -1.0}, "learning_rate"),
        (gax.scale_by_warmup_decay, {"warmup_steps": -3}, "warmup_steps"),
        (gax.scale_by_warmup_decay, {"lr_decay": 2.0}, "lr_decay"),
        (gax.warmup_decay_schedule, {"lr_decay": 0.0}, "lr_decay"),
        (gax.log_progress, {"logging_interval": -2}, "logging_interval"),
    ],
)
def test_each_public_factory_checks_its_arguments(factory, kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}` must be"):
    factory(**kwargs)


def test_error_message_says_how_to_fix():
  with pytest.raises(ValueError, match="Use None for no clipping"):
    gax.gradient_ascent(clip_value=0)
  with pytest.raises(ValueError, match="Use 0 to turn warmup off"):
    gax.gradient_ascent(warmup_steps=-1)


def test_jax_values_are_not_checked_at_construction():
  # Tracers cannot be checked; concrete JAX arrays are treated the same way.
  tx = gax.gradient_ascent(momentum=jnp.asarray(0.5), warmup_steps=jnp.asarray(3))
  assert isinstance(tx, optax.GradientTransformation)

  @jax.jit
  def build_and_step(lr):
    tx = gax.gradient_ascent(learning_rate=lr, logging_interval=None)
    params = jnp.ones(2)
    return tx.update(jnp.ones(2), tx.init(params), params)[0]

  np.testing.assert_allclose(build_and_step(0.5), 0.5 * np.ones(2) / (np.sqrt(1e-3) + 1e-8), rtol=1e-6)


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
