"""Warnings shown once per process, with flags that tests can reset."""

from __future__ import annotations

import logging
import sys
import threading
import warnings

logger = logging.getLogger("gradient_ascent_jax")

_flags_lock = threading.Lock()


def warn_once(shown: threading.Event, message: str, to: logging.Logger = logger) -> None:
  """Logs ``message`` as a WARNING on ``to`` unless ``shown`` is set, then sets it.

  Call it from a module-level function, never from a transform's closure: a
  closure that reads the Event carries its lock, and cannot be pickled
  (cloudpickle, as Ray and Dask use it, ships closures by value, module-level
  functions by name).
  """
  if not shown.is_set():
    shown.set()
    to.warning(message)


def flag_for(flags: dict[str, threading.Event], key: str) -> threading.Event:
  """The flag of ``key`` in ``flags``, made on first use (safe across threads)."""
  with _flags_lock:
    return flags.setdefault(key, threading.Event())


# Modules whose frames stand between the user's line and a warning raised while an
# optimizer is built: the warning points at the first frame outside them.
_LIBRARIES = ("gradient_ascent_jax", "optax", "jax", "jaxlib", "chex", "flax", "equinox")


def warn_user(message: str) -> None:
  """``warnings.warn(message)`` as a ``UserWarning`` at the user's line.

  For misuse seen when an optimizer is built or its state made (``init``):
  Python's convention, so that the warning names the line that did it and
  ``warnings`` filters apply. What happens while a run steps goes to ``logging``
  instead.
  """
  frame, level = sys._getframe(1), 2
  while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARIES:
    frame, level = frame.f_back, level + 1
  warnings.warn(message, UserWarning, stacklevel=level)


def warn_user_once(shown: threading.Event, message: str) -> None:
  """:func:`warn_user`, unless ``shown`` is set; then sets it."""
  if not shown.is_set():
    shown.set()
    warn_user(message)
