"""The global norm of a gradient, as the progress records log it."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

from gradient_ascent_jax._src import copies
from gradient_ascent_jax._src import placement

# Leaves per stack in the logged norm. One stack of 5000 two-element leaves
# compiled in 28-30 s on XLA:CPU (the logging stage alone); stacks of 50,
# 100, 500 and 1000 leaves took 8.0, 7.2, 8.7 and 9.4 s.
_STACK_SIZE = 100


def _layouts_known_when_traced() -> bool:
  """Whether tracing knows how every leaf lies: no mesh with Auto axes is in use.

  Explicit axes put the layout in the type; on Auto axes XLA picks it after
  tracing, so two leaves of one shape may lie differently.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return True
  return all(
    kind != jax.sharding.AxisType.Auto or size == 1
    for kind, size in zip(mesh.axis_types, mesh.axis_sizes, strict=True)
  )


def _blocks(leaves: list[jax.Array]) -> list[jax.Array]:
  """The leaves in blocks that are each reduced as one array, without moving a leaf.

  Leaves of one shape and layout are stacked, up to ``_STACK_SIZE`` at a time:
  XLA:CPU compiles one reduction per leaf in time that grows faster than the
  number of leaves (5000 leaves: minutes), and one stack of thousands slowly too.
  Stacking leaves of two layouts would move one of them (an all-to-all on Auto
  axes, an error on Explicit ones), so where tracing cannot know the layouts (a
  mesh with Auto axes) each leaf is a block of its own.
  """
  if not _layouts_known_when_traced():
    return leaves
  groups: dict[object, list[jax.Array]] = {}
  for leaf in leaves:
    key = (jnp.shape(leaf), getattr(jax.typeof(leaf), "sharding", None))
    groups.setdefault(key, []).append(leaf)
  return [
    group[start] if len(group) == start + 1 else jnp.stack(group[start : start + _STACK_SIZE])
    for group in groups.values()
    for start in range(0, len(group), _STACK_SIZE)
  ]


@functools.cache
def _lifts(dtype: np.dtype) -> tuple[int, int]:
  """Powers of two ``e``: one sum of ``(2**e * g)**2`` is right where the plain sum is not.

  The lower one is for a plain sum that overflowed: it keeps the sum of 2**32
  squares of the largest finite value finite. The higher one is for a plain sum
  too small to trust: it lifts the square of the smallest normal number far above
  the smallest normal number. Each is within ``(maxexp - minexp - 2 * nmant - 4) /
  2`` of 0, so that the lifted sum is large enough that no square that counts
  (within ``2**-(2 * nmant + 4)`` of it) underflows. float32: (-80, 86); float64:
  (-528, 563).
  """
  info = jnp.finfo(dtype)
  return -(info.maxexp // 2) - 16, -(info.minexp - info.nmant) + info.minexp // 2


def _sum_of_squares(blocks: list[jax.Array], dtype, scale=None) -> jax.Array:
  """The sum of the squares of every element of ``blocks`` (times ``scale``), in ``dtype``."""
  sums = []
  for block in blocks:
    block = block.astype(dtype)
    sums.append(jnp.sum(jnp.square(block if scale is None else scale * block)))
  return jnp.sum(jnp.stack(sums))


def _plain_sum_is_right(total: jax.Array, size: int, dtype) -> jax.Array:
  """Whether ``total``, a plain sum of ``size`` squares, is as right as the lifted norm.

  Finite, no square overflowed. A square below the smallest normal number may
  be lost (flushed to 0); at or above ``4 * size * tiny / eps`` all of them
  together move the total by less than a quarter of its unit in the last place.
  """
  info = jnp.finfo(dtype)
  enough = 4.0 * size * float(info.tiny) / float(info.eps)
  return jnp.isfinite(total) & (total >= enough)


def global_norm(tree: optax.Updates) -> jax.Array:
  """The L2 norm of all leaves, right for normal numbers wherever the result dtype holds it.

  Computed in float32 or wider (float64 stays float64) whatever the gradient's
  dtype. Each block of leaves (see ``_blocks``) is reduced to the plain sum of
  its squares; that sum is the answer where no square can have over- or
  underflowed in a way that counts (``_plain_sum_is_right``), which is every
  gradient of ordinary size. Elsewhere the answer comes from a second sum, of
  the squares times a power of two (``_lifts``): lowered after an overflow,
  lifted after an underflow. Scaling by a power of two is exact. Across devices
  only those two sums of each block travel. Subnormal float32, bfloat16 and
  float64 elements count as 0: XLA:CPU reads subnormal inputs as 0 (as
  ``jnp.linalg.norm`` and the optimizer's step do).
  """
  # As arrays: a Python or NumPy scalar leaf (op by op, a gradient of {"t": 0.5})
  # has no .ndim or sharding to read. Magnitudes of complex leaves: their squares
  # are what the norm adds.
  leaves = [
    jnp.abs(leaf) if jnp.iscomplexobj(leaf) else leaf
    for leaf in map(jnp.asarray, jax.tree.leaves(tree))
    if jnp.size(leaf)
  ]
  if not leaves:
    return jnp.zeros([], jnp.float32)
  # From the dtypes, not the leaves: a weakly typed float64 leaf (jnp.full(4, 1e-100)
  # with x64 on, a Python float) would give float32, where 1e-100 is 0.
  dtype = jnp.result_type(jnp.float32, *(leaf.dtype for leaf in leaves))
  blocks = _blocks(leaves)
  total = _sum_of_squares(blocks, dtype)
  right = _plain_sum_is_right(total, sum(leaf.size for leaf in leaves), dtype)
  if not isinstance(right, jax.core.Tracer) and right:  # op by op: one pass was enough
    return jnp.sqrt(total)
  # Compiled, the second pass runs on every logging step (at 2**0 where the plain
  # sum is right, and its result is then not used): a lax.cond around it cost
  # XLA:CPU as much time in the benchmarks' MLP step as running it.
  lower, higher = (np.ldexp(np.ones((), dtype), e) for e in _lifts(dtype))
  scale = jnp.where(right, 1, jnp.where(jnp.isfinite(total), higher, lower)).astype(dtype)
  # Where XLA knows the gradient when compiling (a leaf that the objective does not
  # use is zeros), its simplifier may rewrite (c * g)**2 as c**2 * g**2, which is NaN
  # where one factor is out of range (2**86 squared is inf, times 0). Hidden blocks
  # keep most such rewrites out, and a NaN that the plain sum does not share falls
  # back to the plain sum: 0 for zeros. Computed at run time, the lifted sum is NaN
  # only where the plain one is.
  lifted = _sum_of_squares(jax.lax.optimization_barrier(blocks), dtype, scale)
  plain = right | (jnp.isnan(lifted) & ~jnp.isnan(total))
  return jnp.where(plain, jnp.sqrt(total), jnp.sqrt(lifted) / scale)


# Leaves of at least this many elements are measured apart (``measure_apart``),
# the largest ``_MOST_APART`` of them: each such cond adds a few microseconds to
# the step, and compile time (40 leaves of 70,000 elements, 32 apart: 1.09 s
# against 0.79 s with one cond for all, on XLA:CPU).
_APART_SIZE = 1 << 16
_MOST_APART = 32


class Measured(NamedTuple):
  """A gradient as the logging branch measures it (``norm_of``).

  ``rest``: the leaves the branch reduces itself; ``norms``: the norms of the
  leaves measured apart, before the branch (0 on steps that measure nothing).
  """

  rest: list
  norms: list


def measure_apart(updates: optax.Updates, wanted) -> tuple[optax.Updates, Measured]:
  """``(updates, measured)``: the largest leaves' norms taken apart where ``wanted``.

  Each leaf of at least ``_APART_SIZE`` elements (the ``_MOST_APART`` largest) is
  measured in a cond of its own, tied to the leaf by an optimization barrier: the
  returned ``updates`` hold the tied leaves, so that the stages after this one
  read each large gradient after its cond and XLA frees it where it would with
  logging off. A cond that read every gradient would keep them all alive until the
  last one is computed: XLA:CPU then moved the MLP's gradients out of the donated
  buffers where the update is written in place, and a step that logged nothing
  cost 1.03-1.05x logging off; measured apart, 1.02-1.03x (the benchmarks' MLP,
  paired, 300-400 rounds). ``wanted`` is one flag for every copy of the step
  (op by op, True: the caller skips this where nothing is measured).
  Under ``pmap`` and ``shard_map`` nothing is measured apart.
  """
  leaves, treedef = jax.tree.flatten(updates)
  large = [
    index
    for index, leaf in enumerate(leaves)
    if jnp.size(leaf) >= _APART_SIZE and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
  ]
  large = set(sorted(large, key=lambda index: -jnp.size(leaves[index]))[:_MOST_APART])
  if not large or copies.manual_axes():
    return updates, Measured(leaves, [])
  norms = []
  for index in sorted(large):
    leaf = leaves[index]
    if isinstance(wanted, jax.core.Tracer):
      zero = jnp.zeros((), jax.eval_shape(global_norm, leaf).dtype)
      norm = jax.lax.cond(wanted, global_norm, lambda _, zero=zero: zero, leaf)
      leaves[index], norm = jax.lax.optimization_barrier((leaf, norm))
    else:  # op by op, only called where wanted: measured as compiled
      norm = global_norm(leaf)
    norms.append(norm)
  rest = [leaf for index, leaf in enumerate(leaves) if index not in large]
  return jax.tree.unflatten(treedef, leaves), Measured(rest, norms)


def norm_of(measured: Measured) -> jax.Array:
  """The global norm of a gradient measured by ``measure_apart``.

  The norms of the parts are joined as ``top * sqrt(sum((norm / top)**2))`` with
  ``top`` the largest of them, right wherever the result dtype holds the norm, as
  ``global_norm``; NaN if any part is NaN, else inf if any is inf.
  """
  norm = global_norm(measured.rest)
  if not measured.norms:
    return norm
  dtype = jnp.result_type(norm, *measured.norms)
  norms = jnp.stack([part.astype(dtype) for part in (norm, *measured.norms)])
  top = jnp.max(norms)
  joined = top * jnp.sqrt(jnp.sum(jnp.square(norms / jnp.where(top > 0, top, 1))))
  return jnp.where(jnp.isinf(top) | ~(top > 0), top, joined)


def on_one_device(tree: optax.Updates) -> optax.Updates:
  """``tree``, its leaves moved onto one device if they are on different ones."""
  # Op by op, JAX refuses to combine arrays committed to different devices
  # (a pipeline-parallel model run eagerly, say); this only runs on logging steps.
  placements = [placement.concrete_devices(x) for x in jax.tree.leaves(tree)]
  placements = [devices for devices in placements if devices is not None]
  if len(set(placements)) <= 1:
    return tree
  return jax.device_put(tree, next(iter(placements[0])))
