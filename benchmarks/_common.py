"""Shared pieces of the benchmarks: peers, configurations, timing and tables."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
import dataclasses
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradient_ascent_jax as gax

# Bytes a float32 step must move per parameter: read gradient, parameter and
# the two moments (16), write parameter and the two moments (12).
BYTES_PER_PARAM = 28


@dataclasses.dataclass(frozen=True)
class Config:
  """One hyperparameter setting, shared by every peer."""

  name: str
  learning_rate: float = 0.01
  momentum: float = 0.9
  beta: float = 0.999
  eps: float = 1e-8
  nesterov: bool = False
  clip_value: float | None = None
  lr_decay: float | None = None
  warmup_steps: int = 0

  def rate(self, count):
    """``lr_t`` written out by hand (docs/guide/math.md), for the non-gax peers."""
    step = jnp.asarray(count, jnp.float32)
    rate = jnp.asarray(self.learning_rate, jnp.float32)
    if self.lr_decay is not None:
      rate = rate * jnp.power(jnp.float32(self.lr_decay), step)
    if self.warmup_steps > 0:
      rate = rate * jnp.minimum(1.0, (step + 1.0) / self.warmup_steps)
    return rate

  @property
  def schedule(self) -> optax.ScalarOrSchedule:
    """A float when the rate is constant, else :meth:`rate` (as users write it)."""
    if self.lr_decay is None and self.warmup_steps == 0:
      return self.learning_rate
    return self.rate

  def torch_factor(self, step: int) -> float:
    """The ``LambdaLR`` factor ``lr_t / lr`` for the PyTorch peers."""
    factor = 1.0
    if self.lr_decay is not None:
      factor *= self.lr_decay**step
    if self.warmup_steps > 0:
      factor *= min(1.0, (step + 1) / self.warmup_steps)
    return factor


DEFAULT = Config("default")
FULL = Config(
  "clip+warmup+decay+nesterov", nesterov=True, clip_value=1.0, lr_decay=0.9999, warmup_steps=100
)
CONFIGS = {"default": DEFAULT, "full": FULL}


def gradient_ascent(
  config: Config, logging_interval=None, logging_emit: str = "callback"
) -> optax.GradientTransformation:
  """The library's optimizer for ``config`` (progress logging off by default)."""
  return gax.gradient_ascent(
    learning_rate=config.learning_rate,
    momentum=config.momentum,
    beta=config.beta,
    eps=config.eps,
    nesterov=config.nesterov,
    clip_value=config.clip_value,
    lr_decay=config.lr_decay,
    warmup_steps=config.warmup_steps,
    logging_interval=logging_interval,
    logging_emit=logging_emit,
  )


def optax_chain(config: Config) -> optax.GradientTransformation:
  """The same optimizer as a user would write it from stock Optax transforms."""
  stages = [optax.scale(-1.0)]
  if config.clip_value is not None:
    stages.append(optax.clip(config.clip_value))
  stages += [
    optax.scale_by_rms(decay=config.beta, eps=config.eps, eps_in_sqrt=False),
    optax.trace(decay=config.momentum, nesterov=config.nesterov),
    # scale_by_learning_rate multiplies by -lr_t: the chain ascends.
    optax.scale_by_learning_rate(config.schedule),
  ]
  return optax.chain(*stages)


def maximize_adam(config: Config) -> optax.GradientTransformation:
  """``gax.maximize(optax.adam)``: a different optimizer, for scale only."""
  adam = optax.adam(config.schedule, nesterov=config.nesterov)
  if config.clip_value is not None:
    adam = optax.chain(optax.clip(config.clip_value), adam)
  return gax.maximize(adam)


def make_params(num_params: int, num_leaves: int = 1, value: float = 1.0) -> list[jax.Array]:
  """``num_params`` float32 values split into ``num_leaves`` 1-D leaves."""
  size = num_params // num_leaves
  if size < 1:
    raise ValueError(f"{num_params} parameters cannot fill {num_leaves} leaves.")
  return [jnp.full((size,), value, jnp.float32) for _ in range(num_leaves)]


def jitted_step(tx: optax.GradientTransformation) -> Callable:
  """``(params, state, grads) -> (params, state)``, params and state donated."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


class JaxRunner:
  """Runs a jitted ``step(params, state, grads)`` on its own donated buffers."""

  def __init__(self, step: Callable, params, state, grads):
    self.step, self.params, self.state, self.grads = step, params, state, grads

  def __call__(self, num_steps: int) -> None:
    for _ in range(num_steps):
      self.params, self.state = self.step(self.params, self.state, self.grads)
    jax.block_until_ready((self.params, self.state))

  def snapshot(self) -> list[np.ndarray]:
    """A float64 copy of the params (the buffers are donated by the next step)."""
    return [np.array(p, np.float64) for p in jax.tree.leaves(self.params)]


def optax_runner(
  tx: optax.GradientTransformation, num_params: int, num_leaves: int, grads
) -> JaxRunner:
  params = make_params(num_params, num_leaves)
  return JaxRunner(jitted_step(tx), params, tx.init(params), grads)


# Steps every peer takes, from the same params and gradients, before any timing.
CHECK_STEPS = 10


class PeerMismatchError(AssertionError):
  """A peer does not compute what the benchmark says it computes."""


def moves_of(snapshot_before, snapshot_after) -> list[np.ndarray]:
  return [after - before for before, after in zip(snapshot_before, snapshot_after, strict=True)]


def reference_moves(config: Config, grads, steps: int = CHECK_STEPS) -> list[np.ndarray]:
  """How far ``steps`` steps of a fresh ``gradient_ascent(config)`` move params of ones."""
  runner = optax_runner(gradient_ascent(config), sum(g.size for g in grads), len(grads), grads)
  before = runner.snapshot()
  runner(steps)
  return moves_of(before, runner.snapshot())


def check_moves(
  peer: str, moves, expected, grads, rtol: float | None, steps: int = CHECK_STEPS
) -> None:
  """Raises :class:`PeerMismatchError` unless ``moves`` ascend, and (with ``rtol``)
  equal ``expected`` to ``rtol`` plus float32 rounding of the params.

  Ascending: with a constant gradient g every peer here moves each parameter
  along sign(g) (RMSprop and Adam both normalise per element). ``rtol=None``
  checks only that, for a peer that is a different optimizer.
  """
  for i, (move, want, grad) in enumerate(zip(moves, expected, grads, strict=True)):
    grad = np.asarray(grad, np.float64)
    moving = np.abs(grad) > 1e-3  # where eps cannot dominate
    if not (np.sign(move[moving]) == np.sign(grad[moving])).all():
      raise PeerMismatchError(f"{peer}: leaf {i} does not ascend: it moves against the gradient")
    if rtol is None:
      continue
    # Each step rounds the float32 params once: half a unit in the last place.
    rounding = steps * np.finfo(np.float32).eps * (1 + np.abs(want))
    bad = np.abs(move - want) > rtol * np.abs(want) + rounding
    if bad.any():
      raise PeerMismatchError(
        f"{peer}: leaf {i}, {bad.sum()} of {bad.size} params differ from "
        f"gradient_ascent after {steps} steps: got {move[bad][:3]}, expected {want[bad][:3]}"
      )


def check_runners(
  runners: dict[str, Any],
  config: Config,
  grads,
  rtols: dict[str, float | None],
  steps: int = CHECK_STEPS,
) -> None:
  """Runs every runner ``steps`` steps and checks it against ``gradient_ascent``.

  Called before timing, so a peer that computes something else is never timed.
  ``rtols[name]`` is the peer's tolerance (None: ascends only); a runner with
  no entry is not an optimizer (the bandwidth probe) and is not checked.
  """
  expected = reference_moves(config, grads, steps)
  for name, runner in runners.items():
    if name not in rtols:
      continue
    before = runner.snapshot()
    runner(steps)
    check_moves(name, moves_of(before, runner.snapshot()), expected, grads, rtols[name], steps)


def check_transforms(
  txs: dict[str, optax.GradientTransformation],
  config: Config,
  num_leaves: int,
  rtols: dict[str, float | None],
  leaf_size: int = 100,
) -> None:
  """:func:`check_runners` for optimizers that are built but not run (compile
  time, memory): each one steps params of ones with a fixed normal gradient."""
  keys = jax.random.split(jax.random.key(1), num_leaves)
  grads = [jax.random.normal(key, (leaf_size,), jnp.float32) for key in keys]
  runners = {
    name: optax_runner(tx, leaf_size * num_leaves, num_leaves, grads) for name, tx in txs.items()
  }
  check_runners(runners, config, grads, rtols)


def steps_per_sample(runner: Callable[[int], None], min_sample_s: float) -> int:
  """How many steps one timed sample needs to last at least ``min_sample_s``."""
  start = time.perf_counter()
  runner(1)
  once = max(time.perf_counter() - start, 1e-7)
  return max(1, min(1000, int(min_sample_s / once) + 1))


def shuffled_orders(names: Iterable[Any], repeats: int) -> Iterator[list[Any]]:
  """The order in which each of ``repeats`` repeats samples the peers ``names``.

  A new order every repeat, so that no peer always runs right after the same
  other one (whose worker threads, XLA's pool or PyTorch's OpenMP, may still be
  spinning; the callers pause between samples to let them stop), and the same
  orders in every run (a fixed seed).
  """
  names = list(names)
  order = random.Random(0)
  for _ in range(repeats):
    order.shuffle(names)
    yield list(names)


def interleaved_medians(
  runners: dict[str, Callable[[int], None]],
  repeats: int,
  warmup: int = 2,
  min_sample_s: float = 0.005,
  pause_s: float = 0.01,
) -> dict[str, float]:
  """Median seconds per step of each runner, sampled round-robin.

  Each runner is warmed up (compiled) first; then every repeat times one
  sample of each runner in turn, so that noise from other processes on a
  shared machine hits all peers alike.
  """
  for runner in runners.values():
    runner(warmup)
  counts = {name: steps_per_sample(runner, min_sample_s) for name, runner in runners.items()}
  samples: dict[str, list[float]] = {name: [] for name in runners}
  for names in shuffled_orders(runners, repeats):
    for name in names:
      runner = runners[name]
      time.sleep(pause_s)
      start = time.perf_counter()
      runner(counts[name])
      samples[name].append((time.perf_counter() - start) / counts[name])
  return {name: statistics.median(times) for name, times in samples.items()}


def cpu_model() -> str:
  """``lscpu``'s model name and the number of cores JAX sees."""
  model = platform.processor() or platform.machine()
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        model = line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return f"{model}, {os.cpu_count()} cores"


def environment() -> dict[str, str]:
  """Date, machine and library versions, for the header of every table."""
  versions = {"jax": jax.__version__, "optax": optax.__version__}
  try:
    import jaxlib

    versions["jaxlib"] = jaxlib.__version__
  except ImportError:
    pass
  try:
    import torch

    versions["torch"] = torch.__version__
  except ImportError:
    versions["torch"] = "absent"
  device = jax.devices()[0]
  return {
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "machine": cpu_model(),
    "device": f"{device.platform} ({device.device_kind})",
    "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
  }


def print_header(title: str, argv: Sequence[str] | None) -> None:
  env = environment()
  # Quoted as a shell would need it (an empty --cases "" stays there), to paste back.
  command = shlex.join(argv) if argv is not None else "(defaults)"
  print(f"## {title}\n")
  print(f"- date: {env['date']}\n- machine: {env['machine']}; JAX device: {env['device']}")
  print(f"- versions: {env['versions']}\n- arguments: {command}\n")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def fmt_time(seconds: float | None) -> str:
  if seconds is None:
    return "n/a"
  for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
    if seconds >= scale:
      return f"{seconds / scale:.3g} {unit}"
  return f"{seconds / 1e-9:.3g} ns"


def fmt_ratio(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.2f}x"


def parse_counts(text: str) -> list[int]:
  """``"1e4,1e5"`` -> ``[10000, 100000]``."""
  return [int(float(item)) for item in text.split(",") if item.strip()]


def base_parser(description: str, timed: bool = True) -> argparse.ArgumentParser:
  """The flags every benchmark takes (``--repeats`` only where it times something)."""
  parser = argparse.ArgumentParser(description=description)
  if timed:
    parser.add_argument(
      "--repeats", type=int, default=None, help="timed samples per peer (median reported)"
    )
  parser.add_argument(
    "--smoke",
    action="store_true",
    help="smallest size and few repeats, where not set by other flags: checks that it runs",
  )
  parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
  return parser


def smoke_defaults(
  parser: argparse.ArgumentParser, args: argparse.Namespace, **values: Any
) -> None:
  """``--smoke``'s small settings, for the flags left at their defaults (given ones win)."""
  for name, value in values.items():
    if getattr(args, name) == parser.get_default(name):
      setattr(args, name, value)


def write_json(path: str | None, rows: list[dict[str, Any]]) -> None:
  if path:
    with open(path, "w") as f:
      json.dump({"environment": environment(), "rows": rows}, f, indent=1)
