"""Training programs run on one global 8-device mesh, by 1, 2 or 4 processes.

``tests/test_multiprocess.py`` runs :func:`main` in every worker process (each
joined by ``jax.distributed.initialize``) and the same functions once in its
own single process on the 8 CPU devices of ``conftest.py``; the two must agree.
Nothing here touches ``jax.distributed`` at import time.

Run as a worker::

  python tests/_multiprocess_programs.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR [SCENARIOS]

SCENARIOS is a comma-separated subset of the layouts, ``checkpoint`` and
``logging`` (default: all).

Each worker writes ``OUT_DIR/process<ID>.npz`` (every result, gathered to
full arrays) and ``OUT_DIR/process<ID>.json`` (shardings, collectives, log
records), and all processes write the orbax checkpoints ``OUT_DIR/checkpoint``
(after ``SAVE_AFTER`` steps) and ``OUT_DIR/checkpoint_init`` (fresh state).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
import re
import sys

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import gradient_ascent_jax as gax

FEATURES, HIDDEN, CLASSES, BATCH = 16, 32, 8, 64
STEPS = 6
SAVE_AFTER = 3  # the FSDP run is checkpointed after this many steps
LOGGING_INTERVAL = 2
LEARNING_RATE = 0.003
BETA = 0.99
ADAMW_RATE, ADAMW_DECAY = 0.01, 0.1
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
LAYOUTS = ("replicated", "fsdp", "zero1", "adamw")


class Classifier(nn.Module):
  """16 -> 32 -> tanh -> 8 logits: every weight's first axis divides by 8."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(CLASSES)(jnp.tanh(nn.Dense(HIDDEN)(x)))


def init_params() -> dict:
  """The model's initial parameters as NumPy arrays (the same in every process)."""
  variables = Classifier().init(jax.random.key(0), jnp.zeros((1, FEATURES)))
  return jax.tree.map(np.asarray, variables["params"])


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
  """The global batch of ``step``: inputs and the labels of a fixed linear teacher."""
  teacher = np.random.default_rng(100).normal(size=(FEATURES, CLASSES))
  x = np.random.default_rng(step).normal(size=(BATCH, FEATURES)).astype(np.float32)
  return x, np.argmax(x @ teacher, axis=1).astype(np.int32)


def log_likelihood(params, x, y):
  """What is MAXIMIZED: the mean log-probability of the right class."""
  log_probs = jax.nn.log_softmax(Classifier().apply({"params": params}, x))
  return jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def global_mesh() -> Mesh:
  return Mesh(np.array(jax.devices()), ("data",))


def place(tree, shardings):
  """Global arrays from host values that every process holds in full."""
  return jax.tree.map(
    lambda value, sharding: jax.make_array_from_callback(
      value.shape, sharding, lambda index: value[index]
    ),
    tree,
    shardings,
  )


def gather(tree):
  """Full NumPy values of global arrays, in every process (one replicating copy)."""
  arrays = jax.tree.leaves(tree)
  if all(a.is_fully_addressable for a in arrays):
    return jax.tree.map(np.asarray, tree)
  mesh = next(a.sharding.mesh for a in arrays if isinstance(a.sharding, NamedSharding))
  replicated = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree)
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), replicated)


def make_tx(layout: str, logging_interval=None) -> optax.GradientTransformation:
  if layout == "adamw":
    return gax.maximize(optax.adamw(ADAMW_RATE, weight_decay=ADAMW_DECAY))
  return gax.gradient_ascent(
    learning_rate=LEARNING_RATE, beta=BETA, logging_interval=logging_interval
  )


def param_shardings(layout: str, mesh: Mesh):
  """FSDP splits every parameter's first axis over ``data``; the others replicate."""
  spec = P("data") if layout == "fsdp" else P()
  return jax.tree.map(lambda _: NamedSharding(mesh, spec), init_params())


def zero1_state_shardings(tx, params, mesh: Mesh):
  """ZeRO-1: every buffer split over ``data`` on its first axis; scalars replicated."""
  abstract = jax.eval_shape(tx.init, params)
  return jax.tree.map(lambda leaf: NamedSharding(mesh, P("data") if leaf.ndim else P()), abstract)


def train_step(tx, with_value=False):
  """One step; ``with_value`` also passes the objective to the progress log."""

  def step(params, state, x, y):
    if with_value:
      value, grads = jax.value_and_grad(log_likelihood)(params, x, y)
      updates, state = tx.update(grads, state, params, value=value)
    else:
      updates, state = tx.update(jax.grad(log_likelihood)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

  return step


def collectives(hlo_text: str) -> dict[str, int]:
  """How many of each cross-device operation a compiled program holds."""
  found = {}
  for name in COLLECTIVES:
    count = len(re.findall(rf"\b{name}(?:-start)?\(", hlo_text))
    if count:
      found[name] = count
  return found


def bytes_on_first_device(tree) -> int:
  device = jax.devices()[0]
  return sum(
    shard.data.nbytes
    for leaf in jax.tree.leaves(tree)
    for shard in leaf.addressable_shards
    if shard.device == device
  )


def run(layout: str, mesh: Mesh, steps: int = STEPS, logging_interval=None, inspect=True):
  """Trains ``steps`` steps on ``mesh``; returns the values and what was seen.

  ``inspect``: also compile the optimizer update alone and the model's
  gradient alone, and count the collectives of each.
  """
  tx = make_tx(layout, logging_interval)
  params = place(init_params(), param_shardings(layout, mesh))
  data_sharding = NamedSharding(mesh, P("data"))
  jit_kwargs = {}
  if layout == "zero1":
    state_shardings = zero1_state_shardings(tx, params, mesh)
    state = jax.jit(tx.init, out_shardings=state_shardings)(params)
    jit_kwargs["out_shardings"] = (param_shardings(layout, mesh), state_shardings)
  else:
    state = tx.init(params)  # eager: each buffer is placed where its parameter lives
  step = jax.jit(train_step(tx, with_value=logging_interval is not None), **jit_kwargs)
  first = place(batch(0), (data_sharding, data_sharding))
  # What the model alone needs: its gradient, placed as the parameters are.
  model_only = (
    jax.jit(jax.grad(log_likelihood), out_shardings=param_shardings(layout, mesh))
    .lower(params, *first)
    .compile()
  )
  grads = model_only(params, *first)
  result = {"first_grads": gather(grads)}
  if inspect:
    result["collectives"] = {
      "step": collectives(step.lower(params, state, *first).compile().as_text()),
      "update_only": collectives(
        jax.jit(tx.update).lower(grads, state, params).compile().as_text()
      ),
      "model_only": collectives(model_only.as_text()),
    }
  for k in range(steps):
    # Waiting for each step: many gloo steps in flight at once have hung.
    params, state = jax.block_until_ready(
      step(params, state, *place(batch(k), (data_sharding, data_sharding)))
    )
    if k == 0:
      result["first_step_params"] = gather(params)
  return {
    **result,
    "params": gather(params),
    "state": gather(state),
    "param_bytes_per_device": bytes_on_first_device(params),
    "state_bytes_per_device": bytes_on_first_device(state),
    "param_shardings": jax.tree.map(lambda a: str(a.sharding.spec), params),
    "state_shardings": jax.tree.map(lambda a: str(a.sharding.spec), state),
  }


# The checkpoint run: an objective whose gradient is element-wise, -(p - t_k),
# so no reduction whose order depends on the partition enters the update and
# a run on any mesh is bit-identical to a run on any other.


def checkpoint_targets(step: int) -> dict:
  rng = np.random.default_rng(1000 + step)
  return jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), init_params())


def separable_objective(params, targets):
  return sum(
    -0.5 * jnp.sum((p - t) ** 2)
    for p, t in zip(jax.tree.leaves(params), jax.tree.leaves(targets), strict=True)
  )


def checkpoint_tx() -> optax.GradientTransformation:
  return gax.gradient_ascent(
    learning_rate=0.05,
    clip_value=0.8,
    nesterov=True,
    warmup_steps=2,
    lr_decay=0.99,
    logging_interval=None,
  )


def fsdp_shardings(mesh: Mesh):
  return param_shardings("fsdp", mesh)


def resharded_layout(mesh: Mesh):
  """Another layout on a 2x4 mesh: matrices over both axes, vectors over ``y``."""
  return jax.tree.map(
    lambda p: NamedSharding(mesh, P("x", "y") if p.ndim == 2 else P("y")), init_params()
  )


def continue_checkpoint_run(params, state, start: int, stop: int):
  tx = checkpoint_tx()

  @jax.jit
  def step(params, state, targets):
    grads = jax.grad(separable_objective)(params, targets)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  shardings = jax.tree.map(lambda p: p.sharding, params)
  for k in range(start, stop):
    params, state = jax.block_until_ready(
      step(params, state, place(checkpoint_targets(k), shardings))
    )
  return params, state


def save(path, tree) -> None:
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(Path(path).absolute(), tree)


def checkpoint_run(mesh: Mesh, out_dir: Path) -> dict:
  """FSDP-sharded; saves the fresh state and the state after SAVE_AFTER steps."""
  params = place(init_params(), fsdp_shardings(mesh))
  state = checkpoint_tx().init(params)
  save(out_dir / "checkpoint_init", {"params": params, "opt_state": state})
  params, state = continue_checkpoint_run(params, state, 0, SAVE_AFTER)
  save(out_dir / "checkpoint", {"params": params, "opt_state": state})
  saved = gather({"params": params, "opt_state": state})
  params, state = continue_checkpoint_run(params, state, SAVE_AFTER, STEPS)
  return {"saved": saved, "uninterrupted": gather({"params": params, "opt_state": state})}


def flat(tree, prefix: str) -> dict[str, np.ndarray]:
  return {
    prefix + jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


class _Steps(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.steps, self.values, self.warnings = [], [], 0

  def emit(self, record):
    if record.levelno == logging.INFO:
      self.steps.append(int(record.step))
      self.values.append(float(record.value))
    else:
      self.warnings += 1


def main(argv) -> None:
  process_id, num_processes, port, out_dir = int(argv[0]), int(argv[1]), argv[2], Path(argv[3])
  scenarios = argv[4].split(",") if len(argv) > 4 else [*LAYOUTS, "checkpoint", "logging"]
  layouts = [layout for layout in LAYOUTS if layout in scenarios]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=60,
  )
  assert jax.process_count() == num_processes and jax.device_count() == 8, jax.devices()
  mesh = global_mesh()
  arrays, meta = {}, {"process_index": jax.process_index(), "devices": jax.local_device_count()}
  for layout in layouts:
    result = run(layout, mesh)
    for key in ("params", "state", "first_step_params", "first_grads"):
      arrays.update(flat(result.pop(key), f"{layout}/{key}"))
    meta[layout] = result
  if "checkpoint" in scenarios:
    for key, tree in checkpoint_run(mesh, out_dir).items():
      arrays.update(flat(tree, f"checkpoint/{key}"))

  if "logging" in scenarios:
    handler = _Steps()
    logger = logging.getLogger("gradient_ascent_jax")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    result = run("replicated", mesh, logging_interval=LOGGING_INTERVAL, inspect=False)
    jax.effects_barrier()
    meta["log_steps"] = handler.steps
    meta["log_values"] = handler.values
    meta["log_warnings"] = handler.warnings
    for key in ("params", "state"):
      arrays.update(flat(result[key], f"logging/{key}"))

  np.savez(out_dir / f"process{process_id}.npz", **arrays)
  (out_dir / f"process{process_id}.json").write_text(json.dumps(meta, default=str))
  multihost_utils.sync_global_devices("done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main(sys.argv[1:])
  # The results are written and every process passed the final barrier and
  # jax.distributed.shutdown(). Under load, interpreter teardown then hung in
  # native code (no Python frame left) in 2 of 8 four-process runs, so skip it.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)
