"""A progress record: packed into one array in the compiled step, logged on the host.

Both ways a record leaves the step carry the same array: ``jax.debug.callback``
hands it to :func:`emit` (``emit="callback"``), or ``LogProgressState.record``
keeps it for :class:`ProgressReader` (``emit="state"``). The array is
self-describing, the logger's name included, so the host needs nothing else.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradient_ascent_jax._src import once

logger = logging.getLogger("gradient_ascent_jax")


class Record(NamedTuple):
  """What one step reports; arrays in the compiled step, Python values on the host."""

  step: Any
  interval: Any  # the logging interval in force: records of one state come this many steps apart
  learning_rate: Any
  grad_norm: Any
  value: Any  # the objective; 0 where none was passed
  show: Any  # the INFO record is this copy's to log
  descending: Any  # the descent WARNING comes with the INFO record
  warn_step: Any  # the step at which the non-finite WARNING fired (with ``nonfinite``)
  nonfinite: Any  # the non-finite WARNING is this copy's to log
  value_nonfinite: Any  # ...and it is the objective (else the gradient norm) that is not finite


# Word layout: the record of a due step (step, flags, interval); the non-finite
# warning (its step and flags: on the state path it stays in the state for good once
# given, while the due part changes every ``interval`` steps); on the state path the
# state's step count (every step) and the number of the run (set by init); the
# length of the name in bytes; on the state path the rules' own state (BOOK_WORDS,
# kept by ``progress``; zeros in a callback's record); the three floats (one word
# each, or two with float64); the name's UTF-8 bytes.
_SHOW, _DESCENDING, _HAS_VALUE, _HAS_RATE, _WIDE, _INTERVAL_MAY_CHANGE = (
  1 << bit for bit in range(6)
)
_NONFINITE, _VALUE_NONFINITE = 1, 2
INTERVAL_WORD = 2
WARNING_WORDS = (3, 4)
COUNT_WORD = 5
RUN_WORD = 6
_LENGTH_WORD = 7
BOOK_WORDS = (8, 16)
_HEAD = BOOK_WORDS[1]
# The shortest record: no name, float32 floats.
SHORTEST = _HEAD + 3


def _name_words(name: str | None) -> tuple[int, np.ndarray]:
  data = (name or "").encode()
  padded = data + b"\0" * (-len(data) % 4)
  return len(data), np.frombuffer(padded, "<u4").astype(np.uint32)


def size(name: str | None) -> int:
  """The length of a packed record for an optimizer named ``name``."""
  wide = jnp.dtype(jnp.result_type(float)) == jnp.float64
  return _HEAD + 3 * (2 if wide else 1) + len(_name_words(name)[1])


def bits(*flags_and_bits) -> Any:
  """A uint32 word with ``bit`` set for each true ``flag`` of the (flag, bit) pairs."""
  return sum(jnp.where(flag, bit, 0).astype(jnp.uint32) for flag, bit in flags_and_bits)


def pack(record: Record, *, has_value: bool, has_rate: bool, name: str | None) -> jax.Array:
  """``record`` as one uint32 array (traceable)."""
  float_type = jnp.result_type(float)  # float64 where x64 is on, so no digit is lost
  floats = jnp.stack(
    [
      jnp.asarray(x).astype(float_type)
      for x in (record.learning_rate, record.grad_norm, record.value)
    ]
  )
  float_words = jax.lax.bitcast_convert_type(floats, jnp.uint32).reshape(-1)
  constant = (
    (_HAS_VALUE if has_value else 0)
    | (_HAS_RATE if has_rate else 0)
    | (_WIDE if jnp.dtype(float_type) == jnp.float64 else 0)
    # A JAX interval (optax.inject_hyperparams) may be changed between two records.
    | (_INTERVAL_MAY_CHANGE if isinstance(record.interval, jax.Array) else 0)
  )
  length, name_words = _name_words(name)
  head = jnp.stack(
    [
      jnp.asarray(record.step).astype(jnp.uint32),
      bits((record.show, _SHOW), (record.descending, _DESCENDING)) | jnp.uint32(constant),
      jnp.maximum(jnp.asarray(record.interval), 0).astype(jnp.uint32),
      jnp.asarray(record.warn_step).astype(jnp.uint32),
      bits((record.nonfinite, _NONFINITE), (record.value_nonfinite, _VALUE_NONFINITE)),
      jnp.asarray(record.step).astype(jnp.uint32),
      jnp.zeros((), jnp.uint32),
      jnp.asarray(length, jnp.uint32),
      *(jnp.zeros((), jnp.uint32) for _ in range(*BOOK_WORDS)),
    ]
  )
  return jnp.concatenate([head, float_words, jnp.asarray(name_words, jnp.uint32)])


def _ints(words: Any) -> list[int]:
  """A record's words as Python ints, from a host array or a list of them.

  The reader parses a record in the training loop, where on XLA:CPU its host time
  is taken from the step's: Python ints and ``struct`` cost less than NumPy scalars.
  """
  return words if isinstance(words, list) else np.asarray(words, np.uint32).tolist()


def _bytes(words: list[int]) -> bytes:
  return struct.pack(f"<{len(words)}I", *words)


def unpack(words: Any) -> tuple[Record, bool, bool, str | None]:
  """A packed record read back: the record, whether it has an objective and a rate, the name."""
  words = _ints(words)
  flags, warning, length = words[1], words[4], words[_LENGTH_WORD]
  wide = flags & _WIDE
  end = _HEAD + (6 if wide else 3)
  rate, grad_norm, value = struct.unpack("<3d" if wide else "<3f", _bytes(words[_HEAD:end]))
  name = _bytes(words[end:])[:length].decode() if length else None
  record = Record(
    step=words[0],
    interval=words[2],
    learning_rate=rate,
    grad_norm=grad_norm,
    value=value,
    show=bool(flags & _SHOW),
    descending=bool(flags & _DESCENDING),
    warn_step=words[3],
    nonfinite=bool(warning & _NONFINITE),
    value_nonfinite=bool(warning & _VALUE_NONFINITE),
  )
  return record, bool(flags & _HAS_VALUE), bool(flags & _HAS_RATE), name


def interval(words: Any) -> int:
  """The logging interval a packed record was written under (0: off, or none written yet)."""
  return int(words[INTERVAL_WORD])


def interval_may_change(words: Any) -> bool:
  """Whether the interval was a JAX value (injected), which may change between records."""
  return bool(int(words[1]) & _INTERVAL_MAY_CHANGE)


def count(words: Any) -> int:
  """The step count of the state that held a packed record (state path)."""
  return int(words[COUNT_WORD])


def warning_part(words: list[int]) -> tuple[int, ...]:
  """The words of the non-finite warning, and the run: they change once per run, at any step."""
  return (*words[WARNING_WORDS[0] : WARNING_WORDS[1] + 1], words[RUN_WORD])


def due_part(words: list[int]) -> tuple[int, ...]:
  """The words of the due step's record, the run and the name included, not the count
  and not the rules' state (which also changes at the first objective)."""
  return (*words[: WARNING_WORDS[0]], *words[RUN_WORD : BOOK_WORDS[0]], *words[_HEAD:])


_INVISIBLE_WARNING = (
  "{prefix}progress records are due (logging_interval is set) "
  "but the logger '{name}' is not enabled for INFO, so they are "
  "dropped. To see them, call logging.basicConfig(level=logging.INFO), or "
  "add a handler and setLevel(logging.INFO) on "
  "logging.getLogger('{name}'). To stop logging (and its cost "
  "per step), pass logging_interval=None. This warning is shown once."
)
# One warning per logger: silencing one named optimizer must not hide another's.
_invisible_warned: dict[str, threading.Event] = {}

# The descent rule's constants (progress.py decides it; the warning names them).
DESCENT_RECORDS = 4
DESCENT_NOISE = 4.0

_DESCENT_WARNING = (
  "the objective passed as value= has fallen and stays "
  "down: at each of the last {records} progress records, up to step {step}, "
  "it was below its value at the first step by more than {noise:g} times its "
  "noise. gradient_ascent "
  "increases the objective whose gradient it is given; the gradient of a "
  "loss (or a sign error) makes it descend. Pass the gradient of the "
  "objective to maximize: grads = jax.grad(objective)(params), for a loss "
  "jax.grad(lambda p: -loss(p))(params). If the sign is right, a learning "
  "rate that is too large can also make it fall. This warning is shown once "
  "per optimizer state."
)

_NONFINITE_WARNING = (
  "step {step}: {what} is not finite: the run has diverged. With "
  "gradient_ascent the usual cause is steps that are too large: the first "
  "step moves every parameter by learning_rate / sqrt(1 - beta) (31.6 x "
  "learning_rate for beta=0.999) whatever the size of its gradient, and "
  "momentum then adds to it. Try a learning_rate 3-10 times smaller, "
  "warmup_steps to ramp it up, or clip_value to bound the gradients. The "
  "objective is checked on every step, the gradient norm on logged steps. "
  "This warning is shown once per optimizer state."
)


def named(logging_name: str | None) -> tuple[logging.Logger, str]:
  """The logger of ``logging_name`` (a child of the library's) and the prefix of its messages."""
  if logging_name is None:
    return logger, ""
  return logger.getChild(logging_name), f"{logging_name}: "


def _dropped(named_logger: logging.Logger, prefix: str) -> bool:
  """Returns True when INFO records would be dropped; warns the first time."""
  if named_logger.isEnabledFor(logging.INFO):
    return False
  once.warn_once(
    once.flag_for(_invisible_warned, named_logger.name),
    _INVISIBLE_WARNING.format(prefix=prefix, name=named_logger.name),
    named_logger,
  )
  return True


def emit(words: Any, *, warning: bool = True, due: bool = True) -> None:
  """Logs what a packed record holds: the non-finite warning, the record, the descent warning.

  ``warning`` / ``due``: whether to log that part (the reader logs each part once).
  """
  record, has_value, has_rate, name = unpack(words)
  named_logger, prefix = named(name)
  if warning and record.nonfinite:
    what = "the objective passed as value=" if record.value_nonfinite else "the gradient norm"
    named_logger.warning(
      prefix + _NONFINITE_WARNING.format(step=record.warn_step, what=what),
      extra={"step": record.warn_step},
    )
  if not (due and record.show):
    return
  step = record.step
  if not _dropped(named_logger, prefix):
    rate = record.learning_rate if has_rate else math.nan  # a record without a rate
    fields = {"step": step, "learning_rate": rate, "grad_norm": record.grad_norm}
    # The message names what the record holds: the objective where value= was
    # given, the rate where log_progress was given one (else .learning_rate is NaN).
    parts, args = [], [prefix, step]
    if has_value:
      fields["value"] = record.value
      parts.append("objective %.6g")
      args.append(record.value)
    if has_rate:
      parts.append("learning rate %.6g")
      args.append(rate)
    parts.append("gradient norm %.6g")
    args.append(record.grad_norm)
    named_logger.info("%sstep %d: " + ", ".join(parts), *args, extra=fields)
  if has_value and record.descending:
    named_logger.warning(
      prefix + _DESCENT_WARNING.format(records=DESCENT_RECORDS, step=step, noise=DESCENT_NOISE),
      extra={"step": step},
    )
