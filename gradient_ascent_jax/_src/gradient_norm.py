"""The global norm of a gradient, as the progress records log it."""

from __future__ import annotations

import functools

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
  """The leaves in blocks that are each reduced once, without moving a leaf.

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
def _scale_exponents(dtype: np.dtype) -> tuple[int, ...]:
  """Powers of two ``e`` such that, for any gradient, one sum of ``(2**e * g)**2`` is right.

  The lowest keeps the sum of 2**32 squares of the largest finite value finite;
  the highest lifts the square of the smallest subnormal to a normal number. When
  the sum at one exponent overflows, the sum at the next lower one is at least
  ``2**(maxexp - 2 * gap)``, so the gap is kept small enough that no square that
  counts (within ``2**-(2 * nmant + 4)`` of that sum) can underflow there. float32:
  (-80, 3, 86); float64: (-528, 18, 563).
  """
  info = jnp.finfo(dtype)
  lowest = -(info.maxexp // 2) - 16
  highest = -(info.minexp - info.nmant) + info.minexp // 2
  widest_gap = (info.maxexp - info.minexp - 2 * info.nmant - 4) // 2
  count = -(-(highest - lowest) // widest_gap) + 1
  return tuple(int(e) for e in np.linspace(lowest, highest, count).round())


def _lifted_norm(blocks: list[jax.Array], dtype) -> jax.Array:
  """The norm of ``blocks`` from sums of squares lifted by fixed powers of two.

  Each block is reduced once, to the sums of its squares at the few powers of
  two of ``_scale_exponents``, and the norm comes from the most lifted of those
  sums that is finite: no square that counts over- or underflows (a float16
  gradient of 300 has norm 600, not inf), and scaling by a power of two is
  exact. No scale computed from the data feeds back into a block: XLA copies
  such a computation into every block, and compiles 1000 leaves in minutes.
  """
  exponents = _scale_exponents(jnp.dtype(dtype))
  lift = np.ldexp(np.ones(len(exponents), dtype), exponents)
  # Hidden from XLA's simplifier, which would otherwise rewrite (c * g)**2 as
  # c**2 * g**2: inf * 0 = NaN for c = 2**86 and g = 2**-100 (seen for a leaf of
  # one element, whose sum XLA drops).
  hidden = jax.lax.optimization_barrier(jnp.asarray(lift))

  def sums_of_squares(block):
    # The scales on a first axis of their own (XLA:CPU reduced a last axis of 3
    # ten times slower: 2.2 ms against 0.2 ms for 1e6 elements).
    lifted = hidden.reshape((-1,) + (1,) * block.ndim) * block.astype(dtype)
    return jnp.sum(jnp.square(lifted), axis=tuple(range(1, lifted.ndim)))

  totals = jnp.sum(jnp.stack([sums_of_squares(block) for block in blocks]), axis=0)
  # The most lifted finite sum; where none is finite (an inf or NaN element),
  # the least lifted one, which is then inf or NaN as the gradient is.
  finite = jnp.isfinite(totals)
  index = jnp.where(jnp.any(finite), len(exponents) - 1 - jnp.argmax(finite[::-1]), 0)
  return jnp.sqrt(totals[index]) * jnp.asarray(1 / lift)[index]


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
  dtype. Each block of leaves (see ``_blocks``) is reduced once to the plain sum
  of its squares; that sum is the answer where no square can have over- or
  underflowed in a way that counts (``_plain_sum_is_right``), which is every
  gradient of ordinary size, and only elsewhere does ``_lifted_norm`` reduce
  the blocks again, at three fixed powers of two (a ``lax.cond``: the common
  step pays one pass over the gradient, not three). Across devices only those
  few sums of each block travel. Subnormal float32, bfloat16 and float64
  elements count as 0: XLA:CPU reads subnormal inputs as 0 (as
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
  total = jnp.sum(jnp.stack([jnp.sum(jnp.square(block.astype(dtype))) for block in blocks]))
  right = _plain_sum_is_right(total, sum(leaf.size for leaf in leaves), dtype)
  if not isinstance(right, jax.core.Tracer):  # op by op
    return jnp.sqrt(total) if right else _lifted_norm(blocks, dtype)
  # Under vmap, one unbatched predicate (any copy that needs the lifted sums makes
  # every copy take them), so that this stays a cond and not a select of both.
  return jax.lax.cond(
    copies.in_any_copy(~right),
    lambda: _lifted_norm(blocks, dtype),
    lambda: jnp.sqrt(total),
  )


def on_one_device(tree: optax.Updates) -> optax.Updates:
  """``tree``, its leaves moved onto one device if they are on different ones."""
  # Op by op, JAX refuses to combine arrays committed to different devices
  # (a pipeline-parallel model run eagerly, say); this only runs on logging steps.
  placements = [placement.concrete_devices(x) for x in jax.tree.leaves(tree)]
  placements = [devices for devices in placements if devices is not None]
  if len(set(placements)) <= 1:
    return tree
  return jax.device_put(tree, next(iter(placements[0])))
