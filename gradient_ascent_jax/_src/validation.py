"""Construction-time checks of hyperparameters (allowed values: docs/guide/hyperparameters.md).

A concrete bad value (a Python or NumPy number, or a 0-d NumPy array) raises
``ValueError`` naming the argument, the value and what is allowed. Concrete
values come back as Python numbers, so that later arithmetic is weakly typed
and a Python int too wide for int32 never reaches JAX. The values of JAX
arrays and tracers are not checked: inside ``jit``, ``vmap`` or
``optax.inject_hyperparams`` they are not known when the optimizer is built.
Their shape and dtype are known even then, and are checked.
"""

from __future__ import annotations

import math
import numbers
from typing import Any
from typing import NoReturn

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

# The step counters are int32 and stop at its maximum (optax.safe_increment).
STEP_COUNT_MAX = int(np.iinfo(np.int32).max)
# Counts must fit the widest integer of NumPy and JAX (x64).
_COUNT_MAX = int(np.iinfo(np.int64).max)

_NARROW_FLOAT_FIX = (
  " In {dtype} a hyperparameter keeps only a few digits (beta=0.999 becomes "
  "1.0 in bfloat16, eps=1e-8 becomes 0 in float16), which silently breaks "
  "the optimizer. Pass float32 values; optax.inject_hyperparams casts "
  "hyperparameters to the params' dtype unless you give it "
  "hyperparam_dtype=jnp.float32."
)


def _is_jax_value(value: Any) -> bool:
  return isinstance(value, jax.Array)


def _fail(name: str, value: Any, allowed: str, fix: str) -> NoReturn:
  raise ValueError(f"`{name}` must be {allowed}, got {value!r}. {fix}")


def _describe_array(value: Any) -> str:
  if isinstance(value, jax.core.Tracer):
    return f"a traced array of shape {np.shape(value)} and dtype {value.dtype}"
  shown = f"{value!r}, " if np.size(value) <= 8 else ""
  return f"{shown}an array of shape {np.shape(value)} and dtype {value.dtype}"


def _check_array(name: str, value: Any, kind: str, fix: str) -> None:
  """Checks the shape and dtype kind of an array, known even for a tracer.

  ``kind`` is "real", "integer" or "bool".
  """
  if np.shape(value) != ():
    raise ValueError(
      f"`{name}` must be a scalar (shape ()), got {_describe_array(value)}. "
      "A hyperparameter applies to every element of every parameter; pass "
      "one number (to try several values, vmap the function that builds "
      "and applies the optimizer)."
    )
  dtype = jnp.dtype(value.dtype)
  is_int = jnp.issubdtype(dtype, jnp.integer)
  is_float = jnp.issubdtype(dtype, jnp.floating)
  ok = {
    "real": is_int or is_float,
    "integer": is_int,
    "bool": jnp.issubdtype(dtype, jnp.bool_),
  }[kind]
  if not ok:
    article = "an" if kind == "integer" else "a"
    raise ValueError(
      f"`{name}` must be {article} {kind} scalar, got {_describe_array(value)}. {fix}"
    )
  # A NumPy value is checked as the number it holds; a JAX value cannot be.
  if is_float and _is_jax_value(value) and jnp.finfo(dtype).bits < 32:
    raise ValueError(
      f"`{name}` must be float32 or wider, got {_describe_array(value)}."
      + _NARROW_FLOAT_FIX.format(dtype=dtype)
    )


def _concrete(name: str, value: Any, kind: str, fix: str) -> Any:
  """A 0-d NumPy array (as ``jax.test_util`` passes them) as its NumPy scalar."""
  if isinstance(value, np.ndarray):
    _check_array(name, value, kind, fix)
    return value[()]
  return value


def _as_real(name: str, value: Any, fix: str) -> float:
  number = _concrete(name, value, "real", fix)
  if isinstance(number, (bool, np.bool_)) or not isinstance(number, numbers.Real):
    _fail(name, value, "a real number", "Pass a Python float or int.")
  try:
    return float(number)
  except OverflowError:  # a Python int beyond the float range
    _fail(name, value, "a real number within the float64 range", fix)


def check_interval(
  name: str,
  value: Any,
  low: float,
  high: float,
  *,
  low_open: bool = False,
  high_open: bool = False,
  fix: str = "",
) -> float | jax.Array:
  """Checks that a concrete number lies in an interval; returns it as a float.

  A JAX value is returned as it is, once its shape and dtype are checked.
  """
  if _is_jax_value(value):
    _check_array(name, value, "real", fix)
    return value
  number = _as_real(name, value, fix)
  above = number > low if low_open else number >= low
  below = number < high if high_open else number <= high
  if not (above and below):  # also rejects NaN
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    _fail(name, value, f"in {left}{low}, {high}{right}", fix)
  return number


def check_learning_rate(name: str, value: Any) -> Any:
  if callable(value):
    return value
  if name.endswith("(count)"):  # a schedule's output: the schedule is what to mend
    fix = "The schedule must return a rate >= 0 at every step; check its end value and sign."
  else:
    fix = "Pass a float >= 0 or an optax schedule (a callable count -> lr)."
  return check_interval(name, value, 0.0, math.inf, high_open=True, fix=fix)


def check_optional_positive(name: str, value: Any, fix: str) -> Any:
  if value is None:
    return None
  # inf is refused as well: eps=inf makes every update 0, clip_value=inf clips nothing.
  return check_interval(name, value, 0.0, math.inf, low_open=True, high_open=True, fix=fix)


def _check_required_positive(name: str, value: Any, fix: str) -> float | jax.Array:
  """``value`` > 0 (and finite), where None is no way to turn it off."""
  if value is None:
    _fail(name, value, "a number > 0", fix)
  return check_optional_positive(name, value, fix)


def check_clip_value(value: Any) -> float | jax.Array:
  """``clip_by_value``'s bound > 0 (and finite): the stage itself has no "off"."""
  return _check_required_positive(
    "clip_value",
    value,
    "To clip nothing, leave clip_by_value out of the chain "
    "(gradient_ascent(clip_value=None) adds no clipping stage).",
  )


def check_eps(value: Any) -> float | jax.Array:
  """``eps`` > 0 (and finite): it guards the division, so None is refused too."""
  return _check_required_positive(
    "eps", value, "eps guards the division; use a small value such as 1e-8."
  )


def check_decay_rate(name: str, value: Any) -> float | jax.Array:
  return check_interval(
    name,
    value,
    0.0,
    1.0,
    high_open=True,
    fix=(
      f"Use a value from 0 (which turns it off) up to, not including, 1, such as "
      f"the default; `{name}` = 1 never forgets, and the run diverges."
    ),
  )


def check_lr_decay(value: Any) -> float | jax.Array | None:
  if value is None:
    return None
  fix = "Use None (or 1.0) for no decay; the rate is multiplied by lr_decay once per step."
  return check_interval("lr_decay", value, 0.0, 1.0, low_open=True, fix=fix)


def _whole_float(number: Any) -> int | None:
  """The int that a float of whole value (5.0, np.float64(5.0)) stands for, else None."""
  if isinstance(number, (bool, np.bool_, numbers.Integral)) or not isinstance(number, numbers.Real):
    return None
  value = float(number)
  return int(value) if value.is_integer() else None


def check_count(
  name: str, value: Any, minimum: int, fix: str, maximum: int = _COUNT_MAX
) -> int | jax.Array:
  """Checks a concrete integer in [minimum, maximum]; returns it as an int.

  A JAX value is returned as it is, once its shape and dtype are checked.
  """
  if _is_jax_value(value):
    _check_array(name, value, "integer", fix)
    return value
  number = _concrete(name, value, "integer", fix)
  is_int = isinstance(number, numbers.Integral) and not isinstance(number, (bool, np.bool_))
  whole = _whole_float(number)
  if whole is not None and whole >= minimum:
    fix = f"Pass it as an int, {name}={whole}. " + fix  # 5.0 for 5
  if not is_int or number < minimum:
    _fail(name, value, f"an integer >= {minimum}", fix)
  number = int(number)
  if number > maximum:
    _fail(name, value, f"an integer in [{minimum}, {maximum}]", fix)
  return number


def check_logging_interval(value: Any) -> int | jax.Array | None:
  if value is None:
    return None
  return check_count(
    "logging_interval",
    value,
    0,
    "Use None or 0 to turn progress logging off, or N >= 1 to log "
    f"every N steps; the step counter stops at {STEP_COUNT_MAX}, so a "
    "longer interval would never log.",
    maximum=STEP_COUNT_MAX,
  )


def check_logging_name(value: Any) -> str | None:
  if value is None:
    return None
  if not isinstance(value, str) or not all(part.strip() for part in value.split(".")):
    _fail(
      "logging_name",
      value,
      "None or a non-empty string (dot-separated parts, none empty)",
      "Pass a name such as 'disc': the records then go to the logger "
      "'gradient_ascent_jax.disc' and each message starts with 'disc: '.",
    )
  return value


def check_weight_decay(value: Any) -> float | jax.Array | None:
  if value is None:
    return None
  return check_interval(
    "weight_decay",
    value,
    0.0,
    math.inf,
    high_open=True,
    fix="Use None (the default) for no decay, or a small rate such as 1e-4: the "
    "optimizer then ascends on objective - weight_decay/2 * |params|^2.",
  )


def check_weight_decay_mask(value: Any) -> Any:
  """Refuses a single bool: what a callable mask becomes when Optax calls it with the count.

  ``optax.inject_hyperparams`` takes every callable it is not told about for a
  schedule and hands its value at the step count, so ``lambda p: jax.tree.map(
  lambda x: x.ndim > 1, p)`` arrives as ``False``: no leaf would decay, silently.
  """
  if _is_bool_scalar(value):
    shown = _describe_array(value) if _is_jax_value(value) else repr(value)
    raise ValueError(
      "`weight_decay_mask` must be None, a pytree of bools (the params' tree or a "
      "prefix of it) or a callable params -> such a pytree, got a single bool "
      f"({shown}). To decay every leaf, pass None (the default); to decay none, "
      "leave weight_decay out. Under optax.inject_hyperparams a single bool is "
      "what a callable mask turns into: Optax takes every callable it is not told "
      "about for a schedule and calls it with the step count, so the mask never "
      "sees the params. Name it static: optax.inject_hyperparams("
      'gax.gradient_ascent, static_args=("weight_decay_mask",))(...).'
    )
  if value is not None and not callable(value):
    check_mask_leaves(value, "`weight_decay_mask`")
  return value


def _is_bool_scalar(value: Any) -> bool:
  """Whether ``value`` is one bool: Python's, NumPy's, or a 0-d bool array or tracer."""
  return isinstance(value, (bool, np.bool_)) or (
    isinstance(value, (jax.Array, np.ndarray))
    and np.shape(value) == ()
    and jnp.issubdtype(value.dtype, jnp.bool_)
  )


def check_mask_leaves(mask: Any, what: str) -> None:
  """Refuses a mask leaf that is not one bool known when tracing (0.5, 1, "yes", a
  traced or an elementwise array), naming its path: a mask picks whole leaves."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(mask):
    if _is_bool_scalar(leaf) and not isinstance(leaf, jax.core.Tracer):  # known now
      continue
    where = jax.tree_util.keystr(path) or "<root>"
    shown = _describe_array(leaf) if isinstance(leaf, (jax.Array, np.ndarray)) else repr(leaf)
    raise TypeError(
      f"{what}: the leaf at {where} is {shown}, not a bool. Each leaf of the mask "
      "says whether a whole leaf (or subtree) of the params decays: True or False, "
      "known when the step is traced, as optax.masked takes it. Write e.g. "
      "{'w': True, 'b': False}, or a function params -> such a pytree, e.g. "
      "lambda params: jax.tree.map(lambda p: p.ndim > 1, params). To decay part of "
      "one array, split it into leaves of its own."
    )


def weight_decay_enabled(weight_decay: Any) -> bool:
  """Whether the decay stage is needed: for a JAX value (it may be > 0) or a number > 0."""
  if weight_decay is None:
    return False
  return _is_jax_value(weight_decay) or weight_decay > 0


def check_bool(name: str, value: Any) -> Any:
  fix = f"Pass {name}=True or {name}=False."
  if _is_jax_value(value):
    _check_array(name, value, "bool", fix)
    return value
  flag = _concrete(name, value, "bool", fix)
  if not isinstance(flag, (bool, np.bool_)):
    _fail(name, value, "a bool", fix)
  return bool(flag)


def check_accumulator_dtype(value: Any) -> None:
  if value is None:
    return
  if _is_jax_value(value):
    # jnp.float32 is callable: optax.inject_hyperparams takes it for a schedule
    # and hands on jnp.float32(count), an array.
    raise ValueError(
      "`accumulator_dtype` must be None or a floating-point dtype such as "
      f"jnp.float32, got {_describe_array(value)}. Under optax.inject_hyperparams "
      "that is what a dtype turns into: Optax takes every callable it is not told "
      "about (jnp.float32 is one) for a schedule and calls it with the step count. "
      "Name it static: optax.inject_hyperparams(gax.gradient_ascent, "
      'static_args=("accumulator_dtype",))(...), or pass the string "float32".'
    )
  try:
    dtype = jnp.dtype(value)
  except (TypeError, ValueError):
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits < 16:
    _fail(
      "accumulator_dtype",
      value,
      "None or a floating-point dtype of 16 bits or more",
      "Use None to keep the moments in the params' dtype, or e.g. jnp.float32.",
    )
  if jax.dtypes.canonicalize_dtype(dtype) != dtype:
    # JAX would silently make float32 moments, and every update would then
    # refuse the state that init had just made.
    raise ValueError(
      f"`accumulator_dtype` is {dtype.name} (got {value!r}), but 64-bit types are "
      "off in JAX (its default), so the moments would silently be "
      f"{jax.dtypes.canonicalize_dtype(dtype).name}. Enable 64-bit types at "
      "startup, before any array is made: jax.config.update('jax_enable_x64', "
      "True) (or JAX_ENABLE_X64=1 in the environment); or pass "
      "accumulator_dtype=jnp.float32."
    )


def check_at_least(name: str, value: Any, smallest: float, dtype: Any, consequence: str) -> None:
  """Checks, once the dtype is known, that a concrete value does not round to 0 in it."""
  if value is None or _is_jax_value(value) or value >= smallest:
    return
  raise ValueError(
    f"`{name}` must be >= {smallest:.3g} for {jnp.dtype(dtype).name}, where it is "
    f"used, got {value!r}: {consequence} Use a larger `{name}`."
  )


def logging_enabled(logging_interval: Any) -> bool:
  """Whether progress logging can be on; False only for a static None/0."""
  if logging_interval is None:
    return False
  return _is_jax_value(logging_interval) or logging_interval > 0


def check_logging_emit(name: str, value: Any) -> str:
  if not isinstance(value, str) or value not in ("callback", "state"):
    _fail(
      name,
      value,
      '"callback" or "state"',
      'Use "callback" (the default) to log from inside the compiled step, or "state" '
      "to keep the records in the optimizer state and log them with "
      "gax.ProgressReader() from a Python training loop.",
    )
  return value
