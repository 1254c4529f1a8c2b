"""The three usage examples of the original GradientAscent, ported to JAX.

Run with ``python -m gradient_ascent_jax``. Each example maximizes
``-model(1.0)`` (drives the model's output at 1.0 down) for a number of steps
and reports the objective before and after. The demo asks for progress
records explicitly (``--logging-interval``, 10 by default here, while the
library's default is off), passes the objective to them (``value=``) and
configures ``logging`` so that they are shown.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from collections.abc import Sequence
import logging
import math
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradient_ascent_jax._src import alias


def _dense(key, fan_in: int, fan_out: int) -> dict:
  # PyTorch's nn.Linear initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  bound = 1.0 / math.sqrt(fan_in)
  w_key, b_key = jax.random.split(key)
  return {
    "w": jax.random.uniform(w_key, (fan_in, fan_out), minval=-bound, maxval=bound),
    "b": jax.random.uniform(b_key, (fan_out,), minval=-bound, maxval=bound),
  }


def init_linear(key) -> dict:
  return {"linear": _dense(key, 1, 1)}


def init_mlp(key) -> dict:
  k1, k2 = jax.random.split(key)
  return {"hidden": _dense(k1, 1, 10), "out": _dense(k2, 10, 1)}


def apply_model(params: dict, x: jax.Array) -> jax.Array:
  """Runs the linear layer or the 1->10->ReLU->1 MLP on a batch x of shape (n, 1)."""
  if "linear" in params:
    return x @ params["linear"]["w"] + params["linear"]["b"]
  hidden = jax.nn.relu(x @ params["hidden"]["w"] + params["hidden"]["b"])
  return hidden @ params["out"]["w"] + params["out"]["b"]


def objective(params: dict) -> jax.Array:
  """What the examples maximize: minus the model's output at input 1.0."""
  return -apply_model(params, jnp.ones((1, 1)))[0, 0]


class Example(NamedTuple):
  name: str
  title: str
  init: Callable[[jax.Array], dict]
  options: dict


EXAMPLES = {
  "basic": Example("basic", "1->1 linear layer, default settings", init_linear, {}),
  "clipping": Example(
    "clipping", "1->10->ReLU->1 MLP, clip_value=1.0", init_mlp, {"clip_value": 1.0}
  ),
  "warmup-decay": Example(
    "warmup-decay",
    "1->10->ReLU->1 MLP, clip_value=1.0, lr_decay=0.95, warmup_steps=50",
    init_mlp,
    {"clip_value": 1.0, "lr_decay": 0.95, "warmup_steps": 50},
  ),
}


class Result(NamedTuple):
  before: float
  after: float
  optimized_value: float
  history: list


def run_example(
  example: Example,
  steps: int = 100,
  logging_interval: int | None = 10,
  learning_rate: float = 0.01,
  seed: int = 0,
) -> Result:
  """Maximizes the objective with gradient_ascent; returns before/after values."""
  params = example.init(jax.random.key(seed))
  tx = alias.gradient_ascent(
    learning_rate=learning_rate, logging_interval=logging_interval, **example.options
  )
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(objective)(params)
    updates, state = tx.update(grads, state, params, value=value)  # logs the objective
    return optax.apply_updates(params, updates), state, value

  before = float(objective(params))
  history = []
  for _ in range(steps):
    params, state, value = step(params, state)
    history.append(float(value))
  jax.effects_barrier()  # flush the progress log before reporting
  after = float(objective(params))
  history.append(after)
  optimized = float(apply_model(params, jnp.ones((1, 1)))[0, 0])
  return Result(before, after, optimized, history)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m gradient_ascent_jax",
    description="Run the original GradientAscent usage examples in JAX.",
  )
  parser.add_argument("--example", choices=[*EXAMPLES, "all"], default="all", help="which example")
  parser.add_argument("--steps", type=int, default=100, help="steps per example")
  parser.add_argument("--logging-interval", type=int, default=10, help="log every N steps; 0 = off")
  parser.add_argument("--learning-rate", type=float, default=0.01, help="the optimizer's rate")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error("--steps must be >= 1")
  if args.logging_interval < 0:
    parser.error("--logging-interval must be >= 0 (0 turns logging off)")
  if not (math.isfinite(args.learning_rate) and args.learning_rate >= 0):
    parser.error("--learning-rate must be a finite number >= 0")

  logging.basicConfig(format="  [%(name)s] %(message)s", stream=sys.stdout)
  logging.getLogger("gradient_ascent_jax").setLevel(logging.INFO)
  chosen = list(EXAMPLES.values()) if args.example == "all" else [EXAMPLES[args.example]]
  failed = False
  for example in chosen:
    print(f"Example '{example.name}': {example.title}", flush=True)
    result = run_example(example, args.steps, args.logging_interval or None, args.learning_rate)
    print(f"  objective -model(1.0) before: {result.before:+.6f}")
    print(f"  objective -model(1.0) after:  {result.after:+.6f} ({args.steps} steps)")
    # The original printed the model's output as "Optimized Value"; the
    # objective is its negative, so the value falls while the objective rises.
    print(f"  Optimized Value (model(1.0) = -objective): {result.optimized_value:+.6f}")
    rose = result.after > result.before
    failed |= not rose
    print(f"  objective {'rose' if rose else 'DID NOT RISE'}\n", flush=True)
  return 1 if failed else 0
