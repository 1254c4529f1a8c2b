"""Cost of progress logging: ``logging_interval=10`` against logging off.

The peers are ``gax.gradient_ascent`` steps (jitted, donated, same gradient
buffer), timed round-robin: logging every 10 steps, with and without the
objective passed as ``value=`` (a scalar argument of the step), logging off
(``logging_interval=None``) with and without ``value=``, and the default
``gax.gradient_ascent()``, which must cost the same as logging off (it
compiles no host callback); every sample is a whole number of logging
intervals, so it contains its share of logging steps. The records go to an
in-memory handler at level INFO, so formatting and handling are included.
Three more peers run ``COPIES`` optimizers at once, ``jax.vmap`` of the step
over params and state (the same parameters in all, split among the copies):
logging with and without ``value=``, compared with the vmapped step with
logging off.

Run ``python -m benchmarks.logging_overhead --help`` for the options.
"""

from __future__ import annotations

from collections.abc import Sequence
import contextlib
import io
import logging
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
import gradient_ascent_jax as gax

LOGGING, OFF, DEFAULT = "logging every 10", "logging off", "default gradient_ascent()"
LOGGING_VALUE, OFF_VALUE = "logging every 10, value=", "logging off, value="
VMAP_LOGGING, VMAP_LOGGING_VALUE = "vmap 8, logging every 10", "vmap 8, logging every 10, value="
VMAP_OFF = "vmap 8, logging off"
INTERVAL = 10
COPIES = 8
VMAPPED = (VMAP_LOGGING, VMAP_LOGGING_VALUE, VMAP_OFF)


class _VmappedRunner(_common.JaxRunner):
  """``COPIES`` optimizers at once: the step vmapped over params and state."""

  def __init__(self, tx, num_params, num_leaves, grads, with_value):
    def step(params, state, grads, value):
      value = {"value": value} if with_value else {}
      updates, state = tx.update(grads, state, params, **value)
      return jax.tree.map(jnp.add, params, updates), state

    params = [jnp.stack([p] * COPIES) for p in _common.make_params(num_params, num_leaves)]
    batched = jax.vmap(step, in_axes=(0, 0, None, None))
    super().__init__(jax.jit(batched, donate_argnums=(0, 1)), params,
                     jax.vmap(tx.init)(params), grads)
    self.value = jnp.asarray(1.0, jnp.float32)

  def __call__(self, num_steps: int) -> None:
    for _ in range(num_steps):
      self.params, self.state = self.step(self.params, self.state, self.grads, self.value)
    jax.block_until_ready((self.params, self.state))

  def snapshot(self) -> list[np.ndarray]:
    """The first copy's params, checked like the other peers'."""
    return [np.array(p[0], np.float64) for p in self.params]


class _ValueRunner(_common.JaxRunner):
  """A step that also passes the objective, ``update(..., value=...)``."""

  def __init__(self, tx, num_params, num_leaves, grads):
    def step(params, state, grads, value):
      updates, state = tx.update(grads, state, params, value=value)
      return jax.tree.map(jnp.add, params, updates), state

    params = _common.make_params(num_params, num_leaves)
    super().__init__(jax.jit(step, donate_argnums=(0, 1)), params, tx.init(params), grads)
    self.value = jnp.asarray(1.0, jnp.float32)

  def __call__(self, num_steps: int) -> None:
    for _ in range(num_steps):
      self.params, self.state = self.step(self.params, self.state, self.grads, self.value)
    jax.block_until_ready((self.params, self.state))


@contextlib.contextmanager
def captured_records():
  """Sends the library's INFO records to a string, and restores the logger after."""
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  logger = logging.getLogger("gradient_ascent_jax")
  saved = logger.level, logger.propagate
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  try:
    yield stream
  finally:
    logger.removeHandler(handler)
    logger.level, logger.propagate = saved


def measure(num_params, num_leaves, repeats, samples_steps) -> list[dict]:
  size = num_params // num_leaves
  keys = jax.random.split(jax.random.key(0), num_leaves)
  grads = [jax.random.normal(key, (size,), jnp.float32) for key in keys]
  runners = {
      LOGGING: _common.optax_runner(_common.gradient_ascent(_common.DEFAULT, INTERVAL),
                                    num_params, num_leaves, grads),
      LOGGING_VALUE: _ValueRunner(_common.gradient_ascent(_common.DEFAULT, INTERVAL),
                                  num_params, num_leaves, grads),
      OFF: _common.optax_runner(_common.gradient_ascent(_common.DEFAULT, None),
                                num_params, num_leaves, grads),
      OFF_VALUE: _ValueRunner(_common.gradient_ascent(_common.DEFAULT, None),
                              num_params, num_leaves, grads),
      # _common.DEFAULT's settings are gradient_ascent()'s defaults; this peer
      # leaves logging_interval unset too.
      DEFAULT: _common.optax_runner(gax.gradient_ascent(), num_params, num_leaves, grads),
  }
  # Each copy holds its share of the parameters: every peer moves as many.
  copy_grads = [g[: size // COPIES] for g in grads]
  for name, interval, with_value in ((VMAP_LOGGING, INTERVAL, False),
                                     (VMAP_LOGGING_VALUE, INTERVAL, True),
                                     (VMAP_OFF, None, False)):
    runners[name] = _VmappedRunner(_common.gradient_ascent(_common.DEFAULT, interval),
                                   num_params // COPIES, num_leaves, copy_grads, with_value)
  checked = {name: runner for name, runner in runners.items() if name not in VMAPPED}
  # Compile, check both against gax.gradient_ascent without logging (logging
  # must not change a step), and leave the counter on a multiple of 10.
  _common.check_runners(checked, _common.DEFAULT, grads, dict.fromkeys(checked, 0.0),
                        steps=INTERVAL)
  vmapped = {name: runners[name] for name in VMAPPED}
  _common.check_runners(vmapped, _common.DEFAULT, copy_grads, dict.fromkeys(vmapped, 0.0),
                        steps=INTERVAL)
  samples = {name: [] for name in runners}
  for repeat in range(repeats):
    order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
    for name in order:
      time.sleep(0.01)
      start = time.perf_counter()
      runners[name](samples_steps)
      samples[name].append((time.perf_counter() - start) / samples_steps)
  medians = {name: statistics.median(times) for name, times in samples.items()}
  return [{"params": size * num_leaves, "leaves": num_leaves, "peer": name, "seconds": seconds,
           "overhead": seconds / medians[VMAP_OFF if name in VMAPPED else OFF] - 1.0}
          for name, seconds in medians.items()]


def table(rows: list[dict]) -> str:
  headers = ["params", "leaves", "peer", "time/step", "vs off (vmap: vs vmap off)"]
  body = [[f"{row['params']:.0e}", row["leaves"], row["peer"], _common.fmt_time(row["seconds"]),
           f"{row['overhead']:+.1%}"] for row in rows]
  return _common.markdown_table(headers, body)


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = _common.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--cases", default="1e7:1,1e7:1000",
                      help="PARAMS:LEAVES cases, comma-separated")
  parser.add_argument("--intervals-per-sample", type=int, default=1,
                      help="logging intervals (of 10 steps) in one timed sample")
  args = parser.parse_args(argv)
  if args.smoke:
    args.cases, args.intervals_per_sample = "1e4:1", 1
  repeats = args.repeats or (3 if args.smoke else 21)
  _common.print_header("Logging overhead", argv if argv is not None else sys.argv[1:])
  rows = []
  with captured_records() as stream:
    for item in args.cases.split(","):
      params, leaves = item.split(":")
      rows += measure(int(float(params)), int(leaves), repeats,
                      INTERVAL * args.intervals_per_sample)
  records = stream.getvalue().count("\n")
  print(f"({repeats} interleaved samples of {INTERVAL * args.intervals_per_sample} steps, "
        f"median; {records} log records captured)\n")
  print(table(rows) + "\n")
  _common.write_json(args.json, rows)
  return rows


if __name__ == "__main__":
  main()
