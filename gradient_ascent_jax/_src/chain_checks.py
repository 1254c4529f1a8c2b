"""The check of a whole chain's state, before any stage sees it.

A chain zips its stages with the entries of the state it is given, so a state
of another optimizer, one restored without a target, or one an earlier version
saved would fail deep inside a stage with a message about something else. The
checks of one stage's state are in ``state_checks``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gradient_ascent_jax._src import carry_over
from gradient_ascent_jax._src import state_checks


def _describe(state: Any) -> str:
  if isinstance(state, tuple) and type(state) is tuple:
    return "(" + ", ".join(type(stage).__name__ for stage in state) + ")"
  return "None" if state is None else type(state).__name__


def _plain(tree: Any) -> bool:
  """Whether ``tree`` is built of lists, dicts and plain tuples only, around arrays."""
  if type(tree) in (list, tuple):
    return all(_plain(node) for node in tree)
  if type(tree) is dict:
    return all(_plain(node) for node in tree.values())
  return tree is None or not isinstance(tree, tuple)


def _leaves_by_name(tree: Any) -> dict[tuple, tuple]:
  """Shape and dtype of every leaf, by its path of field names, keys and indices.

  A NamedTuple's field and the dict key a checkpointer writes for it get the same name.
  """

  def name(key):
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)

  return {
    tuple(name(key) for key in path): (jnp.shape(leaf), jnp.result_type(leaf))
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _restored_without_target(chain, state: Any, updates: Any) -> bool:
  """Whether ``state`` holds this chain's arrays in plain containers.

  That is what a checkpointer restores when it is not given the structure to restore
  into (orbax's ``restore(path)``): the arrays are right, only the types are lost.
  """
  if type(state) not in (list, tuple, dict) or not _plain(state):
    return False
  try:
    expected = jax.eval_shape(
      chain.init, jax.tree.map(lambda u: jax.ShapeDtypeStruct(jnp.shape(u), u.dtype), updates)
    )
  except (TypeError, ValueError, AttributeError):
    return False
  return _leaves_by_name(state) == _leaves_by_name(expected)


def _carries_over(chain, state: Any, updates: Any) -> bool:
  """Whether carry_over makes ``state`` this chain's state (an earlier version's layout)."""

  try:
    expected = jax.eval_shape(
      chain.init, jax.tree.map(lambda u: jax.ShapeDtypeStruct(jnp.shape(u), u.dtype), updates)
    )
    carry_over.carried(state, expected, abstract_ok=True)
  except (TypeError, ValueError, AttributeError):
    return False
  return True


def checked_state(
  name: str,
  chain: optax.GradientTransformationExtraArgs,
  check_updates: Callable[[Any, Any], None] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """``chain``, whose update first checks, at trace time, the state it is given.

  A chain zips its stages with the entries of the state it is given: a state
  from another configuration or optimizer either fails deep inside a stage
  with a message about something else, or, when the entries happen to line
  up, is silently accepted. The state itself is unchanged (the chain's).
  ``check_updates(updates, state)``, if given, then checks the gradients once
  for every stage, which then skip their own checks.
  """
  # Filled on the first update, since init may be costly. A plain list, not
  # functools.cache: a cached local function cannot be cloudpickled.
  expected_layout = []

  def layout():
    if not expected_layout:
      # Params {} give the per-stage state types without touching any array.
      expected_layout.append(_describe(jax.eval_shape(chain.init, {})))
    return expected_layout[0]

  def update_fn(updates, state, params=None, **extra_args):
    if isinstance(state, str):  # one key of a dict restored without a target, in a chain
      raise state_checks.not_own_state(state, f"tuple of {layout()}", name)
    got = _describe(state)
    if got != layout() and _restored_without_target(chain, state, updates):
      raise state_checks.restored_without_target(name, state)
    if got != layout() and _carries_over(chain, state, updates):
      raise ValueError(
        f"{name}: the optimizer state is {got}, not the tuple of {layout()} that "
        "tx.init(params) returns, but it holds this optimizer's run: a state saved by "
        "an earlier version, or restored without a target. " + state_checks.CARRY_OVER
      )
    if got != layout():
      raise ValueError(
        f"{name}: the optimizer state does not belong to this optimizer. "
        f"Expected the state that tx.init(params) of this {name}(...) "
        f"returns, a tuple of {layout()}; got {got}. A state is only valid "
        "for the optimizer (and the clip_value/weight_decay/logging_interval choice) that "
        "made it. To go on with that run, build tx as it was built (logging on or off "
        "included: a saved run keeps its stages); to start a new run, call "
        "state = tx.init(params) with this tx."
      )
    try:
      if check_updates is not None:
        check_updates(updates, state)
      return chain.update(updates, state, params, **extra_args)
    except (ValueError, TypeError) as error:
      error.add_note(f"(raised in a stage of {name}(...).update)")
      raise

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)
