"""The copies of one logging call that vmap, pmap and shard_map make, told apart.

Under ``vmap`` a host callback runs once per batch element, and under ``pmap`` or
``shard_map`` once per device. These rules decide, inside the compiled step and
from that call's values only, which copy speaks.
"""

from __future__ import annotations

import jax
from jax.custom_batching import custom_vmap
import jax.numpy as jnp


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
def first_of_its_step(step, due, *payload):
  """Whether no earlier due copy of the same step precedes each copy."""
  del payload  # only here so that vmap over any callback argument reaches the rule
  shape = jnp.shape(step)
  step, due = jnp.ravel(step), jnp.ravel(due)
  earlier = jnp.tril(jnp.ones((step.size, step.size), bool), k=-1)
  repeated = earlier & due[None, :] & (step[:, None] == step[None, :])
  return ~jnp.any(repeated, axis=1).reshape(shape)


@_merged_over_copies
def any_of_its_step(step, due, flag):
  """Whether any due copy of the same step has ``flag``, for each copy."""
  shape = jnp.shape(step)
  step, due, flag = jnp.ravel(step), jnp.ravel(due), jnp.ravel(flag)
  raised = due[None, :] & flag[None, :] & (step[:, None] == step[None, :])
  return jnp.any(raised, axis=1).reshape(shape)


@custom_vmap
def in_any_copy(flag):
  """``flag``; under ``vmap``, whether any copy has it, as one unbatched bool."""
  return flag


@in_any_copy.def_vmap
def in_any_copy_rule(axis_size, in_batched, flag):
  # An unbatched predicate keeps the logging cond a cond: a batched one turns
  # it into a select that runs the host callback on every step of every copy.
  del axis_size, in_batched
  return in_any_copy(jnp.any(flag)), False


def manual_axes() -> tuple[str, ...]:
  """The mesh axes that ``pmap`` or ``shard_map`` map this step over (none outside them)."""
  return tuple(jax.sharding.get_abstract_mesh().manual_axes)


def varying_axes(x) -> tuple[str, ...]:
  """The manual axes over which ``x`` may differ from device to device, in mesh order.

  Only ``shard_map`` with ``check_vma=True`` tracks them; under ``pmap`` and
  ``check_vma=False`` every value is typed the same on all devices (no axes).
  """
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax 0.8 names it ``vma``
  varying = manual.varying if manual is not None else getattr(aval, "vma", frozenset())
  return tuple(axis for axis in manual_axes() if axis in varying)


def tracks_varying() -> bool:
  """Whether this step is typed by what varies over its axes (``shard_map``'s ``check_vma``)."""
  # axis_index varies over its axes by definition: where its type does not say
  # so, nothing's does.
  axes = manual_axes()
  return bool(axes) and bool(varying_axes(jax.lax.axis_index(axes)))


def on_first_device(axes: tuple[str, ...] | None = None) -> jax.Array | bool:
  """False on all devices but the first along ``axes`` (all of ``pmap`` / ``shard_map``'s)."""
  # There the callback runs once per device, with no batch axis to elect from.
  axes = manual_axes() if axes is None else axes
  if not axes:
    return True
  return jax.lax.axis_index(axes) == 0


def of_first_device(x: jax.Array) -> jax.Array:
  """``x`` of the first device, on every device: the same along every axis ``x`` varies over.

  One all-reduce where ``x`` varies (``shard_map``, ``check_vma=True``), none where
  it does not.
  """
  axes = varying_axes(x)
  if not axes:
    return x
  return jax.lax.psum(jnp.where(on_first_device(axes), x, jnp.zeros_like(x)), axes)
