"""The host side of ``logging_emit="state"``: reads the records kept in optimizer states."""

from __future__ import annotations

import collections
import logging
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
# keeps its latest record until the next one, and one reader may be handed the
# states of several optimizers in turn.
_REMEMBERED = 8


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
          key.key]
  return tree


def _array(value: Any) -> Any:
  """The array in ``value``, unwrapping a Flax NNX variable (``nnx.Optimizer``'s state)."""
  if isinstance(value, (jax.Array, np.ndarray)) or value is None:
    return value
  get_value = getattr(value, "get_value", None)
  return get_value() if callable(get_value) else getattr(value, "value", value)


def _kept_record(node: Any) -> Any:
  """The record of a ``LogProgressState`` that keeps it in the state, else None."""
  if isinstance(node, progress.LogProgressState):
    return _array(node.record)
  return None


def _host_rows(words: jax.Array) -> np.ndarray:
  """The records in ``words`` as rows of words (one per vmap copy or pmap device)."""
  if isinstance(words, jax.Array) and not words.is_fully_addressable:
    # Several processes: each reads what its own devices hold.
    if words.is_fully_replicated:
      words = words.addressable_data(0)
    else:
      words = np.concatenate([np.asarray(s.data) for s in words.addressable_shards])
  words = np.asarray(words)
  return words.reshape(-1, words.shape[-1])


class _Place:
  """What was seen at one place of a state (one optimizer, one copy)."""

  def __init__(self):
    self.step = -1
    self.recent: collections.deque[bytes] = collections.deque(maxlen=_REMEMBERED)

  def is_new(self, row: np.ndarray) -> bool:
    step, seen = int(row[0]), row.tobytes()
    if step < self.step:  # a new run (the state was initialised again)
      self.recent.clear()
    self.step = step
    if seen in self.recent:
      return False
    self.recent.append(seen)
    return True


class ProgressReader:
  """Logs the progress records that ``logging_emit="state"`` keeps in the optimizer state.

  With ``gax.gradient_ascent(..., logging_interval=N, logging_emit="state")`` (or
  ``gax.log_progress(N, emit="state")``) the compiled step holds no host
  callback: on due steps it writes its record into ``LogProgressState.record``.
  Call the reader with the state once per step, in the Python training loop,
  and ``flush()`` after the loop. It finds every such state in whatever holds
  it (a chain's state, a dict of several optimizers, ``nnx.Optimizer``, a Linen
  ``TrainState``), and logs each record once, on the same logger and with the
  same message and warnings as ``logging_emit="callback"``. It never waits for
  the device on a step it is handed: records of steps still running are copied
  aside (the next step may donate the state) and logged on a later call, or by
  ``flush()``. Never called, it logs nothing, and the step costs the same.

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
    self._places: dict[tuple, _Place] = {}
    self._pending: collections.deque[tuple[tuple, Any]] = collections.deque()
    self._warned_nothing = False

  def __call__(self, state: Any) -> None:
    """Reads the records of the step that produced ``state``; never waits for the device."""
    for path, words in self._records(state):
      if isinstance(words, jax.core.Tracer):
        raise TypeError(
            "ProgressReader: the state holds traced arrays: the reader runs on the host, "
            "in the Python loop. Call reader(state) outside jit, on the state the step "
            "returned.")
      ready = not isinstance(words, jax.Array) or words.is_ready()
      if not self._pending and ready:
        self._log(path, words)
      else:
        self._pending.append((path, words if ready else _copy(words)))
    while self._pending and (len(self._pending) > _MAX_PENDING
                             or not isinstance(self._pending[0][1], jax.Array)
                             or self._pending[0][1].is_ready()):
      self._log(*self._pending.popleft())

  def flush(self) -> None:
    """Logs every record read so far, waiting for the steps still running."""
    while self._pending:
      self._log(*self._pending.popleft())

  def _records(self, state: Any) -> list[tuple[tuple, Any]]:
    paths = self._paths.get(type(state))
    if paths is not None:
      try:
        found = [(path, _kept_record(_follow(state, path))) for path in paths]
      except (LookupError, AttributeError, TypeError):
        found = []
      if found and all(words is not None for _, words in found):
        return found
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, progress.LogProgressState))[0]
    found = [(path, _kept_record(leaf)) for path, leaf in leaves]
    found = [(path, words) for path, words in found if words is not None]
    self._paths[type(state)] = [path for path, _ in found]
    if not found and not self._warned_nothing:
      self._warned_nothing = True
      logger.warning(_NOTHING_TO_READ)
    return found

  def _log(self, path: tuple, words: Any) -> None:
    for copy, row in enumerate(_host_rows(words)):
      place = self._places.setdefault((path, copy), _Place())
      if place.is_new(row) and records.has_news(row):
        records.emit(row)
