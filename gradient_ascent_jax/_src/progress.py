"""Progress logging: the ``log_progress`` transform and the rules it applies in the compiled step.

What a record holds and how the host logs it is in ``records``; the host-side
reader of records kept in the state is ``reader``.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any
from typing import NamedTuple
from typing import cast

import chex
import jax
import jax.core
import jax.numpy as jnp
import optax

from gradient_ascent_jax._src import copies
from gradient_ascent_jax._src import gradient_norm
from gradient_ascent_jax._src import placement
from gradient_ascent_jax._src import records
from gradient_ascent_jax._src import schedules
from gradient_ascent_jax._src import state_checks
from gradient_ascent_jax._src import validation


class LogProgressState(NamedTuple):
  """State of :func:`log_progress`.

  The fields after ``count`` follow the objective passed as ``value``, at
  logged steps only; without ``value`` they keep their initial values. "Not
  yet" is a count or a flag: the state holds no NaN unless the objective was.
  With ``emit="state"`` those fields are None and ``record`` holds them, packed
  (so that a step hands JAX two arrays of this state, not twelve, and a step
  that logs nothing passes one array through its ``lax.cond``).

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
      progress record, packed for :class:`ProgressReader`, and the fields
      above (a uint32 array).

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


def _check_emit(state: LogProgressState, emit: str) -> None:
  if (state.record is not None) == (emit == "state"):
    return
  made_by, wanted = ("callback", "state") if state.record is None else ("state", "callback")
  raise ValueError(
    f"log_progress: this state was made by an optimizer with logging_emit={made_by!r} "
    f"(log_progress(emit={made_by!r})), but this one has {wanted!r}: the state path "
    "keeps its records in LogProgressState.record, the callback path holds None there. "
    "Use the same setting as the optimizer that made the state, or carry the run over "
    "to this one: state = gax.carry_over(state, tx.init(params)), which keeps every "
    "moment and count."
  )


# On the state path the rules' state lives in the record's BOOK_WORDS, so that a step
# that logs nothing passes one array through its cond (and a donated step hands JAX
# two leaves, not twelve): the words in order, then one word of flags.
_BOOK = (
  ("first_value", jnp.float32),
  ("last_value", jnp.float32),
  ("last_change", jnp.float32),
  ("records_below", jnp.int32),
  ("noise_variance", jnp.float32),
  ("noise_samples", jnp.int32),
  ("records", jnp.int32),
)
_FLAGS = (("descent_warned", 1), ("first_seen", 2), ("nonfinite_warned", 4))
_FLAGS_WORD = records.BOOK_WORDS[0] + len(_BOOK)


def _kept(count: Any, record: Any) -> LogProgressState:
  """A state of the state path: the count, and the record that holds all else."""
  rest: dict[str, Any] = dict.fromkeys(LogProgressState._fields[1:-1])
  return LogProgressState(count=count, record=record, **rest)


def _flag(record: jax.Array, name: str) -> jax.Array:
  return (record[..., _FLAGS_WORD] & dict(_FLAGS)[name]) != 0


def unpacked(state: LogProgressState) -> LogProgressState:
  """``state`` with the fields of the state path's record filled in (else ``state``)."""
  if state.first_value is not None or state.record is None:
    return state
  record = jnp.asarray(state.record)
  first = records.BOOK_WORDS[0]
  fields = {
    name: jax.lax.bitcast_convert_type(record[..., first + i], dtype)
    for i, (name, dtype) in enumerate(_BOOK)
  }
  fields.update({name: _flag(record, name) for name, _ in _FLAGS})
  return LogProgressState(count=state.count, record=state.record, **fields)


def packed(fields: dict[str, Any]) -> LogProgressState:
  """The state path's state of all of a ``LogProgressState``'s fields (arrays, or what
  a checkpoint gives back): its record holds all but the count."""
  return _packed(LogProgressState(**fields))


def _packed(state: LogProgressState) -> LogProgressState:
  """A filled-in state of the state path (see ``unpacked``) kept in its record again."""
  words = [
    jax.lax.bitcast_convert_type(jnp.asarray(getattr(state, name), dtype), jnp.uint32)
    for name, dtype in _BOOK
  ]
  words.append(records.bits(*((getattr(state, name), bit) for name, bit in _FLAGS)))
  record = jnp.asarray(state.record)
  book = jnp.stack([jnp.broadcast_to(w, record.shape[:-1]) for w in words], axis=-1)
  return _kept(state.count, record.at[..., slice(*records.BOOK_WORDS)].set(book))


def _first_objective(state: LogProgressState, value: jax.Array) -> LogProgressState:
  """The state with ``first_value``: the objective at the first step where it is finite."""
  value = jnp.asarray(value, jnp.float32)
  seen = jnp.logical_or(state.first_seen, jnp.isfinite(value))
  first = jnp.where(state.first_seen | ~seen, state.first_value, value)
  return state._replace(first_value=first, first_seen=seen)


def _descent_rule(state: LogProgressState, value, due) -> tuple[LogProgressState, jax.Array]:
  """The state after the objective ``value`` at a step; whether the descent warning fires.

  The rule: ``records.DESCENT_RECORDS`` consecutive records below the first
  step's objective (``state.first_value``, see ``_first_objective``) by more than
  ``records.DESCENT_NOISE`` noise deviations. The noise of one recorded value is
  estimated from the second differences of the records (``x_k - 2 x_{k-1} +
  x_{k-2}`` has variance ``6 sigma^2`` for independent noise), which a steady
  trend does not inflate.
  """
  value = jnp.asarray(value, jnp.float32)
  finite = jnp.isfinite(value)
  # A non-finite value is not counted (below): keep it out of the arithmetic,
  # so that no NaN is made from a finite one.
  value = jnp.where(finite, value, state.last_value)
  change = value - state.last_value
  curvature = change - state.last_change
  sampled = state.records >= 2
  samples = jnp.where(sampled, optax.safe_increment(state.noise_samples), state.noise_samples)
  variance = state.noise_variance + (curvature**2 / 6 - state.noise_variance) / jnp.maximum(
    samples, 1
  )
  variance = jnp.where(sampled, variance, state.noise_variance)
  # The first value is one noisy sample too: the difference of two values has twice
  # the variance of one.
  below = (samples > 0) & (
    state.first_value - value > records.DESCENT_NOISE * jnp.sqrt(2 * variance)
  )
  records_below = jnp.where(below, optax.safe_increment(state.records_below), 0)
  descending = records_below >= records.DESCENT_RECORDS
  new = state._replace(
    last_value=value,
    last_change=jnp.where(state.records >= 1, change, state.last_change),
    records_below=records_below,
    noise_variance=variance,
    noise_samples=samples,
    descent_warned=state.descent_warned | descending,
    records=cast(jax.Array, optax.safe_increment(state.records)),
  )
  # A non-finite value is logged but not counted. The step counter stays out of
  # the select: under vmap `counted` is batched (the value is), and a batched
  # counter would make `due` batched, the logging cond a select, and the host
  # callback run on every step of every copy.
  counted = due & finite
  new = jax.tree.map(lambda after, before: jnp.where(counted, after, before), new, state)
  fires = counted & descending & jnp.logical_not(state.descent_warned)
  return new, fires


def _agreed_objective(value) -> tuple[jax.Array, jax.Array]:
  """The objective the rules read, and whether it is not finite on any device.

  The non-finite rule is checked on every step. Under ``pmap`` and ``shard_map``
  the devices agree on it: the objective of any device counts, so the first
  device (the one that logs) warns and every device's state remembers it. The
  descent rule and the record read the first device's objective. Where
  ``shard_map`` types what varies over its axes (``check_vma=True``), the first
  device's objective goes to every device in the all-reduce of the flag, so
  that the state is the same on all of them (as ``out_specs=P()`` needs); else
  each device keeps its own, and the first device's state is the one read.
  """
  bad = ~jnp.isfinite(value)
  axes = copies.manual_axes()
  if not axes:
    return value, bad
  if not copies.tracks_varying():
    return value, jax.lax.psum(bad.astype(jnp.int32), axes) > 0
  axes = copies.varying_axes(value)
  if not axes:  # the same on every device already: no collective
    return value, bad
  first = jnp.where(copies.on_first_device(axes), value, jnp.zeros_like(value))
  agreed = jax.lax.psum(jnp.stack([first, bad.astype(value.dtype)]), axes)
  return agreed[0], agreed[1] > 0


def _nonfinite_fires(value, value_bad, warned) -> jax.Array:
  """Whether the non-finite warning for the objective fires: where not yet ``warned``."""
  return value_bad if value is None else value_bad & jnp.logical_not(warned)


def _elect(measured, state, step, due, objective, value_bad, value_fires, rate, interval, on_first):
  """The record of a step where some copy is due or warns, and what fired.

  The gradient norm is computed here, on those steps only, and its non-finite
  rule applied where it is the whole gradient's: under ``pmap`` / ``shard_map``
  it is each device's own, and only the objective is checked. Of the copies
  that ``vmap``, ``pmap`` and ``shard_map`` make, one speaks per step (module
  ``copies``); the warnings count when any copy meets their rule. ``on_first``
  says whether this device is the one that speaks (see ``_speak``).
  """
  grad_norm = gradient_norm.norm_of(measured)
  value, descending = objective or (jnp.zeros((), jnp.float32), jnp.zeros((), bool))
  payload = jax.lax.stop_gradient((rate, grad_norm, *objective[:1]))
  fires = value_fires
  if not copies.manual_axes():
    fires = fires | (~jnp.isfinite(grad_norm) & ~state.nonfinite_warned)
  speak = due | fires
  show = due & copies.first_of_its_step(step, due, *payload)
  warns = (
    speak
    & copies.first_of_its_step(step, speak, *payload)
    & copies.any_of_its_step(step, speak, fires)
  )
  record = records.Record(
    step=step,
    interval=interval,
    learning_rate=rate,
    grad_norm=grad_norm,
    value=jax.lax.stop_gradient(value),
    show=show & on_first,
    descending=copies.any_of_its_step(step, due, descending) if objective else descending,
    warn_step=step,
    nonfinite=warns & on_first,
    value_nonfinite=copies.any_of_its_step(step, speak, fires & value_bad),
  )
  return record, fires


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


def _empty_record(count: jax.Array, settings: _Settings) -> jax.Array:
  """A record with nothing to log, its interval and name set, placed as the step counter is."""
  first = records.pack(
    records.Record(
      step=0,
      interval=settings.interval,
      learning_rate=0.0,
      grad_norm=0.0,
      value=0.0,
      show=False,
      descending=False,
      warn_step=0,
      nonfinite=False,
      value_nonfinite=False,
    ),
    has_value=False,
    has_rate=False,
    name=settings.name,
  )
  # Nothing to log (step 0, no flag set), but the name and the width of the floats
  # are there from the start: a warning written before the first due step is logged
  # by the optimizer's own logger, with its name, as on the callback path.
  # The run's number tells the reader a new run from the same steps of an earlier one.
  words = first.at[records.RUN_WORD].set(next(_runs) % 2**32)
  # Placed as the counter is: replicated over the params' mesh where init put it
  # there (committed), else left uncommitted, so that the step, jit or pmap can
  # put the state beside the data as it puts every other leaf.
  if placement.concrete_devices(count) is not None and count.committed:
    words = jax.device_put(words, count.sharding)
  return words


# Numbers for the runs of the state path, one per init made outside jit.
_runs = itertools.count(1)


class _Settings(NamedTuple):
  """What one ``log_progress`` was built with, checked."""

  interval: jax.typing.ArrayLike
  learning_rate: optax.ScalarOrSchedule | None
  name: str | None
  emit: str


def _rate_at(settings: _Settings, count) -> jax.Array:
  if settings.learning_rate is None:  # reported as NaN by the host: no NaN on the device
    return jnp.zeros((), jnp.float32)
  return jnp.asarray(schedules.learning_rate_at(settings.learning_rate, count), jnp.float32)


def _init(settings: _Settings, params) -> LogProgressState:
  count = placement.zero_step_count(params)
  if settings.emit == "state":
    # The rules' state starts at zeros (0.0, False, 0), as the fields below do.
    return _kept(count, _empty_record(count, settings))

  def like_count(fill, dtype):
    # One buffer per field: a donated state must not hold one buffer twice.
    return jnp.full_like(count, fill, dtype)

  return LogProgressState(
    count=count,
    first_value=like_count(0, jnp.float32),
    last_value=like_count(0, jnp.float32),
    last_change=like_count(0, jnp.float32),
    records_below=like_count(0, jnp.int32),
    noise_variance=like_count(0, jnp.float32),
    noise_samples=like_count(0, jnp.int32),
    descent_warned=like_count(False, bool),
    first_seen=like_count(False, bool),
    records=like_count(0, jnp.int32),
    nonfinite_warned=like_count(False, bool),
  )


def _speak(settings: _Settings, measured, state, step, due, objective, value_bad, value_fires):
  """The branch taken where some copy is due or warns: sends the record, or keeps it.

  Under ``pmap`` and ``shard_map`` the first device speaks: it alone sends its
  record, and it alone marks the record it keeps as one to log. Where
  ``shard_map`` types what varies over its axes (``check_vma=True``), every
  device keeps the first device's record instead, so that the state is the same
  on all of them (as ``out_specs=P()`` needs): one all-reduce on such steps,
  where the record varies (the gradient norm is each device's own).
  """
  keeps_first = settings.emit == "state" and copies.tracks_varying()
  record, fires = _elect(
    measured,
    state,
    step,
    due,
    objective,
    value_bad,
    value_fires,
    _rate_at(settings, state.count),
    settings.interval,
    True if keeps_first else copies.on_first_device(),
  )
  words = records.pack(
    record,
    has_value=bool(objective),
    has_rate=settings.learning_rate is not None,
    name=settings.name,
  )
  if settings.emit == "state":
    # A due step writes its record; the non-finite warning, given once per state, is
    # written apart and kept, so that the record changes only every interval steps.
    # It is written where this copy's rule fired, and where this copy is the one
    # elected to log a warning that another copy of the step fired (vmap).
    index = jnp.arange(words.shape[-1])
    warning = (index == records.WARNING_WORDS[0]) | (index == records.WARNING_WORDS[1])
    replace = jnp.where(warning, fires | record.nonfinite, due) & (index != records.RUN_WORD)
    kept = jnp.where(replace, words, state.record)
    return (copies.of_first_device(kept) if keeps_first else kept), fires
  jax.debug.callback(records.emit, words)
  return state.record, fires


def _logging_step(settings: _Settings, measured, state, step, due, value, value_bad, value_fires):
  """The fields after ``count`` at a step where some copy is due or warns.

  Only such steps apply the descent rule, measure the gradient and write or
  send a record: the other steps take the cond's other branch, which keeps the
  fields as they are.
  """
  objective = ()
  new = state
  if value is not None:
    new, descending = _descent_rule(state, value, due)
    objective = (value, descending)
  record, fires = _speak(settings, measured, state, step, due, objective, value_bad, value_fires)
  return tuple(new._replace(nonfinite_warned=new.nonfinite_warned | fires, record=record)[1:])


def _update(settings: _Settings, updates, state, params=None, *, value=None, **extra_args):
  del params, extra_args
  state_checks.check_own_state(state, LogProgressState, "log_progress")
  _check_layout(state)
  _check_emit(state, settings.emit)
  step = cast(jax.Array, optax.safe_increment(state.count))
  interval = jnp.asarray(settings.interval)
  due = (interval > 0) & (step % jnp.maximum(interval, 1) == 0)
  value_bad = jnp.zeros((), bool)
  if value is not None:
    value, value_bad = _agreed_objective(_scalar_objective(value))
  if settings.emit == "state":
    return _update_kept(settings, updates, state, step, due, value, value_bad)
  if value is not None:
    # The cond's operand keeps the count the step started from (the rate in force).
    state = _first_objective(state, value)
  value_fires = _nonfinite_fires(value, value_bad, state.nonfinite_warned)
  updates, fields = _on_logging_steps(
    due | value_fires,
    functools.partial(_logging_step, settings),
    lambda state: tuple(state[1:]),
    updates,
    state,
    step,
    due,
    value,
    value_bad,
    value_fires,
  )
  return updates, LogProgressState(step, *cast(Any, fields))


def _on_logging_steps(wanted, branch, keep, updates, operand, *args):
  """``(updates, branch(measured, operand, *args))`` where ``wanted`` (in some copy), else
  ``(updates, keep(operand))``; ``measured`` is the gradient as ``gradient_norm.norm_of``
  takes it, and ``updates`` hold the leaves it measured apart (see ``measure_apart``)."""
  if isinstance(wanted, jax.core.Tracer):
    wanted = copies.in_any_copy(wanted)
    updates, measured = gradient_norm.measure_apart(updates, wanted)
    return updates, jax.lax.cond(
      wanted,
      branch,
      lambda measured, operand, *_: keep(operand),
      measured,
      operand,
      *args,
    )
  if wanted:  # known now (no jit): a cond would need every leaf on one device
    updates, measured = gradient_norm.measure_apart(updates, wanted)
    return updates, branch(gradient_norm.on_one_device(measured), operand, *args)
  return updates, keep(operand)


def _update_kept(
  settings: _Settings, updates, state, step, due, value, value_bad
) -> tuple[optax.Updates, LogProgressState]:
  """The state path's step: all but the count lives in the record, which only the
  branch of steps where some copy is due, warns or sees its first objective unpacks."""
  record = jnp.asarray(state.record)
  value_fires = _nonfinite_fires(value, value_bad, _flag(record, "nonfinite_warned"))
  wanted = due | value_fires
  if value is not None:
    wanted = wanted | (~_flag(record, "first_seen") & jnp.isfinite(value))

  def logging_step(measured, record, count, *args):
    full = unpacked(_kept(count, record))
    if value is not None:
      full = _first_objective(full, value)
    fields = _logging_step(settings, measured, full, *args)
    return _packed(LogProgressState(count, *cast(Any, fields))).record

  updates, record = _on_logging_steps(
    wanted,
    logging_step,
    lambda record: record,
    updates,
    record,
    state.count,
    step,
    due,
    value,
    value_bad,
    value_fires,
  )
  # The reader learns from the count where the state is between records.
  record = jnp.asarray(record).at[..., records.COUNT_WORD].set(step.astype(jnp.uint32))
  return updates, _kept(step, record)


def log_progress(
  logging_interval: jax.typing.ArrayLike | None = 10,
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  logging_name: str | None = None,
  emit: str = "callback",
) -> optax.GradientTransformationExtraArgs:
  """Logs the step, objective, learning rate and gradient norm every N steps.

  Passes updates through unchanged. On steps ``t = N, 2N, ...`` (``t`` counts
  from 1) one ``INFO`` record goes to the logger ``gradient_ascent_jax`` with the
  step, the learning rate in force and the global L2 norm of the incoming
  updates (attributes ``step``, ``learning_rate``, ``grad_norm``), and the
  objective when it is passed as ``update(..., value=objective)`` (attribute
  ``value``). One ``WARNING`` says when that objective falls and stays down, and
  one when it or the norm is not finite. With ``emit="callback"`` the record
  leaves the compiled step through ``jax.debug.callback``; with ``emit="state"``
  it is kept in the state, and :class:`ProgressReader` logs it from the host,
  which keeps every step on JAX's fast dispatch path. The rules, the two paths
  and how records behave under ``vmap``, ``pmap`` and ``MultiSteps``: the math
  page's "Progress records and warnings" and the performance page. With
  :func:`maximize`, chain it outside: ``optax.chain(log_progress(10),
  maximize(optax.adam(1e-3)))``. Inside ``maximize`` it is handed the loss
  (``-value``) and would warn that a healthy ascent falls.

  Args:
    logging_interval: N >= 1, or None/0 for off (then this is
      ``optax.identity()``, taking and ignoring ``value``). May be a JAX integer
      (e.g. injected by ``optax.inject_hyperparams``); then 0 means off at run time.
    learning_rate: the rate to report, a float or a schedule; None leaves it
      out of the message (the log record's ``learning_rate`` is then NaN).
    logging_name: None, or a name such as ``"disc"``: records and warnings go to
      the child logger ``gradient_ascent_jax.disc`` and start with ``disc:``.
    emit: ``"callback"`` (the default) or ``"state"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`LogProgressState`; its ``update`` takes the keyword ``value``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> tx = gax.log_progress(logging_interval=2, learning_rate=0.1, emit="state")
    >>> reader = gax.ProgressReader()
    >>> state = tx.init(jnp.zeros(2))
    >>> for objective in (1.0, 2.0):
    ...   updates, state = tx.update(jnp.array([3.0, 4.0]), state, value=objective)
    ...   reader(state)
    >>> reader.flush()
    >>> int(state.count), state.last_value is None  # the record holds the rest
    (2, True)
  """
  logging_interval = validation.check_logging_interval(logging_interval)
  if learning_rate is not None:
    learning_rate = validation.check_learning_rate("learning_rate", learning_rate)
  return unchecked_log_progress(
    logging_interval,
    learning_rate,
    validation.check_logging_name(logging_name),
    validation.check_logging_emit("emit", emit),
  )


def unchecked_log_progress(
  logging_interval, learning_rate, logging_name, emit
) -> optax.GradientTransformationExtraArgs:
  """:func:`log_progress` of arguments checked already."""
  if not validation.logging_enabled(logging_interval):
    return optax.with_extra_args_support(optax.identity())
  settings = _Settings(
    interval=logging_interval, learning_rate=learning_rate, name=logging_name, emit=emit
  )
  init: Any = functools.partial(_init, settings)
  update: Any = functools.partial(_update, settings)
  return optax.GradientTransformationExtraArgs(init, update)
