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
import jax.numpy as jnp
import numpy as np
import optax

from gradient_ascent_jax._src import copies
from gradient_ascent_jax._src import gradient_norm
from gradient_ascent_jax._src import once
from gradient_ascent_jax._src import placement
from gradient_ascent_jax._src import schedules
from gradient_ascent_jax._src import state_checks
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


def _named(logging_name: str | None) -> tuple[logging.Logger, str]:
  """The logger of ``logging_name`` (a child of the library's) and the prefix of its messages."""
  if logging_name is None:
    return logger, ""
  return logger.getChild(logging_name), f"{logging_name}: "


def _warn_once_if_invisible(named_logger: logging.Logger, prefix: str) -> bool:
  """Returns True when INFO records would be dropped; warns the first time."""
  if named_logger.isEnabledFor(logging.INFO):
    return False
  once.warn_once(
      once.flag_for(_invisible_warned, named_logger.name),
      _INVISIBLE_WARNING.format(prefix=prefix, name=named_logger.name),
      named_logger,
  )
  return True


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
    record: None on the callback path; with ``emit="state"`` the latest
      progress record, packed for :class:`ProgressReader`.

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
  record: chex.Array | None = None


def _check_layout(state: LogProgressState) -> None:
  if getattr(state, "_fields", None) != LogProgressState._fields:
    raise state_checks.earlier_layout("log_progress", state, LogProgressState._fields)


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
      fields = {"step": step, "learning_rate": rate, "grad_norm": grad_norm}
      shown = "%sstep %d: learning rate %.6g, gradient norm %.6g"
      if objective:  # the record carries the objective too, in its message and as .value
        fields["value"] = float(np.asarray(objective[0]))
        shown = "%sstep %d: objective %.6g, learning rate %.6g, gradient norm %.6g"
      named_logger.info(
          shown, prefix, *[fields[key] for key in ("step", "value", "learning_rate", "grad_norm")
                           if key in fields], extra=fields)
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
    state_checks.check_own_state(state, LogProgressState, "log_progress")
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
      grad_norm = gradient_norm.global_norm(tree)
      rate = jnp.asarray(rate_at(state.count), jnp.float32)
      payload = jax.lax.stop_gradient((rate, grad_norm, *objective))
      show = due & copies.first_of_its_step(step, due, *payload)
      fires = value_fires
      if norm_checked:
        fires = fires | (~jnp.isfinite(grad_norm) & ~state.nonfinite_warned)
      speak = due | fires
      warns = speak & copies.first_of_its_step(step, speak, *payload) & copies.any_of_its_step(
          step, speak, fires)
      value_warns = copies.any_of_its_step(step, speak, fires & value_bad)
      if objective:
        value, descending = objective
        objective = (value, copies.any_of_its_step(step, due, descending))
      on_first = copies.on_first_device()
      jax.debug.callback(emit, step, rate, grad_norm, show & on_first, warns & on_first,
                         value_warns, *objective)
      return fires if norm_checked else None

    def skip(*_):
      return jnp.zeros((), bool) if norm_checked else None

    fires = value_fires
    if isinstance(due, jax.core.Tracer):
      fired = jax.lax.cond(copies.in_any_copy(due | value_fires), send, skip, updates, objective)
    elif due | value_fires:  # known now (no jit): a cond would need every leaf on one device
      fired = send(gradient_norm.on_one_device(updates), objective)
    else:
      fired = None
    if fired is not None:
      fires = fires | fired
    return updates, new_state._replace(nonfinite_warned=new_state.nonfinite_warned | fires)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
