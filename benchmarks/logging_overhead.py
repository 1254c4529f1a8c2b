"""Cost of progress logging: ``logging_interval=10`` against logging off.

The peers are ``gax.gradient_ascent`` steps (jitted, donated, same gradient
buffer), timed in turn: logging every 10 steps, with and without the
objective passed as ``value=`` (a scalar argument of the step), by host
callback (the default ``logging_emit="callback"``) and kept in the state
(``logging_emit="state"``, with a ``gax.ProgressReader`` called on every step
inside the timed loop and flushed at the end of each sample, so the reader's
cost is part of the path); logging off (``logging_interval=None``) with and
without ``value=``; and the default ``gax.gradient_ascent()``, which must
cost the same as logging off (it compiles no host callback). Every sample is
a whole number of logging intervals, so it contains its share of logging
steps. The records go to an in-memory handler at level INFO, so formatting
and handling are included; each row counts the records its peer logged in
its timed samples. Three more peers run ``COPIES`` optimizers at once,
``jax.vmap`` of the step over params and state (the same parameters in all,
split among the copies): logging by callback with and without ``value=``,
compared with the vmapped step with logging off.

The model rows (``--models``, Flax) time a whole training step, the gradient
of the negative cross-entropy of a small classifier on one fixed random batch
and the update with ``value=`` (``benchmarks/_models.py``: an MLP of 669,706
params, a CNN of 824,458), with logging off, every 10 by callback and every
10 kept in the state: in a Python loop (one jitted step per call; the reader
on every step), and in one ``lax.scan`` of ``--scan-steps`` steps per call.
In a scan the reader can only be called on the state the call returns, so it
logs the last record of each call and no other: the state path is for Python
loops, and the scan rows show what the callback path costs where it suits.

Each peer is built ``--instances`` times (2 by default), each instance its own
jitted executable: the first instance of every peer is compiled in the order of
the table, the second in the reverse order, and so on. On XLA:CPU two
executables of the very same step can run several percent apart for as long
as they live (on a 2-core AMD EPYC, five runs of four identical peers: the one
compiled first the fastest, the others 1.02x-1.09x it, though one run of eight
showed no such order; the state path at interval 10 measured 1.20x off when
compiled after off and 1.06x when compiled before it), so one instance per peer
would give each peer the luck of its executable. Each repeat takes one sample
of every instance, in an order drawn anew for each repeat (with a fixed seed);
a peer's time in a repeat is the mean of its instances' samples, and its cost
"vs off" is the median over the repeats of that time over off's in the same
repeat, with a 95% bootstrap interval of that median (see
``paired_overhead``).

Run ``python -m benchmarks.logging_overhead --help`` for the options.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
import contextlib
import functools
import importlib.util
import io
import logging
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _common
import gradient_ascent_jax as gax

LOGGING, OFF, DEFAULT = "logging every 10", "logging off", "default gradient_ascent()"
LOGGING_VALUE, OFF_VALUE = "logging every 10, value=", "logging off, value="
LOGGING_STATE, LOGGING_VALUE_STATE = "logging every 10 (state)", "logging every 10, value= (state)"
VMAP_LOGGING, VMAP_LOGGING_VALUE = "vmap 8, logging every 10", "vmap 8, logging every 10, value="
VMAP_OFF = "vmap 8, logging off"
INTERVAL = 10
COPIES = 8
VMAPPED = (VMAP_LOGGING, VMAP_LOGGING_VALUE, VMAP_OFF)
MODELS = ("mlp", "cnn", "nnx")
# The model peers: logging off, every 10 steps by callback, every 10 kept in the state.
MODEL_OFF, MODEL_CALLBACK, MODEL_STATE = "off", "every 10, callback", "every 10, state"
# Each model peer's logging interval and emit.
MODEL_PEERS = (
  (MODEL_OFF, None, "callback"),
  (MODEL_CALLBACK, INTERVAL, "callback"),
  (MODEL_STATE, INTERVAL, "state"),
)
PYTHON_LOOP = "python loop"
# The NNX model's loops: nnx.jit on the objects (as is, and through nnx.cached_partial),
# and jax.jit over the State of nnx.split.
NNX_JIT, NNX_CACHED = "python loop, nnx.jit", "python loop, nnx.jit + cached_partial"
NNX_SPLIT = "python loop, jax.jit of nnx.split"
NNX_LOOPS = (NNX_JIT, NNX_CACHED, NNX_SPLIT)
SCAN_STEPS = 100
# Executables built of every peer (``--instances``; see the module's docstring).
INSTANCES = 2
ONE = jnp.asarray(1.0, jnp.float32)


class _Runner(_common.JaxRunner):
  """Calls ``step(params, state, *args)``, and a ProgressReader on every state it returns.

  ``steps_per_call`` is how many optimizer steps one call takes (a scan takes many).
  """

  def __init__(self, step, params, state, args, read=False, steps_per_call=1):
    super().__init__(step, params, state, None)
    self.args, self.steps_per_call = args, steps_per_call
    self.reader = gax.ProgressReader() if read else None

  def __call__(self, num_calls: int) -> None:
    for _ in range(num_calls):
      self.params, self.state = self.step(self.params, self.state, *self.args)
      if self.reader is not None:
        self.reader(self.state)
    jax.block_until_ready((self.params, self.state))
    if self.reader is not None:
      # The callback path has logged every record by now: so must the reader,
      # inside the sample.
      self.reader.flush()


def _step(tx, with_value: bool):
  """``(params, state, grads[, value]) -> (params, state)``, jitted, params and state donated."""
  if not with_value:
    return _common.jitted_step(tx)

  def step(params, state, grads, value):
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def _peer(tx, num_params, num_leaves, grads, with_value=False, read=False) -> _Runner:
  params = _common.make_params(num_params, num_leaves)
  args = (grads, ONE) if with_value else (grads,)
  return _Runner(_step(tx, with_value), params, tx.init(params), args, read)


class _VmappedRunner(_Runner):
  """``COPIES`` optimizers at once: the step vmapped over params and state."""

  def __init__(self, tx, num_params, num_leaves, grads, with_value):
    def step(params, state, grads, value):
      value = {"value": value} if with_value else {}
      updates, state = tx.update(grads, state, params, **value)
      return jax.tree.map(jnp.add, params, updates), state

    params = [jnp.stack([p] * COPIES) for p in _common.make_params(num_params, num_leaves)]
    batched = jax.vmap(step, in_axes=(0, 0, None, None))
    super().__init__(
      jax.jit(batched, donate_argnums=(0, 1)), params, jax.vmap(tx.init)(params), (grads, ONE)
    )

  def snapshot(self) -> list[np.ndarray]:
    """The first copy's params, checked like the other peers'."""
    return [np.array(p[0], np.float64) for p in self.params]


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


def _lines(stream: io.StringIO) -> int:
  return stream.getvalue().count("\n")


def _interleaved(
  runners: dict[Any, _Runner], calls: dict[Any, int], repeats: int, stream: io.StringIO
) -> tuple[dict[Any, list[float]], dict[Any, int]]:
  """Each runner's seconds per step in every repeat (one sample of each runner per
  repeat, ``calls[name]`` calls a sample), and the records each one logged in its samples."""
  samples = {name: [] for name in runners}
  logged = dict.fromkeys(runners, 0)
  for order in _common.shuffled_orders(runners, repeats):
    for name in order:
      runner = runners[name]
      time.sleep(0.01)
      before = _lines(stream)
      start = time.perf_counter()
      runner(calls[name])
      samples[name].append((time.perf_counter() - start) / (calls[name] * runner.steps_per_call))
      logged[name] += _lines(stream) - before
  return samples, logged


def _instances(build: Callable[[], dict[Any, Any]], count: int) -> dict[tuple[Any, int], Any]:
  """``count`` instances of the peers ``build()`` makes, keyed ``(peer, instance)``.

  The dict's order is the order of compiling (the callers' first calls): each
  instance's peers in ``build()``'s order, every other instance in reverse.
  """
  runners = {}
  for instance in range(count):
    built = build()
    names = list(built) if instance % 2 == 0 else list(built)[::-1]
    for name in names:
      runners[name, instance] = built[name]
  return runners


def _per_peer(
  samples: dict[tuple[Any, int], list[float]], logged: dict[tuple[Any, int], int]
) -> tuple[dict[Any, list[float]], dict[Any, int]]:
  """Each peer's time per step in every repeat, the mean of its instances'; and the
  records its instances logged."""
  times: dict[Any, list[list[float]]] = {}
  records: dict[Any, int] = {}
  for (name, _), peer_samples in samples.items():
    times.setdefault(name, []).append(peer_samples)
  for (name, _), count in logged.items():
    records[name] = records.get(name, 0) + count
  return {name: list(np.mean(lists, axis=0)) for name, lists in times.items()}, records


def paired_overhead(times: Sequence[float], base: Sequence[float]) -> tuple[float, float, float]:
  """The cost of a peer over its base, ``times[r] / base[r] - 1`` of each repeat ``r``:
  the median, and a 95% bootstrap interval of that median.

  Each ratio compares two samples of one repeat, taken a few seconds apart, so a
  machine that slows down or speeds up during the run (other tenants, clocks)
  moves both; a ratio of the two medians would mix samples from all of the run.
  """
  ratios = np.asarray(times) / np.asarray(base)
  rng = np.random.default_rng(0)
  medians = np.median(rng.choice(ratios, size=(2000, len(ratios))), axis=1)
  low, high = np.percentile(medians, [2.5, 97.5])
  return float(np.median(ratios)) - 1.0, float(low) - 1.0, float(high) - 1.0


def _overhead_fields(times: Sequence[float], base: Sequence[float]) -> dict[str, Any]:
  overhead, low, high = paired_overhead(times, base)
  return {"seconds": statistics.median(times), "overhead": overhead, "interval": (low, high)}


def _fmt_overhead(row: dict) -> str:
  low, high = row["interval"]
  if low == high == row["overhead"] == 0.0:  # the base itself
    return "+0.0%"
  return f"{row['overhead']:+.1%} ({low:+.1%} to {high:+.1%})"


def measure(
  num_params, num_leaves, repeats, samples_steps, stream, instances=INSTANCES
) -> list[dict]:
  size = num_params // num_leaves
  keys = jax.random.split(jax.random.key(0), num_leaves)
  grads = [jax.random.normal(key, (size,), jnp.float32) for key in keys]
  # Each copy holds its share of the parameters: every peer moves as many.
  copy_grads = [g[: size // COPIES] for g in grads]
  runners = _instances(lambda: _case_runners(num_params, num_leaves, grads, copy_grads), instances)
  checked = {key: runner for key, runner in runners.items() if key[0] not in VMAPPED}
  # Compile (in the order of ``runners``), check both against gax.gradient_ascent
  # without logging (logging must not change a step), and leave the counter on a
  # multiple of 10.
  _common.check_runners(
    checked, _common.DEFAULT, grads, dict.fromkeys(checked, 0.0), steps=INTERVAL
  )
  vmapped = {key: runner for key, runner in runners.items() if key[0] in VMAPPED}
  _common.check_runners(
    vmapped, _common.DEFAULT, copy_grads, dict.fromkeys(vmapped, 0.0), steps=INTERVAL
  )
  samples, logged = _per_peer(
    *_interleaved(runners, dict.fromkeys(runners, samples_steps), repeats, stream)
  )
  return [
    {
      "params": size * num_leaves,
      "leaves": num_leaves,
      "peer": name,
      **_overhead_fields(times, samples[VMAP_OFF if name in VMAPPED else OFF]),
      "records": logged[name],
    }
    for name, times in samples.items()
  ]


def _case_runners(num_params, num_leaves, grads, copy_grads) -> dict[str, _Runner]:
  """One instance of every peer of a case, in the order of the table."""
  logging_on = _common.gradient_ascent(_common.DEFAULT, INTERVAL)
  logging_state = _common.gradient_ascent(_common.DEFAULT, INTERVAL, logging_emit="state")
  logging_off = _common.gradient_ascent(_common.DEFAULT, None)
  runners = {
    LOGGING: _peer(logging_on, num_params, num_leaves, grads),
    LOGGING_VALUE: _peer(logging_on, num_params, num_leaves, grads, with_value=True),
    LOGGING_STATE: _peer(logging_state, num_params, num_leaves, grads, read=True),
    LOGGING_VALUE_STATE: _peer(
      logging_state, num_params, num_leaves, grads, with_value=True, read=True
    ),
    OFF: _peer(logging_off, num_params, num_leaves, grads),
    OFF_VALUE: _peer(logging_off, num_params, num_leaves, grads, with_value=True),
    # _common.DEFAULT's settings are gradient_ascent()'s defaults; this peer
    # leaves logging_interval unset too.
    DEFAULT: _peer(gax.gradient_ascent(), num_params, num_leaves, grads),
  }
  for name, interval, with_value in (
    (VMAP_LOGGING, INTERVAL, False),
    (VMAP_LOGGING_VALUE, INTERVAL, True),
    (VMAP_OFF, None, False),
  ):
    runners[name] = _VmappedRunner(
      _common.gradient_ascent(_common.DEFAULT, interval),
      num_params // COPIES,
      num_leaves,
      copy_grads,
      with_value,
    )
  return runners


def _model_runners(problem, scan_steps: int) -> dict[tuple[str, str], _Runner]:
  """Off, callback and state peers of one model, each in a Python loop and (unless
  ``scan_steps`` is 0) in a scan of ``scan_steps`` steps per call."""

  def train_step(tx):
    def step(params, state, batch):
      value, grads = jax.value_and_grad(problem.objective)(params, batch)
      updates, state = tx.update(grads, state, params, value=value)
      return optax.apply_updates(params, updates), state

    return step

  def scanned(step):
    def steps(params, state, batch):
      def body(carry, _):
        return step(*carry, batch), None

      return jax.lax.scan(body, (params, state), length=scan_steps)[0]

    return steps

  loops = [(PYTHON_LOOP, lambda step: step, 1)]
  if scan_steps:
    loops.append((f"lax.scan of {scan_steps}", scanned, scan_steps))
  runners = {}
  for peer, interval, emit in MODEL_PEERS:
    tx = _common.gradient_ascent(_common.DEFAULT, interval, logging_emit=emit)
    step = train_step(tx)
    for loop, wrap, steps in loops:
      params = jax.tree.map(jnp.copy, problem.params)  # each peer donates its own
      runners[loop, peer] = _Runner(
        jax.jit(wrap(step), donate_argnums=(0, 1)),
        params,
        tx.init(params),
        (problem.batch,),
        read=emit == "state",
        steps_per_call=steps,
      )
  return runners


class _NnxRunner:
  """A Flax NNX model and its ``nnx.Optimizer``, one step per call, with ``value=``.

  ``loop`` is one of ``NNX_LOOPS``: ``nnx.jit`` steps the objects in place (called
  as is, or through ``nnx.cached_partial``, which caches the walk over them), and
  the reader is given the optimizer; or ``jax.jit`` steps the ``State`` of
  ``nnx.split`` (donated, ``nnx.merge`` inside), and the reader is given that State.
  """

  steps_per_call = 1

  def __init__(self, problem, tx, loop: str, read: bool):
    from flax import nnx  # needs Flax, as the other model rows

    model = problem.model()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    self.batch = problem.batch
    self.reader = gax.ProgressReader() if read else None

    def update(model, optimizer, batch):
      value, grads = nnx.value_and_grad(problem.objective)(model, batch)
      optimizer.update(model, grads, value=value)

    if loop == NNX_SPLIT:
      graphdef, self.state = nnx.split((model, optimizer))

      @functools.partial(jax.jit, donate_argnums=0)
      def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        update(model, optimizer, batch)
        return nnx.state((model, optimizer))

      def call():
        self.state = step(self.state, self.batch)
        return self.state

      self.model = lambda: nnx.merge(graphdef, self.state)[0]
    else:
      step = nnx.jit(update)
      if loop == NNX_CACHED:
        step = nnx.cached_partial(step, model, optimizer)
      else:
        step = functools.partial(step, model, optimizer)

      def call():
        step(self.batch)
        return optimizer

      self.model = lambda: model
    self.call = call
    self.params = lambda: nnx.state(self.model(), nnx.Param)

  def __call__(self, num_calls: int) -> None:
    for _ in range(num_calls):
      state = self.call()
      if self.reader is not None:
        self.reader(state)
    jax.block_until_ready(jax.tree.leaves(self.params()))
    if self.reader is not None:
      self.reader.flush()

  def snapshot(self) -> list[np.ndarray]:
    return [np.array(p, np.float64) for p in jax.tree.leaves(self.params())]


def _nnx_runners(problem) -> dict[tuple[str, str], Any]:
  """Off, callback and state peers of an NNX model, in each of ``NNX_LOOPS``."""
  runners = {}
  for peer, interval, emit in MODEL_PEERS:
    tx = _common.gradient_ascent(_common.DEFAULT, interval, logging_emit=emit)
    for loop in NNX_LOOPS:
      runners[loop, peer] = _NnxRunner(problem, tx, loop, read=emit == "state")
  return runners


def measure_model(
  problem,
  repeats: int,
  samples_steps: int,
  scan_steps: int,
  stream: io.StringIO,
  instances: int = INSTANCES,
) -> list[dict]:
  """Each peer's time per step on one model; a loop peer's sample is ``samples_steps``
  steps, a scan peer's is one call."""
  if hasattr(problem, "model"):  # an NNX model
    runners = _instances(lambda: _nnx_runners(problem), instances)
  else:
    runners = _instances(lambda: _model_runners(problem, scan_steps), instances)
  calls = {key: samples_steps if r.steps_per_call == 1 else 1 for key, r in runners.items()}
  # Compile, and check that logging changes no step: every peer of a loop, from
  # the same params on the same batch, must land on the same params.
  moved = {}
  for key, runner in runners.items():
    runner(calls[key])
    moved[key] = runner.snapshot()
  for ((loop, peer), instance), params in moved.items():
    for got, want in zip(params, moved[(loop, MODEL_OFF), instance], strict=True):
      if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
        raise _common.PeerMismatchError(
          f"{problem.name}, {loop}: {peer!r} moved the params elsewhere than logging off "
          f"(largest difference {np.abs(got - want).max():.3g})."
        )
  samples, logged = _per_peer(*_interleaved(runners, calls, repeats, stream))
  return [
    {
      "model": problem.name,
      "params": problem.num_params,
      "leaves": problem.num_leaves,
      "loop": loop,
      "peer": peer,
      **_overhead_fields(times, samples[loop, MODEL_OFF]),
      "records": logged[loop, peer],
    }
    for (loop, peer), times in samples.items()
  ]


def table(rows: list[dict]) -> str:
  headers = [
    "params",
    "leaves",
    "peer",
    "time/step",
    "vs off (vmap: vs vmap off), 95% interval",
    "records logged",
  ]
  body = [
    [
      f"{row['params']:.0e}",
      row["leaves"],
      row["peer"],
      _common.fmt_time(row["seconds"]),
      _fmt_overhead(row),
      row["records"],
    ]
    for row in rows
  ]
  return _common.markdown_table(headers, body)


def model_table(rows: list[dict]) -> str:
  headers = [
    "model",
    "params",
    "leaves",
    "loop",
    "peer",
    "time/step",
    "vs off (same loop), 95% interval",
    "records logged",
  ]
  body = [
    [
      row["model"],
      f"{row['params']:,}",
      row["leaves"],
      row["loop"],
      row["peer"],
      _common.fmt_time(row["seconds"]),
      _fmt_overhead(row),
      row["records"],
    ]
    for row in rows
  ]
  return _common.markdown_table(headers, body)


def _has_flax() -> bool:
  return importlib.util.find_spec("flax") is not None


def _models(text: str | None) -> list[str]:
  """The models asked for; by default the MLP, or none when Flax is missing."""
  if text is None:
    if not _has_flax():
      print("(Flax is not installed: no model rows; pip install flax, or pass --models '')\n")
      return []
    # Not the CNN: XLA:CPU runs its step in a scan far slower than in a loop
    # (0.9 s against 50 ms on 2 cores), so its scan rows take most of an hour.
    text = "mlp"
  models = [name.strip() for name in text.split(",") if name.strip()]
  unknown = set(models) - set(MODELS)
  if unknown:
    raise SystemExit(f"--models: unknown {sorted(unknown)}; expected some of {list(MODELS)}.")
  return models


def main(argv: Sequence[str] | None = None) -> list[dict]:
  parser = _common.base_parser(__doc__.splitlines()[0])
  parser.add_argument(
    "--cases", default="1e7:1,1e7:1000", help="PARAMS:LEAVES cases, comma-separated ('' for none)"
  )
  parser.add_argument(
    "--models",
    default=None,
    help="model steps to time: mlp, cnn, nnx (the Flax NNX classifier of the digits "
    "notebook, by nnx.jit, nnx.cached_partial and jax.jit of nnx.split), "
    "comma-separated ('' for none; "
    "default: mlp when Flax is installed)",
  )
  parser.add_argument(
    "--scan-steps",
    type=int,
    default=SCAN_STEPS,
    help="steps in one lax.scan call of the model rows (0: no scan rows; "
    "XLA:CPU runs the CNN's step far slower in a scan)",
  )
  parser.add_argument(
    "--instances",
    type=int,
    default=INSTANCES,
    help="executables built of every peer, compiled in alternating orders (see above)",
  )
  parser.add_argument(
    "--intervals-per-sample",
    type=int,
    default=1,
    help="logging intervals (of 10 steps) in one timed sample",
  )
  args = parser.parse_args(argv)
  if args.smoke:
    _common.smoke_defaults(
      parser, args, cases="1e4:1", intervals_per_sample=1, scan_steps=2 * INTERVAL
    )
  repeats = args.repeats or (3 if args.smoke else 21)
  _common.print_header("Logging overhead", argv if argv is not None else sys.argv[1:])
  models = _models(args.models)
  samples_steps = INTERVAL * args.intervals_per_sample
  rows, model_rows = [], []
  with captured_records() as stream:
    for item in filter(None, args.cases.split(",")):
      params, leaves = item.split(":")
      rows += measure(
        int(float(params)), int(leaves), repeats, samples_steps, stream, args.instances
      )
    if models:
      from benchmarks import _models as model_zoo  # needs Flax

      for name in models:
        if name == "nnx":
          problem = model_zoo.nnx_problem(smoke=args.smoke)
        else:
          problem = model_zoo.problem(name, smoke=args.smoke)
        model_rows += measure_model(
          problem, repeats, samples_steps, args.scan_steps, stream, args.instances
        )
  scan = f" (a scan: one call of {args.scan_steps})" if model_rows and args.scan_steps else ""
  print(
    f"({repeats} interleaved samples of {samples_steps} steps{scan} of each of "
    f"{args.instances} instances of every peer; time/step: the median of the instances' "
    "mean; vs off: the median over the repeats of that mean over off's in the same "
    f"repeat, and a 95% bootstrap interval of it; {_lines(stream)} log records captured)\n"
  )
  if rows:
    print(table(rows) + "\n")
  if model_rows:
    print(model_table(model_rows) + "\n")
  _common.write_json(args.json, rows + model_rows)
  return rows + model_rows


if __name__ == "__main__":
  main()
