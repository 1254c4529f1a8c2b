"""Warnings shown once per process, with flags that tests can reset."""

from __future__ import annotations

import logging
import threading

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
