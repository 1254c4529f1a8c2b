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

# Leaves per block in the logged norm (``_blocks``). 5000 two-element leaves
# in one stack compiled in 28-30 s on XLA:CPU (the logging stage alone); in
# stacks of 50, 100, 500 and 1000 leaves, in 8.0, 7.2, 8.7 and 9.4 s.
_BLOCK_SIZE = 100
# Leaves of a block with at least this many elements each are added element by
# element (their squares), smaller ones stacked (``_blocks``).
_ADD_SIZE = 4096


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


def _blocks(leaves: list[jax.Array]) -> list[jax.Array | list[jax.Array]]:
  """The leaves in blocks that are each reduced at once (``_block_sum``), moving no leaf.

  Leaves of one shape and layout make a block, up to ``_BLOCK_SIZE`` at a time: a
  reduction per leaf compiles on XLA:CPU in time that grows faster than the
  number of leaves (5000 leaves: minutes). Leaves of ``_ADD_SIZE`` elements or
  more stay a list, whose squares are added element by element, which XLA fuses
  into one pass with the reduction: a stack would copy them first (100 leaves of
  10,000 elements, the plain sum jitted alone on an AMD EPYC: 250 us against
  265-280 us, and no 4 MB of temporaries). Smaller leaves are stacked: an
  addition per leaf took the logging stage of 5000 two-element leaves twice as
  long to compile (10 s against 5 s).
  Blocking leaves of two layouts would move one of them (an all-to-all on Auto
  axes, an error on Explicit ones), so where tracing cannot know the layouts (a
  mesh with Auto axes) each leaf is a block of its own.
  """
  if not _layouts_known_when_traced():
    return list(leaves)
  groups: dict[object, list[jax.Array]] = {}
  for leaf in leaves:
    key = (jnp.shape(leaf), getattr(jax.typeof(leaf), "sharding", None))
    groups.setdefault(key, []).append(leaf)
  blocks = [
    group[start : start + _BLOCK_SIZE]
    for group in groups.values()
    for start in range(0, len(group), _BLOCK_SIZE)
  ]
  return [
    block[0] if len(block) == 1 else block if block[0].size >= _ADD_SIZE else jnp.stack(block)
    for block in blocks
  ]


def _block_sum(block: jax.Array | list[jax.Array], dtype, scale=None) -> jax.Array:
  """The sum of the squares (times ``scale``) of the elements of a block (``_blocks``)."""

  def squares(x):
    x = x.astype(dtype)
    return jnp.square(x if scale is None else scale * x)

  if isinstance(block, list):
    return jnp.sum(functools.reduce(jnp.add, map(squares, block)))
  return jnp.sum(squares(block))


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


def _sum_of_squares(blocks: list, dtype, scale=None) -> jax.Array:
  """The sum of the squares of every element of ``blocks`` (times ``scale``), in ``dtype``."""
  return jnp.sum(jnp.stack([_block_sum(block, dtype, scale) for block in blocks]))


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
  gradient of ordinary size. Elsewhere (and only there: a ``lax.cond``) the
  answer comes from a second sum, of the squares times a power of two
  (``_lifts``): lowered after an overflow, lifted after an underflow. Scaling
  by a power of two is exact. Across devices only the sums of each block
  travel. Subnormal float32, bfloat16 and float64 elements count as 0: XLA:CPU
  reads subnormal inputs as 0 (as ``jnp.linalg.norm`` and the optimizer's step
  do).
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
  lifted = functools.partial(_lifted_norm, total=total, dtype=dtype)
  if not isinstance(right, jax.core.Tracer):  # op by op
    return jnp.sqrt(total) if right else lifted(blocks)
  # The second pass runs only where the plain sum is not right. Run on every
  # logging step, it took the norm of 100 leaves of 10,000 elements from 246-267
  # us to 430-550 us (jitted alone), and a step that logs every time from 1.24x
  # logging off to 1.37x (paired, 100 rounds; both on an AMD EPYC). Under vmap,
  # where the copies decide apart, both branches run.
  return jax.lax.cond(right, lambda _: jnp.sqrt(total), lifted, blocks)


def _lifted_norm(blocks: list, total: jax.Array, dtype) -> jax.Array:
  """The norm from the sum of the squares times a power of two: lowered where the plain
  sum ``total`` overflowed, lifted where it is too small to trust (``_lifts``)."""
  lower, higher = (np.ldexp(np.ones((), dtype), e) for e in _lifts(dtype))
  scale = jnp.where(jnp.isfinite(total), higher, lower).astype(dtype)
  # Where XLA knows the gradient when compiling (a leaf that the objective does not
  # use is zeros), its simplifier may rewrite (c * g)**2 as c**2 * g**2, which is NaN
  # where one factor is out of range (2**86 squared is inf, times 0). Hidden blocks
  # keep most such rewrites out, and a NaN that the plain sum does not share falls
  # back to the plain sum: 0 for zeros. Computed at run time, the lifted sum is NaN
  # only where the plain one is.
  lifted = _sum_of_squares(jax.lax.optimization_barrier(blocks), dtype, scale)
  plain = jnp.isnan(lifted) & ~jnp.isnan(total)
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
  measured in a cond of its own. A cond that read several large gradients would
  keep the earlier ones alive until the last one is computed: XLA:CPU then moved
  the MLP's gradients out of the donated buffers where the update is written in
  place, and a step that logged nothing cost 1.03-1.05x logging off; measured
  apart, 1.02-1.03x (the benchmarks' MLP, paired, 300-400 rounds). In that step
  without the rest of the logging stage, one cond reading its two large gradients
  cost 1.16x, with 0.9 MB more temporaries; one cond for each, 1.01-1.02x, with
  off's. Each such leaf is also tied to its norm by an optimization barrier (the
  returned ``updates`` hold the tied leaves, which the stages after this one read
  after its cond). The tie has not been measured to matter: untied, the MLP's
  step cost the same (1.026x against 1.027x, 400 rounds) with the same memory
  analysis; it stays because dropping it changes every such step's program for
  no measured gain. ``wanted`` is one flag for every copy of the step
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
