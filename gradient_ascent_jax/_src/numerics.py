"""Precision machinery of the transforms: casts, rounding, saturation, derivative fixes.

The transforms state their equations; the work of computing them right in every
dtype (float16, bfloat16, a float32 moment that overflows, ``jax.grad`` through
all of it) is here, with :func:`adaptive_rms`, the RMSprop step of one leaf. The
reasons are on the math page of the documentation.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def cast(x: jax.Array, dtype) -> jax.Array:
  """``x`` in ``dtype``; the same array when it already is (a smaller program)."""
  return x if x.dtype == dtype else x.astype(dtype)


def compute_dtype(*dtypes) -> jnp.dtype:
  """float32 or wider: the dtype that float16/bfloat16 arithmetic runs in.

  ``beta=0.999`` rounds to 1 in bfloat16, and ``eps=1e-8`` flushes to 0 in
  float16 (0/0 on zero gradients).
  """
  return jnp.result_type(jnp.float32, *dtypes)


@jax.custom_jvp
def _next_toward(x: jax.Array, toward: jax.Array) -> jax.Array:
  """``jnp.nextafter(x, toward)``, differentiated as ``x`` (straight through).

  JAX has no derivative for ``nextafter``; a one-unit nudge is a rounding, and
  a rounding is differentiated as the value it rounds, as ``astype`` is.
  """
  return jnp.nextafter(x, toward)


@_next_toward.defjvp
def _next_toward_jvp(primals, tangents):
  return _next_toward(*primals), tangents[0]


@jax.custom_jvp
def sqrt(x: jax.Array) -> jax.Array:
  """``jnp.sqrt``, whose derivative at 0 is 0 instead of inf.

  A moment is 0 only where every gradient so far was 0, and nothing depends on
  it then; but inf times the 0 that flows back is a NaN meta-gradient.
  """
  return jnp.sqrt(x)


@sqrt.defjvp
def _sqrt_jvp(primals, tangents):
  root = sqrt(primals[0])
  # Two selects: the unselected 0.5 / 0 must not reach a second derivative.
  zero = root == 0
  slope = jnp.where(zero, 0, 0.5 / jnp.where(zero, 1, root))
  return root, slope * tangents[0]


def scalar_sqrt(value):
  """The square root of a hyperparameter: a Python float stays weakly typed."""
  return math.sqrt(value) if isinstance(value, (int, float)) else jnp.sqrt(value)


def round_down(value: Any, dtype: jnp.dtype) -> Any:
  """The largest number of ``dtype`` that is <= ``value`` (> 0).

  Rounding to nearest could round a clip bound up (0.3 is 0.30005 in
  float16), and values above ``clip_value`` would pass.
  """
  if isinstance(value, jax.Array):
    if value.dtype == dtype:
      return value
    bound = value.astype(dtype)
    wide = jnp.promote_types(value.dtype, dtype)
    rounded_up = bound.astype(wide) > value.astype(wide)
    return jnp.where(rounded_up, _next_toward(bound, jnp.zeros_like(bound)), bound)
  with np.errstate(over="ignore"):  # beyond the dtype's range: inf, stepped down below
    bound = np.asarray(value, dtype)
  if float(bound) > float(value):
    bound = np.nextafter(bound, np.zeros_like(bound))
  return bound


def _unstall(stored: jax.Array, old: jax.Array, exact: jax.Array) -> jax.Array:
  """Moves a rounded moment one unit in the last place where it should move.

  Rounded to nearest, a bfloat16 moment that beta = 0.999 changes by 0.1% would
  come back unchanged, and a moment saturated by one huge gradient would pin
  its element's step near zero for good. A zero or subnormal moment is left as
  rounding to nearest leaves it.
  """
  old_wide = old.astype(exact.dtype)
  # Only normal numbers: below the smallest normal a unit is a large part of the
  # value (all of it at the smallest subnormal), and a move would take the moment
  # farther from the exact one than rounding to nearest leaves it.
  normal = jnp.abs(old) >= jnp.finfo(old.dtype).tiny
  stalled = (stored == old) & (exact != old_wide) & normal
  toward = jnp.where(exact < old_wide, jnp.zeros_like(old), jnp.full_like(old, jnp.inf))
  # Where stalled, stored == old: stepping from stored gives the same value
  # and the derivative of the exact moment, which stored rounds.
  return jnp.where(stalled, _next_toward(stored, toward), stored)


def saturating_moment(beta, q: jax.Array, m: jax.Array) -> jax.Array:
  """``beta * m + q**2`` stored in ``m``'s dtype, at most its largest finite value.

  ``q`` is ``sqrt(1 - beta) * h`` in the compute dtype. A rounded (float16,
  bfloat16) moment that should move does, by one unit in the last place.
  """
  m_new = beta * cast(m, q.dtype) + q * q
  # A select, not jnp.minimum: XLA:CPU re-computes a minimum-capped moment
  # inside the consumer fusion, which forces a copy of the donated buffer
  # (two extra passes over memory). NaN propagates either way.
  largest = jax.lax.full_like(m_new, jnp.finfo(m.dtype).max)
  m_new = jax.lax.select(m_new > largest, largest, m_new)
  stored = cast(m_new, m.dtype)
  return stored if stored.dtype == m_new.dtype else _unstall(stored, m, m_new)


def moment_root(beta, q: jax.Array, m: jax.Array, m_stored: jax.Array) -> jax.Array:
  """``sqrt(m_t)`` for the step, right where the stored moment saturated or rounded.

  ``m`` is the previous moment and ``m_stored`` what :func:`saturating_moment`
  stored. A saturated float32/float64 moment only bounds ``m_t`` from below:
  ``|q|`` keeps the step of a huge gradient exact. A float16/bfloat16 moment
  is bypassed: the root is taken of ``m_t`` before rounding.
  """
  q_size = jnp.abs(q)
  if m_stored.dtype == q.dtype:
    # Read the stored moment, not the old one again: re-reading the donated
    # old buffer after its in-place update makes XLA copy it (extra passes).
    return jnp.maximum(sqrt(m_stored), q_size)
  m_wide = beta * cast(m, q.dtype)
  m_new = m_wide + q * q
  # hypot only where the moment overflowed; elsewhere it is fed ones, since
  # its derivative at (0, 0) is NaN, and 0 times NaN would reach the
  # meta-gradient through the branch that where() does not select.
  overflowed = jnp.isinf(m_new)
  exact_root = jnp.hypot(jnp.where(overflowed, sqrt(m_wide), 1), jnp.where(overflowed, q_size, 1))
  return jnp.where(overflowed, exact_root, sqrt(m_new))


def _adaptive_rms(h: jax.Array, m: jax.Array, beta, weight, eps) -> tuple[jax.Array, jax.Array]:
  """The RMSprop step of one leaf: ``(h / (sqrt(m_t) + eps), m_t)``.

  ``m_t = beta * m + q**2`` with ``q = weight * h`` and ``weight = sqrt(1 - beta)``
  (``h**2`` overflows first: float32, ``h = 2.3e19``, ``beta = 0.5``, where
  ``m_t`` itself still fits). ``m_t`` is stored in ``m``'s dtype by
  :func:`saturating_moment`, and the step divides by :func:`moment_root`.
  """
  q = weight * cast(h, compute_dtype(h.dtype, m.dtype))
  m_t = saturating_moment(beta, q, m)
  root = moment_root(beta, q, m, m_t)
  return cast(cast(h, q.dtype) / (root + eps), h.dtype), m_t


# Jitted, so that the leaves of one shape and dtype share one trace and one lowered
# function: a model's step of many like leaves traces and lowers in a fraction of
# the time (XLA inlines the calls; the compiled step is the same). The
# hyperparameters are arguments, so that their values share the trace as well: a
# Python float is a weakly typed scalar there, as it is in the arithmetic.
adaptive_rms = jax.jit(_adaptive_rms)
