"""Progress logging from inside compiled code, through Python ``logging``."""

from __future__ import annotations

import logging
import threading
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradient_ascent_jax import schedules
from gradient_ascent_jax import transforms
from gradient_ascent_jax import validation

logger = logging.getLogger("gradient_ascent_jax")

_INVISIBLE_WARNING = (
    "gradient_ascent_jax: progress records are due (logging_interval is set) "
    "but the logger 'gradient_ascent_jax' is not enabled for INFO, so they are "
    "dropped. To see them, call logging.basicConfig(level=logging.INFO), or "
    "add a handler and setLevel(logging.INFO) on "
    "logging.getLogger('gradient_ascent_jax'). To stop logging (and its cost "
    "per step), pass logging_interval=None. This warning is shown once."
)
_invisible_warned = threading.Event()


def _warn_once_if_invisible() -> bool:
  """Returns True when INFO records would be dropped; warns the first time."""
  if logger.isEnabledFor(logging.INFO):
    return False
  if not _invisible_warned.is_set():
    _invisible_warned.set()
    logger.warning(_INVISIBLE_WARNING)
  return True


class LogProgressState(NamedTuple):
  """State of :func:`log_progress`.

  Attributes:
    count: steps already seen, an int32 scalar that saturates at its maximum.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> gax.log_progress(logging_interval=10).init(jnp.ones(2))
    LogProgressState(count=Array(0, dtype=int32))
  """

  count: chex.Array


def log_progress(
    logging_interval: jax.typing.ArrayLike | None = 10,
    learning_rate: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformation:
  """Logs the step, learning rate and gradient norm every N steps.

  Passes updates through unchanged. On steps ``t = N, 2N, ...`` (``t`` counts
  from 1) it emits one ``INFO`` record on the logger ``gradient_ascent_jax``
  with the step, the learning rate in force (``learning_rate(t - 1)`` for a
  schedule) and the global L2 norm of the incoming updates. The record also
  carries them as attributes ``step``, ``learning_rate`` and ``grad_norm``.

  The record is sent with ``jax.debug.callback`` from inside ``jit``; the norm
  is only computed on logging steps. Under ``vmap`` and ``pmap`` (one call per
  batch element or device) the records of one step are merged into one, the
  first to arrive. With ``logging_interval`` None or 0 this is
  ``optax.identity()`` and the compiled program holds no host callback.

  Records are ``INFO``, which Python drops until ``logging`` is configured.
  When a record is due and the logger is not enabled for ``INFO``, one
  ``WARNING`` (the first time, once per process) says so and how to see them,
  for example ``logging.basicConfig(level=logging.INFO)``.

  Args:
    logging_interval: N >= 1, or None/0 for off. May be a JAX integer (e.g.
      injected by ``optax.inject_hyperparams``); then 0 means off at run time.
    learning_rate: the rate to report, a float or a schedule; None reports NaN.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`LogProgressState`.

  Examples:
    >>> import logging
    >>> import jax.numpy as jnp
    >>> import gradient_ascent_jax as gax
    >>> tx = gax.log_progress(logging_interval=2, learning_rate=0.1)
    >>> state = tx.init(jnp.zeros(2))
    >>> for _ in range(2):
    ...   updates, state = tx.update(jnp.array([3.0, 4.0]), state)
    >>> int(state.count)
    2
  """
  logging_interval = validation.check_logging_interval(logging_interval)
  if learning_rate is not None:
    learning_rate = validation.check_learning_rate("learning_rate", learning_rate)
  if not validation.logging_enabled(logging_interval):
    return optax.identity()

  lock = threading.Lock()
  last_logged_step = [None]

  def emit(step, rate, grad_norm, due):
    if not due:  # under vmap the cond becomes a select: filter here
      return
    if _warn_once_if_invisible():
      return
    step = int(step)
    with lock:
      if step == last_logged_step[0]:
        return
      last_logged_step[0] = step
    rate, grad_norm = float(np.asarray(rate)), float(np.asarray(grad_norm))
    logger.info(
        "step %d: learning rate %.6g, gradient norm %.6g",
        step,
        rate,
        grad_norm,
        extra={"step": step, "learning_rate": rate, "grad_norm": grad_norm},
    )

  def rate_at(count):
    if learning_rate is None:
      return jnp.nan
    return schedules.learning_rate_at(learning_rate, count)

  def init_fn(params):
    return LogProgressState(count=transforms.zero_step_count(params))

  def update_fn(updates, state, params=None):
    del params
    step = optax.safe_increment(state.count)
    interval = jnp.asarray(logging_interval)
    due = (interval > 0) & (step % jnp.maximum(interval, 1) == 0)

    def send(tree):
      grad_norm = optax.tree.norm(tree)
      rate = jnp.asarray(rate_at(state.count), jnp.float32)
      jax.debug.callback(emit, step, rate, grad_norm, due)

    jax.lax.cond(due, send, lambda tree: None, updates)
    return updates, LogProgressState(count=step)

  return optax.GradientTransformation(init_fn, update_fn)
