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

from gradient_ascent_jax._src import restore
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


def _merged_over_copies(rule):
  """``rule(step, due, *args)`` as a ``custom_vmap`` that sees every copy at once.

  ``jax.debug.callback`` under ``vmap`` runs once per batch element, so one
  call of a vmapped step would log one record per element. The rule decides,
  from the values of that very call (``step`` and ``due`` hold one entry per
  copy), which copies speak; nothing is remembered between calls, so repeated
  runs, threads and several uses of one optimizer keep their records.
  """
  merged = custom_vmap(rule)

  @merged.def_vmap
  def _vmap_rule(axis_size, in_batched, *args):
    # The batch axis becomes more copies to decide over; an enclosing vmap
    # then reaches this rule again with the copies of every level.
    args = [
        arg if batched else jnp.broadcast_to(arg, (axis_size, *jnp.shape(arg)))
        for arg, batched in zip(args, in_batched)
    ]
    return merged(*args), True

  return merged


@_merged_over_copies
def _first_of_its_step(step, due, *payload):
  """Whether no earlier due copy of the same step precedes each copy."""
  del payload  # only here so that vmap over any callback argument reaches the rule
  shape = jnp.shape(step)
  step, due = jnp.ravel(step), jnp.ravel(due)
  earlier = jnp.tril(jnp.ones((step.size, step.size), bool), k=-1)
  repeated = earlier & due[None, :] & (step[:, None] == step[None, :])
  return ~jnp.any(repeated, axis=1).reshape(shape)


@_merged_over_copies
def _any_of_its_step(step, due, flag):
  """Whether any due copy of the same step has ``flag``, for each copy."""
  shape = jnp.shape(step)
  step, due, flag = jnp.ravel(step), jnp.ravel(due), jnp.ravel(flag)
  raised = due[None, :] & flag[None, :] & (step[:, None] == step[None, :])
  return jnp.any(raised, axis=1).reshape(shape)


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


def _stacking_key(leaf) -> tuple:
  """Leaves with one key are stacked: one shape, and one layout where it is known.

  With Explicit mesh axes the layout is in the type, and leaves of one layout
  stack where they lie (stacking two layouts is refused). On Auto axes XLA
  picks the layouts after tracing: leaves of one shape are stacked, and XLA
  may move one into another's layout. Reducing each leaf alone there would
  move only scalars, but compiled in 90 s instead of 1.4 s for 1000 sharded
  leaves on 8 CPU devices.
  """
  return jnp.shape(leaf), getattr(jax.typeof(leaf), "sharding", None)


def _powers_of_two_near(largest: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``2**e`` and ``2**-e``, both normal, with ``largest * 2**-e`` below 4 (below 1 if it can).

  Scaling by a power of two is exact. Dividing by ``largest`` itself is not
  safe: XLA:CPU turns a division into a product with the reciprocal, which
  for a float32 above 2**126 is subnormal, and flushed to zero.
  """
  limit = jnp.finfo(largest.dtype).maxexp - 2
  exponent = jnp.clip(jnp.frexp(largest)[1], -limit, limit)
  one = jnp.ones_like(largest)
  return jnp.ldexp(one, exponent), jnp.ldexp(one, -exponent)


def _global_norm(tree: optax.Updates) -> jax.Array:
  """The L2 norm of all leaves, right wherever the result dtype can hold it.

  Computed in float32 or wider (float64 stays float64) whatever the gradient's
  dtype, and each block scaled by a power of two near its own largest
  magnitude first, so that no square overflows or underflows: a float16
  gradient of 300 has norm 600, not inf. Leaves of one shape and layout are
  stacked, up to ``_STACK_SIZE`` at a time, and each stack is reduced once:
  one reduction per leaf makes XLA's compile time explode with the number of
  leaves, and so does one stack of thousands of leaves. Across devices only
  the two scalars of each block travel when the layouts are known (see
  ``_stacking_key``). No scale computed from all blocks feeds back into a
  block: XLA would copy that computation into each one.
  """
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  dtype = jnp.result_type(jnp.float32, *leaves)
  groups: dict[object, list[jax.Array]] = {}
  for leaf in leaves:
    groups.setdefault(_stacking_key(leaf), []).append(leaf)
  stacks = [
      group[start : start + _STACK_SIZE]
      for group in groups.values()
      for start in range(0, len(group), _STACK_SIZE)
  ]
  largest, scales, squares = [], [], []
  for stack in stacks:
    # Cast and take magnitudes after stacking: one op per stack, not per leaf.
    block = jnp.abs((stack[0] if len(stack) == 1 else jnp.stack(stack)).astype(dtype))
    block_largest = jnp.max(block, initial=0)
    scale, inverse = _powers_of_two_near(block_largest)
    largest.append(block_largest)
    scales.append(scale)
    squares.append(jnp.sum(jnp.square(block * inverse)))
  top = jnp.max(jnp.stack(largest))
  scale, inverse = _powers_of_two_near(top)
  squares = jnp.square(jnp.stack(scales) * inverse) * jnp.stack(squares)
  norm = scale * jnp.sqrt(jnp.sum(squares))
  # An inf or NaN gradient logs inf or NaN, not the NaN that inf / inf makes.
  return jnp.where(jnp.isfinite(top), norm, top)


def _on_one_device(tree: optax.Updates) -> optax.Updates:
  """``tree``, its leaves moved onto one device if they are on different ones."""
  # Op by op, JAX refuses to combine arrays committed to different devices
  # (a pipeline-parallel model run eagerly, say); this only runs on logging steps.
  placements = [transforms.concrete_devices(x) for x in jax.tree.leaves(tree)]
  placements = [devices for devices in placements if devices is not None]
  if len(set(placements)) <= 1:
    return tree
  return jax.device_put(tree, next(iter(placements[0])))


# The descent rule (see log_progress): this many consecutive records below
# the first step's objective by more than _DESCENT_NOISE noise deviations.
# The noise of one recorded value is estimated from the second differences
# of the records (x_k - 2 x_{k-1} + x_{k-2} has variance 6 sigma^2 for
# independent noise), which a steady trend does not inflate.
_DESCENT_RECORDS = 4
_DESCENT_NOISE = 4.0

_DESCENT_WARNING = (
    "gradient_ascent_jax: the objective passed as value= has fallen and stays "
    "down: at each of the last {records} progress records, up to step {step}, "
    "it was below its value at the first step by more than {noise:g} times its "
    "noise. gradient_ascent "
    "increases the objective whose gradient it is given; the gradient of a "
    "loss (or a sign error) makes it descend. Pass the gradient of the "
    "objective to maximize: grads = jax.grad(objective)(params), for a loss "
    "jax.grad(lambda p: -loss(p))(params). If the sign is right, a learning "
    "rate that is too large can also make it fall. This warning is shown once "
    "per optimizer state."
)


class LogProgressState(NamedTuple):
  """State of :func:`log_progress`.

  The fields after ``count`` follow the objective passed as ``value``, at
  logged steps only; without ``value`` they keep their initial values.

  Attributes:
    count: steps already seen, an int32 scalar that saturates at its maximum.
    first_value: the objective at the first step (float32; NaN until then).
    last_value: the objective at the latest record (NaN until then).
    records_below: how many consecutive records the objective was below
      ``first_value`` by more than its noise (int32).
    last_change: the change of the objective from the record before to the
      latest one (NaN until there are two).
    noise_variance: the variance of the noise of one recorded value, estimated
      as the mean square of the second differences of the records over 6.
    noise_samples: how many second differences that mean holds (int32).
    descent_warned: whether the descent warning has been given (bool).

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> state = gax.log_progress(logging_interval=10).init(jnp.ones(2))
    >>> state.count, state.records_below, state.descent_warned
    (Array(0, dtype=int32), Array(0, dtype=int32), Array(False, dtype=bool))
  """

  count: chex.Array  # pyright: ignore[reportIncompatibleMethodOverride]
  first_value: chex.Array
  last_value: chex.Array
  last_change: chex.Array
  records_below: chex.Array
  noise_variance: chex.Array
  noise_samples: chex.Array
  descent_warned: chex.Array


def _check_layout(state: LogProgressState) -> None:
  fields = getattr(state, "_fields", None)
  if fields != LogProgressState._fields:
    raise ValueError(
        f"log_progress: the state is a {type(state).__name__} with the fields "
        f"{fields}, but log_progress now keeps {LogProgressState._fields}. A "
        "state saved by an earlier version (count only) is not read as it is: "
        "make a fresh one with tx.init(params) and carry the step count over, "
        "fresh._replace(count=old.count)."
    )


def _track_descent(state: LogProgressState, value, due) -> tuple[LogProgressState, jax.Array]:
  """The state after the objective ``value`` at a step; whether it now descends."""
  value = jnp.asarray(value, jnp.float32)
  finite = jnp.isfinite(value)
  first = jnp.where(jnp.isnan(state.first_value) & finite, value, state.first_value)
  change = value - state.last_value
  curvature = change - state.last_change
  sampled = ~jnp.isnan(curvature)
  samples = jnp.where(sampled, optax.safe_increment(state.noise_samples), state.noise_samples)
  variance = state.noise_variance + (curvature**2 / 6 - state.noise_variance) / jnp.maximum(
      samples, 1)
  variance = jnp.where(sampled, variance, state.noise_variance)
  below = (samples > 0) & (first - value > _DESCENT_NOISE * jnp.sqrt(variance))
  records_below = jnp.where(below, optax.safe_increment(state.records_below), 0)
  descending = records_below >= _DESCENT_RECORDS
  new = LogProgressState(
      count=state.count, first_value=first, last_value=value,
      last_change=jnp.where(jnp.isnan(change), state.last_change, change),
      records_below=records_below, noise_variance=variance, noise_samples=samples,
      descent_warned=state.descent_warned | descending,
  )
  # A non-finite objective is logged but not counted.
  counted = due & finite
  new = jax.tree.map(lambda after, before: jnp.where(counted, after, before), new, state)
  fires = counted & descending & jnp.logical_not(state.descent_warned)
  return new._replace(first_value=first), fires


def _scalar_objective(value) -> jax.Array:
  value = jnp.asarray(value)
  if value.shape != () or not (
      jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
  ):
    raise ValueError(
        "log_progress: value must be the objective, a real scalar; got "
        f"{value.dtype} of shape {value.shape}. Pass e.g. the first output of "
        "jax.value_and_grad(objective)(params) (reduce a batch to its mean)."
    )
  return jax.lax.stop_gradient(value)


def log_progress(
    logging_interval: jax.typing.ArrayLike | None = 10,
    learning_rate: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Logs the step, objective, learning rate and gradient norm every N steps.

  Passes updates through unchanged. On steps ``t = N, 2N, ...`` (``t`` counts
  from 1) it emits one ``INFO`` record on the logger ``gradient_ascent_jax``
  with the step, the learning rate in force (``learning_rate(t - 1)`` for a
  schedule) and the global L2 norm of the incoming updates (in float32 or
  float64, scaled so that it is right for every gradient dtype; an inf or NaN
  gradient logs inf or NaN, one with no elements 0). The record also
  carries them as attributes ``step``, ``learning_rate`` and ``grad_norm``.

  Pass the objective as ``tx.update(grads, state, params, value=objective)``
  (e.g. from ``jax.value_and_grad``) and the record shows it too, as
  ``objective`` in the message and as the attribute ``value``: the value at
  that step. ``value`` is read as an objective to MAXIMIZE. One ``WARNING``
  (once per optimizer state, so once per run) says so when it falls and stays
  down, which is what the gradient of a loss does to ascent. The rule,
  decided in the compiled step from the values at logged steps (kept in the
  state; the host remembers nothing): at each of the last 4 records the
  objective was below its value at the first step by more than 4 times the
  noise of one record. That noise is estimated from the second differences
  of the records so far (``x_k - 2 x_(k-1) + x_(k-2)``, of variance
  ``6 sigma^2`` for independent noise), which a steady rise or fall leaves
  out. Noisy ascent does not meet it: it stays above where it started, a dip
  of ordinary size is within 4 deviations, and one record above the line
  starts the count again. Values that are not finite are
  logged but not counted. In a chain in front of a descent optimizer
  (minimizing a loss), pass ``value=-loss``, or leave ``value`` out.

  The record is sent with ``jax.debug.callback`` from inside ``jit``; the norm
  is only computed on logging steps. Every call of the update logs its own
  records: repeated runs, threads sharing one optimizer and several uses of it
  (e.g. the groups of ``optax.multi_transform``) each log. Only the copies
  that ``vmap``, ``pmap`` and ``shard_map`` make of one call are merged: one
  record per distinct step (that of the first batch element at that step, on
  the first device; under ``vmap`` the warning comes when any element at that
  step descends). ``optax.MultiSteps`` calls its optimizer on every
  micro-step and keeps the last call's state, so a logging step logs once per
  micro-step; the last record has the norm of the whole accumulated gradient.
  Under ``jax.checkpoint`` (remat) with ``jax.grad`` through it, JAX replays
  the callback when it recomputes the forward pass for the backward pass, so
  each record (and the warning) comes twice; checkpoint the model's forward
  pass rather than the update to log once.
  Run op by op (no ``jit``), leaves may be on different devices. With
  ``logging_interval`` None or 0 this is ``optax.identity()`` (taking and
  ignoring ``value``) and the compiled program holds no host callback.

  Records are ``INFO``, which Python drops until ``logging`` is configured.
  When a record is due and the logger is not enabled for ``INFO``, one
  ``WARNING`` (the first time, once per process) says so and how to see them,
  for example ``logging.basicConfig(level=logging.INFO)``. The descent
  warning is a ``WARNING`` and is shown either way.

  Args:
    logging_interval: N >= 1, or None/0 for off. May be a JAX integer (e.g.
      injected by ``optax.inject_hyperparams``); then 0 means off at run time.
    learning_rate: the rate to report, a float or a schedule; None reports NaN.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`LogProgressState`; its ``update`` takes the keyword ``value``.

  Examples:
    >>> import logging
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> tx = gax.log_progress(logging_interval=2, learning_rate=0.1)
    >>> state = tx.init(jnp.zeros(2))
    >>> for objective in (1.0, 2.0):
    ...   updates, state = tx.update(jnp.array([3.0, 4.0]), state, value=objective)
    >>> int(state.count), float(state.last_value)
    (2, 2.0)
  """
  logging_interval = validation.check_logging_interval(logging_interval)
  if learning_rate is not None:
    learning_rate = validation.check_learning_rate("learning_rate", learning_rate)
  if not validation.logging_enabled(logging_interval):
    return optax.with_extra_args_support(optax.identity())

  def emit(step, rate, grad_norm, show, *objective):
    # Under vmap the cond becomes a select, and copies are elected: filter here.
    if not show:
      return
    step = int(step)
    rate, grad_norm = float(np.asarray(rate)), float(np.asarray(grad_norm))
    if not _warn_once_if_invisible():
      if objective:
        value = float(np.asarray(objective[0]))
        logger.info(
            "step %d: objective %.6g, learning rate %.6g, gradient norm %.6g",
            step, value, rate, grad_norm,
            extra={"step": step, "value": value, "learning_rate": rate, "grad_norm": grad_norm},
        )
      else:
        logger.info(
            "step %d: learning rate %.6g, gradient norm %.6g",
            step, rate, grad_norm,
            extra={"step": step, "learning_rate": rate, "grad_norm": grad_norm},
        )
    if objective and objective[1]:
      logger.warning(
          _DESCENT_WARNING.format(records=_DESCENT_RECORDS, step=step, noise=_DESCENT_NOISE),
          extra={"step": step},
      )

  def rate_at(count):
    if learning_rate is None:
      return jnp.nan
    return schedules.learning_rate_at(learning_rate, count)

  def init_fn(params):
    count = transforms.zero_step_count(params)

    def like_count(fill, dtype):
      # One buffer per field: a donated state must not hold one buffer twice.
      return jnp.full_like(count, fill, dtype)

    return LogProgressState(
        count=count, first_value=like_count(jnp.nan, jnp.float32),
        last_value=like_count(jnp.nan, jnp.float32),
        last_change=like_count(jnp.nan, jnp.float32), records_below=like_count(0, jnp.int32),
        noise_variance=like_count(0, jnp.float32), noise_samples=like_count(0, jnp.int32),
        descent_warned=like_count(False, bool),
    )

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del params, extra_args
    restore.check_own_state(state, LogProgressState, "log_progress")
    _check_layout(state)
    step = cast(jax.Array, optax.safe_increment(state.count))
    interval = jnp.asarray(logging_interval)
    due = (interval > 0) & (step % jnp.maximum(interval, 1) == 0)
    new_state = state._replace(count=step)
    objective = ()
    if value is not None:
      value = _scalar_objective(value)
      new_state, descending = _track_descent(new_state, value, due)
      objective = (value, descending)

    def send(tree, objective):
      grad_norm = _global_norm(tree)
      rate = jnp.asarray(rate_at(state.count), jnp.float32)
      payload = jax.lax.stop_gradient((rate, grad_norm, *objective))
      show = due & _first_of_its_step(step, due, *payload)
      if objective:
        value, descending = objective
        objective = (value, _any_of_its_step(step, due, descending))
      jax.debug.callback(emit, step, rate, grad_norm, show & _on_first_device(), *objective)

    if isinstance(due, jax.core.Tracer):
      jax.lax.cond(due, send, lambda *_: None, updates, objective)
    elif due:  # known now (no jit): a cond would need every leaf on one device
      send(_on_one_device(updates), objective)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
