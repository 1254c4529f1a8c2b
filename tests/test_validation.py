"""SPEC section 5: every bad concrete hyperparameter raises a ValueError naming it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradient_ascent_jax as gax
from tests._reference import ReferenceGradientAscent

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
  """An edge value is accepted and used: two steps follow the NumPy reference."""
  tx = gax.gradient_ascent(**{name: value})
  reference_options = {} if name == "logging_interval" else {name: value}
  reference = ReferenceGradientAscent(**reference_options)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  for grad in ([1.0, -2.0, 0.5], [0.5, 3.0, -1.0]):
    updates, state = tx.update({"w": jnp.asarray(grad)}, state, params)
    (expected,) = reference.step([np.asarray(grad)])
    # float32 rounding of the terms of v (0.9 s_1 + s_2 may cancel).
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max())


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

  np.testing.assert_allclose(build_and_step(0.5), 0.5 * np.ones(2) / (np.sqrt(1e-3) + 1e-8), rtol=1e-6)
