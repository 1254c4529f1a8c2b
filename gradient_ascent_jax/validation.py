"""Construction-time checks of hyperparameters (allowed values: docs/guide/hyperparameters.md).

A concrete bad value (a Python or NumPy number) raises ``ValueError`` naming
the argument, the value and what is allowed. JAX arrays and tracers are not
checked: inside ``jit``, ``vmap`` or ``optax.inject_hyperparams`` their values
are not known when the optimizer is built.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_jax_value(value: Any) -> bool:
  return isinstance(value, jax.Array)


def _fail(name: str, value: Any, allowed: str, fix: str) -> None:
  raise ValueError(f"`{name}` must be {allowed}, got {value!r}. {fix}")


def _as_real(name: str, value: Any) -> float:
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, numbers.Real
  ):
    _fail(name, value, "a real number", "Pass a Python float or int.")
  return float(value)


def check_interval(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    fix: str = "",
) -> None:
  """Checks that a concrete number lies in an interval; skips JAX values."""
  if _is_jax_value(value):
    return
  number = _as_real(name, value)
  above = number > low if low_open else number >= low
  below = number < high if high_open else number <= high
  if not (above and below):  # also rejects NaN
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    _fail(name, value, f"in {left}{low}, {high}{right}", fix)


def check_learning_rate(name: str, value: Any) -> None:
  if callable(value):
    return
  check_interval(
      name,
      value,
      0.0,
      math.inf,
      high_open=True,
      fix="Pass a float >= 0 or an optax schedule (a callable count -> lr).",
  )


def check_optional_positive(name: str, value: Any, fix: str) -> None:
  if value is not None:
    check_interval(name, value, 0.0, math.inf, low_open=True, fix=fix)


def check_decay_rate(name: str, value: Any) -> None:
  check_interval(
      name,
      value,
      0.0,
      1.0,
      high_open=True,
      fix=f"Use 0 to disable it; `{name}` = 1 never forgets and diverges.",
  )


def check_lr_decay(value: Any) -> None:
  if value is not None:
    check_interval(
        "lr_decay",
        value,
        0.0,
        1.0,
        low_open=True,
        fix="Use None (or 1.0) for no decay; the rate is multiplied by "
        "lr_decay once per step.",
    )


def check_count(name: str, value: Any, minimum: int, fix: str) -> None:
  """Checks a concrete integer >= minimum; skips JAX values."""
  if _is_jax_value(value):
    return
  is_int = isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
      value, (bool, np.bool_)
  )
  if not is_int or value < minimum:
    _fail(name, value, f"an integer >= {minimum}", fix)


def check_logging_interval(value: Any) -> None:
  if value is not None:
    check_count(
        "logging_interval",
        value,
        0,
        "Use None or 0 to turn progress logging off, or N >= 1 to log "
        "every N steps.",
    )


def check_bool(name: str, value: Any) -> None:
  if _is_jax_value(value):
    return
  if not isinstance(value, (bool, np.bool_)):
    _fail(name, value, "a bool", f"Pass {name}=True or {name}=False.")


def logging_enabled(logging_interval: Any) -> bool:
  """Whether progress logging can be on; False only for a static None/0."""
  if logging_interval is None:
    return False
  return _is_jax_value(logging_interval) or logging_interval > 0


def check_floating_params(params: Any, transform: str) -> None:
  """Raises TypeError naming the first leaf that is not real floating point."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for path, leaf in leaves:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      where = jax.tree_util.keystr(path) or "<root>"
      kind = dtype.name
      raise TypeError(
          f"{transform}: parameter {where} has dtype {kind}; only real "
          "floating-point parameters can be optimized. Mask non-trainable "
          "leaves out with optax.masked / optax.multi_transform (or replace "
          "them with None), and split complex parameters into real and "
          "imaginary parts."
      )
