"""The composable stages of gradient ascent, each a pure Optax transform.

Every stage is odd in its input (``f(-g) = -f(g)``), so the order of the sign
flip does not change the result; it comes first because that is what
``maximize`` needs.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING
from typing import Any
from typing import NamedTuple
from typing import cast

import chex
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

from gradient_ascent_jax._src import restore
from gradient_ascent_jax._src import schedules
from gradient_ascent_jax._src import validation

logger = logging.getLogger("gradient_ascent_jax")


if TYPE_CHECKING:
  # optax ships no type information (no py.typed), so to a type checker its
  # EmptyState is of unknown type, and so would be every class built on it.
  class _EmptyState(NamedTuple):
    """optax.EmptyState, as type checkers see it."""

else:
  _EmptyState = optax.EmptyState


class FlipSignState(_EmptyState):
  """State of :func:`flip_sign`: empty, and the mark of a chain that ascends.

  :func:`maximize` looks for it in a state to refuse a transform that already
  ascends (maximizing it again would descend).

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> state = gax.gradient_ascent().init(jnp.zeros(2))
    >>> isinstance(state[0], gax.FlipSignState)
    True
  """

  __slots__ = ()


class ScaleByAdaptiveRmsState(NamedTuple):
  """State of :func:`scale_by_adaptive_rms`.

  Attributes:
    second_moment: the running average ``m`` of the squared updates, a pytree
      like the params (in ``accumulator_dtype`` when it is set).

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> gax.scale_by_adaptive_rms().init({"w": jnp.ones(2)})
    ScaleByAdaptiveRmsState(second_moment={'w': Array([0., 0.], dtype=float32)})
  """

  second_moment: optax.Updates


class MomentumState(NamedTuple):
  """State of :func:`momentum`.

  Attributes:
    velocity: the momentum buffer ``v``, a pytree like the params (in
      ``accumulator_dtype`` when it is set).

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> gax.momentum().init({"w": jnp.ones(2)})
    MomentumState(velocity={'w': Array([0., 0.], dtype=float32)})
  """

  velocity: optax.Updates


class ScaleByWarmupDecayState(NamedTuple):
  """State of :func:`scale_by_warmup_decay`.

  Attributes:
    count: steps already taken, an int32 scalar that saturates at its maximum.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> gax.scale_by_warmup_decay().init(jnp.ones(2))
    ScaleByWarmupDecayState(count=Array(0, dtype=int32))
  """

  count: chex.Array  # pyright: ignore[reportIncompatibleMethodOverride]


def negate(tree: Any) -> Any:
  """Element-wise ``-x`` of every leaf; ``None`` leaves stay ``None``."""
  return jax.tree.map(jnp.negative, tree)


def _check_gradient_leaves(updates: Any, transform: str) -> None:
  validation.check_array_leaves(
      updates,
      transform,
      "gradient",
      "Pass gradients as arrays, in the tree of the params (as jax.grad gives them).",
  )


def flip_sign() -> optax.GradientTransformation:
  """Negates the updates, ``u -> -u``: the flip that turns descent into ascent.

  Returns:
    An ``optax.GradientTransformation`` with the empty state
    :class:`FlipSignState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> tx = gax.flip_sign()
    >>> tx.update(jnp.array([1.0, -2.0]), tx.init(None))[0]
    Array([-1.,  2.], dtype=float32)
  """

  def init_fn(params):
    del params
    return FlipSignState()

  def update_fn(updates, state, params=None):
    del params
    restore.check_own_state(state, FlipSignState, "flip_sign")
    _check_gradient_leaves(updates, "flip_sign")
    return negate(updates), state

  return optax.GradientTransformation(init_fn, update_fn)


@jax.custom_jvp
def _next_toward(x: jax.Array, toward: jax.Array) -> jax.Array:
  """``jnp.nextafter(x, toward)``, differentiated as ``x`` (straight through).

  JAX has no derivative for ``nextafter``; a one-unit nudge is a rounding, and
  a rounding is differentiated as the value it rounds, as ``astype`` is.
  Without this, ``jax.grad`` through a low-precision state or with respect to
  a traced ``clip_value`` (a meta-gradient) raises ``NotImplementedError``.
  """
  return jnp.nextafter(x, toward)


@_next_toward.defjvp
def _next_toward_jvp(primals, tangents):
  return _next_toward(*primals), tangents[0]


def _round_down(value: Any, dtype: jnp.dtype) -> Any:
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


def clip_by_value(clip_value: jax.typing.ArrayLike) -> optax.GradientTransformation:
  """Clips every element of the updates to ``[-clip_value, clip_value]``.

  Args:
    clip_value: bound > 0. May be a JAX scalar or tracer.

  Returns:
    A stateless ``optax.GradientTransformation``. Complex updates raise a
    ``TypeError`` (as in :func:`scale_by_adaptive_rms` and :func:`momentum`):
    wrap the optimizer in ``optax.contrib.split_real_and_imaginary`` instead.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> tx = gax.clip_by_value(1.0)
    >>> tx.update(jnp.array([0.5, -3.0, 2.0]), tx.init(None))[0]
    Array([ 0.5, -1. ,  1. ], dtype=float32)
  """
  clip_value = validation.check_optional_positive(
      "clip_value", clip_value, "Use None for no clipping."
  )

  def clip_leaf(u):
    if jnp.issubdtype(u.dtype, jnp.floating):
      validation.check_at_least(
          "clip_value", clip_value, float(jnp.finfo(u.dtype).smallest_subnormal), u.dtype,
          "it rounds down to 0, and every gradient would be clipped to 0.",
      )
    bound = _round_down(clip_value, u.dtype)
    return jnp.clip(u, -bound, bound)

  def update_fn(updates, state, params=None):
    del params
    _check_gradient_leaves(updates, "clip_by_value")
    validation.check_real_leaves(
        updates, "clip_by_value", "gradient", "complex numbers have no order to clip to a range"
    )
    return jax.tree.map(clip_leaf, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _cast(x: jax.Array, dtype) -> jax.Array:
  # Skipping same-dtype converts keeps the traced program (and compile time) small.
  return x if x.dtype == dtype else x.astype(dtype)


@jax.custom_jvp
def _sqrt(x: jax.Array) -> jax.Array:
  """``jnp.sqrt``, whose derivative at 0 is 0 instead of inf.

  A moment is 0 only where every gradient so far was 0, and then nothing
  depends on it; but inf times the 0 that flows back is NaN, and every
  meta-gradient through a zero gradient element (a dead unit, an unused
  parameter) would be NaN from the second update on.
  """
  return jnp.sqrt(x)


@_sqrt.defjvp
def _sqrt_jvp(primals, tangents):
  root = _sqrt(primals[0])
  # Two selects: the unselected 0.5 / 0 must not reach a second derivative.
  zero = root == 0
  slope = jnp.where(zero, 0, 0.5 / jnp.where(zero, 1, root))
  return root, slope * tangents[0]


def _scalar_sqrt(value):
  return math.sqrt(value) if isinstance(value, (int, float)) else jnp.sqrt(value)


def _compute_dtype(*dtypes) -> jnp.dtype:
  # float16/bfloat16 state is updated in float32: beta=0.999 rounds to 1 in
  # bfloat16, and eps=1e-8 flushes to 0 in float16 (0/0 on zero gradients).
  return jnp.result_type(jnp.float32, *dtypes)


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


def _zeros_like_on_same_devices(param, dtype):
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


def warn_once(shown: threading.Event, message: str) -> None:
  """Logs ``message`` as a WARNING unless ``shown`` is set, then sets it.

  Call it from a module-level function, never from a transform's closure: a
  closure that reads the Event carries its lock, and cannot be pickled
  (cloudpickle, as Ray and Dask use it, ships closures by value, module-level
  functions by name).
  """
  if not shown.is_set():
    shown.set()
    logger.warning(message)


_NESTEROV_WITHOUT_MOMENTUM = (
    "gradient_ascent_jax: nesterov=True has no effect with momentum 0: the "
    "Nesterov look-ahead adds momentum * velocity, which is 0, so the steps "
    "are those of nesterov=False. Pass a momentum in (0, 1), e.g. 0.9, for "
    "Nesterov momentum, or nesterov=False. This warning is shown once."
)
_nesterov_without_momentum_warned = threading.Event()


def _init_accumulator(params, accumulator_dtype, transform: str):
  # Again here: 64-bit types may have been switched off since construction.
  validation.check_accumulator_dtype(accumulator_dtype)
  validation.check_floating_params(params, transform)
  return jax.tree.map(lambda p: _zeros_like_on_same_devices(p, accumulator_dtype), params)


def _warn_if_too_coarse(beta, accumulator, transform: str) -> None:
  """Warns when the state dtype cannot resolve one step of the average.

  m moves by (1 - beta) * (h**2 - m) per step; below half a unit in the last
  place of m, rounding would undo it, so the stored m moves one unit instead
  (see _unstall). With 1 - beta below the dtype's relative spacing that is
  most steps: the average forgets faster than beta says, and with noisy
  gradients sits below the float32 one.
  """
  if isinstance(beta, jax.Array):  # injected or traced: value unknown here
    return
  for dtype in sorted({jnp.dtype(leaf.dtype).name for leaf in jax.tree.leaves(accumulator)}):
    finfo = jnp.finfo(dtype)
    spacing = float(finfo.eps)
    if 1 - float(beta) < spacing:
      # Only a wider state can help, so the advice depends on the state dtype.
      if finfo.bits < 32:
        fix = "Pass accumulator_dtype=jnp.float32 to keep the moments in float32."
      else:
        fix = f"Use a beta with 1 - beta >= {spacing:.3g}"
        if finfo.bits < 64:
          fix += (", or keep the moments in float64: enable "
                  "jax.config.update('jax_enable_x64', True) and pass "
                  "accumulator_dtype=jnp.float64")
        fix += "."
      logger.warning(
          "%s: beta=%s is closer to 1 than %s state can resolve (relative "
          "spacing %.3g): %s %s",
          transform, beta, dtype, spacing,
          _COARSE_HALF if finfo.bits < 32 else _COARSE_WIDE, fix,
      )


_COARSE_HALF = (
    "the stored second moment moves by one unit in the last place where beta "
    "asks for less, so it forgets faster than beta says and, with noisy "
    "gradients, averages low (steps up to about 1.4x larger than with float32 "
    "state)."
)
_COARSE_WIDE = (
    "the stored second moment can stop changing, and after a huge gradient "
    "stay saturated for good."
)


def _check_eps_is_normal(eps, accumulator) -> None:
  # Below the smallest normal number of the dtype the division runs in, eps is 0
  # or a subnormal that flush-to-zero hardware reads as 0: a zero gradient gives 0 / 0.
  for dtype in {_compute_dtype(leaf.dtype) for leaf in jax.tree.leaves(accumulator)}:
    validation.check_at_least(
        "eps", eps, float(jnp.finfo(dtype).tiny), dtype,
        "a zero gradient would give 0 / 0 = NaN.",
    )


def _unstall(stored: jax.Array, old: jax.Array, exact: jax.Array) -> jax.Array:
  """Moves a rounded moment at least one unit in the last place when it should move.

  beta = 0.999 changes m by at most 0.1% a step, less than half the spacing of
  bfloat16 (0.4% to 0.8%): rounded to nearest, m would come back unchanged,
  and a moment saturated by one huge gradient would pin its element's step
  near zero for good. One unit towards the exact value is the smallest move
  the dtype can make. A zero moment stays zero: its step is computed from the
  exact moment, and the smallest subnormal could be 60x too large.
  """
  old_wide = old.astype(exact.dtype)
  stalled = (stored == old) & (exact != old_wide) & (old != 0)
  toward = jnp.where(exact < old_wide, jnp.zeros_like(old), jnp.full_like(old, jnp.inf))
  # Where stalled, stored == old: stepping from stored gives the same value
  # and the derivative of the exact moment, which stored rounds.
  return jnp.where(stalled, _next_toward(stored, toward), stored)


def _check_matches_state(updates, accumulator, accumulator_dtype, transform):
  """Trace-time check: updates must have the tree, shapes (and dtypes) of state."""
  _check_gradient_leaves(updates, transform)
  # Before the dtype checks: with accumulator_dtype set, a complex update would
  # pass them and lose its imaginary part in the real state.
  validation.check_real_leaves(
      updates, transform, "gradient", "its state holds real numbers"
  )
  if accumulator_dtype is not None:
    # The moments are stored back in the dtype they came in: a state made with
    # another accumulator_dtype would otherwise silently keep its own.
    expected = jnp.dtype(accumulator_dtype)
    found = sorted({jnp.dtype(leaf.dtype).name for leaf in jax.tree.leaves(accumulator)})
    if found and found != [expected.name]:
      raise ValueError(
          f"{transform}: the optimizer state holds {', '.join(found)} moments, "
          f"but this optimizer was built with accumulator_dtype={expected.name}. "
          "The state comes from an optimizer with another accumulator_dtype: "
          "call state = tx.init(params) with this optimizer."
      )
  try:
    chex.assert_trees_all_equal_structs(updates, accumulator)
    chex.assert_trees_all_equal_shapes(updates, accumulator)
    if accumulator_dtype is None:
      chex.assert_trees_all_equal_dtypes(updates, accumulator)
  except AssertionError as error:
    raise ValueError(
        f"{transform}: the gradients do not match the optimizer state, which "
        "was initialised from the params. Pass gradients with the same tree "
        "structure, shapes and dtypes as those params (or re-run init). "
        f"Details (tree 0 is the gradients, tree 1 the state): {error}"
    ) from None


def scale_by_adaptive_rms(
    beta: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    accumulator_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  """Divides each element by the root of an EMA of its square (RMSprop).

  With ``h`` the incoming update::

    m_t = beta * m_{t-1} + (1 - beta) * h**2     # m_0 = 0, no bias correction
    s   = h / (sqrt(m_t) + eps)                  # eps outside the sqrt

  The new second moment saturates at the largest finite value of its dtype
  instead of overflowing to ``inf``: an inf moment would pin every later step
  of that element to zero forever, a saturated one decays back by ``beta``
  per step. Where ``h**2`` overflows but ``m_t`` does not, ``m_t`` is still
  stored and used exactly. float16/bfloat16 state is updated in float32 and
  stored back; ``s`` is computed from the exact float32 moment, before that
  rounding; where rounding to nearest would leave the stored moment
  unchanged although ``m_t`` moved (``beta = 0.999`` in bfloat16: 0.1% per
  step against a spacing of 0.4% to 0.8%), it moves one unit in the last
  place towards ``m_t``, so a saturated low-precision moment decays too
  (bfloat16: back to an ordinary step in about 16 000 steps, float32 state
  takes about 88 000). float32/float64 state that saturated no longer holds
  ``m_t``, only a lower bound: ``s`` then divides by
  ``max(sqrt(max), sqrt(1 - beta) * |h|)``,
  exact when the huge gradient dominates and otherwise at most
  ``sqrt(1 + beta)`` too small, so that step is at most ``sqrt(2)`` too large
  and never beyond RMSprop's bound ``1/sqrt(1 - beta)``.

  ``jax.grad`` through updates (meta-gradients) works in every dtype: the
  one-unit move is differentiated as the moment it rounds, and the square
  root of a zero moment (every gradient of that element 0 so far) has
  derivative 0, not inf, so a zero gradient element gives no NaN.

  Args:
    beta: decay of the second-moment average, in ``[0, 1)``.
    eps: added to the root mean square, > 0.
    accumulator_dtype: dtype of ``second_moment``; default: that of params.

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`ScaleByAdaptiveRmsState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> tx = gax.scale_by_adaptive_rms(beta=0.75, eps=0.0001)
    >>> state = tx.init(jnp.zeros(1))
    >>> s, state = tx.update(jnp.array([2.0]), state)  # 2 / (sqrt(1) + eps)
    >>> round(float(s[0]), 5), float(state.second_moment[0])
    (1.9998, 1.0)

  References:
    Tieleman and Hinton, 2012, Lecture 6.5 - rmsprop, COURSERA.
  """
  beta = validation.check_decay_rate("beta", beta)
  eps = validation.check_optional_positive(
      "eps", eps, "eps guards the division; use a small value such as 1e-8."
  )
  validation.check_accumulator_dtype(accumulator_dtype)
  name = "scale_by_adaptive_rms"

  def init_fn(params):
    second_moment = _init_accumulator(params, accumulator_dtype, name)
    _warn_if_too_coarse(beta, second_moment, name)
    _check_eps_is_normal(eps, second_moment)
    return ScaleByAdaptiveRmsState(second_moment=second_moment)

  def update_fn(updates, state, params=None):
    del params
    restore.check_own_state(state, ScaleByAdaptiveRmsState, name)
    _check_matches_state(updates, state.second_moment, accumulator_dtype, name)
    # (sqrt(1 - beta) * h)**2 rather than (1 - beta) * h**2: h**2 overflows
    # first (float32, h = 2.3e19, beta = 0.5), where m_t itself still fits.
    weight = _scalar_sqrt(1 - beta)

    def weighted(h, m):
      return weight * _cast(h, _compute_dtype(h.dtype, m.dtype))

    def new_moment(q, m):
      m_new = beta * _cast(m, q.dtype) + q * q
      # A select, not jnp.minimum: XLA:CPU re-computes a minimum-capped moment
      # inside the consumer fusion, which forces a copy of the donated buffer
      # (two extra passes over memory). NaN propagates either way.
      largest = jax.lax.full_like(m_new, jnp.finfo(m.dtype).max)
      m_new = jax.lax.select(m_new > largest, largest, m_new)
      stored = _cast(m_new, m.dtype)
      return stored if stored.dtype == m_new.dtype else _unstall(stored, m, m_new)

    def scale(h, q, m, m_stored):
      q_size = jnp.abs(q)
      if m_stored.dtype == q.dtype:
        # Read the stored moment, not the old one again: re-reading the donated
        # old buffer after its in-place update makes XLA copy it (extra passes).
        # sqrt(m_t) >= |q| always. Where m_t saturated (beyond the largest
        # value) the stored moment only bounds it from below: |q| keeps the
        # step of a huge gradient exact and every step <= 1/sqrt(1 - beta).
        root = jnp.maximum(_sqrt(m_stored), q_size)
      else:
        # float16/bfloat16 storage: divide by the moment before rounding, or a
        # small gradient's moment underflows to 0 and h / eps overflows.
        m_wide = beta * _cast(m, q.dtype)
        m_new = m_wide + q * q
        # hypot only where the moment overflowed; elsewhere it is fed ones, since
        # its derivative at (0, 0) is NaN, and 0 times NaN would reach the
        # meta-gradient through the branch that where() does not select.
        overflowed = jnp.isinf(m_new)
        exact_root = jnp.hypot(
            jnp.where(overflowed, _sqrt(m_wide), 1), jnp.where(overflowed, q_size, 1)
        )
        root = jnp.where(overflowed, exact_root, _sqrt(m_new))
      return _cast(_cast(h, q.dtype) / (root + eps), h.dtype)

    weighted_updates = jax.tree.map(weighted, updates, state.second_moment)
    second_moment = jax.tree.map(new_moment, weighted_updates, state.second_moment)
    scaled = jax.tree.map(scale, updates, weighted_updates, state.second_moment, second_moment)
    return scaled, ScaleByAdaptiveRmsState(second_moment=second_moment)

  return optax.GradientTransformation(init_fn, update_fn)


def momentum(
    decay: jax.typing.ArrayLike = 0.9,
    nesterov: bool = False,
    *,
    accumulator_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
  """Heavy-ball or Nesterov momentum on the incoming updates.

  With ``s`` the incoming update::

    v_t = decay * v_{t-1} + s                          # v_0 = 0
    d   = s + decay * v_t  if nesterov else  v_t

  This is the standard form (``optax.trace``, ``torch.optim.SGD``), not the
  original ``GradientAscent``'s Nesterov, which fed ``s + decay * v`` back into
  ``v`` and grew like ``(2 * decay)**t``.

  Args:
    decay: momentum coefficient in ``[0, 1)``; 0 passes updates through.
    nesterov: use the Nesterov form. A Python bool selects the program; a JAX
      boolean (e.g. under ``vmap``) selects with ``jnp.where``.
    accumulator_dtype: dtype of ``velocity``; default: that of params.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`MomentumState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> tx = gax.momentum(decay=0.5)
    >>> state = tx.init(jnp.zeros(1))
    >>> d1, state = tx.update(jnp.array([1.0]), state)
    >>> d2, state = tx.update(jnp.array([1.0]), state)  # 0.5 * 1 + 1
    >>> float(d1[0]), float(d2[0])
    (1.0, 1.5)

  References:
    Polyak, 1964; Sutskever et al., 2013, On the importance of initialization
    and momentum in deep learning.
  """
  decay = validation.check_decay_rate("decay", decay)
  nesterov = validation.check_bool("nesterov", nesterov)
  validation.check_accumulator_dtype(accumulator_dtype)
  name = "momentum"
  if nesterov is True and isinstance(decay, float) and decay == 0:
    # Nesterov with momentum 0 takes plain (momentum-free) steps: say so, once.
    warn_once(_nesterov_without_momentum_warned, _NESTEROV_WITHOUT_MOMENTUM)

  def init_fn(params):
    velocity = _init_accumulator(params, accumulator_dtype, name)
    return MomentumState(velocity=velocity)

  def new_velocity(s, v):
    dtype = _compute_dtype(s.dtype, v.dtype)
    return _cast(decay * _cast(v, dtype) + _cast(s, dtype), v.dtype)

  def direction(s, v):
    dtype = _compute_dtype(s.dtype, v.dtype)
    s_wide, v_wide = _cast(s, dtype), _cast(v, dtype)
    if isinstance(nesterov, (bool, np.bool_)):
      out = s_wide + decay * v_wide if nesterov else v_wide
    else:
      out = jnp.where(nesterov, s_wide + decay * v_wide, v_wide)
    return _cast(out, s.dtype)

  def update_fn(updates, state, params=None):
    del params
    restore.check_own_state(state, MomentumState, name)
    _check_matches_state(updates, state.velocity, accumulator_dtype, name)
    velocity = jax.tree.map(new_velocity, updates, state.velocity)
    return jax.tree.map(direction, updates, velocity), MomentumState(velocity)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_warmup_decay(
    learning_rate: optax.ScalarOrSchedule = 0.01,
    warmup_steps: jax.typing.ArrayLike = 0,
    lr_decay: jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformation:
  """Multiplies the updates by ``-lr_t`` of :func:`warmup_decay_schedule`.

  The minus sign is Optax's descent convention, as in
  ``optax.scale_by_learning_rate``: after :func:`flip_sign` the chain ascends.
  The step counter is int32 and saturates at its maximum instead of wrapping.

  Args:
    learning_rate: base rate, a float >= 0, a JAX scalar or an Optax schedule.
    warmup_steps: steps of linear warmup; 0 turns it off.
    lr_decay: per-step decay factor in ``(0, 1]``, or ``None``.

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`ScaleByWarmupDecayState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> tx = gax.scale_by_warmup_decay(0.1, warmup_steps=2)
    >>> state = tx.init(jnp.zeros(1))
    >>> u1, state = tx.update(jnp.array([1.0]), state)  # -0.1 * 1/2
    >>> u2, state = tx.update(jnp.array([1.0]), state)  # -0.1 * 2/2
    >>> round(float(u1[0]), 6), round(float(u2[0]), 6), int(state.count)
    (-0.05, -0.1, 2)
  """
  schedule = schedules.warmup_decay_schedule(
      learning_rate, warmup_steps, lr_decay
  )

  def init_fn(params):
    return ScaleByWarmupDecayState(count=zero_step_count(params))

  def update_fn(updates, state, params=None):
    del params
    restore.check_own_state(state, ScaleByWarmupDecayState, "scale_by_warmup_decay")
    step_size = -cast(jax.Array, schedule(state.count))

    def scale(u):
      # A Python-float rate is weakly typed: times float16 updates it would be
      # rounded to float16 first (1e-8 becomes 0). Multiply in float32.
      return _cast(step_size * _cast(u, _compute_dtype(u.dtype)), u.dtype)

    updates = jax.tree.map(scale, updates)
    count = cast(jax.Array, optax.safe_increment(state.count))
    return updates, ScaleByWarmupDecayState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)
