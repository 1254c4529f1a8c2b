"""JAX's multi-controller runtime: one process per host, one global mesh.

Worker processes (``tests/_multiprocess_programs.py``), each with its own CPU
devices, join one global 8-device mesh through ``jax.distributed.initialize``
on 127.0.0.1 with gloo CPU collectives: 2 processes x 4 devices, and 4 x 2.
On that mesh they train a small Flax classifier with ``gradient_ascent`` in
three layouts (replicated params with a sharded batch, FSDP, ZeRO-1) and with
``maximize(optax.adamw)``, write orbax checkpoints from every process, and log.
This test process runs the same global programs on its own 8 devices
(``conftest.py``) and compares.

Why not bit for bit: the batch gradient is an all-reduce of 8 per-device
partial sums. In one process XLA:CPU adds the 8 in one pass; across processes
each adds its own devices' partials first and gloo adds the per-process sums,
so float32 additions happen in another order. The gradients differ in the last
bits (checked below, <= 1e-6 of the largest entry), and six steps of RMSprop
carry that to <= RTOL of each leaf's largest entry. The checkpoint test uses
an element-wise gradient, with no such reduction, and is bit-identical.

Workers run with a fresh environment (their own XLA_FLAGS), a free port found
by binding port 0, a deadline on every wait, and are killed in ``finally``: a
hung worker fails the test, it never hangs the run.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
import re
import socket
import subprocess
import sys
import time

import jax
from jax.sharding import Mesh
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import _multiprocess_programs as programs

# Slow: every test starts several Python processes (up to 30 s each).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
WORKER_TIMEOUT_S = 150
RTOL = 1e-5  # of each leaf's largest |value|; the reason is in the docstring
GRAD_RTOL = 1e-6


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def worker_env(devices: int) -> dict[str, str]:
  """This environment without JAX/XLA settings, plus the worker's own."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def log_tails(out_dir: Path, count: int) -> str:
  tails = []
  for i in range(count):
    lines = (out_dir / f"worker{i}.log").read_text(errors="replace").splitlines()
    lines = [line for line in lines if "[Gloo]" not in line]
    tails.append(f"--- worker {i} ---\n" + "\n".join(lines[-25:]))
  return "\n".join(tails)


@contextlib.contextmanager
def workers(num_processes: int, out_dir: Path, scenarios: str | None = None):
  """Starts the workers; yields ``wait()``, which returns each one's results.

  Whatever happens inside the ``with``, no worker outlives it.
  """
  port = free_port()
  env = worker_env(8 // num_processes)
  procs = []

  def wait() -> list[dict]:
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    for i, proc in enumerate(procs):
      try:
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pytest.fail(
          f"worker {i} of {num_processes} still running after "
          f"{WORKER_TIMEOUT_S} s (hung?)\n{log_tails(out_dir, num_processes)}"
        )
      if code != 0:
        pytest.fail(
          f"worker {i} of {num_processes} exited with {code}\n{log_tails(out_dir, num_processes)}"
        )
    results = []
    for i in range(num_processes):
      meta = json.loads((out_dir / f"process{i}.json").read_text())
      with np.load(out_dir / f"process{i}.npz") as arrays:
        meta["arrays"] = dict(arrays)
      results.append(meta)
    return results

  try:
    for i in range(num_processes):
      with open(out_dir / f"worker{i}.log", "w") as log:
        argv = [str(i), str(num_processes), str(port), str(out_dir)]
        procs.append(
          subprocess.Popen(
            # Run as a script: `-m` would put the checkout (the cwd) before the installed package.
            [
              sys.executable,
              str(ROOT / "tests" / "_multiprocess_programs.py"),
              *argv,
              *([scenarios] if scenarios else []),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
          )
        )
    yield wait
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def single_process_results() -> dict:
  """The same global programs in this one process, on its 8 devices."""
  assert jax.device_count() == 8 and jax.process_count() == 1
  mesh = programs.global_mesh()
  results = {}
  for layout in programs.LAYOUTS:
    result = programs.run(layout, mesh)
    for key in ("params", "state", "first_step_params", "first_grads"):
      result.update(programs.flat(result.pop(key), f"{layout}/{key}"))
    results[layout] = result
  return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(checkpoint directory, results of the 2 workers, single-process results)."""
  out_dir = tmp_path_factory.mktemp("two_processes")
  with workers(2, out_dir) as wait:
    reference = single_process_results()  # while the workers run
    results = wait()
  return out_dir, results, reference


@pytest.fixture(scope="module")
def two_processes(runs):
  out_dir, results, _ = runs
  return out_dir, results


@pytest.fixture(scope="module")
def single_process(runs):
  return runs[2]


def leaves(arrays: dict, prefix: str) -> dict[str, np.ndarray]:
  return {k: v for k, v in arrays.items() if k.startswith(prefix)}


def unflatten(arrays: dict, prefix: str):
  """The parameter tree stored under ``prefix``."""
  template = programs.init_params()
  paths = [
    prefix + jax.tree_util.keystr(path)
    for path, _ in jax.tree_util.tree_flatten_with_path(template)[0]
  ]
  return jax.tree.unflatten(jax.tree.structure(template), [arrays[p] for p in paths])


def without_logging_stage(arrays: dict, prefix: str) -> dict[str, np.ndarray]:
  """The logging run's values named as the replicated run's: its state has the
  LogProgressState in front (its count checked to have counted every step), then the same."""
  renamed = {}
  for key, value in leaves(arrays, prefix).items():
    key = key.replace(prefix, "replicated/", 1)
    match = re.match(r"replicated/state\[(\d+)\](.*)", key)
    if match and match[1] == "0":
      if match[2] == ".count":
        assert value == programs.STEPS, (key, value)
      continue
    if match:
      key = f"replicated/state[{int(match[1]) - 1}]{match[2]}"
    renamed[key] = value
  return renamed


def assert_close(actual: dict, expected: dict, rtol: float) -> float:
  """Every leaf within ``rtol`` of its largest entry; returns the largest ratio."""
  assert actual.keys() == expected.keys() and actual
  worst = 0.0
  for key, value in expected.items():
    assert actual[key].dtype == value.dtype and actual[key].shape == value.shape, key
    scale = max(float(np.max(np.abs(value), initial=0.0)), np.finfo(np.float32).tiny)
    ratio = float(np.max(np.abs(actual[key] - value), initial=0.0)) / scale
    assert ratio <= rtol, f"{key}: off by {ratio:.3g} of its largest entry"
    worst = max(worst, ratio)
  return worst


def test_workers_form_one_global_mesh(two_processes):
  _, results = two_processes
  assert [r["process_index"] for r in results] == [0, 1]
  assert [r["devices"] for r in results] == [4, 4]
  # Every process gathered the same global values.
  for key, value in results[0]["arrays"].items():
    np.testing.assert_array_equal(results[1]["arrays"][key], value, err_msg=key)


def hand_computed_first_step(layout: str) -> dict:
  """Parameters after step 1 from the formulas of docs/guide/math.md, on one device.

  No optimizer code.
  """
  params = programs.init_params()
  grads = jax.tree.map(np.asarray, jax.grad(programs.log_likelihood)(params, *programs.batch(0)))
  if layout == "adamw":  # first Adam step: m_hat = g, v_hat = g**2; decoupled decay
    rate, decay = programs.ADAMW_RATE, programs.ADAMW_DECAY
    step = lambda p, g: p + rate * g / (np.abs(g) + 1e-8) - rate * decay * p  # noqa: E731
  else:  # m_1 = (1 - beta) g**2, v_1 = s, update = lr * s
    rate, beta = programs.LEARNING_RATE, programs.BETA
    step = lambda p, g: p + rate * g / (np.sqrt(1 - beta) * np.abs(g) + 1e-8)  # noqa: E731
  return programs.flat(jax.tree.map(step, params, grads), f"{layout}/first_step_params")


@pytest.mark.parametrize("layout", programs.LAYOUTS)
def test_layout_matches_the_single_process_run(two_processes, single_process, layout):
  _, results = two_processes
  arrays, expected = results[0]["arrays"], single_process[layout]
  # Only the order of the all-reduce's additions differs: last bits of the gradient.
  key = f"{layout}/first_grads"
  assert_close(leaves(arrays, key), leaves(expected, key), GRAD_RTOL)
  for key in ("params", "state"):
    assert_close(leaves(arrays, f"{layout}/{key}"), leaves(expected, f"{layout}/{key}"), RTOL)
  # Anchors that owe nothing to the library: the first step by hand, and the
  # objective went up.
  key = f"{layout}/first_step_params"
  for name, value in hand_computed_first_step(layout).items():
    np.testing.assert_allclose(arrays[name], value, rtol=1e-4, atol=1e-7, err_msg=name)
  x, y = programs.batch(0)
  before = programs.log_likelihood(programs.init_params(), x, y)
  after = programs.log_likelihood(unflatten(arrays, f"{layout}/params"), x, y)
  assert after > before + 0.1, (before, after)
  assert results[0][layout]["collectives"]["update_only"] == {}  # the optimizer never talks


def test_replicated_layout_keeps_everything_replicated(two_processes):
  _, results = two_processes
  meta = results[0]["replicated"]
  assert set(jax.tree.leaves(meta["param_shardings"])) == {"P()"}
  assert set(jax.tree.leaves(meta["state_shardings"])) == {"P()"}
  # The data-parallel gradient needs one all-reduce; the optimizer adds nothing.
  assert meta["collectives"]["step"] == meta["collectives"]["model_only"] == {"all-reduce": 1}


def test_fsdp_state_follows_params_and_adds_no_collective(two_processes):
  _, results = two_processes
  meta = results[0]["fsdp"]
  param_specs = jax.tree.leaves(meta["param_shardings"])
  assert param_specs == ["P('data',)"] * 4
  state = meta["state_shardings"]  # (EmptyState, rms, momentum, warmup) of the chain
  second_moment, velocity = jax.tree.leaves(state[1]), jax.tree.leaves(state[2])
  assert second_moment == velocity == param_specs  # leaf by leaf, in the same order
  assert jax.tree.leaves(state[3]) == ["P()"]  # the step counter is replicated
  # All the compiled step communicates is what the model's gradient needs
  # (all-gather the weights, all-reduce the batch gradient).
  found = meta["collectives"]
  assert found["step"] == found["model_only"]
  assert found["step"].get("all-gather", 0) >= 1 and found["update_only"] == {}


def test_zero1_state_is_sharded_while_params_replicate(two_processes):
  _, results = two_processes
  meta = results[0]["zero1"]
  assert set(jax.tree.leaves(meta["param_shardings"])) == {"P()"}
  state = meta["state_shardings"]
  assert jax.tree.leaves(state[1]) == jax.tree.leaves(state[2]) == ["P('data',)"] * 4
  # ZeRO-1's price: the model's all-reduce, then one all-gather of each
  # parameter's updated shards (XLA may combine some of them).
  found = meta["collectives"]
  extra = dict(found["step"])
  for name, count in found["model_only"].items():
    extra[name] -= count
  assert set(k for k, v in extra.items() if v) == {"all-gather"}
  assert 1 <= extra["all-gather"] <= 4


def test_state_bytes_per_device(two_processes):
  """Replicated: every device holds both moments; FSDP and ZeRO-1: an 8th."""
  _, results = two_processes
  n = 16 * 32 + 32 + 32 * 8 + 8  # 808 float32 parameters of the classifier
  counter = 4  # int32 step counter, replicated
  expected = {
    "replicated": (4 * n, 2 * 4 * n + counter),
    "fsdp": (4 * n // 8, 2 * 4 * n // 8 + counter),
    "zero1": (4 * n, 2 * 4 * n // 8 + counter),
  }
  for layout, (param_bytes, state_bytes) in expected.items():
    meta = results[0][layout]
    assert (meta["param_bytes_per_device"], meta["state_bytes_per_device"]) == (
      param_bytes,
      state_bytes,
    ), layout


def test_checkpoint_from_two_processes_resumes_bit_identically_on_another_mesh(two_processes):
  out_dir, results = two_processes
  arrays = results[0]["arrays"]
  # Restore in this single process onto a 2x4 mesh with the devices reversed
  # and another partition of every leaf.
  mesh = Mesh(np.array(jax.devices()[::-1]).reshape(2, 4), ("x", "y"))
  params = programs.place(programs.init_params(), programs.resharded_layout(mesh))
  target = {"params": params, "opt_state": programs.checkpoint_tx().init(params)}
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target
  )
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(out_dir / "checkpoint", abstract)
    fresh = checkpointer.restore(out_dir / "checkpoint_init", abstract)
  for restored_leaf, target_leaf in zip(
    jax.tree.leaves(restored), jax.tree.leaves(target), strict=True
  ):
    assert restored_leaf.sharding == target_leaf.sharding
  assert not restored["params"]["Dense_0"]["kernel"].sharding.is_equivalent_to(
    programs.fsdp_shardings(programs.global_mesh())["Dense_0"]["kernel"], 2
  )
  saved = programs.flat(programs.gather(restored), "checkpoint/saved")
  assert saved.keys() == leaves(arrays, "checkpoint/saved").keys()
  for key, value in saved.items():
    np.testing.assert_array_equal(value, arrays[key], err_msg=key)
  # The fresh state was saved too (its step counters live on the mesh).
  for leaf in jax.tree.leaves(fresh["opt_state"]):
    assert not np.any(programs.gather(leaf))

  params, state = programs.continue_checkpoint_run(
    restored["params"], restored["opt_state"], programs.SAVE_AFTER, programs.STEPS
  )
  resumed = programs.flat(
    programs.gather({"params": params, "opt_state": state}), "checkpoint/uninterrupted"
  )
  assert resumed.keys() == leaves(arrays, "checkpoint/uninterrupted").keys()
  for key, value in resumed.items():
    np.testing.assert_array_equal(value, arrays[key], err_msg=key)
  # The run moved after the save, so the equality is not trivial.
  key = "checkpoint/uninterrupted['params']['Dense_0']['kernel']"
  assert not np.allclose(arrays[key], arrays[key.replace("uninterrupted", "saved")])


def test_logging_emits_one_record_per_step_from_process_0(two_processes):
  _, results = two_processes
  # jax.debug.callback runs once, on the device that holds the first shard,
  # which belongs to process 0: the others log nothing.
  assert results[0]["log_steps"] == [2, 4, 6]
  assert results[1]["log_steps"] == []
  # The objective of the global batch at each logged step (a mean log-probability of
  # one class in 8, from about -log(8)), and no warning.
  values = results[0]["log_values"]
  assert len(values) == 3 and all(-3 < v < 0 for v in values)
  assert [r["log_warnings"] for r in results] == [0, 0]
  # Logging changes nothing: this run is the replicated layout's, bit for bit.
  arrays = results[0]["arrays"]
  logged = without_logging_stage(arrays, "logging/")
  assert (
    logged.keys()
    == leaves(arrays, "replicated/").keys() - leaves(arrays, "replicated/first").keys()
  )
  for name, value in logged.items():
    np.testing.assert_array_equal(value, arrays[name], err_msg=name)


def test_four_processes_of_two_devices(tmp_path, single_process):
  with workers(4, tmp_path, "logging") as wait:
    results = wait()
  assert [r["devices"] for r in results] == [2] * 4
  # The logging run is the replicated layout with logging on.
  logged = without_logging_stage(results[3]["arrays"], "logging/")
  expected = {
    k: v
    for k, v in single_process["replicated"].items()
    if k.startswith(("replicated/params", "replicated/state"))
  }
  assert_close(logged, expected, RTOL)
  assert [r["log_steps"] for r in results] == [[2, 4, 6], [], [], []]
