"""Carries an optimizer state saved by an earlier version over into today's layout."""

# The states are walked as NamedTuples of any type, which pyright sees as plain tuples.
# pyright: reportAttributeAccessIssue=false, reportArgumentType=false

from __future__ import annotations

import collections
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradient_ascent_jax._src import progress

# LogProgressState's fields in 0.1.0, in their order (which pickles keep). 0.2.0
# added first_seen, records and nonfinite_warned; record came after 0.2.0.
_LOG_PROGRESS_0_1_0 = (
  "count",
  "first_value",
  "last_value",
  "last_change",
  "records_below",
  "noise_variance",
  "noise_samples",
  "descent_warned",
)
_LOG_PROGRESS_0_2_0 = _LOG_PROGRESS_0_1_0 + ("first_seen", "records", "nonfinite_warned")

# What a 0.1.0 pickle of a LogProgressState becomes: a state of the old layout, which
# update refuses (naming carry_over) and carry_over reads by its field names.
_LogProgressState010 = collections.namedtuple("LogProgressState", _LOG_PROGRESS_0_1_0)
_LogProgressState010.__qualname__ = "_LogProgressState010"
_LogProgressState010.__module__ = __name__


def _accept_0_1_0_pickles() -> None:
  """Lets unpickling build a 0.1.0 LogProgressState from its eight values.

  Unpickling calls ``LogProgressState.__new__(cls, *values)`` with the values of
  the layout that was saved, which today's fields do not take. A ``typing.NamedTuple``
  refuses a ``__new__`` in its body, so it is wrapped here.
  """
  new = progress.LogProgressState.__new__

  @functools.wraps(new)
  def __new__(cls, *args, **kwargs):
    if cls is progress.LogProgressState and not kwargs and len(args) == len(_LOG_PROGRESS_0_1_0):
      return _LogProgressState010(*args)
    return new(cls, *args, **kwargs)

  progress.LogProgressState.__new__ = staticmethod(__new__)  # pyright: ignore


_accept_0_1_0_pickles()


def _log_progress_fields(
  fields: dict[str, Any], target: Any, path: str, abstract_ok: bool
) -> dict[str, Any]:
  """The fields of an earlier LogProgressState, in today's layout."""
  if set(fields) == set(_LOG_PROGRESS_0_1_0):
    # 0.1.0 marked "not yet" with NaN; today it is a flag or a count, and zeros.
    fields = dict(fields)
    count = jnp.asarray(fields["count"])
    first, last, change = (
      jnp.asarray(fields[name], jnp.float32)
      for name in ("first_value", "last_value", "last_change")
    )
    samples = jnp.asarray(fields["noise_samples"], jnp.int32)
    fields["first_seen"] = ~jnp.isnan(first)
    # The samples of the noise start at the third record (the first second difference).
    third_on = jnp.minimum(samples, jnp.iinfo(jnp.int32).max - 2) + 2
    fields["records"] = jnp.where(
      jnp.isnan(last), 0, jnp.where(jnp.isnan(change), 1, third_on)
    ).astype(jnp.int32)
    for name, value in (("first_value", first), ("last_value", last), ("last_change", change)):
      fields[name] = jnp.where(jnp.isnan(value), 0, value).astype(jnp.float32)
    fields["nonfinite_warned"] = jnp.zeros_like(count, bool)  # 0.1.0 had no such warning
  fields = dict(fields)
  fields.setdefault("record", None)  # 0.1.0 and 0.2.0 kept no record
  # The state path keeps the rules' state in its record (the fields are None there).
  old_kept = _empty(fields["first_value"]) and not _empty(fields["record"])
  target_kept = target.first_value is None and target.record is not None
  if old_kept == target_kept:
    return fields
  if old_kept:  # to the callback path: the rules' state comes out of the record
    kept = progress.LogProgressState(**{**fields, "first_value": None})
    state = progress.unpacked(kept)
    return {**state._asdict(), "record": None}
  # To the state path: the latest record is only what to log next, so a run saved
  # before records were kept, or by the callback path, goes on with the target's.
  record = target.record
  if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(record)):
    if not abstract_ok:
      raise ValueError(
        f"carry_over: at {path}.record the target holds only a shape, but the state "
        "given keeps no record of this kind. Pass target=tx.init(params) itself "
        "(not its jax.eval_shape), whose record is the initial one."
      )
    # A dry run: the step count is the run's, the record the target's (a shape).
    return {**target._asdict(), "count": fields["count"]}
  return progress.packed({**fields, "record": record})._asdict()


# How the fields of a state type's earlier layouts become today's, by type.
_EARLIER_LAYOUTS = {progress.LogProgressState: _log_progress_fields}


def _a(name: str) -> str:
  return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def _is_state_node(node: Any) -> bool:
  return isinstance(node, tuple) and hasattr(node, "_fields")


def _describe(tree: Any) -> str:
  if isinstance(tree, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)):
    return f"{jnp.dtype(tree.dtype).name}{list(jnp.shape(tree))}"
  if _is_state_node(tree):
    return f"{_a(type(tree).__name__)} with the fields {tree._fields}"
  if isinstance(tree, dict):
    return f"a dict with the keys {sorted(tree, key=str)}"
  if isinstance(tree, (list, tuple)):
    stages = ""
    if tree and all(hasattr(entry, "_fields") for entry in tree):
      stages = " (" + ", ".join(type(entry).__name__ for entry in tree) + ")"
    return f"a {type(tree).__name__} of {len(tree)} entries{stages}"
  return "None" if tree is None else _a(type(tree).__name__)


def _empty(tree: Any) -> bool:
  """Whether ``tree`` holds no array: how a checkpoint gives back an empty state."""
  return tree is None or (isinstance(tree, (dict, list, tuple)) and not jax.tree.leaves(tree))


def _carry(old: Any, target: Any, path: str, abstract_ok: bool) -> Any:
  def refuse(what: str) -> ValueError:
    leaves = jax.tree.leaves(target, is_leaf=_is_state_node)
    if not path and target is not None and not any(map(_is_state_node, leaves)):
      # No state type anywhere in it: the params (or another tree) in the target's place.
      return ValueError(
        f"carry_over: the target holds {_describe(target)} and no optimizer state "
        "type (the NamedTuples that tx.init(params) returns). Pass the state of the "
        "optimizer that continues the run, carry_over(old_state, tx.init(params)), "
        "not the params."
      )
    return ValueError(
      f"carry_over: at {path or 'the top'} the target holds {_describe(target)}, but "
      f"the state given holds {what}. The state does not come from this optimizer "
      "with these settings (logging_interval, clip_value, weight_decay, "
      "accumulator_dtype, the params' shapes and dtypes must be those of the saved "
      "run): build tx and params as the saved run did, then carry_over(old_state, "
      "tx.init(params))."
    )

  if target is None:
    if not _empty(old):
      raise refuse(_describe(old))
    return None
  if _is_state_node(target):
    if not target._fields:  # an empty state: orbax gives it back as None, msgpack as {}
      if not _empty(old) or (
        hasattr(old, "_fields") and type(old).__name__ != type(target).__name__
      ):
        raise refuse(_describe(old))
      return type(target)()
    if _is_state_node(old):
      if type(old).__name__ != type(target).__name__:
        raise refuse(_describe(old))
      fields = dict(zip(old._fields, old))
    elif isinstance(old, dict):
      fields = dict(old)
    else:
      raise refuse(_describe(old))
    convert = _EARLIER_LAYOUTS.get(type(target))
    if convert is not None:
      fields = convert(fields, target, path, abstract_ok)
    if set(fields) != set(target._fields):
      raise refuse(f"the fields {tuple(fields)}")
    return type(target)(
      **{
        name: _carry(fields[name], getattr(target, name), f"{path}.{name}", abstract_ok)
        for name in target._fields
      }
    )
  if isinstance(target, (tuple, list)):
    if isinstance(old, dict) and set(old) == {str(i) for i in range(len(old))}:
      old = [old[str(i)] for i in range(len(old))]  # msgpack keys a sequence by index
    if not isinstance(old, (tuple, list)) or len(old) != len(target):
      raise refuse(_describe(old))
    return type(target)(
      _carry(entry, expected, f"{path}[{i}]", abstract_ok)
      for i, (entry, expected) in enumerate(zip(old, target))
    )
  if isinstance(target, dict):
    if not isinstance(old, dict) or set(map(str, old)) != set(map(str, target)):
      raise refuse(_describe(old))
    by_name = {str(key): value for key, value in old.items()}
    return type(target)(
      (key, _carry(by_name[str(key)], value, f"{path}[{key!r}]", abstract_ok))
      for key, value in target.items()
    )
  dry = abstract_ok and isinstance(old, jax.ShapeDtypeStruct)  # the target's own, above
  if not (dry or isinstance(old, (jax.Array, np.ndarray, np.generic))):
    raise refuse(_describe(old))
  dtype = target.dtype if hasattr(target, "dtype") else jnp.result_type(target)
  if jnp.shape(old) != jnp.shape(target) or jnp.dtype(old.dtype) != jnp.dtype(dtype):
    raise refuse(_describe(old))
  if dry:
    return old
  sharding = getattr(target, "sharding", None)
  return jnp.asarray(old) if sharding is None else jax.device_put(old, sharding)


def carried(old_state: Any, target: Any, abstract_ok: bool = False) -> Any:
  """``carry_over``; with ``abstract_ok``, a shape stands for a value it lacks (a dry run)."""
  return _carry(old_state, target, "", abstract_ok)


def carry_over(old_state: Any, target: Any) -> Any:
  """Carries a run's optimizer state over into the layout of this version.

  Takes the state of a run as it was loaded: saved by an earlier version
  (whose state types had other fields), or restored without a target (orbax's
  ``checkpointer.restore(path)``, flax's ``serialization.msgpack_restore``:
  plain dicts and lists), or a pickle. Returns the state of ``target``'s
  types holding the run's values, so that the run continues: moments,
  velocity and step counts are kept bit for bit, and fields that an earlier
  version did not have are derived from the ones it had (0.1.0 marked "not
  yet" with NaN, which becomes a flag or a count and zeros). An earlier
  version's next steps are matched to float32 rounding (this version may
  order a step's arithmetic differently); this version's own, bit for bit.

  Args:
    old_state: the optimizer state as loaded.
    target: ``tx.init(params)`` of the optimizer that continues the run, built
      with the saved run's settings, or its ``jax.eval_shape``. Each array is
      placed as the target's is.

  Returns:
    The state, in ``target``'s structure and types, for ``tx.update``.

  Raises:
    ValueError: where the state cannot be carried over: a stage missing or
      added, another optimizer's state, or arrays of other shapes or dtypes.
      The message names the path and what was expected and found.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> tx = gax.gradient_ascent(learning_rate=0.1, logging_interval=10)
    >>> params = {"w": jnp.ones(3)}
    >>> _, state = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    >>> # Restored without a target, a checkpoint gives plain lists and dicts:
    >>> restored = [stage._asdict() for stage in state]
    >>> state = gax.carry_over(restored, tx.init(params))
    >>> int(state[-1].count)
    1
  """
  return carried(old_state, target)
