"""The whole optimizer, and ascent from any Optax optimizer."""

from __future__ import annotations

import threading
import typing
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gradient_ascent_jax._src import chain_checks
from gradient_ascent_jax._src import objective_args
from gradient_ascent_jax._src import once
from gradient_ascent_jax._src import progress
from gradient_ascent_jax._src import schedules
from gradient_ascent_jax._src import state_checks
from gradient_ascent_jax._src import transforms
from gradient_ascent_jax._src import validation

_MASK_WITHOUT_DECAY = (
  "gradient_ascent: weight_decay_mask is set but weight_decay is not, so no leaf "
  "decays and the mask is not used. Pass weight_decay as well (a rate such as 1e-4) "
  "for the leaves the mask picks to decay, or leave weight_decay_mask out. "
  "(weight_decay=0 turns decay off without this warning.)"
)


def gradient_ascent(
  learning_rate: optax.ScalarOrSchedule = 0.01,
  momentum: jax.typing.ArrayLike = 0.9,
  beta: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  nesterov: bool = False,
  clip_value: jax.typing.ArrayLike | None = None,
  lr_decay: jax.typing.ArrayLike | None = None,
  warmup_steps: jax.typing.ArrayLike = 0,
  logging_interval: jax.typing.ArrayLike | None = None,
  *,
  accumulator_dtype: jax.typing.DTypeLike | None = None,
  weight_decay: jax.typing.ArrayLike | None = None,
  logging_name: str | None = None,
  weight_decay_mask: Any = None,
  logging_emit: str = "callback",
) -> optax.GradientTransformationExtraArgs:
  """Gradient ascent: RMSprop-scaled momentum with warmup and decay, ascending.

  Give it the gradient of the objective to MAXIMIZE; the updates it returns
  increase that objective when added with ``optax.apply_updates``. It is the
  chain::

    log_progress (if logging_interval) -> flip_sign -> clip_by_value (if
    clip_value) -> weight decay (if weight_decay) -> scale_by_adaptive_rms
    -> momentum -> scale_by_warmup_decay

  With ``clip_value=None, nesterov=False`` this is
  ``torch.optim.RMSprop(lr, alpha=beta, eps=eps, momentum=momentum,
  maximize=True)`` under a ``LambdaLR`` with the warmup/decay factor.

  The early steps are the largest: with no bias correction (as in torch's
  RMSprop) the first update moves every parameter by ``learning_rate /
  sqrt(1 - beta)``, 31.6 x ``learning_rate``, whatever its gradient's size
  down to where ``eps`` counts (within 1% above ``100 * eps / sqrt(1 - beta)``,
  3.2e-5 at the defaults; a gradient of 1e-6 moves 24 x), and momentum then
  adds to it. Start at a tenth of Adam's rate for the same
  model, or ramp up with ``warmup_steps``: see the hyperparameters guide.

  Args:
    learning_rate: float >= 0, JAX scalar, or Optax schedule (``lr``); each
      parameter moves by ``learning_rate / sqrt(1 - beta)`` on the first step.
    momentum: momentum coefficient in ``[0, 1)``.
    beta: decay of the squared-gradient average in ``[0, 1)``.
    eps: > 0, added to the root mean square.
    nesterov: standard Nesterov momentum.
    clip_value: clip gradients element-wise to ``[-clip_value, clip_value]``;
      None (default) for no clipping.
    lr_decay: multiply the rate by this factor once per step; None for none.
    warmup_steps: linear warmup over this many steps; 0 for none.
    logging_interval: log progress every N steps (an ``INFO`` record on the
      logger ``gradient_ascent_jax``, see :func:`log_progress`); None (default)
      or 0 for off, which costs nothing. ``tx.update(grads, state, params,
      value=objective)`` logs the objective too (of a loss: ``-loss``).
    accumulator_dtype: dtype of the two moment buffers; default: the params'.
      ``jnp.float64`` needs 64-bit types on (``jax_enable_x64``), or it is
      refused.
    weight_decay: None (default) or 0 for none (no stage), or a rate >= 0:
      ascends on ``objective - weight_decay/2 * |params|^2`` (before the RMS
      scaling, as torch's ``RMSprop(maximize=True, weight_decay=...)``), and
      ``update`` needs the params. A JAX value keeps the stage.
    logging_name: None, or a name such as ``"disc"``: the records and
      warnings then go to the logger ``gradient_ascent_jax.disc`` and start
      with ``disc:``, so that two optimizers' records can be told apart.
    weight_decay_mask: which leaves decay, with ``weight_decay``: None (all),
      a pytree of bools (True: decayed; the params' tree or a prefix of it,
      not one lone bool) or
      a callable ``params -> pytree of bools``, as
      ``optax.add_decayed_weights``'s ``mask``. Each leaf is one bool known when
      the step is traced (else ``TypeError``); under
      ``optax.inject_hyperparams`` name a callable in ``static_args``.
    logging_emit: how records leave the compiled step: ``"callback"``
      (default, ``jax.debug.callback``; suits a loop inside ``lax.scan``) or
      ``"state"`` (kept in the state for a :class:`ProgressReader` in a Python
      loop; no callback, so every step stays on JAX's fast dispatch path).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with the chain's state (a
    tuple, one entry per stage); ``update`` refuses any other state.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import gradient_ascent_jax as gax
    >>> objective = lambda x: -jnp.sum((x - 3.0) ** 2)  # maximum at x = 3
    >>> tx = gax.gradient_ascent(learning_rate=0.1)
    >>> x = jnp.zeros(2)
    >>> state = tx.init(x)
    >>> for _ in range(200):
    ...   updates, state = tx.update(jax.grad(objective)(x), state, x)
    ...   x = optax.apply_updates(x, updates)
    >>> bool(jnp.allclose(x, 3.0, atol=0.05))
    True
  """
  learning_rate = validation.check_learning_rate("learning_rate", learning_rate)
  momentum = validation.check_decay_rate("momentum", momentum)
  beta = validation.check_decay_rate("beta", beta)
  eps = validation.check_eps(eps)
  nesterov = validation.check_bool("nesterov", nesterov)
  clip_value = validation.check_optional_positive(
    "clip_value", clip_value, "Use None for no clipping."
  )
  lr_decay = validation.check_lr_decay(lr_decay)
  warmup_steps = validation.check_count(
    "warmup_steps", warmup_steps, 0, "Use 0 to turn warmup off."
  )
  logging_interval = validation.check_logging_interval(logging_interval)
  logging_name = validation.check_logging_name(logging_name)
  logging_emit = validation.check_logging_emit("logging_emit", logging_emit)
  weight_decay = validation.check_weight_decay(weight_decay)
  weight_decay_mask = validation.check_weight_decay_mask(weight_decay_mask)
  if weight_decay_mask is not None and weight_decay is None:
    once.warn_user(_MASK_WITHOUT_DECAY)
  validation.check_accumulator_dtype(accumulator_dtype)

  # Checked once, above; the stages are built from the checked values, and the
  # schedule once, for both the rate the records report and the step.
  schedule = schedules.unchecked_warmup_decay_schedule(learning_rate, warmup_steps, lr_decay)
  stages = []
  if validation.logging_enabled(logging_interval):
    stages.append(
      progress.unchecked_log_progress(logging_interval, schedule, logging_name, logging_emit)
    )
  stages.append(transforms.unchecked_flip_sign(check_updates=False))
  if clip_value is not None:
    stages.append(transforms.unchecked_clip_by_value(clip_value, check_updates=False))
  if validation.weight_decay_enabled(weight_decay):
    stages.append(transforms.add_decayed_weights(typing.cast(Any, weight_decay), weight_decay_mask))
  rms = len(stages)
  stages += [
    transforms.unchecked_scale_by_adaptive_rms(beta, eps, accumulator_dtype, check_updates=False),
    transforms.unchecked_momentum(momentum, nesterov, accumulator_dtype, check_updates=False),
    transforms.scale_by_schedule(schedule),
  ]

  def check_updates(updates, state):
    # The stages' checks of the gradients, once, in the order the stages run.
    state_checks.check_gradient_leaves(updates, "flip_sign")
    # Python numbers are gradients too (each stage makes them arrays): compare as arrays.
    updates = jax.tree.map(lambda u: jnp.asarray(u) if isinstance(u, (int, float)) else u, updates)
    if clip_value is not None:
      transforms.check_clippable(updates)
    state_checks.check_matches_state(
      updates,
      state[rms].second_moment,
      accumulator_dtype,
      "scale_by_adaptive_rms",
      leaves_checked=True,
    )

  return _Ascending(
    *chain_checks.checked_state("gradient_ascent", optax.chain(*stages), check_updates)
  )


class _Ascending(optax.GradientTransformationExtraArgs):
  """A transformation that already ascends: :func:`maximize` refuses it."""

  __slots__ = ()

  def __repr__(self) -> str:
    # Shown as the public Optax type it is, not as this private marker.
    return f"GradientTransformationExtraArgs(init={self.init!r}, update={self.update!r})"


def _path_of(state: Any, state_type: type) -> str | None:
  """Where ``state`` holds a ``state_type`` node, if anywhere."""

  def marked(node):
    return isinstance(node, state_type)

  for path, node in jax.tree_util.tree_flatten_with_path(state, is_leaf=marked)[0]:
    if marked(node):
      return "state" + jax.tree_util.keystr(path)
  return None


_PLATEAU_RELATIVE_TEST = (
  "maximize(tx): tx holds optax.contrib.reduce_on_plateau "
  "(at {path}), which is handed value=-objective. Its relative test, "
  "value < (1 - rtol) * best - atol, counts a value that stays flat as an "
  "improvement when it is negative, so with rtol > 0 (Optax's default is 1e-4) "
  "the scale never drops while your objective is positive. Build it with "
  "rtol=0.0 and atol set to the least increase of the objective that counts as "
  "progress, e.g. optax.contrib.reduce_on_plateau(rtol=0.0, atol=1e-3): that test "
  "is right for objectives of either sign. Nothing to change if you did, or if "
  "the objective stays negative. This warning is shown once."
)
_plateau_relative_test_warned = threading.Event()


def _warn_plateau_relative_test(path: str) -> None:
  once.warn_user_once(_plateau_relative_test_warned, _PLATEAU_RELATIVE_TEST.format(path=path))


def _refuse_ascending(why: str) -> ValueError:
  return ValueError(
    f"maximize: tx already ascends ({why}). maximize(tx) would negate the "
    "gradients a second time and descend. Use tx as it is: it already "
    "maximizes the objective whose gradient it is given."
  )


def maximize(
  tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Turns any Optax (descent) optimizer into an ascent optimizer.

  The incoming gradients are negated before ``tx`` sees them, so ``tx``
  descends on ``-objective``: its momentum and statistics see the right sign,
  and decoupled weight decay still shrinks the weights. The state is exactly
  ``tx``'s. The extra arguments of ``update`` through which Optax optimizers
  take the objective (``value``, ``grad``, ``value_fn``, ``obj_fn``,
  ``grad_fn``) are handed on for ``-objective``; a ``tx`` that already ascends
  is refused. What each optimizer needs, and why: the guide "Ascent with any
  Optax optimizer".

  Args:
    tx: an ``optax.GradientTransformation`` such as ``optax.adam(1e-3)``, or
      an ``optax.MultiSteps``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with the state of ``tx``.

  Raises:
    TypeError: ``tx`` is not a transformation.
    ValueError: ``tx`` already ascends (here or at ``init``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import gradient_ascent_jax as gax
    >>> objective = lambda x: -jnp.sum((x - 1.0) ** 2)
    >>> tx = gax.maximize(optax.sgd(0.1))
    >>> x = jnp.zeros(1)
    >>> state = tx.init(x)
    >>> updates, state = tx.update(jax.grad(objective)(x), state, x)
    >>> optax.apply_updates(x, updates)  # moves towards the maximum at 1
    Array([0.2], dtype=float32)
  """
  if isinstance(tx, optax.MultiSteps):
    tx = tx.gradient_transformation()
  if not isinstance(tx, optax.GradientTransformation):
    hint = ""
    if callable(tx):
      hint = " It looks like a factory: call it, e.g. optax.adam(1e-3)."
    raise TypeError(
      "maximize expects an optax.GradientTransformation such as "
      f"optax.adam(1e-3), got {tx!r}.{hint}"
    )
  if isinstance(tx, _Ascending):
    raise _refuse_ascending("it is gax.gradient_ascent(...) or gax.maximize(...)")
  inner = optax.with_extra_args_support(tx)

  def init_fn(params):
    state = inner.init(params)
    path = _path_of(state, transforms.FlipSignState)
    if path is not None:
      raise _refuse_ascending(
        f"its state holds gax.flip_sign's FlipSignState at {path}, as that "
        "of gradient_ascent(...) or of a chain with flip_sign() does"
      )
    # The test that decides a plateau is in reduce_on_plateau's closure, out of
    # reach, and no transform of the value it is handed makes a relative test
    # right for both signs without knowing rtol: so say how to build it instead.
    path = _path_of(state, optax.contrib.ReduceLROnPlateauState)
    if path is not None:
      _warn_plateau_relative_test(path)
    return objective_args.negate_cached_objective(state)

  def update_fn(updates, state, params=None, **extra_args):
    if state is None:
      raise ValueError(
        "maximize: got state None. Call state = tx.init(params) with this "
        "tx and pass that state to tx.update."
      )
    updates, state = inner.update(
      transforms.negate(updates),
      objective_args.negate_cached_objective(state),
      params,
      **objective_args.negate_objective(extra_args),
    )
    return updates, objective_args.negate_cached_objective(state)

  return _Ascending(init_fn, update_fn)
