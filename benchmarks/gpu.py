"""The GPU check in one command: the tests, the step time, a copy probe, one table.

On a machine whose image has JAX with CUDA, optax, flax, chex, pytest and
torch (with CUDA)::

  pip install --no-deps -e .
  python -m benchmarks.gpu                 # about 5-8 minutes

It runs, and reports in one Markdown table:

1. the test suite, twice at once: the device-agnostic modules with JAX on the
   GPU (``JAX_PLATFORMS=cuda``), and the multi-device modules (sharding,
   pmap, multi-process) on 8 CPU devices as in CI. Modules whose optional
   packages are missing from the image are listed as skipped;
2. the step time of ``gax``, the Optax chain, the hand-fused floor and
   ``torch.optim.RMSprop`` on CUDA (``benchmarks.step_time``, default
   configuration) at 1e6, 1e7 and 5e7 parameters in one leaf and 1e7 in 1000;
3. a device-to-device copy probe: the bandwidth of a jitted ``-x`` over a
   buffer as large as the 5e7 step's traffic, and of ``torch``'s
   ``Tensor.copy_``; the faster one is the copy bandwidth.

Targets for ``gax``: at most 1.05x the Optax chain, at least 80% of the copy
bandwidth at 5e7 parameters, and faster than torch. Without a GPU it stops
with an error, unless ``--allow-cpu``; ``--smoke`` runs tiny sizes anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
import importlib.util
import os
from pathlib import Path
import re
import statistics
import subprocess
import sys
import time

from benchmarks import _common
from benchmarks import step_time

ROOT = Path(__file__).resolve().parent.parent

# Device-agnostic test modules, run with JAX on the GPU.
GPU_TESTS = (
  "test_transforms",
  "test_numerics",
  "test_state_checks",
  "test_alias",
  "test_schedules",
  "test_validation",
  "test_bad_inputs",
  "test_inject_hyperparams",
  "test_param_groups",
  "test_torch_parity",
  "test_flax",
  "test_long_run",
  "test_properties",
  "test_checkpoint",
)
# Modules that need 8 devices or several processes: CPU devices, as in CI.
MULTI_DEVICE_TESTS = (
  "test_sharding",
  "test_execution_modes",
  "test_progress",
  "test_gradient_norm",
  "test_multiprocess",
)
# Optional packages some modules import; a module is skipped when one is absent.
NEEDS = {
  "test_properties": ("hypothesis",),
  "test_checkpoint": ("orbax.checkpoint", "flax"),
  "test_multiprocess": ("orbax.checkpoint", "flax"),
  "test_flax": ("flax",),
  "test_torch_parity": ("torch",),
}
SIZES, SPLIT = "1e6,1e7,5e7", "1e7:1000"
PEERS = (
  step_time.GAX,
  step_time.OPTAX,
  step_time.FLOOR,
  step_time.TORCH_FOREACH,
  step_time.TORCH_LOOP,
)
TESTS_TIMEOUT_S = 300


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:
    return False


def split_by_dependencies(modules: Sequence[str]) -> tuple[list[str], list[str]]:
  """(modules to run, modules skipped because an optional package is absent)."""
  run, skipped = [], []
  for module in modules:
    missing = [need for need in NEEDS.get(module, ()) if not _installed(need)]
    (skipped if missing else run).append(module)
  return run, skipped


# pytest's closing line, bare under -q or between "=" signs: its counts, or "no tests ran".
_SUMMARY = re.compile(
  r"\d+ (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b|no tests ran"
)


def _summary(output: str) -> str:
  """pytest's closing line, e.g. ``120 passed, 2 skipped in 40.1s``.

  Found by its counts, not by place: ``--durations``, warnings and failures
  (from the command line or ``PYTEST_ADDOPTS``) add sections headed by "=" lines.
  """
  lines = [line.strip("= ") for line in output.splitlines() if line.strip("= ")]
  counts = [line for line in lines if _SUMMARY.match(line)]
  return (counts or lines or ["no output"])[-1]


def run_tests(
  groups: dict[str, tuple[list[str], dict[str, str]]], timeout_s: float = TESTS_TIMEOUT_S
) -> list[dict]:
  """Runs each group of test modules in its own pytest process, all at once."""
  procs = {}
  try:
    for name, (modules, env) in groups.items():
      if not modules:
        continue
      paths = [f"tests/{module}.py" for module in modules]
      procs[name] = (
        subprocess.Popen(
          [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *paths],
          cwd=ROOT,
          env={**os.environ, **env},
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
        ),
        modules,
        time.perf_counter(),
      )
    rows = []
    for name, (proc, modules, start) in procs.items():
      try:
        output, _ = proc.communicate(timeout=timeout_s)
        status = "passed" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
      except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate(timeout=30)
        status = f"FAILED (timeout {timeout_s:.0f} s)"
      rows.append(
        {
          "group": name,
          "modules": modules,
          "status": status,
          "summary": _summary(output),
          "seconds": time.perf_counter() - start,
        }
      )
      if proc.returncode != 0:
        print(output[-6000:], file=sys.stderr)
    return rows
  finally:
    for proc, _, _ in procs.values():
      if proc.poll() is None:
        proc.kill()


def _median_seconds(fn, repeats: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def copy_probe(num_bytes: int, repeats: int, torch_device: str | None) -> dict[str, float]:
  """GB/s (bytes read + bytes written) of a device-to-device copy of ``num_bytes``."""
  import jax
  import jax.numpy as jnp

  result = {}
  negate = jax.jit(jnp.negative, donate_argnums=0)
  buffer = [jnp.ones(num_bytes // 4, jnp.float32)]

  def jax_copy():
    buffer[0] = negate(buffer[0])
    buffer[0].block_until_ready()

  result["jax -x"] = 2 * num_bytes / _median_seconds(jax_copy, repeats) / 1e9
  del buffer[0]
  if torch_device is not None:
    import torch

    source = torch.ones(num_bytes // 4, dtype=torch.float32, device=torch_device)
    target = torch.empty_like(source)
    synchronize = torch.cuda.synchronize if torch_device.startswith("cuda") else lambda: None

    def torch_copy():
      target.copy_(source)
      synchronize()

    result["torch copy_"] = 2 * num_bytes / _median_seconds(torch_copy, repeats) / 1e9
  return result


def device_check(allow_cpu: bool) -> tuple[str, str | None]:
  """(JAX platform, torch device or None); raises SystemExit without a GPU."""
  import jax

  platform = jax.devices()[0].platform
  torch_device = None
  torch_cuda = False
  if _installed("torch"):
    import torch

    torch_cuda = torch.cuda.is_available()
    torch_device = "cuda" if torch_cuda else "cpu"
  if platform != "gpu" or not torch_cuda:
    if not allow_cpu:
      found = ", ".join(str(d) for d in jax.devices())
      raise SystemExit(
        f"benchmarks.gpu: no GPU. JAX sees {found}; torch CUDA available: "
        f"{torch_cuda}. Run it on a machine with a CUDA GPU, JAX built for "
        "CUDA (jax[cuda12]) and a CUDA build of torch; or pass --allow-cpu "
        "(or --smoke) to run on the CPU anyway, with numbers that say "
        "nothing about GPUs."
      )
  return platform, torch_device


def table(
  case_rows: list[dict], copy: dict[str, float], tests: list[dict], skipped: list[str], copy_at: int
) -> str:
  """One table: each test group, then each step-time case against the targets."""
  copy_gbps = max(copy.values())
  headers = [
    "what",
    "gax",
    "optax chain",
    "hand-fused",
    "torch RMSprop (best)",
    "gax / optax (<= 1.05)",
    "gax GB/s",
    "of copy BW (>= 80% at 5e7)",
    "faster than torch",
    "result",
  ]
  body = []
  for row in tests:
    body.append(
      [f"tests: {row['group']}", row["summary"], "", "", "", "", "", "", "", row["status"]]
    )
  if skipped:
    body.append(["tests skipped (package absent)", ", ".join(skipped)] + [""] * 7 + ["-"])
  body.append(
    [
      "copy probe",
      ", ".join(f"{k} {v:.3g} GB/s" for k, v in copy.items()),
      "",
      "",
      "",
      "",
      f"{copy_gbps:.1f}",
      "100%",
      "",
      "-",
    ]
  )
  cases = {}
  for row in case_rows:
    cases.setdefault((row["params"], row["leaves"]), {})[row["peer"]] = row
  for (params, leaves), peers in cases.items():
    gax, optax_chain = peers[step_time.GAX], peers[step_time.OPTAX]
    torch_times = [
      peers[p]["seconds"]
      for p in (step_time.TORCH_FOREACH, step_time.TORCH_LOOP)
      if p in peers and peers[p]["seconds"] is not None
    ]
    torch_best = min(torch_times) if torch_times else None
    of_copy = gax["gbps"] / copy_gbps
    checks = [gax["vs_optax"] <= 1.05]
    if params == copy_at and leaves == 1:
      checks.append(of_copy >= 0.8)
    if torch_best is not None:
      checks.append(gax["seconds"] < torch_best)
    body.append(
      [
        f"step {params:.0e} params, {leaves} leaves",
        _common.fmt_time(gax["seconds"]),
        _common.fmt_time(optax_chain["seconds"]),
        _common.fmt_time(peers[step_time.FLOOR]["seconds"]),
        _common.fmt_time(torch_best),
        _common.fmt_ratio(gax["vs_optax"]),
        f"{gax['gbps']:.1f}",
        f"{of_copy:.0%}",
        "n/a" if torch_best is None else ("yes" if gax["seconds"] < torch_best else "NO"),
        "met" if all(checks) else "MISSED",
      ]
    )
  return _common.markdown_table(headers, body)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = _common.base_parser(__doc__.splitlines()[0])
  parser.add_argument(
    "--allow-cpu", action="store_true", help="run without a GPU instead of stopping with an error"
  )
  parser.add_argument(
    "--tests",
    default=None,
    help="comma-separated test modules to run instead of the suite "
    "(e.g. test_schedules); 'none' for none",
  )
  parser.add_argument("--output", default=None, help="also write the table to this file")
  args = parser.parse_args(argv)
  platform, torch_device = device_check(args.allow_cpu or args.smoke)
  sizes, split, repeats, min_sample_ms = SIZES, SPLIT, args.repeats or 15, 20.0
  if args.smoke:
    sizes, split, repeats, min_sample_ms = "1e4", "1e4:10", args.repeats or 3, 1.0
  copy_at = _common.parse_counts(sizes)[-1]

  gpu_modules, multi_modules = list(GPU_TESTS), list(MULTI_DEVICE_TESTS)
  if args.tests is not None:
    chosen = [] if args.tests == "none" else args.tests.split(",")
    gpu_modules = [m for m in chosen if m not in MULTI_DEVICE_TESTS]
    multi_modules = [m for m in chosen if m in MULTI_DEVICE_TESTS]
  gpu_modules, skipped = split_by_dependencies(gpu_modules)
  multi_modules, skipped_multi = split_by_dependencies(multi_modules)
  # The GPU test run shares the GPU with this process: no up-front grab of
  # most of its memory (XLA's default) in either.
  gpu_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  if platform == "gpu":
    gpu_env["JAX_PLATFORMS"] = "cuda"
  groups = {
    f"{'GPU' if platform == 'gpu' else platform.upper()} (device-agnostic)": (gpu_modules, gpu_env),
    "8 CPU devices (multi-device)": (multi_modules, {"JAX_PLATFORMS": "cpu"}),
  }
  _common.print_header("GPU check", argv if argv is not None else sys.argv[1:])
  tests = run_tests(groups)

  config = _common.DEFAULT
  cases = [(n, 1) for n in _common.parse_counts(sizes)] + step_time.parse_cases(split)
  case_rows = []
  for num_params, num_leaves in cases:
    case_rows += step_time.measure_case(
      config,
      num_params,
      num_leaves,
      repeats,
      min_sample_ms / 1e3,
      PEERS + (step_time.PROBE,),
      torch_device=torch_device or "cpu",
    )
  copy = copy_probe(_common.BYTES_PER_PARAM * copy_at // 2, repeats, torch_device)
  text = table(case_rows, copy, tests, skipped + skipped_multi, copy_at)
  print(text + "\n", flush=True)
  if args.output:
    Path(args.output).write_text(text + "\n")
  _common.write_json(args.json, case_rows)
  return {
    "tests": tests,
    "skipped": skipped + skipped_multi,
    "steps": case_rows,
    "copy": copy,
    "table": text,
  }


if __name__ == "__main__":
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX starts
  main()
