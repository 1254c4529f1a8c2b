"""Progress logging from inside compiled code, through Python ``logging``."""

from __future__ import annotations

import logging
import math
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

from gradient_ascent_jax._src import placement
from gradient_ascent_jax._src import restore
from gradient_ascent_jax._src import schedules
from gradient_ascent_jax._src import validation

logger = logging.getLogger("gradient_ascent_jax")

_INVISIBLE_WARNING = (
    "{prefix}progress records are due (logging_interval is set) "
    "but the logger '{name}' is not enabled for INFO, so they are "
    "dropped. To see them, call logging.basicConfig(level=logging.INFO), or "
    "add a handler and setLevel(logging.INFO) on "
    "logging.getLogger('{name}'). To stop logging (and its cost "
    "per step), pass logging_interval=None. This warning is shown once."
)
# One warning per logger: silencing one named optimizer must not hide another's.
_invisible_warned: dict[str, threading.Event] = {}
_invisible_warned_lock = threading.Lock()


def _named(logging_name: str | None) -> tuple[logging.Logger, str]:
  """The logger of ``logging_name`` (a child of the library's) and the prefix of its messages."""
  if logging_name is None:
    return logger, ""
  return logger.getChild(logging_name), f"{logging_name}: "


def _warn_once_if_invisible(named_logger: logging.Logger, prefix: str) -> bool:
  """Returns True when INFO records would be dropped; warns the first time."""
  if named_logger.isEnabledFor(logging.INFO):
    return False
  with _invisible_warned_lock:
    shown = _invisible_warned.setdefault(named_logger.name, threading.Event())
  if not shown.is_set():
    shown.set()
    named_logger.warning(_INVISIBLE_WARNING.format(prefix=prefix, name=named_logger.name))
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


@custom_vmap
def _in_any_copy(flag):
  """``flag``; under ``vmap``, whether any copy has it, as one unbatched bool."""
  return flag


@_in_any_copy.def_vmap
def _in_any_copy_rule(axis_size, in_batched, flag):
  # An unbatched predicate keeps the logging cond a cond: a batched one turns
  # it into a select that runs the host callback on every step of every copy.
  del axis_size, in_batched
  return _in_any_copy(jnp.any(flag)), False


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
  placements = [placement.concrete_devices(x) for x in jax.tree.leaves(tree)]
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
    "the objective passed as value= has fallen and stays "
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


_NONFINITE_WARNING = (
    "step {step}: {what} is not finite: the run has diverged. With "
    "gradient_ascent the usual cause is steps that are too large: the first "
    "step moves every parameter by learning_rate / sqrt(1 - beta) (31.6 x "
    "learning_rate for beta=0.999) whatever the size of its gradient, and "
    "momentum then adds to it. Try a learning_rate 3-10 times smaller, "
    "warmup_steps to ramp it up, or clip_value to bound the gradients. The "
    "objective is checked on every step, the gradient norm on logged steps. "
    "This warning is shown once per optimizer state."
)


class LogProgressState(NamedTuple):
  """State of :func:`log_progress`.

  The fields after ``count`` follow the objective passed as ``value``, at
  logged steps only; without ``value`` they keep their initial values. "Not
  yet" is a count or a flag: the state holds no NaN unless the objective was.

  Attributes:
    count: steps already seen, an int32 scalar that saturates at its maximum.
    first_value: the objective at the first step (float32; 0 until
      ``first_seen``).
    last_value: the objective at the latest record (0 until ``records`` >= 1).
    last_change: the change of the objective from the record before to the
      latest one (0 until ``records`` >= 2).
    records_below: how many consecutive records the objective was below
      ``first_value`` by more than its noise (int32).
    noise_variance: the variance of the noise of one recorded value, estimated
      as the mean square of the second differences of the records over 6.
    noise_samples: how many second differences that mean holds (int32).
    descent_warned: whether the descent warning has been given (bool).
    first_seen: whether ``first_value`` holds an objective (bool).
    records: how many finite objectives were recorded at logged steps (int32,
      saturating).
    nonfinite_warned: whether the warning that the objective or the gradient
      norm is not finite has been given (bool).

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
  first_seen: chex.Array
  records: chex.Array
  nonfinite_warned: chex.Array


def _check_layout(state: LogProgressState) -> None:
  fields = getattr(state, "_fields", None)
  if fields != LogProgressState._fields:
    raise ValueError(
        f"log_progress: the state is a {type(state).__name__} with the fields "
        f"{fields}, but log_progress now keeps {LogProgressState._fields}. A "
        "state saved by an earlier version is not read as it is: "
        "make a fresh one with tx.init(params) and carry the step count over, "
        "fresh._replace(count=old.count)."
    )


def _track_descent(state: LogProgressState, value, due) -> tuple[LogProgressState, jax.Array]:
  """The state after the objective ``value`` at a step; whether it now descends."""
  value = jnp.asarray(value, jnp.float32)
  finite = jnp.isfinite(value)
  first = jnp.where(state.first_seen | ~finite, state.first_value, value)
  # A non-finite value is not counted (below): keep it out of the arithmetic,
  # so that no NaN is made from a finite one.
  value = jnp.where(finite, value, state.last_value)
  change = value - state.last_value
  curvature = change - state.last_change
  sampled = state.records >= 2
  samples = jnp.where(sampled, optax.safe_increment(state.noise_samples), state.noise_samples)
  variance = state.noise_variance + (curvature**2 / 6 - state.noise_variance) / jnp.maximum(
      samples, 1)
  variance = jnp.where(sampled, variance, state.noise_variance)
  below = (samples > 0) & (first - value > _DESCENT_NOISE * jnp.sqrt(variance))
  records_below = jnp.where(below, optax.safe_increment(state.records_below), 0)
  descending = records_below >= _DESCENT_RECORDS
  new = LogProgressState(
      count=state.count, first_value=first, last_value=value,
      last_change=jnp.where(state.records >= 1, change, state.last_change),
      records_below=records_below, noise_variance=variance, noise_samples=samples,
      descent_warned=state.descent_warned | descending, first_seen=state.first_seen | finite,
      records=cast(jax.Array, optax.safe_increment(state.records)),
      nonfinite_warned=state.nonfinite_warned,
  )
  # A non-finite objective is logged but not counted. The step counter stays
  # out of the select: under vmap `counted` is batched (the value is), and a
  # batched counter would make `due` batched, the logging cond a select, and
  # the host callback run on every step of every copy.
  counted = due & finite
  new = jax.tree.map(lambda after, before: jnp.where(counted, after, before), new, state)
  fires = counted & descending & jnp.logical_not(state.descent_warned)
  return new._replace(count=state.count, first_value=first,
                      first_seen=state.first_seen | finite), fires


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
    *,
    logging_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Logs the step, objective, learning rate and gradient norm every N steps.

  Passes updates through unchanged. On steps ``t = N, 2N, ...`` (``t`` counts
  from 1) it emits one ``INFO`` record on the logger ``gradient_ascent_jax``
  with the step, the learning rate in force (``learning_rate(t - 1)`` for a
  schedule) and the global L2 norm of the incoming updates, right for every
  dtype; the record carries them as attributes ``step``, ``learning_rate``
  and ``grad_norm``. The record is sent with ``jax.debug.callback`` from
  inside ``jit``; the norm is only computed on logged steps.

  Pass the objective as ``tx.update(grads, state, params, value=objective)``
  and the record shows it too (attribute ``value``). It is read as an
  objective to MAXIMIZE: one ``WARNING`` (once per optimizer state) says so
  when it falls and stays down, as the gradient of a loss makes ascent do.
  Passing ``value, grads = jax.value_and_grad(loss)(params)`` as they are
  ascends the loss while its logged value rises, which no warning can tell:
  negate both, ``jax.value_and_grad(lambda p: -loss(p))``. In front of a
  descent optimizer, pass ``value=-loss`` or leave ``value`` out. When the
  objective or the logged norm first is not finite, one ``WARNING`` names the
  step and the usual fixes. Both rules are decided in the compiled step from
  the state; the host remembers nothing.

  The copies that ``vmap``, ``pmap`` and ``shard_map`` make of one call give
  one record per step; every call of the update (repeated runs, threads,
  ``multi_transform`` groups) logs its own. With ``logging_interval`` None or
  0 this is ``optax.identity()`` (taking and ignoring ``value``) and the
  compiled program holds no host callback, which ``jax.export`` needs.
  Records are ``INFO``, which Python drops until ``logging`` is configured:
  then one ``WARNING`` (once per logger) says how to see them.

  The rules, and how records behave under ``MultiSteps``, ``jax.checkpoint``
  and several devices: the math page's "Progress records and warnings".

  Args:
    logging_interval: N >= 1, or None/0 for off. May be a JAX integer (e.g.
      injected by ``optax.inject_hyperparams``); then 0 means off at run time.
    learning_rate: the rate to report, a float or a schedule; None reports NaN.
    logging_name: None, or a name such as ``"disc"``: records and warnings go
      to the child logger ``gradient_ascent_jax.disc`` (handlers on
      ``gradient_ascent_jax`` still see them) and start with ``disc:``.

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
  named_logger, prefix = _named(validation.check_logging_name(logging_name))
  if not validation.logging_enabled(logging_interval):
    return optax.with_extra_args_support(optax.identity())

  def emit(step, rate, grad_norm, show, nonfinite, value_nonfinite, *objective):
    # Copies are elected under vmap (and pmap's devices): filter here.
    if nonfinite:
      what = "the objective passed as value=" if value_nonfinite else "the gradient norm"
      named_logger.warning(prefix + _NONFINITE_WARNING.format(step=int(step), what=what),
                           extra={"step": int(step)})
    if not show:
      return
    step = int(step)
    rate = math.nan if learning_rate is None else float(np.asarray(rate))
    grad_norm = float(np.asarray(grad_norm))
    if not _warn_once_if_invisible(named_logger, prefix):
      if objective:
        value = float(np.asarray(objective[0]))
        named_logger.info(
            "%sstep %d: objective %.6g, learning rate %.6g, gradient norm %.6g",
            prefix, step, value, rate, grad_norm,
            extra={"step": step, "value": value, "learning_rate": rate, "grad_norm": grad_norm},
        )
      else:
        named_logger.info(
            "%sstep %d: learning rate %.6g, gradient norm %.6g",
            prefix, step, rate, grad_norm,
            extra={"step": step, "learning_rate": rate, "grad_norm": grad_norm},
        )
    if objective and objective[1]:
      named_logger.warning(
          prefix + _DESCENT_WARNING.format(
              records=_DESCENT_RECORDS, step=step, noise=_DESCENT_NOISE),
          extra={"step": step},
      )

  def rate_at(count):
    if learning_rate is None:  # reported as NaN by the host: no NaN on the device
      return 0.0
    return schedules.learning_rate_at(learning_rate, count)

  def init_fn(params):
    count = placement.zero_step_count(params)

    def like_count(fill, dtype):
      # One buffer per field: a donated state must not hold one buffer twice.
      return jnp.full_like(count, fill, dtype)

    return LogProgressState(
        count=count, first_value=like_count(0, jnp.float32),
        last_value=like_count(0, jnp.float32),
        last_change=like_count(0, jnp.float32), records_below=like_count(0, jnp.int32),
        noise_variance=like_count(0, jnp.float32), noise_samples=like_count(0, jnp.int32),
        descent_warned=like_count(False, bool), first_seen=like_count(False, bool),
        records=like_count(0, jnp.int32), nonfinite_warned=like_count(False, bool),
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

    # The objective is checked on every step (a scalar: cheap), the gradient
    # norm where it is computed: on logged steps, and on the step that warns.
    # Under pmap/shard_map the norm is each device's own: only the objective
    # is checked there, so that the state stays what the devices share.
    value_bad = ~jnp.isfinite(objective[0]) if objective else jnp.zeros((), bool)
    value_fires = value_bad & ~state.nonfinite_warned
    norm_checked = not jax.sharding.get_abstract_mesh().manual_axes

    def send(tree, objective):
      grad_norm = _global_norm(tree)
      rate = jnp.asarray(rate_at(state.count), jnp.float32)
      payload = jax.lax.stop_gradient((rate, grad_norm, *objective))
      show = due & _first_of_its_step(step, due, *payload)
      fires = value_fires
      if norm_checked:
        fires = fires | (~jnp.isfinite(grad_norm) & ~state.nonfinite_warned)
      speak = due | fires
      warns = speak & _first_of_its_step(step, speak, *payload) & _any_of_its_step(
          step, speak, fires)
      value_warns = _any_of_its_step(step, speak, fires & value_bad)
      if objective:
        value, descending = objective
        objective = (value, _any_of_its_step(step, due, descending))
      on_first = _on_first_device()
      jax.debug.callback(emit, step, rate, grad_norm, show & on_first, warns & on_first,
                         value_warns, *objective)
      return fires if norm_checked else None

    def skip(*_):
      return jnp.zeros((), bool) if norm_checked else None

    fires = value_fires
    if isinstance(due, jax.core.Tracer):
      fired = jax.lax.cond(_in_any_copy(due | value_fires), send, skip, updates, objective)
    elif due | value_fires:  # known now (no jit): a cond would need every leaf on one device
      fired = send(_on_one_device(updates), objective)
    else:
      fired = None
    if fired is not None:
      fires = fires | fired
    return updates, new_state._replace(nonfinite_warned=new_state.nonfinite_warned | fires)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
