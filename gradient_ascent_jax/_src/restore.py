"""What a checkpoint restored without a target looks like, and what to say about it."""

from __future__ import annotations

from typing import Any

# orbax's checkpointer.restore(path) and flax's msgpack_restore give the arrays back in
# plain dicts and lists: the state types are lost, and re-initialising loses the run.
_WITHOUT_TARGET = (
    "a checkpoint restored without a target, as orbax's checkpointer.restore(path) "
    "and flax's serialization.msgpack_restore give it"
)
_RESTORE_INTO_TARGET = (
    "Do not replace it with tx.init(params), which starts over: restore the "
    "checkpoint into the structure of tx.init(params). With orbax: "
    "checkpointer.restore(path, jax.eval_shape(lambda: tx.init(params))) "
    "(ocp.StandardCheckpointer), or manager.restore(step, "
    "args=ocp.args.StandardRestore(jax.eval_shape(lambda: tx.init(params)))) "
    "(ocp.CheckpointManager). With flax: serialization.from_bytes(tx.init(params), "
    "blob), or serialization.from_state_dict(tx.init(params), restored). If you "
    "saved a dict such as {'params': ..., 'opt_state': ...}, restore into that dict "
    "with tx.init(params) as its 'opt_state'."
)


def restored_without_target(name: str, state: Any) -> ValueError:
  """The error for a whole optimizer's state that holds its arrays in plain containers."""
  return ValueError(
      f"{name}: the optimizer state is a plain {type(state).__name__} holding the "
      f"right arrays, not the state that tx.init(params) returns: {_WITHOUT_TARGET}. "
      + _RESTORE_INTO_TARGET
  )


def check_own_state(state: Any, state_type: type, name: str) -> None:
  """Refuses, at trace time, a plain container (or a key) where a stage's state belongs.

  That is what a stage meets when the checkpoint of a chain is restored without a
  target: a dict or list, or, since ``optax.chain`` iterates over the state it is
  given, one key of a restored dict, a string.
  """
  if isinstance(state, state_type) or not isinstance(state, (dict, list, tuple, str)):
    return
  if isinstance(state, tuple) and type(state) is not tuple:
    return  # another NamedTuple: left to the stage's own checks
  found = f"the string {state!r}" if isinstance(state, str) else f"a plain {type(state).__name__}"
  how = (" (optax.chain hands each stage one entry of its state, and the entries of a "
         "dict are its keys)") if isinstance(state, str) else ""
  raise ValueError(
      f"{name}: the state is {found}, not the {state_type.__name__} that "
      f"tx.init(params) returns{how}: {_WITHOUT_TARGET}. " + _RESTORE_INTO_TARGET
  )
