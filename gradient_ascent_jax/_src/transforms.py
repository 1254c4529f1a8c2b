"""The composable stages of gradient ascent, each a pure Optax transform.

The stages that only see the gradient (clipping, the RMS scaling, momentum,
the learning rate) are odd in it (``f(-g) = -f(g)``), so the sign flip could
come before or after them; it comes first because that is what ``maximize``
needs. Weight decay is not odd (it adds a term of the params), so it comes
after the flip: ``-weight_decay * params`` joins the gradient that ascends.
"""

from __future__ import annotations

import threading
import typing
from typing import TYPE_CHECKING
from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradient_ascent_jax._src import numerics
from gradient_ascent_jax._src import once
from gradient_ascent_jax._src import placement
from gradient_ascent_jax._src import schedules
from gradient_ascent_jax._src import state_checks
from gradient_ascent_jax._src import validation

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
    >>> tx = gax.momentum(0.5)
    >>> _, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
    >>> state.velocity  # 0.5 * 0 + 1
    Array([1., 1.], dtype=float32)
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

  return unchecked_flip_sign(check_updates=True)


def unchecked_flip_sign(check_updates: bool) -> optax.GradientTransformation:
  """:func:`flip_sign`; ``check_updates=False`` where the chain checked the gradients."""

  def init_fn(params):
    del params
    return FlipSignState()

  def update_fn(updates, state, params=None):
    del params
    state_checks.check_own_state(state, FlipSignState, "flip_sign")
    if check_updates:
      state_checks.check_gradient_leaves(updates, "flip_sign")
    return negate(updates), state

  return optax.GradientTransformation(init_fn, update_fn)


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
  clip_value = validation.check_clip_value(clip_value)
  return unchecked_clip_by_value(clip_value, check_updates=True)


def check_clippable(updates: Any) -> None:
  """The gradients :func:`clip_by_value` can clip: arrays of real numbers."""
  state_checks.check_gradient_leaves(updates, "clip_by_value")
  state_checks.check_real_leaves(
    updates, "clip_by_value", "gradient", "complex numbers have no order to clip to a range"
  )


def unchecked_clip_by_value(clip_value, check_updates: bool) -> optax.GradientTransformation:
  """:func:`clip_by_value` of a checked ``clip_value``."""

  def clip_leaf(u):
    if jnp.issubdtype(u.dtype, jnp.floating):
      validation.check_at_least(
        "clip_value",
        clip_value,
        float(jnp.finfo(u.dtype).smallest_subnormal),
        u.dtype,
        "it rounds down to 0, and every gradient would be clipped to 0.",
      )
    bound = numerics.round_down(clip_value, u.dtype)
    return jnp.clip(u, -bound, bound)

  def update_fn(updates, state, params=None):
    del params
    if check_updates:
      check_clippable(updates)
    return jax.tree.map(clip_leaf, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _check_params_fit(updates, params) -> None:
  """Raises ValueError unless ``params`` has the updates' tree and each leaf's shape.

  The decay term is added leaf by leaf, so params of another shape would be
  broadcast into the update (and from there into the moments) without a word.
  """
  fix = "Pass the params the gradients are of: tx.update(grads, state, params)."
  misfits = []

  def note(path, u, p):
    if u is not None and jnp.shape(p) != jnp.shape(u):
      misfits.append((jax.tree_util.keystr(path) or "<root>", jnp.shape(p), jnp.shape(u)))

  try:
    jax.tree_util.tree_map_with_path(note, updates, params, is_leaf=lambda u: u is None)
  except ValueError:
    raise ValueError(
      "add_decayed_weights: the params do not have the gradients' tree. The "
      f"gradients': {jax.tree.structure(updates)}; the params': "
      f"{jax.tree.structure(params)}. {fix}"
    ) from None
  if misfits:
    where, param_shape, grad_shape = misfits[0]
    raise ValueError(
      f"add_decayed_weights: params{where} has shape {param_shape}, but its gradient "
      f"has shape {grad_shape}; weight decay would broadcast one into the other. {fix}"
    )


def add_decayed_weights(
  weight_decay: jax.typing.ArrayLike, mask: Any = None
) -> optax.GradientTransformation:
  """Adds ``weight_decay * params`` to the (descent-convention) updates.

  After :func:`flip_sign` the updates are ``-h``, so this gives
  ``-(h - weight_decay * p)``: ascent on ``objective - weight_decay/2 * |p|^2``.
  The term is cast to the updates' dtype, so the stages after it see the
  gradients' dtype (as ``optax.add_decayed_weights`` does not when a traced
  float32 rate meets bfloat16 params).

  Args:
    weight_decay: >= 0. May be a JAX scalar or tracer.
    mask: None (every leaf decays), or which leaves decay, as in
      ``optax.masked``: a pytree of bools (True: decayed), or a prefix of the
      params' tree, or a callable ``params -> such a pytree``.

  Returns:
    A stateless ``optax.GradientTransformation`` whose ``update`` needs the
    params. The state does not depend on the mask or the params.
  """

  def term(p, dtype):
    # As the learning-rate stage does: a Python-float rate is weakly typed, and times
    # float16 params it would be rounded to float16 first (1e-8 becomes 0).
    wide = numerics.compute_dtype(jnp.result_type(p))
    return numerics.cast(jnp.multiply(weight_decay, jnp.asarray(p, wide)), dtype)

  def decay(updates, params):
    return jax.tree.map(
      lambda u, p: None if u is None else u + term(p, u.dtype),
      updates,
      params,
      is_leaf=lambda u: u is None,
    )

  def update_fn(updates, state, params=None):
    if params is None:
      unknown = ""
      if isinstance(weight_decay, jax.Array):
        unknown = (
          " Here weight_decay is a JAX value, which may be 0 but cannot be known to "
          "be when the optimizer is built (optax.inject_hyperparams injects every "
          "number it is given): leave weight_decay out (None, the default) or name "
          "it in static_args=('weight_decay',) to have no decay stage."
        )
      raise ValueError(
        "add_decayed_weights: weight_decay > 0 pulls the params toward 0, so update "
        "needs them: call tx.update(grads, state, params) with the params the "
        "gradients are of (or build the optimizer with weight_decay=None)." + unknown
      )
    _check_params_fit(updates, params)
    if mask is None:
      return decay(updates, params), state
    chosen = mask(params) if callable(mask) else mask
    if callable(mask):
      validation.check_mask_leaves(chosen, "the mask that weight_decay_mask(params) returned")
    try:
      jax.tree.map(lambda keep, subtree: None, chosen, params)
    except ValueError as error:
      raise ValueError(
        "add_decayed_weights: weight_decay_mask does not fit the params: it must "
        "have the params' tree, or a prefix of it (a bool may stand for a whole "
        f"subtree), with a bool at each of its leaves. The mask's tree: "
        f"{jax.tree.structure(chosen)}; the params': {jax.tree.structure(params)}. "
        "Build it from the params, e.g. jax.tree.map(lambda p: p.ndim > 1, params), "
        f"or pass that function as weight_decay_mask. Details: {error}"
      ) from None
    # A leaf of the mask may stand for a whole subtree of the params.
    return jax.tree.map(
      lambda keep, u, p: decay(u, p) if keep else u, chosen, updates, params
    ), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


_NESTEROV_WITHOUT_MOMENTUM = (
  "nesterov=True has no effect with momentum 0: the "
  "Nesterov look-ahead adds momentum * velocity, which is 0, so the steps "
  "are those of nesterov=False. Pass a momentum in (0, 1), e.g. 0.9, for "
  "Nesterov momentum, or nesterov=False. This warning is shown once."
)
_nesterov_without_momentum_warned = threading.Event()


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

  The second moment saturates at its dtype's largest value instead of
  becoming ``inf``; float16/bfloat16 state is updated in float32 and still
  decays when rounding would stall it; ``jax.grad`` through updates works in
  every dtype. How, and what each costs: the math page's "Precision" section.

  Args:
    beta: decay of the second-moment average, in ``[0, 1)``.
    eps: added to the root mean square, > 0.
    accumulator_dtype: dtype of ``second_moment``; default: that of params.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ScaleByAdaptiveRmsState`;
    the scaled updates keep the dtype of the updates it is given.

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
  eps = validation.check_eps(eps)
  validation.check_accumulator_dtype(accumulator_dtype)
  return unchecked_scale_by_adaptive_rms(beta, eps, accumulator_dtype, check_updates=True)


def unchecked_scale_by_adaptive_rms(
  beta, eps, accumulator_dtype, check_updates: bool
) -> optax.GradientTransformation:
  """:func:`scale_by_adaptive_rms` of checked hyperparameters."""
  name = "scale_by_adaptive_rms"

  def init_fn(params):
    second_moment = state_checks.init_accumulator(params, accumulator_dtype, name)
    state_checks.warn_if_too_coarse(beta, second_moment, name)
    state_checks.check_eps_is_normal(eps, second_moment)
    return ScaleByAdaptiveRmsState(second_moment=second_moment)

  def update_fn(updates, state, params=None):
    del params
    state_checks.check_own_state(state, ScaleByAdaptiveRmsState, name)
    if check_updates:
      state_checks.check_matches_state(updates, state.second_moment, accumulator_dtype, name)
    weight = numerics.scalar_sqrt(1 - beta)  # m_t = beta * m + (weight * h)**2
    steps = jax.tree.map(
      lambda h, m: numerics.adaptive_rms(h, m, beta, weight, eps), updates, state.second_moment
    )
    scaled = jax.tree.map(lambda _, step: step[0], updates, steps)
    second_moment = jax.tree.map(lambda _, step: step[1], updates, steps)
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
  return unchecked_momentum(decay, nesterov, accumulator_dtype, check_updates=True)


def unchecked_momentum(
  decay, nesterov, accumulator_dtype, check_updates: bool
) -> optax.GradientTransformation:
  """:func:`momentum` of checked hyperparameters."""
  name = "momentum"
  if nesterov is True and isinstance(decay, float) and decay == 0:
    # Nesterov with momentum 0 takes plain (momentum-free) steps: say so, once.
    once.warn_user_once(_nesterov_without_momentum_warned, _NESTEROV_WITHOUT_MOMENTUM)

  def init_fn(params):
    velocity = state_checks.init_accumulator(params, accumulator_dtype, name)
    return MomentumState(velocity=velocity)

  def new_velocity(s, v):
    dtype = numerics.compute_dtype(s.dtype, v.dtype)
    return numerics.cast(decay * numerics.cast(v, dtype) + numerics.cast(s, dtype), v.dtype)

  def direction(s, v):
    dtype = numerics.compute_dtype(s.dtype, v.dtype)
    s_wide, v_wide = numerics.cast(s, dtype), numerics.cast(v, dtype)
    if isinstance(nesterov, (bool, np.bool_)):
      out = s_wide + decay * v_wide if nesterov else v_wide
    else:
      out = jnp.where(nesterov, s_wide + decay * v_wide, v_wide)
    return numerics.cast(out, s.dtype)

  def update_fn(updates, state, params=None):
    del params
    state_checks.check_own_state(state, MomentumState, name)
    if check_updates:
      state_checks.check_matches_state(updates, state.velocity, accumulator_dtype, name)
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
    An ``optax.GradientTransformation`` with state :class:`ScaleByWarmupDecayState`.

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
  return scale_by_schedule(schedules.warmup_decay_schedule(learning_rate, warmup_steps, lr_decay))


def scale_by_schedule(schedule: optax.Schedule) -> optax.GradientTransformation:
  """:func:`scale_by_warmup_decay` of a schedule built and checked already."""

  def init_fn(params):
    return ScaleByWarmupDecayState(count=placement.zero_step_count(params))

  def update_fn(updates, state, params=None):
    del params
    state_checks.check_own_state(state, ScaleByWarmupDecayState, "scale_by_warmup_decay")
    step_size = -typing.cast(jax.Array, schedule(state.count))

    def scale(u):
      # A Python-float rate is weakly typed: times float16 updates it would be
      # rounded to float16 first (1e-8 becomes 0). Multiply in float32.
      return numerics.cast(step_size * numerics.cast(u, numerics.compute_dtype(u.dtype)), u.dtype)

    updates = jax.tree.map(scale, updates)
    count = typing.cast(jax.Array, optax.safe_increment(state.count))
    return updates, ScaleByWarmupDecayState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)
