"""Progress logging from inside compiled code, through Python ``logging``."""

from __future__ import annotations

import logging
import threading
from typing import NamedTuple
from typing import cast

import chex
import jax
import jax.core
from jax.custom_batching import custom_vmap
import jax.numpy as jnp
import numpy as np
import optax

from gradient_ascent_jax._src import schedules
from gradient_ascent_jax._src import transforms
from gradient_ascent_jax._src import validation

logger = logging.getLogger("gradient_ascent_jax")

_INVISIBLE_WARNING = (
    "gradient_ascent_jax: progress records are due (logging_interval is set) "
    "but the logger 'gradient_ascent_jax' is not enabled for INFO, so they are "
    "dropped. To see them, call logging.basicConfig(level=logging.INFO), or "
    "add a handler and setLevel(logging.INFO) on "
    "logging.getLogger('gradient_ascent_jax'). To stop logging (and its cost "
    "per step), pass logging_interval=None. This warning is shown once."
)
_invisible_warned = threading.Event()


def _warn_once_if_invisible() -> bool:
  """Returns True when INFO records would be dropped; warns the first time."""
  if logger.isEnabledFor(logging.INFO):
    return False
  transforms.warn_once(_invisible_warned, _INVISIBLE_WARNING)
  return True


@custom_vmap
def _first_of_its_step(step, due, *payload):
  """Whether no earlier due copy of the same step precedes each copy.

  ``jax.debug.callback`` under ``vmap`` runs once per batch element, so one
  call of a vmapped step would log one record per element. This elects one
  copy per distinct step from the values of that very call (``step`` and
  ``due`` hold one entry per copy); nothing is remembered between calls, so
  repeated runs, threads and several uses of one optimizer keep their records.
  """
  del payload  # only here so that vmap over any callback argument reaches the rule
  shape = jnp.shape(step)
  step, due = jnp.ravel(step), jnp.ravel(due)
  earlier = jnp.tril(jnp.ones((step.size, step.size), bool), k=-1)
  repeated = earlier & due[None, :] & (step[:, None] == step[None, :])
  return ~jnp.any(repeated, axis=1).reshape(shape)


@_first_of_its_step.def_vmap
def _first_of_its_step_vmap(axis_size, in_batched, *args):
  # The batch axis becomes more copies to elect from; an enclosing vmap then
  # reaches this rule again with the copies of every level.
  args = [
      arg if batched else jnp.broadcast_to(arg, (axis_size, *jnp.shape(arg)))
      for arg, batched in zip(args, in_batched)
  ]
  return _first_of_its_step(*args), True


def _on_first_device() -> jax.Array | bool:
  """False on all devices but the first of ``pmap`` / ``shard_map``'s manual axes."""
  # There the callback runs once per device, with no batch axis to elect from.
  manual_axes = tuple(jax.sharding.get_abstract_mesh().manual_axes)
  if not manual_axes:
    return True
  return jax.lax.axis_index(manual_axes) == 0


# Leaves per stack in the logged norm. One stack of 5000 two-element leaves
# compiled in 28-30 s on XLA:CPU (the logging stage alone); stacks of 50,
# 100, 500 and 1000 leaves took 8.0, 7.2, 8.7 and 9.4 s.
_STACK_SIZE = 100


def _global_norm(tree: optax.Updates) -> jax.Array:
  """The L2 norm of all leaves, right wherever the result dtype can hold it.

  Computed in float32 or wider (float64 stays float64) whatever the gradient's
  dtype, and divided by the largest magnitude first, so that no square
  overflows or underflows: a float16 gradient of 300 has norm 600, not inf.
  Leaves of one shape are stacked, up to ``_STACK_SIZE`` at a time, and each
  stack is reduced once: one reduction per leaf makes XLA's compile time
  explode with the number of leaves, and so does one stack of thousands of
  leaves; raveling every leaf into one vector would make a sharded program
  gather them all.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  dtype = jnp.result_type(jnp.float32, *leaves)
  by_shape: dict[tuple[int, ...], list[jax.Array]] = {}
  for leaf in leaves:
    by_shape.setdefault(jnp.shape(leaf), []).append(leaf)
  stacks = [
      group[start : start + _STACK_SIZE]
      for group in by_shape.values()
      for start in range(0, len(group), _STACK_SIZE)
  ]
  # Cast and take magnitudes after stacking: one op per stack, not per leaf.
  blocks = [
      jnp.abs((stack[0] if len(stack) == 1 else jnp.stack(stack)).astype(dtype))
      for stack in stacks
  ]
  largest = jnp.max(jnp.stack([jnp.max(block, initial=0) for block in blocks]))
  scale = jnp.where((largest > 0) & jnp.isfinite(largest), largest, 1)
  squares = jnp.stack([jnp.sum(jnp.square(block / scale)) for block in blocks])
  norm = scale * jnp.sqrt(jnp.sum(squares))
  # An inf or NaN gradient logs inf or NaN, not the NaN that inf / inf makes.
  return jnp.where(jnp.isfinite(largest), norm, largest)


def _on_one_device(tree: optax.Updates) -> optax.Updates:
  """``tree``, its leaves moved onto one device if they are on different ones."""
  # Op by op, JAX refuses to combine arrays committed to different devices
  # (a pipeline-parallel model run eagerly, say); this only runs on logging steps.
  placements = [transforms.concrete_devices(x) for x in jax.tree.leaves(tree)]
  placements = [devices for devices in placements if devices is not None]
  if len(set(placements)) <= 1:
    return tree
  return jax.device_put(tree, next(iter(placements[0])))


class LogProgressState(NamedTuple):
  """State of :func:`log_progress`.

  Attributes:
    count: steps already seen, an int32 scalar that saturates at its maximum.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> gax.log_progress(logging_interval=10).init(jnp.ones(2))
    LogProgressState(count=Array(0, dtype=int32))
  """

  count: chex.Array  # pyright: ignore[reportIncompatibleMethodOverride]


def log_progress(
    logging_interval: jax.typing.ArrayLike | None = 10,
    learning_rate: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformation:
  """Logs the step, learning rate and gradient norm every N steps.

  Passes updates through unchanged. On steps ``t = N, 2N, ...`` (``t`` counts
  from 1) it emits one ``INFO`` record on the logger ``gradient_ascent_jax``
  with the step, the learning rate in force (``learning_rate(t - 1)`` for a
  schedule) and the global L2 norm of the incoming updates (in float32 or
  float64, scaled so that it is right for every gradient dtype; an inf or NaN
  gradient logs inf or NaN, one with no elements 0). The record also
  carries them as attributes ``step``, ``learning_rate`` and ``grad_norm``.

  The record is sent with ``jax.debug.callback`` from inside ``jit``; the norm
  is only computed on logging steps. Every call of the update logs its own
  records: repeated runs, threads sharing one optimizer and several uses of it
  (e.g. the groups of ``optax.multi_transform``) each log. Only the copies
  that ``vmap``, ``pmap`` and ``shard_map`` make of one call are merged: one
  record per distinct step (that of the first batch element at that step, on
  the first device). ``optax.MultiSteps`` calls its optimizer on every
  micro-step and keeps the last call's state, so a logging step logs once per
  micro-step; the last record has the norm of the whole accumulated gradient.
  Run op by op (no ``jit``), leaves may be on different devices. With
  ``logging_interval`` None or 0 this is ``optax.identity()`` and the compiled
  program holds no host callback.

  Records are ``INFO``, which Python drops until ``logging`` is configured.
  When a record is due and the logger is not enabled for ``INFO``, one
  ``WARNING`` (the first time, once per process) says so and how to see them,
  for example ``logging.basicConfig(level=logging.INFO)``.

  Args:
    logging_interval: N >= 1, or None/0 for off. May be a JAX integer (e.g.
      injected by ``optax.inject_hyperparams``); then 0 means off at run time.
    learning_rate: the rate to report, a float or a schedule; None reports NaN.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`LogProgressState`.

  Examples:
    >>> import logging
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> tx = gax.log_progress(logging_interval=2, learning_rate=0.1)
    >>> state = tx.init(jnp.zeros(2))
    >>> for _ in range(2):
    ...   updates, state = tx.update(jnp.array([3.0, 4.0]), state)
    >>> int(state.count)
    2
  """
  logging_interval = validation.check_logging_interval(logging_interval)
  if learning_rate is not None:
    learning_rate = validation.check_learning_rate("learning_rate", learning_rate)
  if not validation.logging_enabled(logging_interval):
    return optax.identity()

  def emit(step, rate, grad_norm, show):
    # Under vmap the cond becomes a select, and copies are elected: filter here.
    if not show or _warn_once_if_invisible():
      return
    step = int(step)
    rate, grad_norm = float(np.asarray(rate)), float(np.asarray(grad_norm))
    logger.info(
        "step %d: learning rate %.6g, gradient norm %.6g",
        step,
        rate,
        grad_norm,
        extra={"step": step, "learning_rate": rate, "grad_norm": grad_norm},
    )

  def rate_at(count):
    if learning_rate is None:
      return jnp.nan
    return schedules.learning_rate_at(learning_rate, count)

  def init_fn(params):
    return LogProgressState(count=transforms.zero_step_count(params))

  def update_fn(updates, state, params=None):
    del params
    step = cast(jax.Array, optax.safe_increment(state.count))
    interval = jnp.asarray(logging_interval)
    due = (interval > 0) & (step % jnp.maximum(interval, 1) == 0)

    def send(tree):
      grad_norm = _global_norm(tree)
      rate = jnp.asarray(rate_at(state.count), jnp.float32)
      show = due & _first_of_its_step(step, due, *jax.lax.stop_gradient((rate, grad_norm)))
      jax.debug.callback(emit, step, rate, grad_norm, show & _on_first_device())

    if isinstance(due, jax.core.Tracer):
      jax.lax.cond(due, send, lambda tree: None, updates)
    elif due:  # known now (no jit): a cond would need every leaf on one device
      send(_on_one_device(updates))
    return updates, LogProgressState(count=step)

  return optax.GradientTransformation(init_fn, update_fn)
