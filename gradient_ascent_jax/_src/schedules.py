"""The learning-rate schedule of the original optimizer, as an Optax schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gradient_ascent_jax._src import validation


def learning_rate_at(
  learning_rate: optax.ScalarOrSchedule, count: jax.typing.ArrayLike
) -> jax.typing.ArrayLike:
  """``learning_rate``, or ``learning_rate(count)`` for a schedule, checked.

  A schedule's output is only known when it is called, under tracing: a
  non-scalar rate would broadcast every parameter to its shape.
  """
  if not callable(learning_rate):
    return learning_rate
  return validation.check_learning_rate("learning_rate(count)", learning_rate(count))


def warmup_decay_schedule(
  learning_rate: optax.ScalarOrSchedule = 0.01,
  warmup_steps: jax.typing.ArrayLike = 0,
  lr_decay: jax.typing.ArrayLike | None = None,
) -> optax.Schedule:
  """Linear warmup and per-step exponential decay of a learning rate.

  With ``k`` the number of steps already taken and ``t = k + 1``::

    lr(k) = base(k) * lr_decay**k * min(1, t / warmup_steps)

  where ``base(k)`` is ``learning_rate`` or ``learning_rate(k)`` for a
  schedule; the decay factor applies only when ``lr_decay`` is set and the
  warmup factor only when ``warmup_steps > 0``. The very first step therefore
  already uses ``learning_rate / warmup_steps``, as in the original
  ``GradientAscent``. Counts are converted to floating point before ``t`` is
  formed, so a saturated int32 counter still gives a finite rate.

  Args:
    learning_rate: base rate, a float >= 0, a JAX scalar or an Optax schedule.
    warmup_steps: number of steps of linear warmup; 0 turns it off. May be a
      JAX scalar (e.g. injected by ``optax.inject_hyperparams``).
    lr_decay: factor in ``(0, 1]`` applied once per step, or ``None``.

  Returns:
    An ``optax.Schedule``: a function ``count -> learning rate``.

  Examples:
    >>> import gradient_ascent_jax as gax
    >>> schedule = gax.warmup_decay_schedule(0.1, warmup_steps=4, lr_decay=0.5)
    >>> [round(float(schedule(k)), 5) for k in range(5)]
    [0.025, 0.025, 0.01875, 0.0125, 0.00625]
  """
  learning_rate = validation.check_learning_rate("learning_rate", learning_rate)
  warmup_steps = validation.check_count(
    "warmup_steps", warmup_steps, 0, "Use 0 to turn warmup off."
  )
  lr_decay = validation.check_lr_decay(lr_decay)
  return unchecked_warmup_decay_schedule(learning_rate, warmup_steps, lr_decay)


def unchecked_warmup_decay_schedule(learning_rate, warmup_steps, lr_decay) -> optax.Schedule:
  """:func:`warmup_decay_schedule` of hyperparameters checked already."""

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    step = jnp.asarray(count).astype(jnp.result_type(float))
    rate = jnp.asarray(learning_rate_at(learning_rate, count))
    if lr_decay is not None:
      rate = rate * jnp.power(lr_decay, step)
    if isinstance(warmup_steps, jax.Array):
      # An injected (traced) warmup_steps may be 0: select instead of branch.
      ramp = jnp.minimum(1.0, (step + 1) / jnp.maximum(warmup_steps, 1))
      rate = rate * jnp.where(warmup_steps > 0, ramp, 1.0)
    elif warmup_steps > 0:
      # As a float: a Python int beyond int32 would not convert to a JAX int.
      rate = rate * jnp.minimum(1.0, (step + 1) / float(warmup_steps))
    return rate

  return schedule
