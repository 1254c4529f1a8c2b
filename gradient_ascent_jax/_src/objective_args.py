"""The objective in ``maximize``'s extra arguments, handed on for ``-objective``.

Optax hands some transforms the objective through extra arguments of ``update``
(line searches, Polyak, Momo, ``reduce_on_plateau``, Sophia, SAM). ``maximize``
makes its optimizer descend on ``-objective``, so each of them is negated on the
way in, and what a line search caches of it is given back with the caller's sign.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import optax

from gradient_ascent_jax._src import transforms

# The extra arguments through which Optax hands a transform the objective (Optax's
# names; every other extra argument passes unchanged), and what maximize hands on so
# that tx sees -objective: a value or gradient is negated; a function of the params is
# wrapped to return the negated value (value_fn, obj_fn) or gradient (grad_fn).
_OBJECTIVE_VALUES = ("value", "grad")
_OBJECTIVE_VALUE_FNS = ("value_fn", "obj_fn")
_OBJECTIVE_GRAD_FNS = ("grad_fn",)


# functools.wraps keeps the signature, from which Optax's line searches pick the
# extra arguments that value_fn takes (update(..., value_fn=f, batch=b) calls f(p, batch=b)).
def _negated_value_fn(value_fn):
  @functools.wraps(value_fn)
  def negated(*args, **kwargs):
    value = value_fn(*args, **kwargs)
    # A (value, aux) pair, as with jax.value_and_grad(has_aux=True): the aux is not the
    # objective and keeps its sign.
    if isinstance(value, tuple):
      return (-value[0], *value[1:])
    return -value

  return negated


def _negated_grad_fn(grad_fn):
  @functools.wraps(grad_fn)
  def negated(*args, **kwargs):
    return transforms.negate(grad_fn(*args, **kwargs))

  return negated


def negate_objective(extra_args: dict[str, Any]) -> dict[str, Any]:
  """The extra arguments of ``update`` with the objective in them negated."""
  extra_args = dict(extra_args)
  for keys, negate in (
    (_OBJECTIVE_VALUES, transforms.negate),
    (_OBJECTIVE_VALUE_FNS, _negated_value_fn),
    (_OBJECTIVE_GRAD_FNS, _negated_grad_fn),
  ):
    for key in keys:
      if extra_args.get(key) is not None:
        extra_args[key] = negate(extra_args[key])
  return extra_args


_LINESEARCH_STATES = tuple(
  getattr(optax, name)
  for name in ("ScaleByBacktrackingLinesearchState", "ScaleByZoomLinesearchState")
  if hasattr(optax, name)
)


def negate_cached_objective(state: Any) -> Any:
  # Line searches cache the value and gradient of the objective THEY see
  # (-objective) for optax.value_and_grad_from_state; the caller must read
  # those of its own objective, or every step after the first descends.
  def negate_cache(node):
    if isinstance(node, _LINESEARCH_STATES):
      return node._replace(value=-node.value, grad=transforms.negate(node.grad))
    return node

  return jax.tree.map(
    negate_cache, state, is_leaf=lambda node: isinstance(node, _LINESEARCH_STATES)
  )
