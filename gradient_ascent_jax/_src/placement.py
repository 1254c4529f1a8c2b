"""Where arrays live: the devices of concrete arrays, and state placed beside the params."""

from __future__ import annotations

import jax
import jax.core
import jax.numpy as jnp


def concrete_devices(x) -> frozenset | None:
  """The devices that hold ``x`` if it is a concrete ``jax.Array``, else None.

  A tracer (inside ``jit``, ``vmap`` or ``grad``) has no devices yet, and a
  Python or NumPy value has none at all.
  """
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    return frozenset(x.sharding.device_set)
  return None


def _multi_device_sharding(param):
  """``param``'s sharding if it is a concrete array on several devices, else None."""
  devices = concrete_devices(param)
  return param.sharding if devices is not None and len(devices) > 1 else None


def zeros_like_on_same_devices(param, dtype):
  """Zeros like ``param`` in ``dtype``, laid out over the same devices."""
  # jnp.zeros_like puts the zeros of a weakly typed array (e.g. jnp.asarray(1.5)
  # placed on a mesh) on one default device: name the param's sharding.
  return jnp.zeros_like(param, dtype=dtype, device=_multi_device_sharding(param))


def zero_step_count(params) -> jax.Array:
  """An int32 step counter of 0, replicated over the mesh the params live on.

  Left on the default device, the counter of a state initialised eagerly from
  global arrays would be local to each process, and orbax refuses to save a
  process-local array in a multi-process run. Params that are not laid out
  with a ``NamedSharding`` over several devices (one device, tracers inside
  ``jit``, whose ``out_shardings`` then decide) get the plain default.
  """
  for leaf in jax.tree.leaves(params):
    sharding = _multi_device_sharding(leaf)
    if isinstance(sharding, jax.sharding.NamedSharding):
      replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
      return jnp.zeros([], jnp.int32, device=replicated)
  return jnp.zeros([], jnp.int32)
