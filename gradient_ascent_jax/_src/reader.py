"""The host side of ``logging_emit="state"``: reads the records kept in optimizer states."""

from __future__ import annotations

import collections
import collections.abc
import logging
import time
import typing
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from gradient_ascent_jax._src import progress
from gradient_ascent_jax._src import records

logger = logging.getLogger("gradient_ascent_jax")

_NOTHING_TO_READ = (
  "ProgressReader: the state it was given holds no progress records kept in the "
  "state, so it logs nothing. Records are kept there only with logging on and "
  "logging_emit='state': gax.gradient_ascent(..., logging_interval=N, "
  "logging_emit='state') or gax.log_progress(N, emit='state'). With the default "
  "logging_emit='callback' the step logs by itself and needs no reader. This "
  "warning is shown once per reader."
)

# Records not yet read, of steps the device has not finished. Past this many the
# reader waits for the oldest: the device still has the newer steps to run.
_MAX_PENDING = 64
# Distinct records remembered per place, so that each is logged once though a state
# keeps its latest record until the next one.
_REMEMBERED = 8
# Records that are ready are logged at most this often (and at once while the
# reader still learns a logging interval): in a fast loop several at a time. On
# XLA:CPU the host's time is taken from the step's, and a batch of records costs
# it less than the same records one call apart (the benchmarks' MLP at interval
# 10: 1.046x logging off against 1.060x).
_DRAIN_SECONDS = 0.25


@jax.jit
def _copy(words: jax.Array) -> jax.Array:
  # A buffer of its own: the next step may donate the state that holds ``words``.
  return words + jnp.uint32(0)


def _follow(tree: Any, path: tuple) -> Any:
  """The node at ``path`` (a key path of ``jax.tree_util``) in ``tree``."""
  for key in path:
    if isinstance(key, jax.tree_util.SequenceKey):
      tree = tree[key.idx]
    elif isinstance(key, jax.tree_util.DictKey):
      tree = tree[key.key]
    elif isinstance(key, jax.tree_util.GetAttrKey):
      tree = getattr(tree, key.name)
    else:  # FlattenedIndexKey: a node that names no keys
      node = tree
      tree = jax.tree_util.tree_flatten(node, is_leaf=lambda x, node=node: x is not node)[0][
        key.key
      ]
  return tree


def _array(value: Any) -> Any:
  """The array in ``value``, unwrapping a Flax NNX variable (``nnx.Optimizer``'s state)."""
  if isinstance(value, (jax.Array, np.ndarray)) or value is None:
    return value
  # The stored array as it is (0.3 us), where it is one; else get_value() (15 us in
  # Flax 0.12), which also reads a mutable array reference.
  get_raw_value = getattr(value, "get_raw_value", None)
  if callable(get_raw_value):
    raw = get_raw_value()
    if isinstance(raw, (jax.Array, np.ndarray)):
      return raw
  get_value = getattr(value, "get_value", None)
  return get_value() if callable(get_value) else getattr(value, "value", value)


# The fields a state-path LogProgressState holds; the others are None.
_KEPT_FIELDS = frozenset({"count", "record"})
_FIELDS = frozenset(progress.LogProgressState._fields)


def _kept_mapping(node: Any) -> Any:
  """The record of ``node`` if it is a state path's ``LogProgressState`` as a mapping
  of its fields, else None.

  Flax NNX's ``nnx.split`` and ``nnx.state`` keep a NamedTuple's fields by name
  but not its type (``{"count": ..., "record": ...}``; the fields the state path
  leaves None are gone), and so does a checkpoint restored into plain dicts
  (Flax's ``to_state_dict`` and msgpack, orbax without a target), where those
  fields may stay as None.
  """
  if not isinstance(node, collections.abc.Mapping) or not _KEPT_FIELDS <= set(node.keys()):
    return None
  if any(
    key not in _FIELDS or (key not in _KEPT_FIELDS and value is not None)
    for key, value in node.items()
  ):
    return None
  words = _array(node["record"])
  if (
    isinstance(words, (jax.Array, np.ndarray))
    and words.dtype == np.uint32
    and words.ndim >= 1
    and words.shape[-1] >= records.SHORTEST
  ):
    return words
  return None


def _kept_record(node: Any) -> Any:
  """The record of a ``LogProgressState`` that keeps it in the state, else None."""
  if isinstance(node, progress.LogProgressState):
    return _array(node.record)
  return _kept_mapping(node)


def _holds_records(node: Any) -> bool:
  return isinstance(node, progress.LogProgressState) or _kept_mapping(node) is not None


def _ready(words: Any) -> bool:
  """Whether ``words`` can be read without waiting (a host array always can)."""
  return not isinstance(words, jax.Array) or bool(typing.cast(Any, words).is_ready())


def _host_rows(words: Any) -> np.ndarray:
  """The records in ``words`` as rows of words (one per vmap copy or pmap device)."""
  if isinstance(words, jax.Array) and not words.is_fully_addressable:
    # Several processes: each reads what its own devices hold.
    if words.is_fully_replicated:
      words = words.addressable_data(0)
    else:
      words = np.concatenate([np.asarray(s.data) for s in words.addressable_shards])
  words = np.asarray(words)
  return words.reshape(-1, words.shape[-1])


class _Copy:
  """What was logged of one copy's records (one vmap copy or pmap device)."""

  def __init__(self):
    self.count = -1
    self.due: collections.deque[tuple[int, ...]] = collections.deque(maxlen=_REMEMBERED)
    self.warnings: collections.deque[tuple[int, ...]] = collections.deque(maxlen=_REMEMBERED)

  def news(self, row: list[int]) -> tuple[bool, bool]:
    """Whether the warning and the due record in ``row`` are new (then remembered)."""
    count = records.count(row)
    if count < self.count:  # a new run (the state was initialised again)
      self.due.clear()
      self.warnings.clear()
    self.count = count
    seen = []
    for part, remembered in (
      (records.warning_part(row), self.warnings),
      (records.due_part(row), self.due),
    ):
      seen.append(part not in remembered)
      if seen[-1]:
        remembered.append(part)
    return seen[0], seen[1]


def _calls_to_next_record(row: list[int]) -> int:
  """Steps from the state that held ``row`` to the next due step; 1 where unknown."""
  interval = records.interval(row)
  if not interval:
    return 1
  return interval - records.count(row) % interval


class _Place:
  """One place of a state that keeps records: when it was read, and what it held."""

  def __init__(self):
    self.next_read = 0  # the call that reads next: that of the next due step
    self.interval = 0  # learned from the records (0: not yet)
    self.last_read = 0  # the call of the latest read
    self.copies: collections.defaultdict[int, _Copy] = collections.defaultdict(_Copy)
    self.seen: tuple[int, int] | None = None  # (call, step count) of the latest read logged
    # Called less than once per step (more steps than calls between two reads): a
    # record may then stay in the state for fewer calls than its interval, so every
    # call reads. So it does until the pace is known (two reads logged), and where
    # the interval is injected (it may be shortened between two records).
    self.every_call = False
    self.pace_known = False
    self.interval_may_change = False

  def calls_for(self, steps: int) -> int:
    """The calls in which ``steps`` steps pass, as far as the reader can tell."""
    if self.every_call or not self.pace_known or self.interval_may_change:
      return 1
    return steps

  def learn_pace(self, call: int, rows: list[list[int]]) -> None:
    """Notes the step count read at ``call``, from which the pace of calls is learned.

    The pace is known from the second read on: one read alone cannot tell one
    call per step from one call every few steps.
    """
    count = max(records.count(row) for row in rows)
    seen = self.seen
    if seen is not None and call > seen[0] and count - seen[1] > call - seen[0]:
      self.every_call = True
    self.seen = (call, count)
    self.pace_known = self.pace_known or seen is not None


class ProgressReader:
  """Logs the progress records that ``logging_emit="state"`` keeps in the optimizer state.

  With ``gax.gradient_ascent(..., logging_interval=N, logging_emit="state")`` (or
  ``gax.log_progress(N, emit="state")``) the compiled step holds no host
  callback: on due steps it writes its record into ``LogProgressState.record``.
  Call the reader with the state once per step, in the Python training loop,
  and ``flush()`` after the loop. It finds every such state in whatever holds
  it (a chain's state, a dict of several optimizers, ``nnx.Optimizer``, a Linen
  ``TrainState``, the ``State`` of ``nnx.split`` or its ``nnx.to_pure_dict``),
  and logs each record once, on the same logger and with the
  same message and warnings as ``logging_emit="callback"``. It reads one state
  per logging interval, that of the due step (called every few steps instead, or
  with an injected ``logging_interval``, it reads every call, and logs each
  record that a state it is handed holds; so it does until two of its reads tell
  it the pace), and never waits for the device:
  the record of a step still running is copied aside (the next step may donate
  the state) and logged on a later call, or by ``flush()``. In a fast loop it
  logs the records that are ready in batches, at most every quarter second
  (each batch costs the step less than its records one call apart). Never
  called, it logs nothing, and the step costs the same. Give each optimizer its
  own reader, or hand one reader the container of all.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> tx = gax.gradient_ascent(0.1, logging_interval=2, logging_emit="state")
    >>> params = jnp.zeros(2)
    >>> state, reader = tx.init(params), gax.ProgressReader()
    >>> step = jax.jit(lambda p, s: tx.update(jnp.ones(2), s, p))
    >>> for _ in range(4):
    ...   updates, state = step(params, state)
    ...   reader(state)
    >>> reader.flush()  # logs the records of steps 2 and 4, if not done yet
  """

  def __init__(self) -> None:
    self._paths: dict[type, list[tuple]] = {}
    self._places: collections.defaultdict[tuple, _Place] = collections.defaultdict(_Place)
    self._pending: collections.deque[tuple[tuple, Any, int]] = collections.deque()
    self._calls = 0
    self._next_read = 0  # the earliest call that reads a place (see _Place.next_read)
    self._latest: dict[type, Any] = {}  # the latest state of each type, read by flush()
    self._warned_nothing = False
    self._drain_at = 0.0  # when to log the pending records that are ready (time.monotonic)

  def __call__(self, state: Any) -> None:
    """Reads the records of the step that produced ``state``; never waits for the device."""
    self._calls += 1
    known = type(state) in self._latest
    self._latest[type(state)] = state
    # Between due steps a call only remembers the state: its host time comes out of
    # the step's on XLA:CPU, where the host and the device share the cores.
    if self._calls >= self._next_read or not known:
      self._read(state)
    if self._pending and (len(self._pending) > _MAX_PENDING or time.monotonic() >= self._drain_at):
      self._drain()

  def _drain(self) -> None:
    """Logs the pending records that are ready (past ``_MAX_PENDING``, waits for the oldest)."""
    while self._pending and (len(self._pending) > _MAX_PENDING or _ready(self._pending[0][1])):
      self._log(*self._pending.popleft())
    # Until every place knows its interval and the pace of calls, log what is ready
    # on every call: until then each call reads (and copies).
    learning = not all(place.interval and place.pace_known for place in self._places.values())
    self._drain_at = 0.0 if learning else time.monotonic() + _DRAIN_SECONDS

  def _read(self, state: Any) -> None:
    for path, words in self._records(state):
      if isinstance(words, jax.core.Tracer):
        raise TypeError(
          "ProgressReader: the state holds traced arrays: the reader runs on the host, "
          "in the Python loop. Call reader(state) outside jit, on the state the step "
          "returned."
        )
      place = self._places[path]
      # Read the states of due steps only (one step per call): reading a running
      # step's record is a copy, and a copy makes the next step, which donates the
      # state, wait for it. A record stays in the state until the next due step, so
      # one read off by a few steps still sees it, and each read sets the next.
      if self._calls < place.next_read:
        continue
      # Until this read is logged, expect the next record an interval on.
      place.last_read = self._calls
      place.next_read = self._calls + place.calls_for(place.interval or 1)
      ready = _ready(words)
      if not self._pending and ready:
        self._log(path, words, self._calls)
      else:
        # Copied aside, ready or not: it waits behind the records still pending, and
        # the next step may donate the state. (A NumPy view of it would hold the
        # buffer and keep that step from donating it.)
        self._pending.append((path, _copy(words), self._calls))
    self._set_next_read()

  def _set_next_read(self) -> None:
    self._next_read = min((place.next_read for place in self._places.values()), default=0)

  def flush(self) -> None:
    """Logs every record not logged yet, waiting for the steps still running."""
    while self._pending:
      self._log(*self._pending.popleft())
    for state in self._latest.values():
      for path, latest in self._records(state):
        if not (isinstance(latest, jax.Array) and latest.is_deleted()):
          self._log(path, latest)
    self._latest.clear()

  def _records(self, state: Any) -> list[tuple[tuple, Any]]:
    paths = self._paths.get(type(state))
    if paths is not None:
      try:
        found = [(path, _kept_record(_follow(state, path))) for path in paths]
      except (LookupError, AttributeError, TypeError):
        found = []
      if found and all(words is not None for _, words in found):
        return found
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=_holds_records)[0]
    found = [(path, _kept_record(leaf)) for path, leaf in leaves]
    found = [(path, words) for path, words in found if words is not None]
    self._paths[type(state)] = [path for path, _ in found]
    if not found and not self._warned_nothing:
      self._warned_nothing = True
      logger.warning(_NOTHING_TO_READ)
    return found

  def _log(self, path: tuple, words: Any, call: int | None = None) -> None:
    place = self._places[path]
    rows = _host_rows(words).tolist()
    if call is not None:
      # Learned from any read, also one logged after later reads (the host ran
      # ahead): else the reader would copy on every call while it waits to learn.
      place.interval = min(records.interval(row) for row in rows)
      place.interval_may_change = any(records.interval_may_change(row) for row in rows)
      steps = min(_calls_to_next_record(row) for row in rows)
      place.learn_pace(call, rows)  # until the pace is known, calls_for gives 1
      following = call + place.calls_for(steps)
      latest = call == place.last_read
      place.next_read = following if latest else max(place.next_read, following)
      self._set_next_read()
    for copy, row in enumerate(rows):
      warning, due = place.copies[copy].news(row)
      if warning or due:
        records.emit(row, warning=warning, due=due)
